"""Your own images: ``--dataset folder:PATH`` (nbutils.imagefolder), from the folder scan to a 64×64 colour model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nbutils import cli
from nbutils import data as D
from nbutils import imagefolder as F
from nbutils.config import Config, get_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLASSES = ("red_disc", "green_square", "blue_bar")


def _picture(c: int, i: int, size: int) -> np.ndarray:
    """A coloured shape of class ``c`` on a light background, placed by ``i``."""
    a = np.full((size, size, 3), 230, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cx, cy = size // 3 + (7 * i) % (size // 3), size // 3 + (5 * i) % (size // 3)
    mask = [(xx - cx) ** 2 + (yy - cy) ** 2 < (size // 6) ** 2,
            (abs(xx - cx) < size // 6) & (abs(yy - cy) < size // 6),
            abs(xx - cx) < size // 12][c]
    a[mask] = [(200, 30, 30), (30, 160, 40), (40, 60, 200)][c]
    return a


def write_folder(root, per_class: int = 12, size: int = 64, mode: str = "RGB", classes=CLASSES):
    """One sub-folder of PNGs per class; returns {class: [arrays in file order]}."""
    written = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(per_class):
            im = Image.fromarray(_picture(c % 3, i, size)).convert(mode)
            im.save(root / name / f"{i:03d}.png")
            written[name].append(np.asarray(im))
    return written


def test_a_folder_is_scanned_into_classes_splits_and_one_shape(tmp_path):
    write_folder(tmp_path / "imgs", per_class=12)
    (tmp_path / "imgs" / "red_disc" / "notes.txt").write_text("not an image")  # ignored, as ImageFolder does
    (tmp_path / "imgs" / ".cache").mkdir()  # hidden: not a class
    f = F.scan(tmp_path / "imgs")
    assert f.class_names == tuple(sorted(CLASSES)) and (f.image_size, f.channels) == (64, 3)
    assert len(f.train) == 33 and len(f.test) == 3  # the last tenth (at least one) of each class is held out
    assert [p.name for p, _ in f.test] == ["011.png"] * 3 and [y for _, y in f.test] == [0, 1, 2]
    assert f.name == "folder:" + str((tmp_path / "imgs").resolve()) and F.scan(f.name) == f


def test_fixed_splits_grey_images_and_pixels_round_trip(tmp_path):
    written = write_folder(tmp_path / "imgs" / "train", per_class=3, size=32, mode="L")
    write_folder(tmp_path / "imgs" / "val", per_class=2, size=32, mode="L", classes=CLASSES[:2])
    f = F.scan(tmp_path / "imgs")
    assert f.channels == 1 and f.class_names == tuple(sorted(CLASSES)) and (len(f.train), len(f.test)) == (9, 4)
    images, labels = F.load(f, "train")
    assert images.shape == (9, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    want = np.stack([a for name in sorted(CLASSES) for a in written[name]])
    assert np.array_equal(images[:, 0].numpy(), want)  # PNG is lossless: the pixels come back exactly
    Image.fromarray(_picture(0, 0, 32)).save(tmp_path / "imgs" / "train" / "red_disc" / "colour.png")
    assert F.scan(tmp_path / "imgs").channels == 3  # one colour image makes the dataset colour


@pytest.mark.parametrize("damage, message", [
    (lambda r: Image.new("RGB", (64, 32)).save(r / "red_disc" / "wide.png"),
     r"wide.png is 64×32; images must be square"),
    (lambda r: Image.new("RGB", (30, 30)).save(r / "red_disc" / "odd.png"), r"odd.png is 30×30; .*multiple of 4"),
    (lambda r: Image.new("RGB", (32, 32)).save(r / "red_disc" / "small.png"),
     r"small.png is 32×32 but .* is 64×64: all images must have one size"),
    (lambda r: (r / "red_disc" / "broken.png").write_bytes(b"\x89PNG garbage"), r"broken.png is not a readable image"),
    (lambda r: (r / "empty_class").mkdir(), r"class folder\(s\) without images in .*: empty_class"),
])
def test_a_folder_that_cannot_be_a_dataset_is_one_line_naming_the_file(tmp_path, damage, message):
    write_folder(tmp_path / "imgs", per_class=2)
    damage(tmp_path / "imgs")
    with pytest.raises(F.FolderError, match=message):
        F.scan(tmp_path / "imgs")


def test_folders_without_classes_or_test_images_are_refused(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(F.FolderError, match="has no class sub-folders"):
        F.scan(tmp_path / "none")
    write_folder(tmp_path / "one", per_class=1)
    with pytest.raises(F.FolderError, match="leaves no test images"):
        F.scan(tmp_path / "one")
    write_folder(tmp_path / "split" / "train", per_class=2)
    write_folder(tmp_path / "split" / "test", per_class=1, classes=("cat",))
    with pytest.raises(F.FolderError, match="has classes that .*train has not: cat"):
        F.scan(tmp_path / "split")
    with pytest.raises(SystemExit) as stop:  # argparse: a usage error
        cli.main(["data", "--dataset", f"folder:{tmp_path / 'missing'}"])
    assert stop.value.code == 2


def test_the_config_keeps_the_folder_shape_and_class_names(tmp_path, monkeypatch):
    write_folder(tmp_path / "imgs", per_class=4)
    monkeypatch.chdir(tmp_path)
    cfg = get_config("smoke", dataset="folder:imgs")
    assert cfg.data.dataset == "folder:" + str((tmp_path / "imgs").resolve())  # absolute: resumes from anywhere
    assert (cfg.data.image_size, cfg.data.channels, cfg.vae.image_size, cfg.vae.in_channels) == (64, 3, 64, 3)
    assert cfg.unet.num_classes == 3 and cfg.data.class_names == tuple(sorted(CLASSES))
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.override(["train_unet.lr=0.01"]).cli_flags() == ["--dataset", cfg.data.dataset,
                                                                 "--set", "train_unet.lr=0.01"]
    (tmp_path / "imgs" / "zebra").mkdir()
    Image.fromarray(_picture(0, 0, 64)).save(tmp_path / "imgs" / "zebra" / "a.png")
    with pytest.raises(ValueError, match="now has the classes blue_bar, green_square, red_disc, zebra; the config"):
        D.load_images(cfg.data, "train")
    assert D.class_names(cfg.data) == tuple(sorted(CLASSES))  # from the config: no folder needed


def test_a_64x64_colour_model_trains_on_a_folder_and_samples_by_class_name_after_the_folder_is_gone(
        tmp_path, monkeypatch):
    """The seed's "higher resolution" future work, end to end at smoke size: train-vae and train-unet on 64×64 RGB
    images of three classes, then sample one class by its folder's name with the images moved away."""
    monkeypatch.setenv("NBUTILS_HOME", str(tmp_path / "home"))
    write_folder(tmp_path / "imgs", per_class=12)
    run = tmp_path / "run"
    common = ["--preset", "smoke", "--dataset", f"folder:{tmp_path / 'imgs'}", "--run-dir", str(run), "--no-progress"]
    assert cli.main(["train-vae", *common]) == 0
    assert cli.main(["train-unet", *common]) == 0
    meta = json.loads((run / "unet.json").read_text())
    assert meta["config"]["data"]["class_names"] == sorted(CLASSES) and meta["config"]["unet"]["num_classes"] == 3
    with Image.open(run / "unet_samples_epoch001.png") as grid:
        assert grid.mode == "RGB" and grid.height == 2 * (3 * 66 + 2)  # three class rows of 64-pixel images, ×2
    assert cli.main(["export", str(run), str(tmp_path / "hub")]) == 0  # the card names no path of this machine
    card = (tmp_path / "hub" / "README.md").read_text() + (tmp_path / "hub" / "config.json").read_text()
    assert str(tmp_path) not in card and "images of 3 classes (imgs)" in card
    (tmp_path / "imgs").rename(tmp_path / "elsewhere")
    assert cli.main(["sample", "--checkpoint", str(run), "--n", "4", "--steps", "4", "--class", "green_square",
                     "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (4, 64, 64, 3) and f["labels"].tolist() == [1] * 4
