"""Saving and loading weights: safetensors + config, written atomically, checked on load.

Longer than the ~400 lines a module aims at because it is the one home of how files reach the disk and come back:
atomic writes, sets committed as one, model checkpoints, and where to find them.

A model checkpoint is one ``NAME.safetensors`` file whose metadata carries the format version, the
kind of model (``vae``, ``unet``, …), the full :class:`~nbutils.config.Config` as JSON, any extras
(the VAE's latent statistics, training epoch, metrics) and the SHA-256 of its tensors' content
(:func:`tensor_digest`). Loading recomputes that digest, so a flipped byte or an edited tensor is an error
that names the file, and refuses non-finite weights. A ``NAME.json`` copy of the metadata sits beside it
for people to read; loading only trusts the safetensors file.

Training state that is not needed for inference (optimizer moments, step counter, RNG states, loss
history) goes to ``NAME_state.pt`` next to it, so resumes are exact without bloating shipped weights.

Every write goes to a temporary file in the same folder, is flushed and fsync'd, then renamed over
the old file (``os.replace`` is atomic on POSIX and Windows): a crash mid-write leaves the previous
checkpoint intact. The files a training run saves together (weights, state, history) are committed as one set
(:func:`commit_files`): written whole under temporary names, made current by their manifest
(``NAME_manifest.json``, the SHA-256 of each), and only then renamed into place; a start after a crash completes
or discards what a killed commit left (:func:`finish_commits`), and resuming checks the set against its manifest
(:func:`check_files`).

:func:`model_parameters` counts a model of a config without allocating it, so that a config asking for a
multi-gigabyte model is refused before it is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin, snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save
from torch import nn

from .config import Config, checkpoints_dir, default_preset_name, pick_device, runs_dir

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, of the wrong kind or for a different config."""


