#!/usr/bin/env bash
# The reference run (python -m benchmarks full_gpu) on a lent GPU, in the background, polled from short calls.
#
#   bash benchmarks/lend.sh data                 # here, before the lend: copy the dataset to data/FashionMNIST/raw
#   bash benchmarks/lend.sh start 540            # call 1 on the device (carry data/FashionMNIST): start, wait ≤ 540 s
#   bash benchmarks/lend.sh wait 540             # call 2, at once (a machine stays warm 30 s): wait again, ≤ 540 s
#   bash benchmarks/lend.sh ddpm W               # every-step DDPM, 10,000 samples of the shipped UNet at guidance W
#
# A device call may last 600 s (less when less device time is left: keep each wait inside it) and the machine is
# handed back when idle, so the run cannot live in the call: `start` launches full_gpu detached (setsid) on runs/full
# and returns when it ends or the wait is up; `wait` keeps watching it. Each call leaves in $OUT, also when it is
# stopped at its limit: record.jsonl (full_gpu's record, one JSON line per invocation that got to the end),
# lend.tar.gz (the log, the card, both models' histories and step losses) and, once the run is done, the run as a
# Hub-format folder with float16 weights and the shipped recipe (`nbutils export --dtype float16 --recipe shipped`)
# in a tar split into parts of at most 15 MiB — a call returns at most 8 files, 16 MiB each, 64 MiB in all; the
# `full` models are about 53 MiB in float16. Here: `mkdir -p runs/full-f16 && cat weights.tar.part-* | tar -xf - -C
# runs/full-f16` (the loader checks every tensor against the digest in the file's metadata).
# If a CUDA-graph run fails (not a budget stop, which exits 0), the script starts it again once with
# --no-cuda-graph and keeps that for later starts; the new run resumes from the last checkpoint (every 10 epochs,
# or where a budget stop saved). BUDGET counts from the first launch on this machine (start-up and compilation
# included), so a relaunch gets what is left of it.
# Settings (environment): BUDGET (seconds, default 600), PRESET (full), DEVICE (cuda), N (10000), RUN (runs/full),
# PYTHON (python3), OUT (where results go; required for start and wait).
set -u
BUDGET=${BUDGET:-600} PRESET=${PRESET:-full} DEVICE=${DEVICE:-cuda} N=${N:-10000} RUN=${RUN:-runs/full}
PYTHON=${PYTHON:-python3}

running() { [ -s "$RUN/lend.pid" ] && kill -0 "$(cat "$RUN/lend.pid")" 2>/dev/null; }

launch() {  # $1: extra full_gpu flags ("" or --no-cuda-graph)
    mkdir -p "$RUN"
    [ -f "$RUN/lend.t0" ] || date +%s > "$RUN/lend.t0"
    local left=$((BUDGET - ($(date +%s) - $(cat "$RUN/lend.t0"))))
    [ "$left" -ge 60 ] || { echo "less than a minute of BUDGET left; not starting again"; return 1; }
    rm -f "$RUN/lend.rc" "$RUN/lend.pid"
    echo "$1" > "$RUN/lend.flags"
    echo "== $(date -u +%FT%TZ) full_gpu --budget-s $left $1" >> "$RUN/lend.log"
    # shellcheck disable=SC2016  # expanded by the inner shell, from its arguments
    setsid nohup bash -c 'echo $$ > "$1/lend.pid"
        "$2" -m benchmarks full_gpu --preset "$3" --device "$4" --run-dir "$1" --n "$5" --checkpoint-every 10 \
            --no-progress --budget-s "$6" --out "$1/record.jsonl" $7 >> "$1/lend.log" 2>&1
        echo $? > "$1/lend.rc"' _ "$RUN" "$PYTHON" "$PRESET" "$DEVICE" "$N" "$left" "$1" > /dev/null 2>&1 &
    for _ in $(seq 50); do [ -s "$RUN/lend.pid" ] && break; sleep 0.1; done
}

collect() {  # what comes back: the record, one bundle of the small files, the finished run's weights in parts
    mkdir -p "$OUT"
    [ -d "$RUN" ] || return 0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RUN/card.csv" 2>/dev/null
    (cd "$RUN" && tar -czf "$OUT/lend.tar.gz" $(ls lend.log card.csv record.jsonl ./*_history.json ./*_steps.jsonl \
        2>/dev/null))
    cp "$RUN/record.jsonl" "$OUT/record.jsonl" 2>/dev/null
    if [ -z "${QUICK:-}" ] && grep -q '"stage": "done"' "$RUN/record.jsonl" 2>/dev/null; then
        rm -rf "$RUN/f16" "$OUT"/weights.tar.part-*
        $PYTHON -m nbutils export "$RUN" "$RUN/f16" --dtype float16 --recipe shipped > /dev/null &&
        tar -cf - -C "$RUN/f16" . | split -b 15M -d - "$OUT/weights.tar.part-"
    fi
    ls -l "$OUT"
}

watch() {  # $1: seconds to wait at most
    local until=$((SECONDS + $1))
    QUICK=1 collect > /dev/null  # something comes back even if the call is stopped at its limit
    trap 'QUICK=1 collect; exit 124' TERM INT
    while running && [ $SECONDS -lt "$until" ]; do sleep 5; done
    if ! running && [ -s "$RUN/lend.rc" ] && [ "$(cat "$RUN/lend.rc")" != 0 ] && [ -z "$(cat "$RUN/lend.flags")" ]
    then
        echo "full_gpu failed (exit $(cat "$RUN/lend.rc")); again without the CUDA graph, resuming"
        launch --no-cuda-graph && while running && [ $SECONDS -lt "$until" ]; do sleep 5; done
    fi
    tail -n 25 "$RUN/lend.log"
    if running; then echo "still running: call 'bash benchmarks/lend.sh wait SECONDS' again"
    else echo "not running (exit status $(cat "$RUN/lend.rc" 2>/dev/null || echo unknown))"; fi
    collect
}

case "${1:-}" in
    data)
        mkdir -p data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz data/FashionMNIST/raw/ &&
        ls -l data/FashionMNIST/raw ;;
    start|wait)
        : "${OUT:?set OUT}"
        OUT=$(realpath -m "$OUT")
        if [ "$1" = start ] && ! running; then
            launch "$(cat "$RUN/lend.flags" 2>/dev/null)" || exit 1  # once the graph path failed, keep it off
        elif [ "$1" = wait ] && [ ! -f "$RUN/lend.log" ]; then
            echo "no run in $RUN on this machine (a fresh one: the last was handed back); use start"; exit 1
        fi
        watch "${2:-540}" ;;
    ddpm)
        : "${OUT:?set OUT}"
        # written in runs/ first: a call cut off at its limit leaves runs/ddpm_wW.npz.partial.npz, and the same
        # command in the next call (on the machine still held) continues from its last batch
        mkdir -p runs
        $PYTHON -m nbutils sample --checkpoint checkpoints --device "$DEVICE" --n "$N" --class all --seed 0 --no-progress \
            --recipe default --sampler ddpm --guidance "${2:?guidance W}" --guidance-interval 30,600 \
            --out "runs/ddpm_w$2.npz" && cp "runs/ddpm_w$2.npz" "$OUT/" ;;
    *)
        sed -n '2,8p' "$0"; exit 2 ;;
esac
