"""vae: reconstruction quality of a VAE on the test set (PSNR, SSIM, rFID: the VAE ceiling) and its latent statistics.

    python -m benchmarks vae                          # the shipped VAE (checkpoints/), all 10,000 test images
    python -m benchmarks vae --checkpoint runs/cpu

The first --n test images are encoded (posterior mean), decoded and rounded to uint8 exactly as
`python -m nbutils reconstruct` writes them. Reported: PSNR / SSIM / MSE against the originals; the ceiling —
FID, KID and conditional accuracy of the reconstructions against the 10,000 test images, with the real-data
floor at the same N (`evaluate --no-novelty` on the reconstructions): the best FID any sample of a latent model
on this VAE can reach; and the statistics of the standardised latents the UNet trains on (posterior samples
z = μ + σ·ε of every training image, seed --seed: per-channel mean and standard deviation, overall standard
deviation), from the latent cache (encoding the 60,000 training images takes minutes the first time;
--no-latents skips it).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common
from nbutils import data
from nbutils.evaluation import Evaluator
from nbutils.latents import latent_dataset
from nbutils.metrics import reconstruction_metrics
from nbutils.pipeline import load_vae

COLUMNS = ["checkpoint", "n", "psnr", "ssim", "mse", "fid", "kid", "cond_acc", "floor_fid", "latent_std"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, n=10000, n_help="test images")
    p.add_argument("--no-ceiling", action="store_true", help="reconstruction metrics only (no FID / KID / accuracy)")
    p.add_argument("--no-latents", action="store_true", help="leave out the latent statistics")


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """uint8 reconstructions (posterior mean, decoded, rounded) of uint8 images."""
    device = next(vae.parameters()).device
    out = [data.to_uint8(vae.decode(vae.encode(data.to_model_range(images[i : i + batch_size]).to(device))))
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def measure(vae, vae_path: str, ev: Evaluator | None, n: int = 10000, latents: bool = True, seed: int = 0) -> dict:
    images, labels = data.load_split("test", subset=n)
    recon = reconstruct(vae, images)
    m = reconstruction_metrics(images, recon)
    out = {"n": len(images), "psnr": round(m["psnr"], 3), "ssim": round(m["ssim"], 4), "mse": round(m["mse"], 6)}
    if ev is not None:
        e = ev.evaluate(recon, labels, with_novelty=False)
        out.update(common.scores(e), floor_fid=round(e["floor"]["fid"], 4), floor=e["floor"])
    if latents:
        cache = latent_dataset(vae, vae_path, progress=False)
        g = torch.Generator().manual_seed(seed)
        z = cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape, generator=g)
        z = vae.standardize(z.to(vae.latent_shift.device)).cpu()
        out.update(latent_scale=round(float(vae.latent_scale), 5),
                   latent_channel_mean=[round(v, 4) for v in z.mean(dim=(0, 2, 3)).tolist()],
                   latent_channel_std=[round(v, 4) for v in z.std(dim=(0, 2, 3)).tolist()],
                   latent_std=round(z.std().item(), 4))
    return out


def run(args: argparse.Namespace) -> dict:
    vae, meta = load_vae(args.checkpoint, device=args.device)
    ev = None if args.no_ceiling else common.evaluator(args)
    return {"task": "vae", "checkpoint": meta["path"], "epochs": meta["extra"].get("epoch"),
            **measure(vae, meta["path"], ev, args.n, not args.no_latents, args.seed)}
