"""Exercises with automatic checks: the course kit of notebooks 01–06.

Longer than the ~400 lines a module aims at because it is a catalogue (one entry per exercise, read one at a time)
plus the checking machinery those entries share.

Each notebook ends with a few exercises. A code cell holds a stub the student fills in; right below it,
``exercises.check("<name>", fn)`` runs the student's function on stored test inputs (edge cases such as t = 0 and
t = T − 1 included) and compares the output with the stored expected output. The package holds no answers: the
inputs, expected outputs and the outputs of known mistakes (ᾱ where √ᾱ belongs, an off-by-one timestep, a flipped
sign…) come from ``fixtures/exercises.safetensors``, generated from the instructor's answer key
(``instructor/`` in the repository, not installed). While the student's function runs, a call monitor
(``sys.setprofile``) watches every call it makes: calling the library's own version (any function of ``nbutils``),
the ``torch``/``scipy`` function that does the exercise's whole job, or reading a file fails the check. Before
that, the function's source is read as text (:func:`source_violation`): importing anything but the plain tensor
libraries, or naming the interpreter's machinery (``getattr``, ``exec``, ``sys``, ``torch.ops``, private ``_names``)
fails it too — the ways around a call monitor that runs in the student's own process.

Hints come in tiers: a failed check says *what* is wrong (which input, expected vs got, and the known mistake it
matches); from the second failed attempt on it adds the formula to use (in mathematical notation); nothing prints
the code. A check never raises in a notebook, so "Run all" carries on past an unfinished exercise; with
``strict=True`` or ``$NBUTILS_STRICT_CHECKS=1`` a failure raises ``AssertionError``. ``nbutils.grading`` runs
the same checks on submitted notebooks, one exercise per fresh process (``python -m nbutils grade``).
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import importlib
import inspect
import json
import math
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from .classifier import load_classifier, predict
from .config import checkpoints_dir, get_config
from .data import load_split, to_model_range
from .pipeline import load_pipeline
from .samplers import spaced_timesteps
from .unet import UNet
from .vae import VAE

STRICT_ENV = "NBUTILS_STRICT_CHECKS"
EXERCISE_KEY = "nbutils_exercise"  # notebook cell metadata: the exercise (function name) a code cell holds
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "exercises.safetensors"
PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep

#: Called by no exercise: reading files (the stored answers are a file) and the general-purpose loaders.
FILE_READERS = ("builtins.open", "numpy.load", "numpy.fromfile", "torch.load",
                "safetensors.torch.load_file", "safetensors.torch.load", "safetensors.safe_open")


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exercise:
    """One exercise: what the student writes (``signature`` + ``docstring``), what it teaches (``goal``), the
    second-tier hint (``formula``, never code) and the functions that would do the job for the student."""

    number: str  # "3.1" = notebook 03, first exercise
    key: str  # the function name the student writes
    title: str
    goal: str
    signature: str
    docstring: str
    formula: str
    forbidden: tuple[str, ...] = ()  # dotted names, besides every function of nbutils and FILE_READERS
    rtol: float = 1e-5
    atol: float = 1e-6
    points: int = 1
    task: str | None = None  # a larger task, judged by a measured result (TASKS) instead of stored cases

    @property
    def notebook(self) -> str:
        return f"{int(self.number.split('.')[0]):02d}"

    @property
    def stub(self) -> str:
        doc = textwrap.indent(self.docstring, "    ").lstrip()
        return f'{self.signature}\n    """{doc}"""\n    # YOUR CODE HERE\n    raise NotImplementedError\n'


_KL = ("torch.distributions.kl.kl_divergence", "torch.nn.functional.kl_div")
_ATTENTION = ("torch.nn.functional.scaled_dot_product_attention", "torch._C._nn.scaled_dot_product_attention",
              "torch.nn.functional.multi_head_attention_forward",
              "torch.nn.modules.activation.MultiheadAttention.forward")
_FID = ("torchmetrics.image.fid.FrechetInceptionDistance.compute", "scipy.spatial.distance.cdist")

EXERCISES: dict[str, Exercise] = {ex.key: ex for ex in [
    Exercise(
        "1.1", "reparameterize", "the reparameterisation trick",
        "Sample z ~ N(μ, σ²) as a differentiable function of (μ, log σ²) and outside noise ε.",
        "def reparameterize(mean, logvar, eps):",
        "z = μ + σ·ε from the encoder's mean and log-variance and standard normal noise eps (all the same shape).",
        "σ is the standard deviation: σ = exp(½·log σ²); then z = μ + σ·ε, element by element."),
    Exercise(
        "1.2", "kl_divergence", "the KL term",
        "Derive KL(N(μ, σ²) ‖ N(0, 1)) in closed form and reduce it the way the loss needs (sum over latent "
        "dimensions, one value per example).",
        "def kl_divergence(mean, logvar):",
        "KL(N(mean, exp(logvar)) ‖ N(0, 1)) summed over all latent dimensions: one value per example, shape (B,).",
        "per dimension KL = ½(μ² + σ² − log σ² − 1) with σ² = exp(log σ²); sum over every dimension but the batch.",
        forbidden=_KL),
    Exercise(
        "1.3", "train_vae_epoch", "one epoch of VAE training (a larger task)",
        "Write the training loop itself: for every batch, encode, draw z with the reparameterisation trick, decode, "
        "compute the loss (reconstruction + β·KL), then zero the gradients, backpropagate and take an optimizer step. "
        "The check trains a fresh small VAE with your loop for one epoch on 2,048 training images and measures how "
        "well it reconstructs test images it never saw.",
        "def train_vae_epoch(encode, decode, optimizer, batches, kl_weight, generator):",
        "One epoch. encode(x) → (mean, logvar) of the latent posterior; decode(z) → the reconstruction.\n"
        "optimizer: a torch optimizer over the VAE's parameters. batches: a list of image batches (B, 1, 28, 28) in\n"
        "[-1, 1]. loss = mean squared error over all pixels + kl_weight · (KL per image / pixels per image), the KL\n"
        "summed over latent dimensions and averaged over the batch. Draw ε with torch.randn(…, generator=generator).\n"
        "Returns the list of the batches' losses (floats).",
        "per batch: (μ, log σ²) from the encoder; z = μ + σ·ε with σ = exp(½·log σ²); the decoder's reconstruction "
        "of z; MSE = the mean of the squared pixel errors; KL per image = ½·Σ(μ² + σ² − log σ² − 1); "
        "loss = MSE + β·(the batch mean of the KL)/784; then clear the gradients, backpropagate, step the optimizer.",
        forbidden=_KL, points=3, task="vae_training"),
    Exercise(
        "2.1", "latent_stats", "the scale factor",
        "Compute the per-channel shift and the single scale factor that make posterior samples z = μ + σ·ε "
        "zero-mean with unit variance, exactly, from the cached means and standard deviations (law of total "
        "variance).",
        "def latent_stats(mean, std):",
        "mean, std: (N, C, H, W) posterior parameters. Returns (shift of shape (C,), scale: a float) such that\n"
        "(z - shift[:, None, None]) * scale has mean 0 per channel and variance 1 overall, for z = mean + std·ε.",
        "shift_c = mean of μ over N, H, W for channel c; Var(z) = E[(μ − shift)²] + E[σ²] (law of total variance); "
        "scale = 1 / √Var(z).", rtol=1e-4),
    Exercise(
        "2.2", "slerp", "spherical interpolation",
        "Interpolate between two Gaussian latents along the great circle (slerp) rather than the straight line, "
        "which would pass through low-norm latents the decoder never saw.",
        "def slerp(a, b, t):",
        "Spherical interpolation between latents a and b (shape (B, C, H, W), one angle per example) at t ∈ [0, 1].",
        "per example, with a and b flattened: ω = arccos(⟨a, b⟩ / (‖a‖‖b‖)); "
        "slerp = [sin((1 − t)ω)·a + sin(tω)·b] / sin ω."),
    Exercise(
        "2.3", "knn_classify", "what the latent keeps of the class (a larger task)",
        "Classify test garments by their latents alone: for each test latent find the k training latents nearest to "
        "it (Euclidean distance) and take the class most of them have. The check encodes 5,000 training and 500 "
        "test images with the shipped VAE and scores your predictions: if the 4×7×7 latent kept what a garment is, "
        "its neighbours share its class.",
        "def knn_classify(train_latents, train_labels, test_latents, k=5):",
        "train_latents (N, D) and test_latents (M, D) float tensors, train_labels (N,) integer classes →\n"
        "(M,) predicted classes: for each test latent, the most common label among its k nearest training latents\n"
        "(Euclidean distance).",
        "the squared distances ‖a − b‖² = ‖a‖² − 2·a·b + ‖b‖² for all pairs at once, an (M, N) matrix; the k smallest "
        "per row; their labels; per row, the label that occurs most often.",
        points=3, task="knn"),
    Exercise(
        "3.1", "add_noise", "sampling q(x_t | x_0)",
        "Jump straight to any timestep: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, indexing ᾱ by the integer timestep of each "
        "example and broadcasting it over the image.",
        "def add_noise(x0, noise, t, alphas_cumprod):",
        "x_t for a batch: x0 and noise (B, C, H, W), t (B,) integer timesteps in 0..T−1, alphas_cumprod (T,).",
        "ᾱ_t = alphas_cumprod[t] for each example, shaped to broadcast over (C, H, W); x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε."),
    Exercise(
        "3.2", "cosine_alphas_cumprod", "the cosine schedule",
        "Build ᾱ_t of the cosine schedule (Nichol & Dhariwal 2021): f(t) = cos²((t/T + s)/(1 + s)·π/2), "
        "ᾱ_t = f(t)/f(0).",
        "def cosine_alphas_cumprod(T, s=0.008):",
        "ᾱ_1 … ᾱ_T of the cosine schedule as a float64 tensor of length T (ᾱ_t = f(t) / f(0)).",
        "t runs over 1 … T; f(t) = cos²(((t/T) + s) / (1 + s) · π/2); ᾱ_t = f(t) / f(0).", rtol=1e-6, atol=1e-9),
    Exercise(
        "3.3", "forward_chain", "the chain behind the closed form (a larger task)",
        "Run the forward process the slow way, one small step at a time: x_t = √(1 − β_t)·x_{t−1} + √β_t·ε_t with "
        "fresh noise every step. The check runs your chain on 20,000 copies of a few values with the shipped "
        "schedule and compares what comes out with the closed form q(x_t | x_0) that the rest of the course jumps "
        "with: the mean √ᾱ_t·x_0, the spread √(1 − ᾱ_t), and how much x_t still remembers of an earlier x_s.",
        "def forward_chain(x0, betas, timesteps, generator):",
        "x0: a tensor of clean values; betas: (T,) the β of each step; timesteps: increasing integers in 0..T−1.\n"
        "x_t is the state after t + 1 steps (betas[t] is the β of the step that makes x_t, as alphas_cumprod[t] is\n"
        "ᾱ after t + 1 steps). Draw each step's noise with torch.randn(x0.shape, generator=generator).\n"
        "Returns the states at the requested timesteps, stacked: (len(timesteps), *x0.shape).",
        "x = x_0; for each step s = 0, 1, …, max(timesteps): x ← √(1 − β_s)·x + √β_s·ε_s with new ε_s; keep x "
        "whenever s is a requested timestep; stack what you kept.",
        points=3, task="forward_chain"),
    Exercise(
        "4.1", "timestep_embedding", "the sinusoidal timestep embedding",
        "Turn integer timesteps into a vector the network can use: cosines and sines at geometrically spaced "
        "frequencies f_i = 10000^(−i/half), i = 0 … half − 1.",
        "def timestep_embedding(t, dim):",
        "t: (B,) timesteps; returns (B, dim) = [cos(t·f_0) … cos(t·f_{half−1}), sin(t·f_0) … sin(t·f_{half−1})]\n"
        "with half = dim // 2 and f_i = 10000^(−i/half) (dim is even here).",
        "f_i = 10000^(−i/half) for i = 0 … half − 1; the angles t·f_i; all the cosines first, then all the sines.",
        rtol=1e-4, atol=1e-4),
    Exercise(
        "4.2", "attention", "scaled dot-product attention",
        "Write the core of CrossAttention: each query mixes the values, weighted by a softmax over its similarity "
        "to every key, scaled by 1/√d so the softmax does not saturate.",
        "def attention(q, k, v):",
        "q: (B, heads, L, d), k and v: (B, heads, S, d) → (B, heads, L, d) = softmax(q·kᵀ/√d)·v.",
        "scores = q·kᵀ / √d with d the last dimension of q; a softmax over the keys (the last dimension); "
        "the weights times v.", forbidden=_ATTENTION),
    Exercise(
        "4.3", "train_unet_epoch", "one epoch of denoiser training (a larger task)",
        "Write the diffusion training loop: for every batch of clean latents, draw a timestep and noise per example, "
        "noise the latents with q(x_t | x_0), replace some labels by the null label (so the same network learns the "
        "unconditional model that guidance needs), and regress the model's output on the target of its prediction "
        "type. The check trains a fresh small UNet with your loop for one epoch on latents of the shipped VAE and "
        "measures how much its loss on held-out latents dropped.",
        "def train_unet_epoch(model, optimizer, latents, labels, alphas_cumprod, prediction_type, cond_drop_prob,\n"
        "                     null_label, batch_size, generator):",
        "One epoch over latents (N, C, H, W) and labels (N,), in a random order (torch.randperm with generator).\n"
        "model(x_t, t, y) → the UNet's output; optimizer: a torch optimizer over its parameters. alphas_cumprod: (T,)\n"
        "ᾱ; t uniform in 0..T−1. prediction_type \"epsilon\" (target ε) or \"v_prediction\" (target v = √ᾱ·ε −\n"
        "√(1 − ᾱ)·x_0). With probability cond_drop_prob a label becomes null_label. Loss: the mean squared error.\n"
        "Draw everything random with generator. Returns the list of the batches' losses (floats).",
        "per batch: t uniform in 0..T−1 and ε standard normal, one per example; x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε; "
        "the target is ε, or v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0; each label replaced by the null label with probability "
        "cond_drop_prob; loss = the mean squared difference between the model's output and the target; then clear "
        "the gradients, backpropagate, step the optimizer.",
        points=3, task="unet_training"),
    Exercise(
        "5.1", "guided_epsilon", "classifier-free guidance",
        "Combine the conditional and unconditional predictions: w = 0 is unconditional, w = 1 conditional, w > 1 "
        "pushes further along the direction the class adds.",
        "def guided_epsilon(eps_cond, eps_uncond, w):",
        "Classifier-free guidance with scale w (a float) from the two noise predictions (same shape).",
        "start at the unconditional prediction and move w times along the direction from it to the conditional one."),
    Exercise(
        "5.2", "ddim_step", "one deterministic DDIM step",
        "Go from x_t to x_prev (η = 0): estimate x̂_0 from the predicted noise, then re-noise it to the previous "
        "noise level along the same ε.",
        "def ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev):",
        "One DDIM step with η = 0: eps and x_t are tensors, alpha_bar_t and alpha_bar_prev floats (ᾱ now, ᾱ next).",
        "x̂_0 = (x_t − √(1 − ᾱ_t)·ε) / √ᾱ_t, then x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev)·ε."),
    Exercise(
        "5.3", "sample_latents", "the whole sampler (a larger task)",
        "Write the sampling loop itself: start from noise, and at every timestep run the model with and without the "
        "class, combine the two with guidance, turn the output into x̂_0 and ε for the model's prediction type, and "
        "take a DDIM step. The check runs your sampler with the shipped model and scores the images with the "
        "project's classifier: they must look like the classes you asked for.",
        "def sample_latents(model, labels, alphas_cumprod, timesteps, w, prediction_type, shape, generator):",
        "Deterministic DDIM (η = 0) with classifier-free guidance, from noise to clean latents.\n"
        "model(x, t, y) → the UNet's output for latents x (B, C, H, W) at timesteps t (a (B,) long tensor) and labels\n"
        "y ((B,) long; y = None means unconditional). labels: (B,) the classes to draw. alphas_cumprod: (T,) ᾱ.\n"
        "timesteps: the descending integer timesteps to visit (after the last one, ᾱ_prev = 1). w: guidance scale.\n"
        "prediction_type: \"epsilon\" or \"v_prediction\". Start from torch.randn(shape, generator=generator).\n"
        "Returns the final latents x_0 (shape ``shape``).",
        "x = noise; for each t: out = out_u + w·(out_c − out_u); from out get x̂_0 and ε (ε-prediction: "
        "x̂_0 = (x − √(1 − ᾱ_t)·ε)/√ᾱ_t; v-prediction: x̂_0 = √ᾱ_t·x − √(1 − ᾱ_t)·v, ε = √(1 − ᾱ_t)·x + √ᾱ_t·v); "
        "then x = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev)·ε.", points=3, task="sampling"),
    Exercise(
        "6.1", "fid_from_features", "FID from two feature sets",
        "Fit a Gaussian to each feature set and compute the Fréchet distance ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½).",
        "def fid_from_features(feats_a, feats_b):",
        "feats_a (N, d), feats_b (M, d) numpy arrays → the Fréchet distance of their Gaussian fits (a float).\n"
        "Use unbiased covariances (np.cov) and scipy.linalg.sqrtm for the matrix square root.",
        "μ = the mean feature, Σ = the unbiased covariance (N − 1), per set; "
        "FID = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2·(Σ_a Σ_b)^½).", rtol=1e-5, atol=1e-7, forbidden=_FID),
    Exercise(
        "6.2", "conditional_accuracy", "conditional accuracy, overall and per class",
        "Score class-conditioned samples with a classifier: the fraction recognised as the class that was asked "
        "for, overall and for each requested class.",
        "def conditional_accuracy(predicted, wanted, num_classes=10):",
        "predicted, wanted: (N,) integer class tensors. Returns (overall accuracy, list of num_classes per-class\n"
        "accuracies, where class k's is over the samples that *asked for* k; NaN for a class never asked for).",
        "overall = the fraction of all samples with predicted = wanted; class k: the same fraction over the samples "
        "that asked for k."),
    Exercise(
        "6.3", "precision_recall", "precision and recall: fidelity and diversity apart (a larger task)",
        "FID mixes two failures into one number: samples that look wrong, and samples that cover too little of the "
        "data. Improved precision and recall (Kynkäänniemi et al. 2019) measure them apart, with a k-nearest-"
        "neighbour estimate of each set's manifold in feature space. The check runs your function on the project "
        "classifier's features of real test images in three situations — a fair sample, a collapsed one (two "
        "classes only) and one pushed off the data — and each must come out as it should.",
        "def precision_recall(real_feats, fake_feats, k=3):",
        "real_feats (N, d), fake_feats (M, d) float tensors → (precision, recall), two floats in [0, 1].\n"
        "A set's manifold: a ball around each of its points with radius = the distance to that point's k-th nearest\n"
        "other point of the same set. precision = the fraction of fake points inside the real manifold (in at least\n"
        "one ball); recall = the fraction of real points inside the fake manifold.",
        "radii: all pairwise distances within a set, the (k + 1)-th smallest per row (the first is the point itself); "
        "a point is inside a manifold when its distance to some point of that set is at most that point's radius.",
        points=3, task="precision_recall"),
]}


# --------------------------------------------------------------------------------------------
# The stored cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One stored input with its expected output and the outputs of the known mistakes (values as float64
    arrays; ``tuple_len`` is the length of a tuple result, 0 for a single value)."""

    kwargs: dict[str, Any]
    description: str
    expected: list[np.ndarray]
    tuple_len: int
    mistakes: list[tuple[str, list[np.ndarray]]]


