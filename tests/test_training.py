"""The shared training machinery: what it refuses to load, and the second training phase."""

import os
import pickle

import pytest
import torch

from nbutils import training as TR
from nbutils.checkpoints import CheckpointError
from nbutils.config import get_config


class _RunsCode:
    """A pickle that runs a command when unpickled (what a crafted training-state file would hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_state_file_is_refused_without_running_code(tmp_path):
    """``--resume`` and ``--init-from`` read state files handed over by others: unpickling must not run code."""
    marker = tmp_path / "pwned"
    path = tmp_path / "vae_state.pt"
    torch.save({"config": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="not a readable training state"):
        TR.read_state(path)
    from nbutils.train_vae import train_vae

    with pytest.raises(CheckpointError, match="not a readable training state"):
        train_vae(get_config("smoke"), run_dir=tmp_path, resume=True, device="cpu", progress=False, log=lambda m: None)
    assert not marker.exists()
    with open(path, "rb") as f:  # the file really is a code-running pickle (so the test could fail)
        with pytest.raises(Exception):  # noqa: B017 - torch's zip format is not a plain pickle either way
            pickle.load(f)


def test_lr_warm_up_counts_from_the_phase_start():
    tc = get_config("shipped").train_unet
    assert TR.lr_at(0, tc, 200) == pytest.approx(tc.lr / 200) and TR.lr_at(500, tc, 200) == tc.lr


def test_shipped_preset_is_the_release_recipe():
    """The `shipped` preset is how checkpoints/ was trained: the cpu VAE for 4 epochs; a (64, 128) UNet without
    dropout on the cosine schedule with v-prediction, 16 epochs at lr 1e-3, then 24 at 1e-4."""
    from nbutils.pipeline import load_unet, load_vae

    cfg = get_config("shipped")
    _, unet_meta = load_unet("checkpoints", device="cpu")
    _, vae_meta = load_vae("checkpoints", device="cpu")
    shipped = unet_meta["config"]
    assert list(cfg.unet.block_out_channels) == shipped["unet"]["block_out_channels"]
    for section in ("unet", "diffusion"):
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in vars(getattr(cfg, section)).items()} \
            == shipped[section], section
    assert cfg.vae.block_out_channels == tuple(vae_meta["config"]["vae"]["block_out_channels"])
    assert cfg.train_vae.epochs == vae_meta["extra"]["epoch"] == 4
    assert (cfg.train_unet.epochs, cfg.train_unet.lr) == (16, 1e-3)
    assert (cfg.finetune_unet.epochs, cfg.finetune_unet.lr, cfg.finetune_unet.lr_warmup_steps) == (24, 1e-4, 50)
    assert unet_meta["extra"]["epoch"] == cfg.finetune_unet.epochs
