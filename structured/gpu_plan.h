// gpu_plan.h: the GPU baseline of the structured layers as data: each forward/backward is a short
// list of strided-batched GEMMs and per-row blocked transposes over named buffers, built on the
// host and executed either by cuBLAS (structured/plan_gpu.cuh) or by the CPU emulation in
// tests/test_gpu_plan.c, which checks every stride and offset against btt.h, monarch.h and moe.h.
//
// Why a plan: a BTT or Monarch layer is two batched GEMMs and a transpose between them, and every
// bug worth fearing is an index (a leading dimension, a batch stride, a row offset). Writing those
// once, as data, lets a machine with no GPU prove them; the CUDA side only binds pointers.
//
// Conventions (as factor.h): row-major; an op's C (M x N) = op(A) (M x K) · op(B) (K x N) [+ C],
// batched: the b-th product uses A + b·sa, B + b·sb, C + b·sc. plan_to_cublas turns it into the
// column-major arguments of cublasGemmStridedBatchedEx. A permute op is btt.h's st_transpose on
// each row: the row of src viewed as [R][C][blk] is written to dst as [C][R][blk].
// Header-only C11 that also compiles as CUDA C++.
#pragma once
#include <stddef.h>
#include <stdio.h>
#include "btt.h"
#include "monarch.h"
#include "moe.h"

// The buffers a plan names. Row buffers hold `rows` rows; W0/W1 (and their gradients) are the
// structure's two cores (btt: W0, W1; monarch: R, L; a BTT-MoE expert: its extracted rank-1
// cores). T1..T3 are scratch with the sizes st_plan_scratch gives. BIAS (d_out) and PRE (the
// GELU's pre-activation, shaped as the output it belongs to) only for an op's epilogue. W0R and
// DW0R: scratch copies of W0 and its gradient with W0's columns reordered (-sk 4's BTT plans at
// rank > 1), core-sized.
typedef enum { PB_X, PB_Y, PB_Z, PB_W0, PB_W1, PB_DY, PB_DX, PB_DW0, PB_DW1, PB_T1, PB_T2, PB_T3, PB_BIAS, PB_PRE, PB_W0R, PB_DW0R, PB_COUNT } PlanBuf;

// The buffers' names, for descriptions of the ops.
static const char *const plan_buf_names[PB_COUNT] = {"x",  "y",  "z",  "W0",   "W1",  "dy",  "dx",  "dW0",
                                                     "dW1", "T1", "T2", "T3", "bias", "pre", "W0r", "dW0r"};

// What the op that writes a layer's output does to it on the way (plan_set_epilogue): add the
// bias (output column j gets BIAS[j]); write the sum to PRE and its GELU to the output; or, on
// the backward's dx, multiply by GELU' of PRE. Flags; GELU and DGELU exclude each other.
enum { PLAN_EPI_BIAS = 1, PLAN_EPI_GELU = 2, PLAN_EPI_DGELU = 4 };

typedef enum { PLAN_GEMM, PLAN_PERMUTE } PlanOpKind;

typedef struct {
    PlanOpKind kind;
    // GEMM (row-major): C = op(A) op(B) (+ C when beta = 1), batch products
    int ta, tb, M, N, K, batch, beta;
    int a, b, c;                 // PlanBuf
    size_t a_off, b_off, c_off;  // elements from the buffer's start
    int lda, ldb, ldc;
    long long sa, sb, sc;
    // PERMUTE: for each of `rows` rows, src row [R][C][blk] -> dst row [C][R][blk]
    int src, dst, rows, R, C, blk;
    size_t src_off, dst_off;
    int src_ld, dst_ld;
    // Tiled (plan_tile; 0 tiles: not tiled): the op runs on `tiles` tiles of tile_rows rows. A
    // GEMM's operand k (0: A, 1: B, 2: C) in tile i of expert e starts ts[k]·i + es[k]·e elements
    // further on; c_f32: C is an fp32 buffer. A permute covers the tiles in use.
    int tiles, tile_rows, c_f32;
    long long ts[3], es[3];
    // Epilogue (PLAN_EPI_*) on the output (C, or a permute's dst): bias element of output column j
    // of batch entry b is BIAS[b·bias_stride + j]; PRE has the output's offsets and strides.
    int epi;
    long long bias_stride;
} PlanOp;

// One line on what op o computes, e.g. "gemm T1 = x * W0^T" or "permute T1 -> z" (the profiles'
// and plan_ops' names of the op).
static inline void plan_op_describe(const PlanOp *o, char *out, size_t n) {
    if (o->kind == PLAN_GEMM)
        snprintf(out, n, "gemm %s %s %s%s * %s%s", plan_buf_names[o->c], o->beta ? "+=" : "=", plan_buf_names[o->a], o->ta ? "^T" : "",
                 plan_buf_names[o->b], o->tb ? "^T" : "");
    else
        snprintf(out, n, "permute %s -> %s", plan_buf_names[o->src], plan_buf_names[o->dst]);
}

#define PLAN_MAX_OPS 8
typedef struct {
    PlanOp op[PLAN_MAX_OPS];
    int n;
} Plan;

static inline PlanOp *plan_push(Plan *p, PlanOpKind kind) {
    if (p->n >= PLAN_MAX_OPS) fatal("internal: structured plan longer than %d ops", PLAN_MAX_OPS);
    PlanOp *o = &p->op[p->n++];
    memset(o, 0, sizeof(*o));
    o->kind = kind;
    return o;
}

