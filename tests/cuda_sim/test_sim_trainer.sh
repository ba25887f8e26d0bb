#!/usr/bin/env bash
# test_sim_trainer.sh: the GPU trainer's main program (train_gpt2.cu + common/train_main.h), built
# through the CUDA simulator (build/cuda_sim/train_gpt2cu, see tests/cuda_sim/README.md), run as a
# user runs it on tiny models: training lowers the loss, validation and sampling run, a run saved
# and resumed is bit-identical to an uninterrupted one (model file and resume state), gradient
# accumulation equals the big batch, the recompute / GELU-fusion / attention flags agree, -fa 2
# without cuDNN is refused cleanly and trains with the simulator's stand-in for cuDNN, and a
# structured model (BTT, Monarch, BTT-MoE) trains and resumes, also with -sk 1, -at 1 chooses each
# layer's kernels and keeps them over a resume, reports its routing as
# the CPU trainer does, and -h 1 scores an eval
# file with the forward's per-row losses. Prints "N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/cuda_sim/train_gpt2cu}
source tests/lib.sh
[ -x "$BIN" ] || { bad "simulated GPU trainer" "$BIN not built"; summary; exit 1; }

python3 tests/synthetic_shards.py "$W" --seed 0 --docs 60 --train_shards 1 --val_docs 10 --eval_examples 24 > /dev/null
cp tests/configs/tiny_dense.conf "$W/dense.cfg"
cp tests/configs/tiny_mixed.conf "$W/struct.cfg"
COMMON=(-i "$W/syn_train_*.bin" -j "$W/syn_val_000000.bin" -t 16 -tk data/tinyshakespeare/gpt2_tokenizer.bin)

# losses of the "step" lines, one per line
losses() { grep -E '^step +[0-9]' | sed -E 's/.*\| loss ([0-9.naif-]+) .*/\1/'; }
# two runs' first two losses (space-separated) within TOL of each other: close_losses A B TOL
close_losses() {
    awk -v a="$1" -v b="$2" -v tol="$3" 'BEGIN { n = split(a, x, " "); m = split(b, y, " "); if (n != 2 || m != 2) exit 1;
        for (i = 1; i <= n; i++) { d = x[i] - y[i]; if (d < 0) d = -d; if (d > tol) exit 1 } }'
}

out=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 4 -v 2 -m 2 -s 4 -g 6 -o "$W/A" -n 2 2>&1); rc=$?
echo "$out" > "$W/A.out"
first=$(echo "$out" | losses | head -1); last=$(echo "$out" | losses | tail -1)
[ $rc -eq 0 ] && awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }' && ok "dense: 4 steps lower the loss ($first -> $last)" \
    || bad "dense training" "exit $rc, losses $first -> $last: $(echo "$out" | tail -n 3)"
echo "$out" | grep -q "^val loss [0-9]" && ok "dense: validation loss printed" || bad "validation" "no val loss line"
echo "$out" | grep -q "^generating:" && ok "dense: sampling runs (batch 1, growing T)" || bad "sampling" "no generating line"

# run.txt's command is the whole command line, the GPU trainer's own flags (-r) included
"$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 1 -v 0 -s 0 -r 2 -o "$W/R" > /dev/null 2>&1
grep -qF -- "-x 1 -v 0 -s 0 -r 2 -o $W/R" "$W/R/run.txt" && grep -q '^tokens_per_step = 32$' "$W/R/run.txt" \
    && ok "run.txt: the whole command line, GPU flags too" || bad "run.txt" "$(head -3 "$W/R/run.txt")"
"$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -o "$W/B" -n 2 > /dev/null 2>&1
out=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 4 -v 0 -s 0 -o "$W/B" -n 2 -y 1 2>&1); rc=$?
[ $rc -eq 0 ] && echo "$out" | grep -q "resumed from" && cmp -s "$W/A/model_00000004.bin" "$W/B/model_00000004.bin" \
    && cmp -s "$W/A/state_00000004_00000.bin" "$W/B/state_00000004_00000.bin" \
    && ok "dense: saved at step 2 and resumed: model file and resume state at step 4 bit-identical" \
    || bad "dense resume" "exit $rc: $(echo "$out" | tail -n 2)"
# the GPU trainer writes checkpoints in the background by default (-na 1); -na 0 waits for the
# writes: the same files byte for byte
"$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 4 -v 2 -m 2 -s 4 -g 6 -o "$W/A_na0" -n 2 -na 0 > /dev/null 2>&1; rc=$?
same=1
for f in model_00000002.bin state_00000002_00000.bin DONE_00000002 model_00000004.bin state_00000004_00000.bin DONE_00000004; do
    cmp -s "$W/A/$f" "$W/A_na0/$f" || same=0
done
[ $rc -eq 0 ] && [ $same = 1 ] && ok "-na 0 (writes waited for) and the default background writes give the same checkpoint files" \
    || bad "-na 0 vs -na 1" "exit $rc: $(ls "$W/A" "$W/A_na0" | tr '\n' ' ')"

# -w 0 (llm.c's): no fp32 master weights, AdamW updates the bf16 weights with stochastic rounding
loss_at() { grep -E "^step +$1/" | sed -E 's/.*\| loss ([0-9.]+) .*/\1/'; }
W0=(-e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 4 -v 0 -s 0 -w 0)
out=$("$BIN" "${W0[@]}" -o "$W/w0A" -n 2 2>&1); rc=$?
l1=$(echo "$out" | loss_at 1); l4=$(echo "$out" | loss_at 4); r1=$(grep -E '^step +1/' "$W/A.out" 2>/dev/null | sed -E 's/.*\| loss ([0-9.]+) .*/\1/')
[ $rc -eq 0 ] && echo "$out" | grep -q "no master weights (-w 0)" && awk -v a="$l1" -v b="$l4" 'BEGIN { exit !(b < a) }' \
    && ok "-w 0: trains without master weights ($l1 -> $l4)" || bad "-w 0 training" "exit $rc: $(echo "$out" | tail -2)"
sz1=$(stat -c %s "$W/A/state_00000002_00000.bin"); sz0=$(stat -c %s "$W/w0A/state_00000002_00000.bin")
np=$(( ($(stat -c %s "$W/A/model_00000002.bin") - 1024) / 2 ))
[ $((sz1 - sz0)) -eq $((4 * np)) ] && ok "-w 0: the resume state has no master weights (4 x $np bytes less)" || bad "-w 0 state" "$sz1 vs $sz0 for $np params"
"$BIN" "${W0[@]}" -x 2 -o "$W/w0B" -n 2 > /dev/null 2>&1
"$BIN" "${W0[@]}" -o "$W/w0B" -n 2 -y 1 > /dev/null 2>&1
cmp -s "$W/w0A/model_00000004.bin" "$W/w0B/model_00000004.bin" && cmp -s "$W/w0A/state_00000004_00000.bin" "$W/w0B/state_00000004_00000.bin" \
    && ok "-w 0: saved at step 2 and resumed, bit-identical at step 4" || bad "-w 0 resume" "step-4 files differ"
