"""The command line: ``python -m nbutils COMMAND [options]`` (each command has ``--help``).

Longer than the ~400 lines a module aims at because it holds one short function per command plus the one
argument parser that documents them all; each command only wires library calls together.

Errors a person can fix (missing data, bad arguments, a damaged file) are printed to stderr as one
``error: …`` message and the process exits with status 1 (2 for argument-parsing errors, as argparse
does); nothing is written half-way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import re
import sys
import time
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .checkpoints import CheckpointError, atomic_write_bytes, read_model, resolve_checkpoint, tensor_digest
from .classifier import ARCHS, CLASSIFIERS, train_classifier
from .config import (
    MIXED_PRECISION,
    PRESETS,
    Config,
    default_preset_name,
    get_config,
    make_generator,
    pick_device,
    project_root,
)
from .data import (
    CorruptDatasetError,
    DatasetNotFoundError,
    class_labels,
    dataset_spec,
    find_raw_dir,
    load_images,
    per_class,
    save_grid,
    to_model_range,
    to_uint8,
)
from .data import class_names as dataset_class_names
from .distributed import is_main_process
from .evaluation import REFERENCES, array_header, evaluate_file, evaluators, load_sample_file, to_json
from .grading import DEFAULT_TIMEOUT, grade, write_scores
from .hub import save_pretrained
from .metrics import reconstruction_metrics
from .nbtools import fix_notebook, notebook_paths, notebook_problems
from .pipeline import PRECISIONS, SHIPPED_RECIPE, SamplingRecipe, load_pipeline, load_vae, sample
from .plotting import plot_run
from .samplers import SAMPLERS, SPACINGS
from .train_unet import train_unet
from .train_vae import train_vae
from .training import LOG_WITH, NonFiniteLossError, TrainingInterrupted


class CLIError(Exception):
    """An error whose message is meant for the person at the terminal."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _dataset(text: str) -> str:
    """A dataset name for ``--dataset``: a built-in one or ``folder:PATH`` (checked here, so a typo or a folder
    that cannot be a dataset is a usage error naming the problem)."""
    try:
        return dataset_spec(text).name  # a folder is scanned: classes, one image size
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The most images one command makes or reads: beyond it, memory (not patience) runs out on a laptop.
MAX_IMAGES = 1_000_000


def _count(text: str) -> int:
    """A number of images: 1 … MAX_IMAGES."""
    value = _positive_int(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_IMAGES:,}, got {value:,}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0 … 2^63 − 1, got {value}")
    return value


