#!/usr/bin/env bash
# test_ptxas.sh: what ptxas reports about the GPU trainer's kernels, for sm_80, sm_90 and sm_100:
# no kernel may spill registers to local memory or keep a stack frame. A spill is invisible to the
# CPU simulator and to every correctness test, and costs speed on the GPU (before this check, the
# flash-attention dK/dV kernel at head size 128 kept 9 KB per thread in local memory on sm_80).
# Prints each architecture's register counts of the kernels that matter most for speed.
# Without nvcc: skipped.
cd "$(dirname "$0")/.."
source tests/lib.sh
need_nvcc "register spills are not checked"

# kernels that must be among those reported (a parse that finds too few fails rather than passes)
must=(adamw_chunks_kernel layernorm_forward_kernel fused_classifier_kernel "flash_fwd_kernel<64>" "flash_bwd_dkdv_kernel<64>"
      "flash_bwd_dq_kernel<128>" "btt_fused_kernel<4, 3, 0, 0>" "btt_fused_kernel<4, 3, 1, 0>" "btt_fused_kernel<4, 3, 1, 1>" "btt_fused_kernel<4, 1, 2, 1>" "monarch_fused_bwd_kernel<4>" seg_wgrad_kernel moe_route_kernel moe_group_count_kernel moe_group_scatter_kernel moe_group_scan_kernel moe_gate_backward_t_kernel moe_dx_kernel)
archs=(80 90 100)
# ptxas's report of the device code alone (-cubin: no host compilation, a third faster), the
# architectures two at a time (CI's machine has 2 cores)
compile() {  # $1 = arch: the log, and rc_<arch> with nvcc's exit status
    local arch=$1 flags
    # the Makefile's flags for this architecture, so that ptxas sees the code the build makes
    flags=$(make -s print-nvcc-flags GPU_COMPUTE_CAPABILITY=$arch 2> /dev/null | sed -n 's/^NVCC_FLAGS //p')
    if [ -z "$flags" ]; then echo "make print-nvcc-flags printed none" > "$W/ptxas_sm$arch.log"; echo 1 > "$W/rc_$arch"; return; fi
    # shellcheck disable=SC2086
    # (BT_MMA_STAGE1_CANDIDATE: with the fused BTT kernel's stage 1 alone on mma.sync, dev/cuda's
    # only, which the trainer's build leaves out; every other kernel is the build's)
    "$NVCC" $flags -DBT_MMA_STAGE1_CANDIDATE -Xptxas -v -cubin train_gpt2.cu -o "$W/t$arch.cubin" > "$W/ptxas_sm$arch.log" 2>&1
    echo $? > "$W/rc_$arch"
}
compile "${archs[0]}" & compile "${archs[1]}" & wait
compile "${archs[2]}"
for arch in "${archs[@]}"; do
    log="$W/ptxas_sm$arch.log"
    if [ "$(cat "$W/rc_$arch" 2>/dev/null)" != 0 ]; then
        bad "sm_$arch: nvcc -cubin train_gpt2.cu" "$(grep -m3 -i 'error\|printed none' "$log")"
        continue
    fi
    # one line per kernel: registers, stack frame bytes, spill store bytes, spill load bytes, name
    awk '/Function properties for/ {n = $NF}
         /bytes stack frame/ {s = $1 " " $5 " " $9}
         /Used [0-9]+ registers/ && n != "" {print $5, s, n; n = ""}' "$log" |
        c++filt | sed -E 's/^([0-9]+ [0-9]+ [0-9]+ [0-9]+ )(void )?([^(]*)\(.*/\1\3/' > "$W/res$arch"
    nk=$(grep -c . "$W/res$arch")
    missing=""
    for k in "${must[@]}"; do grep -qF " $k" "$W/res$arch" || missing="$missing $k"; done
    if [ "$nk" -lt 50 ] || [ -n "$missing" ]; then
        bad "sm_$arch: ptxas's report" "$nk kernels parsed; missing:${missing:- none}"
        continue
    fi
    spills=$(awk '$2 > 0 || $3 > 0 || $4 > 0 {printf "%s (%s registers, stack %s, spill stores %s, loads %s bytes); ", substr($0, index($0, $5)), $1, $2, $3, $4}' "$W/res$arch")
    [ -z "$spills" ] && ok "sm_$arch: none of the $nk kernels (the trainer's, and the BTT kernel's stage 1 alone on mma.sync, dev/cuda's) spills registers or uses a stack frame" \
                     || bad "sm_$arch: register spills" "$spills"
    regs() { awk -v k="$1" 'substr($0, index($0, $5)) == k {print $1}' "$W/res$arch"; }
    echo "# sm_$arch registers: flash hs 64 fwd $(regs "flash_fwd_kernel<64>"), dK/dV $(regs "flash_bwd_dkdv_kernel<64>"), dQ $(regs "flash_bwd_dq_kernel<64>");" \
         "hs 128 dK/dV $(regs "flash_bwd_dkdv_kernel<128>"); BTT fused <1,1> $(regs "btt_fused_kernel<1, 1, 0, 0>"), <4,3> $(regs "btt_fused_kernel<4, 3, 0, 0>"), W0 staged <1,3> $(regs "btt_fused_kernel<1, 3, 1, 0>"), <4,3> $(regs "btt_fused_kernel<4, 3, 1, 0>"), on mma.sync <4,3> $(regs "btt_fused_kernel<4, 3, 1, 1>");" \
         "Monarch fwd <4> $(regs "monarch_fused_kernel<4>"); layernorm fwd $(regs layernorm_forward_kernel); classifier $(regs fused_classifier_kernel)"
done
summary
