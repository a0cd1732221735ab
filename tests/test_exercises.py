"""The course kit: every check fails on its stub, on plausible wrong answers and on code that delegates the work to
the library, passes on the answer key and on an equivalent rewrite; the stored cases match the answer key; the
notebooks carry the stubs; the package holds no answers; the grader scores submissions in fresh processes."""

import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nbutils import exercises as E
from nbutils import grading

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = {"math": math, "np": np, "torch": torch}
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(ROOT / "instructor"))
import answers  # noqa: E402 - the instructor's folder is not a package
import make_fixtures  # noqa: E402

CASE_KEYS = [k for k, ex in E.EXERCISES.items() if ex.task is None]  # checked on stored cases
TASK_KEYS = [k for k, ex in E.EXERCISES.items() if ex.task is not None]  # checked by a measured result

# Plausible student code: (wrong answers, a correct rewrite that differs from the solution).
ATTEMPTS = {
    "reparameterize": (
        ["return mean + torch.exp(logvar) * eps",
         "return mean + 0.5 * torch.exp(logvar) * eps",
         "return torch.exp(0.5 * logvar) * eps"],
        "return mean + eps * torch.sqrt(torch.exp(logvar))",
    ),
    "kl_divergence": (
        ["return -0.5 * torch.sum(1 + logvar - mean**2 - logvar.exp())",
         "return -0.5 * torch.mean(1 + logvar - mean**2 - logvar.exp(), dim=(1, 2, 3))",
         "return 0.5 * torch.sum(mean**2 + logvar.exp() + logvar - 1, dim=(1, 2, 3))"],
        "return -0.5 * torch.sum(1 + logvar - mean.pow(2) - logvar.exp(), dim=(1, 2, 3))",
    ),
    "latent_stats": (
        ["shift = mean.mean(dim=(0, 2, 3))\n    return shift, float(1 / (mean - shift[None, :, None, None]).std())",
         "shift = mean.mean(dim=(0, 2, 3))\n"
         "    return shift, float((((mean - shift[None, :, None, None]) ** 2).mean() + (std**2).mean()).sqrt())"],
        "shift = mean.mean(dim=(0, 2, 3))\n"
        "    var = (mean**2).mean() - (shift**2).mean() + (std**2).mean()\n    return shift, 1 / math.sqrt(var)",
    ),
    "slerp": (
        ["return (1 - t) * a + t * b",
         "a_n, b_n = a / a.norm(), b / b.norm()\n    omega = torch.arccos((a_n * b_n).sum())\n"
         "    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)"],
        "af, bf = a.flatten(1), b.flatten(1)\n"
        "    cos = torch.nn.functional.cosine_similarity(af, bf, dim=1)\n"
        "    omega = torch.atan2(torch.sqrt(1 - cos**2), cos)[:, None]\n"
        "    w_a, w_b = torch.sin((1 - t) * omega) / torch.sin(omega), torch.sin(t * omega) / torch.sin(omega)\n"
        "    return (w_a * af + w_b * bf).view_as(a)",
    ),
    "add_noise": (
        ["a = alphas_cumprod[t].reshape(-1, 1, 1, 1)\n    return a * x0 + (1 - a) * noise",
         "a = alphas_cumprod[t - 1].reshape(-1, 1, 1, 1)\n    return a.sqrt() * x0 + (1 - a).sqrt() * noise",
         "a = alphas_cumprod[t].reshape(-1, 1, 1, 1)\n    return a.sqrt() * x0 + (1 - a.sqrt()) * noise"],
        "s = torch.sqrt(alphas_cumprod)[t][:, None, None, None]\n"
        "    return s * x0 + torch.sqrt(1 - s**2) * noise",
    ),
    "cosine_alphas_cumprod": (
        ["t = torch.arange(T, dtype=torch.float64) / T\n"
         "    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2\n    return f / f[0]",
         "t = torch.arange(1, T + 1, dtype=torch.float64) / T\n"
         "    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2"],
        "f = torch.cos((torch.linspace(0, 1, T + 1, dtype=torch.float64) + s) / (1 + s) * math.pi / 2) ** 2\n"
        "    return f[1:] / f[0]",
    ),
    "timestep_embedding": (
        ["half = dim // 2\n    freqs = 10000 ** (-torch.arange(half) / half)\n"
         "    args = t[:, None].float() * freqs[None]\n"
         "    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)",
         "half = dim // 2\n    freqs = 10000 ** (-torch.arange(half) / dim)\n"
         "    args = t[:, None].float() * freqs[None]\n"
         "    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)"],
        "half = dim // 2\n    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)\n"
        "    args = t[:, None].double() * freqs[None]\n    return torch.cat([args.cos(), args.sin()], dim=1).float()",
    ),
    "attention": (
        ["return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v",
         "return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-2) @ v",
         "return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1], dim=-1) @ v"],
        "scores = torch.einsum('bhld,bhsd->bhls', q, k) * q.shape[-1] ** -0.5\n"
        "    return torch.einsum('bhls,bhsd->bhld', scores.softmax(-1), v)",
    ),
    "guided_epsilon": (
        ["return eps_uncond + w * (eps_uncond - eps_cond)",
         "return eps_cond + w * (eps_cond - eps_uncond)",
         "return w * eps_cond + eps_uncond"],
        "return w * eps_cond + (1 - w) * eps_uncond",
    ),
    "ddim_step": (
        ["x0 = (x_t - math.sqrt(1 - alpha_bar_prev) * eps) / math.sqrt(alpha_bar_prev)\n"
         "    return math.sqrt(alpha_bar_t) * x0 + math.sqrt(1 - alpha_bar_t) * eps",
         "x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)\n"
         "    return math.sqrt(alpha_bar_prev) * x0 + (1 - alpha_bar_prev) * eps",
         "x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / alpha_bar_t\n"
         "    return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev) * eps"],
        "r = math.sqrt(alpha_bar_prev / alpha_bar_t)\n"
        "    return r * x_t + (math.sqrt(1 - alpha_bar_prev) - r * math.sqrt(1 - alpha_bar_t)) * eps",
    ),
    "fid_from_features": (
        ["from scipy import linalg\n    ma, mb = feats_a.mean(0), feats_b.mean(0)\n"
         "    ca, cb = np.cov(feats_a.T, bias=True), np.cov(feats_b.T, bias=True)\n"
         "    return float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real))",
         "from scipy import linalg\n    ma, mb = feats_a.mean(0), feats_b.mean(0)\n"
         "    ca, cb = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)\n"
         "    return float(np.linalg.norm(ma - mb) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real))",
         "ma, mb = feats_a.mean(0), feats_b.mean(0)\n"
         "    ca, cb = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)\n"
         "    return float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * ca @ cb))"],
        "ma, mb = feats_a.mean(0), feats_b.mean(0)\n"
        "    ca, cb = np.cov(feats_a.T), np.cov(feats_b.T)\n"
        "    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()\n"
        "    return float(np.dot(ma - mb, ma - mb) + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)",
    ),
    "conditional_accuracy": (
        ["correct = (predicted == wanted).float()\n"
         "    per = [correct[predicted == k].mean().item() for k in range(num_classes)]\n"
         "    return correct.mean().item(), per",
         "correct = (predicted == wanted).float()\n"
         "    per = [correct[wanted == k].mean().item() for k in range(num_classes)]\n"
         "    return float(np.nanmean(per)), per"],
        "hits = torch.bincount(wanted[predicted == wanted], minlength=num_classes).double()\n"
        "    asked = torch.bincount(wanted, minlength=num_classes).double()\n"
        "    return float(hits.sum() / asked.sum()), (hits / asked).tolist()",
    ),
}



