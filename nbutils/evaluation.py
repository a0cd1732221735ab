"""Evaluating generated images: the sample-file format, the evaluators, and the real-data floor.

A sample file is an ``.npz`` with ``images`` (uint8, (N, 28, 28)) and ``labels`` (int64, (N,), −1 =
unconditional), as ``python -m nbutils sample --out X.npz`` writes it. :class:`Evaluator` holds what the
metrics of :mod:`nbutils.metrics` compare against — one classifier of :mod:`nbutils.classifier` (the judge),
the reference set's features (cached on disk per classifier), the training images for the novelty check —
and reports each result beside the same numbers for real images at the same N (the floor).

Two reference sets: ``test`` (the 10,000 test images; for numbers that are published) and ``val`` (a fixed
10,000 of the training images, :func:`validation_indices`; for choosing recipes and hyper-parameters, so
that the test images never steer a choice). The floor of ``val`` draws from the other 50,000 training images.
:func:`evaluate_all` runs several judges on one set of samples (the ``evaluate`` command: both shipped ones).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .checkpoints import atomic_write_bytes, file_digest
from .classifier import ARCHS, load_classifier, predict
from .config import runs_dir
from .data import CLASS_NAMES
from .metrics import conditional_accuracy, fid, kid, novelty

# --------------------------------------------------------------------------------------------


def check_sample_arrays(images, labels, source: str = "samples") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the sample file format: uint8 (N, 28, 28) images, int (N,) labels in −1..9 (−1 = unconditional)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 (0–255), got {images.dtype}")
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{source}: images must have shape (N, 28, 28), got {images.shape}")
    if len(images) < 2:
        raise ValueError(f"{source}: need at least 2 images, got {len(images)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got {labels.dtype}")
    if labels.shape != (len(images),):
        raise ValueError(f"{source}: labels must have shape ({len(images)},), got {labels.shape}")
    if labels.size and (labels.min() < -1 or labels.max() > 9):
        raise ValueError(f"{source}: labels must be in −1..9 (−1 = unconditional), "
                         f"got values in [{labels.min()}, {labels.max()}]")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


#: The most images a sample file may hold (a guard against files whose arrays would not fit in memory).
MAX_SAMPLES = 1_000_000


def array_header(zf: zipfile.ZipFile, name: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an ``.npz``, read from its header only (nothing is decompressed)."""
    try:
        with zf.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except Exception as exc:
        raise ValueError(f"{path}: the array {name!r} is unreadable ({exc})") from None
    return shape, dtype


