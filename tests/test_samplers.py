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


def test_guidance_endpoints():
    class Linear(torch.nn.Module):
        def forward(self, x, t, labels):
            return x * 0 + labels.reshape(-1, 1, 1, 1).float()

    m = Linear()
    x = torch.zeros(3, 4, 7, 7)
    labels = torch.tensor([1, 2, 3])
    assert torch.equal(Sm.guided_output(m, x, 5, labels, 1.0, 10), m(x, None, labels))
    assert torch.equal(Sm.guided_output(m, x, 5, labels, 0.0, 10), torch.full_like(x, 10.0))
    w = 3.0
    assert torch.allclose(Sm.guided_output(m, x, 5, labels, w, 10),
                          10 + w * (labels.reshape(-1, 1, 1, 1).float() - 10) + x)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'euler'; valid: ddpm, ddim, dpm, dpm-sde"):
        Sm.make_sampler("euler", NoiseSchedule())


@pytest.mark.parametrize("folder", ["checkpoints", "benchmarks/candidates/first-ship",
                                    "benchmarks/candidates/second-ship", "benchmarks/candidates/cosv-e16",
                                    "benchmarks/candidates/cosv-e32", "benchmarks/candidates/nodrop-e4",
                                    "benchmarks/candidates/wide-e24"])
def test_shipped_models_sample_deterministically(folder):
    """The shipped UNet + VAE (and the earlier UNets kept for the benchmarks that measured them, whose VAE is a link
    to the shipped one; the shipped UNet (wide-e24's weights, the (64, 128) UNet), nodrop-e4, cosv-e16 and cosv-e32
    (the (48, 96) UNets shipped before it) use the cosine schedule and v-prediction, first-ship and second-ship the
    linear one and ε) load together (digest checked) and a seed fixes the output."""
    from nbutils.config import make_generator, project_root
    from nbutils.train import load_models

    unet, vae, meta = load_models(project_root() / folder, device="cpu")
    assert meta["extra"]["stored_dtype"] == "torch.float16"
    runs = [Sm.sample(unet, vae, 4, [7, 7, 0, 9], guidance=3.0, sampler="dpm", steps=4,
                      generator=make_generator(1)) for _ in range(2)]
    assert runs[0].images.shape == (4, 1, 28, 28) and runs[0].labels.tolist() == [7, 7, 0, 9]
    assert torch.equal(runs[0].images, runs[1].images)
    other = Sm.sample(unet, vae, 4, [7, 7, 0, 9], guidance=3.0, sampler="dpm", steps=4, generator=make_generator(2))
    assert not torch.equal(runs[0].images, other.images)


def test_shipped_models_draw_the_requested_classes():
    """The shipped UNet, VAE and classifier agree: guided samples are recognised as the class asked for.
    (A broken sampler, a swapped VAE or mislabelled class tokens would drop this to ~10%.)"""
    from nbutils.classifier import load_classifier, predict
    from nbutils.config import checkpoints_dir, make_generator
    from nbutils.train import load_models

    unet, vae, _ = load_models(checkpoints_dir(), device="cpu")
    clf, _ = load_classifier(checkpoints_dir(), device="cpu")
    wanted = torch.arange(100) % 10
    out = Sm.sample(unet, vae, 100, wanted, guidance=3.0, sampler="dpm", steps=20, generator=make_generator(0))
    _, logits = predict(clf, out.images)
    assert (logits.argmax(1) == wanted).float().mean() >= 0.9


def _recipe_of(argv: list[str]) -> dict:
    """The sampling recipe a `python -m nbutils sample …` command line asks for, read by the CLI's own parser."""
    from nbutils.cli import build_parser, sampling_recipe

    return sampling_recipe(build_parser().parse_args(argv))


