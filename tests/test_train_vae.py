"""The VAE training loop on the smoke preset (a few hundred real images, seconds)."""

import json
import math

import numpy as np
import pytest
import torch

from nbutils import cli
from nbutils import pipeline as P
from nbutils import train_unet as TU
from nbutils import train_vae as TV
from nbutils import training as TR
from nbutils.checkpoints import CheckpointError
from nbutils.config import TrainConfig, get_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vae_run")
    cfg = get_config("smoke")
    vae = TV.train_vae(cfg, run_dir=run, epochs=2, device="cpu", progress=False, log=lambda m: None)
    return cfg, run, vae


def _unet_runs(vae_run, tmp_path, *names):
    """Fresh run folders that hold a copy of the smoke VAE and its latent cache (so a UNet can train there)."""
    import shutil

    runs = []
    for name in names:
        run = tmp_path / name
        run.mkdir()
        for f in ("vae.safetensors", "vae.json", "latents.safetensors"):
            shutil.copy(vae_run / f, run / f)
        runs.append(run)
    return runs


def test_run_writes_checkpoint_state_cache_and_pictures(smoke_run):
    cfg, run, vae = smoke_run
    names = {p.name for p in run.iterdir()}
    assert {"vae.safetensors", "vae.json", "vae_state.pt", "latents.safetensors", "vae_history.json",
            "vae_recon_epoch001.png", "vae_recon_epoch002.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    meta = json.loads((run / "vae.json").read_text())
    assert meta["kind"] == "vae" and meta["extra"]["epoch"] == 2 and meta["extra"]["latent_stats"] is True
    steps, epochs = TR.load_history(run)
    assert len(steps) == 2 * math.ceil(512 / cfg.train_vae.batch_size)
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert {"test_psnr", "test_ssim", "test_mse"} <= set(epochs[0])


def test_latents_are_standardised(smoke_run):
    _, run, vae = smoke_run
    from nbutils.latents import load_latent_cache

    cache = load_latent_cache(run / "latents.safetensors", run / "vae.safetensors")
    assert cache["mean"].shape == (512, 4, 7, 7) and cache["labels"].shape == (512,)
    g = torch.Generator().manual_seed(0)
    z = vae.standardize(cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape, generator=g))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert abs(z.std().item() - 1) < 0.05


def test_loaded_checkpoint_matches_returned_model(smoke_run):
    _, run, vae = smoke_run
    loaded, _ = P.load_vae(run, device="cpu")
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded.encode(x), vae.encode(x))


def test_resume_equals_uninterrupted(tmp_path, smoke_run):
    cfg, run2, _ = smoke_run
    run = tmp_path / "split"
    TV.train_vae(cfg, run_dir=run, epochs=1, device="cpu", progress=False, log=lambda m: None)
    TV.train_vae(cfg, run_dir=run, epochs=2, resume=True, device="cpu", progress=False, log=lambda m: None)
    a = torch.load(run / "vae_state.pt", weights_only=True)
    b = torch.load(run2 / "vae_state.pt", weights_only=True)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for key in ("model",):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    for name in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][name], b["ema"]["model"][name]), name


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot resume: .* does not exist"):
        TV.train_vae(get_config("smoke"), run_dir=tmp_path, resume=True, device="cpu", progress=False)


@pytest.mark.parametrize("sync_every", [1, 4])
def test_nan_loss_stops_with_step_and_parts(tmp_path, monkeypatch, sync_every):
    """A NaN names the step it happened in, also when the numbers are read back only every few steps (GPU)."""
    monkeypatch.setitem(TR.SYNC_EVERY, "cpu", sync_every)
    real = TV.vae_loss

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * float("nan"), dict(parts, loss=float("nan"))

    monkeypatch.setattr(TV, "vae_loss", poisoned)
    with pytest.raises(TR.NonFiniteLossError, match=r"non-finite VAE loss at step 0 \(epoch 1\).*'mse'"):
        TV.train_vae(get_config("smoke"), run_dir=tmp_path, device="cpu", progress=False, log=lambda m: None)


