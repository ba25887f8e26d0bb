#!/usr/bin/env bash
# Whole-model training throughput of the CPU trainer for GPT-2 124M dense and each structured
# 124M config in scripts/configs, on tinyshakespeare: ms/step (mean of steps 2..STEPS), tokens/s,
# GFLOP/s (the trainer's own count) and the time relative to dense. With BASE_BIN (another build
# of train_gpt2, e.g. an older commit's), each config runs on it too, alternating with ours, and
# the last column is its time over ours.
# With TORCH=1, each config also runs in PyTorch on the same CPU (dev/bench/torch_models_cpu.py:
# dev/reference.py's model in float32, BTT-MoE computing every expert), alternating with ours; the
# last columns are its ms/step and its time over ours.
#   B=8 T=128 STEPS=5 bash dev/bench/models_cpu.sh
#   BASE_BIN=/tmp/old/train_gpt2 bash dev/bench/models_cpu.sh
#   TORCH=1 bash dev/bench/models_cpu.sh       (pip install torch first)
set -euo pipefail
cd "$(dirname "$0")/../.."

STEPS=${STEPS:-5}
B=${B:-8}
T=${T:-128}
CONFIGS=${CONFIGS:-"d12 $(ls scripts/configs/gpt2_124M_*.conf | tr '\n' ' ')"}

MAKELOG=$(mktemp)
trap 'rm -f "$MAKELOG"' EXIT
make -s train_gpt2 > "$MAKELOG" 2>&1 || { cat "$MAKELOG"; exit 1; }
source dev/bench/common.sh
ensure_tinyshakespeare

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo "build:   $(grep -E '^matmuls:' "$MAKELOG" | head -1 || echo 'matmuls: (already built)')"
echo "machine: ${cpu:-unknown CPU}, $(nproc) cpus; OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset (all)}; commit $(git rev-parse --short HEAD)"
echo "run:     train_gpt2 -e CONFIG -b $B -t $T -x $STEPS -v 0 -s 0   (mean of steps 2..$STEPS)${BASE_BIN:+; baseline $BASE_BIN}"
if [ "${TORCH:-0}" = 1 ]; then
    tv=$(python3 -c 'import torch; print(torch.__version__, torch.get_num_threads())' 2>/dev/null) ||
        { echo "models_cpu.sh: TORCH=1 but PyTorch is not installed; pip install torch" >&2; exit 2; }
    echo "torch:   PyTorch ${tv% *}, ${tv#* } threads, float32: dev/bench/torch_models_cpu.py CONFIG -b $B -t $T --steps $STEPS"
fi
echo

# mean ms/step and GFLOP/s of steps 2..STEPS of one run
run_ms() {
    local bin=$1 conf=$2 log
    log=$("$bin" -e "$conf" -b "$B" -t "$T" -x "$STEPS" -v 0 -s 0 -i "$TRAIN" 2>&1) || { echo "$log" | tail -n 5 >&2; return 1; }
    echo "$log" | awk '
        /^step / {  # "... | 561.31 ms | 456 tok/s | 173.41 GFLOP/s" (BTT-MoE adds fields before them)
            ms = $0; sub(/ ms \|.*/, "", ms); sub(/.*\| /, "", ms)
            gf = $0; sub(/ GFLOP\/s.*/, "", gf); sub(/.*\| /, "", gf)
            if (++steps >= 2) { sum += ms; gsum += gf; k++ }
        }
        END { if (k == 0) exit 1; printf "%.1f %.1f\n", sum / k, gsum / k }'
}

printf '%-34s %10s %10s %10s %11s' config ms/step tokens/s GFLOP/s time/dense
[ -n "${BASE_BIN:-}" ] && printf ' %14s %9s' "baseline ms" speedup
[ "${TORCH:-0}" = 1 ] && printf ' %10s %11s' "torch ms" "torch/ours"
echo
dense_ms=""
for conf in $CONFIGS; do
    read -r ms gf < <(run_ms ./train_gpt2 "$conf")
    [ -z "$dense_ms" ] && dense_ms=$ms
    name=$(basename "$conf" .conf)
    printf '%-34s %10.1f %10.0f %10.1f %11.3f' "$name" "$ms" "$(awk -v m="$ms" -v bt=$((B * T)) 'BEGIN {print bt / (m / 1000)}')" "$gf" \
        "$(awk -v m="$ms" -v d="$dense_ms" 'BEGIN {print m / d}')"
    if [ -n "${BASE_BIN:-}" ]; then
        read -r bms _ < <(run_ms "$BASE_BIN" "$conf")
        printf ' %14.1f %8.2fx' "$bms" "$(awk -v a="$bms" -v b="$ms" 'BEGIN {print a / b}')"
    fi
    if [ "${TORCH:-0}" = 1 ]; then
        tms=$(python3 dev/bench/torch_models_cpu.py "$conf" -b "$B" -t "$T" --steps "$STEPS" | sed -n 's/^RESULT .* ms=//p')
        printf ' %10.1f %10.2fx' "$tms" "$(awk -v a="$tms" -v b="$ms" 'BEGIN {print a / b}')"
    fi
    echo
done
