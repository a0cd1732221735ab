"""Where do extra solver steps pay off: the unguided high-noise part or the guided low-noise part?

    python benchmarks/split_steps.py --checkpoint checkpoints --n 2000 12/8 30/20 12/20 30/8

With guidance on t ≤ 400 only, 50 DPM-Solver++ steps score a much better FID than 20 at the same accuracy
(benchmarks/README.md), for 2.5× the UNet passes. Each spec ``A/B`` puts A steps on (400, 999] (plain
conditional model, one UNet pass each) and B steps on [0, 400] (guided, two passes each), each part spaced like
``trailing`` (``nbutils.samplers.split_timesteps``; ``sample(…, steps=A + B, guided_steps=B)``), so 12/8 is
exactly the 20-step trailing schedule and 30/20 the 50-step one. Every spec samples the same ``--n`` images
(classes cycling, seed 0) and is scored against the 10,000 test images; ``passes`` is the UNet batch passes per image.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nbutils.config import make_generator
from nbutils.metrics import Evaluator
from nbutils.samplers import sample
from nbutils.train import load_models

SPLIT = 400


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="A/B: A steps above t = 400, B steps at or below")
    ap.add_argument("--checkpoint", default="checkpoints")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--guidance", type=float, default=3.0)
    args = ap.parse_args()

    unet, vae, _ = load_models(args.checkpoint, device="cpu")
    ev = Evaluator()
    classes = torch.arange(args.n) % 10
    for spec in args.specs:
        high, low = (int(v) for v in spec.split("/"))
        t0 = time.perf_counter()
        out = sample(unet, vae, args.n, classes, guidance=args.guidance, guidance_interval=(0, SPLIT), sampler="dpm",
                     steps=high + low, guided_steps=low, generator=make_generator(0))
        seconds = time.perf_counter() - t0
        res = ev.evaluate(out.images, out.labels, with_novelty=False)
        print(json.dumps({"spec": spec, "guidance": args.guidance, "checkpoint": args.checkpoint, "n": args.n,
                          "passes": high + 2 * low,
                          "fid": round(res["fid"], 4), "kid": round(res["kid"], 5),
                          "cond_acc": round(res["cond_acc"], 4), "sampling_s": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
