#!/usr/bin/env bash
# Every number the top-level README quotes about the shipped models, re-measured in one go (run it alone on the
# machine: the timings are part of it). What each step prints goes to $OUT/shipped_model.log; the sample files
# stay in $OUT.
#
#   OUT=runs/remeasure bash benchmarks/shipped_model.sh                   # ≈ 55 min on the 2-core dev machine
#   OUT=runs/remeasure CKPT=runs/candidate bash benchmarks/shipped_model.sh   # a candidate before shipping it
#
# Steps: VAE quality; the VAE ceiling (10,000 reconstructions, evaluated); the sampler table (1,000 samples
# per sampler, DDPM 1000 steps included: ≈ 17 of the minutes); the guidance screening at N = 2,000 (20 even steps,
# then the shipped 4 + 12 schedule); 10,000
# samples per README evaluation row, each evaluated; the end-to-end CLI timings; the two README pictures
# (only when CKPT is checkpoints/). SKIP_SAMPLERS=1 leaves out the sampler table; N_EVAL, N_SWEEP, N_SAMPLERS
# and N_CLI (default 10000, 2000, 1000, 1000) shrink it for a check of the script, e.g. with CKPT=runs/smoke.
set -euo pipefail
OUT=${OUT:?set OUT to a folder for the results}
CKPT=${CKPT:-checkpoints}
PY=${PY:-.venv/bin/python}
# guidance screening at 20 even steps, then with the shipped schedule (16 steps, 12 of them on t <= 400)
SPECS=${SPECS:-"1 2 3 3@300-1000 3@0-600 2.5@0-400 3@0-400 3.5@0-400"}
SPLIT_SPECS=${SPLIT_SPECS:-"2.5@0-400 2.75@0-400 3@0-400 2.75@0-400:bf16"}
RECIPE=${RECIPE:-"--recipe shipped"}   # nbutils.samplers.SHIPPED_RECIPE: 16 steps, 12 of them guided (w = 2.75) on t <= 400
# README evaluation rows: "name|sample flags"
ROWS=${ROWS:-"g2|--steps 20 --guidance 2
g3|--steps 20 --guidance 3
g3_0-400|--steps 20 --guidance 3 --guidance-interval 0,400
recipe|$RECIPE
recipe_bf16|$RECIPE --precision bf16
g3_0-400_s50|--steps 50 --guidance 3 --guidance-interval 0,400"}
N_EVAL=${N_EVAL:-10000}; N_SWEEP=${N_SWEEP:-2000}; N_SAMPLERS=${N_SAMPLERS:-1000}; N_CLI=${N_CLI:-1000}
CLI_FLAGS=("--steps 20" "$RECIPE" "$RECIPE --precision bf16")
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

echo "== VAE quality"
$PY benchmarks/vae_quality.py --checkpoint "$CKPT"

echo "== VAE ceiling: 10,000 test reconstructions"
$PY -m nbutils reconstruct --n "$N_EVAL" --checkpoint "$CKPT" --out "$OUT/rec10k.npz"
$PY -m nbutils evaluate "$OUT/rec10k.npz" --no-novelty

if [ -z "${SKIP_SAMPLERS:-}" ]; then
    echo "== samplers (1,000 samples each, guidance 3)"
    $PY benchmarks/sampling.py --checkpoint "$CKPT" --n "$N_SAMPLERS" --configs dpm:10,dpm:20,dpm:50,ddim:20,ddim:50,ddpm:1000
fi

echo "== guidance screening, N = 2,000"
# shellcheck disable=SC2086
$PY benchmarks/guidance_sweep.py --checkpoint "$CKPT" --n "$N_SWEEP" $SPECS
# shellcheck disable=SC2086
$PY benchmarks/guidance_sweep.py --checkpoint "$CKPT" --n "$N_SWEEP" --steps 16 --guided-steps 12 $SPLIT_SPECS

echo "== README evaluation rows, N = 10,000"
while IFS='|' read -r name flags; do
    echo "-- $name: $flags"
    # shellcheck disable=SC2086
    $PY -m nbutils sample --checkpoint "$CKPT" --n "$N_EVAL" --class all $flags --sampler dpm --seed 0 \
        --no-progress --out "$OUT/s10k_$name.npz"
    $PY -m nbutils evaluate "$OUT/s10k_$name.npz"
done <<< "$ROWS"

echo "== CLI end to end, 1,000 samples (wall seconds)"
for flags in "${CLI_FLAGS[@]}"; do
    for i in 1 2; do
        # shellcheck disable=SC2086
        /usr/bin/time -f "cli wall %e s: $flags" $PY -m nbutils sample --checkpoint "$CKPT" --n "$N_CLI" \
            $flags --no-progress --out "$OUT/cli.npz" > /dev/null
    done
done

if [ "$CKPT" = checkpoints ]; then
    echo "== README pictures"
    # shellcheck disable=SC2086
    $PY -m nbutils sample --checkpoint checkpoints --n 100 --class all $RECIPE --sampler dpm --seed 0 \
        --out docs/img/samples.png
    $PY -m nbutils reconstruct --n 100 --checkpoint checkpoints --out docs/img/vae_reconstructions.png
fi
echo "== done $(date -u), $SECONDS s"
