#!/usr/bin/env bash
# test_fused_ptx.sh: what only nvcc's PTX can show about the fused kernels (structured/btt_fused.cuh,
# monarch_fused.cuh, cuda/flash_attention.cuh), for sm_80, sm_90 and sm_100 (tests/fused_ptx.cu):
#  1. the fused kernels load wmma fragments with cuda/mma.cuh's inline PTX (wmma.load with the .shared or .global
#     state space, so that the A load, and the B load from the staged W0, become one ldmatrix). The CPU simulator builds it with
#     wmma::load_matrix_sync instead (BT_WMMA_GENERIC), so only the PTX can show that the inline
#     loads fill the fragment's registers as load_matrix_sync does: for the A and B loads, the
#     wmma instructions of a load_matrix_sync kernel and of ours must be the same once the state
#     space, the address and ldm operands and the register names (renamed in order of first
#     appearance) are normalised: the same load, filling registers the mma then reads in the same
#     positions.
#  2. Every bf16 global store of every instantiation of the fused kernels (BTT, Monarch, and the
#     flash attention of cuda/flash_attention.cuh) is one 16-byte store (st.global[.wb].v4): nvcc
#     splits some 16-byte copies of bf16 values into 2- or 4-byte stores (cuda/common.cuh, ld16/st16
#     and pack_bf16x2), which the simulator cannot see either.
# Without nvcc: skipped.
cd "$(dirname "$0")/.."
source tests/lib.sh
need_nvcc "the fused kernels' PTX is not checked"

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

# the three architectures' PTX compiled at once (one front-end pass each, single-threaded)
for arch in 80 90 100; do
    ( "$NVCC" -std=c++17 -arch=sm_$arch -I. -ptx tests/fused_ptx.cu -o "$W/fused_sm$arch.ptx" > "$W/nvcc_$arch.log" 2>&1
      echo $? > "$W/nvcc_$arch.rc" ) &
