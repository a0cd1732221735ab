import json
import os
import time

import pytest
import torch

from nbutils import checkpoints as K
from nbutils.config import Config, get_config


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
    assert meta["extra"]["trained"] == "2 runs" and meta["extra"]["exported_from"] == str(src)
    assert json.loads(dst.with_suffix(".json").read_text())["extra"]["trained"] == "2 runs"
    assert dst.stat().st_size < src.stat().st_size * 0.6


def test_average_weights_benchmark_is_the_mean_and_refuses_other_architectures(tmp_path, monkeypatch):
    """benchmarks/average_weights.py: the tensors of the output are the element-wise mean of the inputs'."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "average_weights.py"
    spec = importlib.util.spec_from_file_location("bench_average_weights", path)
    avg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(avg)
    cfg = get_config("smoke")
    ws = [torch.randn(8, 8) for _ in range(3)]
    for i, w in enumerate(ws):
        (tmp_path / f"e{i}").mkdir()
        K.save_model(tmp_path / f"e{i}" / "unet.safetensors", "unet", {"w": w}, cfg, {"epoch": i})
    inputs = [str(tmp_path / f"e{i}") for i in range(3)]
    monkeypatch.setattr(sys, "argv", ["average_weights.py", str(tmp_path / "avg"), *inputs])
    avg.main()
    tensors, meta = K.read_model(tmp_path / "avg" / "unet.safetensors", "unet")
    assert torch.allclose(tensors["w"], torch.stack(ws).mean(0), atol=1e-6)
    assert meta["extra"]["averaged_from"] == inputs
    assert (tmp_path / "avg" / "vae.safetensors").is_symlink()
    other = cfg.to_dict()
    other["unet"]["block_out_channels"] = [c * 2 for c in other["unet"]["block_out_channels"]]
    (tmp_path / "x").mkdir()
    K.save_model(tmp_path / "x" / "unet.safetensors", "unet", {"w": ws[0]}, Config.from_dict(other), {})
    monkeypatch.setattr(sys, "argv", ["average_weights.py", str(tmp_path / "bad"), str(tmp_path / "e0"),
                                      str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="different UNet architecture"):
        avg.main()
