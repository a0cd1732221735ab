"""The course kit: every check fails on its stub and on plausible wrong answers, passes on the solution and on
an equivalent rewrite; the notebooks carry the stubs; `nbutils solutions` fills them in."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nbutils import exercises as E

NAMESPACE = {"math": math, "np": np, "torch": torch}
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

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
    signature = ex.stub.splitlines()[0]
    ns = dict(NAMESPACE)
    exec(f"{signature}\n    {body}\n", ns)  # noqa: S102 - test code
    return ns[key]


def _from_cell(key: str, source: str):
    ns = dict(NAMESPACE)
    exec(source, ns)  # noqa: S102
    return ns[key]


def test_every_exercise_has_attempts_and_a_check():
    assert set(ATTEMPTS) == set(E.EXERCISES)
    by_notebook = {}
    for ex in E.EXERCISES.values():
        assert callable(ex.check) and ex.stub.count("raise NotImplementedError") == 1
        by_notebook.setdefault(ex.notebook, []).append(ex.key)
    assert sorted(by_notebook) == ["01", "02", "03", "04", "05", "06"]
    assert all(2 <= len(v) <= 4 for v in by_notebook.values())


@pytest.mark.parametrize("key", list(E.EXERCISES))
def test_check_fails_on_the_stub_and_says_so(key, capsys):
    ex = E.EXERCISES[key]
    result = ex.check(_from_cell(key, ex.stub), strict=False)
    assert not result and "not implemented yet" in result.message
    assert result.message in capsys.readouterr().out
    with pytest.raises(AssertionError, match="not implemented yet"):
        ex.check(_from_cell(key, ex.stub), strict=True)


@pytest.mark.parametrize("key", list(E.EXERCISES))
def test_check_fails_on_wrong_answers_with_a_specific_message(key):
    wrong, _ = ATTEMPTS[key]
    assert len(wrong) >= 2
    diagnosed = 0
    for body in wrong:
        result = E.EXERCISES[key].check(_function(key, body), strict=False)
        assert not result, f"{key}: wrong answer accepted:\n{body}"
        assert "case" in result.message and ("expected" in result.message or "raised" in result.message
                                             or "shape" in result.message), result.message
        diagnosed += "Your result is exactly what you get when" in result.message
    assert diagnosed >= 2, f"{key}: fewer than two wrong answers were recognised as a known mistake"


@pytest.mark.parametrize("key", list(E.EXERCISES))
def test_check_passes_the_solution_and_an_equivalent_rewrite(key):
    ex = E.EXERCISES[key]
    assert ex.check(_from_cell(key, ex.solution), strict=True)
    _, rewrite = ATTEMPTS[key]
    assert ex.check(_function(key, rewrite), strict=True)


def test_strict_mode_from_the_environment(monkeypatch):
    ex = E.EXERCISES["guided_epsilon"]
    monkeypatch.setenv(E.STRICT_ENV, "1")
    with pytest.raises(AssertionError):
        ex.check(_from_cell("guided_epsilon", ex.stub))
    monkeypatch.setenv(E.STRICT_ENV, "0")
    assert not ex.check(_from_cell("guided_epsilon", ex.stub))


def test_a_student_error_is_reported_not_raised():
    def broken(eps_cond, eps_uncond, w):
        return eps_cond.flatten() @ eps_uncond  # shapes that do not multiply
    result = E.check_guided_epsilon(broken, strict=False)
    assert not result and "raised RuntimeError" in result.message


def test_the_ddim_closed_form_is_the_library_sampler():
    from nbutils.samplers import DDIMSampler
    from nbutils.schedules import NoiseSchedule

    sch = NoiseSchedule("linear")
    s = DDIMSampler(sch, "epsilon", "trailing")
    s.set_timesteps(20)
    ts = [int(t) for t in s.timesteps]
    solved = _from_cell("ddim_step", E.EXERCISES["ddim_step"].solution)
    for j, t in enumerate(ts):
        eps, x = torch.randn(2, 4, 7, 7, dtype=torch.float64), torch.randn(2, 4, 7, 7, dtype=torch.float64)
        prev = float(sch.alphas_cumprod[ts[j + 1]]) if j + 1 < len(ts) else 1.0
        assert torch.allclose(s.step(eps, t, x), solved(eps, x, float(sch.alphas_cumprod[t]), prev), atol=1e-10)


# ---- the notebooks ------------------------------------------------------------------------


def _exercise_cells(nb: dict) -> dict[str, str]:
    return {c["metadata"]["nbutils_exercise"]: "".join(c["source"]) for c in nb["cells"]
            if c["cell_type"] == "code" and "nbutils_exercise" in c.get("metadata", {})}


def test_notebooks_carry_the_stubs_with_a_check_below_each():
    notebooks_dir = NOTEBOOKS
    for ex in E.EXERCISES.values():
        path = next(notebooks_dir.glob(f"{ex.notebook}_*.ipynb"))
        nb = json.loads(path.read_text())
        cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
        i = next(i for i, c in enumerate(cells) if c.get("metadata", {}).get("nbutils_exercise") == ex.key)
        assert "".join(cells[i]["source"]) == ex.stub.rstrip("\n"), f"{path.name}: stub of {ex.key} differs"
        assert f"check_{ex.key}({ex.key})" in "".join(cells[i + 1]["source"]), f"{path.name}: no check after {ex.key}"


def test_solutions_command_fills_in_every_exercise_and_they_pass(tmp_path, monkeypatch):
    """`nbutils solutions` writes copies whose exercise section runs cleanly with strict checks: every code cell
    from the "Exercises" heading on is executed, as the kernel would."""
    from nbutils import cli

    assert cli.main(["solutions", "--out", str(tmp_path)]) == 0
    monkeypatch.setenv(E.STRICT_ENV, "1")
    written = sorted(tmp_path.glob("*.ipynb"))
    assert [p.name for p in written] == sorted(p.name for p in NOTEBOOKS.glob("0[1-6]_*.ipynb"))
    seen = set()
    for path in written:
        nb = json.loads(path.read_text())
        cells = _exercise_cells(nb)
        for key, source in cells.items():
            assert source == E.EXERCISES[key].solution.rstrip("\n")
            assert all(c.get("outputs") == [] for c in nb["cells"] if c.get("metadata", {}).get("nbutils_exercise"))
        start = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"
                     and "".join(c["source"]).startswith("## Exercises"))
        ns = {}
        for c in nb["cells"][start:]:
            if c["cell_type"] == "code":
                exec("".join(c["source"]), ns)  # noqa: S102 - the notebook's own cells
        seen |= set(cells)
    assert seen == set(E.EXERCISES)
