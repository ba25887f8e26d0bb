// structured/monarch_gpu.cuh: the Monarch layer on the GPU, forward and backward: gpu_plan.h's
// plans (-sk 0; -sk 4 with u stored transposed) or monarch_fused.cuh's kernels (-sk 1..3, where
// their traffic model says they pay), as select.cuh says.
#pragma once
#include "../cuda/reduce.cuh"
#include "monarch_fused.cuh"
#include "plan_gpu.cuh"
#include "select.cuh"

// Scratch elements Monarch's forward and backward need for N rows: the plans' T1..T3, the fused
// forward's transposed cores, or the fused backward's aligned copies of the cores, dyt and du,
// whichever is more.
static inline size_t monarch_gpu_scratch_elems(const MonarchShape *m, int N) {
    const size_t cores = monarch_r_size(m) + monarch_l_size(m);
    const size_t plan = (size_t)N * plan_monarch_scratch_row(m), fused_bwd = cores + (size_t)N * (m->d_out + monarch_u_row(m));
    const size_t most = plan > cores ? plan : cores;
    return most > fused_bwd ? most : fused_bwd;
}

// y overwritten, u (N, nb·q) saved; scratch: monarch_gpu_scratch_elems. With g_st_fused, one
// launch of monarch_fused.cuh's kernel (u on chip) where it supports the shape and pays (its
// traffic model: MF_MAX_L2_PER_DRAM); it saves the same u as the baseline, so either backward can
// follow either forward. Returns 1 when it ran fused.
// With pre_gelu: pre_gelu = the layer's output + bias, y = its GELU; the plans apply both in
// their last op, the output permute.
// y_ld: y's row stride (0: d_out; as btt_forward_gpu's).
static int monarch_forward_gpu(floatX *y, floatX *u, const floatX *x, const floatX *R, const floatX *L, const floatX *bias, int N,
                               const MonarchShape *m, floatX *scratch, floatX *pre_gelu = NULL, int y_ld = 0) {
    if (g_st_fused && !y_ld && monarch_fused_fwd_pays(m, btt_fused_smem_limit())) {
        floatX *Rt = scratch, *Lt = scratch + monarch_r_size(m);
        st_step("transposed cores");
        block_transpose_gpu(Rt, R, monarch_r_size(m), m->q, m->p);  // Rt[k] = R[k]ᵀ (p x q)
        block_transpose_gpu(Lt, L, monarch_l_size(m), m->s, m->q);  // Lt[l] = L[l]ᵀ (q x s)
        st_step("fused kernel");
        if (monarch_forward_fused(pre_gelu ? pre_gelu : y, u, x, Rt, Lt, bias, N, m, btt_fused_smem_limit())) {
            if (pre_gelu) {
                st_step("GELU");
                gelu_forward(y, pre_gelu, (size_t)N * m->d_out);
            }
            return 1;
        }
    }
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Y] = y; buf[PB_Z] = u; buf[PB_W0] = (floatX *)R; buf[PB_W1] = (floatX *)L;
    buf[PB_T1] = scratch; buf[PB_T2] = scratch + (size_t)N * monarch_u_row(m);
    buf[PB_BIAS] = (floatX *)bias; buf[PB_PRE] = pre_gelu;
    Plan p = {};
    plan_monarch_layer(&p, NULL, m, N, g_st_zt, 0);  // -sk 4: u stored transposed, no permute of it
    g_st_zt_runs += g_st_zt;
    if (y_ld) plan_set_ld(&p, PB_Y, y_ld);
    const int epi = st_epi(bias, pre_gelu);
    if (epi && !plan_set_epilogue(&p, PB_Y, epi)) fatal("internal: the Monarch forward plan took no epilogue");
    plan_run_gpu(&p, buf);
    return 0;
}

// dx overwritten (may be NULL); dR, dL, dbias accumulated; scratch: monarch_gpu_scratch_elems.
// With g_st_fused, dx, du and dyt come from ONE launch of monarch_fused.cuh's backward kernel
// instead of permute, GEMM, permute, GEMM, where it supports the shape and pays (as the forward);
// the weight gradients stay cuBLAS GEMMs. With pre_gelu, dx is the gradient before the GELU of
// pre_gelu (the plans: the dx GEMM's DGELU epilogue). dy_ld, dx_acc: as btt_backward_gpu's.
// Returns 1 when it ran fused.
static int monarch_backward_gpu(floatX *dx, floatX *dR, floatX *dL, floatX *dbias, const floatX *dy, const floatX *x, const floatX *u,
                                const floatX *R, const floatX *L, int N, const MonarchShape *m, floatX *scratch, float *colsum_scratch,
                                const floatX *pre_gelu = NULL, int dy_ld = 0, int dx_acc = 0) {
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Z] = (floatX *)u; buf[PB_W0] = (floatX *)R; buf[PB_W1] = (floatX *)L; buf[PB_DY] = (floatX *)dy;
    buf[PB_DX] = dx; buf[PB_DW0] = dR; buf[PB_DW1] = dL;
    const size_t urow = monarch_u_row(m), nr = monarch_r_size(m), nl = monarch_l_size(m);
    Plan p = {};
    int fused = 0;
    MbGeom g;
    if (g_st_fused && !dy_ld && !dx_acc && monarch_fused_bwd_choose(&g, m, btt_fused_smem_limit()) && monarch_fused_bwd_pays(&g, m)) {
        // the kernel reads the cores with wmma, which wants 32-byte aligned rows: parameters in the
        // flat buffer need not be, so those are copied (|R| + |L| elements, small next to dy)
        floatX *Rc = scratch, *Lc = Rc + nr, *dyt = Lc + nl, *du = dyt + (size_t)N * m->d_out;
        const floatX *Ra = R, *La = L;
        st_step("fused kernel (dx, du, dyt)");
        if ((uintptr_t)R % 32) { cudaCheck(cudaMemcpyAsync(Rc, R, nr * sizeof(floatX), cudaMemcpyDeviceToDevice)); Ra = Rc; }
        if ((uintptr_t)L % 32) { cudaCheck(cudaMemcpyAsync(Lc, L, nl * sizeof(floatX), cudaMemcpyDeviceToDevice)); La = Lc; }
        fused = monarch_backward_fused(dx, du, dyt, dy, Ra, La, N, m, btt_fused_smem_limit());
        buf[PB_T2] = dyt; buf[PB_T3] = du;
    }
    if (fused) {
        plan_monarch_backward_weights(&p, m, N);
        if (dx && pre_gelu) {
            st_step("GELU'");
            gelu_backward_inplace(dx, pre_gelu, (size_t)N * m->d_in);
        }
    } else {
        buf[PB_T1] = scratch; buf[PB_T2] = scratch + (size_t)N * urow; buf[PB_T3] = buf[PB_T2] + (size_t)N * m->d_out;
        plan_monarch_layer(NULL, &p, m, N, g_st_zt, dx != NULL);
        g_st_zt_runs += g_st_zt;
        plan_backward_settings(&p, buf, dx, pre_gelu, dy_ld, dx_acc, "Monarch");
    }
    plan_run_gpu(&p, buf);
    st_bias_backward_gpu(dbias, dy, N, m->d_out, colsum_scratch, dy_ld);
    return fused;
}
