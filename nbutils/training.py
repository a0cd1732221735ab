"""What every training loop here shares: the machinery around the step, so each loop shows only its step.

Longer than the ~400 lines a module aims at because it is the one home of the loop machinery both models
share (optimizer step, precision, stop/resume, the epoch runner) so that the two loops stay short.

* :class:`EMA` — an exponential moving average of the weights with warm-up; it is what gets evaluated,
  saved and shipped.
* :func:`lr_at` — a short linear learning-rate warm-up, then a constant rate (the EMA does the averaging
  a decaying schedule would), so the schedule never depends on how many epochs a call runs.
* :func:`optimizer_step` — NaN/inf guard, backward, gradient clipping, Adam, EMA update.
* :func:`autocast_dtype` / :func:`precision` — mixed precision and ``torch.compile`` on CUDA.
* :func:`start` / :func:`owned` — checks before any work (a model size the config can afford, a state to resume, a
  device, a run folder this process alone can write in), and a failed start that leaves no folder behind.
* :func:`open_tracker` — optional live curves for TensorBoard (accelerate's tracker), beside the run's own logs.
* :class:`Run` and :func:`fit` — the epoch loop: progress bars with the running loss, one checkpoint per
  epoch (weights + a resumable training state, committed as one set), exact resume, and Ctrl-C / SIGTERM
  handling: the current step finishes, a checkpoint *including the position inside the epoch* is written,
  the resume command is printed and :class:`TrainingInterrupted` is raised (a second signal stops at once).

The loops themselves live in :mod:`nbutils.train_vae` and :mod:`nbutils.train_unet`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import json
import math
import os
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .checkpoints import (
    PENDING,
    CheckpointError,
    check_files,
    commit_files,
    config_differences,
    finish_commits,
    model_parameters,
)
from .config import MIXED_PRECISION, Config, DataConfig, TrainConfig, VAEConfig, pick_device, runs_dir
from .distributed import OneProcess, processes


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was asked to stop (Ctrl-C, SIGTERM) and saved a resumable checkpoint first."""


# --------------------------------------------------------------------------------------------
# The pieces of one optimizer step
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's weights, with warm-up.

    ``decay_t = min(decay, (1 + t) / (10 + t))`` (the warm-up used by TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``): early on the average follows the weights
    closely, so an EMA sampled after a short run is not dominated by the random initialisation.
    ``warmup_steps`` additionally keeps decay at 0 (a plain copy) for the first steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup_steps: int = 0):
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        t = self.num_updates
        if t < self.warmup_steps:
            return 0.0
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(f"EMA holds {len(ema_params)} tensors, the model {len(params)}")
        # one fused kernel per dtype/device group instead of one per tensor (matters on a GPU)
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


def lr_at(step: int, tc: TrainConfig, warmup: int = 200) -> float:
    """Linear warm-up over the first ``warmup`` steps, then the constant ``tc.lr``.

    A constant rate plus an EMA of the weights (what we evaluate and ship) does the job of a decaying
    schedule without tying the schedule to a planned number of epochs: training for 2 epochs, or for
    1 and then resuming for 1 more, follows exactly the same learning rates.
    """
    return tc.lr * min(1.0, (step + 1) / warmup)