# either -w resumes either's checkpoint with the weights the run had: step 3's loss is the run's
mkdir -p "$W/x10" "$W/x01"
cp "$W/A"/*_00000002* "$W/A/DONE_00000002" "$W/x10/"; cp "$W/w0A"/*_00000002* "$W/w0A/DONE_00000002" "$W/x01/"
a3=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 4 -v 2 -m 2 -s 4 -g 6 -o "$W/x10" -n 2 -y 1 -w 0 2>&1 | loss_at 3)
b3=$("$BIN" "${W0[@]}" -o "$W/x01" -n 2 -y 1 -w 1 2>&1 | loss_at 3)
w13=$(loss_at 3 < "$W/A.out"); w03=$(echo "$out" | loss_at 3)
[ -n "$a3" ] && [ "$a3" = "$w13" ] && [ -n "$b3" ] && [ "$b3" = "$w03" ] \
    && ok "-w 1's checkpoint resumed with -w 0, and -w 0's with -w 1: step 3's loss as in the run ($a3, $b3)" \
    || bad "-w across resume" "'$a3' vs '$w13', '$b3' vs '$w03'"
[ -n "$r1" ] && [ "$l1" = "$r1" ] && ok "-w 0: the first step's loss equals -w 1's ($l1)" || bad "-w 0 first step" "$l1 vs $r1"

# -x 0: evaluation only, without gradients or optimizer state; with -y 1 the step-4 checkpoint,
# whose val loss is the one run A logged at step 4
cp -r "$W/A" "$W/A0"
out=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 0 -v 2 -m 2 -s 0 -o "$W/A0" -y 1 2>&1); rc=$?
want=$(grep '^s:4 tel:' "$W/A/main.log" | sed 's/.*tel://'); got=$(echo "$out" | grep '^val loss' | awk '{printf "%.4f", $3}')
mib() { grep -m1 'GPU memory allocated' | sed -E 's/.*\(([0-9.]+) MiB\).*/\1/'; }
mem_eval=$(echo "$out" | mib); mem_train=$(mib < "$W/A.out")
[ $rc -eq 0 ] && [ -n "$want" ] && [ "$got" = "$want" ] && echo "$out" | grep -q "no gradients or AdamW (-x 0)" && ! echo "$out" | grep -q '^step ' \
    && ok "-x 0 -y 1: the step-4 checkpoint's val loss ($got, as logged), no gradients or moments allocated" \
    || bad "-x 0 -y 1" "exit $rc, '$got' vs '$want': $(echo "$out" | tail -n 2)"
np=$(( ($(stat -c %s "$W/A/model_00000004.bin") - 1024) / 2 ))
awk -v e="$mem_eval" -v t="$mem_train" -v n="$np" 'BEGIN { d = (t - e) * 1048576; exit !(d > 14 * n - 2e5 && d < 14 * n + 2e5) }' \
    && ok "-x 0: 14 bytes per parameter less GPU memory ($mem_train -> $mem_eval MiB for $np parameters)" \
    || bad "-x 0 memory" "$mem_train -> $mem_eval MiB for $np params"
out=$("$BIN" -e "$W/struct.cfg" "${COMMON[@]}" -b 4 -x 0 -v 1 -m 2 -s 1 -g 4 -h 1 -hf "$W/syn_eval.bin" 2>&1); rc=$?
[ $rc -eq 0 ] && echo "$out" | grep -q '^val loss' && echo "$out" | grep -q '^HellaSwag: ' && echo "$out" | grep -q '^generating:' \
    && ok "-x 0 on a structured model: val loss, -h 1 and a sample" || bad "-x 0 structured" "exit $rc: $(echo "$out" | tail -n 3)"

# -lg: NVML through dlopen, here a stand-in libnvidia-ml.so.1 with fixed readings (fake_nvml.c)
for v in ok:"" fail_power:"" old_name:-DOLD_REASONS_NAME no_reasons:-DNO_REASONS; do
    mkdir -p "$W/nvml_${v%%:*}"
    # shellcheck disable=SC2086
    cc -shared -fPIC -O1 ${v#*:} tests/cuda_sim/fake_nvml.c -o "$W/nvml_${v%%:*}/libnvidia-ml.so.1" || bad "fake NVML" "does not build"
done
LG=(-e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 4 -v 0 -s 0 -lg 2)
want="GPU: util 97% | mem bw 55% | SM 1755/1980 MHz | 612/700 W | 64/87 C | 70.0/80.0 GiB | clocks limited by: power cap, sw thermal, other (0x400)"
out=$(LD_LIBRARY_PATH="$W/nvml_ok" FAKE_NVML_LOG="$W/nvml_bus" "$BIN" "${LG[@]}" 2>&1); rc=$?
got=$(echo "$out" | grep -E '^(step|GPU:)' | sed -E 's/^(step +[0-9]+)\/.*/\1/' | tr '\n' '#')
[ $rc -eq 0 ] && [ "$got" = "step    1#step    2#$want#step    3#step    4#$want#" ] && [ "$(cat "$W/nvml_bus")" = "00000000:00:00.0" ] \
    && ok "-lg 2: NVML's readings after steps 2 and 4, for the GPU at the device's PCI address" || bad "-lg 2" "exit $rc: $got / $(cat "$W/nvml_bus")"
out=$(LD_LIBRARY_PATH="$W/nvml_ok" FAKE_NVML_FAIL=power "$BIN" "${LG[@]}" 2>&1)
echo "$out" | grep -qF "| 64/87 C | 70.0/80.0 GiB" && echo "$out" | grep -qF "SM 1755/1980 MHz | n/a | 64/87 C" \
    && ok "-lg: a reading the GPU does not give is n/a" || bad "-lg n/a" "$(echo "$out" | grep GPU: | head -1)"
out=$(LD_LIBRARY_PATH="$W/nvml_old_name" "$BIN" "${LG[@]}" 2>&1)
echo "$out" | grep -qF "clocks limited by: idle" && ok "-lg: a pre-R535 driver's clock-reason call" || bad "-lg old driver" "$(echo "$out" | grep GPU: | head -1)"
out=$(LD_LIBRARY_PATH="$W/nvml_no_reasons" "$BIN" "${LG[@]}" -o "$W/lg_none" 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -qF "error: -lg 2: libnvidia-ml.so.1 has no nvmlDeviceGetCurrentClocksEventReasons" && [ ! -e "$W/lg_none" ] \
    && ok "-lg with an NVML that lacks a call: a clear error before anything is written" || bad "-lg missing symbol" "exit $rc: $(echo "$out" | tail -2)"
if ! ldconfig -p 2>/dev/null | grep -q 'libnvidia-ml.so.1'; then
    out=$(LD_LIBRARY_PATH="$W/nowhere" "$BIN" "${LG[@]}" 2>&1); rc=$?
    [ $rc -ne 0 ] && echo "$out" | grep -qF "error: -lg 2: cannot load libnvidia-ml.so.1 (NVML, installed with the NVIDIA driver)" \
        && ok "-lg without NVML: a clear error" || bad "-lg without NVML" "exit $rc: $(echo "$out" | tail -2)"
fi

# gradient accumulation: 2 micro-batches of 2 sequences = one batch of 4
a=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 4 -x 2 -v 0 -s 0 2>&1 | losses | tr '\n' ' ')
b=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -d 64 -x 2 -v 0 -s 0 2>&1 | losses | tr '\n' ' ')
close_losses "$a" "$b" 2e-3 \
    && ok "dense: -b 2 -d 64 (accumulation) matches -b 4 (losses $a / $b)" || bad "gradient accumulation" "losses '$a' vs '$b'"

