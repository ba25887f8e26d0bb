#!/usr/bin/env bash
# test_stop.sh: a run that a signal stops (common/stop.h) finishes its step, writes a checkpoint
# and exits 128+signal; resumed with -y 1 it continues bit for bit as if never stopped (every
# step's loss, the val losses, the final model file and resume state). For the CPU trainer, the
# GPU trainer on the CUDA simulator (when built) and two ranks under mpirun, the signal reaching
# one rank only. Also: a second Ctrl-C stops at once and leaves the last checkpoint usable; without
# -o the run stops with no checkpoint; scripts/launch.sh ends with a stopped run instead of
# relaunching it. "N passed, N failed".
set -u
cd "$(dirname "$0")/.."
source tests/lib.sh

python3 tests/synthetic_shards.py "$W" --seed 3 --docs 120 --train_shards 1 --val_docs 10 --eval_examples 0 > /dev/null
cat > "$W/small.cfg" <<'EOF'
n_layer = 2
n_head = 2
n_embd = 64
vocab_size = 50257
max_seq_len = 32
EOF
COMMON=(-e "$W/small.cfg" -i "$W/syn_train_*.bin" -j "$W/syn_val_000000.bin" -b 4 -t 32 -v 5 -m 2 -s 0 -sh 1
        -tk data/tinyshakespeare/gpt2_tokenizer.bin)

# the step and val lines without their timings
trace() { grep -E '^(step |val loss)' "$1" | sed -E 's/ \| [0-9.]+ ms .*//'; }

# start_and_signal LOG SIGNAL PIDFN CMD...: runs CMD with output to LOG in the background, sends
# SIGNAL once its step-3 line is out (to the pid PIDFN prints, given CMD's pid; "self": CMD's),
# and returns CMD's exit status
start_and_signal() {
    local log=$1 sig=$2 pidfn=$3 pid target i
    shift 3
    "$@" > "$log" 2>&1 &
    pid=$!
    for i in $(seq 1200); do grep -q '^step    3/' "$log" && break; kill -0 "$pid" 2> /dev/null || break; sleep 0.05; done
    target=$pid
    [ "$pidfn" != self ] && target=$($pidfn "$pid")
    kill -"$sig" "$target" 2> /dev/null
    wait "$pid"
}

# check_stop NAME N SIGNAL RC LOG DIR REF_LOG REF_DIR NRANKS RESUME_CMD...: the stopped run exited
# 128+signal after step K < N with a complete checkpoint for each rank; RESUME_CMD carries on to
# step N, as the reference did
check_stop() {
    local name=$1 n=$2 sig=$3 rc=$4 log=$5 dir=$6 ref=$7 refdir=$8 nranks=$9 k want r
    shift 9
    want=$((128 + $(kill -l "$sig")))
    k=$(sed -nE "s/^stopped by SIG$sig after step ([0-9]+) of $n: rerun.*/\1/p" "$log" | head -1)
    if [ "$rc" -ne "$want" ] || [ -z "$k" ]; then
        bad "$name: stop" "exit $rc (want $want), no 'stopped by SIG$sig' line: $(tail -n 3 "$log" | tr '\n' ' ')"
        return
    fi
    if [ "$k" -ge "$n" ]; then bad "$name: stop" "the run reached step $k of $n before the signal; the test needs longer runs"; return; fi
    local step8 files_ok=1
    step8=$(printf '%08d' "$k")
    [ -f "$dir/DONE_$step8" ] && [ -f "$dir/model_$step8.bin" ] || files_ok=0
    for ((r = 0; r < nranks; r++)); do [ -f "$dir/state_${step8}_$(printf '%05d' $r).bin" ] || files_ok=0; done
    [ $files_ok = 1 ] && ok "$name: SIG$sig stopped the run after step $k with exit $want and a checkpoint ($nranks rank state files)" \
        || bad "$name: stop checkpoint" "$(ls "$dir" | tr '\n' ' ')"
    "$@" >> "$log" 2>&1
    rc=$?
    local n8 same=1
    n8=$(printf '%08d' "$n")
    cmp -s "$dir/model_$n8.bin" "$refdir/model_$n8.bin" || same=0
    for ((r = 0; r < nranks; r++)); do
        cmp -s "$dir/state_${n8}_$(printf '%05d' $r).bin" "$refdir/state_${n8}_$(printf '%05d' $r).bin" || same=0
    done
    if [ $rc -eq 0 ] && grep -q "^resumed from .* at step $k$" "$log" && [ "$(trace "$log")" = "$(trace "$ref")" ] && [ $same = 1 ]; then
        ok "$name: resumed with -y 1 at step $k: all $n steps' losses, the val losses and the step-$n model and state as the run never stopped"
    else
        bad "$name: resume after the stop" "exit $rc; $(diff <(trace "$ref") <(trace "$log") | head -n 4 | tr '\n' ' ')"
    fi
}

