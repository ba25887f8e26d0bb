#!/usr/bin/env bash
# dev/bench/structures_cpu.sh: dense, Monarch, BTT and BTT-MoE language models trained to the same
# training-FLOP budget on the CPU, compared by scripts/compare_runs.py (about two hours on 2 cores).
# A small-scale check of the whole path (config sections, structure-aware learning rates, run.txt,
# compare_runs), not a scaling study: one seed, one budget, a learning-rate sweep for dense only.
#   SHARED_DATA=../shared/data bash dev/bench/structures_cpu.sh [OUT (default /tmp/structures_cpu)]
# Data: ASCII paragraphs (>= 200 characters) of the first 40 files of the shared Wikipedia sample,
# in the 96-symbol character vocabulary; the first 1000 paragraphs are val.
# Model: 4 layers, 4 heads, width 256, T 128, B 8; every block linear layer of one structure.
# Budget: what 500 dense steps cost; each structure gets 500 x (dense FLOPs / its FLOPs) steps.
# Then BTT-MoE runs of the same budget, to see what its routing and learning rates do: a random
# router (router_init 0.02); that and aux weight 0.1; that and no structure-aware learning rates
# (lr_mult 0); that and base_width 256 (the model's width); and BTT rank 4 with lr_mult 0.
# Two threads: the CPU trainer's sums, so its losses, depend on the thread count.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/structures_cpu}
SHARED=${SHARED_DATA:-../shared/data}
source dev/bench/common.sh
cpu_runs_setup "$OUT" "$SHARED"
for s in dense monarch4 btt4 btt_moe; do
    { printf 'n_layer = 4\nn_head = 4\nn_embd = 256\nvocab_size = 96\nmax_seq_len = 128\n[linear]\n'
      case $s in
          dense) echo "struct = dense" ;;
          monarch4) printf 'struct = monarch\nblocks = 4\n' ;;
          btt4) printf 'struct = btt\nrank = 4\n' ;;
          btt_moe) printf 'struct = btt_moe\nexperts = 8\ntopk = 2\n' ;;
      esac; } > "$OUT/$s.conf"
done
sed 's/^topk = 2$/topk = 2\nrouter_init = 0.02/' "$OUT/btt_moe.conf" > "$OUT/btt_moe_ri.conf"
sed 's/^max_seq_len = 128$/max_seq_len = 128\nmoe_aux_weight = 0.1/' "$OUT/btt_moe_ri.conf" > "$OUT/btt_moe_ri_aux.conf"
sed 's/^router_init = 0.02$/router_init = 0.02\nlr_mult = 0/' "$OUT/btt_moe_ri.conf" > "$OUT/btt_moe_ri_nolr.conf"
sed 's/^max_seq_len = 128$/max_seq_len = 128\nbase_width = 256/' "$OUT/btt_moe_ri.conf" > "$OUT/btt_moe_ri_bw.conf"
printf 'lr_mult = 0\n' | cat "$OUT/btt4.conf" - > "$OUT/btt4_nolr.conf"
export OMP_NUM_THREADS=2
DATA=(-i "$OUT/data/openwebtext_char_train_*.bin" -j "$OUT/data/openwebtext_char_val_000000.bin" -tk "$OUT/data/char_tokenizer.bin" -b 8 -t 128 -s 0)
fpt() { rm -rf "$OUT/probe"; ./train_gpt2 -e "$OUT/$1.conf" "${DATA[@]}" -x 1 -v 0 -o "$OUT/probe" > /dev/null; sed -n 's/^flops_per_token = //p' "$OUT/probe/run.txt"; }
FD=$(fpt dense)
run() {  # name config steps lr
    [ -f "$OUT/runs/$1/DONE" ] && return
    echo "$1: $3 steps at lr $4"
    ./train_gpt2 -e "$OUT/$2.conf" "${DATA[@]}" -x "$3" -v $(($3 / 10)) -m 10 -l "$4" -u $(($3 / 20)) -q 0.1 -rl 1 -o "$OUT/runs/$1" > "$OUT/runs/$1.txt" 2>&1
    touch "$OUT/runs/$1/DONE"
}
for s in dense monarch4 btt4 btt_moe; do run "$s" "$s" $(( (500 * FD + $(fpt $s) / 2) / $(fpt $s) )) 1e-3; done
for s in btt_moe_ri btt_moe_ri_aux btt_moe_ri_nolr btt_moe_ri_bw btt4_nolr; do run "$s" "$s" $(( (500 * FD + $(fpt $s) / 2) / $(fpt $s) )) 1e-3; done
run dense_lr3e-3 dense 500 3e-3
run dense_lr1e-2 dense 500 1e-2
R="$OUT/runs"
python3 scripts/compare_runs.py dense_lr1e-3="$R/dense" dense_lr3e-3="$R/dense_lr3e-3" dense_lr1e-2="$R/dense_lr1e-2" monarch4="$R/monarch4" \
    btt4="$R/btt4" btt_moe="$R/btt_moe" --plot "$OUT/structures_cpu.png" --smooth 50
python3 scripts/compare_runs.py dense_lr1e-3="$R/dense" btt_moe="$R/btt_moe" btt_moe_ri="$R/btt_moe_ri" btt_moe_ri_aux="$R/btt_moe_ri_aux" \
    btt_moe_ri_nolr="$R/btt_moe_ri_nolr" btt_moe_ri_bw="$R/btt_moe_ri_bw" btt4="$R/btt4" btt4_nolr="$R/btt4_nolr" --csv "$OUT/lr_runs.csv"
