#!/usr/bin/env bash
# dev/bench/device_run.sh: every GPU check and benchmark of issues 4 and 5 in ONE call on a lent GPU
# machine, inside a time budget, most important first:
#   1. test_gpt2cu              the GPU test mode (every fixture, structures vs the CPU, determinism),
#                               through gpu_test.sh: a unit that dies (a sticky CUDA error) costs only
#                               its own checks, the units after it run in a new process
#   1a. tune.sh                 -at 1's table per structured 124M config: every layer's kernels timed
#                               at the trainer's shapes (the choice, and ms/step against -sk 0)
#   2. structured.sh            each structure's layer vs dense, its roofline floor and PyTorch, the
#                               issue's goals, whole-model tokens/s per config with -sk 0 and -sk 1
#                               (-sk 2 with BTT or BTT-MoE layers, -sk 3 with BTT ones, -sk 4, and
#                               -sm 1, -sm 2 where a config has BTT or Monarch layers)
#   3. gpu.sh                   GPT-2 124M and 350M training tokens/s and MFU (no second test run),
#                               with -fa 1 and -fa 2 side by side when the cuDNN build loads
#   3a. profile.sh              where a step's time goes (-pt 2): 124M dense, BTT rank 4 with -sk 0,
#                               -sm 2, -sk 3, -sk 4 and -at 1, BTT-MoE with -sk 0 and -sk 1: each part's ms per step,
#                               share, TFLOP/s, then each structured layer's steps (plan ops, routing, gathers...)
#   3b. test_gpt2cu_cudnn       every fixture on cuDNN's attention (-fa 2, --cudnn-only), when it
#                               was built and this machine's libcudnn loads
#   3c. test_multigpu           the NCCL collectives of cuda/multigpu.cuh on a communicator of one
#                               rank (real NCCL, as the trainer calls it), and their time on a
#                               GPT-2 124M gradient vector
#   4. dev/cuda programs        each kernel's numbered versions against its CPU check and roofline
#   5. sanitize.sh              compute-sanitizer's memcheck, racecheck, initcheck and synccheck on
#                               tiny dense and structured runs (last: only with budget left, or
#                               STAGES=sanitize in a call of its own)
#   6. ncu.sh                   Nsight Compute: each kernel of one 124M step (dense, BTT rank 4 and
#                               BTT-MoE with -sk 1): time, share, DRAM GB/s against the peak, SM %
#                               (not in the default stages: STAGES=ncu in a call of its own)
# Binaries come from .device/ (dev/bench/device_prep.sh, run where nvcc is; carry ".device");
# when they cannot start there, everything is built on the spot first (minutes of the budget).
# Each stage gets at most its share and what is left of BUDGET seconds (default 480), so the call
# ends inside the device tool's 10-minute limit. Results: $OUT/summary.txt (also printed last:
# the tool returns the end of the output) and $OUT/logs.tar.gz (every log).
#   run(command="bash dev/bench/device_run.sh", carry=[".device"], timeout_s=600)
#   BUDGET=300 STAGES="test structured" bash dev/bench/device_run.sh
# A shorter second call narrows stages with GPU_CONFIGS (gpu.sh's CONFIGS), GPU_ATTN (its ATTN),
# PROFILE_CONFIGS (profile.sh's CONFIGS), KERNEL_PROGS (the dev/cuda programs to run, in order),
# SANITIZE_TOOLS and SANITIZE_CASES (sanitize.sh's TOOLS and CASES names).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
BUDGET=${BUDGET:-480}
STAGES=${STAGES:-"test tune structured gpu profile cudnn nccl kernels sanitize"}
RES=${OUT:-/tmp/device_out}
mkdir -p "$RES" || exit 1
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/device_logs.XXXXXX") || exit 1
SUMMARY=$RES/summary.txt
T0=$(date +%s)
: > "$SUMMARY"
say() { echo "$*" >> "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }

# ---- what runs where
commit=unknown
[ -f .device/COMMIT ] && commit=$(tr '\n' ' ' < .device/COMMIT)
[ "$commit" = unknown ] && commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
say "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "commit:   $commit"
say "device:   $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
say "nvcc:     $(nvcc --version 2>/dev/null | tail -1)"
say "budget:   ${BUDGET}s for stages: $STAGES"

# ---- binaries: the prepared ones, else build here
if [ -f .device/tree.tar.gz ]; then
    tar -xzf .device/tree.tar.gz -C . && say "binaries: prepared ($(cat .device/ARCH 2>/dev/null || echo '?'))"
elif [ -d .device/tree ]; then
    cp -a .device/tree/. . && say "binaries: prepared ($(cat .device/ARCH 2>/dev/null || echo '?'))"
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib; do [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
# libcudnn and libnvrtc for the -fa 2 builds: the toolkit's, else those of the CUDA Python wheels
# (and libnccl for test_multigpu: the toolkit's, else nvidia-nccl's)
for pkg in nvidia.cudnn nvidia.cuda_nvrtc nvidia.cu13 nvidia.nccl; do
    d=$(python3 -c "import $pkg as p, os; print(os.path.join(list(p.__path__)[0], 'lib'))" 2>/dev/null) && [ -d "$d" ] &&
        export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$d"
done
loads() { [ -x "$1" ] && ! ldd "$1" 2>&1 | grep -q 'not found'; }
if ! loads ./train_gpt2cu || ! loads ./test_gpt2cu || ! loads ./dev/cuda/structured_layers; then
    say "binaries: missing or not loadable here ($(ldd ./train_gpt2cu 2>&1 | grep -m1 'not found' | tr -s ' \t' ' ')); building"
    t=$(date +%s)
    { make -j16 NO_NCCL=1 train_gpt2cu test_gpt2cu && make -j16 -C dev/cuda; } > "$LOGS/build.log" 2>&1
    say "build:    rc $? in $(($(date +%s) - t))s (log: build.log)"
fi

if [ -x ./test_gpt2cu_cudnn ] && ! loads ./test_gpt2cu_cudnn; then
    say "cuDNN:    the -fa 2 builds do not load here ($(ldd ./test_gpt2cu_cudnn 2>&1 | grep -m1 'not found' | tr -s ' \t' ' ')); stage cudnn skipped"
fi
TRAIN_BIN=./train_gpt2cu
loads ./train_gpt2cu_cudnn && TRAIN_BIN=./train_gpt2cu_cudnn

# ---- the GPU's clocks, power and clock-limit reasons once a second while the stages run, so that
# a figure measured under a power cap or thermal slowdown shows as such (smi.log)
SMI_PID=
if command -v nvidia-smi > /dev/null; then
    reasons=clocks_event_reasons.active  # the pre-R535 name, where the driver does not know this one
    nvidia-smi --query-gpu=$reasons --format=csv,noheader > /dev/null 2>&1 || reasons=clocks_throttle_reasons.active
    nvidia-smi --query-gpu=timestamp,utilization.gpu,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,$reasons \
        --format=csv -l 1 > "$LOGS/smi.log" 2>&1 &
    SMI_PID=$!
fi

# ---- stages
declare -A RC
run_stage() {  # name seconds command...: at most `seconds`, and never past the budget
    local name=$1 want=$2 l lim t rc
    shift 2
    l=$(left)
    lim=$((want < l ? want : l))
    if [ "$lim" -lt 20 ]; then
        say "$(printf 'stage %-10s skipped: %ss of the budget left' "$name" "$l")"
        RC[$name]=skipped
        return
    fi
    t=$(date +%s)
    timeout --signal=INT --kill-after=10 "$lim" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    RC[$name]=$rc
    say "$(printf 'stage %-10s rc %-3s %4ss (limit %ss)%s' "$name" "$rc" "$(($(date +%s) - t))" "$lim" \
        "$([ "$rc" = 124 ] && echo ': stopped at its limit')")"
}
# every dev/cuda program, each with its default versions (a script: timeout runs programs only),
# the structured layers' plan breakdown and kernels first (they decide -sk and the Monarch traffic bound; structured_layers
# already ran in the structured stage), so that a stage stopped at its limit loses the others
# (a *_cudnn build, with cuDNN's version too, in place of the plain one when it loads)
KERNELS='rc=0; first="btt_forward btt_backward structured_weight moe_layer moe_group structured_epilogue plan_ops permute monarch_forward monarch_backward seg_wgrad layernorm_backward global_norm adamw";
  progs=${KERNEL_PROGS:-"$first $(ls dev/cuda/*.cu | sed "s|dev/cuda/||; s|\.cu$||" | grep -vxF -e structured_layers $(printf -- "-e %s " $first))"};
  for n in $progs; do
  b=dev/cuda/$n; [ -x "${b}_cudnn" ] && ! ldd "${b}_cudnn" 2>&1 | grep -q "not found" && b=${b}_cudnn;
  echo "== $b"; "./$b" || { echo "FAIL $b exited with $?"; rc=1; }; done; exit $rc'
# the narrowing variables, passed on only when set (env takes NAME=VALUE words)
GPU_ENV=() PROFILE_ENV=() SANITIZE_ENV=()
[ -n "${GPU_ATTN:-}" ] && GPU_ENV=("ATTN=$GPU_ATTN")
[ -n "${PROFILE_CONFIGS:-}" ] && PROFILE_ENV=("CONFIGS=$PROFILE_CONFIGS")
[ -n "${SANITIZE_TOOLS:-}" ] && SANITIZE_ENV+=("TOOLS=$SANITIZE_TOOLS")
[ -n "${SANITIZE_CASES:-}" ] && SANITIZE_ENV+=("CASE_NAMES=$SANITIZE_CASES")
for s in $STAGES; do
    case $s in
        test) run_stage test 150 bash dev/bench/gpu_test.sh ./test_gpt2cu ;;  # past a unit that dies (a sticky CUDA error)
        cudnn) loads ./test_gpt2cu_cudnn && run_stage cudnn 90 ./test_gpt2cu_cudnn --cudnn-only ;;
        nccl) if loads ./test_multigpu; then run_stage nccl 60 env NCCL_SOCKET_IFNAME=lo ./test_multigpu  # one rank: loopback bootstrap
              else say "stage nccl       skipped: test_multigpu $([ -x ./test_multigpu ] && echo 'does not load here' || echo 'not built')"; fi ;;
        tune) run_stage tune 90 env TRAIN_BIN="$TRAIN_BIN" bash dev/bench/tune.sh ;;
        structured) run_stage structured 220 env BUILD=0 OUT="$LOGS/structured" REPS=10 STEPS=10 TRAIN_BIN="$TRAIN_BIN" bash dev/bench/structured.sh ;;
        gpu) run_stage gpu 150 env BUILD=0 TEST=0 STEPS=10 TRAIN_BIN="$TRAIN_BIN" CONFIGS="${GPU_CONFIGS:-d12:16 d12:32 d12:64 d24:8 d24:16}" \
                 ${GPU_ENV[@]+"${GPU_ENV[@]}"} bash dev/bench/gpu.sh ;;
        profile) run_stage profile 120 env STEPS=6 TRAIN_BIN="$TRAIN_BIN" ${PROFILE_ENV[@]+"${PROFILE_ENV[@]}"} bash dev/bench/profile.sh ;;
        kernels) run_stage kernels 200 bash -c "$KERNELS" ;;
        sanitize) run_stage sanitize 240 env LOGDIR="$LOGS/sanitize" ${SANITIZE_ENV[@]+"${SANITIZE_ENV[@]}"} bash dev/bench/sanitize.sh ;;
        ncu) run_stage ncu 300 env TRAIN_BIN="$TRAIN_BIN" bash dev/bench/ncu.sh ;;
        *) say "stage $s: unknown (test, tune, cudnn, nccl, structured, gpu, profile, kernels, sanitize, ncu)" ;;
    esac
