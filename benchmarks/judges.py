"""judges: a model's quality on both judges and both references: floor, VAE ceiling, samples, side by side.

    python -m benchmarks judges                                  # the shipped model, N = 10,000 (≈ 10 min, 2 cores)
    python -m benchmarks judges --samples runs/ddpm.npz          # also evaluate sample files made elsewhere
    python -m benchmarks judges --references val --n 2000        # the validation reference only (choosing settings)

Every row is evaluated by each judge (nbutils.classifier.CLASSIFIERS: the resnet and the vgg, different families)
against each reference (test: the 10,000 test images, for published numbers; val: a fixed 10,000 training images,
for choosing recipes and hyper-parameters; nbutils.evaluation). Rows: the floor (N real training images outside
the reference), the ceiling (the checkpoint VAE's reconstructions of the reference's own first N images, rounded
to uint8: what a perfect latent model would score), the checkpoint's own recipe (--n samples, classes cycling,
seed --seed, rounded to uint8 as a sample file is), and each --samples file. fid_vs_ceiling divides a row's FID by
the ceiling's under the same judge and reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks import common, vae
from nbutils import data
from nbutils.classifier import ARCHS
from nbutils.config import make_generator
from nbutils.evaluation import REFERENCES, evaluators, load_sample_file
from nbutils.pipeline import sample

COLUMNS = ["reference", "judge", "row", "fid", "kid", "cond_acc", "fid_vs_ceiling"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, n=10000, n_help="samples of the recipe row, test images of the ceiling, real images of the "
                                         "floor")
    p.add_argument("--references", nargs="+", choices=REFERENCES, default=list(REFERENCES))
    p.add_argument("--judges", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--samples", nargs="*", default=[], help="sample .npz files to evaluate as further rows")
    p.add_argument("--no-recipe", action="store_true", help="leave out the checkpoint recipe's samples")
    p.add_argument("--save-samples", help="write the recipe's samples to this .npz (to evaluate again later)")


def run(args: argparse.Namespace) -> dict:
    sets = {}  # row name → (uint8 images, labels)
    names = [Path(f).stem for f in args.samples]
    taken = sorted({n for n in names if names.count(n) > 1 or n in ("ceiling", "recipe")})
    if taken:
        raise ValueError(f"--samples: rows are named by file name, and {', '.join(taken)} would be ambiguous; "
                         "rename the file(s)")
    files = {n: load_sample_file(f) for n, f in zip(names, args.samples, strict=True)}  # malformed: fail first
    pipe = common.load(args)
    record = {"task": "judges", "checkpoint": pipe.meta["path"], "n": args.n, "seed": args.seed}
    if not args.no_recipe:
        labels = common.cycling_labels(args.n)
        with common.Timer(pipe.device) as t:
            out = sample(pipe, args.n, labels, pipe.recipe, make_generator(args.seed))
        sets["recipe"] = (data.to_uint8(out.images), labels)
        if args.save_samples:
            np.savez_compressed(args.save_samples, images=sets["recipe"][0].numpy(), labels=labels.numpy())
        record.update(recipe=pipe.recipe.to_dict(), sampling_seconds=round(t.seconds, 1))
        common.log(f"recipe: {args.n} samples in {t.seconds:.0f} s")
    sets.update(files)
    rows = []
    for reference in args.references:
        reconstructions = None
        for judge in evaluators(tuple(args.judges), reference=reference, device=args.device):
            if reconstructions is None:  # the same images for every judge of this reference
                reconstructions = (vae.reconstruct(pipe.vae, judge.ref_images[: args.n]), judge.ref_labels[: args.n])
            floor = judge.floor(args.n)
            rows.append({"reference": reference, "judge": judge.arch, "row": f"floor: {floor['what']}",
                         **common.scores(floor)})
            ceiling = None
            for name, (images, labels) in {"ceiling": reconstructions, **sets}.items():
                m = judge.evaluate(images, labels, with_novelty=False, with_floor=False)
                ceiling = m["fid"] if name == "ceiling" else ceiling
                rows.append({"reference": reference, "judge": judge.arch, "row": name, **common.scores(m),
                             "fid_vs_ceiling": round(m["fid"] / ceiling, 3),
                             "per_class_acc": {k: round(v, 4) for k, v in m["per_class_acc"].items()}})
                common.log({k: v for k, v in rows[-1].items() if k != "per_class_acc"})
    record["rows"] = rows
    return record
