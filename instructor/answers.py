"""The answer key of the course's exercises: each exercise's solution, its test inputs and the known mistakes.

This folder is the instructor's: it is part of the repository but not of the installed package (the wheel holds
``nbutils`` only), so ``pip install`` gives students the exercises without their answers.
``python instructor/make_fixtures.py`` turns this file into ``nbutils/fixtures/exercises.safetensors`` (inputs,
expected outputs, the outputs of each known mistake), which is all the checks in ``nbutils.exercises`` see;
``python instructor/solutions.py`` writes copies of the notebooks with every stub solved.

Per exercise (the key is the function the student writes):

- ``SOLUTIONS[key]``: the body of the solved function (the signature comes from ``nbutils.exercises``);
- ``CASES[key]()``: the test inputs, as ``(kwargs, description)`` pairs, edge cases included;
- ``MISTAKES[key]``: ``(label, function)`` pairs; a student whose output equals a mistake's is told its label.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import linalg

from nbutils.samplers import DDIMSampler
from nbutils.schedules import NoiseSchedule


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


SOLUTIONS: dict[str, str] = {
    "reparameterize": "return mean + torch.exp(0.5 * logvar) * eps",
    "kl_divergence": "return 0.5 * (mean**2 + logvar.exp() - logvar - 1).flatten(1).sum(dim=1)",
    "latent_stats": """
        shift = mean.mean(dim=(0, 2, 3))
        var = ((mean - shift[None, :, None, None]) ** 2).mean() + (std**2).mean()
        return shift, float(1 / var.sqrt())
        """,
    "slerp": """
        af, bf = a.flatten(1), b.flatten(1)
        omega = torch.arccos((af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)))[:, None]
        out = (torch.sin((1 - t) * omega) * af + torch.sin(t * omega) * bf) / torch.sin(omega)
        return out.reshape(a.shape)
        """,
    "add_noise": """
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise
        """,
    "cosine_alphas_cumprod": """
        t = torch.arange(1, T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return f / math.cos(s / (1 + s) * math.pi / 2) ** 2
        """,
    "timestep_embedding": """
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        """,
    "attention": """
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return weights @ v
        """,
    "guided_epsilon": "return eps_uncond + w * (eps_cond - eps_uncond)",
    "ddim_step": """
        x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
        return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev) * eps
        """,
    "knn_classify": """
        d = (test_latents**2).sum(1, keepdim=True) - 2 * test_latents @ train_latents.T + (train_latents**2).sum(1)
        nearest = d.topk(k, dim=1, largest=False).indices
        votes = torch.nn.functional.one_hot(train_labels[nearest], int(train_labels.max()) + 1).sum(1)
        return votes.argmax(1)
        """,
    "forward_chain": """
        x, kept = x0.clone(), []
        for s in range(max(timesteps) + 1):
            noise = torch.randn(x0.shape, generator=generator)
            x = math.sqrt(1 - float(betas[s])) * x + math.sqrt(float(betas[s])) * noise
            if s in timesteps:
                kept.append(x)
        return torch.stack(kept)
        """,
    "precision_recall": """
        def radii(x):
            return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # the first nearest is the point itself

        def inside(points, manifold):
            return (torch.cdist(points, manifold) <= radii(manifold)[None]).any(1).float().mean().item()

        return inside(fake_feats, real_feats), inside(real_feats, fake_feats)
        """,
    "train_vae_epoch": """
        losses = []
        for x in batches:
            mean, logvar = encode(x)
            eps = torch.randn(mean.shape, generator=generator)
            z = mean + torch.exp(0.5 * logvar) * eps
            recon = decode(z)
            mse = ((recon - x) ** 2).mean()
            kl = 0.5 * (mean**2 + logvar.exp() - logvar - 1).flatten(1).sum(1)
            loss = mse + kl_weight * kl.mean() / x[0].numel()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
        """,
    "train_unet_epoch": """
        losses = []
        order = torch.randperm(len(latents), generator=generator)
        for i in range(0, len(latents), batch_size):
            x0, y = latents[order[i : i + batch_size]], labels[order[i : i + batch_size]]
            t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            drop = torch.rand(len(y), generator=generator) < cond_drop_prob
            y = torch.where(drop, torch.full_like(y, null_label), y)
            loss = ((model(x_t, t, y) - target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
        """,
    "sample_latents": """
        x = torch.randn(shape, generator=generator)
        for i, t in enumerate(timesteps):
            a = float(alphas_cumprod[t])
            a_prev = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            out_c, out_u = model(x, tt, labels), model(x, tt, None)
            out = out_u + w * (out_c - out_u)
            if prediction_type == "epsilon":
                eps = out
                x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            else:
                x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out
                eps = math.sqrt(1 - a) * x + math.sqrt(a) * out
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return x
        """,
    "fid_from_features": """
        from scipy import linalg

        mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
        cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
        covmean = linalg.sqrtm(cov_a @ cov_b).real
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
        """,
    "conditional_accuracy": """
        correct = (predicted == wanted).double()
        per_class = [correct[wanted == k].mean().item() if (wanted == k).any() else float("nan")
                     for k in range(num_classes)]
        return correct.mean().item(), per_class
        """,
}


# ---- 01: the VAE ---------------------------------------------------------------------------


def _reparameterize_cases():
    return [({"mean": _randn(*s, seed=i), "logvar": _randn(*s, seed=i + 10) - 1.0, "eps": _randn(*s, seed=i + 20)},
             f"shape {s}") for i, s in enumerate([(4, 4, 7, 7), (2, 8), (1, 4, 7, 7)])]


def _kl(mean, logvar, half=0.5, reduce="sum", sign=-1.0, one=1.0):
    per = half * (mean**2 + logvar.exp() + sign * logvar - one).flatten(1)
    return per.sum(1) if reduce == "sum" else per.mean(1)


def _kl_cases():
    cases = [({"mean": _randn(*s, seed=i), "logvar": 0.5 * _randn(*s, seed=i + 10)}, f"shape {s}")
             for i, s in enumerate([(3, 4, 7, 7), (5, 2, 3, 3), (1, 4, 7, 7)])]
    zeros = torch.zeros(2, 4, 7, 7, dtype=torch.float64)
    return [*cases, ({"mean": zeros, "logvar": zeros.clone()}, "μ = 0, σ = 1: KL must be 0")]


# ---- 02: the latent space ------------------------------------------------------------------


def _latent_stats(mean, std, with_std=True, inverse=True, per_channel=True):
    shift = mean.mean(dim=(0, 2, 3)) if per_channel else mean.mean().expand(mean.shape[1]).clone()
    var = ((mean - shift[None, :, None, None]) ** 2).mean() + (std**2).mean() * with_std
    return shift, float(1 / var.sqrt() if inverse else var.sqrt())


def _latent_stats_cases():
    cases = []
    for i, (n, c) in enumerate([(16, 4), (10, 3), (40, 4)]):
        offset = torch.arange(c, dtype=torch.float64)[None, :, None, None]
        cases.append(({"mean": 2 * _randn(n, c, 7, 7, seed=i) + offset,
                       "std": 0.1 + _randn(n, c, 7, 7, seed=i + 5).abs()}, f"N = {n}, C = {c}"))
    return cases


def _slerp(a, b, t):
    af, bf = a.flatten(1), b.flatten(1)
    omega = torch.arccos(((af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1))).clamp(-1, 1))[:, None]
    return ((torch.sin((1 - t) * omega) * af + torch.sin(t * omega) * bf) / torch.sin(omega)).reshape(a.shape)


def _slerp_cases():
    return [({"a": _randn(2, 4, 7, 7, seed=i), "b": _randn(2, 4, 7, 7, seed=i + 7), "t": t}, f"t = {t}")
            for i, t in enumerate([0.0, 1.0, 0.5, 0.25, 0.9])]


# ---- 03: the forward process ---------------------------------------------------------------


def _add_noise(x0, noise, t, alphas_cumprod, root=True):
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise if root else a * x0 + (1 - a) * noise


def _add_noise_cases():
    cases = []
    for i, (name, t) in enumerate([("linear", [0, 999, 500]), ("squaredcos_cap_v2", [1, 250, 998]),
                                   ("linear", [10, 10, 700])]):
        cases.append(({"x0": _randn(3, 4, 7, 7, seed=i), "noise": _randn(3, 4, 7, 7, seed=i + 9),
                       "t": torch.tensor(t), "alphas_cumprod": NoiseSchedule(name).alphas_cumprod},
                      f"{name} schedule, t = {t}"))
    return cases


def _cosine(T, s=0.008, start=1, normalise=True, square=True, s_used=True):
    t = torch.arange(start, start + T, dtype=torch.float64) / T
    ss = s if s_used else 0.0
    p = 2 if square else 1
    f = torch.cos((t + ss) / (1 + ss) * math.pi / 2) ** p
    return f / (math.cos(ss / (1 + ss) * math.pi / 2) ** p if normalise else 1.0)


# ---- 04: the UNet --------------------------------------------------------------------------


def _embedding(t, dim, over=None, sign=-1.0, cos_first=True):
    half = dim // 2
    freqs = torch.exp(sign * math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (over or half))
    args = t.float()[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)]
    return torch.cat(parts if cos_first else parts[::-1], dim=-1)


def _attention(q, k, v, scale=None, dim=-1):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=dim) @ v


def _attention_cases():
    return [({"q": 2 * _randn(b, h, lq, d, seed=i), "k": 2 * _randn(b, h, s, d, seed=i + 1),
              "v": _randn(b, h, s, d, seed=i + 2)}, f"q {(b, h, lq, d)}, k/v {(b, h, s, d)}")
            for i, (b, h, lq, s, d) in enumerate([(2, 2, 49, 4, 16), (1, 2, 16, 16, 8), (3, 1, 5, 7, 32)])]


# ---- 05: sampling --------------------------------------------------------------------------


def _ddim(eps, x_t, alpha_bar_t, alpha_bar_prev, root_dir=True, root_eps=True, rescale_x0=True):
    x0 = (x_t - (math.sqrt(1 - alpha_bar_t) if root_eps else 1.0) * eps) / math.sqrt(alpha_bar_t)
    start = x0 if rescale_x0 else x_t
    return math.sqrt(alpha_bar_prev) * start + (math.sqrt(1 - alpha_bar_prev) if root_dir else 1 - alpha_bar_prev) * eps


def _ddim_cases():
    # the closed form is the library's DDIMSampler.step at η = 0 (tests/test_exercises.py checks that)
    sch = NoiseSchedule("linear")
    sampler = DDIMSampler(sch, "epsilon", "trailing")
    sampler.set_timesteps(20)
    ts = [int(t) for t in sampler.timesteps]
    abar = sch.alphas_cumprod
    cases = []
    for i, j in enumerate([0, 10, 19]):  # the first step, a middle one, the last (to ᾱ_prev = 1)
        t = ts[j]
        prev = float(abar[ts[j + 1]]) if j + 1 < len(ts) else 1.0
        cases.append(({"eps": _randn(2, 4, 7, 7, seed=i), "x_t": _randn(2, 4, 7, 7, seed=i + 4),
                       "alpha_bar_t": float(abar[t]), "alpha_bar_prev": prev},
                      f"t = {t}, ᾱ_t = {float(abar[t]):.4g}, ᾱ_prev = {prev:.4g}"))
    return cases


# ---- 06: evaluation ------------------------------------------------------------------------


def _fid(a, b, ddof=1, two=2.0, squared=True, root=True):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False, ddof=ddof), np.cov(b, rowvar=False, ddof=ddof)
    covmean = linalg.sqrtm(ca @ cb).real if root else ca @ cb
    mean_term = ((mu_a - mu_b) ** 2).sum() if squared else np.linalg.norm(mu_a - mu_b)
    return float(mean_term + np.trace(ca + cb - two * covmean))


def _fid_cases():
    rng = np.random.default_rng(0)
    cases = []
    for i, (n, m, d) in enumerate([(40, 60, 6), (300, 200, 12), (25, 25, 4)]):
        mix = rng.normal(size=(d, d))
        a = rng.normal(size=(n, d)) @ mix
        b = rng.normal(size=(m, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.5 * (i + 1)
        cases.append(({"feats_a": a, "feats_b": b}, f"N = {n}, M = {m}, d = {d}"))
    return cases


def _accuracy(predicted, wanted, num_classes=10, by="wanted", macro=False):
    correct = (predicted == wanted).double()
    key = wanted if by == "wanted" else predicted
    per = [correct[key == k].mean().item() if (key == k).any() else float("nan") for k in range(num_classes)]
    return (float(np.nanmean(per)) if macro else correct.mean().item()), per


def _accuracy_cases():
    cases = []
    for i, n in enumerate([200, 57, 1000]):
        g = _gen(i)
        wanted = torch.randint(0, 10, (n,), generator=g)
        wanted[wanted == 9] = 8 if i == 1 else 9  # case 2: class 9 never asked for
        noise = torch.randint(0, 10, (n,), generator=g)
        keep = torch.rand(n, generator=g) < torch.linspace(0.3, 0.95, 10)[wanted]
        cases.append(({"predicted": torch.where(keep, wanted, noise), "wanted": wanted},
                      f"N = {n}{', class 9 never requested' if i == 1 else ''}"))
    return cases


CASES = {
    "reparameterize": _reparameterize_cases,
    "kl_divergence": _kl_cases,
    "latent_stats": _latent_stats_cases,
    "slerp": _slerp_cases,
    "add_noise": _add_noise_cases,
    "cosine_alphas_cumprod": lambda: [({"T": T}, f"T = {T}") for T in (1000, 50, 7)],
    "timestep_embedding": lambda: [({"t": torch.tensor(t), "dim": d}, f"t = {t}, dim = {d}")
                                   for t, d in [([0, 1, 500, 999], 64), ([3, 42], 8), ([999], 128)]],
    "attention": _attention_cases,
    "guided_epsilon": lambda: [({"eps_cond": _randn(2, 4, 7, 7, seed=i), "eps_uncond": _randn(2, 4, 7, 7, seed=i + 3),
                                 "w": w}, f"w = {w}") for i, w in enumerate([0.0, 1.0, 3.0, 7.5])],
    "ddim_step": _ddim_cases,
    "fid_from_features": _fid_cases,
    "conditional_accuracy": _accuracy_cases,
}

MISTAKES = {
    "reparameterize": [
        ("σ is taken as exp(logvar), which is the variance", lambda mean, logvar, eps: mean + logvar.exp() * eps),
        ("the log-variance multiplies ε directly", lambda mean, logvar, eps: mean + logvar * eps),
        ("σ is taken as √|logvar|", lambda mean, logvar, eps: mean + logvar.abs().sqrt() * eps),
        ("the mean is left out", lambda mean, logvar, eps: (0.5 * logvar).exp() * eps),
    ],
    "kl_divergence": [
        ("the ½ is missing", lambda mean, logvar: _kl(mean, logvar, half=1.0)),
        ("you average over the latent dimensions instead of summing them",
         lambda mean, logvar: _kl(mean, logvar, reduce="mean")),
        ("the sign of the log σ² term is flipped", lambda mean, logvar: _kl(mean, logvar, sign=1.0)),
        ("the −1 is missing", lambda mean, logvar: _kl(mean, logvar, one=0.0)),
    ],
    "latent_stats": [
        ("the posterior's own spread σ² is left out of the variance (z = μ + σ·ε varies by σ too)",
         lambda mean, std: _latent_stats(mean, std, with_std=False)),
        ("the scale is the standard deviation, not its inverse", lambda mean, std: _latent_stats(mean, std,
                                                                                               inverse=False)),
        ("one shift for all channels; each channel needs its own", lambda mean, std: _latent_stats(mean, std,
                                                                                                  per_channel=False)),
    ],
    "slerp": [
        ("you interpolate linearly ((1 − t)·a + t·b)", lambda a, b, t: (1 - t) * a + t * b),
        ("a and b are swapped (t = 0 must give a)", lambda a, b, t: _slerp(b, a, t)),
        ("the angle is taken over the whole batch instead of per example",
         lambda a, b, t: _slerp(a.reshape(1, -1), b.reshape(1, -1), t).reshape(a.shape)),
    ],
    "add_noise": [
        ("ᾱ_t is used where √ᾱ_t belongs", lambda x0, noise, t, alphas_cumprod: _add_noise(x0, noise, t, alphas_cumprod,
                                                                                         root=False)),
        ("the timestep is off by one (alphas_cumprod[t] is already ᾱ of timestep t)",
         lambda x0, noise, t, alphas_cumprod: _add_noise(x0, noise, t - 1, alphas_cumprod)),
        ("the timestep is off by one (ᾱ_{t+1})", lambda x0, noise, t, alphas_cumprod:
         _add_noise(x0, noise, (t + 1).clamp(max=len(alphas_cumprod) - 1), alphas_cumprod)),
        ("x0 and noise swap coefficients", lambda x0, noise, t, alphas_cumprod: _add_noise(noise, x0, t,
                                                                                          alphas_cumprod)),
    ],
    "cosine_alphas_cumprod": [
        ("the timesteps start at 0 (ᾱ_0 … ᾱ_{T−1}); the schedule's first entry is ᾱ_1",
         lambda T, s=0.008: _cosine(T, s, start=0)),
        ("f(t) is not divided by f(0)", lambda T, s=0.008: _cosine(T, s, normalise=False)),
        ("the cosine is not squared", lambda T, s=0.008: _cosine(T, s, square=False)),
        ("the offset s is left out", lambda T, s=0.008: _cosine(T, s, s_used=False)),
    ],
    "timestep_embedding": [
        ("sin and cos are in the wrong order", lambda t, dim: _embedding(t, dim, cos_first=False)),
        ("the exponent divides by dim instead of half = dim // 2", lambda t, dim: _embedding(t, dim, over=dim)),
        ("the exponent's sign is flipped: the frequencies must shrink", lambda t, dim: _embedding(t, dim, sign=1.0)),
    ],
    "attention": [
        ("the 1/√d scaling is missing", lambda q, k, v: _attention(q, k, v, scale=1.0)),
        ("the scores are divided by d instead of √d", lambda q, k, v: _attention(q, k, v, scale=1 / q.shape[-1])),
        ("the softmax runs over the queries (dim −2) instead of the keys (dim −1)",
         lambda q, k, v: _attention(q, k, v, dim=-2)),
    ],
    "guided_epsilon": [
        ("the difference points the wrong way (uncond − cond)",
         lambda eps_cond, eps_uncond, w: eps_uncond + w * (eps_uncond - eps_cond)),
        ("the guided difference starts from ε_cond instead of ε_uncond (that is guidance w + 1)",
         lambda eps_cond, eps_uncond, w: eps_cond + w * (eps_cond - eps_uncond)),
        ("ε_uncond is not subtracted inside the bracket", lambda eps_cond, eps_uncond, w: eps_uncond + w * eps_cond),
    ],
    "ddim_step": [
        ("ᾱ_t and ᾱ_prev are swapped", lambda eps, x_t, alpha_bar_t, alpha_bar_prev:
         _ddim(eps, x_t, alpha_bar_prev, alpha_bar_t) if alpha_bar_t < 1 else None),
        ("the direction term uses (1 − ᾱ_prev) without the square root",
         lambda eps, x_t, alpha_bar_t, alpha_bar_prev: _ddim(eps, x_t, alpha_bar_t, alpha_bar_prev, root_dir=False)),
        ("x̂_0 subtracts ε without √(1 − ᾱ_t)",
         lambda eps, x_t, alpha_bar_t, alpha_bar_prev: _ddim(eps, x_t, alpha_bar_t, alpha_bar_prev, root_eps=False)),
        ("x_t is re-scaled instead of x̂_0", lambda eps, x_t, alpha_bar_t, alpha_bar_prev:
         _ddim(eps, x_t, alpha_bar_t, alpha_bar_prev, rescale_x0=False)),
    ],
    "fid_from_features": [
        ("the covariances are biased (divided by N, not N − 1)", lambda feats_a, feats_b: _fid(feats_a, feats_b,
                                                                                              ddof=0)),
        ("the factor 2 before the matrix square root is missing",
         lambda feats_a, feats_b: _fid(feats_a, feats_b, two=1.0)),
        ("the mean difference enters as a norm, not a squared norm",
         lambda feats_a, feats_b: _fid(feats_a, feats_b, squared=False)),
        ("the matrix square root of Σ₁Σ₂ is missing", lambda feats_a, feats_b: _fid(feats_a, feats_b, root=False)),
    ],
    "conditional_accuracy": [
        ("class k's accuracy is taken over the samples *predicted* as k (that is precision)",
         lambda predicted, wanted, num_classes=10: _accuracy(predicted, wanted, num_classes, by="predicted")),
        ("the overall accuracy is the mean of the per-class ones (with unequal class counts it is not)",
         lambda predicted, wanted, num_classes=10: _accuracy(predicted, wanted, num_classes, macro=True)),
    ],
}


def solution_cell(key: str) -> str:
    """The exercise's code cell, solved: the stub of ``nbutils.exercises`` with the solution as its body."""
    import textwrap

    from nbutils.exercises import EXERCISES

    body = textwrap.indent(textwrap.dedent(SOLUTIONS[key]).strip("\n"), "    ")
    return EXERCISES[key].stub.replace("    # YOUR CODE HERE\n    raise NotImplementedError\n", body + "\n")


def solved(key: str):
    """The solved function itself (the cell executed in the namespace the notebooks' exercise cells have)."""
    namespace = {"math": math, "np": np, "torch": torch}
    exec(solution_cell(key), namespace)  # noqa: S102 - the answer key's own code
    return namespace[key]