static inline void plan_gemm(Plan *p, int ta, int tb, int M, int N, int K, int a, size_t a_off, int lda, long long sa, int b,
                             size_t b_off, int ldb, long long sb, int c, size_t c_off, int ldc, long long sc, int batch, int beta) {
    if (M <= 0 || N <= 0 || K <= 0 || batch <= 0) return;  // nothing to compute (an expert with no tokens)
    PlanOp *o = plan_push(p, PLAN_GEMM);
    o->ta = ta; o->tb = tb; o->M = M; o->N = N; o->K = K; o->batch = batch; o->beta = beta;
    o->a = a; o->a_off = a_off; o->lda = lda; o->sa = sa;
    o->b = b; o->b_off = b_off; o->ldb = ldb; o->sb = sb;
    o->c = c; o->c_off = c_off; o->ldc = ldc; o->sc = sc;
}

static inline void plan_permute(Plan *p, int src, size_t src_off, int src_ld, int dst, size_t dst_off, int dst_ld, int rows, int R, int C,
                                int blk) {
    if (rows <= 0) return;
    PlanOp *o = plan_push(p, PLAN_PERMUTE);
    o->src = src; o->src_off = src_off; o->src_ld = src_ld;
    o->dst = dst; o->dst_off = dst_off; o->dst_ld = dst_ld;
    o->rows = rows; o->R = R; o->C = C; o->blk = blk;
}

// ----------------------------------------------------------------------------------------------
// BTT (btt.h's math and saved-z layout). Rows [row0, row0 + n) of the row buffers; row strides:
// X d_in, Y and DY d_out, DX d_in, Z/T1/T2 zrow = gamma·phi·rho.

// y = BTT(x) (no bias): Z1 (T1, layout (gamma, phi, rho)) = X_g · W0[g]; Z = transpose; Y_f = Z_f · W1[f].
// The forward's last op alone: Y_f = Z_f · W1[f] from the saved z (-sk 3: the fused kernel's
// stage 1 wrote z).
static inline void plan_btt_forward_from_z(Plan *p, const BTTShape *s, int n, int row0) {
    const int G = s->gamma, P = s->phi, E = s->eps, R = s->rank, gr = G * R, zrow = G * P * R;
    const size_t r0 = (size_t)row0;
    plan_gemm(p, 0, 0, n, E, gr, PB_Z, r0 * zrow, zrow, gr, PB_W1, 0, E, (long long)gr * E, PB_Y, r0 * s->d_out, s->d_out, E, P, 0);
}
static inline void plan_btt_forward(Plan *p, const BTTShape *s, int n, int row0) {
    const int A = s->alpha, G = s->gamma, P = s->phi, R = s->rank, fr = P * R, zrow = G * P * R;
    const size_t r0 = (size_t)row0;
    plan_gemm(p, 0, 0, n, fr, A, PB_X, r0 * s->d_in, s->d_in, A, PB_W0, 0, fr, (long long)A * fr, PB_T1, r0 * zrow, zrow, fr, G, 0);
    plan_permute(p, PB_T1, r0 * zrow, zrow, PB_Z, r0 * zrow, zrow, n, G, P, R);
    plan_btt_forward_from_z(p, s, n, row0);
}

// First half of the backward: T2 = dZ in the (phi, gamma, rho) layout = dY_f · W1[f]^T. (BTT-MoE
// scales it by the gate here, before the second half.)
static inline void plan_btt_backward_dz(Plan *p, const BTTShape *s, int n, int row0) {
    const int G = s->gamma, P = s->phi, E = s->eps, R = s->rank, gr = G * R, zrow = G * P * R;
    const size_t r0 = (size_t)row0;
    plan_gemm(p, 0, 1, n, gr, E, PB_DY, r0 * s->d_out, s->d_out, E, PB_W1, 0, E, (long long)gr * E, PB_T2, r0 * zrow, zrow, gr, P, 0);
}

// The weight gradients from T1 = dZ in the (gamma, phi, rho) layout: DW1[f] (+)= Z_f^T dY_f;
// DW0[g] (+)= X_g^T T1_g (beta_w: 1 accumulates, 0 overwrites). Also the fused backward's last
// step (its kernel leaves dX and T1).
static inline void plan_btt_backward_weights(Plan *p, const BTTShape *s, int n, int row0, int beta_w) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, R = s->rank, fr = P * R, gr = G * R, zrow = G * P * R;
    const size_t r0 = (size_t)row0;
    plan_gemm(p, 1, 0, gr, E, n, PB_Z, r0 * zrow, zrow, gr, PB_DY, r0 * s->d_out, s->d_out, E, PB_DW1, 0, E, (long long)gr * E, P, beta_w);
    plan_gemm(p, 1, 0, A, fr, n, PB_X, r0 * s->d_in, s->d_in, A, PB_T1, r0 * zrow, zrow, fr, PB_DW0, 0, fr, (long long)A * fr, G, beta_w);
}

// From T1 = dZ in the (gamma, phi, rho) layout: DX_g = T1_g · W0[g]^T (overwritten, when want_dx),
// then the weight gradients (-sk 3: the fused kernel's stage 1 on dy wrote T1).
static inline void plan_btt_backward_from_t1(Plan *p, const BTTShape *s, int n, int row0, int want_dx, int beta_w) {
    const int A = s->alpha, G = s->gamma, P = s->phi, R = s->rank, fr = P * R, zrow = G * P * R;
    const size_t r0 = (size_t)row0;
    if (want_dx)
        plan_gemm(p, 0, 1, n, A, fr, PB_T1, r0 * zrow, zrow, fr, PB_W0, 0, fr, (long long)A * fr, PB_DX, r0 * s->d_in, s->d_in, A, G, 0);
    plan_btt_backward_weights(p, s, n, row0, beta_w);
}
// Second half: T1 = T2 transposed to (gamma, phi, rho), then as above.
static inline void plan_btt_backward_rest(Plan *p, const BTTShape *s, int n, int row0, int want_dx, int beta_w) {
    const int G = s->gamma, P = s->phi, R = s->rank, zrow = G * P * R;
    const size_t r0 = (size_t)row0;
    plan_permute(p, PB_T2, r0 * zrow, zrow, PB_T1, r0 * zrow, zrow, n, P, G, R);
    plan_btt_backward_from_t1(p, s, n, row0, want_dx, beta_w);
}

