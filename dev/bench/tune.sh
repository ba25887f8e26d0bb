#!/usr/bin/env bash
# dev/bench/tune.sh: -at 1's table for each structured 124M config: every structured layer's
# kernels (-sk 0..5, dense GEMMs on the materialized weight, BTT-MoE grouped by set of experts as
# -mg 1, on the plans or on -sk 1, 2, 5's fused kernels) timed forward and backward apart at the
# trainer's own shapes and rows, the choice marked (a pass each: one path's forward may run with
# another's backward), then the run's ms/step with that choice next to -sk 0's. The most figures per
# second of GPU: one startup per config and batch size.
#   bash dev/bench/tune.sh
#   CONFIGS="scripts/configs/gpt2_124M_btt4.conf:64" STEPS=4 bash dev/bench/tune.sh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
TRAIN_BIN=${TRAIN_BIN:-./train_gpt2cu}
STEPS=${STEPS:-4}
T=${T:-1024}
CONFIGS=${CONFIGS:-"scripts/configs/gpt2_124M_btt4.conf:16 scripts/configs/gpt2_124M_btt4.conf:64
                    scripts/configs/gpt2_124M_monarch4_mlp.conf:16 scripts/configs/gpt2_124M_btt_moe.conf:16"}
[ -x "$TRAIN_BIN" ] || { echo "$TRAIN_BIN not built (make $(basename "$TRAIN_BIN"))"; exit 1; }
# shellcheck source=dev/bench/common.sh disable=SC1091
source dev/bench/common.sh
ensure_tinyshakespeare

rc_all=0
ms_of() { grep 'total average iteration time' "$1" | tail -1 | sed -E 's/.*time: ([0-9.]+) ms.*/\1/'; }
for cfg in $CONFIGS; do
    IFS=: read -r model B <<< "$cfg"
    base=(-e "$model" -i "$TRAIN" -j "$TRAIN" -b "$B" -t "$T" -x "$STEPS" -v 0 -s 0 -l 1e-4)
    at=$(mktemp "${TMPDIR:-/tmp}/tune.XXXXXX") sk0=$(mktemp "${TMPDIR:-/tmp}/tune.XXXXXX")
    echo "== $(basename "$model" .conf), B=$B T=$T: $TRAIN_BIN ${base[*]} -at 1"
    t0=$(date +%s.%N)
    at1_run "$at" "$TRAIN_BIN" "${base[@]}" -at 1  # past a choice that dies (-ax), with a note
    rc=$?
    t1=$(date +%s.%N)
    if [ $rc -ne 0 ] || ! grep -q "^-at 1: each structured layer's kernels" "$at"; then
        echo "failed (exit $rc): $(grep -m1 '^error' "$at" || tail -n 1 "$at")"
        rc_all=1
        continue
    fi
    sed -n "/^-at 1: each structured layer's kernels/,/^+---/p" "$at" | sed '$d'
    grep '^warning: -at 1' "$at"
    grep -E '^\| (-at 1: |BTT-MoE grouping|GPU memory)' "$at" | tr -s ' '
    "$TRAIN_BIN" "${base[@]}" > "$sk0" 2>&1
    a=$(ms_of "$at") b=$(ms_of "$sk0")
    echo "ms/step (mean of steps 2..$STEPS): -at 1 ${a:-?}, -sk 0 ${b:-?}$([ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" 'BEGIN { printf " (-at 1 %.2fx the speed of -sk 0)", b / a }'); -at 1's whole run $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
    rm -f "$at" "$sk0"
    echo
done
exit $rc_all
