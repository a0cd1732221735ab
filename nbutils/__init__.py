"""nbutils: the reusable half of the FashionMNIST Latent Diffusion notebook series.

One concept per module (see ``shared/DESIGN.md``): ``config`` (presets, device, seeding),
``data`` (finding and loading FashionMNIST), ``plotting`` (grids and charts), ``cli`` (the
``python -m nbutils`` command line). Later modules build the VAE, the UNet, the samplers and
the metrics on top of these.
"""

from .config import Config, get_config, make_generator, pick_device, seed_everything
from .data import CLASS_NAMES, class_index, load_split, make_loader

__version__ = "0.1.0"

__all__ = [
    "CLASS_NAMES",
    "Config",
    "class_index",
    "get_config",
    "load_split",
    "make_generator",
    "make_loader",
    "pick_device",
    "seed_everything",
]