// -sk 4: z stored transposed, zrow rows of n tokens each (element (c, t) of a layer's n rows at
// c·n + t), row c = (g·rho + r)·phi + f. Stage 1 writes each Z1_g transposed (one GEMM per g, its
// rho·phi rows consecutive), stage 2 reads Z_f transposed as the rows (g·rho + r)·phi + f, one
// row stride (phi·n) over W1[f]'s row index g·rho + r: the two GEMMs meet without a permute, and
// so do the backward's dZ GEMM and its readers. Stage 1's rows come out in the order of W0[g]'s
// columns, (phi, rho) in the parameters: with rho > 1 the plans first copy W0 into W0R with each
// of its G·alpha rows transposed to (rho, phi) (a permute of |W0| elements, not of z), and take
// dW0 through DW0R the same way back. The buffers' rows are the layer's n rows exactly (built at
// row 0). Scratch: T1 (zrow·n, the backward's dZ), W0R and DW0R (|W0| each, rho > 1).
static inline void plan_btt_w0_reorder(Plan *p, const BTTShape *s, int src, int dst, int to_rf) {
    const int fr = s->phi * s->rank;
    if (to_rf) plan_permute(p, src, 0, fr, dst, 0, fr, s->gamma * s->alpha, s->phi, s->rank, 1);  // [phi][rho] -> [rho][phi]
    else plan_permute(p, src, 0, fr, dst, 0, fr, s->gamma * s->alpha, s->rank, s->phi, 1);        // and back
}

static inline void plan_btt_forward_zt(Plan *p, const BTTShape *s, int n) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, R = s->rank, fr = P * R, gr = G * R;
    const int w0 = R > 1 ? PB_W0R : PB_W0;  // W0 with its columns in (rho, phi) order
    if (R > 1) plan_btt_w0_reorder(p, s, PB_W0, PB_W0R, 1);
    // Zt_g (fr x n) = W0'[g]^T (fr x A) . X_g^T (A x n): Z's rows from g·fr, in (rho, phi) order
    plan_gemm(p, 1, 1, fr, n, A, w0, 0, fr, (long long)A * fr, PB_X, 0, s->d_in, A, PB_Z, 0, n, (long long)fr * n, G, 0);
    // Y_f (n x E) = Z_f (n x gr) . W1[f] (gr x E), Z_f = the transpose of Z's rows (g·rho + r)·phi + f
    plan_gemm(p, 1, 0, n, E, gr, PB_Z, 0, P * n, n, PB_W1, 0, E, (long long)gr * E, PB_Y, 0, s->d_out, E, P, 0);
}

// The backward on z stored transposed; T1 = dZ stored the same way (zrow x n). Its first op
// alone (BTT-MoE scales dZ by the gate between the two), then the rest.
static inline void plan_btt_backward_zt_dz(Plan *p, const BTTShape *s, int n) {
    const int G = s->gamma, P = s->phi, E = s->eps, gr = G * s->rank;
    // dZt_f (gr x n) = W1[f] (gr x E) . dY_f^T (E x n), into T1's rows (g·rho + r)·phi + f
    plan_gemm(p, 0, 1, gr, n, E, PB_W1, 0, E, (long long)gr * E, PB_DY, 0, s->d_out, E, PB_T1, 0, P * n, n, P, 0);
}
static inline void plan_btt_backward_zt_rest(Plan *p, const BTTShape *s, int n, int want_dx, int beta_w) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, R = s->rank, fr = P * R, gr = G * R;
    const int w0 = R > 1 ? PB_W0R : PB_W0, dw0 = R > 1 ? PB_DW0R : PB_DW0;
    if (R > 1 && want_dx) plan_btt_w0_reorder(p, s, PB_W0, PB_W0R, 1);
    // dX_g (n x A) = dZ_g (n x fr) . W0'[g]^T (fr x A), dZ_g the transpose of T1's fr rows from g·fr
    if (want_dx)
        plan_gemm(p, 1, 1, n, A, fr, PB_T1, 0, n, (long long)fr * n, w0, 0, fr, (long long)A * fr, PB_DX, 0, s->d_in, A, G, 0);
    // DW1[f] (gr x E) (+)= Z_f^T (gr x n) . dY_f (n x E)
    plan_gemm(p, 0, 0, gr, E, n, PB_Z, 0, P * n, n, PB_DY, 0, s->d_out, E, PB_DW1, 0, E, (long long)gr * E, P, beta_w);
    // DW0'[g] (A x fr) (+)= X_g^T (A x n) . dZ_g (n x fr); with rho > 1 into DW0R (DW0 reordered
    // first when it accumulates) and back
    if (R > 1 && beta_w) plan_btt_w0_reorder(p, s, PB_DW0, PB_DW0R, 1);
    plan_gemm(p, 1, 1, A, fr, n, PB_X, 0, s->d_in, A, PB_T1, 0, n, (long long)fr * n, dw0, 0, fr, (long long)A * fr, G, beta_w);
    if (R > 1) plan_btt_w0_reorder(p, s, PB_DW0R, PB_DW0, 0);
}
static inline void plan_btt_backward_zt(Plan *p, const BTTShape *s, int n, int want_dx, int beta_w) {
    plan_btt_backward_zt_dz(p, s, n);
    plan_btt_backward_zt_rest(p, s, n, want_dx, beta_w);
}

