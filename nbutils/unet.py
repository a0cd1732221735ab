"""The denoiser: a class-conditional UNet on 7×7 latents.

Inputs: a noisy latent x_t (B, C_z, 7, 7), integer timesteps t (B,), class labels (B,) where the
index ``num_classes`` is the *null* class used for classifier-free guidance. Output: the prediction
(ε or v, see :mod:`nbutils.diffusion`), same shape as x_t.

Shapes with ``block_out_channels=(64, 128)``, ``layers_per_block=2``, attention at level 1::

    x_t 4×7×7 ─conv_in→ 64×7×7 ─Res→Res→ ─down→ 128×4×4 ─Res+Attn→Res+Attn→
        ─mid: Res+Attn+Res→
        ─up level 1: 3×(concat skip, Res+Attn)→ ─upsample to 7×7→ ─up level 0: 3×(concat skip, Res)→ ─conv_out→ 4×7×7

**The odd size.** 7 is not divisible by 2. Downsampling is a stride-2 3×3 convolution with padding 1,
which maps 7 → 4 (⌈7/2⌉); upsampling interpolates to the *exact* size of the matching encoder feature
map (7×7), taken from the skip connection, instead of a blind ×2 (which would give 8×8). So the
encoder and decoder stay aligned for any latent size, odd or even, without padding or cropping.

**Conditioning.**
* Timestep: sinusoidal embedding (Vaswani et al. 2017; Ho et al. 2020) → MLP → a scale and shift for
  the second GroupNorm of every residual block (FiLM / "AdaGN", Dhariwal & Nichol 2021).
* Class: cross-attention (Rombach et al. 2022). Queries come from the feature map, keys and values
  from the *context tokens* of the class: ``context_tokens`` learned vectors per class, plus a set for
  the null class. Several tokens matter: with a single key, softmax attention puts weight 1 on it
  and cross-attention collapses into a class-dependent constant; with several, each position of the
  feature map chooses its own mixture of the class's tokens.
* Class, optionally (``class_embedding=True``): a learned vector per class (null included) added to the
  timestep embedding, so the class also scales and shifts every residual block, the 7×7 level included,
  which cross-attention (at 4×4 only) does not reach directly (Dhariwal & Nichol 2021 condition on the
  class this way). Off by default; the shipped UNet has cross-attention only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import HubModel
from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t·f_i), sin(t·f_i)], with
    frequencies f_i = max_period^(−i/half) for i = 0 … half−1. Shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class LatentResBlock(nn.Module):
    """GroupNorm → SiLU → conv, then GroupNorm modulated by the timestep (scale, shift) → SiLU →
    dropout → conv, plus a (1×1 when channels change) skip path."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable deep training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.temb(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Multi-head attention of a feature map's positions over a token sequence (itself or a context)."""

    def __init__(self, channels: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({heads})")
        self.heads = heads
        self.norm = nn.GroupNorm(min(8, channels), channels) if context_dim is None else nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        kv_dim = context_dim or channels
        self.to_k = nn.Linear(kv_dim, channels, bias=False)
        self.to_v = nn.Linear(kv_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) → (B, heads, L, C/heads)
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def attend(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.to_q(tokens)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))


