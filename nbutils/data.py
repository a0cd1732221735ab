"""FashionMNIST: finding the files, checking them, loading them, batching them.

Longer than the ~400 lines a module aims at because file checking (every byte of the IDX files), the
datasets, batching and grid files are all small and belong to the same job: images in, images out.

The dataset is four gzip'd IDX files (LeCun's MNIST format: a big-endian header of a magic number
and the dimensions, then raw uint8 bytes). We read them ourselves — 30 lines, no download needed —
and check every file completely (gzip CRC, magic number, dimensions, exact length), so a damaged file
is reported by name instead of surfacing later as a strange tensor.

Lookup order for the folder holding the files (see ``data/README.md``):

1. an explicit ``root`` argument;
2. ``$FASHION_MNIST_ROOT``;
3. ``data/FashionMNIST/raw/`` in the project folder (where torchvision's download writes);
4. ``/usr/share/datasets/fashion-mnist/`` (Debian/Ubuntu package ``dataset-fashion-mnist``);
5. torchvision's download into ``data/`` (needs internet).

Images are uint8 (N, 28, 28) on disk and in :func:`load_split`; inside the models they are float
(N, 1, 28, 28) in [-1, 1] (:func:`to_model_range`).
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import imagefolder
from .config import ANY_SHAPE_DATASETS, DATASET_SHAPES, data_dir, dataset_name

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

ROOT_ENV = "FASHION_MNIST_ROOT"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# file stem -> (magic number, dimensions)
FILES: dict[str, tuple[int, tuple[int, ...]]] = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}
SPLITS = {"train": "train", "test": "t10k"}


class DatasetNotFoundError(FileNotFoundError):
    """No FashionMNIST files were found in any of the places we look."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but is damaged (truncated, bad CRC, wrong header or length)."""


# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_norm(n): i for i, n in enumerate(CLASS_NAMES)}
_ALIASES.update({"tshirt": 0, "top": 0, "tee": 0, "boot": 9, "ankleboot": 9, "trousers": 1})


def class_index(name: str | int, names: Sequence[str] = CLASS_NAMES) -> int:
    """Class index from an index or a name, forgiving about case and punctuation (``names``: the
    dataset's class names, FashionMNIST's by default).

    >>> class_index("sneaker"), class_index("T-shirt"), class_index("9")
    (7, 0, 9)
    """
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        idx = int(name)
        if 0 <= idx < len(names):
            return idx
        raise ValueError(f"class index {idx} out of range 0..{len(names) - 1}")
    key = _norm(str(name))
    aliases = _ALIASES if tuple(names) == CLASS_NAMES else {_norm(n): i for i, n in enumerate(names)}
    if key in aliases:
        return aliases[key]
    valid = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
    raise ValueError(f"unknown class {name!r}; valid classes: {valid}")


def class_labels(spec: str | int, n: int, names: Sequence[str] = CLASS_NAMES) -> list[int]:
    """``n`` labels from a class spec: ``all`` (cycle through the classes), ``none``/``uncond`` (−1 =
    unconditional), a name or index, or a comma list of them (cycled). Used by ``sample --class`` and the
    widget sampler."""
    key = str(spec).strip().lower()
    if key == "all":
        return [i % len(names) for i in range(n)]
    if key in ("none", "uncond", "unconditional", "-1"):
        return [-1] * n
    parts = [class_index(p, names) for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"class {spec!r} names no class")
    return [parts[i % len(parts)] for i in range(n)]


# --------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------


