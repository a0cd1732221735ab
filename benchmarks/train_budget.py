"""Train one latent-UNet variant for a fixed wall-clock budget (how the shipped UNet and the GPU rows were made).

    python benchmarks/train_budget.py --arch 48,96x1 --minutes 6 --run-dir runs/gpu_48x96 --device cuda
    python benchmarks/train_budget.py --prepare --device cuda     # only encode the training set (latent cache)

The variant is the ``--preset`` config (default ``cpu``) with the UNet's ``block_out_channels`` ×
``layers_per_block`` replaced by ``--arch`` and, if given, ``--lr`` / ``--ema-decay`` / ``--batch-size``. Training
runs through :func:`nbutils.train.train_unet` on the shipped VAE and stops when the budget is spent — mid-epoch if
need be, through the same signal path as a user's Ctrl-C, so the run folder holds a resumable checkpoint of
exactly where it stopped (``python -m nbutils train-unet --run-dir DIR --resume`` continues it). Prints one JSON
line: steps, epochs, seconds, steps/s.

Several of these can share one GPU (a ~2M-parameter UNet at batch 128 is bound by kernel launches, not by the
GPU's arithmetic): run ``--prepare`` once first so the runs don't all encode the training set at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

from nbutils.config import MIXED_PRECISION, get_config, pick_device


def parse_arch(text: str) -> tuple[tuple[int, ...], int]:
    """``"48,96x1"`` → ``((48, 96), 1)``."""
    channels, _, layers = text.partition("x")
    return tuple(int(c) for c in channels.split(",")), int(layers or 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--arch", help="CHANNELSxLAYERS, e.g. 48,96x1 (default: the preset's UNet)")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--ema-decay", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--mixed-precision", default="no", choices=MIXED_PRECISION)
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget")
    ap.add_argument("--epochs", type=int, default=10_000, help="stop earlier if this many epochs are done")
    ap.add_argument("--run-dir", default="runs/budget")
    ap.add_argument("--vae", default="checkpoints", help="VAE file or folder (default: the shipped VAE)")
    ap.add_argument("--device")
    ap.add_argument("--prepare", action="store_true", help="only build the latent cache of --vae, then exit")
    args = ap.parse_args()

    from nbutils import data as D
    from nbutils.checkpoints import resolve_checkpoint
    from nbutils.train import TrainingInterrupted, load_vae, train_unet

    device = pick_device(args.device)
    if args.prepare:
        path = resolve_checkpoint("vae.safetensors", args.vae)
        vae, meta = load_vae(path, device=device)
        cache = D.latent_dataset(vae, meta["path"], progress=False)
        print(json.dumps({"prepared": str(path), "latents": len(cache["labels"])}), flush=True)
        return

    cfg = get_config(args.preset)
    unet_changes, train_changes = {}, {"mixed_precision": args.mixed_precision, "sample_every": 5}
    if args.arch:
        channels, layers = parse_arch(args.arch)
        unet_changes.update(block_out_channels=channels, layers_per_block=layers,
                            attention_levels=(False,) * (len(channels) - 1) + (True,))
    for key, value in (("lr", args.lr), ("ema_decay", args.ema_decay), ("batch_size", args.batch_size)):
        if value is not None:
            train_changes[key] = value
    cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, **unet_changes),
                      train_unet=dataclasses.replace(cfg.train_unet, **train_changes))

    deadline = time.perf_counter() + args.minutes * 60
    t0 = time.perf_counter()
    last = {"step": 0}

    def on_step(step: int, parts: dict) -> None:
        if "first" not in last:
            last["first"] = (step, time.perf_counter())
        last["step"] = step
        if time.perf_counter() > deadline and not last.get("sent"):
            last["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)  # train_unet finishes this step, saves, raises TrainingInterrupted

    def on_epoch_end(record, history, ema_model, grid) -> None:
        last["epoch"] = record["epoch"]

    stopped = False
    try:
        train_unet(cfg, run_dir=args.run_dir, epochs=args.epochs, vae_checkpoint=args.vae, device=device,
                   progress=False, on_step=on_step, on_epoch_end=on_epoch_end)
    except TrainingInterrupted:
        stopped = True
    seconds = time.perf_counter() - t0
    first_step, first_time = last.get("first", (0, t0))
    steps_per_s = (last["step"] - first_step) / max(time.perf_counter() - first_time, 1e-9)
    steps_per_epoch = -(-60_000 // cfg.train_unet.batch_size)
    print(json.dumps({"run_dir": str(Path(args.run_dir)), "arch": [list(cfg.unet.block_out_channels),
                      cfg.unet.layers_per_block], "device": str(device), "steps": last["step"],
                      "epochs": round(last["step"] / steps_per_epoch, 2), "stopped_by_budget": stopped,
                      "seconds": round(seconds, 1), "steps_per_s": round(steps_per_s, 2)}), flush=True)


if __name__ == "__main__":
    main()