# the same first step whatever the recompute, GELU fusion and attention path
ref=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 1 -v 0 -s 0 2>&1 | losses)
for flags in "-r 0 -ge 0 -fa 0" "-r 2 -ge 1 -fa 1" "-r 1 -ge 2 -fa 0"; do
    # shellcheck disable=SC2086
    l=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 1 -v 0 -s 0 $flags 2>&1 | losses)
    awk -v a="$ref" -v b="$l" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && b != "" && d <= 1e-3) }' \
        && ok "dense: $flags gives the default's first loss ($l vs $ref)" || bad "dense $flags" "loss '$l' vs '$ref'"
done

# -fa 2 in a build without cuDNN (as this simulated one): one line that says how to get it, exit 1,
# and nothing written to the output directory
out=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 1 -v 0 -s 0 -fa 2 -o "$W/F" 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "^error: -fa 2 (cuDNN attention): this build has no cuDNN; rebuild with the cuDNN frontend headers" \
    && [ -z "$(ls -A "$W/F" 2>/dev/null)" ] && ok "-fa 2 without cuDNN: a clear error, exit $rc, nothing written" \
    || bad "-fa 2 without cuDNN" "exit $rc: $(echo "$out" | tail -n 2)"

# -fa 2 through the simulator's stand-in for cuDNN (tests/cuda_sim/cudnn_attention_sim.cpp): at head
# size 16, cuDNN for the training shape and our flash kernel for sampling's growing T; at head size
# 8, which our kernel does not take, cuDNN for every shape, sampling's T = 1 included. The first
# two losses equal the default's (head size 16) or -fa 0's (head size 8; -fa 1 falls back to it),
# and sampling runs.
BIN_CUDNN=${BIN_CUDNN:-build/cuda_sim/train_gpt2cu_cudnn}
if [ -x "$BIN_CUDNN" ]; then
    for heads in 2 4; do
        sed "s/^n_head = .*/n_head = $heads/" "$W/dense.cfg" > "$W/heads$heads.cfg"
        a=$("$BIN" -e "$W/heads$heads.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -fa $((heads == 2 ? 1 : 0)) 2>&1 | losses | tr '\n' ' ')
        out=$("$BIN_CUDNN" -e "$W/heads$heads.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 2 -g 4 -fa 2 2>&1); rc=$?
        b=$(echo "$out" | losses | tr '\n' ' ')
        [ $rc -eq 0 ] && echo "$out" | grep -q "cuDNN fused flash attention (-fa 2)" && echo "$out" | grep -q "^generating:" &&
            close_losses "$a" "$b" 1e-3 &&
            ok "-fa 2 (simulated cuDNN), head size $((32 / heads)): trains (losses $b vs $a) and samples" ||
            bad "-fa 2 (simulated cuDNN), head size $((32 / heads))" "exit $rc, losses '$b' vs '$a': $(echo "$out" | tail -n 2)"
    done
else
    bad "-fa 2 (simulated cuDNN)" "$BIN_CUDNN not built"
fi

# -sk 1 (fused BTT forward and backward dx, q's rank 8 in 2 groups of output blocks both ways;
# BTT-MoE experts in one segmented launch each way; the fused Monarch forward and backward dx)
# against the cuBLAS plans, on shapes the fused kernels support (multiples of 16): the same first
# two losses to 1.5e-3 (seen: 0 and 7.5e-4; 1.2e-3, 5e-4 before the Monarch attn_proj and the rank-8
# q; expert 0's W0 for every expert gives 2.4e-3 — the
# kernel tests in test_sim_kernels and test_gpt2cu's -sk 1 fixture runs are the exact checks, this
# one is that the trainer takes the path and trains)
cat > "$W/fused.cfg" <<'EOF2'
n_layer = 1
n_head = 4
n_embd = 256
vocab_size = 50257
max_seq_len = 32

[linear]
struct = btt
rank = 1

[linear.q]
struct = btt
rank = 8

[linear.attn_proj]
struct = monarch
blocks = 4

[linear.fc]
struct = btt_moe
experts = 4
topk = 2
EOF2
a=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -sk 0 2>&1 | losses | tr '\n' ' ')
b=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -sk 1 2>&1 | losses | tr '\n' ' ')
close_losses "$a" "$b" 1.5e-3 \
    && ok "structured: -sk 1 (fused BTT, segmented BTT-MoE experts, fused Monarch) matches -sk 0 (losses $b / $a)" || bad "-sk 1" "losses '$b' vs '$a'"
# -sk 2: the same with the BTT kernel's W0 staged in shared memory; the banner says so, and that
# the Monarch attn_proj layers (256 -> 256 in 4 blocks: a BTT of rank 16, monarch.h) run on it
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -sk 2 2>&1)
b2=$(echo "$out" | losses | tr '\n' ' ')
close_losses "$a" "$b2" 1.5e-3 && echo "$out" | grep -q "W0 staged" && echo "$out" | grep -qE '^\| Monarch as BTT +\| ([1-9][0-9]*) of \1 layers on the BTT kernels' \
    && ok "structured: -sk 2 (the fused BTT kernel with W0 staged, Monarch on it as a BTT) matches -sk 0 (losses $b2 / $a)" \
    || bad "-sk 2" "losses '$b2' vs '$a'; banner: $(echo "$out" | grep -iE "structured layers|Monarch as BTT")"
