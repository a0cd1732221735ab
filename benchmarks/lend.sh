#!/usr/bin/env bash
# The reference run (python -m benchmarks full_gpu) on a lent GPU, in the background, polled from short calls.
#
#   bash benchmarks/lend.sh data                 # here, before the lend: copy the dataset to data/FashionMNIST/raw
#   bash benchmarks/lend.sh start 540            # call 1 on the device (carry data/FashionMNIST): start, wait ≤ 540 s
#   bash benchmarks/lend.sh wait 540             # call 2, at once (a machine stays warm 30 s): wait again, ≤ 540 s
#   bash benchmarks/lend.sh ddpm W               # every-step DDPM, 10,000 samples of the shipped UNet at guidance W
#
# A device call may last 600 s and the machine is handed back when idle, so the run cannot live in the call: `start`
# launches full_gpu detached (setsid) on runs/full and returns when it ends or the wait is up; `wait` keeps watching
# it. Each call copies what there is into $OUT: the record (one JSON line), lend.tar.gz (the log, the card, both
# models' histories and step losses) and, once the run is done, the run as a Hub-format folder with float16
# weights (`nbutils export --dtype float16`) in a tar split into parts of at most 15 MiB (a returned file may
# hold 16 MiB, and 8 files come back): here, `cat weights.tar.part-* | tar -xf - -C checkpoints/full` (the
# loader checks every tensor against the digest in the file's metadata). If the CUDA-graph run fails for any reason
# other than its budget, the script starts it again with --no-cuda-graph, which resumes the run where it stopped.
# Settings (environment): BUDGET (training seconds, default 600), PRESET (full), DEVICE (cuda), N (10000),
# RUN (runs/full), PYTHON (python3), OUT (where results go; required for start and wait).
set -u
BUDGET=${BUDGET:-600} PRESET=${PRESET:-full} DEVICE=${DEVICE:-cuda} N=${N:-10000} RUN=${RUN:-runs/full}
PYTHON=${PYTHON:-python3}

running() { [ -f "$RUN/lend.pid" ] && kill -0 "$(cat "$RUN/lend.pid")" 2>/dev/null; }

launch() {  # $1: extra full_gpu flags
    mkdir -p "$RUN"
    rm -f "$RUN/lend.rc"
    echo "== $(date -u +%FT%TZ) full_gpu $1" >> "$RUN/lend.log"
    setsid nohup bash -c "echo \$\$ > $RUN/lend.pid
        $PYTHON -m benchmarks full_gpu --preset $PRESET --device $DEVICE --run-dir $RUN --n $N --checkpoint-every 10 \
            --no-progress --budget-s $BUDGET --out $RUN/record.jsonl $1 >> $RUN/lend.log 2>&1
        echo \$? > $RUN/lend.rc" > /dev/null 2>&1 &
    sleep 2
}

collect() {  # at most 8 files come back: one bundle of the small ones, the record, the weights in parts
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RUN/card.csv" 2>/dev/null
    (cd "$RUN" && tar -czf "$OUT/lend.tar.gz" $(ls lend.log card.csv record.jsonl ./*_history.json ./*_steps.jsonl \
        2>/dev/null))
    cp "$RUN/record.jsonl" "$OUT/record.jsonl" 2>/dev/null
    if grep -q '"stage": "done"' "$RUN/record.jsonl" 2>/dev/null; then
        $PYTHON -m nbutils export "$RUN" "$RUN/f16" --dtype float16 > /dev/null &&
        tar -cf - -C "$RUN/f16" . | split -b 15M -d - "$OUT/weights.tar.part-"
    fi
    ls -l "$OUT"
}

watch() {  # $1: seconds to wait at most
    local until=$((SECONDS + $1))
    while running && [ $SECONDS -lt "$until" ]; do sleep 5; done
    if ! running && [ -f "$RUN/lend.rc" ] && [ "$(cat "$RUN/lend.rc")" != 0 ] && ! grep -q -- '--no-cuda-graph' "$RUN/lend.log"
    then
        echo "full_gpu failed (exit $(cat "$RUN/lend.rc")); again without the CUDA graph, resuming"
        rm -f "$RUN/lend.rc"
        launch --no-cuda-graph
        while running && [ $SECONDS -lt "$until" ]; do sleep 5; done
    fi
    tail -n 25 "$RUN/lend.log"
    running && echo "still running: call 'bash benchmarks/lend.sh wait SECONDS' again" || echo "finished"
    collect
}

case "${1:-}" in
    data)
        mkdir -p data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz data/FashionMNIST/raw/ &&
        ls -l data/FashionMNIST/raw ;;
    start)
        : "${OUT:?set OUT}"
        running || launch ""
        watch "${2:-540}" ;;
    wait)
        : "${OUT:?set OUT}"
        watch "${2:-540}" ;;
    ddpm)
        : "${OUT:?set OUT}"
        $PYTHON -m nbutils sample --checkpoint checkpoints --device "$DEVICE" --n "$N" --class all --seed 0 --no-progress \
            --recipe default --sampler ddpm --guidance "${2:?guidance W}" --guidance-interval 30,600 \
            --out "$OUT/ddpm_w$2.npz" ;;
    *)
        sed -n '2,8p' "$0"; exit 2 ;;
esac
