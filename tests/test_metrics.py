import math

import numpy as np
import pytest
import torch

from nbutils import metrics as M


def test_psnr_closed_form():
    x = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    y = torch.full((2, 1, 28, 28), 51, dtype=torch.uint8)  # error 0.2 everywhere → MSE 0.04
    assert M.mse(x, y).tolist() == pytest.approx([0.04, 0.04])
    assert M.psnr(x, y).tolist() == pytest.approx([10 * math.log10(1 / 0.04)] * 2, rel=1e-5)


def test_model_range_and_uint8_agree():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8)
    f = u.float() / 127.5 - 1
    assert torch.allclose(M.to_unit(u), M.to_unit(f), atol=1e-6)


def _ssim_numpy(a, b):
    """Direct transcription of Wang et al. (2004) eq. 13 with an 11×11 σ=1.5 Gaussian, valid windows."""
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(k, k) / np.outer(k, k).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_formula_and_bounds():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 28, 28, generator=g)
    b = (a + 0.1 * torch.randn(2, 1, 28, 28, generator=g)).clamp(0, 1)
    a8, b8 = (a * 255).round().to(torch.uint8), (b * 255).round().to(torch.uint8)
    got = M.ssim(a8, b8)
    want = [_ssim_numpy(a8[i, 0].double().numpy() / 255, b8[i, 0].double().numpy() / 255) for i in range(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    assert M.ssim(a8, a8).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    noisier = (a + 0.3 * torch.randn(2, 1, 28, 28, generator=g)).clamp(0, 1)
    assert (M.ssim(a, noisier * 2 - 1) < M.ssim(a * 2 - 1, b * 2 - 1)).all()
