#!/usr/bin/env bash
# test_mpi.sh: the CPU trainer's data parallelism, proven without GPUs. `mpirun -np 2` with batch B
# must match one process with batch 2B (the same global batch) over 20 steps, for a dense and a
# BTT-MoE model (whose aux loss needs the routing statistics of the global batch); a 2-rank
# resume must be bit-identical; ZeRO-1 (-z 1, also with 3 ranks and a table that does not divide)
# must match plain data parallelism and resume bit for bit; and rank mistakes must give clear
# errors. "N passed, N failed".
set -u
cd "$(dirname "$0")/.."
source tests/lib.sh
if [ ! -x ./train_gpt2_mpi ] || ! command -v mpirun >/dev/null; then
    echo "# skipped: train_gpt2_mpi or mpirun missing (apt-get install libopenmpi-dev openmpi-bin, then make)"
    echo "0 passed, 0 failed"; exit 0
fi
export OMP_NUM_THREADS=1  # two ranks on two cores
# more ranks than cores: ranks waiting in a collective yield the core instead of spinning on it
MPI=(mpirun --oversubscribe --mca mpi_yield_when_idle 1 -np 2 -x OMP_NUM_THREADS)
[ "$(id -u)" -eq 0 ] && MPI=(mpirun --allow-run-as-root --oversubscribe --mca mpi_yield_when_idle 1 -np 2 -x OMP_NUM_THREADS)

python3 tests/synthetic_shards.py "$W" --seed 1 --docs 200 --val_docs 0 --eval_examples 31
cat > "$W/moe.conf" <<'CONF'
n_layer = 2
n_head = 2
n_embd = 64
moe_aux_weight = 0.1
[linear]
struct = btt_moe
experts = 4
topk = 2
router_init = 0.05
[linear.attn_proj]
struct = monarch
blocks = 4
CONF
DATA=(-i "$W/syn_train_000001.bin" -j "$W/syn_val_000000.bin" -t 32 -s 0 -sh 1 -l 1e-3 -v 10 -m 2)