# -sk 5: -sk 2's kernel on raw mma.sync (W1 packed each launch); the banner says so
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -sk 5 2>&1)
b5=$(echo "$out" | losses | tr '\n' ' ')
close_losses "$a" "$b5" 1.5e-3 && echo "$out" | grep -q "W0 staged, mma.sync" && echo "$out" | grep -qE '^\| Monarch as BTT +\| ([1-9][0-9]*) of \1 layers' \
    && ok "structured: -sk 5 (the fused BTT kernel on mma.sync, Monarch on it as a BTT) matches -sk 0 (losses $b5 / $a)" \
    || bad "-sk 5" "losses '$b5' vs '$a'; banner: $(echo "$out" | grep -iE "structured layers|Monarch as BTT")"
# -sk 1 runs the Monarch kernel: no such line
echo "$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -sk 1 -n 0 2>&1)" | grep -q "Monarch as BTT" \
    && bad "-sk 1's banner" "a 'Monarch as BTT' line with -sk 1" || ok "structured: -sk 1's banner has no 'Monarch as BTT' line (its own Monarch kernel)"
# -sk 3: BTT split (the kernel's stage 1, cuBLAS the rest); -sk 4: BTT (q rank 8, k, v, fc_proj rank
# 1), Monarch (attn_proj) and BTT-MoE's experts (fc) with z, u stored transposed, no permute of it
# (q's W0 reordered instead). Both with q, k and v in place in the qkv buffers; the banner says which.
for v in "3|BTT split" "4|z and u transposed (-sk 4)"; do
    sk=${v%%|*} says=${v#*|}
    out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -sk "$sk" -pt 1 2>&1)
    bk=$(echo "$out" | losses | tr '\n' ' ')
    close_losses "$a" "$bk" 1.5e-3 && echo "$out" | grep -qF "$says" && ! echo "$out" | grep -q "split copies" \
        && ok "structured: -sk $sk ($says) matches -sk 0 (losses $bk / $a), with q, k, v in place (no split copies in -pt)" \
        || bad "-sk $sk" "losses '$bk' vs '$a'; $(echo "$out" | grep -m1 -iE "split copies|structured layers")"
done
# -at 1: each BTT and Monarch layer's kernels timed at startup. Which the simulator's times pick is
# not the point (test_gpt2cu checks the choice against a table of times, and every choice's
# results): the table and the banner's lines are there, it trains as -sk 0 does, and a copy of its
# step-2 checkpoint resumed with -at 1 takes the state's kernels (not timed again) and writes the
# step-4 files bit for bit; a state whose kernels this model cannot run is refused, naming it.
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 4 -v 0 -s 0 -at 1 -o "$W/at1" -n 2 2>&1); rc=$?
bt=$(echo "$out" | losses | head -2 | tr '\n' ' ')
[ $rc -eq 0 ] && echo "$out" | grep -q "^-at 1: each structured layer's kernels" && echo "$out" | grep -qE '^  0 +q, k, v +btt r8 256x256 / btt r1' \
    && echo "$out" | grep -A1 -E '^  0 +fc_proj +btt r1 1024x256 +fwd( +[0-9.]+\*?){6} +- +[0-9.]+\*? +- +- +- +(-sk [0-5]|dense)' \
        | grep -qE '^ +bwd( +[0-9.]+\*?){6} +- +[0-9.]+\*? +- +- +- *$' \
    && echo "$out" | grep -qE '^\| -at 1: attn_proj +\| (-sk [0-4]|dense) ' \
    && echo "$out" | grep -q "per layer, timed (-at 1)" \
    && close_losses "$a" "$bt" 1.5e-3 \
    && ok "structured: -at 1 times each layer's kernels (table, banner) and trains as -sk 0 (losses $bt / $a)" \
    || bad "-at 1" "exit $rc, losses '$bt' vs '$a': $(echo "$out" | grep -A4 "^-at 1" | head -5)"
mkdir -p "$W/at2"
cp "$W/at1/model_00000002.bin" "$W/at1/state_00000002_00000.bin" "$W/at1/DONE_00000002" "$W/at2/"
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 4 -v 0 -s 0 -at 1 -o "$W/at2" -n 2 -y 1 2>&1); rc=$?
[ $rc -eq 0 ] && echo "$out" | grep -q "runs the kernels the resume state kept" && ! echo "$out" | grep -q "^-at 1: each structured layer's kernels" \
    && cmp -s "$W/at1/model_00000004.bin" "$W/at2/model_00000004.bin" && cmp -s "$W/at1/state_00000004_00000.bin" "$W/at2/state_00000004_00000.bin" \
    && ok "structured: -at 1 resumed takes the state's kernels, not timed again; step-4 files bit-identical" \
    || bad "-at 1 resume" "exit $rc: $(echo "$out" | grep -i "at 1\|error" | head -3)"
# -ax: choices -at 1 leaves out (a kernel that fails on some GPU): never timed ("left out" in their
# columns), never chosen; bad lists, -ax without -at 1 and -ax of the flags' own kernels are refused
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 1 -v 0 -s 0 -at 1 -ax sk5,dense 2>&1); rc=$?
tab=$(echo "$out" | sed -n "/^-at 1: each structured layer's kernels/,/^+---/p" | grep -E ' (fwd|bwd) ')
nl=$(echo "$tab" | grep -c .)  # q, k, v (BTT), attn_proj (Monarch), fc (BTT-MoE: no dense choice), fc_proj (BTT): fwd and bwd each
# each row's dense and -sk 5 columns (the 5th and 8th after the pass)
dk=$(echo "$tab" | sed 's/left out/left_out/g' | awk '{ for (i = 1; i <= NF; i++) if ($i == "fwd" || $i == "bwd") { print $(i + 5), $(i + 8); break } }')
nboth=$(echo "$dk" | grep -cx 'left_out left_out')
nsk5=$(echo "$dk" | grep -c ' left_out$')
[ $rc -eq 0 ] && [ "$nl" = 8 ] && [ "$nboth" = 6 ] && [ "$nsk5" = 8 ] && ! echo "$tab" | grep -E ' fwd ' | grep -qE '(dense|-sk 5)[^|]*$' \
    && ok "structured: -at 1 -ax sk5,dense: -sk 5 left out in every row ($nl), dense in the BTT and Monarch ones ($nboth), neither chosen" \
    || bad "-at 1 -ax" "exit $rc, rows $nl, both left out $nboth, -sk 5 $nsk5: $(echo "$tab" | head -3)"
