"""The pipeline: loading the shipped models, the sampling recipe, classifier-free guidance and ``sample()``."""

import math

import numpy as np
import pytest
import torch

from nbutils import pipeline as P
from nbutils import samplers as Sm
from nbutils.config import DiffusionConfig
from nbutils.pipeline import Pipeline, SamplingRecipe
from nbutils.schedules import NoiseSchedule
from tests.test_samplers import MU, GaussianOracle, S

_RUN_KEYS = ("batch_size", "progress", "return_trajectory", "trajectory_points", "init_latents", "strength")


def _sample(unet, vae, n, classes, generator=None, diffusion=None, **kw):
    """``sample()`` on a pipeline of these parts; recipe fields and run options as keywords."""
    run = {k: kw.pop(k) for k in _RUN_KEYS if k in kw}
    pipe = Pipeline(vae, unet, diffusion or DiffusionConfig())
    return P.sample(pipe, n, classes, SamplingRecipe(**kw), generator, **run)


def test_guidance_endpoints():
    class Linear(torch.nn.Module):
        def forward(self, x, t, labels):
            return x * 0 + labels.reshape(-1, 1, 1, 1).float()

    m = Linear()
    x = torch.zeros(3, 4, 7, 7)
    labels = torch.tensor([1, 2, 3])
    assert torch.equal(P.guided_output(m, x, 5, labels, 1.0, 10), m(x, None, labels))
    assert torch.equal(P.guided_output(m, x, 5, labels, 0.0, 10), torch.full_like(x, 10.0))
    w = 3.0
    assert torch.allclose(P.guided_output(m, x, 5, labels, w, 10),
                          10 + w * (labels.reshape(-1, 1, 1, 1).float() - 10) + x)


def test_shipped_models_sample_deterministically():
    """The shipped UNet + VAE load together (digest checked) with the recipe they were released with, and a seed
    fixes the output."""
    from nbutils.config import checkpoints_dir, make_generator

    pipe = P.load_pipeline(checkpoints_dir(), device="cpu")
    assert pipe.meta["extra"]["stored_dtype"] == "torch.float16" and pipe.recipe == P.SHIPPED_RECIPE
    assert pipe.diffusion.prediction_type == "v_prediction"
    unet, vae = pipe.unet, pipe.vae
    runs = [_sample(unet, vae, 4, [7, 7, 0, 9], guidance=3.0, sampler="dpm", steps=4, diffusion=pipe.diffusion,
                    generator=make_generator(1)) for _ in range(2)]
    assert runs[0].images.shape == (4, 1, 28, 28) and runs[0].labels.tolist() == [7, 7, 0, 9]
    assert torch.equal(runs[0].images, runs[1].images)
    # no autograd graph: with one, memory grows with every step (a 1000-step DDPM run exhausts 24 GiB)
    assert not any(t.requires_grad for t in (runs[0].images, runs[0].latents))
    other = _sample(unet, vae, 4, [7, 7, 0, 9], guidance=3.0, sampler="dpm", steps=4, diffusion=pipe.diffusion,
                    generator=make_generator(2))
    assert not torch.equal(runs[0].images, other.images)


def test_shipped_models_draw_the_requested_classes():
    """The shipped UNet, VAE and classifier agree: guided samples are recognised as the class asked for.
    (A broken sampler, a swapped VAE or mislabelled class tokens would drop this to ~10%.)"""
    from nbutils.classifier import load_classifier, predict
    from nbutils.config import checkpoints_dir, make_generator

    pipe = P.load_pipeline(checkpoints_dir(), device="cpu")
    clf, _ = load_classifier(checkpoints_dir(), device="cpu")
    wanted = torch.arange(100) % 10
    out = P.sample(pipe, 100, wanted, generator=make_generator(0))  # the recipe stored with the model
    _, logits = predict(clf, out.images)
    assert (logits.argmax(1) == wanted).float().mean() >= 0.9