#: The two weights files of a model folder (a run folder, ``checkpoints/``, a Hub-format folder).
VAE_FILE = "vae.safetensors"
UNET_FILE = "unet.safetensors"


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` so that readers see either the old file or the new one."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# --------------------------------------------------------------------------------------------
# Sets of files committed as one (a training run's checkpoint of an epoch)
# --------------------------------------------------------------------------------------------

PENDING = ".pending"  # ``.NAME.pending``: a file of a set being committed, not yet in place


def manifest_path(folder: str | os.PathLike, name: str) -> Path:
    """``FOLDER/NAME_manifest.json``: which files (and SHA-256) make up the set ``name`` last committed there."""
    return Path(folder) / f"{name}_manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = json.loads(path.read_text())
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) and Path(k).name == k not in ("", ".", "..")
                                              for k, v in files.items()):
        raise ValueError("no list of file names and digests")
    return manifest


def commit_files(folder: str | os.PathLike, name: str, files: dict[str, bytes], **info: Any) -> Path:
    """Replace several files of ``folder`` as one set: readers (after :func:`finish_commits`) see all the old files
    or all the new ones, never a mix, whenever the process is killed.

    Each file is first written whole as ``.FILE.pending`` (fsync'd); then the set's manifest
    ``NAME_manifest.json`` (``info`` + the SHA-256 of every file) is written atomically: that rename is the commit;
    last, the pending files are renamed into place. Files of the set not given keep their entries (a VAE's weights
    rewritten with its latent statistics). Returns the manifest's path."""
    folder = Path(folder)
    path = manifest_path(folder, name)
    try:
        manifest = _read_manifest(path)
    except (OSError, ValueError):
        manifest = {"files": {}}  # none yet (a new run, or one saved before manifests)
    entries = dict(manifest["files"])
    for file, payload in files.items():
        atomic_write_bytes(folder / f".{file}{PENDING}", payload)
        entries[file] = hashlib.sha256(payload).hexdigest()
    _sync_folder(folder)
    info = {k: v for k, v in manifest.items() if k != "files"} | info
    atomic_write_bytes(path, (json.dumps({**info, "files": entries}, indent=1) + "\n").encode())  # the commit
    for file in files:
        os.replace(folder / f".{file}{PENDING}", folder / file)
    _sync_folder(folder)
    return path


def finish_commits(folder: str | os.PathLike) -> None:
    """Complete or discard what a killed :func:`commit_files` left in ``folder``: a pending file whose content a
    manifest lists was committed, and goes into place; any other pending file belongs to a set that never was, and
    goes. Call it while no other process writes there (training does, holding the run folder's lock)."""
    folder = Path(folder)
    pending = sorted(folder.glob(f".*{PENDING}"))
    if not pending:
        return
    committed: dict[str, str] = {}
    for path in folder.glob("*_manifest.json"):
        try:
            committed |= _read_manifest(path)["files"]
        except (OSError, ValueError):
            continue
    for path in pending:
        file = path.name[1 : -len(PENDING)]
        if file and committed.get(file) == _sha256(path):
            os.replace(path, folder / file)
        else:
            path.unlink(missing_ok=True)
    _sync_folder(folder)


def check_files(folder: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The manifest of the set ``name`` in ``folder`` after checking that each of its files present is the one
    committed with it (a file missing is fine: the next save writes it); None for a folder saved before manifests.
    A :class:`CheckpointError` names a file that was changed or swapped since (e.g. another epoch's weights beside
    this state), and a damaged manifest."""
    folder = Path(folder)
    path = manifest_path(folder, name)
    if not path.is_file():
        return None
    try:
        manifest = _read_manifest(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); delete it to use the files beside it unchecked") from None
    for file, digest in manifest["files"].items():
        if (folder / file).is_file() and _sha256(folder / file) != digest:
            when = f" (after epoch {manifest['epochs_done']})" if "epochs_done" in manifest else ""
            raise CheckpointError(
                f"{folder / file} is not the file saved with the rest of the checkpoint{when} listed in {path.name}: "
                "it was changed or replaced since (or a save is under way); put back the run's own copy, or train "
                "afresh without --resume")
    return manifest


# --------------------------------------------------------------------------------------------
# Model size, before building a model
# --------------------------------------------------------------------------------------------

#: The largest model a config may ask for: 2 GB of float32 parameters (the full preset's UNet is ~0.1 GB). A larger
#: one is a typo in ``--set`` or a doctored checkpoint, and is refused before anything is allocated.
MAX_MODEL_BYTES = 2_000_000_000
#: The most residual blocks (``layers_per_block`` × levels) a model may have: each costs time and memory to build.
MAX_MODEL_BLOCKS = 1_000


def model_parameters(build: Callable[[Any], nn.Module], section: Any, source: str) -> int:
    """The number of parameters (and buffers) of ``build(section)``, counted without allocating them (the model
    is built on PyTorch's ``meta`` device); a ValueError naming ``source`` (what set the config: a ``--set`` flag,
    a checkpoint) when it would be larger than :data:`MAX_MODEL_BYTES` of float32 or deeper than
    :data:`MAX_MODEL_BLOCKS`. ``section`` is a VAE or UNet config (``block_out_channels``, ``layers_per_block``)."""
    kind = getattr(build, "__name__", "model")
    channels, layers = tuple(section.block_out_channels), section.layers_per_block
    if layers * len(channels) > MAX_MODEL_BLOCKS:
        raise ValueError(f"{source} asks for a {kind} of {layers * len(channels):,} residual blocks (layers_per_block "
                         f"× levels), more than the {MAX_MODEL_BLOCKS:,} a model may have here")
    floor = layers * sum(9 * c * c for c in channels)  # a 3×3 convolution c → c per layer: no need to build
    n, at_least = floor, "at least "
    if 4 * floor <= MAX_MODEL_BYTES:
        with torch.device("meta"):
            model = build(section)
        n, at_least = sum(t.numel() for t in (*model.parameters(), *model.buffers())), ""
    if 4 * n > MAX_MODEL_BYTES:
        raise ValueError(f"{source} asks for a {kind} of {at_least}{n:,} parameters ({4 * n / 1e9:,.1f} GB of "
                         f"float32), more than the {MAX_MODEL_BYTES / 1e9:g} GB a model may have here")
    return n


# --------------------------------------------------------------------------------------------
# Model checkpoints
# --------------------------------------------------------------------------------------------


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a set of tensors' names, dtypes, shapes and bytes: what a model *is*, independent of the
    file's metadata (so re-exporting with new notes keeps it)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(
    path: str | os.PathLike,
    kind: str,
    state_dict: dict[str, torch.Tensor],
    config: Config,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``state_dict`` + metadata to ``path`` (``.safetensors``) and a readable ``.json`` copy.

    ``dtype`` (e.g. ``torch.float16``) stores floating tensors at lower precision (shipped weights).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    weights, meta = encode_model(kind, state_dict, config, extra, dtype)
    atomic_write_bytes(path, weights)
    atomic_write_bytes(path.with_suffix(".json"), meta)
    return path


def encode_model(kind: str, state_dict: dict[str, torch.Tensor], config: Config, extra: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> tuple[bytes, bytes]:
    """``(the .safetensors file, its readable .json copy)`` of :func:`save_model`, as bytes (for
    :func:`commit_files`)."""
    tensors = {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config.to_dict(),
        "extra": extra or {},
        "tensor_digest": tensor_digest(tensors),
    }
    return save(tensors, metadata={"nbutils": json.dumps(meta)}), (json.dumps(meta, indent=2) + "\n").encode()


def read_model(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a checkpoint, with clear errors for every way it can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    try:
        tensors = load(raw)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["nbutils"]) if "nbutils" in header else None
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, or not a safetensors file): {exc}"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is a safetensors file but not an nbutils checkpoint (no metadata)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this nbutils reads version {FORMAT_VERSION}"
        )
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, expected {kind!r}")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("extra", {}), dict):
        raise CheckpointError(f"{path} has malformed metadata (its config and extra must be JSON objects)")
    meta.setdefault("extra", {})
    if kind in ("vae", "unet"):
        try:
            Config.from_dict(meta["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} has a config this nbutils cannot read: {exc}") from None
    recorded, actual = meta.get("tensor_digest"), tensor_digest(tensors)
    if recorded is not None and recorded != actual:
        raise CheckpointError(f"{path}: its weights do not match the digest recorded with them (the file is damaged "
                              "or was edited); use a good copy")
    meta["tensor_digest"] = actual  # files written before digests were recorded get theirs computed
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights (NaN or inf) in {bad[:5]}")
    return tensors, meta


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of the fields where two (nested) config dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, name + ".")
        elif _plain(va) != _plain(vb):
            out.append(f"{name}: checkpoint {_plain(va)!r} vs expected {_plain(vb)!r}")
    return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def load_state_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` with an error that names missing/unexpected/mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"different shapes {shapes[:5]}")
        raise CheckpointError(f"{path} does not fit the model: " + "; ".join(parts))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def file_digest(path: str | os.PathLike, n: int = 12) -> str:
    """First ``n`` hex digits of the file's SHA-256 (identifies a checkpoint for caches)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:n]


# --------------------------------------------------------------------------------------------
# Finding checkpoints: the user's latest run, else the shipped weights
# --------------------------------------------------------------------------------------------


def _run_preset(path: Path) -> str | None:
    try:
        return json.loads(path.with_suffix(".json").read_text())["config"]["preset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_run_file(filename: str, preset: str | None = None) -> Path | None:
    """The most recently written ``runs/*/filename``, or None.

    Runs of ``preset`` come first; runs made with the ``smoke`` preset (tiny test models) are only
    considered when ``preset`` is ``smoke`` itself.
    """
    root = runs_dir()
    if not root.is_dir():
        return None
    found = [p for p in root.glob(f"*/{filename}") if p.is_file()]
    presets = {p: _run_preset(p) for p in found}
    for keep in (lambda q: q == preset, lambda q: q not in ("smoke", None) and preset != "smoke"):
        matching = [p for p in found if keep(presets[p])]
        if matching:
            return max(matching, key=lambda p: p.stat().st_mtime)
    return None


