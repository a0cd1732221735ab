import gzip
import os
from pathlib import Path

import pytest
import torch

from nbutils import data as D

from .conftest import write_idx

REAL = D.SYSTEM_DIR


# -- lookup order -------------------------------------------------------------------------------


def test_explicit_root_is_used(fake_fashion, monkeypatch):
    monkeypatch.delenv(D.ROOT_ENV, raising=False)
    assert D.find_raw_dir(fake_fashion) == fake_fashion


def test_torchvision_style_root_is_accepted(fake_fashion, tmp_path):
    tv_root = tmp_path / "tv"
    (tv_root / "FashionMNIST").mkdir(parents=True)
    fake_fashion.rename(tv_root / "FashionMNIST" / "raw")
    assert D.find_raw_dir(tv_root) == tv_root / "FashionMNIST" / "raw"


def test_env_var_comes_before_project_and_system(fake_fashion, monkeypatch, no_data_anywhere):
    monkeypatch.setenv(D.ROOT_ENV, str(fake_fashion))
    assert D.find_raw_dir() == fake_fashion


def test_root_argument_beats_env_var(fake_fashion, tmp_path, monkeypatch):
    monkeypatch.setenv(D.ROOT_ENV, str(tmp_path / "elsewhere"))
    assert D.find_raw_dir(fake_fashion) == fake_fashion


def test_project_data_dir_beats_system_dir(fake_fashion, tmp_path, monkeypatch, no_data_anywhere):
    home = Path(os.environ["NBUTILS_HOME"])
    (home / "data" / "FashionMNIST").mkdir(parents=True)
    fake_fashion.rename(home / "data" / "FashionMNIST" / "raw")
    monkeypatch.setattr(D, "SYSTEM_DIR", tmp_path)  # would not match anyway
    assert D.find_raw_dir() == home / "data" / "FashionMNIST" / "raw"


def test_system_dir_is_found(fake_fashion, monkeypatch, no_data_anywhere):
    monkeypatch.setattr(D, "SYSTEM_DIR", fake_fashion)
    assert D.find_raw_dir() == fake_fashion


def test_download_is_the_last_resort(fake_fashion, monkeypatch, no_data_anywhere):
    calls = []

    def fake_download(root):
        calls.append(root)
        return fake_fashion

    monkeypatch.setattr(D, "_torchvision_download", fake_download)
    assert D.find_raw_dir() == fake_fashion
    assert calls == [D.data_dir()]
    with pytest.raises(D.DatasetNotFoundError, match="download=False"):
        D.find_raw_dir(download=False)


def test_no_data_anywhere_lists_every_way_to_get_it(no_data_anywhere):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_split("train")
    msg = str(err.value)
    assert "network is unreachable" in msg
    for hint in ("root=", D.ROOT_ENV, "FashionMNIST/raw", "apt-get install dataset-fashion-mnist", "download"):
        assert hint in msg, hint


def test_explicit_root_without_files_names_missing_files(tmp_path, fake_fashion):
    (fake_fashion / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetNotFoundError, match="missing: t10k-labels-idx1-ubyte.gz"):
        D.find_raw_dir(fake_fashion)


# -- integrity ----------------------------------------------------------------------------------


def test_truncated_gz_names_the_file(fake_fashion):
    path = fake_fashion / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(D.CorruptDatasetError, match="train-images-idx3-ubyte.gz is damaged"):
        D.load_split("train", root=fake_fashion)


def test_flipped_byte_fails_crc(fake_fashion):
    path = fake_fashion / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(D.CorruptDatasetError, match="t10k-images-idx3-ubyte.gz"):
        D.load_split("test", root=fake_fashion)


def test_wrong_length_and_header_are_reported(fake_fashion):
    write_idx(fake_fashion / "train-labels-idx1-ubyte", 2049, torch.zeros(39))  # one label short
    with pytest.raises(D.CorruptDatasetError, match=r"dimensions \(39,\), expected \(40,\)"):
        D.load_split("train", root=fake_fashion)
    write_idx(fake_fashion / "train-labels-idx1-ubyte", 2051, torch.zeros(40))  # image magic on labels
    with pytest.raises(D.CorruptDatasetError, match="magic number 2051, expected 2049"):
        D.load_split("train", root=fake_fashion)


def test_extra_bytes_are_reported(fake_fashion):
    path = fake_fashion / "train-labels-idx1-ubyte.gz"
    payload = gzip.decompress(path.read_bytes()) + b"\x00"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(D.CorruptDatasetError, match="49 bytes after decompression, expected 48"):
        D.load_split("train", root=fake_fashion)


