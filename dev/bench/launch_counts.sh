#!/usr/bin/env bash
# launch_counts.sh: the GPU trainer's kernel launches and cuBLAS calls per training step, counted
# on the CPU CUDA simulator (tests/cuda_sim, SIM_PROFILE=2), for each config: a run of 1 step and
# a run of 3, the difference halved (so start-up work is not counted). A count, not a timing: it
# says how much of a step could be launch overhead on a GPU, and where the launches come from.
#   bash dev/bench/launch_counts.sh                      # GPT-2 124M dense and scripts/configs/gpt2_124M_*.conf
#   CONFIGS="d12 my.conf" TOP=40 bash dev/bench/launch_counts.sh
#   CONFIGS=scripts/configs/gpt2_124M_btt_moe.conf FLAGS="-mg 1" bash dev/bench/launch_counts.sh   # with trainer flags
# Needs build/cuda_sim/train_gpt2cu (make build/cuda_sim/train_gpt2cu) and the tinyshakespeare
# shards (python3 data/tinyshakespeare.py). B = 1, T = 16: the counts do not depend on them, and the
# simulator's naive GEMMs take a few seconds per step at width 768.
set -eu
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/cuda_sim/train_gpt2cu}
DATA=${DATA:-data/tinyshakespeare}
CONFIGS=${CONFIGS:-"d12 $(ls scripts/configs/gpt2_124M_*.conf | tr '\n' ' ')"}
TOP=${TOP:-12}
FLAGS=${FLAGS:-}  # more trainer flags for every run (words)
[ -x "$BIN" ] || { echo "error: $BIN not built: make $BIN" >&2; exit 1; }
[ -f "$DATA/tiny_shakespeare_train.bin" ] || { echo "error: no $DATA/tiny_shakespeare_train.bin: python3 data/tinyshakespeare.py" >&2; exit 1; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC'), $BIN${FLAGS:+ $FLAGS}"
printf '%-45s %9s %9s %9s\n' config "per step" kernels cuBLAS
for c in $CONFIGS; do
    for x in 1 3; do
        if ! SIM_PROFILE=2 "$BIN" -e "$c" -i "$DATA/tiny_shakespeare_train.bin" -j "$DATA/tiny_shakespeare_val.bin" -b 1 -t 16 -x $x \
            -v 0 -s 0 -fa 1 $FLAGS > "$W/out_$x" 2> "$W/err_$x"; then  # FLAGS: words
            echo "error: $c: the run of $x steps failed:" >&2; tail -n 5 "$W/err_$x" "$W/out_$x" >&2; exit 1
        fi
    done
    # "  <seconds> s <calls> x  <name>" lines of both runs -> per-step calls by name
    awk '/^ +[0-9.]+ s +[0-9]+ x  / { n = $3; $1 = $2 = $3 = $4 = ""; sub(/^ +/, ""); c[$0] += (FILENAME ~ /err_3$/ ? n : -n) }
         END { for (k in c) printf "%.1f\t%s\n", c[k] / 2, k }' "$W/err_1" "$W/err_3" | sort -t$'\t' -k1,1 -g -r > "$W/diff"
    awk -F'\t' -v c="$c" '{ t += $1; if ($2 ~ /^cublas/) b += $1 } END { printf "%-45s %9.0f %9.0f %9.0f\n", c, t, t - b, b }' "$W/diff"
    head -n "$TOP" "$W/diff" | awk -F'\t' '$1 > 0 { printf "    %7.0f  %s\n", $1, $2 }'
done
