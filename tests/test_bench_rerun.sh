#!/usr/bin/env bash
# tests/test_bench_rerun.sh: the GPU benchmark and test scripts go on past a case that ends its
# process (a CUDA error is sticky: the process that meets one can run nothing more), so that one
# failing kernel on a lent GPU does not cost the rest of the call's figures. Run here on the CPU
# simulator's builds at tiny sizes, with the programs' stand-ins for such an error
# (STRUCTURED_LAYERS_FAIL_AT, TEST_GPT2CU_FAIL_UNIT):
#   - dev/bench/structured.sh: without a failure, one process and every row; with one, the same
#     rows less the failing case's, each once (dense too, though the rerun times it again), and a
#     note; the same across shapes; a failure in dense ends its width and shape only, and one in
#     every width ends the script with exit 1, not a loop;
#   - dev/bench/gpu_test.sh: test_gpt2cu's units after a failing one run in a new process, and
#     the summary counts the failure;
#   - dev/bench/common.sh's at1_run (tune.sh, structured.sh's -at 1 rows): a trainer that dies
#     while -at 1 times a choice runs again with it left out (-ax), as its error says.
set -u
cd "$(dirname "$0")/.." || exit 1
source tests/lib.sh
LAYERS=build/cuda_sim/dev_structured_layers
[ -x "$LAYERS" ] || { bad "structured.sh's rerun" "$LAYERS not built (make $LAYERS)"; summary; exit; }

bench() {  # OUTDIR [VAR=VALUE...]: structured.sh's layers at widths 64 and 128, 64 rows, on the simulator
    local out=$1; shift
    env "$@" LAYERS_BIN="$LAYERS" BUILD=0 MODELS=0 DIMS=${DIMS:-64,128} N=64 WARMUP=0 REPS=1 OUT="$out" \
        timeout 300 bash dev/bench/structured.sh > "$out.out" 2>&1
}
table_rows() {  # OUTFILE: "d din->dout struct" of each row of structured.sh's first table, sorted
    sed -n '/^== structured layers/,/^$/p' "$1" | awk '$1 ~ /^[0-9]+$/ { print $1, $2, $3 }' | sort
}

bench "$W/plain"; rc=$?
all=$(table_rows "$W/plain.out")
n_all=$(echo "$all" | grep -c .)
starts=$(grep -c '^structured_layers: forward' "$W/plain.out")
if [ $rc -eq 0 ] && [ "$n_all" -ge 40 ] && [ "$starts" = 1 ] && ! grep -q '^note' "$W/plain.out" &&
    [ "$(grep -c '^DONE ' "$W/plain/layers_cuda.log")" = 1 ]; then
    ok "structured.sh without a failure: one process, $n_all rows, no note"
else
    bad "structured.sh without a failure" "rc $rc, $n_all rows, $starts processes: $(tail -3 "$W/plain.out")"
fi

# btt_r2_zt dies at 64: the rest of 64 runs without it (and without what already ran), 128 without it
bench "$W/one" STRUCTURED_LAYERS_FAIL_AT=btt_r2_zt; rc=$?
got=$(table_rows "$W/one.out")
want=$(echo "$all" | grep -v ' btt_r2_zt$')
runs=$(grep -c '^RUNNING .* struct=btt_r4_zt$' "$W/one/layers_cuda.log")
if [ $rc -eq 0 ] && [ "$got" = "$want" ] && [ "$runs" = 2 ] &&
    grep -q '^note: structured_layers ended (rc 1) in btt_r2_zt at 64 -> 256, so its row is missing: error: STRUCTURED_LAYERS_FAIL_AT' "$W/one.out" &&
    grep -q '^-- the rest in a new process: -d 64 -s fc -x btt_r2_zt,' "$W/one.out" &&
    grep -q '^-- the rest in a new process: -d 128 -s fc -x btt_r2_zt$' "$W/one.out"; then
    ok "structured.sh past a case that dies: every other row once ($(echo "$got" | grep -c .)), each case run once a width, and a note"
else
    bad "structured.sh past a case that dies" "rc $rc, rows less than expected: $(comm -3 <(echo "$want") <(echo "$got") | head -5 | tr '\n' ';') btt_r4_zt ran $runs times; $(grep -E '^(note|--)' "$W/one.out" | head -4)"