def test_reconstruct_cli_writes_documented_npz(smoke_run, tmp_path, capsys):
    _, run, _ = smoke_run
    out = tmp_path / "rec.npz"
    assert cli.main(["reconstruct", "--n", "7", "--checkpoint", str(run), "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 7 and 0 < report["ssim"] <= 1
    with np.load(out) as f:
        assert set(f.files) == {"images", "originals", "labels"}
        assert f["images"].dtype == np.uint8 and f["images"].shape == (7, 28, 28)
        assert f["originals"].dtype == np.uint8 and f["originals"].shape == (7, 28, 28)
        assert f["labels"].dtype == np.int64 and f["labels"].shape == (7,)


@pytest.mark.parametrize("args, message", [
    (["--out", "x.txt"], "must end in .npz or .png"),
    (["--out", "/no/such/dir/x.npz"], "does not exist"),
    (["--out", "x.npz", "--checkpoint", "/no/such/ckpt"], "no checkpoint at /no/such/ckpt"),
])
def test_reconstruct_cli_errors(args, message, capsys):
    assert cli.main(["reconstruct", *args]) == 1
    assert message in capsys.readouterr().err


def test_unet_resume_equals_uninterrupted(smoke_run, tmp_path):

    cfg, vae_run, _ = smoke_run
    runs = _unet_runs(vae_run, tmp_path, "whole", "split")
    TU.train_unet(cfg, run_dir=runs[0], epochs=2, device="cpu", progress=False, log=lambda m: None)
    TU.train_unet(cfg, run_dir=runs[1], epochs=1, device="cpu", progress=False, log=lambda m: None)
    TU.train_unet(cfg, run_dir=runs[1], epochs=2, resume=True, device="cpu", progress=False, log=lambda m: None)
    a, b = (torch.load(r / "unet_state.pt", weights_only=True) for r in runs)
    assert a["step"] == b["step"] == 2 * 8
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][name], b["ema"]["model"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    unet, meta = P.load_unet(runs[0], device="cpu")
    assert meta["extra"]["epoch"] == 2
    x = torch.randn(2, 4, 7, 7)
    assert unet(x, torch.tensor([5, 500]), torch.tensor([1, 10])).shape == x.shape


def test_train_unet_cli_help_and_bad_epochs(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train-unet", "--help"])
    assert exc.value.code == 0 and "--vae" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["train-unet", "--epochs", "0"])
    assert exc.value.code == 2 and "must be ≥ 1" in capsys.readouterr().err


def test_sample_cli_npz_png_and_determinism(smoke_run, tmp_path, capsys):

    cfg, vae_run, _ = smoke_run
    (run,) = _unet_runs(vae_run, tmp_path, "run")
    TU.train_unet(cfg, run_dir=run, epochs=1, device="cpu", progress=False, log=lambda m: None)
    common = ["sample", "--checkpoint", str(run), "--device", "cpu", "--steps", "3", "--no-progress"]
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert cli.main([*common, "--n", "12", "--out", str(a), "--seed", "5"]) == 0
    assert cli.main([*common, "--n", "12", "--out", str(b), "--seed", "5"]) == 0
    with np.load(a) as fa, np.load(b) as fb:
        assert fa["images"].dtype == np.uint8 and fa["images"].shape == (12, 28, 28)
        assert fa["labels"].dtype == np.int64 and fa["labels"].tolist() == [i % 10 for i in range(12)]
        assert np.array_equal(fa["images"], fb["images"])  # same seed, same output
    c = tmp_path / "c.npz"
    assert cli.main([*common, "--n", "3", "--class", "sneaker", "--sampler", "ddim", "--out", str(c)]) == 0
    with np.load(c) as fc:
        assert fc["labels"].tolist() == [7, 7, 7]
    assert cli.main([*common, "--n", "2", "--class", "none", "--sampler", "ddpm", "--out", str(c)]) == 0
    with np.load(c) as fc:
        assert fc["labels"].tolist() == [-1, -1]
    png = tmp_path / "grid.png"
    assert cli.main([*common, "--n", "10", "--out", str(png)]) == 0 and png.stat().st_size > 0
    capsys.readouterr()
    assert cli.main([*common, "--n", "2", "--class", "sock", "--out", str(c)]) == 1
    assert "unknown class 'sock'" in capsys.readouterr().err
    assert cli.main([*common, "--n", "2", "--guidance", "-1", "--out", str(c)]) == 1
    assert "--guidance must be a finite number from 0 to 100" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--n", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*common[:-2], *bad, "--out", str(c)])
        assert exc.value.code == 2


# -- interrupt safety ---------------------------------------------------------------------------


def _signal_at_step(monkeypatch, k, sig=None):
    """Deliver a real signal to this process right after optimizer step ``k`` (counting from 0)."""
    import os
    import signal

    real = TR.optimizer_step
    calls = {"n": 0}

    def optimize(*args, **kwargs):
        grad_norm = real(*args, **kwargs)
        if calls["n"] == k:
            os.kill(os.getpid(), sig or signal.SIGINT)
        calls["n"] += 1
        return grad_norm

    monkeypatch.setattr(TR, "optimizer_step", optimize)


def _assert_same_state(a_path, b_path):
    a, b = (torch.load(p, weights_only=True) for p in (a_path, b_path))
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] and a["partial"] is b["partial"] is None
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][name], b["ema"]["model"][name]), name
    for i, sa in a["optimizer"]["state"].items():
        for k, v in sa.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    for k in a["rng"]:
        assert torch.equal(a["rng"][k], b["rng"][k]), k
    assert a["history"]["steps"] == b["history"]["steps"]