def make_optimizer(params, tc: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam; on CUDA the fused implementation (one kernel for every tensor's update instead of a handful of
    launches per tensor, which matters when a step is launch-bound). Same update rule, same state dict."""
    return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")


def check_finite(what: str, parts: dict, step: int, epoch: int, last_checkpoint: Path) -> None:
    """Raise :class:`NonFiniteLossError` when ``parts["loss"]`` (a number or a 0-d tensor) is NaN or infinite."""
    if not math.isfinite(float(parts["loss"])):
        readable = {k: float(v) for k, v in parts.items()}
        raise NonFiniteLossError(
            f"non-finite {what} loss at step {step} (epoch {epoch + 1}): {readable}; last good checkpoint: "
            f"{last_checkpoint if last_checkpoint.exists() else 'none'}"
        )


def optimizer_step(what: str, loss: torch.Tensor, parts: dict | None, model: nn.Module, ema: EMA,
                   opt: torch.optim.Optimizer, tc: TrainConfig, step: int, epoch: int, last_checkpoint: Path,
                   scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimizer step: NaN/inf guard, backward, gradient clipping, Adam, EMA update; returns the gradient norm
    (before clipping) as a 0-d tensor on the model's device.

    ``parts`` are the loss parts of the whole (global) batch, checked before the step; ``None`` leaves the check to
    the caller (:func:`fit` checks when it reads the numbers back, so that a GPU step never waits for the host).
    ``scaler`` is fp16's gradient scaler."""
    if parts is not None:
        check_finite(what, parts, step, epoch, last_checkpoint)
    grad_norm = backward_and_step(loss, model, opt, tc, scaler)
    ema.update(model)
    return grad_norm


def backward_and_step(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer, tc: TrainConfig,
                      scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Backward, gradient clipping and the optimizer's step (no host synchronisation: a CUDA graph can hold it);
    returns the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)  # skipped when fp16 gradients overflowed
        scaler.update()
    return grad_norm.detach()


def autocast_dtype(setting: str, device: torch.device, log: Callable[[str], None] = print,
                   compile: bool = False) -> torch.dtype | None:
    """The autocast dtype a training run uses for ``mixed_precision=setting`` (None = float32 throughout).

    Mixed precision is a CUDA feature here: on a CPU or MPS any setting trains in float32, with a one-line
    notice when ``bf16``/``fp16`` was asked for. On CUDA: ``auto`` = bf16 when the forward pass is compiled
    (``compile``) on a GPU that supports bf16 (Ampere and newer), else float32; ``bf16`` = bf16, an error on a
    GPU without it; ``fp16`` = float16 with a gradient scaler; ``no`` = float32. Model outputs are cast to
    float32 before the loss either way.

    Why ``auto`` depends on compile: these models are small enough that a GPU step is bound by kernel launches,
    and uncompiled autocast adds launches (the casts); compiled, the casts fuse away (docs/results.md measures
    the three settings).
    """
    if setting not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(map(repr, MIXED_PRECISION))}, got {setting!r}")
    if setting == "no":
        return None
    if device.type != "cuda":
        if setting != "auto":
            log(f"note: mixed_precision={setting!r} has no effect on {device.type} (CUDA only); training in float32")
        return None
    if setting == "fp16":
        return torch.float16
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting == "bf16" and not supported:
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
        raise ValueError(f"mixed_precision='bf16' needs a GPU with bfloat16 support (Ampere or newer); {name} has "
                         "none: use 'fp16' or 'no'")
    if setting == "auto" and not compile:
        return None
    return torch.bfloat16 if supported else None


class CompiledForBatch:
    """The forward pass compiled for one batch size (``torch.compile(dynamic=False)``), the eager module for any
    other: an epoch's short last batch runs eagerly, once per epoch, instead of costing a recompilation (and, under
    ``mode="reduce-overhead"``, a second set of CUDA graphs). Both call the same parameters."""

    def __init__(self, model: nn.Module, batch: int, mode: str = "default"):
        self.model, self.batch = model, batch
        self.compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        return (self.compiled if len(x) == self.batch else self.model)(x, *args, **kwargs)


def precision(tc: TrainConfig, model: nn.Module, device: torch.device, log: Callable[[str], None],
              batch: int | None = None) -> tuple[torch.dtype | None, torch.amp.GradScaler | None, nn.Module]:
    """``(autocast dtype, fp16 gradient scaler or None, the callable for the forward pass)``; with ``tc.compile`` on
    CUDA the forward is compiled for batches of ``batch`` examples (default ``tc.batch_size``; see
    :class:`CompiledForBatch`)."""
    dtype = autocast_dtype(tc.mixed_precision, device, log, compile=tc.compile)
    if dtype is not None:
        log(f"mixed precision: {str(dtype).removeprefix('torch.')} autocast on {device}")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    forward = model
    if tc.compile:
        if device.type == "cuda":
            forward = CompiledForBatch(model, batch or tc.batch_size, tc.compile_mode)
        else:
            log(f"note: compile=True has no effect on {device.type} (CUDA only); training uncompiled")
    return dtype, scaler, forward


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a no-op context for None (float32). Without autocast's cache of cast
    weights (each weight is cast once a step anyway), which CUDA graph capture does not allow."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False)


def check_model_size(cfg: Config, section: str, build: Callable[[Any], nn.Module]) -> int:
    """The parameters of ``build(cfg.<section>)`` (e.g. ``check_model_size(cfg, "unet", UNet)``), counted without
    building it; a model too large to train here is a ValueError that names the ``--set`` flags that asked for it
    (:func:`nbutils.checkpoints.model_parameters`)."""
    try:
        flags = cfg.cli_flags()
    except ValueError:  # a config of no preset
        flags = []
    mine = [f"--set {value}" for flag, value in zip(flags, flags[1:], strict=False)
            if flag == "--set" and value.startswith(f"{section}.")]
    source = " ".join(mine) if mine else f"the {cfg.preset} preset's {section} config"
    return model_parameters(build, getattr(cfg, section), source)


#: What the time estimate assumes a device sustains on these small models, in FLOP/s — per thread for "cpu", per
#: streaming multiprocessor for "cuda" — and the least one training step takes there (a GPU step of a small model is
#: bound by kernel launches).
ASSUMED_FLOPS = {"cpu": 5e10, "cuda": 7.5e10, "mps": 1e12}
STEP_FLOOR_S = {"cpu": 0.0, "cuda": 0.010, "mps": 0.010}


