"""nbutils: the reusable half of the FashionMNIST Latent Diffusion notebook series.

One concept per module (see ``shared/DESIGN.md``): ``config`` (presets, device, seeding), ``data``
(FashionMNIST and the latent cache), ``vae``, ``schedules``, ``diffusion``, ``unet``, ``samplers``,
``train`` (training loops, loading trained models), ``checkpoints``, ``classifier`` and ``metrics``
(evaluation), ``plotting``, ``widgets``, and ``cli`` (the ``python -m nbutils`` command line).
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
