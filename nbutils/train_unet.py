"""Training the latent UNet (the second stage) on a VAE's cached latents.

Each step: take clean latents x_0 with their classes, drop each class to the null token with probability
``cond_drop_prob`` (so one network learns the conditional and the unconditional model that classifier-free
guidance combines, Ho & Salimans 2022), draw t and noise, and regress the UNet's output on the target of
:class:`nbutils.diffusion.GaussianDiffusion` (ε or v). Every epoch draws fresh posterior samples
z = μ + σ·ε from the latent cache, standardised with the VAE's shift and scale; images are never
re-encoded. An optional second phase (``cfg.finetune_unet``) continues at a lower learning rate.
The epoch loop, checkpoints, resume and Ctrl-C come from :mod:`nbutils.training`.

Guidance distillation (``teacher=``; stage one of Meng et al. 2023, "On Distillation of Guided Diffusion
Models"): instead of the data's target, the student regresses a trained teacher's *guided* output at the same
(x_t, t, class) — out_u + w·(out_c − out_u) with the teacher recipe's w inside its guidance interval, the plain
conditional output outside it. The student then samples without guidance, one UNet pass per step where the
teacher needs two on the guided steps; it may also be narrower than its teacher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import data as D
from .checkpoints import (
    CheckpointError,
    atomic_write_bytes,
    encode_model,
    load_state_strict,
    model_parameters,
    read_model,
    resolve_checkpoint,
)
from .config import Config, display_path, make_generator, pick_device
from .diffusion import GaussianDiffusion, add_noise
from .latents import latent_dataset
from .pipeline import (
    UNET_FILE,
    VAE_FILE,
    Pipeline,
    SamplingRecipe,
    check_vae,
    load_pipeline,
    load_vae,
    recipe_timesteps,
    sample,
    vae_identity,
)
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
    read_state,
    start,
    step_flops,
)
from .unet import UNet


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
    log_with: str | None = None,
    init_from: str | Path | None = None,
    teacher: str | Path | None = None,
    checkpoint_every: int = 1,
    cuda_graph: bool = False,
) -> UNet:
    """Train the latent UNet of ``cfg`` on the cached latents of a VAE; returns the EMA UNet.

    ``epochs`` is the total wanted (default: ``cfg.train_unet.epochs`` plus ``cfg.finetune_unet.epochs``); with
    ``resume=True`` training continues from ``run_dir``'s last checkpoint up to that total. The VAE is
    ``run_dir``'s own when it has one, else ``vae_checkpoint`` (default: latest run, else shipped), copied in.

    ``init_from`` (a run folder or UNet checkpoint; ignored with ``resume``) starts a *new* run from another
    run's weights — raw and EMA from its state file when it has one — with a fresh optimizer. Its VAE must be
    this run's (the same SHA-256).

    ``teacher`` (a UNet checkpoint or run folder) trains by guidance distillation (module docstring): the
    teacher must have learned the same VAE's latents under the same noise schedule and prediction type; its
    stored recipe gives w and the interval, and the student is saved with that recipe, unguided.

    Every ``sample_every`` epochs a grid of samples (one row per class) goes to
    ``RUN_DIR/unet_samples_epochNNN.png``; ``on_epoch_end(record, history, ema_unet, grid_path)`` is called
    after each epoch and ``on_step(step, loss_parts)`` after each step (notebook 04's live picture);
    ``log_with="tensorboard"`` also logs the curves for TensorBoard in ``RUN_DIR/tensorboard/unet``;
    ``checkpoint_every`` epochs between checkpoints (:func:`nbutils.training.fit`); ``cuda_graph``: on CUDA,
    replay each full-batch step as one CUDA graph (:class:`nbutils.training.StepGraph`).
    """
    tc, phase2 = cfg.train_unet, cfg.finetune_unet
    epochs = tc.epochs + phase2.epochs if epochs is None else epochs
    check_model_size(cfg, "unet", UNet)  # before anything is built or written
    check_log_with(log_with)
    check_checkpoint_every(checkpoint_every)
    run_dir, procs, device, log, progress = start(tc, epochs, run_dir, cfg.preset, device, log, progress,
                                                  "unet_state.pt" if resume else None)
    with owned(run_dir, procs), _vae_copied_in(run_dir, procs.is_main) as own_vae:
        with procs.main_first():  # process 0 copies the VAE and writes the latent cache; the others then read them
            if procs.is_main and not own_vae.is_file():  # self-contained run: sampling needs the exact VAE
                source = resolve_checkpoint(VAE_FILE, vae_checkpoint)
                atomic_write_bytes(own_vae, source.read_bytes())  # whole or not at all, even when killed
                if source.with_suffix(".json").is_file():
                    shutil.copyfile(source.with_suffix(".json"), own_vae.with_suffix(".json"))
                log(f"using the VAE {display_path(source)} (copied into {display_path(run_dir)})")
            elif procs.is_main and vae_checkpoint is not None:  # asked for a VAE, but the run has its own
                _check_same_vae(own_vae, resolve_checkpoint(VAE_FILE, vae_checkpoint), run_dir)
            vae, vae_meta = load_vae(own_vae, device=device)
            if not vae_meta["extra"].get("latent_stats"):
                raise CheckpointError(f"{vae_meta['path']} has no latent statistics; run finalize_vae on its run first")
            if vae.cfg.latent_channels != cfg.unet.latent_channels:
                raise CheckpointError(f"VAE {vae_meta['path']} has {vae.cfg.latent_channels} latent channels, "
                                      f"the UNet config expects {cfg.unet.latent_channels}")
            image_shape(cfg.data, vae.cfg, f"the VAE {vae_meta['path']}")
            cache = latent_dataset(vae, vae_meta["path"], subset=cfg.data.train_subset, root=data_root,
                                   progress=progress, data_cfg=cfg.data)
        labels = cache["labels"]  # checked once here: the UNet checks label values only on the CPU (no sync)
        if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.unet.num_classes):
            raise ValueError(f"the training labels must be in 0..{cfg.unet.num_classes - 1} (unet.num_classes = "
                             f"{cfg.unet.num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]")
        shift, scale = vae.latent_shift.cpu()[:, None, None], float(vae.latent_scale)
        distill = load_teacher(teacher, cfg, vae_meta, device, log) if teacher is not None else None

        torch.manual_seed(tc.seed)
        unet = UNet(cfg.unet).to(device)
        diffusion = GaussianDiffusion(cfg.diffusion, cfg.unet.num_classes).to(device)
        seeds = {"shuffle": tc.seed, "latent": tc.seed + 2, "noise": tc.seed + 1}
        gens = {"shuffle": torch.Generator().manual_seed(seeds["shuffle"]),
                "latent": torch.Generator().manual_seed(seeds["latent"]),
                "noise": torch.Generator(device=device).manual_seed(seeds["noise"])}

        def weights(run: Run, epochs_done: int) -> tuple[bytes, bytes]:
            extra = {"epoch": epochs_done, "step": run.step, **vae_identity(vae_meta),
                     "metrics": run.history.epochs[-1] if run.history.epochs else {}}
            if distill is not None:
                extra.update(distill.record())
            return encode_model("unet", run.ema.model.state_dict(), cfg, extra)

        run = Run("unet", cfg, tc, run_dir, unet, EMA(unet, tc.ema_decay, tc.ema_warmup_steps),
                  make_optimizer(unet.parameters(), tc, device), gens, procs, device, log, progress,
                  sections=("data", "unet", "diffusion", "train_unet", "finetune_unet"), weights=weights)
        # the second phase trains with its own learning rate and warm-up; everything else as the first
        phase2_tc = dataclasses.replace(tc, lr=phase2.lr, lr_warmup_steps=phase2.lr_warmup_steps)
        if resume:
            if run.weights_path.is_file():  # the run goes on with the VAE it started with, or not at all
                saved = read_model(run.weights_path, "unet")[1]["extra"]
                check_vae(saved, vae_meta, f"the run in {run_dir}")
                check_same_teacher(saved, distill, run_dir)
            run.resume()
            if phase2.epochs and (run.epoch > tc.epochs or (run.epoch == tc.epochs and run.partial is not None)):
                run.tc = phase2_tc
            if run.epoch >= epochs:
                log(f"already trained {run.epoch} epochs (asked for {epochs}); nothing to do")
        elif run.weights_path.exists():
            log(f"note: overwriting the UNet checkpoint in {display_path(run_dir)} "
                "(pass resume=True / --resume to continue it)")
        if init_from is not None and not resume:
            _init_from(Path(init_from), unet, run.ema, vae_meta, log)
        run.cuda_graph = cuda_graph
        run.prepare()

        def start_epoch(epoch: int) -> None:
            if phase2.epochs and epoch == tc.epochs:
                run.tc, run.phase_start = phase2_tc, run.step
                run.opt = make_optimizer(unet.parameters(), phase2_tc, device)
                for k, g in gens.items():
                    g.manual_seed(seeds[k])
                log(f"second phase: {phase2.epochs} epochs at lr {phase2.lr:g}, fresh optimizer")

        def batches(epoch: int) -> D.TensorLoader:
            # a fresh posterior sample z = μ + σ·ε of every training image, standardised
            z = cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape, generator=gens["latent"])
            # the epoch's latents live on the training device (no copy per step; a no-op on a CPU)
            return D.TensorLoader((((z - shift) * scale).to(device), cache["labels"].to(device)),
                                  batch_size=tc.batch_size, shuffle=True, generator=gens["shuffle"])

        def draw(batch):
            x0, labels = (t.to(device, non_blocking=True) for t in batch)
            return (x0, *diffusion.draw(x0, labels, generator=gens["noise"]))  # for the global batch

        def train_step(inputs):
            x0, t, noise, dropped = procs.shard(*inputs)  # this process's share (all of it on one)
            with autocast(device, run.amp_dtype):
                if distill is None:
                    loss, parts = diffusion.loss(run.forward, x0, dropped, draws=(t, noise, dropped))
                else:
                    loss, parts = distill.loss(run.forward, x0, t, noise, dropped)
            return loss, procs.combine(parts, len(inputs[0])), len(inputs[0])

        def after_epoch(record: dict) -> None:
            grid = None
            if tc.sample_every and record["epoch"] % tc.sample_every == 0:
                grid = save_sample_grid(Pipeline(vae, run.ema.model, cfg.diffusion,
                                                 class_names=D.class_names(cfg.data)),
                                        run_dir / f"unet_samples_epoch{record['epoch']:03d}.png",
                                        guidance=3.0 if distill is None else 1.0)  # a student is guided already
            if on_epoch_end is not None:
                on_epoch_end(record, run.history, run.ema.model, grid)

        n = len(cache["labels"])
        log(f"UNet{' (student)' if distill else ''}: {sum(p.numel() for p in unet.parameters()):,} parameters, "
            f"{n:,} latents from "
            f"{display_path(vae_meta['path'])}, batch {tc.batch_size}{run.split_note()}, "
            f"{-(-n // tc.batch_size)} steps/epoch, device {device}, run dir {display_path(run_dir)}")
        if run.epoch < epochs:
            flops = step_flops(unet, lambda m, k: _unet_loss(m, k, vae.latent_shape), tc.batch_size)
            if distill is not None:  # the teacher's forward pass on each batch twice (conditional, unconditional)
                flops += step_flops(distill.teacher, lambda m, k: _unet_loss(m, k, vae.latent_shape),
                                    2 * tc.batch_size, backward=False)
            what = "UNet" if distill is None else "UNet and its teacher"
            log(describe_estimate(what, flops, (epochs - run.epoch) * -(-n // tc.batch_size), device))
        fit(run, epochs, batches, train_step, epoch_gens=("shuffle", "latent"), after_epoch=after_epoch,
            on_step=on_step, start_epoch=start_epoch, log_with=log_with, checkpoint_every=checkpoint_every,
            draw=draw)
        return run.ema.model


class Distillation:
    """Guidance distillation's target and loss (module docstring): a frozen teacher UNet and its guidance."""

    def __init__(self, teacher: UNet, meta: dict, recipe: SamplingRecipe, alphas_cumprod: torch.Tensor,
                 student_recipe: SamplingRecipe):
        self.teacher, self.meta, self.recipe = teacher.eval().requires_grad_(False), meta, recipe
        self.alphas_cumprod = alphas_cumprod
        self.null = teacher.null_label
        self.student_recipe = student_recipe  # the teacher's recipe unguided (:func:`unguided`)

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's output with its recipe's guidance: w inside the interval, w = 1 (conditional) outside;
        null labels get the teacher's unconditional output."""
        lo, hi = self.recipe.guidance_interval or (0, self.alphas_cumprod.numel())
        w = torch.where((t >= lo) & (t <= hi), self.recipe.guidance, 1.0).to(x_t.dtype).view(-1, 1, 1, 1)
        b = x_t.shape[0]
        null = torch.full_like(labels, self.null)
        out = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])).float()
        cond, uncond = out[:b], out[b:]
        return uncond + w * (cond - uncond)

    def loss(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE between the student's output and :meth:`target` at x_t = q(x_t | x_0) (the forward process on the
        training latents, as Meng et al.'s first stage); parts as :meth:`GaussianDiffusion.loss`."""
        x_t = add_noise(x0, noise, t, self.alphas_cumprod)
        target = self.target(x_t, t, labels)
        mse = torch.nn.functional.mse_loss(model(x_t, t, labels).float(), target)
        return mse, {"loss": mse.detach(), "mse": mse.detach()}

    def record(self) -> dict:
        """What the student's metadata says about its teacher, and the recipe it samples with (unguided)."""
        return {"distilled_from": {"unet_tensor_digest": self.meta["tensor_digest"],
                                   "guidance": self.recipe.guidance,
                                   "guidance_interval": list(self.recipe.guidance_interval or [])},
                "sampling_recipe": self.student_recipe.to_dict()}


@contextlib.contextmanager
def _vae_copied_in(run_dir: Path, is_main: bool) -> Iterator[Path]:
    """Yields the run's own VAE path. When the run fails before it writes anything but a VAE it copied in, that
    copy goes again: a failed first attempt leaves no VAE behind that a retry with another ``--vae`` would take."""
    own_vae = run_dir / VAE_FILE
    copies = (own_vae, own_vae.with_suffix(".json"))
    had_one = own_vae.exists()
    try:
        yield own_vae
    except BaseException:
        if is_main and not had_one:
            written = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")}
            if written <= {p.name for p in copies}:
                for p in copies:
                    p.unlink(missing_ok=True)
        raise


def _check_same_vae(own: Path, asked: Path, run_dir: Path) -> None:
    """An error when the VAE the user asked for is not the one the run folder already trains with."""
    if own.resolve() == asked.resolve():
        return
    if read_model(own, "vae")[1]["tensor_digest"] != read_model(asked, "vae")[1]["tensor_digest"]:
        raise CheckpointError(f"{run_dir} already has its own VAE, which is not {asked}; leave out --vae to go on "
                              "with the run's VAE, or use another --run-dir")


def load_teacher(checkpoint: str | Path, cfg: Config, vae_meta: dict, device, log: Callable[[str], None]
                 ) -> Distillation:
    """The teacher of a guidance distillation, checked against the student's run: same VAE (SHA-256 of its
    tensors), same noise schedule and prediction type, a recipe with guidance."""
    pipe = load_pipeline(checkpoint, device=device)
    where = pipe.meta["path"]
    check_vae(pipe.meta["extra"], vae_meta, f"the teacher {where}")
    mine, theirs = dataclasses.asdict(cfg.diffusion), dataclasses.asdict(pipe.diffusion)
    diffs = [f"{k}: {theirs[k]!r} (teacher) vs {mine[k]!r}" for k in mine
             if k not in ("cond_drop_prob", "min_snr_gamma") and mine[k] != theirs[k]]
    if diffs:
        raise CheckpointError(f"the teacher {where} learned another diffusion process: " + "; ".join(diffs))
    if pipe.unet.null_label != cfg.unet.num_classes:
        raise CheckpointError(f"the teacher {where} has {pipe.unet.null_label} classes, this UNet "
                              f"{cfg.unet.num_classes}")
    if pipe.recipe.guidance == 1.0:
        raise CheckpointError(f"the teacher {where} samples without guidance: nothing to distil")
    log(f"distilling the teacher {display_path(where)}: w = {pipe.recipe.guidance:g} on "
        f"{pipe.recipe.guidance_interval or 'every step'}")
    return Distillation(pipe.unet, pipe.meta, pipe.recipe, GaussianDiffusion(cfg.diffusion).to(device).alphas_cumprod,
                        unguided(pipe))


def unguided(pipe: Pipeline) -> SamplingRecipe:
    """The recipe a student of ``pipe`` samples with: the teacher's, at the same timesteps, without guidance (a
    recipe whose ``guided_steps`` place steps around the guidance interval lists those timesteps instead)."""
    recipe = pipe.recipe
    if recipe.guided_steps is None:
        return recipe.replace(guidance=1.0, guidance_interval=None)
    return recipe.replace(guidance=1.0, guidance_interval=None, guided_steps=None, steps=None,
                          timestep_spacing=None, timesteps=tuple(recipe_timesteps(pipe, recipe)))


def check_same_teacher(saved_extra: dict, distill: Distillation | None, run_dir: Path) -> None:
    """Resume goes on with the teacher (or the plain objective) the run started with, or not at all."""
    before = (saved_extra.get("distilled_from") or {}).get("unet_tensor_digest")
    now = distill.meta["tensor_digest"] if distill is not None else None
    if before != now:
        said = {None: "no teacher"}
        raise CheckpointError(f"the run in {run_dir} was trained with {said.get(before, 'a teacher')}, resumed with "
                              f"{said.get(now, 'a teacher')}" + (" (another one)" if before and now else "")
                              + ": resume it as it started (--teacher)")


def _unet_loss(unet: UNet, n: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.zeros(n, *latent_shape, device="meta")
    t = torch.zeros(n, dtype=torch.long, device="meta")
    return unet(x, t, t).float().pow(2).mean()


def save_sample_grid(pipe: Pipeline, path: str | Path, per_class: int = 10, steps: int = 25,
                     guidance: float = 3.0, seed: int = 0) -> Path:
    """A class-per-row grid of samples, the class names left of the rows (DDIM, ``steps`` steps, fixed seed:
    comparable across epochs)."""
    pipe.unet.eval()
    num_classes = pipe.unet.null_label
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    result = sample(pipe, len(labels), labels, SamplingRecipe(sampler="ddim", steps=steps, guidance=guidance),
                    make_generator(seed))
    names = pipe.class_names if len(pipe.class_names) == num_classes else None
    return D.save_grid(result.images, path, nrow=per_class, row_labels=names)


def _init_from(source: Path, unet: UNet, ema: EMA, vae_meta: dict, log: Callable[[str], None]) -> None:
    """Load another run's UNet weights into ``unet`` (raw) and ``ema``; see ``train_unet(init_from=…)``."""
    path = resolve_checkpoint(UNET_FILE, source)
    tensors, meta = read_model(path, "unet")
    try:
        check_vae(meta["extra"], vae_meta, str(path))
    except CheckpointError as exc:
        raise CheckpointError(f"cannot start from {path}: it was trained on another VAE's latents than "
                              f"{vae_meta['path']} ({exc}); use its run's vae.safetensors (--vae)") from None
    load_state_strict(unet, tensors, path)  # names any tensor that does not fit this config's UNet
    ema.model.load_state_dict(unet.state_dict())
    what = "its EMA weights (no state file: the raw weights start as a copy)"
    state_path = path.parent / "unet_state.pt"
    if state_path.is_file():
        state = read_state(state_path)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        what = f"raw and EMA weights after its step {state['step']}"
    log(f"starting from {path.parent}: {what}; fresh optimizer")


def load_raw_unet(run_dir: str | Path, device: str | torch.device | None = None) -> tuple[UNet, Config]:
    """``(unet, config)``: the *raw* (not EMA) UNet weights of a run, from its state file (EMA-vs-raw comparisons)."""
    path = Path(run_dir) / "unet_state.pt"
    if not path.is_file():
        raise CheckpointError(f"no training state at {path}")
    state = read_state(path)
    cfg = Config.from_dict(state["config"])
    model_parameters(UNet, cfg.unet, f"the config in {path}")
    unet = UNet(cfg.unet)
    unet.load_state_dict(state["model"])
    return unet.to(pick_device(device)).eval(), cfg