// Scratch elements per row: T1, T2 (zrow each), no T3.
static inline size_t plan_btt_scratch_row(const BTTShape *s) { return 2 * btt_z_row(s); }

// Row stride `ld` for buffer b in every op of p (a plan built at row 0, so that b's offsets are
// 0): a layer's output written into, or its output gradient read from, a column block of a wider
// row buffer (q, k and v in the (N, 3C) qkv buffer).
static inline void plan_set_ld(Plan *p, int b, int ld) {
    for (int i = 0; i < p->n; i++) {
        PlanOp *o = &p->op[i];
        if (o->kind == PLAN_GEMM) {
            if ((o->a == b && o->a_off) || (o->b == b && o->b_off) || (o->c == b && o->c_off))
                fatal("internal: plan_set_ld wants a plan built at row 0");
            if (o->a == b) o->lda = ld;
            if (o->b == b) o->ldb = ld;
            if (o->c == b) o->ldc = ld;
        } else {
            if ((o->src == b && o->src_off) || (o->dst == b && o->dst_off)) fatal("internal: plan_set_ld wants a plan built at row 0");
            if (o->src == b) o->src_ld = ld;
            if (o->dst == b) o->dst_ld = ld;
        }
    }
}

// The last op of p that writes buffer `out` (a GEMM's C or a permute's dst), or NULL.
static inline PlanOp *plan_writer(Plan *p, int out) {
    for (int i = p->n - 1; i >= 0; i--) {
        PlanOp *o = &p->op[i];
        if (o->kind == PLAN_GEMM ? o->c == out : o->dst == out) return o;
    }
    return NULL;
}

// The op that writes buffer `out` adds to it (beta = 1) instead of overwriting: a layer's input
// gradient summed with others' (q, k and v share their input). Returns 0 when that op is a permute
// or carries an epilogue, or nothing writes `out`.
static inline int plan_set_accumulate(Plan *p, int out) {
    PlanOp *o = plan_writer(p, out);
    if (!o || o->kind != PLAN_GEMM || o->epi) return 0;
    o->beta = 1;
    return 1;
}

// The epilogue `epi` on the last op of p that writes buffer `out` (PB_Y: bias and GELU in the
// forward; PB_DX: DGELU in the backward). A GEMM's output column j of batch entry b is column
// b·sc + j of its rows (the structures' outputs are column blocks of one row buffer), hence the
// bias stride; a permute writes whole rows (stride 0). Returns 0 when no op writes `out` or the
// op accumulates (beta = 1): then the caller applies it separately.
static inline int plan_set_epilogue(Plan *p, int out, int epi) {
    PlanOp *o = plan_writer(p, out);
    if (!o || (o->kind == PLAN_GEMM && (o->beta || o->tiles))) return 0;
    o->epi = epi;
    o->bias_stride = o->kind == PLAN_GEMM ? o->sc : 0;
    return 1;
}

// ----------------------------------------------------------------------------------------------
// Monarch (monarch.h's math and saved-u layout). W0 = R (nb, q, p), W1 = L (nb, s, q). Row
// strides: X/DX d_in, Y/DY/T2 d_out, Z (saved u)/T1/T3 urow = nb·q.

// The forward's last op, y from T2 = yt (also after the BTT kernel, which writes yt: monarch.h's
// Monarch as a BTT), and its last two, from the saved u (after the BTT kernel's stage 1 alone).
static inline void plan_monarch_forward_from_yt(Plan *p, const MonarchShape *m, int n) {
    plan_permute(p, PB_T2, 0, m->d_out, PB_Y, 0, m->d_out, n, m->nb, m->s, 1);  // y[i nb + l] = yt[l s + i]
}
static inline void plan_monarch_forward_from_u(Plan *p, const MonarchShape *m, int n) {
    const int nb = m->nb, s = m->s, q = m->q, dout = m->d_out, urow = nb * q;
    plan_gemm(p, 0, 1, n, s, q, PB_Z, 0, urow, q, PB_W1, 0, q, (long long)s * q, PB_T2, 0, dout, s, nb, 0);  // Yt_l = Ut_l L[l]^T
    plan_monarch_forward_from_yt(p, m, n);
}
static inline void plan_monarch_forward(Plan *p, const MonarchShape *m, int n) {
    const int nb = m->nb, pp = m->p, q = m->q, din = m->d_in, urow = nb * q;
    plan_gemm(p, 0, 1, n, q, pp, PB_X, 0, din, pp, PB_W0, 0, pp, (long long)q * pp, PB_T1, 0, urow, q, nb, 0);  // U_k = X_k R[k]^T
    plan_permute(p, PB_T1, 0, urow, PB_Z, 0, urow, n, q, nb, 1);                                                  // u_saved[l q + r] = u[r nb + l]
    plan_monarch_forward_from_u(p, m, n);
}

