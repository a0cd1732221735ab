"""FID, KID, conditional accuracy, novelty and the ``evaluate`` command."""

import json
import re

import numpy as np
import pytest
import torch

from nbutils import evaluation as E
from nbutils import metrics as M
from nbutils.cli import main
from nbutils.data import CLASS_NAMES


def _gauss(n, mean, std, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(mean, std, size=(n, len(std)))


def test_frechet_distance_closed_form_diagonal():
    # for diagonal covariances the Fréchet distance is Σ (μ1−μ2)² + Σ (σ1 − σ2)²
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rotated_covariances():
    # rotate both Gaussians by the same orthogonal matrix: the distance must not change
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    s1, s2 = np.array([1.0, 2.0, 3.0, 0.5]), np.array([2.0, 2.0, 1.0, 1.0])
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    got = M.frechet_distance(q @ mu1, q @ np.diag(s1**2) @ q.T, q @ mu2, q @ np.diag(s2**2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_matches_scipy_sqrtm_on_random_gaussians():
    from scipy import linalg

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_frechet_distance_with_singular_covariances_is_exact_and_quiet():
    import warnings

    # a dead feature (always 0) makes both covariances singular; the distance lives in the other dimensions
    s1, s2 = np.diag([0.0, 1.0, 4.0]), np.diag([0.0, 9.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = M.frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
    assert got == pytest.approx((1 - 3) ** 2 + (2 - 1) ** 2, rel=1e-9)


def test_fid_from_samples_matches_closed_form():
    std1, std2 = np.array([1.0, 0.5, 2.0]), np.array([1.5, 0.5, 1.0])
    a = _gauss(200_000, [0.0, 0.0, 0.0], std1, 1)
    b = _gauss(200_000, [1.0, 0.0, 0.5], std2, 2)
    expected = 1.0 + 0.25 + ((std1 - std2) ** 2).sum()
    assert M.fid(a, b) == pytest.approx(expected, rel=0.02)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    a = _gauss(2000, [0.0] * 8, np.ones(8), 0)
    assert abs(M.fid(a, a)) < 1e-6
    rng = np.random.default_rng(3)
    ladder = [M.fid(a, a + s * rng.normal(size=a.shape)) for s in (0.1, 0.3, 0.6, 1.0)]
    assert ladder == sorted(ladder) and ladder[0] > 0


def test_kid_is_unbiased_on_equal_distributions_and_positive_on_different():
    a = _gauss(2000, [0.0] * 16, np.ones(16), 0)
    b = _gauss(2000, [0.0] * 16, np.ones(16), 1)
    c = _gauss(2000, [0.3] * 16, np.ones(16), 2)
    same, same_std = M.kid(a, b, subset_size=500, subsets=50)
    diff, _ = M.kid(a, c, subset_size=500, subsets=50)
    assert abs(same) < 3 * same_std + 1e-3
    assert diff > 20 * max(abs(same), same_std)


def test_kid_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same d"):
        M.kid(np.zeros((10, 3)), np.zeros((10, 4)))


def test_conditional_accuracy_and_confusion():
    requested = torch.tensor([0, 0, 1, 1, 2, -1])
    predicted = torch.tensor([0, 1, 1, 1, 0, 5])
    overall, per = M.conditional_accuracy(predicted, requested, num_classes=3)
    assert overall == pytest.approx(3 / 5)
    assert per == pytest.approx([0.5, 1.0, 0.0])
    cm = M.confusion_matrix(predicted, requested, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_nearest_neighbours_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (7, 28, 28), generator=g, dtype=torch.uint8)
    bank = torch.randint(0, 256, (50, 28, 28), generator=g, dtype=torch.uint8)
    d, i = M.nearest_neighbours(q, bank, chunk=3)
    full = torch.cdist(q.flatten(1).double() / 255, bank.flatten(1).double() / 255)
    assert torch.equal(i, full.argmin(1))
    assert torch.allclose(d.double(), full.min(1).values, atol=1e-3)


def test_novelty_flags_copies():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 28, 28), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (10, 28, 28), generator=g, dtype=torch.uint8)
    copies = M.novelty(train[:10], train, test)
    assert copies["ratio"] < 1e-3 and copies["exact_copies"] == 10
    fresh = M.novelty(test, train, test)
    assert fresh["ratio"] == pytest.approx(1.0) and fresh["exact_copies"] == 0


# -- the sample file and the CLI ---------------------------------------------------------------


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 28, 28), np.float32), "labels": np.zeros(4, np.int64)}, "must be uint8"),
        ({"images": np.zeros((4, 32, 32), np.uint8), "labels": np.zeros(4, np.int64)}, r"shape \(N, 28, 28\)"),
        ({"images": np.zeros((4, 28, 28), np.uint8)}, r"missing array\(s\) \['labels'\]"),
        ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.zeros(3, np.int64)}, r"labels must have shape"),
        ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.full(4, 10)}, r"labels must be in"),
        ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.zeros(4, np.float32)}, "must be integers"),
    ],
)
def test_evaluate_rejects_malformed_files(tmp_path, capsys, arrays, message):
    path = _write(tmp_path / "bad.npz", **arrays)
    assert main(["evaluate", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err)


def test_evaluate_rejects_non_npz_and_missing_files(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    assert main(["evaluate", str(junk)]) == 1
    err = capsys.readouterr().err
    assert "is not an .npz file" in err and "allow_pickle" not in err
    assert main(["evaluate", str(tmp_path / "nope.npz")]) == 1
    assert "no sample file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def evaluator():
    from nbutils.classifier import CLASSIFIER_FILE, load_classifier
    from nbutils.config import checkpoints_dir

    if not (checkpoints_dir() / CLASSIFIER_FILE).is_file():
        pytest.skip("no shipped classifier")
    try:
        return E.Evaluator(classifier=load_classifier(checkpoints_dir(), device="cpu")[0])
    except FileNotFoundError as exc:  # no dataset on this machine
        pytest.skip(str(exc))


@pytest.mark.slow
def test_real_test_images_score_the_classifier_accuracy(evaluator):
    imgs, labels = evaluator.test_images[:2000], evaluator.test_labels[:2000]
    res = evaluator.evaluate(imgs, labels, with_novelty=False, with_floor=False, kid_subsets=10)
    _, logits = evaluator.features(imgs)
    assert res["cond_acc"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert res["n"] == 2000 and res["n_ref"] == 10_000
    assert res["fid"] < 1.0  # a subset of the reference itself


def test_shipped_classifier_is_accurate(evaluator):
    assert evaluator.test_accuracy >= 0.93


def test_the_second_shipped_judge_is_accurate_and_sees_differently(evaluator):
    from nbutils.classifier import load_classifier, predict
    from nbutils.config import checkpoints_dir

    vgg, meta = load_classifier(checkpoints_dir(), device="cpu", arch="vgg")
    assert meta["config"]["arch"] == "vgg"
    feats, logits = predict(vgg, evaluator.test_images)
    assert (logits.argmax(1) == evaluator.test_labels).float().mean() >= 0.93
    assert feats.shape == (10_000, 256)  # another feature space than the resnet's 128 numbers


@pytest.mark.slow
def test_evaluate_cli_prints_one_json_object(tmp_path, capsys, evaluator):
    imgs = evaluator.test_images[:300].numpy()
    labels = evaluator.test_labels[:300].numpy()
    path = _write(tmp_path / "real.npz", images=imgs, labels=labels)
    assert main(["evaluate", path, "--n-ref", "1000", "--classifier", "checkpoints"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 300 and out["n_ref"] == 1000 and out["reference"] == "test" and out["judge"] == "resnet"
    for key in ("fid", "kid", "kid_std", "cond_acc", "per_class_acc", "novelty", "floor"):
        assert key in out
    assert set(out["per_class_acc"]) == set(CLASS_NAMES)
    assert out["novelty"]["ratio"] == pytest.approx(1.0, abs=0.05)  # real test images are the novelty yardstick
    second = out["vgg"]  # the second judge, on the same images and reference
    assert second["judge"] == "vgg" and second["classifier"].endswith("classifier_vgg.safetensors")
    assert {"fid", "kid", "cond_acc", "per_class_acc", "floor"} <= set(second) and "novelty" not in second
    assert second["fid"] != out["fid"] and second["cond_acc"] > 0.85
    assert main(["evaluate", path, "--n-ref", "1000", "--judges", "vgg", "--no-novelty"]) == 0
    only = json.loads(capsys.readouterr().out)
    assert only["judge"] == "vgg" and only["fid"] == pytest.approx(second["fid"]) and "resnet" not in only


def test_evaluate_cli_rejects_an_unknown_judge(tmp_path, capsys):
    path = _write(tmp_path / "s.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    assert main(["evaluate", path, "--judges", "resnet,inception"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --judges: unknown judge(s) inception") and "Traceback" not in err


def test_validation_reference_is_a_fixed_part_of_the_training_split():
    val, rest = E.validation_indices()
    assert len(val) == E.VALIDATION_SIZE and len(val) + len(rest) == 60_000
    assert len(set(val.tolist()) | set(rest.tolist())) == 60_000  # disjoint, together all of it
    assert torch.equal(val, E.validation_indices()[0])


@pytest.mark.slow
def test_the_validation_reference_never_touches_the_test_images(tmp_path, evaluator):
    ev = E.Evaluator(classifier_path="checkpoints", cache_dir=tmp_path, reference="val")
    val, rest = E.validation_indices()
    assert torch.equal(ev.ref_images, evaluator.train_images[val]) and len(ev.ref_features) == E.VALIDATION_SIZE
    assert [p.name.split("_")[0] for p in tmp_path.glob("*.npz")] == ["val"]
    with pytest.raises(AttributeError, match="reference is the validation set"):
        _ = ev.test_features
    res = ev.evaluate(ev.ref_images[:2000], ev.ref_labels[:2000], with_novelty=False, kid_subsets=10)
    assert res["reference"] == "val" and res["fid"] < 1.0  # a subset of the reference itself
    assert res["floor"]["cond_acc"] == ev.ref_accuracy and res["floor"]["fid"] < 1.0
    assert set(ev._floor_pool.tolist()).isdisjoint(val.tolist())


@pytest.mark.slow
def test_a_given_classifier_reports_its_own_judge_name(tmp_path):
    from nbutils.classifier import load_classifier

    vgg = load_classifier("checkpoints", device="cpu", arch="vgg")[0]
    assert E.Evaluator(classifier=vgg, cache_dir=tmp_path).arch == "vgg"
    assert [e.arch for e in E.evaluators(("vgg", "vgg"), cache_dir=tmp_path)] == ["vgg"]


@pytest.mark.slow
def test_reference_features_are_cached_per_classifier(tmp_path, evaluator):
    first = E.Evaluator(classifier_path="checkpoints", cache_dir=tmp_path)
    cached = list(tmp_path.glob("test_features_*.npz"))
    assert len(cached) == 1
    second = E.Evaluator(classifier_path="checkpoints", cache_dir=tmp_path)  # read back from the cache
    assert torch.equal(first.test_features, second.test_features)
    assert torch.allclose(first.test_features, evaluator.test_features, atol=1e-5)
    raw = cached[0].read_bytes()  # a cache cut short (a full disk, a killed write by hand): recomputed, not an error
    cached[0].write_bytes(raw[: len(raw) // 2])
    third = E.Evaluator(classifier_path="checkpoints", cache_dir=tmp_path)
    assert torch.equal(first.test_features, third.test_features) and cached[0].read_bytes() == raw