def _output_path(text: str, suffixes: tuple[str, ...]) -> Path:
    """An output file whose folder exists and is writable, with one of ``suffixes``, that is not a folder."""
    path = Path(text)
    if path.suffix.lower() not in suffixes:
        raise CLIError(f"output {text!r} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise CLIError(f"output {text!r} is a folder; name a file in it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CLIError(f"output folder {str(folder)!r} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"output folder {str(folder)!r} is not writable")
    return path


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _version_of(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cmd_info(args: argparse.Namespace) -> int:
    preset = args.preset or default_preset_name()
    cfg = get_config(preset, dataset=args.dataset)
    try:
        data = str(find_raw_dir(args.data_root, download=False))
    except (DatasetNotFoundError, CorruptDatasetError) as exc:
        data = f"not found ({str(exc).splitlines()[0]})"
    info = {
        "nbutils": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),
        "accelerate": _version_of("accelerate") or "not installed (only needed for several processes: .[distributed])",
        "numpy": np.__version__,
        "device": str(pick_device()),
        "cpu_threads": torch.get_num_threads(),
        "preset": cfg.preset,
        "project_root": str(project_root()),
        "data": data,
    }
    for kind in ("vae", "unet"):
        try:
            path = resolve_checkpoint(f"{kind}.safetensors", None)
            tensors, meta = read_model(path, kind)
            n = sum(t.numel() for name, t in tensors.items() if not name.startswith("latent_"))
            info[f"{kind}_checkpoint"] = f"{path} ({n:,} parameters, {meta['extra'].get('epoch')} epochs)"
        except CheckpointError as exc:
            info[f"{kind}_checkpoint"] = f"none ({exc})"
    if args.json:
        print(to_json(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
        print("config:")
        print("  " + str(cfg).replace("\n", "\n  "))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Check the dataset files, print per-split statistics, optionally write a grid of real images."""
    out = _output_path(args.out, (".png",)) if args.out else None
    t0 = time.perf_counter()
    data_cfg = get_config("smoke", dataset=args.dataset or "fashion_mnist").data
    data_cfg = dataclasses.replace(data_cfg, train_subset=None, test_subset=None)
    names = dataset_class_names(data_cfg)
    if data_cfg.dataset == "fashion_mnist":
        stats = {"folder": str(find_raw_dir(args.data_root, download=not args.no_download))}
    else:
        stats = {"dataset": data_cfg.dataset, "classes": len(names)}
    for split in ("train", "test"):
        images, labels = load_images(data_cfg, split, root=args.data_root, download=not args.no_download)
        x = images.float() / 255
        stats[split] = {
            "images": tuple(images.shape),
            "pixel_mean": round(float(x.mean()), 4),
            "pixel_std": round(float(x.std()), 4),
            "per_class": {name: int((labels == c).sum()) for c, name in enumerate(names)},
        }
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    print(to_json(stats, indent=2))
    if out is not None:
        images, labels = load_images(data_cfg, "train", root=args.data_root, download=False)
        save_grid(per_class(images, labels, args.per_class, names), out, nrow=args.per_class, row_labels=names)
        print(f"wrote {out} (one row per class: {', '.join(names)})", file=sys.stderr)
    return 0


def _preset_config(args: argparse.Namespace, section: str):
    """The preset's config for ``--dataset``, with the ``--set`` assignments and precision flags applied."""
    cfg = get_config(args.preset, dataset=args.dataset).override(args.set or [])
    tc = getattr(cfg, section)
    if args.mixed_precision:
        tc = dataclasses.replace(tc, mixed_precision=args.mixed_precision)
    if args.compile:
        tc = dataclasses.replace(tc, compile=True)
    return cfg.replace(**{section: tc})


def cmd_train_vae(args: argparse.Namespace) -> int:
    cfg = _preset_config(args, "train_vae")
    run_dir = Path(args.run_dir) if args.run_dir else None
    t0 = time.perf_counter()
    vae = train_vae(cfg, run_dir=run_dir, epochs=args.epochs, resume=args.resume, device=args.device,
                    progress=not args.no_progress, data_root=args.data_root, log_with=args.log_with,
                    checkpoint_every=args.checkpoint_every, cuda_graph=args.cuda_graph,
                    log=lambda m: print(m, file=sys.stderr))
    if is_main_process():
        print(to_json({"run_dir": str(run_dir or (project_root() / "runs" / cfg.preset)),
                          "seconds": round(time.perf_counter() - t0, 1),
                          "latent_scale": float(vae.latent_scale)}))
    return 0


def cmd_train_unet(args: argparse.Namespace) -> int:
    cfg = _preset_config(args, "train_unet")
    run_dir = Path(args.run_dir) if args.run_dir else None
    t0 = time.perf_counter()
    train_unet(cfg, run_dir=run_dir, epochs=args.epochs, resume=args.resume, vae_checkpoint=args.vae,
               init_from=args.init_from, teacher=args.teacher,
               device=args.device, progress=not args.no_progress, data_root=args.data_root, log_with=args.log_with,
               checkpoint_every=args.checkpoint_every, cuda_graph=args.cuda_graph,
               log=lambda m: print(m, file=sys.stderr))
    if is_main_process():
        print(to_json({"run_dir": str(run_dir or (project_root() / "runs" / cfg.preset)),
                          "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    out = _output_path(args.out, (".npz", ".png"))
    vae, meta = load_vae(args.checkpoint, device=args.device)
    data_cfg = Config.from_dict(meta["config"]).data  # the dataset the VAE was trained on
    shape = data_cfg.image_shape
    images, labels = load_images(data_cfg, "test", root=args.data_root, subset=args.n)  # uint8 (N, C, H, W)
    if len(images) < args.n:
        raise CLIError(f"--n {args.n} is more than the {len(images)} test images")
    recons = []
    with torch.no_grad():
        for i in range(0, args.n, 500):
            x = to_model_range(images[i : i + 500], shape).to(next(vae.parameters()).device)
            recons.append(to_uint8(vae.decode(vae.encode(x))))
    recon = torch.cat(recons)  # uint8 (N, H, W), or (N, H, W, C) for colour: the file layout
    images = images.permute(0, 2, 3, 1) if shape[0] > 1 else images[:, 0]  # originals in the same layout

    def chw(u8: torch.Tensor) -> torch.Tensor:
        return u8[:, None] if u8.ndim == 3 else u8.permute(0, 3, 1, 2)

    m = reconstruction_metrics(chw(images), chw(recon))
    if out.suffix == ".png":
        k = min(args.n, 10)
        pairs = torch.stack([images[:k * 5], recon[:k * 5]], 1).flatten(0, 1)
        save_grid(pairs, out, nrow=10)
    else:
        _write_npz(out, images=recon.numpy(), originals=images.numpy(), labels=labels.numpy().astype(np.int64))
    print(to_json({"out": str(out), "n": args.n, "checkpoint": meta["path"],
                      **{k: round(v, 5) for k, v in m.items()}}))
    return 0


def _write_npz(out: Path, **arrays) -> None:
    """An ``.npz`` exactly at ``out`` (NumPy appends ``.npz`` to other names, ``X.NPZ`` included), atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())


def sampling_recipe(args: argparse.Namespace, own: SamplingRecipe) -> SamplingRecipe:
    """The recipe a ``sample`` command line asks for: ``--recipe model`` (the default) starts from ``own``, the
    recipe stored with the checkpoint, ``shipped`` from the one ``checkpoints/`` was released with, ``default``
    from :class:`~nbutils.pipeline.SamplingRecipe`'s defaults; every flag given explicitly wins."""
    base = {"model": own, "shipped": SHIPPED_RECIPE, "default": SamplingRecipe()}[args.recipe]
    interval = None
    if args.guidance_interval:
        try:
            interval = tuple(int(v) for v in args.guidance_interval.split(","))
        except ValueError:
            interval = ()
        if len(interval) != 2 or not 0 <= interval[0] <= interval[1]:
            raise CLIError(f"--guidance-interval must be LO,HI with 0 ≤ LO ≤ HI (timesteps), "
                           f"got {args.guidance_interval!r}")
    if args.timesteps is not None:
        try:
            timesteps = tuple(int(v) for v in args.timesteps.split(","))
        except ValueError:
            raise CLIError(f"--timesteps must be whole numbers separated by commas, got {args.timesteps!r}") from None
    given = {"sampler": args.sampler, "steps": args.steps, "guided_steps": args.guided_steps,
             "guidance": args.guidance, "guidance_interval": interval, "timestep_spacing": args.spacing,
             "eta": args.eta, "precision": args.precision}
    try:
        if args.timesteps is not None:  # a list replaces the spacing of the base recipe, then the flags apply
            base = base.replace(steps=None, guided_steps=None, timestep_spacing=None, timesteps=timesteps)
        elif base.timesteps is not None and any(given[k] is not None for k in ("steps", "guided_steps",
                                                                                "timestep_spacing")):
            # a base's list gives way to steps spaced by the flags; the shipped list thins 20 log-SNR steps, so what
            # replaces it is spaced in log-SNR unless --spacing says otherwise
            base = base.replace(timesteps=None, timestep_spacing="logsnr" if base == SHIPPED_RECIPE else None)
        return base.replace(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:  # the recipe's own check, worded with the flags that set each field
        fields = "|".join(_RECIPE_FLAGS)
        raise CLIError(re.sub(rf"(?<![\w-])({fields})(?![\w-])", lambda m: _RECIPE_FLAGS[m[1]], str(exc))) from None


#: Recipe fields and the ``sample`` flags that set them.
_RECIPE_FLAGS = {"guided_steps": "--guided-steps", "guidance_interval": "--guidance-interval",
                 "timestep_spacing": "--spacing", "guidance": "--guidance", "steps": "--steps", "eta": "--eta",
                 "precision": "--precision", "sampler": "--sampler", "timesteps": "--timesteps"}


def _output_folder(text: str) -> Path:
    """``--out DIR/``: a folder for one PNG per image, new or empty, in a folder that exists."""
    path = Path(text)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if path.is_dir() and _partial_path(path).exists():  # a run cut off while writing its PNGs
            raise CLIError(f"output folder {text!r} exists and is not empty: empty it and run the same command "
                           f"again to continue from {_partial_path(path)}, or name a new one")
        raise CLIError(f"output folder {text!r} exists and is not empty (name a new one)")
    if not path.parent.is_dir():
        raise CLIError(f"output folder {str(path.parent)!r} does not exist (create it first)")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise CLIError(f"output folder {str(path if path.exists() else path.parent)!r} is not writable")
    return path


def _write_png_folder(out: Path, images: np.ndarray, labels: np.ndarray, class_names) -> None:
    """One 8-bit PNG per image (what clean-fid and torch-fidelity read) and ``manifest.csv`` (file, label, class)."""
    out.mkdir(exist_ok=True)
    rows = ["file,label,class"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"{i:06d}.png"
        Image.fromarray(image, "RGB" if image.ndim == 3 else "L").save(out / name)
        rows.append(f"{name},{int(label)},{class_names[label] if label >= 0 else 'unconditional'}")
    atomic_write_bytes(out / "manifest.csv", ("\n".join(rows) + "\n").encode())


def _partial_path(out: Path) -> Path:
    """Where ``sample --out OUT`` keeps the batches it has finished while more are to come."""
    return out.parent / f"{out.name}.partial.npz"


@contextlib.contextmanager
def _partial_lock(out: Path, batched: bool):
    """Keeps a second ``sample`` of more than one batch off ``OUT.partial.npz`` (and ``OUT``) while this one samples
    and writes; removes the temporaries of a partial write that was killed. The lock file, hidden beside ``OUT``,
    stays: deleting a Unix lock file on release would let two processes lock two different files of one name."""
    if not batched:
        yield
        return
    path = out.parent / f".{out.name}.lock"
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CLIError(f"another `sample` is writing {out} (lock {path}); wait for it or choose another "
                       "--out") from None
    try:
        for stale in out.parent.glob(f".{_partial_path(out).name}.*.tmp"):  # atomic_write_bytes' temporaries
            stale.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def _sample_in_batches(args: argparse.Namespace, pipe, recipe: SamplingRecipe, out: Path
                       ) -> tuple[np.ndarray, np.ndarray, str, int]:
    """``(images uint8, labels, precision, images resumed from)`` for a ``sample`` command.

    With more than one batch, the images made so far and the noise generator's state are saved after each batch
    in ``OUT.partial.npz`` (arrays only, no pickle), and the same command run again continues from there: the
    result is the one an uninterrupted run gives, as one generator draws every batch's noise in order. The file
    records the settings that shape the result (both models' weights, recipe, n, classes, seed, batch size, device,
    torch); a run with other settings is refused rather than mixed in. Call it under :func:`_partial_lock`."""
    n, batch = args.n, args.batch_size
    labels = torch.tensor(class_labels(args.class_, n, pipe.class_names), dtype=torch.long)
    generator = make_generator(args.seed)
    partial, parts, done = _partial_path(out), [], 0
    settings = ""
    if n > batch:
        settings = json.dumps({"unet": pipe.meta.get("tensor_digest"), "vae": tensor_digest(pipe.vae.state_dict()),
                               "recipe": recipe.to_dict(), "n": n, "seed": args.seed, "batch_size": batch,
                               "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
                               "device": str(pipe.device), "torch": torch.__version__}, sort_keys=True)
        if partial.exists():
            images, state = _read_partial(partial, settings, n, batch, generator)
            parts.append(images)
            done = len(images)
            generator.set_state(torch.from_numpy(state))
            print(f"resuming from {partial}: {done:,} of {n:,} images already made", file=sys.stderr)
    kept, precision = done, ""  # a partial file never holds the last batch, so at least one runs here
    bar = tqdm(total=n, initial=done, unit="img", desc="images", disable=args.no_progress or n <= batch)
    try:
        for start in range(done, n, batch):
            result = sample(pipe, min(batch, n - start), labels[start : start + batch], recipe, generator,
                            batch_size=batch, progress=not args.no_progress)
            parts.append(to_uint8(result.images).numpy())
            if parts[-1].shape[1:] != parts[0].shape[1:]:
                raise CLIError(f"{partial} holds images of shape {parts[0].shape[1:]}, this run makes "
                               f"{parts[-1].shape[1:]}; delete the file to start over")
            precision = result.precision
            bar.update(len(parts[-1]))
            if start + batch < n:
                _write_npz(partial, images=np.concatenate(parts), generator=generator.get_state().numpy(),
                           settings=np.array(settings))
                kept = start + batch
    except KeyboardInterrupt:
        if kept:
            print(f"{kept:,} of {n:,} images are kept in {partial}; run the same command again to continue",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
    return np.concatenate(parts), labels.numpy().astype(np.int64), precision, done


def _read_partial(partial: Path, settings: str, n: int, batch: int, generator: torch.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The images and the generator state in a ``.partial.npz``, which must be this run's. The arrays' headers are
    read first: nothing is decompressed that a run of these settings cannot have written."""
    unreadable = f"{partial} is not a readable partial run"
    try:
        with zipfile.ZipFile(partial) as zf:
            (shape, dtype), (state_shape, state_dtype), (settings_shape, settings_dtype) = (
                array_header(zf, k, partial) for k in ("images", "generator", "settings"))
        if settings_shape != () or settings_dtype.kind != "U" or settings_dtype.itemsize > 4 * 65536:
            raise CLIError(f"{unreadable} (its settings are not one short string); delete it to start over")
        with np.load(partial, allow_pickle=False) as f:
            saved = str(f["settings"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CLIError(f"{unreadable} ({exc}); delete it to start over") from None
    if saved != settings:
        try:
            theirs = json.loads(saved)
        except ValueError:
            theirs = {}
        ours = json.loads(settings)
        differ = [k if isinstance(ours[k], str) and len(ours[k]) == 64 else  # a digest: its name says enough
                  f"{k} {json.dumps(theirs.get(k))} there, {json.dumps(ours[k])} here"
                  for k in sorted(ours) if ours.get(k) != theirs.get(k)]
        raise CLIError(f"{partial} holds an unfinished run with other settings ({'; '.join(differ)}); run that "
                       "command again to finish it, or delete the file to start over")
    if (dtype != np.uint8 or len(shape) not in (3, 4) or not 0 < shape[0] < n or shape[0] % batch
            or math.prod(shape[1:]) > 3 * 512 * 512
            or state_dtype != np.uint8 or state_shape != tuple(generator.get_state().shape)):
        raise CLIError(f"{partial} is damaged (images {dtype} {shape}: not whole batches of {batch} images short "
                       f"of {n}, or a generator state of the wrong size); delete it to start over")
    try:
        with np.load(partial, allow_pickle=False) as f:
            return f["images"], f["generator"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CLIError(f"{unreadable} ({exc}); delete it to start over") from None


def cmd_sample(args: argparse.Namespace) -> int:
    folder = args.out.endswith(("/", os.sep))
    out = _output_folder(args.out) if folder else _output_path(args.out, (".npz", ".png"))
    t0 = time.perf_counter()
    pipe = load_pipeline(args.checkpoint, device=args.device, allow_unverified_vae=args.allow_unverified_vae)
    recipe = sampling_recipe(args, pipe.recipe)
    with _partial_lock(out, args.n > args.batch_size):
        images, labels, precision, resumed = _sample_in_batches(args, pipe, recipe, out)
        if folder:
            _write_png_folder(out, images, labels, pipe.class_names)
        elif out.suffix.lower() == ".png":
            order = np.argsort(labels, kind="stable")  # one class after the other
            per_row = 10 if args.n % 10 == 0 else None
            rows = labels[order].reshape(-1, per_row) if per_row else None
            single = rows is not None and (rows == rows[:, :1]).all() and (rows >= 0).all()
            names = [pipe.class_names[r[0]] for r in rows] if single else None
            save_grid(images[order], out, nrow=per_row, row_labels=names)
        else:  # the keys of this project and, as arr_0 / arr_1, those of ADM-style sample files
            _write_npz(out, images=images, labels=labels, arr_0=images, arr_1=labels)
        if args.n > args.batch_size:  # the run is complete
            _partial_path(out).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    print(to_json({"out": str(out), "n": args.n, **recipe.to_dict(), "precision": precision,
                      "seed": args.seed, "checkpoint": pipe.meta["path"], "seconds": round(seconds, 2),
                      **({"resumed_at": resumed} if resumed else {})}))
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    cfg = dataclasses.replace(CLASSIFIERS[args.arch])
    if args.epochs:
        cfg.epochs = args.epochs
    out = Path(args.out) if args.out else None
    if out is not None:
        out = _output_path(args.out, (".safetensors",))
    _, info = train_classifier(cfg, out, device=args.device, progress=not args.no_progress,
                               data_root=args.data_root)
    print(to_json({"out": info["path"], "test_accuracy": info["test_accuracy"],
                      "seconds": round(sum(r["seconds"] for r in info["history"]), 1)}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.n_ref is not None and args.n_ref < 2:
        raise CLIError(f"--n-ref must be ≥ 2, got {args.n_ref}")
    load_sample_file(args.file)  # fail on a malformed file before loading anything else
    judges = tuple(j.strip() for j in args.judges.split(",") if j.strip())
    unknown = [j for j in judges if j not in ARCHS]
    if not judges or unknown:
        raise CLIError(f"--judges: unknown judge(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(ARCHS)}")
    judges_ = evaluators(judges, reference=args.reference, data_root=args.data_root, classifier_path=args.classifier)
    result = evaluate_file(args.file, n_ref=args.n_ref, evaluator=judges_, with_novelty=not args.no_novelty)
    print(to_json(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run (or checkpoint folder) as a Hub-format folder: weights, config.json, results.json, a model card."""
    results = None
    if args.results:
        try:
            results = json.loads(Path(args.results).read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as exc:
            raise CLIError(f"--results {args.results}: not a JSON record ({exc})") from None
    dtype = {"as-is": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    recipe = SHIPPED_RECIPE if args.recipe == "shipped" else None
    out = save_pretrained(args.source, args.out, results, dtype=dtype, recipe=recipe)
    print(to_json({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's training curves (loss, learning rate, gradient norm, per-epoch metric) into a PNG."""
    out = _output_path(args.out, (".png",))
    fig = plot_run(args.run_dir)
    fig.savefig(out, dpi=110)
    print(to_json({"out": str(out), "run_dir": args.run_dir}))
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    """Check (or with --fix, rewrite) every notebook's Colab badge and setup cell."""
    problems = []
    for path in notebook_paths():
        if args.fix and fix_notebook(path):
            print(f"updated {path.name}")
        problems += notebook_problems(path)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print("run `python -m nbutils notebooks --fix` to rewrite badges and setup cells", file=sys.stderr)
    return 1 if problems else 0


def cmd_grade(args: argparse.Namespace) -> int:
    """Grade submitted notebooks: one CSV row per notebook × exercise (docs/instructors.md)."""
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise CLIError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    missing = [p for p in args.notebooks if not Path(p).is_file()]
    if missing:
        raise CLIError(f"no such notebook: {missing[0]}")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise CLIError(f"--out must be a CSV file in an existing folder, got {out}")
    scores = grade(args.notebooks, out=None, timeout=args.timeout,
                   progress=lambda p: print(f"graded {p}", file=sys.stderr))
    write_scores(scores, out)
    total = sum(s.points for s in scores)
    best = sum(s.max_points for s in scores)
    print(f"{len(args.notebooks)} notebook(s), {len(scores)} exercise(s): {total:g} of {best:g} points -> {out}")
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, help="configuration preset (default: $NBUTILS_PRESET or auto)")
    p.add_argument("--run-dir", help="where checkpoints go (default: runs/PRESET)")
    p.add_argument("--epochs", type=_positive_int, help="total epochs wanted (default: the preset's)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    p.add_argument("--device", help="cpu, cuda, mps (default: auto)")
    p.add_argument("--data-root", help="folder holding the FashionMNIST .gz files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-every", type=_positive_int, default=1, metavar="N",
                   help="save the run (and evaluate the VAE on the test set) every N epochs (default 1); the last "
                        "epoch and Ctrl-C always save")
    p.add_argument("--log-with", choices=tuple(LOG_WITH),
                   help="also log the training curves for TensorBoard in RUN_DIR/tensorboard (needs tensorboard; "
                        "RUN_DIR/*_steps.jsonl and *_history.json are written either way)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION,
                   help="autocast dtype on CUDA: auto = bf16 with --compile on a GPU that has it, else float32 "
                        "(default: the preset's); no effect, with a notice, on a CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; a notice elsewhere)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each training step as one CUDA graph (CUDA, one process; removes the per-step "
                        "launch overhead of small models; elsewhere the same steps run uncaptured)")
    p.add_argument("--dataset", type=_dataset, metavar="NAME",
                   help="train on another dataset: fashion_mnist (default); cifar10 (3×32×32, its binary version "
                        "in --data-root or data/, downloaded there with internet); folder:PATH (your images, one "
                        "sub-folder per class: docs/scaling.md); fake (torchvision FakeData, offline, for tests)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="change one config value of the preset, e.g. --set unet.dropout=0 --set train_unet.lr=2e-4 "
                        "(repeatable; `info --preset P` lists the fields)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nbutils",
        description="FashionMNIST latent diffusion: data, training, sampling and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"nbutils {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="versions, device, preset, data location, configuration")
    p.add_argument("--preset", choices=PRESETS, help="preset to describe (default: $NBUTILS_PRESET or auto)")
    p.add_argument("--dataset", type=_dataset, metavar="NAME",
                   help="the preset for another dataset: fashion_mnist, cifar10, fake or folder:PATH")
    p.add_argument("--data-root", help="folder holding the FashionMNIST .gz files")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("data", help="check the dataset, print statistics, write a grid of real images")
    p.add_argument("--dataset", type=_dataset, metavar="NAME",
                   help="fashion_mnist (default), cifar10, fake or folder:PATH (your images, one sub-folder per class)")
    p.add_argument("--data-root", help="folder holding the FashionMNIST .gz files (or CIFAR-10's binary version)")
    p.add_argument("--out", help="write a PNG grid (one row per class) here")
    p.add_argument("--per-class", type=_positive_int, default=10, help="images per class in the grid")
    p.add_argument("--no-download", action="store_true", help="never try torchvision's download")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train-vae", help="train the VAE (checkpoint every epoch; --resume continues)")
    _training_args(p)
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("train-unet", help="train the latent UNet on a VAE's cached latents (--resume continues)")
    _training_args(p)
    p.add_argument("--vae", help="VAE file or run folder, copied into --run-dir when it has none (default: latest "
                   "run, else shipped); when it has one, --vae must be that VAE")
    p.add_argument("--init-from", metavar="RUN",
                   help="start a new run from RUN's UNet weights (fine-tuning: fresh optimizer, this config's lr)")
    p.add_argument("--teacher", metavar="CHECKPOINT",
                   help="guidance distillation: learn CHECKPOINT's guided output (its recipe's w), to sample unguided")
    p.set_defaults(func=cmd_train_unet)

    p = sub.add_parser("reconstruct", help="encode+decode test images with a VAE; write .npz (or a .png grid)")
    p.add_argument("--n", type=_count, default=1000, help="number of test images (first N)")
    p.add_argument("--checkpoint", help="VAE file or run folder (default: latest run, else shipped weights)")
    p.add_argument("--out", required=True, help="output .npz (images, originals, labels) or .png grid")
    p.add_argument("--device", help="cpu, cuda, mps (default: auto)")
    p.add_argument("--data-root", help="folder holding the FashionMNIST .gz files")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("sample", help="generate images: .npz (images uint8 N×28×28, labels) or a .png grid")
    p.add_argument("--n", type=_count, default=100, help="number of images")
    p.add_argument("--class", dest="class_", default="all",
                   help="class name or index, a comma list, 'all' (cycle through the 10), or 'none' (unconditional)")
    p.add_argument("--recipe", choices=("model", "shipped", "default"), default="model",
                   help="where the sampling settings start: model = the recipe stored with the checkpoint (default), "
                        "shipped = the one checkpoints/ was released with, default = DPM-Solver++ 20 steps, w = 3; "
                        "the flags below, when given, override it")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale w (0 = unconditional)")
    p.add_argument("--guidance-interval", metavar="LO,HI",
                   help="guide only at timesteps LO..HI, plain conditional elsewhere (e.g. 0,400; default: all)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="bf16 = UNet under bfloat16 autocast (faster on CPUs with bf16 support); auto = bf16 where "
                        "supported natively, else fp32")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="default: dpm (DPM-Solver++); dpm-sde is its stochastic version")
    p.add_argument("--steps", type=_positive_int,
                   help="sampling steps (default: ddpm all, 1000 on the linear schedule; ddim 50; dpm 20; dpm-sde 50)")
    p.add_argument("--guided-steps", type=_positive_int, metavar="B",
                   help="of --steps, put B inside --guidance-interval 0,HI and the rest above it, instead of "
                        "spacing all evenly (e.g. --steps 16 --guided-steps 12)")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="timestep spacing (default: the sampler's; with --guided-steps it spaces the guided part, "
                        "trailing or logsnr)")
    p.add_argument("--timesteps", metavar="T1,T2,…",
                   help="visit exactly these timesteps, noisiest first, instead of spacing --steps "
                        "(e.g. 995,902,731,584,415,266,159,91,51,13,0)")
    p.add_argument("--eta", type=float, help="DDIM η (0 = deterministic)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the noise (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=500,
                   help="images per batch (default 500); with more than one batch, finished batches are kept in "
                        "OUT.partial.npz and the same command run again after an interruption continues from there")
    p.add_argument("--checkpoint", help="run folder or unet.safetensors (default: latest run, else shipped)")
    p.add_argument("--allow-unverified-vae", action="store_true",
                   help="use a UNet that does not record which VAE it was trained with (the VAE beside it is then "
                        "not checked)")
    p.add_argument("--out", required=True,
                   help="output .npz (images, labels; also arr_0, arr_1), .png grid (rows labelled by class), or "
                        "DIR/ (one PNG per image and manifest.csv)")
    p.add_argument("--device", help="cpu, cuda, mps (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train-classifier", help="train a FashionMNIST classifier used by the metrics")
    p.add_argument("--arch", choices=ARCHS, default="resnet",
                   help="which of the two judges: resnet (default) or vgg (nbutils.classifier.CLASSIFIERS)")
    p.add_argument("--epochs", type=_positive_int, help="epochs (default: the judge's own, 15 or 10)")
    p.add_argument("--out", help="output .safetensors (default: runs/classifier/classifier[_ARCH].safetensors)")
    p.add_argument("--device", help="cpu, cuda, mps (default: auto)")
    p.add_argument("--data-root", help="folder holding the FashionMNIST .gz files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("evaluate", help="FID, KID, conditional accuracy, novelty and the real-data floor of a "
                                        "sample .npz on both judges, as one JSON object")
    p.add_argument("file", help="a sample file (images uint8 N×28×28, labels int64 N; see `sample --out`)")
    p.add_argument("--reference", choices=REFERENCES, default="test",
                   help="test: the 10,000 test images (numbers to publish; default); val: a fixed 10,000 training "
                        "images (for choosing settings)")
    p.add_argument("--n-ref", type=int, help="number of reference images (default: all 10,000)")
    p.add_argument("--judges", default=",".join(ARCHS),
                   help="comma-separated classifiers that judge: resnet, vgg (default: both; the first one's "
                        "numbers are at the top of the JSON, the others' under their names)")
    p.add_argument("--classifier", help="the first judge's checkpoint (default: runs/classifier, else shipped)")
    p.add_argument("--no-novelty", action="store_true", help="skip the nearest-training-image check")
    p.add_argument("--data-root", help="folder holding the FashionMNIST .gz files")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="a run as a Hub-format folder: weights, config.json and a generated model card")
    p.add_argument("source", help="a run folder (unet.safetensors + the vae.safetensors it was trained with)")
    p.add_argument("out", help="the folder to write (may be SOURCE itself, unless --dtype or --recipe re-encode)")
    p.add_argument("--results", help="a record of `python -m benchmarks judges` (JSON, its last line is used)")
    p.add_argument("--dtype", choices=("as-is", "float16", "bfloat16"), default="as-is",
                   help="store the weights at this precision (the shipped ones are float16); default: as they are")
    p.add_argument("--recipe", choices=("model", "shipped"), default="model",
                   help="the sampling recipe to store with the UNet: its own (default) or the shipped model's")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="draw a run's training curves (loss, lr, gradient norm, epoch metrics) as a PNG")
    p.add_argument("run_dir", help="a run folder (holds vae_steps.jsonl and/or unet_steps.jsonl)")
    p.add_argument("--out", required=True, help="output .png")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("notebooks", help="check every notebook's Colab badge and setup cell (--fix rewrites)")
    p.add_argument("--fix", action="store_true", help="rewrite badges and setup cells from pyproject.toml")
    p.set_defaults(func=cmd_notebooks)

    p = sub.add_parser("grade", help="grade submitted notebooks' exercises into a CSV (instructors)")
    p.add_argument("notebooks", nargs="+", help="the submitted .ipynb files")
    p.add_argument("--out", required=True, help="the scores, one CSV row per notebook × exercise")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds each exercise may run (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=cmd_grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `python -m nbutils info | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
    except (CLIError, DatasetNotFoundError, CorruptDatasetError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a file-size limit, a read-only folder: say which file and why
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if not is_main_process():
            pass  # several training processes: process 0 says it once
        elif isinstance(exc, TrainingInterrupted):
            print(f"error: {exc}", file=sys.stderr)
        else:
            print("error: interrupted", file=sys.stderr)
        return 130
