"""Configuration: typed dataclasses, the presets (smoke, cpu, gpu, shipped, full), device choice and seeding.

Longer than the ~400 lines a module aims at because the config is read in one place: the dataclasses, the
presets, the ``--set`` parser and (de)serialisation belong together.

Every knob of the project lives in a few small dataclasses (data + the two models +
the diffusion process + training), grouped in :class:`Config`. A preset is a function that returns
a ``Config``; ``get_config()`` picks one by name, by ``$NBUTILS_PRESET``, or automatically
(``full`` when CUDA is available, else ``cpu``). Configs are plain data: they print readably,
turn into JSON-able dicts with :meth:`Config.to_dict` and back with :meth:`Config.from_dict`, which is
how checkpoints remember what they were trained with.

Names follow Hugging Face ``diffusers`` where one exists (``block_out_channels``,
``layers_per_block``, ``norm_num_groups``, ``cross_attention_dim``, ``num_train_timesteps``,
``beta_schedule``, ``prediction_type``) so the two can be read side by side.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import imagefolder

PRESETS = ("smoke", "cpu", "gpu", "shipped", "full")
#: torch.compile's modes (TrainConfig.compile_mode); "reduce-overhead" captures CUDA graphs, which removes the
#: per-kernel launch cost that bounds a small model's GPU step
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")  # TrainConfig.mixed_precision (nbutils.training.autocast_dtype)
PRESET_ENV = "NBUTILS_PRESET"
DEVICE_ENV = "NBUTILS_DEVICE"


def _whole(obj: Any, *names: str, minimum: int = 1, optional: bool = False) -> None:
    """Each field is a whole number ≥ ``minimum`` (or None when ``optional``), else a ValueError naming it."""
    for name in names:
        v = getattr(obj, name)
        if optional and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must be a whole number ≥ {minimum}{' or none' if optional else ''}, got {v!r}")


def _real(obj: Any, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False,
          optional: bool = False) -> None:
    """The field is a finite number in the given interval (or None when ``optional``), else a ValueError."""
    v = getattr(obj, name)
    if optional and v is None:
        return
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}{' or none' if optional else ''}, got {v!r}")


def _channels(obj: Any, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, tuple) or not v or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in v):
        raise ValueError(f"{name} must be one or more whole numbers ≥ 1, got {v!r}")


# --------------------------------------------------------------------------------------------
# The dataclasses
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which dataset, its image shape, and which part of it to use (``None`` = the whole split).

    ``image_size`` and ``channels`` are the dataset's (``nbutils.data.DATASETS``); set them with
    :func:`for_dataset`, which also shapes the VAE to match. ``fake`` is torchvision's ``FakeData`` (random
    images of any shape, offline) for tests; ``folder:PATH`` is your own images (:mod:`nbutils.imagefolder`),
    whose class names the config keeps, so that a model samples by name after the folder has gone.
    """

    dataset: str = "fashion_mnist"  # "fashion_mnist" | "cifar10" | "fake" | "folder:PATH"
    image_size: int = 28
    channels: int = 1
    class_names: tuple[str, ...] = ()  # a folder dataset's; empty: the named dataset's own
    train_subset: int | None = None  # first N training images (smoke uses a few hundred)
    test_subset: int | None = None  # first N test images used for per-epoch metrics

    def __post_init__(self) -> None:
        _whole(self, "image_size", "channels")
        _whole(self, "train_subset", "test_subset", optional=True)
        if not isinstance(self.class_names, tuple) or not all(isinstance(n, str) and n for n in self.class_names):
            raise ValueError(f"class_names must be names (text), got {self.class_names!r}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.image_size, self.image_size)


@dataclass
class VAEConfig:
    """First stage: C×S×S image ↔ ``latent_channels``×(S/4)×(S/4) latent (two 2× down/up samplings):
    1×28×28 ↔ C_z×7×7 for FashionMNIST, 3×32×32 ↔ C_z×8×8 for CIFAR-10."""

    in_channels: int = 1
    image_size: int = 28
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # at 28×28, 14×14, 7×7
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_reduction: int = 4  # ChannelAttention bottleneck = channels // reduction
    kl_weight: float = 1e-6  # β in  recon + β·KL

    def __post_init__(self) -> None:
        _whole(self, "in_channels", "image_size", "latent_channels", "layers_per_block", "norm_num_groups",
               "attention_reduction")
        _channels(self, "block_out_channels")
        _real(self, "kl_weight", 0, math.inf)


@dataclass
class UNetConfig:
    """Second stage: the noise-predicting UNet on 7×7 latents, class as cross-attention context."""

    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64, 128)  # at 7×7 and 4×4
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (False, True)
    num_heads: int = 4
    cross_attention_dim: int = 128
    context_tokens: int = 4  # learned context tokens per class (and for the null class)
    class_embedding: bool = False  # also add a learned class vector to the timestep embedding (ADM-style AdaGN)
    num_classes: int = 10  # class index num_classes = the null class (classifier-free guidance)
    norm_num_groups: int = 8
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _whole(self, "latent_channels", "layers_per_block", "num_heads", "cross_attention_dim", "context_tokens",
               "num_classes", "norm_num_groups")
        _channels(self, "block_out_channels")
        _real(self, "dropout", 0, 1, high_open=True)


