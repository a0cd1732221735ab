#!/usr/bin/env bash
# The GPU rows of benchmarks/training.py in one call (issue: scale out): the real train_unet loop on one GPU in
# float32, bf16 autocast, and bf16 + torch.compile, for the `cpu` preset's UNet and the `full` preset's, each
# with the projected wall time of 100 epochs. About 3 minutes on an H100/H200 (compile warms up first).
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_training.sh             # on the GPU machine
#   OUT=/tmp/x DEVICE=cpu STEPS=3 WARMUP=1 PRESETS=smoke PY=.venv/bin/python bash benchmarks/gpu_training.sh
#                                                                # the same path on a CPU (a check of the script)
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
STEPS=${STEPS:-100}
WARMUP=${WARMUP:-30}
PRESETS=${PRESETS:-"cpu full"}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/training.log") 2>&1

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
for preset in $PRESETS; do
    for flags in "--mixed-precision no" "--mixed-precision bf16" "--mixed-precision bf16 --compile"; do
        echo "== $preset $flags"
        # shellcheck disable=SC2086  # $flags is several words on purpose
        timeout 240 $PY benchmarks/training.py --device "$DEVICE" --processes 1 --preset "$preset" \
            --steps "$STEPS" --warmup "$WARMUP" $flags
    done
done
date -u
