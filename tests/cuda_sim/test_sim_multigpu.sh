#!/usr/bin/env bash
# test_sim_multigpu.sh: the GPU trainer's data parallelism (cuda/multigpu.cuh: NCCL all-reduce,
# ZeRO-1's reduce-scatter and all-gather, the host collectives, the -pi fs rendezvous), run on the
# CUDA simulator with NCCL stood in for by tests/cuda_sim/nccl_sim.h (ranks are processes meeting
# in a mapped file): build/cuda_sim/train_gpt2cu_mgpu. Checks that 2 ranks with batch B follow
# 1 process with 2B (bf16 gradients are averaged after rounding: close, not equal), that ZeRO-1 is
# bit-identical to plain data parallelism, that a 2-rank ZeRO-1 resume is bit-identical, that a
# structured model's routing statistics are those of the global batch, that gradient accumulation
# and -h 1 work across ranks, that the gradient averaging overlaps the backward, that ranks
# started without mpirun (-pi fs, -pi tcp) equal mpirun's, that a rank that dies stops the other
# with an error instead of a hang, that -pt 1 prints rank 0's table, and that -at 1 chooses the same
# kernels on every rank; and tests/test_multigpu.cu
# (the collectives alone) on 1, 2 and 3 ranks. Prints "N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/cuda_sim/train_gpt2cu_mgpu}
ONE=${ONE:-build/cuda_sim/train_gpt2cu}
source tests/lib.sh
if [ ! -x "$BIN" ] || [ ! -x "$ONE" ]; then
    bad "simulated multi-GPU trainer" "$BIN or $ONE not built (make $BIN $ONE)"
    summary; exit 1
fi
MPI=()
if command -v mpirun > /dev/null; then
    MPI=(mpirun --oversubscribe --mca mpi_yield_when_idle 1 -np 2 -x SIM_THREADS -x SIM_NCCL_REPORT)
    [ "$(id -u)" -eq 0 ] && MPI=(mpirun --allow-run-as-root --oversubscribe --mca mpi_yield_when_idle 1 -np 2 -x SIM_THREADS -x SIM_NCCL_REPORT)
fi
export SIM_THREADS=1  # two ranks on two cores
export SIM_NCCL_REPORT=0

