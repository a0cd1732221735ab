import math

import pytest
import torch

from nbutils import diffusion as Dn
from nbutils import schedules as S
from nbutils.config import DiffusionConfig


def test_linear_schedule_closed_form():
    betas = S.make_betas("linear", 1000, 1e-4, 0.02)
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    abar = S.alphas_cumprod(betas)
    # ᾱ_t as a direct product, computed independently with math.prod
    for t in (0, 9, 499, 999):
        b = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(t + 1)]
        assert abar[t].item() == pytest.approx(math.prod(1 - x for x in b), rel=1e-10)
    assert abar[0].item() == pytest.approx(1 - 1e-4)  # ᾱ_0 ≈ 1
    assert abar[-1].item() < 1e-4  # ᾱ_T ≈ 0 (4.04e-5 for DDPM's schedule)
    assert abar[-1].item() == pytest.approx(4.035e-5, rel=1e-3)


def test_scaled_linear_is_a_parabola_in_sqrt_beta():
    betas = S.make_betas("scaled_linear", 11, 0.0001, 0.0121)
    assert torch.allclose(betas.sqrt(), torch.linspace(0.01, 0.11, 11, dtype=torch.float64))


def test_cosine_schedule_matches_its_formula():
    T = 1000
    abar = S.alphas_cumprod(S.make_betas("squaredcos_cap_v2", T))
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert S.make_betas("squaredcos_cap_v2", T).max().item() == pytest.approx(0.999)  # the cap


@pytest.mark.parametrize("name", S.SCHEDULES)
def test_schedules_are_monotone_and_bounded(name):
    sch = S.NoiseSchedule(name, 1000, 1e-4, 0.02)
    a = sch.alphas_cumprod
    assert (a[1:] < a[:-1]).all() and a[0] > 0.99 and a[-1] < 0.01
    assert ((sch.betas > 0) & (sch.betas < 1)).all()
    lsnr = sch.log_snr()
    assert (lsnr[1:] < lsnr[:-1]).all()
    assert torch.allclose(lsnr.exp(), sch.snr(), rtol=1e-9)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'; valid: linear, scaled_linear"):
        S.make_betas("cosine")


def test_add_noise_has_closed_form_mean_and_variance():
    abar = S.NoiseSchedule().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 2.0)
    for t in (0, 250, 999):
        tt = torch.full((n,), t)
        xt = Dn.add_noise(x0, torch.randn(x0.shape, generator=g), tt, abar)
        a = abar[t].item()
        assert xt.mean().item() == pytest.approx(2.0 * math.sqrt(a), abs=0.01)
        assert xt.var().item() == pytest.approx(1 - a, abs=0.01)


def test_conversions_invert_each_other():
    abar = S.NoiseSchedule("squaredcos_cap_v2").alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 4, 7, 7, generator=g), torch.randn(6, 4, 7, 7, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 998])
    xt = Dn.add_noise(x0, eps, t, abar)
    v = Dn.velocity(x0, eps, t, abar)
    assert torch.allclose(Dn.to_x0(eps, xt, t, abar, "epsilon"), x0, atol=1e-3)
    assert torch.allclose(Dn.to_x0(v, xt, t, abar, "v_prediction"), x0, atol=1e-4)
    assert torch.allclose(Dn.to_epsilon(v, xt, t, abar, "v_prediction"), eps, atol=1e-4)
    assert torch.equal(Dn.to_epsilon(eps, xt, t, abar, "epsilon"), eps)
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        Dn.to_x0(eps, xt, t, abar, "x0")


def test_min_snr_weights():
    abar = S.NoiseSchedule().alphas_cumprod
    snr = abar / (1 - abar)
    t = torch.tensor([0, 999, int((snr > 5).sum()) + 10])
    w = Dn.min_snr_weights(t, abar, 5.0, "epsilon")
    assert w[0].item() == pytest.approx(5.0 / snr[0].item(), rel=1e-5)  # high SNR: clipped
    assert w[1].item() == pytest.approx(1.0) and w[2].item() == pytest.approx(1.0)  # low SNR: untouched
    wv = Dn.min_snr_weights(t, abar, 5.0, "v_prediction")
    assert wv[1].item() == pytest.approx(snr[999].item() / (snr[999].item() + 1), rel=1e-5)


def test_label_dropout_rate_and_null():
    labels = torch.arange(10).repeat(2000)
    g = torch.Generator().manual_seed(0)
    dropped = Dn.drop_labels(labels, 0.1, 10, g)
    frac = (dropped == 10).float().mean().item()
    assert frac == pytest.approx(0.1, abs=0.01)
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(Dn.drop_labels(labels, 0.0, 10, g), labels)


def test_loss_uses_the_target_of_the_prediction_type():
    class Oracle(torch.nn.Module):
        """Knows x0 and ε: returns the exact target, so the loss must be 0."""

        def __init__(self, diffusion, x0):
            super().__init__()
            self.d, self.x0 = diffusion, x0

        def forward(self, xt, t, labels):
            a = self.d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
            eps = (xt - a.sqrt() * self.x0) / (1 - a).sqrt()
            if self.d.cfg.prediction_type == "epsilon":
                return eps
            return a.sqrt() * eps - (1 - a).sqrt() * self.x0

    x0 = torch.randn(8, 4, 7, 7)
    for pt in Dn.PREDICTION_TYPES:
        for gamma in (None, 5.0):
            d = Dn.GaussianDiffusion(DiffusionConfig(prediction_type=pt, min_snr_gamma=gamma))
            loss, parts = d.loss(Oracle(d, x0), x0, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
            assert loss.item() < 1e-6 and parts["mse"] < 1e-6
