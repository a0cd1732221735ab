"""full_gpu: the seed's reference run end to end — the `full` preset's VAE and UNet, 10,000 samples, evaluated.

    python -m benchmarks full_gpu --device cuda --run-dir runs/full --budget-s 540       # one device lend
    python -m benchmarks full_gpu --device cuda --run-dir runs/full --budget-s 540       # again, same machine: resumes
    python -m benchmarks full_gpu --preset smoke --run-dir runs/full-smoke --n 200       # the same path on a CPU

Made for a GPU lent for a few minutes at a time. Training runs with the settings that remove per-step overhead
on CUDA: the data on the device, bf16 autocast, the forward pass compiled for the full batch size, each full-batch
step (loss, backward, clipping, the fused Adam) replayed as one CUDA graph (--cuda-graph, the default;
nbutils.training.StepGraph) — or, with --no-cuda-graph, only the forward and backward as CUDA graphs of
torch.compile's --compile-mode "reduce-overhead" —, no sample grids during training, the loss parts read back
every few dozen steps, and a checkpoint (with the VAE's test evaluation) every --checkpoint-every epochs instead
of every epoch. When --budget-s runs out the
process stops itself after the current step (SIGTERM, which the training loop turns into a checkpoint); run the
same command again and it resumes exactly where it stopped (each model's --resume). Once both models are trained
it samples --n images with --recipe and evaluates them on both judges (the resnet's numbers at the top, the vgg's
under its name). The record says how far the run got ("stage"), the device, the software versions, the wall time
of each part, each model's median seconds per epoch and per step (over the epochs of the run's history, so the
few that compile barely count; the slowest epoch is reported apart) and, when finished, the quality numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from statistics import median

import torch

from benchmarks import common
from nbutils.classifier import ARCHS
from nbutils.config import COMPILE_MODES, PRESETS, get_config
from nbutils.evaluation import evaluate_all, evaluators
from nbutils.pipeline import SHIPPED_RECIPE, load_pipeline, sample
from nbutils.train_unet import train_unet
from nbutils.train_vae import train_vae
from nbutils.training import TrainingInterrupted, load_history

COLUMNS = ["stage", "preset", "device", "vae_epochs", "unet_epochs", "vae_seconds", "unet_seconds",
           "sample_seconds", "fid", "kid", "cond_acc"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, n=10_000, checkpoint=None, n_help="samples to evaluate")
    p.add_argument("--preset", choices=PRESETS, default="full")
    p.add_argument("--run-dir", default="runs/full", help="the run folder (resumed when it holds a run)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop training cleanly after this many seconds (default: no limit)")
    p.add_argument("--stop-after-steps", type=common.positive_int, default=None,
                   help="stop training cleanly after this many optimizer steps of this invocation, both models "
                        "counted (on a GPU at the next read-back of the step numbers); default: no limit")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="reduce-overhead",
                   help="torch.compile's mode for the forward pass (with --cuda-graph its own CUDA graphs are off)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay each full-batch training step as one CUDA graph (default: on)")
    p.add_argument("--checkpoint-every", type=common.positive_int, default=10, metavar="N",
                   help="save each model (and evaluate the VAE) every N epochs (default 10; a stop always saves)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-epoch lines remain)")
    p.add_argument("--recipe", choices=("model", "shipped"), default="shipped",
                   help="sampling recipe: the model's own or the shipped model's (default)")


def _settings(preset: str, device: str, compile_mode: str):
    cfg = get_config(preset)
    if torch.device(device).type == "cuda":
        fast = dict(mixed_precision="bf16", compile=True, compile_mode=compile_mode, sample_every=0)
    else:
        fast = dict(sample_every=0)
    return cfg.replace(train_vae=dataclasses.replace(cfg.train_vae, **fast),
                       train_unet=dataclasses.replace(cfg.train_unet, **fast))


def _epochs(run_dir: Path, what: str) -> list[dict]:
    try:
        _, epochs = load_history(run_dir, what)
    except (FileNotFoundError, ValueError):
        return []
    return epochs


def _speed(epochs: list[dict]) -> dict:
    """Median seconds per epoch and per step over the epochs run whole (robust to the few that compile: the first
    of each invocation, the slowest shown apart)."""
    whole = [e for e in epochs if "resumed_at_batch" not in e]
    if not whole:
        return {}
    seconds = median([e["seconds"] for e in whole])
    steps = round(median([e["seconds"] * e["batches_per_s"] for e in whole]))
    return {"epoch_seconds": round(seconds, 3), "step_seconds": round(seconds / steps, 5), "steps_per_epoch": steps,
            "slowest_epoch_seconds": round(max(e["seconds"] for e in whole), 1),
            "trained_seconds": round(sum(e["seconds"] for e in epochs), 1)}


def run(args: argparse.Namespace) -> dict:
    cfg = _settings(args.preset, args.device, args.compile_mode)
    run_dir = Path(args.run_dir)
    t_start = time.perf_counter()
    timer = None
    if args.budget_s is not None:
        if args.budget_s <= 0:
            raise ValueError(f"--budget-s must be positive, got {args.budget_s}")

        def stop_outside_the_loop(signum, frame):  # the training loop installs its own, graceful handler
            raise TrainingInterrupted("stopped before a training loop started (budget)")

        signal.signal(signal.SIGTERM, stop_outside_the_loop)
        timer = threading.Timer(args.budget_s, lambda: os.kill(os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
    record = {"preset": args.preset, "device": args.device, "run_dir": str(run_dir),
              "compile_mode": args.compile_mode if torch.device(args.device).type == "cuda" else "none",
              "cuda_graph": args.cuda_graph and torch.device(args.device).type == "cuda"}
    record["torch"] = torch.__version__
    if torch.device(args.device).type == "cuda":
        record["card"] = torch.cuda.get_device_name(args.device)
        record["cuda"] = torch.version.cuda
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions once
    stage = "vae"
    steps_done = 0

    def count(step: int, parts: dict) -> None:  # the same graceful stop as the budget's
        nonlocal steps_done
        steps_done += 1
        if steps_done == args.stop_after_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    on_step = count if args.stop_after_steps else None
    try:
        t0 = time.perf_counter()
        train_vae(cfg, run_dir=run_dir, resume=(run_dir / "vae_state.pt").is_file(), device=args.device,
                  log=common.log, on_step=on_step, progress=not args.no_progress,
                  checkpoint_every=args.checkpoint_every, cuda_graph=args.cuda_graph)
        record["vae_seconds"] = round(time.perf_counter() - t0, 1)
        stage = "unet"
        t0 = time.perf_counter()
        train_unet(cfg, run_dir=run_dir, resume=(run_dir / "unet_state.pt").is_file(), device=args.device,
                   log=common.log, on_step=on_step, progress=not args.no_progress,
                   checkpoint_every=args.checkpoint_every, cuda_graph=args.cuda_graph)
        record["unet_seconds"] = round(time.perf_counter() - t0, 1)
    except TrainingInterrupted as exc:
        common.log(str(exc))
        record.update(stage=f"stopped in {stage} training (budget); run the same command again to resume",
                      steps_this_run=steps_done)
    finally:
        if timer is not None:
            timer.cancel()
    for what in ("vae", "unet"):
        epochs = _epochs(run_dir, what)
        record[f"{what}_epochs"] = len(epochs)
        record[f"{what}_speed"] = _speed(epochs)
    if "stage" not in record:
        pipe = load_pipeline(run_dir, device=args.device)
        recipe = SHIPPED_RECIPE if args.recipe == "shipped" else pipe.recipe
        labels = common.cycling_labels(args.n)
        with common.Timer(args.device) as t:
            out = sample(pipe, args.n, labels, recipe, torch.Generator().manual_seed(args.seed),
                         progress=not args.no_progress)
        record["sample_seconds"] = round(t.seconds, 1)
        m = evaluate_all(out.images, labels, evaluators(device=args.device), with_novelty=False)
        record.update(common.scores(m), stage="done", recipe=recipe.to_dict(),
                      **{judge: common.scores(m[judge]) for judge in ARCHS[1:]})
    record["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return record
