"""Is latent diffusion worth it here? This project's latent model against a pixel-space DDPM built from
Hugging Face ``diffusers``, each given the same CPU wall-clock budget.

    pip install -e '.[bench]'         # diffusers
    python benchmarks/pixel_vs_latent.py --minutes 20 --n 1000

(a) **latent**: the `cpu` preset from scratch — the VAE (its training, the encoding of the training set and the
    latent statistics all count against the budget), then the latent UNet for whatever time is left;
(b) **pixel**: ``diffusers.UNet2DModel`` (class-conditional through ``num_class_embeds``, an extra class as the
    null token for classifier-free guidance) + ``DDPMScheduler``'s forward process, on 28×28 images padded to
    32×32 as people do, with a parameter count close to the latent UNet's, for the whole budget.

Both train with the same recipe (ε-prediction, linear 1000-step schedule, Adam, batch 128, class dropped with
p = 0.1, EMA 0.999) and are stopped at the budget mid-epoch if need be (through the same SIGINT path a user's
Ctrl-C takes). Both are then sampled by *the same sampler code* (this project's DPM-Solver++, ``--steps``,
guidance ``--guidance``) and scored by the same metrics (FID / KID / conditional accuracy against the 10,000
test images). Prints one JSON line per model and a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nbutils import data as D
from nbutils.config import get_config, make_generator
from nbutils.metrics import Evaluator
from nbutils.samplers import make_sampler
from nbutils.schedules import NoiseSchedule


def _interrupt_after(seconds: float) -> threading.Timer:
    """Send this process SIGINT after ``seconds``: nbutils' training loops finish the step, save and stop."""
    timer = threading.Timer(max(seconds, 0.0), lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    return timer


def train_latent(budget: float, run_dir: Path, log) -> tuple[object, object, float]:
    from nbutils.train import TrainingInterrupted, load_models, train_unet, train_vae

    cfg = get_config("cpu")
    t0 = time.perf_counter()
    train_vae(cfg, run_dir=run_dir, device="cpu", progress=False, log=log)
    vae_seconds = time.perf_counter() - t0
    log(f"latent: VAE done in {vae_seconds:.0f} s; UNet gets the remaining {budget - vae_seconds:.0f} s")
    timer = _interrupt_after(budget - (time.perf_counter() - t0))
    try:
        train_unet(cfg, run_dir=run_dir, epochs=10_000, device="cpu", progress=False, log=log)
    except TrainingInterrupted:
        pass
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    unet, vae, _ = load_models(run_dir, device="cpu")
    return unet, vae, seconds


class PixelModel(torch.nn.Module):
    """``diffusers.UNet2DModel`` behind this project's ``model(x, t, labels)`` interface (null class = 10)."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=32, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            num_class_embeds=11, norm_num_groups=8,
        )
        self.null_label = 10

    def forward(self, x, t, labels):
        return self.net(x, t, class_labels=labels).sample


def train_pixel(budget: float, channels: tuple[int, ...], log) -> tuple[PixelModel, float]:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = PixelModel(channels)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    images, labels = D.load_split("train")
    x_all = F.pad(D.to_model_range(images), (2, 2, 2, 2), value=-1.0)  # 28×28 → 32×32, background colour
    g = torch.Generator().manual_seed(0)
    loader = D.TensorLoader((x_all, labels), batch_size=128, shuffle=True, generator=g)
    log(f"pixel: diffusers UNet2DModel, {sum(p.numel() for p in model.parameters()):,} parameters")
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget:
        for x0, y in loader:
            if time.perf_counter() - t0 >= budget:
                break
            t = torch.randint(0, 1000, (len(x0),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            y = torch.where(torch.rand(len(y), generator=g) < 0.1, torch.full_like(y, 10), y)
            loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t, y), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            d = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(p, 1 - d)
            if step % 100 == 0:
                log(f"pixel: step {step}, loss {loss.item():.4f}, {time.perf_counter() - t0:.0f} s")
    return ema, time.perf_counter() - t0


@torch.no_grad()
def sample_pixel(model: PixelModel, labels: torch.Tensor, steps: int, guidance: float, batch: int = 250):
    from nbutils.samplers import guided_output

    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    gen = make_generator(0)
    out = []
    for s in range(0, len(labels), batch):
        y = labels[s : s + batch]
        sampler = make_sampler("dpm", schedule, "epsilon", steps)
        x = torch.randn(len(y), 1, 32, 32, generator=gen)
        for t in sampler.timesteps:
            x = sampler.step(guided_output(model, x, t, y, guidance, model.null_label), t, x, generator=gen)
        out.append(x[:, :, 2:30, 2:30].clamp(-1, 1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="CPU wall-clock budget per model")
    ap.add_argument("--n", type=int, default=1000, help="samples per model for the metrics")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--pixel-channels", default="32,64,96")
    ap.add_argument("--run-dir", default="runs/pixel_vs_latent")
    ap.add_argument("--only", choices=("latent", "pixel"))
    args = ap.parse_args()
    budget = args.minutes * 60

    def log(msg: str) -> None:
        print(msg, flush=True)

    evaluator = Evaluator()
    labels = torch.arange(args.n) % 10
    rows = []
    if args.only in (None, "latent"):
        from nbutils.samplers import sample

        unet, vae, seconds = train_latent(budget, Path(args.run_dir) / "latent", log)
        t0 = time.perf_counter()
        images = sample(unet, vae, args.n, labels, guidance=args.guidance, sampler="dpm", steps=args.steps,
                        generator=make_generator(0)).images
        rows.append(("latent (this project)", sum(p.numel() for p in unet.parameters()), seconds,
                     args.n / (time.perf_counter() - t0), images))
    if args.only in (None, "pixel"):
        channels = tuple(int(c) for c in args.pixel_channels.split(","))
        model, seconds = train_pixel(budget, channels, log)
        t0 = time.perf_counter()
        images = sample_pixel(model, labels, args.steps, args.guidance)
        rows.append(("pixel (diffusers UNet2DModel)", sum(p.numel() for p in model.parameters()), seconds,
                     args.n / (time.perf_counter() - t0), images))
    table = []
    for name, params, seconds, ips, images in rows:
        m = evaluator.evaluate(images, labels, with_novelty=False, with_floor=False, kid_subsets=50)
        r = {"model": name, "params": params, "train_seconds": round(seconds), "images_per_s": round(ips, 1),
             "fid": round(m["fid"], 4), "kid": round(m["kid"], 5), "cond_acc": round(m["cond_acc"], 4)}
        table.append(r)
        print(json.dumps(r), flush=True)
    cols = list(table[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in table:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