@cache
def _fixtures() -> tuple[dict[str, torch.Tensor], dict]:
    if not FIXTURES.is_file():
        raise FileNotFoundError(f"the exercises' stored cases are missing: {FIXTURES}")
    with safetensors.safe_open(str(FIXTURES), "pt") as f:
        index = json.loads(f.metadata()["index"])
        return {name: f.get_tensor(name) for name in f.keys()}, index  # noqa: SIM118 - safe_open is no dict


def cases(key: str) -> list[Case]:
    """The stored cases of exercise ``key`` (fresh copies: a student's function may modify its inputs)."""
    tensors, index = _fixtures()
    if key not in index:
        raise KeyError(f"no stored cases for exercise {key!r}: regenerate them (instructor/make_fixtures.py)")
    entry, out = index[key], []
    for c in entry["cases"]:
        kwargs = {}
        for name, spec in c["args"].items():
            if "value" in spec:
                kwargs[name] = spec["value"]
            else:
                t = tensors[spec["tensor"]].clone()
                kwargs[name] = t.numpy() if spec.get("numpy") else t
        values = [tensors[n].double().numpy() for n in c["expected"]]
        mistakes = [(entry["mistakes"][int(m)], [tensors[n].double().numpy() for n in names])
                    for m, names in c["mistakes"].items()]
        out.append(Case(kwargs, c["description"], values, c["tuple_len"], mistakes))
    return out


