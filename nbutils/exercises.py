"""Exercises with automatic checks: the course kit of notebooks 01–06.

Longer than the ~400 lines a module aims at because it is a catalogue: one short entry (text, stub,
check) per exercise, read one at a time.

Each notebook ends with a few exercises. A code cell holds a stub the student fills in; right below it,
``check_<name>(fn)`` runs the student's function on several random inputs (fixed seeds, edge cases such as
t = 0 and t = T − 1 included), compares the output with the library's own implementation or a closed form,
and prints a specific verdict: which input, expected vs got, and — when the output equals what a known mistake
produces (ᾱ where √ᾱ belongs, an off-by-one timestep, a flipped sign…) — which mistake. A check never raises in
a notebook, so "Run all" carries on past an unfinished exercise; with ``strict=True`` or
``$NBUTILS_STRICT_CHECKS=1`` (the tests and the solution notebooks) a failure raises ``AssertionError``.

:data:`EXERCISES` lists them all (notebook, goal, stub, solution); ``python -m nbutils solutions`` writes copies of
the notebooks with the solutions filled in; ``docs/instructors.md`` is the guide.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from .diffusion import add_noise
from .metrics import fid
from .samplers import DDIMSampler
from .schedules import NoiseSchedule, alphas_cumprod, make_betas
from .unet import timestep_embedding
from .vae import kl_divergence, latent_stats

STRICT_ENV = "NBUTILS_STRICT_CHECKS"


# --------------------------------------------------------------------------------------------
# The checking machinery
# --------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """The verdict of one check: truthy when it passed; ``message`` is what was printed."""

    exercise: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"CheckResult({self.exercise!r}, passed={self.passed})"


@dataclass
class Case:
    """One input to a student's function, with a readable description for the messages."""

    kwargs: dict[str, Any]
    description: str


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _difference(got: Any, expected: Any, rtol: float, atol: float) -> str | None:
    """None when ``got`` matches ``expected``; else a one-line description of how it differs."""
    if isinstance(expected, tuple):
        if not isinstance(got, tuple | list) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} values, got {type(got).__name__}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            d = _difference(g, e, rtol, atol)
            if d is not None:
                return f"item {i} of the returned tuple: {d}"
        return None
    if got is None:
        return "the function returned None (a missing `return`?)"
    try:
        g, e = _as_array(got), _as_array(expected)
    except (TypeError, ValueError) as err:
        return f"could not read the result as numbers ({err})"
    if g.shape != e.shape:
        return f"shape {tuple(g.shape)}, expected {tuple(e.shape)}"
    if not np.isfinite(g).all():
        return "the result contains NaN or inf"
    err = np.abs(g - e)
    bad = err > atol + rtol * np.abs(e)
    if not bad.any():
        return None
    idx = np.unravel_index(np.argmax(err), err.shape) if err.ndim else ()
    where = f" at index {tuple(int(i) for i in idx)}" if idx else ""
    return (f"expected {e[idx]:.6g}, got {g[idx]:.6g}{where} (max |difference| {err.max():.3g}, "
            f"{int(bad.sum())} of {bad.size} values off)")


def _call(fn: Callable, case: Case) -> tuple[Any, str | None]:
    kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.kwargs.items()}
    try:
        return fn(**kwargs), None
    except NotImplementedError:
        return None, "not implemented yet: replace the `raise NotImplementedError` with your code"
    except Exception as err:  # noqa: BLE001 - any error in student code becomes a message
        return None, f"raised {type(err).__name__}: {err}"


