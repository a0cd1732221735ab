"""Does DPM-Solver++(2M)'s history across the guidance switch matter?

    python benchmarks/switch_history.py --checkpoint benchmarks/candidates/cosv-e32 --n 2000 3@0-600 3.25@0-600

With guidance on t ≤ HI only, the first guided step's second-order update extrapolates from the previous step's
x̂₀, which the *unguided* model made: D = x̂₀ + (x̂₀ − x̂₀_prev)/(2r) carries half the guidance jump again, an extra
kick of guidance at that one step. Each spec ``W@LO-HI`` is sampled twice from the same noise (classes cycling,
seed 0, DPM-Solver++ ``--steps``): as ``sample`` does it, and with the solver's history dropped at the step where
the guidance scale changes (a first-order step there). Scored like benchmarks/guidance_sweep.py.
"""

from __future__ import annotations

import argparse
import json

import torch
from guidance_sweep import parse_spec

from nbutils.config import make_generator
from nbutils.metrics import Evaluator
from nbutils.samplers import DPMSolverSampler, guided_output, sample
from nbutils.train import load_models


class SwitchReset:
    """A ``guide`` for :func:`sample` that notes when w changes, and a sampler step that then forgets the history."""

    def __init__(self):
        self.last_w, self.switched = None, False

    def guide(self, model, x, t, labels, w, null_label):
        self.switched = self.last_w is not None and w != self.last_w
        self.last_w = w
        return guided_output(model, x, t, labels, w, null_label)

    def patch(self, step):
        def patched(sampler, out, t, x, generator=None):
            if self.switched:
                sampler._reset()
            return step(sampler, out, t, x, generator=generator)
        return patched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="W@LO-HI …")
    ap.add_argument("--checkpoint", default="checkpoints")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    unet, vae, meta = load_models(args.checkpoint, device="cpu")
    evaluator = Evaluator()
    labels = torch.arange(args.n) % 10
    plain_step = DPMSolverSampler.step
    for spec in args.specs:
        w, interval, _ = parse_spec(spec)
        for mode in ("as sampled", "history reset at the switch"):
            reset = SwitchReset()
            DPMSolverSampler.step = plain_step if mode == "as sampled" else reset.patch(plain_step)
            try:
                out = sample(unet, vae, args.n, labels, guidance=w, sampler="dpm", steps=args.steps,
                             generator=make_generator(0), guidance_interval=interval, guide=reset.guide)
            finally:
                DPMSolverSampler.step = plain_step
            m = evaluator.evaluate(out.images, labels, with_novelty=False, with_floor=False, kid_subsets=50)
            print(json.dumps({"spec": spec, "mode": mode, "n": args.n, "steps": args.steps, "fid": round(m["fid"], 4),
                              "cond_acc": round(m["cond_acc"], 4)}), flush=True)
    print(f"model {meta['path']}")


if __name__ == "__main__":
    main()
