import math

import pytest
import torch

from nbutils import checkpoints as K
from nbutils.config import VAEConfig, get_config
from nbutils.pipeline import load_vae
from nbutils.train_vae import evaluate_vae
from nbutils.vae import VAE, ChannelAttention, kl_divergence, latent_stats, vae_loss

SMALL = VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4)


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return VAE(SMALL).eval()


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_shapes(vae, batch):
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    mean, logvar = vae.encode_dist(x)
    assert mean.shape == logvar.shape == (batch, 4, 7, 7)
    assert vae.encode(x).shape == (batch, 4, 7, 7)
    assert vae.decode(vae.encode(x)).shape == (batch, 1, 28, 28)
    recon, m, lv = vae(x)
    assert recon.shape == x.shape and m.shape == lv.shape == (batch, 4, 7, 7)


def test_latent_channels_configurable():
    v = VAE(VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=2))
    assert v.encode(torch.zeros(2, 1, 28, 28)).shape == (2, 2, 7, 7)


def test_channel_attention_gates_channels():
    ca = ChannelAttention(8, 4)
    x = torch.randn(2, 8, 7, 7)
    y = ca(x)
    ratio = y / x
    # one gate per (image, channel), in (0, 1), constant over space
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-5)
    assert ((ratio > 0) & (ratio < 1)).all()


def test_kl_closed_form():
    mean = torch.tensor([[0.5, -1.0]])
    logvar = torch.tensor([[math.log(2.0), 0.0]])
    # ½(μ² + σ² − log σ² − 1) per dimension
    want = 0.5 * (0.25 + 2 - math.log(2) - 1) + 0.5 * (1 + 1 - 0 - 1)
    assert kl_divergence(mean[..., None, None], logvar[..., None, None]).item() == pytest.approx(want)
    # and against torch.distributions
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    assert kl_divergence(mean, logvar).item() == pytest.approx(torch.distributions.kl_divergence(q, p).sum().item())
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).tolist() == [0, 0, 0]


def test_loss_parts():
    x = torch.zeros(2, 1, 28, 28)
    recon = torch.full_like(x, 0.1)
    mean, logvar = torch.ones(2, 4, 7, 7), torch.zeros(2, 4, 7, 7)
    loss, parts = vae_loss(x, recon, mean, logvar, kl_weight=0.5)
    kl_per_pixel = 0.5 * 196 / 784
    assert parts["mse"] == pytest.approx(0.01)
    assert parts["kl"] == pytest.approx(kl_per_pixel)
    assert loss.item() == pytest.approx(0.01 + 0.5 * kl_per_pixel)


def test_scale_factor_applied_and_inverted(vae):
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    raw, _ = vae.encode_dist(x)
    vae.set_latent_stats(torch.tensor([0.1, -0.2, 0.3, 0.0]), 2.5)
    z = vae.encode(x)
    assert torch.allclose(z, (raw - torch.tensor([0.1, -0.2, 0.3, 0.0])[:, None, None]) * 2.5, atol=1e-6)
    assert torch.allclose(vae.unstandardize(z), raw, atol=1e-6)
    assert torch.allclose(vae.decode(z), vae.decoder(raw), atol=1e-5)


def test_latent_stats_exact():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(500, 4, 7, 7, generator=g) * 3 + torch.tensor([1.0, -2.0, 0.0, 0.5])[:, None, None]
    std = torch.rand(500, 4, 7, 7, generator=g) * 0.5
    shift, scale = latent_stats(mean, std)
    assert torch.allclose(shift, mean.mean(dim=(0, 2, 3)), atol=1e-5)
    # the standardised posterior samples have per-channel mean ≈ 0 and overall std ≈ 1
    z = mean + std * torch.randn(mean.shape, generator=g)
    zs = (z - shift[:, None, None]) * scale
    assert zs.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert zs.std().item() == pytest.approx(1.0, abs=0.01)


def test_bad_input_is_rejected(vae):
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 28, 28\), got \(2, 28, 28\)"):
        vae.encode(torch.zeros(2, 28, 28))
    with pytest.raises(TypeError, match="uint8"):
        vae.encode(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got values in \[0, 255\]"):
        vae.encode(torch.full((1, 1, 28, 28), 255.0).index_fill_(3, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match="expected latents of shape"):
        vae.decode(torch.zeros(1, 4, 8, 8))


def test_checkpoint_round_trip(tmp_path, vae):
    cfg = get_config("smoke")
    vae.set_latent_stats(torch.tensor([0.1, 0.2, 0.3, 0.4]), 1.7)
    path = K.save_model(tmp_path / "vae.safetensors", "vae", vae.state_dict(), cfg, {"latent_stats": True})
    assert (tmp_path / "vae.json").is_file()
    loaded, meta = load_vae(tmp_path, device="cpu", expected=cfg)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded.encode(x), vae.encode(x))
    assert torch.equal(loaded.decode(vae.encode(x)), vae.decode(vae.encode(x)))
    assert meta["extra"]["latent_stats"] is True and loaded.latent_scale.item() == pytest.approx(1.7)
    assert {p.name for p in tmp_path.iterdir()} == {path.name, "vae.json"}  # no temporary files left


def test_mismatched_config_is_a_clear_error(tmp_path, vae):
    cfg = get_config("smoke")
    K.save_model(tmp_path / "vae.safetensors", "vae", vae.state_dict(), cfg)
    other = cfg.replace(vae=VAEConfig(block_out_channels=(8, 16, 32), norm_num_groups=4))
    with pytest.raises(K.CheckpointError, match=r"vae.block_out_channels: checkpoint \[8, 16, 16\] vs expected"):
        load_vae(tmp_path, device="cpu", expected=other)


def test_truncated_and_foreign_files(tmp_path, vae):
    cfg = get_config("smoke")
    path = K.save_model(tmp_path / "vae.safetensors", "vae", vae.state_dict(), cfg)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(K.CheckpointError, match="not a readable checkpoint"):
        load_vae(path, device="cpu")
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(K.CheckpointError, match="not a readable checkpoint"):
        load_vae(path, device="cpu")
    K.save_model(path, "unet", vae.state_dict(), cfg)
    with pytest.raises(K.CheckpointError, match="holds a 'unet' model, expected 'vae'"):
        load_vae(path, device="cpu")
    with pytest.raises(K.CheckpointError, match="no checkpoint at"):
        load_vae(tmp_path / "missing.safetensors", device="cpu")


def test_evaluate_vae_reports_metrics(vae):
    x = torch.rand(10, 1, 28, 28) * 2 - 1
    m = evaluate_vae(vae, x)
    assert set(m) == {"mse", "psnr", "ssim"} and 0 < m["mse"] < 1 and m["ssim"] < 1


def test_shipped_vae_round_trip_quality():
    """The shipped weights reconstruct real test images well (31.3 dB / 0.947 on all 10,000)."""
    from nbutils import data
    from nbutils.config import checkpoints_dir
    from nbutils.metrics import psnr
    from nbutils.metrics import ssim as ssim_fn

    shipped, meta = load_vae(checkpoints_dir(), device="cpu")
    assert meta["extra"]["latent_stats"] is True
    images, _ = data.load_split("test", subset=1000)
    with torch.no_grad():
        recon = shipped.decode(shipped.encode(data.to_model_range(images)))
    assert psnr(images, recon).mean().item() > 30.5
    assert ssim_fn(images, recon).mean().item() > 0.94
