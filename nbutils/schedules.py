"""Noise schedules: how much noise the forward process adds at each of the T steps.

A schedule is a sequence β_1 … β_T. With α_t = 1 − β_t and ᾱ_t = α_1·α_2·…·α_t, the forward
process jumps straight from clean data to step t (Ho et al. 2020, eq. 4):

    q(x_t | x_0) = N( √ᾱ_t · x_0,  (1 − ᾱ_t) · I ),   SNR(t) = ᾱ_t / (1 − ᾱ_t).

Names and meanings follow Hugging Face ``diffusers`` (``beta_schedule``):

* ``linear`` — β rises linearly from ``beta_start`` to ``beta_end`` (DDPM: 1e-4 → 0.02, T = 1000);
* ``scaled_linear`` — √β rises linearly (Stable Diffusion's schedule), i.e. β is a parabola;
* ``squaredcos_cap_v2`` — the cosine schedule of Nichol & Dhariwal (2021):
  ᾱ(t) = cos²(((t/T) + s)/(1 + s) · π/2) with s = 0.008, β_t = 1 − ᾱ(t)/ᾱ(t−1) capped at 0.999.

Everything is computed in float64 (ᾱ of the linear schedule reaches 4e-5 at t = T; float32 products
lose digits there) and returned as tensors; index 0 is the first noising step (t = 1 in the paper).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """ᾱ of the cosine schedule at continuous time t ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def make_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """β_1 … β_T as a float64 tensor of length ``num_train_timesteps``."""
    T = int(num_train_timesteps)
    if T < 1:
        raise ValueError(f"num_train_timesteps must be ≥ 1, got {T}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        t = torch.arange(T + 1, dtype=torch.float64) / T
        abar = cosine_alpha_bar(t)
        return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(SCHEDULES)}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = Π_{s ≤ t} (1 − β_s), float64."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ / (1 − ᾱ) of q(x_t | x_0)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log SNR = log ᾱ − log(1 − ᾱ), computed stably."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


class NoiseSchedule:
    """A beta schedule with its derived quantities, all float64, indexable by integer timesteps.

    ``t`` runs from 0 to T − 1 (diffusers' convention); ``alphas_cumprod[t]`` is ᾱ after t + 1 steps.
    """

    def __init__(self, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod(self.betas)

    @classmethod
    def from_config(cls, cfg) -> NoiseSchedule:
        """From a :class:`~nbutils.config.DiffusionConfig`."""
        return cls(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)

    def snr(self) -> torch.Tensor:
        return snr(self.alphas_cumprod)

    def log_snr(self) -> torch.Tensor:
        return log_snr(self.alphas_cumprod)

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        a = self.alphas_cumprod
        return (f"NoiseSchedule({self.beta_schedule!r}, T={len(self)}, ᾱ_first={a[0].item():.6f}, "
                f"ᾱ_last={a[-1].item():.3e})")
