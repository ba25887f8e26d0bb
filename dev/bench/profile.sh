#!/usr/bin/env bash
# dev/bench/profile.sh: where a training step's time goes, for GPT-2 124M dense and structured
# (train_gpt2cu -pt 2): each part of the step (every layer kind's forward and backward, linear
# layers by role and structure, the optimizer, the host's waits) with its ms per step, share and
# TFLOP/s, then the steps inside each structured layer (each plan op, BTT-MoE's routing, gathers
# and combine...), on tinyshakespeare from a fresh init. The profiled steps run slightly slower
# than unprofiled ones (an event per part, and per step with -pt 2); dev/bench/gpu.sh gives the
# throughput. PT=1: the first table only.
#   bash dev/bench/profile.sh
#   CONFIGS="d12:64 scripts/configs/gpt2_124M_btt4.conf:64 scripts/configs/gpt2_124M_btt4.conf:64:-sk,1" STEPS=6 bash dev/bench/profile.sh
#                                                       (MODEL:B, or MODEL:B:FLAGS with commas for spaces)
#   TRAIN_BIN=./train_gpt2 CONFIGS="d12:4" T=64 bash dev/bench/profile.sh      (the CPU trainer)
# Extra trainer flags go in FLAGS (e.g. FLAGS="-sk 1 -r 0").
set -uo pipefail
cd "$(dirname "$0")/../.."

TRAIN_BIN=${TRAIN_BIN:-./train_gpt2cu}
STEPS=${STEPS:-6}
T=${T:-1024}
CONFIGS=${CONFIGS:-"d12:64 scripts/configs/gpt2_124M_btt4.conf:64 scripts/configs/gpt2_124M_btt4.conf:64:-sm,2
                    scripts/configs/gpt2_124M_btt4.conf:64:-sk,3 scripts/configs/gpt2_124M_btt4.conf:64:-sk,4
                    scripts/configs/gpt2_124M_btt4.conf:64:-at,1
                    scripts/configs/gpt2_124M_btt_moe.conf:64 scripts/configs/gpt2_124M_btt_moe.conf:64:-sk,1"}
FLAGS=${FLAGS:-}
PT=${PT:-2}
[ -x "$TRAIN_BIN" ] || { echo "$TRAIN_BIN not built (make $(basename "$TRAIN_BIN"))"; exit 1; }
source dev/bench/common.sh
ensure_tinyshakespeare

rc_all=0
for cfg in $CONFIGS; do
    IFS=: read -r model B extra <<< "$cfg"
    log=$(mktemp "${TMPDIR:-/tmp}/profile.XXXXXX")
    # shellcheck disable=SC2086  # FLAGS: several words
    cmd=("$TRAIN_BIN" -e "$model" -i "$TRAIN" -j "$TRAIN" -b "$B" -t "$T" -x "$STEPS" -v 0 -s 0 -l 1e-4 -pt "$PT" $FLAGS ${extra//,/ })
    echo "== profile: ${cmd[*]}"
    at1_run "$log" "${cmd[@]}"  # (-at 1: past a choice that dies while it is timed, -ax, with a note)
    rc=$?
    if [ $rc -ne 0 ] || ! grep -q '^profiled step time' "$log"; then
        echo "failed (exit $rc): $(grep -m1 '^error' "$log" || tail -n 1 "$log")"
        rc_all=1
    else
        grep -m1 'GPU memory allocated' "$log" | tr -s ' '
        sed -n '/^total average iteration time/,/^profiled step time/p' "$log"
        sed -n '/^steps inside the layers/,$p' "$log"
    fi
    echo
    rm -f "$log"
done
exit $rc_all
