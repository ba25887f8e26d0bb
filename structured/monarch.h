// monarch.h: Monarch linear layer on the CPU, forward and backward.
//
// Math (DESIGN.md, "Structures"): nb blocks, p = d_in/nb, s = d_out/nb, q = min(p, s).
// Factors R (nb, q, p) and L (nb, s, q):
//   stage 1, block k:  u[k*q + j]   = sum_c R[k, j, c] * x[k*p + c]        (j < q)
//   stage 2, block l:  y[i*nb + l]  = sum_r L[l, i, r] * u[r*nb + l] + b   (i < s, r < q)
//
// Layouts. Stage 1 is nb plain GEMMs U_k (n x q) = X_k (n x p) . R[k]^T into a per-thread tile
// buffer in the natural order u[k*q + j]. Stage 2's block l reads every nb-th element of u, so
// each row of u, viewed as a (q x nb) matrix, is transposed to (nb x q); this transposed u is
// what is saved:
//   u_saved[n*nb*q + l*q + r] = u[n; r*nb + l]
// so stage 2 is nb plain GEMMs Yt_l (n x s) = Ut_l (n x q) . L[l]^T into a tile buffer with
// yt[l*s + i] = y[i*nb + l], transposed per row ((nb x s) -> (s x nb)) into y, adding the bias.
// Backward: dyt = transpose of dy, dUt_l = dYt_l . L[l], transposed back to the natural du,
// dX_k = dU_k . R[k], dL[l] += dYt_l^T Ut_l, dR[k] += dU_k^T X_k.
#pragma once
#include "btt.h"
#include "factor.h"

typedef struct { int d_in, d_out, nb, p, s, q; } MonarchShape;

// Fills the shape; q = 0 (and p = s = 0) when nb does not divide both d_in and d_out (the caller
// reports the configuration error).
static inline void monarch_shape(MonarchShape *m, int d_in, int d_out, int nb) {
    m->d_in = d_in; m->d_out = d_out; m->nb = nb;
    if (nb <= 0 || d_in <= 0 || d_out <= 0 || d_in % nb != 0 || d_out % nb != 0) { m->p = m->s = m->q = 0; return; }
    m->p = d_in / nb;
    m->s = d_out / nb;
    m->q = m->p < m->s ? m->p : m->s;
}
static inline size_t monarch_r_size(const MonarchShape *m) { return (size_t)m->nb * m->q * m->p; }
static inline size_t monarch_l_size(const MonarchShape *m) { return (size_t)m->nb * m->s * m->q; }
static inline size_t monarch_u_row(const MonarchShape *m) { return (size_t)m->nb * m->q; }
static inline size_t monarch_u_size(const MonarchShape *m, int N) { return (size_t)N * monarch_u_row(m); }
static inline size_t monarch_flops_per_row(const MonarchShape *m) { return monarch_r_size(m) + monarch_l_size(m); }

