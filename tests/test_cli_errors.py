"""Every bad input we know of, through the real command line in a fresh process: a non-zero exit, exactly one
``error:`` line on stderr, no traceback, and no file created or changed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from nbutils.checkpoints import read_model, save_model
from nbutils.config import Config, checkpoints_dir

pytestmark = pytest.mark.slow  # a fresh process per case



def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and time of change; a lock file's time changes when a process tries the lock, so only its
    presence counts."""
    return {str(p.relative_to(folder)): (p.stat().st_size, 0 if p.name == ".lock" else p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Damaged and doctored copies of the shipped models, and malformed sample files."""
    d = tmp_path_factory.mktemp("bad")
    shipped = checkpoints_dir()

    def copy(name: str) -> Path:
        folder = d / name
        folder.mkdir()
        for f in ("unet.safetensors", "vae.safetensors"):
            shutil.copy(shipped / f, folder / f)
        return folder

    flipped = copy("flipped")  # one byte of the UNet's last tensor flipped
    raw = bytearray((flipped / "unet.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (flipped / "unet.safetensors").write_bytes(bytes(raw))

    tensors, meta = read_model(shipped / "unet.safetensors", "unet")
    cfg = Config.from_dict(meta["config"])
    nan = copy("nan")  # a NaN weight, with a digest that matches it
    poisoned = dict(tensors)
    name = next(iter(poisoned))
    poisoned[name] = poisoned[name].clone()
    poisoned[name].view(-1)[0] = float("nan")
    save_model(nan / "unet.safetensors", "unet", poisoned, cfg, meta["extra"])

    unrecorded = copy("unrecorded")  # a UNet that does not say which VAE it was trained with
    extra = {k: v for k, v in meta["extra"].items() if not k.startswith("vae_")}
    save_model(unrecorded / "unet.safetensors", "unet", tensors, cfg, extra)

    swapped = copy("swapped")  # another VAE (same architecture, other weights) beside the shipped UNet
    vae_tensors, vae_meta = read_model(shipped / "vae.safetensors", "vae")
    other = {k: v + 1e-3 if v.is_floating_point() else v for k, v in vae_tensors.items()}
    save_model(swapped / "vae.safetensors", "vae", other, Config.from_dict(vae_meta["config"]), vae_meta["extra"])

    huge = copy("huge")  # a UNet whose config asks for a 12 GB model (and whose weights are one number)
    save_model(huge / "unet.safetensors", "unet", {"w": torch.zeros(1)},
               cfg.override(["unet.block_out_channels=8192,16384"]), meta["extra"])

    listcfg = copy("listcfg")  # metadata whose config is a list
    header = {"format_version": 1, "kind": "unet", "config": [1, 2], "extra": {}}
    from safetensors.torch import save

    (listcfg / "unet.safetensors").write_bytes(save({"w": torch.zeros(1)}, metadata={"nbutils": json.dumps(header)}))

    noextra = copy("noextra")  # metadata with no "extra" (no digests, no record of a VAE)
    header = {"format_version": 1, "kind": "unet", "config": meta["config"]}
    (noextra / "unet.safetensors").write_bytes(save(tensors, metadata={"nbutils": json.dumps(header)}))

    (d / "text.npz").write_text("images,labels\n1,2\n")
    with zipfile.ZipFile(d / "bomb.npz", "w") as zf:  # a header that promises 2 million images, and no data
        with zf.open("images.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (2_000_000, 28, 28)})
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(2_000_000, np.int64))
    np.savez(d / "colour.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    (d / "folder.npz").mkdir()
    (d / "empty").mkdir()
    return d


SHIPPED = ["--checkpoint", str(checkpoints_dir())]
CASES = {
    "guidance nan": (["sample", *SHIPPED, "--guidance", "nan", "--out", "{d}/s.npz"], "--guidance must be a finite"),
    "guidance inf": (["sample", *SHIPPED, "--guidance", "inf", "--out", "{d}/s.npz"], "--guidance must be a finite"),
    "guidance huge": (["sample", *SHIPPED, "--guidance", "1e308", "--out", "{d}/s.npz"],
                      "--guidance must be a finite number from 0 to 100"),
    "eta above 1": (["sample", *SHIPPED, "--sampler", "ddim", "--eta", "2", "--out", "{d}/s.npz"], "--eta must be"),
    "eta nan": (["sample", *SHIPPED, "--sampler", "ddim", "--eta", "nan", "--out", "{d}/s.npz"], "--eta must be"),
    "huge seed": (["sample", *SHIPPED, "--seed", "12345678901234567890123", "--out", "{d}/s.npz"], "--seed"),
    "n = 0": (["sample", *SHIPPED, "--n", "0", "--out", "{d}/s.npz"], "--n"),
    "n too large": (["sample", *SHIPPED, "--n", "5000000", "--out", "{d}/s.npz"], "at most 1,000,000"),
    "out is a folder": (["sample", *SHIPPED, "--n", "2", "--out", "{d}/folder.npz"], "is a folder"),
    "out of another kind": (["sample", *SHIPPED, "--out", "{d}/s.txt"], "must end in .npz or .png"),
    "out in a missing folder": (["sample", *SHIPPED, "--out", "{d}/nowhere/s.npz"], "does not exist"),
    "guided steps > steps": (["sample", *SHIPPED, "--steps", "10", "--guided-steps", "12", "--guidance-interval",
                              "0,400", "--out", "{d}/s.npz"], "less than --steps (10)"),
    "timesteps not decreasing": (["sample", *SHIPPED, "--timesteps", "10,20", "--out", "{d}/s.npz"],
                                 "--timesteps must be whole numbers ≥ 0, strictly decreasing"),
    "timesteps not numbers": (["sample", *SHIPPED, "--timesteps", "10,x", "--out", "{d}/s.npz"],
                              "--timesteps must be whole numbers separated by commas"),
    "timesteps past the schedule": (["sample", *SHIPPED, "--timesteps", "1000,5", "--out", "{d}/s.npz"],
                                    "at most 999"),
    "steps and timesteps": (["sample", *SHIPPED, "--steps", "3", "--timesteps", "10,5", "--out", "{d}/s.npz"],
                            "--steps (3) and the 2 --timesteps disagree"),
    "unknown class": (["sample", *SHIPPED, "--class", "sock", "--out", "{d}/s.npz"], "unknown class"),
    "garbage device": (["sample", *SHIPPED, "--out", "{d}/s.npz"], "unknown device 'garbage'"),
    "flipped byte": (["sample", "--checkpoint", "{d}/flipped", "--out", "{d}/s.npz"], "do not match the digest"),
    "NaN weight": (["sample", "--checkpoint", "{d}/nan", "--out", "{d}/s.npz"], "non-finite weights"),
    "VAE not recorded": (["sample", "--checkpoint", "{d}/unrecorded", "--out", "{d}/s.npz"], "--allow-unverified-vae"),
    "swapped VAE": (["sample", "--checkpoint", "{d}/swapped", "--out", "{d}/s.npz"], "is not the VAE"),
    "metadata without extra": (["sample", "--checkpoint", "{d}/noextra", "--out", "{d}/s.npz"],
                               "does not record which VAE"),
    "config is a list": (["sample", "--checkpoint", "{d}/listcfg", "--out", "{d}/s.npz"], "malformed metadata"),
    "batch size 0": (["train-vae", "--preset", "smoke", "--set", "train_vae.batch_size=0", "--run-dir", "{d}/run"],
                     "train_vae.batch_size must be a whole number ≥ 1"),
    "batch size none": (["train-unet", "--preset", "smoke", "--set", "train_unet.batch_size=none", "--run-dir",
                         "{d}/run"], "train_unet.batch_size must be a whole number ≥ 1"),
    "no latent channels": (["train-vae", "--preset", "smoke", "--set", "vae.latent_channels=0", "--run-dir",
                            "{d}/run"], "vae.latent_channels"),
    "lr nan": (["train-unet", "--preset", "smoke", "--set", "train_unet.lr=nan", "--run-dir", "{d}/run"], "lr"),
    "unknown preset": (["train-vae", "--preset", "turbo", "--run-dir", "{d}/run"], "invalid choice: 'turbo'"),
    "resume nothing": (["train-vae", "--preset", "smoke", "--resume", "--run-dir", "{d}/empty"],
                       "cannot resume"),
    "resume in a new folder": (["train-vae", "--preset", "smoke", "--resume", "--run-dir", "{d}/new/run"],
                               "cannot resume"),
    "run folder in use": (["train-vae", "--preset", "smoke", "--run-dir", "{d}/busy"],
                          "is in use by another training process"),
    "garbage device, training": (["train-vae", "--preset", "smoke", "--run-dir", "{d}/new/run"],
                                 "unknown device 'garbage'"),
    "no VAE for a new UNet run": (["train-unet", "--preset", "smoke", "--vae", "{d}/nowhere", "--run-dir",
                                   "{d}/new/run"], "no checkpoint at"),  # fails in the run folder: it goes again
    "huge UNet": (["train-unet", "--preset", "smoke", "--set", "unet.block_out_channels=8192,16384", "--run-dir",
                   "{d}/new/run"], "--set unet.block_out_channels=8192,16384 asks for a UNet of at least"),
    "huge VAE": (["train-vae", "--preset", "smoke", "--set", "vae.block_out_channels=4096,8192,8192", "--run-dir",
                  "{d}/new/run"], "--set vae.block_out_channels=4096,8192,8192 asks for a VAE of at least"),
    "wide attention": (["train-unet", "--preset", "smoke", "--set", "unet.cross_attention_dim=2000000", "--run-dir",
                        "{d}/new/run"], "(2.4 GB of float32), more than the 2 GB"),
    "deep UNet": (["train-unet", "--preset", "smoke", "--set", "unet.layers_per_block=600", "--run-dir",
                   "{d}/new/run"], "1,200 residual blocks"),
    "checkpoint of a huge model": (["sample", "--checkpoint", "{d}/huge", "--out", "{d}/s.npz"],
                                   "huge/unet.safetensors asks for a UNet of at least"),
    "text file": (["evaluate", "{d}/text.npz"], "is not an .npz file"),
    "zip bomb": (["evaluate", "{d}/bomb.npz"], "more than the 1,000,000"),
    "colour samples": (["evaluate", "{d}/colour.npz"], "shape (N, 28, 28)"),
    "n-ref 1": (["evaluate", "{d}/colour.npz", "--n-ref", "1"], "--n-ref must be ≥ 2"),
    "reconstruct n 0": (["reconstruct", *SHIPPED, "--n", "0", "--out", "{d}/r.npz"], "--n"),
}


@pytest.fixture(scope="module")
def busy(files):
    """``files/busy``: a run folder that this process is training in (it holds the folder's lock)."""
    (files / "busy").mkdir()
    with FileLock(files / "busy" / ".lock"):
        yield


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_writes_nothing(case, files, busy):
    argv, message = CASES[case]
    argv = [a.replace("{d}", str(files)) for a in argv]
    env = dict(os.environ, NBUTILS_DEVICE="garbage" if case.startswith("garbage device") else "cpu")
    before = _snapshot(files)
    out = subprocess.run([sys.executable, "-m", "nbutils", *argv], capture_output=True, text=True, env=env,
                         cwd=files, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 or (out.returncode == 2 and "error:" in out.stderr), out.stderr  # argparse adds usage
    assert message in out.stderr, out.stderr
    assert _snapshot(files) == before, "files were created or changed"


@pytest.mark.parametrize("after", [0.05, 0.3, 0.8, 1.1, 1.2, 1.3, 1.5, 2.0])
def test_ctrl_c_during_start_up_is_one_error_line(after):
    """Ctrl-C while Python is still importing torch (``import nbutils`` itself imports nothing heavy)."""
    proc = subprocess.Popen([sys.executable, "-m", "nbutils", "sample", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if "usage:" in out:  # it had done its work (printed its help) before the signal came: nothing to check
        return
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == ["error: interrupted"], err


def test_training_labels_beyond_the_unets_classes_are_one_error_line(tmp_path):
    """The UNet reads label values on the host only on the CPU (on a GPU that would wait for the device every
    step), so training checks its labels once, as they are loaded."""
    out = subprocess.run([sys.executable, "-m", "nbutils", "train-unet", "--preset", "smoke", "--vae",
                          str(checkpoints_dir()), "--set", "unet.num_classes=5", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env=dict(os.environ, NBUTILS_DEVICE="cpu"), cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "error: the training labels must be in 0..4 (unet.num_classes = 5), got values in [0, 9]" in out.stderr
    # the VAE it had copied in goes with the run folder: a retry with another --vae is not given this one instead
    assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").iterdir())


def test_a_vae_other_than_the_run_folders_own_is_one_error_line(files, tmp_path):
    """``--vae`` names a VAE, but the run folder already trains with another: refused, not silently ignored."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(files / "swapped" / "vae.safetensors", run / "vae.safetensors")
    before = (run / "vae.safetensors").read_bytes()
    out = subprocess.run([sys.executable, "-m", "nbutils", "train-unet", "--preset", "smoke", "--vae",
                          str(checkpoints_dir()), "--run-dir", str(run)],
                         capture_output=True, text=True, env=dict(os.environ, NBUTILS_DEVICE="cpu"), cwd=tmp_path,
                         timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr
    assert "already has its own VAE, which is not" in errors[0] and "leave out --vae" in errors[0], errors
    assert (run / "vae.safetensors").read_bytes() == before  # the run's own VAE stays
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["vae.safetensors"]
