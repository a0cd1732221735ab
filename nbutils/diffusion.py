"""The forward process and the training objective of a DDPM (Ho et al. 2020) on VAE latents.

Forward process, one jump from clean latents x_0 to noise level t (``add_noise``, diffusers' name):

    x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,   ε ~ N(0, I).

The network sees (x_t, t, class) and predicts one of two equivalent targets (``prediction_type``):

* ``epsilon`` — the noise ε (DDPM; the reference design);
* ``v_prediction`` — the velocity v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0 (Salimans & Ho 2022), better behaved
  at high noise levels.

Any one of x_0, ε, v determines the others given x_t; :func:`to_x0` and :func:`to_epsilon` convert
(the samplers use them). Loss: mean squared error on the target, optionally weighted per timestep by
min-SNR-γ (Hang et al. 2023): weight = min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, which stops
the many easy low-noise steps from dominating the gradient.

Classifier-free guidance (Ho & Salimans 2022) needs one network that knows both p(x | class) and p(x):
during training the class is replaced by the *null* class (index ``num_classes``) with probability
``cond_drop_prob``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiffusionConfig
from .schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _expand(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` as ``like``'s dtype/device, shaped (B, 1, 1, 1) to broadcast over a batch."""
    out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0): √ᾱ_t·x_0 + √(1−ᾱ_t)·noise, for integer timesteps ``t`` (one per example)."""
    a = _expand(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0."""
    a = _expand(alphas_cumprod, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def to_x0(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
          prediction_type: str = "epsilon") -> torch.Tensor:
    """The clean-latent estimate x̂_0 implied by a model output."""
    a = _expand(alphas_cumprod, t, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def to_epsilon(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """The noise estimate ε̂ implied by a model output."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        a = _expand(alphas_cumprod, t, x_t)
        return (1 - a).sqrt() * x_t + a.sqrt() * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-example loss weights of min-SNR-γ (Hang et al. 2023) for the given prediction type."""
    s = (alphas_cumprod / (1 - alphas_cumprod)).to(t.device)[t.long()]  # indexed where t is: no host round trip
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return (clipped / s).float()
    if prediction_type == "v_prediction":
        return (clipped / (s + 1)).float()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``p`` (classifier-free guidance training)."""
    if p <= 0:
        return labels
    u = torch.rand(labels.shape, generator=generator, device=labels.device)
    return torch.where(u < p, torch.full_like(labels, null_label), labels)


class GaussianDiffusion:
    """The DDPM training side: a schedule, a prediction type and the loss of one batch."""

    def __init__(self, cfg: DiffusionConfig, num_classes: int = 10):
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {cfg.prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        if not 0 <= cfg.cond_drop_prob <= 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cfg.cond_drop_prob}")
        self.cfg = cfg
        self.schedule = NoiseSchedule.from_config(cfg)
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.num_classes = num_classes
        self.null_label = num_classes

    def to(self, device: str | torch.device) -> GaussianDiffusion:
        """Keep ᾱ on ``device`` (the training device): then each loss indexes it there instead of copying it from
        the host, which on a GPU would wait for all queued work at every step. Returns self."""
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def draw(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random part of one training loss: timesteps t, noise, and the labels after dropout to null."""
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        labels = drop_labels(labels, self.cfg.cond_drop_prob, self.null_label, generator)
        return t, noise, labels

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator | None = None,
             draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training loss: random t, random noise, labels dropped to null with ``cond_drop_prob``. Returns
        ``(loss, parts)``, the parts (loss, mse) as detached 0-d tensors (reading them waits for a GPU's step).

        ``draws`` = ``(t, noise, labels)`` from :meth:`draw` replaces the random draw (several training
        processes draw for the global batch and each keeps its share; ``nbutils.distributed``)."""
        t, noise, labels = draws if draws is not None else self.draw(x0, labels, generator)
        x_t = self.add_noise(x0, noise, t)
        target = training_target(x0, noise, t, self.alphas_cumprod, self.cfg.prediction_type)
        pred = model(x_t, t, labels)
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        mse = per_example.mean()
        if self.cfg.min_snr_gamma:
            w = min_snr_weights(t, self.alphas_cumprod, self.cfg.min_snr_gamma, self.cfg.prediction_type)
            loss = (w * per_example).mean()
        else:
            loss = mse
        return loss, {"loss": loss.detach(), "mse": mse.detach()}
