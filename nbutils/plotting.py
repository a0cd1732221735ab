"""Pictures: image grids on screen, and the small charts the notebooks use (PNG grids: ``nbutils.data``).

Images may be given as uint8 (N, 28, 28), or float (N, 1, 28, 28) / (N, 28, 28) in [-1, 1]
(the models' range); :func:`as_uint8` converts either way. Colour images (another dataset, e.g. CIFAR-10)
work the same: float (N, 3, H, W) in [-1, 1], or uint8 (N, 3, H, W) / channel-last (N, H, W, 3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
import torch

from .data import CLASS_NAMES, NUM_CLASSES, as_uint8, image_grid, save_grid  # noqa: F401 (re-exported)
from .data import per_class as select_per_class


def show_grid(
    images: torch.Tensor | np.ndarray,
    nrow: int | None = None,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    ax=None,
    size: float = 0.6,
    col_labels: Sequence[str] | None = None,
):
    """Show an image grid with matplotlib; ``row_labels`` annotate each row (e.g. class names), ``col_labels``
    each column (e.g. timesteps or guidance scales)."""
    import matplotlib.pyplot as plt

    grid = image_grid(images, nrow=nrow)
    if ax is None:
        n = len(as_uint8(images))
        ncol = nrow or int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / ncol))
        extra = 1.2 if row_labels else 0.0
        below = 0.5 if col_labels else 0.0
        _, ax = plt.subplots(figsize=(ncol * size + extra, rows * size + (0.4 if title else 0.0) + below))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    h, w = as_uint8(images).shape[1:3]  # (N, H, W) grey or (N, H, W, 3) colour
    if col_labels:
        ax.set_xticks([2 + (w + 2) * i + w / 2 for i in range(len(col_labels))])
        long = max(len(str(c)) for c in col_labels) > 6
        ax.set_xticklabels(col_labels, fontsize=8, rotation=30 if long else 0, ha="right" if long else "center")
        ax.tick_params(bottom=False)
    else:
        ax.set_xticks([])
    if row_labels:
        ax.set_yticks([2 + (h + 2) * i + h / 2 for i in range(len(row_labels))])
        ax.set_yticklabels(row_labels)
        ax.tick_params(left=False)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return ax


def show_class_grid(images, labels, per_class: int = 10, title: str | None = None, ax=None):
    """One row per class, the first ``per_class`` images of each, class names on the left."""
    return show_grid(select_per_class(images, labels, per_class), nrow=per_class, title=title,
                     row_labels=CLASS_NAMES, ax=ax)


def plot_class_balance(labels_by_split: dict[str, torch.Tensor], ax=None):
    """Bar chart of images per class, one colour per split (seaborn)."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = []
    for split, labels in labels_by_split.items():
        counts = torch.bincount(torch.as_tensor(labels), minlength=NUM_CLASSES)
        rows += [{"class": CLASS_NAMES[c], "split": split, "images": int(counts[c])} for c in range(NUM_CLASSES)]
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.2))
    sns.barplot(pd.DataFrame(rows), x="class", y="images", hue="split", ax=ax)
    ax.tick_params(axis="x", rotation=30)
    ax.set(xlabel="", ylabel="images", title="images per class in each split")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), title="split")
    return ax


def show_pairs(originals, reconstructions, per_row: int = 10, title: str | None = None, row_labels=None, ax=None):
    """Originals and their reconstructions interleaved: each row pair = originals above, copies below."""
    a, b = torch.as_tensor(as_uint8(originals)), torch.as_tensor(as_uint8(reconstructions))
    if a.shape != b.shape:
        raise ValueError(f"originals {tuple(a.shape)} and reconstructions {tuple(b.shape)} differ in shape")
    rows = []
    for i in range(0, len(a), per_row):
        rows += [a[i : i + per_row], b[i : i + per_row]]
    labels = None
    if row_labels is not None:
        labels = [f"{lab}{suffix}" for lab in row_labels for suffix in ("", " (VAE)")]
    return show_grid(torch.cat(rows), nrow=per_row, title=title, row_labels=labels, ax=ax)