// Monarch as a BTT. Where nb divides q, a Monarch is the BTT of alpha = p, gamma = phi = nb,
// eps = s and rank rho = q/nb, with its cores laid out anew:
//   W0[g, a, f*rho + t] = R[g, t*nb + f, a]      W1[f, g*rho + t, e] = L[f, e, g*rho + t]
// Why: write stage 1's j = t*nb + f (t < rho, f < nb). Stage 2's block l reads u[r*nb + l]; with
// r = g*rho + t that is u[g*q + t*nb + l], the BTT's z[g, l, t]. So stage 2 is the BTT's second
// stage with f = l, and the BTT's saved z (phi, gamma, rho) is element for element the Monarch's
// saved u (u_saved[l*q + g*rho + t]); its output y_btt[l*s + i] is y[i*nb + l] (the Monarch's yt,
// one permute from y). The GPU runs the BTT kernels on Monarch layers so (-sk 2, 3 and 5).
// The transposed BTT (the backward's dx, btt.h) then has the cores W0t[l] = L[l] and
// W1t[g][f*rho + t] = R[g][t*nb + f] (rows of R reordered), and its saved z is du with each
// block's j = t*nb + f at f*rho + t.
// 1 and the BTT's shape where nb divides q, else 0.
static inline int monarch_btt_shape(BTTShape *b, const MonarchShape *m) {
    if (m->q <= 0 || m->q % m->nb != 0) return 0;
    btt_shape(b, m->p, m->nb, m->nb, m->s, m->q / m->nb);
    return 1;
}
// The row j of a block of R whose values the BTT's column (or transposed row) c = f*rho + t takes.
ST_HD static inline int monarch_btt_row(int c, int nb, int rho) { return (c % rho) * nb + c / rho; }
// The element of R (nb blocks q x p) that element i of the BTT's W0 (nb blocks p x q: block g,
// row a, column c) takes, and (w1t) that of the transposed BTT's W1t (nb blocks q x p: R's rows
// reordered). Also the GPU's.
ST_HD static inline size_t monarch_btt_core_src(size_t i, int nb, int q, int p, int w1t) {
    const size_t per = (size_t)q * p, g = i / per, j = i % per;
    const int c = w1t ? (int)(j / p) : (int)(j % q), a = w1t ? (int)(j % p) : (int)(j / q);
    return g * per + (size_t)monarch_btt_row(c, nb, q / nb) * p + a;
}
// The BTT's cores W0 (|R| floats) and W1 (|L| floats) from R and L (monarch_btt_shape's BTT).
static inline void monarch_btt_cores(float *W0, float *W1, const float *R, const float *L, const MonarchShape *m) {
    for (size_t i = 0; i < monarch_r_size(m); i++) W0[i] = R[monarch_btt_core_src(i, m->nb, m->q, m->p, 0)];
    st_block_transpose(W1, L, m->nb, m->s, m->q);
}
// y (N, d_out) overwritten; u (monarch_u_size floats) saved for the backward; bias may be NULL.
static inline void monarch_forward(float *y, float *u, const float *x, const float *R, const float *L, const float *bias,
                                   int N, const MonarchShape *m) {
    const int nb = m->nb, p = m->p, s = m->s, q = m->q, din = m->d_in, dout = m->d_out, urow = nb * q;
    const int ntiles = st_num_tiles(N);
    st_step("factors packed");
    StPacked rp = st_pack(ST_WS_W0, nb, 1, p, q, R, (size_t)q * p, p), lp = st_pack(ST_WS_W1, nb, 1, q, s, L, (size_t)s * q, q);  // R[k]^T, L[l]^T
    st_step("row tiles: both stages");
    ST_PRAGMA(omp parallel)
    {
        float *u1 = st_workspace(ST_WS_TILE, (size_t)(urow + dout) * ST_TILE_ROWS), *yt = u1 + (size_t)urow * ST_TILE_ROWS;
        ST_PRAGMA(omp for schedule(static))
        for (int t = 0; t < ntiles; t++) {
            int r0 = t * ST_TILE_ROWS, n = N - r0 < ST_TILE_ROWS ? N - r0 : ST_TILE_ROWS;
            const float *xt = x + (size_t)r0 * din;
            float *ut = u + (size_t)r0 * urow, *yo = y + (size_t)r0 * dout;
            for (int k = 0; k < nb; k++)
                st_gemm_packed(n, &rp, k, xt + (size_t)k * p, din, 0.0f, u1 + (size_t)k * q, urow);
            for (int i = 0; i < n; i++) st_transpose(ut + (size_t)i * urow, u1 + (size_t)i * urow, q, nb, 1);
            for (int l = 0; l < nb; l++)
                st_gemm_packed(n, &lp, l, ut + (size_t)l * q, urow, 0.0f, yt + (size_t)l * s, dout);
            for (int i = 0; i < n; i++) {
                float *yr = yo + (size_t)i * dout;
                st_transpose(yr, yt + (size_t)i * dout, nb, s, 1);
                if (bias)
                    for (int o = 0; o < dout; o++) yr[o] += bias[o];
            }
        }
    }
}

// Rows of the backward's chunks (st_chunk_rows: dyt and du rows; the factors, their largest block).
static inline int monarch_chunk_rows(const MonarchShape *m) {
    const size_t br = (size_t)m->q * m->p, bl = (size_t)m->s * m->q;
    return st_chunk_rows((size_t)m->d_out + monarch_u_row(m), monarch_r_size(m) + monarch_l_size(m), br > bl ? br : bl);
}

// floats of scratch monarch_backward needs: the contributions to dR and dL, and dyt (d_out) and
// du (nb*q) per row for one chunk of rows (btt.h's st_chunk_rows).
static inline size_t monarch_scratch_size(const MonarchShape *m, int N) {
    const size_t row = (size_t)m->d_out + monarch_u_row(m);
    const int ch = N < monarch_chunk_rows(m) ? N : monarch_chunk_rows(m);
    return monarch_r_size(m) + monarch_l_size(m) + (size_t)(ch > 0 ? ch : 0) * row;
}

