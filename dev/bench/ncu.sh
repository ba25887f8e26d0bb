#!/usr/bin/env bash
# dev/bench/ncu.sh: the kernels of one GPT-2 124M training step under Nsight Compute: each kernel's
# launches, time, share, DRAM bandwidth (against the peak) and SM throughput, dense and structured.
# The trainer's -pt 1 opens the profiler's range at its last step only (cudaProfilerStart/Stop),
# so ncu (--profile-from-start off) replays that step's kernels and nothing else. Needs ncu with
# access to the GPU's counters (on this workplace's H200: the Firecracker runtime has it).
#   bash dev/bench/ncu.sh
#   CONFIGS="d12:16 scripts/configs/gpt2_124M_btt4.conf:16:-sk,1" PEAK_GBS=4800 bash dev/bench/ncu.sh
# Clocks are left alone (--clock-control none). Each kernel is replayed for its counters, so the
# run takes far longer than the step; the table's times are ncu's per-kernel durations.
set -uo pipefail
cd "$(dirname "$0")/../.."

TRAIN_BIN=${TRAIN_BIN:-./train_gpt2cu}
NCU=${NCU:-$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
T=${T:-1024}
PEAK_GBS=${PEAK_GBS:-4800}  # H200's HBM3e datasheet figure; pass the measured one when known
CONFIGS=${CONFIGS:-"d12:16 scripts/configs/gpt2_124M_btt4.conf:16:-sk,1 scripts/configs/gpt2_124M_btt_moe.conf:16:-sk,1"}
METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
[ -n "$NCU" ] && [ -x "$NCU" ] || { echo "ncu not found (set NCU=/path/to/ncu)"; exit 1; }
[ -x "$TRAIN_BIN" ] || { echo "$TRAIN_BIN not built (make $(basename "$TRAIN_BIN"))"; exit 1; }
source dev/bench/common.sh
ensure_tinyshakespeare
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ncu.XXXXXX")

rc_all=0
for cfg in $CONFIGS; do
    IFS=: read -r model B extra <<< "$cfg"
    # shellcheck disable=SC2086  # the flags: several words
    cmd=("$TRAIN_BIN" -e "$model" -i "$TRAIN" -j "$TRAIN" -b "$B" -t "$T" -x 2 -v 0 -s 0 -l 1e-4 -pt 1 ${extra//,/ })
    echo "== ncu: ${cmd[*]}"
    rep="$WORK/step"
    "$NCU" --clock-control none --profile-from-start off --metrics "$METRICS" -f -o "$rep" "${cmd[@]}" > "$WORK/run.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ] || [ ! -f "$rep.ncu-rep" ]; then
        echo "failed (exit $rc): $(grep -m1 -E '^(==ERROR==|error)' "$WORK/run.log" || tail -n 1 "$WORK/run.log")"
        rc_all=1
        continue
    fi
    "$NCU" -i "$rep.ncu-rep" --csv --page raw --metrics "$METRICS" > "$WORK/step.csv" 2> "$WORK/import.log"
    if ! python3 dev/bench/ncu_table.py "$WORK/step.csv" --peak-gbs "$PEAK_GBS"; then
        echo "the CSV's first lines:"; head -n 3 "$WORK/step.csv" | cut -c1-300
        rc_all=1
    fi
    echo
done
rm -rf "$WORK"
exit $rc_all