# ---- the CPU trainer
N=60
./train_gpt2 "${COMMON[@]}" -x $N -n $N -o "$W/ref" > "$W/ref.log" 2>&1 || bad "CPU reference run" "$(tail -n 2 "$W/ref.log")"
start_and_signal "$W/cpu.log" TERM self ./train_gpt2 "${COMMON[@]}" -x $N -n $N -o "$W/cpu"
check_stop "CPU trainer" $N TERM $? "$W/cpu.log" "$W/cpu" "$W/ref.log" "$W/ref" 1 ./train_gpt2 "${COMMON[@]}" -x $N -n $N -o "$W/cpu" -y 1

# SIGUSR1 (sbatch --signal=USR1@T) and Ctrl-C alike
start_and_signal "$W/usr1.log" USR1 self ./train_gpt2 "${COMMON[@]}" -x $N -n $N -o "$W/usr1" -y 1
check_stop "CPU trainer" $N USR1 $? "$W/usr1.log" "$W/usr1" "$W/ref.log" "$W/ref" 1 ./train_gpt2 "${COMMON[@]}" -x $N -n $N -o "$W/usr1" -y 1

# without -o: the step finishes, no checkpoint, exit 130
start_and_signal "$W/noout.log" INT self ./train_gpt2 "${COMMON[@]}" -x $N
rc=$?
[ $rc -eq 130 ] && grep -qE "^stopped by SIGINT after step [0-9]+ of $N: no checkpoint \(no -o\)" "$W/noout.log" \
    && grep -q '^total average iteration time' "$W/noout.log" \
    && ok "CPU trainer: Ctrl-C without -o stops after the step with exit 130 and says there is no checkpoint" \
    || bad "Ctrl-C without -o" "exit $rc: $(tail -n 2 "$W/noout.log" | tr '\n' ' ')"

# with -nk, the stop's checkpoint (off the -n grid) goes once the resumed run has written a newer one
start_and_signal "$W/nk.log" TERM self ./train_gpt2 "${COMMON[@]}" -x 30 -n 10 -nk 1 -o "$W/nk" -y 1
rc=$?
k=$(sed -nE 's/^stopped by SIGTERM after step ([0-9]+) of 30.*/\1/p' "$W/nk.log")
k8=$(printf '%08d' "${k:-0}")
[ -f "$W/nk/DONE_$k8" ] && had=1 || had=0
./train_gpt2 "${COMMON[@]}" -x 30 -n 10 -nk 1 -o "$W/nk" -y 1 > "$W/nk2.log" 2>&1
rc2=$?
left=$(ls "$W/nk" | grep -E '^(DONE|model|state)_' | tr '\n' ' ')
if [ -n "$k" ] && [ $((k % 10)) -eq 0 ]; then
    echo "# -nk and the stop's checkpoint: the stop fell on the -n grid (step $k); not checked this time"
