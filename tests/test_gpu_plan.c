// test_gpu_plan.c: the GPU baseline of the structured layers, run on the CPU. The plans of
// structured/gpu_plan.h are executed exactly as structured/plan_gpu.cuh executes them — every
// GEMM through plan_to_cublas and a literal column-major emulation of
// cublasGemmStridedBatchedEx, every permute through plan_permute_dst_index — and the results are
// compared with the CPU layers (btt.h, monarch.h, moe.h, themselves checked against PyTorch).
// For BTT-MoE the whole GPU pipeline is replayed: routing, the stable grouping by expert, core
// extraction with the shared index maps, gathered rows, one plan per expert, the gate-weighted
// combine, the gate backward, d logits, and the gradient scatter.
// What this cannot catch: CUDA-level faults (launch geometry, races, bf16 rounding). Those are
// test_gpt2cu's and dev/cuda's, on a GPU.
#include "../common/rng.h"
#include "../structured/exec_model.h"
#include "../structured/factor.h"
#include "check.h"

static mt19937_state g_rng;

static float *randn(size_t n, float std) {
    float *p = (float *)mallocCheck(sizeof(float) * (n ? n : 1));
    mt_normal_(p, n, 0.0f, std, &g_rng);
    return p;
}
static float *zeros(size_t n) { return (float *)callocCheck(n ? n : 1, sizeof(float)); }
static float *copyf(const float *a, size_t n) {
    float *p = (float *)mallocCheck(sizeof(float) * (n ? n : 1));
    memcpy(p, a, sizeof(float) * n);
    return p;
}

// cublasGemmStridedBatchedEx, column-major, alpha = 1, beta = 0 or 1, as its documentation
// defines it: C[i + j·ldc] = Σ_l op(A)[i, l] op(B)[l, j] (+ C), op(A)[i, l] = A[i + l·lda] or
// (transposed) A[l + i·lda].
static void emulate_cublas(const CublasGemmArgs *g, float *const *buf) {
    const float *A = buf[g->first] + g->first_off, *B = buf[g->second] + g->second_off;
    float *C = buf[g->c] + g->c_off;
    for (int b = 0; b < g->batch; b++) {
        const float *Ab = A + b * g->stride_a, *Bb = B + b * g->stride_b;
        float *Cb = C + b * g->stride_c;
        for (int j = 0; j < g->n; j++)
            for (int i = 0; i < g->m; i++) {
                double s = 0.0;
                for (int l = 0; l < g->k; l++) {
                    double a = g->transa ? Ab[l + (size_t)i * g->lda] : Ab[i + (size_t)l * g->lda];
                    double bb = g->transb ? Bb[j + (size_t)l * g->ldb] : Bb[l + (size_t)j * g->ldb];
                    s += a * bb;
                }
                float *c = Cb + i + (size_t)j * g->ldc;
                *c = (float)(s + (g->beta ? *c : 0.0));
            }
    }
}

static void run_plan(const Plan *p, float *const *buf);

// A tiled plan (gpu_plan.h) as plan_gpu.cuh runs it: each GEMM's batch slots (tile slot i,
// product b) with plan_tile_offset's pointers, slots past the `active` tiles on the spare tile;
// each permute over the active tiles' rows.
static void run_plan_tiled(const Plan *p, float *const *buf, const int *tile_expert, int active) {
    for (int i = 0; i < p->n; i++) {
        const PlanOp *o = &p->op[i];
        if (o->kind == PLAN_PERMUTE) {
            Plan one = {0};
            one.op[0] = *o;
            one.op[0].rows = active * o->tile_rows;
            one.n = 1;
            run_plan(&one, buf);
            continue;
        }
        for (int t = 0; t < o->tiles; t++)
            for (int b = 0; b < o->batch; b++) {
                CublasGemmArgs g = plan_to_cublas(o);
                g.first_off = plan_tile_offset(o, 1, t, b, active, tile_expert);  // cuBLAS's A is our B
                g.second_off = plan_tile_offset(o, 0, t, b, active, tile_expert);
                g.c_off = plan_tile_offset(o, 2, t, b, active, tile_expert);
                g.batch = 1;
                emulate_cublas(&g, buf);
            }
    }
}

// An op's epilogue (gpu_plan.h, PLAN_EPI_*) on one output element at `at` of column j of batch
// entry b, as cuBLASLt's BIAS / GELU_AUX_BIAS / DGELU epilogues and the permute kernel define it.
static float gelu_ref(float x) { return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))); }
static float gelu_grad_ref(float x) {
    const float th = tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
}
static void epilogue_at(const PlanOp *o, float *const *buf, int out, size_t at, int j, int b) {
    float *v = buf[out] + at;
    if (o->epi & PLAN_EPI_BIAS) *v += buf[PB_BIAS][(size_t)b * o->bias_stride + j];
    if (o->epi & PLAN_EPI_GELU) { buf[PB_PRE][at] = *v; *v = gelu_ref(*v); }
    if (o->epi & PLAN_EPI_DGELU) *v *= gelu_grad_ref(buf[PB_PRE][at]);
}