fi
# the fastest-path table keeps dense's first time (the rerun's dense row is left out)
d1=$(grep -m1 '^RESULT d=64 din=64 dout=256 struct=dense ' "$W/one/layers_cuda.log" | sed -E 's/.* ms=([0-9.]+) .*/\1/')
dt=$(sed -n '/^== structured layers/,/^$/p' "$W/one.out" | awk '$1 == 64 && $3 == "dense" { print $4 }')
if [ "$(grep -c '^RESULT d=64 din=64 dout=256 struct=dense ' "$W/one/layers_cuda.log")" = 2 ] &&
    awk -v a="$d1" -v b="$dt" 'BEGIN { exit !(a > 0 && a - b < 0.0006 && b - a < 0.0006) }'; then
    ok "structured.sh: dense timed twice at 64 (two processes), the table shows the first ($dt ms)"
else
    bad "structured.sh: dense's rows after a rerun" "first $d1, table $dt"
fi

# across shapes: dies at 64's fc; 64's sq and 128's both run, without it
DIMS=64,128 bench "$W/shapes" SHAPES=fc,sq STRUCTURED_LAYERS_FAIL_AT=btt_r2_zt; rc=$?
got=$(table_rows "$W/shapes.out")
sq64=$(echo "$got" | grep -c '^64 64->64 ')
fc128=$(echo "$got" | grep -c '^128 128->512 ')
sq128=$(echo "$got" | grep -c '^128 128->128 ')
if [ $rc -eq 0 ] && [ "$sq64" -ge 20 ] && [ "$fc128" -ge 20 ] && [ "$sq128" -ge 20 ] && ! echo "$got" | grep -q ' btt_r2_zt$' &&
    [ "$(echo "$got" | grep -c .)" = "$(echo "$got" | sort -u | grep -c .)" ] &&
    grep -q '^-- the rest in a new process: -d 64 -s sq -x btt_r2_zt$' "$W/shapes.out"; then
    ok "structured.sh -s fc,sq past a case that dies at 64 fc: 64 sq ($sq64), 128 fc ($fc128) and sq ($sq128) rows, none twice"
else
    bad "structured.sh -s fc,sq past a case that dies" "rc $rc, rows 64 sq $sq64, 128 fc $fc128, sq $sq128: $(grep -E '^(note|--)' "$W/shapes.out" | head -5)"
fi

# dense dies in every width: each width is left out in turn, and the script ends (exit 1)
bench "$W/dense" STRUCTURED_LAYERS_FAIL_AT=dense; rc=$?
if [ $rc -eq 1 ] && grep -q '^structured_layers failed (rc 1) before any result' "$W/dense.out" &&
    [ "$(grep -c '^note: the rest of .* is left out too' "$W/dense.out")" = 2 ] &&
    [ "$(grep -c '^structured_layers: forward' "$W/dense.out")" = 2 ]; then
    ok "structured.sh when dense dies in every width: two processes, exit 1"
else
    bad "structured.sh when dense dies" "rc $rc: $(tail -4 "$W/dense.out" | tr '\n' ';')"
fi

# ---- common.sh's at1_run (tune.sh, structured.sh's -at 1 rows): a stand-in trainer that dies timing
# -sk 5, then (with -ax sk5) -sk 2, then trains; one that always dies naming sk5; one that dies
# naming nothing: rerun with each choice left out in turn, never twice, not at all
cat > "$W/fake_trainer" <<'EOF2'
#!/usr/bin/env bash
ax=""; while [ $# -gt 0 ]; do [ "$1" = -ax ] && ax=$2; shift; done
die() { echo "error: CUDA: unspecified launch failure (at x.cu:1), while -at 1 timed layer 0's fc (btt r1 768x3072) with -sk ${1#sk}; -ax $1 leaves that choice out" >&2; exit 1; }
case "${MODE:-}" in
    always) die sk5 ;;
    other) echo "error: out of memory" >&2; exit 1 ;;
esac
[[ ",$ax," == *,sk5,* ]] || die sk5
[[ ",$ax," == *,sk2,* ]] || die sk2
echo "trained with -ax $ax"
EOF2
chmod +x "$W/fake_trainer"
(source dev/bench/common.sh; at1_run "$W/at.log" "$W/fake_trainer" -e x.conf -at 1 > "$W/at.out"; echo $? > "$W/at.rc")
if [ "$(cat "$W/at.rc")" = 0 ] && [ "$(cat "$W/at.log")" = "trained with -ax sk5,sk2" ] && [ "$(grep -c '^note: -at 1 died timing a choice' "$W/at.out")" = 2 ] &&
    grep -q "again with -ax sk5,sk2$" "$W/at.out"; then
    ok "at1_run: a run that dies timing a choice runs again without it, twice (-ax sk5, then sk5,sk2), with a note each"
else
    bad "at1_run" "rc $(cat "$W/at.rc"): $(cat "$W/at.out" "$W/at.log" | tr '\n' ';')"