for bad_ax in "-ax sk5|add -at 1, or drop -ax" "-at 1 -ax sk0|'sk0' is the cuBLAS plans" "-at 1 -ax sk5,sk6|'sk6' is no choice of -at 1's; the choices -ax can leave out are sk1" \
              "-sk 5 -at 1 -ax dense,sk5|sk5 is what the flags (-sk 5) run before and between"; do
    IFS='|' read -r flags want <<< "$bad_ax"
    # shellcheck disable=SC2086  # flags: words
    out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 1 -v 0 -s 0 $flags 2>&1); rc=$?
    [ $rc -ne 0 ] && echo "$out" | grep -q "^error: -ax .*$want" && ok "structured: $flags refused: $(echo "$out" | grep -m1 '^error' | cut -c1-90)..." \
        || bad "$flags" "exit $rc: $(echo "$out" | grep -m1 -i error)"
done
mkdir -p "$W/at3"
cp "$W/at1/model_00000002.bin" "$W/at1/state_00000002_00000.bin" "$W/at1/DONE_00000002" "$W/at3/"
st3="$W/at3/state_00000002_00000.bin"
printf '\000' | dd of="$st3" bs=1 seek=$(($(stat -c %s "$st3") - 1)) conv=notrunc 2> /dev/null  # the tied head's byte: 255 -> 0
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 4 -v 0 -s 0 -at 1 -o "$W/at3" -n 2 -y 1 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "error: '$st3': linear layer 6 (lm_head) has kernels 0, which a dense layer cannot run" \
    && ok "structured: a resume state with kernels its layer cannot run is refused, naming the file and layer" \
    || bad "-at 1 bad state" "exit $rc: $(echo "$out" | grep -m1 error)"
cp "$W/at1/state_00000002_00000.bin" "$st3"
printf '\006' | dd of="$st3" bs=1 seek=$(($(stat -c %s "$st3") - 2)) conv=notrunc 2> /dev/null  # fc_proj (BTT): grouped by set
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 4 -v 0 -s 0 -at 1 -o "$W/at3" -n 2 -y 1 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "error: '$st3': linear layer 5 (fc_proj) has kernels 6, which a btt layer cannot run" \
    && ok "structured: a resume state whose BTT layer groups by set of experts (-mg 1's byte) is refused, naming the file and layer" \
    || bad "-at 1 bad state (-mg 1 byte)" "exit $rc: $(echo "$out" | grep -m1 error)"
cp "$W/at1/state_00000002_00000.bin" "$st3"
printf '\044' | dd of="$st3" bs=1 seek=$(($(stat -c %s "$st3") - 3)) conv=notrunc 2> /dev/null  # fc (BTT-MoE): 36, -mg 1 on -sk 4's kernels
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 4 -v 0 -s 0 -at 1 -o "$W/at3" -n 2 -y 1 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "error: '$st3': linear layer 4 (fc) has kernels 36, which a btt_moe layer cannot run" \
    && ok "structured: a resume state whose BTT-MoE layer has no such choice (byte 36, -mg 1 on -sk 4) is refused, naming the file and layer" \
    || bad "-at 1 bad state (byte 36)" "exit $rc: $(echo "$out" | grep -m1 error)"
c=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -sm 1 2>&1 | losses | tr '\n' ' ')
close_losses "$a" "$c" 1.5e-3 \
    && ok "structured: -sm 1 (BTT and Monarch as dense GEMMs on materialized weights) matches -sk 0 (losses $c / $a)" || bad "-sm 1" "losses '$c' vs '$a'"
# -mg 1: the BTT-MoE fc (4 experts, top 2: 6 sets) grouped by set of experts; -pt 2 names its
# steps. -mg 2: at 32 tokens a step the model keeps the grouping by expert (padding to whole tiles).
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -mg 1 -pt 2 2>&1)
m1=$(echo "$out" | losses | tr '\n' ' ')
close_losses "$a" "$m1" 1.5e-3 && echo "$out" | grep -qE "by set of experts in ([1-9][0-9]*) of \1 layers \(-mg 1\)" && echo "$out" | grep -q "grouping by set" \
    && ! echo "$out" | grep -q "grouping by expert" \
    && ok "structured: -mg 1 (BTT-MoE grouped by set of experts) matches -sk 0 (losses $m1 / $a); -pt 2 names its steps" \
    || bad "-mg 1" "losses '$m1' vs '$a'; $(echo "$out" | grep -m2 -iE "grouping|BTT-MoE grouping")"
# -mg 1 -sk 2: the set path's forward and backward dx each one launch of the fused kernel over the
# sets (gates between its stages), the sets' weight gradients by seg_wgrad; the banner and -pt 2 say so
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -mg 1 -sk 2 -pt 2 2>&1)
m12=$(echo "$out" | losses | tr '\n' ' ')
close_losses "$a" "$m12" 1.5e-3 && echo "$out" | grep -qE "by set of experts in 1 of 1 \(-mg 1, fused -sk 2\)" && echo "$out" | grep -q "sets, fused (one launch)" \
    && echo "$out" | grep -q "sets' dx, dZu, fused (one launch)" && echo "$out" | grep -q "sets' dW0, dW1, fused" && ! echo "$out" | grep -q "grouping by expert" \
    && ok "structured: -mg 1 -sk 2 (grouped by set, forward and backward on the fused kernels) matches -sk 0 (losses $m12 / $a); -pt 2 names its steps" \
    || bad "-mg 1 -sk 2" "losses '$m12' vs '$a'; $(echo "$out" | grep -m4 -iE "grouping|sets, fused|sets' d")"
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -mg 2 -pt 2 2>&1)
m2=$(echo "$out" | losses | tr '\n' ' ')
[ "$m2" = "$a" ] && echo "$out" | grep -qE "by set of experts in 0 of [1-9][0-9]* layers \(-mg 2\)" && echo "$out" | grep -q "grouping by expert" \
    && ! echo "$out" | grep -q "grouping by set" \
    && ok "structured: -mg 2 keeps the grouping by expert at 32 tokens a step, as the model prices it (losses $m2, bit for bit -sk 0's)" \
    || bad "-mg 2" "losses '$m2' vs '$a'; $(echo "$out" | grep -m2 -iE "grouping")"
