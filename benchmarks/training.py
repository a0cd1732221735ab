"""training: speed of the real UNet training loop (`nbutils.train_unet.train_unet`) for a preset, on 1 and N processes.

    python -m benchmarks training                               # this CPU: 1 process vs 2 (gloo)
    python -m benchmarks training --processes 1 --preset cpu --steps 40 --warmup 10
    python -m benchmarks training --device cuda --processes 1 --preset full --mixed-precision bf16 --compile
    python -m benchmarks training --device cuda --processes 1 --preset full --mixed-precision bf16 --compile \
        --cuda-graph

Each configuration runs the actual training loop (global batch, per-process shards, the all-reduce of gradients
and of the logged loss, EMA, Adam) on the cached latents of the --checkpoint VAE, for --warmup steps that are not
timed and --steps that are (train_unet's on_step hook stamps the clock). One process is a plain `python -m
benchmarks training --worker` run; N > 1 processes are started by `accelerate launch --multi_gpu --num_processes N`
(without GPUs: N CPU processes talking over gloo), with the CPU's threads split between them (OMP_NUM_THREADS =
cores / N; --threads overrides). Rows: latent samples per second, seconds per step, and the projected wall time of
an epoch of 60,000 latents and of --epochs epochs, a projection from the timed steps (per-epoch work such as
sample grids and checkpoints not included). The first run encodes the training set into the latent cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from nbutils.config import COMPILE_MODES, MIXED_PRECISION, PRESETS

COLUMNS = ["processes", "threads_per_process", "device", "preset", "global_batch", "autocast", "compile",
           "compile_mode", "cuda_graph", "seconds_per_step", "latent_samples_per_s", "epoch_minutes",
           "projected_minutes"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, checkpoint="checkpoints")
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--processes", type=common.positive_int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=common.positive_int, default=128, help="global batch")
    p.add_argument("--steps", type=common.positive_int, default=40, help="timed steps")
    p.add_argument("--warmup", type=common.positive_int, default=10, help="untimed steps first")
    p.add_argument("--epochs", type=common.positive_int, default=100, help="epochs for the projected wall time")
    p.add_argument("--mixed-precision", default="no", choices=MIXED_PRECISION)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode with --compile (\"reduce-overhead\": CUDA graphs)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each training step as one CUDA graph (nbutils.training.StepGraph; one process)")
    p.add_argument("--profile", metavar="FILE", help="profile the timed steps (torch.profiler) into FILE: "
                   "per-operator tables; the timings then include the profiler's own cost")
    p.add_argument("--threads", type=common.positive_int, help="threads per process (default: cores / processes)")
    p.add_argument("--sync-every", type=common.positive_int,
                   help="steps between reads of the loss back to the host (default: the library's, "
                        "nbutils.training.SYNC_EVERY: 32 on CUDA, 1 elsewhere); --warmup and --steps must be "
                        "multiples of it, since the clock is stamped when the numbers are read back")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)


def worker(args: argparse.Namespace) -> None:
    """One training run, timed by the step hook; process 0 prints its row as one JSON line."""
    import torch

    from nbutils.config import get_config
    from nbutils.distributed import is_main_process
    from nbutils.train_unet import train_unet
    from nbutils.training import autocast_dtype
    from nbutils.unet import UNet, count_parameters

    cfg = get_config(args.preset).override([
        f"train_unet.batch_size={args.batch_size}",
        f"data.train_subset={args.batch_size * (args.warmup + args.steps)}",
        "train_unet.sample_every=0",
        f"train_unet.mixed_precision={args.mixed_precision}",
        f"train_unet.compile={args.compile}",
        f"train_unet.compile_mode={args.compile_mode}",
    ])
    device = torch.device(args.device)
    stamps: dict[int, float] = {}
    profiler = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                                                else []))

    def on_step(step: int, parts: dict) -> None:
        if step in (args.warmup, args.warmup + args.steps):
            common.sync(device)
            stamps[step] = time.perf_counter()
            if profiler is not None and step == args.warmup:
                profiler.start()
            elif profiler is not None:
                profiler.stop()

    train_unet(cfg, run_dir=args.run_dir, epochs=1, vae_checkpoint=args.checkpoint, device=device, progress=False,
               log=lambda m: None, on_step=on_step, cuda_graph=args.cuda_graph)
    if not is_main_process():
        return
    if profiler is not None:  # where the timed steps' time went, per operator
        Path(args.profile).write_text(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                                      + "\n" + profiler.key_averages().table(sort_by="count", row_limit=10))
    per_step = (stamps[args.warmup + args.steps] - stamps[args.warmup]) / args.steps
    steps_per_epoch = -(-60000 // args.batch_size)
    autocast = autocast_dtype(args.mixed_precision, device, log=lambda m: None, compile=args.compile)
    print(json.dumps({
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "threads_per_process": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "preset": args.preset,
        "unet_parameters": count_parameters(UNet(cfg.unet)),
        "global_batch": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "autocast": str(autocast or "float32").removeprefix("torch."),  # what the setting means on this device
        "compile": args.compile and device.type == "cuda",
        "compile_mode": args.compile_mode if args.compile and device.type == "cuda" else "none",
        "cuda_graph": args.cuda_graph and device.type == "cuda",
        "timed_steps": args.steps,
        "profiled": bool(args.profile),
        "sync_every": args.sync_every,
        "seconds_per_step": round(per_step, 5),
        "latent_samples_per_s": round(args.batch_size / per_step, 1),
        "epoch_minutes": round(steps_per_epoch * per_step / 60, 2),
        "projected_epochs": args.epochs,
        "projected_minutes": round(args.epochs * steps_per_epoch * per_step / 60, 1),
    }), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_every(args: argparse.Namespace) -> int:
    import torch

    from nbutils.training import SYNC_EVERY

    every = args.sync_every or SYNC_EVERY.get(torch.device(args.device).type, 1)
    if args.warmup % every or args.steps % every:
        raise ValueError(f"--warmup ({args.warmup}) and --steps ({args.steps}) must be multiples of --sync-every "
                         f"({every}), e.g. --warmup {every} --steps {2 * every}")
    return every


def run(args: argparse.Namespace) -> dict | None:
    every = _sync_every(args)
    if args.worker:
        import torch

        from nbutils.training import SYNC_EVERY

        SYNC_EVERY[torch.device(args.device).type] = every  # this process only
        worker(args)
        return None
    rows = []
    for n in args.processes:
        threads = args.threads or max(1, (os.cpu_count() or 1) // n)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        own = ["training", "--worker", "--preset", args.preset, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--epochs", str(args.epochs),
               "--mixed-precision", args.mixed_precision, "--device", args.device, "--sync-every", str(every),
               "--checkpoint", str(Path(args.checkpoint).resolve()),
               *(["--compile", "--compile-mode", args.compile_mode] if args.compile else []),
               *(["--cuda-graph"] if args.cuda_graph else []),
               *(["--profile", str(Path(args.profile).resolve())] if args.profile else [])]
        if n == 1:
            cmd = [sys.executable, "-m", "benchmarks", *own]
        else:
            if importlib.util.find_spec("accelerate") is None:
                sys.exit("accelerate is not installed: pip install -e '.[distributed]'")
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), "--module", "benchmarks", *own]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:  # one run folder, shared by the processes
            proc = subprocess.run([*cmd, "--run-dir", run_dir], env=env, cwd=common.ROOT, capture_output=True,
                                  text=True)
        if proc.returncode != 0:
            sys.exit(f"{n} process(es) failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["run_seconds_incl_startup"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        common.log(row)
    return {"task": "training", "preset": args.preset, "rows": rows}