def test_cli_recipe_flag_and_overrides():
    """``--recipe shipped`` is ``SHIPPED_RECIPE``, each flag given explicitly overrides it, and without it the
    plain defaults hold."""
    from nbutils.cli import SAMPLE_DEFAULTS

    shipped = {**SAMPLE_DEFAULTS, **Sm.SHIPPED_RECIPE}
    assert _recipe_of(["sample", "--recipe", "shipped", "--out", "s.png"]) == shipped
    overridden = _recipe_of(["sample", "--recipe", "shipped", "--guidance", "2", "--out", "s.png"])
    assert overridden == {**shipped, "guidance": 2.0}
    assert _recipe_of(["sample", "--recipe", "shipped", "--spacing", "trailing", "--steps", "20", "--out", "s.png"]) \
        == {**shipped, "timestep_spacing": "trailing", "steps": 20}
    assert _recipe_of(["sample", "--out", "s.png"]) == SAMPLE_DEFAULTS
    assert _recipe_of(["sample", "--guidance", "0", "--out", "s.png"])["guidance"] == 0.0  # 0 is a value, not "unset"


@pytest.mark.parametrize("document, marker", [("Makefile", "runs/demo/samples.png"),
                                              ("README.md", "docs/img/samples.png`")])
def test_demo_and_readme_picture_use_the_shipped_recipe(document, marker):
    """One recipe in three places: `make demo`, the README's picture command and ``SHIPPED_RECIPE`` agree."""
    import shlex

    from nbutils.config import project_root

    text = (project_root() / document).read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "nbutils sample" in ln and marker in ln)
    from nbutils.cli import SAMPLE_DEFAULTS

    assert _recipe_of(shlex.split(line.split("-m nbutils", 1)[1].split("`")[0])) == {**SAMPLE_DEFAULTS,
                                                                                      **Sm.SHIPPED_RECIPE}


def test_remeasure_script_measures_the_shipped_recipe():
    """benchmarks/shipped_model.sh's RECIPE (its README rows, CLI timings and picture) is ``SHIPPED_RECIPE``."""
    import re
    import shlex

    from nbutils.config import project_root

    text = (project_root() / "benchmarks" / "shipped_model.sh").read_text()
    flags = re.search(r'^RECIPE=\$\{RECIPE:-"([^"]+)"\}', text, re.M).group(1)
    from nbutils.cli import SAMPLE_DEFAULTS

    assert _recipe_of(["sample", *shlex.split(flags), "--sampler", "dpm", "--out", "s.npz"]) == {**SAMPLE_DEFAULTS,
                                                                                                **Sm.SHIPPED_RECIPE}