done

[ -n "$SMI_PID" ] && kill "$SMI_PID" 2> /dev/null

# ---- the summary: the figures that matter from each log
say ""
if [ -s "$LOGS/smi.log" ]; then  # the SM clock's range and every clock-limit reason seen (beyond none/idle)
    say "gpu state: $(awk -F', ' 'NR > 1 && $3 + 0 > 0 { c = $3 + 0; if (!lo || c < lo) lo = c; if (c > hi) hi = c; n++;
        if ($8 != "0x0000000000000000" && $8 != "0x0000000000000001") r[$8]++ }
        END { printf "%d samples, SM clock %d-%d MHz, clock-limit reasons:", n, lo, hi; for (k in r) printf " %s x%d", k, r[k]; if (!length(r)) printf " none" }' "$LOGS/smi.log")"
fi
if [ -f "$LOGS/test.log" ]; then
    say "== test_gpt2cu: $(tail -1 "$LOGS/test.log")"
    grep -E '^(FAIL|# gpu_test.sh: units that)' "$LOGS/test.log" | head -30 >> "$SUMMARY"
fi
if [ -f "$LOGS/cudnn.log" ]; then
    say "== test_gpt2cu_cudnn --cudnn-only (-fa 2): $(tail -1 "$LOGS/cudnn.log")"
    grep -E '^(FAIL|note: -fa 2|note: cuDNN|# determinism checks skipped)' "$LOGS/cudnn.log" | sort | uniq -c | head -30 >> "$SUMMARY"
