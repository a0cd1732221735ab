"""The two judges of nbutils.classifier: architectures, augmentations, training, saving and loading."""

import dataclasses

import pytest
import torch

from nbutils import classifier as C
from nbutils.checkpoints import CheckpointError


@pytest.mark.parametrize("arch", C.ARCHS)
def test_each_judge_maps_images_to_features_and_logits(arch):
    cfg = C.CLASSIFIERS[arch]
    model = C.build_classifier(cfg).eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model.features(x).shape == (5, cfg.feature_dim) and model(x).shape == (5, 10)
    with pytest.raises(ValueError, match=r"expected images \(N, 1, 28, 28\)"):
        model.features(torch.zeros(5, 28, 28))


def test_the_judges_differ_in_family_augmentation_loss_and_seed():
    a, b = C.CLASSIFIERS["resnet"], C.CLASSIFIERS["vgg"]
    assert type(C.build_classifier(a)) is not type(C.build_classifier(b))
    assert (a.augment, a.label_smoothing, a.seed) != (b.augment, b.label_smoothing, b.seed)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in C.build_classifier(b).modules())


def test_config_names_its_file_and_rejects_unknown_values():
    assert C.CLASSIFIERS["resnet"].file == "classifier.safetensors"
    assert C.CLASSIFIERS["vgg"].file == "classifier_vgg.safetensors"
    with pytest.raises(ValueError, match="arch must be one of resnet, vgg"):
        C.ClassifierConfig(arch="inception")
    with pytest.raises(ValueError, match="augment must be one of"):
        C.ClassifierConfig(augment="mixup")
    old = {k: v for k, v in C.ClassifierConfig().to_dict().items() if k not in ("arch", "augment")}
    assert C.ClassifierConfig.from_dict(old).arch == "resnet"  # weights saved before there were two


def _dot_image(n: int) -> torch.Tensor:
    x = -torch.ones(n, 1, 28, 28)
    x[:, 0, 14, 3] = 1.0  # one bright pixel near the left edge
    return x


def test_augmentations():
    n = 400
    g = torch.Generator().manual_seed(0)
    flipped = C.augment(_dot_image(n), g, "flip_shift")
    cols = flipped[:, 0].amax(dim=1).argmax(dim=1)  # the bright pixel's column
    assert ((cols >= 22).float().mean() - 0.5).abs() < 0.1  # about half mirrored (to column 24 ± 2)
    erased = C.augment(_dot_image(n), torch.Generator().manual_seed(0), "shift_erase")
    noisy = ((erased > -1) & (erased < 1)).flatten(1).any(1)  # noise: values strictly between −1 and 1
    assert (noisy.float().mean() - 0.5).abs() < 0.1  # about half the images have a rectangle of noise
    clean = erased[~noisy][:, 0]
    assert (clean.amax(dim=1).argmax(dim=1) <= 5).all()  # never flipped, shifted ≤ 2 pixels
    again = C.augment(_dot_image(n), torch.Generator().manual_seed(0), "shift_erase")
    assert torch.equal(erased, again)


@pytest.mark.parametrize("arch", C.ARCHS)
def test_train_save_load_round_trip(arch, tmp_path):
    cfg = dataclasses.replace(C.CLASSIFIERS[arch], epochs=1, train_subset=256, batch_size=64)
    out = tmp_path / cfg.file
    try:
        model, info = C.train_classifier(cfg, out, device="cpu", progress=False, log=lambda _: None)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert 0 <= info["test_accuracy"] <= 1 and out.is_file()
    loaded, meta = C.load_classifier(tmp_path, device="cpu", arch=arch)  # the folder: found by the arch's file
    assert meta["config"]["arch"] == arch and type(loaded) is type(model)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))


def test_resolve_names_the_command_that_makes_a_missing_judge(tmp_path, monkeypatch):
    monkeypatch.setenv("NBUTILS_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="train-classifier --arch vgg"):
        C.resolve_classifier(arch="vgg")
    with pytest.raises(CheckpointError, match="no classifier checkpoint at"):
        C.resolve_classifier(tmp_path, arch="vgg")
    with pytest.raises(ValueError, match="arch must be one of"):
        C.resolve_classifier(arch="inception")