@pytest.mark.slow
def test_vae_interrupt_mid_epoch_then_resume_is_exact(smoke_run, tmp_path, monkeypatch):
    cfg, whole, _ = smoke_run  # 2 uninterrupted epochs of 8 steps
    run = tmp_path / "interrupted"
    logs = []
    with monkeypatch.context() as m:
        _signal_at_step(m, 10)  # inside epoch 2
        with pytest.raises(TR.TrainingInterrupted, match=r"SIGINT received: stopped after step 11 \(batch 3/8 of "
                                                        r"epoch 2\).*--resume"):
            TV.train_vae(cfg, run_dir=run, epochs=2, device="cpu", progress=False, log=logs.append)
    state = torch.load(run / "vae_state.pt", weights_only=True)
    assert state["step"] == 11 and state["epoch"] == 1 and state["partial"]["batch"] == 3
    assert P.load_vae(run, device="cpu")[1]["extra"]["step"] == 11  # the weights file was written too
    TV.train_vae(cfg, run_dir=run, epochs=2, resume=True, device="cpu", progress=False, log=lambda m: None)
    _assert_same_state(run / "vae_state.pt", whole / "vae_state.pt")
    epochs = torch.load(run / "vae_state.pt", weights_only=True)["history"]["epochs"]
    assert "resumed_at_batch" not in epochs[0] and epochs[1]["resumed_at_batch"] == 3  # its seconds: 5 batches


def test_progress_skips_the_batches_done_before_an_interrupt():
    bar = TR.progress_bar(iter(range(8)), 8, "epoch", enabled=True, done=3)
    assert bar.n == 3 and bar.total == 8
    assert list(bar) == [3, 4, 5, 6, 7] and bar.n == 8
    assert list(TR.progress_bar(range(4), 4, "epoch", enabled=False)) == [0, 1, 2, 3]


@pytest.mark.slow
def test_unet_sigterm_mid_epoch_then_resume_is_exact(smoke_run, tmp_path, monkeypatch):
    import signal

    cfg, vae_run, _ = smoke_run
    runs = _unet_runs(vae_run, tmp_path, "whole", "split")
    TU.train_unet(cfg, run_dir=runs[0], epochs=2, device="cpu", progress=False, log=lambda m: None)
    with monkeypatch.context() as m:
        _signal_at_step(m, 4, signal.SIGTERM)  # inside epoch 1
        with pytest.raises(TR.TrainingInterrupted, match="SIGTERM received: stopped after step 5"):
            TU.train_unet(cfg, run_dir=runs[1], epochs=2, device="cpu", progress=False, log=lambda m: None)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    TU.train_unet(cfg, run_dir=runs[1], epochs=2, resume=True, device="cpu", progress=False, log=lambda m: None)
    _assert_same_state(runs[1] / "unet_state.pt", runs[0] / "unet_state.pt")
    assert (runs[0] / "unet_samples_epoch002.png").is_file()