def step_flops(model: nn.Module, loss_of: Callable[[nn.Module, int], torch.Tensor], batch_size: int,
               backward: bool = True) -> float:
    """FLOPs of one training step — ``loss_of(model, n)``'s forward pass on a batch of n, and its backward pass
    unless ``backward`` is false (a frozen model such as a distillation's teacher) — at ``batch_size``, counted by
    torch's FlopCounterMode on a meta-device copy of ``model``: nothing is computed."""
    meta = copy.deepcopy(model).to("meta")
    n = 2
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        loss = loss_of(meta, n)
        if backward:
            loss.backward()
    return counter.get_total_flops() / n * batch_size


def estimate_seconds(flops_per_step: float, steps: int, device: torch.device) -> float:
    """A training time from counted FLOPs and :data:`ASSUMED_FLOPS` (an estimate; the progress bar measures)."""
    kind = device.type
    units = 1
    if kind == "cpu":
        units = torch.get_num_threads()
    elif kind == "cuda":
        units = torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else 40
    rate = ASSUMED_FLOPS.get(kind, ASSUMED_FLOPS["cpu"]) * units
    return steps * max(flops_per_step / rate, STEP_FLOOR_S.get(kind, 0.0))


def describe_estimate(what: str, flops_per_step: float, steps: int, device: torch.device) -> str:
    """One line for the log: the expected training time and what it rests on."""
    seconds = estimate_seconds(flops_per_step, steps, device)
    when = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s" if seconds >= 1 else "a second"
    return (f"{what}: expect about {when} for {steps:,} steps on {device.type} ({flops_per_step / 1e9:.1f} GFLOP per "
            "step at an assumed device speed; the progress bar shows the real rate)")


def start(tc: TrainConfig, epochs: int, run_dir: str | Path | None, preset: str, device, log: Callable[[str], None],
          progress: bool, resume_state: str | None = None
          ) -> tuple[Path, OneProcess, torch.device, Callable[[str], None], bool]:
    """What both loops do first: check ``epochs``, that there is a state to resume (``resume_state``, its file
    name, when resuming), pick the run folder (default ``runs/PRESET``; :func:`owned` creates it), the device and
    the process group (one process, or one of several under ``accelerate launch``). Returns ``(run_dir, procs,
    device, log, progress)``, log and progress for this process. Nothing is written yet."""
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    run_dir = Path(run_dir) if run_dir is not None else runs_dir() / preset
    # (a state whose save was killed after its commit is still pending: owned() puts it in place)
    if resume_state is not None and not (run_dir / resume_state).is_file() \
            and not (run_dir / f".{resume_state}{PENDING}").is_file():
        raise CheckpointError(f"cannot resume: {run_dir / resume_state} does not exist (train without --resume "
                              "first)")
    procs = processes(pick_device(device))
    return run_dir, procs, procs.device(pick_device(device)), procs.log(log), progress and procs.is_main


class RunInUseError(CheckpointError):
    """Another process is training in the same run folder."""


