#!/usr/bin/env bash
# The shipped UNet's recipe, trained longer on one GPU (issue: evaluation). The shipped UNet is the `cpu` preset's
# architecture on the cosine schedule with v-prediction, trained 16 epochs at lr 1e-3 and 16 more at 1e-4 on a
# 2-core CPU (README "Evaluation"). This script trains the same model, from scratch, in the same two phases but
# for as many epochs as fit in BUDGET seconds of GPU time (split evenly; each phase capped at MAX1 / MAX2), and
# copies back what the CPU then evaluates with benchmarks/guidance_sweep.py:
#
#   $OUT/p1/unet.{json,safetensors}   end of phase 1 (EMA weights, float32)
#   $OUT/p2/unet.{json,safetensors}   end of phase 2
#   $OUT/p2_snapshots.tar             phase 2's EMA weights at a few earlier epochs (float16, for a sweep)
#   $OUT/train.log                    both phases' logs and the epoch arithmetic
#
#   OUT=/tmp/o bash benchmarks/gpu_training.sh && OUT=/tmp/o bash benchmarks/gpu_unet.sh     # on the GPU machine
#   OUT=/tmp/x DEVICE=cpu SEC_PER_STEP=0.35 BUDGET=40 MAX1=1 MAX2=1 SUBSET=1024 PY=.venv/bin/python \
#       bash benchmarks/gpu_unet.sh                                                          # a check on a CPU
#
# Seconds per step come from SEC_PER_STEP (float32, uncompiled) or, after gpu_training.sh, from its `cpu` preset
# rows in $OUT/training.log: the precision x compile row that fits the most epochs once compile's warm-up is paid.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-240}
MAX1=${MAX1:-100}
MAX2=${MAX2:-100}
SUBSET=${SUBSET:-}
RUNS=${RUNS:-runs/gpu_unet}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT/p1" "$OUT/p2"
exec > >(tee -a "$OUT/train.log") 2>&1
rm -rf "$RUNS"

START=$(date +%s)
STEPS_PER_EPOCH=469  # 60,000 latents / batch 128
# epochs that fit: (BUDGET - 2 startups of ~15 s [- 2 compile warm-ups of ~40 s]) / (seconds per epoch + 10%),
# for each measured precision x compile row; the row that fits the most is used
read -r SEC_PER_STEP PRECISION COMPILE TOTAL < <($PY - "$OUT/training.log" "${SEC_PER_STEP:-}" "$BUDGET" \
    $STEPS_PER_EPOCH <<'EOF'
import json, os, sys
log, given, budget, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rows = {}
if given:
    rows[("no", False)] = float(given)
elif os.path.exists(log):
    for line in open(log):
        if line.startswith("{"):
            r = json.loads(line)
            if r["preset"] == "cpu":
                rows[("no" if r["autocast"] == "float32" else "bf16", bool(r["compile"]))] = r["seconds_per_step"]
if not rows:
    rows[("no", False)] = 0.025  # no measurement (the benchmark was cut short): about an H200's
fits = {k: int((budget - 30 - 80 * k[1]) / (steps * s * 1.1)) for k, s in rows.items()}
best = max(fits, key=lambda k: (fits[k], -rows[k]))
print(rows[best], best[0], "yes" if best[1] else "no", fits[best])
EOF
)
E1=$(( TOTAL / 2 < MAX1 ? TOTAL / 2 : MAX1 )); E1=$(( E1 < 1 ? 1 : E1 ))
E2=$(( TOTAL - E1 < MAX2 ? TOTAL - E1 : MAX2 )); E2=$(( E2 < 1 ? 1 : E2 ))
echo "$(date -u) seconds/step $SEC_PER_STEP, mixed precision $PRECISION, compile $COMPILE: $TOTAL epochs fit in ${BUDGET}s -> $E1 at 1e-3 + $E2 at 1e-4"
FLAGS=(--preset cpu --vae checkpoints --device "$DEVICE" --no-progress --mixed-precision "$PRECISION"
       --set diffusion.beta_schedule=squaredcos_cap_v2 --set diffusion.prediction_type=v_prediction
       --set train_unet.sample_every=0)
[ "$COMPILE" = yes ] && FLAGS+=(--compile)
[ -n "$SUBSET" ] && FLAGS+=(--set "data.train_subset=$SUBSET")
# a misjudged speed cannot overrun: phase 1 stops (SIGTERM: it saves a resumable checkpoint) at 60% of the
# budget + 20 s, phase 2 at the budget + 60 s, counted from the start
T1=$(( BUDGET * 6 / 10 + 20 ))

timeout "$T1" $PY -m nbutils train-unet "${FLAGS[@]}" --run-dir "$RUNS/p1" --epochs "$E1"
cp "$RUNS/p1/unet.json" "$RUNS/p1/unet.safetensors" "$OUT/p1/"
echo "$(date -u) phase 1 done"

# phase 2 snapshots: the EMA weights at each epoch's end (checkpoint writes are atomic renames)
( last=""; while sleep 1; do
    e=$(grep -o '"epoch": [0-9]*' "$RUNS/p2/unet.json" 2>/dev/null | head -1 | grep -o '[0-9]*$')
    if [ -n "$e" ] && [ "$e" != "$last" ]; then
        mkdir -p "$RUNS/p2-snap/e$e" && cp "$RUNS/p2/unet.json" "$RUNS/p2/unet.safetensors" "$RUNS/p2-snap/e$e/"
        last=$e
    fi
done ) & WATCH=$!
T2=$(( START + BUDGET + 60 - $(date +%s) )); T2=$(( T2 < 10 ? 10 : T2 ))
timeout "$T2" $PY -m nbutils train-unet "${FLAGS[@]}" --run-dir "$RUNS/p2" --epochs "$E2" --init-from "$RUNS/p1" \
    --set train_unet.lr=1e-4 --set train_unet.lr_warmup_steps=50
sleep 2; kill $WATCH 2>/dev/null
cp "$RUNS/p2/unet.json" "$RUNS/p2/unet.safetensors" "$OUT/p2/"
echo "$(date -u) phase 2 done"

# three earlier phase-2 epochs (at about 1/4, 1/2, 3/4), stored as float16 like the shipped weights
$PY - "$RUNS/p2-snap" "$E2" <<'EOF'
import sys
from pathlib import Path
import torch
from nbutils.checkpoints import export_model
snap, e2 = Path(sys.argv[1]), int(sys.argv[2])
have = sorted(int(p.name[1:]) for p in snap.glob("e*"))
want = sorted({min(have, key=lambda e: abs(e - e2 * q / 4)) for q in (1, 2, 3)} - {e2}) if have else []
for e in want:
    (snap.parent / "p2-half" / f"e{e}").mkdir(parents=True)
    export_model(snap / f"e{e}" / "unet.safetensors", snap.parent / "p2-half" / f"e{e}" / "unet.safetensors",
                 "unet", dtype=torch.float16)
print("phase 2 snapshots kept:", want)
EOF
[ -d "$RUNS/p2-half" ] && tar -C "$RUNS/p2-half" -cf "$OUT/p2_snapshots.tar" .
ls -la "$OUT" "$OUT/p1" "$OUT/p2"
date -u