@pytest.mark.slow
def test_cli_sigterm_exits_130_with_resume_command(smoke_run, tmp_path):
    """A real training process, killed with SIGTERM: it saves, explains and exits 130; resume works."""
    import signal
    import subprocess
    import sys
    import time

    cfg, vae_run, _ = smoke_run
    (run,) = _unet_runs(vae_run, tmp_path, "cli")
    cmd = [sys.executable, "-m", "nbutils", "train-unet", "--preset", "smoke", "--set", "train_unet.lr=0.002",
           "--run-dir", str(run), "--epochs", "200", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "unet_state.pt").exists() and time.time() < deadline:  # wait for the first epoch
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    hint = (f"python -m nbutils train-unet --preset smoke --set train_unet.lr=0.002 --run-dir {run} --epochs 200 "
            "--resume")
    assert "SIGTERM received" in err and hint in err, err
    state = torch.load(run / "unet_state.pt", weights_only=True)
    assert 0 < state["step"] < 200 * 8
    assert not list(run.glob("*.tmp"))
    # the printed command resumes (its --set matches the run's config), here for one more epoch only
    resume = hint.split()[3:]
    resume[resume.index("--epochs") + 1] = str(state["epoch"] + 1)
    done = subprocess.run([sys.executable, "-m", "nbutils", *resume, "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert torch.load(run / "unet_state.pt", weights_only=True)["epoch"] == state["epoch"] + 1


@pytest.mark.slow
def test_mixed_precision_and_compile_settings(smoke_run, tmp_path):
    """On this CPU: `compile` and bf16/fp16 are no-ops with a one-line notice each, training in float32
    exactly as with `no`; a bad setting is a clear error naming the valid ones."""
    import dataclasses

    cfg, vae_run, _ = smoke_run
    plain_run, run = _unet_runs(vae_run, tmp_path, "plain", "amp")
    TU.train_unet(cfg, run_dir=plain_run, epochs=1, device="cpu", progress=False, log=lambda m: None)
    logs = []
    cfg2 = cfg.replace(train_unet=dataclasses.replace(cfg.train_unet, compile=True, mixed_precision="bf16"))
    TU.train_unet(cfg2, run_dir=run, epochs=1, device="cpu", progress=False, log=logs.append)
    assert any("compile=True has no effect on cpu" in m for m in logs)
    assert any("mixed_precision='bf16' has no effect on cpu (CUDA only); training in float32" in m for m in logs)
    a, _ = P.load_unet(plain_run, device="cpu")
    b, _ = P.load_unet(run, device="cpu")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    bad = cfg.replace(train_unet=dataclasses.replace(cfg.train_unet, mixed_precision="fp8"))
    with pytest.raises(ValueError, match="mixed_precision must be one of 'auto', 'bf16', 'fp16', 'no', got 'fp8'"):
        TU.train_unet(bad, run_dir=run, epochs=1, device="cpu", progress=False, log=lambda m: None)


def test_autocast_dtype_rules(monkeypatch):
    """Which dtype each setting trains in, per device; bf16 on a CUDA GPU without it is refused clearly.
    (The CUDA answers are checked by pretending: torch.cuda's queries are replaced, nothing runs on a GPU.)"""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    notes = []
    for setting in ("auto", "no", "bf16", "fp16"):
        assert TR.autocast_dtype(setting, cpu, notes.append) is None
    assert notes == [f"note: mixed_precision={s!r} has no effect on cpu (CUDA only); training in float32"
                     for s in ("bf16", "fp16")]
    assert TR.autocast_dtype("no", cuda) is None
    assert TR.autocast_dtype("fp16", cuda) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert TR.autocast_dtype("auto", cuda, compile=True) is torch.bfloat16
    assert TR.autocast_dtype("auto", cuda) is None  # uncompiled bf16 is the slower (launch-bound models)
    assert TR.autocast_dtype("bf16", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    assert TR.autocast_dtype("auto", cuda, compile=True) is None
    with pytest.raises(ValueError, match="needs a GPU with bfloat16 support.*Tesla T4 has none: use 'fp16' or 'no'"):
        TR.autocast_dtype("bf16", cuda)


def test_adam_is_fused_on_cuda_with_the_same_update_and_state():
    """On CUDA training uses fused Adam (fewer kernel launches); elsewhere the default. Both follow the same rule
    and keep the same state, so a GPU run resumes on a CPU and back. (The fused kernel is run on the CPU here.)"""
    tc = TrainConfig(lr=1e-2, weight_decay=0.01)
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    plain = TR.make_optimizer(a.parameters(), tc, torch.device("cpu"))
    fused = TR.make_optimizer(b.parameters(), tc, torch.device("cuda"))
    assert not plain.defaults["fused"] and fused.defaults["fused"]
    for _ in range(3):
        x = torch.randn(8, 5)
        for model, opt in ((a, plain), (b, fused)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    s1, s2 = plain.state_dict(), fused.state_dict()
    assert [sorted(v) for v in s1["state"].values()] == [sorted(v) for v in s2["state"].values()]
    fused.load_state_dict(s1)  # a CPU run's optimizer state loads into the fused optimizer


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_another_runs_weights(smoke_run, tmp_path):
    """With lr 0 the optimizer cannot move the weights: a run started from another run's raw weights ends with
    exactly them; a source trained on another VAE is refused."""
    import dataclasses

    cfg, vae_run, _ = smoke_run
    source, tuned = _unet_runs(vae_run, tmp_path, "source", "tuned")
    TU.train_unet(cfg, run_dir=source, epochs=1, device="cpu", progress=False, log=lambda m: None)
    frozen = cfg.replace(train_unet=dataclasses.replace(cfg.train_unet, lr=0.0))
    logs = []
    TU.train_unet(frozen, run_dir=tuned, epochs=1, device="cpu", progress=False, log=logs.append, init_from=source)
    assert any(m.startswith(f"starting from {source}: raw and EMA weights after its step 8") for m in logs)
    raw_source = torch.load(source / "unet_state.pt", weights_only=True)["model"]
    raw_tuned = torch.load(tuned / "unet_state.pt", weights_only=True)["model"]
    for name, p in raw_source.items():
        assert torch.equal(p, raw_tuned[name]), name
    other_vae = tmp_path / "other"
    TV.train_vae(cfg.replace(train_vae=dataclasses.replace(cfg.train_vae, seed=1)), run_dir=other_vae, epochs=1,
                device="cpu", progress=False, log=lambda m: None)
    with pytest.raises(CheckpointError, match="trained on another VAE's latents"):
        TU.train_unet(cfg, run_dir=other_vae, epochs=1, device="cpu", progress=False, log=lambda m: None,
                     init_from=source)


@pytest.mark.slow
def test_fp16_gradient_scaler_path_trains_and_resumes_exactly(smoke_run, tmp_path, monkeypatch):
    """The fp16 path (autocast float16 + GradScaler: scale, unscale before clipping, step, update) normally runs
    on CUDA only; forced here on the CPU, where torch supports both. The loss scale is saved with the state, so
    1 + 1 resumed epochs equal 2 straight ones."""
    cfg, vae_run, _ = smoke_run
    monkeypatch.setattr(TR, "autocast_dtype", lambda *a, **k: torch.float16)
    straight, resumed = _unet_runs(vae_run, tmp_path, "straight", "resumed")
    quiet = {"device": "cpu", "progress": False, "log": lambda m: None}
    TU.train_unet(cfg, run_dir=straight, epochs=2, **quiet)
    TU.train_unet(cfg, run_dir=resumed, epochs=1, **quiet)
    first = torch.load(resumed / "unet_state.pt", weights_only=True)
    assert first["scaler"]["scale"] > 0 and first["scaler"]["growth_interval"] == 2000
    TU.train_unet(cfg, run_dir=resumed, epochs=2, resume=True, **quiet)
    a = torch.load(straight / "unet_state.pt", weights_only=True)
    b = torch.load(resumed / "unet_state.pt", weights_only=True)
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] >= 2.0**10  # most steps were taken, not skipped
    moved = [name for name, p in a["model"].items() if not torch.equal(p, first["model"][name])]
    assert len(moved) > len(a["model"]) // 2  # the second epoch's steps changed the weights
    for name, p in a["model"].items():
        assert torch.isfinite(p).all() and torch.equal(p, b["model"][name]), name


@pytest.mark.slow
def test_second_phase_is_the_two_run_recipe_exactly(smoke_run, tmp_path, monkeypatch):
    """``finetune_unet`` (one run, two phases) gives bit for bit the weights of the two commands the shipped UNet
    was trained with: a first run, then a new run started from it with ``--init-from`` at the lower rate; and a
    run interrupted inside the second phase resumes exactly."""
    import dataclasses

    from nbutils.config import PhaseConfig

    cfg, vae_run, _ = smoke_run
    cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, dropout=0.0),
                      train_unet=dataclasses.replace(cfg.train_unet, epochs=1, sample_every=0))
    phased = cfg.replace(finetune_unet=PhaseConfig(epochs=1, lr=2e-4, lr_warmup_steps=3))
    first, second, one, cut = _unet_runs(vae_run, tmp_path, "first", "second", "one", "cut")
    quiet = dict(device="cpu", progress=False, log=lambda m: None)
    TU.train_unet(cfg, run_dir=first, **quiet)
    tuned = cfg.replace(train_unet=dataclasses.replace(cfg.train_unet, lr=2e-4, lr_warmup_steps=3))
    TU.train_unet(tuned, run_dir=second, init_from=first, **quiet)
    logs = []
    TU.train_unet(phased, run_dir=one, device="cpu", progress=False, log=logs.append)
    assert any("second phase: 1 epochs at lr 0.0002" in m for m in logs)
    a, b = P.load_unet(second, device="cpu")[0], P.load_unet(one, device="cpu")[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    steps_per_epoch = json.loads((first / "unet_history.json").read_text())[0]["step"]
    with monkeypatch.context() as m:
        _signal_at_step(m, steps_per_epoch + 2)  # inside the second phase
        with pytest.raises(TR.TrainingInterrupted):
            TU.train_unet(phased, run_dir=cut, **quiet)
    TU.train_unet(phased, run_dir=cut, resume=True, **quiet)
    _assert_same_state(one / "unet_state.pt", cut / "unet_state.pt")


def test_the_step_as_a_graph_trains_the_same_two_phase_run_and_resumes(smoke_run, tmp_path, monkeypatch):
    """``cuda_graph=True`` (StepGraph: fixed input buffers, a tensor learning rate, warm-up steps then replays, a new
    optimizer in the second phase, the short last batch eagerly) trains bit for bit the plain loop's run, and a run
    stopped mid-phase resumes to it. On a CPU the step runs uncaptured, which is what this checks; the capture
    itself needs CUDA (benchmarks/full_gpu.py)."""
    import dataclasses
    import os
    import signal

    from nbutils.config import PhaseConfig

    cfg, vae_run, _ = smoke_run
    cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, dropout=0.0),
                      data=dataclasses.replace(cfg.data, train_subset=500),  # 7 batches of 64 and one of 52
                      train_unet=dataclasses.replace(cfg.train_unet, epochs=1, sample_every=0),
                      finetune_unet=PhaseConfig(epochs=1, lr=2e-4, lr_warmup_steps=3))
    plain, graphed, *cuts = _unet_runs(vae_run, tmp_path, "plain", "graphed", "cut7", "cut11")
    quiet = dict(device="cpu", progress=False, log=lambda m: None)
    TU.train_unet(cfg, run_dir=plain, **quiet)
    TU.train_unet(cfg, run_dir=graphed, cuda_graph=True, **quiet)
    _assert_same_state(plain / "unet_state.pt", graphed / "unet_state.pt")

    captured = []

    class Recording(TR._Rerun):  # the batch size each (stand-in) capture records
        def __init__(self, fn, device):
            super().__init__(fn, device)
            captured.append(len(fn.__self__.static[0]))

    # stopped before the short last batch (it is then the first step of the resumed run), or inside the second phase
    for cut, at in zip(cuts, (7, 11), strict=True):
        def stop_at(step, parts, at=at):
            if step == at:
                os.kill(os.getpid(), signal.SIGINT)

        with pytest.raises(TR.TrainingInterrupted):
            TU.train_unet(cfg, run_dir=cut, cuda_graph=True, on_step=stop_at, **quiet)
        captured.clear()
        monkeypatch.setattr(TR, "_Rerun", Recording)
        TU.train_unet(cfg, run_dir=cut, resume=True, cuda_graph=True, **quiet)
        monkeypatch.undo()
        _assert_same_state(plain / "unet_state.pt", cut / "unet_state.pt")
        assert captured == [64]  # one capture (the resumed run's phase 2), of a full batch


