#!/usr/bin/env bash
# dev/bench/structured.sh: the structured-layer benchmark of issue 5, on one GPU.
#  1. layers: dev/cuda/structured_layers times forward + backward (dx and every weight gradient)
#     of dense, BTT rank 1/2/4, Monarch 4 and ~sqrt(d) blocks and BTT-MoE 8 experts top 2 at
#     widths 768, 1024, 2048, 4096 (d -> 4d, the MLP's fc shape), N = 32768 rows, with each
#     one's FLOP ratio to dense and roofline floor; dev/bench/structured_torch.py times the same
#     layers as the papers' PyTorch code computes them (bmm, transpose, contiguous, bmm; all
#     experts then the mask) on the same GPU; the two are joined into one table, followed by
#     the issue's goals, PASS or MISS; then each layer's fastest path as -at 1 runs it (the least
#     of its paths, or one path's forward with another's backward) and the goals on those
#     (dev/bench/structured_table.awk, which also runs on saved logs);
#  2. whole model: tokens/s of train_gpt2cu for every scripts/configs/gpt2_124M*.conf next to
#     the dense 124M (fresh random init, tinyshakespeare, mean of steps 2..STEPS).
#   bash dev/bench/structured.sh
#   DIMS=768,1024 SHAPES=fc,sq REPS=20 STEPS=20 B=16 MOE=mask_z bash dev/bench/structured.sh
#   BUILD=0 ... (use the binaries already there, as dev/bench/device_run.sh does)
#   TRAIN_BIN=./train_gpt2cu_cudnn ... (the whole model with another build of the trainer)
# SHAPES: fc = d -> 4d (default), sq = d -> d. MOE: the PyTorch BTT-MoE variant, mask_z (the
# paper's code: gates mask each expert's intermediate) or separate (each expert's output kept,
# then weighted). Logs go to $OUT (default /tmp/structured_bench). Without a GPU the script
# prints one line and exits 1; without a CUDA-enabled PyTorch it skips the PyTorch column.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

DIMS=${DIMS:-768,1024,2048,4096}
SHAPES=${SHAPES:-fc}
N=${N:-32768}
WARMUP=${WARMUP:-3}
REPS=${REPS:-20}
MOE=${MOE:-mask_z}
STEPS=${STEPS:-20}
B=${B:-16}
T=${T:-1024}
OUT=${OUT:-${TMPDIR:-/tmp}/structured_bench}
BUILD=${BUILD:-1}
MODELS=${MODELS:-1}
LAYERS_BIN=${LAYERS_BIN:-./dev/cuda/structured_layers}
# shellcheck source=dev/bench/common.sh disable=SC1091
source dev/bench/common.sh  # list_after, at1_run, ensure_tinyshakespeare
mkdir -p "$OUT" || { echo "structured.sh: cannot create the log directory $OUT"; exit 1; }

# ---- a GPU, or one line and exit 1
if command -v nvidia-smi >/dev/null 2>&1 && ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "structured.sh: no NVIDIA GPU visible (nvidia-smi lists none); this benchmark needs one"
    exit 1
fi
NVCC=$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)
if [ "$BUILD" != 0 ] && [ ! -x "$NVCC" ]; then
    echo "structured.sh: nvcc not found (CUDA toolkit); cannot build dev/cuda/structured_layers"
    exit 1
fi
if [ "$BUILD" != 0 ] && ! make -B -C dev/cuda structured_layers > "$OUT/build_layers.log" 2>&1; then
    echo "structured.sh: building dev/cuda/structured_layers failed; see $OUT/build_layers.log"
    exit 1
fi
if ! probe=$("$LAYERS_BIN" --probe 2>&1); then
    echo "structured.sh: no usable CUDA GPU: $(echo "$probe" | grep -m1 . | sed 's/^error: //')"
    exit 1
fi

echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "device:  $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | head -1)"
else
    echo "device:  $probe (nvidia-smi not found)"
fi
echo "nvcc:    $("$NVCC" --version 2>/dev/null | tail -1)"
torch_why=$(python3 - 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as e:
    print(f"PyTorch is not importable ({type(e).__name__}: {e})")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) reports torch.cuda.is_available() = False")
    sys.exit(1)
print(f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
)
torch_ok=$?
echo "torch:   $(echo "$torch_why" | tail -1)"
echo

