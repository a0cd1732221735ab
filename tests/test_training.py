"""The shared training machinery: what it refuses to load, and the second training phase."""

import json
import math
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
    # the weights record the preset itself: what a reader of their metadata (or the model card) is told
    assert unet_meta["config"] == vae_meta["config"] == json.loads(json.dumps(cfg.to_dict()))


# --------------------------------------------------------------------------------------------
# A checkpoint set is committed as one; a failed start leaves nothing; too large a model is never built
# --------------------------------------------------------------------------------------------


def test_a_set_of_files_is_committed_as_one(tmp_path, monkeypatch):
    """commit_files: a kill before the manifest leaves the old set (its pending files are discarded), a kill after
    it leaves the new one (the pending files are put in place); a file swapped later is named."""
    from nbutils import checkpoints as C

    C.commit_files(tmp_path, "m", {"a.bin": b"a1", "b.bin": b"b1"}, epochs_done=1)
    assert C.check_files(tmp_path, "m")["epochs_done"] == 1

    real_write, real_replace = C.atomic_write_bytes, os.replace

    def killed_before_commit(path, payload):
        if path.name.endswith("_manifest.json"):
            raise KeyboardInterrupt  # as a kill would: nothing after this runs
        return real_write(path, payload)

    monkeypatch.setattr(C, "atomic_write_bytes", killed_before_commit)
    with pytest.raises(KeyboardInterrupt):
        C.commit_files(tmp_path, "m", {"a.bin": b"a2", "b.bin": b"b2"}, epochs_done=2)
    monkeypatch.undo()
    assert (tmp_path / "a.bin").read_bytes() == b"a1" and list(tmp_path.glob(".*.pending"))
    C.finish_commits(tmp_path)  # what the next training start does, holding the lock
    assert not list(tmp_path.glob(".*.pending")) and (tmp_path / "b.bin").read_bytes() == b"b1"
    assert C.check_files(tmp_path, "m")["epochs_done"] == 1

    def killed_after_commit(src, dst):
        if str(src).endswith(C.PENDING):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_commit)
    with pytest.raises(KeyboardInterrupt):
        C.commit_files(tmp_path, "m", {"a.bin": b"a3", "b.bin": b"b3"}, epochs_done=3)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"a\.bin is not the file saved with the rest of the checkpoint"):
        C.check_files(tmp_path, "m")  # epoch-2 files beside the epoch-3 manifest: never read as one
    C.finish_commits(tmp_path)
    assert [(tmp_path / f).read_bytes() for f in ("a.bin", "b.bin")] == [b"a3", b"b3"]
    assert C.check_files(tmp_path, "m")["epochs_done"] == 3 and not list(tmp_path.glob(".*.pending"))

    C.commit_files(tmp_path, "m", {"b.bin": b"b4"})  # part of the set: the rest keeps its entries and epochs_done
    assert C.check_files(tmp_path, "m")["epochs_done"] == 3
    (tmp_path / "a.bin").write_bytes(b"another run's")
    with pytest.raises(CheckpointError, match=r"a\.bin is not the file saved .* \(after epoch 3\)"):
        C.check_files(tmp_path, "m")
    (tmp_path / "m_manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="m_manifest.json is damaged"):
        C.check_files(tmp_path, "m")
    assert C.check_files(tmp_path, "old") is None  # a folder saved before manifests loads as before


def _vae_run(run, epochs, cfg=None, **kw):
    from nbutils.train_vae import train_vae

    kw.setdefault("device", "cpu")
    return train_vae(cfg or get_config("smoke"), run_dir=run, epochs=epochs, progress=False, log=lambda m: None, **kw)


def _same_run(a, b):
    sa, sb = TR.read_state(a / "vae_state.pt"), TR.read_state(b / "vae_state.pt")
    assert (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"])
    for name in sa["model"]:
        assert torch.equal(sa["model"][name], sb["model"][name]), name
    from nbutils.pipeline import load_vae

    assert load_vae(a, device="cpu")[1]["tensor_digest"] == load_vae(b, device="cpu")[1]["tensor_digest"]


def test_reading_the_step_numbers_back_in_blocks_changes_nothing(tmp_path, monkeypatch):
    """On a GPU the loop reads the loss parts and gradient norms back every SYNC_EVERY steps instead of every step
    (no host synchronisation per step): the same weights, the same per-step history, the same running loss."""
    _vae_run(tmp_path / "every", 2)
    monkeypatch.setitem(TR.SYNC_EVERY, "cpu", 5)  # smoke: 8 steps an epoch, so one read mid-epoch, one at its end
    _vae_run(tmp_path / "blocks", 2)
    _same_run(tmp_path / "every", tmp_path / "blocks")
    (steps_a, epochs_a), (steps_b, epochs_b) = (TR.load_history(tmp_path / r, "vae") for r in ("every", "blocks"))
    assert steps_a == steps_b and len(steps_a) == 16 and all(math.isfinite(s["grad_norm"]) for s in steps_a)
    assert [e["train_loss"] for e in epochs_a] == [e["train_loss"] for e in epochs_b]


def test_checkpointing_every_few_epochs_trains_the_same_run(tmp_path, monkeypatch):
    """checkpoint_every=2 over 3 epochs saves (and evaluates the VAE) after epochs 2 and 3 only, and ends with the
    weights, state and per-step history of a run that saved every epoch; a bad value is refused before any work."""
    from nbutils import checkpoints as C

    _vae_run(tmp_path / "every", 3)
    commits = []
    real_commit = C.commit_files

    def recording(folder, name, files, **info):
        commits.append(info.get("epochs_done"))
        return real_commit(folder, name, files, **info)

    monkeypatch.setattr(TR, "commit_files", recording)
    _vae_run(tmp_path / "sparse", 3, checkpoint_every=2)
    monkeypatch.undo()
    assert commits == [2, 3]
    _same_run(tmp_path / "every", tmp_path / "sparse")
    (steps_a, _), (steps_b, epochs_b) = (TR.load_history(tmp_path / r, "vae") for r in ("every", "sparse"))
    assert steps_a == steps_b
    assert ["test_psnr" in e for e in epochs_b] == [False, True, True]
    with pytest.raises(ValueError, match="checkpoint_every must be a whole number ≥ 1, got 0"):
        _vae_run(tmp_path / "bad", 1, checkpoint_every=0)
    assert not (tmp_path / "bad").exists()


def test_the_compiled_forward_runs_the_full_batch_and_the_short_one_eagerly(monkeypatch):
    """CompiledForBatch: one compiled graph (static shapes, the asked mode) for the training batch size; the short
    last batch of an epoch calls the eager module (no recompilation). Both compute with the same parameters."""
    compiled_calls, asked = [], {}

    def fake_compile(model, **kw):
        asked.update(kw)

        def run(x, *args, **kwargs):
            compiled_calls.append(len(x))
            return model(x, *args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = torch.nn.Linear(3, 2)
    forward = TR.CompiledForBatch(model, batch=4, mode="reduce-overhead")
    assert asked == {"mode": "reduce-overhead", "dynamic": False}
    x = torch.randn(4, 3)
    assert torch.equal(forward(x), model(x)) and torch.equal(forward(x[:3]), model(x[:3]))
    assert compiled_calls == [4]
    TR.CompiledForBatch(model, batch=4)
    assert asked["mode"] is None  # "default": torch.compile's own default


def test_a_save_killed_before_or_after_its_commit_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """Weights, state and history of an epoch are one set: a training process killed while saving epoch 2 resumes
    from all of epoch 1 (killed before the commit) or all of epoch 2 (after it), never a mix, and ends with the
    weights of the run that was never interrupted. A state from another epoch beside these weights is refused."""
    from nbutils import checkpoints as C

    whole, before, after = tmp_path / "whole", tmp_path / "before", tmp_path / "after"
    _vae_run(whole, 2)
    _vae_run(before, 1)
    _vae_run(after, 1)
    epoch1_state = (after / "vae_state.pt").read_bytes()
    real_write, real_replace = C.atomic_write_bytes, os.replace

    def killed_before_commit(path, payload):
        if path.name == "vae_manifest.json":
            raise KeyboardInterrupt
        return real_write(path, payload)

    def killed_after_commit(src, dst):
        if str(src).endswith(".vae_state.pt" + C.PENDING):  # weights already in place, the state not yet
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(C, "atomic_write_bytes", killed_before_commit)
    with pytest.raises(KeyboardInterrupt):
        _vae_run(before, 2, resume=True)
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", killed_after_commit)
    with pytest.raises(KeyboardInterrupt):
        _vae_run(after, 2, resume=True)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="vae_state.pt is not the file saved with the rest"):
        TR.read_state(after / "vae_state.pt")  # epoch-2 weights, epoch-1 state: refused until completed
    for run in (before, after):
        _vae_run(run, 2, resume=True)
        _same_run(whole, run)
        assert not list(run.glob(".*.pending")) and not list(run.glob(".*.tmp"))
    (after / "vae_state.pt").write_bytes(epoch1_state)  # another epoch's state beside these weights
    with pytest.raises(CheckpointError, match=r"vae_state.pt is not the file saved .* \(after epoch 2\)"):
        _vae_run(after, 3, resume=True)


def test_a_failed_start_leaves_no_folder_it_created(tmp_path, monkeypatch):
    """A command that fails before writing anything removes the run folder (and parents) it created; a folder that
    was there before, or that holds something, stays."""
    procs = TR.processes(torch.device("cpu"))
    new = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError, match="early"):
        with TR.owned(new, procs):
            assert (new / ".lock").exists()
            raise RuntimeError("early")
    assert not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        with TR.owned(tmp_path / "mine", procs):
            raise RuntimeError("early")
    assert (tmp_path / "mine").is_dir()  # the user's folder
    with pytest.raises(RuntimeError):
        with TR.owned(new, procs):
            (new / "vae.safetensors").write_bytes(b"written")
            raise RuntimeError("late")
    assert (new / "vae.safetensors").is_file()  # what was written stays
    with pytest.raises(ValueError, match="unknown device"):
        _vae_run(tmp_path / "c" / "d", 1, device="garbage")
    with pytest.raises(CheckpointError, match="cannot resume"):
        _vae_run(tmp_path / "c" / "d", 1, resume=True)
    from nbutils import train_unet as TU

    with pytest.raises(CheckpointError, match="no checkpoint at"):  # fails inside the run, holding the lock
        TU.train_unet(get_config("smoke"), run_dir=tmp_path / "c" / "d", vae_checkpoint=tmp_path / "none",
                      device="cpu", progress=False, log=lambda m: None)
    assert not (tmp_path / "c").exists()


def test_a_read_only_run_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """Writability is checked when the run folder is taken, before data is loaded or a step is trained."""
    import errno

    from nbutils import data as D

    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").touch()  # the lock file can be opened: only a real write shows the folder is read-only

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_work(*args, **kwargs):
        raise AssertionError("training work started")

    monkeypatch.setattr(TR.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(D, "load_images", no_work)
    with pytest.raises(CheckpointError, match=r"cannot write in the run folder .*run \(Read-only file system\)"):
        _vae_run(run, 1)
    monkeypatch.undo()
    if os.geteuid() != 0:  # root writes in read-only folders (docs/reliability.md: out of scope)
        run.chmod(0o555)
        try:
            with pytest.raises(CheckpointError, match="cannot write in the run folder"):
                _vae_run(run, 1)
        finally:
            run.chmod(0o755)


def test_a_model_too_large_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """The parameters of a config's model are counted on the meta device (nothing allocated); above
    MAX_MODEL_BYTES of float32, or deeper than MAX_MODEL_BLOCKS, the config is refused naming its --set flag, or the
    checkpoint that holds it."""
    from nbutils import checkpoints as C
    from nbutils import pipeline as P
    from nbutils.train_unet import train_unet
    from nbutils.unet import UNet
    from nbutils.vae import VAE

    for preset in ("smoke", "shipped", "full"):
        cfg = get_config(preset)
        for section, build in (("unet", UNet), ("vae", VAE)):
            model = build(getattr(cfg, section))
            real = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
            assert TR.check_model_size(cfg, section, build) == real, (preset, section)

    def only_counted(build):
        def guarded(section):
            assert torch.empty(()).device.type == "meta", f"a real {build.__name__} was built"
            return build(section)

        guarded.__name__ = build.__name__
        return guarded

    monkeypatch.setattr("nbutils.train_unet.UNet", only_counted(UNet))
    for setting, message in (("unet.block_out_channels=8192,16384", "asks for a UNet of at least 3,019,898,880"),
                             ("unet.cross_attention_dim=2000000", r"asks for a UNet of 600,199,428 parameters \(2.4"),
                             ("unet.layers_per_block=600", "asks for a UNet of 1,200 residual blocks")):
        cfg = get_config("smoke").override([setting])
        with pytest.raises(ValueError, match=rf"^--set {setting} {message}"):
            train_unet(cfg, run_dir=tmp_path / "run", device="cpu", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr("nbutils.train_vae.VAE", only_counted(VAE))
    with pytest.raises(ValueError, match=r"^--set vae.block_out_channels=4096,8192,8192 asks for a VAE of at least"):
        _vae_run(tmp_path / "run", 1, get_config("smoke").override(["vae.block_out_channels=4096,8192,8192"]))
    assert not (tmp_path / "run").exists()

    huge = get_config("smoke").override(["unet.block_out_channels=8192,16384"])
    C.save_model(tmp_path / "unet.safetensors", "unet", {"w": torch.zeros(1)}, huge, {})  # a doctored checkpoint
    with pytest.raises(ValueError, match="the config in .*unet.safetensors asks for a UNet of at least"):
        P.load_unet(tmp_path, device="cpu")
    assert C.MAX_MODEL_BYTES == 2_000_000_000


def test_step_flops_are_counted_on_meta_without_computing():
    """The estimate's FLOPs equal torch's count of a real forward + backward (per example, times the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nbutils.config import get_config
    from nbutils.training import describe_estimate, estimate_seconds, step_flops
    from nbutils.unet import UNet

    unet = UNet(get_config("smoke").unet)

    def loss_of(m, k):
        dev = next(m.parameters()).device
        t = torch.zeros(k, dtype=torch.long, device=dev)
        return m(torch.zeros(k, 4, 7, 7, device=dev), t, t).pow(2).mean()

    counted = step_flops(unet, loss_of, 64)
    assert all(p.grad is None for p in unet.parameters())  # the real model is untouched
    with FlopCounterMode(display=False) as counter:
        loss_of(unet, 2).backward()
    # (within a few percent: on the meta device attention may dispatch to another kernel than on a CPU)
    assert counted == pytest.approx(counter.get_total_flops() / 2 * 64, rel=0.05)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loss_of(unet, 2)
    forward = counter.get_total_flops() / 2 * 64  # a frozen model (a teacher): its forward pass only
    assert step_flops(unet, loss_of, 64, backward=False) == pytest.approx(forward, rel=0.05)
    assert forward < 0.6 * counted
    cpu = torch.device("cpu")
    assert estimate_seconds(1e9, 200, cpu) == pytest.approx(2 * estimate_seconds(1e9, 100, cpu))
    assert "expect about" in describe_estimate("UNet", 1e9, 100, cpu) and "100 steps" in describe_estimate(
        "UNet", 1e9, 100, cpu)


def test_the_gpu_preset_is_the_automatic_choice_and_fits_a_free_gpu():
    """On CUDA the default is `gpu`, whose two trainings are estimated at ≤ 10 minutes each on a T4-sized GPU."""
    from nbutils.config import get_config
    from nbutils.training import STEP_FLOOR_S, step_flops
    from nbutils.unet import UNet
    from nbutils.vae import VAE

    cfg = get_config("gpu")
    assert cfg.unet == get_config("shipped").unet and cfg.train_unet.epochs == get_config("shipped").train_unet.epochs
    assert cfg.train_unet.sample_every > 0  # notebook 04 shows the grids
    t4 = 40 * 7.5e10  # 40 SMs at the assumed rate
    vae_step = step_flops(VAE(cfg.vae), lambda m, k: sum(o.pow(2).mean() for o in m(torch.zeros(k, 1, 28, 28,
                                                                                              device="meta"))),
                          cfg.train_vae.batch_size)
    t = torch.zeros(2, dtype=torch.long)
    unet_step = step_flops(UNet(cfg.unet), lambda m, k: m(torch.zeros(k, 4, 7, 7, device="meta"), t[:k].to("meta"),
                                                          t[:k].to("meta")).pow(2).mean(), cfg.train_unet.batch_size)
    for step, tc, extra in [(vae_step, cfg.train_vae, 0), (unet_step, cfg.train_unet, cfg.finetune_unet.epochs)]:
        steps = (tc.epochs + extra) * -(-60_000 // tc.batch_size)
        assert steps * max(step / t4, STEP_FLOOR_S["cuda"]) <= 600
