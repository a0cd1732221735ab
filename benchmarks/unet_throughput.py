"""Speed of the latent UNet: training throughput and guided-sampling forward time, per architecture.

    python benchmarks/unet_throughput.py --preset cpu
    python benchmarks/unet_throughput.py --preset cpu --variants "64,128x2 64,128x1 48,96x1 32,64x2"

For each variant (``CHANNELSxLAYERS_PER_BLOCK``; default: the preset's own UNet) it times

* one optimizer step (forward + backward + Adam) at ``--batch-size`` on random 4×7×7 latents
  → latent samples/s and minutes per 60,000-latent epoch (the data loader is not included: latents are
  in memory);
* one inference forward pass at batch ``--sample-batch`` (a guided sampling step over 500 images is one
  forward pass over 1,000 latents: conditional + unconditional) → the projected time for 1,000 guided
  images at 20 steps (40 such passes; the VAE decode not included).

Prints one JSON line per variant; record results in benchmarks/README.md with the machine (CPU model and
core count, or GPU card) they came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch
from train_budget import parse_arch  # benchmarks/ is on sys.path when a script here runs

from nbutils.config import get_config, pick_device
from nbutils.diffusion import GaussianDiffusion
from nbutils.unet import UNet, count_parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(unet_cfg, diffusion_cfg, device, batch_size: int, steps: int, warmup: int, sample_batch: int,
            bf16: bool = False) -> dict:
    torch.manual_seed(0)
    unet = UNet(unet_cfg).to(device).train()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion(diffusion_cfg)
    x0 = torch.randn(batch_size, unet_cfg.latent_channels, 7, 7, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = diffusion.loss(unet, x0, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    train_s = (time.perf_counter() - t0) / steps

    unet.eval()
    x = torch.randn(sample_batch, unet_cfg.latent_channels, 7, 7, device=device)
    t = torch.full((sample_batch,), 500, device=device)
    y = torch.randint(0, 11, (sample_batch,), device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(2 + 5):
            if i == 2:
                _sync(device)
                t0 = time.perf_counter()
            unet(x, t, y)
    _sync(device)
    fwd_s = (time.perf_counter() - t0) / 5
    return {
        "channels": list(unet_cfg.block_out_channels), "bf16": bf16, "layers_per_block": unet_cfg.layers_per_block,
        "params": count_parameters(unet), "batch_size": batch_size, "s_per_step": round(train_s, 4),
        "latents_per_s": round(batch_size / train_s, 1),
        "epoch_minutes_60k": round(60000 / batch_size * train_s / 60, 2),
        "sample_batch": sample_batch, "s_per_forward": round(fwd_s, 4),
        "projected_s_1000_images_20_guided_steps": round(40 * fwd_s * 1000 / sample_batch, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--variants", default="", help='e.g. "64,128x2 48,96x1" (default: the preset\'s UNet)')
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-batch", type=int, default=1000)
    ap.add_argument("--device", default=None)
    ap.add_argument("--bf16", action="store_true", help="also measure every variant under bf16 autocast")
    args = ap.parse_args()
    cfg = get_config(args.preset)
    device = pick_device(args.device)
    variants = [cfg.unet]
    if args.variants:
        variants = []
        for v in args.variants.split():
            channels, layers = parse_arch(v)
            variants.append(dataclasses.replace(cfg.unet, block_out_channels=channels, layers_per_block=layers))
    for ucfg, bf16 in [(u, b) for u in variants for b in ((False, True) if args.bf16 else (False,))]:
        row = measure(ucfg, cfg.diffusion, device, args.batch_size, args.steps, args.warmup, args.sample_batch, bf16)
        row.update(preset=args.preset, device=str(device), threads=torch.get_num_threads(),
                   cpu=platform.processor() or platform.machine(), torch=torch.__version__)
        if device.type == "cuda":
            row["gpu"] = torch.cuda.get_device_name(device)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