done
wait
for arch in 80 90 100; do
    ptx="$W/fused_sm$arch.ptx"
    if [ "$(cat "$W/nvcc_$arch.rc")" != 0 ]; then
        bad "sm_$arch: nvcc -ptx tests/fused_ptx.cu" "$(head -3 "$W/nvcc_$arch.log")"
        continue
    fi
    # bs: the B load from shared memory (the W0-staged kernel); bc: column-major B from shared memory
    # (flash attention); ac: column-major A from shared memory (seg_wgrad); st: an fp32 accumulator
    # stored into shared memory (flash attention)
    for op in a b bs bc ac st; do
        ours=$(wmma_of "$ptx" "_Z$((5 + ${#op}))ours_${op}P")  # mangled: the name's length, the name, its first parameter
        gen=$(wmma_of "$ptx" "_Z$((8 + ${#op}))generic_${op}P")
        case $op in
            a) what=wmma_load_a_shared; insn=wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 ;;
            b) what=wmma_load_b_global; insn=wmma.load.b.sync.aligned.row.m16n16k16.global.bf16 ;;
            bs) what=wmma_load_b_shared; insn=wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 ;;
            bc) what=wmma_load_b_col_shared; insn=wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 ;;
            ac) what=wmma_load_a_col_shared; insn=wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16 ;;
            st) what=wmma_store_shared; insn=wmma.store.d.sync.aligned.row.m16n16k16.shared.f32 ;;
        esac
        want_loads=$([ $op = st ] && echo 2 || echo 1)
        if [ -z "$ours" ] || [ "$(echo "$ours" | grep -c 'wmma.load')" -ne "$want_loads" ] || [ "$(echo "$ours" | grep -c 'wmma.mma')" -ne 1 ]; then
            bad "sm_$arch: $what's test kernel" "expected $want_loads wmma.load and one wmma.mma, got: $(echo "$ours" | head -3)"
        elif ! grep -q "$insn" "$ptx"; then
            bad "sm_$arch: $what" "no $insn in the PTX"
        elif [ "$ours" = "$gen" ]; then
            ok "sm_$arch: $what uses the fragment's registers as wmma::$([ $op = st ] && echo store || echo load)_matrix_sync does ($(echo "$ours" | grep -c .) wmma instructions alike)"
        else
            bad "sm_$arch: $what vs wmma's own" "ours: $(echo "$ours" | tr '\n' '|') generic: $(echo "$gen" | tr '\n' '|')"
        fi
    done
    # the fused kernels' wmma loads and stores all name their state space (a generic load is 32-bit
    # LD.E loads in SASS, not ldmatrix)
    generic=$(awk '/\.entry/ {name = $3} /wmma\.(load|store)/ && name ~ /(btt_fused|monarch_fused|monarch_fused_bwd|flash_fwd|flash_bwd_dq|flash_bwd_dkdv|seg_wgrad)_kernel/ && $1 !~ /\.(shared|global)\./ {print name}' "$ptx" | sort -u)
    nload=$(awk '/\.entry/ {name = $3} /wmma\.load/ && name ~ /monarch_fused(_bwd)?_kernel/ {n++} END {print n + 0}' "$ptx")
    if [ -z "$generic" ] && [ "$nload" -gt 0 ]; then
        ok "sm_$arch: every wmma load and store of the BTT, Monarch, seg_wgrad and flash-attention kernels names its state space (Monarch: $nload loads)"
    else
        bad "sm_$arch: generic wmma loads in the structured kernels" "$(echo "$generic" | tr '\n' ' ') (Monarch loads: $nload)"
    fi
    # mma.sync (the BTT kernel's MMA instantiations, 9 + 3): each has its ldmatrix loads (plain and
    # transposed) and m16n8k16 mma, and the wmma ones have none of them
    mma_k=$(awk '/\.entry/ {name = $3} /mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32/ {print name}' "$ptx" | sort -u)
    ldsm_k=$(awk '/\.entry/ {name = $3} /ldmatrix\.sync\.aligned\.m8n8\.x4\.trans\.shared\.b16/ {print name}' "$ptx" | sort -u)
    n_mma=$(echo "$mma_k" | grep -c '^_Z16btt_fused_kernelILi[0-9]ELi[0-9]ELi[12]ELi1EEv')
    if [ "$n_mma" -eq 12 ] && [ "$(echo "$mma_k" | grep -c .)" -eq 12 ] && [ "$mma_k" = "$ldsm_k" ]; then
        ok "sm_$arch: the 12 BTT instantiations on mma.sync, and only they, issue mma.m16n8k16 and ldmatrix.x4.trans"
    else
        bad "sm_$arch: mma.sync in the BTT kernel" "kernels with mma.m16n8k16: $(echo "$mma_k" | tr '\n' ' '); with ldmatrix.trans: $(echo "$ldsm_k" | tr '\n' ' ')"
    fi
    # ... and no wmma instruction at all: both stages write their accumulators from registers (no
    # fp32 staging tile), stage 2 reading W1 packed in fragment order (btt_tiles.h bt_w1p_src)
    mma_wmma=$(awk '/\.entry/ {name = $3} /wmma\./ && name ~ /^_Z16btt_fused_kernelILi[0-9]ELi[0-9]ELi[12]ELi1EEv/ {n++} END {print n + 0}' "$ptx")
    if [ "$n_mma" -eq 12 ] && [ "$mma_wmma" -eq 0 ]; then
        ok "sm_$arch: the 12 mma.sync instantiations issue no wmma instruction (no staging tile in either stage)"
    else
        bad "sm_$arch: wmma in the mma.sync instantiations" "$mma_wmma wmma instructions in the $n_mma of them"
    fi
    # every bf16 global store in the fused kernels: 16 bytes (fp32 statistics, flash's lse, aside)
    kre='(btt_fused|monarch_fused|monarch_fused_bwd|flash_fwd|flash_bwd_dq|flash_bwd_dkdv)_kernel'
    stores=$(awk -v kre="$kre" '/\.entry/ {name = $3} /^[ \t]*st\.global/ && name ~ kre {print $1}' "$ptx" | grep -v '^st\.global\.f32$')
    kernels=$(grep -cE "\.entry _Z[0-9]+$kre" "$ptx")
    narrow=$(echo "$stores" | grep -vE '^st\.global(\.wb)?\.v4\.(u32|b32)$' | sort | uniq -c | tr -s ' \n' ' ')
    if [ "$kernels" -ne 51 ] || [ -z "$stores" ]; then
        bad "sm_$arch: the fused kernels' global stores" "found $kernels kernel instantiations (expected 51: BTT 9 x 3 + 3 x 2, Monarch 3 + 3, flash 4 x 3) and $(echo "$stores" | grep -c .) stores"
    elif [ -z "$narrow" ]; then
        ok "sm_$arch: all $(echo "$stores" | grep -c .) bf16 global stores of the $kernels fused kernel instantiations (BTT, Monarch, flash attention) are 16-byte (st.global.v4)"
    else
        bad "sm_$arch: the fused kernels' global stores" "narrower than 16 bytes: $narrow"
    fi
done
summary
