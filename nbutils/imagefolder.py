"""Your own images as a dataset: an ImageFolder-style directory, one sub-folder per class.

The layout is torchvision's ``ImageFolder``'s (the class names are the sub-folder names, sorted)::

    PATH/CLASS_A/*.png, PATH/CLASS_B/*.jpg, ...            one folder: a test split is held out
    PATH/train/CLASS_A/..., PATH/test/CLASS_A/...          fixed splits (``val`` works as ``test``)

Without ``train/`` and ``test/``, the test split is the last tenth (at least one image) of every class that has
two or more images, in file-name order, so the split is the same on every machine. All images must be square and
of one size, a multiple of 4 (the VAE halves it twice); they are grey (one channel) when every image is grey,
else RGB (grey images among colour ones are converted, an alpha channel is dropped).

Named on the command line and in configs as ``folder:PATH`` (``--dataset folder:PATH``). This module reads only
file headers to describe a folder (:func:`scan`, cheap) and decodes the pixels when asked (:func:`load`). It sits
below :mod:`nbutils.config`, which builds configs from a folder's shape and class names.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

PREFIX = "folder:"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
TEST_SPLIT_NAMES = ("test", "val")
MAX_BYTES = 8 * 2**30  # the decoded images of one split are held in memory


class FolderError(ValueError):
    """An image folder that cannot be a dataset: no classes, no images, mixed sizes, an unreadable file."""


@dataclass(frozen=True)
class ImageFolder:
    """What a folder holds: the class names, the (file, label) pairs of each split, the common image shape."""

    root: Path
    class_names: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]
    test: tuple[tuple[Path, int], ...]
    image_size: int
    channels: int

    @property
    def name(self) -> str:
        """The dataset's name in configs: ``folder:`` and the absolute path."""
        return PREFIX + str(self.root)

    def split(self, split: str) -> tuple[tuple[Path, int], ...]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; valid splits: train, test")
        return self.train if split == "train" else self.test


def is_folder(name: str) -> bool:
    """True for a ``folder:PATH`` dataset name."""
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


def folder_name(name: str) -> str:
    """``folder:PATH`` with PATH made absolute (``~`` expanded): the same run resumes from any working folder."""
    path = name.strip()[len(PREFIX):].strip()
    if not path:
        raise FolderError(f"dataset {name!r} names no folder; expected folder:PATH")
    return PREFIX + str(Path(path).expanduser().resolve())


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_grey(im: Image.Image) -> bool:
    if im.mode in GREY_MODES:
        return True
    if im.mode == "P":  # a palette image is grey when every palette entry is
        palette = np.asarray(im.getpalette() or [], dtype=np.int16).reshape(-1, 3)
        return bool((palette == palette[:, :1]).all())
    return False


def _header(path: Path) -> tuple[tuple[int, int], bool]:
    """(width, height) and whether the image is grey, from the file's header only."""
    try:
        with Image.open(path) as im:
            return im.size, _is_grey(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise FolderError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None


def _stamp(root: Path) -> tuple:
    """The modification times of the folder and of the folders in it, two levels down: they change when an image
    or a class is added, removed or renamed."""
    stamp = [root.stat().st_mtime_ns]
    for sub in _class_folders(root):
        stamp += [sub.name, sub.stat().st_mtime_ns, *(d.stat().st_mtime_ns for d in _class_folders(sub))]
    return tuple(stamp)


def scan(name_or_path: str | os.PathLike) -> ImageFolder:
    """Describe an image folder (``folder:PATH`` or PATH): classes, splits, image size and channels.

    Reads every file's header, not its pixels (once per process while the folder's listing is unchanged); an error
    names the first file that breaks a rule.
    """
    text = str(name_or_path)
    root = Path(folder_name(text if is_folder(text) else PREFIX + text)[len(PREFIX):])
    if not root.is_dir():
        raise FolderError(f"image folder {root} does not exist (expected one sub-folder of images per class)")
    return _scan(root, _stamp(root))


@functools.lru_cache(maxsize=8)
def _scan(root: Path, stamp: tuple) -> ImageFolder:
    subs = {p.name.lower(): p for p in _class_folders(root)}
    test_dir = next((subs[n] for n in TEST_SPLIT_NAMES if n in subs), None)
    if "train" in subs and test_dir is not None:
        train_dir = subs["train"]
        class_names = tuple(p.name for p in _class_folders(train_dir))
        extra = sorted({p.name for p in _class_folders(test_dir)} - set(class_names))
        if extra:
            raise FolderError(f"{test_dir} has classes that {train_dir} has not: {', '.join(extra)}")
        train = [(f, i) for i, c in enumerate(class_names) for f in _images_in(train_dir / c)]
        test = [(f, i) for i, c in enumerate(class_names) if (test_dir / c).is_dir() for f in _images_in(test_dir / c)]
        empty = [c for c in class_names if not _images_in(train_dir / c)]
        where = train_dir
    else:
        class_names = tuple(p.name for p in _class_folders(root))
        train, test, empty = [], [], []
        for i, c in enumerate(class_names):
            files = _images_in(root / c)
            n_test = max(1, len(files) // 10) if len(files) >= 2 else 0
            train += [(f, i) for f in files[: len(files) - n_test]]
            test += [(f, i) for f in files[len(files) - n_test:]]
            empty += [] if files else [c]
        where = root
    if not class_names:
        raise FolderError(f"image folder {where} has no class sub-folders (expected {where}/CLASS_NAME/*.png)")
    if empty:
        raise FolderError(f"class folder(s) without images in {where}: {', '.join(empty)} "
                          f"(images end in {', '.join(sorted(IMAGE_SUFFIXES))})")
    if not test:
        raise FolderError(f"image folder {root} leaves no test images: give a class two or more images, "
                          "or add a test/ folder beside train/")
    size, grey = None, True
    for path, _ in train + test:
        (w, h), is_grey = _header(path)
        if w != h or w % 4:
            raise FolderError(f"{path} is {w}×{h}; images must be square, a multiple of 4 pixels wide "
                              "(resize them first, e.g. with Pillow's Image.resize)")
        if size is None:
            size, first = w, path
        elif w != size:
            raise FolderError(f"{path} is {w}×{h} but {first} is {size}×{size}: all images must have one size")
        grey &= is_grey
    return ImageFolder(root, class_names, tuple(train), tuple(test), size, 1 if grey else 3)


def load(folder: ImageFolder, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images (N, C, H, W), int64 labels (N,))`` of one split, decoded once per process while the
    files are unchanged (treat the tensors as read-only)."""
    files = folder.split(split)
    stamps = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p, _ in files)
    return _decode(stamps, tuple(label for _, label in files), folder.image_size, folder.channels)


@functools.lru_cache(maxsize=4)
def _decode(stamps, labels, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    need = len(stamps) * channels * size * size
    if need > MAX_BYTES:
        raise FolderError(f"{len(stamps)} images of {channels}×{size}×{size} need {need / 2**30:.1f} GiB in memory "
                          f"(at most {MAX_BYTES / 2**30:.0f} GiB): use fewer or smaller images")
    out = np.empty((len(stamps), size, size, channels), dtype=np.uint8)
    for k, (path, _, _) in enumerate(stamps):
        try:
            with Image.open(path) as im:
                if im.size != (size, size):
                    raise FolderError(f"{path} is {im.size[0]}×{im.size[1]}, the folder's images are {size}×{size}")
                pixels = np.asarray(im.convert("L" if channels == 1 else "RGB"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise FolderError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None
        out[k] = pixels.reshape(size, size, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.long)
