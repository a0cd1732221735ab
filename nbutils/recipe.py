"""How to sample a trained model: :class:`SamplingRecipe` (sampler, steps, timestep spacing, guidance scale and
interval, precision), validated once on construction. A released UNet carries its recipe in its checkpoint metadata
(:func:`nbutils.pipeline.load_pipeline` reads it); :data:`SHIPPED_RECIPE` is the one ``checkpoints/`` was released
with.

Guidance in a limited interval of timesteps (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models") is the ``guidance_interval`` field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .samplers import SAMPLERS, SPACINGS

PRECISIONS = ("fp32", "bf16", "auto")


#: Far beyond any useful scale (the course sweeps up to 8); larger ones only overflow into black images.
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class SamplingRecipe:
    """How to sample: validated on construction, stored with a released UNet.

    ``steps`` None = the sampler's default (every timestep for ``ddpm``, 50 for ``ddim`` and ``dpm-sde``, 20 for
    ``dpm``); ``timestep_spacing`` None = the sampler's default. ``guidance_interval=(lo, hi)`` guides only at
    lo ≤ t ≤ hi. ``guided_steps`` (with an interval starting at 0) puts that many of the ``steps`` inside the
    interval and the rest above it, instead of spacing all evenly (:func:`nbutils.samplers.split_timesteps`).
    ``timesteps`` lists the timesteps to visit, noisiest first, instead of spacing ``steps`` of them (as diffusers'
    ``set_timesteps(timesteps=…)``; hand-placed schedules such as Sabour et al. 2024's "Align Your Steps" are
    such lists). ``eta`` is DDIM's η. ``precision="bf16"`` runs the UNet under bfloat16 autocast (the sampler's
    arithmetic and the VAE stay float32); ``auto`` = bf16 where the device has it natively, else fp32.
    """

    sampler: str = "dpm"
    steps: int | None = None
    timestep_spacing: str | None = None
    guidance: float = 3.0
    guidance_interval: tuple[int, int] | None = None
    guided_steps: int | None = None
    eta: float = 0.0
    precision: str = "fp32"
    timesteps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a whole number ≥ 1, got {self.steps!r}")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; valid: {', '.join(SPACINGS)}")
        if not math.isfinite(self.guidance) or not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ValueError(f"guidance must be a finite number from 0 to {MAX_GUIDANCE:g}, got {self.guidance}")
        if not math.isfinite(self.eta) or not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be a finite number from 0 (deterministic) to 1 (DDPM's noise), got {self.eta}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.guidance_interval is not None:
            interval = tuple(self.guidance_interval)
            if len(interval) != 2 or not all(isinstance(v, int) for v in interval) \
                    or not 0 <= interval[0] <= interval[1]:
                raise ValueError(f"guidance_interval must be (lo, hi), timestep numbers with 0 ≤ lo ≤ hi, got "
                                 f"{self.guidance_interval!r}")
            object.__setattr__(self, "guidance_interval", interval)
        if self.timesteps is not None:
            ts = tuple(self.timesteps)
            if not ts or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ts) \
                    or any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
                raise ValueError(f"timesteps must be whole numbers ≥ 0, strictly decreasing, got {self.timesteps!r}")
            if self.steps is not None and self.steps != len(ts):
                raise ValueError(f"steps ({self.steps}) and the {len(ts)} timesteps disagree (leave steps unset)")
            if self.guided_steps is not None or self.timestep_spacing is not None:
                raise ValueError("timesteps replace steps' spacing: leave guided_steps and timestep_spacing unset")
            object.__setattr__(self, "timesteps", ts)
        if self.guided_steps is not None:
            if self.guidance_interval is None or self.guidance_interval[0] != 0:
                raise ValueError("guided_steps needs guidance_interval=(0, hi): the guided part ends the schedule")
            if self.steps is None:
                raise ValueError("guided_steps needs steps (the total, e.g. steps=16, guided_steps=12)")
            if not 1 <= self.guided_steps < self.steps:
                raise ValueError(f"guided_steps must be at least 1 and less than steps ({self.steps}), got "
                                 f"{self.guided_steps}")
            if self.timestep_spacing not in (None, "trailing", "logsnr"):
                raise ValueError("with guided_steps, timestep_spacing spaces the guided part: trailing or logsnr, "
                                 f"got {self.timestep_spacing!r}")

    def replace(self, **changes: Any) -> SamplingRecipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("guidance_interval", "timesteps"):
            if d[key] is not None:
                d[key] = list(d[key])
        if d["timesteps"] is None:  # recipes stored before the field existed read the same
            del d["timesteps"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingRecipe:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        if not isinstance(d, dict):
            raise ValueError(f"a sampling recipe must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling recipe fields: {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("guidance_interval", "timesteps"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


#: The recipe ``checkpoints/`` was released with (stored in its UNet's metadata too): DPM-Solver++ on the 20
#: timesteps spaced evenly in log-SNR less three of the five below t = 30 (17 steps), classifier-free guidance w = 3
#: on 30 ≤ t ≤ 600 only (6 of the 17 steps on the cosine schedule). Chosen by measurement for those weights on the
#: validation reference: docs/sampling.md says how, docs/results.md what.
SHIPPED_TIMESTEPS = (995, 992, 987, 979, 965, 942, 902, 836, 731, 584, 415, 266, 159, 91, 51, 13, 0)
SHIPPED_RECIPE = SamplingRecipe(sampler="dpm", timesteps=SHIPPED_TIMESTEPS, guidance=3.0, guidance_interval=(30, 600))