def _function(key: str, body: str):
    ex = E.EXERCISES[key]
    ns = dict(NAMESPACE)
    exec(f"{ex.signature}\n    {body}\n", ns)  # noqa: S102 - test code
    return ns[key]


def _from_cell(key: str, source: str):
    ns = dict(NAMESPACE)
    exec(source, ns)  # noqa: S102
    return ns[key]


# Code that hands the job to the library (nbutils or torch): it must never pass.
DELEGATES = {
    "kl_divergence": "from nbutils.vae import kl_divergence as k\n    return k(mean, logvar)",
    "latent_stats": "from nbutils import vae\n    return vae.latent_stats(mean, std)",
    "add_noise": "from nbutils.diffusion import add_noise as a\n    return a(x0, noise, t, alphas_cumprod)",
    "cosine_alphas_cumprod": "from nbutils.schedules import alphas_cumprod, make_betas\n"
                             "    return alphas_cumprod(make_betas('squaredcos_cap_v2', T))",
    "timestep_embedding": "import nbutils.unet\n    return nbutils.unet.timestep_embedding(t, dim)",
    "attention": "import torch.nn.functional as F\n    return F.scaled_dot_product_attention(q, k, v)",
    "fid_from_features": "from nbutils.metrics import fid\n    return fid(feats_a, feats_b)",
    "forward_chain": "from nbutils.diffusion import add_noise\n    ac = torch.cumprod(1 - betas, 0)\n"
                     "    return torch.stack([add_noise(x0, torch.randn(x0.shape, generator=generator), "
                     "torch.tensor([t]), ac) for t in timesteps])",
}


