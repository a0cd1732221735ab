import json
import re

import pytest
import torch

from nbutils import config as C


def test_presets_exist_and_differ():
    cfgs = {name: C.get_config(name) for name in C.PRESETS}
    assert {c.preset for c in cfgs.values()} == set(C.PRESETS)
    assert cfgs["smoke"].data.train_subset is not None  # smoke is small
    assert cfgs["full"].data.train_subset is None  # full uses all 60,000 images
    # the reference design: 100 epochs, batch 128, Adam 1e-4, 1000 DDPM steps
    full = cfgs["full"]
    assert (full.train_unet.epochs, full.train_unet.batch_size, full.train_unet.lr) == (100, 128, 1e-4)
    assert full.diffusion.num_train_timesteps == 1000


def test_unknown_preset_lists_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="unknown preset 'fast'; valid presets: smoke, cpu, gpu, shipped, full"):
        C.get_config("fast")
    monkeypatch.setenv(C.PRESET_ENV, "laptop")
    with pytest.raises(ValueError, match=r"unknown preset 'laptop' \(from \$NBUTILS_PRESET\)"):
        C.get_config()


def test_preset_from_env_and_auto(monkeypatch):
    monkeypatch.setenv(C.PRESET_ENV, "smoke")
    assert C.get_config().preset == "smoke"
    monkeypatch.setenv(C.PRESET_ENV, " CPU ")
    assert C.get_config().preset == "cpu"
    monkeypatch.delenv(C.PRESET_ENV)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert C.default_preset_name() == "gpu"  # sized for a free-tier GPU; `full` only when asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert C.default_preset_name() == "cpu"


def test_config_round_trips_through_json():
    for name in C.PRESETS:
        cfg = C.get_config(name)
        again = C.Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
        assert isinstance(again.vae.block_out_channels, tuple)


def test_from_dict_names_unknown_fields():
    d = C.get_config("smoke").to_dict()
    d["unet"]["channels"] = 3
    with pytest.raises(ValueError, match=r"config.unet: unknown field\(s\) \['channels'\]"):
        C.Config.from_dict(d)


def test_config_prints_every_section():
    text = str(C.get_config("smoke"))
    for section in ("preset: smoke", "data", "vae", "unet", "diffusion", "train_vae", "train_unet"):
        assert section in text


def test_pick_device(monkeypatch):
    monkeypatch.delenv(C.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(C, "_mps_available", lambda: False)
    assert C.pick_device() == torch.device("cpu")
    monkeypatch.setattr(C, "_mps_available", lambda: True)
    assert C.pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert C.pick_device() == torch.device("cuda")
    monkeypatch.setenv(C.DEVICE_ENV, "cpu")
    assert C.pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        C.pick_device("cuda")


def test_generators_are_independent_and_reproducible():
    a, b = C.make_generator(5), C.make_generator(5)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    g = C.seed_everything(11)
    x = torch.randn(3, generator=g)
    torch.randn(100)  # global RNG use must not disturb our generator
    g2 = C.seed_everything(11)
    assert torch.equal(torch.randn(3, generator=g2), x)
    # and seed_everything seeds the global RNG too (for dropout etc.)
    C.seed_everything(4)
    y1 = torch.rand(2)
    C.seed_everything(4)
    assert torch.equal(torch.rand(2), y1)


def test_project_root_is_this_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("NBUTILS_HOME", raising=False)
    root = C.project_root()
    assert (root / "pyproject.toml").is_file() and (root / "nbutils" / "config.py").is_file()
    monkeypatch.setenv("NBUTILS_HOME", str(tmp_path))
    assert C.runs_dir() == tmp_path / "runs"


def test_override_parses_each_field_type_and_leaves_the_original_alone():
    from nbutils.config import get_config

    base = get_config("smoke")
    cfg = base.override(["unet.dropout=0", "train_unet.lr=2e-4", "unet.block_out_channels=32,64",
                         "train_unet.grad_clip=none", "train_unet.compile=true",
                         "diffusion.beta_schedule=squaredcos_cap_v2", "diffusion.min_snr_gamma=5.0",
                         "train_unet.epochs=3"])
    assert cfg.unet.dropout == 0.0 and isinstance(cfg.unet.dropout, float)
    assert cfg.train_unet.lr == 2e-4 and cfg.unet.block_out_channels == (32, 64)
    assert cfg.train_unet.grad_clip is None and cfg.train_unet.compile is True and cfg.train_unet.epochs == 3
    assert cfg.diffusion.beta_schedule == "squaredcos_cap_v2" and cfg.diffusion.min_snr_gamma == 5.0
    assert base.unet.dropout == 0.1 and base.train_unet.lr == 1e-3  # a copy, not an edit


def test_cli_flags_rebuild_the_config():
    """cli_flags() are the --dataset/--set flags that turn the preset back into this config (what the resume
    hint prints): every field type round-trips; epochs, mixed precision and compile are left to their own flags."""
    from nbutils.config import get_config

    assert get_config("cpu").cli_flags() == []
    cfg = get_config("smoke", dataset="fake").override([
        "unet.dropout=0", "train_unet.lr=2e-4", "unet.block_out_channels=32,64", "train_unet.grad_clip=none",
        "unet.attention_levels=true,false", "diffusion.beta_schedule=squaredcos_cap_v2", "train_unet.epochs=3",
        "train_unet.compile=true"])
    flags = cfg.cli_flags()
    assert flags[:2] == ["--dataset", "fake"] and "train_unet.epochs=3" not in flags
    assert "--set" in flags and "unet.block_out_channels=32,64" in flags and "train_unet.grad_clip=none" in flags
    sets = [flags[i + 1] for i, f in enumerate(flags) if f == "--set"]
    rebuilt = get_config("smoke", dataset=flags[1]).override(sets + ["train_unet.epochs=3", "train_unet.compile=true"])
    assert rebuilt == cfg


@pytest.mark.parametrize("text, message", [
    ("unet.dropout", "expected SECTION.FIELD=VALUE"),
    ("model.dropout=0", "unknown section 'model'; sections: data, vae, unet"),
    ("unet.drop=0", "unet has no field 'drop'; fields: attention_levels"),
    ("unet.layers_per_block=1.5", "cannot read '1.5' as int"),
    ("train_unet.compile=maybe", "cannot read 'maybe' as bool"),
])
def test_override_errors_name_the_problem(text, message):
    from nbutils.config import get_config

    with pytest.raises(ValueError, match=re.escape(message)):
        get_config("smoke").override([text])


def test_compile_mode_is_one_of_torch_compiles():
    from nbutils.config import COMPILE_MODES, TrainConfig

    assert TrainConfig(compile_mode="reduce-overhead").compile_mode in COMPILE_MODES
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="turbo")