def resolve_checkpoint(filename: str, checkpoint: str | os.PathLike | None = None,
                       preset: str | None = None) -> Path:
    """Where to load ``filename`` (e.g. ``vae.safetensors``) from.

    ``checkpoint`` may be a file or a folder holding ``filename``; without it: the newest
    ``runs/*/filename`` (see :func:`latest_run_file`; ``preset`` defaults to the current one),
    else ``checkpoints/filename`` (shipped with the repository).
    """
    if checkpoint is not None:
        p = Path(checkpoint)
        if not p.exists() and is_hub_id(str(checkpoint)):
            p = hub_download(str(checkpoint))
        if p.is_dir():
            p = p / filename
        if not p.is_file():
            raise CheckpointError(f"no checkpoint at {p}")
        return p
    if preset is None:
        preset = default_preset_name()
    latest = latest_run_file(filename, preset)
    if latest is not None:
        return latest
    shipped = checkpoints_dir() / filename
    if shipped.is_file():
        return shipped
    raise CheckpointError(
        f"no {filename} found in {runs_dir()}/*/ nor in {checkpoints_dir()}; train one first "
        f"(python -m nbutils train-{filename.split('.')[0]})"
    )


def is_hub_id(text: str) -> bool:
    """``owner/name`` as the Hugging Face Hub spells model ids (and not a relative path such as ``runs/x``)."""
    owner, sep, name = text.partition("/")
    return bool(sep and owner and name and "/" not in name and not text.startswith(".")
                and owner not in ("runs", "checkpoints", "data", "notebooks") and not Path(owner).exists())