@contextmanager
def owned(run_dir: Path, procs: OneProcess):
    """Hold the run folder for the whole run: create it (with missing parents), then take an OS lock
    (``RUN_DIR/.lock``, released even when the process is killed), so that a second training process on the same
    folder stops at once with one clear error instead of overwriting the first one's checkpoints. Inside the lock:
    temporary files of a killed write are removed, a checkpoint set whose commit was killed is completed or
    discarded (:func:`nbutils.checkpoints.finish_commits`), and the folder is checked writable, before any work.
    When the run fails before writing anything there, the folders this process created are removed again.
    Only process 0 of several holds the lock (the others write nothing, and wait for it to have done the above)."""
    created = []  # the folders this process creates, deepest first
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() or folder.is_symlink():
            break
        created.append(folder)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the run folder {run_dir} ({exc.strerror or exc})") from None
    if not procs.is_main:
        procs.barrier()  # process 0 has taken the folder and completed any commit that was cut short
        yield
        return
    lock = FileLock(run_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunInUseError(f"{run_dir} is in use by another training process; wait for it to finish, or train in "
                            "another --run-dir") from None
    except OSError as exc:
        _remove_unused(created)
        raise CheckpointError(f"cannot write in the run folder {run_dir} ({exc.strerror or exc})") from None
    try:
        for stale in run_dir.glob(".*.tmp"):  # atomic_write_bytes' temporaries of a write that was killed
            stale.unlink(missing_ok=True)
        finish_commits(run_dir)
        _check_writable(run_dir)
        procs.barrier()
        yield
    except BaseException:
        _remove_unused(created, run_dir / ".lock")
        raise
    finally:
        lock.release()


def _check_writable(run_dir: Path) -> None:
    """A file can be created in ``run_dir`` (a read-only folder or mount fails here, not after an epoch)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(f"cannot write in the run folder {run_dir} ({exc.strerror or exc})") from None


def _remove_unused(created: list[Path], lock: Path | None = None) -> None:
    """Remove the folders this process created (deepest first) while they hold nothing but its ``lock`` file: a
    run that failed before writing anything leaves no empty folder behind. Anything written there stays."""
    if not created:
        return
    try:
        if lock is not None and [p.name for p in created[0].iterdir()] == [lock.name]:
            lock.unlink()  # still held: no other process can have taken it in between
        for folder in created:
            folder.rmdir()  # fails, and stops here, when the folder is not empty
    except OSError:
        pass


def image_shape(d: DataConfig, v: VAEConfig, vae_name: str = "the VAE") -> tuple[int, int, int]:
    """(C, H, W) of the dataset; an error when the VAE (config or checkpoint) is for another shape."""
    if (v.in_channels, v.image_size) != (d.channels, d.image_size):
        raise ValueError(f"{vae_name} is configured for {v.in_channels}×{v.image_size}×{v.image_size} images but "
                         f"{d.dataset} has {d.channels}×{d.image_size}×{d.image_size}: build the config with "
                         f"get_config(preset, dataset={d.dataset!r}) (CLI: --dataset {d.dataset}), which sets both")
    return d.image_shape


def progress_bar(iterable: Iterable, total: int, desc: str, enabled: bool, done: int = 0):
    """A progress bar over ``iterable``; ``done`` items are drawn first without showing them (a resumed epoch).

    The skipped items are still drawn, so that the shuffling generator ends where an uninterrupted epoch
    leaves it; the bar then starts at ``done`` and its rate and time left count only the batches run now.
    """
    items = iter(iterable)
    for _ in range(done):
        next(items)
    return tqdm(items, total=total, initial=done, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Stopping, saving and resuming
# --------------------------------------------------------------------------------------------


class StopRequest:
    """While active, SIGINT and SIGTERM only *request* a stop, checked by the loop after each step.

    A second signal raises ``KeyboardInterrupt`` at once. Signal handlers can only be installed from
    the main thread; elsewhere (e.g. a training thread) the default behaviour stays.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class History:
    """Per-step losses and per-epoch metrics of a training run (kept in the state file)."""

    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)


def resume_hint(what: str, run_dir: Path, epochs: int, cfg: Config) -> str:
    """The command that resumes this run, with the ``--dataset``/``--set`` flags its config needs."""
    flags = "".join(f" {shlex.quote(f)}" for f in cfg.cli_flags())
    return (f"resume with: python -m nbutils train-{what} --preset {cfg.preset}{flags} --run-dir {run_dir} "
            f"--epochs {epochs} --resume (in Python: train_{what}(cfg, run_dir={str(run_dir)!r}, epochs={epochs}, "
            "resume=True))")