def test_resume_refuses_a_vae_other_than_the_runs_own(smoke_run, tmp_path):
    """Swapping another VAE into a UNet run cannot be laundered by --resume: the run records its VAE."""
    import shutil

    from nbutils.config import checkpoints_dir

    cfg, vae_run, _ = smoke_run
    (run,) = _unet_runs(vae_run, tmp_path, "swap")
    TU.train_unet(cfg, run_dir=run, epochs=1, device="cpu", progress=False, log=lambda m: None)
    shutil.copy(checkpoints_dir() / "vae.safetensors", run / "vae.safetensors")
    with pytest.raises(CheckpointError, match="is not the VAE the run in .* was trained with"):
        TU.train_unet(cfg, run_dir=run, epochs=2, resume=True, device="cpu", progress=False, log=lambda m: None)


def test_a_run_folder_belongs_to_one_process_and_stale_temporaries_go(smoke_run, tmp_path):
    """A second training process on a folder in use stops at once; temporaries of a killed write are removed."""
    from filelock import FileLock

    cfg, vae_run, _ = smoke_run
    (run,) = _unet_runs(vae_run, tmp_path, "owned")
    with FileLock(run / ".lock"):  # another process's run (a lock on another open file, as a process holds)
        with pytest.raises(TR.RunInUseError, match="in use by another training process"):
            TU.train_unet(cfg, run_dir=run, epochs=1, device="cpu", progress=False, log=lambda m: None)
    assert not (run / "unet.safetensors").exists()
    stale = run / ".unet.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    TU.train_unet(cfg, run_dir=run, epochs=1, device="cpu", progress=False, log=lambda m: None)
    assert not stale.exists() and (run / "unet.safetensors").exists()


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """kill -9 at 20 moments of a real training process, each time started again with --resume (or afresh when no
    state was written yet): every other life ends at a random moment (start-up, steps, the latent cache), the
    others the moment a checkpoint set is being written (its first temporary or pending file appears). The weights
    at the end are bit for bit those of a run that was never interrupted."""
    import os
    import random
    import subprocess
    import sys
    import time

    base = [sys.executable, "-m", "nbutils", "train-vae", "--preset", "smoke", "--epochs", "80", "--device", "cpu",
            "--no-progress"]
    subprocess.run([*base, "--run-dir", str(tmp_path / "whole")], check=True, capture_output=True, timeout=900)
    run, rng, kills, during_writes = tmp_path / "killed", random.Random(0), 0, 0

    def writing() -> bool:  # a checkpoint file is being written: a temporary or a pending file of a set exists
        try:
            return any(e.name.endswith((".tmp", ".pending")) for e in os.scandir(run))
        except FileNotFoundError:
            return False

    while kills < 20:  # each life a few seconds: start-up, some steps, a checkpoint write or two
        resume = ["--resume"] if (run / "vae_state.pt").exists() else []
        proc = subprocess.Popen([*base, "--run-dir", str(run), *resume], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if kills % 2 == 0:
            time.sleep(rng.uniform(0.5, 5.0))
        else:  # wait for a write in progress
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline and not writing():
                time.sleep(0.0005)
            during_writes += proc.poll() is None and writing()
        if proc.poll() is not None:  # it finished the whole run before this kill
            break
        proc.kill()
        proc.wait()
        kills += 1
    assert kills == 20 and during_writes >= 5, (kills, during_writes)
    resume = ["--resume"] if (run / "vae_state.pt").exists() else []
    done = subprocess.run([*base, "--run-dir", str(run), *resume], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _assert_same_state(tmp_path / "whole" / "vae_state.pt", run / "vae_state.pt")
    a, b = P.load_vae(tmp_path / "whole", device="cpu")[1], P.load_vae(run, device="cpu")[1]
    assert a["tensor_digest"] == b["tensor_digest"]
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".*.pending"))


