"""nbutils: the reusable half of the FashionMNIST Latent Diffusion notebook series.

Modules in layers, each importing only from the ones before it (checked by import-linter, pyproject.toml):
``config`` (presets, device, seeding); ``checkpoints`` and ``data`` (weight files, images); ``vae``, ``unet``,
``schedules``, ``diffusion`` (the models and the forward process); ``samplers`` and ``latents``; ``pipeline``
(VAE + UNet + recipe, ``sample``), ``metrics`` and ``classifier``; ``training`` and ``distributed`` (the shared
loop machinery); ``train_vae``, ``train_unet`` and ``evaluation``; ``plotting``, ``widgets``, ``exercises``,
``nbtools`` and ``cli`` (the ``python -m nbutils`` command line).
"""

from .config import (
    Config,
    checkpoints_dir,
    get_config,
    make_generator,
    pick_device,
    runs_dir,
    seed_everything,
)
from .data import CLASS_NAMES, class_index, load_split, make_loader

__version__ = "0.1.0"

__all__ = [
    "CLASS_NAMES",
    "Config",
    "checkpoints_dir",
    "class_index",
    "get_config",
    "load_split",
    "make_generator",
    "make_loader",
    "pick_device",
    "runs_dir",
    "seed_everything",
]
