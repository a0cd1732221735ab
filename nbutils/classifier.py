"""The project's own FashionMNIST classifiers: the judges and the feature extractors of the metrics.

FID on FashionMNIST is usually computed with an ImageNet Inception network: a 100 MB download that
expects 299×299 colour photographs, whose features say little about grayscale clothes. Here classifiers
trained on FashionMNIST itself do both jobs:

* the penultimate layer (``feature_dim`` numbers per image) is the feature space of FID and KID,
* the prediction is the judge of class-conditioned samples ("is this generated sneaker a sneaker?").

Two are shipped, of different families, so that a result tuned on one can be checked on the other:

* ``resnet`` (``checkpoints/classifier.safetensors``): a small ResNet (He et al. 2016, "Deep residual
  learning"), batch norm, flip + shift augmentation, label smoothing, seed 0;
* ``vgg`` (``checkpoints/classifier_vgg.safetensors``): a plain VGG-style stack of 3×3 convolutions and max
  pooling (Simonyan & Zisserman 2015) with group norm and GELU, a wider feature layer, shift + random-erasing
  augmentation (Zhong et al. 2020) and no flips, no label smoothing, seed 1.

Each trains in minutes on a CPU (``python -m nbutils train-classifier --arch NAME``), so the metrics work
offline and give the same numbers everywhere.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import data as D
from .checkpoints import CheckpointError, load_state_strict, read_model, save_model
from .config import bf16_supported, checkpoints_dir, pick_device, runs_dir

CLASSIFIER_FILE = "classifier.safetensors"
ARCHS = ("resnet", "vgg")
AUGMENTS = ("flip_shift", "shift_erase")


@dataclass
class ClassifierConfig:
    """Architecture and training of a feature classifier (defaults: the ``resnet`` one; see :data:`CLASSIFIERS`)."""

    arch: str = "resnet"  # "resnet" (FashionClassifier) or "vgg" (VGGClassifier)
    augment: str = "flip_shift"  # "flip_shift" or "shift_erase" (see augment())
    channels: tuple[int, ...] = (32, 64, 128)  # at 28×28, 14×14, 7×7
    feature_dim: int = 128  # penultimate layer = the FID/KID feature space
    dropout: float = 0.3
    epochs: int = 15
    batch_size: int = 128
    lr: float = 3e-3  # peak of a one-cycle schedule (warm-up then cosine decay)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    train_subset: int | None = None
    bf16: bool = True  # bf16 autocast for training where the hardware supports it natively

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"classifier arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"classifier augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")

    @property
    def file(self) -> str:
        """The weights' file name: classifier.safetensors for the resnet, classifier_ARCH.safetensors otherwise."""
        return CLASSIFIER_FILE if self.arch == "resnet" else f"classifier_{self.arch}.safetensors"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"classifier config: unknown field(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