static void run_plan(const Plan *p, float *const *buf) {
    for (int i = 0; i < p->n; i++) {
        const PlanOp *o = &p->op[i];
        if (o->kind == PLAN_GEMM) {
            CublasGemmArgs g = plan_to_cublas(o);
            emulate_cublas(&g, buf);
            if (o->epi)
                for (int b = 0; b < o->batch; b++)
                    for (int r = 0; r < o->M; r++)
                        for (int j = 0; j < o->N; j++) epilogue_at(o, buf, o->c, o->c_off + (size_t)r * o->ldc + (size_t)b * o->sc + j, j, b);
        } else {
            int len = o->R * o->C * o->blk;
            for (int r = 0; r < o->rows; r++) {
                const float *s = buf[o->src] + o->src_off + (size_t)r * o->src_ld;
                float *d = buf[o->dst] + o->dst_off + (size_t)r * o->dst_ld;
                for (int j = 0; j < len; j++) d[plan_permute_dst_index(j, o->R, o->C, o->blk)] = s[j];
                if (o->epi)
                    for (int j = 0; j < len; j++) epilogue_at(o, buf, o->dst, o->dst_off + (size_t)r * o->dst_ld + j, j, 0);
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// BTT: forward y and saved z, backward dx and accumulated dW0, dW1, against btt.h

static void test_btt(int alpha, int gamma, int phi, int eps, int rank, int N) {
    BTTShape s;
    btt_shape(&s, alpha, gamma, phi, eps, rank);
    size_t n0 = btt_w0_size(&s), n1 = btt_w1_size(&s), zrow = btt_z_row(&s);
    float *x = randn((size_t)N * s.d_in, 1.0f), *W0 = randn(n0, 0.3f), *W1 = randn(n1, 0.3f), *dy = randn((size_t)N * s.d_out, 1.0f);
    float *y_ref = zeros((size_t)N * s.d_out), *z_ref = zeros((size_t)N * zrow);
    btt_forward(y_ref, z_ref, x, W0, W1, NULL, N, &s);
    float *dx_ref = zeros((size_t)N * s.d_in), *dW0_ref = randn(n0, 1.0f), *dW1_ref = randn(n1, 1.0f);
    float *dW0 = copyf(dW0_ref, n0), *dW1 = copyf(dW1_ref, n1);  // nonzero: the backward must accumulate
    float *scr = zeros(btt_scratch_size(&s, N));
    btt_backward(dx_ref, dW0_ref, dW1_ref, NULL, dy, x, z_ref, W0, W1, N, &s, scr);

    float *buf[PB_COUNT] = {0};
    buf[PB_X] = x; buf[PB_W0] = W0; buf[PB_W1] = W1; buf[PB_DY] = dy; buf[PB_DW0] = dW0; buf[PB_DW1] = dW1;
    buf[PB_Y] = zeros((size_t)N * s.d_out); buf[PB_Z] = zeros((size_t)N * zrow); buf[PB_DX] = zeros((size_t)N * s.d_in);
    buf[PB_T1] = zeros((size_t)N * zrow); buf[PB_T2] = zeros((size_t)N * zrow);
    Plan p = {0};
    plan_btt_forward(&p, &s, N, 0);
    run_plan(&p, buf);
    p.n = 0;
    plan_btt_backward_dz(&p, &s, N, 0);
    plan_btt_backward_rest(&p, &s, N, 0, 1, 1);
    run_plan(&p, buf);
    char name[160];
    snprintf(name, sizeof(name), "btt plan a%d g%d f%d e%d r%d N%d: y", alpha, gamma, phi, eps, rank, N);
    check_close(buf[PB_Y], y_ref, (size_t)N * s.d_out, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "btt plan a%d g%d f%d e%d r%d N%d: saved z (layout phi, gamma, rho)", alpha, gamma, phi, eps, rank, N);
    check_close(buf[PB_Z], z_ref, (size_t)N * zrow, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "btt plan a%d g%d f%d e%d r%d N%d: dx", alpha, gamma, phi, eps, rank, N);
    check_close(buf[PB_DX], dx_ref, (size_t)N * s.d_in, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "btt plan a%d g%d f%d e%d r%d N%d: dW0 accumulated", alpha, gamma, phi, eps, rank, N);
    check_close(dW0, dW0_ref, n0, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "btt plan a%d g%d f%d e%d r%d N%d: dW1 accumulated", alpha, gamma, phi, eps, rank, N);
    check_close(dW1, dW1_ref, n1, 1e-4f, 1e-4f, name);
    // -sk 3's halves: y from the saved z alone; dx and the weight gradients from T1 alone, T1 being
    // the transposed BTT's saved z on dy (what the fused kernel's stage 1 writes there)
    memset(buf[PB_Y], 0, sizeof(float) * N * s.d_out);
    memset(buf[PB_DX], 0, sizeof(float) * N * s.d_in);
    memcpy(buf[PB_Z], z_ref, sizeof(float) * N * zrow);
    const BTTShape ts = btt_shape_transposed(&s);
    float *W0t = zeros(n1), *W1t = zeros(n0), *yt = zeros((size_t)N * s.d_in);
    btt_transposed_cores(W0t, W1t, W0, W1, &s);
    btt_forward(yt, buf[PB_T1], dy, W0t, W1t, NULL, N, &ts);
    float *dW0s = copyf(dW0, n0), *dW1s = copyf(dW1, n1), *dW0s_ref = copyf(dW0, n0), *dW1s_ref = copyf(dW1, n1);
    btt_backward(dx_ref, dW0s_ref, dW1s_ref, NULL, dy, x, z_ref, W0, W1, N, &s, scr);
    buf[PB_DW0] = dW0s; buf[PB_DW1] = dW1s;
    p.n = 0;
    plan_btt_forward_from_z(&p, &s, N, 0);
    plan_btt_backward_from_t1(&p, &s, N, 0, 1, 1);
    run_plan(&p, buf);
    snprintf(name, sizeof(name), "btt plan a%d g%d f%d e%d r%d N%d: y from the saved z alone", alpha, gamma, phi, eps, rank, N);
    check_close(buf[PB_Y], y_ref, (size_t)N * s.d_out, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "btt plan a%d g%d f%d e%d r%d N%d: dx from T1 (the transposed BTT's z on dy) alone", alpha, gamma, phi, eps, rank, N);
    check_close(buf[PB_DX], dx_ref, (size_t)N * s.d_in, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "btt plan a%d g%d f%d e%d r%d N%d: dW0, dW1 from T1 alone, accumulated", alpha, gamma, phi, eps, rank, N);
    check_close(dW0s, dW0s_ref, n0, 1e-4f, 1e-4f, name);
    check_close(dW1s, dW1s_ref, n1, 1e-4f, 1e-4f, name);
    buf[PB_DW0] = dW0; buf[PB_DW1] = dW1;
    free(W0t); free(W1t); free(yt); free(dW0s); free(dW1s); free(dW0s_ref); free(dW1s_ref);
    for (int i = 0; i < PB_COUNT; i++)
        if (i != PB_X && i != PB_W0 && i != PB_W1 && i != PB_DY && i != PB_DW0 && i != PB_DW1) free(buf[i]);
    free(x); free(W0); free(W1); free(dy); free(y_ref); free(z_ref); free(dx_ref); free(dW0_ref); free(dW1_ref); free(dW0); free(dW1); free(scr);
}

// -sk 4's BTT plans (z stored transposed; at rank > 1 through W0 with its columns reordered): y,
// z (transposed), dx, dW0, dW1 against btt.h; with pre-filled gradients, beta_w 1 accumulates and
// 0 overwrites.
static void test_btt_zt(int alpha, int gamma, int phi, int eps, int rank, int N, int beta_w) {
    BTTShape s;
    btt_shape(&s, alpha, gamma, phi, eps, rank);
    const size_t n0 = btt_w0_size(&s), n1 = btt_w1_size(&s), zrow = btt_z_row(&s);
    float *x = randn((size_t)N * s.d_in, 1.0f), *W0 = randn(n0, 0.3f), *W1 = randn(n1, 0.3f), *dy = randn((size_t)N * s.d_out, 1.0f);
    float *y_ref = zeros((size_t)N * s.d_out), *z_ref = zeros((size_t)N * zrow), *zt_ref = zeros((size_t)N * zrow);
    btt_forward(y_ref, z_ref, x, W0, W1, NULL, N, &s);
    for (int t = 0; t < N; t++)  // saved layout (phi, gamma, rho) per row -> row (g·rho + r)·phi + f of N tokens
        for (int f = 0; f < phi; f++)
            for (int g = 0; g < gamma; g++)
                for (int r = 0; r < rank; r++)
                    zt_ref[(((size_t)g * rank + r) * phi + f) * N + t] = z_ref[(size_t)t * zrow + ((size_t)f * gamma + g) * rank + r];
    float *dW0_init = randn(n0, 1.0f), *dW1_init = randn(n1, 1.0f);
    float *dx_ref = zeros((size_t)N * s.d_in), *dW0_ref = beta_w ? copyf(dW0_init, n0) : zeros(n0), *dW1_ref = beta_w ? copyf(dW1_init, n1) : zeros(n1);
    float *scr = zeros(btt_scratch_size(&s, N));
    btt_backward(dx_ref, dW0_ref, dW1_ref, NULL, dy, x, z_ref, W0, W1, N, &s, scr);

    float *buf[PB_COUNT] = {0};
    buf[PB_X] = x; buf[PB_W0] = W0; buf[PB_W1] = W1; buf[PB_DY] = dy; buf[PB_DW0] = copyf(dW0_init, n0); buf[PB_DW1] = copyf(dW1_init, n1);
    buf[PB_Y] = zeros((size_t)N * s.d_out); buf[PB_Z] = zeros((size_t)N * zrow); buf[PB_DX] = zeros((size_t)N * s.d_in);
    buf[PB_T1] = zeros((size_t)N * zrow); buf[PB_W0R] = zeros(n0); buf[PB_DW0R] = zeros(n0);
    Plan pf = {0}, p = {0};
    plan_btt_forward_zt(&pf, &s, N);
    plan_btt_backward_zt(&p, &s, N, 1, beta_w);
    int permutes = 0, of_z = 0;
    for (int i = 0; i < pf.n + p.n; i++) {
        const PlanOp *o = i < pf.n ? &pf.op[i] : &p.op[i - pf.n];
        if (o->kind != PLAN_PERMUTE) continue;
        permutes++;
        of_z += !plan_buf_is_core(o->src) || !plan_buf_is_core(o->dst);
    }
    run_plan(&pf, buf);
    run_plan(&p, buf);
    p.n += pf.n;
    char name[200];
    snprintf(name, sizeof(name), "btt -sk 4 plan a%d g%d f%d e%d r%d N%d: y, 6 GEMMs and no permute of z (%d ops, %d permutes of W0, dW0)", alpha,
             gamma, phi, eps, rank, N, p.n, permutes);
    check_close(buf[PB_Y], y_ref, (size_t)N * s.d_out, 1e-4f, 1e-4f, name);
    check_true(p.n - permutes == 6 && of_z == 0 && permutes == (rank > 1 ? 3 + beta_w : 0), name, "other ops");
    snprintf(name, sizeof(name), "btt -sk 4 plan a%d g%d f%d e%d r%d N%d: z stored transposed", alpha, gamma, phi, eps, rank, N);
    check_close(buf[PB_Z], zt_ref, (size_t)N * zrow, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "btt -sk 4 plan a%d g%d f%d e%d r%d N%d: dx", alpha, gamma, phi, eps, rank, N);
    check_close(buf[PB_DX], dx_ref, (size_t)N * s.d_in, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "btt -sk 4 plan a%d g%d f%d e%d r%d N%d: dW0, dW1 %s", alpha, gamma, phi, eps, rank, N, beta_w ? "accumulated" : "overwritten");
    check_close(buf[PB_DW0], dW0_ref, n0, 1e-4f, 1e-4f, name);
    check_close(buf[PB_DW1], dW1_ref, n1, 1e-4f, 1e-4f, name);
    for (int i = 0; i < PB_COUNT; i++)
        if (i != PB_X && i != PB_W0 && i != PB_W1 && i != PB_DY) free(buf[i]);
    free(x); free(W0); free(W1); free(dy); free(y_ref); free(z_ref); free(zt_ref); free(dW0_init); free(dW1_init);
    free(dx_ref); free(dW0_ref); free(dW1_ref); free(scr);
}

// ----------------------------------------------------------------------------------------------
// Monarch, against monarch.h

// A Monarch plan's accumulated weight gradients against monarch.h's.
static void monarch_plan_grads_check(const char *tag, const float *dR, const float *dR_ref, size_t nr, const float *dL, const float *dL_ref,
                                     size_t nl) {
    char name[192];
    snprintf(name, sizeof(name), "%s: dR accumulated", tag);
    check_close(dR, dR_ref, nr, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s: dL accumulated", tag);
    check_close(dL, dL_ref, nl, 1e-4f, 1e-4f, name);
}
// The plan buffers a Monarch test allocated (all but the inputs and the gradients it owns).
static void plan_bufs_free(float **buf) {
    for (int i = 0; i < PB_COUNT; i++)
        if (i != PB_X && i != PB_W0 && i != PB_W1 && i != PB_DY && i != PB_DW0 && i != PB_DW1) free(buf[i]);
}

// with ut, -sk 4's plans (u stored transposed, in its natural order: two permutes, y's and dy's)
static void test_monarch(int din, int dout, int nb, int N, int ut) {
    MonarchShape m;
    monarch_shape(&m, din, dout, nb);
    const size_t nr = monarch_r_size(&m), nl = monarch_l_size(&m), urow = monarch_u_row(&m);
    float *x = randn((size_t)N * din, 1.0f), *R = randn(nr, 0.3f), *L = randn(nl, 0.3f), *dy = randn((size_t)N * dout, 1.0f);
    float *y_ref = zeros((size_t)N * dout), *u_ref = zeros((size_t)N * urow), *ut_ref = zeros((size_t)N * urow);
    monarch_forward(y_ref, u_ref, x, R, L, NULL, N, &m);
    for (int t = 0; t < N; t++)  // saved (permuted) u: natural element c = r·nb + l at l·q + r
        for (size_t c = 0; c < urow; c++) ut_ref[c * N + t] = u_ref[(size_t)t * urow + (c % m.nb) * m.q + c / m.nb];
    float *dx_ref = zeros((size_t)N * din), *dR_ref = randn(nr, 1.0f), *dL_ref = randn(nl, 1.0f);
    float *dR = copyf(dR_ref, nr), *dL = copyf(dL_ref, nl);
    float *scr = zeros(monarch_scratch_size(&m, N));
    monarch_backward(dx_ref, dR_ref, dL_ref, NULL, dy, x, u_ref, R, L, N, &m, scr);

    float *buf[PB_COUNT] = {0};
    buf[PB_X] = x; buf[PB_W0] = R; buf[PB_W1] = L; buf[PB_DY] = dy; buf[PB_DW0] = dR; buf[PB_DW1] = dL;
    buf[PB_Y] = zeros((size_t)N * dout); buf[PB_Z] = zeros((size_t)N * urow); buf[PB_DX] = zeros((size_t)N * din);
    buf[PB_T1] = zeros((size_t)N * urow); buf[PB_T2] = zeros((size_t)N * dout); buf[PB_T3] = zeros((size_t)N * urow);
    Plan p = {0};
    int permutes = 0;
    for (int pass = 0; pass < 2; pass++) {
        p.n = 0;
        if (pass == 0) {
            if (ut) plan_monarch_forward_ut(&p, &m, N);
            else plan_monarch_forward(&p, &m, N);
        } else {
            if (ut) plan_monarch_backward_ut(&p, &m, N, 1);
            else plan_monarch_backward(&p, &m, N, 1);
        }
        for (int i = 0; i < p.n; i++) permutes += p.op[i].kind == PLAN_PERMUTE;
        run_plan(&p, buf);
    }
    char tag[96], name[192];
    snprintf(tag, sizeof(tag), "monarch %splan %d->%d nb%d N%d", ut ? "-sk 4 " : "", din, dout, nb, N);
    snprintf(name, sizeof(name), "%s: y (%d permutes)", tag, permutes);
    check_close(buf[PB_Y], y_ref, (size_t)N * dout, 1e-4f, 1e-4f, name);
    check_true(permutes == (ut ? 2 : 4), name, ut ? "2 permutes: y's and dy's" : "4 permutes");
    snprintf(name, sizeof(name), "%s: saved u%s", tag, ut ? " (stored transposed)" : "");
    check_close(buf[PB_Z], ut ? ut_ref : u_ref, (size_t)N * urow, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s: dx", tag);
    check_close(buf[PB_DX], dx_ref, (size_t)N * din, 1e-4f, 1e-4f, name);
    monarch_plan_grads_check(tag, dR, dR_ref, nr, dL, dL_ref, nl);
    plan_bufs_free(buf);
    free(x); free(R); free(L); free(dy); free(y_ref); free(u_ref); free(ut_ref); free(dx_ref); free(dR_ref); free(dL_ref); free(dR); free(dL);
    free(scr);
}

// Monarch run as a BTT (monarch.h's identity; monarch_gpu.cuh with -sk 2, 3, 5): the plans' parts
// around the BTT kernel, which the CPU BTT stands in for: y from yt, y from u (-sk 3), dyt, and
// the backward's dx (-sk 3) and weight gradients from the transposed BTT's saved z, against monarch.h.
static void test_monarch_btt(int din, int dout, int nb, int N) {
    MonarchShape m;
    BTTShape b;
    monarch_shape(&m, din, dout, nb);
    char tag[96], name[192];
    snprintf(tag, sizeof(tag), "monarch as a BTT %d->%d nb%d N%d", din, dout, nb, N);
    if (!check_true(monarch_btt_shape(&b, &m), tag, "no BTT shape")) return;
    const BTTShape tb = btt_shape_transposed(&b);
    const size_t nr = monarch_r_size(&m), nl = monarch_l_size(&m), urow = monarch_u_row(&m);
    float *x = randn((size_t)N * din, 1.0f), *R = randn(nr, 0.3f), *L = randn(nl, 0.3f), *dy = randn((size_t)N * dout, 1.0f);
    float *y_ref = zeros((size_t)N * dout), *u_ref = zeros((size_t)N * urow);
    monarch_forward(y_ref, u_ref, x, R, L, NULL, N, &m);
    float *dx_ref = zeros((size_t)N * din), *dR_ref = randn(nr, 1.0f), *dL_ref = randn(nl, 1.0f);
    float *dR = copyf(dR_ref, nr), *dL = copyf(dL_ref, nl), *scr = zeros(monarch_scratch_size(&m, N));
    monarch_backward(dx_ref, dR_ref, dL_ref, NULL, dy, x, u_ref, R, L, N, &m, scr);
    // the BTT kernels' parts, on the CPU: its cores (and the transposed BTT's), yt and u, dx and its z
    float *W0 = zeros(nr), *W1 = zeros(nl), *W1t = zeros(nr), *W0t = zeros(nl);
    monarch_btt_cores(W0, W1, R, L, &m);
    float *buf[PB_COUNT] = {0};
    buf[PB_X] = x; buf[PB_W0] = R; buf[PB_W1] = L; buf[PB_DY] = dy; buf[PB_DW0] = dR; buf[PB_DW1] = dL;
    buf[PB_Y] = zeros((size_t)N * dout); buf[PB_Z] = zeros((size_t)N * urow); buf[PB_DX] = zeros((size_t)N * din);
    buf[PB_T1] = zeros((size_t)N * urow); buf[PB_T2] = zeros((size_t)N * dout); buf[PB_T3] = zeros((size_t)N * urow);
    float *dxb = zeros((size_t)N * din);
    Plan p = {0};
    for (int split = 0; split < 2; split++) {  // forward: the whole kernel (yt, u), or its stage 1 (u)
        memset(buf[PB_Y], 0, sizeof(float) * N * dout);
        memset(buf[PB_T2], 0, sizeof(float) * N * dout);
        btt_forward(split ? buf[PB_Y] : buf[PB_T2], buf[PB_Z], x, W0, W1, NULL, N, &b);  // (split: yt not kept)
        p.n = 0;
        if (split) plan_monarch_forward_from_u(&p, &m, N);
        else plan_monarch_forward_from_yt(&p, &m, N);
        run_plan(&p, buf);
        snprintf(name, sizeof(name), "%s: y from %s (%d ops)", tag, split ? "u, GEMM and permute" : "yt, a permute", p.n);
        check_close(buf[PB_Y], y_ref, (size_t)N * dout, 1e-4f, 1e-4f, name);
        check_true(p.n == 1 + split, name, "other ops");
    }
    snprintf(name, sizeof(name), "%s: the BTT kernel's saved z is u", tag);
    check_close(buf[PB_Z], u_ref, (size_t)N * urow, 1e-4f, 1e-4f, name);
    // backward: dyt = dy permuted by the plans' first op, then the transposed BTT on it writes dx and
    // its z into T1 (T3 at rank 1), and the plans do the rest
    p.n = 0;
    plan_monarch_backward_dyt(&p, &m, N);
    run_plan(&p, buf);
    btt_transposed_cores(W0t, W1t, W0, W1, &b);  // (L and R's rows reordered: test_structured)
    btt_forward(dxb, b.rank > 1 ? buf[PB_T1] : buf[PB_T3], buf[PB_T2], W0t, W1t, NULL, N, &tb);
    snprintf(name, sizeof(name), "%s: dx from the transposed BTT", tag);
    check_close(dxb, dx_ref, (size_t)N * din, 1e-4f, 1e-4f, name);
    p.n = 0;
    plan_monarch_backward_from_btt(&p, &m, N, 1);
    run_plan(&p, buf);
    snprintf(name, sizeof(name), "%s: dx from its z, as du (-sk 3; %d ops)", tag, p.n);
    check_close(buf[PB_DX], dx_ref, (size_t)N * din, 1e-4f, 1e-4f, name);
    check_true(p.n == 3 + (b.rank > 1), name, "a permute of its z but at rank 1, then dx, dL and dR");
    monarch_plan_grads_check(tag, dR, dR_ref, nr, dL, dL_ref, nl);
    plan_bufs_free(buf);
    free(x); free(R); free(L); free(dy); free(y_ref); free(u_ref); free(dx_ref); free(dR_ref); free(dL_ref); free(dR); free(dL);
    free(scr); free(W0); free(W1); free(W1t); free(W0t); free(dxb);
}

// ----------------------------------------------------------------------------------------------
// BTT-MoE: the GPU pipeline of moe_gpu.cuh, step by step, against moe.h

// The GPU's grouping: pairs p = t·K + k grouped by expert, ascending p within an expert (what
// moe_group.cuh's counting sort over chunks of the pairs produces), each expert's
// rows padded to whole tiles of T rows (order -1); pos[p] is pair p's grouped row, tile_expert
// each tile's expert. Returns the tiles in use.
static int moe_group(const int *sel, int NK, int E, int T, int *counts, int *offsets, int *order, int *pos, int *tile_expert) {
    for (int e = 0; e < E; e++) counts[e] = 0;
    for (int p = 0; p < NK; p++) counts[sel[p]]++;
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + (counts[e] + T - 1) / T * T;
    for (int e = 0; e < E; e++) {
        int w = offsets[e];
        for (int p = 0; p < NK; p++)
            if (sel[p] == e) { order[w] = p; pos[p] = w; w++; }
        for (; w < offsets[e + 1]; w++) order[w] = -1;
        for (int t = offsets[e] / T; t < offsets[e + 1] / T; t++) tile_expert[t] = e;
    }
    return offsets[E] / T;
}

// T: the tile rows (small here, so that experts take several tiles, some partial, some none).
// Element c of grouped row w of z (or dZ) as the tiled plans store it: rows of zrow (the
// plans'), or with zt each tile of T rows transposed (-sk 4's: zrow rows of T).
static size_t moe_z_at(int zt, int w, size_t c, int T, size_t zrow) {
    return zt ? (size_t)(w / T) * T * zrow + c * T + (size_t)(w % T) : (size_t)w * zrow + c;
}

static void test_moe(int alpha, int gamma, int phi, int eps, int E, int K, int N, int T, int zt) {
    MoEShape s;
    moe_shape(&s, alpha, gamma, phi, eps, E, K);
    const BTTShape b1 = moe_expert_shape(&s);
    const int din = s.btt.d_in, dout = s.btt.d_out, NK = N * K;
    const size_t n0 = btt_w0_size(&s.btt), n1 = btt_w1_size(&s.btt), p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1), zrow = moe_z_row(&s);
    float *x = randn((size_t)N * din, 1.0f), *W0 = randn(n0, 0.3f), *W1 = randn(n1, 0.3f), *Rt = randn((size_t)E * din, 0.3f);
    float *dy = randn((size_t)N * dout, 1.0f);
    const float daux = 0.37f;
    // reference
    MoEState st;
    moe_state_alloc(&st, &s, N);
    float *y_ref = zeros((size_t)N * dout);
    moe_forward(y_ref, &st, x, W0, W1, Rt, NULL, N, &s);
    float aux_ref = moe_aux_loss(&st, N, &s).aux;
    float *dx_ref = zeros((size_t)N * din), *dW0_ref = randn(n0, 1.0f), *dW1_ref = randn(n1, 1.0f), *dR_ref = randn((size_t)E * din, 1.0f);
    float *dW0 = copyf(dW0_ref, n0), *dW1 = copyf(dW1_ref, n1), *dR = copyf(dR_ref, (size_t)E * din);
    float *scr = zeros(moe_scratch_size(&s, N));
    moe_backward(dx_ref, dW0_ref, dW1_ref, dR_ref, NULL, dy, daux, x, &st, W0, W1, Rt, N, &s, scr);

    // GPU pipeline. Router: logits = x Rᵀ (a plain GEMM), one routing thread per token.
    float *logits = zeros((size_t)N * E), *gate = zeros((size_t)NK), *lse = zeros((size_t)N);
    int *sel = (int *)callocCheck((size_t)NK, sizeof(int));
    for (int t = 0; t < N; t++) {
        for (int e = 0; e < E; e++) {
            double a = 0.0;
            for (int i = 0; i < din; i++) a += (double)x[(size_t)t * din + i] * Rt[(size_t)e * din + i];
            logits[(size_t)t * E + e] = (float)a;
        }
        st_moe_route_row(logits + (size_t)t * E, E, K, NULL, sel + (size_t)t * K, gate + (size_t)t * K, lse + t);
    }
    int *counts = (int *)callocCheck((size_t)E, sizeof(int)), *offsets = (int *)callocCheck((size_t)E + 1, sizeof(int));
    const int max_tiles = moe_max_tiles(NK, E, T), rows = (int)moe_grouped_rows(NK, E, T);  // rows: the spare tile's included
    int *order = (int *)callocCheck((size_t)rows, sizeof(int)), *pos = (int *)callocCheck((size_t)NK, sizeof(int));
    int *tile_expert = (int *)callocCheck((size_t)max_tiles, sizeof(int));
    const int active = moe_group(sel, NK, E, T, counts, offsets, order, pos, tile_expert);
    float *w0x = zeros(p0 * E), *w1x = zeros(p1 * E);
    for (size_t i = 0; i < n0; i++) w0x[st_moe_w0_expert_index(i, E, p0)] = W0[i];
    for (size_t i = 0; i < n1; i++) w1x[st_moe_w1_expert_index(i, E, eps, p1)] = W1[i];
    float *xg = zeros((size_t)rows * din), *yg = zeros((size_t)rows * dout), *z = zeros((size_t)rows * zrow);
    float *t1 = zeros((size_t)rows * zrow), *t2 = zeros((size_t)rows * zrow);
    for (int w = 0; w < active * T; w++)  // gathered rows, zero padding rows
        if (order[w] >= 0) memcpy(xg + (size_t)w * din, x + (size_t)(order[w] / K) * din, sizeof(float) * din);
    float *buf[PB_COUNT] = {0};
    buf[PB_X] = xg; buf[PB_Y] = yg; buf[PB_Z] = z; buf[PB_T1] = t1; buf[PB_T2] = t2; buf[PB_W0] = w0x; buf[PB_W1] = w1x;
    Plan p = {0};
    const size_t zt_tile = zt ? zrow * T : 0;
    if (zt) plan_btt_forward_zt(&p, &b1, T);
    else plan_btt_forward(&p, &b1, T, 0);
    plan_tile(&p, max_tiles, T, p0, p1, zt_tile);
    run_plan_tiled(&p, buf, tile_expert, active);
    float *y = zeros((size_t)N * dout);
    for (int t = 0; t < N; t++)  // combine: each token adds its K experts in k order
        for (int k = 0; k < K; k++) {
            int pr = t * K + k;
            for (int o = 0; o < dout; o++) y[(size_t)t * dout + o] += gate[pr] * yg[(size_t)pos[pr] * dout + o];
        }
    char name[200], tag[96];
    snprintf(tag, sizeof(tag), "btt_moe %splan a%d g%d f%d e%d E%d K%d N%d T%d", zt ? "-sk 4 " : "", alpha, gamma, phi, eps, E, K, N, T);
    snprintf(name, sizeof(name), "%s: routing equals moe.h", tag);
    int same_order = 1;  // moe.h's order is the padded one without its padding
    for (int e = 0; e < E; e++)
        for (int j = 0; j < counts[e]; j++) same_order &= order[offsets[e] + j] == st.order[st.offsets[e] + j];
    check_true(memcmp(sel, st.sel, sizeof(int) * NK) == 0 && memcmp(counts, st.counts, sizeof(int) * E) == 0 && same_order && active <= max_tiles,
               name, "selection, counts or grouping differ");
    snprintf(name, sizeof(name), "%s: y", tag);
    check_close(y, y_ref, (size_t)N * dout, 1e-4f, 1e-4f, name);
    float *zp = zeros((size_t)NK * zrow);  // z as moe.h keeps it: rows grouped alike without padding, layout (gamma, phi)
    for (int e = 0; e < E; e++)
        for (int j = 0; j < counts[e]; j++) {
            float *dst = zp + (size_t)(st.offsets[e] + j) * zrow;
            const int w = offsets[e] + j;
            if (!zt) st_transpose(dst, z + (size_t)w * zrow, phi, gamma, 1);  // the plans' (phi, gamma)
            else
                for (size_t c = 0; c < zrow; c++) dst[c] = z[moe_z_at(1, w, c, T, zrow)];  // -sk 4's row c = g·phi + f
        }
    snprintf(name, sizeof(name), "%s: saved z", tag);
    check_close(zp, st.z, (size_t)NK * zrow, 1e-4f, 1e-4f, name);
    // aux statistics as the GPU reduces them (Σ softmax, counts, Σ lse²), then moe_aux_from_stats
    double *stats = (double *)callocCheck(MOE_AUX_STATS(E), sizeof(double));
    for (int t = 0; t < N; t++) {
        for (int e = 0; e < E; e++) stats[e] += exp((double)logits[(size_t)t * E + e] - lse[t]);
        stats[2 * E] += (double)lse[t] * lse[t];
    }
    for (int e = 0; e < E; e++) stats[E + e] = counts[e];
    float *fhat = zeros((size_t)E);
    MoEState fst;
    memset(&fst, 0, sizeof(fst));
    fst.fhat = fhat;
    float aux = moe_aux_from_stats(&fst, stats, N, &s).aux;
    snprintf(name, sizeof(name), "btt_moe plan E%d K%d N%d T%d: aux loss %.6f (ref %.6f)", E, K, N, T, aux, aux_ref);
    check_close(&aux, &aux_ref, 1, 1e-5f, 1e-5f, name);

    // backward: gathered dY (zero padding rows); dZu = dY W1ᵀ on every tile (the tiled
    // plan_btt_backward_dz); the gate step per pair (dgate = <z, dZu>, dZ = gate·dZu permuted to
    // (gamma, phi) into t1, gate·z into t2); then the tiled plan_btt_backward_from_t1 with t2 for
    // Z (-sk 4: dZ and z scaled in place, then its rest plan): dx per tile, and per-tile weight-gradient
    // partials (poisoned first: every tile in use must write its own), summed per expert in tile
    // order and added into dW0/dW1 with the shared index maps.
    float *dyg = zeros((size_t)rows * dout), *dxg = zeros((size_t)rows * din), *dgate = zeros((size_t)NK);
    float *part0 = zeros(p0 * (max_tiles + 1)), *part1 = zeros(p1 * (max_tiles + 1));
    for (size_t i = 0; i < p0 * (max_tiles + 1); i++) part0[i] = NAN;
    for (size_t i = 0; i < p1 * (max_tiles + 1); i++) part1[i] = NAN;
    for (int w = 0; w < active * T; w++)
        if (order[w] >= 0) memcpy(dyg + (size_t)w * dout, dy + (size_t)(order[w] / K) * dout, sizeof(float) * dout);
    buf[PB_DY] = dyg; buf[PB_DX] = dxg; buf[PB_DW0] = part0; buf[PB_DW1] = part1;
    p.n = 0;
    if (zt) plan_btt_backward_zt_dz(&p, &b1, T);  // dZu into t1, stored as z
    else plan_btt_backward_dz(&p, &b1, T, 0);     // into t2, (phi, gamma)
    plan_tile(&p, max_tiles, T, p0, p1, zt_tile);
    run_plan_tiled(&p, buf, tile_expert, active);
    float *dzu = zt ? t1 : t2;
    for (int w = 0; w < active * T; w++) {  // both scale z by the gate instead of dy (dW1 = (g·Z)ᵀ dY)
        int pr = order[w];
        if (pr < 0) continue;
        double dg = 0.0;
        for (size_t i = 0; i < zrow; i++) dg += (double)z[moe_z_at(zt, w, i, T, zrow)] * dzu[moe_z_at(zt, w, i, T, zrow)];
        dgate[pr] = (float)dg;
        if (zt) {  // in place, each tile transposed
            for (size_t i = 0; i < zrow; i++) dzu[moe_z_at(zt, w, i, T, zrow)] *= gate[pr];
            for (size_t i = 0; i < zrow; i++) z[moe_z_at(zt, w, i, T, zrow)] *= gate[pr];
        } else {  // moe_gate_backward_t_kernel: t1 = g·dZu moved to (gamma, phi), t2 = g·z (the rest reads it for Z)
            float *a = t1 + (size_t)w * zrow, *b = t2 + (size_t)w * zrow;
            for (int f = 0; f < phi; f++)
                for (int g = 0; g < gamma; g++) a[(size_t)g * phi + f] = gate[pr] * b[(size_t)f * gamma + g];
            for (size_t i = 0; i < zrow; i++) b[i] = gate[pr] * z[(size_t)w * zrow + i];
        }
    }
    p.n = 0;
    if (zt) plan_btt_backward_zt_rest(&p, &b1, T, 1, 0);
    else {  // no permute: t1 holds dZ as the rest reads it, and Z is t2 (the saved z left as it is)
        plan_btt_backward_from_t1(&p, &b1, T, 0, 1, 0);
        buf[PB_Z] = t2;
    }
    plan_tile(&p, max_tiles, T, p0, p1, zt_tile);
    run_plan_tiled(&p, buf, tile_expert, active);
    for (size_t i = 0; i < n0 + n1; i++) {
        const int w1 = i >= n0;
        const size_t j = w1 ? st_moe_w1_expert_index(i - n0, E, eps, p1) : st_moe_w0_expert_index(i, E, p0), pe = w1 ? p1 : p0;
        const int e = (int)(j / pe);
        float acc = 0.0f;
        for (int t = offsets[e] / T; t < offsets[e + 1] / T; t++) acc += (w1 ? part1 : part0)[(size_t)t * pe + j % pe];
        (w1 ? dW1 + (i - n0) : dW0 + i)[0] += acc;
    }
    float *dlogits = zeros((size_t)N * E), *dx = zeros((size_t)N * din);
    for (int t = 0; t < N; t++)
        st_moe_dlogits_row(dlogits + (size_t)t * E, logits + (size_t)t * E, lse[t], gate + (size_t)t * K, dgate + (size_t)t * K,
                           sel + (size_t)t * K, fhat, E, K, N, daux);
    for (int t = 0; t < N; t++)
        for (int i = 0; i < din; i++) {
            double a = 0.0;
            for (int k = 0; k < K; k++) a += dxg[(size_t)pos[t * K + k] * din + i];
            for (int e = 0; e < E; e++) a += (double)dlogits[(size_t)t * E + e] * Rt[(size_t)e * din + i];
            dx[(size_t)t * din + i] = (float)a;
        }
    for (int e = 0; e < E; e++)
        for (int i = 0; i < din; i++) {
            double a = 0.0;
            for (int t = 0; t < N; t++) a += (double)dlogits[(size_t)t * E + e] * x[(size_t)t * din + i];
            dR[(size_t)e * din + i] += (float)a;
        }
    snprintf(name, sizeof(name), "%s: dx", tag);
    check_close(dx, dx_ref, (size_t)N * din, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s: dW0 accumulated", tag);
    check_close(dW0, dW0_ref, n0, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s: dW1 accumulated", tag);
    check_close(dW1, dW1_ref, n1, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s: drouter accumulated", tag);
    check_close(dR, dR_ref, (size_t)E * din, 1e-4f, 1e-4f, name);

    free(x); free(W0); free(W1); free(Rt); free(dy); free(y_ref); free(dx_ref); free(dW0_ref); free(dW1_ref); free(dR_ref);
    free(dW0); free(dW1); free(dR); free(scr); free(logits); free(gate); free(lse); free(sel); free(counts); free(offsets);
    free(order); free(pos); free(tile_expert); free(w0x); free(w1x); free(xg); free(yg); free(z); free(t1); free(t2); free(y); free(zp);
    free(stats); free(fhat); free(dyg); free(dxg); free(dgate); free(part0); free(part1); free(dlogits); free(dx);
    moe_state_free(&st);
}

// The permute index map alone, on a case small enough to write out: a row [R=2][C=3][blk=2]
// (elements 0..11) becomes [3][2][2].
static void test_permute_index(void) {
    const int want[12] = {0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11};  // dst[k] = src[want[k]]
    int got[12];
    for (int j = 0; j < 12; j++) got[plan_permute_dst_index(j, 2, 3, 2)] = j;
    check_true(memcmp(got, want, sizeof(want)) == 0, "permute index: [2][3][2] -> [3][2][2] written out by hand", "wrong order");
}

// plan_activation_elems (the baseline's memory traffic the fused Monarch kernels are weighed
// against) at one row, against counts written out from each op: Monarch forward GEMM x -> T1,
// permute T1 -> u, GEMM u -> T2, permute T2 -> y: d_in + 4 urow + 3 d_out; its backward's permute
// dy -> dyt, GEMM dyt -> T1, permute T1 -> du, GEMM du -> dx, then dL (dyt, u) and dR (du, x):
// 4 d_out + 6 urow + 2 d_in, of which the two weight GEMMs d_out + 2 urow + d_in; BTT forward
// x -> T1, permute, Z -> y: d_in + 4 zrow + d_out.
// Elements per row of a BTT layer's forward and backward (dx, weights) on -sk 0's plans or -sk 4's.
static double btt_plans_elems(const BTTShape *s, int zt) {
    Plan f = {}, b = {};
    plan_btt_layer(&f, &b, s, 1, zt, 1);
    return plan_activation_elems(&f) + plan_activation_elems(&b);
}

static void test_activation_elems(void) {
    MonarchShape m;
    monarch_shape(&m, 768, 3072, 4);  // urow 768
    Plan f = {}, b = {}, w = {};
    plan_monarch_forward(&f, &m, 1);
    plan_monarch_backward(&b, &m, 1, 1);
    plan_monarch_backward_weights(&w, &m, 1);
    char why[96];
    const double got[3] = {plan_activation_elems(&f), plan_activation_elems(&b), plan_activation_elems(&w)};
    const double want[3] = {768 + 4 * 768 + 3 * 3072, 4 * 3072 + 6 * 768 + 2 * 768, 3072 + 2 * 768 + 768};
    const char *what[3] = {"monarch 768->3072 nb 4 forward", "monarch backward", "monarch backward's weight GEMMs"};
    for (int i = 0; i < 3; i++) {
        snprintf(why, sizeof(why), "%.0f elements, counted by hand %.0f", got[i], want[i]);
        char name[128];
        snprintf(name, sizeof(name), "plan_activation_elems: %s at one row", what[i]);
        check_true(got[i] == want[i], name, why);
    }
    BTTShape s;
    btt_shape(&s, 16, 48, 32, 96, 2);  // 768 -> 3072 rank 2: zrow 48*32*2 = 3072
    Plan bf = {};
    plan_btt_forward(&bf, &s, 1, 0);
    const double gb = plan_activation_elems(&bf), wb = 768 + 4 * 3072 + 3072;
    snprintf(why, sizeof(why), "%.0f elements, counted by hand %.0f", gb, wb);
    check_true(gb == wb, "plan_activation_elems: btt 768->3072 rank 2 forward at one row", why);
    // -sk 4 against the baseline: BTT 768 -> 3072 rank 1 (zrow 1536) drops both permutes of z,
    // 2 x 2 x 1536 of the baseline's 9984 + 16896; Monarch drops u's two, 2 x 2 x 768
    BTTShape s1;
    btt_shape(&s1, 16, 48, 32, 96, 1);
    Plan uf = {}, ub = {};
    plan_monarch_layer(&uf, &ub, &m, 1, 1, 1);
    const double br = btt_plans_elems(&s1, 0), bt = btt_plans_elems(&s1, 1), mf = plan_activation_elems(&uf), mb = plan_activation_elems(&ub);
    snprintf(why, sizeof(why), "%.0f and %.0f elements, counted by hand 26880 and 20736", br, bt);
    check_true(br == 26880 && bt == 20736, "plan_activation_elems: btt 768->3072 rank 1 forward + backward, -sk 0 and -sk 4 (23% less)", why);
    // rank 2 (zrow 3072): the baseline's 2 x 2 x 3072 of permutes go; W0's reorders count nothing (a core)
    const double b2r = btt_plans_elems(&s, 0), b2t = btt_plans_elems(&s, 1);
    snprintf(why, sizeof(why), "%.0f and %.0f elements, counted by hand 42240 and 29952", b2r, b2t);
    check_true(b2r == 42240 && b2t == 29952, "plan_activation_elems: btt 768->3072 rank 2 forward + backward, -sk 0 and -sk 4 (29% less)", why);
    snprintf(why, sizeof(why), "%.0f and %.0f elements, counted by hand 11520 and 16896", mf, mb);
    check_true(mf == want[0] - 1536 && mb == want[1] - 1536,
               "plan_activation_elems: monarch 768->3072 nb 4 -sk 4, forward and backward (u's permutes gone)", why);
}

// st_moe_route_row with `only` (test mode's forced routing): the given experts, ordered by logit
// as the top-k orders them, gates a softmax over their logits, lse over all E; given the natural
// top-k in any order, the same selection as unforced routing and the same gates (to rounding:
// -ffast-math may compile the two inlined calls differently).
static void test_route_only(void) {
    const int E = 8, K = 3, rows = 50;
    int bad_forced = 0, bad_natural = 0;
    for (int r = 0; r < rows; r++) {
        float *lg = randn(E, 1.0f);
        int sel[3], sel0[3], only[3];
        float gate[3], gate0[3], lse, lse0;
        st_moe_route_row(lg, E, K, NULL, sel0, gate0, &lse0);
        for (int k = 0; k < K; k++) only[k] = (r + 3 * k) % E;  // distinct: 0, 3, 6 shifted
        st_moe_route_row(lg, E, K, only, sel, gate, &lse);
        double m = -1e30, sum = 0.0;
        for (int k = 0; k < K; k++) m = lg[only[k]] > m ? lg[only[k]] : m;
        for (int k = 0; k < K; k++) sum += exp(lg[only[k]] - m);
        for (int k = 0; k < K; k++) {
            int listed = 0;
            for (int j = 0; j < K; j++) listed |= sel[k] == only[j];
            bad_forced += !listed || (k > 0 && lg[sel[k]] > lg[sel[k - 1]]) || fabs(gate[k] - exp(lg[sel[k]] - m) / sum) > 1e-6;
        }
        bad_forced += lse != lse0;
        for (int k = 0; k < K; k++) only[k] = sel0[K - 1 - k];
        st_moe_route_row(lg, E, K, only, sel, gate, &lse);
        bad_natural += memcmp(sel, sel0, sizeof(sel)) != 0 || fabsf(lse - lse0) > 1e-6f;
        for (int k = 0; k < K; k++) bad_natural += fabsf(gate[k] - gate0[k]) > 1e-6f;
        free(lg);
    }
    check_true(bad_forced == 0, "moe route with `only`: the given experts in logit order, softmax gates over them, lse over all", "mismatch");
    check_true(bad_natural == 0, "moe route with `only` = the top-k reversed: the same selection and gates as unforced routing", "mismatch");
}

// BTT-MoE's tiles: moe_max_tiles bounds Σ ceil(c_e / T) for every split of NK pairs over E experts
// (random splits, and one pair on every expert but one, which attains it for some NK),
// and moe_tile_rows picks, among the powers of two 64..2048, the one of least modelled cost
// E·T/2·(bytes per grouped row) + NK/T·(bytes of one tile's fp32 partials), and never a smaller
// one for more tokens.
static void test_moe_tiles(void) {
    int bad_bound = 0, attained = 0;
    for (int trial = 0; trial < 2000; trial++) {
        const int E = 1 + trial % 16, T = 1 << (trial % 9), NK = 1 + (int)(mt_u32(&g_rng) % 5000);
        int c[16] = {0}, left = NK, tiles = 0;
        if (trial % 2) {  // one pair on each expert but the last, which takes the rest: the bound when NK - E is a multiple of T
            for (int e = 0; e < E - 1 && left > 1; e++) { c[e] = 1; left--; }
            c[E - 1] += left;
        } else {
            for (int p = 0; p < NK; p++) c[mt_u32(&g_rng) % E]++;
        }
        for (int e = 0; e < E; e++) tiles += (c[e] + T - 1) / T;
        bad_bound += tiles > moe_max_tiles(NK, E, T);
        attained += tiles == moe_max_tiles(NK, E, T);
    }
    char why[96];
    snprintf(why, sizeof(why), "%d of 2000 splits need more tiles than the bound", bad_bound);
    check_true(bad_bound == 0, "moe_max_tiles bounds the tiles of every split of the pairs", why);
    snprintf(why, sizeof(why), "attained in %d of 2000 splits", attained);
    check_true(attained > 0, "moe_max_tiles is attained by some splits (it is not loose everywhere)", why);

    const int shapes[4][4] = {{16, 48, 32, 96}, {32, 32, 64, 64}, {32, 64, 64, 128}, {64, 64, 128, 128}};  // 768..4096 -> 4x
    int bad_pick = 0, bad_mono = 0, cases = 0;
    for (int i = 0; i < 4; i++)
        for (int E = 4; E <= 16; E *= 2) {
            MoEShape s;
            moe_shape(&s, shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3], E, 2);
            const BTTShape b1 = moe_expert_shape(&s);
            Plan f = {0}, d = {0}, r = {0};
            plan_btt_forward(&f, &b1, 1, 0);
            plan_btt_backward_dz(&d, &b1, 1, 0);
            plan_btt_backward_rest(&r, &b1, 1, 0, 1, 0);
            const double row = 2.0 * (plan_activation_elems(&f) + plan_activation_elems(&d) + plan_activation_elems(&r));
            const double part = 8.0 * (double)(btt_w0_size(&b1) + btt_w1_size(&b1));
            int prev = 0;
            for (int N = 256; N <= 262144; N *= 2) {
                const int T = moe_tile_rows(&s, N);
                double best = 1e300;
                int best_t = 0;
                for (int t = 64; t <= 2048; t *= 2) {
                    const double cost = E * t / 2.0 * row + 2.0 * N / t * part;
                    if (cost < best) { best = cost; best_t = t; }
                }
                bad_pick += T != best_t;
                bad_mono += T < prev;
                prev = T;
                cases++;
            }
        }
    snprintf(why, sizeof(why), "%d of %d shapes and token counts", bad_pick, cases);
    check_true(bad_pick == 0, "moe_tile_rows: the power of two of least modelled padding + partials traffic", why);
    snprintf(why, sizeof(why), "%d of %d", bad_mono, cases);
    check_true(bad_mono == 0, "moe_tile_rows: never fewer rows per tile for more tokens", why);
}

// The small BTT (kind 0: 24 -> 15, rank 2; kind 2: the same on -sk 4's plans) or Monarch (kind 1:
// 48 -> 96, 4 blocks; kind 3: on -sk 4's plans) of the epilogue and row-stride tests: sizes of
// its cores, intermediate row and T2, T3 rows.
typedef struct {
    BTTShape s;
    MonarchShape m;
    int din, dout, zt;
    size_t n0, n1, zrow, t2row, t3row;
    const char *what;
} SmallLayer;
static SmallLayer small_layer(int kind) {
    SmallLayer L;
    memset(&L, 0, sizeof(L));
    L.zt = kind >= 2;
    if (kind % 2 == 0) {
        btt_shape(&L.s, 4, 6, 5, 3, 2);
        L.din = L.s.d_in; L.dout = L.s.d_out; L.n0 = btt_w0_size(&L.s); L.n1 = btt_w1_size(&L.s); L.zrow = btt_z_row(&L.s);
        L.t2row = L.zrow; L.t3row = 1;
        L.what = kind == 2 ? "btt 24->15 r2 (-sk 4)" : "btt 24->15 r2";
    } else {
        monarch_shape(&L.m, 48, 96, 4);
        L.din = L.m.d_in; L.dout = L.m.d_out; L.n0 = monarch_r_size(&L.m); L.n1 = monarch_l_size(&L.m); L.zrow = monarch_u_row(&L.m);
        L.t2row = L.dout; L.t3row = L.zrow;
        L.what = kind == 3 ? "monarch 48->96 nb4 (-sk 4)" : "monarch 48->96 nb4";
    }
    return L;
}

// Its forward's plan and its backward's (dx wanted, weight gradients accumulated).
static void small_forward_plan(const SmallLayer *L, Plan *p, int N) {
    if (L->what[0] == 'b') plan_btt_layer(p, NULL, &L->s, N, L->zt, 1);
    else plan_monarch_layer(p, NULL, &L->m, N, L->zt, 1);
}
static void small_backward_plan(const SmallLayer *L, Plan *p, int N) {
    if (L->what[0] == 'b') plan_btt_layer(NULL, p, &L->s, N, L->zt, 1);
    else plan_monarch_layer(NULL, p, &L->m, N, L->zt, 1);
}

// The CPU layer's forward (y, z) and backward (dx; dW0, dW1 accumulated) on N rows.
static void small_layer_ref(const SmallLayer *L, int N, const float *x, const float *W0, const float *W1, const float *bias, const float *dy,
                            float *y, float *z, float *dx, float *dW0, float *dW1) {
    if (L->what[0] == 'b') {
        float *scr = zeros(btt_scratch_size(&L->s, N));
        btt_forward(y, z, x, W0, W1, bias, N, &L->s);
        btt_backward(dx, dW0, dW1, NULL, dy, x, z, W0, W1, N, &L->s, scr);
        free(scr);
    } else {
        float *scr = zeros(monarch_scratch_size(&L->m, N));
        monarch_forward(y, z, x, W0, W1, bias, N, &L->m);
        monarch_backward(dx, dW0, dW1, NULL, dy, x, z, W0, W1, N, &L->m, scr);
        free(scr);
    }
}

// The epilogues on the layer's last op (plan_set_epilogue): forward y = GELU(layer(x) + b) with
// the pre-activation kept, and the plain bias; backward dx times GELU' of a given pre-activation.
// BTT's last forward op is a batched GEMM over column blocks (bias per block), Monarch's a permute.
static void test_epilogues(int kind, int N) {
    const SmallLayer L = small_layer(kind);
    const int din = L.din, dout = L.dout;
    const size_t n0 = L.n0, n1 = L.n1, zrow = L.zrow, t2row = L.t2row, t3row = L.t3row;
    const char *what = L.what;
    float *x = randn((size_t)N * din, 1.0f), *W0 = randn(n0, 0.3f), *W1 = randn(n1, 0.3f), *dy = randn((size_t)N * dout, 1.0f);
    float *bias = randn(dout, 0.5f), *pre_in = randn((size_t)N * din, 1.0f);
    float *y_ref = zeros((size_t)N * dout), *z_ref = zeros((size_t)N * zrow), *dx_ref = zeros((size_t)N * din);
    float *dW0 = zeros(n0), *dW1 = zeros(n1);
    small_layer_ref(&L, N, x, W0, W1, bias, dy, y_ref, z_ref, dx_ref, dW0, dW1);
    float *gy_ref = zeros((size_t)N * dout);
    for (size_t i = 0; i < (size_t)N * dout; i++) gy_ref[i] = gelu_ref(y_ref[i]);
    for (size_t i = 0; i < (size_t)N * din; i++) dx_ref[i] *= gelu_grad_ref(pre_in[i]);
    for (int gelu = 0; gelu <= 1; gelu++) {
        float *buf[PB_COUNT] = {0};
        buf[PB_X] = x; buf[PB_W0] = W0; buf[PB_W1] = W1; buf[PB_DY] = dy; buf[PB_BIAS] = bias;
        buf[PB_Y] = zeros((size_t)N * dout); buf[PB_Z] = zeros((size_t)N * zrow); buf[PB_DX] = zeros((size_t)N * din);
        buf[PB_DW0] = zeros(n0); buf[PB_DW1] = zeros(n1); buf[PB_PRE] = zeros((size_t)N * dout);
        buf[PB_T1] = zeros((size_t)N * zrow); buf[PB_T2] = zeros((size_t)N * t2row); buf[PB_T3] = zeros((size_t)N * t3row);
        buf[PB_W0R] = zeros(n0); buf[PB_DW0R] = zeros(n0);
        Plan p = {0};
        small_forward_plan(&L, &p, N);
        char name[160];
        snprintf(name, sizeof(name), "%s: the forward's last op takes the %s epilogue", what, gelu ? "bias + GELU" : "bias");
        check_true(plan_set_epilogue(&p, PB_Y, PLAN_EPI_BIAS | (gelu ? PLAN_EPI_GELU : 0)), name, "refused");
        run_plan(&p, buf);
        snprintf(name, sizeof(name), "%s: y %s", what, gelu ? "= GELU(layer(x) + b)" : "= layer(x) + b");
        check_close(buf[PB_Y], gelu ? gy_ref : y_ref, (size_t)N * dout, 1e-4f, 1e-4f, name);
        if (gelu) {
            snprintf(name, sizeof(name), "%s: the pre-activation layer(x) + b kept", what);
            check_close(buf[PB_PRE], y_ref, (size_t)N * dout, 1e-4f, 1e-4f, name);
            p.n = 0;
            buf[PB_PRE] = pre_in;
            small_backward_plan(&L, &p, N);
            snprintf(name, sizeof(name), "%s: the backward's dx GEMM takes the DGELU epilogue", what);
            check_true(plan_set_epilogue(&p, PB_DX, PLAN_EPI_DGELU), name, "refused");
            run_plan(&p, buf);
            snprintf(name, sizeof(name), "%s: dx = (dy W^T) GELU'(pre)", what);
            check_close(buf[PB_DX], dx_ref, (size_t)N * din, 1e-4f, 1e-4f, name);
            buf[PB_PRE] = NULL;
        }
        for (int i = 0; i < PB_COUNT; i++)
            if (i != PB_X && i != PB_W0 && i != PB_W1 && i != PB_DY && i != PB_BIAS) free(buf[i]);
    }
    free(x); free(W0); free(W1); free(dy); free(bias); free(pre_in); free(y_ref); free(z_ref); free(dx_ref); free(dW0); free(dW1); free(gy_ref);
}

// A layer writing its output into, and reading its output gradient from, the middle column block
// of rows three outputs wide (plan_set_ld), and adding its dx to what is there
// (plan_set_accumulate): q, k and v in the qkv buffer. Nothing outside the block may change.
static void test_strided(int kind, int N) {
    const SmallLayer L = small_layer(kind);
    const int din = L.din, dout = L.dout;
    const size_t n0 = L.n0, n1 = L.n1, zrow = L.zrow, t2row = L.t2row, t3row = L.t3row;
    const char *what = L.what;
    const int wide = 3 * dout;
    float *x = randn((size_t)N * din, 1.0f), *W0 = randn(n0, 0.3f), *W1 = randn(n1, 0.3f), *dyw = randn((size_t)N * wide, 1.0f);
    float *dy = zeros((size_t)N * dout), *dx0 = randn((size_t)N * din, 1.0f);
    for (int r = 0; r < N; r++) memcpy(dy + (size_t)r * dout, dyw + (size_t)r * wide + dout, sizeof(float) * dout);
    float *y_ref = zeros((size_t)N * dout), *z_ref = zeros((size_t)N * zrow), *dx_ref = zeros((size_t)N * din), *g0 = zeros(n0), *g1 = zeros(n1);
    small_layer_ref(&L, N, x, W0, W1, NULL, dy, y_ref, z_ref, dx_ref, g0, g1);
    float *yw = randn((size_t)N * wide, 1.0f), *yw0 = copyf(yw, (size_t)N * wide), *dxw = copyf(dx0, (size_t)N * din);
    float *buf[PB_COUNT] = {0};
    buf[PB_X] = x; buf[PB_W0] = W0; buf[PB_W1] = W1; buf[PB_DY] = dyw + dout; buf[PB_Y] = yw + dout; buf[PB_DX] = dxw;
    buf[PB_Z] = zeros((size_t)N * zrow); buf[PB_DW0] = zeros(n0); buf[PB_DW1] = zeros(n1);
    buf[PB_T1] = zeros((size_t)N * zrow); buf[PB_T2] = zeros((size_t)N * t2row); buf[PB_T3] = zeros((size_t)N * t3row);
    buf[PB_W0R] = zeros(n0); buf[PB_DW0R] = zeros(n0);
    Plan p = {0};
    small_forward_plan(&L, &p, N);
    plan_set_ld(&p, PB_Y, wide);
    run_plan(&p, buf);
    p.n = 0;
    small_backward_plan(&L, &p, N);
    plan_set_ld(&p, PB_DY, wide);
    char name[160];
    snprintf(name, sizeof(name), "%s: the dx GEMM accumulates", what);
    check_true(plan_set_accumulate(&p, PB_DX), name, "refused");
    run_plan(&p, buf);
    float *yblock = zeros((size_t)N * dout);
    int outside = 0;
    for (int r = 0; r < N; r++)
        for (int j = 0; j < wide; j++) {
            const float v = yw[(size_t)r * wide + j];
            if (j >= dout && j < 2 * dout) yblock[(size_t)r * dout + j - dout] = v;
            else outside += v != yw0[(size_t)r * wide + j];
        }
    snprintf(name, sizeof(name), "%s: y written into the middle third of rows 3 outputs wide", what);
    check_close(yblock, y_ref, (size_t)N * dout, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s: nothing outside that block written", what);
    check_true(outside == 0, name, "it was");
    for (size_t i = 0; i < (size_t)N * din; i++) dx_ref[i] += dx0[i];
    snprintf(name, sizeof(name), "%s: dx from the middle third of dy, added to dx", what);
    check_close(dxw, dx_ref, (size_t)N * din, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s: dW0 from the middle third of dy", what);
    check_close(buf[PB_DW0], g0, n0, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s: dW1 from the middle third of dy", what);
    check_close(buf[PB_DW1], g1, n1, 1e-4f, 1e-4f, name);
    free(buf[PB_Z]); free(buf[PB_DW0]); free(buf[PB_DW1]); free(buf[PB_T1]); free(buf[PB_T2]); free(buf[PB_T3]); free(buf[PB_W0R]); free(buf[PB_DW0R]);
    free(x); free(W0); free(W1); free(dyw); free(dy); free(dx0); free(y_ref); free(z_ref); free(dx_ref); free(g0); free(g1);
    free(yw); free(yw0); free(dxw); free(yblock);
}

// exec_model.h against what the H200 measured (dev/bench/RESULTS.md, the second run, dfb9d13:
// one layer d -> 4d, forward + backward, N = 32768, the plans with -sk 0; dense alone): every
// modelled time within 25% of the measured one, and -sm 2's choice the measured one wherever the
// plans were more than 25% faster or slower than dense (in between, either is about as good).
static void test_exec_model(void) {
    typedef struct { int d, kind, rank_or_blocks; double ms; } Measured;  // kind: 0 dense, else STRUCT_BTT / STRUCT_MONARCH
    const Measured h200[] = {
        {768, 0, 0, 0.612},   {1024, 0, 0, 1.054},  {2048, 0, 0, 4.226},  {4096, 0, 0, 19.291},
        {768, STRUCT_BTT, 1, 0.710},  {768, STRUCT_BTT, 2, 0.979},  {768, STRUCT_BTT, 4, 1.519},
        {768, STRUCT_MONARCH, 4, 1.137}, {768, STRUCT_MONARCH, 24, 0.723},
        {1024, STRUCT_BTT, 1, 0.764}, {1024, STRUCT_BTT, 2, 1.117}, {1024, STRUCT_BTT, 4, 1.885},
        {1024, STRUCT_MONARCH, 4, 1.531}, {1024, STRUCT_MONARCH, 32, 0.939},
        {2048, STRUCT_BTT, 1, 1.433}, {2048, STRUCT_BTT, 2, 2.149}, {2048, STRUCT_BTT, 4, 3.667}, {2048, STRUCT_MONARCH, 4, 3.477},
        {4096, STRUCT_BTT, 1, 2.688}, {4096, STRUCT_BTT, 2, 4.156}, {4096, STRUCT_BTT, 4, 7.468}, {4096, STRUCT_MONARCH, 4, 9.829},
    };
    const PlanRates r = plan_rates(989.0, 4800.0);  // the H200's datasheet peaks
    const int N = 32768;
    const size_t n = sizeof(h200) / sizeof(h200[0]);
    for (size_t i = 0; i < n; i++) {
        const Measured *e = &h200[i];
        const int din = e->d, dout = 4 * e->d;
        BTTShape b;
        MonarchShape m;
        const void *shape = NULL;
        char what[64], name[160], why[160];
        double model;
        if (e->kind == 0) {
            model = st_dense_gemms_seconds(din, dout, N, &r) * 1e3;
            snprintf(what, sizeof(what), "dense %d->%d", din, dout);
        } else {
            if (e->kind == STRUCT_BTT) {
                int a, g, p, q;
                default_factors(din, &a, &g);
                default_factors(dout, &p, &q);
                btt_shape(&b, a, g, p, q, e->rank_or_blocks);
                shape = &b;
                snprintf(what, sizeof(what), "btt r%d %d->%d", e->rank_or_blocks, din, dout);
            } else {
                monarch_shape(&m, din, dout, e->rank_or_blocks);
                shape = &m;
                snprintf(what, sizeof(what), "monarch %d blocks %d->%d", e->rank_or_blocks, din, dout);
            }
            model = st_plans_seconds(e->kind, shape, N, 0, &r) * 1e3;
            // -sk 4's plans (z, u stored transposed) move fewer bytes: priced below -sk 0's, not below half
            const double zt = st_plans_seconds(e->kind, shape, N, 1, &r) * 1e3;
            snprintf(name, sizeof(name), "exec_model: %s, N = %d, -sk 4's plans priced below -sk 0's", what, N);
            snprintf(why, sizeof(why), "-sk 4 %.3f ms, -sk 0 %.3f ms", zt, model);
            check_true(zt < model && zt > 0.5 * model, name, why);
        }
        snprintf(name, sizeof(name), "exec_model: %s%s, N = %d, within 25%% of the H200's measured time", what, e->kind ? " on the plans" : "", N);
        snprintf(why, sizeof(why), "modelled %.3f ms, measured %.3f ms", model, e->ms);
        check_true(model > 0.75 * e->ms && model < 1.25 * e->ms, name, why);
        if (e->kind == 0) continue;
        double dense = 0.0;
        for (size_t j = 0; j < n; j++)
            if (h200[j].kind == 0 && h200[j].d == e->d) dense = h200[j].ms;
        const double ratio = e->ms / dense;
        if (ratio > 0.8 && ratio < 1.25) continue;
        const int pick = st_as_dense_pays(e->kind, shape, N, 0, &r), want = ratio >= 1.25;
        snprintf(name, sizeof(name), "exec_model: -sm 2 runs %s %s (measured %.2fx dense's time on the plans)", what,
                 want ? "as dense" : "on the plans", ratio);
        snprintf(why, sizeof(why), "modelled plans %.3f ms, materialized %.3f ms", st_plans_seconds(e->kind, shape, N, 0, &r) * 1e3,
                 st_materialized_seconds(e->kind, shape, N, &r) * 1e3);
        check_true(pick == want, name, why);
    }
    // a GPU not in the peak table keeps the H200's ratio of GEMM rate to bandwidth
    const PlanRates u = plan_rates(0.0, 2400.0);
    char why[96];
    snprintf(why, sizeof(why), "%.1f vs %.1f FLOP per byte", u.gemm_flops / u.dram_bytes, r.gemm_flops / r.dram_bytes);
    check_true(fabs(u.gemm_flops / u.dram_bytes - r.gemm_flops / r.dram_bytes) < 1e-6 * (r.gemm_flops / r.dram_bytes),
               "exec_model: a GPU without a known peak gets the H200's FLOP per byte", why);
}

// BTT-MoE's sets of experts (-mg, gpu_plan.h): the tables number every K-subset once, in the
// order moe_set_rank gives them (the GPU's set-id kernel uses that function), each expert's
// memberships list exactly its sets in ascending order; moe_set_count's limits; and the model of
// the two groupings (exec_model.h, st_moe_seconds): by set cheaper at GPT-2's 32K tokens, not at
// a few tokens a set (padding to whole tiles).
static void test_moe_sets(void) {
    const int cases[][2] = {{8, 2}, {6, 4}, {10, 4}, {12, 8}, {5, 2}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        const int E = cases[c][0], K = cases[c][1], S = (int)moe_binom(E, K), per = (int)moe_binom(E - 1, K - 1);
        int *se = (int *)mallocCheck(sizeof(int) * S * K), *mem = (int *)mallocCheck(sizeof(int) * E * per);
        moe_set_tables(se, mem, E, K);
        int ok = 1;
        unsigned char *seen = (unsigned char *)callocCheck((size_t)1 << E, 1);
        for (int q = 0; q < S && ok; q++) {
            unsigned mask = 0;
            for (int j = 0; j < K; j++) {
                ok &= se[q * K + j] >= 0 && se[q * K + j] < E && (j == 0 || se[q * K + j] > se[q * K + j - 1]);
                mask |= 1u << se[q * K + j];
            }
            ok &= !seen[mask] && moe_set_rank(se + q * K, K) == q;
            seen[mask] = 1;
        }
        for (int e = 0; e < E && ok; e++) {
            int found = 0;
            for (int q = 0; q < S; q++)
                for (int j = 0; j < K; j++)
                    if (se[q * K + j] == e) {
                        ok &= found < per && mem[e * per + found] == q * K + j;
                        found++;
                    }
            ok &= found == per;
        }
        char name[128];
        snprintf(name, sizeof(name), "moe sets: %d experts top %d: %d sets, each once, numbered by moe_set_rank; %d per expert", E, K, S, per);
        check_true(ok, name, "a set, a number or a membership differs");
        free(se); free(mem); free(seen);
    }
    MoEShape s;
    const int counts[][4] = {{8, 2, 28, 0}, {8, 1, 0, 0}, {8, 3, 0, 0}, {45, 2, 990, 0}, {64, 2, 0, 0}, {16, 8, 0, 0}, {12, 4, 495, 0}};
    for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) {
        moe_shape_default(&s, 768, 3072, counts[i][0], counts[i][1]);
        char name[128], why[64];
        snprintf(name, sizeof(name), "moe sets: %d experts top %d take %d sets (0: not the set path)", counts[i][0], counts[i][1], counts[i][2]);
        snprintf(why, sizeof(why), "%d", moe_set_count(&s));
        check_true(moe_set_count(&s) == counts[i][2], name, why);
    }
    const PlanRates r = plan_rates(989.0, 4800.0);  // the H200's datasheet peaks
    const int dims[][3] = {{768, 3072, 32768}, {3072, 768, 32768}, {1024, 4096, 32768}};
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++) {
        moe_shape_default(&s, dims[i][0], dims[i][1], 8, 2);
        const int N = dims[i][2];
        const double ex = st_moe_seconds(&s, N, 0, &r), st = st_moe_seconds(&s, N, 1, &r);
        char name[160], why[96];
        snprintf(name, sizeof(name), "exec_model: btt_moe 8/top-2 %d->%d, N = %d: grouped by set priced below by expert", dims[i][0], dims[i][1], N);
        snprintf(why, sizeof(why), "by set %.3f ms, by expert %.3f ms", st * 1e3, ex * 1e3);
        check_true(st < ex && st_moe_sets_pay(&s, N, &r), name, why);
    }
    moe_shape_default(&s, 768, 3072, 8, 2);
    {
        const int N = 1024;  // 37 tokens a set: most of each 64-row tile is padding
        char why[96];
        snprintf(why, sizeof(why), "by set %.3f ms, by expert %.3f ms", st_moe_seconds(&s, N, 1, &r) * 1e3, st_moe_seconds(&s, N, 0, &r) * 1e3);
        check_true(!st_moe_sets_pay(&s, N, &r), "exec_model: btt_moe 8/top-2 768->3072, N = 1024: -mg 2 keeps the grouping by expert", why);
    }
}

// plan_op_describe, which -pt 2 and plan_ops name the ops by: every buffer named, no two alike, and
// the BTT plans' ops described as written by hand (-sk 0's forward: GEMM, permute of z, GEMM;
// -sk 4's at rank 2: W0's columns reordered, then z transposed by the GEMMs)
static void test_op_describe(void) {
    int named = 1;
    for (int i = 0; i < PB_COUNT; i++) {
        if (!plan_buf_names[i] || !plan_buf_names[i][0]) named = 0;
        for (int j = 0; j < i; j++)
            if (named && strcmp(plan_buf_names[i], plan_buf_names[j]) == 0) named = 0;
    }
    check_true(named, "op names: every plan buffer has its own name", "a buffer unnamed or two alike");
    BTTShape s;
    btt_shape(&s, 16, 48, 32, 96, 1);
    Plan f, z;
    memset(&f, 0, sizeof(f));
    memset(&z, 0, sizeof(z));
    plan_btt_forward(&f, &s, 64, 0);
    btt_shape(&s, 16, 48, 32, 96, 2);
    plan_btt_forward_zt(&z, &s, 64);
    const char *want_f[] = {"gemm T1 = x * W0", "permute T1 -> z", "gemm y = z * W1"};
    const char *want_z[] = {"permute W0 -> W0r", "gemm z = W0r^T * x^T", "gemm y = z^T * W1"};
    char got[64], why[256] = "";
    int ok = f.n == 3 && z.n == 3;
    for (int i = 0; ok && i < 3; i++) {
        plan_op_describe(&f.op[i], got, sizeof(got));
        if (strcmp(got, want_f[i]) != 0) { ok = 0; snprintf(why, sizeof(why), "-sk 0 op %d: '%s', want '%s'", i + 1, got, want_f[i]); }
        plan_op_describe(&z.op[i], got, sizeof(got));
        if (ok && strcmp(got, want_z[i]) != 0) { ok = 0; snprintf(why, sizeof(why), "-sk 4 op %d: '%s', want '%s'", i + 1, got, want_z[i]); }
    }
    if (f.n != 3 || z.n != 3) snprintf(why, sizeof(why), "%d and %d ops", f.n, z.n);
    check_true(ok, "op names: BTT's forward ops on -sk 0 (rank 1) and -sk 4 (rank 2) read as written by hand", why);
}

int main(void) {
    mt_seed(&g_rng, 1234);
    test_permute_index();
    test_btt(16, 48, 32, 96, 1, 37);  // 768 -> 3072, the GPT-2 fc shape
    test_btt(32, 24, 48, 16, 1, 9);   // 768 -> 768 with non-default factors
    test_btt(4, 6, 5, 3, 2, 13);      // small, rank 2, non-square
    test_btt(8, 4, 6, 10, 4, 21);     // rank 4
    for (int ut = 0; ut <= 1; ut++) {  // -sk 0's plans, -sk 4's
        test_monarch(64, 64, 4, 19, ut);
        test_monarch(48, 96, 4, 11, ut);  // d_out > d_in: q = p
        test_monarch(96, 48, 8, 7, ut);   // d_in > d_out: q = s
    }
    test_monarch_btt(64, 64, 4, 19);   // rank 4
    test_monarch_btt(48, 96, 4, 11);   // q = p = 12: rank 3
    test_monarch_btt(96, 48, 4, 7);    // q = s = 12
    test_monarch_btt(64, 64, 8, 9);    // q = nb: rank 1, the plans' one dR GEMM
    test_btt_zt(16, 48, 32, 96, 1, 37, 1);  // -sk 4: 768 -> 3072
    test_btt_zt(32, 96, 16, 48, 1, 9, 0);   // 3072 -> 768, weight gradients overwritten
    test_btt_zt(4, 6, 5, 3, 1, 13, 1);      // small, non-square
    test_btt_zt(4, 6, 5, 3, 2, 13, 1);      // rank 2: W0 reordered, dW0 through its reordered copy
    test_btt_zt(4, 6, 5, 3, 2, 11, 0);      // the same overwriting the weight gradients
    test_btt_zt(8, 4, 6, 10, 4, 21, 1);     // rank 4
    test_btt_zt(16, 48, 32, 96, 2, 9, 1);   // 768 -> 3072 rank 2
    for (int zt = 0; zt <= 1; zt++) {      // the plans of -sk 0, of -sk 4 (each tile's z transposed)
        test_moe(4, 6, 5, 3, 4, 2, 23, 4, zt);  // experts of several 4-row tiles, the last partial
        test_moe(8, 4, 6, 10, 8, 2, 40, 8, zt);
        test_moe(4, 4, 4, 4, 3, 3, 10, 3, zt);  // top-k = E
        test_moe(4, 6, 5, 3, 8, 1, 5, 2, zt);   // fewer tokens than experts: empty experts, no tiles
        test_moe(4, 6, 5, 3, 4, 2, 23, 1, zt);  // tiles of one row: no padding
    }
    test_moe_tiles();
    test_epilogues(0, 7);
    test_epilogues(1, 5);
    test_strided(0, 7);
    test_strided(1, 5);
    for (int kind = 2; kind <= 3; kind++) {  // -sk 4's plans
        test_epilogues(kind, 7);
        test_strided(kind, 6);
    }
    test_route_only();
    test_activation_elems();
    test_exec_model();
    test_moe_sets();
    test_op_describe();
    return test_summary();
}
