"""Training throughput of the latent UNet: latent samples per second for one optimizer step.

    python benchmarks/unet_throughput.py --preset cpu --batch-size 128 --steps 20

Times forward + backward + Adam step on random 4×7×7 latents (the data loader is not included: latents
are in memory). Prints one JSON line per configuration; record results in benchmarks/README.md with the
machine (CPU model and core count, or GPU card) they came from.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from nbutils.config import get_config, pick_device
from nbutils.diffusion import GaussianDiffusion
from nbutils.unet import UNet, count_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    cfg = get_config(args.preset)
    device = pick_device(args.device)
    torch.manual_seed(0)
    unet = UNet(cfg.unet).to(device).train()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion(cfg.diffusion)
    x0 = torch.randn(args.batch_size, cfg.unet.latent_channels, 7, 7, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss, _ = diffusion.loss(unet, x0, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    print(json.dumps({
        "preset": args.preset, "params": count_parameters(unet), "batch_size": args.batch_size,
        "device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "s_per_step": round(seconds, 4), "latents_per_s": round(args.batch_size / seconds, 1),
        "epoch_minutes_60k": round(60000 / args.batch_size * seconds / 60, 2),
    }))


if __name__ == "__main__":
    main()