def _file_in(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_all(folder: Path) -> bool:
    return all(_file_in(folder, stem) is not None for stem in FILES)


def _expand(folder: Path) -> Path:
    """Accept a torchvision-style root (``root/FashionMNIST/raw``) as well as the raw folder."""
    for candidate in (folder, folder / "FashionMNIST" / "raw", folder / "raw"):
        if _has_all(candidate):
            return candidate
    return folder


def how_to_get_data() -> str:
    return (
        "Ways to get FashionMNIST (any one is enough):\n"
        "  1. pass root=DIR (or --data-root DIR) pointing at a folder with the four .gz files;\n"
        f"  2. set ${ROOT_ENV}=DIR;\n"
        f"  3. put the files in {data_dir() / 'FashionMNIST' / 'raw'};\n"
        f"  4. sudo apt-get install dataset-fashion-mnist  (installs them in {SYSTEM_DIR});\n"
        "  5. with internet access, let torchvision download them (download=True, the default)."
    )


def find_raw_dir(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder holding the four FashionMNIST files, following the lookup order above.

    An explicit ``root`` or ``$FASHION_MNIST_ROOT`` is taken at its word: if the files are not there
    that is an error naming the missing files (we do not silently fall back to another copy).
    """
    for origin, given in (("root argument", root), (f"${ROOT_ENV}", os.environ.get(ROOT_ENV))):
        if given:
            folder = _expand(Path(given).expanduser())
            if not _has_all(folder):
                missing = [f"{s}.gz" for s in FILES if _file_in(folder, s) is None]
                raise DatasetNotFoundError(
                    f"{origin} {str(given)!r} does not hold FashionMNIST; missing: {', '.join(missing)}\n"
                    + how_to_get_data()
                )
            return folder

    for folder in (data_dir() / "FashionMNIST" / "raw", SYSTEM_DIR):
        if _has_all(folder):
            return folder

    reason = "download=False"
    if download:
        try:
            return _torchvision_download(data_dir())
        except Exception as exc:  # no internet, no torchvision, ...
            reason = f"download failed: {type(exc).__name__}: {exc}"
    raise DatasetNotFoundError(
        f"FashionMNIST not found in {data_dir() / 'FashionMNIST' / 'raw'} or {SYSTEM_DIR} ({reason}).\n"
        + how_to_get_data()
    )


def _torchvision_download(root: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)
    folder = root / "FashionMNIST" / "raw"
    if not _has_all(folder):
        raise DatasetNotFoundError(f"torchvision download finished but files are missing in {folder}")
    return folder


# --------------------------------------------------------------------------------------------
# Reading IDX files
# --------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike, magic: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Read one IDX file (gzip'd or not) and check it completely; uint8 tensor of ``shape``."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()  # reading to the end verifies the gzip CRC and length
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise CorruptDatasetError(
            f"dataset file {path} is damaged ({type(exc).__name__}: {exc}); "
            "delete it and get a fresh copy.\n" + how_to_get_data()
        ) from exc

    ndim = len(shape)
    header = 4 + 4 * ndim
    expected = header + int(torch.tensor(shape).prod())
    problem = None
    if len(raw) < header:
        problem = f"only {len(raw)} bytes, shorter than the {header}-byte header"
    else:
        got_magic = struct.unpack(">i", raw[:4])[0]
        got_shape = struct.unpack(f">{ndim}i", raw[4:header])
        if got_magic != magic:
            problem = f"magic number {got_magic}, expected {magic}"
        elif tuple(got_shape) != tuple(shape):
            problem = f"dimensions {tuple(got_shape)}, expected {tuple(shape)}"
        elif len(raw) != expected:
            problem = f"{len(raw)} bytes after decompression, expected {expected}"
    if problem:
        raise CorruptDatasetError(
            f"dataset file {path} is damaged: {problem}; delete it and get a fresh copy.\n"
            + how_to_get_data()
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_cached(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = SPLITS[split]
    img_stem, lab_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    images = read_idx(_file_in(Path(folder), img_stem), *FILES[img_stem])
    labels = read_idx(_file_in(Path(folder), lab_stem), *FILES[lab_stem]).long()
    if int(labels.max()) >= NUM_CLASSES:
        raise CorruptDatasetError(f"{folder}/{lab_stem}: label {int(labels.max())} ≥ {NUM_CLASSES}")
    return images, labels


def load_split(
    split: str = "train",
    root: str | os.PathLike | None = None,
    subset: int | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: uint8 (N, 28, 28) and int64 (N,). ``subset`` keeps the first N.

    The files are read and checked once per process; later calls return the cached tensors
    (treat them as read-only).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    folder = find_raw_dir(root, download=download)
    images, labels = _load_cached(str(folder), split)
    if subset is not None:
        if subset <= 0:
            raise ValueError(f"subset must be a positive number of images, got {subset}")
        images, labels = images[:subset], labels[:subset]
    return images, labels


def to_model_range(images: torch.Tensor, shape: tuple[int, int, int] = (1, IMAGE_SIZE, IMAGE_SIZE)) -> torch.Tensor:
    """uint8 images → float32 (N, C, H, W) in [-1, 1], checked against ``shape`` = (C, H, W).

    Accepted layouts: (N, H, W) for one channel, (N, C, H, W), and channel-last (N, H, W, C) for colour
    (how CIFAR-10 and image files store it). Default shape: FashionMNIST's 1×28×28.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    c, h, w = shape
    if images.ndim == 3 and c == 1:
        images = images[:, None]
    elif images.ndim == 4 and c > 1 and tuple(images.shape[1:]) == (h, w, c):
        images = images.permute(0, 3, 1, 2)
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w):
        layouts = f"(N, {h}, {w}) or (N, 1, {h}, {w})" if c == 1 else f"(N, {c}, {h}, {w}) or (N, {h}, {w}, {c})"
        raise ValueError(f"expected images of shape {layouts}, got {tuple(images.shape)}")
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] → uint8 (values are clamped): (N, 1, H, W) or (N, H, W) → (N, H, W);
    colour (N, C, H, W) → channel-last (N, H, W, C), the layout of image files."""
    if x.ndim == 4:
        x = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# --------------------------------------------------------------------------------------------
# Other datasets: the image shape comes from the dataset, not from constants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """What the models need to know about a dataset; ``load(split, root, download, shape)`` returns
    ``(uint8 images (N, C, H, W), int64 labels (N,))``."""

    name: str
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    load: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    any_shape: bool = False  # FakeData: any image_size and channels


def _load_fashion(split: str, root, download: bool, shape) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split(split, root=root, download=download)
    return images[:, None], labels


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # the dataset page's checksum of the binary version
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
CIFAR10_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue 32×32 planes


def _cifar10_source(folder: Path, download: bool) -> Path:
    """The extracted ``cifar-10-batches-bin/`` folder or the ``cifar-10-binary.tar.gz`` archive in ``folder``,
    downloaded there (checksum verified) when there is neither and ``download`` is allowed."""
    for candidate in (folder, folder / CIFAR10_DIR):
        if candidate.name == CIFAR10_DIR and candidate.is_dir():
            return candidate
    archive = folder / CIFAR10_URL.rsplit("/", 1)[1]
    if archive.is_file():
        return archive
    reason = "download=False"
    if download:
        try:
            from torchvision.datasets.utils import download_url

            download_url(CIFAR10_URL, str(folder), md5=CIFAR10_MD5)
            return archive
        except Exception as exc:  # no internet, a checksum mismatch, ...
            reason = f"download failed: {type(exc).__name__}: {exc}"
    raise DatasetNotFoundError(
        f"CIFAR-10 not found in {folder} ({reason}): put the binary version there ({archive.name}, or its "
        f"extracted {CIFAR10_DIR}/ folder; --data-root DIR), or allow the download (internet) from {CIFAR10_URL}. "
        "The Python version (pickles) is not read: unpickling can run code.")


def _read_cifar10_records(raw: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not raw or len(raw) % CIFAR10_RECORD:
        raise CorruptDatasetError(f"{where} is damaged: {len(raw)} bytes, not a whole number of "
                                  f"{CIFAR10_RECORD}-byte records; delete it and get a fresh copy")
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].long()
    if int(labels.max()) >= len(CIFAR10_CLASS_NAMES):
        raise CorruptDatasetError(f"{where} is damaged: label {int(labels.max())} ≥ {len(CIFAR10_CLASS_NAMES)}")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=4)
def _load_cifar10(split: str, root, download: bool, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's binary version (fixed-length records; Krizhevsky 2009), read from its folder or straight out of
    its archive: no pickles, no extraction. ``root`` defaults to ``data/``."""
    source = _cifar10_source(Path(root) if root else data_dir(), download)
    parts = []
    if source.is_dir():
        for name in CIFAR10_FILES[split]:
            path = source / name
            if not path.is_file():
                raise CorruptDatasetError(f"{path} is missing: the {CIFAR10_DIR}/ folder is incomplete")
            parts.append(_read_cifar10_records(path.read_bytes(), str(path)))
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                for name in CIFAR10_FILES[split]:
                    member = tar.getmember(f"{CIFAR10_DIR}/{name}")
                    if not member.isfile():
                        raise KeyError(name)
                    parts.append(_read_cifar10_records(tar.extractfile(member).read(), f"{source}:{name}"))
        except (tarfile.TarError, KeyError, EOFError, zlib.error, OSError) as exc:
            raise CorruptDatasetError(f"{source} is damaged or not the CIFAR-10 binary version "
                                      f"({type(exc).__name__}: {exc}); delete it and get a fresh copy") from None
    images, labels = zip(*parts, strict=True)
    return torch.cat(images), torch.cat(labels)


