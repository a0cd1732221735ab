"""The shipped models as a Hugging Face diffusers pipeline, sampled by diffusers' own schedulers.

``to_diffusers(pipe)`` wraps an :class:`nbutils.pipeline.Pipeline` (the VAE, the UNet, the noise schedule and the
sampling recipe) into :class:`FashionLatentDiffusionPipeline`, a ``diffusers.DiffusionPipeline`` whose scheduler
is diffusers' ``DPMSolverMultistepScheduler`` (``dpm``) or ``DDIMScheduler`` (``ddim``), built from the UNet's
betas and prediction type and stepped through the recipe's timesteps (diffusers' custom-timesteps convention).
Classifier-free guidance with the recipe's interval happens in the pipeline's loop, as in
``nbutils.pipeline.sample``; with the same generator the two give the same images (tests/test_hf_pipeline.py
states the tolerance).

Needs the optional ``diffusers`` extra (``pip install -e '.[diffusers]'``)::

    from nbutils.pipeline import load_pipeline
    from nbutils.hf_pipeline import to_diffusers

    hf = to_diffusers(load_pipeline("checkpoints"))
    images = hf(class_labels=[7] * 8, generator=torch.Generator().manual_seed(0)).images   # (8, 1, 28, 28) in [0, 1]
"""

from __future__ import annotations

import inspect

import torch

from .pipeline import Pipeline, SamplingRecipe, recipe_timesteps

try:
    from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, ImagePipelineOutput
except ImportError:  # the optional `diffusers` extra is not installed
    DiffusionPipeline = None

#: The samplers that have a diffusers scheduler with the same update rule (tests/test_samplers.py).
DIFFUSERS_SAMPLERS = ("ddim", "dpm")


def make_scheduler(pipe: Pipeline, sampler: str):
    """Diffusers' scheduler for ``sampler`` (``ddim``: η = 0; ``dpm``: DPM-Solver++(2M) ending at σ = 0), on the
    UNet's own betas and prediction type."""
    if DiffusionPipeline is None:
        raise ImportError("the diffusers pipeline needs the optional extra: pip install -e '.[diffusers]'")
    schedule = pipe.schedule
    common = dict(num_train_timesteps=schedule.num_train_timesteps, trained_betas=schedule.betas.tolist(),
                  prediction_type=pipe.diffusion.prediction_type)
    if sampler == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True, clip_sample=False, timestep_spacing="trailing")
    if sampler == "dpm":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero", timestep_spacing="trailing")
    raise ValueError(f"no diffusers scheduler for sampler {sampler!r}; valid: {', '.join(DIFFUSERS_SAMPLERS)}")


def set_timesteps(scheduler, timesteps: list[int] | int, device=None) -> None:
    """``scheduler.set_timesteps`` with a list of timesteps where the scheduler takes one (DPM-Solver++), else the
    number of steps, checked to give the same list (DDIM spaces its steps evenly: "trailing" recipes only)."""
    if isinstance(timesteps, int):
        scheduler.set_timesteps(timesteps, device=device)
        return
    wanted = [int(t) for t in timesteps]
    if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(timesteps=wanted, device=device)
    else:
        scheduler.set_timesteps(len(wanted), device=device)
        if scheduler.timesteps.tolist() != wanted:
            raise ValueError(f"{type(scheduler).__name__} cannot step through {wanted} (it spaces "
                             f"{len(wanted)} steps as {scheduler.timesteps.tolist()}); use a 'trailing' recipe")


if DiffusionPipeline is not None:

    class FashionLatentDiffusionPipeline(DiffusionPipeline):
        """Class-conditional latent diffusion: noise → UNet + scheduler (guided) → VAE decoder → images."""

        def __init__(self, vae, unet, scheduler, recipe: SamplingRecipe | None = None,
                      timesteps: list[int] | None = None):
            super().__init__()
            self.register_modules(vae=vae, unet=unet, scheduler=scheduler)
            self.recipe = recipe or SamplingRecipe()
            self.default_timesteps = timesteps  # the recipe's (None: the scheduler spaces recipe.steps itself)

        @torch.no_grad()
        def __call__(self, class_labels, timesteps: list[int] | None = None, guidance_scale: float | None = None,
                     guidance_interval: tuple[int, int] | None = None,
                     generator: torch.Generator | None = None) -> ImagePipelineOutput:
            """Images (N, C, H, W) in [0, 1] for ``class_labels`` (N class indices). ``timesteps``, the guidance
            scale and its interval default to the recipe's; noise is drawn as ``nbutils.pipeline.sample`` does."""
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            null = self.unet.null_label
            if len(labels) == 0 or int(labels.min()) < 0 or int(labels.max()) >= null:
                raise ValueError(f"class_labels must be N ≥ 1 class indices in 0..{null - 1}")
            recipe = self.recipe
            w = recipe.guidance if guidance_scale is None else float(guidance_scale)
            lo, hi = (guidance_interval or recipe.guidance_interval or (0, self.scheduler.config.num_train_timesteps))
            device = next(self.unet.parameters()).device
            timesteps = timesteps if timesteps is not None else self.default_timesteps
            set_timesteps(self.scheduler, timesteps if timesteps is not None else recipe.steps, device)
            shape = (len(labels), *self.vae.latent_shape)
            x = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(device)
            cond, uncond = labels.to(device), torch.full_like(labels, null).to(device)
            for t in self.progress_bar(self.scheduler.timesteps):
                tt = torch.full((len(labels),), int(t), dtype=torch.long, device=device)
                scale = w if lo <= int(t) <= hi else 1.0
                if scale == 1.0:
                    out = self.unet(x, tt, cond)
                else:
                    both = self.unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, uncond]))
                    out = both[len(x):] + scale * (both[: len(x)] - both[len(x):])
                x = self.scheduler.step(out, t, x).prev_sample
            images = ((self.vae.decode(x) + 1) / 2).clamp(0, 1).cpu()
            return ImagePipelineOutput(images=images)


def to_diffusers(pipe: Pipeline, recipe: SamplingRecipe | None = None):
    """``pipe`` as a :class:`FashionLatentDiffusionPipeline` with ``recipe`` (default: the pipeline's own; its
    sampler must be ``ddim`` (η = 0) or ``dpm``), its scheduler stepping through the recipe's timesteps."""
    recipe = recipe or pipe.recipe
    if recipe.sampler not in DIFFUSERS_SAMPLERS or recipe.eta:
        raise ValueError(f"diffusers runs the deterministic samplers {', '.join(DIFFUSERS_SAMPLERS)}, "
                         f"not {recipe.sampler!r} (eta {recipe.eta})")
    timesteps = recipe_timesteps(pipe, recipe)
    scheduler = make_scheduler(pipe, recipe.sampler)
    set_timesteps(scheduler, timesteps)  # refuses, here and now, timesteps the scheduler cannot step through
    hf = FashionLatentDiffusionPipeline(pipe.vae, pipe.unet, scheduler, recipe, timesteps)
    hf.set_progress_bar_config(disable=True)
    return hf
