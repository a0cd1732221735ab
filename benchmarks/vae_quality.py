"""Quality of a VAE checkpoint: reconstruction metrics on the test set and latent statistics.

    python benchmarks/vae_quality.py                      # the shipped VAE (checkpoints/)
    python benchmarks/vae_quality.py --checkpoint runs/cpu

Prints one JSON object: PSNR / SSIM / MSE of the reconstructions of all 10,000 test images (posterior mean,
decoded, rounded to uint8 exactly as `python -m nbutils reconstruct` writes them), and the statistics of the
standardised latents the UNet trains on (posterior samples z = μ + σ·ε of every training image, seed 0):
per-channel mean and standard deviation and the overall standard deviation.
"""

from __future__ import annotations

import argparse
import json

import torch

from nbutils import data
from nbutils.config import checkpoints_dir
from nbutils.metrics import reconstruction_metrics
from nbutils.train import load_vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(checkpoints_dir()))
    args = ap.parse_args()
    vae, meta = load_vae(args.checkpoint, device="cpu")
    images, _ = data.load_split("test")
    recon = []
    with torch.no_grad():
        for i in range(0, len(images), 1000):
            x = data.to_model_range(images[i : i + 1000])
            recon.append(data.to_uint8(vae.decode(vae.encode(x))))
    metrics = reconstruction_metrics(images, torch.cat(recon))
    cache = data.latent_dataset(vae, meta["path"], progress=False)
    g = torch.Generator().manual_seed(0)
    z = vae.standardize(cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape, generator=g))
    print(json.dumps({
        "checkpoint": meta["path"], "epochs": meta["extra"].get("epoch"), "test_images": len(images),
        "psnr": round(metrics["psnr"], 3), "ssim": round(metrics["ssim"], 4), "mse": round(metrics["mse"], 6),
        "latent_scale": round(float(vae.latent_scale), 5),
        "latent_channel_mean": [round(v, 4) for v in z.mean(dim=(0, 2, 3)).tolist()],
        "latent_channel_std": [round(v, 4) for v in z.std(dim=(0, 2, 3)).tolist()],
        "latent_std": round(z.std().item(), 4),
    }, indent=1))


if __name__ == "__main__":
    main()