python3 tests/synthetic_shards.py "$W" --seed 0 --docs 60 --train_shards 1 --val_docs 10 --eval_examples 24 > /dev/null
D=(-i "$W/syn_train_*.bin" -j "$W/syn_val_000000.bin" -t 16 -x 6 -v 3 -m 2 -s 0)
trace() { grep -E '^(step |val loss)' "$1" | sed -E 's/ \| [0-9.]+ ms .*//'; }
# two ranks: under mpirun when there is one, else started as -pi fs ranks
two() {  # LOG args... (TWO_BIN: another program than $BIN)
    local log=$1 bin=${TWO_BIN:-$BIN}
    shift
    if [ ${#MPI[@]} -gt 0 ]; then
        "${MPI[@]}" "$bin" "$@" > "$log" 2>&1
    else
        local rdv
        rdv=$(mktemp -d "$W/rdv.XXXXXX")
        "$bin" "$@" -pn 2 -pr 1 -pi fs -pf "$rdv" > "$log.rank1" 2>&1 &
        "$bin" "$@" -pn 2 -pr 0 -pi fs -pf "$rdv" > "$log" 2>&1
        local rc=$?
        wait $! || rc=1
        return $rc
    fi
}
# max |a - b| of the values after WORD (loss, norm, val loss) in two traces, and how many
maxdiff() {  # WORD FILE1 FILE2
    paste <(grep -oE "$1 [0-9.]+" "$2" | awk '{print $NF}') <(grep -oE "$1 [0-9.]+" "$3" | awk '{print $NF}') |
        awk '{ d = $1 - $2; if (d < 0) d = -d; if ($2 == "") d = 1e9; if (d > m) m = d; n++ } END { printf "%d %g", n, m }'
}

# ---- dense: 2 ranks with B=2 against 1 process with B=4
"$ONE" -e tests/configs/tiny_dense.conf "${D[@]}" -b 4 > "$W/one.log" 2>&1 || bad "1-process run" "$(tail -2 "$W/one.log")"
two "$W/two.log" -e tests/configs/tiny_dense.conf "${D[@]}" -b 2; rc=$?
trace "$W/one.log" > "$W/one.txt"; trace "$W/two.log" > "$W/two.txt"
read -r nl ml <<< "$(maxdiff loss "$W/one.txt" "$W/two.txt")"
read -r nn mn <<< "$(maxdiff norm "$W/one.txt" "$W/two.txt")"
l1a=$(grep -m1 '^step' "$W/one.txt" | grep -oE 'loss [0-9.]+'); l1b=$(grep -m1 '^step' "$W/two.txt" | grep -oE 'loss [0-9.]+')
# step 1's loss: the same forward of the same sequences, averaged over ranks (exact to the printed
# digits); later steps: bf16 gradients rounded per rank, then averaged (about 1e-4 here)
[ $rc -eq 0 ] && grep -q 'processes / ZeRO      | 2 ' "$W/two.log" && [ "$nl" -eq 9 ] && [ "$l1a" = "$l1b" ] &&
    awk -v m="$ml" -v n="$mn" 'BEGIN { exit !(m <= 2e-3 && n <= 5e-3) }' \
    && ok "dense: 2 ranks of B=2 follow 1 process of B=4 (step 1's $l1a alike; $nl losses within $ml, norms within $mn)" \
    || bad "dense data parallel" "exit $rc, $nl losses, max diff $ml, norms $mn, '$l1a' vs '$l1b': $(tail -n 3 "$W/two.log" | tr '\n' ' ')"

# ---- the gradient averaging overlaps the backward: each block's gradients go to NCCL's
# (non-blocking) stream as soon as its backward is done, and the default stream goes on with the
# blocks below; the stand-in counts the collectives that finished after later default-stream work
# had run (SIM_NCCL_REPORT). A stream that synchronises with the default one, or a wait after each
# block, gives 0 (tried). Here 6 steps of 2 blocks: at least 12, and most of all the collectives.
SIM_NCCL_REPORT=1 two "$W/ovl.log" -e tests/configs/tiny_dense.conf "${D[@]}" -b 2 -x 6 -v 0 -s 0; rc=$?
read -r ntot novl <<< "$(grep -m1 -oE 'nccl_sim: rank 0: [0-9]+ collectives, [0-9]+ alongside' "$W/ovl.log" | grep -oE '[0-9]+' | tail -n 2 | tr '\n' ' ')"
[ $rc -eq 0 ] && [ -n "$novl" ] && [ "$novl" -ge 12 ] && [ $((2 * novl)) -ge "$ntot" ] \
    && ok "the gradient averaging overlaps the backward: $novl of rank 0's $ntot collectives ran alongside later default-stream work" \
    || bad "overlapped gradient averaging" "exit $rc: '$(grep -m1 'nccl_sim: rank 0' "$W/ovl.log")'"

# ---- gradient accumulation on each rank (-d: 2 micro-steps of B=1 per rank), against the same
# 1-process run (training steps only: validation reads batches of B=1 here, other tokens)
two "$W/acc.log" -e tests/configs/tiny_dense.conf "${D[@]}" -b 1 -d 64; rc=$?
read -r nl ml <<< "$(maxdiff loss <(grep '^step' "$W/one.txt") <(trace "$W/acc.log" | grep '^step'))"
read -r nn mn <<< "$(maxdiff norm <(grep '^step' "$W/one.txt") <(trace "$W/acc.log" | grep '^step'))"
[ $rc -eq 0 ] && grep -q 'grad accum 2 ' "$W/acc.log" && [ "$nl" -eq 6 ] && awk -v m="$ml" -v n="$mn" 'BEGIN { exit !(m <= 2e-3 && n <= 5e-3) }' \
    && ok "2 ranks x 2 accumulated micro-steps of B=1 follow 1 process of B=4 ($nl losses within $ml, norms within $mn)" \
    || bad "accumulation across ranks" "exit $rc, $nl losses, max diff $ml, norms $mn: $(tail -n 2 "$W/acc.log" | tr '\n' ' ')"
# the same with ZeRO-1: only the last micro-step's backward hands the blocks to NCCL, the earlier
# ones accumulate each rank's own gradients; bit-identical to -z 0
two "$W/accz.log" -e tests/configs/tiny_dense.conf "${D[@]}" -b 1 -d 64 -z 1; rc=$?
[ $rc -eq 0 ] && grep -q 'stage 1' "$W/accz.log" && [ -n "$(trace "$W/acc.log")" ] && [ "$(trace "$W/acc.log")" = "$(trace "$W/accz.log")" ] \
    && ok "2 ranks x 2 accumulated micro-steps with ZeRO-1: every value bit-identical to -z 0" \
    || bad "accumulation with ZeRO-1" "exit $rc: $(diff <(trace "$W/acc.log") <(trace "$W/accz.log") | head -3 | tr '\n' ' ')"

# ---- -h 1 (HellaSwag-style eval): the examples split over the ranks, the counts summed
"$ONE" -e tests/configs/tiny_dense.conf "${D[@]}" -b 8 -x 0 -h 1 -hf "$W/syn_eval.bin" > "$W/h1.log" 2>&1
two "$W/h2.log" -e tests/configs/tiny_dense.conf "${D[@]}" -b 8 -x 0 -h 1 -hf "$W/syn_eval.bin"; rc=$?
h1=$(grep -m1 -E '^HellaSwag: [0-9]+/' "$W/h1.log"); h2=$(grep -m1 -E '^HellaSwag: [0-9]+/' "$W/h2.log")
[ $rc -eq 0 ] && [ -n "$h1" ] && [ "$h1" = "$h2" ] && echo "$h1" | grep -q '/24 ' \
    && ok "-h 1 on 2 ranks: the same score as 1 process ($h1)" || bad "-h 1 on 2 ranks" "exit $rc: '$h1' vs '$h2'"

# ---- ZeRO-1: bit-identical to plain data parallelism (the same averaged gradients, AdamW on the
# rank's slice, then the all-gather), losses and the step-6 weights
two "$W/z0.log" -e tests/configs/tiny_dense.conf "${D[@]}" -b 2 -o "$W/Z0" -n 6; rc0=$?
two "$W/z1.log" -e tests/configs/tiny_dense.conf "${D[@]}" -b 2 -o "$W/Z1" -n 6 -z 1; rc1=$?
[ $rc0 -eq 0 ] && [ $rc1 -eq 0 ] && grep -q 'processes / ZeRO      | 2    / stage 1' "$W/z1.log" && [ "$(trace "$W/z0.log")" = "$(trace "$W/z1.log")" ] \
    && cmp -s "$W/Z0/model_00000006.bin" "$W/Z1/model_00000006.bin" && [ -f "$W/Z1/state_00000006_00001.bin" ] \
    && ok "ZeRO-1 (-z 1): every loss, norm and val loss, and the step-6 model file, bit-identical to -z 0" \
    || bad "ZeRO-1" "exit $rc0/$rc1: $(diff <(trace "$W/z0.log") <(trace "$W/z1.log") | head -3 | tr '\n' ' ') $(ls "$W/Z1" | tr '\n' ' ')"

# ---- 3 ranks: ZeRO-1's shards of a parameter table that 3 does not divide (padded), against -z 0
if [ ${#MPI[@]} -gt 0 ]; then
    MPI3=("${MPI[@]}")
    for i in "${!MPI3[@]}"; do [ "${MPI3[$i]}" = 2 ] && [ "${MPI3[$((i - 1))]}" = -np ] && MPI3[$i]=3; done
    "${MPI3[@]}" "$BIN" -e tests/configs/tiny_dense.conf "${D[@]}" -b 1 -x 4 -o "$W/T0" -n 4 > "$W/t0.log" 2>&1; rc0=$?
    "${MPI3[@]}" "$BIN" -e tests/configs/tiny_dense.conf "${D[@]}" -b 1 -x 4 -o "$W/T1" -n 4 -z 1 > "$W/t1.log" 2>&1; rc1=$?
    np=$(grep -m1 -oE 'parameters +\| [0-9]+' "$W/t1.log" | grep -oE '[0-9]+$')
    [ $rc0 -eq 0 ] && [ $rc1 -eq 0 ] && [ -n "$np" ] && [ $((np % 3)) -ne 0 ] && grep -q 'processes / ZeRO      | 3    / stage 1' "$W/t1.log" \
        && [ "$(trace "$W/t0.log")" = "$(trace "$W/t1.log")" ] && cmp -s "$W/T0/model_00000004.bin" "$W/T1/model_00000004.bin" \
        && ok "3 ranks, ZeRO-1 over $np parameters (not a multiple of 3): bit-identical to -z 0" \
        || bad "3-rank ZeRO-1" "exit $rc0/$rc1, $np parameters: $(diff <(trace "$W/t0.log") <(trace "$W/t1.log") | head -3 | tr '\n' ' ') $(tail -n 2 "$W/t1.log" | tr '\n' ' ')"
fi

# ---- cuda/multigpu.cuh alone (tests/test_multigpu.cu): every collective on values exact in bf16,
# gradient blocks written on the default stream right before each goes to NCCL; 1 rank (a
# communicator of one), 2 ranks, and 3 under mpirun
TMG=${TMG:-build/cuda_sim/test_multigpu}
tmg() {  # RANKS LOG
    if [ "$1" = 1 ]; then "$TMG" > "$2" 2>&1; return; fi
    if [ "$1" = 2 ]; then TWO_BIN=$TMG two "$2" -b 2; return; fi  # with the bench's code path
    "${MPI3[@]}" "$TMG" > "$2" 2>&1
}
if [ -x "$TMG" ]; then
    for n in 1 2 3; do
        [ $n = 3 ] && [ ${#MPI[@]} -eq 0 ] && continue
        tmg $n "$W/tmg$n.log"; rc=$?
        [ $rc -eq 0 ] && grep -q '^10 passed, 0 failed' "$W/tmg$n.log" && { [ $n != 2 ] || [ "$(grep -c '^bench: ' "$W/tmg$n.log")" = 4 ]; } \
            && ok "test_multigpu on $n rank(s): $(grep -c '^ok ' "$W/tmg$n.log") checks of the collectives alone$([ $n = 2 ] && echo ', and the bench'"'"'s 4 timings')" \
            || bad "test_multigpu on $n rank(s)" "exit $rc: $(grep -m2 -E 'FAIL|ERROR|error' "$W/tmg$n.log" | tr '\n' ' ')"
    done
else
    bad "test_multigpu" "$TMG not built (make $TMG)"
fi

# ---- a 2-rank ZeRO-1 run resumed from its step-3 checkpoint: bit-identical to the whole run (a
# dense model, and the structured one with the fused kernels)
for m in "dense:tests/configs/tiny_dense.conf:-sk 0" "structured:tests/configs/tiny_mixed.conf:-sk 1"; do
    tag=${m%%:*}; rest=${m#*:}; cfg=${rest%%:*}; sk=${rest#*:}
    # shellcheck disable=SC2086
    two "$W/r_$tag.log" -e "$cfg" "${D[@]}" -b 2 -o "$W/R_$tag" -n 3 -z 1 $sk
    cp -r "$W/R_$tag" "$W/R2_$tag" && rm -f "$W/R2_$tag"/*00000006*
    # shellcheck disable=SC2086
    two "$W/r2_$tag.log" -e "$cfg" "${D[@]}" -b 2 -o "$W/R2_$tag" -n 3 -z 1 $sk -y 1; rc=$?
    same=1
    for f in model_00000006.bin state_00000006_00000.bin state_00000006_00001.bin; do cmp -s "$W/R_$tag/$f" "$W/R2_$tag/$f" || same=0; done
    steps() { trace "$1" | grep -E '^step +[456]/'; }
    [ $rc -eq 0 ] && grep -q 'resumed from' "$W/r2_$tag.log" && [ $same = 1 ] && [ -n "$(steps "$W/r_$tag.log")" ] \
        && [ "$(steps "$W/r_$tag.log")" = "$(steps "$W/r2_$tag.log")" ] \
        && ok "2 ranks, ZeRO-1, $tag ($sk): resumed at step 3, steps 4-6 and the step-6 model and both ranks' states as the whole run" \
        || bad "2-rank resume, $tag" "exit $rc, files alike: $same: $(diff <(steps "$W/r_$tag.log") <(steps "$W/r2_$tag.log") | head -3 | tr '\n' ' ')"
done

# ---- a structured model (BTT, Monarch, BTT-MoE): the aux loss is that of the global batch's
# routing statistics (summed over ranks on the device); with the fused kernels too
for sk in 0 1; do
    "$ONE" -e tests/configs/tiny_mixed.conf "${D[@]}" -b 4 -x 3 -sk $sk > "$W/mone$sk.log" 2>&1
    two "$W/mtwo$sk.log" -e tests/configs/tiny_mixed.conf "${D[@]}" -b 2 -x 3 -sk $sk; rc=$?
    a=$(grep -m1 '^step' "$W/mone$sk.log" | grep -oE '(loss|aux|bal|load) [0-9.-]+' | tr '\n' ' ')
    b=$(grep -m1 '^step' "$W/mtwo$sk.log" | grep -oE '(loss|aux|bal|load) [0-9.-]+' | tr '\n' ' ')
    read -r nl ml <<< "$(maxdiff loss <(trace "$W/mone$sk.log") <(trace "$W/mtwo$sk.log"))"
    [ $rc -eq 0 ] && [ -n "$a" ] && [ "$a" = "$b" ] && echo "$a" | grep -q aux && awk -v m="$ml" 'BEGIN { exit !(m <= 5e-3) }' \
        && ok "structured model, -sk $sk: 2 ranks' step 1 ($a) as 1 process's; $nl losses within $ml" \
        || bad "structured model, 2 ranks, -sk $sk" "exit $rc: '$a' vs '$b', losses $ml: $(tail -n 2 "$W/mtwo$sk.log" | tr '\n' ' ')"
done

# ---- -at 1 on 2 ranks: the kernels' times are summed over the ranks before the choice, so both
# ranks run the same kernels (their resume states end in the same bytes) and rank 0 alone prints
two "$W/at.log" -e tests/configs/tiny_mixed.conf "${D[@]}" -b 2 -x 2 -at 1 -o "$W/AT" -n 2; rc=$?
nl=$((2 * 6 + 1))  # linear layers: 2 blocks of 6, and the head
k0=$(tail -c $nl "$W/AT/state_00000002_00000.bin" 2> /dev/null | od -An -tu1 | tr -s ' \n' ' ')
k1=$(tail -c $nl "$W/AT/state_00000002_00001.bin" 2> /dev/null | od -An -tu1 | tr -s ' \n' ' ')
[ $rc -eq 0 ] && [ -n "$k0" ] && [ "$k0" = "$k1" ] && [ "$(grep -c "^-at 1: each structured layer's kernels" "$W/at.log")" = 1 ] \
    && ok "-at 1 on 2 ranks: one table, and both ranks' states keep the same kernels ($k0)" \
    || bad "-at 1 on 2 ranks" "exit $rc, kernels '$k0' vs '$k1': $(tail -n 2 "$W/at.log" | tr '\n' ' ')"

# ---- ranks started without mpirun (-pn -pr -pi fs|tcp -pf): the NCCL id through a shared
# directory or rank 0's socket; the same trace as under mpirun
if [ ${#MPI[@]} -gt 0 ]; then
    mkdir -p "$W/rdv"
    for how in "fs:$W/rdv" "tcp:127.0.0.1:$((20000 + RANDOM % 20000))"; do
        pi=${how%%:*}; pf=${how#*:}
        "$BIN" -e tests/configs/tiny_dense.conf "${D[@]}" -b 2 -pn 2 -pr 1 -pi "$pi" -pf "$pf" > "$W/${pi}1.log" 2>&1 &
        p1=$!
        "$BIN" -e tests/configs/tiny_dense.conf "${D[@]}" -b 2 -pn 2 -pr 0 -pi "$pi" -pf "$pf" > "$W/${pi}0.log" 2>&1; rc=$?
        wait $p1; rc1=$?
        [ $rc -eq 0 ] && [ $rc1 -eq 0 ] && [ "$(trace "$W/${pi}0.log")" = "$(trace "$W/two.log")" ] \
            && ok "-pi $pi ($pf): 2 ranks started by hand train exactly as under mpirun" \
            || bad "-pi $pi ranks" "exit $rc/$rc1: $(diff <(trace "$W/two.log") <(trace "$W/${pi}0.log") | head -3 | tr '\n' ' ') $(tail -n 2 "$W/${pi}1.log" | tr '\n' ' ')"
    done
fi

# ---- a rank that dies: the other's watchdog (nccl_wait: cudaStreamQuery polled while the
# collective waits for the dead rank) stops it after STRUCTGPT_NCCL_TIMEOUT seconds with exit 1,
# aborting the communicator first (the exit then leaves it alone), instead of hanging
mkdir -p "$W/dead"
"$BIN" -e tests/configs/tiny_dense.conf "${D[@]}" -x 200 -b 2 -pn 2 -pr 1 -pi fs -pf "$W/dead" > "$W/dead1.log" 2>&1 &
p1=$!
STRUCTGPT_NCCL_TIMEOUT=3 "$BIN" -e tests/configs/tiny_dense.conf "${D[@]}" -x 200 -b 2 -pn 2 -pr 0 -pi fs -pf "$W/dead" > "$W/dead0.log" 2>&1 &
p0=$!
for i in $(seq 600); do grep -q '^step    2/' "$W/dead0.log" && break; sleep 0.05; done
kill -9 $p1 2> /dev/null
{ wait $p1; } 2> /dev/null  # reaped quietly (bash would report the kill)
t0=$(date +%s)
wait $p0; rc=$?
dt=$(($(date +%s) - t0))
[ $rc -eq 1 ] && [ $dt -le 30 ] && grep -qE '^error: .* has not finished after 3 s: another rank has probably died' "$W/dead0.log" \
    && ok "a rank killed at step 2: the other's watchdog stops it (exit 1) after ${dt}s: '$(grep -m1 '^error: ' "$W/dead0.log" | cut -c1-100)'" \
    || bad "dead rank" "exit $rc after ${dt}s: $(tail -n 2 "$W/dead0.log" | tr '\n' ' ')"
# -pt 1 with two ranks and accumulation: one table (rank 0's), its parts adding up, the wait for the
# gradient averaging among them
two "$W/pt.log" -e tests/configs/tiny_dense.conf "${D[@]}" -x 3 -v 0 -b 2 -d 128 -pt 1; rc=$?
out=$(cat "$W/pt.log")
[ $rc -eq 0 ] && [ "$(grep -c '^step profile' "$W/pt.log")" = 1 ] && ok "-pt 1, 2 ranks: one table, rank 0's" \
    || bad "-pt 1, 2 ranks" "exit $rc, $(grep -c '^step profile' "$W/pt.log") tables: $(tail -n 2 "$W/pt.log")"
check_profile "-pt 1, 2 ranks: the parts count rank 0's FLOPs once and add up to its step time" 5 "$out" \
    "gradient averaging (what the backward did not hide)" "losses to the host, summed (GPU idle)" "qkv bwd: dense"

summary