class SelfAttention(_Attention):
    """Every position attends to every other position of the feature map (global context at 4×4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        return x + self.attend(tokens, tokens).transpose(1, 2).reshape(b, c, hgt, wid)


class CrossAttention(_Attention):
    """Every position attends to the context tokens (the class): keys/values from the context."""

    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__(channels, heads, context_dim=context_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        return x + self.attend(tokens, context).transpose(1, 2).reshape(b, c, hgt, wid)


class AttentionBlock(nn.Module):
    """Self-attention, then cross-attention to the class tokens."""

    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.self_attn = SelfAttention(channels, heads)
        self.cross_attn = CrossAttention(channels, context_dim, heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.cross_attn(self.self_attn(x), context)


class _Level(nn.Module):
    """One residual block, optionally followed by attention."""

    def __init__(self, in_ch, out_ch, temb_dim, cfg: UNetConfig, attention: bool):
        super().__init__()
        self.res = LatentResBlock(in_ch, out_ch, temb_dim, cfg.norm_num_groups, cfg.dropout)
        self.attn = AttentionBlock(out_ch, cfg.cross_attention_dim, cfg.num_heads) if attention else None

    def forward(self, x, temb, context):
        x = self.res(x, temb)
        return self.attn(x, context) if self.attn is not None else x


class Downsample(nn.Module):
    """Stride-2 3×3 conv with padding 1: n → ⌈n/2⌉ (7 → 4 → 2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to an explicit size (that of the skip it will meet), then a 3×3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _checkable(x: torch.Tensor) -> bool:
    """Whether a check may read ``x``'s values on the host for free: ``x`` is on the CPU, and torch.compile or
    torch.export is not tracing the model. On an accelerator reading a value waits for the device (a host
    synchronisation per call, which keeps the host from queueing the next kernels); callers there check their
    labels once up front (:func:`nbutils.pipeline.sample`, the training data), and an index out of range still
    fails on the device."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return x.device.type == "cpu" and not (torch.compiler.is_compiling() or exporting())


class UNet(nn.Module, HubModel, library_name="nbutils", license="mit",
          tags=["diffusion", "latent-diffusion", "unet", "class-conditional"]):
    """The class-conditional latent UNet. ``forward(x_t, t, labels) -> prediction``."""

    _kind = "unet"  # HubModel: the config section and file name

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if len(cfg.attention_levels) != len(cfg.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels level, got "
                             f"{cfg.attention_levels} for {cfg.block_out_channels}")
        self.cfg = cfg
        ch = cfg.block_out_channels
        temb_dim = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # context tokens: num_classes real classes + 1 null class, each a short learned sequence
        tokens = torch.empty(cfg.num_classes + 1, cfg.context_tokens, cfg.cross_attention_dim)
        if tokens.device.type != "meta":  # (on the meta device a UNet is only counted: checkpoints.model_parameters)
            tokens = torch.randn(tokens.shape) * 0.02
        self.class_tokens = nn.Parameter(tokens)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.class_embedding else None
        if self.class_emb is not None:
            nn.init.zeros_(self.class_emb.weight)  # starts as the cross-attention-only UNet
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [ch[0]]
        c_prev = ch[0]
        for level, c in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(cfg.layers_per_block):
                blocks.append(_Level(c_prev, c, temb_dim, cfg, cfg.attention_levels[level]))
                c_prev = c
                skip_channels.append(c)
            down = None
            if level < len(ch) - 1:
                down = Downsample(c)
                skip_channels.append(c)
            self.down.append(nn.ModuleDict({"blocks": blocks, **({"down": down} if down else {})}))

        self.mid_res1 = LatentResBlock(c_prev, c_prev, temb_dim, cfg.norm_num_groups, cfg.dropout)
        self.mid_attn = AttentionBlock(c_prev, cfg.cross_attention_dim, cfg.num_heads)
        self.mid_res2 = LatentResBlock(c_prev, c_prev, temb_dim, cfg.norm_num_groups, cfg.dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            c = ch[level]
            blocks = nn.ModuleList()
            for _ in range(cfg.layers_per_block + 1):
                blocks.append(_Level(c_prev + skip_channels.pop(), c, temb_dim, cfg, cfg.attention_levels[level]))
                c_prev = c
            up = Upsample(c) if level > 0 else None
            self.up.append(nn.ModuleDict({"blocks": blocks, **({"up": up} if up else {})}))

        self.norm_out = nn.GroupNorm(min(cfg.norm_num_groups, ch[0]), ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        """The context tokens (B, context_tokens, cross_attention_dim) of each label (null included)."""
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
        # a data-dependent check: eager only, so that torch.compile (fullgraph), torch.export and CUDA graph capture
        # go straight through
        if _checkable(labels) and labels.numel() and (
                labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(f"labels must be in 0..{self.null_label} ({self.null_label} = unconditional), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        return self.class_tokens[labels]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected latents (B, {self.cfg.latent_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,) or labels.shape != (b,):
            raise ValueError(f"need one timestep and one label per example: x {tuple(x.shape)}, "
                             f"t {tuple(t.shape)}, labels {tuple(labels.shape)}")
        temb = self.time_mlp(timestep_embedding(t, self.cfg.block_out_channels[0]))
        context = self.context(labels).to(x.dtype)
        if self.class_emb is not None:
            temb = temb + self.class_emb(labels)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block in level["blocks"]:
                h = block(h, temb, context)
                skips.append(h)
            if "down" in level:
                h = level["down"](h)
                skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb), context), temb)

        for level in self.up:
            for block in level["blocks"]:
                h = block(torch.cat([h, skips.pop()], dim=1), temb, context)
            if "up" in level:
                h = level["up"](h, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shape_trace(unet: UNet, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
                ) -> list[tuple[str, str, tuple, int]]:
    """Run one forward pass and list ``(name, block type, output shape, parameters)`` for every
    residual, attention, down- and upsampling block and the in/out convolutions, in execution order."""
    kinds = (LatentResBlock, AttentionBlock, Downsample, Upsample)
    rows: list[tuple[str, str, tuple, int]] = []
    hooks = []
    for name, module in unet.named_modules():
        if isinstance(module, kinds) or name in ("conv_in", "conv_out"):
            def hook(mod, inputs, output, name=name):
                rows.append((name, type(mod).__name__, tuple(output.shape), count_parameters(mod)))

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            unet(x, t, labels)
    finally:
        for h in hooks:
            h.remove()
    return rows