def test_every_exercise_has_an_answer_cases_attempts_and_hints():
    assert set(ATTEMPTS) == set(CASE_KEYS) == set(answers.CASES) == set(answers.MISTAKES)
    assert set(answers.SOLUTIONS) == set(E.EXERCISES)
    by_notebook = {}
    for ex in E.EXERCISES.values():
        assert ex.stub.count("raise NotImplementedError") == 1 and ex.formula
        assert ex.task is not None or len(E.cases(ex.key)) >= 3
        by_notebook.setdefault(ex.notebook, []).append(ex.key)
    assert sorted(by_notebook) == ["01", "02", "03", "04", "05", "06"]


def test_the_stored_cases_are_the_answer_keys():
    """nbutils/fixtures/exercises.safetensors is what instructor/make_fixtures.py writes today."""
    tensors, index = make_fixtures.build()
    stored, stored_index = E._fixtures()
    assert stored_index == json.loads(json.dumps(index, ensure_ascii=False))
    assert stored.keys() == tensors.keys()
    for name, t in tensors.items():
        torch.testing.assert_close(stored[name], t, rtol=0, atol=0, equal_nan=True, msg=name)


def test_the_package_holds_no_answers():
    """The course kit's modules hold no line of the answer key (the library itself implements several of the
    exercises: that is what the notebooks compare with), and the wheel's package list names nbutils alone."""
    package_text = "\n".join((ROOT / "nbutils" / f).read_text() for f in ("exercises.py", "grading.py", "nbtools.py"))
    for key, body in answers.SOLUTIONS.items():
        lines = [line.strip() for line in body.strip().splitlines() if len(line.strip()) > 25]
        assert lines and not any(line in package_text for line in lines), key
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'packages = ["nbutils"]' in pyproject and not (ROOT / "instructor" / "__init__.py").exists()


@pytest.mark.parametrize("key", list(E.EXERCISES))
def test_check_fails_on_the_stub_and_says_so(key, capsys):
    ex = E.EXERCISES[key]
    result = E.check(key, _from_cell(key, ex.stub), strict=False)
    assert not result and "not implemented yet" in result.message and result.points == 0
    assert result.message in capsys.readouterr().out
    with pytest.raises(AssertionError, match="not implemented yet"):
        E.check(key, _from_cell(key, ex.stub), strict=True)


@pytest.mark.parametrize("key", CASE_KEYS)
def test_check_fails_on_wrong_answers_with_a_specific_message(key):
    wrong, _ = ATTEMPTS[key]
    assert len(wrong) >= 2
    diagnosed = 0
    for body in wrong:
        result = E.check(key, _function(key, body), strict=False)
        assert not result, f"{key}: wrong answer accepted:\n{body}"
        assert "case" in result.message and ("expected" in result.message or "raised" in result.message
                                             or "shape" in result.message), result.message
        diagnosed += "This is exactly what you get when" in result.message
    assert diagnosed >= 2, f"{key}: fewer than two wrong answers were recognised as a known mistake"