# ---- 1. the layers
# A CUDA error is sticky: a case that dies (say a kernel never run on this GPU before) ends its
# process, and with it every case after it. So where a process ends without its DONE line, the
# rest runs in a new one without the case it died in (its last RUNNING line): first the rest of
# that width and shape (without the cases it has rows for), then the widths and shapes after it,
# without every case that died so far. A case that dies is a row short in the table and a note.
echo "== layers: $LAYERS_BIN -d $DIMS -s $SHAPES -n $N -w $WARMUP -r $REPS"
: > "$OUT/layers_cuda.log"
died=""  # the cases that ended a process, comma-separated
notes=()
jobs=("$DIMS|$SHAPES|")  # each: widths|shapes|cases to leave out
rc=0
while [ ${#jobs[@]} -gt 0 ]; do
    IFS='|' read -r jdims jshapes jskip <<< "${jobs[0]}"
    jobs=("${jobs[@]:1}")
    part=$OUT/layers_part.log
    [ -n "$jskip" ] && echo "-- the rest in a new process: -d $jdims -s $jshapes -x $jskip"
    # shellcheck disable=SC2086  # the -x word pair, when there is a list
    "$LAYERS_BIN" -d "$jdims" -s "$jshapes" -n "$N" -w "$WARMUP" -r "$REPS" ${jskip:+-x "$jskip"} 2>&1 | tee "$part" |
        grep -vE '^(RESULT|DEVICE|RUNNING|DONE) '
    prc=${PIPESTATUS[0]}
    cat "$part" >> "$OUT/layers_cuda.log"
    grep -q '^DONE ' "$part" && { [ "$prc" -ne 0 ] && rc=$prc; continue; }
    rc=$prc
    last=$(grep '^RUNNING ' "$part" | tail -1)
    if [ -z "$last" ]; then
        notes+=("note: structured_layers -d $jdims -s $jshapes ended (rc $prc) before its first case: $(tail -1 "$part")")
        continue
    fi
    d=$(sed -E 's/.* d=([0-9]+) .*/\1/' <<< "$last"); din=$(sed -E 's/.* din=([0-9]+) .*/\1/' <<< "$last")
    dout=$(sed -E 's/.* dout=([0-9]+) .*/\1/' <<< "$last"); dcase=$(sed -E 's/.* struct=([^ ]+).*/\1/' <<< "$last")
    why=$(grep -vE '^(RESULT|DEVICE|RUNNING) ' "$part" | grep . | tail -1)
    notes+=("note: structured_layers ended (rc $prc) in $dcase at $din -> $dout, so its row is missing: ${why:0:200}")
    shape_now=$([ "$dout" = "$din" ] && echo sq || echo fc)
    next=()  # what runs next, before the jobs already queued
    if [ "$dcase" = dense ] || [[ ",$died," == *",$dcase,"* ]]; then  # nothing to leave out that would let it go on
        notes+=("note: the rest of $din -> $dout is left out too (dense always runs, or $dcase was already left out)")
    else
        died=${died:+$died,}$dcase
        done_here=$(grep -E "^RESULT d=$d din=$din dout=$dout " "$part" | sed -E 's/.* struct=([^ ]+).*/\1/' | grep -vx dense | paste -sd, -)
        next+=("$d|$shape_now|$died${done_here:+,$done_here}")
    fi
    # after it: the other shape of this width (sq follows fc), then the widths after this one
    [ "$shape_now" = fc ] && [[ "$jshapes" == *sq* ]] && next+=("$d|sq|$died")
    rest_dims=$(list_after "$jdims" "$d")
    [ -n "$rest_dims" ] && next+=("$rest_dims|$jshapes|$died")
    jobs=(${next[@]+"${next[@]}"} ${jobs[@]+"${jobs[@]}"})
done
rm -f "$OUT/layers_part.log"
if ! grep -q '^RESULT ' "$OUT/layers_cuda.log"; then
    echo "structured_layers failed (rc $rc) before any result; full log in $OUT/layers_cuda.log"
    printf '%s\n' ${notes[@]+"${notes[@]}"}
    exit 1
fi
[ "$rc" -ne 0 ] && [ ${#notes[@]} -eq 0 ] && echo "note: structured_layers exited with $rc (a forward check failed): see above"
echo

: > "$OUT/layers_torch.log"
if [ $torch_ok -eq 0 ]; then
    echo "== PyTorch: python3 dev/bench/structured_torch.py --dims $DIMS --shapes $SHAPES -n $N --warmup $WARMUP --reps $REPS --moe $MOE"
    python3 dev/bench/structured_torch.py --dims "$DIMS" --shapes "$SHAPES" -n "$N" --warmup "$WARMUP" --reps "$REPS" --moe "$MOE" 2>&1 |
        tee "$OUT/layers_torch.log" | grep -v '^RESULT '
    trc=${PIPESTATUS[0]}
    [ "$trc" -ne 0 ] && echo "note: structured_torch.py exited with $trc; its missing rows show as '-'"
    echo
else
    echo "== PyTorch column skipped: $(echo "$torch_why" | tail -1)"
    echo
fi

# ---- the joined table and the goals
awk -v torch_ran="$torch_ok" -v moe_variant="$MOE" -v tfile="$OUT/layers_torch.log" -f dev/bench/structured_table.awk \
    "$OUT/layers_torch.log" "$OUT/layers_cuda.log"
printf '%s\n' ${notes[@]+"${notes[@]}"}  # (again, where the table's readers look)
echo
[ "$MODELS" = 0 ] && exit 0

# ---- 2. the whole model
TRAIN_BIN=${TRAIN_BIN:-./train_gpt2cu}  # device_run.sh: the cuDNN build when it loads (its default attention, -fa 2)
echo "== whole model: $TRAIN_BIN -e CONFIG -i TRAIN -j TRAIN -b $B -t $T -x $STEPS -v 0 -s 0 -l 1e-4 (fresh random init; tinyshakespeare)"
if { [ "$BUILD" != 0 ] && ! make -B train_gpt2cu > "$OUT/build_train.log" 2>&1; } || [ ! -x "$TRAIN_BIN" ]; then
    echo "building train_gpt2cu failed; see $OUT/build_train.log"
    exit 1
fi
ensure_tinyshakespeare
configs=(scripts/configs/gpt2_124M.conf)
for c in scripts/configs/gpt2_124M*.conf; do
    [ "$c" != scripts/configs/gpt2_124M.conf ] && configs+=("$c")
done
printf '%-28s %10s %10s %12s %9s %s\n' config ms/step median tokens/s vs_dense note
dense_tok=""
runs=()  # "config|flags": the structured configs also with -sk 1 (the fused kernels), -sk 2 and
         # -sk 5 where they have BTT or BTT-MoE layers (the BTT kernel with W0 staged; that on
         # mma.sync), -sk 3 where they have
         # BTT layers (split: the kernel's stage 1, cuBLAS the rest), -sk 4 (the plans with z, u
         # stored transposed) and, where they
         # have BTT or Monarch layers, with -sm 1 (all of those as dense GEMMs on materialized
         # weights), -sm 2 (those that structured/exec_model.h models faster so) and -at 1 (each
         # layer's kernels timed at startup, the fastest run; its table follows the run's line),
         # and where they have BTT-MoE layers with -mg 1 (tokens grouped by set of experts) and
         # -mg 1 -sk 2 (that on the fused kernels, a launch each way over the sets)
for conf in "${configs[@]}"; do
    runs+=("$conf|")
    [ "$conf" = scripts/configs/gpt2_124M.conf ] && continue
    runs+=("$conf|-sk 1")
    grep -qE '^struct *= *(btt|btt_moe) *$' "$conf" && runs+=("$conf|-sk 2" "$conf|-sk 5")
    grep -qE '^struct *= *btt *$' "$conf" && runs+=("$conf|-sk 3")
    runs+=("$conf|-sk 4")
    grep -qE '^struct *= *(btt|monarch) *$' "$conf" && runs+=("$conf|-sm 1" "$conf|-sm 2" "$conf|-at 1")
    grep -qE '^struct *= *btt_moe *$' "$conf" && runs+=("$conf|-mg 1" "$conf|-mg 1 -sk 2")
done
for run in "${runs[@]}"; do
    conf=${run%%|*}
    flags=${run#*|}
    name=$(basename "$conf" .conf)
    [ -n "$flags" ] && name="$name $flags"
    log=$OUT/model_${name// /_}.log
    # shellcheck disable=SC2086  # flags: words
    at1_run "$log" "$TRAIN_BIN" -e "$conf" -i "$TRAIN" -j "$TRAIN" -b "$B" -t "$T" -x "$STEPS" -v 0 -s 0 -l 1e-4 $flags  # (-at 1: past a choice that dies)
    rc=$?
    line=$(grep 'total average iteration time' "$log" | tail -1)
    if [ $rc -ne 0 ] || [ -z "$line" ]; then
        why=$(grep -m1 '^error' "$log" || tail -1 "$log")
        printf '%-28s %10s %10s %12s %9s %s\n' "$name" - - - - "failed: ${why:0:90}"
        continue
    fi
    ms=$(echo "$line" | sed -E 's/.*time: ([0-9.]+) ms.*/\1/')
    tok=$(echo "$line" | sed -E 's/.*\| ([0-9]+) tok\/s.*/\1/')
    mfu=$(echo "$line" | grep -oE 'MFU [0-9.]+%' | cut -d' ' -f2)
    # the median of the same steps (2..STEPS): BTT-MoE's cuBLAS path has outlier steps (new GEMM
    # shapes as the experts' counts change; 740 and 1297 ms against ~200 on an H200) that move the mean
    med=$(grep -E '^step +[0-9]+/' "$log" | tail -n +2 | sed -E 's/.*\| ([0-9.]+) ms \|.*/\1/' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) printf "%.2f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; else printf "-" }')
    [ "$name" = gpt2_124M ] && dense_tok=$tok
    vs=-
    [ -n "$dense_tok" ] && vs=$(awk -v a="$tok" -v b="$dense_tok" 'BEGIN { printf "%.2fx", a / b }')
    mem=$(grep -m1 'GPU memory allocated' "$log" | tr -s ' ' | cut -d'|' -f3 | sed 's/^ *//; s/ *$//')
    picked=$(grep -oE -- '-sm 2: [0-9]+ of [0-9]+' "$log" | head -1)
    printf '%-28s %10s %10s %12s %9s %s\n' "$name" "$ms" "$med" "$tok" "$vs" "MFU ${mfu:-n/a}, GPU memory ${mem:-?}${picked:+, $picked as dense}"
    case "$flags" in *"-at 1"*) sed -n '/^-at 1: each structured/,/^+---/p' "$log" | sed '$d' | sed 's/^/    /' ;; esac
done
echo
echo "ms/step and tokens/s: the trainer's mean of steps 2..$STEPS; median: of the same steps; vs_dense = tokens/s relative to the dense gpt2_124M; logs in $OUT"