# -at 1 times the BTT-MoE fc grouped by set too (its -mg 1 column and the three with its forward
# fused, both passes; BTT's has none), -mg 1 making it the incumbent; the banner says how many
# layers chose it; it trains as -sk 0.
out=$("$BIN" -e "$W/fused.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0 -mg 1 -at 1 2>&1); rc=$?
mt=$(echo "$out" | losses | tr '\n' ' ')
[ $rc -eq 0 ] && echo "$out" | grep -qE '^  layers +role +structure +pass +-sk 0 .* -sk 5 +-mg1 -sk1 +-mg1 -sk2 +-mg1 -sk5  chosen$' \
    && echo "$out" | grep -A1 -E '^  0 +fc +btt_moe 4/2 256x1024 +fwd( +[0-9.]+\*?){3} +- +-( +[0-9.]+\*?){6}  +-' \
        | grep -qE '^ +bwd( +[0-9.]+\*?){3} +- +-( +[0-9.]+\*?){6} *$' \
    && echo "$out" | grep -qE '^  0 +fc_proj +btt r1 1024x256 +fwd( +[0-9.]+\*?){6} +- +[0-9.]+\*? +- +- +-  ' \
    && echo "$out" | grep -qE '^\| BTT-MoE grouping +\| by set of experts in [01] of 1 layers \(-at 1\)' && close_losses "$a" "$mt" 1.5e-3 \
    && ok "structured: -at 1 times BTT-MoE's grouping by set (-mg 1 the incumbent) and trains as -sk 0 (losses $mt / $a)" \
    || bad "-mg 1 -at 1" "exit $rc, losses '$mt' vs '$a': $(echo "$out" | grep -E -A1 '^  0 +fc ' | head -2; echo "$out" | grep -m1 'BTT-MoE grouping')"

# -sm 2: exec_model.h picks per layer (tests/test_gpu_plan.c holds the model to the H200's
# measurements; at this size, where launches dominate, it picks dense for most). The layers the
# banner counts as dense are the ones -pt shows running as dense (one layer: one part each, q, k
# and v as one when all three are), BTT-MoE never is, and the losses are -sm 0's.
cat > "$W/split.cfg" <<'EOF2'
n_layer = 1
n_head = 2
n_embd = 64
vocab_size = 50257
max_seq_len = 32

[linear]
struct = btt
rank = 2

[linear.v]
struct = monarch
blocks = 4

[linear.fc]
struct = btt
rank = 16

[linear.fc_proj]
struct = btt_moe
experts = 4
topk = 2
EOF2
SPLIT=(-e "$W/split.cfg" -i "$W/syn_train_*.bin" -j "$W/syn_val_000000.bin" -t 32 -tk data/tinyshakespeare/gpt2_tokenizer.bin -b 16 -x 2 -v 0 -s 0)
out=$("$BIN" "${SPLIT[@]}" -sm 2 -pt 1 2>&1); rc=$?
a=$(echo "$out" | losses | tr '\n' ' '); b=$("$BIN" "${SPLIT[@]}" -sm 0 2>&1 | losses | tr '\n' ' ')
said=$(echo "$out" | sed -nE 's/.*-sm 2: ([0-9]+) of ([0-9]+) BTT\/Monarch as dense.*/\1 \2/p')
ran=$(echo "$out" | awk '/^qkv fwd: .*\(q, k, v as one dense\)/ { n += 3 } /^[a-z_]+ fwd: .*\(as dense\)/ { n++ } END { print n + 0 }')
roles=$(echo "$out" | sed -nE 's/^\| -sm 2 runs as dense +\| (.*[^ ]) +\|$/\1/p')  # one layer: one name per layer run as dense
nroles=$(echo "$roles" | awk -F', ' '$0 == "none" { print 0; next } { print NF }')
[ $rc -eq 0 ] && [ -n "$said" ] && [ "${said#* }" = 5 ] && [ "${said% *}" = "$ran" ] && [ "$nroles" = "$ran" ] && ! echo "$roles" | grep -q fc_proj \
    && echo "$out" | grep -qE '^fc_proj fwd: btt_moe 4/top2 [^(]*$' \
    && close_losses "$a" "$b" 1.5e-3 \
    && ok "-sm 2: the banner's ${said% *} of 5 BTT/Monarch layers as dense ($roles) are the ones -pt shows so, BTT-MoE on its plans; losses as -sm 0's ($a / $b)" \
    || bad "-sm 2" "exit $rc, banner '$said' ($roles), $ran ran as dense, losses '$a' vs '$b': $(echo "$out" | grep -E 'structured layers|fwd:' | head -8)"

out=$("$BIN" -e "$W/struct.cfg" "${COMMON[@]}" -b 2 -x 3 -v 3 -m 1 -s 3 -g 4 -o "$W/S" -n 3 2>&1); rc=$?
first=$(echo "$out" | losses | head -1); last=$(echo "$out" | losses | tail -1)
[ $rc -eq 0 ] && awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }' && ok "structured (btt, monarch, btt_moe): 3 steps lower the loss ($first -> $last)" \
    || bad "structured training" "exit $rc, losses $first -> $last: $(echo "$out" | tail -n 3)"
# the routing report (aux, balance, expert loads; routing.h) of the first two steps as the CPU
# trainer's, with a random router (a zero one puts every token on experts 0 and 1 at first): one
# selection flipped by bf16 moves a load by E/(N·K) = 4/64
routing() { grep -E '^step ' | head -2 | sed -E 's/.*\| aux ([0-9.]+) bal ([0-9.]+) load ([0-9.]+)-([0-9.]+) \|.*/\1 \2 \3 \4/' | tr '\n' ' '; }
if [ -x ./train_gpt2 ]; then
    sed 's/^topk = 2$/topk = 2\nrouter_init = 0.3/' "$W/struct.cfg" > "$W/routed.cfg"
    RT=(-e "$W/routed.cfg" "${COMMON[@]}" -b 2 -x 2 -v 0 -s 0)
    rg=$("$BIN" "${RT[@]}" 2>&1 | routing); rc=$(./train_gpt2 "${RT[@]}" 2>&1 | routing)
    awk -v a="$rg" -v b="$rc" 'BEGIN { n = split(a, x, " "); m = split(b, y, " "); if (n != 8 || m != 8) exit 1
        for (i = 1; i <= 8; i++) { d = x[i] - y[i]; if (d < 0) d = -d; if (d > ((i - 1) % 4 < 2 ? 3e-3 : 0.07)) exit 1 } }' \
        && ok "structured: the routing report (aux bal min max) of steps 1-2 as the CPU trainer's ($rg / $rc)" || bad "routing report" "'$rg' vs CPU '$rc'"
    # -rl 1: each routed layer's expert loads, read from the device, as the CPU trainer's
    loads() { sed -n '/^expert loads after step 2 /,/^val loss/p' | grep '^  h\.' | sed 's/  (.*//' | tr -s ' ' | tr '\n' ';'; }
    lg=$("$BIN" "${RT[@]}" -v 2 -m 1 -rl 1 2>&1 | loads); lc=$(./train_gpt2 "${RT[@]}" -v 2 -m 1 -rl 1 2>&1 | loads)
    awk -v a="$lg" -v b="$lc" 'BEGIN { n = split(a, x, "[; ]+"); m = split(b, y, "[; ]+"); if (n != m || n < 10) exit 1
        for (i = 1; i <= n; i++) { if (x[i] ~ /^h/) { if (x[i] != y[i]) exit 1; continue }
                                   d = x[i] - y[i]; if (d < 0) d = -d; if (d > 0.07) exit 1 } }' \
        && ok "structured: -rl 1 prints each routed layer's loads as the CPU trainer ($lg)" || bad "-rl 1" "'$lg' vs CPU '$lc'"
