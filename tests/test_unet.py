import pytest
import torch

from nbutils.config import DiffusionConfig, UNetConfig, get_config
from nbutils.diffusion import GaussianDiffusion
from nbutils.training import EMA
from nbutils.unet import UNet, count_parameters, timestep_embedding

TINY = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, num_heads=2, cross_attention_dim=16,
                  norm_num_groups=4, dropout=0.0)


def randomized(cfg=TINY, seed=0):
    """A UNet whose zero-initialised output layers are randomised, so every input matters."""
    torch.manual_seed(seed)
    m = UNet(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_output_shape(batch):
    m = randomized()
    x = torch.randn(batch, 4, 7, 7)
    out = m(x, torch.randint(0, 1000, (batch,)), torch.randint(0, 11, (batch,)))
    assert out.shape == x.shape


@pytest.mark.parametrize("size", [7, 8, 5, 14])
def test_odd_and_even_latent_sizes(size):
    m = randomized(UNetConfig(block_out_channels=(16, 16, 32), attention_levels=(False, True, True),
                              layers_per_block=1, num_heads=2, cross_attention_dim=16, norm_num_groups=4))
    x = torch.randn(2, 4, size, size)
    assert m(x, torch.tensor([3, 4]), torch.tensor([1, 2])).shape == x.shape


def test_zero_init_output_starts_at_zero():
    m = UNet(TINY)
    out = m(torch.randn(2, 4, 7, 7), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.abs().max() == 0


def test_timestep_and_class_change_the_output_and_null_works():
    m = randomized()
    x = torch.randn(1, 4, 7, 7)
    t = torch.tensor([500])
    base = m(x, t, torch.tensor([3]))
    assert not torch.allclose(base, m(x, torch.tensor([10]), torch.tensor([3])), atol=1e-5)
    assert not torch.allclose(base, m(x, t, torch.tensor([4])), atol=1e-5)
    null = m(x, t, torch.tensor([m.null_label]))
    assert null.shape == base.shape and not torch.allclose(base, null, atol=1e-5)
    # deterministic in eval mode, and a batch gives the same as its examples one by one
    xs = torch.randn(3, 4, 7, 7)
    ts, ls = torch.tensor([1, 400, 999]), torch.tensor([0, 10, 9])
    batched = m(xs, ts, ls)
    single = torch.cat([m(xs[i : i + 1], ts[i : i + 1], ls[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_class_embedding_starts_as_the_cross_attention_model_and_conditions_every_block():
    """``class_embedding=True`` adds one zero-initialised table: a plain UNet's weights load into it (only the table
    missing) and give the same outputs; once trained, the class moves the output even with cross-attention's
    output projections zeroed, i.e. through the timestep path alone."""
    from dataclasses import replace

    plain = randomized()
    m = UNet(replace(TINY, class_embedding=True)).eval()
    missing, unexpected = m.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["class_emb.weight"] and unexpected == [] and m.class_emb.weight.abs().max() == 0
    x, t, y = torch.randn(3, 4, 7, 7), torch.tensor([5, 500, 900]), torch.tensor([0, 4, 10])
    assert torch.equal(m(x, t, y), plain(x, t, y))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "cross_attn.to_out" in name:
                p.zero_()
        no_xattn = m(x, t, y)
        assert torch.allclose(no_xattn, m(x, t, torch.tensor([1, 2, 3])), atol=1e-6)  # class has no path left
        m.class_emb.weight.normal_(0, 0.5)
        assert not torch.allclose(m(x, t, y), m(x, t, torch.tensor([1, 2, 3])), atol=1e-4)
    assert UNetConfig().class_embedding is False and plain.class_emb is None  # off by default


def test_bad_labels_and_shapes():
    m = UNet(TINY)
    x = torch.randn(2, 4, 7, 7)
    with pytest.raises(ValueError, match=r"labels must be in 0..10 \(10 = unconditional\)"):
        m(x, torch.tensor([1, 2]), torch.tensor([0, 11]))
    with pytest.raises(TypeError, match="integer class indices"):
        m(x, torch.tensor([1, 2]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="one timestep and one label per example"):
        m(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, H, W\)"):
        m(torch.randn(2, 3, 7, 7), torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        UNet(UNetConfig(block_out_channels=(16, 30), num_heads=4, norm_num_groups=2))


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 32)
    assert e.shape == (3, 32)
    assert torch.allclose(e[0, :16], torch.ones(16)) and torch.allclose(e[0, 16:], torch.zeros(16))
    one = torch.tensor(1.0)
    assert torch.allclose(e[1, 0], torch.cos(one)) and torch.allclose(e[1, 16], torch.sin(one))
    assert timestep_embedding(torch.tensor([5]), 33).shape == (1, 33)


def test_preset_sizes():
    counts = {p: count_parameters(UNet(get_config(p).unet)) for p in ("smoke", "cpu", "full")}
    assert counts["smoke"] < counts["cpu"] < counts["full"]


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_latents():
    torch.manual_seed(0)
    m = UNet(TINY)
    d = GaussianDiffusion(DiffusionConfig(cond_drop_prob=0.0))
    x0 = torch.randn(4, 4, 7, 7)
    labels = torch.arange(4)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    def eval_loss():  # on a fixed set of (t, noise), before and after training
        m.eval()
        with torch.no_grad():
            return d.loss(m, x0.repeat(16, 1, 1, 1), labels.repeat(16), torch.Generator().manual_seed(7))[0].item()

    start = eval_loss()
    m.train()
    for _ in range(250):
        loss, _ = d.loss(m, x0.repeat(4, 1, 1, 1), labels.repeat(4), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < start / 4, (start, end)


def test_ema_math():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, decay=0.9, warmup_steps=0)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # t=0: decay = min(0.9, 1/10) = 0.1 → 0.1·0 + 0.9·1
    assert ema.model.weight.item() == pytest.approx(0.9)
    for _ in range(200):
        ema.update(lin)
    assert ema.model.weight.item() == pytest.approx(1.0, abs=1e-6)
    # with decay fixed at its cap: w_ema ← d·w_ema + (1−d)·w
    ema2 = EMA(lin, decay=0.5, warmup_steps=0)
    ema2.num_updates = 10**6
    with torch.no_grad():
        ema2.model.weight.fill_(0.0)
    ema2.update(lin)
    assert ema2.model.weight.item() == pytest.approx(0.5)
    ema3 = EMA(lin, decay=0.99, warmup_steps=5)
    assert ema3.current_decay() == 0.0


def test_the_unet_exports_and_compiles_without_graph_breaks():
    """The label-range check runs eagerly only: torch.export traces the forward pass, torch.compile(fullgraph=True)
    compiles it in one graph, and both compute what the eager model does."""
    from nbutils.config import get_config
    from nbutils.unet import UNet

    unet = UNet(get_config("smoke").unet).eval()
    x, t, y = torch.randn(2, 4, 7, 7), torch.tensor([3, 500]), torch.tensor([1, unet.null_label])
    with torch.no_grad():
        want = unet(x, t, y)
        exported = torch.export.export(unet, (x, t, y))
        torch.testing.assert_close(exported.module()(x, t, y), want)
        compiled = torch.compile(unet, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, t, y), want)
    with pytest.raises(ValueError, match="labels must be in"):
        unet(x, t, torch.tensor([1, 11]))  # eager calls still get the clear error
