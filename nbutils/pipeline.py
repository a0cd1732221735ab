"""The generator as one object: VAE + UNet + noise schedule + the recipe they are sampled with.

* :class:`~nbutils.recipe.SamplingRecipe` (in :mod:`nbutils.recipe`, importable from here too) — everything
  that turns a trained UNet into pictures; a released UNet carries its recipe in its checkpoint metadata.
* :func:`load_pipeline` — a UNet checkpoint (file or folder) and the VAE beside it, checked to be the
  VAE the UNet was trained with (SHA-256), as a :class:`Pipeline`.
* :func:`guided_output` — classifier-free guidance (Ho & Salimans 2022):
  out = out_uncond + w·(out_cond − out_uncond), both halves in one batched forward pass.
* :func:`sample` — noise → latents (any sampler of :mod:`nbutils.samplers`) → images.

Guidance in a limited interval of timesteps (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality in Diffusion Models"): the class is fixed at high noise,
while guidance at low noise mostly strips detail diversity; outside the interval the plain conditional
model runs (w = 1, one forward pass instead of two).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .card import write_folder
from .checkpoints import (
    UNET_FILE,
    VAE_FILE,
    CheckpointError,
    HubFolderMixin,
    config_differences,
    encode_model,
    file_digest,
    load_model,
    resolve_checkpoint,
)
from .config import Config, DiffusionConfig, bf16_supported, pick_device
from .data import class_labels, dataset_spec
from .data import class_names as dataset_class_names
from .diffusion import to_x0
from .recipe import PRECISIONS as PRECISIONS
from .recipe import SHIPPED_RECIPE as SHIPPED_RECIPE
from .recipe import SamplingRecipe
from .samplers import make_sampler, split_timesteps, top_timestep
from .schedules import NoiseSchedule
from .unet import UNet
from .vae import VAE

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_vae(checkpoint: str | Path | None = None, device: str | torch.device | None = None,
             expected: Config | None = None) -> tuple[VAE, dict[str, Any]]:
    """``(vae, metadata)`` from a checkpoint file or folder (default: latest run, else shipped).

    ``metadata["extra"]["latent_stats"]`` says whether the latent shift/scale are set (a finished run).
    With ``expected``, a checkpoint whose VAE config differs is an error naming the fields.
    """
    vae, meta = load_model(resolve_checkpoint(VAE_FILE, checkpoint), "vae", VAE)
    if expected is not None:
        def arch(d: dict) -> dict:  # kl_weight only matters in training
            return {k: v for k, v in d.items() if k != "kl_weight"}

        diffs = config_differences(arch(meta["config"]["vae"]), arch(expected.to_dict()["vae"]), "vae.")
        if diffs:
            raise CheckpointError(f"{meta['path']} was trained with a different VAE config: " + "; ".join(diffs))
    return vae.to(pick_device(device)).eval(), meta


def load_unet(checkpoint: str | Path | None = None, device: str | torch.device | None = None
              ) -> tuple[UNet, dict[str, Any]]:
    """``(unet, metadata)`` from a checkpoint file or folder (default: latest run, else shipped)."""
    unet, meta = load_model(resolve_checkpoint(UNET_FILE, checkpoint), "unet", UNet)
    return unet.to(pick_device(device)).eval(), meta


@dataclass
class Pipeline(HubFolderMixin, library_name="nbutils", license="mit",
               tags=["diffusion", "latent-diffusion", "class-conditional", "classifier-free-guidance"]):
    """A trained generator: the VAE, the UNet, the diffusion process the UNet learned, and its recipe.

    ``save_pretrained(folder)``, ``from_pretrained(folder_or_hub_id)`` and ``push_to_hub(repo_id)`` (Hugging
    Face's ``ModelHubMixin``) write and read a Hub-format folder (:mod:`nbutils.card`): both weights files with
    their digests, ``config.json`` and a generated model card; ``from_pretrained`` is :func:`load_pipeline`."""

    vae: Any  # a VAE, or anything with ``latent_shape`` and ``decode`` (tests use an identity)
    unet: Any  # a UNet, or anything called as ``unet(x, t, labels)`` with a ``null_label``
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    recipe: SamplingRecipe = field(default_factory=SamplingRecipe)
    class_names: tuple[str, ...] = dataset_spec("fashion_mnist").class_names
    meta: dict[str, Any] = field(default_factory=dict)  # the UNet checkpoint's metadata, when loaded from one
    vae_meta: dict[str, Any] = field(default_factory=dict)  # the VAE checkpoint's metadata, likewise

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.diffusion)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _save_pretrained(self, save_directory: Path) -> None:
        if not isinstance(self.vae, VAE) or not isinstance(self.unet, UNet):
            raise TypeError("save_pretrained writes a VAE and a UNet of nbutils; this pipeline holds "
                            f"{type(self.vae).__name__} and {type(self.unet).__name__}")
        unet_cfg = Config.from_dict(self.meta["config"]) if self.meta.get("config") else Config(preset="in memory")
        unet_cfg = unet_cfg.replace(vae=self.vae.cfg, unet=self.unet.cfg, diffusion=self.diffusion)
        vae_cfg = Config.from_dict(self.vae_meta["config"]) if self.vae_meta.get("config") else unet_cfg
        files = {}
        in_memory = ("stored_dtype", "vae_digest", "vae_record_before_export")  # (float32 weights, new records)
        vae_extra = {k: v for k, v in self.vae_meta.get("extra", {}).items() if k not in in_memory}
        files[VAE_FILE], files["vae.json"] = encode_model("vae", self.vae.state_dict(), vae_cfg.replace(
            vae=self.vae.cfg), vae_extra)
        extra = dict(self.meta.get("extra", {}), sampling_recipe=self.recipe.to_dict())
        extra = {k: v for k, v in extra.items() if k not in in_memory}
        extra["vae_tensor_digest"] = json.loads(files["vae.json"])["tensor_digest"]  # the VAE saved beside it
        files[UNET_FILE], files["unet.json"] = encode_model("unet", self.unet.state_dict(), unet_cfg, extra)
        write_folder(save_directory, files, self.recipe.to_dict())

    @classmethod
    def _from_pretrained(cls, *, model_id: str, device: str | torch.device | None = None,
                         allow_unverified_vae: bool = False, **_options: Any) -> Pipeline:
        return load_pipeline(model_id, device, allow_unverified_vae)


def vae_identity(vae_meta: dict[str, Any]) -> dict[str, str]:
    """What a UNet records about the VAE whose latents it learned: the digest of its weights' content."""
    return {"vae_tensor_digest": vae_meta["tensor_digest"]}


def check_vae(unet_extra: dict[str, Any], vae_meta: dict[str, Any], what: str, allow_unverified: bool = False) -> None:
    """An error unless ``vae_meta`` is the VAE the UNet (``unet_extra``, its metadata's extra) was trained with.

    UNets record the SHA-256 of the VAE's tensors (``vae_tensor_digest``; older ones the first 12 hex digits of the
    VAE file's SHA-256, ``vae_digest``). A UNet that records neither is refused unless ``allow_unverified``."""
    vae_path = vae_meta["path"]
    if unet_extra.get("vae_tensor_digest") is not None:
        same = unet_extra["vae_tensor_digest"] == vae_meta.get("tensor_digest")
    elif unet_extra.get("vae_digest") is not None:
        same = unet_extra["vae_digest"] == file_digest(vae_path)
    elif allow_unverified:
        return
    else:
        raise CheckpointError(f"{what} does not record which VAE it was trained with, so {vae_path} cannot be "
                              "checked; pass allow_unverified_vae=True (CLI: --allow-unverified-vae) to use it anyway")
    if not same:
        raise CheckpointError(f"{vae_path} is not the VAE {what} was trained with (its weights' SHA-256 differs)")


def load_pipeline(checkpoint: str | Path | None = None, device: str | torch.device | None = None,
                  allow_unverified_vae: bool = False) -> Pipeline:
    """The UNet of ``checkpoint`` (a run folder or ``unet.safetensors``; default: latest run, else shipped) and
    the ``vae.safetensors`` beside it, which must be the VAE it was trained with (:func:`check_vae`)."""
    unet, meta = load_unet(checkpoint, device=device)
    vae_path = Path(meta["path"]).parent / VAE_FILE
    if not vae_path.is_file():
        raise CheckpointError(f"no {VAE_FILE} beside {meta['path']}: the UNet needs the VAE it was trained with")
    vae, vae_meta = load_vae(vae_path, device=device)
    check_vae(meta["extra"], vae_meta, meta["path"], allow_unverified_vae)
    cfg = Config.from_dict(meta["config"])
    stored = meta["extra"].get("sampling_recipe")
    try:
        recipe = SamplingRecipe.from_dict(stored) if stored is not None else SamplingRecipe()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta['path']} carries an invalid sampling recipe: {exc}") from exc
    return Pipeline(inference_layout(vae), inference_layout(unet), cfg.diffusion, recipe,
                    dataset_class_names(cfg.data), meta, vae_meta)