def test_uncompressed_files_are_read(fake_fashion):
    gz = fake_fashion / "t10k-labels-idx1-ubyte.gz"
    (fake_fashion / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    _, labels = D.load_split("test", root=fake_fashion)
    assert labels.tolist() == [i % 10 for i in range(20)]


# -- loading ------------------------------------------------------------------------------------


def test_load_split_types_and_subset(fake_fashion):
    images, labels = D.load_split("train", root=fake_fashion)
    assert images.dtype == torch.uint8 and images.shape == (40, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (40,)
    sub_images, sub_labels = D.load_split("train", root=fake_fashion, subset=7)
    assert torch.equal(sub_images, images[:7]) and torch.equal(sub_labels, labels[:7])
    with pytest.raises(ValueError, match="unknown split 'val'; valid splits: train, test"):
        D.load_split("val", root=fake_fashion)
    with pytest.raises(ValueError, match="positive"):
        D.load_split("train", root=fake_fashion, subset=0)


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).repeat(10)[: 3 * 28 * 28].reshape(3, 28, 28)
    y = D.to_model_range(x)
    assert y.shape == (3, 1, 28, 28) and y.dtype == torch.float32
    assert y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(D.to_uint8(y), x)
    with pytest.raises(TypeError, match="uint8"):
        D.to_model_range(x.float())
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        D.to_model_range(torch.zeros(2, 32, 32, dtype=torch.uint8))


def test_loader_covers_everything_once_and_is_deterministic(fake_fashion):
    def epoch(seed):
        loader = D.make_loader("train", batch_size=16, generator=torch.Generator().manual_seed(seed),
                               root=fake_fashion)
        batches = list(loader)
        assert len(loader) == len(batches) == 3
        assert [b[0].shape[0] for b in batches] == [16, 16, 8]
        assert batches[0][0].shape[1:] == (1, 28, 28)
        return torch.cat([b[1] for b in batches]), torch.cat([b[0] for b in batches])

    labels_a, images_a = epoch(1)
    labels_b, images_b = epoch(1)
    labels_c, _ = epoch(2)
    assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)
    assert not torch.equal(labels_a, labels_c)
    assert sorted(labels_a.tolist()) == sorted((torch.arange(40) % 10).tolist())


def test_loader_resumes_from_generator_state():
    g = torch.Generator().manual_seed(3)
    loader = D.TensorLoader((torch.arange(10),), batch_size=4, generator=g)
    list(loader)  # epoch 1
    state = g.get_state()
    epoch2 = [b[0].tolist() for b in loader]
    g2 = torch.Generator()
    g2.set_state(state)
    resumed = [b[0].tolist() for b in D.TensorLoader((torch.arange(10),), batch_size=4, generator=g2)]
    assert resumed == epoch2


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be ≥ 1"):
        D.TensorLoader((torch.zeros(3),), batch_size=0)
    with pytest.raises(ValueError, match="different lengths"):
        D.TensorLoader((torch.zeros(3), torch.zeros(4)))
    loader = D.TensorLoader((torch.arange(10),), batch_size=4, shuffle=False, drop_last=True)
    assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_test_split_is_not_shuffled_by_default(fake_fashion):
    loader = D.make_loader("test", batch_size=5, root=fake_fashion)
    assert next(iter(loader))[1].tolist() == [0, 1, 2, 3, 4]


# -- class names --------------------------------------------------------------------------------


def test_class_names_and_lookup():
    assert len(D.CLASS_NAMES) == 10
    assert D.CLASS_NAMES[7] == "Sneaker" and D.CLASS_NAMES[9] == "Ankle boot"
    assert [D.class_index(n) for n in D.CLASS_NAMES] == list(range(10))
    assert D.class_index("sneaker") == 7
    assert D.class_index("ankle-boot") == 9
    assert D.class_index("t-shirt") == 0
    assert D.class_index(3) == 3 and D.class_index("3") == 3
    with pytest.raises(ValueError, match="unknown class 'sock'; valid classes: 0='T-shirt/top'"):
        D.class_index("sock")
    with pytest.raises(ValueError, match="out of range"):
        D.class_index(10)


def test_per_class_picks_rows_in_class_order(fake_fashion):
    images, labels = D.load_split("train", root=fake_fashion)
    picked = D.per_class(images, labels, 3)
    assert picked.shape == (30, 28, 28)
    assert torch.equal(picked[0], images[0]) and torch.equal(picked[3], images[1])
    with pytest.raises(ValueError, match="only 4 images of class 0"):
        D.per_class(images, labels, 5)


# -- the real dataset (installed by .ci/run) ----------------------------------------------------


@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists() and not os.environ.get("CI"),
                    reason="dataset-fashion-mnist not installed (CI installs it)")
def test_real_dataset_shapes_and_balance():
    D._load_cached.cache_clear()
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = D.load_split(split, download=False)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert torch.bincount(labels).tolist() == [n // 10] * 10
