"""Every kind of bad input named in the reliability guarantees: a clear message, a non-zero exit
status from the CLI, and no output file written half-way."""

import os

import pytest
import torch

from nbutils import cli
from nbutils.checkpoints import save_model
from nbutils.config import checkpoints_dir, get_config
from nbutils.unet import UNet


def _run(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.fixture()
def smoke_unet_dir(tmp_path):
    """A folder with a well-formed (untrained) smoke UNet checkpoint."""
    cfg = get_config("smoke")
    torch.manual_seed(0)
    save_model(tmp_path / "unet.safetensors", "unet", UNet(cfg.unet).state_dict(), cfg)
    return tmp_path


def test_truncated_unet_checkpoint(smoke_unet_dir, tmp_path, capsys):
    path = smoke_unet_dir / "unet.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "s.npz"
    code, err = _run(["sample", "--checkpoint", str(smoke_unet_dir), "--out", str(out), "--no-progress"], capsys)
    assert code == 1 and "not a readable checkpoint (truncated, or not a safetensors file)" in err
    assert not out.exists()


def test_random_bytes_instead_of_a_checkpoint(tmp_path, capsys):
    (tmp_path / "unet.safetensors").write_bytes(os.urandom(5000))
    code, err = _run(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.png")], capsys)
    assert code == 1 and "not a readable checkpoint" in err
    assert not (tmp_path / "s.png").exists()


def test_checkpoint_of_another_config(tmp_path, capsys):
    cfg = get_config("smoke")
    other = get_config("cpu")  # tensors of the cpu UNet, config of the smoke UNet
    save_model(tmp_path / "unet.safetensors", "unet", UNet(other.unet).state_dict(), cfg)
    code, err = _run(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 1 and "does not fit the model" in err and "different shapes" in err


def test_unet_without_its_vae(smoke_unet_dir, capsys):
    code, err = _run(["sample", "--checkpoint", str(smoke_unet_dir), "--out", str(smoke_unet_dir / "s.npz")], capsys)
    assert code == 1 and "the UNet needs the VAE it was trained with" in err


def test_vae_checkpoint_given_where_a_unet_is_expected(tmp_path, capsys):
    from nbutils.vae import VAE

    cfg = get_config("smoke")
    save_model(tmp_path / "unet.safetensors", "vae", VAE(cfg.vae).state_dict(), cfg)
    code, err = _run(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 1 and "holds a 'vae' model, expected 'unet'" in err


def test_truncated_vae_checkpoint(tmp_path, capsys):
    (tmp_path / "vae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    code, err = _run(["reconstruct", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "r.npz")], capsys)
    assert code == 1 and "not a readable checkpoint" in err


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "must be ≥ 1"),
    (["--steps", "0"], "must be ≥ 1"),
    (["--steps", "-3"], "must be ≥ 1"),
    (["--batch-size", "0"], "must be ≥ 1"),
    (["--n", "ten"], "expected a whole number"),
    (["--sampler", "euler"], "invalid choice"),
])
def test_impossible_numbers_are_usage_errors(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", *args, "--out", str(tmp_path / "s.npz")])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_negative_guidance_and_unknown_class(tmp_path, capsys):
    out = tmp_path / "s.npz"
    code, err = _run(["sample", "--guidance", "-0.5", "--out", str(out)], capsys)
    assert code == 1 and "--guidance must be a finite number from 0 to 100" in err
    # the shipped models, so the check does not depend on what the developer's runs/ holds
    shipped = str(checkpoints_dir())
    code, err = _run(["sample", "--class", "hat", "--checkpoint", shipped, "--out", str(out)], capsys)
    assert code == 1 and "unknown class 'hat'" in err
    for bad in ("400", "400,0", "a,b", "0,100,200"):
        code, err = _run(["sample", "--guidance-interval", bad, "--out", str(out)], capsys)
        assert code == 1 and "--guidance-interval must be LO,HI with 0 ≤ LO ≤ HI" in err, bad
    assert not out.exists()


def test_output_folder_must_exist(tmp_path, capsys):
    code, err = _run(["sample", "--out", str(tmp_path / "missing" / "s.npz")], capsys)
    assert code == 1 and "does not exist (create it first)" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_output_folder_must_be_writable(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _run(["sample", "--out", str(ro / "s.npz")], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 1 and "is not writable" in err


def test_missing_dataset_for_training(tmp_path, capsys):
    code, err = _run(["train-vae", "--preset", "smoke", "--data-root", str(tmp_path), "--run-dir",
                      str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 1 and "error:" in err and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "run" / "vae.safetensors").exists()


def test_wrong_image_shape_and_range_for_the_vae():
    from nbutils.vae import VAE

    vae = VAE(get_config("smoke").vae)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 28, 28\)"):
        vae.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected images in \[-1, 1\]"):
        vae.encode(torch.full((2, 1, 28, 28), 255.0))
    with pytest.raises(TypeError, match="use data.to_model_range"):
        vae.encode(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_batch_size_zero_in_a_config():
    from nbutils.train_vae import train_vae

    cfg = get_config("smoke")
    cfg.train_vae.batch_size = 0
    with pytest.raises(ValueError, match="batch_size must be ≥ 1"):
        train_vae(cfg, run_dir="/tmp/never-written", device="cpu", progress=False)