@dataclass
class DiffusionConfig:
    """The DDPM forward process and what the UNet is trained to predict."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    cond_drop_prob: float = 0.1  # classifier-free guidance: P(class → null token) in training
    min_snr_gamma: float | None = None  # None = plain MSE; e.g. 5.0 for min-SNR-γ weighting

    def __post_init__(self) -> None:
        _whole(self, "num_train_timesteps", minimum=2)
        _real(self, "beta_start", 0, 1, low_open=True, high_open=True)
        _real(self, "beta_end", 0, 1, low_open=True, high_open=True)
        _real(self, "cond_drop_prob", 0, 1)
        _real(self, "min_snr_gamma", 0, math.inf, low_open=True, optional=True)


@dataclass
class TrainConfig:
    """One training loop (the VAE and the UNet each get their own)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    lr_warmup_steps: int = 200  # linear warm-up, then constant (see training.lr_at)
    ema_decay: float = 0.9999
    ema_warmup_steps: int = 1000  # EMA decay ramps up from 0 over these steps
    seed: int = 0
    sample_every: int = 1  # epochs between sample grids / metrics (0 = never)
    mixed_precision: str = "auto"  # "auto" (bf16 if compiled on a GPU that has it), "bf16", "fp16", "no"; CUDA only
    compile: bool = False  # torch.compile the training forward pass (CUDA only; ignored with a notice on CPU)
    compile_mode: str = "default"  # torch.compile's mode: "reduce-overhead" replays the step as CUDA graphs

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        _whole(self, "epochs", "batch_size", "lr_warmup_steps")
        _whole(self, "ema_warmup_steps", "seed", "sample_every", minimum=0)
        _real(self, "lr", 0, math.inf)  # 0: the weights stay (a frozen run)
        _real(self, "weight_decay", 0, math.inf)
        _real(self, "grad_clip", 0, math.inf, low_open=True, optional=True)
        _real(self, "ema_decay", 0, 1, high_open=True)


@dataclass
class PhaseConfig:
    """A second training phase: after its ``epochs`` the run continues for ``epochs`` more with a fresh Adam at
    ``lr`` (after its own warm-up) and freshly seeded data order; the weights and their EMA carry on.
    ``epochs = 0``: no second phase. The shipped UNet was trained this way: a constant rate, then a lower one."""

    epochs: int = 0
    lr: float = 1e-4
    lr_warmup_steps: int = 50

    def __post_init__(self) -> None:
        _whole(self, "epochs", minimum=0)
        _whole(self, "lr_warmup_steps")
        _real(self, "lr", 0, math.inf)  # 0: the weights stay (a frozen run)


