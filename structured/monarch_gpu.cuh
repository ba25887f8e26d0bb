// structured/monarch_gpu.cuh: the Monarch layer on the GPU, forward and backward: gpu_plan.h's
// plans (-sk 0; -sk 4 with u stored transposed), monarch_fused.cuh's kernels (-sk 1), or, where
// nb divides q, btt_fused.cuh's BTT kernels on the BTT that the Monarch is (monarch.h; -sk 2, 3
// and 5 as for a BTT layer; elsewhere they run -sk 1's), each where its traffic model says it
// pays, as select.cuh says.
#pragma once
#include "../cuda/reduce.cuh"
#include "monarch_fused.cuh"
#include "plan_gpu.cuh"
#include "select.cuh"

// Monarch forwards and backwards that ran on the BTT kernels (the tests check that -sk 2, 3 and 5 did)
static long g_monarch_btt_runs = 0;

// Whether the BTT kernels run this Monarch layer (forward, or the backward's transposed BTT): with
// -sk 2, 3 or 5 where nb divides q (monarch_btt_shape; the BTT into b), the kernel of that -sk
// takes the shape, and its modelled L2 bytes per row stay within MF_MAX_L2_PER_DRAM of the plans'
// DRAM bytes, the bound the Monarch kernels keep: every tile of rows reads the cores, about
// d_in·d_out/nb elements, once more (2048 -> 8192 in 4 blocks: 5.2M).
static inline int monarch_btt_pays(BTTShape *b, const MonarchShape *m, int backward) {
    BTTShape s;
    BtGeom g;
    if (!g_st_fused || !g_btt_wstage || !monarch_btt_shape(&s, m)) return 0;
    *b = backward ? btt_shape_transposed(&s) : s;
    if (!btt_fused_geom_ws(&g, b, btt_fused_smem_limit(), 0, 1, g_st_fused == 3)) return 0;
    return g_monarch_fused_force || bt_l2_bytes_per_row(&g) <= MF_MAX_L2_PER_DRAM * monarch_baseline_bytes_per_row(m, backward);
}

// Whether -sk 2 runs this Monarch layer on the BTT kernels both ways (-at 1 then times -sk 2, 3
// and 5 apart from -sk 1), whatever the flags now.
static inline int monarch_btt_candidate(const MonarchShape *m) {
    const int sk = g_st_sk, fused = g_st_fused, zt = g_st_zt, ws = g_btt_wstage, mma = g_btt_mma;  // (as they are, set by hand or not)
    BTTShape b;
    st_set_kernels(2);
    const int ok = monarch_btt_pays(&b, m, 0) && monarch_btt_pays(&b, m, 1);
    g_st_sk = sk; g_st_fused = fused; g_st_zt = zt; g_btt_wstage = ws; g_btt_mma = mma;
    return ok;
}

// Cores the kernels read with wmma want 32-byte aligned rows, which parameters in the flat buffer
// need not have: p itself where it is so aligned, else its n elements copied into room.
static const floatX *monarch_core_aligned(floatX *room, const floatX *p, size_t n) {
    if ((uintptr_t)p % 32 == 0) return p;
    cudaCheck(cudaMemcpyAsync(room, p, n * sizeof(floatX), cudaMemcpyDeviceToDevice));
    return room;
}

// The BTT's W0 from R (w1t 0), or the transposed BTT's W1t, R's rows reordered (w1t 1): monarch.h.
__global__ void monarch_btt_core_kernel(floatX *dst, const floatX *R, size_t n, int nb, int q, int p, int w1t) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = R[monarch_btt_core_src(i, nb, q, p, w1t)];
}
static void monarch_btt_core_gpu(floatX *dst, const floatX *R, const MonarchShape *m, int w1t) {
    const size_t n = monarch_r_size(m);
    monarch_btt_core_kernel<<<ceil_div_i((long)n, 256), 256>>>(dst, R, n, m->nb, m->q, m->p, w1t);
    cudaCheckLaunch();
}

