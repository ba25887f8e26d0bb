#!/usr/bin/env bash
# test_cli.sh: the trainer as a user runs it: --help, every bad input (clear message, non-zero
# exit, nothing damaged), loss falls, resume is bit-identical to an uninterrupted run, and an
# llm.c-layout checkpoint written by the trainer loads back. Prints "N passed, N failed".
set -u
cd "$(dirname "$0")/.."
BIN=./train_gpt2
source tests/lib.sh

# synthetic shards in llm.c's format (EOT-led documents of a repeating pattern, so a model can learn it)
python3 tests/synthetic_shards.py "$W" --seed 0 --docs 120 --train_shards 2 --val_docs 20
TRAIN="$W/syn_train_*.bin"; VAL="$W/syn_val_000000.bin"
COMMON=(-e d2 -i "$TRAIN" -j "$VAL" -b 4 -t 32 -s 0)

# expect_error NAME PATTERN ARGS... : non-zero exit and PATTERN in the output
expect_error() {
    local name=$1 pat=$2; shift 2
    local out rc
    out=$("$BIN" "$@" 2>&1); rc=$?
    if [ $rc -ne 0 ] && echo "$out" | grep -qF -- "$pat"; then ok "$name"
    else bad "$name" "exit $rc, wanted '$pat' in: $(echo "$out" | tail -n 3)"; fi
}

out=$("$BIN" --help); rc=$?
missing=""
for f in -i -j -e -o -b -t -d -x -k -l -u -q -c -v -m -s -g -n -nk -nm -y -a -sl -sg -h; do
    echo "$out" | grep -qE "^  $f " || missing="$missing $f"
done
[ $rc -eq 0 ] && [ -z "$missing" ] && ok "--help lists every llm.c flag with its default" || bad "--help" "exit $rc, missing:$missing"

expect_error "unknown flag" "unknown flag '-zz'" -zz 1
expect_error "flag without value" "flag -b needs a value" -b
expect_error "non-integer value" "flag -b: 'four' is not an integer" -b four
expect_error "missing model file" "-e '$W/nope.bin': no such file" -e "$W/nope.bin"
expect_error "unknown depth preset" "no GPT-2 preset of depth 7" -e d7
expect_error "no shards match" "no data shards match '$W/none_*.bin'" -e d2 -i "$W/none_*.bin" -s 0
printf 'junk' > "$W/junk.bin"; cp "$W/syn_val_000000.bin" "$W/badmagic.bin"
printf '\x01\x02\x03\x04' | dd of="$W/badmagic.bin" bs=1 count=4 conv=notrunc 2>/dev/null
expect_error "shard with bad magic" "$W/badmagic.bin" -e d2 -i "$W/badmagic.bin" -s 0
head -c 3000 "$W/syn_val_000000.bin" > "$W/trunc.bin"
expect_error "truncated shard" "$W/trunc.bin" -e d2 -i "$W/trunc.bin" -s 0
expect_error "batch larger than the shard" "use a smaller -b or -t" -e d2 -i "$VAL" -b 64 -t 1024 -s 0
expect_error "T beyond max_seq_len" "-t 2048 is longer than the model's max_seq_len 1024" -e d2 -i "$TRAIN" -j "" -t 2048 -s 0
expect_error "total batch not a multiple" "-d 100 must be a positive multiple of B*T" "${COMMON[@]}" -d 100
expect_error "unknown schedule" "-k 'cosinus': unknown learning-rate schedule" "${COMMON[@]}" -k cosinus
expect_error "resume without -o" "-y 1 resumes from the checkpoints in -o" "${COMMON[@]}" -y 1
expect_error "checkpoints without -o" "-n 5 writes checkpoints into -o" "${COMMON[@]}" -n 5
printf 'n_layer = 2\nn_head = 2\nn_embd = 3O\n' > "$W/bad.conf"
expect_error "config error names file:line" "$W/bad.conf:3: 'n_embd = 3O' must be an integer" -e "$W/bad.conf" -i "$TRAIN" -s 0
expect_error "negative outlier threshold" "-sl -1 -sg 0: the outlier thresholds are z-scores > 0" "${COMMON[@]}" -sl -1
mkdir -p "$W/ro"; touch "$W/ro/blocker"
expect_error "output dir that is a file" "$W/ro/blocker" "${COMMON[@]}" -x 1 -o "$W/ro/blocker" -n 1

# training: the loss falls on learnable data (30 steps, d2)
out=$("$BIN" "${COMMON[@]}" -x 30 -l 3e-3 -v 0 2>&1); rc=$?
first=$(echo "$out" | grep -m1 -oE 'loss [0-9.]+' | awk '{print $2}')
last=$(echo "$out" | grep -oE 'loss [0-9.]+' | tail -n 1 | awk '{print $2}')
if [ $rc -eq 0 ] && awk -v a="$first" -v b="$last" 'BEGIN {exit !(b < a - 1.0)}'; then ok "loss falls over 30 steps ($first -> $last)"
else bad "loss falls" "exit $rc, $first -> $last"; fi

