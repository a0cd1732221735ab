#!/usr/bin/env bash
# One GPU session, as a script: speed rows for benchmarks/README.md, then three UNet variants trained side by
# side on the one GPU for a fixed budget, then 10,000 samples of each at three guidance scales (evaluated
# afterwards on any machine with `python -m nbutils evaluate`). Everything worth keeping lands in $OUT.
#
#   OUT=/tmp/gpu_out DEVICE=cuda bash benchmarks/gpu_session.sh      # 540 s in all (TOTAL_SECONDS)
#
# For issue 6 (a better-fitting UNet), skip the speed rows and train at a lower rate, e.g.
#   OUT=/tmp/gpu_out SKIP_BENCH=1 LR=2e-4 VARIANTS="48,96x1 64,128x2" GUIDANCE="2.5@0-400 3.5@0-400" bash benchmarks/gpu_session.sh
# DEVICE=cpu MINUTES=0.1 N=200 BENCH_STEPS=2 SAMPLERS=dpm:2 PY=.venv/bin/python runs the same path on a CPU
# in a few minutes (a check of the script). Seven files come back: session.log (every JSON line and table),
# model_<variant>.tar (fp16 EMA weights, configs, training log, last sample grid), samples_<variant>.tar.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
DEVICE=${DEVICE:-cuda}
TOTAL_SECONDS=${TOTAL_SECONDS:-540}  # the whole script's wall-clock budget; training gets what the rest leaves
MINUTES=${MINUTES:-}
N=${N:-10000}
GUIDANCE=${GUIDANCE:-"2 3"}  # two specs, W or W@LO-HI (guidance W on LO ≤ t ≤ HI): 3 × 10,000 samples would not fit one 16 MB file
LR=${LR:-}                  # Adam learning rate for every variant (default: the preset's, 1e-3)
EMA_DECAY=${EMA_DECAY:-}    # likewise the EMA decay (default 0.999)
SKIP_BENCH=${SKIP_BENCH:-}  # 1: leave out the speed rows (throughput, samplers, CLI) and give their time to training
VARIANTS=${VARIANTS:-"48,96x1 64,128x2 32,64x2"}
PY=${PY:-python3}
BENCH_STEPS=${BENCH_STEPS:-50}
SAMPLERS=${SAMPLERS:-dpm:10,dpm:20,dpm:50,ddim:20,ddim:50,ddpm:all}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" runs/gpu
LOG=$OUT/session.log
exec > >(tee -a "$LOG") 2>&1

echo "== machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ -z "$SKIP_BENCH" ]; then
echo "== UNet throughput (alone on the device)"
timeout 150 $PY benchmarks/unet_throughput.py --device "$DEVICE" --variants "$VARIANTS" --bf16 --steps "$BENCH_STEPS"
timeout 60 $PY benchmarks/unet_throughput.py --device "$DEVICE" --preset full --bf16 --steps "$BENCH_STEPS"

echo "== samplers on the shipped model (alone on the device)"
timeout 150 $PY benchmarks/sampling.py --device "$DEVICE" --n 1000 --batch-size 1000 --configs "$SAMPLERS"
echo "== CLI end to end: 1,000 guided samples, 20 DPM-Solver++ steps, loading included"
for i in 1 2; do
    /usr/bin/time -f "cli wall %e s" timeout 60 $PY -m nbutils sample --checkpoint checkpoints --n 1000 --steps 20 \
        --device "$DEVICE" --batch-size 1000 --no-progress --out /tmp/cli_sample.npz
done
fi

if [ -z "$MINUTES" ]; then  # leave ~110 s for the latent cache, start-up, samples and packing
    MINUTES=$(awk "BEGIN{m=($TOTAL_SECONDS-$SECONDS-110)/60; print (m<0.5)?0.5:m}")
fi
echo "== training ${MINUTES} min each, side by side: $VARIANTS"
$PY benchmarks/train_budget.py --prepare --device "$DEVICE"
pids=()
for v in $VARIANTS; do
    name=${v//,/_}
    OMP_NUM_THREADS=4 timeout $(awk "BEGIN{print int($MINUTES*60+120)}") \
        $PY benchmarks/train_budget.py --arch "$v" --minutes "$MINUTES" --device "$DEVICE" \
        ${LR:+--lr "$LR"} ${EMA_DECAY:+--ema-decay "$EMA_DECAY"} \
        --run-dir "runs/gpu/$name" > "runs/gpu/$name.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for v in $VARIANTS; do name=${v//,/_}; echo "-- $name"; tail -n 4 "runs/gpu/$name.log"; done

echo "== samples"
for v in $VARIANTS; do
    name=${v//,/_}
    mkdir -p "runs/gpu/pack_$name"
    for g in $GUIDANCE; do
        w=${g%%@*}; interval=()
        if [ "$g" != "$w" ]; then range=${g#*@}; interval=(--guidance-interval "${range/-/,}"); fi
        timeout 120 $PY -m nbutils sample --checkpoint "runs/gpu/$name" --n "$N" --class all --guidance "$w" \
            "${interval[@]}" --sampler dpm --steps 20 --seed 0 --device "$DEVICE" --batch-size 2500 --no-progress \
            --out "runs/gpu/pack_$name/samples_g$g.npz"
    done
done

echo "== pack"
for v in $VARIANTS; do
    name=${v//,/_}
    d=runs/gpu/$name
    last_grid=$(ls "$d"/unet_samples_epoch*.png 2>/dev/null | tail -n 1)
    $PY - "$d" <<'EOF'
import sys, torch
from nbutils.checkpoints import export_model
d = sys.argv[1]
export_model(f"{d}/unet.safetensors", f"{d}/unet_fp16.safetensors", "unet", dtype=torch.float16)
EOF
    tar -cf "$OUT/model_$name.tar" "$d"/unet_fp16.safetensors "$d"/unet_fp16.json "$d"/unet.json "$d"/vae.json \
        "$d.log" ${last_grid:+"$last_grid"}
    tar -cf "$OUT/samples_$name.tar" -C "runs/gpu/pack_$name" .
done
ls -la "$OUT"
date -u
