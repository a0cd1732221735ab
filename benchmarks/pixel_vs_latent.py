"""pixel_vs_latent: this project's latent model against a pixel-space DDPM built from diffusers, same CPU budget.

    pip install -e '.[bench]'         # diffusers
    python -m benchmarks pixel_vs_latent --minutes 20 --n 1000

(a) latent: the --preset (default cpu) from scratch: the VAE (its training, the encoding of the training set and
    the latent statistics all count against the budget), then the latent UNet for whatever time is left;
(b) pixel: diffusers.UNet2DModel (class-conditional through num_class_embeds, an extra class as the null token for
    classifier-free guidance) + DDPMScheduler's forward process, on 28×28 images padded to 32×32, with a parameter
    count close to the latent UNet's (--pixel-channels), for the whole budget: ε-prediction, linear 1000-step
    schedule, Adam 1e-3, batch 128, class dropped with p = 0.1, EMA 0.999.

Both are stopped at the budget, mid-epoch if need be (the latent one through the SIGINT path a user's Ctrl-C
takes), then sampled by the same sampler code (DPM-Solver++, --steps, guidance --guidance on every step, seed
--seed) and scored by the same metrics against the 10,000 test images. The runs recorded in docs/results.md were
made when the cpu preset was the linear schedule with ε-prediction, i.e. the pixel model's recipe; the cpu preset
is now the cosine schedule with v-prediction (the record names the latent run's schedule and target).
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from nbutils import data as D
from nbutils.config import PRESETS, get_config, make_generator
from nbutils.pipeline import SamplingRecipe, guided_output, load_pipeline, sample
from nbutils.samplers import make_sampler
from nbutils.schedules import NoiseSchedule

COLUMNS = ["model", "params", "train_seconds", "images_per_s", "fid", "kid", "cond_acc"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, n=1000, checkpoint=None, n_help="samples per model for the metrics")
    p.add_argument("--minutes", type=float, default=20.0, help="CPU wall-clock budget per model (default 20)")
    p.add_argument("--steps", type=common.positive_int, default=20, help="DPM-Solver++ steps (default 20)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="the latent model's preset (default cpu)")
    p.add_argument("--pixel-channels", default="32,64,96")
    p.add_argument("--run-dir", default="runs/pixel_vs_latent", help="where the latent run is written")
    p.add_argument("--only", choices=("latent", "pixel"))


def _interrupt_after(seconds: float) -> threading.Timer:
    """Send this process SIGINT after ``seconds``: nbutils' training loops finish the step, save and stop."""
    timer = threading.Timer(max(seconds, 0.0), lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    return timer


def train_latent(preset: str, budget: float, run_dir: Path, device) -> tuple[object, float]:
    from nbutils.train_unet import train_unet
    from nbutils.train_vae import train_vae
    from nbutils.training import TrainingInterrupted

    cfg = get_config(preset)
    t0 = time.perf_counter()
    train_vae(cfg, run_dir=run_dir, device=device, progress=False, log=common.log)
    vae_seconds = time.perf_counter() - t0
    common.log(f"latent: VAE done in {vae_seconds:.0f} s; UNet gets the remaining {budget - vae_seconds:.0f} s")
    timers = []

    def on_step(step: int, parts: dict) -> None:  # from the first step on, train_unet's Ctrl-C handler is in place
        if not timers:
            timers.append(_interrupt_after(t0 + budget - time.perf_counter()))

    try:
        train_unet(cfg, run_dir=run_dir, epochs=10_000, device=device, progress=False, log=common.log,
                   on_step=on_step)
    except TrainingInterrupted:
        pass
    finally:
        for timer in timers:
            timer.cancel()
    return load_pipeline(run_dir, device=device), time.perf_counter() - t0


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


def train_pixel(budget: float, channels: tuple[int, ...]) -> tuple[PixelModel, float]:
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
    common.log(f"pixel: diffusers UNet2DModel, {sum(p.numel() for p in model.parameters()):,} parameters")
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
                common.log(f"pixel: step {step}, loss {loss.item():.4f}, {time.perf_counter() - t0:.0f} s")
    return ema, time.perf_counter() - t0


@torch.no_grad()
def sample_pixel(model: PixelModel, labels: torch.Tensor, steps: int, guidance: float, seed: int = 0,
                 batch: int = 250) -> torch.Tensor:
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    gen = make_generator(seed)
    out = []
    for s in range(0, len(labels), batch):
        y = labels[s : s + batch]
        sampler = make_sampler("dpm", schedule, "epsilon", steps)
        x = torch.randn(len(y), 1, 32, 32, generator=gen)
        for t in sampler.timesteps:
            x = sampler.step(guided_output(model, x, t, y, guidance, model.null_label), t, x, generator=gen)
        out.append(x[:, :, 2:30, 2:30].clamp(-1, 1))
    return torch.cat(out)


def run(args: argparse.Namespace) -> dict:
    budget = args.minutes * 60
    ev = common.evaluator(args)
    labels = common.cycling_labels(args.n)
    models = []
    if args.only in (None, "latent"):
        pipe, seconds = train_latent(args.preset, budget, Path(args.run_dir), args.device)
        recipe = SamplingRecipe(sampler="dpm", steps=args.steps, guidance=args.guidance)
        with common.Timer(args.device) as t:
            images = sample(pipe, args.n, labels, recipe, make_generator(args.seed)).images
        name = f"latent (this project, {args.preset}: {pipe.diffusion.beta_schedule}, {pipe.diffusion.prediction_type})"
        models.append((name, sum(p.numel() for p in pipe.unet.parameters()), seconds, args.n / t.seconds, images))
    if args.only in (None, "pixel"):
        model, seconds = train_pixel(budget, tuple(int(c) for c in args.pixel_channels.split(",")))
        with common.Timer() as t:
            images = sample_pixel(model, labels, args.steps, args.guidance, args.seed)
        models.append(("pixel (diffusers UNet2DModel)", sum(p.numel() for p in model.parameters()), seconds,
                       args.n / t.seconds, images))
    rows = []
    for name, params, seconds, ips, images in models:
        m = ev.evaluate(images, labels, with_novelty=False, with_floor=False, kid_subsets=50)
        rows.append({"model": name, "params": params, "train_seconds": round(seconds), "images_per_s": round(ips, 1),
                     **common.scores(m)})
        common.log(rows[-1])
    return {"task": "pixel_vs_latent", "minutes": args.minutes, "n": args.n, "steps": args.steps,
            "guidance": args.guidance, "rows": rows}
