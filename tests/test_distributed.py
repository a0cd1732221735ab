"""Training on two CPU processes (accelerate launch, gloo) is the one-process run, split.

The launched runs use the smoke preset with dropout 0 (dropout masks come from each process's own RNG, so
with dropout the runs agree in distribution only; see nbutils.distributed).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbutils import distributed as dist
from nbutils.config import get_config
from nbutils.train_unet import train_unet
from nbutils.train_vae import train_vae

pytest.importorskip("accelerate")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# documented in nbutils/distributed.py: measured 1.4e-7 (VAE) and 3.8e-7 (UNet) after one smoke epoch
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` two processes on this machine's CPU (no GPU is visible to them)."""
    env = {**os.environ, "NBUTILS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "nbutils", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_train_what_one_does_and_resume_on_one(tmp_path, monkeypatch):
    monkeypatch.setenv("NBUTILS_HOME", str(tmp_path / "home"))
    cfg = get_config("smoke").override(["unet.dropout=0"])
    one, two = tmp_path / "one", tmp_path / "two"
    quiet = {"device": "cpu", "progress": False, "log": lambda m: None}

    vae_proc = _launch(tmp_path, "train-vae", "--preset", "smoke", "--run-dir", str(two), "--no-progress")
    unet_proc = _launch(tmp_path, "train-unet", "--preset", "smoke", "--run-dir", str(two), "--no-progress",
                        "--set", "unet.dropout=0")
    for proc in (vae_proc, unet_proc):  # one result line, one log: process 1 stays quiet
        assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
        assert json.loads(proc.stdout)["run_dir"] == str(two)
        assert proc.stderr.count("parameters,") == 1
        assert "(global: 2 processes × ≈32 each)" in proc.stderr
    assert sorted(p.name for p in two.glob("*.safetensors")) == ["latents.safetensors", "unet.safetensors",
                                                               "vae.safetensors"]
    assert not list(two.glob("*.tmp"))

    train_vae(cfg, run_dir=one, **quiet)
    train_unet(cfg, run_dir=one, **quiet)
    for name in ("vae", "unet"):
        s1 = torch.load(one / f"{name}_state.pt", weights_only=True)
        s2 = torch.load(two / f"{name}_state.pt", weights_only=True)
        assert s1["step"] == s2["step"] == 8
        assert _max_difference(s1["model"], s2["model"]) < TOLERANCE, name
        assert _max_difference(s1["ema"]["model"], s2["ema"]["model"]) < TOLERANCE, name
        losses1 = [s["loss"] for s in s1["history"]["steps"]]
        losses2 = [s["loss"] for s in s2["history"]["steps"]]
        assert losses1 == pytest.approx(losses2, rel=1e-5)  # the logged loss is the global batch's

    # the state holds nothing per process: the two-process run resumes on one process
    train_unet(cfg, run_dir=one, epochs=2, resume=True, **quiet)
    train_unet(cfg, run_dir=two, epochs=2, resume=True, **quiet)
    s1 = torch.load(one / "unet_state.pt", weights_only=True)
    s2 = torch.load(two / "unet_state.pt", weights_only=True)
    assert s1["step"] == s2["step"] == 16
    assert _max_difference(s1["model"], s2["model"]) < TOLERANCE


def _rank(world_size: int, rank: int) -> dist.ManyProcesses:
    procs = object.__new__(dist.ManyProcesses)  # the arithmetic only, no process group
    procs.world_size, procs.rank, procs.is_main = world_size, rank, rank == 0
    return procs


@pytest.mark.parametrize("n", [64, 7, 3, 10])
def test_shards_cover_the_batch_and_rescaled_losses_average_to_its_mean(n):
    """DDP averages the N processes' gradients; with each loss times N·n_r/B that average is the gradient of
    the global mean — checked here on the losses themselves (the gradient is linear in them)."""
    world = 3
    losses = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    shards = [_rank(world, r).shard(losses)[0] for r in range(world)]
    assert torch.equal(torch.cat(shards), losses)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    averaged = sum(_rank(world, r).loss_factor(n) * s.mean() for r, s in enumerate(shards) if len(s)) / world
    assert float(averaged) == pytest.approx(float(losses.mean()), rel=1e-12)


def test_one_process_is_the_plain_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = dist.processes(torch.device("cpu"))
    assert type(procs) is dist.OneProcess and procs.is_main
    x = torch.arange(5)
    assert procs.shard(x)[0] is x and procs.loss_factor(5) == 1.0
    assert procs.combine({"loss": 0.5}, 5) == {"loss": 0.5} and procs.any(True) is True


def test_several_processes_without_accelerate_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_accelerate(name, *args, **kwargs):
        if name == "accelerate" or name.startswith("accelerate."):
            raise ImportError("No module named 'accelerate'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(builtins, "__import__", no_accelerate)
    with pytest.raises(RuntimeError, match=r"one of 2 processes, but Hugging Face accelerate is not installed: "
                                           r"pip install -e '\.\[distributed\]'"):
        dist.processes(torch.device("cpu"))