// The weight gradients from T2 = dyt and T3 = du (natural order): the backward's last step, also
// after the fused kernel (monarch_fused.cuh), which leaves dx, dyt and du.
static inline void plan_monarch_backward_dl(Plan *p, const MonarchShape *m, int n) {
    const int nb = m->nb, s = m->s, q = m->q, dout = m->d_out, urow = nb * q;
    plan_gemm(p, 1, 0, s, q, n, PB_T2, 0, dout, s, PB_Z, 0, urow, q, PB_DW1, 0, q, (long long)s * q, nb, 1);  // dL[l] += dYt_l^T Ut_l
}
static inline void plan_monarch_backward_weights(Plan *p, const MonarchShape *m, int n) {
    const int nb = m->nb, pp = m->p, q = m->q, din = m->d_in, urow = nb * q;
    plan_monarch_backward_dl(p, m, n);
    plan_gemm(p, 1, 0, q, pp, n, PB_T3, 0, urow, q, PB_X, 0, din, pp, PB_DW0, 0, pp, (long long)q * pp, nb, 1);  // dR[k] += dU_k^T X_k
}
// The backward's dx GEMM from T3 = du (natural order): dX_k = dU_k R[k].
static inline void plan_monarch_backward_dx(Plan *p, const MonarchShape *m, int n) {
    const int nb = m->nb, pp = m->p, q = m->q, din = m->d_in, urow = nb * q;
    plan_gemm(p, 0, 0, n, pp, q, PB_T3, 0, urow, q, PB_W0, 0, pp, (long long)q * pp, PB_DX, 0, din, pp, nb, 0);
}
// The backward's rest after the BTT kernels (monarch.h's Monarch as a BTT; monarch_gpu.cuh with
// -sk 2, 3, 5): T1 holds the transposed BTT's saved z, du with each block's j = t nb + f at
// f rho + t (rho = q/nb), permuted here into T3 in du's natural order (at rank 1 that order is
// du's, and the kernel writes T3 itself); then (want_dx: the split, -sk 3) dx, and the weight
// gradients, as the plans'.
static inline void plan_monarch_backward_from_btt(Plan *p, const MonarchShape *m, int n, int want_dx) {
    const int nb = m->nb, q = m->q;
    if (q / nb > 1) plan_permute(p, PB_T1, 0, q, PB_T3, 0, q, n * nb, nb, q / nb, 1);  // each block's (nb, rho) -> (rho, nb)
    if (want_dx) plan_monarch_backward_dx(p, m, n);
    plan_monarch_backward_weights(p, m, n);
}

// The backward's first op, T2 = dyt from dy (dyt[l s + i] = dy[i nb + l]); also before the BTT kernels.
static inline void plan_monarch_backward_dyt(Plan *p, const MonarchShape *m, int n) {
    plan_permute(p, PB_DY, 0, m->d_out, PB_T2, 0, m->d_out, n, m->s, m->nb, 1);
}
static inline void plan_monarch_backward(Plan *p, const MonarchShape *m, int n, int want_dx) {
    const int nb = m->nb, s = m->s, q = m->q, dout = m->d_out, urow = nb * q;
    plan_monarch_backward_dyt(p, m, n);
    plan_gemm(p, 0, 0, n, q, s, PB_T2, 0, dout, s, PB_W1, 0, q, (long long)s * q, PB_T1, 0, urow, q, nb, 0);    // dUt_l = dYt_l L[l]
    plan_permute(p, PB_T1, 0, urow, PB_T3, 0, urow, n, nb, q, 1);                                                // du, natural order
    if (want_dx) plan_monarch_backward_dx(p, m, n);
    plan_monarch_backward_weights(p, m, n);
}

// -sk 4: u stored transposed in its natural order, urow rows of n tokens (row k·q + j: stage 1's
// U_k^T, one GEMM per block, its q rows consecutive); stage 2's block l reads Ut_l (the plans'
// permuted block: u's elements r·nb + l) as u's rows r·nb + l, one row stride (nb·n), so u needs
// no permute either way; du likewise. The output's permute (y from yt) and the input gradient's
// (dyt from dy) stay: y and dy are row-major.
static inline void plan_monarch_forward_ut(Plan *p, const MonarchShape *m, int n) {
    const int nb = m->nb, pp = m->p, s = m->s, q = m->q, din = m->d_in, dout = m->d_out;
    plan_gemm(p, 0, 1, q, n, pp, PB_W0, 0, pp, (long long)q * pp, PB_X, 0, din, pp, PB_Z, 0, n, (long long)q * n, nb, 0);  // U_k^T = R[k] X_k^T
    plan_gemm(p, 1, 1, n, s, q, PB_Z, 0, nb * n, n, PB_W1, 0, q, (long long)s * q, PB_T2, 0, dout, s, nb, 0);             // Yt_l = Ut_l L[l]^T
    plan_permute(p, PB_T2, 0, dout, PB_Y, 0, dout, n, nb, s, 1);                                                         // y[i nb + l] = yt[l s + i]
}
static inline void plan_monarch_backward_ut(Plan *p, const MonarchShape *m, int n, int want_dx) {
    const int nb = m->nb, pp = m->p, s = m->s, q = m->q, din = m->d_in, dout = m->d_out;
    plan_permute(p, PB_DY, 0, dout, PB_T2, 0, dout, n, s, nb, 1);                                                      // dyt
    plan_gemm(p, 1, 1, q, n, s, PB_W1, 0, q, (long long)s * q, PB_T2, 0, dout, s, PB_T3, 0, nb * n, n, nb, 0);        // du's rows r nb + l = (dYt_l L[l])^T
    if (want_dx)
        plan_gemm(p, 1, 0, n, pp, q, PB_T3, 0, n, (long long)q * n, PB_W0, 0, pp, (long long)q * pp, PB_DX, 0, din, pp, nb, 0);  // dX_k = dU_k R[k]
    plan_gemm(p, 1, 1, s, q, n, PB_T2, 0, dout, s, PB_Z, 0, nb * n, n, PB_DW1, 0, q, (long long)s * q, nb, 1);         // dL[l] += dYt_l^T Ut_l
    plan_gemm(p, 0, 0, q, pp, n, PB_T3, 0, n, (long long)q * n, PB_X, 0, din, pp, PB_DW0, 0, pp, (long long)q * pp, nb, 1);  // dR[k] += dU_k^T X_k
}