fi
for mode in always other; do
    (source dev/bench/common.sh; MODE=$mode at1_run "$W/at_$mode.log" "$W/fake_trainer" -at 1 > "$W/at_$mode.out"; echo $? > "$W/at_$mode.rc")
    n=$(grep -c '^note' "$W/at_$mode.out")
    if [ "$(cat "$W/at_$mode.rc")" = 1 ] && [ "$n" = "$([ $mode = always ] && echo 1 || echo 0)" ]; then
        ok "at1_run, a run that dies $([ $mode = always ] && echo 'naming the choice already left out: one rerun' || echo 'naming no choice: no rerun'), exit 1"
    else
        bad "at1_run ($mode)" "rc $(cat "$W/at_$mode.rc"), $n notes"
    fi
done

# ---- gpu_test.sh: test_gpt2cu's units on two fixtures (a dense one and monarch4: the -sk units run on it)
T2=build/cuda_sim/test_gpt2cu
if [ ! -x "$T2" ]; then
    bad "gpu_test.sh" "$T2 not built (make $T2)"
    summary; exit
fi
mkdir -p "$W/fx" && cp dev/fixtures/dense_tiny.bin dev/fixtures/monarch4.bin "$W/fx/"
sum_of() { grep -E '^[0-9]+ passed, [0-9]+ failed$' "$1" | tail -1; }
"$T2" "$W/fx" --units r0,sk1,sk2 > "$W/direct.log" 2>&1
"$T2" "$W/fx" --units r0,sk2 > "$W/direct2.log" 2>&1
"$T2" "$W/fx" --units r0,sk1 > "$W/direct3.log" 2>&1
p_all=$(sum_of "$W/direct.log" | cut -d' ' -f1); p_skip=$(sum_of "$W/direct2.log" | cut -d' ' -f1); p_last=$(sum_of "$W/direct3.log" | cut -d' ' -f1)
timeout 300 bash dev/bench/gpu_test.sh "$T2" "$W/fx" --units r0,sk1,sk2 > "$W/g0.log" 2>&1; rc=$?
if [ $rc -eq 0 ] && [ "$(tail -1 "$W/g0.log")" = "$p_all passed, 0 failed" ] && [ "${p_all:-0}" -gt 100 ]; then
    ok "gpu_test.sh without a failure: one process, test_gpt2cu's own count ($p_all passed)"
else
    bad "gpu_test.sh without a failure" "rc $rc: $(tail -1 "$W/g0.log"), direct $p_all"
fi
TEST_GPT2CU_FAIL_UNIT=sk1 timeout 300 bash dev/bench/gpu_test.sh "$T2" "$W/fx" --units r0,sk1,sk2 > "$W/g1.log" 2>&1; rc=$?
if [ $rc -eq 1 ] && [ "$(tail -1 "$W/g1.log")" = "$p_skip passed, 1 failed" ] &&
    grep -q '^FAIL test_gpt2cu ended (rc 1) in unit sk1; its later checks are unrun: error: TEST_GPT2CU_FAIL_UNIT=sk1' "$W/g1.log" &&
    grep -q '^# gpu_test.sh: the units after sk1 in a new process: sk2$' "$W/g1.log" && grep -q '^# unit sk2: ' "$W/g1.log"; then
    ok "gpu_test.sh past a unit that dies: the units after it in a new process, its death one failure ($p_skip passed, 1 failed)"
else
    bad "gpu_test.sh past a unit that dies" "rc $rc: $(grep -E '^(FAIL|# gpu_test)' "$W/g1.log" | head -3 | tr '\n' ';') $(tail -1 "$W/g1.log"); want $p_skip passed"
fi
TEST_GPT2CU_FAIL_UNIT=sk2 timeout 300 bash dev/bench/gpu_test.sh "$T2" "$W/fx" --units r0,sk1,sk2 > "$W/g2.log" 2>&1; rc=$?
if [ $rc -eq 1 ] && [ "$(tail -1 "$W/g2.log")" = "$p_last passed, 1 failed" ] && [ "$(grep -c '^# unit r0:' "$W/g2.log")" = 1 ]; then
    ok "gpu_test.sh when the last unit dies: nothing rerun ($p_last passed, 1 failed)"
else
    bad "gpu_test.sh when the last unit dies" "rc $rc: $(tail -1 "$W/g2.log"); want $p_last passed, 1 failed"
fi
# test_gpt2cu's own checks of its arguments
"$T2" "$W/fx" --units r0,nosuch > "$W/bad.log" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q "no unit 'nosuch' in this build; the units are default,fa0," "$W/bad.log" && ! grep -q '^# unit' "$W/bad.log"; then
    ok "test_gpt2cu --units with an unknown name: an error that lists the units, nothing run"
else
    bad "test_gpt2cu --units with an unknown name" "rc $rc: $(head -3 "$W/bad.log")"
fi

summary
