"""Hub-format model folders from run folders: what the Hugging Face Hub (and anyone without this repository)
expects to find (the format: :mod:`nbutils.card`).

* :func:`save_pretrained` — a run folder (or the shipped ``checkpoints/``) → a Hub-format folder, the weights
  unchanged (so their digests and the UNet's record of its VAE still hold) or both stored at a lower precision.
  A pipeline in memory has its own ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``
  (:class:`nbutils.pipeline.Pipeline`, Hugging Face's ``ModelHubMixin``), as the VAE and the UNet do.
* ``load_pipeline("owner/name")`` (and ``--checkpoint owner/name``) downloads such a folder from the Hub once
  (:func:`nbutils.checkpoints.resolve_checkpoint`).
* Publishing: ``load_pipeline("checkpoints").push_to_hub("you/fashion-ldm")``, or
  ``huggingface_hub.upload_folder(repo_id="you/fashion-ldm", folder_path="checkpoints")``, after
  ``huggingface-cli login`` (docs/architecture.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .card import RESULTS_FILE, write_folder
from .checkpoints import UNET_FILE, VAE_FILE, encode_model, read_model
from .config import Config
from .pipeline import SamplingRecipe, check_vae


def save_pretrained(source: str | Path, out_dir: str | Path, results: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None, recipe: SamplingRecipe | None = None) -> Path:
    """Write the UNet + VAE of ``source`` (a run folder or checkpoint folder) to ``out_dir`` in Hub format.

    ``results`` (e.g. the record ``python -m benchmarks judges`` prints) goes to ``results.json`` and into the
    card; by default the one already in ``source`` is kept. ``recipe`` replaces the sampling recipe stored with the
    UNet (e.g. the one its results were measured with). ``dtype`` (e.g. ``torch.float16``) stores both models'
    floating tensors at that precision, as the shipped weights are (loading converts back to float32); the VAE file
    then holds new tensors, so the UNet's record of its VAE moves to the stored VAE — only after the source pair
    passed :func:`~nbutils.pipeline.check_vae` — and its record before the first such export is kept
    (``vae_record_before_export``). Re-encoded files go to a folder that is not a run: never over ``source``."""
    source, out_dir = Path(source), Path(out_dir)
    unet_tensors, unet_meta = read_model(source / UNET_FILE, "unet")
    vae_tensors, vae_meta = read_model(source / VAE_FILE, "vae")
    vae_meta["path"] = str(source / VAE_FILE)
    check_vae(unet_meta["extra"], vae_meta, str(source / UNET_FILE))
    if results is None and (source / RESULTS_FILE).is_file():
        results = json.loads((source / RESULTS_FILE).read_text())
    rewrite = dtype is not None or recipe is not None
    if rewrite and out_dir.exists():  # a killed write would leave a pair that does not match
        if out_dir.resolve() == source.resolve():
            raise ValueError(f"{out_dir}: re-encoded weights go to a new folder, not over their source")
        if any(out_dir.glob("*_state.pt")) or any(out_dir.glob("*_manifest.json")):
            raise ValueError(f"{out_dir} holds a training run: write a re-encoded export to a folder of its own")
    files: dict[str, bytes] = {}  # everything encoded and checked before anything is written
    if rewrite:
        extra = dict(unet_meta["extra"])
        if recipe is not None:
            extra["sampling_recipe"] = recipe.to_dict()
        if dtype is not None:
            _check_representable({**unet_tensors, **vae_tensors}, dtype)
            vae_extra = dict(vae_meta["extra"], stored_dtype=str(dtype))
            files[VAE_FILE], files["vae.json"] = encode_model(
                "vae", vae_tensors, Config.from_dict(vae_meta["config"]), vae_extra, dtype)
            digest = json.loads(files["vae.json"])["tensor_digest"]
            if digest != vae_meta["tensor_digest"]:
                record = {k: extra.pop(k) for k in ("vae_tensor_digest", "vae_digest") if extra.get(k) is not None}
                extra.setdefault("vae_record_before_export", record)
                extra["vae_tensor_digest"] = digest
            extra["stored_dtype"] = str(dtype)
        files[UNET_FILE], files["unet.json"] = encode_model(
            "unet", unet_tensors, Config.from_dict(unet_meta["config"]), extra, dtype)
    for name in (UNET_FILE, VAE_FILE):  # the files not re-encoded, byte for byte
        if name not in files:
            files[name] = (source / name).read_bytes()
            sidecar = (source / name).with_suffix(".json")
            if sidecar.is_file():
                files[sidecar.name] = sidecar.read_bytes()
    stored = recipe.to_dict() if recipe is not None else \
        SamplingRecipe.from_dict(unet_meta["extra"].get("sampling_recipe") or {}).to_dict()
    write_folder(out_dir, files, stored, results)
    return out_dir


def _check_representable(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """An error naming the first floating tensor that ``dtype`` cannot hold (values beyond its range become inf)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.to(dtype)).all():
            raise ValueError(f"{name} has values that {dtype} cannot hold (beyond ±{torch.finfo(dtype).max:g}); "
                             "export it at a wider precision")


