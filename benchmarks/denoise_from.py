"""Where do the UNet's errors come from? Noise real latents to a level, let the model finish, score the result.

    python benchmarks/denoise_from.py --n 2000 --strength 0 0.05 0.1 0.2 0.3 0.4 0.6 0.8 1
    python benchmarks/denoise_from.py --n 2000 --guidance 3.5@0-400 --strength 0.05 0.2 0.4 1

SDEdit-style partial generation (Meng et al. 2022): encode ``--n`` test images, noise their latents to the first
timestep of the last round(20·strength) DPM-Solver++ steps (``sample(…, init_latents=…, strength=…)``), run those
steps with each image's own class, decode, and score against the 10,000 test images. Strength 0 is the VAE
alone (the ceiling at this N); strength 1 starts from almost pure noise (full generation, except that the noise
came from real latents). How fast FID climbs with strength says at which noise levels the model's denoising is
off: a model that fitted the data would keep FID at the VAE's level all the way. Compare rows of one run (FID is
biased upwards at small N, and these images are a subset of the reference set).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from guidance_sweep import parse_spec  # benchmarks/ is on sys.path when a script here runs

from nbutils.config import make_generator
from nbutils.data import to_model_range
from nbutils.metrics import Evaluator
from nbutils.samplers import sample
from nbutils.train import load_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints")
    ap.add_argument("--n", type=int, default=2000, help="test images (a fixed random draw)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", default="1",
                    help="W[@LO-HI][:bf16] as in guidance_sweep.py (default 1: the plain conditional model)")
    ap.add_argument("--strength", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1])
    args = ap.parse_args()

    unet, vae, meta = load_models(args.checkpoint, device="cpu")
    ev = Evaluator()
    idx = torch.randperm(len(ev.test_images), generator=make_generator(0))[: args.n]
    images = to_model_range(ev.test_images[idx])  # the Evaluator's data: FashionMNIST
    labels = ev.test_labels[idx]
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 500]) for i in range(0, len(images), 500)])
    w, lo_hi, precision = parse_spec(args.guidance)
    for strength in args.strength:
        t0 = time.perf_counter()
        if strength == 0:
            with torch.no_grad():
                out = torch.cat([vae.decode(latents[i : i + 500]) for i in range(0, len(latents), 500)])
        else:
            out = sample(unet, vae, args.n, labels, guidance=w, guidance_interval=lo_hi, precision=precision,
                         sampler="dpm", steps=args.steps, generator=make_generator(1), init_latents=latents,
                         strength=strength).images
        seconds = time.perf_counter() - t0
        m = ev.evaluate(out, labels, with_novelty=False, with_floor=False, kid_subsets=50)
        print(json.dumps({"strength": strength, "guidance": args.guidance, "n": args.n, "fid": round(m["fid"], 4),
                          "kid": round(m["kid"], 5), "cond_acc": round(m["cond_acc"], 4),
                          "seconds": round(seconds, 1)}), flush=True)
    print(f"model {meta['path']}, DPM-Solver++ {args.steps} steps")


if __name__ == "__main__":
    main()
