#!/usr/bin/env bash
# test_sim_dev_programs.sh: dev/cuda's kernel programs built through the CUDA simulator
# (build/cuda_sim/dev_NAME, for the Makefile's SIM_DEV_PROGRAMS: those whose GPU-sized problems
# run here in seconds): every numbered version of each must pass its own check against the CPU
# reference, as it must on a GPU. Their timings are the simulator's and mean nothing.
# Prints "N passed, N failed" (one per program).
cd "$(dirname "$0")/../.."
source tests/lib.sh
progs=$(sed -nE 's/^SIM_DEV_PROGRAMS = //p' Makefile)
[ -n "$progs" ] || { bad "dev programs" "no SIM_DEV_PROGRAMS line in the Makefile"; summary; exit; }
for p in $progs; do
    b=build/cuda_sim/dev_$p
    if [ ! -x "$b" ]; then bad "dev/cuda/$p on the simulator" "$b not built (make $b)"; continue; fi
    args=()
    [ "$p" = plan_ops ] && args=(64)  # its rows: GPU-sized layers, but not 32768 rows of them
    [ "$p" = moe_layer ] && args=(0 64)  # every version, 64 tokens
    [ "$p" = moe_group ] && args=(0 600)  # every version, 600 tokens (two chunks of pairs; five at 4N)
    [ "$p" = structured_epilogue ] && args=(0 64)
    [ "$p" = structured_weight ] && args=(0 768 64)  # every version, layers up to d_in 768, 64 rows for the dense GEMM
    [ "$p" = btt_forward ] && args=(0 128)  # every version, 128 rows (two 64-row tiles)
    [ "$p" = btt_backward ] && args=(0 64)  # every version, 64 rows (its checks at 1024 rows cap at N)
    [ "$p" = monarch_forward ] && args=(0 64)  # every version (v5, v6: Monarch on the BTT kernels), 64 rows
    [ "$p" = monarch_backward ] && args=(0 64)
    "$b" ${args[@]+"${args[@]}"} > "$W/$p.log" 2>&1; rc=$?
    last=$(tail -n 1 "$W/$p.log")
    if [ $rc -eq 0 ] && echo "$last" | grep -qE '^[1-9][0-9]* passed, 0 failed$'; then
        ok "dev/cuda/$p on the simulator: every version passes its CPU check ($last)"
    else
        bad "dev/cuda/$p on the simulator" "exit $rc: $(grep -m3 '^FAIL' "$W/$p.log" | tr '\n' ' ') $last"
    fi
done
summary