def load_sample_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` from a sample ``.npz``, with clear errors.

    The arrays' headers are checked before anything is decompressed, so a malformed or oversized file is
    refused without reading it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sample file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file (a zip of arrays 'images' and 'labels', as `sample` writes)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            missing = [k for k in ("images", "labels") if k not in names]
            if missing:
                raise ValueError(f"{path}: missing array(s) {missing}; a sample file holds 'images' and 'labels' "
                                 f"(found {names})")
            shape, dtype = array_header(zf, "images", path)
            n = shape[0] if shape else 0
            if dtype != np.uint8 or len(shape) not in (3, 4) or tuple(shape[-2:]) != (28, 28) \
                    or (len(shape) == 4 and shape[1] != 1):
                raise ValueError(f"{path}: images must be uint8 of shape (N, 28, 28), got {dtype} {shape}")
            if n > MAX_SAMPLES:
                raise ValueError(f"{path}: {n:,} images is more than the {MAX_SAMPLES:,} a sample file may hold")
            label_shape, _ = array_header(zf, "labels", path)
            if label_shape != (n,):
                raise ValueError(f"{path}: labels must have shape ({n},), got {label_shape}")
            with np.load(path, allow_pickle=False) as f:
                images, labels = f["images"], f["labels"]
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is a damaged .npz file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: could not read its arrays (truncated file?): {exc}") from None
    return check_sample_arrays(images, labels, str(path))


REFERENCES = ("test", "val")
VALIDATION_SIZE = 10_000


def validation_indices(n_train: int = 60_000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(validation, rest)``: indices into the training split, a fixed random draw of :data:`VALIDATION_SIZE`
    images (the ``val`` reference) and the others (where the ``val`` floor draws from)."""
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(2026))
    k = min(VALIDATION_SIZE, n_train // 2)
    return perm[:k], perm[k:]


def _read_feature_cache(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached test-set features and logits, or None when the cache is missing, damaged or of another size."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            features, logits = np.asarray(f["features"]), np.asarray(f["logits"])
    except Exception:  # truncated, not a zip, missing arrays: recompute
        return None
    if len(features) != n or len(logits) != n or not (np.isfinite(features).all() and np.isfinite(logits).all()):
        return None
    return torch.from_numpy(features), torch.from_numpy(logits)


class Evaluator:
    """Everything the generation metrics of one judge compare against, computed once and cached.

    Holds the classifier (``arch`` names which of the shipped ones when ``classifier`` is not given), the
    reference set's features (cached on disk per classifier and reference), and the training images for the
    novelty check. ``reference``: ``test`` or ``val`` (see the module docstring).
    """

    def __init__(self, classifier=None, device=None, data_root=None, cache_dir: str | Path | None = None,
                 classifier_path: str | Path | None = None, arch: str = "resnet", reference: str = "test"):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
        self._predict = predict
        self.classifier, self.classifier_meta = (classifier, {"path": "(given)"}) if classifier is not None \
            else load_classifier(classifier_path, device=device or "cpu", arch=arch)
        own = getattr(getattr(classifier, "cfg", None), "arch", None)  # a given classifier knows its architecture
        self.arch = self.classifier_meta.get("config", {}).get("arch", arch) if classifier is None else own or arch
        self.reference_split = reference
        self.test_images, self.test_labels = D.load_split("test", root=data_root)
        self.train_images, self.train_labels = D.load_split("train", root=data_root)
        if reference == "test":
            self.ref_images, self.ref_labels = self.test_images, self.test_labels
            self._floor_pool = torch.arange(len(self.train_images))
        else:
            val, self._floor_pool = validation_indices(len(self.train_images))
            self.ref_images, self.ref_labels = self.train_images[val], self.train_labels[val]
        digest = file_digest(self.classifier_meta["path"]) if classifier is None else None
        cache = Path(cache_dir) if cache_dir is not None else runs_dir() / "eval_cache"
        cache_file = cache / f"{reference}_features_{digest}.npz" if digest else None
        cached = _read_feature_cache(cache_file, len(self.ref_images)) if cache_file is not None else None
        if cached is not None:
            self.ref_features, self.ref_logits = cached
        else:
            self.ref_features, self.ref_logits = predict(self.classifier, self.ref_images)
            if cache_file is not None:  # (re)written whole: a damaged cache is replaced, never trusted
                buf = io.BytesIO()
                np.savez(buf, features=self.ref_features.numpy(), logits=self.ref_logits.numpy())
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(cache_file, buf.getvalue())
        #: the judge's accuracy on the reference images (on ``val``: images it was trained on, so optimistic)
        self.ref_accuracy = float((self.ref_logits.argmax(1) == self.ref_labels).float().mean())
        self._floors: dict[tuple, dict] = {}  # the floor depends only on (n, n_ref, kid_subsets)

    # the reference under the names of the test split, which it is by default
    @property
    def test_features(self) -> torch.Tensor:
        return self._test_only(self.ref_features)

    @property
    def test_logits(self) -> torch.Tensor:
        return self._test_only(self.ref_logits)

    @property
    def test_accuracy(self) -> float:
        return self._test_only(self.ref_accuracy)

    def _test_only(self, value):
        if self.reference_split != "test":
            raise AttributeError("this evaluator's reference is the validation set; use ref_features, ref_logits, "
                                 "ref_accuracy")
        return value

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._predict(self.classifier, images)

    def reference(self, n_ref: int | None = None) -> torch.Tensor:
        return self.ref_features[: n_ref or len(self.ref_features)]

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, n_ref: int | None = None,
                 with_novelty: bool = True, with_floor: bool = True, kid_subsets: int = 100) -> dict:
        """The metrics of one set of samples (uint8 (N, 28, 28) or [-1, 1]), with the floor beside them."""
        t0 = time.perf_counter()
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels).long()
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        ref = self.reference(n_ref)
        feats, logits = self.features(images)
        pred = logits.argmax(1)
        acc, per = conditional_accuracy(pred, labels)
        k_mean, k_std = kid(feats, ref, subsets=kid_subsets)
        out = {
            "n": len(images),
            "n_ref": len(ref),
            "reference": self.reference_split,
            "fid": fid(feats, ref),
            "kid": k_mean,
            "kid_std": k_std,
            "cond_acc": acc,
            "per_class_acc": dict(zip(CLASS_NAMES, per, strict=True)),
        }
        if with_novelty:
            n = min(len(images), len(self.test_images))
            out["novelty"] = novelty(images, self.train_images, self.test_images[:n])
        if with_floor:
            out["floor"] = self.floor(len(images), n_ref, kid_subsets)
        out["judge"] = self.arch
        out["classifier"] = self.classifier_meta["path"]
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out

    def floor(self, n: int, n_ref: int | None = None, kid_subsets: int = 100) -> dict:
        """The metrics of ``n`` real training images (a fixed random draw, never from the reference) against the
        same reference; conditional accuracy of the floor = the judge's accuracy on the reference images."""
        key = (n, n_ref, kid_subsets)
        if key in self._floors:
            return self._floors[key]
        ref = self.reference(n_ref)
        g = torch.Generator().manual_seed(1234)
        idx = self._floor_pool[torch.randperm(len(self._floor_pool), generator=g)[:n]]
        feats, _ = self.features(self.train_images[idx])
        k_mean, k_std = kid(feats, ref, subsets=kid_subsets)
        self._floors[key] = {"what": f"{len(idx)} real training images", "fid": fid(feats, ref), "kid": k_mean,
                             "kid_std": k_std, "cond_acc": self.ref_accuracy}
        return self._floors[key]


def evaluators(archs: tuple[str, ...] = ARCHS, reference: str = "test", device=None, data_root=None,
               classifier_path: str | Path | None = None, cache_dir: str | Path | None = None) -> list[Evaluator]:
    """One :class:`Evaluator` per judge (default: both shipped ones); ``classifier_path`` is the first one's."""
    archs = tuple(dict.fromkeys(archs))  # each judge once
    if not archs:
        raise ValueError("no judge named")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"unknown judge(s) {', '.join(unknown)}; valid: {', '.join(ARCHS)}")
    return [Evaluator(device=device, data_root=data_root, arch=a, reference=reference, cache_dir=cache_dir,
                      classifier_path=classifier_path if i == 0 else None) for i, a in enumerate(archs)]


def evaluate_all(images: torch.Tensor, labels: torch.Tensor, judges: list[Evaluator], **kwargs) -> dict:
    """The first judge's :meth:`Evaluator.evaluate` at the top level (novelty too), each further judge's under its
    name: ``{"fid": …, "cond_acc": …, …, "vgg": {"fid": …, "cond_acc": …, "floor": …}}``."""
    out = judges[0].evaluate(images, labels, **kwargs)
    for judge in judges[1:]:
        other = judge.evaluate(images, labels, **{**kwargs, "with_novelty": False})
        out[judge.arch] = {k: v for k, v in other.items() if k not in ("n", "n_ref", "reference")}
    return out


def evaluate_file(path: str | Path, n_ref: int | None = None, evaluator: Evaluator | list[Evaluator] | None = None,
                  **kwargs) -> dict:
    """:func:`evaluate_all` on a sample ``.npz`` (the ``evaluate`` CLI command); default judges: both shipped."""
    images, labels = load_sample_file(path)
    judges = evaluator if isinstance(evaluator, list) else [evaluator] if evaluator is not None else evaluators()
    result = evaluate_all(images, labels, judges, n_ref=n_ref, **kwargs)
    result["file"] = str(path)
    return result


def to_json(result: dict, **kwargs) -> str:
    """JSON with NaN and infinities written as null: valid JSON always (RFC 8259 has neither); ``kwargs`` go to
    :func:`json.dumps`."""

    def clean(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(result), allow_nan=False, **kwargs)