# -pt 1: where the steps' time went, on a model with every structure (q, k BTT; v Monarch; fc BTT-MoE),
# with gradient accumulation; the training itself is unchanged (same step lines as without -pt)
PT=(-e tests/configs/tiny_mixed.conf -i "$TRAIN" -j "$VAL" -b 4 -t 32 -s 0 -v 0 -x 4 -d 256)
out=$("$BIN" "${PT[@]}" -pt 1 2>&1); rc=$?
[ $rc -eq 0 ] || bad "-pt 1 run" "exit $rc: $(echo "$out" | tail -n 3)"
check_profile "-pt 1: the table counts the model's FLOPs once and adds up to the step time (CPU)" 3 "$out" \
    "q fwd: btt r2" "k bwd: btt r2" "v fwd: monarch 4 blocks" "v bwd: monarch 4 blocks" "fc fwd: btt_moe 4/top2" "fc bwd: btt_moe 4/top2" \
    "fc_proj bwd: btt r2" "attn_proj fwd: btt r2" "attention fwd" "attention bwd" "lm_head bwd: dense (tied to wte)" \
    "classifier (softmax, loss)" "layernorm bwd" "gelu fwd" "encoder bwd" "update (AdamW)" "gradient norm" "data (host)" "q, k, v split copies"
calls() { echo "$out" | awk -v p="$1" 'index($0, p) == 1 && match($0, /% +[0-9.]+/) { print substr($0, RSTART + 1, RLENGTH - 1) + 0 }'; }
[ "$(calls "fc fwd: btt_moe")" = 4 ] && [ "$(calls "attention bwd")" = 4 ] && [ "$(calls "data (host)")" = 2 ] && [ "$(calls "update (AdamW)")" = 1 ] \
    && ok "-pt 1: calls per step count both micro-batches of a step (2 layers x 2)" \
    || bad "-pt 1 calls" "fc fwd $(calls "fc fwd: btt_moe"), attention bwd $(calls "attention bwd"), data $(calls "data (host)"), update $(calls "update (AdamW)")"
without=$("$BIN" "${PT[@]}" 2>&1 | grep -E '^step +[0-9]' | sed -E 's/\| [0-9.]+ ms.*//')
[ -n "$without" ] && [ "$without" = "$(echo "$out" | grep -E '^step +[0-9]' | sed -E 's/\| [0-9.]+ ms.*//')" ] \
    && ok "-pt 1 leaves the training unchanged (same losses, norms)" || bad "-pt 1 changes training" "$without"
expect_error "-pt 3" "-pt 3: 1 prints where the steps' time went" "${COMMON[@]}" -pt 3
# -pt 2: the same first table, then each structured layer's steps (btt.h, monarch.h and moe.h mark
# them on the CPU), which with their rest make up the layer's time
out=$("$BIN" "${PT[@]}" -pt 2 2>&1); rc=$?
[ $rc -eq 0 ] || bad "-pt 2 run" "exit $rc: $(echo "$out" | tail -n 3)"
check_profile "-pt 2: the first table as -pt 1's (CPU)" 3 "$out" "fc fwd: btt_moe 4/top2" "fc bwd: btt_moe 4/top2" "attention fwd"
check_steps "-pt 2: the BTT-MoE layer's forward steps (routing, grouping, experts) with their rest make up its time (CPU)" "$out" \
    "fc fwd: btt_moe 4/top2" "router logits, top-k, gate softmax" "grouping by expert" "experts' cores packed" "experts "
check_steps "-pt 2: the BTT-MoE layer's backward steps make up its time (CPU)" "$out" "fc bwd: btt_moe 4/top2" \
    "experts: gathers, dZ, d gate, dx" "experts: dW0, dW1" "experts' gradients into the cores" "router gradient" "bias gradient"
check_steps "-pt 2: a BTT layer's backward steps (CPU)" "$out" "fc_proj bwd: btt r2" "cores packed (transposed)" "row tiles: dZ, dx" \
    "weight gradients" "bias gradient"
check_steps "-pt 2: a Monarch layer's forward steps (CPU)" "$out" "v fwd: monarch 4 blocks" "factors packed" "row tiles: both stages"
echo "$out" | sed -n '/^steps inside the layers (-pt 2)/,$p' | grep -qE '^(attention|lm_head|layernorm|classifier) ' \
    && bad "-pt 2: layers without steps" "a part that marks no steps has a block" || ok "-pt 2: only the structured layers have blocks (CPU)"
out=$("$BIN" "${COMMON[@]}" -x 3 -v 0 -pt 2 2>&1)
echo "$out" | grep -q "^steps inside the layers (-pt 2): none marked (only the structured layers mark steps)" \
    && ok "-pt 2 on a dense model says that no layer marked steps" || bad "-pt 2 dense" "$(echo "$out" | tail -n 2)"
out=$("$BIN" "${COMMON[@]}" -x 1 -v 0 -pt 1 2>&1)
echo "$out" | grep -q "no step was profiled (the first step of a run is not: it warms up); give -x 2 or more" \
    && ok "-pt 1 with one step says that the first step is not profiled" || bad "-pt 1 -x 1" "$(echo "$out" | tail -n 2)"