class _Recorder(torch.nn.Module):
    """A stand-in UNet whose output is the class-token value; records the batch size of each call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.null_label = 10
        self.cfg = type("Cfg", (), {"latent_channels": 4})()
        self.calls = []

    def forward(self, x, t, labels):
        self.calls.append((int(t[0]), x.shape[0]))
        return 0.01 * x + 0.1 * (labels.reshape(-1, 1, 1, 1).float() - 5) + self.w


class _IdentityVAE:
    latent_shape = (4, 7, 7)

    def decode(self, z):
        return z[:, :1]


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_guidance_interval_guides_only_inside_it(sampler):
    """Inside [lo, hi] one doubled (cond + uncond) pass per step, outside one plain conditional pass; an
    interval covering every timestep is plain guidance, one covering none is w = 1, bit for bit."""
    from nbutils.config import make_generator

    def run(**kw):
        m = _Recorder()
        out = Sm.sample(m, _IdentityVAE(), 6, [1, 2, 3, 4, 5, 6], sampler=sampler, steps=10,
                        generator=make_generator(0), **kw)
        return out.latents, m.calls

    plain, plain_calls = run(guidance=3.0)
    everywhere, _ = run(guidance=3.0, guidance_interval=(0, 999))
    nowhere, nowhere_calls = run(guidance=3.0, guidance_interval=(2000, 3000))
    w1, _ = run(guidance=1.0)
    assert torch.equal(plain, everywhere) and torch.equal(nowhere, w1)
    assert {b for _, b in plain_calls} == {12} and {b for _, b in nowhere_calls} == {6}
    part, calls = run(guidance=3.0, guidance_interval=(0, 400))
    assert [b for t, b in calls] == [12 if t <= 400 else 6 for t, _ in calls]
    assert any(t > 400 for t, _ in calls) and any(t <= 400 for t, _ in calls)
    assert not torch.equal(part, plain) and not torch.equal(part, w1)


def test_guide_hook_replaces_classifier_free_guidance():
    """``guide=`` receives each step's interval-resolved w and its return value is what the sampler steps
    with; passing guided_output itself reproduces the default bit for bit."""
    from nbutils.config import make_generator

    def run(guidance_interval=(0, 400), **kw):
        return Sm.sample(_Recorder(), _IdentityVAE(), 6, [1, 2, 3, 4, 5, 6], sampler="dpm", steps=10,
                         generator=make_generator(0), guidance=3.0, guidance_interval=guidance_interval, **kw).latents

    seen = []

    def conditional_only(model, x, t, labels, w, null_label):
        seen.append((int(t), w, null_label))
        return Sm.guided_output(model, x, t, labels, 1.0, null_label)

    assert torch.equal(run(guide=Sm.guided_output), run())
    assert torch.equal(run(guide=conditional_only), run(guidance_interval=(2000, 3000)))
    assert seen and all(w == (3.0 if t <= 400 else 1.0) and null == 10 for t, w, null in seen)


def test_bad_guidance_interval_and_precision():
    m = _Recorder()
    with pytest.raises(ValueError, match="guidance_interval must be"):
        Sm.sample(m, _IdentityVAE(), 2, 1, guidance_interval=(500, 100))
    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or 'auto'"):
        Sm.sample(m, _IdentityVAE(), 2, 1, precision="fp16")


def test_bf16_sampling_is_close_to_fp32():
    """bf16 autocast changes the UNet's arithmetic, not the result: shipped model, same seed, same classes."""
    from nbutils.config import bf16_supported, checkpoints_dir, make_generator
    from nbutils.train import load_models

    unet, vae, _ = load_models(checkpoints_dir(), device="cpu")
    kw = dict(guidance=3.0, sampler="dpm", steps=10, guidance_interval=(0, 400))
    ref = Sm.sample(unet, vae, 8, list(range(8)), generator=make_generator(0), **kw)
    if not bf16_supported("cpu"):
        with pytest.raises(ValueError, match="needs native bf16 support"):
            Sm.sample(unet, vae, 8, list(range(8)), generator=make_generator(0), precision="bf16", **kw)
        return
    low = Sm.sample(unet, vae, 8, list(range(8)), generator=make_generator(0), precision="bf16", **kw)
    auto = Sm.sample(unet, vae, 8, list(range(8)), generator=make_generator(0), precision="auto", **kw)
    assert low.images.dtype == torch.float32 and torch.equal(auto.images, low.images)
    assert (low.images - ref.images).abs().mean() < 0.05  # pixels in [-1, 1]
    assert not torch.equal(low.images, ref.images)