# --------------------------------------------------------------------------------------------
# The call monitor
# --------------------------------------------------------------------------------------------


def _resolve(dotted: str) -> Any:
    """The object a dotted name points to, or None when its module is not installed."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


#: What an exercise cell may import: the plain tensor libraries the exercises are written in.
ALLOWED_IMPORTS = ("math", "numpy", "torch", "torch.nn", "torch.nn.functional", "scipy", "scipy.linalg")
#: Names and attributes an exercise cell may not use: ways around the checks (running or importing code by name,
#: reaching the interpreter or the check's own state) and torch's operator registry (``torch.ops.aten.*``: the
#: library kernels without their Python wrappers, which the call monitor cannot see).
BLOCKED_NAMES = frozenset({
    "exec", "eval", "compile", "__import__", "globals", "locals", "vars", "getattr", "setattr", "delattr",
    "open", "breakpoint", "input", "sys", "os", "importlib", "builtins", "nbutils", "instructor", "exercises",
    "ops", "modules", "subprocess"})


def source_violation(source: str) -> str | None:
    """Why an exercise cell's ``source`` cannot be scored (one line), or None. Checked before it runs, as text:
    an import beyond :data:`ALLOWED_IMPORTS`, a name of :data:`BLOCKED_NAMES`, or an attribute or name that starts
    with ``_`` (private state, dunders), e.g. switching off the call monitor or importing the answer key."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None  # running it reports the syntax error, with its line
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name not in ALLOWED_IMPORTS]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            bad = [module] if module not in ALLOWED_IMPORTS else [
                f"{module}.{a.name}" for a in node.names
                if a.name in BLOCKED_NAMES or a.name.startswith("_") or a.name == "*"]
        else:
            bad = []
        if bad:
            return (f"imports {bad[0]}: an exercise may import only "
                    f"{', '.join(ALLOWED_IMPORTS)}")
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name is not None and (name in BLOCKED_NAMES or (name.startswith("_") and name != "_")):
            return (f"uses {name!r} (line {node.lineno}), which an exercise may not: "
                    "write it with plain tensor operations")
    return None