def _run_check(key: str, fn: Callable, cases: list[Case], reference: Callable,
               mistakes: list[tuple[str, Callable]], hint: str, rtol: float = 1e-5, atol: float = 1e-6,
               strict: bool | None = None) -> CheckResult:
    """Run ``fn`` on every case against ``reference``; name a known mistake when the output matches one."""
    ex = EXERCISES[key]
    head = f"Exercise {ex.number} ({ex.title})"
    message = None
    for i, case in enumerate(cases, 1):
        got, error = _call(fn, case)
        where = f"case {i} of {len(cases)} [{case.description}]"
        if error is not None:
            message = f"✗ {head}: {error} — on {where}."
            break
        expected = reference(**case.kwargs)
        diff = _difference(got, expected, rtol, atol)
        if diff is None:
            continue
        diagnosis = ""
        for label, wrong in mistakes:
            try:
                if _difference(got, wrong(**case.kwargs), max(10 * rtol, 1e-4), max(10 * atol, 1e-5)) is None:
                    diagnosis = f" Your result is exactly what you get when {label}."
                    break
            except Exception:  # noqa: BLE001 - a mistake model that does not apply to this input
                continue
        message = f"✗ {head}: wrong result on {where}: {diff}.{diagnosis or ' Hint: ' + hint}"
        break
    passed = message is None
    if passed:
        message = f"✓ {head}: correct on all {len(cases)} test inputs."
    print(message)
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "").strip() not in ("", "0")
    if strict and not passed:
        raise AssertionError(message)
    return CheckResult(key, passed, message)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# The exercises: reference, test inputs, known mistakes
# --------------------------------------------------------------------------------------------


@dataclass
class Exercise:
    number: str  # "3.1" = notebook 03, first exercise
    key: str  # the function name the student writes
    title: str
    goal: str  # what it teaches (docs/instructors.md, the notebook's markdown)
    stub: str  # the code cell the student gets
    solution: str  # the same cell, solved
    check: Callable[..., CheckResult] = field(repr=False, default=None)  # set below

    @property
    def notebook(self) -> str:
        return f"{int(self.number.split('.')[0]):02d}"


EXERCISES: dict[str, Exercise] = {}


def _exercise(number: str, key: str, title: str, goal: str, signature: str, docstring: str, solution_body: str):
    stub = f"{signature}\n    \"\"\"{docstring}\"\"\"\n    # YOUR CODE HERE\n    raise NotImplementedError\n"
    body = textwrap.indent(textwrap.dedent(solution_body).strip(), "    ")
    solution = f"{signature}\n    \"\"\"{docstring}\"\"\"\n{body}\n"
    EXERCISES[key] = Exercise(number, key, title, goal, stub, solution)

    def register(check: Callable) -> Callable:
        EXERCISES[key].check = check
        return check

    return register


# ---- 01: the VAE ---------------------------------------------------------------------------


@_exercise(
    "1.1", "reparameterize", "the reparameterisation trick",
    "Sample z ~ N(μ, σ²) as a differentiable function of (μ, log σ²) and outside noise ε.",
    "def reparameterize(mean, logvar, eps):",
    "z = μ + σ·ε from the encoder's mean and log-variance and standard normal noise eps (all the same shape).",
    "return mean + torch.exp(0.5 * logvar) * eps",
)
def check_reparameterize(fn: Callable, strict: bool | None = None) -> CheckResult:
    cases = [Case({"mean": _randn(*s, seed=i), "logvar": _randn(*s, seed=i + 10) - 1.0, "eps": _randn(*s, seed=i + 20)},
                  f"shape {s}") for i, s in enumerate([(4, 4, 7, 7), (2, 8), (1, 4, 7, 7)])]
    return _run_check(
        "reparameterize", fn, cases,
        lambda mean, logvar, eps: mean + (0.5 * logvar).exp() * eps,
        [("σ is taken as exp(logvar) — that is the variance; σ = exp(½·logvar)",
          lambda mean, logvar, eps: mean + logvar.exp() * eps),
         ("the log-variance multiplies ε directly (σ = exp(½·logvar))", lambda mean, logvar, eps: mean + logvar * eps),
         ("σ = √logvar… logvar can be negative: σ = exp(½·logvar)",
          lambda mean, logvar, eps: mean + logvar.abs().sqrt() * eps),
         ("the mean is left out", lambda mean, logvar, eps: (0.5 * logvar).exp() * eps)],
        "z = mean + exp(0.5 * logvar) * eps.", strict=strict)


