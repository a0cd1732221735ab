"""What every task shares: the common flags, loading the models and the evaluator, timing, guidance specs, and the
result record (date, machine, exact command) printed as JSON and optionally written to a file or as Markdown."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from nbutils.evaluation import Evaluator, to_json
from nbutils.metrics import conditional_accuracy, fid, kid
from nbutils.pipeline import Pipeline, load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def add_common(p: argparse.ArgumentParser, n: int | None = None, checkpoint: str | None = "checkpoints",
               n_help: str = "number of images") -> None:
    """The flags every task has: ``--device --seed --out --markdown``, and ``--checkpoint`` / ``--n`` where the
    task has a model to load / a number of images to make (``checkpoint=None`` / ``n=None``: it has not)."""
    if checkpoint is not None:
        p.add_argument("--checkpoint", default=checkpoint,
                       help=f"run folder or checkpoint file (default: {checkpoint})")
    if n is not None:
        p.add_argument("--n", type=positive_int, default=n, help=f"{n_help} (default {n})")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise / the draws (default 0)")
    p.add_argument("--out", help="also append the record to this file: one JSON line, or for a .md file the Markdown "
                                 "table with a line naming the date, machine and command")
    p.add_argument("--markdown", action="store_true", help="print the rows as a Markdown table after the JSON line")


def log(message) -> None:
    """Progress for the person watching (a dict as JSON): stderr, so that stdout stays one JSON line."""
    print(to_json(message) if isinstance(message, dict) else message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Loading, labels, scoring


def load(args: argparse.Namespace) -> Pipeline:
    return load_pipeline(args.checkpoint, device=args.device)


def evaluator(args: argparse.Namespace) -> Evaluator:
    """The project classifier and the test set's features (cached on disk after the first use)."""
    return Evaluator(device=args.device)


def cycling_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """Classes cycling 0..9 (``--class all``), the protocol of every table in docs/results.md."""
    return torch.arange(n) % num_classes


def scores(m: dict) -> dict:
    """FID / KID / conditional accuracy of an :meth:`Evaluator.evaluate` result, rounded for a table."""
    return {"fid": round(m["fid"], 4), "kid": round(m["kid"], 5), "cond_acc": round(m["cond_acc"], 4)}


def score_against(ev: Evaluator, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                  kid_subsets: int = 50) -> dict:
    """FID and KID of ``images`` against the feature set ``reference``, and conditional accuracy (which does not
    depend on the reference); with the test features as reference the numbers are :meth:`Evaluator.evaluate`'s."""
    feats, logits = ev.features(images)
    acc, _ = conditional_accuracy(logits.argmax(1), labels)
    return scores({"fid": fid(feats, reference), "kid": kid(feats, reference, subsets=kid_subsets)[0],
                   "cond_acc": acc})


def parse_spec(spec: str) -> dict:
    """A guidance spec ``W[@LO-HI][:bf16]`` → :class:`~nbutils.pipeline.SamplingRecipe` fields:
    ``"3.5@0-400:bf16"`` → guidance 3.5 on 0 ≤ t ≤ 400 under bf16 autocast; no interval = every step."""
    body, _, precision = spec.partition(":")
    w, _, interval = body.partition("@")
    try:
        lo_hi = tuple(int(v) for v in interval.split("-")) if interval else None
        out = {"guidance": float(w), "guidance_interval": lo_hi, "precision": precision or "fp32"}
    except ValueError:
        raise ValueError(f"bad guidance spec {spec!r}: expected W[@LO-HI][:bf16], e.g. 3@30-600") from None
    if lo_hi is not None and len(lo_hi) != 2:
        raise ValueError(f"bad guidance spec {spec!r}: the interval is LO-HI, e.g. 3@30-600")
    return out


# --------------------------------------------------------------------------------------------
# Timing


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """``with Timer(device) as t: …`` → ``t.seconds`` (``time.perf_counter``; CUDA synchronised at both ends)."""

    def __init__(self, device="cpu"):
        self.device, self.seconds = device, None

    def __enter__(self) -> Timer:
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


# --------------------------------------------------------------------------------------------
# The record


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device="cpu") -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    def cell(v) -> str:
        return v if isinstance(v, str) else to_json(v)

    lines += ["| " + " | ".join(cell(r[c]) if c in r else "—" for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit(args: argparse.Namespace, record: dict, columns: list[str] | None = None) -> dict:
    """Stamp ``record`` with the date, machine and command; print it as one JSON line (and ``--markdown``: its
    ``rows`` as a table); append it to ``--out``."""
    record = {**record, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine(getattr(args, "device", "cpu")),
              "command": getattr(args, "command_line", "python -m benchmarks " + " ".join(sys.argv[1:]))}
    line = to_json(record)
    print(line, flush=True)
    rows = record.get("rows") or [record]
    table = markdown_table(rows, columns)
    if args.markdown:
        print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            if out.suffix.lower() == ".md":
                m = record["machine"]
                f.write(f"\n{record['date']}, {m['cpu']} ({m['threads']} threads), torch {m['torch']}: "
                        f"`{record['command']}`\n\n{table}\n")
            else:
                f.write(line + "\n")
    return record
