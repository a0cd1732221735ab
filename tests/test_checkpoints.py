import json
import os
import time

import pytest
import torch

from nbutils import checkpoints as K
from nbutils.config import get_config


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    K.atomic_write_bytes(path, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        K.atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # the temporary file is gone


def test_atomic_write_needs_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        K.atomic_write_bytes(tmp_path / "nope" / "x.bin", b"")


def test_format_version_is_checked(tmp_path):
    cfg = get_config("smoke")
    path = K.save_model(tmp_path / "m.safetensors", "vae", {"w": torch.zeros(2)}, cfg)
    from safetensors.torch import load_file, save_file

    meta = json.loads(path.with_suffix(".json").read_text())
    meta["format_version"] = 99
    save_file(load_file(str(path)), str(path), metadata={"nbutils": json.dumps(meta)})
    with pytest.raises(K.CheckpointError, match="format version 99; this nbutils reads version 1"):
        K.read_model(path, "vae")
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(K.CheckpointError, match="not an nbutils checkpoint"):
        K.read_model(path, "vae")


def test_config_differences_names_fields():
    a = get_config("smoke").to_dict()
    b = get_config("cpu").to_dict()
    diffs = K.config_differences(a, b)
    assert any(d.startswith("vae.block_out_channels: checkpoint [8, 16, 16] vs expected [16, 64, 128]") for d in diffs)
    assert K.config_differences(a, get_config("smoke").to_dict()) == []


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("NBUTILS_HOME", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(K.CheckpointError, match="no vae.safetensors found"):
        K.resolve_checkpoint("vae.safetensors", preset="cpu")

    def make(folder, preset):
        folder.mkdir(parents=True, exist_ok=True)
        path = K.save_model(folder / "vae.safetensors", "vae", {"w": torch.zeros(1)}, get_config(preset))
        time.sleep(0.01)
        return path

    shipped = make(tmp_path / "checkpoints", "cpu")
    assert K.resolve_checkpoint("vae.safetensors", preset="cpu") == shipped
    smoke = make(tmp_path / "runs" / "smoke", "smoke")
    # a smoke run never replaces real weights for other presets, but is used under smoke
    assert K.resolve_checkpoint("vae.safetensors", preset="cpu") == shipped
    assert K.resolve_checkpoint("vae.safetensors", preset="smoke") == smoke
    cpu_run = make(tmp_path / "runs" / "cpu", "cpu")
    assert K.resolve_checkpoint("vae.safetensors", preset="cpu") == cpu_run
    assert K.resolve_checkpoint("vae.safetensors", preset="full") == cpu_run  # any real run beats shipped
    assert K.resolve_checkpoint("vae.safetensors", tmp_path / "checkpoints") == shipped  # explicit folder
    with pytest.raises(K.CheckpointError, match="no checkpoint at"):
        K.resolve_checkpoint("vae.safetensors", tmp_path / "elsewhere")


def test_export_half_precision_round_trip(tmp_path):
    cfg = get_config("smoke")
    w = torch.randn(64, 64)
    src = K.save_model(tmp_path / "a.safetensors", "unet", {"w": w}, cfg, {"epoch": 3})
    dst = K.export_model(src, tmp_path / "b.safetensors", "unet", dtype=torch.float16, trained="2 runs")
    tensors, meta = K.read_model(dst, "unet")
    assert tensors["w"].dtype == torch.float16 and torch.allclose(tensors["w"].float(), w, atol=2e-3)
    assert meta["extra"]["epoch"] == 3 and meta["config"] == K.read_model(src, "unet")[1]["config"]
    assert meta["extra"]["trained"] == "2 runs" and "exported_from" not in meta["extra"]  # nothing machine-local
    assert json.loads(dst.with_suffix(".json").read_text())["extra"]["trained"] == "2 runs"
    assert dst.stat().st_size < src.stat().st_size * 0.6


def test_no_shipped_file_holds_a_machine_local_path():
    """No tracked text file — weights' metadata, logs, docs, notebooks, code (tests aside: they name paths on
    purpose) — names a folder of the machine that made it (a home, a scratch or work folder); nor does the
    metadata inside the shipped weights files."""
    import re
    import subprocess

    from nbutils.checkpoints import read_model
    from nbutils.config import checkpoints_dir

    root = checkpoints_dir().parent
    local = re.compile(r"(?<![\w.])/(work|root|home|tmp|Users|content/drive)/[\w.-]")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for name in tracked:
        text_file = name.endswith((".json", ".jsonl", ".log", ".md", ".ipynb", ".txt", ".csv", ".py"))
        if name.startswith("tests/") or not text_file:
            continue
        text = (root / name).read_text(errors="replace")
        hit = local.search(text)
        assert hit is None, f"{name}: {text[max(0, hit.start() - 40):hit.end() + 40]!r}"
    for path in checkpoints_dir().rglob("*.safetensors"):
        meta = read_model(path, path.stem.split("_")[0])[1]
        assert local.search(json.dumps(meta)) is None, path
