"""Shared test helpers: a fake FashionMNIST folder written in the real IDX format."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from nbutils import data as D


def write_idx(path: Path, magic: int, array: torch.Tensor, compress: bool = True) -> Path:
    header = struct.pack(f">i{array.ndim}i", magic, *array.shape)
    payload = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A folder with four small-but-valid IDX files; FILES is patched to their sizes.

    Images are seeded random bytes; labels cycle 0..9 so every class is present.
    """
    n_train, n_test = 40, 20
    monkeypatch.setattr(
        D,
        "FILES",
        {
            "train-images-idx3-ubyte": (2051, (n_train, 28, 28)),
            "train-labels-idx1-ubyte": (2049, (n_train,)),
            "t10k-images-idx3-ubyte": (2051, (n_test, 28, 28)),
            "t10k-labels-idx1-ubyte": (2049, (n_test,)),
        },
    )
    D._load_cached.cache_clear()
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "fake"
    folder.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", 2051, torch.randint(0, 256, (n, 28, 28), generator=g))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", 2049, torch.arange(n) % 10)
    yield folder
    D._load_cached.cache_clear()


@pytest.fixture
def no_data_anywhere(tmp_path, monkeypatch):
    """Hide every place data could come from; make the download fail like it does offline."""
    monkeypatch.delenv(D.ROOT_ENV, raising=False)
    monkeypatch.setenv("NBUTILS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(D, "SYSTEM_DIR", tmp_path / "no-system-dir")

    def offline(root):
        raise OSError("network is unreachable")

    monkeypatch.setattr(D, "_torchvision_download", offline)
    D._load_cached.cache_clear()
    yield
    D._load_cached.cache_clear()
