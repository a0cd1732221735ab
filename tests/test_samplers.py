"""Samplers against closed forms: for Gaussian data the optimal denoiser is known exactly.

If x_0 ~ N(μ, s²) (independently per dimension), then q(x_t) = N(√ᾱ·μ, ᾱ·s² + 1 − ᾱ) and the
optimal noise prediction is E[ε | x_t] = √(1−ᾱ)·(x_t − √ᾱ·μ) / (ᾱ·s² + 1 − ᾱ). A correct sampler
driven by this oracle must turn N(0, 1) noise into samples with mean μ and variance s².
"""

import math

import pytest
import torch

from nbutils import samplers as Sm
from nbutils.schedules import NoiseSchedule

MU, S = 1.5, 0.5


class GaussianOracle(torch.nn.Module):
    def __init__(self, schedule, prediction_type="epsilon", mu=MU, s=S):
        super().__init__()
        self.abar = schedule.alphas_cumprod
        self.prediction_type, self.mu, self.s = prediction_type, mu, s
        self.null_label = 10

    def forward(self, x, t, labels):
        a = self.abar[t].reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)
        if self.prediction_type == "epsilon":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def run(sampler, model, n=40_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    x = (x - x.mean()) / x.std()  # exactly standard: only the sampler's error remains
    labels = torch.zeros(n, dtype=torch.long)
    for t in sampler.timesteps:
        out = model(x, torch.full((n,), int(t)), labels)
        x = sampler.step(out, t, x, generator=g)
    return x.flatten()


@pytest.mark.parametrize("name, steps, spacing", [
    ("ddpm", None, "leading"),  # ancestral: stochastic, needs many steps (default: all, 0..top)
    ("ddim", 250, "trailing"),  # first-order ODE solver
    ("dpm", 30, "trailing"),  # second-order: 30 steps reach what DDIM needs 250 for
    ("dpm", 30, "logsnr"),  # the same solver stepping evenly in λ
    ("dpm-sde", 100, "trailing"),  # its SDE version: stochastic like DDPM (100 steps: 1-3% off; DDPM: 13%)
])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_samplers_recover_gaussian_data(name, steps, spacing, schedule):
    sch = NoiseSchedule(schedule)
    model = GaussianOracle(sch)
    s = Sm.make_sampler(name, sch, "epsilon", steps, spacing)
    x = run(s, model)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.var().item() == pytest.approx(S**2, rel=0.04)


def test_few_step_ddim_is_exactly_its_affine_map():
    """With the Gaussian oracle, x̂_0 and ε̂ are affine in x_t, so n DDIM steps are an affine map
    x_0 = a·x_T + b. Track (a, b) with scalar closed forms and compare with the sampler, tightly."""
    sch = NoiseSchedule()
    abar = sch.alphas_cumprod.tolist()
    ts = Sm.spaced_timesteps(1000, 7, "linspace").tolist()
    a, b = 1.0, 0.0
    for i, t in enumerate(ts):
        at = abar[t]
        ap = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        den = at * S**2 + 1 - at
        e_slope, e_off = math.sqrt(1 - at) / den, -math.sqrt(1 - at) * math.sqrt(at) * MU / den  # ε̂ = e_slope·x + e_off
        x0_slope = (1 - math.sqrt(1 - at) * e_slope) / math.sqrt(at)  # x̂0 = (x − √(1−ᾱ) ε̂)/√ᾱ
        x0_off = -math.sqrt(1 - at) * e_off / math.sqrt(at)
        slope = math.sqrt(ap) * x0_slope + math.sqrt(1 - ap) * e_slope
        off = math.sqrt(ap) * x0_off + math.sqrt(1 - ap) * e_off
        a, b = slope * a, slope * b + off
    xT = torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(-1, 1, 1, 1)
    s = Sm.DDIMSampler(sch, timestep_spacing="linspace")
    s.set_timesteps(7)
    x = xT.clone()
    model = GaussianOracle(sch)
    for t in s.timesteps:
        x = s.step(model(x, torch.full((13,), int(t)), None), t, x)
    assert torch.allclose(x, a * xT + b, atol=1e-10)


def test_number_for_number_with_diffusers():
    """Same schedule, spacing and model output as diffusers' schedulers → the same samples."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the optional 'bench' extra")
    kw = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    sch = NoiseSchedule()
    model = GaussianOracle(sch)
    theirs = {
        "ddim": diffusers.DDIMScheduler(**kw, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False),
        "dpm": diffusers.DPMSolverMultistepScheduler(**kw, timestep_spacing="trailing", final_sigmas_type="zero"),
    }
    for name, hf in theirs.items():
        hf.set_timesteps(20)
        ours = Sm.make_sampler(name, sch, "epsilon", 20, "trailing")
        assert ours.timesteps.tolist() == hf.timesteps.tolist()
        g = torch.Generator().manual_seed(0)
        x = y = torch.randn(500, 1, 1, 1, generator=g, dtype=torch.float64)
        for t in ours.timesteps:
            tt = torch.full((500,), int(t))
            x = ours.step(model(x, tt, None), t, x)
            y = hf.step(model(y, tt, None), t, y).prev_sample
        assert (x - y).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("name", Sm.SAMPLERS)
def test_v_prediction_gives_the_same_samples(name):
    sch = NoiseSchedule()
    steps = 100 if name == "ddpm" else 20
    a = run(Sm.make_sampler(name, sch, "epsilon", steps), GaussianOracle(sch, "epsilon"), n=2000)
    b = run(Sm.make_sampler(name, sch, "v_prediction", steps), GaussianOracle(sch, "v_prediction"), n=2000)
    assert torch.allclose(a, b, atol=1e-6)


def test_ddim_eta0_is_deterministic_and_dpm_agrees_with_ddim_many_steps():
    sch = NoiseSchedule()
    model = GaussianOracle(sch)
    x1 = run(Sm.make_sampler("ddim", sch, steps=25), model, n=1000, seed=3)
    x2 = run(Sm.make_sampler("ddim", sch, steps=25), model, n=1000, seed=3)
    assert torch.equal(x1, x2)
    # the exact probability-flow ODE map of Gaussian data is linear: x_0 = μ + s·x_T (per sample);
    # deterministic samplers must approach it
    g = torch.Generator().manual_seed(3)
    xT = torch.randn(1000, 1, 1, 1, generator=g, dtype=torch.float64).flatten()
    xT = (xT - xT.mean()) / xT.std()
    aT = sch.alphas_cumprod[999].item()
    exact = MU + S * (xT - math.sqrt(aT) * MU) / math.sqrt(aT * S**2 + 1 - aT)
    for name, steps, tol in (("ddim", 250, 0.03), ("dpm", 30, 0.02)):  # ≈ 1-2% of the range of x_0
        x = run(Sm.make_sampler(name, sch, steps=steps), model, n=1000, seed=3)
        assert (x - exact).abs().max().item() < tol, name


def test_ddim_eta1_is_stochastic_but_correct():
    sch = NoiseSchedule()
    s = Sm.DDIMSampler(sch, eta=1.0)
    s.set_timesteps(1000)
    x = run(s, GaussianOracle(sch), n=10_000)
    assert x.mean().item() == pytest.approx(MU, abs=0.01) and x.var().item() == pytest.approx(S**2, rel=0.04)
    assert not torch.equal(run(s, GaussianOracle(sch), n=100, seed=1), run(s, GaussianOracle(sch), n=100, seed=2))


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_sde_dpm_solver_first_order_step_is_the_ddpm_posterior(schedule):
    """Without history (the first step) SDE-DPM-Solver++ draws from q(x_prev | x_t, x̂_0) — the DDPM step between
    the same two timesteps, with the same noise — and its later steps add the second-order correction on top."""
    sch = NoiseSchedule(schedule)
    model = GaussianOracle(sch)
    sde, ddpm = Sm.make_sampler("dpm-sde", sch, steps=10), Sm.make_sampler("ddpm", sch, steps=10)
    ddpm.set_timesteps(timesteps=sde.timesteps.tolist())
    x = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t0, t1 = (int(t) for t in sde.timesteps[:2])
    out = model(x, torch.full((256,), t0), None)
    a = sde.step(out, t0, x, generator=torch.Generator().manual_seed(1))
    b = ddpm.step(out, t0, x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-12)
    # second step: D = x̂0 + (x̂0 − x̂0_prev)/(2r) replaces x̂0 in the same update
    out1 = model(a, torch.full((256,), t1), None)
    c = sde.step(out1, t1, a, generator=torch.Generator().manual_seed(2))
    d = ddpm.step(out1, t1, a, generator=torch.Generator().manual_seed(2))
    lam = sch.log_snr() / 2
    t2 = int(sde.timesteps[2])
    h, r = (lam[t2] - lam[t1]).item(), ((lam[t1] - lam[t0]) / (lam[t2] - lam[t1])).item()
    abar = sch.alphas_cumprod
    x0_prev = (x - (1 - abar[t0]).sqrt() * out) / abar[t0].sqrt()
    x0 = (a - (1 - abar[t1]).sqrt() * out1) / abar[t1].sqrt()
    correction = abar[t2].sqrt() * (-math.expm1(-2 * h)) * (x0 - x0_prev) / (2 * r)
    assert torch.allclose(c, d + correction, atol=1e-10)
    # stochastic: the same seed repeats a run, another seed does not
    runs = [run(Sm.make_sampler("dpm-sde", sch, steps=10), model, n=100, seed=k) for k in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_documented_timestep_spacings():
    assert Sm.spaced_timesteps(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert Sm.spaced_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert Sm.spaced_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert Sm.spaced_timesteps(1000, 1000, "leading").tolist() == list(range(999, -1, -1))
    ac = NoiseSchedule().alphas_cumprod
    assert Sm.spaced_timesteps(1000, 10, "logsnr", ac).tolist() == [999, 886, 757, 603, 410, 202, 73, 22, 5, 0]
    for spacing in Sm.SPACINGS:
        ts = Sm.spaced_timesteps(1000, 37, spacing, ac)
        assert len(ts) == 37 and (ts[1:] < ts[:-1]).all() and ts.min() >= 0 and ts.max() <= 999
    with pytest.raises(ValueError, match="alphas_cumprod"):
        Sm.spaced_timesteps(1000, 10, "logsnr")
    with pytest.raises(ValueError, match="between 1 and 1000"):
        Sm.spaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'"):
        Sm.spaced_timesteps(1000, 10, "uniform")


def test_sampling_starts_where_the_log_snr_is_above_lambda_min():
    """The cosine schedule ends at ᾱ_999 = 2.4e-9: samplers start at the last timestep with λ ≥ −5.1 instead (995);
    the linear and scaled-linear schedules (λ_999 = −5.06 and −2.68) are not clipped."""
    for name, top in [("linear", 999), ("scaled_linear", 999), ("squaredcos_cap_v2", 995)]:
        ac = NoiseSchedule(name).alphas_cumprod
        lam = 0.5 * torch.log(ac / (1 - ac))
        assert Sm.top_timestep(ac) == top and lam[top] >= Sm.LAMBDA_MIN
        assert top == 999 or lam[top + 1] < Sm.LAMBDA_MIN
        assert Sm.DDIMSampler(NoiseSchedule(name)).top == top
        assert len(Sm.make_sampler("ddpm", NoiseSchedule(name)).timesteps) == top + 1  # every timestep 0..top
    ac = NoiseSchedule("squaredcos_cap_v2").alphas_cumprod
    assert Sm.spaced_timesteps(1000, 10, "trailing", ac, 995).tolist() == [995, 895, 796, 696, 597, 497, 397, 298,
                                                                          198, 99]
    for spacing in Sm.SPACINGS:
        s = Sm.make_sampler("dpm", NoiseSchedule("squaredcos_cap_v2"), steps=20, timestep_spacing=spacing)
        assert s.timesteps.max() <= 995 and (spacing == "leading" or s.timesteps[0] == 995)
    assert Sm.split_timesteps(1000, 4, 12, 707, "trailing", ac, 995)[0] == 995
    with pytest.raises(ValueError, match="between 1 and 996"):
        Sm.spaced_timesteps(1000, 997, "leading", ac, 995)
    with pytest.raises(ValueError, match="no timestep of this schedule has log-SNR"):
        Sm.top_timestep(ac, lambda_min=10.0)


def test_starting_at_zero_snr_amplifies_the_models_error():
    """Why the clip: a step from t to s turns an ε̂ error e into ≈ (√ᾱ_s/√ᾱ_t)·e. With the cosine schedule and an
    oracle off by 1e-3, 20 DPM-Solver++ steps from t = 999 (√ᾱ = 5e-5) shift the samples' mean by −0.75; from
    t = 995 (√ᾱ = 6e-3) by about −0.01."""
    sch = NoiseSchedule("squaredcos_cap_v2")

    class Off(GaussianOracle):
        def forward(self, x, t, labels):
            return super().forward(x, t, labels) + 1e-3

    s = Sm.make_sampler("dpm", sch, "epsilon", 20, "trailing")
    assert run(s, Off(sch), n=10_000).mean().item() == pytest.approx(MU, abs=0.03)
    s.set_timesteps(timesteps=Sm.spaced_timesteps(1000, 20, "trailing"))  # unclipped: 999, 949, …
    assert run(s, Off(sch), n=10_000).mean().item() < MU - 0.5


def test_respaced_ddpm_uses_respaced_betas():
    sch = NoiseSchedule()
    s = Sm.DDPMSampler(sch)
    s.set_timesteps(10)
    a_t, a_prev, _ = s._alphas(500)
    assert a_t == pytest.approx(sch.alphas_cumprod[500].item())
    assert a_prev == pytest.approx(sch.alphas_cumprod[400].item())
    # the mean of the last step is x̂_0 itself (ᾱ_prev = 1)
    x = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    eps = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    a0 = sch.alphas_cumprod[0].item()
    assert torch.allclose(s.step(eps, 0, x), (x - math.sqrt(1 - a0) * eps) / math.sqrt(a0))
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        s.step(eps, 555, x)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'euler'; valid: ddpm, ddim, dpm, dpm-sde"):
        Sm.make_sampler("euler", NoiseSchedule())


def test_split_timesteps_and_custom_timesteps():
    """The split schedule reproduces ``trailing`` where the even spacing puts its steps, spends them where asked,
    and custom timesteps are checked."""
    assert torch.equal(Sm.split_timesteps(1000, 12, 8, 400), Sm.spaced_timesteps(1000, 20))
    assert torch.equal(Sm.split_timesteps(1000, 30, 20, 400), Sm.spaced_timesteps(1000, 50))
    ts = Sm.split_timesteps(1000, 4, 12, 400)
    assert ts[0] == 999 and (ts[:4] > 400).all() and (ts[4:] < 400).all() and bool((ts[1:] < ts[:-1]).all())
    for bad in [(4, 0, 400), (0, 12, 400), (4, 12, 0), (4, 12, 999), (700, 12, 400)]:
        with pytest.raises(ValueError, match="steps|split"):
            Sm.split_timesteps(1000, *bad)
    s = Sm.make_sampler("dpm", NoiseSchedule())
    s.set_timesteps(timesteps=[999, 500, 20])
    assert s.timesteps.tolist() == [999, 500, 20] and s.num_inference_steps == 3
    for bad in ([999, 999, 20], [20, 500], [1000, 3], [], [5, -1]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            s.set_timesteps(timesteps=bad)


def test_logsnr_timesteps_step_evenly_in_lambda():
    """Evenly spaced λ = ½·log SNR between the two ends (each step within rounding of its target), strictly
    decreasing even where λ moves faster than one timestep per step, and the split schedule's guided part."""
    ac = NoiseSchedule().alphas_cumprod
    lam = 0.5 * torch.log(ac / (1 - ac))
    ts = Sm.logsnr_timesteps(ac, 12, 399, 0)
    assert ts[0] == 399 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())
    targets = torch.linspace(float(lam[399]), float(lam[0]), 12, dtype=torch.float64)
    gaps = (lam[1:] - lam[:-1]).abs()  # λ between neighbouring timesteps: the rounding error's bound
    for t, target in zip(ts.tolist(), targets, strict=True):
        assert abs(float(lam[t]) - float(target)) <= float(gaps[max(t - 1, 0) : t + 1].max()) / 2 + 1e-12
    for top, n in [(4, 5), (30, 31), (60, 40), (999, 200)]:  # crowded at the low-noise end
        ts = Sm.logsnr_timesteps(ac, n, top, 0)
        assert len(ts) == n and ts[0] == top and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())
    assert Sm.logsnr_timesteps(ac, 1, 30).tolist() == [30]
    for bad in [(0, 30, 0), (32, 30, 0), (5, 30, 40), (5, 1000, 0)]:
        with pytest.raises(ValueError, match="steps|bottom"):
            Sm.logsnr_timesteps(ac, *bad)
    split = Sm.split_timesteps(1000, 4, 12, 400, "logsnr", ac)
    assert split[:4].tolist() == Sm.split_timesteps(1000, 4, 12, 400)[:4].tolist()
    assert split[4:].tolist() == Sm.logsnr_timesteps(ac, 12, 399, 0).tolist()
    with pytest.raises(ValueError, match="alphas_cumprod"):
        Sm.split_timesteps(1000, 4, 12, 400, "logsnr")
    with pytest.raises(ValueError, match="'trailing' or 'logsnr'"):
        Sm.split_timesteps(1000, 4, 12, 400, "leading", ac)