# resume: run A straight through 6 steps; run B the same, then forget its last checkpoint and
# resume from step 3 (shuffled data, gradient accumulation, warmup + cosine): same bytes at step 6
RUN=("${COMMON[@]}" -x 6 -n 3 -sh 1 -d 256 -u 2 -q 0.1 -l 1e-3 -c 0.1 -v 2 -m 2)
"$BIN" "${RUN[@]}" -o "$W/A" > "$W/A.out" 2>&1 || bad "run A" "$(tail -n 3 "$W/A.out")"
"$BIN" "${RUN[@]}" -o "$W/B" > "$W/B.out" 2>&1 || bad "run B" "$(tail -n 3 "$W/B.out")"
rm -f "$W/B/DONE_00000006" "$W/B/model_00000006.bin" "$W/B/state_00000006_00000.bin"
"$BIN" "${RUN[@]}" -o "$W/B" -y 1 > "$W/B2.out" 2>&1 || bad "run B resumed" "$(tail -n 3 "$W/B2.out")"
grep -q "resumed from $W/B/model_00000003.bin at step 3" "$W/B2.out" && ok "resume picks the latest complete checkpoint (step 3)" \
    || bad "resume start" "$(grep -i resum "$W/B2.out")"
cmp -s "$W/A/model_00000006.bin" "$W/B/model_00000006.bin" && ok "resumed weights at step 6 are bit-identical" || bad "resumed weights" "model_00000006.bin differs"
cmp -s "$W/A/state_00000006_00000.bin" "$W/B/state_00000006_00000.bin" && ok "resumed optimizer state at step 6 is bit-identical" || bad "resumed state" "state differs"
a_steps=$(grep -E '^step +[456]/' "$W/A.out" | sed -E 's/\| [0-9.]+ ms.*//'); b_steps=$(grep -E '^step +[456]/' "$W/B2.out" | sed -E 's/\| [0-9.]+ ms.*//')
[ -n "$a_steps" ] && [ "$a_steps" = "$b_steps" ] && ok "resumed step lines 4-6 equal the uninterrupted run's" || bad "resumed losses" "A: $a_steps / B: $b_steps"
grep -q "^s:6 trl:" "$W/B/main.log" && grep -q "^s:2 tel:" "$W/B/main.log" && ok "main.log has llm.c's train and val lines" || bad "main.log" "$(cat "$W/B/main.log")"
ls "$W/B"/*.tmp >/dev/null 2>&1 && bad "atomic writes" "temp files left behind" || ok "no temporary files left behind"
# -na 1: the same checkpoints written by a background thread from a snapshot, while training goes
# on: every file byte for byte run A's, each DONE marker once its files are in place, and -nk's
# deletions done when the marker is
"$BIN" "${RUN[@]}" -o "$W/NA" -na 1 -nk 1 > "$W/NA.out" 2>&1 || bad "run with -na 1" "$(tail -n 3 "$W/NA.out")"
na=$(cd "$W/NA" && ls DONE_* model_* state_* *.tmp 2>/dev/null | tr '\n' ' ')
[ "$na" = "DONE_00000006 model_00000006.bin state_00000006_00000.bin " ] && cmp -s "$W/A/model_00000006.bin" "$W/NA/model_00000006.bin" \
    && cmp -s "$W/A/state_00000006_00000.bin" "$W/NA/state_00000006_00000.bin" && [ "$(grep -c '^wrote checkpoint' "$W/NA.out")" = 2 ] \
    && ok "-na 1 (background writes): the step-6 files are run A's byte for byte, -nk 1 left only them" \
    || bad "-na 1" "files: $na; $(grep -c '^wrote checkpoint' "$W/NA.out") 'wrote' lines"

# run.txt: what the run is, one block per start. d2 (C 128, L 2, V 50257) at T 32 trains at
# 6·(L·12·C² + V·C) + 12·L·C·T FLOPs per token; the table's parameter count; -d 256 per step
info() { grep "^$2 = " "$1/run.txt" | tail -n 1 | sed "s/^$2 = //"; }
want_flops=$(( 6 * (2 * 12 * 128 * 128 + 50257 * 128) + 12 * 2 * 128 * 32 ))
params=$(grep -oE '^\| parameters +\| [0-9]+' "$W/A.out" | awk '{print $NF}')
got="$(info "$W/A" flops_per_token) $(info "$W/A" parameters) $(info "$W/A" tokens_per_step) $(info "$W/A" grad_accum) $(info "$W/A" steps)"
[ "$got" = "$want_flops $params 256 2 6" ] && ok "run.txt: FLOPs per token, parameters, tokens per step, accumulation, steps" \
    || bad "run.txt values" "got '$got', wanted '$want_flops $params 256 2 6'"
grep -qF "command = $BIN -e d2 -i '$W/syn_train_*.bin' -j $VAL -b 4 -t 32 -s 0 -x 6 -n 3" "$W/A/run.txt" \
    && ok "run.txt: the command, quoted for the shell" || bad "run.txt command" "$(grep command "$W/A/run.txt")"
starts=$(grep -oE '^# started [0-9TZ:-]+ at step [0-9]+' "$W/B/run.txt" | sed 's/.* at //' | tr '\n' ' ')
[ "$starts" = "step 0 step 3 " ] && ok "run.txt: a resume appends a block (steps 0, 3)" || bad "run.txt blocks" "$starts"
# scripts/compare_runs.py on them: A and B are the same run, B resumed; its table's val is main.log's
cmp_out=$(python3 scripts/compare_runs.py "$W/A" "$W/B" --x tokens 2>&1); rc=$?
tel=$(grep '^s:6 tel:' "$W/B/main.log" | sed 's/.*tel://')
if [ $rc -eq 0 ] && echo "$cmp_out" | grep -qE "^B .* $tel +$tel " && echo "$cmp_out" | grep -qF "val loss at the same tokens (1.54K" \
    && echo "$cmp_out" | grep -qF "(+0.0000 vs A)"; then ok "compare_runs.py: a resumed run equals the uninterrupted one at 1536 tokens"
else bad "compare_runs.py" "exit $rc: $cmp_out"; fi

# -x 0 (llm.c's): evaluate only. With -y 1 the latest checkpoint: its val loss is the one the run
# logged at step 6; nothing is trained or written but the log lines
cp -r "$W/A" "$W/A0"
out=$("$BIN" "${RUN[@]}" -x 0 -o "$W/A0" -y 1 2>&1); rc=$?
want=$(grep '^s:6 tel:' "$W/A/main.log" | sed 's/.*tel://')
got=$(echo "$out" | grep '^val loss' | awk '{printf "%.4f", $3}')
files=$(cd "$W/A0" && ls | grep -v -e main.log -e run.txt | tr '\n' ' '); files_a=$(cd "$W/A" && ls | grep -v -e main.log -e run.txt | tr '\n' ' ')
[ $rc -eq 0 ] && [ -n "$want" ] && [ "$got" = "$want" ] && ! echo "$out" | grep -q '^step ' && [ "$files" = "$files_a" ] \
    && [ "$(tail -n 1 "$W/A0/main.log")" = "s:6 tel:$want" ] && echo "$out" | grep -q 'none (-x 0: evaluation only)' \
    && ok "-x 0 -y 1: evaluates the step-6 checkpoint (val $got, as logged at step 6), trains and writes nothing else" \
    || bad "-x 0 -y 1" "exit $rc, val '$got' vs '$want', files '$files' vs '$files_a': $(echo "$out" | tail -n 2)"
got2=$("$BIN" -e "$W/A/model_00000006.bin" -i "$TRAIN" -j "$VAL" -b 4 -t 32 -s 0 -x 0 -v 2 -m 2 2>&1 | grep '^val loss' | awk '{printf "%.4f", $3}')
[ "$got2" = "$want" ] && ok "-x 0 -e model_00000006.bin: the same val loss" || bad "-x 0 -e" "'$got2' vs '$want'"
# evaluation alone needs no training data (e.g. a model scored on WikiText), and then looks for
# the tokenizer beside the val shards (there is none here: it says which file it tried); training
# without train shards still stops with the error
mkdir -p "$W/evalonly" && cp "$VAL" "$W/evalonly/"
out=$("$BIN" -e "$W/A/model_00000006.bin" -i "$W/none_*.bin" -j "$W/evalonly/$(basename "$VAL")" -b 4 -t 32 -x 0 -v 2 -m 2 -g 8 2>&1); rc=$?
got3=$(echo "$out" | grep '^val loss' | awk '{printf "%.4f", $3}')
[ $rc -eq 0 ] && [ "$got3" = "$want" ] && echo "$out" | grep -q "^generating" && echo "$out" | grep -qF "cannot open tokenizer '$W/evalonly/gpt2_tokenizer.bin'" \
    && ok "-x 0 without train shards: the same val loss; the tokenizer is looked for beside the val shards" \
    || bad "-x 0 without train shards" "exit $rc, '$got3' vs '$want': $(echo "$out" | tail -n 3)"
expect_error "training without train shards" "no data shards match '$W/none_*.bin'" -e d2 -i "$W/none_*.bin" -j "$VAL" -x 1 -s 0
expect_error "-x below -1" "-x -2: give a number of steps >= 1, 0 to only evaluate, or -1 for one epoch" "${COMMON[@]}" -x -2

# -nk keeps the last K checkpoints; -nm also keeps those whose step is a multiple of it (llm.c's flags)
"$BIN" "${COMMON[@]}" -x 8 -n 2 -nk 1 -v 0 -o "$W/nk" > /dev/null 2>&1
"$BIN" "${COMMON[@]}" -x 8 -n 2 -nk 1 -nm 4 -v 0 -o "$W/nm" > /dev/null 2>&1
nk=$(cd "$W/nk" && ls DONE_* model_* state_* 2>/dev/null | tr '\n' ' '); nm=$(cd "$W/nm" && ls DONE_* model_* state_* 2>/dev/null | tr '\n' ' ')
[ "$nk" = "DONE_00000008 model_00000008.bin state_00000008_00000.bin " ] && ok "-n 2 -nk 1: only the step-8 checkpoint is left" || bad "-nk 1" "$nk"
[ "$nm" = "DONE_00000004 DONE_00000008 model_00000004.bin model_00000008.bin state_00000004_00000.bin state_00000008_00000.bin " ] \
    && ok "-n 2 -nk 1 -nm 4: the major step-4 checkpoint stays too" || bad "-nm 4" "$nm"

# the same with a structured model (BTT-MoE q/k/v, Monarch attn_proj, BTT MLP, a dense layer 0):
# version-10 checkpoint with its config inside, bit-identical resume, aux loss in the log
cat > "$W/struct.conf" <<'CONF'
n_layer = 2
n_head = 2
n_embd = 64
[linear]
struct = btt_moe
experts = 4
topk = 2
router_init = 0.02
[linear.attn_proj]
struct = monarch
blocks = 4
[linear.fc]
struct = btt
rank = 2
[layer.0]
struct = dense
CONF
SRUN=(-e "$W/struct.conf" -i "$TRAIN" -j "$VAL" -b 4 -t 32 -s 0 -x 6 -n 3 -sh 1 -d 256 -l 1e-3 -v 3 -m 2)
"$BIN" "${SRUN[@]}" -o "$W/SA" > "$W/SA.out" 2>&1 || bad "structured run A" "$(tail -n 3 "$W/SA.out")"
"$BIN" "${SRUN[@]}" -o "$W/SB" > "$W/SB.out" 2>&1 || bad "structured run B" "$(tail -n 3 "$W/SB.out")"
grep -q "btt_moe 4/top2" "$W/SA.out" && grep -q "^linear layers:" "$W/SA.out" && ok "structured model prints its layer table" || bad "layer table" "missing"
rm -f "$W/SB/DONE_00000006" "$W/SB/model_00000006.bin" "$W/SB/state_00000006_00000.bin"
"$BIN" -e d2 -i "$TRAIN" -j "$VAL" -b 4 -t 32 -s 0 -x 6 -n 3 -sh 1 -d 256 -l 1e-3 -v 3 -m 2 -o "$W/SB" -y 1 > "$W/SB2.out" 2>&1 \
    || bad "structured resume" "$(tail -n 3 "$W/SB2.out")"
cmp -s "$W/SA/model_00000006.bin" "$W/SB/model_00000006.bin" && cmp -s "$W/SA/state_00000006_00000.bin" "$W/SB/state_00000006_00000.bin" \
    && ok "structured resume (the model comes from the checkpoint, not -e) is bit-identical" || bad "structured resume" "step-6 files differ"
shdr=$(od -An -w36 -t d4 -N 36 "$W/SA/model_00000006.bin" | tr -s ' ')
clen=$(wc -c < "$W/struct.conf")
[ "$shdr" = " 20240326 10 1024 50257 2 2 64 50304 $clen" ] && ok "structured checkpoint: llm.c magic, version 10, config length" || bad "structured header" "$shdr"
grep -qE "^s:6 trl:[0-9.]+ lr:[0-9.]+ norm:[0-9.]+ aux:[0-9.]+ bal:[0-9.]+ lmax:[0-9.]+ lmin:[0-9.]+ tok/s:" "$W/SB/main.log" \
    && ok "main.log carries the aux loss, its balance term and the expert loads" || bad "aux in main.log" "$(tail -n 2 "$W/SB/main.log")"
# the step lines say the same as main.log, and the loads are shares of the selections times E:
# the busiest expert at least 1 and at most E/K = 2, the idlest at most 1; balance >= 1/E
rt=$(grep -E '^step +6/' "$W/SA.out" | sed -E 's/.*\| aux ([0-9.]+) bal ([0-9.]+) load ([0-9.]+)-([0-9.]+) \|.*/\1 \2 \3 \4/')
rl=$(grep '^s:6 trl' "$W/SA/main.log" | sed -E 's/.* aux:([0-9.]+) bal:([0-9.]+) lmax:([0-9.]+) lmin:([0-9.]+) .*/\1 \2 \4 \3/')
awk -v a="$rt" -v b="$rl" 'BEGIN { n = split(a, x, " "); m = split(b, y, " "); if (n != 4 || m != 4) exit 1
    for (i = 1; i <= 4; i++) { d = x[i] - y[i]; if (d < 0) d = -d; if (d > 0.006) exit 1 }
    exit !(y[3] <= 1 && y[4] >= 1 && y[4] <= 2 && y[2] >= 0.25) }' \
    && ok "routing: the step line and main.log agree (aux bal min max: $rt), loads within [0, E/K]" || bad "routing report" "'$rt' vs '$rl'"

