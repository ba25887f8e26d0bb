// structured/btt_gpu.cuh: the BTT layer on the GPU, forward and backward: gpu_plan.h's plans
// (-sk 0; -sk 4 with z stored transposed) or btt_fused.cuh's kernel (-sk 1..3), as select.cuh says.
#pragma once
#include "../cuda/reduce.cuh"
#include "btt_fused.cuh"
#include "plan_gpu.cuh"
#include "select.cuh"

// -sk 4's reordered W0 (and dW0) in the scratch: |W0| rounded up to 16 bytes.
static inline size_t btt_zt_w0_pad(const BTTShape *s) { return st_pad8_elems(btt_w0_size(s)); }

// y (N, d_out) overwritten, z (N, zrow) saved; scratch: btt_gpu_scratch_elems(s, N) elements.
// With pre_gelu (the fc layer): pre_gelu = the layer's output + bias, y = its GELU. The plans add
// the bias (and the GELU) in their last GEMM's cuBLASLt epilogue: no extra pass over y.
// y_ld (0: d_out): y's row stride, for a column block of wider rows (q, k, v in qkv; the plans
// only, and then pre_gelu, if any, has that stride too).
static void btt_forward_gpu(floatX *y, floatX *z, const floatX *x, const floatX *W0, const floatX *W1, const floatX *bias, int N,
                            const BTTShape *s, floatX *scratch, floatX *pre_gelu = NULL, int y_ld = 0) {
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Y] = y; buf[PB_Z] = z; buf[PB_W0] = (floatX *)W0; buf[PB_W1] = (floatX *)W1; buf[PB_T1] = scratch;
    buf[PB_BIAS] = (floatX *)bias; buf[PB_PRE] = pre_gelu;
    Plan p = {};
    if (g_st_zt) {  // -sk 4: z stored transposed, no permute of it (W0 reordered into the scratch at rank > 1)
        buf[PB_W0R] = scratch;
        if (!z) buf[PB_Z] = scratch + btt_zt_w0_pad(s);
        plan_btt_forward_zt(&p, s, N);
        g_st_zt_runs++;
    } else if (g_st_fused == 3) {  // split: the fused kernel's stage 1 writes z (into scratch when not saved), cuBLAS y from it
        floatX *zz = z ? z : scratch;
        st_step("fused stage 1 (z)");
        if (btt_stage1_fused(zz, x, 0, W0, N, s)) {
            g_st_split_runs++;
            buf[PB_Z] = zz;
            plan_btt_forward_from_z(&p, s, N, 0);
        }
    } else if (g_st_fused && !y_ld) {
        st_step(g_btt_mma ? "fused kernel on mma.sync (W1 packed first)" : "fused kernel");
        if (btt_forward_fused(pre_gelu ? pre_gelu : y, z, x, W0, W1, bias, N, s)) {
            if (pre_gelu) {
                st_step("GELU");
                gelu_forward(y, pre_gelu, (size_t)N * s->d_out);
            }
            return;
        }
    }
    if (!p.n) plan_btt_forward(&p, s, N, 0);
    if (y_ld) plan_set_ld(&p, PB_Y, y_ld);
    const int epi = st_epi(bias, pre_gelu);
    if (epi && !plan_set_epilogue(&p, PB_Y, epi)) fatal("internal: the BTT forward plan took no epilogue");
    plan_run_gpu(&p, buf);
}

// The transposed BTT's cores (btt.h's btt_transposed_cores) for `copies` consecutive BTTs of
// shape s (BTT-MoE's experts): W0t gets copies·|W1| elements, W1t copies·|W0| (NULL: not needed,
// as by the first stage alone).
static void btt_transposed_cores_gpu(floatX *W0t, floatX *W1t, const floatX *W0, const floatX *W1, const BTTShape *s, int copies) {
    block_transpose_gpu(W0t, W1, btt_w1_size(s) * copies, s->gamma * s->rank, s->eps);
    if (W1t) block_transpose_gpu(W1t, W0, btt_w0_size(s) * copies, s->alpha, s->phi * s->rank);
}

// Scratch elements btt_backward_gpu needs for N rows: the baseline's T1 and T2, the fused
// backward's T1 and transposed cores, or -sk 4's T1 and reordered W0 and dW0, whichever is more
// (the forward needs less: -sk 4's reordered W0, or the split's z when not saved).
static inline size_t btt_gpu_scratch_elems(const BTTShape *s, int N) {
    const size_t plan = (size_t)N * plan_btt_scratch_row(s), fused = (size_t)N * btt_z_row(s) + btt_w0_size(s) + btt_w1_size(s);
    const size_t zt = st_pad8_elems((size_t)N * btt_z_row(s)) + 2 * btt_zt_w0_pad(s);
    const size_t most = plan > fused ? plan : fused;
    return most > zt ? most : zt;
}