_OWN = SamplingRecipe(guidance=1.5)


def _recipe_of(argv: list[str], own: SamplingRecipe = _OWN) -> SamplingRecipe:
    """The sampling recipe a `python -m nbutils sample …` command line asks for, read by the CLI's own parser, for
    a checkpoint that carries the recipe ``own``."""
    from nbutils.cli import build_parser, sampling_recipe

    return sampling_recipe(build_parser().parse_args(argv), own)


def test_cli_recipe_flag_and_overrides():
    """Without ``--recipe`` the checkpoint's own recipe holds, ``--recipe shipped`` is ``SHIPPED_RECIPE``,
    ``--recipe default`` the dataclass defaults, and each flag given explicitly overrides any of them."""
    shipped = P.SHIPPED_RECIPE
    assert _recipe_of(["sample", "--out", "s.png"]) == SamplingRecipe(guidance=1.5)
    assert _recipe_of(["sample", "--recipe", "shipped", "--out", "s.png"]) == shipped
    assert _recipe_of(["sample", "--recipe", "default", "--out", "s.png"]) == SamplingRecipe()
    overridden = _recipe_of(["sample", "--recipe", "shipped", "--guidance", "2", "--out", "s.png"])
    assert overridden == shipped.replace(guidance=2.0)
    assert shipped.timesteps is not None  # a listed recipe: --steps / --spacing replace its list whole
    assert _recipe_of(["sample", "--recipe", "shipped", "--spacing", "trailing", "--steps", "20", "--out", "s.png"]) \
        == shipped.replace(timesteps=None, timestep_spacing="trailing", steps=20)
    assert _recipe_of(["sample", "--recipe", "shipped", "--steps", "12", "--out", "s.png"]) \
        == shipped.replace(timesteps=None, timestep_spacing="logsnr", steps=12)  # its list thins log-SNR steps
    listed = SamplingRecipe(timesteps=(900, 500, 0), guidance=2.0)  # another listed recipe: the sampler's spacing
    assert _recipe_of(["sample", "--steps", "12", "--out", "s.png"], listed) == SamplingRecipe(steps=12, guidance=2.0)
    assert _recipe_of(["sample", "--recipe", "shipped", "--timesteps", "900,500,0", "--out", "s.png"]) \
        == shipped.replace(timesteps=(900, 500, 0))
    assert _recipe_of(["sample", "--guidance", "0", "--out", "s.png"]).guidance == 0.0  # 0 is a value, not "unset"


def test_demo_uses_the_shipped_recipe():
    """`make demo` samples the shipped checkpoint with its own (shipped) recipe."""
    import shlex

    from nbutils.config import checkpoints_dir, project_root

    text = (project_root() / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "nbutils sample" in ln and "runs/demo/samples.png" in ln)
    argv = shlex.split(line.split("-m nbutils", 1)[1])
    own = P.load_pipeline(checkpoints_dir(), device="cpu").recipe
    assert _recipe_of(argv, own) == P.SHIPPED_RECIPE


def test_make_demo_draws_the_readme_picture(tmp_path):
    """`make demo`'s sample command, run as the Makefile writes it, draws docs/img/samples.png again: pixel for pixel
    with the versions in constraints.txt on this kind of CPU, and within rounding elsewhere (another CPU's vector
    instructions may round a few values differently)."""
    import shlex

    from PIL import Image

    from nbutils import cli
    from nbutils.config import project_root

    text = (project_root() / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "nbutils sample" in ln and "runs/demo/samples.png" in ln)
    argv = [str(tmp_path / "demo.png") if a == "runs/demo/samples.png" else a
            for a in shlex.split(line.split("-m nbutils", 1)[1])]
    assert cli.main([*argv, "--no-progress"]) == 0
    drawn, readme = (np.asarray(Image.open(f), dtype=np.int16) for f in (tmp_path / "demo.png",
                                                                          project_root() / "docs/img/samples.png"))
    assert drawn.shape == readme.shape
    differ = np.abs(drawn - readme)
    assert differ.mean() < 0.5 and (differ > 0).mean() < 0.02, (differ.mean(), (differ > 0).mean())