// A whole layer's plans over n rows, as the trainer runs them on -sk 0 (zt 0) or -sk 4 (zt 1): the
// forward into f, the backward (dx when want_dx; the weight gradients added) into b; either may
// be NULL. BTT's or Monarch's.
static inline void plan_btt_layer(Plan *f, Plan *b, const BTTShape *s, int n, int zt, int want_dx) {
    if (f && zt) plan_btt_forward_zt(f, s, n);
    else if (f) plan_btt_forward(f, s, n, 0);
    if (b && zt) {
        plan_btt_backward_zt(b, s, n, want_dx, 1);
    } else if (b) {
        plan_btt_backward_dz(b, s, n, 0);
        plan_btt_backward_rest(b, s, n, 0, want_dx, 1);
    }
}
static inline void plan_monarch_layer(Plan *f, Plan *b, const MonarchShape *m, int n, int zt, int want_dx) {
    if (f && zt) plan_monarch_forward_ut(f, m, n);
    else if (f) plan_monarch_forward(f, m, n);
    if (b && zt) plan_monarch_backward_ut(b, m, n, want_dx);
    else if (b) plan_monarch_backward(b, m, n, want_dx);
}

// Scratch elements per row: T1 and T3 (urow each), T2 (d_out).
static inline size_t plan_monarch_scratch_row(const MonarchShape *m) { return 2 * monarch_u_row(m) + (size_t)m->d_out; }

// Elements of activations a plan moves through memory: for each op, every operand that is not a
// core or a core's gradient (W0, W1, DW0, DW1, and their reordered copies W0R, DW0R), read (and C
// written) once; a permute of a core counts nothing; a GEMM with beta = 1
// also reads C. A plan built for n = 1 rows gives the count per row: the cuBLAS baseline's memory
// traffic, which monarch_fused.cuh weighs its kernels against.
static inline int plan_buf_is_core(int b) { return b == PB_W0 || b == PB_W1 || b == PB_DW0 || b == PB_DW1 || b == PB_W0R || b == PB_DW0R; }
// One op's elements so counted (a tiled op's on every tile); with_cores: the cores and their
// gradients too (an op's own traffic, dev/cuda/plan_ops.cu).
static inline double plan_op_elems(const PlanOp *o, int with_cores) {
    if (o->kind == PLAN_PERMUTE) return !with_cores && plan_buf_is_core(o->src) ? 0.0 : 2.0 * o->rows * o->R * o->C * o->blk;  // W0's reorder: a core
    const double mk = (double)o->M * o->K, kn = (double)o->K * o->N, mn = (double)o->M * o->N;
    return (o->tiles ? o->tiles : 1) * o->batch * ((!with_cores && plan_buf_is_core(o->a) ? 0.0 : mk) + (!with_cores && plan_buf_is_core(o->b) ? 0.0 : kn) +
                       (!with_cores && plan_buf_is_core(o->c) ? 0.0 : mn * (1 + o->beta)));
}
static inline double plan_activation_elems(const Plan *p) {
    double e = 0.0;
    for (int i = 0; i < p->n; i++) e += plan_op_elems(&p->op[i], 0);
    return e;
}

// Where each scratch buffer starts inside one scratch allocation of `rows` rows.
static inline void plan_scratch_offsets(size_t t1_row, size_t t2_row, int rows, size_t off[3]) {
    off[0] = 0;
    off[1] = t1_row * (size_t)rows;
    off[2] = off[1] + t2_row * (size_t)rows;
}

// ----------------------------------------------------------------------------------------------
// Tiled plans: every BTT-MoE expert in one launch per op, without the counts on the host.
//
// cuBLAS takes a GEMM's row count from the host only, so a plan per expert makes the host wait
// for each layer's routing and gives cuBLAS new shapes every step. Instead each expert's grouped
// rows are padded with zero rows to whole tiles of tile_rows rows, each tile one expert's. A plan
// built for one tile (n = tile_rows, row 0) then runs on every tile at once: its GEMMs become
// pointer-array batched GEMMs whose pointers a kernel writes from the device's tile table, with
// tile i of a row buffer tile_rows rows further on and its cores expert e(i)'s; the weight
// gradients, which sum over an expert's tiles, are written per tile into fp32 partials (DW0/DW1
// then name those, one core's size apart), summed per expert afterwards in a fixed order. The
// shapes depend on N alone, so nothing waits. The batch has a slot for the most tiles any routing
// needs (moe_max_tiles); slots past this step's tiles all repeat the spare tile (index `tiles`,
// after the last) with expert 0, identical products whose results nothing reads.

// zt_tile: -sk 4's plans, whose Z and T1 hold each tile's block transposed (zrow x tile_rows, so
// a tile starts zt_tile = zrow·tile_rows elements on, not tile_rows rows of its operand's stride);
// 0 for the others.
static inline void plan_tile(Plan *p, int tiles, int tile_rows, size_t core0, size_t core1, size_t zt_tile) {
    for (int i = 0; i < p->n; i++) {
        PlanOp *o = &p->op[i];
        o->tiles = tiles;
        o->tile_rows = tile_rows;
        if (o->kind == PLAN_PERMUTE) {  // rows are independent: one permute over every tile's rows
            if (o->rows != tile_rows || o->src_off || o->dst_off) fatal("internal: plan_tile wants a plan built for one tile at row 0");
            o->rows = tiles * tile_rows;
            continue;
        }
        const int bufs[3] = {o->a, o->b, o->c}, lds[3] = {o->lda, o->ldb, o->ldc};
        for (int k = 0; k < 3; k++) {
            const int b = bufs[k];
            o->ts[k] = o->es[k] = 0;
            if (b == PB_W0 || b == PB_W1) {
                o->es[k] = (long long)(b == PB_W0 ? core0 : core1);
            } else if (b == PB_DW0 || b == PB_DW1) {
                if (k != 2) fatal("internal: plan_tile: a core gradient read by a GEMM");
                o->ts[k] = (long long)(b == PB_DW0 ? core0 : core1);
                o->c_f32 = 1;
                o->beta = 0;
            } else {
                o->ts[k] = zt_tile && (b == PB_Z || b == PB_T1) ? (long long)zt_tile : (long long)tile_rows * lds[k];
            }
        }
    }
}

