"""Training loops: the VAE and the latent UNet.

What every loop here does:

* progress bars (``tqdm.auto``: a widget in notebooks, text in a terminal) showing the running loss;
* an EMA copy of the weights (with warm-up), which is what gets evaluated, saved and shipped;
* a short learning-rate warm-up, then a constant rate (the EMA does the averaging a decaying schedule
  would), so the schedule does not depend on how many epochs a call runs and resuming cannot bend it;
* test-set metrics and a picture after every epoch, a checkpoint after every epoch
  (``RUN_DIR/vae.safetensors`` = EMA weights + config, ``RUN_DIR/vae_state.pt`` = optimizer, step,
  RNG states, history), written atomically;
* ``resume=True`` continues from ``RUN_DIR``'s checkpoint to ``epochs`` total epochs;
* a non-finite loss stops training at once with the step and the loss parts;
* Ctrl-C / SIGINT / SIGTERM (a notebook's "interrupt kernel" included) finishes the current step,
  writes a checkpoint *including the position inside the epoch*, says how to resume and raises
  :class:`TrainingInterrupted`; resuming then continues exactly where the run stopped (a second Ctrl-C
  stops at once, without a checkpoint).
"""

from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as D
from .checkpoints import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_bytes,
    config_differences,
    file_digest,
    load_state_strict,
    read_model,
    resolve_checkpoint,
    save_model,
)
from .config import MIXED_PRECISION, Config, DataConfig, TrainConfig, VAEConfig, pick_device, runs_dir
from .distributed import OneProcess, processes
from .metrics import reconstruction_metrics
from .vae import VAE, latent_stats, vae_loss

VAE_FILE = "vae.safetensors"
VAE_STATE_FILE = "vae_state.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was asked to stop (Ctrl-C, SIGTERM) and saved a resumable checkpoint first."""


class _StopRequest:
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

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _epoch_start(partial: dict | None, epoch_gens: dict[str, torch.Generator]) -> tuple[dict, int, float]:
    """``(generator states at the epoch's start, batches to skip, running loss)`` for the next epoch.

    Normally: the current states, 0, 0.0. When resuming a run interrupted inside an epoch, the generators
    that the epoch's shuffling (and latent draw) consume are put back to where that epoch began, so the
    same permutation is drawn again and the batches already done can be skipped.
    """
    if partial is None:
        return {k: g.get_state() for k, g in epoch_gens.items()}, 0, 0.0
    for k, g in epoch_gens.items():
        g.set_state(partial["epoch_rng"][k])
    return partial["epoch_rng"], int(partial["batch"]), float(partial["running"])


def _interrupted(what: str, signame: str, step: int, epoch: int, batch: int, batches: int, run_dir: Path,
                 epochs: int, log: Callable[[str], None], cfg: Config) -> None:
    msg = (f"{signame} received: stopped after step {step} (batch {batch}/{batches} of epoch {epoch + 1}); "
           f"checkpoint written to {run_dir}. " + _resume_hint(what, run_dir, epochs, cfg))
    log(msg)
    raise TrainingInterrupted(msg)


def _image_shape(d: DataConfig, v: VAEConfig, vae_name: str = "the VAE") -> tuple[int, int, int]:
    """(C, H, W) of the dataset; an error when the VAE (config or checkpoint) is for another shape."""
    if (v.in_channels, v.image_size) != (d.channels, d.image_size):
        raise ValueError(f"{vae_name} is configured for {v.in_channels}×{v.image_size}×{v.image_size} images but "
                         f"{d.dataset} has {d.channels}×{d.image_size}×{d.image_size}: build the config with "
                         f"get_config(preset, dataset={d.dataset!r}) (CLI: --dataset {d.dataset}), which sets both")
    return d.image_shape


def _split_note(procs: OneProcess, batch_size: int) -> str:
    if procs.world_size == 1:
        return ""
    return f" (global: {procs.world_size} processes × ≈{batch_size / procs.world_size:g} each)"


def _resume_hint(what: str, run_dir: Path, epochs: int, cfg: Config) -> str:
    """The command that resumes this run, with the ``--dataset``/``--set`` flags its config needs."""
    import shlex

    flags = "".join(f" {shlex.quote(f)}" for f in cfg.cli_flags())
    return (f"resume with: python -m nbutils train-{what} --preset {cfg.preset}{flags} --run-dir {run_dir} "
            f"--epochs {epochs} --resume (in Python: train_{what}(cfg, run_dir={str(run_dir)!r}, epochs={epochs}, "
            "resume=True))")


# --------------------------------------------------------------------------------------------
# Small pieces shared by the loops
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


