"""Datasets beyond FashionMNIST: the image shape comes from the dataset config (28×28×1, 32×32×3, ...).

Training runs here use torchvision's FakeData (random 3×32×32 images, offline), the `fake` dataset.
"""

import json

import numpy as np
import pytest
import torch

from nbutils import cli
from nbutils import data as D
from nbutils.config import Config, for_dataset, get_config
from nbutils.metrics import ssim
from nbutils.unet import UNet
from nbutils.vae import VAE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_for_dataset_sets_the_data_the_vae_and_the_unet_consistently():
    c = get_config("smoke", dataset="cifar10")
    assert (c.data.dataset, c.data.image_size, c.data.channels) == ("cifar10", 32, 3)
    assert (c.vae.in_channels, c.vae.image_size, c.unet.num_classes) == (3, 32, 10)
    f = for_dataset(get_config("smoke"), "fake", image_size=16, channels=1)
    assert (f.data.image_size, f.data.channels, f.vae.image_size, f.vae.in_channels) == (16, 1, 16, 1)
    assert get_config("smoke") == for_dataset(get_config("smoke"), "fashion_mnist")
    assert Config.from_dict(c.to_dict()) == c  # checkpoints remember the dataset
    with pytest.raises(ValueError, match=r"cifar10 images are 3×32×32; got image_size=28, channels=3"):
        for_dataset(get_config("smoke"), "cifar10", image_size=28)
    with pytest.raises(ValueError, match="image_size must be a multiple of 4"):
        for_dataset(get_config("smoke"), "fake", image_size=30)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; valid datasets: fashion_mnist, cifar10, fake"):
        get_config("smoke", dataset="svhn")


@pytest.mark.parametrize("dataset, image, latent", [("fashion_mnist", (1, 28, 28), (4, 7, 7)),
                                                    ("cifar10", (3, 32, 32), (4, 8, 8))])
def test_vae_and_unet_build_for_each_image_shape(dataset, image, latent):
    cfg = get_config("smoke", dataset=dataset)
    torch.manual_seed(0)
    vae, unet = VAE(cfg.vae).eval(), UNet(cfg.unet).eval()
    x = torch.rand(2, *image) * 2 - 1
    with torch.no_grad():
        recon, mean, _ = vae(x)
        z = vae.encode(x)
        eps = unet(z, torch.tensor([10, 900]), torch.tensor([3, 10]))
    assert vae.latent_shape == latent and tuple(mean.shape[1:]) == latent and tuple(z.shape[1:]) == latent
    assert recon.shape == x.shape and eps.shape == z.shape
    with pytest.raises(ValueError, match=r"expected images of shape \(N, " + ", ".join(map(str, image))):
        vae.encode(torch.zeros(2, image[0], image[1] + 4, image[2] + 4))