else
    [ $rc -eq 143 ] && [ $had = 1 ] && [ $rc2 -eq 0 ] && [ "$left" = "DONE_00000030 model_00000030.bin state_00000030_00000.bin " ] \
        && ok "-n 10 -nk 1: the stop's checkpoint (step $k) was written, then removed once the resumed run wrote step 10's" \
        || bad "-nk and the stop's checkpoint" "stop exit $rc at '$k' (files: $had), resume exit $rc2, left: $left"
fi

# a second Ctrl-C stops at once; the checkpoints written before (every 2 steps) stay usable
./train_gpt2 "${COMMON[@]}" -x 400 -n 2 -o "$W/twice" > "$W/twice.log" 2>&1 &
pid=$!
for i in $(seq 1200); do grep -q '^step    5/' "$W/twice.log" && break; sleep 0.05; done
kill -INT $pid
for i in $(seq 200); do grep -q '^received SIGINT' "$W/twice.log" && break; sleep 0.01; done
kill -INT $pid
wait $pid
rc=$?
latest=$(ls "$W/twice" | sed -nE 's/^DONE_0*([0-9]+)$/\1/p' | sort -n | tail -1)
out=$(./train_gpt2 "${COMMON[@]}" -x $((latest + 2)) -n 2 -o "$W/twice" -y 1 2>&1)
rc2=$?
[ $rc -eq 130 ] && ! grep -q '^stopped by' "$W/twice.log" && [ -n "$latest" ] && [ $rc2 -eq 0 ] \
    && echo "$out" | grep -q "^resumed from .*model_0*$latest.bin at step $latest$" \
    && ok "CPU trainer: a second Ctrl-C ends the run at once (exit 130); -y 1 resumes from its last checkpoint (step $latest)" \
    || bad "second Ctrl-C" "exit $rc, latest '$latest', resume exit $rc2: $(echo "$out" | tail -n 2 | tr '\n' ' ')"

# ---- the GPU trainer's main on the CUDA simulator (the same loop, common/train_main.h)
SIM=build/cuda_sim/train_gpt2cu
if [ -x $SIM ]; then
    NS=16
    $SIM "${COMMON[@]}" -x $NS -n $NS -o "$W/sref" > "$W/sref.log" 2>&1 || bad "simulated GPU reference run" "$(tail -n 2 "$W/sref.log")"
    start_and_signal "$W/sim.log" TERM self $SIM "${COMMON[@]}" -x $NS -n $NS -o "$W/sim"
    check_stop "GPU trainer (simulated)" $NS TERM $? "$W/sim.log" "$W/sim" "$W/sref.log" "$W/sref" 1 $SIM "${COMMON[@]}" -x $NS -n $NS -o "$W/sim" -y 1
else
    echo "# GPU trainer on the simulator not built ($SIM): skipped"
fi