@_exercise(
    "1.2", "kl_divergence", "the KL term",
    "Derive KL(N(μ, σ²) ‖ N(0, 1)) in closed form and reduce it the way the loss needs (sum over latent "
    "dimensions, one value per example).",
    "def kl_divergence(mean, logvar):",
    "KL(N(mean, exp(logvar)) ‖ N(0, 1)) summed over all latent dimensions: one value per example, shape (B,).",
    "return 0.5 * (mean**2 + logvar.exp() - logvar - 1).flatten(1).sum(dim=1)",
)
def check_kl_divergence(fn: Callable, strict: bool | None = None) -> CheckResult:

    cases = [Case({"mean": _randn(*s, seed=i), "logvar": 0.5 * _randn(*s, seed=i + 10)}, f"shape {s}")
             for i, s in enumerate([(3, 4, 7, 7), (5, 2, 3, 3), (1, 4, 7, 7)])]
    cases.append(Case({"mean": torch.zeros(2, 4, 7, 7, dtype=torch.float64),
                       "logvar": torch.zeros(2, 4, 7, 7, dtype=torch.float64)}, "μ = 0, σ = 1: KL must be 0"))
    return _run_check(
        "kl_divergence", fn, cases, kl_divergence,
        [("the ½ is missing", lambda mean, logvar: (mean**2 + logvar.exp() - logvar - 1).flatten(1).sum(1)),
         ("you average over the latent dimensions instead of summing them",
          lambda mean, logvar: 0.5 * (mean**2 + logvar.exp() - logvar - 1).flatten(1).mean(1)),
         ("the sign of the log σ² term is flipped",
          lambda mean, logvar: 0.5 * (mean**2 + logvar.exp() + logvar - 1).flatten(1).sum(1)),
         ("the −1 is missing", lambda mean, logvar: 0.5 * (mean**2 + logvar.exp() - logvar).flatten(1).sum(1))],
        "per dimension KL = ½(μ² + σ² − log σ² − 1) with σ² = exp(logvar); sum over dims 1.., keep the batch.",
        strict=strict)


# ---- 02: the latent space ------------------------------------------------------------------


@_exercise(
    "2.1", "latent_stats", "the scale factor",
    "Compute the per-channel shift and the single scale factor that make posterior samples z = μ + σ·ε "
    "zero-mean with unit variance, exactly, from the cached means and standard deviations (law of total variance).",
    "def latent_stats(mean, std):",
    "mean, std: (N, C, H, W) posterior parameters. Returns (shift of shape (C,), scale: a float) such that\n"
    "    (z - shift[:, None, None]) * scale has mean 0 per channel and variance 1 overall, for z = mean + std·ε.",
    """
    shift = mean.mean(dim=(0, 2, 3))
    var = ((mean - shift[None, :, None, None]) ** 2).mean() + (std**2).mean()
    return shift, float(1 / var.sqrt())
    """,
)
def check_latent_stats(fn: Callable, strict: bool | None = None) -> CheckResult:

    def ref(mean, std):
        shift, scale = latent_stats(mean, std)
        return shift.double(), scale

    cases = []
    for i, (n, c) in enumerate([(64, 4), (10, 3), (200, 4)]):
        offset = torch.arange(c, dtype=torch.float64)[None, :, None, None]
        cases.append(Case({"mean": 2 * _randn(n, c, 7, 7, seed=i) + offset,
                           "std": 0.1 + _randn(n, c, 7, 7, seed=i + 5).abs()}, f"N={n}, C={c}"))

    def no_std(mean, std):
        shift = mean.mean(dim=(0, 2, 3))
        return shift, float(1 / ((mean - shift[None, :, None, None]) ** 2).mean().sqrt())

    def std_not_inverse(mean, std):
        shift, scale = ref(mean, std)
        return shift, 1 / scale

    def global_shift(mean, std):
        m = mean.mean()
        return m.expand(mean.shape[1]).clone(), float(1 / (((mean - m) ** 2).mean() + (std**2).mean()).sqrt())

    return _run_check(
        "latent_stats", fn, cases, ref,
        [("the posterior's own spread σ² is left out of the variance (z = μ + σ·ε varies by σ too)", no_std),
         ("the scale is the standard deviation; it must be 1 / standard deviation", std_not_inverse),
         ("one shift for all channels; each channel needs its own mean", global_shift)],
        "Var(z) = E[(μ − shift)²] + E[σ²] (law of total variance), scale = 1/√Var.", rtol=1e-4, atol=1e-6,
        strict=strict)