fi
if [ -f "$LOGS/tune.log" ]; then
    say ""
    say "== tune.sh (-at 1's tables)"
    cat "$LOGS/tune.log" >> "$SUMMARY"
fi
if [ -f "$LOGS/structured.log" ]; then
    say ""
    if grep -q '^== structured layers' "$LOGS/structured.log"; then
        sed -n '/^== structured layers/,$p' "$LOGS/structured.log" >> "$SUMMARY"
    else
        say "== structured.sh gave no table; its last lines:"
        tail -5 "$LOGS/structured.log" >> "$SUMMARY"
    fi
    grep -E '^(FAIL|note)' "$LOGS/structured/layers_cuda.log" 2>/dev/null | head -20 >> "$SUMMARY"
fi
if [ -f "$LOGS/gpu.log" ]; then
    say ""
    sed -n '/^== training throughput/,$p' "$LOGS/gpu.log" >> "$SUMMARY"
fi
if [ -f "$LOGS/profile.log" ]; then
    say ""
    grep -v '^step profile' "$LOGS/profile.log" >> "$SUMMARY"
fi
if [ -f "$LOGS/nccl.log" ]; then
    say ""
    say "== test_multigpu (NCCL, one rank): $(tail -1 "$LOGS/nccl.log")"
    grep -E '^(FAIL|bench:|test_multigpu:|error)' "$LOGS/nccl.log" | head -12 >> "$SUMMARY"