#: The two shipped judges, by architecture: different families, augmentations, losses and seeds.
CLASSIFIERS = {
    "resnet": ClassifierConfig(),
    "vgg": ClassifierConfig(arch="vgg", augment="shift_erase", channels=(32, 64, 128), feature_dim=256,
                            dropout=0.5, epochs=10, label_smoothing=0.0, seed=1),
}


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected when the shape changes) shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class FashionClassifier(nn.Module):
    """A small ResNet: stem, one residual block per resolution (28→14→7), global average pool,
    a ``feature_dim`` layer (the features), a linear classifier. Input: (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, cfg: ClassifierConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ClassifierConfig()
        c = cfg.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c[0], 3, padding=1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU())
        blocks, prev = [], c[0]
        for i, ch in enumerate(c):
            blocks.append(BasicBlock(prev, ch, stride=1 if i == 0 else 2))
            prev = ch
        self.blocks = nn.Sequential(*blocks)
        self.feature = nn.Sequential(nn.Linear(prev, cfg.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, D.NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) penultimate activations."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, D.IMAGE_SIZE, D.IMAGE_SIZE):
            raise ValueError(f"expected images (N, 1, 28, 28), got {tuple(x.shape)}")
        h = self.blocks(self.stem(x))
        return self.feature(h.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.GroupNorm(8, out_ch), nn.GELU())


class VGGClassifier(nn.Module):
    """A plain (no shortcut) VGG-style network: per resolution two 3×3 conv-GroupNorm-GELU layers, then 2×2 max
    pooling (28→14→7→3); the flattened 3×3 map → a ``feature_dim`` layer (the features) → a linear classifier.
    Input: (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        layers, prev = [], 1
        for ch in cfg.channels:
            layers += [_conv(prev, ch), _conv(ch, ch), nn.MaxPool2d(2)]
            prev = ch
        self.body = nn.Sequential(*layers)
        side = D.IMAGE_SIZE // 2 ** len(cfg.channels)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(prev * side * side, cfg.feature_dim), nn.GELU())
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, D.NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) penultimate activations."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, D.IMAGE_SIZE, D.IMAGE_SIZE):
            raise ValueError(f"expected images (N, 1, 28, 28), got {tuple(x.shape)}")
        return self.feature(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def build_classifier(cfg: ClassifierConfig) -> FashionClassifier | VGGClassifier:
    """The untrained network ``cfg.arch`` names."""
    return FashionClassifier(cfg) if cfg.arch == "resnet" else VGGClassifier(cfg)


def as_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) / (N, 1, 28, 28), or float in [-1, 1] → float (N, 1, 28, 28) in [-1, 1]."""
    if images.dtype == torch.uint8:
        return D.to_model_range(images)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, D.IMAGE_SIZE, D.IMAGE_SIZE):
        raise ValueError(f"expected images of shape (N, 28, 28) or (N, 1, 28, 28), got {tuple(images.shape)}")
    return images.float()


def augment(x: torch.Tensor, generator: torch.Generator, kind: str = "flip_shift") -> torch.Tensor:
    """``flip_shift``: random horizontal flips, then shifts of up to 2 pixels (pad with background, crop back).
    ``shift_erase``: the shifts, then with probability ½ one random rectangle (4–12 pixels a side) replaced by
    uniform noise in [-1, 1] (random erasing, Zhong et al. 2020)."""
    n = x.shape[0]
    if kind == "flip_shift":
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = _shift(x, generator)
    if kind == "shift_erase":
        h, w = torch.randint(4, 13, (2, n), generator=generator)
        top = (torch.rand(n, generator=generator) * (29 - h)).long()
        left = (torch.rand(n, generator=generator) * (29 - w)).long()
        r, c = torch.arange(28)[None, :, None], torch.arange(28)[None, None, :]
        box = (r >= top[:, None, None]) & (r < (top + h)[:, None, None]) \
            & (c >= left[:, None, None]) & (c < (left + w)[:, None, None])
        box &= (torch.rand(n, generator=generator) < 0.5)[:, None, None]
        noise = torch.rand(x.shape, generator=generator) * 2 - 1
        x = torch.where(box[:, None], noise, x)
    return x


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to 2 pixels each way, filling with background (−1)."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]  # (n, 28, 1)
    cols = (dx[:, None] + torch.arange(28))[:, None, :]  # (n, 1, 28)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` for a stack of images (uint8 or [-1, 1]), batched, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        x = as_model_input(images[start : start + batch_size]).to(device)
        f = model.features(x)
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    if not feats:
        raise ValueError("no images given")
    return torch.cat(feats), torch.cat(logits)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = predict(model, images)
    return (logits.argmax(1) == labels).float().mean().item()


def train_classifier(
    cfg: ClassifierConfig | None = None,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data_root: str | None = None,
) -> tuple[nn.Module, dict]:
    """Train the classifier ``cfg`` describes on the training split, report test accuracy, save to ``out``.

    Adam with a one-cycle learning rate (linear warm-up over the first 10% of steps, cosine decay to 0),
    label smoothing, flip/shift augmentation; weights saved atomically after the last epoch and
    after every epoch (so an interrupted run keeps its last finished epoch).
    """
    cfg = cfg or ClassifierConfig()
    out = Path(out) if out is not None else runs_dir() / "classifier" / cfg.file
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else pick_device()
    train_x, train_y = D.load_split("train", root=data_root, subset=cfg.train_subset)
    test_x, test_y = D.load_split("test", root=data_root)
    x = as_model_input(train_x)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_classifier(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = D.TensorLoader((x, train_y), batch_size=cfg.batch_size, shuffle=True, generator=gen)
    total = cfg.epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    amp = cfg.bf16 and bf16_supported(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    log(f"classifier ({cfg.arch}): {sum(p.numel() for p in model.parameters()):,} parameters, {len(x):,} images, "
        f"{cfg.epochs} epochs, device {device}{', bf16 autocast' if amp else ''}")
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"classifier epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        running = 0.0
        for xb, yb in bar:
            xb, yb = augment(xb, gen, cfg.augment).to(device), yb.to(device)
            if amp:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"classifier loss became {loss.item()} in epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = 0.98 * running + 0.02 * loss.item() if running else loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
        acc = accuracy(model, test_x, test_y)
        record = {"epoch": epoch + 1, "train_loss": running, "test_accuracy": acc,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {running:.4f}, test accuracy {acc:.4f} ({record['seconds']:.0f} s)")
        save_model(out, "classifier", model.state_dict(), cfg, {"epoch": epoch + 1, "history": history,
                                                                 "test_accuracy": acc})
    return model.eval(), {"path": str(out), "history": history, "test_accuracy": history[-1]["test_accuracy"]}


def resolve_classifier(checkpoint: str | Path | None = None, arch: str = "resnet") -> Path:
    """``checkpoint`` (a file, or a folder holding the ``arch`` classifier's file), else the user's
    ``runs/classifier/``, else the shipped weights."""
    if arch not in ARCHS:
        raise ValueError(f"classifier arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    name = CLASSIFIERS[arch].file
    if checkpoint is not None:
        p = Path(checkpoint)
        p = p / name if p.is_dir() else p
        if not p.is_file():
            raise CheckpointError(f"no classifier checkpoint at {p}")
        return p
    for p in (runs_dir() / "classifier" / name, checkpoints_dir() / name):
        if p.is_file():
            return p
    raise CheckpointError(f"no {name} in {runs_dir() / 'classifier'} nor in {checkpoints_dir()}; "
                          f"train one with: python -m nbutils train-classifier --arch {arch}")


def load_classifier(checkpoint: str | Path | None = None, device: str | torch.device | None = None,
                    arch: str = "resnet") -> tuple[nn.Module, dict]:
    """``(classifier in eval mode, metadata)`` from a checkpoint (default: see :func:`resolve_classifier`)."""
    path = resolve_classifier(checkpoint, arch)
    tensors, meta = read_model(path, "classifier")
    model = build_classifier(ClassifierConfig.from_dict(meta["config"]))
    load_state_strict(model, tensors, path)
    meta["path"] = str(path)
    device = torch.device(device) if device is not None else pick_device()
    return model.to(device).eval(), meta
