"""Samplers: turning N(0, I) noise into latents, then (with the VAE) into clothes.

Every sampler follows the scheduler contract of Hugging Face ``diffusers``, so the two can be compared
step by step::

    sampler.set_timesteps(n)
    for t in sampler.timesteps:
        model_output = model(x, t, labels)            # ε or v, as the model was trained
        x = sampler.step(model_output, t, x, generator=g)

* :class:`DDPMSampler` — ancestral sampling (Ho et al. 2020, eq. 6–7). With n < T steps it uses the
  *respaced* betas β'_t = 1 − ᾱ_t / ᾱ_prev between the visited timesteps (Nichol & Dhariwal 2021).
* :class:`DDIMSampler` — Song et al. (2021): x_prev = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ²)·ε̂ + σ·z with
  σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev); η = 0 is deterministic, η = 1 is DDPM-like.
* :class:`DPMSolverSampler` — DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a
  second-order multistep solver of the probability-flow ODE in data-prediction form, in λ = log(α/σ).
  First step first order, last step first order down to σ = 0 ("lower_order_final").
* :class:`DPMSolverSDESampler` — SDE-DPM-Solver++(2M) (same paper; diffusers' ``sde-dpmsolver++``): the same
  multistep data prediction, but each step solves the reverse SDE, adding fresh noise — to first order exactly
  the DDPM step between the visited timesteps. Stochastic like DDPM, accurate with tens of steps, not hundreds.

``timestep_spacing`` (diffusers' names), for T = 1000 and n steps:

* ``leading``  — 0, T/n, 2T/n, … reversed: for n = 10: 900, 800, …, 0;
* ``trailing`` — T−1, T−1−T/n, …: for n = 10: 999, 899, …, 99 (starts at the noisiest step, which
  matters for few steps: with ``leading`` the first step is taken from t = 900, not pure noise);
* ``linspace`` — evenly from T−1 to 0 inclusive: for n = 10: 999, 888, …, 111, 0;
* ``logsnr``   — evenly in λ = log(α/σ) (half the log-SNR) from T−1 to 0, each rounded to the nearest
  timestep: the spacing DPM-Solver was derived in (Lu et al. 2022 step in λ and recommend uniform λ for
  small images; diffusers' ``use_lu_lambdas``). On the linear schedule it crowds the steps at low noise,
  for n = 10: 999, 886, 757, 603, 410, 202, 73, 22, 5, 0.

The step from t goes to the *next listed* timestep (and after the last one to ᾱ = 1, clean data). For
``leading`` and ``trailing`` with n dividing T this is exactly diffusers' ``t − T/n``.

The noisiest timestep a sampler starts from is ``top_timestep``: T − 1 unless the schedule's log-SNR falls below
``LAMBDA_MIN`` there, as the cosine schedule's does (ᾱ_999 = 2.4·10⁻⁹). Every spacing then runs over 0..top instead of
0..T − 1 (diffusers' ``lambda_min_clipped``). The reason: a step from t to s turns an error e in ε̂ into an error
of about (√ᾱ_s/√ᾱ_t)·e in the next sample, so starting at √ᾱ_t = 5·10⁻⁵ multiplies the UNet's errors by about
1,600 in the first of 20 ``trailing`` steps (benchmarks/README.md measures the effect). The linear schedule's
λ_999 = −5.06 is above the threshold, so its schedules are unchanged.

:func:`sample` runs a sampler with classifier-free guidance (Ho & Salimans 2022):
ε̂ = ε̂_uncond + w·(ε̂_cond − ε̂_uncond), both halves in one batched forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .diffusion import PREDICTION_TYPES, to_epsilon, to_x0
from .schedules import NoiseSchedule, log_snr

SPACINGS = ("leading", "trailing", "linspace", "logsnr")
SAMPLERS = ("ddpm", "ddim", "dpm", "dpm-sde")

#: The lowest half-log-SNR λ = ½·log(ᾱ/(1 − ᾱ)) a sampler starts from: diffusers' value for the cosine schedule
#: (``lambda_min_clipped=-5.1``), just below the linear schedule's λ_999 = −5.06, so that one is not clipped.
LAMBDA_MIN = -5.1

#: The shipped model's sampling recipe, ``sample(unet, vae, n, classes, **SHIPPED_RECIPE, generator=…)``: DPM-Solver++
#: with 20 steps spaced evenly in log-SNR (995, 992, …, 584, 415, 266, 159, 91, 51, 27, 13, 5, 2, 0 on the cosine
#: schedule), classifier-free guidance w = 2.9375 on 30 ≤ t ≤ 600 only — 6 of the 20 steps; the conditional model alone
#: elsewhere. Chosen by measurement for the shipped weights, a cosine-schedule v-prediction UNet (README "Sampling" and
#: "Evaluation"; benchmarks/README.md): the steps and the interval on the UNets shipped before, w = 2.9375 (= 47/16)
#: for this one, the lowest w measured to keep its conditional accuracy above 97% with a margin at N = 10,000 (w = 2.875
#: kept it by one sample). On the command line ``python -m nbutils sample --recipe shipped``, which is what
#: ``make demo`` runs.
SHIPPED_RECIPE = {"sampler": "dpm", "steps": 20, "timestep_spacing": "logsnr", "guidance": 2.9375,
                  "guidance_interval": (30, 600)}


def top_timestep(alphas_cumprod: torch.Tensor, lambda_min: float = LAMBDA_MIN) -> int:
    """The noisiest timestep sampling starts from: the largest t with λ(t) = ½·log(ᾱ_t/(1 − ᾱ_t)) ≥ ``lambda_min``.

        >>> [top_timestep(NoiseSchedule(name).alphas_cumprod) for name in ("linear", "squaredcos_cap_v2")]
        [999, 995]
    """
    lam = 0.5 * log_snr(alphas_cumprod.double())
    ok = torch.nonzero(lam >= lambda_min)
    if len(ok) == 0:
        raise ValueError(f"no timestep of this schedule has log-SNR λ ≥ {lambda_min} (λ_0 = {float(lam[0]):.2f})")
    return int(ok.max())


def logsnr_timesteps(alphas_cumprod: torch.Tensor, n: int, top: int, bottom: int = 0) -> torch.Tensor:
    """``n`` timesteps from ``top`` down to ``bottom`` (both included), evenly spaced in λ = ½·log(ᾱ/(1 − ᾱ)),
    each the timestep whose λ is nearest; where two would round to the same timestep the lower one moves down
    by one, so the result is strictly decreasing (near t = 0, where λ changes fastest, many steps end up on
    consecutive timesteps). ``n = 1`` gives ``[top]``."""
    if not 0 <= bottom <= top < len(alphas_cumprod):
        raise ValueError(f"need 0 ≤ bottom ≤ top < {len(alphas_cumprod)}, got bottom {bottom}, top {top}")
    if not 1 <= n <= top - bottom + 1:
        raise ValueError(f"{n} steps do not fit on the {top - bottom + 1} timesteps {bottom}..{top}")
    lam = 0.5 * log_snr(alphas_cumprod.double())
    targets = torch.linspace(float(lam[top]), float(lam[bottom]), n, dtype=torch.float64)  # n = 1: [λ(top)]
    ts: list[int] = []
    for target in targets:
        t = bottom + int(torch.argmin((lam[bottom:top + 1] - target).abs()))
        ts.append(min(t, ts[-1] - 1) if ts else t)
    for i in range(n - 1, -1, -1):  # and back up from the bottom if that went below it (fits: n ≤ top − bottom + 1)
        ts[i] = max(ts[i], ts[i + 1] + 1 if i + 1 < n else bottom)
    return torch.tensor(ts, dtype=torch.long)


def spaced_timesteps(num_train_timesteps: int, n: int, spacing: str = "trailing",
                     alphas_cumprod: torch.Tensor | None = None, top: int | None = None) -> torch.Tensor:
    """The ``n`` timesteps a sampler visits, noisiest first (int64), spread over 0..``top`` (default T − 1; the
    samplers pass :func:`top_timestep`). See the module docstring; ``logsnr`` needs the schedule's
    ``alphas_cumprod``."""
    T = int(num_train_timesteps)
    top = T - 1 if top is None else int(top)
    if not 0 <= top < T:
        raise ValueError(f"top must be a timestep in 0..{T - 1}, got {top}")
    if not 1 <= n <= top + 1:
        raise ValueError(f"number of steps must be between 1 and {top + 1}, got {n}")
    if spacing == "logsnr":
        if alphas_cumprod is None:
            raise ValueError("timestep_spacing 'logsnr' needs the schedule's alphas_cumprod")
        return logsnr_timesteps(alphas_cumprod, n, top, 0)
    span = top + 1  # the timesteps 0..top; T for an unclipped schedule
    if spacing == "leading":
        ts = torch.arange(n) * (span // n)
    elif spacing == "trailing":
        ts = torch.round(torch.arange(span, 0, -span / n, dtype=torch.float64)).long() - 1
        return ts[:n]
    elif spacing == "linspace":
        ts = torch.linspace(0, top, n, dtype=torch.float64).round().long()
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return ts.flip(0).long()


def split_timesteps(num_train_timesteps: int, high: int, low: int, split: int, spacing: str = "trailing",
                    alphas_cumprod: torch.Tensor | None = None, top: int | None = None) -> torch.Tensor:
    """``high`` steps on (split, top] followed by ``low`` steps on [0, split), noisiest first (``top`` as in
    :func:`spaced_timesteps`, default T − 1), the upper part
    spaced like ``trailing`` (t = round(E − i·L/n) − 1 over a part of length L ending at E), the lower part by
    ``spacing``: ``trailing`` likewise (it stops at t = split/low − 1), or ``logsnr`` (evenly in λ from
    t = split − 1 down to t = 0, which needs ``alphas_cumprod``; :func:`logsnr_timesteps`).

    With guidance on t ≤ ``split`` only, the guided steps are where a guided ODE bends most (benchmarks/README.md,
    "Where the extra steps pay off"), so this spends the steps there. ``split_timesteps(1000, 12, 8, 400)`` is
    exactly the 20-step ``trailing`` schedule and ``(1000, 30, 20, 400)`` the 50-step one.

        >>> split_timesteps(1000, 4, 12, 400).tolist()[:6]
        [999, 849, 699, 549, 399, 366]
    """
    T = int(num_train_timesteps)
    top = T - 1 if top is None else int(top)
    if not 0 <= top < T:
        raise ValueError(f"top must be a timestep in 0..{T - 1}, got {top}")
    if not 0 < split < top:
        raise ValueError(f"split must be a timestep in 1..{top - 1}, got {split}")
    if spacing not in ("trailing", "logsnr"):
        raise ValueError(f"the guided part can be spaced 'trailing' or 'logsnr', got {spacing!r}")
    if spacing == "logsnr" and alphas_cumprod is None:
        raise ValueError("spacing 'logsnr' needs the schedule's alphas_cumprod")
    hi = [round(top + 1 - i * (top + 1 - split) / high) - 1 for i in range(high)] if high >= 1 else []
    if spacing == "logsnr" and 1 <= low <= split:
        lo = logsnr_timesteps(alphas_cumprod, low, split - 1, 0).tolist()
    else:  # trailing (or a logsnr part that cannot fit, reported below like a trailing one)
        lo = [round(split - i * split / low) - 1 for i in range(low)] if low >= 1 else []
    # each part must be non-empty, its steps distinct, and the upper part must stay above ``split``
    if not hi or not lo or hi[-1] <= split or len(set(hi)) < high or len(set(lo)) < low:
        raise ValueError(f"{high} steps do not fit on ({split}, {top}] or {low} steps on [0, {split}) "
                         "(each part needs at least one step and distinct timesteps)")
    return torch.tensor(hi + lo, dtype=torch.long)


class _Sampler:
    """Shared bookkeeping: the schedule, the visited timesteps, and ᾱ of the step after each one."""

    default_spacing = "trailing"

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", timestep_spacing: str | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        self.schedule = schedule
        self.alphas_cumprod = schedule.alphas_cumprod  # float64
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing or self.default_spacing
        self.num_train_timesteps = schedule.num_train_timesteps
        self.top = top_timestep(self.alphas_cumprod)  # where sampling starts (T − 1 unless λ is clipped)
        self.set_timesteps(self.top + 1)

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None) -> None:
        """``num_inference_steps`` spaced by ``timestep_spacing`` over 0..``top``, or exactly the given ``timesteps``
        (strictly decreasing, within 0..T − 1; diffusers' custom-timesteps convention)."""
        if timesteps is not None:
            ts = torch.as_tensor(list(timesteps), dtype=torch.long)
            if ts.ndim != 1 or len(ts) == 0 or int(ts.max()) > self.num_train_timesteps - 1 or int(ts.min()) < 0 \
                    or (len(ts) > 1 and not bool((ts[1:] < ts[:-1]).all())):
                raise ValueError(f"timesteps must be strictly decreasing, within 0..{self.num_train_timesteps - 1}; "
                                 f"got {ts.tolist()}")
            self.num_inference_steps, self.timesteps = len(ts), ts
        else:
            self.num_inference_steps = int(num_inference_steps)
            self.timesteps = spaced_timesteps(self.num_train_timesteps, self.num_inference_steps,
                                              self.timestep_spacing, self.alphas_cumprod, self.top)
        self._index = {int(t): i for i, t in enumerate(self.timesteps)}
        self._reset()

    def _reset(self) -> None:
        pass

    def _alphas(self, t: int | torch.Tensor) -> tuple[float, float, int]:
        """(ᾱ_t, ᾱ_prev, index of t) where prev is the next listed timestep, or ᾱ = 1 after the last."""
        t = int(t)
        if t not in self._index:
            raise ValueError(f"timestep {t} is not one of this sampler's timesteps; call set_timesteps first")
        i = self._index[t]
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[int(self.timesteps[i + 1])]) if i + 1 < len(self.timesteps) else 1.0
        return a_t, a_prev, i

    def _x0_eps(self, model_output, t, sample):
        tt = torch.full((sample.shape[0],), int(t), dtype=torch.long)
        x0 = to_x0(model_output, sample, tt, self.alphas_cumprod, self.prediction_type)
        eps = to_epsilon(model_output, sample, tt, self.alphas_cumprod, self.prediction_type)
        return x0, eps


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved (same seed → same noise on any device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling with the posterior variance β̃ ("fixed_small")."""

    default_spacing = "leading"

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        a_t, a_prev, _ = self._alphas(t)
        alpha = a_t / a_prev  # α_t of the (possibly respaced) step
        beta = 1 - alpha
        x0, _ = self._x0_eps(model_output, t, sample)
        # posterior mean μ̃(x_t, x̂_0), Ho et al. 2020 eq. 7
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * sample
        if a_prev >= 1.0:  # the last step returns the mean
            return mean
        variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
        return mean + math.sqrt(variance) * _noise_like(sample, generator)


class DDIMSampler(_Sampler):
    """DDIM with stochasticity η (0 = deterministic)."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", timestep_spacing: str | None = None,
                 eta: float = 0.0):
        if eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        self.eta = eta
        super().__init__(schedule, prediction_type, timestep_spacing)

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        a_t, a_prev, _ = self._alphas(t)
        x0, eps = self._x0_eps(model_output, t, sample)
        sigma = self.eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(1 - a_t / a_prev, 0.0))
        direction = math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        prev = math.sqrt(a_prev) * x0 + direction
        if sigma > 0:
            prev = prev + sigma * _noise_like(sample, generator)
        return prev