@dataclass
class Config:
    """Everything one run needs. ``preset`` records where it came from."""

    preset: str = "full"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train_vae: TrainConfig = field(default_factory=TrainConfig)
    train_unet: TrainConfig = field(default_factory=TrainConfig)
    finetune_unet: PhaseConfig = field(default_factory=PhaseConfig)  # the UNet's second phase, if any

    # -- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able nested dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`. Unknown keys are an error that names them."""
        return _from_dict(cls, d, path="config")

    def replace(self, **sections: Any) -> Config:
        """A copy with some sections swapped, e.g. ``cfg.replace(vae=VAEConfig(latent_channels=8))``."""
        return dataclasses.replace(self, **sections)

    def override(self, assignments: list[str]) -> Config:
        """A copy with ``section.field=value`` assignments applied (the CLI's ``--set``), e.g.
        ``["unet.dropout=0", "train_unet.lr=2e-4", "unet.block_out_channels=32,64"]``. Values are parsed as the
        field's current type; an unknown section or field is an error that lists the valid ones."""
        cfg = dataclasses.replace(self)
        for text in assignments:
            key, sep, raw = text.partition("=")
            section_name, dot, name = key.strip().partition(".")
            sections = [f.name for f in dataclasses.fields(self) if f.name != "preset"]
            if not sep or not dot:
                raise ValueError(f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. unet.dropout=0")
            if section_name not in sections:
                raise ValueError(f"--set {text!r}: unknown section {section_name!r}; sections: {', '.join(sections)}")
            section = getattr(cfg, section_name)
            fields = {f.name for f in dataclasses.fields(section)}
            if name not in fields:
                raise ValueError(f"--set {text!r}: {section_name} has no field {name!r}; fields: "
                                 f"{', '.join(sorted(fields))}")
            value = _parse_value(raw.strip(), getattr(section, name), text)
            try:
                setattr(cfg, section_name, dataclasses.replace(section, **{name: value}))
            except ValueError as exc:
                raise ValueError(f"--set {text!r}: {section_name}.{exc}") from None
        return cfg

    def cli_flags(self, skip: tuple[str, ...] = ("epochs", "mixed_precision", "compile")) -> list[str]:
        """The command-line flags (``--dataset``, ``--set``) that rebuild this config from its preset, leaving out
        the fields named in ``skip`` (those have flags of their own), e.g. ``['--set', 'train_unet.lr=0.0001']``.

        >>> get_config("smoke").override(["unet.block_out_channels=32,64"]).cli_flags()
        ['--set', 'unet.block_out_channels=32,64']
        """
        base = get_config(self.preset, dataset=self.data.dataset)
        flags = [] if self.data.dataset == "fashion_mnist" else ["--dataset", self.data.dataset]
        for f in dataclasses.fields(self):
            if f.name == "preset":
                continue
            mine, theirs = getattr(self, f.name), getattr(base, f.name)
            for g in dataclasses.fields(mine):
                value = getattr(mine, g.name)
                if g.name not in skip and value != getattr(theirs, g.name):
                    flags += ["--set", f"{f.name}.{g.name}={_format_value(value)}"]
        return flags

    def __str__(self) -> str:
        lines = [f"preset: {self.preset}"]
        for f in dataclasses.fields(self):
            if f.name == "preset":
                continue
            section = getattr(self, f.name)
            items = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(section).items())
            lines.append(f"  {f.name:<10} {items}")
        return "\n".join(lines)


def _parse_value(raw: str, current: Any, text: str) -> Any:
    """``raw`` as the type of ``current`` (bool, int, float, str, a tuple of those; ``none`` for optional)."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(current, tuple):
            items = [x.strip() for x in raw.strip("()[]").split(",") if x.strip()]
            return tuple(_parse_value(x, current[0], text) if current else _number(x) for x in items)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float) or current is None:
            return _number(raw) if current is None else float(raw)
        return raw
    except ValueError:
        raise ValueError(f"--set {text!r}: cannot read {raw!r} as {type(current).__name__}") from None


def _format_value(value: Any) -> str:
    """Inverse of :func:`_parse_value`: ``(32, 64)`` → ``"32,64"``, ``None`` → ``"none"``, ``False`` → ``"false"``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_format_value(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def _number(raw: str) -> int | float:
    return float(raw) if any(c in raw for c in ".eE") else int(raw)


def _from_dict(cls: type, d: dict[str, Any], path: str) -> Any:
    if not isinstance(d, dict):
        raise TypeError(f"{path}: expected a mapping, got {type(d).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; {cls.__name__} has {sorted(known)}")
    kwargs = {}
    defaults = cls()
    for name, value in d.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value, f"{path}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def smoke_config() -> Config:
    """Tiny models on a few hundred images: every code path runs in seconds (CI, nbval)."""
    return Config(
        preset="smoke",
        data=DataConfig(train_subset=512, test_subset=256),
        vae=VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4, kl_weight=1e-6),
        unet=UNetConfig(
            block_out_channels=(16, 32),
            layers_per_block=1,
            num_heads=2,
            cross_attention_dim=32,
            norm_num_groups=4,
        ),
        diffusion=DiffusionConfig(),
        train_vae=TrainConfig(epochs=1, batch_size=64, lr=1e-3, ema_warmup_steps=2, lr_warmup_steps=2),
        train_unet=TrainConfig(epochs=1, batch_size=64, lr=1e-3, ema_warmup_steps=2, lr_warmup_steps=2),
    )


