"""shipped: re-measure the README's headline numbers: the checkpoint's recipe at N = 10,000, VAE ceiling, floor.

The recipe row samples N = 10,000 images with the checkpoint's own recipe and evaluates them beside the VAE
ceiling and the real-data floor; --parts and --rows add everything docs/results.md's shipped-model section has.

    python -m benchmarks shipped                                 # ceiling, floor, the recipe's row (≈ 10 min, 2 cores)
    python -m benchmarks shipped --checkpoint runs/candidate     # a candidate before shipping it
    python -m benchmarks shipped --parts all --rows all          # every part (≈ 1 h on a 2-core CPU, DDPM most of it)

Parts (--parts, default: vae rows; all = vae samplers screening rows cli):
  vae        VAE quality and the ceiling: the `vae` task on the checkpoint's VAE over --n test images
  samplers   the `sampling` table, --n-samplers images per --sampler-configs entry, guidance 3 on every step
  screening  the `guidance` sweep, --n-sweep images per spec, FID against the validation reference: --specs at
             20 even steps, --logsnr-specs at 20 log-SNR steps, --split-specs at 4 + 12 steps (empty: skipped)
  rows       --n samples per row (classes cycling, seed --seed), rounded to uint8 as a sample file is, evaluated
             like `python -m nbutils evaluate` (novelty, floor); --rows: recipe (the checkpoint's own recipe),
             recipe_bf16, g2 (w = 2 on every step, 20 even steps), g3_0-600 (w = 3 on t ≤ 600); the FID ÷ ceiling
             ratio when the vae part ran
  cli        end-to-end wall time of `python -m nbutils sample --n N_CLI`, twice each: --recipe default --steps 20,
             the checkpoint's recipe, and that under bf16
  pictures   the README pictures in docs/img/ (only with checkpoints/, only when named)

bf16 rows and timings are left out where the device has no native bf16. The timed parts (samplers, cli) want the
machine to themselves. Ported from benchmarks/shipped_model.sh.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import common, guidance, sampling, vae
from nbutils.config import bf16_supported, checkpoints_dir, make_generator
from nbutils.data import to_uint8
from nbutils.pipeline import VAE_FILE, Pipeline, SamplingRecipe, sample

PARTS = ("vae", "samplers", "screening", "rows", "cli")
ROWS = {
    "recipe": lambda pipe: pipe.recipe,
    "recipe_bf16": lambda pipe: pipe.recipe.replace(precision="bf16"),
    "g2": lambda pipe: SamplingRecipe(sampler="dpm", steps=20, guidance=2.0),
    "g3_0-600": lambda pipe: SamplingRecipe(sampler="dpm", steps=20, guidance=3.0, guidance_interval=(0, 600)),
}
SPECS = "1 2 3 3@0-707 3@0-600 3.25@0-600 3.5@0-600 3.5@0-500"
LOGSNR_SPECS = "3@0-600 3.25@0-600 3@30-600 3.25@30-600 3.5@30-600"
COLUMNS = ["row", "fid", "kid", "cond_acc", "novelty", "exact_copies", "fid_vs_ceiling", "sampling_seconds",
           "evaluate_seconds"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, n=10000, n_help="images per evaluation row and test images for the ceiling")
    p.add_argument("--parts", nargs="+", choices=(*PARTS, "pictures", "all"), default=["vae", "rows"])
    p.add_argument("--rows", nargs="+", choices=(*ROWS, "all"), default=["recipe"])
    p.add_argument("--n-sweep", type=common.positive_int, default=2000)
    p.add_argument("--n-samplers", type=common.positive_int, default=1000)
    p.add_argument("--n-cli", type=common.positive_int, default=1000)
    p.add_argument("--sampler-configs", default=sampling.CONFIGS)
    p.add_argument("--specs", default=SPECS, help=f"20 even steps (default {SPECS!r})")
    p.add_argument("--logsnr-specs", default=LOGSNR_SPECS, help=f"20 log-SNR steps (default {LOGSNR_SPECS!r})")
    p.add_argument("--split-specs", default="", help="4 + 12 steps (default: none)")
    p.add_argument("--no-latents", action="store_true", help="vae part: leave out the latent statistics")
    p.add_argument("--samples-dir", help="also write each row's samples here as s<N>_<row>.npz")


def evaluation_rows(pipe: Pipeline, ev, names: list[str], n: int, seed: int, samples_dir: str | None) -> list[dict]:
    labels = common.cycling_labels(n)
    rows = []
    for name in names:
        recipe = ROWS[name](pipe)
        with common.Timer(pipe.device) as t:
            result = sample(pipe, n, labels, recipe, make_generator(seed))
        images = to_uint8(result.images)  # what a sample file holds
        if samples_dir:
            Path(samples_dir).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(Path(samples_dir) / f"s{n}_{name}.npz", images=images.numpy(), labels=labels.numpy())
        m = ev.evaluate(images, labels)
        rows.append({"row": name, **common.scores(m), "novelty": round(m["novelty"]["ratio"], 3),
                     "exact_copies": m["novelty"]["exact_copies"], "sampling_seconds": round(t.seconds, 2),
                     "evaluate_seconds": m["seconds"], "floor": m["floor"],
                     "per_class_acc": {k: round(v, 4) for k, v in m["per_class_acc"].items()},
                     "recipe": recipe.to_dict()})
        common.log({k: v for k, v in rows[-1].items() if k not in ("floor", "per_class_acc", "recipe")})
    return rows


def cli_timings(checkpoint: str, n: int, device: str, bf16: bool) -> list[dict]:
    flag_sets = [["--recipe", "default", "--steps", "20"], ["--recipe", "model"]]
    flag_sets += [["--recipe", "model", "--precision", "bf16"]] if bf16 else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for flags in flag_sets:
            for _ in range(2):
                cmd = [sys.executable, "-m", "nbutils", "sample", "--checkpoint", checkpoint, "--n", str(n), *flags,
                       "--device", device, "--no-progress", "--out", str(Path(tmp) / "cli.npz")]
                with common.Timer() as t:
                    subprocess.run(cmd, check=True, capture_output=True)
                rows.append({"flags": " ".join(flags), "n": n, "wall_seconds": round(t.seconds, 2)})
                common.log(rows[-1])
    return rows


def pictures() -> list[str]:
    img = common.ROOT / "docs" / "img"
    cmds = [["sample", "--checkpoint", "checkpoints", "--n", "100", "--class", "all", "--recipe", "shipped",
             "--sampler", "dpm", "--seed", "0", "--out", str(img / "samples.png")],
            ["reconstruct", "--n", "100", "--checkpoint", "checkpoints", "--out", str(img / "vae_reconstructions.png")]]
    for cmd in cmds:
        subprocess.run([sys.executable, "-m", "nbutils", *cmd], check=True, capture_output=True, cwd=common.ROOT)
    return [str(Path(cmd[-1]).relative_to(common.ROOT)) for cmd in cmds]


def run(args: argparse.Namespace) -> dict:
    parts = list(dict.fromkeys(p for part in args.parts for p in (PARTS if part == "all" else (part,))))
    names = list(ROWS) if "all" in args.rows else list(dict.fromkeys(args.rows))
    pipe = common.load(args)
    bf16 = bf16_supported(args.device)
    out = {"task": "shipped", "checkpoint": pipe.meta["path"], "recipe": pipe.recipe.to_dict(), "parts": parts,
           "n": args.n, "seed": args.seed}
    if not bf16:
        names = [r for r in names if "bf16" not in r]
        out["note"] = f"{args.device} has no native bf16: the bf16 rows and timings are left out"
    ev = common.evaluator(args) if set(parts) & {"vae", "samplers", "screening", "rows"} else None
    rows, ceiling = [], None
    if "vae" in parts:
        out["vae"] = vae.measure(pipe.vae, str(Path(pipe.meta["path"]).parent / VAE_FILE), ev, args.n,
                                 not args.no_latents, args.seed)
        ceiling = out["vae"]["fid"]
        rows += [{"row": "floor: real training images", **common.scores(out["vae"]["floor"])},
                 {"row": "ceiling: the VAE's reconstructions of the test images", **common.scores(out["vae"]),
                  "fid_vs_ceiling": 1.0}]
    if "samplers" in parts:
        out["samplers"] = sampling.measure(pipe, ev, sampling.parse_configs(args.sampler_configs), args.n_samplers,
                                           3.0, args.seed, device=args.device)
    if "screening" in parts:
        ref, what = guidance.reference(ev, "val", 10000)
        out["screening"] = {"reference": what, "sweeps": []}
        for specs, spacing, steps, split in ((args.specs, None, 20, None), (args.logsnr_specs, "logsnr", 20, None),
                                             (args.split_specs, None, 16, 12)):
            specs = [s for s in specs.split() if bf16 or ":bf16" not in s]
            if specs:
                sweep = guidance.sweep(pipe, ev, specs, args.n_sweep, ref, "dpm", steps, spacing, split, args.seed)
                out["screening"]["sweeps"].append({"spacing": spacing or "trailing", "steps": steps,
                                                   "guided_steps": split, "rows": sweep})
    if "rows" in parts:
        for row in evaluation_rows(pipe, ev, names, args.n, args.seed, args.samples_dir):
            floor = row.pop("floor")  # the same for every row: real images at the same N
            if not rows:
                rows.append({"row": "floor: real training images", **common.scores(floor)})
            if ceiling is not None:
                row["fid_vs_ceiling"] = round(row["fid"] / ceiling, 3)
            rows.append(row)
    if "cli" in parts:
        out["cli"] = cli_timings(args.checkpoint, args.n_cli, args.device, bf16)
    if "pictures" in parts:
        if Path(args.checkpoint).resolve() == checkpoints_dir().resolve():
            out["pictures"] = pictures()
        else:
            out["pictures"] = "skipped: the README pictures are drawn from checkpoints/ only"
    out["rows"] = rows
    return out
