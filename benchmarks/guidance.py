"""guidance: guidance scale × interval × precision sweep, and the spec it chooses, on a validation reference.

    python -m benchmarks guidance --n 2000 --spacing logsnr 2.75@30-600 2.875@30-600 2.9375@30-600 3@30-600

Each spec is W[@LO-HI][:bf16]: guidance scale W only at timesteps LO ≤ t ≤ HI (the plain conditional model
elsewhere; no interval = every step), the UNet optionally under bf16 autocast. Every spec samples the same --n
images (classes cycling, seed --seed, --sampler with --steps and --spacing) and is scored: FID and KID against
--reference, conditional accuracy with the project classifier. The chosen spec is the lowest FID among those with
conditional accuracy ≥ --min-acc.

Choosing on the test set and then reporting test-set FID would flatter the choice, so by default the reference is
the validation reference of `nbutils evaluate --reference val`: a fixed 10,000 of the training images
(nbutils.evaluation.validation_indices; the first --n-ref of them). --reference test scores against the test
images instead, as the older sweeps in docs/results.md were (their numbers reproduce that way). Report the
chosen recipe at N = 10,000 on the test set with `python -m benchmarks shipped`. --steps 16 --guided-steps 12 puts
12 of the 16 steps inside the interval of each spec that starts at 0; --spacing logsnr spaces the steps evenly in
log-SNR (with --guided-steps: the guided ones). --timesteps T1,T2,… (or `shipped`, the shipped recipe's list)
visits exactly those timesteps instead of spacing --steps, so the scale of a listed recipe can be swept:

    python -m benchmarks guidance --n 2000 --timesteps shipped 2.875@30-600 3@30-600 3.125@30-600

FID is biased upwards at small N: compare rows of one run.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common
from nbutils.config import make_generator
from nbutils.evaluation import Evaluator, validation_indices
from nbutils.pipeline import SHIPPED_RECIPE, Pipeline, SamplingRecipe, sample
from nbutils.samplers import SAMPLERS, SPACINGS

COLUMNS = ["spec", "fid", "kid", "cond_acc", "sample_seconds"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="W[@LO-HI][:bf16] …")
    common.add_common(p, n=2000, n_help="images per spec")
    p.add_argument("--steps", type=common.positive_int, default=20)
    p.add_argument("--sampler", choices=SAMPLERS, default="dpm", help="default: dpm (DPM-Solver++(2M))")
    p.add_argument("--spacing", choices=SPACINGS, help="timestep spacing (default: the sampler's; dpm's is trailing)")
    p.add_argument("--guided-steps", type=common.positive_int,
                   help="of the --steps, this many inside the interval of each spec whose interval starts at 0")
    p.add_argument("--timesteps", type=timestep_list, metavar="T1,T2,…",
                   help="visit exactly these timesteps, noisiest first, instead of spacing --steps; 'shipped' = the "
                        "shipped recipe's list")
    p.add_argument("--reference", choices=("val", "test"), default="val",
                   help="what FID and KID compare against: the validation reference (training images; default) or "
                        "the test set")
    p.add_argument("--n-ref", type=common.positive_int, default=10000, help="reference images (default 10000)")
    p.add_argument("--min-acc", type=float, default=0.97, help="accuracy the chosen spec must reach (default 0.97)")


def timestep_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "shipped":
        return SHIPPED_RECIPE.timesteps
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas or 'shipped', got {text!r}"
                                         ) from None


def check_steps(timesteps: tuple[int, ...] | None, spacing: str | None, guided_steps: int | None) -> None:
    if timesteps is not None and (guided_steps is not None or spacing is not None):
        raise ValueError("--timesteps lists the steps: it takes no --spacing or --guided-steps")


def reference(ev: Evaluator, which: str, n_ref: int) -> tuple[torch.Tensor, str]:
    """``(features, description)`` of the reference set."""
    if which == "test":
        feats = ev.reference(n_ref)
        return feats, f"the first {len(feats)} test images"
    idx = validation_indices(len(ev.train_images))[0][:n_ref]
    return ev.features(ev.train_images[idx])[0], f"{len(idx)} images of the validation reference (training images)"


def sweep(pipe: Pipeline, ev: Evaluator, specs: list[str], n: int, ref: torch.Tensor, sampler: str = "dpm",
          steps: int = 20, spacing: str | None = None, guided_steps: int | None = None, seed: int = 0,
          timesteps: tuple[int, ...] | None = None) -> list[dict]:
    """One row per spec: the same ``n`` images (classes cycling, ``seed``) sampled with that guidance, scored
    against ``ref``. ``timesteps`` (a list, noisiest first) replaces ``steps``, ``spacing`` and ``guided_steps``."""
    check_steps(timesteps, spacing, guided_steps)
    labels = common.cycling_labels(n)
    rows = []
    for spec in specs:
        fields = common.parse_spec(spec)
        interval = fields["guidance_interval"]
        split = guided_steps if interval is not None and interval[0] == 0 else None
        if timesteps is not None:
            recipe = SamplingRecipe(sampler=sampler, steps=None, timesteps=timesteps, **fields)
            label = f" (listed {len(timesteps)})"
        else:
            recipe = SamplingRecipe(sampler=sampler, steps=steps, timestep_spacing=spacing, guided_steps=split,
                                    **fields)
            label = f" ({steps - split}+{split})" if split else ""
        with common.Timer(pipe.device) as t:
            out = sample(pipe, n, labels, recipe, make_generator(seed))
        row = {"spec": spec + label, "n": n,
               **common.score_against(ev, out.images, labels, ref), "sample_seconds": round(t.seconds, 1),
               "recipe": recipe.to_dict()}
        rows.append(row)
        common.log(row)
    return rows


def choose(rows: list[dict], min_acc: float) -> dict | None:
    ok = [r for r in rows if r["cond_acc"] >= min_acc]
    return min(ok, key=lambda r: r["fid"]) if ok else None


def run(args: argparse.Namespace) -> dict:
    check_steps(args.timesteps, args.spacing, args.guided_steps)  # before anything is loaded
    pipe = common.load(args)
    ev = common.evaluator(args)
    ref, what = reference(ev, args.reference, args.n_ref)
    rows = sweep(pipe, ev, args.specs, args.n, ref, args.sampler, args.steps, args.spacing, args.guided_steps,
                 args.seed, args.timesteps)
    chosen = choose(rows, args.min_acc)
    steps = {"timesteps": list(args.timesteps)} if args.timesteps else {
        "steps": args.steps, "spacing": args.spacing or "the sampler's default"}
    return {"task": "guidance", "checkpoint": pipe.meta["path"], "n": args.n, "seed": args.seed,
            "sampler": args.sampler, **steps,
            "reference": what, "rule": f"lowest FID with conditional accuracy >= {args.min_acc}",
            "chosen": chosen["spec"] if chosen else None, "rows": rows}