// Elements from its buffer's start of operand k (0: A, 1: B, 2: C) of tiled GEMM o in batch slot
// (tile slot i, product b), when `active` tiles are in use (tile_expert: the device's table).
ST_HD static inline size_t plan_tile_offset(const PlanOp *o, int k, int i, int b, int active, const int *tile_expert) {
    const int t = i < active ? i : o->tiles, e = i < active ? tile_expert[i] : 0;
    const size_t off = k == 0 ? o->a_off : k == 1 ? o->b_off : o->c_off;
    const long long stride = k == 0 ? o->sa : k == 1 ? o->sb : o->sc;
    return off + (size_t)(o->ts[k] * t + o->es[k] * e + stride * b);
}

// BTT-MoE's three tiled plans for groups that are each a BTT of shape b (an expert's rank 1, a set
// of experts' rank k), `tiles` tiles of tile_rows rows: the forward; the backward's dZu; the rest
// of the backward (dx when want_dx, per-tile weight partials), which reads dZ already permuted in
// T1 and the gated z in place of Z (moe_gpu.cuh's gate step writes both). A NULL plan is not
// built. zt: -sk 4's, each tile's z and dZu stored transposed (the same GEMMs, no permute).
static inline void plan_moe_tiled(Plan *fwd, Plan *dz, Plan *rest, const BTTShape *b, int tiles, int tile_rows, int want_dx, int zt) {
    const size_t p0 = btt_w0_size(b), p1 = btt_w1_size(b);
    Plan *plans[3] = {fwd, dz, rest};
    for (int i = 0; i < 3; i++) {
        if (!plans[i]) continue;
        memset(plans[i], 0, sizeof(Plan));
        if (zt) {
            if (i == 0) plan_btt_forward_zt(plans[i], b, tile_rows);
            else if (i == 1) plan_btt_backward_zt_dz(plans[i], b, tile_rows);
            else plan_btt_backward_zt_rest(plans[i], b, tile_rows, want_dx, 0);
        } else {
            if (i == 0) plan_btt_forward(plans[i], b, tile_rows, 0);
            else if (i == 1) plan_btt_backward_dz(plans[i], b, tile_rows, 0);
            else plan_btt_backward_from_t1(plans[i], b, tile_rows, 0, want_dx, 0);
        }
        plan_tile(plans[i], tiles, tile_rows, p0, p1, zt ? (size_t)tile_rows * btt_z_row(b) : 0);
    }
}

// Pointers a tiled plan's GEMMs take: three (A, B, C) per batch slot.
static inline size_t plan_tile_ptr_count(const Plan *p) {
    size_t n = 0;
    for (int i = 0; i < p->n; i++)
        if (p->op[i].kind == PLAN_GEMM) n += 3 * (size_t)p->op[i].tiles * p->op[i].batch;
    return n;
}

// The most tiles E experts' NK grouped rows can fill: Σ ceil(c_e / T) <= (NK + E (T - 1)) / T.
static inline int moe_max_tiles(int NK, int E, int tile_rows) { return (int)(((long)NK + (long)E * (tile_rows - 1)) / tile_rows); }
// Grouped rows a BTT-MoE layer's buffers hold: the tiles, and the spare.
static inline size_t moe_grouped_rows(int NK, int E, int tile_rows) { return ((size_t)moe_max_tiles(NK, E, tile_rows) + 1) * tile_rows; }

// BTT-MoE's tile rows for `rows` grouped rows of G groups, each group a BTT of shape b, from a
// model of the bytes the tiles cost. Padding moves about half a tile of zero rows per group
// through every op (G·T/2 rows of the plans' per-row bytes); each tile's fp32 weight-gradient
// partials are written and read once (8 bytes per core element); the sum G·T/2·row +
// rows/T·part is least at T = sqrt(2·rows·part / (G·row)), taken here to the nearest power of two
// in [64, 2048] (cuBLAS's row tiles).
static inline int moe_tile_rows_for(const BTTShape *b, double rows, int G) {
    Plan f = {}, d = {}, r = {};
    plan_btt_forward(&f, b, 1, 0);
    plan_btt_backward_dz(&d, b, 1, 0);
    plan_btt_backward_rest(&r, b, 1, 0, 1, 0);
    const double row = 2.0 * (plan_activation_elems(&f) + plan_activation_elems(&d) + plan_activation_elems(&r));
    const double part = 8.0 * (double)(btt_w0_size(b) + btt_w1_size(b));
    const double best = sqrt(2.0 * rows * part / ((double)G * row));
    int t = 64;
    while (t < 2048 && best > t * 1.41421356) t *= 2;
    return t;
}
// Grouped by expert: N·k rows of rank-1 BTTs, E groups.
static inline int moe_tile_rows(const MoEShape *s, int N) {
    const BTTShape b1 = moe_expert_shape(s);
    return moe_tile_rows_for(&b1, (double)N * s->topk, s->experts);
}

// BTT-MoE grouped by set of experts (-mg, structured/moe_sets.cuh): the sets' count, shape and
// tile rows, and a set's number. A set of k experts is one rank-k BTT of the experts' components.
#define MOE_SET_MAX_K 8
#define MOE_MAX_SETS 1024  // the grouping's limit (moe_group.cuh: STRUCT_MAX_EXPERTS groups)