// dx (N, d_in) overwritten (may be NULL); dR, dL, dbias accumulated (+=; dbias may be NULL).
// u is what monarch_forward saved; scratch holds monarch_scratch_size(m, N) floats. As btt.h's
// backward: chunk by chunk of rows, the dx tiles, then the weight gradients over the chunk's rows
// (each element's chain continued from the last chunk), added to dR and dL at the end.
static inline void monarch_backward(float *dx, float *dR, float *dL, float *dbias, const float *dy, const float *x,
                                    const float *u, const float *R, const float *L, int N, const MonarchShape *m,
                                    float *scratch) {
    const int nb = m->nb, p = m->p, s = m->s, q = m->q, din = m->d_in, dout = m->d_out, urow = nb * q;
    const size_t nr_ = monarch_r_size(m), nl = monarch_l_size(m);
    const int chunk = monarch_chunk_rows(m), ch = N < chunk ? N : chunk;
    float *cR = scratch, *cL = scratch + nr_;  // contributions
    float *dyt = cL + nl;                      // (ch, nb, s): dyt[l*s + i] = dy[i*nb + l]
    float *du = dyt + (size_t)ch * dout;       // (ch, nb*q), natural order du[k*q + j]
    st_step("factors packed");
    StPacked lp = st_pack(ST_WS_W1, nb, 0, s, q, L, (size_t)s * q, q), rp = st_pack(ST_WS_W0, nb, 0, q, p, R, (size_t)q * p, p);  // L[l], R[k]
    StGemmJob *jobs = (StGemmJob *)mallocCheck(sizeof(StGemmJob) * (size_t)(2 * nb));
    for (int r0 = 0; r0 < N; r0 += chunk) {
        const int nr = N - r0 < chunk ? N - r0 : chunk, ntiles = st_num_tiles(nr);
        st_step("row tiles: dyt, du, dx");
        ST_PRAGMA(omp parallel)
        {
            float *dut = st_workspace(ST_WS_TILE, (size_t)urow * ST_TILE_ROWS);
            ST_PRAGMA(omp for schedule(static))
            for (int t = 0; t < ntiles; t++) {
                const int i0 = t * ST_TILE_ROWS, n = nr - i0 < ST_TILE_ROWS ? nr - i0 : ST_TILE_ROWS;
                float *dyt_t = dyt + (size_t)i0 * dout, *du_t = du + (size_t)i0 * urow;
                for (int i = 0; i < n; i++) st_transpose(dyt_t + (size_t)i * dout, dy + (size_t)(r0 + i0 + i) * dout, s, nb, 1);
                for (int l = 0; l < nb; l++)
                    st_gemm_packed(n, &lp, l, dyt_t + (size_t)l * s, dout, 0.0f, dut + (size_t)l * q, urow);
                for (int i = 0; i < n; i++) st_transpose(du_t + (size_t)i * urow, dut + (size_t)i * urow, nb, q, 1);
                if (dx)
                    for (int k = 0; k < nb; k++)
                        st_gemm_packed(n, &rp, k, du_t + (size_t)k * q, urow, 0.0f, dx + (size_t)(r0 + i0) * din + (size_t)k * p, din);
            }
        }
        st_step("weight gradients");
        const int acc = r0 == 0 ? ST_OVERWRITE : ST_CHAIN;
        for (int l = 0; l < nb; l++)  // dL[l] (s x q): dYt_l^T Ut_l
            jobs[l] = st_job(1, 0, s, q, nr, dyt + (size_t)l * s, dout, u + (size_t)r0 * urow + (size_t)l * q, urow, cL + (size_t)l * s * q, q, acc);
        for (int k = 0; k < nb; k++)  // dR[k] (q x p): dU_k^T X_k
            jobs[nb + k] = st_job(1, 0, q, p, nr, du + (size_t)k * q, urow, x + (size_t)r0 * din + (size_t)k * p, din, cR + (size_t)k * q * p, p, acc);
        st_run_jobs(jobs, 2 * nb);
    }
    free(jobs);
    if (N > 0) {  // (with no rows the contributions were never written)
        st_add(dR, cR, nr_);
        st_add(dL, cL, nl);
    }
    if (dbias) st_step("bias gradient");
    st_bias_backward(dbias, dy, N, dout);
}
