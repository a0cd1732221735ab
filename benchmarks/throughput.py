"""throughput: speed of the latent UNet per architecture: a training step and a guided-sampling forward pass.

    python -m benchmarks throughput --preset cpu
    python -m benchmarks throughput --preset cpu --variants "64,128x2 64,128x1 48,96x1 32,64x2"

For each variant (CHANNELSxLAYERS_PER_BLOCK; default: the preset's own UNet) it times, on random 4×7×7 latents,

* one optimizer step (forward + backward + Adam) at --batch-size → latent samples/s and minutes per
  60,000-latent epoch (no data loader: the latents are in memory);
* one inference forward pass at batch --sample-batch (a guided sampling step over 500 images is one forward pass
  over 1,000 latents: conditional + unconditional) → the projected time for 1,000 guided images at 20 steps
  (40 such passes; the VAE decode not included).

--warmup untimed repetitions come first. --channels-last adds each variant again with weights and latents stored
channels-last (NHWC, the layout :func:`nbutils.pipeline.load_pipeline` gives models on the CPU) and the ratio of
the two layouts' times, measured in the same run. Every row also counts the forward pass's floating-point
operations (``torch.utils.flop_counter``: convolutions and matrix products, two per multiply-add) and the rate
achieved; --peak first times a large float32 matrix product, the best rate this machine's BLAS reaches, so that each
row's ``peak_fraction`` says how close the pass already is to the compute floor. Record results with the machine (the
record names it).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from nbutils.config import PRESETS, get_config
from nbutils.diffusion import GaussianDiffusion
from nbutils.unet import UNet, count_parameters

COLUMNS = ["channels", "layers_per_block", "bf16", "layout", "params", "s_per_step", "latents_per_s",
           "epoch_minutes_60k", "s_per_forward", "gflop_per_forward", "gflop_per_s", "peak_fraction",
           "projected_s_1000_images_20_guided_steps", "step_speedup", "forward_speedup"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, checkpoint=None)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--variants", default="", help='e.g. "64,128x2 48,96x1" (default: the preset\'s UNet)')
    p.add_argument("--batch-size", type=common.positive_int, default=128, help="training batch")
    p.add_argument("--steps", type=common.positive_int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--sample-batch", type=common.positive_int, default=1000, help="latents per forward pass")
    p.add_argument("--bf16", action="store_true", help="also measure every variant under bf16 autocast")
    p.add_argument("--channels-last", action="store_true",
                   help="also measure every variant channels-last (NHWC), with the speed-up over the default layout")
    p.add_argument("--peak", action="store_true",
                   help="first time a 2048² float32 matrix product: the rate the compute floor is measured against")


def parse_arch(text: str) -> tuple[tuple[int, ...], int]:
    """``"48,96x1"`` → ``((48, 96), 1)``."""
    channels, _, layers = text.partition("x")
    return tuple(int(c) for c in channels.split(",")), int(layers or 1)


def matmul_gflop_per_s(device: torch.device, size: int = 2048, reps: int = 10) -> float:
    """The rate (GFLOP/s) of a ``size``² float32 matrix product: about the best sustained rate of this machine's
    BLAS (oneDNN/MKL on CPUs), the ceiling any convolution-heavy network can approach."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    for _ in range(2):
        a @ b
    with common.Timer(device) as t:
        for _ in range(reps):
            a @ b
    return 2 * size**3 * reps / t.seconds / 1e9


def forward_gflop(unet, x, t, y) -> float:
    """Floating-point operations (GFLOP, a multiply-add counted as two) of one forward pass."""
    with FlopCounterMode(display=False) as counter:
        unet(x, t, y)
    return counter.get_total_flops() / 1e9


def measure(unet_cfg, diffusion_cfg, device, batch_size: int, steps: int, warmup: int, sample_batch: int,
            bf16: bool = False, seed: int = 0, channels_last: bool = False, peak: float | None = None) -> dict:
    torch.manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    unet = UNet(unet_cfg).to(device).to(memory_format=layout).train()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion(diffusion_cfg)
    x0 = torch.randn(batch_size, unet_cfg.latent_channels, 7, 7, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = diffusion.loss(unet, x0, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        train_step()
    with common.Timer(device) as t:
        for _ in range(steps):
            train_step()
    train_s = t.seconds / steps

    unet.eval()
    x = torch.randn(sample_batch, unet_cfg.latent_channels, 7, 7, device=device).contiguous(memory_format=layout)
    tt = torch.full((sample_batch,), 500, device=device)
    y = torch.randint(0, 11, (sample_batch,), device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(2):
            unet(x, tt, y)
        with common.Timer(device) as t:
            for _ in range(5):
                unet(x, tt, y)
        gflop = forward_gflop(unet, x, tt, y)
    fwd_s = t.seconds / 5
    return {
        "channels": list(unet_cfg.block_out_channels), "layers_per_block": unet_cfg.layers_per_block, "bf16": bf16,
        "layout": "channels_last" if channels_last else "contiguous",
        "params": count_parameters(unet), "batch_size": batch_size, "s_per_step": round(train_s, 4),
        "latents_per_s": round(batch_size / train_s, 1),
        "epoch_minutes_60k": round(60000 / batch_size * train_s / 60, 2),
        "sample_batch": sample_batch, "s_per_forward": round(fwd_s, 4), "gflop_per_forward": round(gflop, 2),
        "gflop_per_s": round(gflop / fwd_s, 1), "peak_fraction": round(gflop / fwd_s / peak, 3) if peak else None,
        "projected_s_1000_images_20_guided_steps": round(40 * fwd_s * 1000 / sample_batch, 2),
    }


def run(args: argparse.Namespace) -> dict:
    cfg = get_config(args.preset)
    device = torch.device(args.device)
    variants = [cfg.unet]
    if args.variants:
        variants = [dataclasses.replace(cfg.unet, block_out_channels=c, layers_per_block=k)
                    for c, k in map(parse_arch, args.variants.split())]
    peak = matmul_gflop_per_s(device) if args.peak else None
    if peak:
        common.log({"matmul_gflop_per_s": round(peak, 1)})
    rows = []
    for ucfg in variants:
        for bf16 in (False, True) if args.bf16 else (False,):
            for channels_last in (False, True) if args.channels_last else (False,):
                rows.append(measure(ucfg, cfg.diffusion, device, args.batch_size, args.steps, args.warmup,
                                    args.sample_batch, bf16, args.seed, channels_last, peak))
                if channels_last:  # against the default layout's row just before
                    base = rows[-2]
                    rows[-1]["step_speedup"] = round(base["s_per_step"] / rows[-1]["s_per_step"], 3)
                    rows[-1]["forward_speedup"] = round(base["s_per_forward"] / rows[-1]["s_per_forward"], 3)
                common.log(rows[-1])
    return {"task": "throughput", "preset": args.preset, "device": str(device),
            "matmul_gflop_per_s": round(peak, 1) if peak else None, "rows": rows}
