"""Which VAE trains best on a 2-core CPU? Short fixed-step probes of width × batch size × learning rate.

Each candidate trains from the same seed for ``--steps`` optimizer steps on random training batches,
then reports its test PSNR (posterior mean, first ``--n-test`` test images, raw weights — no EMA) and the
measured seconds per step, so PSNR per second of CPU can be compared. Run by hand; results go in
``benchmarks/README.md`` with the machine they came from.

    python benchmarks/vae_probe.py --steps 800 --n-test 1000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nbutils import data
from nbutils.config import VAEConfig
from nbutils.metrics import psnr
from nbutils.vae import VAE, count_parameters, vae_loss

CANDIDATES = [
    # block_out_channels, batch size, learning rate
    ((16, 32, 64), 32, 2e-3),
    ((16, 64, 128), 32, 2e-3),
    ((32, 64, 128), 32, 2e-3),
    ((32, 64, 128), 128, 1e-3),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_x = data.to_model_range(data.load_split("train")[0])
    test_x = data.to_model_range(data.load_split("test", subset=args.n_test)[0])
    for channels, batch, lr in CANDIDATES:
        torch.manual_seed(0)
        vae = VAE(VAEConfig(block_out_channels=channels))
        opt = torch.optim.Adam(vae.parameters(), lr)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 100)
            x = train_x[torch.randint(0, len(train_x), (batch,), generator=g)]
            recon, mean, logvar = vae(x)
            loss, _ = vae_loss(x, recon, mean, logvar, 1e-6)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            vae.eval()
            mean, _ = vae.encode_dist(test_x)
            quality = psnr(test_x, vae.decoder(mean)).mean().item()
        print(json.dumps({"block_out_channels": channels, "batch_size": batch, "lr": lr,
                          "params": count_parameters(vae), "steps": args.steps, "images": args.steps * batch,
                          "s_per_step": round(seconds / args.steps, 4), "test_psnr": round(quality, 2)}), flush=True)


if __name__ == "__main__":
    main()