def _optimize(what: str, loss: torch.Tensor, parts: dict[str, float], model: nn.Module, ema: EMA,
              opt: torch.optim.Optimizer, tc: TrainConfig, step: int, epoch: int, last_checkpoint: Path,
              scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimizer step: NaN/inf guard, backward, gradient clipping, Adam, EMA update.

    ``parts`` are the loss parts of the whole (global) batch; ``scaler`` is fp16's gradient scaler."""
    if not math.isfinite(parts["loss"]):
        raise NonFiniteLossError(
            f"non-finite {what} loss at step {step} (epoch {epoch + 1}): {parts}; last good checkpoint: "
            f"{last_checkpoint if last_checkpoint.exists() else 'none'}"
        )
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
    if tc.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)  # skipped when fp16 gradients overflowed
        scaler.update()
    ema.update(model)


def _adam(params, tc: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam; on CUDA the fused implementation (one kernel for every tensor's update instead of a handful of
    launches per tensor: the UNet's step is launch-bound on a GPU). Same update rule, same state dict."""
    return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")


def autocast_dtype(setting: str, device: torch.device, log: Callable[[str], None] = print,
                   compile: bool = False) -> torch.dtype | None:
    """The autocast dtype a training run uses for ``mixed_precision=setting`` (None = float32 throughout).

    Mixed precision is a CUDA feature here: on a CPU or MPS any setting trains in float32, with a one-line
    notice when ``bf16``/``fp16`` was asked for. On CUDA: ``auto`` = bf16 when the forward pass is compiled
    (``compile``) on a GPU that supports bf16 (Ampere and newer), else float32; ``bf16`` = bf16, an error on a
    GPU without it; ``fp16`` = float16 with a gradient scaler; ``no`` = float32. Model outputs are cast to
    float32 before the loss either way.

    Why ``auto`` depends on compile: these models are small enough that a GPU step is bound by kernel launches,
    and uncompiled bf16 autocast adds launches (the casts): on an H200 it trained the `cpu` preset's UNet at
    0.03664 s / step against float32's 0.02333, the `full` preset's at 0.05333 against 0.04578; compiled (the
    casts fused away) bf16 was the fastest of the three, 0.02211 and 0.03783 (benchmarks/README.md, "Training
    on one GPU").
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


def _precision(tc: TrainConfig, model: nn.Module, device: torch.device, log: Callable[[str], None]
               ) -> tuple[torch.dtype | None, torch.amp.GradScaler | None, nn.Module]:
    """``(autocast dtype, fp16 gradient scaler or None, the module to call for the forward pass)``."""
    dtype = autocast_dtype(tc.mixed_precision, device, log, compile=tc.compile)
    if dtype is not None:
        log(f"mixed precision: {str(dtype).removeprefix('torch.')} autocast on {device}")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    forward = model
    if tc.compile:
        if device.type == "cuda":
            forward = torch.compile(model)
        else:
            log(f"note: compile=True has no effect on {device.type} (CUDA only); training uncompiled")
    return dtype, scaler, forward


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _smooth(running: float, value: float, beta: float = 0.98) -> float:
    """Exponential running mean for the progress bar (starts at the first value)."""
    return value if running == 0 else beta * running + (1 - beta) * value


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        g.set_state(state[k])


def _progress(iterable, total: int, desc: str, enabled: bool, done: int = 0):
    """A progress bar over ``iterable``; ``done`` items are drawn first without showing them (a resumed epoch).

    The skipped items are still drawn, so that the shuffling generator ends where an uninterrupted epoch
    leaves it; the bar then starts at ``done`` and its rate and time left count only the batches run now.
    """
    from tqdm.auto import tqdm

    items = iter(iterable)
    for _ in range(done):
        next(items)
    return tqdm(items, total=total, initial=done, desc=desc, disable=not enabled, leave=False,
                dynamic_ncols=True)


def _resume(state_path: Path, cfg: Config, sections: tuple[str, ...], model: nn.Module, ema: EMA,
            opt: torch.optim.Optimizer, gens: dict[str, torch.Generator], log: Callable[[str], None]
            ) -> tuple[int, int, History, dict | None]:
    """Load a training state saved by :func:`_save_state`; returns ``(step, epoch, history, partial)``.

    ``epoch`` counts finished epochs; ``partial`` is None, or for a run interrupted inside an epoch
    ``{"batch": batches done in it, "epoch_rng": generator states at its start, "running": loss}``.
    The config sections that shape the run (``sections``) must match; only ``epochs`` may change.
    """
    if not state_path.is_file():
        raise CheckpointError(f"cannot resume: {state_path} does not exist (train without --resume first)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot resume: {state_path} is unreadable ({exc})") from exc
    # read the saved config through Config so fields added since it was written take their defaults
    saved, now = Config.from_dict(state["config"]).to_dict(), cfg.to_dict()
    diffs = [d for sec in sections for d in config_differences(saved.get(sec, {}), now[sec], f"{sec}.")]
    free = (".epochs", ".mixed_precision", ".compile")  # may change between a run and its resumption
    diffs = [d for d in diffs if not d.split(":")[0].endswith(free)]
    if diffs:
        raise CheckpointError(f"cannot resume {state_path.parent}: its config differs: " + "; ".join(diffs))
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], gens)
    partial = state.get("partial")
    where = f" (batch {partial['batch']} of epoch {state['epoch'] + 1})" if partial else ""
    log(f"resuming {state_path.parent} after epoch {state['epoch']}{where}, step {state['step']}")
    return state["step"], state["epoch"], History(**state["history"]), partial


def _save_state(path: Path, cfg: Config, model, ema, opt, gens, step: int, epoch: int, history: History,
                partial: dict | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    atomic_torch_save(
        {
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": _rng_state(gens),
            "step": step,
            "epoch": epoch,
            "history": {"steps": history.steps, "epochs": history.epochs},
            "partial": partial,
            "scaler": scaler.state_dict() if scaler is not None else None,  # fp16's loss scale
        },
        path,
    )


def _restore_scaler(state_path: Path, scaler: torch.amp.GradScaler | None) -> None:
    """Resuming an fp16 run: continue with the loss scale it had reached (no re-calibration, exact resume)."""
    if scaler is None:
        return
    saved = torch.load(state_path, map_location="cpu", weights_only=False).get("scaler")
    if saved:
        scaler.load_state_dict(saved)


@dataclass
class History:
    """Per-step losses and per-epoch metrics of a training run (kept in the state file)."""

    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_vae(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Test metrics (MSE, PSNR, SSIM) of reconstructions from the posterior mean."""
    vae.eval()
    device = next(vae.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        mean, _ = vae.encode_dist(x)
        recon = vae.decoder(mean)
        m = reconstruction_metrics(x.cpu(), recon.cpu())
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * len(x)
        n += len(x)
    return {k: v / n for k, v in sums.items()}


def train_vae(
    cfg: Config,
    run_dir: str | Path | None = None,
    epochs: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data_root: str | None = None,
) -> VAE:
    """Train the VAE of ``cfg`` and return its EMA copy (with latent statistics set).

    ``epochs`` is the total number of epochs wanted (default ``cfg.train_vae.epochs``); with
    ``resume=True`` training continues from ``run_dir``'s last checkpoint up to that total.
    """
    tc = cfg.train_vae
    epochs = tc.epochs if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    if tc.batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {tc.batch_size}")
    run_dir = Path(run_dir) if run_dir is not None else runs_dir() / cfg.preset
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else pick_device()
    procs = processes(device)  # one process, or one of several under `accelerate launch`
    device, log, progress = procs.device(device), procs.log(log), progress and procs.is_main

    shape = _image_shape(cfg.data, cfg.vae)
    train_x, train_y = D.load_images(cfg.data, "train", root=data_root, subset=cfg.data.train_subset)
    test_x, test_y = D.load_images(cfg.data, "test", root=data_root, subset=cfg.data.test_subset)
    train_x, test_x = D.to_model_range(train_x, shape), D.to_model_range(test_x, shape)

    torch.manual_seed(tc.seed)
    vae = VAE(cfg.vae).to(device)
    ema = EMA(vae, tc.ema_decay, tc.ema_warmup_steps)
    opt = _adam(vae.parameters(), tc, device)
    shuffle_gen = torch.Generator().manual_seed(tc.seed)
    noise_gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
    gens = {"shuffle": shuffle_gen, "noise": noise_gen}
    loader = D.TensorLoader((train_x, train_y), batch_size=tc.batch_size, shuffle=True, generator=shuffle_gen)
    history = History()
    step, start_epoch, partial = 0, 0, None

    ckpt_path, state_path = run_dir / VAE_FILE, run_dir / VAE_STATE_FILE
    if resume:
        step, start_epoch, history, partial = _resume(state_path, cfg, ("data", "vae", "train_vae"), vae, ema, opt,
                                                      gens, log)
        if start_epoch >= epochs:
            log(f"already trained {start_epoch} epochs (asked for {epochs}); nothing to do")
    elif ckpt_path.exists():
        log(f"note: overwriting the checkpoint in {run_dir} (pass resume=True / --resume to continue it)")
    amp_dtype, scaler, forward = _precision(tc, procs.prepare(vae), device, log)
    if resume:
        _restore_scaler(state_path, scaler)

    n_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE: {n_params:,} parameters, {len(train_x):,} training images, batch {tc.batch_size}"
        f"{_split_note(procs, tc.batch_size)}, {len(loader)} steps/epoch, device {device}, run dir {run_dir}")

    with _StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            vae.train()
            t0 = time.perf_counter()
            epoch_rng, skip, running = _epoch_start(partial, {"shuffle": shuffle_gen})
            partial = None
            # resuming inside this epoch: the first ``skip`` batches were done before the interrupt
            bar = _progress(loader, len(loader), f"VAE epoch {epoch + 1}/{epochs}", progress, done=skip)
            for b, (x, _) in enumerate(bar, start=skip):
                if len(x) < procs.world_size:  # a last batch too small to split (several processes only)
                    continue
                x = x.to(device, non_blocking=True)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, tc, tc.lr_warmup_steps)
                # ε of the posterior samples, drawn for the global batch (see nbutils.distributed)
                eps = torch.randn((len(x), *vae.latent_shape), generator=noise_gen, device=device)
                x_own, eps = procs.shard(x, eps)
                with _autocast(device, amp_dtype):
                    recon, mean, logvar = forward(x_own, noise=eps)
                loss, parts = vae_loss(x_own, recon.float(), mean.float(), logvar.float(), cfg.vae.kl_weight)
                parts = procs.combine(parts, len(x))
                _optimize("VAE", loss * procs.loss_factor(len(x)), parts, vae, ema, opt, tc, step, epoch, ckpt_path,
                          scaler)
                step += 1
                running = _smooth(running, parts["loss"])
                history.steps.append({"step": step, **parts})
                bar.set_postfix(loss=f"{running:.4f}", psnr=f"{10 * math.log10(4 / max(parts['mse'], 1e-12)):.1f}dB")
                if procs.any(stop.signal is not None):
                    bar.close()
                    inside = {"batch": b + 1, "epoch_rng": epoch_rng, "running": running}
                    if procs.is_main:
                        _save_vae_run(run_dir, cfg, vae, ema, opt, gens, step, epoch, history, inside, scaler)
                    procs.barrier()
                    _interrupted("vae", stop.signal or "stop request", step, epoch, b + 1, len(loader), run_dir,
                                 epochs, log, cfg)
            bar.close()
            record = {"epoch": epoch + 1, "step": step, "seconds": time.perf_counter() - t0, "train_loss": running,
                      "processes": procs.world_size}
            if skip:  # "seconds" then covers only the batches run after resuming
                record["resumed_at_batch"] = skip
            if procs.is_main:
                metrics = evaluate_vae(ema.model, test_x.to(device))
                record.update({f"test_{k}": v for k, v in metrics.items()})
                log(f"epoch {epoch + 1}/{epochs}: train loss {running:.5f}  test PSNR {metrics['psnr']:.2f} dB  "
                    f"SSIM {metrics['ssim']:.4f}  ({record['seconds']:.0f} s)")
            history.epochs.append(record)
            if procs.is_main:
                _save_vae_run(run_dir, cfg, vae, ema, opt, gens, step, epoch + 1, history, scaler=scaler)
                if tc.sample_every and (epoch + 1) % tc.sample_every == 0:
                    _save_recon_grid(ema.model, test_x, test_y, run_dir / f"vae_recon_epoch{epoch + 1:03d}.png")

    # the scale factor and the latent cache come from the final weights (process 0 computes them)
    with procs.main_first():
        if procs.is_main:
            return finalize_vae(run_dir, cfg, data_root=data_root, log=log, device=device, progress=progress)
    return load_vae(run_dir / VAE_FILE, device=device)[0]


def _save_vae_run(run_dir, cfg, vae, ema, opt, gens, step, epoch, history, partial=None, scaler=None) -> None:
    extra = {"epoch": epoch, "step": step, "latent_stats": False,
             "metrics": history.epochs[-1] if history.epochs else {}}
    save_model(run_dir / VAE_FILE, "vae", ema.model.state_dict(), cfg, extra)
    _save_state(run_dir / VAE_STATE_FILE, cfg, vae, ema, opt, gens, step, epoch, history, partial, scaler)
    atomic_write_bytes(run_dir / "vae_history.json", json.dumps(history.epochs, indent=1).encode())


def _save_recon_grid(vae: VAE, test_x: torch.Tensor, test_y: torch.Tensor, path: Path) -> None:
    from .plotting import save_grid

    k = 2 if len(test_x) >= 200 else 1
    try:
        originals = D.per_class(test_x, test_y, k)
    except ValueError:
        return
    with torch.no_grad():
        device = next(vae.parameters()).device
        mean, _ = vae.encode_dist(originals.to(device))
        recon = vae.decoder(mean).cpu()
    pairs = torch.stack([originals, recon], 1).flatten(0, 1)  # original, reconstruction, ...
    save_grid(pairs, path, nrow=4 * k if k > 1 else 2)


# --------------------------------------------------------------------------------------------
# Latent statistics and the latent cache
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_dataset(vae: VAE, images: torch.Tensor, batch_size: int = 1000, progress: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw posterior ``(mean, std)`` of every image (N, C_z, H/4, W/4), on the CPU, float32."""
    vae.eval()
    device = next(vae.parameters()).device
    means, stds = [], []
    batches = range(0, len(images), batch_size)
    for i in _progress(batches, len(batches), "encoding", progress):
        x = images[i : i + batch_size].to(device)
        mean, logvar = vae.encode_dist(x)
        means.append(mean.float().cpu())
        stds.append(torch.exp(0.5 * logvar).float().cpu())
    return torch.cat(means), torch.cat(stds)


def finalize_vae(
    run_dir: str | Path,
    cfg: Config | None = None,
    data_root: str | None = None,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> VAE:
    """Compute the latent shift/scale from the training set, store them in the run's checkpoint,
    and write the latent cache (``latents.safetensors``) the UNet trains from."""
    run_dir = Path(run_dir)
    vae, meta = load_vae(run_dir / VAE_FILE, device=device)
    cfg = cfg or Config.from_dict(meta["config"])
    images, labels = D.load_images(cfg.data, "train", root=data_root, subset=cfg.data.train_subset)
    mean, std = encode_dataset(vae, D.to_model_range(images, _image_shape(cfg.data, cfg.vae)), progress=progress)
    shift, scale = latent_stats(mean, std)
    vae.set_latent_stats(shift, scale)
    extra = dict(meta["extra"], latent_stats=True, latent_shift=shift.tolist(), latent_scale=scale)
    save_model(run_dir / VAE_FILE, "vae", vae.state_dict(), cfg, extra)
    D.write_latent_cache(run_dir / "latents.safetensors", mean, std, labels, run_dir / VAE_FILE)
    log(f"latent scale factor {scale:.4f}, shift {[round(v, 3) for v in shift.tolist()]}; "
        f"latent cache {run_dir / 'latents.safetensors'}")
    vae._stats_set = True
    return vae


def load_vae(
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    expected: Config | None = None,
) -> tuple[VAE, dict[str, Any]]:
    """``(vae, metadata)`` from a checkpoint file or folder (default: latest run, else shipped).

    With ``expected``, a checkpoint whose VAE config differs is an error naming the fields.
    """
    path = resolve_checkpoint(VAE_FILE, checkpoint)
    tensors, meta = read_model(path, "vae")
    cfg = Config.from_dict(meta["config"])
    if expected is not None:
        arch = lambda d: {k: v for k, v in d.items() if k != "kl_weight"}  # noqa: E731  (training-only)
        # through Config so fields added since the checkpoint was written take their defaults
        diffs = config_differences(arch(cfg.to_dict()["vae"]), arch(expected.to_dict()["vae"]), "vae.")
        if diffs:
            raise CheckpointError(f"{path} was trained with a different VAE config: " + "; ".join(diffs))
    vae = VAE(cfg.vae)
    load_state_strict(vae, tensors, path)
    vae._stats_set = bool(meta["extra"].get("latent_stats"))
    device = torch.device(device) if device is not None else pick_device()
    meta["path"] = str(path)
    return vae.to(device).eval(), meta


def beta_sweep(
    cfg: Config,
    betas: tuple[float, ...] = (0.0, 1e-6, 1e-4, 1e-2),
    epochs: int = 1,
    train_subset: int | None = None,
    run_root: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """Train one VAE per KL weight β (same seed, data and budget) and measure each on the test subset.

    Returns one row per β: test PSNR/SSIM of reconstructions, the KL per latent dimension (how much
    information the latent carries beyond the prior), and the raw latent standard deviation (how far
    from N(0, 1) the unscaled latents are, i.e. what the scale factor has to fix).
    """
    import tempfile

    from .vae import kl_divergence

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(run_root) if run_root is not None else Path(tmp)
        for beta in betas:
            c = cfg.replace(
                vae=_with(cfg.vae, kl_weight=beta),
                data=_with(cfg.data, train_subset=train_subset or cfg.data.train_subset),
                train_vae=_with(cfg.train_vae, epochs=epochs, sample_every=0),
            )
            t0 = time.perf_counter()
            vae = train_vae(c, run_dir=root / f"beta_{beta:g}", progress=progress, log=lambda m: None)
            test_x, _ = D.load_split("test", subset=c.data.test_subset)
            x = D.to_model_range(test_x).to(next(vae.parameters()).device)
            with torch.no_grad():
                mean, logvar = vae.encode_dist(x)
                kl_dim = float(kl_divergence(mean, logvar).mean()) / mean[0].numel()
            m = evaluate_vae(vae, x)
            row = {"beta": beta, "psnr": m["psnr"], "ssim": m["ssim"], "kl_per_dim": kl_dim,
                   "latent_std": 1.0 / float(vae.latent_scale), "seconds": time.perf_counter() - t0}
            log(f"β={beta:g}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}, KL/dim {kl_dim:.3f}, "
                f"raw latent std {row['latent_std']:.3f} ({row['seconds']:.0f} s)")
            rows.append(row)
    return rows


def _with(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def load_history(run_dir: str | Path, name: str = "vae") -> tuple[list[dict], list[dict]]:
    """``(per-step losses, per-epoch metrics)`` of a run, from its state file."""
    path = Path(run_dir) / f"{name}_state.pt"
    if not path.is_file():
        raise CheckpointError(f"no training history at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["history"]["steps"], state["history"]["epochs"]


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

UNET_FILE = "unet.safetensors"
UNET_STATE_FILE = "unet_state.pt"


def train_unet(
    cfg: Config,
    run_dir: str | Path | None = None,
    epochs: int | None = None,
    resume: bool = False,
    vae_checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data_root: str | None = None,
    on_epoch_end: Callable | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    init_from: str | Path | None = None,
):
    """Train the latent UNet of ``cfg`` on the cached latents of a VAE; returns the EMA UNet.

    ``init_from`` (a run folder or UNet checkpoint; ignored with ``resume``) starts a *new* run from another
    run's weights — raw and EMA from its state file when it has one — with a fresh optimizer and this config's
    learning rate: fine-tuning, e.g. a low-learning-rate phase after a constant-rate run. Its VAE must be
    this run's (the same SHA-256).

    The VAE is ``run_dir``'s own when it has one, else ``vae_checkpoint`` (default: latest run, else
    shipped). Every epoch draws fresh posterior samples z = μ + σ·ε from the cache (never re-encoding
    images), standardises them with the VAE's shift and scale, and trains on random timesteps with the
    class dropped to the null token with probability ``cfg.diffusion.cond_drop_prob``.

    Every ``sample_every`` epochs a grid of samples (one row per class) goes to
    ``RUN_DIR/unet_samples_epochNNN.png``; ``on_epoch_end(record, history, ema_unet, grid_path)`` is called
    after each epoch and ``on_step(step, loss_parts)`` after each step (notebook 04's live picture,
    :class:`nbutils.plotting.TrainingMonitor`).
    """
    from .diffusion import GaussianDiffusion
    from .unet import UNet

    tc = cfg.train_unet
    epochs = tc.epochs if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    run_dir = Path(run_dir) if run_dir is not None else runs_dir() / cfg.preset
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else pick_device()
    procs = processes(device)  # one process, or one of several under `accelerate launch`
    device, log, progress = procs.device(device), procs.log(log), progress and procs.is_main

    own_vae = run_dir / VAE_FILE
    with procs.main_first():  # process 0 copies the VAE and writes the latent cache; the others then read them
        if procs.is_main and not own_vae.is_file():  # self-contained run: sampling needs the exact VAE
            import shutil

            source = resolve_checkpoint(VAE_FILE, vae_checkpoint)
            shutil.copyfile(source, own_vae)
            if source.with_suffix(".json").is_file():
                shutil.copyfile(source.with_suffix(".json"), own_vae.with_suffix(".json"))
            log(f"using the VAE {source} (copied into {run_dir})")
        vae, vae_meta = load_vae(own_vae, device=device)
        if not vae._stats_set:
            raise CheckpointError(f"{vae_meta['path']} has no latent statistics; run finalize_vae on its run first")
        if vae.cfg.latent_channels != cfg.unet.latent_channels:
            raise CheckpointError(f"VAE {vae_meta['path']} has {vae.cfg.latent_channels} latent channels, "
                                  f"the UNet config expects {cfg.unet.latent_channels}")
        _image_shape(cfg.data, vae.cfg, f"the VAE {vae_meta['path']}")
        cache = D.latent_dataset(vae, vae_meta["path"], subset=cfg.data.train_subset, root=data_root,
                                 progress=progress, data_cfg=cfg.data)
    shift = vae.latent_shift.cpu()[:, None, None]
    scale = float(vae.latent_scale)

    torch.manual_seed(tc.seed)
    unet = UNet(cfg.unet).to(device)
    ema = EMA(unet, tc.ema_decay, tc.ema_warmup_steps)
    opt = _adam(unet.parameters(), tc, device)
    diffusion = GaussianDiffusion(cfg.diffusion, cfg.unet.num_classes)
    shuffle_gen = torch.Generator().manual_seed(tc.seed)
    latent_gen = torch.Generator().manual_seed(tc.seed + 2)
    noise_gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
    gens = {"shuffle": shuffle_gen, "latent": latent_gen, "noise": noise_gen}
    history = History()
    step, start_epoch, partial = 0, 0, None
    state_path = run_dir / UNET_STATE_FILE
    if resume:
        step, start_epoch, history, partial = _resume(state_path, cfg, ("data", "unet", "diffusion", "train_unet"),
                                                      unet, ema, opt, gens, log)
        if start_epoch >= epochs:
            log(f"already trained {start_epoch} epochs (asked for {epochs}); nothing to do")
    elif (run_dir / UNET_FILE).exists():
        log(f"note: overwriting the UNet checkpoint in {run_dir} (pass resume=True / --resume to continue it)")
    if init_from is not None and not resume:
        _init_from(Path(init_from), unet, ema, own_vae, log)
    amp_dtype, scaler, forward = _precision(tc, procs.prepare(unet), device, log)
    if resume:
        _restore_scaler(state_path, scaler)

    n = len(cache["labels"])
    steps_per_epoch = -(-n // tc.batch_size)
    log(f"UNet: {sum(p.numel() for p in unet.parameters()):,} parameters, {n:,} latents from {vae_meta['path']}, "
        f"batch {tc.batch_size}{_split_note(procs, tc.batch_size)}, {steps_per_epoch} steps/epoch, device {device}, "
        f"run dir {run_dir}")
    vae_digest = file_digest(own_vae)

    def save(epochs_done: int, inside: dict | None = None) -> None:
        extra = {"epoch": epochs_done, "step": step, "vae_digest": vae_digest,
                 "metrics": history.epochs[-1] if history.epochs else {}}
        save_model(run_dir / UNET_FILE, "unet", ema.model.state_dict(), cfg, extra)
        _save_state(state_path, cfg, unet, ema, opt, gens, step, epochs_done, history, inside, scaler)

    with _StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            unet.train()
            t0 = time.perf_counter()
            epoch_rng, skip, running = _epoch_start(partial, {"shuffle": shuffle_gen, "latent": latent_gen})
            partial = None
            # a fresh posterior sample z = μ + σ·ε of every training image, standardised
            z = cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape, generator=latent_gen)
            z = (z - shift) * scale
            loader = D.TensorLoader((z, cache["labels"]), batch_size=tc.batch_size, shuffle=True,
                                    generator=shuffle_gen)
            # resuming inside this epoch: the first ``skip`` batches were done before the interrupt
            bar = _progress(loader, len(loader), f"UNet epoch {epoch + 1}/{epochs}", progress, done=skip)
            for b, (x0, labels) in enumerate(bar, start=skip):
                if len(x0) < procs.world_size:  # a last batch too small to split (several processes only)
                    continue
                x0, labels = x0.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, tc, tc.lr_warmup_steps)
                t, noise, dropped = diffusion.draw(x0, labels, generator=noise_gen)  # for the global batch
                x0, t, noise, dropped = procs.shard(x0, t, noise, dropped)  # this process's share (all of it on one)
                with _autocast(device, amp_dtype):
                    loss, parts = diffusion.loss(forward, x0, dropped, draws=(t, noise, dropped))
                parts = procs.combine(parts, len(labels))  # len(labels): the global batch
                _optimize("UNet", loss * procs.loss_factor(len(labels)), parts, unet, ema, opt, tc, step, epoch,
                          run_dir / UNET_FILE, scaler)
                step += 1
                running = _smooth(running, parts["loss"])
                history.steps.append({"step": step, **parts})
                bar.set_postfix(loss=f"{running:.4f}")
                if on_step is not None:
                    on_step(step, parts)
                if procs.any(stop.signal is not None):
                    bar.close()
                    if procs.is_main:
                        save(epoch, {"batch": b + 1, "epoch_rng": epoch_rng, "running": running})
                    procs.barrier()
                    _interrupted("unet", stop.signal or "stop request", step, epoch, b + 1, len(loader), run_dir,
                                 epochs, log, cfg)
            bar.close()
            record = {"epoch": epoch + 1, "step": step, "seconds": time.perf_counter() - t0, "train_loss": running,
                      "processes": procs.world_size}
            if skip:  # "seconds" then covers only the batches run after resuming
                record["resumed_at_batch"] = skip
            history.epochs.append(record)
            log(f"epoch {epoch + 1}/{epochs}: train loss {running:.4f} ({record['seconds']:.0f} s)")
            if not procs.is_main:
                continue
            save(epoch + 1)
            grid = None
            if tc.sample_every and (epoch + 1) % tc.sample_every == 0:
                grid = run_dir / f"unet_samples_epoch{epoch + 1:03d}.png"
                save_sample_grid(ema.model, vae, cfg, grid)
            if on_epoch_end is not None:
                on_epoch_end(record, history, ema.model, grid)
    procs.barrier()  # the last checkpoint is on disk before any process returns
    return ema.model


def save_sample_grid(unet, vae, cfg: Config, path: str | Path, per_class: int = 10, steps: int = 25,
                     guidance: float = 3.0, seed: int = 0) -> Path:
    """A class-per-row grid of samples (DDIM, ``steps`` steps, fixed seed: comparable across epochs)."""
    from .config import make_generator
    from .plotting import save_grid
    from .samplers import sample

    unet.eval()
    n = per_class * cfg.unet.num_classes
    labels = torch.arange(cfg.unet.num_classes).repeat_interleave(per_class)
    result = sample(unet, vae, n, labels, guidance=guidance, sampler="ddim", steps=steps,
                    generator=make_generator(seed), diffusion_cfg=cfg.diffusion)
    return save_grid(result.images, path, nrow=per_class)


def _init_from(source: Path, unet, ema: EMA, own_vae: Path, log: Callable[[str], None]) -> None:
    """Load another run's UNet weights into ``unet`` (raw) and ``ema``; see ``train_unet(init_from=…)``."""
    path = resolve_checkpoint(UNET_FILE, source)
    tensors, meta = read_model(path, "unet")
    recorded = meta["extra"].get("vae_digest")
    if recorded and recorded != file_digest(own_vae):
        raise CheckpointError(f"cannot start from {path}: it was trained on another VAE's latents than {own_vae} "
                              "(SHA-256 differs); use its run's vae.safetensors (--vae)")
    load_state_strict(unet, tensors, path)  # names any tensor that does not fit this config's UNet
    ema.model.load_state_dict(unet.state_dict())
    what = "its EMA weights (no state file: the raw weights start as a copy)"
    state_path = path.parent / UNET_STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        what = f"raw and EMA weights after its step {state['step']}"
    log(f"starting from {path.parent}: {what}; fresh optimizer")


def load_raw_unet(run_dir: str | Path, device: str | torch.device | None = None):
    """The *raw* (not EMA) UNet weights of a run, from its state file (for EMA-vs-raw comparisons)."""
    from .unet import UNet

    path = Path(run_dir) / UNET_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no training state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = Config.from_dict(state["config"])
    unet = UNet(cfg.unet)
    unet.load_state_dict(state["model"])
    unet.diffusion_cfg = cfg.diffusion
    device = torch.device(device) if device is not None else pick_device()
    return unet.to(device).eval()


def load_unet(checkpoint: str | Path | None = None, device: str | torch.device | None = None):
    """``(unet, metadata)`` from a checkpoint file or folder (default: latest run, else shipped)."""
    from .unet import UNet

    path = resolve_checkpoint(UNET_FILE, checkpoint)
    tensors, meta = read_model(path, "unet")
    cfg = Config.from_dict(meta["config"])
    unet = UNet(cfg.unet)
    load_state_strict(unet, tensors, path)
    unet.diffusion_cfg = cfg.diffusion  # what the samplers need to know (schedule, prediction type)
    device = torch.device(device) if device is not None else pick_device()
    meta["path"] = str(path)
    return unet.to(device).eval(), meta


def load_models(checkpoint: str | Path | None = None, device: str | torch.device | None = None):
    """``(unet, vae, unet_metadata)``: a UNet and the VAE it was trained with, from one folder.

    ``checkpoint``: a run folder or ``unet.safetensors`` file (default: latest run, else shipped). The VAE
    is the ``vae.safetensors`` beside it; its SHA-256 must match the one recorded by the UNet.
    """
    unet, meta = load_unet(checkpoint, device=device)
    vae_path = Path(meta["path"]).parent / VAE_FILE
    if not vae_path.is_file():
        raise CheckpointError(f"no {VAE_FILE} beside {meta['path']}: the UNet needs the VAE it was trained with")
    recorded = meta["extra"].get("vae_digest")
    if recorded and recorded != file_digest(vae_path):
        raise CheckpointError(f"{vae_path} is not the VAE {meta['path']} was trained with (SHA-256 differs)")
    vae, _ = load_vae(vae_path, device=device)
    return unet, vae, meta