def test_fake_data_is_deterministic_and_shaped_by_the_config():
    cfg = for_dataset(get_config("smoke"), "fake", image_size=32, channels=3)
    a, ya = D.load_images(cfg.data, "train", subset=100)
    D._load_fake.cache_clear()
    b, yb = D.load_images(cfg.data, "train", subset=100)
    assert a.shape == (100, 3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(ya, yb)
    test, _ = D.load_images(cfg.data, "test")
    assert len(test) == D.FAKE_SIZES["test"] and not torch.equal(test[:100], a)


def test_a_32x32x3_model_trains_samples_and_writes_colour_files(tmp_path, monkeypatch):
    """train-vae and train-unet --dataset fake (8 steps each), then sample: colour images all the way."""
    monkeypatch.setenv("NBUTILS_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    common = ["--preset", "smoke", "--dataset", "fake", "--run-dir", str(run), "--no-progress"]
    assert cli.main(["train-vae", *common]) == 0
    assert cli.main(["train-unet", *common]) == 0
    meta = json.loads((run / "unet.json").read_text())
    assert meta["config"]["data"]["dataset"] == "fake" and meta["config"]["vae"]["in_channels"] == 3
    assert (run / "vae_recon_epoch001.png").is_file() and (run / "unet_samples_epoch001.png").is_file()
    from matplotlib.image import imread

    assert imread(run / "unet_samples_epoch001.png").shape[2] in (3, 4)  # a colour grid
    assert cli.main(["reconstruct", "--checkpoint", str(run), "--n", "5", "--out", str(tmp_path / "r.npz")]) == 0
    with np.load(tmp_path / "r.npz") as f:
        assert f["images"].shape == f["originals"].shape == (5, 32, 32, 3)
        fake, _ = D.load_images(get_config("smoke", dataset="fake").data, "test", subset=5)
        assert np.array_equal(f["originals"], fake.permute(0, 2, 3, 1).numpy())
    assert cli.main(["sample", "--checkpoint", str(run), "--n", "6", "--steps", "4", "--class", "class 3",
                     "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (6, 32, 32, 3) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [3] * 6


def test_cifar10_missing_offline_is_a_clear_error(tmp_path):
    cfg = get_config("smoke", dataset="cifar10")
    D._load_cifar10.cache_clear()
    with pytest.raises(D.DatasetNotFoundError, match=r"CIFAR-10 not found in .*empty \(download=False\): put the "
                                                     r"binary version there.*pickles\) is not read"):
        D.load_images(cfg.data, "train", root=tmp_path / "empty", download=False)


def _cifar_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    """``n`` CIFAR-10 records in the binary version's format: a label byte, then the R, G and B 32×32 planes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    raw = b"".join(bytes([labels[i]]) + images[i].tobytes() for i in range(n))
    return images, labels, raw


def _write_cifar_archive(folder, per_file: int = 3):
    """A small cifar-10-binary.tar.gz as the dataset page ships it (cifar-10-batches-bin/ with six batches)."""
    import io
    import tarfile

    files = {f"data_batch_{i}.bin": _cifar_records(per_file, i) for i in range(1, 6)}
    files["test_batch.bin"] = _cifar_records(per_file, 0)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for name, (_, _, raw) in {**files, "batches.meta.txt": (None, None, b"airplane\nautomobile\n")}.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return files


def test_cifar10_binary_version_is_read_from_its_archive_and_its_folder(tmp_path):
    """No torchvision, no pickles: the records are read straight out of the archive, or out of its extracted folder,
    planes in the right order (a wrong reshape would mix the colour channels)."""
    import tarfile

    files = _write_cifar_archive(tmp_path / "data")
    cfg = get_config("smoke", dataset="cifar10").data
    for root in (tmp_path / "data", tmp_path / "x", tmp_path / "x" / "cifar-10-batches-bin"):
        D._load_cifar10.cache_clear()
        train, ytrain = D.load_images(cfg, "train", root=root, download=False)
        test, ytest = D.load_images(cfg, "test", root=root, download=False)
        want = np.concatenate([files[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
        assert train.shape == (15, 3, 32, 32) and np.array_equal(train.numpy(), want)
        assert ytrain.tolist() == np.concatenate([files[f"data_batch_{i}.bin"][1] for i in range(1, 6)]).tolist()
        assert np.array_equal(test.numpy(), files["test_batch.bin"][0]) and len(ytest) == 3
        if root == tmp_path / "data":  # the next two rounds: the extracted folder, given as its parent and itself
            with tarfile.open(root / "cifar-10-binary.tar.gz") as tar:
                tar.extractall(tmp_path / "x", filter="data")


def test_a_damaged_cifar10_file_is_named(tmp_path):
    _write_cifar_archive(tmp_path)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(_cifar_records(2, 0)[2][:-5])
    D._load_cifar10.cache_clear()
    cfg = get_config("smoke", dataset="cifar10").data
    with pytest.raises(D.CorruptDatasetError, match=r"test_batch.bin is damaged: 6141 bytes, not a whole number of "
                                                    "3073-byte records"):
        D.load_images(cfg, "test", root=tmp_path, download=False)
    with pytest.raises(D.CorruptDatasetError, match=r"data_batch_1.bin is missing"):  # the folder comes first
        D.load_images(cfg, "train", root=tmp_path, download=False)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not a tar")
    (folder / "test_batch.bin").unlink()
    folder.rmdir()
    D._load_cifar10.cache_clear()
    with pytest.raises(D.CorruptDatasetError, match=r"cifar-10-binary.tar.gz is damaged or not the CIFAR-10 binary"):
        D.load_images(cfg, "train", root=tmp_path, download=False)


def test_a_vae_config_for_another_shape_is_refused_before_training(tmp_path):
    import dataclasses

    from nbutils.train_vae import train_vae

    cfg = get_config("smoke", dataset="fake")
    bad = cfg.replace(vae=dataclasses.replace(cfg.vae, in_channels=1))
    with pytest.raises(ValueError, match=r"VAE is configured for 1×32×32 images but fake has 3×32×32.*"
                                         r"--dataset fake"):
        train_vae(bad, run_dir=tmp_path, device="cpu", progress=False, log=lambda m: None)


def test_layouts_and_colour_round_trip():
    g = torch.Generator().manual_seed(0)
    chw = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    x = D.to_model_range(chw, (3, 32, 32))
    assert torch.equal(D.to_model_range(chw.permute(0, 2, 3, 1), (3, 32, 32)), x)  # channel-last input
    assert torch.equal(D.to_uint8(x), chw.permute(0, 2, 3, 1))  # files are channel-last
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 32, 32\) or \(N, 32, 32, 3\)"):
        D.to_model_range(chw[:, :1], (3, 32, 32))
    from nbutils.plotting import image_grid

    assert image_grid(x, nrow=5).shape == (2 + 34, 2 + 5 * 34, 3)


def test_colour_ssim_is_the_mean_of_the_channels():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    per_channel = torch.stack([ssim(a[:, c : c + 1], b[:, c : c + 1]) for c in range(3)]).mean(0)
    assert torch.allclose(ssim(a, b), per_channel, atol=1e-6)
    assert torch.allclose(ssim(a, a), torch.ones(3))
