#!/usr/bin/env bash
# The shipped UNet's recipe, trained longer on one GPU (issue: evaluation). The shipped UNet is the `cpu` preset's
# architecture on the cosine schedule with v-prediction, trained 16 epochs at lr 1e-3, 16 more at 1e-4 and 4 more at
# 1e-4 with dropout off on a 2-core CPU (README "The latent UNet"). This script trains the same model from scratch in
# its first two phases (SETS="unet.dropout=0" turns dropout off in both, what the third phase suggests), each for
# a share of BUDGET seconds rather than a number of epochs: phase 1 runs until SHARE1 of the budget is spent and is
# stopped there (SIGTERM: the trainer saves a resumable checkpoint, mid-epoch if need be), phase 2 starts from its
# raw and EMA weights at lr 1e-4 and is stopped at the end of the budget. It copies back what the CPU then
# evaluates with benchmarks/guidance_sweep.py:
#
#   $OUT/p1/unet.{json,safetensors}   end of phase 1 (EMA weights, float32)
#   $OUT/p2/unet.{json,safetensors}   end of phase 2
#   $OUT/p2_snapshots.tar             phase 2's EMA weights after about 1/4, 1/2 and 3/4 of its epochs (float16)
#   $OUT/train.log                    both phases' logs
#
#   OUT=/tmp/o BUDGET=500 bash benchmarks/gpu_unet.sh                                  # on the GPU machine
#   OUT=/tmp/x DEVICE=cpu BUDGET=60 SUBSET=1024 PY=.venv/bin/python bash benchmarks/gpu_unet.sh   # a check on a CPU
#
# SETS="section.field=value …" changes the model or recipe for both phases (a wider UNet, say).
# PRECISION (default no = float32) and COMPILE=1 choose the training settings: on an H200 float32 uncompiled
# trained this UNet at 0.02333 s / step and bf16 + compile at 0.02211 after a ~40 s warm-up per phase
# (benchmarks/README.md, "Training on one GPU"), so the default skips compile. On the first H200 machine an epoch
# took about 11 s in float32 (0.02333 s × 469 steps), i.e. about 40 epochs in 500 s; the second one was 60% slower.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-240}
SHARE1=${SHARE1:-50}  # percent of the budget for phase 1
PRECISION=${PRECISION:-no}
COMPILE=${COMPILE:-}
SUBSET=${SUBSET:-}
SETS=${SETS:-}  # more config changes for both phases, e.g. SETS="unet.block_out_channels=64,128 unet.layers_per_block=2"
RUNS=${RUNS:-runs/gpu_unet}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT/p1" "$OUT/p2"
exec > >(tee -a "$OUT/train.log") 2>&1
rm -rf "$RUNS"

START=$(date +%s)
T1=$(( BUDGET * SHARE1 / 100 ))
echo "$(date -u) budget ${BUDGET}s: phase 1 (lr 1e-3) ${T1}s, phase 2 (lr 1e-4) the rest; precision $PRECISION," \
     "compile ${COMPILE:-no}"
FLAGS=(--preset cpu --vae checkpoints --device "$DEVICE" --no-progress --mixed-precision "$PRECISION" --epochs 1000
       --set diffusion.beta_schedule=squaredcos_cap_v2 --set diffusion.prediction_type=v_prediction
       --set train_unet.sample_every=0)
[ -n "$COMPILE" ] && FLAGS+=(--compile)
[ -n "$SUBSET" ] && FLAGS+=(--set "data.train_subset=$SUBSET")
for assignment in $SETS; do FLAGS+=(--set "$assignment"); done

timeout "$T1" $PY -m nbutils train-unet "${FLAGS[@]}" --run-dir "$RUNS/p1"
cp "$RUNS/p1/unet.json" "$RUNS/p1/unet.safetensors" "$OUT/p1/" || exit 1
echo "$(date -u) phase 1 stopped"

# phase 2 snapshots: the EMA weights at each epoch's end (checkpoint writes are atomic renames)
( last=""; while sleep 1; do
    e=$(grep -o '"epoch": [0-9]*' "$RUNS/p2/unet.json" 2>/dev/null | head -1 | grep -o '[0-9]*$')
    if [ -n "$e" ] && [ "$e" != "$last" ]; then
        mkdir -p "$RUNS/p2-snap/e$e" && cp "$RUNS/p2/unet.json" "$RUNS/p2/unet.safetensors" "$RUNS/p2-snap/e$e/"
        last=$e
    fi
done ) & WATCH=$!
T2=$(( START + BUDGET - $(date +%s) )); T2=$(( T2 < 10 ? 10 : T2 ))
timeout "$T2" $PY -m nbutils train-unet "${FLAGS[@]}" --run-dir "$RUNS/p2" --init-from "$RUNS/p1" \
    --set train_unet.lr=1e-4 --set train_unet.lr_warmup_steps=50
sleep 2; kill $WATCH 2>/dev/null
cp "$RUNS/p2/unet.json" "$RUNS/p2/unet.safetensors" "$OUT/p2/"
echo "$(date -u) phase 2 stopped"

# three earlier phase-2 epochs (at about 1/4, 1/2, 3/4 of those finished), float16 like the shipped weights
$PY - "$RUNS/p2-snap" <<'EOF'
import sys
from pathlib import Path
import torch
from nbutils.checkpoints import export_model
snap = Path(sys.argv[1])
have = sorted(int(p.name[1:]) for p in snap.glob("e*"))
want = sorted({min(have, key=lambda e: abs(e - have[-1] * q / 4)) for q in (1, 2, 3)} - {have[-1]}) if have else []
for e in want:
    (snap.parent / "p2-half" / f"e{e}").mkdir(parents=True)
    export_model(snap / f"e{e}" / "unet.safetensors", snap.parent / "p2-half" / f"e{e}" / "unet.safetensors",
                 "unet", dtype=torch.float16)
print("phase 2 epochs finished:", have[-1] if have else 0, "- snapshots kept:", want)
EOF
[ -d "$RUNS/p2-half" ] && tar -C "$RUNS/p2-half" -cf "$OUT/p2_snapshots.tar" .
ls -la "$OUT" "$OUT/p1" "$OUT/p2"
date -u