def read_state(path: Path) -> dict[str, Any]:
    """A training state file, read without unpickling code: tensors, numbers, strings and containers only
    (``torch.load(weights_only=True)``), so a crafted file cannot run anything. A ``NAME_state.pt`` beside its
    manifest must be, with the other files of its set, the one saved with it (e.g. not another epoch's state beside
    these weights): :func:`nbutils.checkpoints.check_files`."""
    path = Path(path)
    if path.name.endswith("_state.pt"):
        check_files(path.parent, path.name.removesuffix("_state.pt"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable training state ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def load_history(run_dir: str | Path, name: str = "vae") -> tuple[list[dict], list[dict]]:
    """``(per-step losses, per-epoch metrics)`` of a run, from its state file."""
    path = Path(run_dir) / f"{name}_state.pt"
    if not path.is_file():
        raise CheckpointError(f"no training history at {path}")
    state = read_state(path)
    return state["history"]["steps"], state["history"]["epochs"]


@dataclass
class Run:
    """One training run: the model, its EMA, optimizer, generators, counters and where it is saved.

    ``what`` names the model (``vae``/``unet``): files are ``RUN_DIR/{what}.safetensors`` (EMA weights +
    config, encoded by ``weights``: ``(safetensors bytes, JSON bytes)`` of :func:`~nbutils.checkpoints.encode_model`)
    and ``RUN_DIR/{what}_state.pt`` (everything needed to resume), listed in ``RUN_DIR/{what}_manifest.json``.
    ``sections`` are the config sections that must match when resuming (only epochs and precision may change).
    """

    what: str
    cfg: Config
    tc: TrainConfig
    run_dir: Path
    model: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    gens: dict[str, torch.Generator]
    procs: OneProcess
    device: torch.device
    log: Callable[[str], None]
    progress: bool
    sections: tuple[str, ...]
    weights: Callable[[Run, int], tuple[bytes, bytes]]
    step: int = 0
    epoch: int = 0  # finished epochs
    phase_start: int = 0  # the step the current training phase began at (its lr warm-up counts from there)
    history: History = field(default_factory=History)
    partial: dict | None = None  # resuming inside an epoch: {"batch", "epoch_rng", "running"}
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    forward: Callable | None = None  # the model, or its compiled forward (CompiledForBatch)
    saved_scaler: dict | None = None  # fp16's loss scale from the state being resumed
    cuda_graph: bool = False  # replay each full-batch step as one CUDA graph (StepGraph)

    @property
    def weights_path(self) -> Path:
        return self.run_dir / f"{self.what}.safetensors"

    @property
    def state_path(self) -> Path:
        return self.run_dir / f"{self.what}_state.pt"

    def resume(self) -> None:
        """Load the state written by :meth:`save`; the config sections that shape the run must match."""
        if not self.state_path.is_file():
            raise CheckpointError(f"cannot resume: {self.state_path} does not exist (train without --resume first)")
        state = read_state(self.state_path)
        # read the saved config through Config so fields added since it was written take their defaults
        saved, now = Config.from_dict(state["config"]).to_dict(), self.cfg.to_dict()
        diffs = [d for sec in self.sections for d in config_differences(saved.get(sec, {}), now[sec], f"{sec}.")]
        free = (".epochs", ".mixed_precision", ".compile")  # may change between a run and its resumption
        diffs = [d for d in diffs if not d.split(":")[0].endswith(free)]
        if diffs:
            raise CheckpointError(f"cannot resume {self.run_dir}: its config differs: " + "; ".join(diffs))
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:  # as make_optimizer has them (a StepGraph run saved a tensor lr)
            group["lr"], group["capturable"] = float(group["lr"]), False
        torch.set_rng_state(state["rng"]["torch"])
        for k, g in self.gens.items():
            g.set_state(state["rng"][k])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.phase_start = int(state.get("phase_start", 0))
        self.history = History(**state["history"])
        self.partial = state.get("partial")
        self.saved_scaler = state.get("scaler")
        where = f" (batch {self.partial['batch']} of epoch {self.epoch + 1})" if self.partial else ""
        self.log(f"resuming {self.run_dir} after epoch {self.epoch}{where}, step {self.step}")

    def prepare(self) -> None:
        """Mixed precision and compile for the forward pass; an fp16 run resumes with the loss scale it reached."""
        share = len(self.procs.shard(torch.empty(self.tc.batch_size))[0])  # this process's part of a full batch
        tc = self.tc
        own_graphs = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
        if self.cuda_graph and tc.compile and tc.compile_mode in own_graphs:
            tc = dataclasses.replace(tc, compile_mode=own_graphs[tc.compile_mode])  # the step is one graph already
            self.log("note: with the step as a CUDA graph the forward is compiled without CUDA graphs of its own")
        self.amp_dtype, self.scaler, self.forward = precision(tc, self.procs.prepare(self.model), self.device,
                                                              self.log, batch=share)
        if self.scaler is not None and self.saved_scaler:
            self.scaler.load_state_dict(self.saved_scaler)

    def save(self, epochs_done: int, partial: dict | None = None) -> None:
        """Weights, the resumable state and the history (JSON), committed as one set
        (:func:`nbutils.checkpoints.commit_files`): whenever the process is killed, the run folder holds (after the
        next start) all of this save or all of the previous one."""
        weights, weights_json = self.weights(self, epochs_done)
        state = io.BytesIO()
        torch.save({
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in self.gens.items()}},
            "step": self.step,
            "epoch": epochs_done,
            "phase_start": self.phase_start,
            "history": {"steps": self.history.steps, "epochs": self.history.epochs},
            "partial": partial,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,  # fp16's loss scale
        }, state)
        commit_files(self.run_dir, self.what, {
            self.weights_path.name: weights,
            self.weights_path.with_suffix(".json").name: weights_json,
            self.state_path.name: state.getvalue(),
            f"{self.what}_history.json": json.dumps(self.history.epochs, indent=1).encode(),
            # the training curves, one JSON object per step (loss parts, lr, gradient norm): for plots and other tools
            f"{self.what}_steps.jsonl": "".join(json.dumps(r) + "\n" for r in self.history.steps).encode(),
        }, epochs_done=epochs_done, step=self.step, mid_epoch=partial is not None)

    def split_note(self) -> str:
        n = self.procs.world_size
        return "" if n == 1 else f" (global: {n} processes × ≈{self.tc.batch_size / n:g} each)"


#: Experiment trackers that ``--log-with`` can feed (through accelerate's trackers), and what each needs installed.
LOG_WITH = {"tensorboard": ("tensorboard", "pip install tensorboard (or: pip install -e '.[tensorboard]')")}


def check_log_with(log_with: str | None) -> None:
    """Before any work: ``log_with`` is a known tracker whose package is installed, else a one-line error."""
    if log_with is None:
        return
    if log_with not in LOG_WITH:
        raise ValueError(f"unknown tracker {log_with!r}; valid: {', '.join(LOG_WITH)}")
    package, how = LOG_WITH[log_with]
    if importlib.util.find_spec(package) is None or importlib.util.find_spec("accelerate") is None:
        raise RuntimeError(f"--log-with {log_with} needs the packages accelerate and {package}: {how}")


