#!/usr/bin/env bash
# GPT-2 124M on OpenWebText, dense, on NGPU GPUs of this node (default 1), resuming after crashes:
#   python3 data/openwebtext.py && make train_gpt2cu && bash scripts/run_gpt2_124M.sh 8
#   FineWeb instead, as llm.c trains it: python3 data/fineweb.py, then
#   TRAIN="data/fineweb10B/fineweb_train_*.bin" VAL="data/fineweb10B/fineweb_val_*.bin" bash scripts/run_gpt2_124M.sh 8
# 0.5M tokens per step, about one epoch of OpenWebText (~9B tokens) in 17,000 steps.
# HELLASWAG=1 adds llm.c's HellaSwag accuracy at every val step (python3 data/hellaswag.py first);
# afterwards, python3 scripts/compare_runs.py log_gpt2_124M log_btt_moe_124M puts the runs side by side.
# Under SLURM, `sbatch --signal=B:USR1@120 scripts/run_gpt2_124M.sh 8` (this script as the batch
# script: it execs launch.sh, which passes the signal on) makes the run write a checkpoint and stop
# two minutes before the job's time limit (README, "Stopping a run"); the same sbatch again carries on.
cd "$(dirname "$0")/.." || exit 1
NGPU=${1:-1}
B=${B:-64}   # per GPU; lower it (the total batch -d stays, through gradient accumulation) if memory is short
NPROC=$NGPU OUT=${OUT:-log_gpt2_124M} STEPS=${STEPS:-17000} exec bash scripts/launch.sh \
    -e "${MODEL:-d12}" \
    -i "${TRAIN:-data/openwebtext/openwebtext_train_*.bin}" -j "${VAL:-data/openwebtext/openwebtext_val_*.bin}" \
    -b "$B" -t 1024 -d 524288 -l 6e-4 -u 700 -q 0.0 -c 0.1 -k cosine -sh 1 \
    -v 250 -m 20 -s 2000 -n 1000 -nk 3 -z "${ZERO:-1}" ${HELLASWAG:+-h 1}
