"""The first stage: a VAE that squeezes a 1×28×28 image into a ``C_z``×7×7 latent and back
(any C×S×S with S a multiple of 4 builds the same way: CIFAR-10's 3×32×32 ↔ ``C_z``×8×8).

Shapes (default config, ``block_out_channels=(32, 64, 128)``)::

    encoder  1×28×28 ─conv→ 32×28×28 ─res→ ─down→ 64×14×14 ─res→ ─down→ 128×7×7 ─res(+CA)→ ─conv→ 2·C_z×7×7
    decoder  C_z×7×7 ─conv→ 128×7×7 ─res(+CA)→ ─up→ 64×14×14 ─res→ ─up→ 32×28×28 ─res→ ─conv→ 1×28×28

28 → 14 → 7 needs no padding tricks: both halvings are exact. Every residual block is
GroupNorm → SiLU → conv → GroupNorm → SiLU → conv, then a :class:`ChannelAttention` gate, plus the
skip path (He et al. 2016; the norm/activation order of the LDM autoencoder, Rombach et al. 2022).

The loss is ``reconstruction + β·KL(q(z|x) ‖ N(0, I))`` with a very small β: the KL term only keeps the
latent space smooth and bounded, it does not try to make it Gaussian (the diffusion model takes care of
that). Latents handed to the diffusion model are standardised with a shift and a scale computed from the
training set (:meth:`VAE.set_latent_stats`): ``z_diffusion = (z - shift) · scale``. The scale is
LDM's "scale by std" (1/std of the training latents); the per-channel shift is SD3's ``shift_factor``
(Esser et al. 2024), added because a tiny KL weight does not pull the channel means to zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import HubModel
from .config import VAEConfig


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel gating (Hu et al. 2018).

    Global-average-pool each channel to one number ("squeeze"), pass the vector through a small
    bottleneck MLP, and multiply every channel by a sigmoid gate in (0, 1) ("excite"). It costs almost
    nothing at 7×7 and lets the network switch feature detectors on and off per image.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))))
        return x * gate[:, :, None, None]


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3, twice, channel attention, plus a (1×1 if needed) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, attention_reduction: int | None = 4):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.attn = ChannelAttention(out_ch, attention_reduction) if attention_reduction else nn.Identity()
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + self.attn(h)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution: 28 → 14 → 7."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2× then a 3×3 convolution (no checkerboard artefacts of transposed convs)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """1×28×28 image in [-1, 1] → (mean, log-variance), each ``latent_channels``×7×7."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        g, r = cfg.norm_num_groups, cfg.attention_reduction
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, c in enumerate(ch):
            if level > 0:
                blocks.append(Downsample(ch[level - 1], c))
            blocks += [ResBlock(c, c, g, r) for _ in range(cfg.layers_per_block)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(min(g, ch[-1]), ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(self.conv_in(x))
        mean, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """``latent_channels``×7×7 → 1×28×28 image (unbounded; ≈ [-1, 1] after training)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        g, r = cfg.norm_num_groups, cfg.attention_reduction
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, c in enumerate(ch):
            if level > 0:
                blocks.append(Upsample(ch[level - 1], c))
            blocks += [ResBlock(c, c, g, r) for _ in range(cfg.layers_per_block + 1)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(min(g, ch[-1]), ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class VAE(nn.Module, HubModel, library_name="nbutils", license="mit",
          tags=["diffusion", "latent-diffusion", "vae"]):
    """Encoder + decoder + the latent standardisation the diffusion model relies on.

    * :meth:`encode_dist` — raw posterior ``(mean, logvar)`` (what training and the latent cache use);
    * :meth:`encode` — standardised latents for the diffusion model (posterior mean by default,
      or a sample with ``sample=True``);
    * :meth:`decode` — inverse of :meth:`encode`: standardised latent → image in [-1, 1] space;
    * :meth:`forward` — one training pass: reconstruction (from a posterior sample), mean, logvar.
    """

    _kind = "vae"  # HubModel: the config section and file name

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # z_diffusion = (z - latent_shift) * latent_scale ; identity until set_latent_stats()
        self.register_buffer("latent_shift", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_scale", torch.ones(()))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.cfg.image_size // 4  # two stride-2 halvings: 28 → 7, 32 → 8
        return (self.cfg.latent_channels, side, side)

    def check_images(self, x: torch.Tensor) -> None:
        expected = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [-1, 1], got {x.dtype} (use data.to_model_range)")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"expected images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_shift[:, None, None]) * self.latent_scale

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.latent_scale + self.latent_shift[:, None, None]

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (N, 1, 28, 28) in [-1, 1] → standardised latents (N, C_z, 7, 7)."""
        self.check_images(x)
        mean, logvar = self.encoder(x)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.standardize(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised latents (N, C_z, 7, 7) → images (N, 1, 28, 28), roughly in [-1, 1]."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents of shape (N, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        return self.decoder(self.unstandardize(z))

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, mean, logvar)``; ``noise`` (default: drawn from ``generator``) is the ε of
        the posterior sample z = μ + σ·ε."""
        mean, logvar = self.encoder(x)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise  # the reparameterisation trick
        return self.decoder(z), mean, logvar

    @torch.no_grad()
    def set_latent_stats(self, shift: torch.Tensor, scale: float | torch.Tensor) -> None:
        self.latent_shift.copy_(torch.as_tensor(shift, dtype=torch.float32))
        self.latent_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) summed over latent dimensions, one value per example.

    Closed form per dimension: ½ (μ² + σ² − log σ² − 1).
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0).flatten(1).sum(1)


def vae_loss(
    x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean squared error per pixel + kl_weight · KL per image / pixels``; returns (loss, parts), the parts
    (loss, mse, kl) as detached 0-d tensors (reading them waits for a GPU's step).

    Both terms are normalised per pixel so ``kl_weight`` does not depend on the batch size or the
    image size; in that normalisation β = 1e-6 … 1e-4 is the "very small KL" regime of LDM.
    """
    rec = F.mse_loss(recon, x)
    kl = kl_divergence(mean, logvar).mean() / x[0].numel()
    loss = rec + kl_weight * kl
    return loss, {"loss": loss.detach(), "mse": rec.detach(), "kl": kl.detach()}


def latent_stats(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-channel shift and the overall scale that standardise posterior samples z = mean + std·ε.

    For z drawn from the posterior of every training image, per channel c:
    E[z_c] = avg(mean_c), and Var over all channels of (z - shift) = avg((mean - shift)²) + avg(std²),
    computed exactly from the cached means and standard deviations (no sampling noise).
    Returns ``(shift (C,), scale = 1/std)``.
    """
    mean, std = mean.double(), std.double()
    shift = mean.mean(dim=(0, 2, 3))
    var = ((mean - shift[None, :, None, None]) ** 2).mean() + (std**2).mean()
    return shift.float(), float(1.0 / math.sqrt(float(var)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(vae: VAE, batch: int = 1) -> str:
    """A printed summary: every stage of the encoder and decoder with its output shape and parameters."""
    rows: list[tuple[str, str, int]] = []

    def hook(name):
        def fn(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            rows.append((name, "×".join(map(str, out.shape[1:])), sum(p.numel() for p in module.parameters())))
        return fn

    handles = []
    for part in (vae.encoder, vae.decoder):
        prefix = "encoder" if part is vae.encoder else "decoder"
        for name, module in part.named_children():
            if isinstance(module, nn.Sequential):
                for i, block in enumerate(module):
                    handles.append(block.register_forward_hook(hook(f"{prefix}.{name}.{i} {type(block).__name__}")))
            else:
                handles.append(module.register_forward_hook(hook(f"{prefix}.{name} {type(module).__name__}")))
    try:
        with torch.no_grad():
            mean, _ = vae.encoder(torch.zeros(batch, vae.cfg.in_channels, vae.cfg.image_size, vae.cfg.image_size))
            vae.decoder(mean)
    finally:
        for h in handles:
            h.remove()
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  {'output':>10}  {'params':>9}"]
    lines += [f"{name:<{width}}  {shape:>10}  {n:>9,}" for name, shape, n in rows]
    attn = sum(p.numel() for m in vae.modules() if isinstance(m, ChannelAttention) for p in m.parameters())
    lines.append(f"total: encoder {count_parameters(vae.encoder):,} + decoder {count_parameters(vae.decoder):,} "
                 f"= {count_parameters(vae):,} parameters ({attn:,} in ChannelAttention)")
    return "\n".join(lines)