// The forward on the BTT kernels (monarch_btt_pays): the BTT's cores into the scratch (W0: R's
// columns reordered; W1[f] = L[f]ᵀ), then the kernel writes u (the BTT's saved z is the Monarch's
// saved u) and yt (its y), and the plans' last op permutes yt into y with the bias and GELU
// epilogue; -sk 3: the kernel's stage 1 writes u, the plans' second GEMM and that permute the
// rest. 0 (nothing run but the cores' copy) when the kernel does not run.
static int monarch_forward_btt(floatX *y, floatX *u, const floatX *x, const floatX *R, const floatX *L, const floatX *bias, int N,
                               const MonarchShape *m, floatX *scratch, floatX *pre_gelu, int y_ld) {
    BTTShape b;
    if (!u || !monarch_btt_pays(&b, m, 0)) return 0;
    floatX *W0 = scratch, *W1 = W0 + monarch_r_size(m), *yt = W1 + monarch_l_size(m);
    Plan p = {};
    st_step("cores as a BTT's");
    monarch_btt_core_gpu(W0, R, m, 0);
    if (g_st_fused == 3) {
        st_step("BTT kernel's stage 1 (u)");
        if (!btt_stage1_fused(u, x, 0, W0, N, &b)) return 0;
        plan_monarch_forward_from_u(&p, m, N);
    } else {
        block_transpose_gpu(W1, L, monarch_l_size(m), m->s, m->q);
        st_step(g_btt_mma ? "BTT kernel on mma.sync (u, yt; W1 packed first)" : "BTT kernel (u, yt)");
        if (!btt_forward_fused(yt, u, x, W0, W1, NULL, N, &b)) return 0;
        plan_monarch_forward_from_yt(&p, m, N);
    }
    g_monarch_btt_runs++;
    floatX *buf[PB_COUNT] = {0};
    buf[PB_Y] = y; buf[PB_Z] = u; buf[PB_W1] = (floatX *)L; buf[PB_T2] = yt; buf[PB_BIAS] = (floatX *)bias; buf[PB_PRE] = pre_gelu;
    if (y_ld) plan_set_ld(&p, PB_Y, y_ld);
    const int epi = st_epi(bias, pre_gelu);
    if (epi && !plan_set_epilogue(&p, PB_Y, epi)) fatal("internal: the Monarch forward's permute took no epilogue");
    plan_run_gpu(&p, buf);
    return 1;
}

// The backward on the BTT kernels (monarch_btt_pays, transposed): dy permuted into dyt (the plans'
// first op), then the transposed BTT (cores L and R's rows reordered) on dyt writes dx and its
// saved z, du with each block's rows reordered (-sk 3: the kernel's stage 1 writes that z alone),
// and the plans do the rest (plan_monarch_backward_from_btt: du in its order, -sk 3's dx, the
// weight gradients). Scratch (monarch_gpu_scratch_elems): L's aligned copy, R's rows reordered,
// dyt, the kernel's z (T1) and du (T3; at rank 1 the kernel's z is du, written there). 0 (the
// plans or the Monarch kernel then run) when the kernel does not run; dy was permuted by then.
static int monarch_backward_btt(floatX *dx, floatX *dR, floatX *dL, const floatX *dy, const floatX *x, const floatX *u, const floatX *R,
                                const floatX *L, int N, const MonarchShape *m, floatX *scratch, const floatX *pre_gelu, int dy_ld, int dx_acc) {
    BTTShape tb;
    const int split = g_st_fused == 3;
    if (!dx || (dx_acc && !split) || !monarch_btt_pays(&tb, m, 1)) return 0;
    const size_t nr = monarch_r_size(m), nl = monarch_l_size(m), rows_u = (size_t)N * monarch_u_row(m);
    floatX *Lc = scratch, *W1t = Lc + nl, *dyt = W1t + nr, *t1 = dyt + (size_t)N * m->d_out, *t3 = t1 + rows_u;
    floatX *zt = m->q == m->nb ? t3 : t1;  // the kernel's z: du itself at rank 1
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Z] = (floatX *)u; buf[PB_W0] = (floatX *)R; buf[PB_DY] = (floatX *)dy;
    buf[PB_DX] = dx; buf[PB_DW0] = dR; buf[PB_DW1] = dL; buf[PB_T1] = t1; buf[PB_T2] = dyt; buf[PB_T3] = t3;
    const floatX *La = monarch_core_aligned(Lc, L, nl);
    st_step("cores as a BTT's");
    monarch_btt_core_gpu(W1t, R, m, 1);
    Plan p = {};
    plan_monarch_backward_dyt(&p, m, N);
    if (dy_ld) plan_set_ld(&p, PB_DY, dy_ld);
    plan_run_gpu(&p, buf);
    if (split) {
        st_step("BTT kernel's stage 1 on dyt (du)");
        if (!btt_stage1_fused(zt, dyt, 0, La, N, &tb)) return 0;
    } else {
        st_step(g_btt_mma ? "BTT kernel on mma.sync (dx, du; W1 packed first)" : "BTT kernel (dx, du)");
        if (!btt_forward_fused(dx, zt, dyt, La, W1t, NULL, N, &tb)) return 0;
    }
    g_monarch_btt_runs++;
    p.n = 0;
    plan_monarch_backward_from_btt(&p, m, N, split);
    if (split) plan_backward_settings(&p, buf, dx, pre_gelu, 0, dx_acc, "Monarch");
    plan_run_gpu(&p, buf);
    if (!split && pre_gelu) {
        st_step("GELU'");
        gelu_backward_inplace(dx, pre_gelu, (size_t)N * m->d_in);
    }
    return 1;
}