class CallMonitor:
    """Watches every call made while it is active (``sys.setprofile``) and remembers the first forbidden one:
    any function defined in the nbutils package, a name in ``forbidden`` or a file reader. Calls into the
    ``allowed`` callables (e.g. a model the student's sampler is handed) are not looked into."""

    def __init__(self, forbidden: tuple[str, ...] = (), allowed: tuple[Callable, ...] = ()):
        self.codes: dict[Any, str] = {}
        self.builtins: dict[int, str] = {}
        for name in (*forbidden, *FILE_READERS):
            obj = _resolve(name)
            code = getattr(obj, "__code__", None)
            if code is not None:
                self.codes[code] = name
            elif obj is not None:
                self.builtins[id(obj)] = name
        self.allowed: set[Any] = {getattr(getattr(a, "forward", a), "__code__", None) for a in allowed} - {None}
        self.violation: str | None = None
        self._inside_allowed: Any = None  # the frame of an allowed call in progress

    def _profile(self, frame, event, arg):
        if self.violation is not None:
            return
        if self._inside_allowed is not None:
            if event == "return" and frame is self._inside_allowed:
                self._inside_allowed = None
            return
        if event == "call":
            code = frame.f_code
            if code is _STOP:
                return
            if code in self.allowed:
                self._inside_allowed = frame
            elif code in self.codes:
                self.violation = self.codes[code]
            elif code.co_filename.startswith(PACKAGE_DIR):
                module = Path(code.co_filename).stem
                self.violation = f"nbutils.{module}.{code.co_qualname}"
        elif event == "c_call" and id(arg) in self.builtins:
            self.violation = self.builtins[id(arg)]

    def start(self) -> None:
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)

    def stop(self) -> None:
        """Stop watching; this method's own call is the one call the monitor lets through."""
        current = sys.getprofile()
        sys.setprofile(self._previous)
        if current != self._profile and self.violation is None:
            self.violation = "sys.setprofile"