def cpu_config() -> Config:
    """The best recipe known for about 20 minutes of 2-core CPU time for both models: the cosine schedule with
    v-prediction (Nichol & Dhariwal 2021; Salimans & Ho 2022) and no dropout, as measured in docs/results.md."""
    return Config(
        preset="cpu",
        data=DataConfig(train_subset=None, test_subset=2000),
        # small batches at a higher rate and a narrow 28×28 level train fastest per CPU-second
        vae=VAEConfig(block_out_channels=(16, 64, 128), kl_weight=1e-6),
        unet=UNetConfig(block_out_channels=(48, 96), layers_per_block=1, cross_attention_dim=128, dropout=0.0),
        diffusion=DiffusionConfig(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
        train_vae=TrainConfig(epochs=1, batch_size=32, lr=2e-3, ema_decay=0.999),
        train_unet=TrainConfig(epochs=6, batch_size=128, lr=1e-3, ema_decay=0.999),
    )


def shipped_config() -> Config:
    """Exactly how ``checkpoints/`` was trained: the ``cpu`` VAE for 4 epochs; a wider (64, 128) UNet for 16
    epochs at lr 1e-3, then 24 more at lr 1e-4 (``finetune_unet``). Hours on a 2-core CPU (``make reproduce``)."""
    cfg = cpu_config()
    return cfg.replace(
        preset="shipped",
        unet=dataclasses.replace(cfg.unet, block_out_channels=(64, 128)),
        train_vae=dataclasses.replace(cfg.train_vae, epochs=4),
        train_unet=dataclasses.replace(cfg.train_unet, epochs=16, sample_every=0),
        finetune_unet=PhaseConfig(epochs=24, lr=1e-4, lr_warmup_steps=50),
    )


def gpu_config() -> Config:
    """A free-tier GPU (e.g. a Colab T4): the shipped recipe — the ``cpu`` VAE for 4 epochs, the (64, 128) UNet for
    16 epochs at lr 1e-3 and 24 more at 1e-4 — which a GPU trains in minutes per model; the automatic choice on
    CUDA. The notebooks print the time they expect (:func:`nbutils.training.estimate_seconds`)."""
    cfg = shipped_config()
    # a sample grid every 8 of the 40 epochs: notebook 04 shows how the samples improve (off on a CPU: slow there)
    return cfg.replace(preset="gpu", train_unet=dataclasses.replace(cfg.train_unet, sample_every=8))


def full_config() -> Config:
    """The seed's reference configuration (a GPU): 100 epochs, batch 128, Adam 1e-4, 1000 diffusion steps, with
    the schedule, prediction target and dropout measured best (those of ``cpu``)."""
    return Config(
        preset="full",
        data=DataConfig(),
        vae=VAEConfig(block_out_channels=(64, 128, 256), layers_per_block=2),
        unet=UNetConfig(block_out_channels=(128, 256), layers_per_block=2, cross_attention_dim=256, dropout=0.0),
        diffusion=DiffusionConfig(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
        train_vae=TrainConfig(epochs=100, batch_size=128, lr=1e-4),
        train_unet=TrainConfig(epochs=100, batch_size=128, lr=1e-4),
    )


_PRESET_FACTORIES = {"smoke": smoke_config, "cpu": cpu_config, "gpu": gpu_config, "shipped": shipped_config,
                     "full": full_config}


#: The datasets the models can be shaped for: ``(image_size, channels, number of classes)``. The loaders and
#: class names live in :mod:`nbutils.data`; ``fake`` (torchvision's ``FakeData``) takes any shape.
DATASET_SHAPES = {"fashion_mnist": (28, 1, 10), "cifar10": (32, 3, 10), "fake": (32, 3, 10)}
ANY_SHAPE_DATASETS = ("fake",)
_DATASET_ALIASES = {"fashionmnist": "fashion_mnist", "cifar": "cifar10", "cifar_10": "cifar10"}


def dataset_name(name: str) -> str:
    """The canonical name of a dataset (``FashionMNIST`` → ``fashion_mnist``, ``folder:PATH`` with PATH made
    absolute); an error lists the valid ones."""
    if imagefolder.is_folder(name):
        return imagefolder.folder_name(name)
    key = name.strip().lower().replace("-", "_")
    key = _DATASET_ALIASES.get(key, key)
    if key not in DATASET_SHAPES:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASET_SHAPES)}, folder:PATH")
    return key