def test_training_curves_are_logged_per_step_and_plotted(smoke_run, tmp_path, capsys):
    """Every run folder holds its curves as JSON lines (loss parts, lr, gradient norm per step) beside the
    per-epoch history, and `plot` draws them."""
    _, run, _ = smoke_run
    lines = (run / "vae_steps.jsonl").read_text().splitlines()
    steps, epochs = TR.load_history(run)
    assert [json.loads(line) for line in lines] == steps and len(steps) == epochs[-1]["step"]
    assert {"loss", "mse", "lr", "grad_norm"} <= set(steps[0]) and steps[0]["lr"] < steps[-1]["lr"]  # warm-up
    assert all(math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in steps)
    assert epochs[-1]["batches_per_s"] > 0
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(run), "--out", str(out)]) == 0 and out.stat().st_size > 10_000
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "none.png")]) == 1
    assert "no training curves" in capsys.readouterr().err


def test_tensorboard_gets_every_step_once_across_an_interrupt(smoke_run, tmp_path, monkeypatch):
    """--log-with tensorboard: the event files hold the run's own per-step log and the epoch records, each step once
    even when a process logged steps past its last checkpoint (here: the run is set back to the state of its
    interruption after it finished, as a kill -9 would leave it, and resumed again)."""
    import shutil

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _ = smoke_run
    run, saved = tmp_path / "tb", tmp_path / "saved"
    with monkeypatch.context() as m:
        _signal_at_step(m, 4)
        with pytest.raises(TR.TrainingInterrupted, match="stopped after step 5"):
            TV.train_vae(cfg, run_dir=run, epochs=1, device="cpu", progress=False, log=lambda m: None,
                         log_with="tensorboard")
    shutil.copytree(run, saved, ignore=shutil.ignore_patterns("tensorboard"))
    for attempt in range(2):  # the second time, steps 6-8 are in the event files already
        TV.train_vae(cfg, run_dir=run, epochs=1, resume=True, device="cpu", progress=False, log=lambda m: None,
                     log_with="tensorboard")
        steps, epochs = TR.load_history(run)
        if attempt:
            break
        for f in saved.iterdir():
            shutil.copy(f, run / f.name)
    events = EventAccumulator(str(run / "tensorboard" / "vae"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [s["step"] for s in steps] == list(range(1, 9))
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    assert [e.step for e in events.Scalars("train/grad_norm")] == list(range(1, 9))
    assert [e.step for e in events.Scalars("epoch/test_psnr")] == [8]
    with pytest.raises(ValueError, match="unknown tracker 'wandb'; valid: tensorboard"):
        TV.train_vae(cfg, run_dir=tmp_path / "x", device="cpu", log_with="wandb")
    assert not (tmp_path / "x").exists()


def test_distillation_target_is_the_teachers_guided_output():
    """Per example: w·(cond − uncond) + uncond inside the guidance interval, the conditional output outside it,
    the unconditional output for null labels — what ``pipeline.guided_output`` gives one timestep at a time."""
    from nbutils.unet import UNet

    cfg = get_config("smoke")
    torch.manual_seed(0)
    teacher = UNet(cfg.unet).eval()
    recipe = P.SamplingRecipe(guidance=2.5, guidance_interval=(100, 600))
    alphas = TU.GaussianDiffusion(cfg.diffusion).alphas_cumprod
    distill = TU.Distillation(teacher, {"tensor_digest": "x"}, recipe, alphas, recipe.replace(guidance=1.0))
    t = torch.tensor([0, 99, 100, 350, 600, 601, 999, 350])
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 7, teacher.null_label])
    x = torch.randn(len(t), *(cfg.unet.latent_channels, 7, 7))
    got = distill.target(x, t, labels)
    for i in range(len(t)):
        w = 2.5 if 100 <= t[i] <= 600 else 1.0
        want = P.guided_output(teacher, x[i : i + 1], int(t[i]), labels[i : i + 1], w, teacher.null_label)
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen: no gradient reaches the teacher
    # a student samples the teacher's timesteps unguided, also where guided_steps placed them around the interval
    split = P.SamplingRecipe(sampler="ddim", steps=10, guided_steps=6, guidance=3.0, guidance_interval=(0, 400))
    pipe = P.Pipeline(None, teacher, cfg.diffusion, split)
    student = TU.unguided(pipe)
    assert student.guidance == 1.0 and student.guidance_interval is None and student.sampler == "ddim"
    assert list(student.timesteps) == P.recipe_timesteps(pipe, split)
    assert TU.unguided(P.Pipeline(None, teacher, cfg.diffusion, recipe)) == recipe.replace(
        guidance=1.0, guidance_interval=None)


