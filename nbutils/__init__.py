"""nbutils: the reusable half of the FashionMNIST Latent Diffusion notebook series.

Modules in layers, each importing only from the ones before it (checked by import-linter, pyproject.toml):
``config`` (presets, device, seeding); ``checkpoints`` and ``data`` (weight files, images); ``vae``, ``unet``,
``schedules``, ``diffusion`` (the models and the forward process); ``samplers`` and ``latents``; ``pipeline``
(VAE + UNet + recipe, ``sample``), ``metrics`` and ``classifier``; ``training`` and ``distributed`` (the shared
loop machinery); ``train_vae``, ``train_unet`` and ``evaluation``; ``plotting``, ``widgets``, ``exercises``,
``nbtools`` and ``cli`` (the ``python -m nbutils`` command line).
"""

import importlib
import importlib.util

__version__ = "0.1.0"

# What ``nbutils.NAME`` gives, imported on first use (PEP 562) so that ``import nbutils`` and the start of
# ``python -m nbutils`` do not wait for torch: Ctrl-C during that wait is then caught by the command line.
_EXPORTS = {
    "CLASS_NAMES": "data",
    "Config": "config",
    "checkpoints_dir": "config",
    "class_index": "data",
    "get_config": "config",
    "load_split": "data",
    "make_generator": "config",
    "make_loader": "data",
    "pick_device": "config",
    "runs_dir": "config",
    "seed_everything": "config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f".{name}", __name__) is not None:  # a module: nbutils.config, nbutils.vae…
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
