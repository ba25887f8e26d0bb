#!/usr/bin/env bash
# GPT-2 124M with BTT-MoE (8 experts, top 2) in every linear layer (scripts/configs/gpt2_124M_btt_moe.conf)
# on OpenWebText, on NGPU GPUs (default 1), resuming after crashes:
#   bash scripts/run_btt_moe_124M.sh 8
# Same data and schedule as run_gpt2_124M.sh, so the two runs compare at equal tokens.
cd "$(dirname "$0")/.." || exit 1
NGPU=${1:-1}
MODEL=${MODEL:-scripts/configs/gpt2_124M_btt_moe.conf} OUT=${OUT:-log_btt_moe_124M} \
    exec bash scripts/run_gpt2_124M.sh "$NGPU"