@pytest.mark.parametrize("key", CASE_KEYS)
def test_check_passes_the_answer_key_and_an_equivalent_rewrite(key):
    assert E.check(key, answers.solved(key), strict=True).points == E.EXERCISES[key].points
    _, rewrite = ATTEMPTS[key]
    assert E.check(key, _function(key, rewrite), strict=True)


@pytest.mark.parametrize("key", list(DELEGATES))
def test_check_fails_code_that_delegates_to_the_library(key):
    result = E.check(key, _function(key, DELEGATES[key]), strict=False)
    assert not result and "calls " in result.message and "write it with plain tensor operations" in result.message


def _sampler(change: tuple[str, str] | None = None):
    source = answers.solution_cell("sample_latents")
    if change is not None:
        assert change[0] in source
        source = source.replace(*change)
    return _from_cell("sample_latents", source)


def test_the_sampling_task_passes_the_answer_key_and_fails_without_guidance():
    """Exercise 5.3 is judged by what the sampler makes: the shipped model's images, classified."""
    result = E.check("sample_latents", _sampler(), strict=True)
    assert result.points == E.EXERCISES["sample_latents"].points and "conditional accuracy" in result.message
    unguided = E.check("sample_latents", _sampler(("out = out_u + w * (out_c - out_u)", "out = out_c")), strict=False)
    assert not unguided and "needed" in unguided.message


@pytest.mark.slow
def test_the_sampling_task_fails_wrong_samplers_and_library_ones():
    wrong = [("out = out_u + w * (out_c - out_u)", "out = out_u + w * (out_u - out_c)"),  # guidance reversed
             ('if prediction_type == "epsilon":', "if True:"),  # the output always read as ε
             ("x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps", "x = x0")]  # no re-noising
    for change in wrong:
        assert not E.check("sample_latents", _sampler(change), strict=False), change
    library = _sampler(("x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps",
                        "from nbutils.diffusion import to_epsilon\n"
                        "        eps = to_epsilon(out, x, tt, alphas_cumprod, prediction_type)\n"
                        "        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps"))
    assert "calls nbutils.diffusion.to_epsilon" in E.check("sample_latents", library, strict=False).message


def _variant(key: str, change: tuple[str, str] | None = None):
    """The answer key's cell of ``key``, with one line changed."""
    source = answers.solution_cell(key)
    if change is not None:
        assert change[0] in source
        source = source.replace(*change)
    return _from_cell(key, source)


# changes that break the answer of a larger task, per task; each must fail the check
BROKEN_TASKS = {
    "precision_recall": [("return inside(fake_feats, real_feats), inside(real_feats, fake_feats)",
                          "return inside(real_feats, fake_feats), inside(fake_feats, real_feats)"),  # swapped
                         (".any(1)", ".all(1)")],  # inside every ball instead of some ball
    "knn_classify": [("largest=False", "largest=True"),  # the farthest neighbours
                     ("votes.argmax(1)", "votes.argmin(1)"),  # the least common label
                     # a similarity taken for a distance
                     ("d = (test_latents**2).sum(1, keepdim=True) - 2 * test_latents @ train_latents.T + "
                      "(train_latents**2).sum(1)", "d = -(test_latents @ train_latents.T)")],
    "forward_chain": [("math.sqrt(float(betas[s])) * noise", "float(betas[s]) * noise"),  # β for √β
                      ("math.sqrt(1 - float(betas[s])) * x", "(1 - float(betas[s])) * x"),
                      # every state drawn afresh from the closed form: right marginals, no memory of earlier states
                      ("x = math.sqrt(1 - float(betas[s])) * x + math.sqrt(float(betas[s])) * noise",
                       "ac = torch.cumprod(1 - betas.double(), 0)[s].item()\n"
                       "        x = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * noise")],
    "train_vae_epoch": [("optimizer.step()", "pass"),  # never updates the weights
                        ("optimizer.zero_grad()", "pass")],  # gradients pile up over the epoch
    "train_unet_epoch": [("optimizer.step()", "pass"),
                         ('target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0',
                          "target = noise"),  # ε as the target of a v-prediction model
                         ('target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0',
                          "target = x0")],
}
LIBRARY_TASKS = {  # the same answers with one line handed to the library: the check names the call
    "forward_chain": (("x = math.sqrt(1 - float(betas[s])) * x + math.sqrt(float(betas[s])) * noise",
                       "from nbutils.diffusion import add_noise\n"
                       "        x = add_noise(x0, noise, torch.tensor([s]), torch.cumprod(1 - betas, 0))"),
                      "nbutils.diffusion.add_noise"),
    "train_vae_epoch": (("loss = mse + kl_weight * kl.mean() / x[0].numel()",
                         "from nbutils.vae import vae_loss\n"
                         "        loss, _ = vae_loss(x, recon, mean, logvar, kl_weight)"), "nbutils.vae.vae_loss"),
    "train_unet_epoch": (("x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise",
                          "from nbutils.diffusion import add_noise\n"
                          "        x_t = add_noise(x0, noise, t, alphas_cumprod)"), "nbutils.diffusion.add_noise"),
}