class DPMSolverSampler(_Sampler):
    """DPM-Solver++(2M): multistep, second order, data prediction (deterministic)."""

    def _reset(self) -> None:
        self._prev_x0: torch.Tensor | None = None
        self._prev_lambda: float | None = None

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        a_t, a_prev, i = self._alphas(t)
        x0, _ = self._x0_eps(model_output, t, sample)
        alpha_s, sigma_s = math.sqrt(a_t), math.sqrt(1 - a_t)
        lam_s = math.log(alpha_s / sigma_s)
        if a_prev >= 1.0:  # last step: to σ = 0, where the first-order update is exactly x̂_0
            self._reset()
            return x0
        alpha_t, sigma_t = math.sqrt(a_prev), math.sqrt(1 - a_prev)
        h = math.log(alpha_t / sigma_t) - lam_s
        d = x0
        if self._prev_x0 is not None:  # second order: D = x̂0_s + (1/2r)(x̂0_s − x̂0_prev), r = h_prev / h
            r = (lam_s - self._prev_lambda) / h
            d = x0 + (x0 - self._prev_x0) / (2 * r)
        self._prev_x0, self._prev_lambda = x0, lam_s
        return self._update(sample, d, alpha_t, sigma_t, sigma_s, h, generator)

    def _update(self, sample, d, alpha_t, sigma_t, sigma_s, h, generator):
        """The probability-flow ODE's exact solution for a data prediction d held constant over the step."""
        return (sigma_t / sigma_s) * sample - alpha_t * math.expm1(-h) * d