// dx overwritten (may be NULL); dW0, dW1, dbias accumulated; scratch: btt_gpu_scratch_elems.
// With g_st_fused and dx, dx and dZ come from ONE fused launch over dy (the transposed BTT, btt.h)
// instead of GEMM, permute, GEMM; the weight gradients stay cuBLAS GEMMs (they reduce over rows).
// With pre_gelu (the pre-activation whose GELU was x), dx is the gradient before that GELU (the
// plans: the dx GEMM's DGELU epilogue). dy_ld (0: d_out): dy's row stride; dx_acc: dx += instead
// of = (the plans only; not with pre_gelu). With g_st_fused 3 (split), T1 comes from the fused
// kernel's stage 1 on dy (W0 staged), dx and the weight gradients from cuBLAS (dy_ld, the epilogue
// and dx_acc as the plans). Returns 1 when it ran the whole fused kernel (not split).
static int btt_backward_gpu(floatX *dx, floatX *dW0, floatX *dW1, floatX *dbias, const floatX *dy, const floatX *x, const floatX *z,
                             const floatX *W0, const floatX *W1, int N, const BTTShape *s, floatX *scratch, float *colsum_scratch,
                             const floatX *pre_gelu = NULL, int dy_ld = 0, int dx_acc = 0) {
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Z] = (floatX *)z; buf[PB_W0] = (floatX *)W0; buf[PB_W1] = (floatX *)W1; buf[PB_DY] = (floatX *)dy;
    buf[PB_DX] = dx; buf[PB_DW0] = dW0; buf[PB_DW1] = dW1;
    buf[PB_T1] = scratch; buf[PB_T2] = scratch + (size_t)N * btt_z_row(s);
    Plan p = {};
    const BTTShape ts = btt_shape_transposed(s);
    int fused = 0, split = 0;
    // split: the fused kernel's stage 1 on dy writes T1 = dZ (the transposed BTT's saved z), then
    // cuBLAS dx and the weight gradients from it; fused: the whole kernel writes dx and T1
    const int try_split = g_st_fused == 3, try_fused = g_st_fused && !try_split && dx && !dy_ld && !dx_acc;
    if ((try_split || try_fused) && btt_fused_supported(&ts, btt_fused_smem_limit())) {
        floatX *W0t = buf[PB_T2], *W1t = W0t + btt_w1_size(s);
        st_step("transposed cores");
        btt_transposed_cores_gpu(W0t, try_split ? NULL : W1t, W0, W1, s, 1);
        st_step(try_split ? "fused stage 1 on dy (dZ)" : g_btt_mma ? "fused kernel on mma.sync (dx, dZ; W1 packed first)" : "fused kernel (dx, dZ)");
        if (try_split) {
            split = btt_stage1_fused(buf[PB_T1], dy, dy_ld, W0t, N, &ts);
            g_st_split_runs += split;
        } else {
            fused = btt_forward_fused(dx, buf[PB_T1], dy, W0t, W1t, NULL, N, &ts);
        }
    }
    if (fused) {
        plan_btt_backward_weights(&p, s, N, 0, 1);
        if (pre_gelu) {
            st_step("GELU'");
            gelu_backward_inplace(dx, pre_gelu, (size_t)N * s->d_in);
        }
    } else {
        if (split) {
            plan_btt_backward_from_t1(&p, s, N, 0, dx != NULL, 1);
        } else {  // -sk 4 (z stored transposed): T1 = dZ so, then W0's and dW0's reordered copies
            if (g_st_zt) {
                buf[PB_W0R] = scratch + st_pad8_elems((size_t)N * btt_z_row(s));
                buf[PB_DW0R] = buf[PB_W0R] + btt_zt_w0_pad(s);
            }
            plan_btt_layer(NULL, &p, s, N, g_st_zt, dx != NULL);
            g_st_zt_runs += g_st_zt;
        }
        plan_backward_settings(&p, buf, dx, pre_gelu, dy_ld, dx_acc, "BTT");
    }
    plan_run_gpu(&p, buf);
    st_bias_backward_gpu(dbias, dy, N, s->d_out, colsum_scratch, dy_ld);
    return fused;
}