fi
"$BIN" -e "$W/struct.cfg" "${COMMON[@]}" -b 2 -x 1 -v 0 -s 0 -o "$W/T" -n 1 > /dev/null 2>&1
out=$("$BIN" -e "$W/struct.cfg" "${COMMON[@]}" -b 2 -x 3 -v 0 -s 0 -o "$W/T" -n 1 -y 1 2>&1); rc=$?
[ $rc -eq 0 ] && cmp -s "$W/S/model_00000003.bin" "$W/T/model_00000003.bin" && cmp -s "$W/S/state_00000003_00000.bin" "$W/T/state_00000003_00000.bin" \
    && ok "structured: saved at step 1 and resumed: step 3 bit-identical" || bad "structured resume" "exit $rc: $(echo "$out" | tail -n 2)"

# -h 1: the CPU trainer's checkpoint after 40 steps (which picks all 24 right endings there) scored
# here, 2 examples per batch of 8 rows, rows cut to -t 16 + 1 tokens: every ending right again
if [ -x ./train_gpt2 ]; then
    ./train_gpt2 -e "$W/dense.cfg" -i "$W/syn_train_*.bin" -j "" -t 32 -b 4 -s 0 -x 40 -l 3e-3 -v 0 -o "$W/H" -n 40 > /dev/null 2>&1
    out=$("$BIN" -e "$W/H/model_00000040.bin" "${COMMON[@]}" -b 8 -x 1 -v 1 -m 1 -s 0 -h 1 -hf "$W/syn_eval.bin" 2>&1); rc=$?
    hs=$(echo "$out" | grep -E '^HellaSwag: [0-9]+/' | tr '\n' ';')
    [ $rc -eq 0 ] && [ "$hs" = "HellaSwag: 24/24 = 1.000000;HellaSwag: 24/24 = 1.000000;" ] && echo "$out" | grep -q "^note: 96 of its rows are longer than -t 16" \
        && ok "-h 1: the trained model picks all 24 right endings here too ($hs)" || bad "-h 1" "exit $rc: $hs $(echo "$out" | tail -n 2)"