def inference_layout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its 4-D weights stored channels-last (NHWC) when it runs on the CPU, in place.

    oneDNN, PyTorch's CPU convolution library, computes NHWC convolutions without reordering its inputs and
    outputs; a convolution with NHWC weights returns NHWC activations, so the layout carries through the
    network. The results equal the default layout's up to float rounding (tested); the gain is in
    docs/results.md. Saved weights are unaffected (they are written contiguous)."""
    if next(model.parameters()).device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def load_models(checkpoint: str | Path | None = None, device: str | torch.device | None = None,
                allow_unverified_vae: bool = False):
    """``(unet, vae, unet_metadata)`` of :func:`load_pipeline` (for code that wants the parts)."""
    pipe = load_pipeline(checkpoint, device, allow_unverified_vae)
    return pipe.unet, pipe.vae, pipe.meta


# --------------------------------------------------------------------------------------------
# Guidance and sampling
# --------------------------------------------------------------------------------------------


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


def _labels(classes, n: int, pipe: Pipeline) -> torch.Tensor:
    if classes is None:
        return torch.full((n,), -1, dtype=torch.long)
    if isinstance(classes, str):
        return torch.tensor(class_labels(classes, n, pipe.class_names), dtype=torch.long)
    if isinstance(classes, int):
        labels = torch.full((n,), classes, dtype=torch.long)
    else:
        labels = torch.as_tensor(list(classes) if not isinstance(classes, torch.Tensor) else classes).long()
        if labels.shape != (n,):
            raise ValueError(f"classes must be one label or {n} labels, got shape {tuple(labels.shape)}")
    if ((labels < -1) | (labels >= pipe.unet.null_label)).any():
        raise ValueError(f"class labels must be in 0..{pipe.unet.null_label - 1} (or −1 for unconditional)")
    return labels


def _precision(recipe: SamplingRecipe, device: torch.device) -> str:
    if recipe.precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if recipe.precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"precision='bf16' needs native bf16 support, which {device} lacks (it would only be "
                         "emulated, i.e. slower); use precision='fp32'")
    return recipe.precision


@torch.no_grad()
def recipe_timesteps(pipe: Pipeline, recipe: SamplingRecipe) -> list[int]:
    """The timesteps :func:`sample` visits for ``recipe``: its ``timesteps`` if given, its sampler's spacing of
    ``steps``, or with ``guided_steps`` the two parts split at the guidance interval's top
    (:func:`nbutils.samplers.split_timesteps`)."""
    schedule = pipe.schedule
    if recipe.timesteps is not None:
        top = schedule.num_train_timesteps - 1
        if recipe.timesteps[0] > top:
            raise ValueError(f"timesteps must be at most {top} on this schedule, got {recipe.timesteps[0]}")
        return list(recipe.timesteps)
    if recipe.guided_steps is not None:
        return [int(t) for t in split_timesteps(
            schedule.num_train_timesteps, recipe.steps - recipe.guided_steps, recipe.guided_steps,
            recipe.guidance_interval[1], recipe.timestep_spacing or "trailing", schedule.alphas_cumprod,
            top_timestep(schedule.alphas_cumprod))]
    sampler = make_sampler(recipe.sampler, schedule, pipe.diffusion.prediction_type, recipe.steps,
                           recipe.timestep_spacing, recipe.eta)
    return [int(t) for t in sampler.timesteps]


@torch.no_grad()
def sample(
    pipe: Pipeline,
    n: int,
    classes: int | str | Sequence[int] | torch.Tensor | None = None,
    recipe: SamplingRecipe | None = None,
    generator: torch.Generator | None = None,
    *,
    batch_size: int = 500,
    progress: bool = False,
    return_trajectory: bool = False,
    trajectory_points: int = 8,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
) -> SampleResult:
    """Generate ``n`` images with ``recipe`` (default: the pipeline's own).

    ``classes``: one label for all, a class name or spec such as ``"all"``/``"sneaker"``, a sequence of n labels,
    or None/−1 for unconditional samples. Noise comes from ``generator`` (CPU generators reproduce across
    devices). ``return_trajectory`` records the decoded x̂_0 at ``trajectory_points`` steps of the first batch.

    ``init_latents`` (N, C_z, h, w), standardised like ``vae.encode``'s output, starts from given latents instead
    of pure noise (SDEdit, Meng et al. 2022; diffusers' image-to-image convention): of the sampler's timesteps only
    the last round(n·``strength``) run, after noising the latents to the first of them, x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε.
    """
    recipe = recipe if recipe is not None else pipe.recipe
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    vae, unet = pipe.vae, pipe.unet
    if init_latents is not None:
        if init_latents.ndim != 4 or tuple(init_latents.shape[1:]) != tuple(vae.latent_shape) or len(init_latents) != n:
            raise ValueError(f"init_latents must have shape ({n}, {', '.join(map(str, vae.latent_shape))}), "
                             f"got {tuple(init_latents.shape)}")
    elif strength != 1.0:
        raise ValueError("strength needs init_latents")
    labels = _labels(classes, n, pipe)
    schedule = pipe.schedule
    device = pipe.device
    precision = _precision(recipe, device)
    amp = precision == "bf16"

    def model(x, t, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return unet(x, t, y).float()

    timesteps_of_recipe = recipe_timesteps(pipe, recipe)
    lo, hi = recipe.guidance_interval or (0, math.inf)
    null = unet.null_label
    images, latents, trajectory = [], [], []
    batches, bar = -(-n // batch_size), None
    for start in range(0, n, batch_size):
        lab = labels[start : start + batch_size]
        model_labels = torch.where(lab < 0, torch.full_like(lab, null), lab).to(device)
        s = make_sampler(recipe.sampler, schedule, pipe.diffusion.prediction_type, recipe.steps,
                         recipe.timestep_spacing, recipe.eta)
        s.set_timesteps(timesteps=timesteps_of_recipe)
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
        if bar is None:  # one tick per denoising step: the bar moves even for a single batch of many steps
            bar = tqdm(total=batches * len(timesteps), desc=f"{recipe.sampler} {len(timesteps)}", unit="step",
                       disable=not progress, leave=False)
        for t in timesteps:
            w = recipe.guidance if lo <= int(t) <= hi else 1.0
            out = guided_output(model, x, t, model_labels, w, null)
            if int(t) in record:
                tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
                x0 = to_x0(out, x, tt, s.alphas_cumprod, pipe.diffusion.prediction_type)
                trajectory.append((int(t), vae.decode(x0).cpu()))
            x = s.step(out, t, x, generator=generator)
            bar.update(1)
        if not torch.isfinite(x).all():  # e.g. a large guidance scale on an undertrained model
            raise ValueError(f"sampling diverged: the latents are not finite (guidance {recipe.guidance:g}, "
                             f"{recipe.sampler}); try a smaller guidance scale")
        latents.append(x.cpu())
        images.append(vae.decode(x).cpu())
    bar.close()
    return SampleResult(torch.cat(images), torch.cat(latents), labels, trajectory, precision)
