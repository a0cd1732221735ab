"""Measuring images.

Reconstruction metrics (used by the VAE): MSE, PSNR and SSIM on images scaled to [0, 1].

Generation metrics, computed from the features and predictions of a classifier (:mod:`nbutils.evaluation`
uses the project's own FashionMNIST classifier, so they work offline, in minutes, on grayscale 28×28 images):

* **FID** (Heusel et al. 2017): Fréchet distance between Gaussians fitted to two feature sets,
  ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½). Biased upwards at small N: compare numbers at the same N only.
* **KID** (Bińkowski et al. 2018): unbiased estimate of the squared MMD with the polynomial kernel
  k(x, y) = (x·y/d + 1)³, averaged over random subsets; unbiased, so ≈ 0 for equal distributions at any N.
* **conditional accuracy**: the fraction of samples asked for class k that the classifier calls k.
* **novelty**: distance of each sample to its nearest training image divided by the same for real test
  images; ≈ 1 means "as far from the training set as new real photos are", ≪ 1 means copying.
* **the floor**: the same numbers for real images at the same N, printed beside every result.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg


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
    and averaged. Identical images give exactly 1. Colour images: per channel, then averaged (as
    scikit-image does with ``channel_axis``).
    """
    a, b = to_unit(x), to_unit(y)
    channels = a.shape[1]
    w = _gaussian_window(window, sigma).to(a.device)[None, None].expand(channels, 1, window, window)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, w, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
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


# --------------------------------------------------------------------------------------------
# Generation metrics
# --------------------------------------------------------------------------------------------


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, d) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N ≥ 2, d) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), the squared 2-Wasserstein distance of two Gaussians.

    tr((Σ₁Σ₂)^½) is computed as tr((Σ₁^½ Σ₂ Σ₁^½)^½) — the same number, since the two matrices are similar —
    from symmetric eigendecompositions (``scipy.linalg.eigh``). Unlike the usual ``scipy.linalg.sqrtm`` of the
    non-symmetric product, this never produces complex round-off and stays exact when the covariances are
    singular (a ReLU feature that is 0 for every image makes them so).
    """
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    root1 = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    middle = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    tr_covmean = np.sqrt(np.clip(linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(features_a, features_b) -> float:
    """FID between two (N, d) feature sets."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def kid(features_a, features_b, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """``(mean, std)`` over random subsets of the unbiased MMD² with kernel (x·y/d + 1)³."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, d) feature sets with the same d, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 examples in each set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def conditional_accuracy(predicted: torch.Tensor, requested: torch.Tensor, num_classes: int = 10
                         ) -> tuple[float, list[float]]:
    """``(overall, per_class)`` fraction of samples requested as class k that are predicted as k.

    Unconditional samples (requested label −1) are left out; a class with no samples gets NaN.
    """
    predicted, requested = torch.as_tensor(predicted), torch.as_tensor(requested)
    keep = requested >= 0
    if not keep.any():
        return float("nan"), [float("nan")] * num_classes
    hit = (predicted[keep] == requested[keep]).float()
    per = []
    for k in range(num_classes):
        sel = requested[keep] == k
        per.append(float(hit[sel].mean()) if sel.any() else float("nan"))
    return float(hit.mean()), per


def confusion_matrix(predicted: torch.Tensor, requested: torch.Tensor, num_classes: int = 10) -> np.ndarray:
    """(num_classes, num_classes) counts: row = requested class, column = recognised class."""
    keep = requested >= 0
    idx = requested[keep] * num_classes + predicted[keep]
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).numpy()


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 1000
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distance, index)`` of each query's nearest image in ``bank`` (L2 on [0, 1] pixels, flattened)."""
    q = to_unit(queries).flatten(1)
    b = to_unit(bank).flatten(1)
    b2 = b.pow(2).sum(1)
    dists, idxs = [], []
    for start in range(0, len(q), chunk):
        x = q[start : start + chunk]
        d2 = x.pow(2).sum(1, keepdim=True) + b2[None] - 2 * x @ b.T
        idx = d2.argmin(1)
        dists.append((x - b[idx]).norm(dim=1))  # exact distance to the winner (the expansion loses digits)
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


def novelty(samples: torch.Tensor, train_images: torch.Tensor, test_images: torch.Tensor) -> dict[str, float]:
    """Median nearest-training-image distance of the samples, of real test images, and their ratio."""
    ds, _ = nearest_neighbours(samples, train_images)
    dt, _ = nearest_neighbours(test_images, train_images)
    s, t = float(ds.median()), float(dt.median())
    return {"ratio": s / t, "sample_median": s, "test_median": t,
            "exact_copies": int((ds < 1e-3).sum())}
