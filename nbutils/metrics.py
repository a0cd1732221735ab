"""Measuring images.

Reconstruction metrics (this file, used by the VAE): MSE, PSNR and SSIM on images scaled to [0, 1].
Generation metrics (FID/KID on features of the project's own classifier, conditional accuracy, novelty)
join them with the evaluation notebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images → float [0, 1], shape (N, 1, H, W)."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = (x.float().clamp(-1, 1) + 1) / 2
    if x.ndim == 3:
        x = x[:, None]
    return x


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on [0, 1] images (accepts uint8 or [-1, 1] floats)."""
    return (to_unit(x) - to_unit(y)).pow(2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB, peak = 1: ``10·log10(1 / MSE)``."""
    return 10.0 * torch.log10(1.0 / (mse(x, y) + eps))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004).

    The original definition: an 11×11 Gaussian window with σ = 1.5, constants C1 = (0.01·L)²,
    C2 = (0.03·L)² with L = 1, computed over the 'valid' window positions (18×18 of them for 28×28)
    and averaged. Identical images give exactly 1.
    """
    a, b = to_unit(x), to_unit(y)
    w = _gaussian_window(window, sigma).to(a.device)[None, None]
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def reconstruction_metrics(x: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """Mean MSE, PSNR (dB) and SSIM over a batch of images and their reconstructions."""
    return {
        "mse": float(mse(x, recon).mean()),
        "psnr": float(psnr(x, recon).mean()),
        "ssim": float(ssim(x, recon).mean()),
    }
