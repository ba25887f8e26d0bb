#!/usr/bin/env bash
# dev/bench/lr_transfer_cpu.sh: does the structure-aware learning rate's constant carry over from
# one width to another? BTT rank 4 language models of widths 128 and 256, trained alike, each with
# base_width 32, 64, 128, 256, 512 and 768 (the default), and with the multipliers off (lr_mult 0).
# The multiplier of a core is base_width / (2 * fan_in) (DESIGN.md), so if the rule scales as it
# should with width, the best base_width is the same at both widths. About 55 minutes on 2 cores.
#   SHARED_DATA=../shared/data bash dev/bench/lr_transfer_cpu.sh [OUT (default /tmp/lr_transfer_cpu)]
#   LR=3e-4 WIDTHS=256 BASES="256 768" bash dev/bench/lr_transfer_cpu.sh    # another peak rate (runs *_lr3e-4)
# Data, depth, T, B, peak rate 1e-3 and schedule as dev/bench/structures_cpu.sh; 1,074 steps (its
# BTT rank 4 budget, 1.1M tokens) at both widths, so width 256's base_width 768 and lr_mult 0 runs
# are that script's btt4 and btt4_nolr.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/lr_transfer_cpu}
SHARED=${SHARED_DATA:-../shared/data}
source dev/bench/common.sh
cpu_runs_setup "$OUT" "$SHARED"
export OMP_NUM_THREADS=2
DATA=(-i "$OUT/data/openwebtext_char_train_*.bin" -j "$OUT/data/openwebtext_char_val_000000.bin" -tk "$OUT/data/char_tokenizer.bin" -b 8 -t 128 -s 0)
STEPS=1074
LR=${LR:-1e-3}
WIDTHS=${WIDTHS:-128 256}
BASES=${BASES:-32 64 128 256 512 768 nolr}
SUFFIX=$([ "$LR" = 1e-3 ] || echo "_lr$LR")
for w in $WIDTHS; do
    for b in $BASES; do
        name=w${w}_bw$b$SUFFIX
        { printf 'n_layer = 4\nn_head = 4\nn_embd = %d\nvocab_size = 96\nmax_seq_len = 128\n' "$w"
          [ "$b" = nolr ] || printf 'base_width = %d\n' "$b"
          printf '[linear]\nstruct = btt\nrank = 4\n'
          [ "$b" = nolr ] && printf 'lr_mult = 0\n'; true; } > "$OUT/$name.conf"
        [ -f "$OUT/runs/$name/DONE" ] && continue
        echo "$name: $STEPS steps"
        ./train_gpt2 -e "$OUT/$name.conf" "${DATA[@]}" -x $STEPS -v $((STEPS / 10)) -m 10 -l "$LR" -u $((STEPS / 20)) -q 0.1 \
            -o "$OUT/runs/$name" > "$OUT/runs/$name.txt" 2>&1
        touch "$OUT/runs/$name/DONE"
    done
done
R="$OUT/runs"
for w in $WIDTHS; do
    echo "== width $w, peak rate $LR: final val loss (step $STEPS) and best val by base_width"
    for b in $BASES; do
        printf '  %-6s %s %s\n' "$b" "$(sed -n "s/^s:$STEPS tel://p" "$R/w${w}_bw$b$SUFFIX/main.log")" \
            "$(sed -n 's/^s:[0-9]* tel://p' "$R/w${w}_bw$b$SUFFIX/main.log" | sort -g | head -n 1)"
    done
done
args=()
for w in $WIDTHS; do for b in $BASES; do args+=("w${w}_bw$b$SUFFIX=$R/w${w}_bw$b$SUFFIX"); done; done
python3 scripts/compare_runs.py "${args[@]}" --x tokens --csv "$OUT/lr_transfer$SUFFIX.csv"