@contextmanager
def open_tracker(log_with: str | None, run: Run):
    """accelerate's tracker for ``log_with`` writing to ``RUN_DIR/tensorboard/{what}`` (``tensorboard --logdir
    RUN_DIR/tensorboard``), or None, closed on the way out. A resumed run first drops what an interrupted process
    logged after its last checkpoint (``purge_step``), so no step appears twice. The run's own logs
    (``{what}_steps.jsonl``, ``{what}_history.json``) are written either way."""
    if log_with is None:
        yield None
        return
    check_log_with(log_with)
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker(run.what, run.run_dir / "tensorboard", purge_step=run.step + 1)
    tracker.start()
    tracker.writer.add_text("config", "```\n" + str(run.cfg) + "\n```", global_step=run.step)
    try:
        yield tracker
    finally:
        tracker.finish()


def _numbers(record: dict, prefix: str, skip: tuple[str, ...] = ("epoch", "step", "processes")) -> dict[str, float]:
    """The numbers of a history record as tracker values named ``prefix/key``."""
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _smooth(running: float, value: float, beta: float = 0.98) -> float:
    """Exponential running mean for the progress bar (starts at the first value)."""
    return value if running == 0 else beta * running + (1 - beta) * value


#: Steps between reads of the per-step numbers (loss parts, gradient norm) back to the host, by device type;
#: every step where absent. Reading a number from a GPU waits for all queued work, so reading every step would keep
#: the host from queueing the next step while this one runs. The numbers and their history are the same either way.
SYNC_EVERY = {"cuda": 32}


class _StepLog:
    """The per-step numbers of :func:`fit`, kept where they were computed and read back to the host in one transfer
    every ``every`` steps (and before any checkpoint): then checked for NaN/inf, smoothed for the progress bar,
    appended to the run's history and passed to ``on_step``, in step order."""

    def __init__(self, run: Run, every: int, on_step: Callable[[int, dict], None] | None, tracker=None):
        self.run, self.every, self.on_step, self.tracker = run, every, on_step, tracker
        self.pending: list[tuple[int, int, float, dict, Any]] = []
        self.running: float = 0.0
        self.last: dict | None = None

    def add(self, step: int, epoch: int, lr: float, parts: dict, grad_norm) -> bool:
        """Record one step; True when the numbers were read back (time to refresh the progress bar)."""
        self.pending.append((step, epoch, lr, parts, grad_norm))
        if len(self.pending) >= self.every:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self.pending:
            return
        flat = [v for *_, parts, g in self.pending for v in (*parts.values(), g)]
        # the tensors in one transfer (float32: what the losses and norms are, and all that MPS has); the numbers
        # that already are on the host (several processes' combined parts) as they are
        tensors = [v.detach().reshape(()).float() for v in flat if isinstance(v, torch.Tensor)]
        read = iter(torch.stack(tensors).tolist() if tensors else [])
        values = iter([next(read) if isinstance(v, torch.Tensor) else float(v) for v in flat])
        pending, self.pending = self.pending, []
        for step, epoch, lr, parts, _ in pending:
            numbers = {k: next(values) for k in parts}
            grad_norm = next(values)
            check_finite(self.run.what.upper(), numbers, step - 1, epoch, self.run.weights_path)
            self.running = _smooth(self.running, numbers["loss"])
            self.run.history.steps.append({"step": step, **numbers, "lr": lr, "grad_norm": grad_norm})
            if self.tracker is not None:
                self.tracker.log(_numbers(self.run.history.steps[-1], "train"), step)
            self.last = numbers
            if self.on_step is not None:
                self.on_step(step, numbers)


