"""Sampling speed and quality of each sampler / step count, on one model.

For every ``SAMPLER:STEPS`` pair (``STEPS`` = ``all``: every timestep the schedule samples from — 1000 on the
linear schedule, 996 on the cosine one, whose first steps are clipped at λ ≥ −5.1 — the usual choice for DDPM):
sample ``--n`` class-conditioned images (classes cycling 0..9, one guidance scale, one seed), time the sampling
(model already loaded; the VAE decode included), and score the images with the project's metrics (FID / KID
against the 10,000 test images, conditional accuracy). The real-data floor at the same N is printed once. Results
go to stdout as a Markdown table and, with ``--json``, to a file.

    python benchmarks/sampling.py --n 1000 --configs dpm:10,dpm:20,ddim:20,ddim:50,ddpm:all

FID depends on N (it is biased upwards for small N): compare rows of one run, not numbers across runs
with different N. For the end-to-end time of the CLI (imports and model loading included) use
``time python -m nbutils sample --n 1000 --steps 20 --out /tmp/s.npz``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from nbutils.config import make_generator
from nbutils.metrics import Evaluator
from nbutils.samplers import make_sampler, sample
from nbutils.schedules import NoiseSchedule
from nbutils.train import load_models


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints", help="run folder or checkpoints/ (default: shipped)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--configs", default="dpm:10,dpm:20,dpm:50,ddim:20,ddim:50,ddpm:all",
                   help="SAMPLER:STEPS pairs, comma-separated; STEPS = all: every timestep the schedule samples from")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--no-metrics", action="store_true", help="timing only")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps")
    args = p.parse_args()

    unet, vae, meta = load_models(args.checkpoint, device=args.device)
    labels = torch.arange(args.n) % 10
    evaluator = None if args.no_metrics else Evaluator(device=args.device)
    rows = []
    for item in args.configs.split(","):
        name, steps = item.split(":")
        steps = None if steps == "all" else int(steps)
        # the number of steps that runs (for "all": the schedule's, e.g. 996 on the cosine one); a bad count fails here
        steps = len(make_sampler(name, NoiseSchedule.from_config(unet.diffusion_cfg), steps=steps).timesteps)
        sample(unet, vae, 10, labels[:10], guidance=args.guidance, sampler=name, steps=2)  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        out = sample(unet, vae, args.n, labels, guidance=args.guidance, sampler=name, steps=steps,
                     generator=make_generator(args.seed), batch_size=args.batch_size)
        _sync(args.device)
        seconds = time.perf_counter() - t0
        row = {"sampler": name, "steps": steps, "n": args.n, "seconds": round(seconds, 2),
               "images_per_s": round(args.n / seconds, 1)}
        if evaluator is not None:
            m = evaluator.evaluate(out.images, labels, with_novelty=False, with_floor=not rows, kid_subsets=50)
            row.update(fid=round(m["fid"], 3), kid=round(m["kid"], 5), cond_acc=round(m["cond_acc"], 4))
            if "floor" in m:
                floor = m["floor"]
                print(f"floor ({floor['what']} vs the test set): FID {floor['fid']:.3f}, KID {floor['kid']:.5f}, "
                      f"classifier test accuracy {floor['cond_acc']:.4f}")
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmodel {meta['path']} (epoch {meta['extra'].get('epoch')}), guidance {args.guidance}, N = {args.n}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    cols = ["sampler", "steps", "seconds", "images_per_s"] + ([] if args.no_metrics else ["fid", "kid", "cond_acc"])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": meta["path"], "guidance": args.guidance, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
