#!/usr/bin/env bash
# GPU: build train_gpt2cu and test_gpt2cu, run the GPU test mode, then time training steps of
# GPT-2 124M (d12) at B=16, 32, 64 and 350M (d24) at B=8, 16, 32, T=1024, printing ms/step,
# tokens/s and MFU as train_gpt2cu reports them (mean of steps 2..STEPS; step 1 warms up).
#   bash dev/bench/gpu.sh                      (or: make bench-gpu)
#   STEPS=20 RECOMPUTE=1 CONFIGS="d12:16 d12:32 d12:64 d24:8 d24:16 d24:32" bash dev/bench/gpu.sh
#   BUILD=0 TEST=0 bash dev/bench/gpu.sh       (the binaries already there, no test mode: dev/bench/device_run.sh)
#   ATTN="1 2" bash dev/bench/gpu.sh           attention paths (-fa) to time: 1 ours, 2 cuDNN, 0 cuBLAS
#                                              (default: "1 2" when train_gpt2cu has cuDNN, else "1")
# A configuration that runs out of memory is reported and skipped; the test mode failing stops
# the script (exit 1).
set -uo pipefail
cd "$(dirname "$0")/../.."

STEPS=${STEPS:-20}
T=${T:-1024}
RECOMPUTE=${RECOMPUTE:-1}
CONFIGS=${CONFIGS:-"d12:16 d12:32 d12:64 d24:8 d24:16 d24:32"}
BUILD=${BUILD:-1}
TEST=${TEST:-1}

echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "device:  $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | head -1)"
else
    echo "device:  nvidia-smi not found"
fi
echo "nvcc:    $(nvcc --version 2>/dev/null | tail -1)"
echo

[ "$BUILD" = 0 ] || make -B train_gpt2cu test_gpt2cu 2>&1 | grep -vE '^(OpenMP|CBLAS|MPI|nvcc):' || true
TRAIN_BIN=${TRAIN_BIN:-./train_gpt2cu}  # device_run.sh: the cuDNN build when it loads
[ -x "$TRAIN_BIN" ] && [ -x ./test_gpt2cu ] || { echo "build failed"; exit 1; }

if [ "$TEST" != 0 ]; then
    echo "== test mode: ./test_gpt2cu"
    ./test_gpt2cu > /tmp/test_gpt2cu.log 2>&1
    rc=$?
    grep -E '^(FAIL|# )' /tmp/test_gpt2cu.log | head -60
    tail -1 /tmp/test_gpt2cu.log
    if [ $rc -ne 0 ]; then echo "test_gpt2cu failed (rc $rc); full log in /tmp/test_gpt2cu.log"; exit 1; fi
    echo
fi

source dev/bench/common.sh
ensure_tinyshakespeare

if [ -z "${ATTN:-}" ]; then
    ATTN=1
    "$TRAIN_BIN" -h 2>/dev/null | grep -q "cuDNN's fused flash attention (in this build)" && ATTN="1 2"
fi
echo "== training throughput: $TRAIN_BIN -e MODEL -b B -t $T -x $STEPS -r $RECOMPUTE -fa ATTN -v 0 -s 0 (fresh random init; tinyshakespeare)"
printf '%-6s %4s %4s %10s %12s %8s %s\n' model B -fa ms/step tokens/s MFU note
for cfg in $CONFIGS; do
    model=${cfg%%:*}
    B=${cfg##*:}
    for fa in $ATTN; do
        log=/tmp/gpu_bench_${model}_b${B}_fa${fa}.log
        "$TRAIN_BIN" -e "$model" -i "$TRAIN" -j "$TRAIN" -b "$B" -t "$T" -x "$STEPS" -r "$RECOMPUTE" -fa "$fa" -v 0 -s 0 -l 1e-4 > "$log" 2>&1
        rc=$?
        line=$(grep 'total average iteration time' "$log" | tail -1)
        if [ $rc -ne 0 ] || [ -z "$line" ]; then
            why=$(grep -m1 '^error' "$log" || tail -1 "$log")
            printf '%-6s %4s %4s %10s %12s %8s %s\n' "$model" "$B" "$fa" - - - "failed: ${why:0:90}"
            continue
        fi
        ms=$(echo "$line" | sed -E 's/.*time: ([0-9.]+) ms.*/\1/')
        tok=$(echo "$line" | sed -E 's/.*\| ([0-9]+) tok\/s.*/\1/')
        mfu=$(echo "$line" | grep -oE 'MFU [0-9.]+%' | cut -d' ' -f2)
        note=$(grep -m1 'GPU memory allocated' "$log" | tr -s ' ' | cut -d'|' -f3)
        grep -q '^note: -fa 2' "$log" && note="$note; cuDNN refused the shape, ran -fa 1"
        printf '%-6s %4s %4s %10s %12s %8s %s\n' "$model" "$B" "$fa" "$ms" "$tok" "${mfu:-n/a}" "$note"
    done
done
echo
echo "goal (issue 4): >= 550K tokens/s for 124M on one H100 SXM (about 45% MFU); llm.c: about 470K tokens/s"