def _slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    af, bf = a.flatten(1), b.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1))
    omega = torch.arccos(cos.clamp(-1, 1))[:, None]
    out = (torch.sin((1 - t) * omega) * af + torch.sin(t * omega) * bf) / torch.sin(omega)
    return out.reshape(a.shape)


@_exercise(
    "2.2", "slerp", "spherical interpolation",
    "Interpolate between two Gaussian latents along the great circle (slerp) rather than the straight line, "
    "which would pass through low-norm latents the decoder never saw.",
    "def slerp(a, b, t):",
    "Spherical interpolation between latents a and b (shape (B, C, H, W), one angle per example) at t ∈ [0, 1].",
    """
    af, bf = a.flatten(1), b.flatten(1)
    omega = torch.arccos((af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)))[:, None]
    out = (torch.sin((1 - t) * omega) * af + torch.sin(t * omega) * bf) / torch.sin(omega)
    return out.reshape(a.shape)
    """,
)
def check_slerp(fn: Callable, strict: bool | None = None) -> CheckResult:
    cases = [Case({"a": _randn(3, 4, 7, 7, seed=i), "b": _randn(3, 4, 7, 7, seed=i + 7), "t": t}, f"t = {t}")
             for i, t in enumerate([0.0, 1.0, 0.5, 0.25, 0.9])]
    return _run_check(
        "slerp", fn, cases, _slerp_reference,
        [("you interpolate linearly ((1 − t)·a + t·b)", lambda a, b, t: (1 - t) * a + t * b),
         ("a and b are swapped (t = 0 must give a)", lambda a, b, t: _slerp_reference(b, a, t)),
         ("the angle is taken over the whole batch instead of per example",
          lambda a, b, t: _slerp_reference(a.reshape(1, -1), b.reshape(1, -1), t).reshape(a.shape))],
        "ω = arccos(⟨a, b⟩ / (|a||b|)) per example (flatten all but the batch dimension); "
        "slerp = [sin((1−t)ω)·a + sin(tω)·b] / sin ω.", rtol=1e-5, atol=1e-6, strict=strict)


# ---- 03: the forward process ---------------------------------------------------------------


@_exercise(
    "3.1", "add_noise", "sampling q(x_t | x_0)",
    "Jump straight to any timestep: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, indexing ᾱ by the integer timestep of each "
    "example and broadcasting it over the image.",
    "def add_noise(x0, noise, t, alphas_cumprod):",
    "x_t for a batch: x0 and noise (B, C, H, W), t (B,) integer timesteps in 0..T−1, alphas_cumprod (T,).",
    """
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
    """,
)
def check_add_noise(fn: Callable, strict: bool | None = None) -> CheckResult:

    cases = []
    for i, (name, t) in enumerate([("linear", [0, 999, 500]), ("squaredcos_cap_v2", [1, 250, 998]),
                                   ("linear", [10, 10, 700])]):
        abar = NoiseSchedule(name).alphas_cumprod
        tt = torch.tensor(t)
        cases.append(Case({"x0": _randn(3, 4, 7, 7, seed=i), "noise": _randn(3, 4, 7, 7, seed=i + 9), "t": tt,
                           "alphas_cumprod": abar}, f"{name} schedule, t = {t}"))

    def expand(abar, t):
        return abar[t].reshape(-1, 1, 1, 1)

    return _run_check(
        "add_noise", fn, cases, add_noise,
        [("ᾱ_t is used where √ᾱ_t belongs",
          lambda x0, noise, t, alphas_cumprod: expand(alphas_cumprod, t) * x0
          + (1 - expand(alphas_cumprod, t)) * noise),
         ("the timestep is off by one (ᾱ_{t−1}: alphas_cumprod[t] is already ᾱ of timestep t)",
          lambda x0, noise, t, alphas_cumprod: add_noise(x0, noise, t - 1, alphas_cumprod)),
         ("the timestep is off by one (ᾱ_{t+1})",
          lambda x0, noise, t, alphas_cumprod: add_noise(x0, noise, (t + 1).clamp(max=len(alphas_cumprod) - 1),
                                                         alphas_cumprod)),
         ("x0 and noise swap coefficients",
          lambda x0, noise, t, alphas_cumprod: add_noise(noise, x0, t, alphas_cumprod))],
        "a = alphas_cumprod[t] reshaped to (B, 1, 1, 1); x_t = √a·x0 + √(1−a)·noise.", strict=strict)


