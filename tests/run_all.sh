#!/usr/bin/env bash
# Runs every test program and the Python tests, adds up their "N passed, N failed" lines and
# prints the total last. Exits non-zero if anything failed or a program crashed.
set -u
cd "$(dirname "$0")/.."
total_pass=0; total_fail=0; crashed=0

count() {  # $1 = name, rest = command
    local name=$1; shift
    echo "=== $name"
    local out rc t0=$SECONDS
    out=$("$@" 2>&1); rc=$?
    echo "    ($((SECONDS - t0)) s)"
    echo "$out" | grep -E '^(FAIL|#)|passed|failed|error' | tail -n 40
    local line p f
    line=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n 1)
    if [ -z "$line" ]; then
        echo "!!! $name printed no summary (exit $rc)"; echo "$out" | tail -n 20
        crashed=$((crashed + 1)); total_fail=$((total_fail + 1)); return
    fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then echo "!!! $name exited $rc"; total_fail=$((total_fail + 1)); fi
}

count "test_gpt2 (the default matmuls: see make's 'matmuls:' line)" ./test_gpt2
count "test_gpt2 (the plain C GEMM kernel)" ./build/test_gpt2_plain
if [ -x build/test_gpt2_blas ]; then count "test_gpt2 (OpenBLAS)" ./build/test_gpt2_blas; fi
for t in build/test_dataloader build/test_schedule build/test_tokenizer build/test_logger build/test_units build/test_structured build/test_structured_plain build/test_gpu_plan build/test_flash_tiles build/test_rendezvous build/test_btt_tiles build/test_gemm build/test_gemm_plain; do
    count "$(basename "$t")" "./$t"
done
if [ -x build/test_gemm_avx2 ]; then count "test_gemm (the AVX2+FMA kernel)" ./build/test_gemm_avx2; fi
if [ -x build/test_structured_avx2 ]; then count "test_structured (AVX2+FMA: its kernel and transposes)" ./build/test_structured_avx2; fi
if [ -x build/test_cudnn_graph ]; then
    count "cuDNN attention graphs: layouts and validation (tests/test_cudnn_graph.cpp)" ./build/test_cudnn_graph
else
    echo "=== cuDNN attention graphs: not built (no cuDNN frontend headers: pip install --no-deps -r requirements-cudnn.txt)"
fi
count "fused kernels in PTX: inline wmma loads, 16-byte stores (tests/test_fused_ptx.sh)" bash tests/test_fused_ptx.sh
count "no register spills in the trainer's kernels, sm_80/90/100 (tests/test_ptxas.sh)" bash tests/test_ptxas.sh
count "CUDA kernels on the CPU simulator (tests/cuda_sim)" ./build/cuda_sim/test_sim_kernels
count "CUDA kernels, random thread order" env SIM_SERIAL=1 ./build/cuda_sim/test_sim_kernels sim order attention structured fused
count "GPU trainer's main on the CPU simulator" bash tests/cuda_sim/test_sim_trainer.sh
count "GPU trainer's data parallelism on the simulator (NCCL stand-in)" bash tests/cuda_sim/test_sim_multigpu.sh
count "dev/cuda programs' CPU checks on the simulator" bash tests/cuda_sim/test_sim_dev_programs.sh
count "test_gpt2.cu (GPU test mode, every fixture) on the CPU simulator" ./build/cuda_sim/test_gpt2cu
count "test_gpt2.cu --cudnn-only (-fa 2) on the simulator's stand-in for cuDNN" ./build/cuda_sim/test_gpt2cu_cudnn --cudnn-only
count "trainer command line (tests/test_cli.sh)" bash tests/test_cli.sh
count "structured.sh's table: fastest paths and goals (tests/test_bench_table.sh)" bash tests/test_bench_table.sh
count "data parallel under mpirun (tests/test_mpi.sh)" bash tests/test_mpi.sh
count "stopped by a signal, resumed bit for bit (tests/test_stop.sh)" bash tests/test_stop.sh

# Python data tests (pytest), offline through the shared tiktoken cache when it is there
shared=${SHARED_DATA:-../shared/data}
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$shared/tiktoken_cache}
echo "=== pytest tests/python"
t0=$SECONDS
pyout=$(python3 -m pytest -q tests/python 2>&1); pyrc=$?
echo "    ($((SECONDS - t0)) s)"
echo "$pyout" | tail -n 15
pp=$(echo "$pyout" | grep -oE '[0-9]+ passed' | tail -n 1 | grep -oE '[0-9]+'); pp=${pp:-0}
pf=$(echo "$pyout" | grep -oE '[0-9]+ (failed|error)' | awk '{s+=$1} END {print s+0}')
total_pass=$((total_pass + pp)); total_fail=$((total_fail + pf))
if [ "$pyrc" -ne 0 ] && [ "$pf" -eq 0 ]; then echo "!!! pytest exited $pyrc"; total_fail=$((total_fail + 1)); fi

echo
echo "(tests: $SECONDS s in all)"
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