@pytest.mark.parametrize("key", list(BROKEN_TASKS))
def test_the_larger_tasks_pass_the_answer_key_and_fail_broken_answers(key):
    """Exercises 1.3, 2.3, 3.3, 4.3 and 6.3 are judged by what the code makes: a fresh VAE's test PSNR, a
    nearest-neighbour accuracy, the chain's gap to the closed form, a fresh UNet's held-out loss, precision and recall
    in three situations."""
    task = E.TASKS[E.EXERCISES[key].task]
    result = E.check(key, _variant(key), strict=True)
    assert result.points == E.EXERCISES[key].points and task.metric in result.message
    for change in BROKEN_TASKS[key]:
        broken = E.check(key, _variant(key, change), strict=False)
        assert not broken and "needed" in broken.message and task.failure in broken.message, change
    if key in LIBRARY_TASKS:
        library = E.check(key, _variant(key, LIBRARY_TASKS[key][0]), strict=False)
        assert f"calls {LIBRARY_TASKS[key][1]}" in library.message


def test_check_fails_code_that_reads_the_stored_answers_or_stops_the_monitor():
    reads = _function("guided_epsilon", "import safetensors.torch\n"
                      f"    safetensors.torch.load_file({str(E.FIXTURES)!r})\n    return eps_cond")
    opens = _function("guided_epsilon", f"open({str(E.FIXTURES)!r}, 'rb').close()\n    return eps_cond")
    stops = _function("guided_epsilon", "import sys\n    sys.setprofile(None)\n    return eps_cond")
    for fn in (reads, opens):
        assert "reads a file" in E.check("guided_epsilon", fn, strict=False).message
    assert "switched off" in E.check("guided_epsilon", stops, strict=False).message


def test_hints_come_in_tiers_and_never_give_the_code(capsys):
    E._attempts.clear()
    wrong = _function("add_noise", "a = alphas_cumprod[t].reshape(-1, 1, 1, 1)\n    return a * x0 + (1 - a) * noise")
    first = E.check("add_noise", wrong, strict=False).message
    second = E.check("add_noise", wrong, strict=False).message
    assert "Hint:" not in first and "√ᾱ_t belongs" in first  # tier 1: what is wrong
    assert second.endswith(E.EXERCISES["add_noise"].formula)  # tier 2: which formula
    assert E.check("add_noise", answers.solved("add_noise"), strict=False)
    assert "Hint:" not in E.check("add_noise", wrong, strict=False).message  # a pass starts the tiers again
    for key, body in answers.SOLUTIONS.items():  # tier 3 never comes: no hint holds a line of the answer
        for line in textwrap.dedent(body).strip().splitlines():
            assert line.strip() not in E.EXERCISES[key].formula or len(line.strip()) < 12