@_exercise(
    "3.2", "cosine_alphas_cumprod", "the cosine schedule",
    "Build ᾱ_t of the cosine schedule (Nichol & Dhariwal 2021): f(t) = cos²((t/T + s)/(1 + s)·π/2), ᾱ_t = f(t)/f(0).",
    "def cosine_alphas_cumprod(T, s=0.008):",
    "ᾱ_1 … ᾱ_T of the cosine schedule as a float64 tensor of length T (ᾱ_t = f(t) / f(0)).",
    """
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2
    """,
)
def check_cosine_alphas_cumprod(fn: Callable, strict: bool | None = None) -> CheckResult:

    def ref(T, s=0.008):
        # the library clips every β at 0.999, which changes only ᾱ_T (exactly 0 unclipped): compare the rest
        # against the library and the last against the closed form
        lib = alphas_cumprod(make_betas("squaredcos_cap_v2", T))
        last = math.cos((1 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
        return torch.cat([lib[:-1], torch.tensor([last], dtype=torch.float64)])

    def variant(T, s=0.008, start=1, normalise=True, square=True, s_used=True):
        t = torch.arange(start, start + T, dtype=torch.float64) / T
        ss = s if s_used else 0.0
        f = torch.cos((t + ss) / (1 + ss) * math.pi / 2) ** (2 if square else 1)
        return f / (math.cos(ss / (1 + ss) * math.pi / 2) ** (2 if square else 1) if normalise else 1.0)

    cases = [Case({"T": T}, f"T = {T}") for T in (1000, 50, 7)]
    return _run_check(
        "cosine_alphas_cumprod", fn, cases, ref,
        [("the timesteps start at 0 (ᾱ_0 … ᾱ_{T−1}); the schedule's first entry is ᾱ_1", lambda T, s=0.008:
          variant(T, s, start=0)),
         ("f(t) is not divided by f(0)", lambda T, s=0.008: variant(T, s, normalise=False)),
         ("the cosine is not squared", lambda T, s=0.008: variant(T, s, square=False)),
         ("the offset s is left out", lambda T, s=0.008: variant(T, s, s_used=False))],
        "t runs over 1..T, f(t) = cos²(((t/T) + s) / (1 + s) · π/2), ᾱ_t = f(t) / f(0).", rtol=1e-6, atol=1e-9,
        strict=strict)


# ---- 04: the UNet --------------------------------------------------------------------------


@_exercise(
    "4.1", "timestep_embedding", "the sinusoidal timestep embedding",
    "Turn integer timesteps into a vector the network can use: cosines and sines at geometrically spaced "
    "frequencies f_i = 10000^(−i/half), i = 0 … half − 1.",
    "def timestep_embedding(t, dim):",
    "t: (B,) timesteps; returns (B, dim) = [cos(t·f_0) … cos(t·f_{half−1}), sin(t·f_0) … sin(t·f_{half−1})]\n"
    "    with half = dim // 2 and f_i = 10000^(−i/half) (dim is even here).",
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    """,
)
def check_timestep_embedding(fn: Callable, strict: bool | None = None) -> CheckResult:

    cases = [Case({"t": torch.tensor(t), "dim": d}, f"t = {t}, dim = {d}")
             for t, d in [([0, 1, 500, 999], 64), ([3, 42], 8), ([999], 128)]]

    def swapped(t, dim):
        e = timestep_embedding(t, dim)
        return torch.cat([e[:, dim // 2:], e[:, : dim // 2]], dim=1)

    def over_dim(t, dim):
        freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / dim)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def positive(t, dim):
        freqs = torch.exp(math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    return _run_check(
        "timestep_embedding", fn, cases, timestep_embedding,
        [("sin and cos are in the wrong order (the cosines come first)", swapped),
         ("the exponent divides by dim instead of half = dim // 2", over_dim),
         ("the exponent's sign is flipped (frequencies must shrink: 10000^(−i/half))", positive)],
        "freqs = exp(−ln(10000)·i/half) for i in 0..half−1; args = t[:, None]·freqs; cat([cos, sin]).",
        rtol=1e-4, atol=1e-4, strict=strict)


@_exercise(
    "4.2", "attention", "scaled dot-product attention",
    "Write the core of CrossAttention: each query mixes the values, weighted by a softmax over its similarity "
    "to every key, scaled by 1/√d so the softmax does not saturate.",
    "def attention(q, k, v):",
    "q: (B, heads, L, d), k and v: (B, heads, S, d) → (B, heads, L, d) = softmax(q·kᵀ/√d)·v.",
    """
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v
    """,
)
def check_attention(fn: Callable, strict: bool | None = None) -> CheckResult:
    def ref(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    cases = [Case({"q": 2 * _randn(b, h, lq, d, seed=i), "k": 2 * _randn(b, h, s, d, seed=i + 1),
                   "v": _randn(b, h, s, d, seed=i + 2)}, f"q {(b, h, lq, d)}, k/v {(b, h, s, d)}")
             for i, (b, h, lq, s, d) in enumerate([(2, 4, 49, 4, 16), (1, 2, 16, 16, 8), (3, 1, 5, 7, 32)])]

    def weights_then(q, k, v, scale, dim=-1):
        return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=dim) @ v

    return _run_check(
        "attention", fn, cases, ref,
        [("the 1/√d scaling is missing", lambda q, k, v: weights_then(q, k, v, 1.0)),
         ("the scores are divided by d instead of √d", lambda q, k, v: weights_then(q, k, v, 1 / q.shape[-1])),
         ("the softmax runs over the queries (dim −2) instead of the keys (dim −1)",
          lambda q, k, v: weights_then(q, k, v, 1 / math.sqrt(q.shape[-1]), dim=-2))],
        "scores = q @ kᵀ / √d (d = q.shape[-1]); softmax over the last dimension (the keys); then @ v.",
        rtol=1e-5, atol=1e-6, strict=strict)


# ---- 05: sampling --------------------------------------------------------------------------


@_exercise(
    "5.1", "guided_epsilon", "classifier-free guidance",
    "Combine the conditional and unconditional predictions: w = 0 is unconditional, w = 1 conditional, w > 1 "
    "pushes further along the direction the class adds.",
    "def guided_epsilon(eps_cond, eps_uncond, w):",
    "Classifier-free guidance with scale w (a float) from the two noise predictions (same shape).",
    "return eps_uncond + w * (eps_cond - eps_uncond)",
)
def check_guided_epsilon(fn: Callable, strict: bool | None = None) -> CheckResult:
    cases = [Case({"eps_cond": _randn(4, 4, 7, 7, seed=i), "eps_uncond": _randn(4, 4, 7, 7, seed=i + 3), "w": w},
                  f"w = {w}") for i, w in enumerate([0.0, 1.0, 3.0, 7.5])]
    return _run_check(
        "guided_epsilon", fn, cases,
        lambda eps_cond, eps_uncond, w: eps_uncond + w * (eps_cond - eps_uncond),
        [("the difference points the wrong way (uncond − cond)",
          lambda eps_cond, eps_uncond, w: eps_uncond + w * (eps_uncond - eps_cond)),
         ("the guided difference starts from ε_cond instead of ε_uncond (that is guidance w + 1)",
          lambda eps_cond, eps_uncond, w: eps_cond + w * (eps_cond - eps_uncond)),
         ("ε_uncond is not subtracted inside the bracket",
          lambda eps_cond, eps_uncond, w: eps_uncond + w * eps_cond)],
        "ε = ε_uncond + w·(ε_cond − ε_uncond): w = 0 gives ε_uncond, w = 1 gives ε_cond.", strict=strict)


def _ddim_reference(eps, x_t, alpha_bar_t, alpha_bar_prev):
    x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev) * eps


@_exercise(
    "5.2", "ddim_step", "one deterministic DDIM step",
    "Go from x_t to x_prev (η = 0): estimate x̂_0 from the predicted noise, then re-noise it to the previous "
    "noise level along the same ε.",
    "def ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev):",
    "One DDIM step with η = 0: eps and x_t are tensors, alpha_bar_t and alpha_bar_prev floats (ᾱ now, ᾱ next).",
    """
    x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev) * eps
    """,
)
def check_ddim_step(fn: Callable, strict: bool | None = None) -> CheckResult:

    # the closed form below is the library's DDIMSampler.step at η = 0 (tests/test_exercises.py checks that)
    sch = NoiseSchedule("linear")
    sampler = DDIMSampler(sch, "epsilon", "trailing")
    sampler.set_timesteps(20)
    ts = [int(t) for t in sampler.timesteps]
    abar = sch.alphas_cumprod
    cases = []
    for i, j in enumerate([0, 10, 19]):  # first step, a middle one, the last (to ᾱ_prev = 1)
        t = ts[j]
        prev = float(abar[ts[j + 1]]) if j + 1 < len(ts) else 1.0
        cases.append(Case({"eps": _randn(2, 4, 7, 7, seed=i), "x_t": _randn(2, 4, 7, 7, seed=i + 4),
                           "alpha_bar_t": float(abar[t]), "alpha_bar_prev": prev},
                          f"t = {t}, ᾱ_t = {float(abar[t]):.4g}, ᾱ_prev = {prev:.4g}"))

    return _run_check(
        "ddim_step", fn, cases, _ddim_reference,
        [("ᾱ_t and ᾱ_prev are swapped", lambda eps, x_t, alpha_bar_t, alpha_bar_prev:
          _ddim_reference(eps, x_t, alpha_bar_prev, alpha_bar_t) if alpha_bar_t < 1 else None),
         ("the direction term uses (1 − ᾱ_prev) without the square root",
          lambda eps, x_t, alpha_bar_t, alpha_bar_prev: math.sqrt(alpha_bar_prev)
          * (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t) + (1 - alpha_bar_prev) * eps),
         ("x̂_0 subtracts ε without √(1 − ᾱ_t)",
          lambda eps, x_t, alpha_bar_t, alpha_bar_prev: math.sqrt(alpha_bar_prev)
          * (x_t - eps) / math.sqrt(alpha_bar_t) + math.sqrt(1 - alpha_bar_prev) * eps),
         ("x_t is re-scaled instead of x̂_0",
          lambda eps, x_t, alpha_bar_t, alpha_bar_prev: math.sqrt(alpha_bar_prev) * x_t
          + math.sqrt(1 - alpha_bar_prev) * eps)],
        "x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t, then x_prev = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev)·ε.", strict=strict)


# ---- 06: evaluation ------------------------------------------------------------------------


@_exercise(
    "6.1", "fid_from_features", "FID from two feature sets",
    "Fit a Gaussian to each feature set and compute the Fréchet distance ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½).",
    "def fid_from_features(feats_a, feats_b):",
    "feats_a (N, d), feats_b (M, d) numpy arrays → the Fréchet distance of their Gaussian fits (a float).\n"
    "    Use unbiased covariances (np.cov) and scipy.linalg.sqrtm for the matrix square root.",
    """
    from scipy import linalg

    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
    """,
)
def check_fid_from_features(fn: Callable, strict: bool | None = None) -> CheckResult:
    rng = np.random.default_rng(0)
    cases = []
    for i, (n, m, d) in enumerate([(40, 60, 6), (300, 200, 12), (25, 25, 4)]):
        mix = rng.normal(size=(d, d))
        a = rng.normal(size=(n, d)) @ mix
        b = rng.normal(size=(m, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.5 * (i + 1)
        cases.append(Case({"feats_a": a, "feats_b": b}, f"N = {n}, M = {m}, d = {d}"))

    def parts(a, b, ddof=1):
        return (a.mean(0), b.mean(0), np.cov(a, rowvar=False, ddof=ddof), np.cov(b, rowvar=False, ddof=ddof))

    def biased(feats_a, feats_b):
        mu_a, mu_b, ca, cb = parts(feats_a, feats_b, ddof=0)
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real))

    def no_two(feats_a, feats_b):
        mu_a, mu_b, ca, cb = parts(feats_a, feats_b)
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - linalg.sqrtm(ca @ cb).real))

    def norm_not_squared(feats_a, feats_b):
        mu_a, mu_b, ca, cb = parts(feats_a, feats_b)
        return float(np.linalg.norm(mu_a - mu_b) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real))

    def no_sqrt(feats_a, feats_b):
        mu_a, mu_b, ca, cb = parts(feats_a, feats_b)
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * ca @ cb))

    return _run_check(
        "fid_from_features", fn, cases, lambda feats_a, feats_b: fid(feats_a, feats_b),
        [("the covariances are biased (divide by N − 1: np.cov's default, not np.var-style N)", biased),
         ("the factor 2 before the matrix square root is missing", no_two),
         ("the mean difference enters as a norm, not a squared norm", norm_not_squared),
         ("the matrix square root of Σ₁Σ₂ is missing", no_sqrt)],
        "μ = feats.mean(0), Σ = np.cov(feats, rowvar=False); ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2·sqrtm(Σ_a Σ_b)).",
        rtol=1e-5, atol=1e-7, strict=strict)


@_exercise(
    "6.2", "conditional_accuracy", "conditional accuracy, overall and per class",
    "Score class-conditioned samples with a classifier: the fraction recognised as the class that was asked "
    "for, overall and for each requested class.",
    "def conditional_accuracy(predicted, wanted, num_classes=10):",
    "predicted, wanted: (N,) integer class tensors. Returns (overall accuracy, list of num_classes per-class\n"
    "    accuracies, where class k's is over the samples that *asked for* k; NaN for a class never asked for).",
    """
    correct = (predicted == wanted).double()
    per_class = [correct[wanted == k].mean().item() if (wanted == k).any() else float("nan")
                 for k in range(num_classes)]
    return correct.mean().item(), per_class
    """,
)
def check_conditional_accuracy(fn: Callable, strict: bool | None = None) -> CheckResult:
    def ref(predicted, wanted, num_classes=10):
        correct = (predicted == wanted).double()
        per = [correct[wanted == k].mean().item() if (wanted == k).any() else float("nan")
               for k in range(num_classes)]
        return correct.mean().item(), per

    def per_predicted(predicted, wanted, num_classes=10):
        correct = (predicted == wanted).double()
        per = [correct[predicted == k].mean().item() if (predicted == k).any() else float("nan")
               for k in range(num_classes)]
        return correct.mean().item(), per

    def macro(predicted, wanted, num_classes=10):
        overall, per = ref(predicted, wanted, num_classes)
        return float(np.nanmean(per)), per

    cases = []
    for i, n in enumerate([200, 57, 1000]):
        g = _gen(i)
        wanted = torch.randint(0, 10, (n,), generator=g)
        wanted[wanted == 9] = 8 if i == 1 else 9  # case 2: class 9 never asked for
        noise = torch.randint(0, 10, (n,), generator=g)
        keep = torch.rand(n, generator=g) < torch.linspace(0.3, 0.95, 10)[wanted]
        cases.append(Case({"predicted": torch.where(keep, wanted, noise), "wanted": wanted},
                          f"N = {n}{', class 9 never requested' if i == 1 else ''}"))

    def normalised(f):
        # (overall, per-class) as plain numbers, NaN (a class never asked for) as −1 so that NaN matches NaN
        def g(**kw):
            out = f(**kw)
            if not (isinstance(out, tuple | list) and len(out) == 2):
                return out
            per = np.nan_to_num(_as_array(out[1]), nan=-1.0)
            return float(out[0]), per
        return g

    return _run_check(
        "conditional_accuracy", normalised(fn), cases, normalised(ref),
        [("class k's accuracy is taken over the samples *predicted* as k (that is precision, not the accuracy "
          "of what was asked for)", normalised(per_predicted)),
         ("the overall accuracy is the mean of the per-class ones; with unequal class counts it must be the "
          "fraction of all samples", normalised(macro))],
        "overall = (predicted == wanted).mean(); class k: the same over the samples with wanted == k.",
        strict=strict)


def checks() -> dict[str, Callable[..., CheckResult]]:
    """``{function name: check}`` for every exercise."""
    return {key: ex.check for key, ex in EXERCISES.items()}
