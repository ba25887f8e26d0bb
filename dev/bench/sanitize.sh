#!/usr/bin/env bash
# dev/bench/sanitize.sh: the GPU trainer under NVIDIA's compute-sanitizer, on a GPU. What the CPU
# simulator (tests/cuda_sim) cannot see: races between blocks and between warps in the real memory
# model, reads of device memory nothing wrote (initcheck), barriers not reached by every thread
# (synccheck), accesses out of bounds on the hardware. Each tool runs a few steps of two tiny
# models that between them reach every kernel family the trainer launches: a dense model (flash
# attention, fused classifier, LayerNorm, AdamW) with training, validation and sampling, and a
# structured one (BTT rank 2 everywhere, Monarch for v, BTT-MoE for fc) with the fused kernels
# (-sk 1) and again with the cuBLAS baseline (-sk 0). A tool's run fails on any error it reports.
#   bash dev/bench/sanitize.sh                      all four tools
#   TOOLS="memcheck racecheck" BIN=./train_gpt2cu bash dev/bench/sanitize.sh
#   TOOLS=racecheck CASE_NAMES="dense struct_sk0" bash dev/bench/sanitize.sh
# Prints "ok ..." / "FAIL ...: the first errors" per run and "N passed, N failed"; logs in $LOGDIR.
set -u
cd "$(dirname "$0")/../.." || exit 1
BIN=${BIN:-./train_gpt2cu}
TOOLS=${TOOLS:-"memcheck racecheck initcheck synccheck"}
SAN=${SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)}
LOGDIR=${LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/sanitize.XXXXXX")}  # kept (tests/lib.sh's own scratch is not)
mkdir -p "$LOGDIR" || exit 1
source tests/lib.sh  # ok, bad, summary
if [ -z "$SAN" ] || [ ! -x "$BIN" ]; then
    bad "sanitize" "needs compute-sanitizer (${SAN:-not found}) and the trainer ($BIN: $([ -x "$BIN" ] && echo found || echo 'not built: make train_gpt2cu'))"
    summary; exit
fi
# shellcheck source=dev/bench/common.sh disable=SC1091
source dev/bench/common.sh
ensure_tinyshakespeare > "$LOGDIR/data.log" 2>&1 || { bad "sanitize" "no tinyshakespeare data: $(tail -1 "$LOGDIR/data.log")"; summary; exit; }

VAL=data/tinyshakespeare/tiny_shakespeare_val.bin
RUN=(-i "$TRAIN" -j "$VAL" -b 2 -t 32 -x 2 -v 2 -m 1 -s 2 -g 4 -tk data/tinyshakespeare/gpt2_tokenizer.bin)
CASES=("dense:tests/configs/tiny_dense.conf:-sk 0" "struct_sk1:tests/configs/tiny_mixed.conf:-sk 1" "struct_sk0:tests/configs/tiny_mixed.conf:-sk 0")
if [ -n "${CASE_NAMES:-}" ]; then  # a subset, by name
    keep=()
    for c in "${CASES[@]}"; do for n in $CASE_NAMES; do [ "${c%%:*}" = "$n" ] && keep+=("$c"); done; done
    [ ${#keep[@]} -gt 0 ] || { bad "sanitize" "CASE_NAMES='$CASE_NAMES' names none of: dense struct_sk1 struct_sk0"; summary; exit; }
    CASES=("${keep[@]}")
fi
for tool in $TOOLS; do
    extra=()
    [ "$tool" = racecheck ] && extra=(--racecheck-report analysis)
    for c in "${CASES[@]}"; do
        name=${c%%:*}; rest=${c#*:}; cfg=${rest%%:*}; flags=${rest#*:}
        log="$LOGDIR/${tool}_$name.log"
        # shellcheck disable=SC2086
        "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99 --print-limit 20 "$BIN" -e "$cfg" "${RUN[@]}" $flags > "$log" 2>&1
        rc=$?
        # racecheck also reports hazards inside cuBLAS's own kernels (seen on an H200: its split-K
        # "nvjet" kernels, between their read and write of one tile); those are NVIDIA's, not ours:
        # counted and named, not failed, when every race reported is between two library kernels
        lib=
        if [ "$tool" = racecheck ] && [ $rc -eq 99 ]; then
            raced=$(grep -A1 'Race reported between' "$log" | grep -oE 'access at [^ +]+' | sed 's/access at //' | sort -u)
            [ -n "$raced" ] && ! echo "$raced" | grep -qvE '^(nvjet|cutlass|sm[0-9]+_xmma|cublas|gemm)' && lib=$(echo $raced)
        fi
        # the run went through: its steps, a validation and a sample
        ran=0
        grep -q '^step *2/2' "$log" && grep -q '^val loss' "$log" && grep -q '^generating:' "$log" && ran=1
        if [ $ran = 1 ] && [ -n "$lib" ]; then
            ok "$tool, $name ($flags): no errors in our kernels ($(grep -cE '^step ' "$log") steps, val, sample; races reported inside cuBLAS only: $lib)"
        # a clean run: exit 0 and the sanitizer's own summary of no errors (racecheck's may list
        # warnings: hazards it judges harmless)
        elif [ $ran = 1 ] && [ $rc -eq 0 ] && grep -qE 'ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: [0-9]+ hazards? displayed \(0 errors' "$log"; then
            ok "$tool, $name ($flags): no errors ($(grep -cE '^step ' "$log") steps, val, sample)"
        else
            bad "$tool, $name ($flags)" "exit $rc: $(grep -m5 -E '=+ +(Invalid|Error|Race|Uninitialized|Barrier|Warning)|SUMMARY|error' "$log" | tr -s ' =' ' ' | tr '\n' '|' | cut -c1-600)"
        fi
    done
done
summary