fi
if [ -f "$LOGS/kernels.log" ]; then
    say ""
    say "== dev/cuda programs: $(grep -c '^== ' "$LOGS/kernels.log") run, $(grep -c '^FAIL' "$LOGS/kernels.log") failed"
    grep -E '^FAIL' "$LOGS/kernels.log" | head -20 >> "$SUMMARY"
    # the structured kernels' verdicts: each shape, and its fused-vs-baseline and geometry speedups
    sed -n '/^== dev\/cuda\/btt_forward/,/^== dev\/cuda\/seg_wgrad/p' "$LOGS/kernels.log" | grep -E '^(== |-- |   speedup|   traffic model|   v[0-9]+ (stage-1 )?geometry)' >> "$SUMMARY"
    # the cuBLAS plans op by op (dev/cuda/plan_ops.cu): which GEMM or permute the time goes to
    sed -n '/^== dev\/cuda\/plan_ops$/,/^== /p' "$LOGS/kernels.log" | grep -E '^(-- |  (fwd|bwd) |   forward plan|FAIL)' >> "$SUMMARY"
    # BTT-MoE's experts per expert (v1), tiled (v2) and grouped by set (v3) (dev/cuda/moe_layer.cu)
    sed -n '/^== dev\/cuda\/moe_layer$/,/^== /p' "$LOGS/kernels.log" | grep -E '^(  btt_moe|FAIL)' >> "$SUMMARY"
    # the structured layers' bias and GELU as separate passes (v1) and as epilogues (v2) (dev/cuda/structured_epilogue.cu)
    sed -n '/^== dev\/cuda\/structured_epilogue$/,/^== /p' "$LOGS/kernels.log" | grep -E '^(  (btt|monarch)|FAIL)' >> "$SUMMARY"
    # the permute's versions (dev/cuda/permute.cu): each shape's time and bandwidth
    sed -n '/^== dev\/cuda\/permute$/,/^== /p' "$LOGS/kernels.log" | grep -E '^(-- |.* v[0-9] )' >> "$SUMMARY"
fi
if [ -f "$LOGS/ncu.log" ]; then
    say ""
    cat "$LOGS/ncu.log" >> "$SUMMARY"
fi
if [ -f "$LOGS/sanitize.log" ]; then
    say ""
    say "== compute-sanitizer (sanitize.sh): $(tail -1 "$LOGS/sanitize.log")"
    grep -E '^FAIL' "$LOGS/sanitize.log" | head -12 >> "$SUMMARY"
fi
tar -czf "$RES/logs.tar.gz" -C "$LOGS" . 2>/dev/null
say ""
say "total: $(($(date +%s) - T0))s; full logs in logs.tar.gz"
cat "$SUMMARY"
[ "${RC[test]:-0}" = 0 ]