_STOP = CallMonitor.stop.__code__


# --------------------------------------------------------------------------------------------
# Larger tasks: judged by a measured result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A larger exercise: ``run(fn, monitor)`` uses the student's function for a real job and returns the
    measured ``metric``; it passes at ``threshold`` or more."""

    run: Callable[[Callable, CallMonitor], float]
    metric: str
    threshold: float
    setting: str  # what was measured, for the message
    fmt: str = "{:.1%}"  # how a value of the metric is written
    failure: str = "the images do not show the classes asked for"
    higher_is_better: bool = True  # False: the value must be at most the threshold

    def show(self, value: float) -> str:
        return self.fmt.format(value)

    def passes(self, value: float) -> bool:
        return math.isfinite(value) and (value >= self.threshold if self.higher_is_better else value <= self.threshold)

    @property
    def needed(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {self.show(self.threshold)}"


SAMPLING_PER_CLASS, SAMPLING_STEPS, SAMPLING_GUIDANCE = 10, 20, 2.0


def _run_sampling_task(fn: Callable, monitor: CallMonitor) -> float:
    """The student's sampler on the shipped model: 10 images per class, decoded and classified."""
    pipe = load_pipeline(checkpoints_dir(), device="cpu")
    classifier, _ = load_classifier(checkpoints_dir() / "classifier.safetensors", device="cpu")
    unet, null = pipe.unet, pipe.unet.null_label

    def model(x, t, y):  # what the student's sampler may call (the monitor does not look inside)
        t = torch.as_tensor(t, dtype=torch.long).expand(x.shape[0])
        y = torch.full((x.shape[0],), null, dtype=torch.long) if y is None else torch.as_tensor(y, dtype=torch.long)
        with torch.no_grad():
            return unet(x.float(), t, y)

    labels = torch.arange(len(pipe.class_names)).repeat_interleave(SAMPLING_PER_CLASS)
    timesteps = [int(t) for t in spaced_timesteps(pipe.schedule.num_train_timesteps, SAMPLING_STEPS, "trailing")]
    args = (model, labels.clone(), pipe.schedule.alphas_cumprod.clone(), list(timesteps), SAMPLING_GUIDANCE,
            pipe.diffusion.prediction_type, (len(labels), *pipe.vae.latent_shape), torch.Generator().manual_seed(0))
    monitor.allowed.add(model.__code__)
    monitor.start()
    try:
        latents = fn(*args)
    finally:
        monitor.stop()
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != (len(labels), *pipe.vae.latent_shape):
        raise ValueError(f"the sampler must return a tensor of shape {(len(labels), *pipe.vae.latent_shape)}, got "
                         f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    if not torch.isfinite(latents).all():
        raise ValueError("the sampler returned NaN or inf latents")
    with torch.no_grad():
        images = pipe.vae.decode(latents.float()).clamp(-1, 1)
    _, logits = predict(classifier, images)
    return (logits.argmax(1) == labels).float().mean().item()


TRAIN_IMAGES, TEST_IMAGES, BATCH = 2048, 512, 64
#: the pass marks of the two training tasks, set below what the answer key reaches (tests/test_exercises.py)
VAE_TASK_PSNR, UNET_TASK_DROP = 14.0, 0.15
KNN_TASK_ACCURACY, CHAIN_TASK_GAP = 0.75, 0.03


def _batches(x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [x[order[i : i + BATCH]] for i in range(0, len(x), BATCH)]


def _run_vae_task(fn: Callable, monitor: CallMonitor) -> float:
    """The student's epoch trains a fresh smoke-size VAE (seeded) with Adam; returns the PSNR (dB) of its
    reconstructions (posterior means) of test images."""
    cfg = get_config("smoke")
    torch.manual_seed(0)
    vae = VAE(cfg.vae)
    train, _ = load_split("train", subset=TRAIN_IMAGES)
    test, _ = load_split("test", subset=TEST_IMAGES)

    def encode(x):  # what the student's loop may call (the monitor does not look inside)
        return vae.encoder(x)

    def decode(z):
        return vae.decoder(z)

    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    args = (encode, decode, optimizer, _batches(to_model_range(train)), cfg.vae.kl_weight,
            torch.Generator().manual_seed(0))
    monitor.allowed |= {encode.__code__, decode.__code__}
    monitor.start()
    try:
        fn(*args)
    finally:
        monitor.stop()
    vae.eval()
    with torch.no_grad():
        x = to_model_range(test)
        mse = (vae.decoder(vae.encoder(x)[0]).clamp(-1, 1) - x).pow(2).mean().item()
    return 10 * math.log10(4 / mse) if mse > 0 else math.inf


def _run_unet_task(fn: Callable, monitor: CallMonitor) -> float:
    """The student's epoch trains a fresh smoke-size UNet (seeded) with Adam on the shipped VAE's latents of
    training images; returns how much its loss on held-out latents (fixed t, noise, labels; the shipped prediction
    type's target) dropped: 1 − after / before."""
    pipe = load_pipeline(checkpoints_dir(), device="cpu")
    cfg = get_config("smoke")
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(cfg.unet, latent_channels=pipe.vae.latent_shape[0]))
    ac = pipe.schedule.alphas_cumprod.float()
    v_target = pipe.diffusion.prediction_type == "v_prediction"
    with torch.no_grad():
        (train, y_train), (test, y_test) = (load_split(split, subset=n) for split, n in
                                            (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)))
        z_train, z_test = pipe.vae.encode(to_model_range(train)), pipe.vae.encode(to_model_range(test))
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, len(ac), (len(z_test),), generator=g)
    noise = torch.randn(z_test.shape, generator=g)
    a = ac[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z_test + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * z_test if v_target else noise

    def held_out_loss() -> float:
        unet.eval()
        with torch.no_grad():
            return (unet(x_t, t, y_test) - target).pow(2).mean().item()

    def model(x, t, y):  # what the student's loop may call
        return unet(x, t, y)

    before = held_out_loss()
    unet.train()
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    args = (model, optimizer, z_train.clone(), y_train.clone(), ac.clone(), pipe.diffusion.prediction_type,
            pipe.diffusion.cond_drop_prob, unet.null_label, BATCH, torch.Generator().manual_seed(0))
    monitor.allowed.add(model.__code__)
    monitor.start()
    try:
        fn(*args)
    finally:
        monitor.stop()
    return 1 - held_out_loss() / before


KNN_TRAIN, KNN_TEST = 5_000, 500


def _run_knn_task(fn: Callable, monitor: CallMonitor) -> float:
    """The student's classifier on the shipped VAE's latents (standardised posterior means, flattened) of the first
    5,000 training and 500 test images; returns its accuracy."""
    pipe = load_pipeline(checkpoints_dir(), device="cpu")
    with torch.no_grad():
        (train, y_train), (test, y_test) = (load_split(split, subset=n) for split, n in
                                            (("train", KNN_TRAIN), ("test", KNN_TEST)))
        z_train, z_test = (pipe.vae.encode(to_model_range(x)).flatten(1) for x in (train, test))
    monitor.start()
    try:
        predicted = fn(z_train.clone(), y_train.clone(), z_test.clone(), 5)
    finally:
        monitor.stop()
    predicted = torch.as_tensor(predicted)
    if tuple(predicted.shape) != (KNN_TEST,):
        raise ValueError(f"expected {KNN_TEST} predicted classes, one per test latent, got shape "
                         f"{tuple(predicted.shape)}")
    return (predicted.long() == y_test).float().mean().item()


CHAIN_COPIES, CHAIN_TIMESTEPS = 20_000, (49, 199, 399, 599, 799, 949)


def _run_chain_task(fn: Callable, monitor: CallMonitor) -> float:
    """The student's chain on 20,000 copies of four values with the shipped schedule; returns the largest
    difference between what came out and the closed form: the means √ᾱ_t·x_0, the standard deviations √(1 − ᾱ_t)
    and the correlations of consecutive requested states, √(ᾱ_t/ᾱ_s)·√((1 − ᾱ_s)/(1 − ᾱ_t)) for s < t."""
    schedule = load_pipeline(checkpoints_dir(), device="cpu").schedule
    x0 = torch.tensor([-1.5, -0.5, 0.5, 1.5]).repeat(CHAIN_COPIES, 1)
    monitor.start()
    try:
        states = fn(x0.clone(), schedule.betas.float().clone(), list(CHAIN_TIMESTEPS), torch.Generator().manual_seed(0))
    finally:
        monitor.stop()
    states = torch.as_tensor(states).double()
    if tuple(states.shape) != (len(CHAIN_TIMESTEPS), *x0.shape):
        raise ValueError(f"expected the states stacked as {(len(CHAIN_TIMESTEPS), *x0.shape)}, got shape "
                         f"{tuple(states.shape)}")
    ac = schedule.alphas_cumprod[list(CHAIN_TIMESTEPS)].double()
    x0 = x0.double()
    gaps = [(states.mean(1) - ac.sqrt()[:, None] * x0[0]).abs().max(),
            (states.std(1) - (1 - ac).sqrt()[:, None]).abs().max()]
    for i in range(len(CHAIN_TIMESTEPS) - 1):
        a, b = states[i] - states[i].mean(0), states[i + 1] - states[i + 1].mean(0)
        corr = (a * b).mean(0) / (a.std(0) * b.std(0))
        want = (ac[i + 1] / ac[i]).sqrt() * ((1 - ac[i]) / (1 - ac[i + 1])).sqrt()
        gaps.append((corr - want).abs().max())
    return float(torch.stack(gaps).max())


PR_REAL = 1000


def _run_precision_recall_task(fn: Callable, monitor: CallMonitor) -> float:
    """The student's estimate on the project classifier's features of test images: the real set is 1,000 test
    images; a fair fake set (1,000 other test images) must score precision and recall ≥ 0.5; a collapsed one (the
    trousers and sneakers among the next 2,000, only two of ten classes) precision ≥ 0.5 and recall ≤ 0.35; the fair
    set shifted by five standard deviations of the features, precision ≤ 0.05. Returns the fraction of these
    five conditions met."""
    classifier, _ = load_classifier(checkpoints_dir() / "classifier.safetensors", device="cpu")
    images, labels = load_split("test", subset=4 * PR_REAL)
    feats, _ = predict(classifier, images)
    real, fair = feats[:PR_REAL], feats[PR_REAL : 2 * PR_REAL]
    rest, rest_labels = feats[2 * PR_REAL :], labels[2 * PR_REAL :]
    collapsed = rest[(rest_labels == 1) | (rest_labels == 7)]
    shifted = fair + 5 * feats.std(0)
    results = []
    for fake in (fair, collapsed, shifted):
        monitor.start()
        try:
            out = fn(real.clone(), fake.clone(), 3)
        finally:
            monitor.stop()
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise ValueError(f"expected (precision, recall), got {type(out).__name__}")
        results.append(tuple(float(v) for v in out))
    (p_fair, r_fair), (p_col, r_col), (p_off, _) = results
    met = [p_fair >= 0.5, r_fair >= 0.5, p_col >= 0.5, r_col <= 0.35, p_off <= 0.05]
    return sum(met) / len(met)


TASKS = {
    "precision_recall": Task(_run_precision_recall_task, "situations judged right", 1.0,
                             f"real: {PR_REAL:,} test images' classifier features; fair: {PR_REAL:,} others "
                             "(precision, recall ≥ 0.5); collapsed: trousers and sneakers only (precision ≥ 0.5, "
                             "recall ≤ 0.35); shifted off the data (precision ≤ 0.05)", fmt="{:.0%}",
                             failure="precision should fall when samples leave the data, recall when they cover "
                                     "only part of it"),
    "knn": Task(_run_knn_task, "test accuracy", KNN_TASK_ACCURACY,
                f"5 nearest neighbours among {KNN_TRAIN:,} training latents of the shipped VAE, {KNN_TEST:,} test "
                "latents", failure="the neighbours found are not the nearest, or the vote is not the majority"),
    "forward_chain": Task(_run_chain_task, "largest gap to the closed form", CHAIN_TASK_GAP,
                          f"{CHAIN_COPIES:,} copies of 4 values, the shipped schedule, timesteps "
                          f"{', '.join(map(str, CHAIN_TIMESTEPS))}: means, standard deviations, correlations of "
                          "consecutive states", fmt="{:.4f}", higher_is_better=False,
                          failure="the chain's states are not distributed as q(x_t | x_0) says"),
    "sampling": Task(_run_sampling_task, "conditional accuracy", 0.90,
                     f"{SAMPLING_PER_CLASS} images per class, {SAMPLING_STEPS} steps, w = {SAMPLING_GUIDANCE:g}, "
                     "the shipped model, scored by the project's classifier"),
    "vae_training": Task(_run_vae_task, "test PSNR", VAE_TASK_PSNR,
                         f"a fresh smoke-size VAE, one epoch of {TRAIN_IMAGES:,} images in batches of {BATCH}, Adam "
                         f"2e-3, {TEST_IMAGES} test images", fmt="{:.2f} dB",
                         failure="the VAE did not learn to reconstruct"),
    "unet_training": Task(_run_unet_task, "held-out loss reduction", UNET_TASK_DROP,
                          f"a fresh smoke-size UNet, one epoch of {TRAIN_IMAGES:,} latents of the shipped VAE in "
                          f"batches of {BATCH}, Adam 2e-3, the shipped schedule and prediction type, "
                          f"{TEST_IMAGES} held-out latents", failure="the denoiser did not learn its target"),
}


# --------------------------------------------------------------------------------------------
# Running a function on the cases, and judging the outputs
# --------------------------------------------------------------------------------------------


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def normalise(out: Any) -> dict:
    """A function's output as plain data: ``{"tuple_len": n, "values": [float64 arrays]}`` or ``{"error": …}``."""
    if out is None:
        return {"error": "the function returned None (a missing `return`?)"}
    items = list(out) if isinstance(out, tuple | list) and not _numeric_list(out) else None
    try:
        values = [_as_array(v) for v in items] if items is not None else [_as_array(out)]
    except (TypeError, ValueError, RuntimeError) as err:
        return {"error": f"could not read the result as numbers ({err})"}
    return {"tuple_len": len(items) if items is not None else 0, "values": values}


def _numeric_list(out: Any) -> bool:
    return isinstance(out, list) and all(isinstance(v, int | float) for v in out)


def _violation_message(name: str) -> str:
    if name.startswith("sys.setprofile"):
        return "your code switched off the check's call monitor (sys.setprofile)"
    if name in FILE_READERS:
        return f"reads a file ({name}) while it is checked; no exercise needs one"
    return f"calls {name}, which does (part of) the exercise for you: write it with plain tensor operations"


def run_cases(key: str, fn: Callable) -> list[dict]:
    """Call ``fn`` on every stored case of ``key`` under the call monitor; one :func:`normalise`\\ d output per
    case, up to and including the first that raises or calls something forbidden."""
    ex = EXERCISES[key]
    if ex.task is not None:
        return [_run_task(ex, fn)]
    results = []
    for case in cases(key):
        monitor = CallMonitor(ex.forbidden)
        monitor.start()
        try:
            out = fn(**case.kwargs)
        except NotImplementedError:
            results.append({"error": "not implemented yet: replace the `raise NotImplementedError` with your code"})
            break
        except Exception as err:  # noqa: BLE001 - any error in student code becomes a message
            results.append({"error": f"raised {type(err).__name__}: {err}"})
            break
        finally:
            monitor.stop()
        if monitor.violation is not None:
            results.append({"error": _violation_message(monitor.violation)})
            break
        results.append(normalise(out))
    return results


def _run_task(ex: Exercise, fn: Callable) -> dict:
    monitor = CallMonitor(ex.forbidden)
    try:
        value = TASKS[ex.task].run(fn, monitor)
    except NotImplementedError:
        return {"error": "not implemented yet: replace the `raise NotImplementedError` with your code"}
    except Exception as err:  # noqa: BLE001 - any error in student code becomes a message
        if monitor.violation is not None:
            return {"error": _violation_message(monitor.violation)}
        return {"error": f"raised {type(err).__name__}: {err}"}
    if monitor.violation is not None:
        return {"error": _violation_message(monitor.violation)}
    return {"tuple_len": 0, "values": [np.asarray(value, dtype=np.float64)]}


def _difference(got: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> str | None:
    """None when ``got`` matches ``expected`` (NaN matching NaN); else how it differs, in one line."""
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    nan = np.isnan(expected)
    if not np.array_equal(np.isnan(got), nan):
        return "NaN where a number is expected, or a number where NaN is expected (a class never asked for)"
    g, e = np.where(nan, 0.0, got), np.where(nan, 0.0, expected)
    if not np.isfinite(g).all():
        return "the result contains inf"
    err = np.abs(g - e)
    bad = err > atol + rtol * np.abs(e)
    if not bad.any():
        return None
    idx = np.unravel_index(np.argmax(err), err.shape) if err.ndim else ()
    where = f" at index {tuple(int(i) for i in idx)}" if idx else ""
    return (f"expected {e[idx]:.6g}, got {g[idx]:.6g}{where} (max |difference| {err.max():.3g}, "
            f"{int(bad.sum())} of {bad.size} values off)")


def _compare(out: dict, values: list[np.ndarray], tuple_len: int, rtol: float, atol: float) -> str | None:
    if tuple_len and out["tuple_len"] != tuple_len:
        return f"expected a tuple of {tuple_len} values, got {out['tuple_len'] or 'a single value'}"
    if not tuple_len and out["tuple_len"]:
        return f"expected a single value, got a sequence of {out['tuple_len']}"
    for i, (g, e) in enumerate(zip(out["values"], values, strict=True)):
        d = _difference(g, e, rtol, atol)
        if d is not None:
            return f"item {i} of the returned tuple: {d}" if tuple_len else d
    return None


@dataclass
class CheckResult:
    """The verdict of one check: truthy when it passed. ``points`` of ``max_points`` (all or nothing)."""

    exercise: str
    passed: bool
    message: str
    points: float = 0.0
    max_points: float = 1.0

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"CheckResult({self.exercise!r}, passed={self.passed})"


def judge(key: str, outputs: list[dict], attempt: int = 1) -> CheckResult:
    """The verdict on ``outputs`` (from :func:`run_cases`, maybe in another process) against the stored cases.
    From the second ``attempt`` on, a failure message ends with the exercise's formula."""
    ex = EXERCISES[key]
    head = f"Exercise {ex.number} ({ex.title})"
    if ex.task is not None:
        return _judge_task(ex, head, outputs[0] if outputs else {"error": "no output"}, attempt)
    stored = cases(key)
    message = None
    for i, case in enumerate(stored, 1):
        where = f"case {i} of {len(stored)} [{case.description}]"
        out = outputs[i - 1] if i <= len(outputs) else {"error": "no output (the run stopped early)"}
        if "error" in out:
            message = f"✗ {head}: {out['error']} — on {where}."
            break
        diff = _compare(out, case.expected, case.tuple_len, ex.rtol, ex.atol)
        if diff is None:
            continue
        diagnosis = next((f" This is exactly what you get when {label}." for label, values in case.mistakes
                          if _compare(out, values, case.tuple_len, max(10 * ex.rtol, 1e-4),
                                      max(10 * ex.atol, 1e-5)) is None), "")
        message = f"✗ {head}: wrong result on {where}: {diff}.{diagnosis}"
        break
    if message is None:
        return CheckResult(key, True, f"✓ {head}: correct on all {len(stored)} test inputs.", ex.points, ex.points)
    if attempt >= 2:
        message += f" Hint: {ex.formula}"
    return CheckResult(key, False, message, 0.0, ex.points)


def _judge_task(ex: Exercise, head: str, out: dict, attempt: int) -> CheckResult:
    task = TASKS[ex.task]
    if "error" in out:
        message = f"✗ {head}: {out['error']}."
    else:
        value = float(out["values"][0])
        if task.passes(value):
            return CheckResult(ex.key, True, f"✓ {head}: {task.metric} {task.show(value)} ({task.needed} needed; "
                                             f"{task.setting}).", ex.points, ex.points)
        message = (f"✗ {head}: {task.metric} {task.show(value)}, {task.needed} needed ({task.setting}): "
                   f"{task.failure}.")
    if attempt >= 2:
        message += f" Hint: {ex.formula}"
    return CheckResult(ex.key, False, message, 0.0, ex.points)


_attempts: dict[str, int] = {}


def check(key: str, fn: Callable, strict: bool | None = None) -> CheckResult:
    """Check the student's ``fn`` for exercise ``key`` and print the verdict (see the module docstring)."""
    if key not in EXERCISES:
        raise KeyError(f"no exercise named {key!r}; the exercises: {', '.join(EXERCISES)}")
    try:
        violation = source_violation(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError):  # no source to read (a builtin, a lambda typed at a prompt): the monitor still runs
        violation = None
    outputs = [{"error": violation}] if violation else run_cases(key, fn)
    result = judge(key, outputs, _attempts.get(key, 0) + 1)
    started = not outputs[-1].get("error", "").startswith("not implemented")
    _attempts[key] = 0 if result else _attempts.get(key, 0) + started
    print(result.message)
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "").strip() not in ("", "0")
    if strict and not result:
        raise AssertionError(result.message)
    return result


def hint(key: str) -> str:
    """The formula for exercise ``key`` (the second tier of hints), printed and returned."""
    text = f"Exercise {EXERCISES[key].number}: {EXERCISES[key].formula}"
    print(text)
    return text


# ---- outputs across processes (the grader) ---------------------------------------------------


def encode_outputs(outputs: list[dict]) -> str:
    """:func:`run_cases`' outputs as JSON (arrays as base64 float64 bytes with their shape)."""
    def enc(out):
        if "error" in out:
            return out
        return {"tuple_len": out["tuple_len"],
                "values": [{"shape": list(v.shape), "data": base64.b64encode(np.ascontiguousarray(v).tobytes())
                            .decode()} for v in out["values"]]}
    return json.dumps([enc(o) for o in outputs])


def decode_outputs(text: str) -> list[dict]:
    """The inverse of :func:`encode_outputs`."""
    def dec(out):
        if "error" in out:
            return {"error": str(out["error"])}
        return {"tuple_len": int(out["tuple_len"]),
                "values": [np.frombuffer(base64.b64decode(v["data"]), dtype=np.float64).reshape(v["shape"])
                           for v in out["values"]]}
    return [dec(o) for o in json.loads(text)]
