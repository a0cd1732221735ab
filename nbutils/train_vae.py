"""Training the VAE (the first stage), then preparing its latent space for the UNet.

The loss is reconstruction + β·KL (:func:`nbutils.vae.vae_loss`; a very small β as in Rombach et al.
2022, so the latent keeps the detail and the KL only keeps it from drifting). After the last epoch,
:func:`finalize_vae` measures the per-channel shift and scale that standardise the latents (the
data-derived scale factor of latent diffusion's ``scale_by_std``) and writes the latent cache the UNet
trains from. The epoch loop, checkpoints, resume and Ctrl-C come from :mod:`nbutils.training`.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import data as D
from .checkpoints import commit_files, encode_model
from .config import Config, display_path
from .latents import LATENT_CACHE_FILE, encode_dataset, write_latent_cache
from .metrics import reconstruction_metrics
from .pipeline import VAE_FILE, load_vae
from .training import (
    EMA,
    Run,
    autocast,
    check_checkpoint_every,
    check_log_with,
    check_model_size,
    describe_estimate,
    fit,
    image_shape,
    make_optimizer,
    owned,
    start,
    step_flops,
)
from .vae import VAE, kl_divergence, latent_stats, vae_loss


@torch.no_grad()
def evaluate_vae(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Test metrics (MSE, PSNR, SSIM) of reconstructions from the posterior mean."""
    vae.eval()
    device = next(vae.parameters()).device
    sums: dict[str, float] = {}
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        mean, _ = vae.encode_dist(x)
        m = reconstruction_metrics(x.cpu(), vae.decoder(mean).cpu())
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * len(x)
    return {k: v / len(images) for k, v in sums.items()}


def train_vae(
    cfg: Config,
    run_dir: str | Path | None = None,
    epochs: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data_root: str | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    log_with: str | None = None,
    checkpoint_every: int = 1,
    cuda_graph: bool = False,
) -> VAE:
    """Train the VAE of ``cfg`` and return its EMA copy (with latent statistics set). ``on_step(step, loss parts)``
    is called for every optimizer step (as for ``train_unet``; on a GPU in blocks, when the numbers are read back).

    ``epochs`` is the total number of epochs wanted (default ``cfg.train_vae.epochs``); with
    ``resume=True`` training continues from ``run_dir``'s last checkpoint up to that total.
    ``log_with="tensorboard"`` also logs the curves for TensorBoard in ``RUN_DIR/tensorboard/vae``.
    ``checkpoint_every``: epochs between checkpoints and test-set evaluations (:func:`nbutils.training.fit`).
    ``cuda_graph``: on CUDA, replay each full-batch step as one CUDA graph (:class:`nbutils.training.StepGraph`).
    """
    tc = cfg.train_vae
    epochs = tc.epochs if epochs is None else epochs
    check_model_size(cfg, "vae", VAE)  # before anything is built or written
    check_log_with(log_with)
    check_checkpoint_every(checkpoint_every)
    run_dir, procs, device, log, progress = start(tc, epochs, run_dir, cfg.preset, device, log, progress,
                                                  "vae_state.pt" if resume else None)
    with owned(run_dir, procs):
        shape = image_shape(cfg.data, cfg.vae)
        train_x, train_y = D.load_images(cfg.data, "train", root=data_root, subset=cfg.data.train_subset)
        test_x, test_y = D.load_images(cfg.data, "test", root=data_root, subset=cfg.data.test_subset)
        train_x, test_x = D.to_model_range(train_x, shape), D.to_model_range(test_x, shape)

        torch.manual_seed(tc.seed)
        vae = VAE(cfg.vae).to(device)
        gens = {"shuffle": torch.Generator().manual_seed(tc.seed),
                "noise": torch.Generator(device=device).manual_seed(tc.seed + 1)}
        run = Run("vae", cfg, tc, run_dir, vae, EMA(vae, tc.ema_decay, tc.ema_warmup_steps),
                  make_optimizer(vae.parameters(), tc, device), gens, procs, device, log, progress,
                  sections=("data", "vae", "train_vae"), weights=_weights)
        # the training images live on the training device (no copy per step; a no-op on a CPU)
        loader = D.TensorLoader((train_x.to(device), train_y.to(device)), batch_size=tc.batch_size, shuffle=True,
                                generator=gens["shuffle"])
        if resume:
            run.resume()
            if run.epoch >= epochs:
                log(f"already trained {run.epoch} epochs (asked for {epochs}); nothing to do")
        elif run.weights_path.exists():
            log(f"note: overwriting the checkpoint in {display_path(run_dir)} "
                "(pass resume=True / --resume to continue it)")
        run.cuda_graph = cuda_graph
        run.prepare()
        log(f"VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, {len(train_x):,} training images, batch "
            f"{tc.batch_size}{run.split_note()}, {len(loader)} steps/epoch, device {device}, "
            f"run dir {display_path(run_dir)}")

        if run.epoch < epochs:
            log(describe_estimate("VAE", step_flops(vae, lambda m, k: sum(
                o.float().pow(2).mean() for o in m(torch.zeros(k, *shape[-3:], device="meta"))), tc.batch_size),
                (epochs - run.epoch) * len(loader), device))

        def draw(batch):
            x = batch[0].to(device, non_blocking=True)
            # ε of the posterior samples, drawn for the global batch (see nbutils.distributed)
            return x, torch.randn((len(x), *vae.latent_shape), generator=gens["noise"], device=device)

        def train_step(inputs):
            x, eps = inputs
            x_own, eps = procs.shard(x, eps)
            with autocast(device, run.amp_dtype):
                recon, mean, logvar = run.forward(x_own, noise=eps)
            loss, parts = vae_loss(x_own, recon.float(), mean.float(), logvar.float(), cfg.vae.kl_weight)
            return loss, procs.combine(parts, len(x)), len(x)

        def after_epoch(record):
            if tc.sample_every and record["epoch"] % tc.sample_every == 0:
                _save_recon_grid(run.ema.model, test_x, test_y, run_dir / f"vae_recon_epoch{record['epoch']:03d}.png",
                                 D.class_names(cfg.data))

        fit(run, epochs, lambda epoch: loader, train_step,
            evaluate=lambda: {f"test_{k}": v for k, v in evaluate_vae(run.ema.model, test_x.to(device)).items()},
            after_epoch=after_epoch,
            describe=lambda r: f"  test PSNR {r['test_psnr']:.2f} dB  SSIM {r['test_ssim']:.4f}" if "test_psnr" in r
            else "",
            postfix=lambda running, parts: {"loss": f"{running:.4f}",
                                            "psnr": f"{10 * math.log10(4 / max(parts['mse'], 1e-12)):.1f}dB"},
            on_step=on_step, log_with=log_with, checkpoint_every=checkpoint_every, draw=draw)

        # the scale factor and the latent cache come from the final weights (process 0 computes them)
        with procs.main_first():
            if procs.is_main:
                return finalize_vae(run_dir, cfg, data_root=data_root, log=log, device=device, progress=progress)
        return load_vae(run_dir / VAE_FILE, device=device)[0]