fi
# out of GPU memory: a simulated card of 64 MB runs out at the logits (an activation: the hint is
# the batch size), one of 40 MB at the AdamW state (before any activation: the hint is -w 0 / -z 1)
out=$(SIM_GPU_MB=64 "$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 16 -t 32 -x 1 -v 0 -s 0 2>&1); rc=$?
[ $rc -eq 1 ] && echo "$out" | grep -qE '^error: out of GPU memory allocating activations: logits \(B x T x padded vocab\): 0\.048 GiB \(51511296 bytes; .* of 0\.06 GiB\)' \
    && echo "$out" | grep -qF 'use a smaller -b (now 16) with -d' && ! echo "$out" | grep -q '^step' \
    && ok "out of GPU memory at an activation: names it, its size and the card's, suggests a smaller -b or -r" \
    || bad "OOM at an activation" "exit $rc: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
out=$(SIM_GPU_MB=40 "$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 16 -t 32 -x 1 -v 0 -s 0 2>&1); rc=$?
[ $rc -eq 1 ] && echo "$out" | grep -qE '^error: out of GPU memory allocating (master weights|AdamW)' \
    && echo "$out" | grep -qF -- '-w 0 goes without the fp32 master weights' && ! echo "$out" | grep -q 'smaller -b' \
    && ok "out of GPU memory at the weights or optimizer state: suggests -w 0 or -z 1, not a smaller batch" \
    || bad "OOM at the weights" "exit $rc: $(echo "$out" | tail -n 3 | tr '\n' ' ')"

# -pt 1 on the GPU trainer: events at the marks; the parts cover the steps, count the model's FLOPs
# once and include the GPU trainer's own (recomputes, the host's waits); training is unchanged
out=$("$BIN" -e "$W/dense.cfg" "${COMMON[@]}" -b 2 -x 3 -v 0 -s 0 -pt 1 2>&1); rc=$?
[ $rc -eq 0 ] || bad "-pt 1 run" "exit $rc: $(echo "$out" | tail -n 3)"
check_profile "-pt 1 (dense, -r 1): the table counts the model's FLOPs once and adds up to the step time" 5 "$out" \
    "qkv fwd: dense" "qkv bwd: dense" "fc_proj bwd: dense" "attention fwd" "attention bwd" "layernorm fwd (+ residual)" "layernorm bwd" \
    "gelu recompute" "classifier (softmax, loss, dlogits)" "lm_head bwd: dense (tied to wte)" "losses to the host, summed (GPU idle)" \
    "inputs checked and copied to the GPU" "encoder bwd (+ the host's token buckets)" "update (AdamW)" "gradient norm"
run=(-e "$W/struct.cfg" "${COMMON[@]}" -b 2 -x 3 -v 0 -s 0 -r 2 -d 64)
out=$("$BIN" "${run[@]}" -pt 1 2>&1); rc=$?
[ $rc -eq 0 ] || bad "-pt 1 run (structured)" "exit $rc: $(echo "$out" | tail -n 3)"
check_profile "-pt 1 (every structure, -r 2, 2 micro-batches): the parts' FLOPs and time add up" 5 "$out" \
    "q fwd: btt r2" "v bwd: monarch 4 blocks" "fc fwd: btt_moe 4/top2" "fc bwd: btt_moe 4/top2" "layernorm recompute"
# q (BTT), k (BTT) and v (Monarch) on the plans write into qkv and read dqkv in place: no copies
echo "$out" | grep -q "q, k, v split copies" && bad "q, k, v in place" "the profile has a 'q, k, v split copies' part" \
    || ok "-pt 1: structured q, k and v on the plans write into qkv and read dqkv in place (no split copies)"
# with -sm 1 the three (BTT, BTT, Monarch) run as one dense layer of width 3C on their
# materialized weights: one part each way, no copies
out_sm=$("$BIN" "${run[@]}" -sm 1 -pt 1 2>&1); rc=$?
[ $rc -eq 0 ] || bad "-pt 1 run (structured, -sm 1)" "exit $rc: $(echo "$out_sm" | tail -n 3)"
check_profile "-pt 1 -sm 1: q, k and v as one dense layer, the parts' FLOPs and time add up" 5 "$out_sm" \
    "qkv fwd: mixed structures (q, k, v as one dense)" "qkv bwd: mixed structures (q, k, v as one dense)" "fc fwd: btt_moe 4/top2"
echo "$out_sm" | grep -qE "q, k, v split copies|^[qkv] (fwd|bwd):" && bad "-sm 1 q, k, v as one" "the profile has split copies or a separate q, k or v part" \
    || ok "-pt 1 -sm 1: q, k and v run as one dense layer (no separate parts, no split copies)"
steps() { grep -E '^step +[0-9]' | sed -E 's/\| [0-9.]+ ms.*//'; }
[ "$(echo "$out" | steps)" = "$("$BIN" "${run[@]}" 2>&1 | steps)" ] && ok "-pt 1 leaves the GPU trainer's training unchanged" \
    || bad "-pt 1 changes training" "$(echo "$out" | steps | tail -n 1)"
# -pt 2: the same first table, then the steps inside each structured layer: the plans' ops (BTT:
# the permute of z; -sk 4: none, W0's columns instead), BTT-MoE's routing, gathers, tiled plans
# and combine, -sm 1's rebuilt weight and dense GEMMs; each layer's steps make up its time
out2=$("$BIN" "${run[@]}" -pt 2 2>&1); rc=$?
[ $rc -eq 0 ] || bad "-pt 2 run" "exit $rc: $(echo "$out2" | tail -n 3)"
check_profile "-pt 2: the first table as -pt 1's (every structure)" 5 "$out2" "q fwd: btt r2" "fc bwd: btt_moe 4/top2"
check_steps "-pt 2: BTT's forward steps are its plan's ops, the permute of z among them" "$out2" "q fwd: btt r2" \
    "plan op 1: gemm T1 = x * W0" "plan op 2: permute T1 -> z" "plan op 3: gemm y = z * W1"
check_steps "-pt 2: Monarch's backward steps are its plan's ops" "$out2" "v bwd: monarch 4 blocks" "plan op 1: permute dy -> T2" "plan op 2: gemm"
check_steps "-pt 2: BTT-MoE's forward steps" "$out2" "fc fwd: btt_moe 4/top2" "router logits" "top-k, gate softmax" "grouping by expert" \
    "experts' cores" "gather x" "tile pointers" "experts op 1: gemm" "combine (gate, bias, GELU)"
check_steps "-pt 2: BTT-MoE's backward steps" "$out2" "fc bwd: btt_moe 4/top2" "experts' cores" "gather dy" "gather x" \
    "experts' dZu op 1: gemm" "gate backward" "experts' dx, dW op" "dW partials summed per expert" "router: d logits, d router" \
    "dx: combine, router's share" "bias gradient"
[ "$(echo "$out2" | steps)" = "$(echo "$out" | steps)" ] && ok "-pt 2 leaves the GPU trainer's training unchanged" \
    || bad "-pt 2 changes training" "$(echo "$out2" | steps | tail -n 1)"
out2=$("$BIN" "${run[@]}" -sk 4 -pt 2 2>&1); rc=$?
[ $rc -eq 0 ] || bad "-pt 2 -sk 4 run" "exit $rc: $(echo "$out2" | tail -n 3)"
check_steps "-pt 2 -sk 4: BTT rank 2's forward permutes W0's columns, not z" "$out2" "q fwd: btt r2" "plan op 1: permute W0 -> W0r" \
    "plan op 2: gemm"
profile_block "$out2" "q fwd: btt r2" | grep -q -- "-> z" && bad "-pt 2 -sk 4: no permute of z" "$(profile_block "$out2" "q fwd: btt r2")" \
    || ok "-pt 2 -sk 4: no step of BTT's forward permutes z"
out2=$("$BIN" "${run[@]}" -sm 1 -pt 2 2>&1); rc=$?
[ $rc -eq 0 ] || bad "-pt 2 -sm 1 run" "exit $rc: $(echo "$out2" | tail -n 3)"
check_steps "-pt 2 -sm 1: q, k, v as one dense layer: W rebuilt, then the GEMMs, then the cores' gradients" "$out2" \
    "qkv bwd: mixed structures (q, k, v as one dense)" "W from the cores" "dense GEMMs (dx, dW)" "cores' and bias gradients"

# the host waits for the GPU once per step (the losses, the norm), not once per micro-batch: the
# simulator counts the waits for the whole queue, the same with 1 and with 4 micro-batches a step
waits() { SIM_STATS=1 "$BIN" -e "$W/${2:-dense}.cfg" "${COMMON[@]}" -b 2 -x 3 -v 0 -s 0 -d "$1" 2>&1 | sed -nE 's/.* ([0-9]+) waits for the whole queue$/\1/p'; }
w1=$(waits 32); w4=$(waits 128)
[ -n "$w1" ] && [ "$w1" = "$w4" ] && ok "the host waits for the GPU as often with 4 micro-batches per step as with 1 ($w1 waits in 3 steps)" \
    || bad "waits per micro-batch" "1 micro-batch: '$w1' waits, 4: '$w4'"
# ... and BTT-MoE layers add none (their tiled cuBLAS plans take the expert counts on the device)
ws=$(waits 32 struct)
[ -n "$ws" ] && [ "$ws" = "$w1" ] && ok "BTT-MoE, BTT and Monarch layers (cuBLAS plans) add no host wait ($ws waits in 3 steps, as dense)" \
    || bad "waits with structured layers" "structured: '$ws' waits, dense: '$w1'"

out=$("$BIN" -h 2>&1); rc=$?
[ $rc -eq 0 ] && echo "$out" | grep -q "^GPU trainer only:" && ok "-h without a value prints the help, GPU flags included" || bad "-h alone" "exit $rc"

summary