def for_dataset(cfg: Config, dataset: str, image_size: int | None = None, channels: int | None = None) -> Config:
    """``cfg`` retargeted at another dataset: the data section names it and carries its image shape, the VAE
    is built for that shape, the UNet for its number of classes. ``image_size``/``channels`` are for
    ``fake`` only (real datasets have a fixed shape); a ``folder:PATH`` is scanned for its shape and classes.

    >>> c = for_dataset(get_config("smoke"), "cifar10"); (c.vae.in_channels, c.vae.image_size)
    (3, 32)
    """
    name = dataset_name(dataset)
    names: tuple[str, ...] = ()
    if imagefolder.is_folder(name):
        folder = imagefolder.scan(name)
        own_size, own_channels, num_classes, names = (folder.image_size, folder.channels, len(folder.class_names),
                                                      folder.class_names)
    else:
        own_size, own_channels, num_classes = DATASET_SHAPES[name]
    size, ch = image_size or own_size, channels or own_channels
    if name not in ANY_SHAPE_DATASETS and (size, ch) != (own_size, own_channels):
        raise ValueError(f"{name} images are {own_channels}×{own_size}×{own_size}; "
                         f"got image_size={size}, channels={ch}")
    if size % 4:
        raise ValueError(f"image_size must be a multiple of 4 (the VAE halves it twice), got {size}")
    return cfg.replace(
        data=dataclasses.replace(cfg.data, dataset=name, image_size=size, channels=ch, class_names=names),
        vae=dataclasses.replace(cfg.vae, in_channels=ch, image_size=size),
        unet=dataclasses.replace(cfg.unet, num_classes=num_classes),
    )


def default_preset_name() -> str:
    """``$NBUTILS_PRESET`` if set, else ``gpu`` when CUDA is available, else ``cpu``: the automatic choice never
    starts hours of work (``full`` only when asked for)."""
    name = os.environ.get(PRESET_ENV, "").strip()
    if name:
        return name
    return "gpu" if torch.cuda.is_available() else "cpu"


def get_config(preset: str | None = None, dataset: str | None = None) -> Config:
    """The :class:`Config` of a preset (``None`` = :func:`default_preset_name`), for FashionMNIST or, with
    ``dataset``, another dataset (:func:`for_dataset`).

    >>> get_config("smoke").train_unet.epochs
    1
    """
    name = preset if preset is not None else default_preset_name()
    key = name.strip().lower()
    if key not in _PRESET_FACTORIES:
        source = "" if preset is not None else f" (from ${PRESET_ENV})"
        raise ValueError(f"unknown preset {name!r}{source}; valid presets: {', '.join(PRESETS)}")
    cfg = _PRESET_FACTORIES[key]()
    return cfg if dataset is None else for_dataset(cfg, dataset)


# --------------------------------------------------------------------------------------------
# Device and seeding
# --------------------------------------------------------------------------------------------


def pick_device(prefer: str | None = None) -> torch.device:
    """``prefer`` or ``$NBUTILS_DEVICE`` if given, else the first of cuda → mps → cpu available."""
    name = prefer or os.environ.get(DEVICE_ENV, "").strip() or None
    if name is not None:
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError):
            source = "" if prefer else f" (from ${DEVICE_ENV})"
            raise ValueError(f"unknown device {name!r}{source}; use cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if dev.type == "mps" and not _mps_available():
            raise ValueError(f"device {name!r} requested but MPS is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with ``seed``. Pass it on; never rely on global RNG state."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def seed_everything(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Seed Python, NumPy and torch's global RNGs (for library code we do not control, such as
    dropout) and return a generator for our own sampling, seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return make_generator(seed, device)


# --------------------------------------------------------------------------------------------
# Where things live
# --------------------------------------------------------------------------------------------


def project_root() -> Path:
    """The repository folder: ``$NBUTILS_HOME``, else the checkout this package sits in, else cwd."""
    env = os.environ.get("NBUTILS_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "nbutils").is_dir():
        return here
    return Path.cwd()


def display_path(path: str | Path) -> str:
    """``path`` as people should read it in logs and notebooks: relative to the repository when inside it
    (``runs/cpu/vae.safetensors``), else as given.

    >>> display_path(project_root() / "runs" / "cpu")
    'runs/cpu'
    """
    p = Path(path)
    try:
        return str(p.resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def runs_dir() -> Path:
    return project_root() / "runs"


def checkpoints_dir() -> Path:
    return project_root() / "checkpoints"


def data_dir() -> Path:
    return project_root() / "data"


def bf16_supported(device: str | torch.device) -> bool:
    """Whether bf16 autocast is *fast* on ``device``: CUDA with bf16 support, or a CPU whose oneDNN has
    native bf16 instructions (AVX512-BF16 / AMX). Elsewhere bf16 would be emulated, i.e. slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False
