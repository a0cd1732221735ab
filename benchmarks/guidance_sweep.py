"""Guidance scale × guidance interval × precision: FID, KID, conditional accuracy and sampling time.

    python benchmarks/guidance_sweep.py --n 2000 2 3 3@0-600 3.5@0-400 3.5@0-400:bf16

Each spec is ``W[@LO-HI][:bf16]``: guidance scale W, applied only at timesteps LO ≤ t ≤ HI (plain conditional
sampling elsewhere; default all steps), the UNet optionally under bf16 autocast. Every spec samples the same
``--n`` images (classes cycling, seed 0, ``--sampler`` (DPM-Solver++) with ``--steps``) from one model and scores
them against the 10,000 test images. FID is biased upwards at small N: compare rows of one run.
``--steps 16 --guided-steps 12`` puts 12 of the 16 steps inside the interval of each spec that starts at 0;
``--spacing logsnr`` spaces steps evenly in log-SNR (with ``--guided-steps``: the guided ones).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nbutils.config import make_generator
from nbutils.metrics import Evaluator
from nbutils.samplers import SAMPLERS, SPACINGS, sample
from nbutils.train import load_models


def parse_spec(spec: str) -> tuple[float, tuple[int, int] | None, str]:
    """``"3.5@0-400:bf16"`` → ``(3.5, (0, 400), "bf16")``."""
    body, _, precision = spec.partition(":")
    w, _, interval = body.partition("@")
    lo_hi = tuple(int(v) for v in interval.split("-")) if interval else None
    return float(w), lo_hi, precision or "fp32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="W[@LO-HI][:bf16] …")
    ap.add_argument("--checkpoint", default="checkpoints")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", choices=SAMPLERS, default="dpm",
                    help="default: dpm (DPM-Solver++(2M)); dpm-sde is its stochastic (SDE) version")
    ap.add_argument("--guided-steps", type=int, default=None,
                    help="of the --steps, this many inside the guidance interval (specs with an interval from 0, "
                         "e.g. 3@0-400; `sample(…, guided_steps=…)`); the other specs keep the plain schedule")
    ap.add_argument("--spacing", choices=SPACINGS, default=None,
                    help="timestep spacing of the solver (default: the sampler's, trailing); with --guided-steps it "
                         "spaces the guided part (trailing or logsnr)")
    args = ap.parse_args()

    unet, vae, meta = load_models(args.checkpoint, device="cpu")
    evaluator = Evaluator()
    labels = torch.arange(args.n) % 10
    rows = []
    for spec in args.specs:
        w, interval, precision = parse_spec(spec)
        split = args.guided_steps if interval is not None and interval[0] == 0 else None
        t0 = time.perf_counter()
        out = sample(unet, vae, args.n, labels, guidance=w, sampler=args.sampler, steps=args.steps,
                     generator=make_generator(0), guidance_interval=interval, precision=precision,
                     timestep_spacing=args.spacing, guided_steps=split)
        seconds = time.perf_counter() - t0
        m = evaluator.evaluate(out.images, labels, with_novelty=False, with_floor=False, kid_subsets=50)
        label = spec + (f" ({args.steps - split}+{split})" if split else "")
        row = {"spec": label, "n": args.n, "fid": round(m["fid"], 4), "kid": round(m["kid"], 5),
               "cond_acc": round(m["cond_acc"], 4), "sample_seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    spacing = args.spacing or "trailing"
    print(f"\nmodel {meta['path']}, {args.sampler} {args.steps} steps ({spacing}), N = {args.n}, "
          f"{torch.get_num_threads()} threads")
    print("| spec | FID | KID | conditional accuracy | sampling s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spec']} | {r['fid']} | {r['kid']} | {r['cond_acc']} | {r['sample_seconds']} |")


if __name__ == "__main__":
    main()