// Scratch elements Monarch's forward and backward need for N rows: the plans' T1..T3, the fused
// forward's transposed cores, or the fused backward's aligned copies of the cores, dyt and du,
// with the BTT kernels one more u row (their z and du), whichever is more.
static inline size_t monarch_gpu_scratch_elems(const MonarchShape *m, int N) {
    const size_t cores = monarch_r_size(m) + monarch_l_size(m);
    const size_t plan = (size_t)N * plan_monarch_scratch_row(m), fused_bwd = cores + (size_t)N * (m->d_out + monarch_u_row(m));
    BTTShape b;
    const size_t as_btt = monarch_btt_shape(&b, m) ? fused_bwd + (size_t)N * monarch_u_row(m) : fused_bwd;  // monarch_backward_btt's
    const size_t most = plan > cores ? plan : cores;
    return most > as_btt ? most : as_btt;
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
    if (monarch_forward_btt(y, u, x, R, L, bias, N, m, scratch, pre_gelu, y_ld)) return 1;
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
    if (monarch_backward_btt(dx, dR, dL, dy, x, u, R, L, N, m, scratch, pre_gelu, dy_ld, dx_acc)) {
        st_bias_backward_gpu(dbias, dy, N, m->d_out, colsum_scratch, dy_ld);
        return 1;
    }
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Z] = (floatX *)u; buf[PB_W0] = (floatX *)R; buf[PB_W1] = (floatX *)L; buf[PB_DY] = (floatX *)dy;
    buf[PB_DX] = dx; buf[PB_DW0] = dR; buf[PB_DW1] = dL;
    const size_t urow = monarch_u_row(m), nr = monarch_r_size(m), nl = monarch_l_size(m);
    Plan p = {};
    int fused = 0;
    MbGeom g;
    if (g_st_fused && !dy_ld && !dx_acc && monarch_fused_bwd_choose(&g, m, btt_fused_smem_limit()) && monarch_fused_bwd_pays(&g, m)) {
        // (|R| + |L| elements copied where not aligned, small next to dy)
        floatX *Rc = scratch, *Lc = Rc + nr, *dyt = Lc + nl, *du = dyt + (size_t)N * m->d_out;
        st_step("fused kernel (dx, du, dyt)");
        const floatX *Ra = monarch_core_aligned(Rc, R, nr), *La = monarch_core_aligned(Lc, L, nl);
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