class _Rerun:
    """Stands in for :class:`_CapturedGraph` off CUDA: ``replay()`` runs ``fn`` again (the same step, uncaptured)."""

    def __init__(self, fn: Callable[[], torch.Tensor], device: torch.device):
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class _CapturedGraph:
    """``fn`` recorded once as a CUDA graph (:class:`torch.cuda.CUDAGraph`); ``replay()`` re-runs the recorded
    kernels on whatever the captured buffers hold now and returns ``fn``'s (static) output."""

    def __init__(self, fn: Callable[[], torch.Tensor], device: torch.device):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class StepGraph:
    """The training step as one CUDA graph: the loss, backward, gradient clipping and Adam of a full batch are
    captured once and then replayed, one launch a step instead of hundreds ("whole-network capture" in PyTorch's
    CUDA semantics notes). What a replay cannot do stays outside, in the same order as without the graph: the
    step's inputs (the batch and its random draws, made eagerly by ``draw``, so the random streams are those of
    the plain loop) are copied into fixed buffers first, and the EMA update (one fused launch) follows.

    On CUDA the learning rate becomes a tensor that the (capturable, fused) Adam reads, filled before each replay.
    The first ``warmup`` steps of each optimizer run eagerly on a side stream (they are real steps: they initialise
    Adam's state, cuDNN's choices and compiled code), the next one is captured and replayed; a new optimizer (a
    second training phase) starts over. A batch of another shape (an epoch's short last batch) runs eagerly. One
    process, bf16 or float32 only. Off CUDA the same path runs uncaptured (``_Rerun``): how it is tested on a CPU.
    """

    def __init__(self, run: Run, train_step: Callable, warmup: int = 3,
                 graph: Callable[[Callable[[], torch.Tensor], torch.device], Any] | None = None):
        if run.procs.world_size != 1:
            raise ValueError("cuda_graph: one process only")
        if run.scaler is not None:
            raise ValueError("cuda_graph: bf16 or float32 only (fp16's loss scaling decides on the host)")
        self.run, self.train_step, self.warmup = run, train_step, warmup
        self.make_graph = graph or (_CapturedGraph if run.device.type == "cuda" else _Rerun)
        self.opt: torch.optim.Optimizer | None = None
        self.static: list[torch.Tensor] | None = None
        self.keys: list[str] | None = None

    def _new_optimizer(self) -> None:
        self.opt, self.graph, self.eager_steps = self.run.opt, None, 0
        if self.run.device.type == "cuda":
            for group in self.opt.param_groups:  # what a captured Adam reads at each replay
                group["capturable"] = True
                group["lr"] = torch.tensor(float(group["lr"]), device=self.run.device)

    def _body(self) -> torch.Tensor:
        """One step on the fixed buffers: the loss parts and the gradient norm stacked in one tensor."""
        loss, parts, _ = self.train_step(self.static)
        grad_norm = backward_and_step(loss, self.run.model, self.run.opt, self.run.tc)
        self.keys = list(parts)
        return torch.stack([*(parts[k].float() for k in self.keys), grad_norm.float()])

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> tuple[dict, torch.Tensor]:
        """One step on ``inputs`` (``draw(batch)``): ``(loss parts, gradient norm)`` as tensors of this step."""
        if self.run.opt is not self.opt:
            self._new_optimizer()
        if len(inputs[0]) != self.run.tc.batch_size:  # a short last batch (also the first after a resume): eagerly
            loss, parts, _ = self.train_step(inputs)
            return parts, backward_and_step(loss, self.run.model, self.run.opt, self.run.tc)
        if self.static is None:
            self.static = [x.clone() for x in inputs]
        for buffer, x in zip(self.static, inputs, strict=True):
            buffer.copy_(x)
        if self.graph is None and self.eager_steps < self.warmup:
            side = None
            if self.run.device.type == "cuda":  # warm-up steps on a side stream, as capture wants
                side = torch.cuda.Stream(self.run.device)
                side.wait_stream(torch.cuda.current_stream(self.run.device))
            with torch.cuda.stream(side) if side is not None else nullcontext():
                out = self._body()
            if side is not None:
                torch.cuda.current_stream(self.run.device).wait_stream(side)
            self.eager_steps += 1
        else:
            if self.graph is None:
                self.graph = self.make_graph(self._body, self.run.device)  # recorded, not run
            out = self.graph.replay().clone()  # the next replay overwrites the graph's output
        return dict(zip(self.keys, out[:-1], strict=True)), out[-1]


def check_checkpoint_every(every: int) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint_every must be a whole number ≥ 1, got {every!r}")


