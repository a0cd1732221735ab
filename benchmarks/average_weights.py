"""Average the UNet weights of several checkpoints (e.g. one run's EMA weights after several epochs) into one.

    python benchmarks/average_weights.py runs/avg runs/snap/e9 runs/snap/e10 … runs/snap/e16

A cheap stand-in for a longer EMA (Karras et al. 2024 construct EMA profiles after the fact from snapshots; this is
the plainest case, a uniform average). Writes ``OUT/unet.safetensors`` with the first checkpoint's config, and links
the shipped VAE beside it so that ``--checkpoint OUT`` works in every benchmark. Measured in benchmarks/README.md
("Sampling-side levers on the cosine-schedule UNet"): no gain over the last EMA.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nbutils.checkpoints import read_model, save_model
from nbutils.config import Config, checkpoints_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("checkpoints", nargs="+", type=Path, help="folders holding unet.safetensors")
    args = ap.parse_args()
    total, meta = None, None
    for folder in args.checkpoints:
        tensors, m = read_model(folder / "unet.safetensors", "unet")
        if meta is not None and m["config"]["unet"] != meta["config"]["unet"]:
            raise SystemExit(f"{folder} has a different UNet architecture from {args.checkpoints[0]}")
        meta = meta or m
        tensors = {k: v.double() for k, v in tensors.items()}
        total = tensors if total is None else {k: total[k] + tensors[k] for k in total}
    average = {k: (v / len(args.checkpoints)).float() for k, v in total.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    extra = {**meta["extra"], "averaged_from": [str(c) for c in args.checkpoints]}
    save_model(args.out / "unet.safetensors", "unet", average, Config.from_dict(meta["config"]), extra)
    for name in ("vae.safetensors", "vae.json"):
        link = args.out / name
        if not link.exists():
            link.symlink_to((checkpoints_dir() / name).resolve())
    print(f"{args.out / 'unet.safetensors'}: the average of {len(args.checkpoints)} checkpoints")


if __name__ == "__main__":
    main()