def plot_training_history(steps: list[dict], epochs: list[dict], metric: str = "test_psnr", smooth: int = 50):
    """Training loss per step (raw and a running mean), and one test metric per epoch."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2))
    loss = np.array([s["loss"] for s in steps])
    x = np.arange(1, len(loss) + 1)
    ax1.plot(x, loss, alpha=0.3, lw=0.8, label="per step")
    if len(loss) >= smooth:
        kernel = np.ones(smooth) / smooth
        ax1.plot(x[smooth - 1 :], np.convolve(loss, kernel, mode="valid"), lw=1.5, label=f"mean of {smooth}")
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    ax1.legend()
    label, unit = _metric_label(metric)
    if epochs:
        xs, ys = [e["epoch"] for e in epochs], [e[metric] for e in epochs]
        ax2.plot(xs, ys, "o-")
        ax2.set_xticks(xs)
        for x_, y_ in zip(xs, ys, strict=True):
            ax2.annotate(f"{y_:.2f}{unit}", (x_, y_), textcoords="offset points", xytext=(0, 6), ha="center",
                         fontsize=8)
    ax2.set(xlabel="epoch", ylabel=label, title=f"{label} after each epoch")
    fig.tight_layout()
    return fig


def _metric_label(metric: str) -> tuple[str, str]:
    """An axis label for a recorded metric and the unit to print after its values."""
    if metric.endswith("psnr"):
        return metric.replace("_psnr", " PSNR").replace("_", " ") + " (dB)", " dB"
    return metric.replace("_", " "), ""


def read_curves(run_dir: str | os.PathLike, what: str) -> tuple[list[dict], list[dict]]:
    """``(per-step records, per-epoch records)`` of a run's ``{what}_steps.jsonl`` and ``{what}_history.json``."""
    run_dir = Path(run_dir)
    steps_file, epochs_file = run_dir / f"{what}_steps.jsonl", run_dir / f"{what}_history.json"
    if not steps_file.is_file():
        raise FileNotFoundError(f"no training curves at {steps_file} (a run trained by this version writes them)")
    steps = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    epochs = json.loads(epochs_file.read_text()) if epochs_file.is_file() else []
    return steps, epochs


def plot_run(run_dir: str | os.PathLike, smooth: int = 50):
    """A run's training curves, one row per model it trained: the loss per step (raw and a running mean), the
    learning rate, the gradient norm, and the loss (UNet) or test PSNR (VAE) after each epoch."""
    import matplotlib.pyplot as plt

    found = [w for w in ("vae", "unet") if (Path(run_dir) / f"{w}_steps.jsonl").is_file()]
    if not found:
        raise FileNotFoundError(f"no training curves (vae_steps.jsonl, unet_steps.jsonl) in {run_dir}")
    fig, axes = plt.subplots(len(found), 4, figsize=(15, 3.1 * len(found)), squeeze=False)
    for row, what in zip(axes, found, strict=True):
        steps, epochs = read_curves(run_dir, what)
        x = np.array([r["step"] for r in steps])
        loss = np.array([r["loss"] for r in steps])
        row[0].plot(x, loss, alpha=0.3, lw=0.8, label="per step")
        if len(loss) >= smooth:
            row[0].plot(x[smooth - 1 :], np.convolve(loss, np.ones(smooth) / smooth, mode="valid"), lw=1.5,
                        label=f"mean of {smooth}")
        row[0].set(xlabel="step", ylabel="training loss", yscale="log", title=f"{what.upper()}: loss")
        row[0].legend(fontsize=8)
        for ax, key, label in ((row[1], "lr", "learning rate"), (row[2], "grad_norm", "gradient norm")):
            ax.plot(x, [r.get(key, np.nan) for r in steps], lw=0.8)
            ax.set(xlabel="step", ylabel=label, title=f"{what.upper()}: {label}")
        metric = "test_psnr" if what == "vae" and epochs and "test_psnr" in epochs[0] else "train_loss"
        row[3].plot([e["epoch"] for e in epochs], [e.get(metric, np.nan) for e in epochs], "o-")
        row[3].set(xlabel="epoch", ylabel=_metric_label(metric)[0],
                   title=f"{what.upper()}: after each epoch")
    fig.tight_layout()
    return fig


