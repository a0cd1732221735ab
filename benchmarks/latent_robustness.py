"""How forgiving is a VAE's decoder to errors in the latent? (one VAE's "diffusability", measured)

    python benchmarks/latent_robustness.py --n 2000 checkpoints runs/vae-b1e-2 --noise 0 0.1 0.2 0.4

A latent diffusion model never hits the exact latent of a real image: whatever error its UNet leaves in the
standardised latent, the decoder turns into an image error. This script measures that amplification. For each
VAE checkpoint, the first ``--n`` test images are encoded (posterior mean, standardised: zero mean and unit
variance per the stored shift and scale), Gaussian noise of standard deviation ``s`` (in those units) is added,
and the decoded images are scored against the 10,000 test images like any sample file (FID, KID, conditional
accuracy, project classifier). ``s = 0`` is the VAE's ceiling at this N. Also printed: the posterior standard
deviation σ in the same units (median over the same test images) — the noise the decoder was *trained* to
tolerate, which the KL weight β controls.

A VAE whose FID rises slowly with ``s`` leaves the UNet more room for error. (This is one view of the
reconstruction-vs-generation trade-off of first-stage models studied e.g. by Yao et al. 2025, "Reconstruction
vs. generation: taming optimization dilemma in latent diffusion models".)
"""

from __future__ import annotations

import argparse
import json

import torch

from nbutils import data
from nbutils.metrics import Evaluator
from nbutils.train import encode_dataset, load_vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="VAE checkpoint files or folders")
    ap.add_argument("--n", type=int, default=2000, help="test images encoded (default 2,000)")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4],
                    help="standard deviations of the noise added to the standardised latents")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ev = Evaluator()
    images, labels = data.load_split("test")
    images, labels = images[: args.n], labels[: args.n]
    rows = []
    for ckpt in args.checkpoints:
        vae, meta = load_vae(ckpt, device="cpu")
        mean, std = encode_dataset(vae, data.to_model_range(images), progress=False)
        z, sigma = vae.standardize(mean), float((std * vae.latent_scale).median())
        for s in args.noise:
            g = torch.Generator().manual_seed(args.seed)
            zn = z + s * torch.randn(z.shape, generator=g)
            with torch.no_grad():
                out = torch.cat([data.to_uint8(vae.decode(zn[i : i + 1000])) for i in range(0, len(zn), 1000)])
            r = ev.evaluate(out, labels, with_novelty=False, with_floor=False)
            row = {"vae": meta["path"], "kl_weight": meta["config"]["vae"]["kl_weight"],
                   "posterior_sigma": round(sigma, 4), "noise": s, "n": r["n"], "fid": round(r["fid"], 4),
                   "kid": round(r["kid"], 5), "cond_acc": round(r["cond_acc"], 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| VAE | β | posterior σ | noise s | FID | KID | conditional accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['vae']} | {r['kl_weight']:g} | {r['posterior_sigma']} | {r['noise']:g} | {r['fid']:.4f} | "
              f"{r['kid']:.5f} | {100 * r['cond_acc']:.2f}% |")


if __name__ == "__main__":
    main()