def fit(
    run: Run,
    epochs: int,
    batches: Callable[[int], Any],
    train_step: Callable[[tuple], tuple[torch.Tensor, dict[str, float], int]],
    epoch_gens: tuple[str, ...] = ("shuffle",),
    evaluate: Callable[[], dict[str, float]] | None = None,
    after_epoch: Callable[[dict], None] | None = None,
    describe: Callable[[dict], str] = lambda record: "",
    postfix: Callable[[float, dict], dict] = lambda running, parts: {"loss": f"{running:.4f}"},
    on_step: Callable[[int, dict], None] | None = None,
    start_epoch: Callable[[int], None] | None = None,
    log_with: str | None = None,
    checkpoint_every: int = 1,
    draw: Callable[[tuple], tuple] = lambda batch: batch,
) -> None:
    """Train ``run`` from its current epoch up to ``epochs``.

    ``batches(epoch)`` returns the epoch's loader (it may draw from the generators named in ``epoch_gens``);
    ``draw(batch)`` makes a step's inputs (the batch on the device and its random draws), ``train_step(inputs)``
    returns ``(loss of this process's share, loss parts of the global batch, global batch size)`` and draws
    nothing itself (``run.cuda_graph`` replays it as a CUDA graph: :class:`StepGraph`). After each epoch process 0
    adds ``evaluate()``'s metrics to the epoch's history record, logs a line ending in ``describe(record)``, saves
    the run and calls ``after_epoch(record)`` (pictures, a notebook's live plot). A stop request (Ctrl-C, SIGTERM)
    ends the step, saves the position inside the epoch and raises :class:`TrainingInterrupted`.
    ``start_epoch(epoch)`` runs before each epoch that starts afresh (not one resumed in the middle).
    ``log_with="tensorboard"`` also sends every step's numbers and every epoch's record to TensorBoard
    (:func:`open_tracker`). ``checkpoint_every``: epochs between saves and ``evaluate()`` calls (a long GPU run
    spends less time writing); the last epoch and a stop request always save, a killed process loses the epochs
    since the last save.
    """
    check_checkpoint_every(checkpoint_every)
    procs = run.procs
    graph = StepGraph(run, train_step) if run.cuda_graph else None
    with open_tracker(log_with if procs.is_main else None, run) as tracker, StopRequest() as stop:
        steps = _StepLog(run, SYNC_EVERY.get(run.device.type, 1) if procs.world_size == 1 else 1, on_step, tracker)
        for epoch in range(run.epoch, epochs):
            if start_epoch is not None and run.partial is None:
                start_epoch(epoch)
            run.model.train()
            t0 = time.perf_counter()
            gens = {k: run.gens[k] for k in epoch_gens}
            if run.partial is None:
                epoch_rng, skip, steps.running = {k: g.get_state() for k, g in gens.items()}, 0, 0.0
            else:  # resuming inside this epoch: replay its shuffling, skip the batches done before the stop
                for k, g in gens.items():
                    g.set_state(run.partial["epoch_rng"][k])
                epoch_rng, skip, steps.running = run.partial["epoch_rng"], int(run.partial["batch"]), \
                    float(run.partial["running"])
                run.partial = None
            loader = batches(epoch)
            bar = progress_bar(loader, len(loader), f"{run.what.upper()} epoch {epoch + 1}/{epochs}", run.progress,
                               done=skip)
            for b, batch in enumerate(bar, start=skip):
                if len(batch[0]) < procs.world_size:  # a last batch too small to split (several processes only)
                    continue
                lr = lr_at(run.step - run.phase_start, run.tc, run.tc.lr_warmup_steps)
                for group in run.opt.param_groups:
                    if isinstance(group["lr"], torch.Tensor):  # a captured Adam's (StepGraph)
                        group["lr"].fill_(lr)
                    else:
                        group["lr"] = lr
                if graph is not None:
                    parts, grad_norm = graph(draw(batch))
                    run.ema.update(run.model)
                else:
                    loss, parts, n_global = train_step(draw(batch))
                    grad_norm = optimizer_step(run.what.upper(), loss * procs.loss_factor(n_global), None,
                                               run.model, run.ema, run.opt, run.tc, run.step, epoch,
                                               run.weights_path, run.scaler)
                run.step += 1
                if steps.add(run.step, epoch, lr, parts, grad_norm):
                    bar.set_postfix(**postfix(steps.running, steps.last))
                if procs.any(stop.signal is not None):
                    bar.close()
                    steps.flush()
                    if procs.is_main:
                        run.save(epoch, {"batch": b + 1, "epoch_rng": epoch_rng, "running": steps.running})
                    procs.barrier()
                    msg = (f"{stop.signal or 'stop request'} received: stopped after step {run.step} (batch "
                           f"{b + 1}/{len(loader)} of epoch {epoch + 1}); checkpoint written to {run.run_dir}. "
                           + resume_hint(run.what, run.run_dir, epochs, run.cfg))
                    raise TrainingInterrupted(msg)  # its message is the one the user sees (CLI: the error line)
            steps.flush()
            if steps.last is not None:
                bar.set_postfix(**postfix(steps.running, steps.last))
            bar.close()
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "step": run.step, "seconds": seconds, "train_loss": steps.running,
                      "processes": procs.world_size, "batches_per_s": (len(loader) - skip) / max(seconds, 1e-9)}
            if skip:  # "seconds" then covers only the batches run after resuming
                record["resumed_at_batch"] = skip
            save = (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs
            if procs.is_main and evaluate is not None and save:
                record.update(evaluate())
            run.history.epochs.append(record)
            run.epoch = epoch + 1
            run.log(f"epoch {epoch + 1}/{epochs}: train loss {steps.running:.5f}{describe(record)}  "
                    f"({record['seconds']:.0f} s)")
            if steps.tracker is not None:
                steps.tracker.log(_numbers(record, "epoch"), run.step)
            if procs.is_main:
                if save:
                    run.save(epoch + 1)
                if after_epoch is not None:
                    after_epoch(record)
    procs.barrier()  # the last checkpoint is on disk before any process returns