FAKE_SIZES = {"train": 512, "test": 256}


@functools.lru_cache(maxsize=4)
def _load_fake(split: str, root, download: bool, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``FakeData``: random images of ``shape``, the same every call (seeded per index)."""
    from torchvision.datasets import FakeData  # torchvision's datasets load slowly: only when used

    ds = FakeData(size=FAKE_SIZES[split], image_size=tuple(shape), num_classes=NUM_CLASSES,
                  random_offset=0 if split == "train" else 10**6)
    images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    arrays = [np.asarray(im, dtype=np.uint8).reshape(shape[1], shape[2], -1) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(labels).long()


CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_LOADERS = {
    "fashion_mnist": (CLASS_NAMES, _load_fashion),
    "cifar10": (CIFAR10_CLASS_NAMES, _load_cifar10),
    "fake": (tuple(f"class {i}" for i in range(NUM_CLASSES)), _load_fake),
}
DATASETS: dict[str, DatasetSpec] = {
    name: DatasetSpec(name, DATASET_SHAPES[name][0], DATASET_SHAPES[name][1], names, load,
                      any_shape=name in ANY_SHAPE_DATASETS)
    for name, (names, load) in _LOADERS.items()
}


def _load_folder(split: str, root, download: bool, shape, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return imagefolder.load(imagefolder.scan(name), split)


def dataset_spec(name: str) -> DatasetSpec:
    """The loader, class names and image shape of a dataset, by name (aliases such as ``FashionMNIST`` work;
    ``folder:PATH`` is scanned: :mod:`nbutils.imagefolder`)."""
    name = dataset_name(name)
    if imagefolder.is_folder(name):
        folder = imagefolder.scan(name)
        return DatasetSpec(name, folder.image_size, folder.channels, folder.class_names,
                           functools.partial(_load_folder, name=name))
    return DATASETS[name]


def class_names(data_cfg) -> tuple[str, ...]:
    """The class names of the dataset a ``DataConfig`` names: those it keeps (a folder dataset's), else the named
    dataset's own. Needs no data files, so a trained model names its classes anywhere."""
    return tuple(data_cfg.class_names) or DATASETS[dataset_name(data_cfg.dataset)].class_names


def load_images(data_cfg, split: str = "train", root: str | os.PathLike | None = None, subset: int | None = None,
                download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images (N, C, H, W), int64 labels (N,))`` of the dataset a ``DataConfig`` names, checked
    against its ``image_size`` and ``channels``; ``subset`` keeps the first N."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    spec = dataset_spec(data_cfg.dataset)
    shape = data_cfg.image_shape
    if data_cfg.class_names and tuple(data_cfg.class_names) != spec.class_names:
        raise ValueError(f"{spec.name} now has the classes {', '.join(spec.class_names)}; the config (and the "
                         f"models built with it) has {', '.join(data_cfg.class_names)}")
    images, labels = spec.load(split, str(root) if root else None, download, shape)
    if tuple(images.shape[1:]) != shape:
        raise ValueError(f"{spec.name} images are {tuple(images.shape[1:])}, the config says {shape} "
                         f"(build configs with config.for_dataset(cfg, {spec.name!r}))")
    if subset is not None:
        if subset <= 0:
            raise ValueError(f"subset must be a positive number of images, got {subset}")
        images, labels = images[:subset], labels[:subset]
    return images, labels


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@dataclass
class TensorLoader:
    """Batches of in-memory tensors, shuffled by an explicit ``torch.Generator``.

    FashionMNIST fits in memory many times over, so a ``DataLoader`` with per-item indexing and
    collation only adds overhead; slicing whole batches is several times faster on a CPU.
    With ``shuffle=True`` each epoch draws one permutation from ``generator``; saving
    ``generator.get_state()`` in a checkpoint therefore makes resumed epochs identical.
    """

    tensors: Sequence[torch.Tensor]
    batch_size: int = 128
    shuffle: bool = True
    drop_last: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        lengths = {len(t) for t in self.tensors}
        if len(lengths) != 1:
            raise ValueError(f"tensors have different lengths: {sorted(lengths)}")
        self.n = lengths.pop()
        if self.shuffle and self.generator is None:
            self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else None
        if order is not None:  # tensors kept on a GPU are indexed there (one copy of the order per epoch)
            order = order.to(self.tensors[0].device)
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
            if order is None:
                yield tuple(t[lo:hi] for t in self.tensors)
            else:
                idx = order[lo:hi]
                yield tuple(t[idx] for t in self.tensors)


def make_loader(
    split: str = "train",
    batch_size: int = 128,
    subset: int | None = None,
    shuffle: bool | None = None,
    generator: torch.Generator | None = None,
    root: str | os.PathLike | None = None,
) -> TensorLoader:
    """Batches ``(images, labels)`` of a split, images float (B, 1, 28, 28) in [-1, 1].

    ``shuffle`` defaults to True for ``train`` and False for ``test``.
    """
    images, labels = load_split(split, root=root, subset=subset)
    if shuffle is None:
        shuffle = split == "train"
    return TensorLoader(
        (to_model_range(images), labels), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


def per_class(images: torch.Tensor, labels: torch.Tensor, k: int,
              names: Sequence[str] = CLASS_NAMES) -> torch.Tensor:
    """The first ``k`` images of each class, class by class: shape (classes·k, ...), row-major by class
    (``names``: the dataset's class names, FashionMNIST's by default)."""
    picks = []
    for c, name in enumerate(names):
        idx = (labels == c).nonzero().flatten()[:k]
        if len(idx) < k:
            raise ValueError(f"only {len(idx)} images of class {c} ({name}), need {k}")
        picks.append(images[idx])
    return torch.cat(picks)


# --------------------------------------------------------------------------------------------
# Image grids as files (on screen: nbutils.plotting)
# --------------------------------------------------------------------------------------------


def as_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 numpy (N, H, W) — or (N, H, W, 3) for colour — from uint8 or [-1, 1] float images, with or
    without a channel axis."""
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 4 and x.dtype == torch.uint8:
        if x.shape[1] == 1:
            x = x[:, 0]
        elif x.shape[1] == 3 and x.shape[-1] != 3:
            x = x.permute(0, 2, 3, 1)
    if x.ndim == 4 and x.dtype != torch.uint8 and x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.dtype == torch.uint8 and x.shape[-1] != 3):
        raise ValueError(f"expected images (N, H, W), (N, 1, H, W) or colour (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = to_uint8(x)
    return x.cpu().numpy()


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images into one uint8 array, ``nrow`` images per row (default: a near-square grid).

    Padding is white-ish grey (200) so black garments on a black background stay separable.
    """
    imgs = as_uint8(images)
    n, h, w = imgs.shape[:3]
    ncol = nrow or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncol))
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, *imgs.shape[3:]), 200, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = imgs[i]
    return grid


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int | None = None, scale: int = 2,
              row_labels: Sequence[str] | None = None) -> Path:
    """Write an image grid as an 8-bit PNG (grey, or RGB for colour images; ``scale``× nearest-neighbour
    upsampling), with ``row_labels`` (e.g. class names) written left of the rows. Returns the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    grid = image_grid(images, nrow=nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray(grid, "RGB" if grid.ndim == 3 else "L")
    if row_labels:
        font = ImageFont.load_default()
        margin = 8 + max(int(ImageDraw.Draw(picture).textlength(label, font=font)) for label in row_labels)
        labelled = Image.new(picture.mode, (picture.width + margin, picture.height), "white")
        labelled.paste(picture, (margin, 0))
        draw, row_height = ImageDraw.Draw(labelled), picture.height / len(row_labels)
        for i, label in enumerate(row_labels):
            draw.text((4, (i + 0.5) * row_height), label, fill="black", font=font, anchor="lm")
        picture = labelled
    picture.save(path, format="PNG", optimize=True)
    return path
