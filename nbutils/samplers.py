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
1,600 in the first of 20 ``trailing`` steps. The linear schedule's
λ_999 = −5.06 is above the threshold, so its schedules are unchanged.

:func:`nbutils.pipeline.sample` runs a sampler with classifier-free guidance and decodes the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .diffusion import PREDICTION_TYPES, to_epsilon, to_x0
from .schedules import NoiseSchedule, log_snr

SPACINGS = ("leading", "trailing", "linspace", "logsnr")
SAMPLERS = ("ddpm", "ddim", "dpm", "dpm-sde")

#: The lowest half-log-SNR λ = ½·log(ᾱ/(1 − ᾱ)) a sampler starts from: diffusers' value for the cosine schedule
#: (``lambda_min_clipped=-5.1``), just below the linear schedule's λ_999 = −5.06, so that one is not clipped.
LAMBDA_MIN = -5.1


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

    With guidance on t ≤ ``split`` only, the guided steps are where a guided ODE bends most (docs/sampling.md),
    so this spends the steps there. ``split_timesteps(1000, 12, 8, 400)`` is
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