// C(n, r), saturating at 2^40 (only compared with small limits); also the set numbers' terms on the GPU
ST_HD static inline long moe_binom(int n, int r) {
    if (r < 0 || r > n) return 0;
    long c = 1;
    for (int i = 1; i <= r; i++) {
        c = c * (n - r + i) / i;  // exact: c·(n-r+i) is divisible by i at every step
        if (c > (1L << 40)) return 1L << 40;
    }
    return c;
}
// The number of sets C(E, k), or 0 when the set path does not take this shape: k in {2, 4, 8}
// (the gate step gives each lane of a warp one component: k divides 32), at most MOE_MAX_SETS
// sets, d_in and d_out multiples of 8 (the gather and combine's 16-byte vectors).
static inline int moe_set_count(const MoEShape *s) {
    const int K = s->topk;
    if (K != 2 && K != 4 && K != 8) return 0;
    if (s->btt.d_in % 8 || s->btt.d_out % 8) return 0;
    const long S = moe_binom(s->experts, K);
    return S <= MOE_MAX_SETS ? (int)S : 0;
}
// The rank-k BTT a set runs.
static inline BTTShape moe_set_shape(const MoEShape *s) {
    BTTShape b = s->btt;
    b.rank = s->topk;
    return b;
}
// Tile rows of the set path for N tokens: moe_tile_rows' model with S sets of N rows in all and
// the rank-k cores' partials.
static inline int moe_set_tile_rows(const MoEShape *s, int N) {
    const BTTShape bk = moe_set_shape(s);
    const int S = moe_set_count(s);
    return S ? moe_tile_rows_for(&bk, N, S) : 64;
}

// A set's number (the combinatorial number system): Σ_j C(c_j, j + 1) over its experts c_0 < c_1 <
// ... < c_{K-1}, so the C(E, K) sets of E experts are 0 .. C(E, K) - 1 in colex order.
static inline int moe_set_rank(const int *c, int K) {
    int rank = 0;
    for (int j = 0; j < K; j++) rank += (int)moe_binom(c[j], j + 1);
    return rank;
}

// The sets' experts (S x K, ascending) and, per expert, the sets that contain it (E x C(E-1, K-1)
// entries q·K + j, j its place in set q; ascending q). Host arrays of moe_set_count(s)·K and
// E·moe_binom(E - 1, K - 1) ints.
static inline void moe_set_tables(int *set_experts, int *members, int E, int K) {
    const int S = (int)moe_binom(E, K), per = (int)moe_binom(E - 1, K - 1);
    int c[MOE_SET_MAX_K];
    for (int j = 0; j < K; j++) c[j] = j;  // colex order: the rank of c is Σ C(c_j, j + 1), 0, 1, ...
    int *filled = (int *)callocCheck((size_t)E, sizeof(int));
    for (int q = 0; q < S; q++) {
        for (int j = 0; j < K; j++) {
            set_experts[q * K + j] = c[j];
            members[c[j] * per + filled[c[j]]++] = q * K + j;
        }
        if (moe_set_rank(c, K) != q) fatal("internal: moe_set_tables: set %d has rank %d", q, moe_set_rank(c, K));
        int j = 0;  // next set in colex order: raise the lowest c_j that can rise, reset those below
        while (j < K - 1 && c[j] + 1 == c[j + 1]) j++;
        c[j]++;
        for (int i = 0; i < j; i++) c[i] = i;
    }
    free(filled);
}

// ----------------------------------------------------------------------------------------------
// cuBLAS arguments of a GEMM op. Row-major C (M x N) is column-major Cᵀ (N x M), and
// Cᵀ = op(B)ᵀ op(A)ᵀ: so cuBLAS gets (op_b, op_a, N, M, K, B, ldb, A, lda, C, ldc).

typedef struct {
    int transa, transb;  // 1 = CUBLAS_OP_T
    int m, n, k;
    int first;           // PlanBuf of cuBLAS's A (= our B), and its offset, ld, stride
    size_t first_off;
    int lda;
    long long stride_a;
    int second;          // cuBLAS's B (= our A)
    size_t second_off;
    int ldb;
    long long stride_b;
    int c;
    size_t c_off;
    int ldc;
    long long stride_c;
    int batch;
    int beta;
} CublasGemmArgs;

static inline CublasGemmArgs plan_to_cublas(const PlanOp *o) {
    CublasGemmArgs g;
    g.transa = o->tb; g.transb = o->ta;
    g.m = o->N; g.n = o->M; g.k = o->K;
    g.first = o->b; g.first_off = o->b_off; g.lda = o->ldb; g.stride_a = o->sb;
    g.second = o->a; g.second_off = o->a_off; g.ldb = o->lda; g.stride_b = o->sa;
    g.c = o->c; g.c_off = o->c_off; g.ldc = o->ldc; g.stride_c = o->sc;
    g.batch = o->batch; g.beta = o->beta;
    return g;
}

// Index of element j of row i's [C][R][blk] output for permute op o: the single formula the
// CUDA permute kernel and the CPU emulation share. Element j (< R·C·blk) of the src row is
// (r, c, x) = (j / (C·blk), (j / blk) % C, j % blk); it goes to position (c·R + r)·blk + x.
#ifdef __CUDACC__
__host__ __device__
#endif
static inline size_t plan_permute_dst_index(int j, int R, int C, int blk) {
    int x = j % blk, c = (j / blk) % C, r = j / (C * blk);
    (void)R;
    return ((size_t)c * R + r) * blk + x;
}