# ---- two ranks under mpirun; the signal reaches rank 1 alone, both stop after the same step
if [ -x ./train_gpt2_mpi ] && command -v mpirun > /dev/null; then
    export OMP_NUM_THREADS=1
    MPI=(mpirun --oversubscribe --mca mpi_yield_when_idle 1 -np 2 -x OMP_NUM_THREADS)
    [ "$(id -u)" -eq 0 ] && MPI=(mpirun --allow-run-as-root --oversubscribe --mca mpi_yield_when_idle 1 -np 2 -x OMP_NUM_THREADS)
    NM=40
    "${MPI[@]}" ./train_gpt2_mpi "${COMMON[@]}" -b 2 -x $NM -n $NM -o "$W/mref" > "$W/mref.log" 2>&1 || bad "2-rank reference run" "$(tail -n 2 "$W/mref.log")"
    rank1() { pgrep -f "train_gpt2_mpi .*-o $W/mpi" | sort -n | tail -1; }  # the later-started of the two ranks
    start_and_signal "$W/mpi.log" USR1 rank1 "${MPI[@]}" ./train_gpt2_mpi "${COMMON[@]}" -b 2 -x $NM -n $NM -o "$W/mpi"
    rc=$?
    [ $rc -ne 0 ] && rc=138  # mpirun's own status when a rank exits non-zero; the ranks' status is checked in its report
    grep -q 'Exit code: *138' "$W/mpi.log" || rc=1
    check_stop "2 ranks (mpirun)" $NM USR1 $rc "$W/mpi.log" "$W/mpi" "$W/mref.log" "$W/mref" 2 \
        "${MPI[@]}" ./train_gpt2_mpi "${COMMON[@]}" -b 2 -x $NM -n $NM -o "$W/mpi" -y 1

    # the GPU trainer's two ranks on the simulator (tests/cuda_sim/nccl_sim.h): the same agreement,
    # through the NCCL host all-reduce
    GM=build/cuda_sim/train_gpt2cu_mgpu
    if [ -x $GM ]; then
        NG=16
        "${MPI[@]}" $GM "${COMMON[@]}" -b 2 -x $NG -n $NG -o "$W/gref" > "$W/gref.log" 2>&1 || bad "2-rank GPU reference run" "$(tail -n 2 "$W/gref.log")"
        grank1() { pgrep -f "train_gpt2cu_mgpu .*-o $W/gmpi" | sort -n | tail -1; }
        start_and_signal "$W/gmpi.log" USR1 grank1 "${MPI[@]}" $GM "${COMMON[@]}" -b 2 -x $NG -n $NG -o "$W/gmpi"
        rc=$?
        [ $rc -ne 0 ] && rc=138
        grep -q 'Exit code: *138' "$W/gmpi.log" || rc=1
        check_stop "GPU trainer, 2 ranks (simulated, mpirun)" $NG USR1 $rc "$W/gmpi.log" "$W/gmpi" "$W/gref.log" "$W/gref" 2 \
            "${MPI[@]}" $GM "${COMMON[@]}" -b 2 -x $NG -n $NG -o "$W/gmpi" -y 1
    fi

    # scripts/launch.sh (the crash-tolerant launcher) passes SIGUSR1 on and ends with the run
    # instead of resuming it; started again, it carries on from the stop's checkpoint
    LAUNCH_ENV=(NPROC=2 OUT="$W/L" STEPS=30 BIN=./train_gpt2_mpi RETRY_SLEEP=0 MPIRUN="mpirun --oversubscribe --mca mpi_yield_when_idle 1 -x OMP_NUM_THREADS")
    start_and_signal "$W/L.log" USR1 self env "${LAUNCH_ENV[@]}" bash scripts/launch.sh "${COMMON[@]}" -b 2 -n 10
    rc=$?
    k=$(ls "$W/L" 2> /dev/null | sed -nE 's/^DONE_0*([0-9]+)$/\1/p' | sort -n | tail -1)
    out=$(env "${LAUNCH_ENV[@]}" bash scripts/launch.sh "${COMMON[@]}" -b 2 -n 10 2>&1)
    rc2=$?
    [ $rc -eq 138 ] && [ "$(grep -ac '^launch attempt' "$W/L.log")" -eq 1 ] && grep -aq '^stopped by SIGUSR1 (exit 138)' "$W/L.log" \
        && [ -n "$k" ] && [ "$k" -lt 30 ] && [ $rc2 -eq 0 ] && echo "$out" | grep -q "^resumed from .* at step $k$" && [ -f "$W/L/DONE_00000030" ] \
        && ok "launch.sh: SIGUSR1 passed on, the run stopped after step $k and was not relaunched; launched again, it finished" \
        || bad "launch.sh and a signal" "exit $rc then $rc2, stop checkpoint '$k': $(grep -aE '^(launch|stopped)' "$W/L.log" | head -3 | tr '\n' ' ')"
else
    echo "# skipped the mpirun case: train_gpt2_mpi or mpirun missing"
fi
summary
