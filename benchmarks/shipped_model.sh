#!/usr/bin/env bash
# Every number the top-level README quotes about the shipped models, re-measured in one go (run the timed parts
# alone on the machine: the timings are part of it). What each step prints goes to $OUT/shipped_model.log; the sample files
# stay in $OUT.
#
#   OUT=runs/remeasure bash benchmarks/shipped_model.sh                   # ≈ 55 min on dev-cpu, ≈ 80 on dev-cpu-amd
#   OUT=runs/remeasure CKPT=runs/candidate bash benchmarks/shipped_model.sh   # a candidate before shipping it
#   OUT=runs/remeasure PARTS="vae screening rows" bash benchmarks/shipped_model.sh   # some parts only
#
# Parts (PARTS, default all, in this order): vae — VAE quality and the VAE ceiling (10,000 reconstructions,
# evaluated); samplers — the sampler table (1,000 samples per sampler, SAMPLER_CONFIGS; DDPM with all its steps is
# ≈ 17 of the minutes on dev-cpu, ≈ 35 on dev-cpu-amd); screening — the guidance screening at N = 2,000 (SPECS with
# 20 even steps, LOGSNR_SPECS with 20 steps spaced evenly in log-SNR, SPLIT_SPECS with 4 + 12 steps; an empty list
# is skipped); rows — 10,000 samples per README evaluation row, each evaluated; cli — the
# end-to-end CLI timings; pictures — the two README pictures (only when CKPT is checkpoints/). The timed parts
# (samplers, cli) want the machine to themselves; the others can share it. N_EVAL, N_SWEEP, N_SAMPLERS and N_CLI
# (default 10000, 2000, 1000, 1000) shrink it for a check of the script, e.g. with CKPT=runs/smoke.
set -euo pipefail
OUT=${OUT:?set OUT to a folder for the results}
CKPT=${CKPT:-checkpoints}
PY=${PY:-.venv/bin/python}
PARTS=${PARTS:-"vae samplers screening rows cli pictures"}
SAMPLER_CONFIGS=${SAMPLER_CONFIGS:-dpm:10,dpm:20,dpm:50,ddim:20,ddim:50,ddpm:all}
# guidance screening at 20 even steps, at 20 log-SNR-spaced steps, then with 4 + 12 steps (16, 12 of them on the
# guided part t <= LO-HI's HI)
SPECS=${SPECS-"1 2 3 3@0-707 3@0-600 3.25@0-600 3.5@0-600 3.5@0-500"}
LOGSNR_SPECS=${LOGSNR_SPECS-"3@0-600 3.25@0-600 3@30-600 3.25@30-600 3.5@30-600"}
SPLIT_SPECS=${SPLIT_SPECS-""}
RECIPE=${RECIPE:-"--recipe shipped"}   # nbutils.samplers.SHIPPED_RECIPE: 20 log-SNR steps, w = 2.9375 on 30 <= t <= 600
# README evaluation rows: "name|sample flags"
ROWS=${ROWS:-"g2|--steps 20 --guidance 2
g3_0-600|--steps 20 --guidance 3 --guidance-interval 0,600
recipe|$RECIPE
recipe_bf16|$RECIPE --precision bf16"}
N_EVAL=${N_EVAL:-10000}; N_SWEEP=${N_SWEEP:-2000}; N_SAMPLERS=${N_SAMPLERS:-1000}; N_CLI=${N_CLI:-1000}
CLI_FLAGS=("--steps 20" "$RECIPE" "$RECIPE --precision bf16")
part() { [[ " $PARTS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/shipped_model.log") 2>&1

echo "== $(date -u) checkpoint $CKPT"
$PY -c "import torch, sys, platform; print('python', sys.version.split()[0], 'torch', torch.__version__, platform.processor() or platform.machine(), torch.get_num_threads(), 'threads')"
# bf16 autocast is refused where it would only be emulated (nbutils.config.bf16_supported): leave its rows out there
if [ "$($PY -c "from nbutils.config import bf16_supported; print(int(bf16_supported('cpu')))")" != 1 ]; then
    echo "this CPU has no native bf16: the bf16 rows and timings are left out"
    SPLIT_SPECS=$(echo "$SPLIT_SPECS" | tr ' ' '\n' | grep -v ':bf16' | tr '\n' ' ')
    ROWS=$(echo "$ROWS" | grep -v -- '--precision bf16')
    CLI_FLAGS=("--steps 20" "$RECIPE")
fi

if part vae; then
    echo "== VAE quality"
    $PY benchmarks/vae_quality.py --checkpoint "$CKPT"
    echo "== VAE ceiling: 10,000 test reconstructions"
    $PY -m nbutils reconstruct --n "$N_EVAL" --checkpoint "$CKPT" --out "$OUT/rec10k.npz"
    $PY -m nbutils evaluate "$OUT/rec10k.npz" --no-novelty
fi

if part samplers; then
    echo "== samplers (1,000 samples each, guidance 3)"
    $PY benchmarks/sampling.py --checkpoint "$CKPT" --n "$N_SAMPLERS" --configs "$SAMPLER_CONFIGS"
fi

if part screening; then
    echo "== guidance screening, N = 2,000"
    if [ -n "${SPECS// }" ]; then
        # shellcheck disable=SC2086
        $PY benchmarks/guidance_sweep.py --checkpoint "$CKPT" --n "$N_SWEEP" $SPECS
    fi
    if [ -n "${LOGSNR_SPECS// }" ]; then
        # shellcheck disable=SC2086
        $PY benchmarks/guidance_sweep.py --checkpoint "$CKPT" --n "$N_SWEEP" --spacing logsnr $LOGSNR_SPECS
    fi
    if [ -n "${SPLIT_SPECS// }" ]; then
        # shellcheck disable=SC2086
        $PY benchmarks/guidance_sweep.py --checkpoint "$CKPT" --n "$N_SWEEP" --steps 16 --guided-steps 12 $SPLIT_SPECS
    fi
fi

if part rows; then
    echo "== README evaluation rows, N = 10,000"
    while IFS='|' read -r name flags; do
        echo "-- $name: $flags"
        # shellcheck disable=SC2086
        $PY -m nbutils sample --checkpoint "$CKPT" --n "$N_EVAL" --class all $flags --sampler dpm --seed 0 \
            --no-progress --out "$OUT/s10k_$name.npz"
        $PY -m nbutils evaluate "$OUT/s10k_$name.npz"
    done <<< "$ROWS"
fi

if part cli; then
    echo "== CLI end to end, 1,000 samples (wall seconds)"
    for flags in "${CLI_FLAGS[@]}"; do
        for i in 1 2; do
            # shellcheck disable=SC2086
            /usr/bin/time -f "cli wall %e s: $flags" $PY -m nbutils sample --checkpoint "$CKPT" --n "$N_CLI" \
                $flags --no-progress --out "$OUT/cli.npz" > /dev/null
        done
    done
fi

if part pictures && [ "$CKPT" = checkpoints ]; then
    echo "== README pictures"
    # shellcheck disable=SC2086
    $PY -m nbutils sample --checkpoint checkpoints --n 100 --class all $RECIPE --sampler dpm --seed 0 \
        --out docs/img/samples.png
    $PY -m nbutils reconstruct --n 100 --checkpoint checkpoints --out docs/img/vae_reconstructions.png
fi
echo "== done $(date -u), $SECONDS s"