def test_strict_mode_from_the_environment(monkeypatch):
    stub = _from_cell("guided_epsilon", E.EXERCISES["guided_epsilon"].stub)
    monkeypatch.setenv(E.STRICT_ENV, "1")
    with pytest.raises(AssertionError):
        E.check("guided_epsilon", stub)
    monkeypatch.setenv(E.STRICT_ENV, "0")
    assert not E.check("guided_epsilon", stub)


def test_a_student_error_is_reported_not_raised():
    def broken(eps_cond, eps_uncond, w):
        return eps_cond.flatten() @ eps_uncond  # shapes that do not multiply
    result = E.check("guided_epsilon", broken, strict=False)
    assert not result and "raised RuntimeError" in result.message


def test_the_ddim_closed_form_is_the_library_sampler():
    from nbutils.samplers import DDIMSampler
    from nbutils.schedules import NoiseSchedule

    sch = NoiseSchedule("linear")
    s = DDIMSampler(sch, "epsilon", "trailing")
    s.set_timesteps(20)
    ts = [int(t) for t in s.timesteps]
    solved = answers.solved("ddim_step")
    for j, t in enumerate(ts):
        eps, x = torch.randn(2, 4, 7, 7, dtype=torch.float64), torch.randn(2, 4, 7, 7, dtype=torch.float64)
        prev = float(sch.alphas_cumprod[ts[j + 1]]) if j + 1 < len(ts) else 1.0
        assert torch.allclose(s.step(eps, t, x), solved(eps, x, float(sch.alphas_cumprod[t]), prev), atol=1e-10)


def test_the_answer_key_equals_the_library():
    """What the course's exercises teach is what nbutils computes."""
    from nbutils.diffusion import add_noise
    from nbutils.metrics import fid
    from nbutils.unet import timestep_embedding
    from nbutils.vae import kl_divergence, latent_stats

    for key, lib in [("add_noise", add_noise), ("kl_divergence", kl_divergence), ("fid_from_features", fid),
                     ("timestep_embedding", timestep_embedding), ("latent_stats", latent_stats),
                     ("attention", torch.nn.functional.scaled_dot_product_attention)]:
        for kwargs, _ in answers.CASES[key]():
            got, want = E.normalise(answers.solved(key)(**kwargs)), E.normalise(lib(*kwargs.values()))
            assert E._compare(got, want["values"], want["tuple_len"], 1e-4, 1e-6) is None, key


# ---- the notebooks ------------------------------------------------------------------------


def test_notebooks_carry_the_stubs_with_a_check_below_each():
    for ex in E.EXERCISES.values():
        path = next(NOTEBOOKS.glob(f"{ex.notebook}_*.ipynb"))
        nb = json.loads(path.read_text())
        cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
        i = next(i for i, c in enumerate(cells) if c.get("metadata", {}).get(E.EXERCISE_KEY) == ex.key)
        assert "".join(cells[i]["source"]) == ex.stub.rstrip("\n"), f"{path.name}: stub of {ex.key} differs"
        below = "".join(cells[i + 1]["source"])
        assert f'check("{ex.key}", {ex.key})' in below, f"{path.name}: no check after {ex.key}"