def test_cli_guidance_interval_and_auto_precision(tmp_path, capsys):
    import json

    import numpy as np

    from nbutils import cli
    from nbutils.config import bf16_supported, checkpoints_dir

    out = tmp_path / "s.npz"
    assert cli.main(["sample", "--checkpoint", str(checkpoints_dir()), "--n", "10", "--steps", "3", "--guidance", "3.5",
                     "--guidance-interval", "0,400", "--precision", "auto", "--out", str(out), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["guidance_interval"] == [0, 400]
    assert report["precision"] == ("bf16" if bf16_supported("cpu") else "fp32")
    with np.load(out) as f:
        assert f["images"].shape == (10, 28, 28) and f["images"].dtype == np.uint8
    assert cli.main(["sample", "--checkpoint", str(checkpoints_dir()), "--n", "4", "--steps", "4",
                     "--guided-steps", "3", "--guidance-interval", "0,400", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["guided_steps"] == 3
    for extra, message in [(["--steps", "4", "--guided-steps", "3"], "--guidance-interval 0,HI"),
                           (["--steps", "4", "--guided-steps", "3", "--guidance-interval", "100,400"], "0,HI"),
                           (["--steps", "4", "--guided-steps", "4", "--guidance-interval", "0,400"], "less than"),
                           (["--guided-steps", "4", "--guidance-interval", "0,400"], "needs --steps (the total"),
                           (["--recipe", "shipped", "--guided-steps", "12"], "--guidance-interval 0,HI"),  # 30,600
                           (["--recipe", "shipped", "--guided-steps", "12", "--guidance-interval", "0,600",
                             "--spacing", "leading"], "trailing or logsnr, got 'leading'"),
                           (["--recipe", "shipped", "--steps", "10", "--guided-steps", "12", "--guidance-interval",
                             "0,600"], "got 12 of 10")]:
        assert cli.main(["sample", "--checkpoint", str(checkpoints_dir()), "--n", "4", *extra, "--out", str(out)]) != 0
        assert message in capsys.readouterr().err


class _OracleUNet(GaussianOracle):
    """The Gaussian oracle dressed as a UNet for :func:`sample` (which asks for a parameter's device)."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.p = torch.nn.Parameter(torch.zeros(()))


def test_init_latents_one_step_is_the_posterior_mean():
    """strength 1/20 of 20 trailing DDIM steps = noise the latents to t = 49 with the sampler's first draw,
    then one step to ᾱ = 1, which returns x̂_0 = E[x_0 | x_t]; for Gaussian data
    μ + √ᾱ·s²·(x_t − √ᾱ·μ) / (ᾱ·s² + 1 − ᾱ)."""
    from nbutils.config import make_generator

    sch = NoiseSchedule()
    z = torch.randn(5, 4, 7, 7, generator=torch.Generator().manual_seed(3))
    out = Sm.sample(_OracleUNet(sch), _IdentityVAE(), 5, 1, guidance=1.0, sampler="ddim", steps=20,
                    generator=make_generator(0), init_latents=z, strength=0.05)
    t = int(Sm.spaced_timesteps(1000, 20, "trailing")[-1])
    a = float(sch.alphas_cumprod[t])
    eps = torch.randn(z.shape, generator=make_generator(0))
    x_t = math.sqrt(a) * z + math.sqrt(1 - a) * eps
    expected = MU + math.sqrt(a) * S**2 * (x_t - math.sqrt(a) * MU) / (a * S**2 + 1 - a)
    assert t == 49 and torch.allclose(out.latents, expected, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_strength_runs_only_the_last_steps(sampler):
    from nbutils.config import make_generator

    m = _Recorder()
    z = torch.zeros(3, 4, 7, 7)
    Sm.sample(m, _IdentityVAE(), 3, 1, guidance=1.0, sampler=sampler, steps=10, generator=make_generator(0),
              init_latents=z, strength=0.3)
    s = Sm.make_sampler(sampler, NoiseSchedule(), steps=10)
    assert [t for t, _ in m.calls] == s.timesteps[-3:].tolist()


def test_bad_init_latents_and_strength():
    m = _Recorder()
    with pytest.raises(ValueError, match="strength needs init_latents"):
        Sm.sample(m, _IdentityVAE(), 2, 1, strength=0.5)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        Sm.sample(m, _IdentityVAE(), 2, 1, init_latents=torch.zeros(2, 4, 7, 7), strength=0.0)
    with pytest.raises(ValueError, match=r"init_latents must have shape \(2, 4, 7, 7\), got \(2, 4, 8, 8\)"):
        Sm.sample(m, _IdentityVAE(), 2, 1, init_latents=torch.zeros(2, 4, 8, 8), strength=0.5)


def _load_benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adaptive_projected_guidance_against_its_definition():
    """benchmarks/apg.py: η = 1 without threshold or momentum is classifier-free guidance; η = 0 leaves an update
    orthogonal to the conditional x̂₀ (per sample); the threshold caps ‖Δ‖; the momentum restarts per batch."""
    apg = _load_benchmark("apg")
    acp = NoiseSchedule().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    table = torch.randn(11, 4, 7, 7, generator=g)

    def model(x, t, labels):  # a class-dependent, x-dependent fake ε prediction
        return 0.3 * x + table[labels]

    x, labels, t, w = torch.randn(5, 4, 7, 7, generator=g), torch.tensor([0, 1, 2, 3, 9]), 300, 3.0
    cfg = Sm.guided_output(model, x, t, labels, w, 10)
    assert torch.allclose(apg.apg_guide(acp, 1.0, None, 0.0)(model, x, t, labels, w, 10), cfg, atol=1e-5)
    assert torch.equal(apg.apg_guide(acp, 0.0, None, 0.0)(model, x, t, labels, 1.0, 10), model(x, t, labels))

    def x0(eps, t):
        a = float(acp[t])
        return ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).flatten(1)

    def delta(out, t):  # (w − 1)·update: the guided x̂₀ minus the conditional one
        return x0(out, t) - x0(model(x, t, labels), t)

    def cfg_delta(t):  # Δ = x̂₀(x|c) − x̂₀(x|∅)
        return x0(model(x, t, labels), t) - x0(model(x, t, torch.full_like(labels, 10)), t)

    orth = delta(apg.apg_guide(acp, 0.0, None, 0.0)(model, x, t, labels, w, 10), t)
    assert orth.norm() > 0.1 * delta(cfg, t).norm()
    assert torch.allclose((orth * x0(model(x, t, labels), t)).sum(1), torch.zeros(5), atol=1e-3)
    capped = delta(apg.apg_guide(acp, 1.0, 0.5, 0.0)(model, x, t, labels, w, 10), t)
    assert torch.allclose(capped.norm(dim=1), torch.full((5,), (w - 1) * 0.5), rtol=1e-4)

    guide = apg.apg_guide(acp, 1.0, None, -0.5)  # momentum: the second step adds −0.5 × the first Δ
    assert torch.allclose(delta(guide(model, x, t, labels, w, 10), t), (w - 1) * cfg_delta(t), atol=1e-4)
    second = delta(guide(model, x, t - 50, labels, w, 10), t - 50)
    assert torch.allclose(second, (w - 1) * (cfg_delta(t - 50) - 0.5 * cfg_delta(t)), atol=1e-4)
    restarted = delta(guide(model, x, t, labels, w, 10), t)  # t went up: a new batch, no memory
    assert torch.allclose(restarted, (w - 1) * cfg_delta(t), atol=1e-4)


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


def test_guided_steps_put_the_steps_inside_the_interval():
    """``sample(…, guided_steps=B)`` visits exactly split_timesteps(T, steps − B, B, hi), guides (doubled passes)
    exactly the last B, and with the even split's B it is the plain schedule bit for bit."""
    from nbutils.config import make_generator

    def run(**kw):
        m = _Recorder()
        out = Sm.sample(m, _IdentityVAE(), 6, [1, 2, 3, 4, 5, 6], sampler="dpm", generator=make_generator(0),
                        guidance=3.0, guidance_interval=(0, 400), **kw)
        return out.latents, m.calls

    latents, calls = run(steps=16, guided_steps=12)
    assert [t for t, _ in calls] == Sm.split_timesteps(1000, 4, 12, 400).tolist()
    assert [b for _, b in calls] == [6] * 4 + [12] * 12
    _, calls = run(steps=16, guided_steps=12, timestep_spacing="logsnr")
    ac = NoiseSchedule().alphas_cumprod
    assert [t for t, _ in calls] == Sm.split_timesteps(1000, 4, 12, 400, "logsnr", ac).tolist()
    assert [b for _, b in calls] == [6] * 4 + [12] * 12
    assert torch.equal(run(steps=20, guided_steps=8)[0], run(steps=20)[0])
    assert not torch.equal(run(steps=20, guided_steps=12)[0], run(steps=20)[0])
    with pytest.raises(ValueError, match="guidance_interval"):
        Sm.sample(_Recorder(), _IdentityVAE(), 2, 1, steps=10, guided_steps=5)
    with pytest.raises(ValueError, match="guidance_interval"):
        Sm.sample(_Recorder(), _IdentityVAE(), 2, 1, steps=10, guided_steps=5, guidance_interval=(100, 400))
    for steps, guided in [(10, 10), (None, 5), (10, 0)]:
        with pytest.raises(ValueError, match="guided_steps"):
            Sm.sample(_Recorder(), _IdentityVAE(), 2, 1, steps=steps, guided_steps=guided, guidance_interval=(0, 400))