class DPMSolverSDESampler(DPMSolverSampler):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", sec. 5; diffusers' ``sde-dpmsolver++``): the same
    multistep data prediction D, but each step solves the reverse *SDE* instead of the ODE, injecting fresh noise:

        x_t = (σ_t/σ_s)·e^(−h)·x_s + α_t·(1 − e^(−2h))·D + σ_t·√(1 − e^(−2h))·z,   h = λ_t − λ_s.

    With D = x̂_0 (first order, the first step) this is exactly the DDPM posterior q(x_t | x_s, x̂_0): ancestral
    sampling between the visited timesteps. The second-order D makes it accurate with far fewer steps than DDPM,
    while the noise keeps correcting earlier errors, as ancestral sampling does."""

    def _update(self, sample, d, alpha_t, sigma_t, sigma_s, h, generator):
        keep = -math.expm1(-2 * h)  # 1 − e^(−2h)
        return ((sigma_t / sigma_s) * math.exp(-h)) * sample + (alpha_t * keep) * d \
            + (sigma_t * math.sqrt(keep)) * _noise_like(sample, generator)


def make_sampler(name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon", steps: int | None = None,
                 timestep_spacing: str | None = None, eta: float = 0.0) -> _Sampler:
    """``ddpm`` | ``ddim`` | ``dpm`` | ``dpm-sde`` with ``set_timesteps(steps)`` already called (default: every
    timestep 0..top for ddpm — T for the linear schedule —, 50 for ddim, 20 for dpm, 50 for dpm-sde)."""
    if name == "ddpm":
        s = DDPMSampler(schedule, prediction_type, timestep_spacing)
    elif name == "ddim":
        s = DDIMSampler(schedule, prediction_type, timestep_spacing, eta=eta)
    elif name == "dpm":
        s = DPMSolverSampler(schedule, prediction_type, timestep_spacing)
    elif name == "dpm-sde":
        s = DPMSolverSDESampler(schedule, prediction_type, timestep_spacing)
    else:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    default = {"ddpm": s.top + 1, "ddim": 50, "dpm": 20, "dpm-sde": 50}[name]
    s.set_timesteps(default if steps is None else steps)
    return s


def guided_output(model, x: torch.Tensor, t, labels: torch.Tensor, guidance: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance: out_u + w·(out_c − out_u), one forward pass over [cond; uncond].

    w = 1 is the plain conditional model, w = 0 the unconditional one. Examples whose label already is
    the null label are unconditional whatever w is. Linear in the output, so valid for ε and v alike.
    """
    b = x.shape[0]
    tt = torch.full((b,), int(t), dtype=torch.long, device=x.device)
    if guidance == 1.0:
        return model(x, tt, labels)
    null = torch.full_like(labels, null_label)
    if guidance == 0.0:
        return model(x, tt, null)
    out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
    cond, uncond = out[:b], out[b:]
    return uncond + guidance * (cond - uncond)


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1] (decoded): (N, 1, 28, 28) for FashionMNIST
    latents: torch.Tensor  # (N, C_z, H/4, W/4), standardised
    labels: torch.Tensor  # (N,), −1 = unconditional
    trajectory: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (t, decoded x̂_0) pairs
    precision: str = "fp32"  # what the UNet ran in ("auto" resolved)


