"""The interactive sampler: controls, the Generate button, and the fallback without widgets."""

import sys

import matplotlib
import pytest
import torch

from nbutils import widgets
from nbutils.config import get_config
from nbutils.pipeline import Pipeline
from nbutils.unet import UNet
from nbutils.vae import VAE

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def models():
    cfg = get_config("smoke")
    torch.manual_seed(0)
    vae = VAE(cfg.vae).eval()
    vae.set_latent_stats(torch.zeros(cfg.vae.latent_channels), 1.0)
    return Pipeline(vae, UNet(cfg.unet).eval(), cfg.diffusion)


def test_show_samples_draws_requested_classes(models):
    pipe = models
    res = widgets.show_samples(pipe, class_name="sneaker", n=3, steps=2, sampler="ddim")
    assert res.labels.tolist() == [7, 7, 7] and res.images.shape == (3, 1, 28, 28)
    res = widgets.show_samples(pipe, class_name="all", n=12, steps=1)
    assert res.labels.tolist() == [i % 10 for i in range(12)]
    with pytest.raises(ValueError, match="unknown class"):
        widgets.show_samples(pipe, class_name="sock", n=1, steps=1)


def test_falls_back_to_a_plain_call_without_a_front_end(models, capsys):
    pipe = models
    res = widgets.sampler_widget(pipe, n=4, steps=1)  # pytest has no notebook kernel
    assert "showing one grid with the default settings" in capsys.readouterr().out
    assert res.images.shape == (4, 1, 28, 28)


def test_falls_back_without_ipywidgets(models, monkeypatch, capsys):
    pipe = models
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets → ImportError
    widgets.sampler_widget(pipe, n=2, steps=1)
    assert "ipywidgets is not installed" in capsys.readouterr().out


def test_widget_controls_and_generate(models, monkeypatch):
    pytest.importorskip("ipywidgets")
    pipe = models
    monkeypatch.setattr(widgets, "_frontend_available", lambda: True)
    box = widgets.sampler_widget(pipe, n=2, steps=1, sampler="ddim", class_name="bag")
    descriptions = {w.description for row in box.children[:2] for w in row.children}
    assert descriptions == {"class", "sampler", "seed", "guidance", "steps"}
    cls = box.children[0].children[0]
    assert cls.value == "Bag" and "Ankle boot" in cls.options
    box.generate()  # the button's handler runs without error
