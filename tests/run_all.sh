#!/usr/bin/env bash
# Runs every test program and the Python tests, adds up their "N passed, N failed" lines and
# prints the total last. Exits non-zero if anything failed or a program crashed.
#
# The tests run in lanes, one per core up to RUN_ALL_LANES (default 2; 1: one after another). A
# test keeps about 1.4 of CI's 2 cores busy on average (the simulator's host code, compilers and
# the reference computations are single-threaded), so a second lane shortens the run by about a
# third. Each lane takes the next unclaimed test from the list (longest first); every test works
# in its own scratch directory (tests/lib.sh) and picks its own port, so none sees the others.
# Each test's report is printed in list order once all have finished; a line per finished test
# shows progress meanwhile.
set -u
cd "$(dirname "$0")/.."
shared=${SHARED_DATA:-../shared/data}
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$shared/tiktoken_cache}
R=$(mktemp -d /tmp/structgpt_run_all.XXXXXX)
trap 'rm -rf "$R"' EXIT

names=(); cmds=()
add() {  # $1 = name, rest = command (a program, or a function below)
    names+=("$1"); shift
    cmds+=("$(printf '%q ' "$@")")
}
add_if() {  # $1 = program: the test is added when it was built (make's optional variants)
    local prog=$1; shift
    [ -x "$prog" ] && add "$@"
}

# pytest's result in the form the others print (it has its own summary format)
python_tests() {
    local out rc p f
    out=$(python3 -m pytest -q tests/python 2>&1); rc=$?
    echo "$out" | tail -n 15
    p=$(echo "$out" | grep -oE '[0-9]+ passed' | tail -n 1 | grep -oE '[0-9]+'); p=${p:-0}
    f=$(echo "$out" | grep -oE '[0-9]+ (failed|error)' | awk '{s += $1} END {print s + 0}')
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "pytest exited $rc"; fi
    echo "$p passed, $f failed"
}

# longest first (seconds on CI's 2 cores, one lane), so that the lanes end close together
add "test_gpt2.cu (GPU test mode, every fixture) on the CPU simulator" ./build/cuda_sim/test_gpt2cu                 # 150
add "dev/cuda programs' CPU checks on the simulator" bash tests/cuda_sim/test_sim_dev_programs.sh                   # 85
add "GPU trainer's main on the CPU simulator" bash tests/cuda_sim/test_sim_trainer.sh                              # 65
add "stopped by a signal, resumed bit for bit (tests/test_stop.sh)" bash tests/test_stop.sh                        # 59
add "trainer command line (tests/test_cli.sh)" bash tests/test_cli.sh                                              # 52
add "data parallel under mpirun (tests/test_mpi.sh)" bash tests/test_mpi.sh                                        # 48
add "GPU trainer's data parallelism on the simulator (NCCL stand-in)" bash tests/cuda_sim/test_sim_multigpu.sh     # 43
add "no register spills in the trainer's kernels, sm_80/90/100 (tests/test_ptxas.sh)" bash tests/test_ptxas.sh     # 37
add "pytest tests/python" python_tests                                                                             # 6-40
add "fused kernels in PTX: inline wmma loads, 16-byte stores (tests/test_fused_ptx.sh)" bash tests/test_fused_ptx.sh
add "test_gpt2.cu --cudnn-only (-fa 2) on the simulator's stand-in for cuDNN" ./build/cuda_sim/test_gpt2cu_cudnn --cudnn-only
add "CUDA kernels on the CPU simulator (tests/cuda_sim)" ./build/cuda_sim/test_sim_kernels
add "CUDA kernels, random thread order" env SIM_SERIAL=1 ./build/cuda_sim/test_sim_kernels sim order attention structured fused
add "test_gpt2 (the default matmuls: see make's 'matmuls:' line)" ./test_gpt2
add "test_gpt2 (the plain C GEMM kernel)" ./build/test_gpt2_plain
add_if build/test_gpt2_blas "test_gpt2 (OpenBLAS)" ./build/test_gpt2_blas
for t in build/test_dataloader build/test_schedule build/test_tokenizer build/test_logger build/test_units build/test_structured build/test_structured_plain build/test_gpu_plan build/test_flash_tiles build/test_rendezvous build/test_btt_tiles build/test_gemm build/test_gemm_plain; do
    add "$(basename "$t")" "./$t"
done
add_if build/test_gemm_avx2 "test_gemm (the AVX2+FMA kernel)" ./build/test_gemm_avx2
add_if build/test_structured_avx2 "test_structured (AVX2+FMA: its kernel and transposes)" ./build/test_structured_avx2
if [ -x build/test_cudnn_graph ]; then
    add "cuDNN attention graphs: layouts and validation (tests/test_cudnn_graph.cpp)" ./build/test_cudnn_graph
else
    echo "=== cuDNN attention graphs: not built (no cuDNN frontend headers: pip install --no-deps -r requirements-cudnn.txt)"
fi
add "structured.sh's table: fastest paths and goals (tests/test_bench_table.sh)" bash tests/test_bench_table.sh
add "structured.sh and gpu_test.sh past a case that ends its process (tests/test_bench_rerun.sh)" bash tests/test_bench_rerun.sh

run_one() {  # $1 = index: its output, exit status and seconds into $R
    local i=$1 t0=$SECONDS
    eval "${cmds[i]}" > "$R/$i.out" 2>&1
    echo $? > "$R/$i.rc"
    echo $((SECONDS - t0)) > "$R/$i.s"
    echo "  done ($((SECONDS - t0)) s): ${names[i]}"
}
lane() {  # claims tests in list order (mkdir is atomic) until none is left
    local i
    for i in "${!cmds[@]}"; do
        mkdir "$R/claim.$i" 2> /dev/null && run_one "$i"
    done
}
lanes=${RUN_ALL_LANES:-2}
if ! [[ "$lanes" =~ ^[1-9][0-9]*$ ]]; then
    echo "tests/run_all.sh: RUN_ALL_LANES='$lanes': give a whole number of lanes, 1 or more (1 runs the tests one after another)" >&2
    exit 2
fi
cores=$(nproc 2> /dev/null || echo 1)
[ "$lanes" -gt "$cores" ] && lanes=$cores
# OpenMP's idle threads spin by default: two OpenMP trainers on two busy cores then take 3x as
# long (tests/test_cli.sh 53 -> 170 s beside the simulator); sleeping ones cost 10% alone
[ "$lanes" -gt 1 ] && export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
echo "(${#cmds[@]} tests in $lanes lane(s))"
for _ in $(seq "$lanes"); do lane & done
wait

total_pass=0; total_fail=0
for i in "${!cmds[@]}"; do
    name=${names[i]}
    echo "=== $name"
    echo "    ($(cat "$R/$i.s" 2> /dev/null || echo '?') s)"
    out=$(cat "$R/$i.out" 2> /dev/null); rc=$(cat "$R/$i.rc" 2> /dev/null || echo 1)
    echo "$out" | grep -E '^(FAIL|#)|passed|failed|error' | tail -n 40
    line=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n 1)
    if [ -z "$line" ]; then
        echo "!!! $name printed no summary (exit $rc)"; echo "$out" | tail -n 20
        total_fail=$((total_fail + 1)); continue
    fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then echo "!!! $name exited $rc"; total_fail=$((total_fail + 1)); fi
done

echo
echo "(tests: $SECONDS s in all)"
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