def _weights(run: Run, epochs_done: int) -> tuple[bytes, bytes]:
    extra = {"epoch": epochs_done, "step": run.step, "latent_stats": False,
             "metrics": run.history.epochs[-1] if run.history.epochs else {}}
    return encode_model("vae", run.ema.model.state_dict(), run.cfg, extra)


def _save_recon_grid(vae: VAE, test_x: torch.Tensor, test_y: torch.Tensor, path: Path,
                     names: tuple[str, ...]) -> None:
    k = 2 if len(test_x) >= 200 else 1
    try:
        originals = D.per_class(test_x, test_y, k, names)
    except ValueError:
        return
    with torch.no_grad():
        mean, _ = vae.encode_dist(originals.to(next(vae.parameters()).device))
        recon = vae.decoder(mean).cpu()
    pairs = torch.stack([originals, recon], 1).flatten(0, 1)  # original, reconstruction, ...
    D.save_grid(pairs, path, nrow=4 * k if k > 1 else 2)


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
    mean, std = encode_dataset(vae, D.to_model_range(images, image_shape(cfg.data, cfg.vae)), progress=progress)
    shift, scale = latent_stats(mean, std)
    vae.set_latent_stats(shift, scale)
    extra = dict(meta["extra"], latent_stats=True, latent_shift=shift.tolist(), latent_scale=scale)
    weights, weights_json = encode_model("vae", vae.state_dict(), cfg, extra)
    # the weights stay one set with the training state they came from (what --resume checks)
    commit_files(run_dir, "vae", {VAE_FILE: weights, Path(VAE_FILE).with_suffix(".json").name: weights_json})
    write_latent_cache(run_dir / LATENT_CACHE_FILE, mean, std, labels, run_dir / VAE_FILE)
    log(f"latent scale factor {scale:.4f}, shift {[round(v, 3) for v in shift.tolist()]}; "
        f"latent cache {display_path(run_dir / LATENT_CACHE_FILE)}")
    return vae


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
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(run_root) if run_root is not None else Path(tmp)
        for beta in betas:
            c = cfg.replace(
                vae=dataclasses.replace(cfg.vae, kl_weight=beta),
                data=dataclasses.replace(cfg.data, train_subset=train_subset or cfg.data.train_subset),
                train_vae=dataclasses.replace(cfg.train_vae, epochs=epochs, sample_every=0),
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