@pytest.mark.slow
def test_guidance_distillation_trains_a_student_that_samples_unguided(smoke_run, tmp_path):
    """A student learns a teacher's guided output: it records its teacher, samples with the teacher's recipe
    unguided, trains to a lower loss than a plain run (no noise in its target), and cannot be resumed with
    another objective; a teacher on another VAE is refused."""
    import dataclasses

    from nbutils.checkpoints import export_model

    cfg, vae_run, _ = smoke_run
    teacher_run, student, plain = _unet_runs(vae_run, tmp_path, "teacher", "student", "plain")
    quiet = {"device": "cpu", "progress": False, "log": lambda m: None}
    cfg = cfg.replace(train_unet=dataclasses.replace(cfg.train_unet, sample_every=0))
    TU.train_unet(cfg, run_dir=teacher_run, epochs=2, **quiet)
    recipe = P.SamplingRecipe(sampler="dpm", steps=8, guidance=2.0, guidance_interval=(30, 600))
    export_model(teacher_run / "unet.safetensors", teacher_run / "unet.safetensors", "unet",
                 sampling_recipe=recipe.to_dict())  # the teacher as released: with its recipe
    logs = []
    TU.train_unet(cfg, run_dir=student, epochs=1, teacher=teacher_run, device="cpu", progress=False,
                  log=logs.append)
    assert any(m.startswith("distilling the teacher") and "w = 2 on (30, 600)" in m for m in logs)
    extra = P.load_unet(student, device="cpu")[1]["extra"]
    teacher_meta = P.load_unet(teacher_run, device="cpu")[1]
    assert extra["distilled_from"] == {"unet_tensor_digest": teacher_meta["tensor_digest"], "guidance": 2.0,
                                       "guidance_interval": [30, 600]}
    pipe = P.load_pipeline(student, device="cpu")
    assert pipe.recipe == recipe.replace(guidance=1.0, guidance_interval=None)
    assert P.sample(pipe, 4, "all", generator=torch.Generator().manual_seed(0)).images.isfinite().all()
    TU.train_unet(cfg, run_dir=plain, epochs=1, **quiet)
    loss = {r: TR.load_history(r, "unet")[1][-1]["train_loss"] for r in (student, plain)}
    assert loss[student] < 0.5 * loss[plain]
    with pytest.raises(CheckpointError, match="trained with a teacher, resumed with no teacher"):
        TU.train_unet(cfg, run_dir=student, epochs=2, resume=True, **quiet)
    with pytest.raises(CheckpointError, match="trained with no teacher, resumed with a teacher"):
        TU.train_unet(cfg, run_dir=plain, epochs=2, resume=True, teacher=teacher_run, **quiet)
    TU.train_unet(cfg, run_dir=student, epochs=2, resume=True, teacher=teacher_run, **quiet)
    other_vae = tmp_path / "other"
    TV.train_vae(cfg.replace(train_vae=dataclasses.replace(cfg.train_vae, seed=1)), run_dir=other_vae, epochs=1,
                 **quiet)
    with pytest.raises(CheckpointError, match="is not the VAE the teacher .* was trained with"):
        TU.train_unet(cfg, run_dir=other_vae, epochs=1, teacher=teacher_run, **quiet)