# compare NAME FILE1 FILE2 TOL [LINES]: the loss (and aux) of every step and val loss within TOL,
# over the first LINES lines of output (all by default)
compare() {
    local name=$1 a=$2 b=$3 tol=$4 lines=${5:-1000}
    local res
    res=$(paste <(head -n "$lines" "$a" | grep -oE '(loss|aux|bal|load) [0-9.]+' | awk '{print $2}') \
                <(head -n "$lines" "$b" | grep -oE '(loss|aux|bal|load) [0-9.]+' | awk '{print $2}') |
          awk -v tol="$tol" '{ n++; d = $1 - $2; if (d < 0) d = -d; if (d > m) m = d; if ($2 == "") miss = 1 }
                              END { printf "%d %g %d\n", n, m, miss }')
    local n max miss
    read -r n max miss <<< "$res"
    if [ "${n:-0}" -ge 10 ] && [ "$miss" = 0 ] && awk -v m="$max" -v t="$tol" 'BEGIN {exit !(m <= t)}'; then
        ok "$name ($n values, max |diff| $max <= $tol)"
    else
        bad "$name" "n=$n max |diff| $max tol $tol; one: $(head -c 300 "$a" | tr '\n' ' ') two: $(head -c 300 "$b" | tr '\n' ' ')"
    fi
}

for model in d2 "$W/moe.conf"; do
    tag=$( [ "$model" = d2 ] && echo dense || echo btt_moe )
    ./train_gpt2 -e "$model" "${DATA[@]}" -b 4 -x 20 2>&1 | grep -E '^step|^val loss' > "$W/one_$tag.txt"
    "${MPI[@]}" ./train_gpt2_mpi -e "$model" "${DATA[@]}" -b 2 -x 20 2>&1 | grep -E '^step|^val loss|error' > "$W/two_$tag.txt"
done
compare "dense: mpirun -np 2 with B=2 equals 1 process with B=4 over 20 steps" "$W/one_dense.txt" "$W/two_dense.txt" 2e-4
# BTT-MoE: the aux loss needs the global batch's routing statistics (a rank-local P̂ or f̂ differs
# from step 1) and its gradient the right scale (differs from step 2): the first 5 steps must agree
# as tightly as dense. Later, a top-k near-tie can flip under the other fp32 summation order (seen
# at step 8 here), after which the runs drift apart slowly: over 20 steps they must stay within 0.1.
compare "btt_moe: mpirun -np 2 with B=2 equals 1 process with B=4 over the first 5 steps" "$W/one_btt_moe.txt" "$W/two_btt_moe.txt" 2e-4 6
compare "btt_moe: and stays close over 20 steps" "$W/one_btt_moe.txt" "$W/two_btt_moe.txt" 0.1
grep -q "aux" "$W/two_btt_moe.txt" && ok "btt_moe: the aux loss is reported under mpirun" || bad "aux under mpirun" "no aux"

# -sl 3 under mpirun with ZeRO-1: the repeated-token batch of test_cli.sh, split over 2 ranks of B
# 2, is skipped at step 121 on both (a rank skipping alone would hang in ZeRO-1's gather)
mkdir -p "$W/ol"
python3 tests/synthetic_shards.py "$W/ol" --seed 0 --docs 200 --val_docs 0 --noise_at $((120 * 128)) --noise_len 129 --noise_lo 50000 --noise_hi 50001 > /dev/null
out=$(timeout 300 "${MPI[@]}" ./train_gpt2_mpi -e d2 -i "$W/ol/syn_train_000001.bin" -j "" -b 2 -t 32 -s 0 -v 0 -l 1e-3 -x 121 -z 1 -sl 3 2>&1); rc=$?
sk=$(echo "$out" | grep -c "update skipped")
[ $rc -eq 0 ] && [ "$sk" -eq 1 ] && echo "$out" | grep -qE "^step  121/121 .*update skipped: loss z" \
    && ok "-sl 3 with 2 ranks and -z 1: step 121 skipped, the run finishes" || bad "-sl under mpirun" "exit $rc, $sk skips: $(echo "$out" | grep -E 'skipped|error' | head -3)"

# -h 1 under mpirun: the ranks take alternate examples (31: rank 0 one more) and sum their counts,
# which must equal one process's count for the same fresh model
h1=$(./train_gpt2 -e d2 "${DATA[@]}" -b 4 -x 1 -v 1 -h 1 -hf "$W/syn_eval.bin" 2>&1 | grep -m1 -E '^HellaSwag: [0-9]+/')
h2=$("${MPI[@]}" ./train_gpt2_mpi -e d2 "${DATA[@]}" -b 4 -x 1 -v 1 -h 1 -hf "$W/syn_eval.bin" 2>&1 | grep -m1 -E '^HellaSwag: [0-9]+/')
[ -n "$h1" ] && [ "$h1" = "$h2" ] && ok "-h 1: 2 ranks count the same as 1 process ($h2)" || bad "-h 1 under mpirun" "1: '$h1' 2: '$h2'"

# ZeRO-1 (-z 1): the same training with the optimizer state sharded. The gradient norm is summed
# in another order (each rank's slice, then across ranks), so the clip factor may differ in the
# last bit: float tolerance, not bit equality. 3 ranks: the d2 table (6,966,784 parameters) does
# not divide by 3, so the last slice ends in padding.
MPI3=("${MPI[@]/#2/3}")  # the same mpirun with -np 3
for model in d2 "$W/moe.conf"; do
    tag=$( [ "$model" = d2 ] && echo dense || echo btt_moe )
    "${MPI[@]}" ./train_gpt2_mpi -e "$model" "${DATA[@]}" -b 2 -x 20 -z 1 2>&1 | grep -E '^step|^val loss|error' > "$W/zero_$tag.txt"
done
compare "ZeRO-1 dense: 2 ranks with -z 1 equal 2 ranks without over 20 steps" "$W/two_dense.txt" "$W/zero_dense.txt" 1e-5
compare "ZeRO-1 btt_moe: 2 ranks with -z 1 equal 2 ranks without over the first 5 steps" "$W/two_btt_moe.txt" "$W/zero_btt_moe.txt" 1e-5 6
compare "ZeRO-1 btt_moe: and stay close over 20 steps" "$W/two_btt_moe.txt" "$W/zero_btt_moe.txt" 0.1
"${MPI3[@]}" ./train_gpt2_mpi -e d2 "${DATA[@]}" -b 2 -x 12 -v 4 2>&1 | grep -E '^step|^val loss|error' > "$W/three.txt"
"${MPI3[@]}" ./train_gpt2_mpi -e d2 "${DATA[@]}" -b 2 -x 12 -v 4 -z 1 2>&1 | grep -E '^step|^val loss|error' > "$W/three_zero.txt"
compare "ZeRO-1 with 3 ranks and a table that does not divide by 3 (padded slices)" "$W/three.txt" "$W/three_zero.txt" 1e-5

# resume with 2 ranks: run A straight through 6 steps, run B loses its last checkpoint and resumes
RUN=(-e "$W/moe.conf" "${DATA[@]}" -b 2 -x 6 -n 3 -d 256)
"${MPI[@]}" ./train_gpt2_mpi "${RUN[@]}" -o "$W/A" > "$W/A.out" 2>&1 || bad "2-rank run A" "$(tail -n 3 "$W/A.out")"
"${MPI[@]}" ./train_gpt2_mpi "${RUN[@]}" -o "$W/B" > "$W/B.out" 2>&1 || bad "2-rank run B" "$(tail -n 3 "$W/B.out")"
[ -f "$W/A/state_00000003_00000.bin" ] && [ -f "$W/A/state_00000003_00001.bin" ] && [ -f "$W/A/DONE_00000003" ] \
    && ok "every rank writes its own resume state, then the DONE marker" || bad "state files" "$(ls "$W/A")"
rm -f "$W"/B/*_00000006*
"${MPI[@]}" ./train_gpt2_mpi "${RUN[@]}" -o "$W/B" -y 1 > "$W/B2.out" 2>&1 || bad "2-rank resume" "$(tail -n 3 "$W/B2.out")"
same=1
for f in model_00000006.bin state_00000006_00000.bin state_00000006_00001.bin; do cmp -s "$W/A/$f" "$W/B/$f" || same=0; done
[ $same = 1 ] && ok "2-rank resume is bit-identical (model and both ranks' states at step 6)" || bad "2-rank resume" "step-6 files differ"

# ZeRO-1 resume: bit-identical, each rank's state holding only its slice of the moments
RUNZ=(-e d2 "${DATA[@]}" -b 2 -x 6 -n 3 -d 128 -z 1)
"${MPI[@]}" ./train_gpt2_mpi "${RUNZ[@]}" -o "$W/ZA" > "$W/ZA.out" 2>&1 || bad "ZeRO run A" "$(tail -n 3 "$W/ZA.out")"
"${MPI[@]}" ./train_gpt2_mpi "${RUNZ[@]}" -o "$W/ZB" > "$W/ZB.out" 2>&1 || bad "ZeRO run B" "$(tail -n 3 "$W/ZB.out")"
rm -f "$W"/ZB/*_00000006*
"${MPI[@]}" ./train_gpt2_mpi "${RUNZ[@]}" -o "$W/ZB" -y 1 > "$W/ZB2.out" 2>&1 || bad "ZeRO resume" "$(tail -n 3 "$W/ZB2.out")"
same=1
for f in model_00000006.bin state_00000006_00000.bin state_00000006_00001.bin; do cmp -s "$W/ZA/$f" "$W/ZB/$f" || same=0; done
[ $same = 1 ] && ok "ZeRO-1 2-rank resume is bit-identical (model and both ranks' states at step 6)" || bad "ZeRO resume" "step-6 files differ"
sz=$(stat -c %s "$W/ZA/state_00000003_00000.bin")
want=$(( 1024 + 248 + 2 * 808 + 2 * 4 * (6966784 / 2) ))  # header, TrainState (31 x 8 bytes, two 808-byte outlier windows), m and v of one slice
[ "$sz" -eq "$want" ] && ok "a ZeRO-1 rank's state holds half of the moments ($sz bytes)" || bad "ZeRO state size" "$sz, wanted $want"
out=$("${MPI[@]}" ./train_gpt2_mpi -e d2 "${DATA[@]}" -b 2 -x 6 -n 3 -d 128 -o "$W/ZB" -y 1 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "was written with -z 1; resume with the same -z (now 0)" && ok "resuming a -z 1 run without -z 1 is refused" \
    || bad "-z mismatch" "exit $rc: $(echo "$out" | grep -m1 error)"
out=$(./train_gpt2_mpi -e d2 "${DATA[@]}" -z 2 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "\-z 2: the ZeRO stage must be 0 (off) or 1" && ok "-z 2 is refused with the stages it takes" \
    || bad "-z 2" "exit $rc: $out"

# mistakes
out=$(./train_gpt2_mpi "${RUN[@]}" -o "$W/B" -y 1 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "resume with the same number of processes" && ok "resuming 2-rank state with 1 process is refused" \
    || bad "process-count mismatch" "exit $rc: $(echo "$out" | tail -n 2)"
out=$("${MPI[@]}" ./train_gpt2_mpi -e d2 -i "$W/syn_val_000000.bin" -j "" -t 1024 -b 2 -s 0 -x 1 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "one batch needs B\*T\*nproc+1 = 4097" && ok "a shard too small for 2 ranks x B x T names the sizes" \
    || bad "shard too small for the ranks" "exit $rc: $(echo "$out" | grep -m1 error)"

# the crash-tolerant launcher: a trainer that dies after its step-3 checkpoint is relaunched with
# -y 1 and finishes; a second launch sees the DONE marker and trains nothing
cat > "$W/crashy.sh" <<CRASH
#!/usr/bin/env bash
# stands in for a run that crashes once: the first time, it trains and then loses everything after step 3
if [ ! -f "$W/crashed" ]; then
    touch "$W/crashed"
    "$PWD/train_gpt2_mpi" "\$@" >/dev/null 2>&1
    rm -f "$W/L"/*_00000006*
    exit 1
fi
exec "$PWD/train_gpt2_mpi" "\$@"
CRASH
chmod +x "$W/crashy.sh"
LAUNCH_ENV=(NPROC=2 OUT="$W/L" STEPS=6 BIN="$W/crashy.sh" RETRY_SLEEP=0 MPIRUN="mpirun --oversubscribe --mca mpi_yield_when_idle 1 -x OMP_NUM_THREADS")
out=$(env "${LAUNCH_ENV[@]}" bash scripts/launch.sh -e d2 "${DATA[@]}" -b 2 -n 3 2>&1); rc=$?
[ $rc -eq 0 ] && [ -f "$W/L/DONE_00000006" ] && echo "$out" | grep -q "launch attempt 2" && echo "$out" | grep -q "resumed from $W/L/model_00000003.bin at step 3" \
    && ok "launch.sh relaunches a crashed run, which resumes at step 3 and finishes" || bad "launch.sh" "exit $rc: $(echo "$out" | grep -E 'attempt|resumed|error' | head -5)"
out=$(env "${LAUNCH_ENV[@]}" bash scripts/launch.sh -e d2 "${DATA[@]}" -b 2 -n 3 2>&1)
echo "$out" | grep -q "^done:" && ! echo "$out" | grep -q "launch attempt" && ok "launch.sh does nothing once the DONE marker exists" \
    || bad "launch.sh after DONE" "$(echo "$out" | head -3)"

summary
