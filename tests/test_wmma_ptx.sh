#!/usr/bin/env bash
# test_wmma_ptx.sh: structured/btt_fused.cuh loads wmma fragments with inline PTX (wmma.load with
# the .shared or .global state space, so that the A load becomes one ldmatrix). The CPU simulator
# builds it with wmma::load_matrix_sync instead (BT_WMMA_GENERIC), so only the PTX can show that
# the inline loads fill the fragment's registers as load_matrix_sync does. For sm_80 and sm_90,
# tests/wmma_ptx.cu is compiled to PTX and, for the A and B loads, the wmma instructions of the
# load_matrix_sync kernel and of ours must be the same once the state space, the address and ldm
# operands and the register names (renamed in order of first appearance) are normalised: the same
# load, filling registers the mma then reads in the same positions. Without nvcc: skipped.
cd "$(dirname "$0")/.."
source tests/lib.sh
NVCC=$(command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
if [ -z "$NVCC" ]; then
    echo "# nvcc not found: the inline-PTX wmma loads are not checked"
    summary; exit
fi

# the wmma lines of one kernel's PTX body, normalised
wmma_of() {  # ptx-file kernel-name
    awk -v k="$2" '$0 ~ "^.(visible )?.entry " k {on = 1} on && /wmma\./ {print} on && /^}/ {on = 0}' "$1" |
        sed -E 's/\.(shared|global)\././; s/\[[^]]*\]/[ADDR]/; s/\[ADDR\], *%r[0-9]+;/[ADDR], LDM;/; s/[[:space:]]+/ /g' |
        awk '{ out = ""; s = $0
               while (match(s, /%[a-z]+[0-9]+/)) { r = substr(s, RSTART, RLENGTH)
                   if (!(r in id)) id[r] = "R" (n++)
                   out = out substr(s, 1, RSTART - 1) id[r]; s = substr(s, RSTART + RLENGTH) }
               print out s }'
}

for arch in 80 90; do
    ptx="$W/wmma_sm$arch.ptx"
    if ! "$NVCC" -std=c++17 -arch=sm_$arch -I. -ptx tests/wmma_ptx.cu -o "$ptx" > "$W/nvcc.log" 2>&1; then
        bad "sm_$arch: nvcc -ptx tests/wmma_ptx.cu" "$(head -3 "$W/nvcc.log")"
        continue
    fi
    for op in a b; do
        ours=$(wmma_of "$ptx" "_Z6ours_${op}P")
        gen=$(wmma_of "$ptx" "_Z9generic_${op}P")
        space=$([ $op = a ] && echo shared || echo global)
        if [ -z "$ours" ] || [ "$(echo "$ours" | grep -c 'wmma.load')" -ne 1 ] || [ "$(echo "$ours" | grep -c 'wmma.mma')" -ne 1 ]; then
            bad "sm_$arch: the $op load's kernel" "expected one wmma.load and one wmma.mma, got: $(echo "$ours" | head -3)"
        elif ! grep -q "wmma.load.$op.sync.aligned.row.m16n16k16.$space.bf16" "$ptx"; then
            bad "sm_$arch: the $op load" "no wmma.load.$op with .$space in the PTX"
        elif [ "$ours" = "$gen" ]; then
            ok "sm_$arch: bt_load_${op}_$( [ $op = a ] && echo shared || echo global) fills the fragment as wmma::load_matrix_sync does ($(echo "$ours" | grep -c .) wmma instructions alike)"
        else
            bad "sm_$arch: bt_load_${op} vs wmma::load_matrix_sync" "ours: $(echo "$ours" | tr '\n' '|') generic: $(echo "$gen" | tr '\n' '|')"
        fi
    done
done
summary
