"""sampling: speed and quality of each sampler / step count on one checkpoint, in one run, with ratios.

    python -m benchmarks sampling --n 1000 --configs dpm:10,dpm:20,dpm:50,ddim:20,ddim:50,ddpm:all

For every SAMPLER:STEPS of --configs (STEPS = all: every timestep the schedule samples from, 1000 on the linear
schedule and 996 on the cosine one, the usual choice for DDPM): sample --n images (classes cycling 0..9, guidance
--guidance on every step, seed --seed), time the sampling with the models loaded (VAE decode included; a short
warm-up first), and score the images against the 10,000 test images (FID, KID, conditional accuracy; the
real-data floor at the same N once). time_ratio and fid_ratio are each row's seconds and FID over the first
row's. FID is biased upwards at small N: compare rows of one run. The end-to-end time of the CLI (imports and
loading included) is `python -m benchmarks shipped --parts cli`.
"""

from __future__ import annotations

import argparse

from benchmarks import common
from nbutils.config import make_generator
from nbutils.evaluation import Evaluator
from nbutils.pipeline import Pipeline, SamplingRecipe, sample
from nbutils.samplers import make_sampler

CONFIGS = "dpm:10,dpm:20,dpm:50,ddim:20,ddim:50,ddpm:all"
COLUMNS = ["sampler", "steps", "seconds", "images_per_s", "time_ratio", "fid", "kid", "cond_acc", "fid_ratio"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, n=1000, n_help="images per sampler")
    p.add_argument("--configs", default=CONFIGS, help=f"SAMPLER:STEPS pairs, comma-separated (default {CONFIGS})")
    p.add_argument("--steps", type=common.positive_int, help="run every sampler of --configs with this many steps")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale, on every step (default 3)")
    p.add_argument("--batch-size", type=common.positive_int, default=500)
    p.add_argument("--no-metrics", action="store_true", help="timing only")


def parse_configs(text: str, steps: int | None = None) -> list[tuple[str, int | None]]:
    """``"dpm:20,ddpm:all"`` → ``[("dpm", 20), ("ddpm", None)]`` (None = every timestep); ``steps`` replaces every
    count (each sampler then runs once)."""
    out = []
    for item in text.split(","):
        name, _, count = item.strip().partition(":")
        out.append((name, steps if steps is not None else None if count in ("", "all") else int(count)))
    return list(dict.fromkeys(out))


def measure(pipe: Pipeline, ev: Evaluator | None, configs: list[tuple[str, int | None]], n: int, guidance: float,
            seed: int = 0, batch_size: int = 500, device="cpu") -> dict:
    labels = common.cycling_labels(n)
    rows, floor = [], None
    for name, steps in configs:
        recipe = SamplingRecipe(sampler=name, steps=steps, guidance=guidance)
        # the steps that run (for "all": the schedule's, e.g. 996 on the cosine one); a bad count fails here
        steps = len(make_sampler(name, pipe.schedule, pipe.diffusion.prediction_type, steps).timesteps)
        warm = min(n, 10)
        sample(pipe, warm, labels[:warm], recipe.replace(steps=min(steps, 2)))
        with common.Timer(device) as t:
            out = sample(pipe, n, labels, recipe, make_generator(seed), batch_size=batch_size)
        row = {"sampler": name, "steps": steps, "n": n, "seconds": round(t.seconds, 2),
               "images_per_s": round(n / t.seconds, 1)}
        if ev is not None:
            m = ev.evaluate(out.images, labels, with_novelty=False, with_floor=floor is None, kid_subsets=50)
            floor = floor or m["floor"]
            row.update(common.scores(m))
        rows.append(row)
        common.log(row)
    for r in rows:
        r["time_ratio"] = round(r["seconds"] / rows[0]["seconds"], 2)
        if "fid" in r:
            r["fid_ratio"] = round(r["fid"] / rows[0]["fid"], 3)
    return {"guidance": guidance, "n": n, "seed": seed, "ratios_against": f"{rows[0]['sampler']} {rows[0]['steps']}",
            "floor": floor, "rows": rows}


def run(args: argparse.Namespace) -> dict:
    pipe = common.load(args)
    ev = None if args.no_metrics else common.evaluator(args)
    result = measure(pipe, ev, parse_configs(args.configs, args.steps), args.n, args.guidance, args.seed,
                     args.batch_size, args.device)
    return {"task": "sampling", "checkpoint": pipe.meta["path"], "epoch": pipe.meta["extra"].get("epoch"), **result}