def hub_download(repo_id: str, **options: Any) -> Path:
    """A Hub model folder, downloaded once into huggingface_hub's cache (then read offline from there);
    ``options`` (revision, cache_dir, token, …) go to ``huggingface_hub.snapshot_download``."""
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=["*.safetensors", "*.json", "*.md"],
                                      **options))
    except Exception as exc:  # offline, no such repository, no access
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{repo_id} is neither a local path nor a reachable Hugging Face Hub model "
                              f"({type(exc).__name__}: {first})") from None


def export_model(src: str | os.PathLike, dst: str | os.PathLike, kind: str, dtype: torch.dtype | None = None,
                 **notes: Any) -> Path:
    """Copy a model checkpoint (weights + metadata), optionally storing floats as ``dtype`` (e.g.
    ``torch.float16`` for shipped weights; loading converts back to float32). ``notes`` (e.g.
    ``trained="…"``, ``sampling_recipe=recipe.to_dict()``) are added to the metadata's ``extra``, for what the run's
    own metadata cannot know. Nothing machine-local (such as the source path) is recorded."""
    tensors, meta = read_model(src, kind)
    extra = {k: v for k, v in meta["extra"].items() if k != "exported_from"}
    extra = dict(extra, stored_dtype=str(dtype or extra.get("stored_dtype", "as trained")), **notes)
    return save_model(dst, kind, tensors, Config.from_dict(meta["config"]), extra, dtype=dtype)


# --------------------------------------------------------------------------------------------
# One model in, one model out (what the VAE and the UNet share)
# --------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, kind: str, build: Callable[[Any], nn.Module]) -> tuple[nn.Module, dict]:
    """``(model, metadata)`` from the checkpoint file ``path``: read and verified (:func:`read_model`), its size
    checked before anything is built (:func:`model_parameters`), then built as ``build(config.<kind>)`` and filled."""
    path = Path(path)
    tensors, meta = read_model(path, kind)
    section = getattr(Config.from_dict(meta["config"]), kind)
    model_parameters(build, section, f"the config in {path}")  # not a doctored multi-GB model
    model = build(section)
    load_state_strict(model, tensors, path)
    meta["path"] = str(path)
    return model, meta


class HubFolderMixin(ModelHubMixin):
    """Hugging Face's ``ModelHubMixin``, with a Hub id downloaded whole (one snapshot into huggingface_hub's cache;
    one clear error when unreachable) before the mixin reads the folder."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None, **model_kwargs: Any):
        source = str(pretrained_model_name_or_path)
        if not Path(source).exists() and is_hub_id(source):
            source = str(hub_download(source, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                      local_files_only=local_files_only, token=token))
        if not Path(source).is_dir():
            raise CheckpointError(f"no model folder at {source}")
        return super().from_pretrained(source, **model_kwargs)


class HubModel(HubFolderMixin):
    """``save_pretrained(folder)``, ``from_pretrained(folder_or_hub_id)`` and ``push_to_hub(repo_id)`` (Hugging
    Face's ``ModelHubMixin``) for one model, the VAE or the UNet, in this project's checkpoint format: the weights
    with their config and the digest of their tensors (checked on load), a ``config.json`` with the architecture,
    and a generated card. A model alone carries no diffusion process or sampling recipe: the whole generator is
    :class:`nbutils.pipeline.Pipeline`, whose ``from_pretrained`` checks that the VAE is the UNet's own.
    ``from_pretrained`` also reads the model out of a pipeline's folder (``UNet.from_pretrained("checkpoints")``)."""

    _kind: str  # the config section and file name: "vae" or "unet"

    def _save_pretrained(self, save_directory: Path) -> None:
        kind = self._kind
        section = self.cfg
        config = Config(preset=f"{kind} alone")
        if kind == "vae":  # the data section says what images the VAE takes
            config = config.replace(data=dataclasses.replace(config.data, image_size=section.image_size,
                                                             channels=section.in_channels))
        config = config.replace(**{kind: section})
        save_model(Path(save_directory) / f"{kind}.safetensors", kind, self.state_dict(), config,
                   {"saved_by": f"{type(self).__name__}.save_pretrained"})
        atomic_write_bytes(Path(save_directory) / "config.json", (json.dumps(
            {"library_name": "nbutils", "kind": kind, "files": {kind: f"{kind}.safetensors"},
             kind: config.to_dict()[kind]}, indent=2) + "\n").encode())

    @classmethod
    def _from_pretrained(cls, *, model_id: str, device: str | torch.device | None = None, **_options: Any):
        model, _ = load_model(resolve_checkpoint(f"{cls._kind}.safetensors", model_id), cls._kind, cls)
        return model.to(pick_device(device)).eval()