@torch.no_grad()
def sample(
    unet,
    vae,
    n: int,
    classes: int | Sequence[int] | torch.Tensor | None = None,
    guidance: float = 3.0,
    sampler: str = "dpm",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    guidance_interval: tuple[int, int] | None = None,
    precision: str = "fp32",
    diffusion_cfg=None,
    eta: float = 0.0,
    timestep_spacing: str | None = None,
    batch_size: int = 500,
    return_trajectory: bool = False,
    trajectory_points: int = 8,
    progress: bool = False,
    guide=None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    guided_steps: int | None = None,
) -> SampleResult:
    """Generate ``n`` images. ``classes``: one int for all, a sequence of n ints, or None/−1 for
    unconditional samples. Noise comes from ``generator`` (CPU generators reproduce across devices).

    ``guidance_interval=(lo, hi)`` applies guidance only at timesteps lo ≤ t ≤ hi and samples with the plain
    conditional model (w = 1, one forward pass instead of two) elsewhere: guidance is what fixes the class
    early on, while at low noise it mostly strips detail diversity (Kynkäänniemi et al. 2024, "Applying
    Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models").

    ``precision="bf16"`` runs the UNet under bfloat16 autocast (its output is cast back to float32 before the
    sampler's arithmetic; the VAE decode stays float32): ~1.5× faster on CPUs with bf16 support, at a small
    cost in fidelity (benchmarks/README.md measures both); ``"auto"`` = bf16 where the device supports it
    natively, else fp32.

    ``guide`` replaces classifier-free guidance by another rule (an experiment hook; autoguidance in
    benchmarks/autoguidance.py uses it): it is called as ``guide(model, x, t, labels, w, null_label)`` at every
    step, like :func:`guided_output` (the default), where ``model`` is the UNet in the sampling precision and
    ``w`` this step's guidance scale (1 outside ``guidance_interval``), and returns the model output to step with.

    ``guided_steps`` (with ``guidance_interval=(0, hi)``) splits the ``steps`` between the two parts instead of
    spacing them evenly: ``steps − guided_steps`` on (hi, T − 1], ``guided_steps`` on [0, hi)
    (:func:`split_timesteps`). Guided steps are where the solver's error is (benchmarks/README.md): at the same
    number of UNet passes, 4 + 12 scores better than the even 20 steps' 12 + 8. ``timestep_spacing`` then spaces
    the guided part (``trailing``, the default, or ``logsnr``); the part above stays ``trailing``.

    ``init_latents`` (N, C_z, h, w), standardised like ``vae.encode``'s output, starts from given latents instead of
    pure noise (SDEdit, Meng et al. 2022; diffusers' image-to-image convention): of the sampler's n timesteps only
    the last round(n·``strength``) are run, and the latents are first noised to the first of them,
    x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε. ``strength`` 1 starts from (almost) pure noise, small values keep the input's shape.

    ``diffusion_cfg`` is the :class:`~nbutils.config.DiffusionConfig` the UNet was trained with
    (default: the UNet's ``diffusion_cfg`` attribute set by ``load_unet``, else the defaults).
    """
    from .config import DiffusionConfig

    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    if guidance < 0:
        raise ValueError(f"guidance must be ≥ 0, got {guidance}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if init_latents is not None:
        if init_latents.ndim != 4 or tuple(init_latents.shape[1:]) != tuple(vae.latent_shape) or len(init_latents) != n:
            raise ValueError(f"init_latents must have shape ({n}, {', '.join(map(str, vae.latent_shape))}), "
                             f"got {tuple(init_latents.shape)}")
    elif strength != 1.0:
        raise ValueError("strength needs init_latents")
    if guidance_interval is not None:
        lo, hi = (int(v) for v in guidance_interval)
        if not 0 <= lo <= hi:
            raise ValueError(f"guidance_interval must be (lo, hi) with 0 ≤ lo ≤ hi, got {guidance_interval}")
    if guided_steps is not None:
        if guidance_interval is None or lo != 0:
            raise ValueError("guided_steps needs guidance_interval=(0, hi): the guided part must end the schedule")
        if steps is None or not 1 <= guided_steps < steps:
            raise ValueError(f"guided_steps must be in 1..steps − 1 (steps = {steps}), got {guided_steps}")
    dcfg = diffusion_cfg or getattr(unet, "diffusion_cfg", None) or DiffusionConfig()
    schedule = NoiseSchedule.from_config(dcfg)
    custom_timesteps = None
    if guided_steps is not None:
        custom_timesteps = split_timesteps(schedule.num_train_timesteps, steps - guided_steps, guided_steps, hi,
                                           timestep_spacing or "trailing", schedule.alphas_cumprod,
                                           top_timestep(schedule.alphas_cumprod))
    null = unet.null_label
    if classes is None:
        labels = torch.full((n,), -1, dtype=torch.long)
    elif isinstance(classes, int):
        labels = torch.full((n,), classes, dtype=torch.long)
    else:
        labels = torch.as_tensor(list(classes) if not isinstance(classes, torch.Tensor) else classes).long()
        if labels.shape != (n,):
            raise ValueError(f"classes must be one label or {n} labels, got shape {tuple(labels.shape)}")
    if ((labels < -1) | (labels >= null)).any():
        raise ValueError(f"class labels must be in 0..{null - 1} (or −1 for unconditional)")
    device = next(unet.parameters()).device
    from .config import bf16_supported

    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"
    amp = precision == "bf16"
    if amp:
        if not bf16_supported(device):
            raise ValueError(f"precision='bf16' needs native bf16 support, which {device} lacks (it would only be "
                             "emulated, i.e. slower); use precision='fp32'")

    def model(x, t, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return unet(x, t, y).float()

    images, latents, trajectory = [], [], []
    guide = guide or guided_output
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"{sampler} {steps or ''}".strip(), disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        lab = labels[start : start + batch_size]
        model_labels = torch.where(lab < 0, torch.full_like(lab, null), lab).to(device)
        s = make_sampler(sampler, schedule, dcfg.prediction_type, steps, timestep_spacing, eta)
        if custom_timesteps is not None:
            s.set_timesteps(timesteps=custom_timesteps)
        shape = (len(lab), *vae.latent_shape)
        x = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(device)
        timesteps = s.timesteps
        if init_latents is not None:  # SDEdit: noise the given latents to the first timestep run
            timesteps = timesteps[len(timesteps) - max(1, round(len(timesteps) * strength)):]
            a = float(s.alphas_cumprod[int(timesteps[0])])
            x = math.sqrt(a) * init_latents[start : start + batch_size].to(device, torch.float32) + math.sqrt(1 - a) * x
        record = set()
        if return_trajectory and start == 0:
            idx = torch.linspace(0, len(timesteps) - 1, min(trajectory_points, len(timesteps))).round().long().tolist()
            record = {int(timesteps[i]) for i in idx}
        for t in timesteps:
            w = guidance if guidance_interval is None or lo <= int(t) <= hi else 1.0
            out = guide(model, x, t, model_labels, w, null)
            if int(t) in record:
                tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
                x0 = to_x0(out, x, tt, s.alphas_cumprod, dcfg.prediction_type)
                trajectory.append((int(t), vae.decode(x0).cpu()))
            x = s.step(out, t, x, generator=generator)
        latents.append(x.cpu())
        images.append(vae.decode(x).cpu())
        bar.update(len(lab))
    bar.close()
    return SampleResult(torch.cat(images), torch.cat(latents), labels, trajectory, precision)
