"""The training set in latent space: encode it once with the VAE, cache it, never re-encode.

The UNet trains on posterior samples z = μ + σ·ε drawn fresh every epoch, so the cache stores the raw
(unstandardised) posterior ``mean`` and ``std`` of every image, with the labels, stamped with the SHA-256
of the VAE file that made them (Rombach et al. 2022 train the diffusion model on a frozen first stage the
same way). Standardising with the VAE's shift and scale happens when the latents are drawn.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, atomic_write_bytes, file_digest
from .config import DataConfig, runs_dir
from .data import load_images, to_model_range

LATENT_CACHE_FILE = "latents.safetensors"


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch_size: int = 1000, progress: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw posterior ``(mean, std)`` of every image (N, C_z, H/4, W/4), on the CPU, float32."""
    vae.eval()
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encoding", disable=not progress, leave=False):
        mean, logvar = vae.encode_dist(images[i : i + batch_size].to(device))
        means.append(mean.float().cpu())
        stds.append(torch.exp(0.5 * logvar).float().cpu())
    return torch.cat(means), torch.cat(stds)


def write_latent_cache(path: str | os.PathLike, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor,
                       vae_path: str | os.PathLike) -> Path:
    """Save the posterior ``mean`` and ``std`` (raw, (N, C_z, h, w)) and ``labels``, stamped with the SHA-256
    of the VAE file that made them."""
    payload = save({"mean": mean.float().contiguous(), "std": std.float().contiguous(),
                    "labels": labels.long().contiguous()}, metadata={"vae_digest": file_digest(vae_path)})
    return atomic_write_bytes(Path(path), payload)


def load_latent_cache(path: str | os.PathLike, vae_path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """``{"mean", "std", "labels"}`` from a latent cache; with ``vae_path`` it must come from that VAE."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"latent cache {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get("vae_digest")
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"latent cache {path} is unreadable ({exc}); delete it to rebuild") from exc
    if vae_path is not None and digest != file_digest(vae_path):
        raise CheckpointError(f"latent cache {path} was made by a different VAE than {vae_path}; delete it")
    return tensors


def latent_dataset(vae, vae_path: str | os.PathLike, subset: int | None = None, root=None,
                   progress: bool = True, data_cfg: DataConfig | None = None) -> dict[str, torch.Tensor]:
    """The training set encoded by ``vae`` (loaded from ``vae_path``), from cache when possible.

    Looks for ``latents.safetensors`` beside the VAE file, then ``runs/latent_cache/<digest>.safetensors``;
    computes and writes the latter when neither matches. ``subset`` keeps the first N. ``data_cfg`` names the
    dataset (default FashionMNIST).
    """
    vae_path = Path(vae_path)
    shared = runs_dir() / "latent_cache" / f"{file_digest(vae_path)}.safetensors"  # always the full set
    for path in (vae_path.parent / LATENT_CACHE_FILE, shared):
        try:
            cache = load_latent_cache(path, vae_path)
        except CheckpointError:
            continue
        if subset is None or len(cache["labels"]) >= subset:
            break
    else:
        data_cfg = data_cfg or DataConfig()
        images, labels = load_images(data_cfg, "train", root=root)
        mean, std = encode_dataset(vae, to_model_range(images, data_cfg.image_shape), progress=progress)
        shared.parent.mkdir(parents=True, exist_ok=True)
        write_latent_cache(shared, mean, std, labels, vae_path)
        cache = {"mean": mean, "std": std, "labels": labels}
    if subset is not None:
        cache = {k: v[:subset] for k, v in cache.items()}
    return cache