# -rl 1: at each val step after training, one line per routed layer (layer 1's q, k, v, fc_proj
# here) of E = 4 loads that sum to E (the shares of the top-k selections sum to 1)
out=$("$BIN" "${SRUN[@]}" -x 2 -n 0 -v 2 -rl 1 2>&1); rc=$?
rl=$(echo "$out" | sed -n '/^expert loads after step 2 /,/^val loss/p' | grep '^  h\.' \
     | awk '{ s = 0; for (i = 2; i <= 5; i++) s += $i; printf "%s=%s ", $1, (s > 3.98 && s < 4.02 && NF <= 7) ? "4" : s }')  # 2 decimals each
[ $rc -eq 0 ] && [ "$rl" = "h.1.q=4 h.1.k=4 h.1.v=4 h.1.fc_proj=4 " ] && ! echo "$out" | grep -q "^expert loads after step 0" \
    && ok "-rl 1: each routed layer's expert loads (sums: $rl)" || bad "-rl 1" "exit $rc: '$rl'"
out=$("$BIN" -e d2 "${RUN[@]}" -x 2 -n 0 -v 2 -rl 1 2>&1); rc=$?
[ $rc -eq 0 ] && ! echo "$out" | grep -q "^expert loads" && ok "-rl 1 on a dense model prints no loads" || bad "-rl 1 dense" "exit $rc"
out=$("$BIN" "${SRUN[@]}" -rl 2 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q -- "-rl 2: 1 prints" && ok "-rl 2 is refused with the values it takes" || bad "-rl 2" "exit $rc: $out"

# a checkpoint the trainer wrote is llm.c's v3 layout and loads back as a model
hdr=$(od -An -w32 -t d4 -N 32 "$W/A/model_00000006.bin" | tr -s ' ')
[ "$hdr" = " 20240326 3 1024 50257 2 2 128 50304" ] && ok "written checkpoint header is llm.c's v3" || bad "checkpoint header" "$hdr"
size=$(stat -c %s "$W/A/model_00000006.bin")
[ "$size" -eq $((1024 + 4 * 6966784)) ] && ok "written checkpoint holds exactly the padded d2 parameters" || bad "checkpoint size" "$size"
"$BIN" -e "$W/A/model_00000006.bin" -i "$TRAIN" -j "$VAL" -b 4 -t 32 -x 1 -v 1 -m 2 -s 0 > "$W/C.out" 2>&1 \
    && grep -q "val loss" "$W/C.out" && ok "written checkpoint loads with -e" || bad "checkpoint loads" "$(tail -n 3 "$W/C.out")"
# a truncated checkpoint is refused by name and the file is left as it was
head -c 5000 "$W/A/model_00000006.bin" > "$W/trunc_model.bin"; before=$(md5sum < "$W/trunc_model.bin")
expect_error "truncated checkpoint" "'$W/trunc_model.bin' is truncated" -e "$W/trunc_model.bin" -i "$TRAIN" -s 0
[ "$before" = "$(md5sum < "$W/trunc_model.bin")" ] && ok "a refused file is not modified" || bad "refused file" "modified"

# convert_checkpoint: v3 -> v5 (llm.c's bf16, what train_gpt2cu writes) -> v3, and the v5 loads here
CONV=./convert_checkpoint
$CONV "$W/A/model_00000006.bin" "$W/m5.bin" 5 > /dev/null && $CONV "$W/m5.bin" "$W/m53.bin" 3 > /dev/null; rc=$?
hdr5=$(od -An -w32 -t d4 -N 32 "$W/m5.bin" | tr -s ' ')
[ $rc -eq 0 ] && [ "$hdr5" = " 20240326 5 1024 50257 2 2 128 50304" ] && [ "$(stat -c %s "$W/m5.bin")" -eq $((1024 + 2 * 6966784)) ] \
    && ok "convert_checkpoint writes llm.c's v5 header and 2 bytes per parameter" || bad "convert to v5" "exit $rc, header $hdr5"
# every weight must be the nearest bf16 (ties to even), computed here independently in float64
rt=$(python3 - "$W/A/model_00000006.bin" "$W/m53.bin" <<'PY'
import sys, numpy as np
a = np.fromfile(sys.argv[1], dtype=np.float32, offset=1024)
b = np.fromfile(sys.argv[2], dtype=np.float32, offset=1024)
u = a.view(np.uint32)
lo = (u & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
hi = ((u & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32).astype(np.float64)
x = a.astype(np.float64)
dlo, dhi = np.abs(x - lo), np.abs(hi - x)
lo_even = ((u >> 16) & 1) == 0
want = np.where((dlo < dhi) | ((dlo == dhi) & lo_even), lo, hi)
print(int(np.sum(want != b.astype(np.float64))), a.size, b.size)
PY
)
[ "$rt" = "0 6966784 6966784" ] && ok "v3 -> v5 -> v3 gives the nearest bf16 of every weight" || bad "bf16 round trip" "$rt"
"$BIN" -e "$W/m5.bin" -i "$TRAIN" -j "$VAL" -b 4 -t 32 -x 1 -v 1 -m 2 -s 0 > "$W/C5.out" 2>&1; rc=$?
v3=$(grep -m1 -oE 'val loss [0-9.]+' "$W/C.out" | awk '{print $3}'); v5=$(grep -m1 -oE 'val loss [0-9.]+' "$W/C5.out" | awk '{print $3}')
[ $rc -eq 0 ] && awk -v a="$v3" -v b="$v5" 'BEGIN {d = a - b; exit !(a != "" && b != "" && d < 0.02 && d > -0.02)}' \
    && ok "the v5 checkpoint loads with -e: val loss $v5 vs $v3 from fp32 (within 0.02)" || bad "v5 loads" "exit $rc, val $v5 vs $v3"
conv_error() {  # NAME PATTERN ARGS...
    local name=$1 pat=$2; shift 2
    local out rc
    out=$($CONV "$@" 2>&1); rc=$?
    if [ $rc -ne 0 ] && echo "$out" | grep -qF -- "$pat"; then ok "convert_checkpoint: $name"
    else bad "convert_checkpoint: $name" "exit $rc, wanted '$pat' in: $out"; fi
}
conv_error "structured model refused" "is a structured model (version 10)" "$W/SA/model_00000006.bin" "$W/x.bin" 5
conv_error "bad version argument" "usage:" "$W/m5.bin" "$W/x.bin" 4
conv_error "missing input" "'$W/nope.bin': No such file" "$W/nope.bin" "$W/x.bin" 5
conv_error "not a checkpoint" "is not a model checkpoint" "$VAL" "$W/x.bin" 5
cp "$W/m5.bin" "$W/keep.bin"; before=$(md5sum < "$W/keep.bin")
conv_error "truncated input" "is truncated" "$W/trunc_model.bin" "$W/keep.bin" 5
[ "$before" = "$(md5sum < "$W/keep.bin")" ] && [ ! -e "$W/x.bin" ] && ok "convert_checkpoint: a failed conversion leaves OUT as it was" \
    || bad "failed conversion" "OUT modified or created"

# -sl / -sg (llm.c's outlier skip): train tokens 120*128.. are one token (50000) repeated, so step
# 121's batch (B 4, T 32, no shuffle) is an outlier in loss and in gradient norm against the 100
# steps before it (at -l 1e-3, where this d2 run has no spikes of its own)
mkdir -p "$W/ol"
python3 tests/synthetic_shards.py "$W/ol" --seed 0 --docs 200 --val_docs 0 --noise_at $((120 * 128)) --noise_len 129 --noise_lo 50000 --noise_hi 50001
OL=(-e d2 -i "$W/ol/syn_train_000001.bin" -j "" -b 4 -t 32 -s 0 -v 0 -l 1e-3)
"$BIN" "${OL[@]}" -x 121 -n 120 -sl 3 -o "$W/olA" > "$W/olA.out" 2>&1 || bad "run with -sl 3" "$(tail -n 3 "$W/olA.out")"
skips=$(grep -c "update skipped" "$W/olA.out")
grep -qE "^step  121/121 \| loss [0-9.]+ .*\| update skipped: loss z [0-9.]+ > -sl 3$" "$W/olA.out" && [ "$skips" -eq 1 ] \
    && ok "-sl 3 skips the update of the repeated-token batch, and only that one" || bad "-sl 3 skip" "$skips skips: $(grep skipped "$W/olA.out")"
cmp -s "$W/olA/model_00000120.bin" "$W/olA/model_00000121.bin" && ok "a skipped update leaves the weights bit-identical" \
    || bad "skipped update" "model_00000121.bin differs from model_00000120.bin"
"$BIN" "${OL[@]}" -x 121 -n 120 -o "$W/olB" > "$W/olB.out" 2>&1 || bad "run without -sl" "$(tail -n 3 "$W/olB.out")"
! grep -q "skipped" "$W/olB.out" && ! cmp -s "$W/olB/model_00000120.bin" "$W/olB/model_00000121.bin" \
    && ok "without -sl the same step updates the weights" || bad "no -sl" "skipped or unchanged weights"
# the windows travel in the resume state: resumed at step 120, the run must still skip step 121
mv "$W/olA/model_00000121.bin" "$W/olA_121.bin"; mv "$W/olA/state_00000121_00000.bin" "$W/olA_121.state"; rm -f "$W/olA/DONE_00000121"
"$BIN" "${OL[@]}" -x 121 -n 120 -sl 3 -o "$W/olA" -y 1 > "$W/olA2.out" 2>&1 || bad "resume with -sl 3" "$(tail -n 3 "$W/olA2.out")"
grep -q "update skipped: loss z" "$W/olA2.out" && cmp -s "$W/olA_121.bin" "$W/olA/model_00000121.bin" && cmp -s "$W/olA_121.state" "$W/olA/state_00000121_00000.bin" \
    && ok "resumed at step 120, the run skips step 121 too: model and state bit-identical" || bad "resume keeps the windows" "$(grep -c skipped "$W/olA2.out") skips, files differ"
# the decisions, recomputed from the printed losses and norms: z against the previous 100 values
# (population std), none before 100 values, loss checked first; a z within 0.01 of its threshold
# is left out, since the printed values are rounded
"$BIN" "${OL[@]}" -x 150 -sl 2 -sg 1.5 > "$W/olG.out" 2>&1 || bad "run with -sl 2 -sg 1.5" "$(tail -n 3 "$W/olG.out")"
zs=$(python3 - "$W/olG.out" <<'PY'
import re, sys, numpy as np
rows = [re.match(r"step +(\d+)/\d+ \| loss ([0-9.]+) \| norm ([0-9.]+) .*?(?:\| update skipped: (loss|norm) z ([0-9.]+).*)?$", l)
        for l in open(sys.argv[1]) if l.startswith("step ")]
loss = np.array([float(r[2]) for r in rows]); norm = np.array([float(r[3]) for r in rows])
got = {int(r[1]): r[4] for r in rows if r[4]}
want, unsure = {}, 0
for i in range(100, len(rows)):
    zl = (loss[i] - loss[i - 100:i].mean()) / loss[i - 100:i].std()
    zn = (norm[i] - norm[i - 100:i].mean()) / norm[i - 100:i].std()
    if abs(zl - 2) < 0.01 or (zl <= 2 and abs(zn - 1.5) < 0.01): unsure += 1; got.pop(i + 1, None); continue
    if zl > 2: want[i + 1] = "loss"
    elif zn > 1.5: want[i + 1] = "norm"
print(len(rows), sum(v == "loss" for v in want.values()), sum(v == "norm" for v in want.values()), unsure, "same" if got == want else "got %s want %s" % (got, want))
PY
)
read -r n nl nn unsure verdict <<< "$zs"
[ "$n" = 150 ] && [ "$verdict" = same ] && [ "$nl" -ge 1 ] && [ "$nn" -ge 1 ] \
    && ok "-sl 2 -sg 1.5: the skipped steps are those whose recomputed z-score is over ($nl by loss, $nn by norm, $unsure too close to call)" \
    || bad "-sl / -sg decisions" "$zs"

# -h 1: HellaSwag-style eval in llm.c's format (tests/synthetic_shards.py --eval_examples: the right
# ending continues the context's pattern, the wrong ones are tokens no shard holds)
python3 tests/synthetic_shards.py "$W/ev" --seed 0 --docs 120 --train_shards 2 --val_docs 20 --eval_examples 40 > /dev/null
EV=(-e d2 -i "$W/ev/syn_train_*.bin" -j "$W/ev/syn_val_000000.bin" -t 32 -s 0 -m 2 -hf "$W/ev/syn_eval.bin")
"$BIN" "${EV[@]}" -b 4 -x 40 -l 3e-3 -v 20 -h 1 -o "$W/ev/out" > "$W/ev.out" 2>&1 || bad "run with -h 1" "$(tail -n 3 "$W/ev.out")"
hs=$(grep -E '^HellaSwag: [0-9]+/' "$W/ev.out" | tr '\n' ';')
echo "$hs" | grep -qE '^HellaSwag: [0-9]+/40 = [0-9.]+;HellaSwag: [0-9]+/40 = [0-9.]+;HellaSwag: 40/40 = 1.000000;$' \
    && ok "-h 1 scores the 40 examples at steps 0, 20, 40; trained 40 steps, the model picks every right ending ($hs)" || bad "-h 1 accuracy" "$hs"
grep -q "^s:0 eval:" "$W/ev/out/main.log" && grep -q "^s:40 eval:1.0000$" "$W/ev/out/main.log" && ok "main.log gets llm.c's eval lines" \
    || bad "eval in main.log" "$(grep eval "$W/ev/out/main.log")"
# the same fresh model scored in batches of 4, 6 (1 example + 2 padding rows) and 8 (2 examples)
# rows: a row's losses do not depend on its neighbours, so the counts agree
b0=""
for b in 4 6 8; do
    b0="$b0 $("$BIN" "${EV[@]}" -b $b -x 1 -v 1 -h 1 2>&1 | grep -m1 -oE 'HellaSwag: [0-9]+/40')"
done
set -- $b0
[ $# -eq 6 ] && [ "$2" = "$4" ] && [ "$2" = "$6" ] && ok "-h 1: the fresh model's count is the same for -b 4, 6 and 8 ($2 each)" || bad "-h 1 batch sizes" "$b0"
expect_error "-h 1 with -b 3" "use -b >= 4 (now 3)" "${EV[@]}" -b 3 -h 1
expect_error "-h 1 without its file" "python data/hellaswag.py" "${EV[@]}" -hf "$W/none.bin" -h 1
expect_error "-h 1 given a token shard" "is a token shard" "${EV[@]}" -hf "$W/ev/syn_val_000000.bin" -h 1
expect_error "-h 2" "-h 2: 1 evaluates HellaSwag" "${EV[@]}" -h 2
out=$("$BIN" -h 2>&1); rc=$?
[ $rc -eq 0 ] && echo "$out" | grep -q "^usage:" && ok "-h without a value still prints the help" || bad "-h alone" "exit $rc"

# the GPU trainer, where it was built but no GPU is present: one clear line and exit 1
if [ -x ./train_gpt2cu ] && ! nvidia-smi >/dev/null 2>&1; then
    out=$(./train_gpt2cu -e d2 -x 1 2>&1); rc=$?
    [ $rc -eq 1 ] && [ "$(echo "$out" | grep -c .)" -eq 1 ] && echo "$out" | grep -q "no CUDA GPU" \
        && ok "train_gpt2cu without a GPU says so in one line and exits 1" || bad "train_gpt2cu without a GPU" "exit $rc: $out"
fi

summary