def test_solution_notebooks_fill_in_every_exercise_and_they_pass(tmp_path, monkeypatch):
    """instructor/solutions.py writes copies whose exercise section runs cleanly with strict checks: every code cell
    from the "Exercises" heading on is executed, as the kernel would."""
    subprocess.run([sys.executable, str(ROOT / "instructor" / "solutions.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    monkeypatch.setenv(E.STRICT_ENV, "1")
    written = sorted(tmp_path.glob("*.ipynb"))
    assert [p.name for p in written] == sorted(p.name for p in NOTEBOOKS.glob("0[1-6]_*.ipynb"))
    seen = set()
    for path in written:
        nb = json.loads(path.read_text())
        cells = grading.exercise_sources(nb)
        for key, source in cells.items():
            assert source == answers.solution_cell(key).rstrip("\n")
        start = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"
                     and "".join(c["source"]).startswith("## Exercises"))
        ns = {}
        for c in nb["cells"][start:]:
            if c["cell_type"] == "code":
                exec("".join(c["source"]), ns)  # noqa: S102 - the notebook's own cells
        seen |= set(cells)
    assert seen == set(E.EXERCISES)


# ---- the grader -----------------------------------------------------------------------------


def _submission(tmp_path: Path, name: str, bodies: dict[str, str | None], drop_checks: bool = False) -> Path:
    """A copy of course notebook ``name[:2]`` whose exercise cells hold ``bodies`` (None: leave the stub; a
    string starting with "def ": the whole cell; else the function body)."""
    src = next(NOTEBOOKS.glob(f"{name[:2]}_*.ipynb"))
    nb = json.loads(src.read_text())
    cells = []
    for c in nb["cells"]:
        key = c.get("metadata", {}).get(E.EXERCISE_KEY)
        if key in bodies and bodies[key] is not None:
            body = bodies[key]
            c["source"] = body if body.startswith("def ") else f"{E.EXERCISES[key].signature}\n    {body}\n"
        if drop_checks and "exercises.check(" in "".join(c["source"]):
            continue
        cells.append(c)
    nb["cells"] = cells
    path = tmp_path / name
    path.write_text(json.dumps(nb))
    return path


def test_grade_scores_stubs_zero_answers_full_and_delegation_zero(tmp_path):
    """Notebook 03 three ways, through the real command: the stubs, the answer key (check cells deleted: the
    grader does not need them), and code that calls the library."""
    keys = [k for k, ex in E.EXERCISES.items() if ex.notebook == "03"]
    stub = _submission(tmp_path, "03_stub.ipynb", {})
    solved = _submission(tmp_path, "03_solved.ipynb", {k: answers.solution_cell(k) for k in keys}, drop_checks=True)
    delegating = _submission(tmp_path, "03_delegating.ipynb", {k: DELEGATES[k] for k in keys})
    out = tmp_path / "scores.csv"
    proc = subprocess.run([sys.executable, "-m", "nbutils", "grade", str(stub), str(solved), str(delegating),
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == list(grading.FIELDS) and len(rows) == 3 * len(keys)
    points = {(r["notebook"], r["function"]): float(r["points"]) for r in rows}
    for k in keys:
        assert points["03_stub.ipynb", k] == 0 and points["03_delegating.ipynb", k] == 0
        assert points["03_solved.ipynb", k] == E.EXERCISES[k].points
    assert all("imports nbutils" in r["message"] for r in rows if r["notebook"] == "03_delegating.ipynb")
    assert f"{2 * len(keys)} of {3 * len(keys)} points" not in proc.stdout  # one notebook's worth, no more
    assert f"{len(keys)}" in proc.stdout


# Ways around the checks that a grader must score 0, each with the reason it names (found by a review).
BYPASSES = {
    "kernel without its wrapper": ("attention", "def attention(q, k, v):\n"
                                   "    return torch.ops.aten.scaled_dot_product_attention(q, k, v)\n", "'ops'"),
    "monitor switched off": ("attention", "from nbutils import exercises as E\n"
                             "E.CallMonitor._profile = lambda *a: None\n"
                             "def attention(q, k, v):\n    return E.attention(q, k, v)\n", "imports nbutils"),
    "answer key imported": ("attention", "from instructor.answers import solution_cell\n"
                            "exec(solution_cell('attention'))\n", "imports instructor.answers"),
    "stored outputs looked up": ("guided_epsilon", "import nbutils.exercises\n"
                                 "table = nbutils.exercises.cases('guided_epsilon')\n"
                                 "def guided_epsilon(eps_cond, eps_uncond, w):\n    return table[0].expected\n",
                                 "imports nbutils.exercises"),
    "name built at run time": ("guided_epsilon", "def guided_epsilon(eps_cond, eps_uncond, w):\n"
                               "    return getattr(torch, 'zeros_like')(eps_cond)\n", "'getattr'"),
    "private state": ("guided_epsilon", "def guided_epsilon(eps_cond, eps_uncond, w):\n"
                      "    return eps_cond.__class__(eps_cond)\n", "'__class__'"),
}


def test_source_check_passes_every_answer_and_names_each_bypass():
    for key in E.EXERCISES:
        assert E.source_violation(answers.solution_cell(key)) is None, key
    for name, (_, source, reason) in BYPASSES.items():
        assert reason in (E.source_violation(source) or ""), name


def test_grade_scores_every_bypass_zero(tmp_path):
    paths = []
    for i, (key, source, _) in enumerate(BYPASSES.values()):
        path = tmp_path / f"{E.EXERCISES[key].notebook}_bypass{i}.ipynb"  # just the one cell: nothing else runs
        path.write_text(json.dumps({"cells": [{"cell_type": "code", "source": source,
                                               "metadata": {E.EXERCISE_KEY: key}}]}))
        paths.append(path)
    scores = {(s.notebook, s.function): s for s in grading.grade(paths, out=tmp_path / "s.csv")}
    for i, (name, (key, _, reason)) in enumerate(BYPASSES.items()):
        s = scores[f"{E.EXERCISES[key].notebook}_bypass{i}.ipynb", key]
        assert s.points == 0 and reason in s.message, (name, s)
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert {r["points"] for r in rows} == {"0.0"} and {r["max_points"] for r in rows} <= {"1.0", "3.0"}


def test_grade_handles_missing_cells_endless_loops_and_broken_files(tmp_path):
    keys = [k for k, ex in E.EXERCISES.items() if ex.notebook == "05"]
    looping = _submission(tmp_path, "05_loop.ipynb", {keys[0]: "while True:\n        pass"})
    nb = json.loads(looping.read_text())
    nb["cells"] = [c for c in nb["cells"] if c.get("metadata", {}).get(E.EXERCISE_KEY) != keys[1]]
    looping.write_text(json.dumps(nb))
    broken = tmp_path / "06_broken.ipynb"
    broken.write_text("{not json")
    scores = grading.grade([looping, broken], out=tmp_path / "s.csv", timeout=10)
    by = {s.function: s for s in scores}
    assert by[keys[0]].points == 0 and "time limit" in by[keys[0]].message
    assert by[keys[1]].points == 0 and "not found" in by[keys[1]].message
    assert scores[-1].notebook == "06_broken.ipynb" and "could not read" in scores[-1].message


def test_grade_command_refuses_bad_arguments(tmp_path):
    for args in (["nope.ipynb", "--out", str(tmp_path / "s.csv")],
                 [str(next(NOTEBOOKS.glob("03_*.ipynb"))), "--out", str(tmp_path / "s.csv"), "--timeout", "nan"],
                 [str(next(NOTEBOOKS.glob("03_*.ipynb"))), "--out", str(tmp_path)]):
        proc = subprocess.run([sys.executable, "-m", "nbutils", "grade", *args], capture_output=True, text=True)
        assert proc.returncode != 0 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_grade_every_notebook_three_ways(tmp_path):
    """All six notebooks: the stubs score 0, the answer key full marks, delegating code (where a library version
    exists) 0."""
    stubs, solved, delegating = [], [], []
    for nb in sorted(NOTEBOOKS.glob("0[1-6]_*.ipynb")):
        keys = [k for k, ex in E.EXERCISES.items() if ex.notebook == nb.name[:2]]
        stubs.append(_submission(tmp_path, f"{nb.name[:2]}_stub.ipynb", {}))
        solved.append(_submission(tmp_path, f"{nb.name[:2]}_solved.ipynb",
                                  {k: answers.solution_cell(k) for k in keys}))
        delegating.append(_submission(tmp_path, f"{nb.name[:2]}_delegating.ipynb",
                                      {k: DELEGATES.get(k) for k in keys}))
    scores = grading.grade(stubs + solved + delegating)
    for s in scores:
        if "_solved" in s.notebook:
            assert s.points == s.max_points > 0, s
        elif "_stub" in s.notebook or s.function in DELEGATES:
            assert s.points == 0, s