def test_recipe_is_validated_once_and_round_trips():
    for bad, message in [({"sampler": "euler"}, "unknown sampler"), ({"steps": 0}, "steps"),
                         ({"guidance": float("nan")}, "finite"), ({"guidance": float("inf")}, "finite"),
                         ({"guidance": -1.0}, "from 0 to 100"), ({"guidance": 1e308}, "from 0 to 100"),
                         ({"eta": 1.5}, "from 0"), ({"eta": float("nan")}, "eta"),
                         ({"guidance_interval": (500, 100)}, "guidance_interval"), ({"precision": "fp16"}, "precision"),
                         ({"timestep_spacing": "cosine"}, "timestep_spacing"),
                         ({"steps": 10, "guided_steps": 5}, "guidance_interval=\\(0, hi\\)"),
                         ({"guidance_interval": (0, 400), "guided_steps": 5}, "needs steps"),
                         ({"timesteps": (500, 500, 0)}, "strictly decreasing"), ({"timesteps": ()}, "strictly"),
                         ({"timesteps": (5, -1)}, "≥ 0"), ({"timesteps": (10, 5), "steps": 3}, "disagree"),
                         ({"timesteps": (10, 5), "timestep_spacing": "logsnr"}, "leave")]:
        with pytest.raises(ValueError, match=message):
            SamplingRecipe(**bad)
    r = P.SHIPPED_RECIPE.replace(timesteps=None, timestep_spacing="logsnr", guidance_interval=(0, 600), steps=16)
    r = r.replace(guided_steps=12)
    assert SamplingRecipe.from_dict(r.to_dict()) == r
    assert "timesteps" not in r.to_dict()  # recipes without explicit timesteps are stored as before the field
    listed = SamplingRecipe(timesteps=[900, 500, 100])
    assert listed.timesteps == (900, 500, 100) and SamplingRecipe.from_dict(listed.to_dict()) == listed
    with pytest.raises(ValueError, match="unknown sampling recipe fields: colour"):
        SamplingRecipe.from_dict({"colour": "red"})