def plot_schedules(schedules: dict, axes=None):
    """ᾱ_t (signal kept) and log SNR(t) of several :class:`~nbutils.schedules.NoiseSchedule` s, side by side."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for i, (name, s) in enumerate(schedules.items()):
        t = np.arange(len(s))
        abar = s.alphas_cumprod.numpy()
        axes[0].plot(t, s.betas.numpy(), label=name, color=f"C{i}")
        axes[1].plot(t, abar, label=name, color=f"C{i}")
        axes[2].plot(t, s.log_snr().numpy(), label=name, color=f"C{i}")
    axes[0].set(title="β_t (noise added per step)", xlabel="timestep t", ylabel="β_t", yscale="log")
    axes[1].set(title="ᾱ_t (fraction of signal power left)", xlabel="timestep t", ylabel="ᾱ_t")
    axes[2].axhline(0, color="k", lw=0.8, ls=":")
    axes[2].set(title="log SNR(t) = log ᾱ/(1 − ᾱ)", xlabel="timestep t", ylabel="log SNR (natural log)")
    axes[1].legend()
    plt.tight_layout()
    return axes


def show_trajectory(trajectory: Sequence[tuple[int, torch.Tensor]], rows: int = 4, row_labels=None, title=None):
    """The decoded x̂_0 estimates of a sampler at its recorded timesteps: one column per t, one row per image."""
    import matplotlib.pyplot as plt

    ts = [t for t, _ in trajectory]
    imgs = torch.stack([x[:rows] for _, x in trajectory], dim=1).flatten(0, 1)  # (rows·steps, 1, 28, 28)
    ax = show_grid(imgs, nrow=len(ts), title=title, row_labels=row_labels, size=0.9,
                   col_labels=[f"t={t}" for t in ts])
    plt.tight_layout()
    return ax


class TrainingMonitor:
    """A live training picture for notebooks: smoothed loss curve + the newest sample grid.

    Pass it as ``train_unet(..., on_step=monitor.on_step, on_epoch_end=monitor.on_epoch_end)``; the figure
    is redrawn in place every ``every`` steps and after each epoch (outside IPython it does nothing).
    """

    def __init__(self, every: int = 100, smooth: int = 50, title: str = "UNet training"):
        self.every, self.smooth, self.title = every, smooth, title
        self.losses: list[float] = []
        self.epoch_ends: list[int] = []
        self.grid_path = None
        self._handle = None

    def on_step(self, step: int, parts: dict) -> None:
        self.losses.append(parts["loss"])
        if step % self.every == 0:
            self.draw()

    def on_epoch_end(self, record: dict, history, model, grid_path) -> None:
        self.epoch_ends.append(record["step"])
        self.grid_path = grid_path or self.grid_path
        self.draw()

    def figure(self):
        import matplotlib.pyplot as plt

        has_grid = self.grid_path is not None
        fig, axes = plt.subplots(1, 2 if has_grid else 1, figsize=(14 if has_grid else 6, 5.5 if has_grid else 4),
                                 gridspec_kw={"width_ratios": [1, 1]} if has_grid else None)
        ax = axes[0] if has_grid else axes
        y = np.asarray(self.losses)
        ax.plot(np.arange(1, len(y) + 1), y, color="C0", alpha=0.25, lw=0.8, label="per step")
        if len(y) >= self.smooth:
            k = np.ones(self.smooth) / self.smooth
            ax.plot(np.arange(self.smooth, len(y) + 1), np.convolve(y, k, mode="valid"), color="C0",
                    label=f"mean of {self.smooth}")
        for i, s in enumerate(self.epoch_ends):
            ax.axvline(s, color="k", ls=":", lw=0.8, label="end of an epoch" if i == 0 else None)
        ax.set(xlabel="step", ylabel="training loss (MSE)", yscale="log", title=f"{self.title}: step {len(y)}")
        ax.legend(loc="upper right")
        if has_grid:
            axes[1].imshow(matplotlib.image.imread(self.grid_path), cmap="gray")
            axes[1].set_axis_off()
            axes[1].set_title(f"samples after epoch {len(self.epoch_ends)} (EMA, DDIM)")
        fig.tight_layout()
        return fig

    def draw(self) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        import matplotlib.pyplot as plt

        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)
