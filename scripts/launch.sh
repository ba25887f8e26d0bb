#!/usr/bin/env bash
# launch.sh: the crash-tolerant launcher behind scripts/run_*.sh. Runs the trainer under
# `mpirun -np NPROC` with `-y 1` until the DONE marker of the final step exists, so a run that
# crashes (a dead node, a killed job) resumes from its latest complete checkpoint. A signal is a
# request to stop, not a crash: the trainer checkpoints and exits (README, "Stopping a run") and
# this script ends with it; run it again (or let the scheduler requeue it) to carry on.
#   NPROC  processes (one per GPU)               BIN       trainer binary (default ./train_gpt2cu)
#   OUT    output dir (-o)                       STEPS     steps to train (-x)
#   TRIES  attempts before giving up (10)        MPIRUN    launcher (default "mpirun"; for several
#                                                          nodes add e.g. "mpirun --hostfile hosts")
# All other arguments are passed to the trainer.
set -u
: "${NPROC:?set NPROC}" "${OUT:?set OUT}" "${STEPS:?set STEPS}"
BIN=${BIN:-./train_gpt2cu}
TRIES=${TRIES:-10}
read -r -a MPI <<< "${MPIRUN:-mpirun}"
[ "$(id -u)" -eq 0 ] && MPI+=(--allow-run-as-root)
done_file=$(printf '%s/DONE_%08d' "$OUT" "$STEPS")
[ -x "$BIN" ] || { echo "error: trainer '$BIN' not found or not executable; build it with make" >&2; exit 1; }
mkdir -p "$OUT"
# SIGTERM and Ctrl-C reach the trainer from the scheduler or the terminal as they reach this script,
# so they are only noted (a second SIGTERM makes Open MPI's mpirun kill the ranks at once, with no
# checkpoint); SIGUSR1, which `sbatch --signal=B:USR1@T` sends to this script alone, is passed on.
stop=
child=
trap 'stop=SIGTERM' TERM
trap 'stop=SIGINT' INT
trap 'stop=SIGUSR1; [ -n "$child" ] && kill -USR1 "$child" 2> /dev/null' USR1
for attempt in $(seq 1 "$TRIES"); do
    if [ -f "$done_file" ]; then echo "done: $done_file exists"; exit 0; fi
    [ -n "$stop" ] && { echo "stopped by $stop before attempt $attempt" >&2; exit 1; }
    echo "launch attempt $attempt of $TRIES: ${MPI[*]} -np $NPROC $BIN -o $OUT -x $STEPS -y 1 $*"
    "${MPI[@]}" -np "$NPROC" "$BIN" -o "$OUT" -x "$STEPS" -y 1 "$@" &
    child=$!
    while :; do  # a trapped signal ends a wait early; the trainer is still finishing its step
        wait "$child"
        rc=$?
        kill -0 "$child" 2> /dev/null || break
    done
    child=
    [ -f "$done_file" ] && { echo "done: $done_file exists"; exit 0; }
    if [ -n "$stop" ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 138 ] || [ "$rc" -eq 143 ]; then
        echo "stopped by ${stop:-a signal} (exit $rc): the latest checkpoint is in $OUT; run this again to carry on" >&2
        exit "$rc"
    fi
    echo "the trainer exited with $rc before its last checkpoint; resuming in 5 s" >&2
    sleep "${RETRY_SLEEP:-5}"
done
echo "error: $TRIES attempts did not finish $OUT (no $done_file); see the messages above" >&2
exit 1