class _Recorder(torch.nn.Module):
    """A stand-in UNet whose output is the class-token value; records the batch size of each call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.null_label = 10
        self.cfg = type("Cfg", (), {"latent_channels": 4})()
        self.calls = []

    def forward(self, x, t, labels):
        self.calls.append((int(t[0]), x.shape[0]))
        return 0.01 * x + 0.1 * (labels.reshape(-1, 1, 1, 1).float() - 5) + self.w


class _IdentityVAE:
    latent_shape = (4, 7, 7)

    def decode(self, z):
        return z[:, :1]


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_guidance_interval_guides_only_inside_it(sampler):
    """Inside [lo, hi] one doubled (cond + uncond) pass per step, outside one plain conditional pass; an
    interval covering every timestep is plain guidance, one covering none is w = 1, bit for bit."""
    from nbutils.config import make_generator

    def run(**kw):
        m = _Recorder()
        out = _sample(m, _IdentityVAE(), 6, [1, 2, 3, 4, 5, 6], sampler=sampler, steps=10,
                        generator=make_generator(0), **kw)
        return out.latents, m.calls

    plain, plain_calls = run(guidance=3.0)
    everywhere, _ = run(guidance=3.0, guidance_interval=(0, 999))
    nowhere, nowhere_calls = run(guidance=3.0, guidance_interval=(2000, 3000))
    w1, _ = run(guidance=1.0)
    assert torch.equal(plain, everywhere) and torch.equal(nowhere, w1)
    assert {b for _, b in plain_calls} == {12} and {b for _, b in nowhere_calls} == {6}
    part, calls = run(guidance=3.0, guidance_interval=(0, 400))
    assert [b for t, b in calls] == [12 if t <= 400 else 6 for t, _ in calls]
    assert any(t > 400 for t, _ in calls) and any(t <= 400 for t, _ in calls)
    assert not torch.equal(part, plain) and not torch.equal(part, w1)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_listed_timesteps_are_visited_exactly_and_equal_the_spacing_they_list(sampler):
    from nbutils.config import make_generator

    def run(**kw):
        m = _Recorder()
        out = _sample(m, _IdentityVAE(), 4, [1, 2, 3, 4], sampler=sampler, generator=make_generator(0),
                      guidance=2.0, guidance_interval=(0, 600), diffusion=DiffusionConfig(
                          beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), **kw)
        return out.latents, [t for t, _ in m.calls]

    spaced, visited = run(steps=12, timestep_spacing="logsnr")
    listed, again = run(timesteps=tuple(visited))
    assert torch.equal(spaced, listed) and again == visited
    _, chosen = run(timesteps=(950, 700, 300, 40, 0))
    assert chosen == [950, 700, 300, 40, 0]


def test_bad_guidance_interval_and_precision():
    m = _Recorder()
    with pytest.raises(ValueError, match="guidance_interval must be"):
        _sample(m, _IdentityVAE(), 2, 1, guidance_interval=(500, 100))
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, auto"):
        _sample(m, _IdentityVAE(), 2, 1, precision="fp16")


def test_bf16_sampling_is_close_to_fp32():
    """bf16 autocast changes the UNet's arithmetic, not the result: shipped model, same seed, same classes."""
    from nbutils.config import bf16_supported, checkpoints_dir, make_generator

    unet, vae, _ = P.load_models(checkpoints_dir(), device="cpu")
    kw = dict(guidance=3.0, sampler="dpm", steps=10, guidance_interval=(0, 400),
              diffusion=DiffusionConfig(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"))
    ref = _sample(unet, vae, 8, list(range(8)), generator=make_generator(0), **kw)
    if not bf16_supported("cpu"):
        with pytest.raises(ValueError, match="needs native bf16 support"):
            _sample(unet, vae, 8, list(range(8)), generator=make_generator(0), precision="bf16", **kw)
        return
    low = _sample(unet, vae, 8, list(range(8)), generator=make_generator(0), precision="bf16", **kw)
    auto = _sample(unet, vae, 8, list(range(8)), generator=make_generator(0), precision="auto", **kw)
    assert low.images.dtype == torch.float32 and torch.equal(auto.images, low.images)
    assert (low.images - ref.images).abs().mean() < 0.05  # pixels in [-1, 1]
    assert not torch.equal(low.images, ref.images)


def test_cli_guidance_interval_and_auto_precision(tmp_path, capsys):
    import json

    import numpy as np

    from nbutils import cli
    from nbutils.config import bf16_supported, checkpoints_dir

    out = tmp_path / "s.npz"
    assert cli.main(["sample", "--checkpoint", str(checkpoints_dir()), "--n", "10", "--steps", "3", "--guidance", "3.5",
                     "--guidance-interval", "0,400", "--precision", "auto", "--out", str(out), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["guidance_interval"] == [0, 400]
    assert report["precision"] == ("bf16" if bf16_supported("cpu") else "fp32")
    with np.load(out) as f:
        assert f["images"].shape == (10, 28, 28) and f["images"].dtype == np.uint8
    assert cli.main(["sample", "--checkpoint", str(checkpoints_dir()), "--n", "4", "--steps", "4",
                     "--guided-steps", "3", "--guidance-interval", "0,400", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["guided_steps"] == 3
    for extra, message in [(["--steps", "4", "--guided-steps", "3"], "--guidance-interval=(0, hi)"),
                           (["--steps", "4", "--guided-steps", "3", "--guidance-interval", "100,400"], "(0, hi)"),
                           (["--steps", "4", "--guided-steps", "4", "--guidance-interval", "0,400"],
                            "less than --steps (4)"),
                           (["--recipe", "default", "--guided-steps", "4", "--guidance-interval", "0,400"],
                            "--guided-steps needs --steps (the total"),
                           (["--recipe", "shipped", "--guided-steps", "12"], "--guidance-interval=(0, hi)"),  # 30,600
                           (["--recipe", "shipped", "--guided-steps", "12", "--guidance-interval", "0,600"],
                            "--guided-steps needs --steps"),  # the shipped recipe lists its timesteps
                           (["--recipe", "shipped", "--steps", "20", "--guided-steps", "12", "--guidance-interval",
                             "0,600", "--spacing", "leading"], "trailing or logsnr, got 'leading'"),
                           (["--recipe", "shipped", "--steps", "10", "--guided-steps", "12", "--guidance-interval",
                             "0,600"], "got 12")]:
        assert cli.main(["sample", "--checkpoint", str(checkpoints_dir()), "--n", "4", *extra, "--out", str(out)]) != 0
        assert message in capsys.readouterr().err


class _OracleUNet(GaussianOracle):
    """The Gaussian oracle dressed as a UNet for :func:`sample` (which asks for a parameter's device)."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.p = torch.nn.Parameter(torch.zeros(()))


def test_init_latents_one_step_is_the_posterior_mean():
    """strength 1/20 of 20 trailing DDIM steps = noise the latents to t = 49 with the sampler's first draw,
    then one step to ᾱ = 1, which returns x̂_0 = E[x_0 | x_t]; for Gaussian data
    μ + √ᾱ·s²·(x_t − √ᾱ·μ) / (ᾱ·s² + 1 − ᾱ)."""
    from nbutils.config import make_generator

    sch = NoiseSchedule()
    z = torch.randn(5, 4, 7, 7, generator=torch.Generator().manual_seed(3))
    out = _sample(_OracleUNet(sch), _IdentityVAE(), 5, 1, guidance=1.0, sampler="ddim", steps=20,
                    generator=make_generator(0), init_latents=z, strength=0.05)
    t = int(Sm.spaced_timesteps(1000, 20, "trailing")[-1])
    a = float(sch.alphas_cumprod[t])
    eps = torch.randn(z.shape, generator=make_generator(0))
    x_t = math.sqrt(a) * z + math.sqrt(1 - a) * eps
    expected = MU + math.sqrt(a) * S**2 * (x_t - math.sqrt(a) * MU) / (a * S**2 + 1 - a)
    assert t == 49 and torch.allclose(out.latents, expected, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_strength_runs_only_the_last_steps(sampler):
    from nbutils.config import make_generator

    m = _Recorder()
    z = torch.zeros(3, 4, 7, 7)
    _sample(m, _IdentityVAE(), 3, 1, guidance=1.0, sampler=sampler, steps=10, generator=make_generator(0),
              init_latents=z, strength=0.3)
    s = Sm.make_sampler(sampler, NoiseSchedule(), steps=10)
    assert [t for t, _ in m.calls] == s.timesteps[-3:].tolist()


def test_bad_init_latents_and_strength():
    m = _Recorder()
    with pytest.raises(ValueError, match="strength needs init_latents"):
        _sample(m, _IdentityVAE(), 2, 1, strength=0.5)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        _sample(m, _IdentityVAE(), 2, 1, init_latents=torch.zeros(2, 4, 7, 7), strength=0.0)
    with pytest.raises(ValueError, match=r"init_latents must have shape \(2, 4, 7, 7\), got \(2, 4, 8, 8\)"):
        _sample(m, _IdentityVAE(), 2, 1, init_latents=torch.zeros(2, 4, 8, 8), strength=0.5)



def test_guided_steps_put_the_steps_inside_the_interval():
    """``sample(…, guided_steps=B)`` visits exactly split_timesteps(T, steps − B, B, hi), guides (doubled passes)
    exactly the last B, and with the even split's B it is the plain schedule bit for bit."""
    from nbutils.config import make_generator

    def run(**kw):
        m = _Recorder()
        out = _sample(m, _IdentityVAE(), 6, [1, 2, 3, 4, 5, 6], sampler="dpm", generator=make_generator(0),
                        guidance=3.0, guidance_interval=(0, 400), **kw)
        return out.latents, m.calls

    latents, calls = run(steps=16, guided_steps=12)
    assert [t for t, _ in calls] == Sm.split_timesteps(1000, 4, 12, 400).tolist()
    assert [b for _, b in calls] == [6] * 4 + [12] * 12
    _, calls = run(steps=16, guided_steps=12, timestep_spacing="logsnr")
    ac = NoiseSchedule().alphas_cumprod
    assert [t for t, _ in calls] == Sm.split_timesteps(1000, 4, 12, 400, "logsnr", ac).tolist()
    assert [b for _, b in calls] == [6] * 4 + [12] * 12
    assert torch.equal(run(steps=20, guided_steps=8)[0], run(steps=20)[0])
    assert not torch.equal(run(steps=20, guided_steps=12)[0], run(steps=20)[0])
    with pytest.raises(ValueError, match="guidance_interval"):
        _sample(_Recorder(), _IdentityVAE(), 2, 1, steps=10, guided_steps=5)
    with pytest.raises(ValueError, match="guidance_interval"):
        _sample(_Recorder(), _IdentityVAE(), 2, 1, steps=10, guided_steps=5, guidance_interval=(100, 400))
    for steps, guided in [(10, 10), (None, 5), (10, 0)]:
        with pytest.raises(ValueError, match="guided_steps"):
            _sample(_Recorder(), _IdentityVAE(), 2, 1, steps=steps, guided_steps=guided, guidance_interval=(0, 400))


def test_sample_outputs_other_tools_read(tmp_path, capsys):
    """A folder of 8-bit PNGs with a manifest (clean-fid, torch-fidelity), ADM-style arr_0/arr_1 keys beside
    images/labels, and an 8-bit grid with class names on its rows."""
    import numpy as np
    from PIL import Image

    from nbutils import cli
    from nbutils.config import checkpoints_dir

    common = ["sample", "--checkpoint", str(checkpoints_dir()), "--steps", "2", "--seed", "3", "--no-progress"]
    assert cli.main([*common, "--n", "10", "--class", "all", "--out", str(tmp_path / "pngs") + "/"]) == 0
    assert cli.main([*common, "--n", "10", "--class", "all", "--out", str(tmp_path / "S.NPZ")]) == 0
    assert cli.main([*common, "--n", "20", "--class", "all", "--out", str(tmp_path / "grid.png")]) == 0
    files = sorted((tmp_path / "pngs").glob("*.png"))
    manifest = (tmp_path / "pngs" / "manifest.csv").read_text().splitlines()
    assert len(files) == 10 and manifest[0] == "file,label,class" and manifest[1] == "000000.png,0,T-shirt/top"
    with np.load(tmp_path / "S.NPZ") as f:  # exactly the name asked for
        assert np.array_equal(f["arr_0"], f["images"]) and np.array_equal(f["arr_1"], f["labels"])
        for i, path in enumerate(files):
            assert np.array_equal(np.asarray(Image.open(path)), f["images"][i])
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == "L" and grid.width > 2 * (10 * 30)  # the class names' margin beside 10 images per row
    assert cli.main([*common, "--n", "2", "--out", str(tmp_path / "pngs") + "/"]) == 1  # not empty: not overwritten
    assert "exists and is not empty" in capsys.readouterr().err
    (tmp_path / "pngs.partial.npz").write_bytes(b"")  # a run cut off while writing its PNGs: the way on is said
    assert cli.main([*common, "--n", "2", "--out", str(tmp_path / "pngs") + "/"]) == 1
    assert "empty it and run the same command again to continue from" in capsys.readouterr().err


def test_a_loaded_pipeline_runs_channels_last_on_the_cpu_with_the_same_results():
    """load_pipeline stores the models' convolution weights NHWC on the CPU (faster oneDNN kernels); samples and
    the weights' digest are those of the default layout up to float rounding."""
    from nbutils.checkpoints import tensor_digest
    from nbutils.config import checkpoints_dir

    pipe = P.load_pipeline(checkpoints_dir(), device="cpu")
    for model in (pipe.unet, pipe.vae):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain_unet, _ = P.load_unet(checkpoints_dir(), device="cpu")  # loaded alone: the default layout
    assert not plain_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert tensor_digest(pipe.unet.state_dict()) == tensor_digest(plain_unet.state_dict())
    recipe = pipe.recipe.replace(timesteps=None, steps=6)
    fast = P.sample(pipe, 20, "all", recipe, torch.Generator().manual_seed(0))
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)
    plain = P.sample(pipe, 20, "all", recipe, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast.latents, plain.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.images, plain.images, atol=1e-4, rtol=1e-4)


def test_an_interrupted_sample_command_continues_where_it_stopped_with_the_same_result(tmp_path, capsys, monkeypatch):
    """`sample` keeps finished batches and the generator state in OUT.partial.npz; the same command run again
    continues from there and writes what an uninterrupted run writes. Other settings, a damaged file and a second
    process are refused with one line each."""
    import json

    from filelock import FileLock

    from nbutils import cli
    from nbutils.config import checkpoints_dir

    common = ["sample", "--checkpoint", str(checkpoints_dir()), "--steps", "2", "--n", "6", "--batch-size", "2",
              "--sampler", "ddpm", "--no-progress"]  # DDPM: the generator also draws noise at every step
    assert cli.main([*common, "--out", str(tmp_path / "whole.npz")]) == 0
    out, partial = tmp_path / "cut.npz", tmp_path / "cut.npz.partial.npz"
    real_sample, calls = cli.sample, []

    def cut_after_two_batches(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(cli, "sample", cut_after_two_batches)
    assert cli.main([*common, "--out", str(out)]) == 130
    assert "4 of 6 images are kept in" in capsys.readouterr().err and not out.exists()
    with np.load(partial) as f:
        assert f["images"].shape == (4, 28, 28)
    kept = partial.read_bytes()
    with np.load(partial) as f:
        kept_settings = str(f["settings"])
    assert cli.main([*common, "--seed", "1", "--out", str(out)]) == 1  # another run's settings: not mixed in
    assert "other settings (seed 0 there, 1 here)" in capsys.readouterr().err and partial.read_bytes() == kept
    with FileLock(tmp_path / ".cut.npz.lock"):
        assert cli.main([*common, "--out", str(out)]) == 1
    assert "another `sample` is writing" in capsys.readouterr().err
    assert cli.main([*common, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and json.loads(captured.out.splitlines()[-1])["resumed_at"] == 4
    assert len(calls) == 4 and not partial.exists() and not list(tmp_path.glob(".*.tmp"))
    with np.load(tmp_path / "whole.npz") as a, np.load(out) as b:
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    partial.write_bytes(b"not a zip")
    assert cli.main([*common, "--out", str(out)]) == 1
    assert "not a readable partial run" in capsys.readouterr().err
    with np.load(tmp_path / "whole.npz") as f:  # a generator state cut short: one line, not a traceback
        settings = json.loads(kept_settings)
        np.savez(partial, images=f["images"][:2], generator=np.zeros(8, np.uint8), settings=np.array(
            json.dumps(settings, sort_keys=True)))
    assert cli.main([*common, "--out", str(out)]) == 1
    assert "is damaged" in capsys.readouterr().err
