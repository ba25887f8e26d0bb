// btt.h: Block Tensor-Train (BTT) linear layer on the CPU, forward and backward.
//
// Math (DESIGN.md, "Structures"): d_in = gamma*alpha with input index i = g*alpha + a, d_out = phi*eps
// with output index o = f*eps + e, rank rho. Cores
//   W0[g, a, f*rho + s]   shape (gamma, alpha, phi*rho)   (gamma blocks of alpha x phi*rho)
//   W1[f, g*rho + s, e]   shape (phi, gamma*rho, eps)     (phi blocks of gamma*rho x eps)
//   z[g, f, s]   = sum_a W0[g, a, f*rho+s] * x[g*alpha + a]
//   y[f*eps + e] = sum_{g,s} W1[f, g*rho+s, e] * z[g, f, s] + b[f*eps + e]
//
// Layouts. Both stages are plain GEMMs on row tiles:
//   stage 1, group g:  Z1_g (n x phi*rho) = X_g (n x alpha, row stride d_in) . W0[g]
//     written to a per-thread tile buffer z1 in the layout (n, gamma, phi, rho);
//   a cheap per-row transpose (gamma, phi, rho) -> (phi, gamma, rho) gives the saved z;
//   stage 2, group f:  Y_f (n x eps, row stride d_out) = Z_f (n x gamma*rho) . W1[f].
// The saved intermediate z is therefore (N, phi, gamma, rho):
//   z_saved[n*gamma*phi*rho + f*gamma*rho + g*rho + s] = z[n; g, f, s]
// and Z_f, the slice the second stage and dW1 need, is a strided row-major matrix.
// Backward: dZ_f = dY_f . W1[f]^T in the (phi, gamma, rho) layout, transposed back to
// (gamma, phi, rho) (kept in the scratch for dW0), dX_g = dZ_g . W0[g]^T, dW1[f] += Z_f^T dY_f,
// dW0[g] += X_g^T dZ_g (the weight gradients reduce over all N rows inside one GEMM each).
#pragma once
#include "factor.h"

typedef struct { int d_in, d_out, alpha, gamma, phi, eps, rank; } BTTShape;

// Shape from explicit factors: d_in = gamma*alpha, d_out = phi*eps.
static inline void btt_shape(BTTShape *s, int alpha, int gamma, int phi, int eps, int rank) {
    s->alpha = alpha; s->gamma = gamma; s->phi = phi; s->eps = eps; s->rank = rank;
    s->d_in = gamma * alpha; s->d_out = phi * eps;
}
// Shape with the default factors (768 -> alpha 16, gamma 48; 3072 -> phi 32, eps 96).
static inline void btt_shape_default(BTTShape *s, int d_in, int d_out, int rank) {
    int alpha, gamma, phi, eps;
    default_factors(d_in, &alpha, &gamma);
    default_factors(d_out, &phi, &eps);
    btt_shape(s, alpha, gamma, phi, eps, rank);
}
// 1 when the shape is consistent (all positive, products match).
static inline int btt_shape_ok(const BTTShape *s) {
    return s->alpha > 0 && s->gamma > 0 && s->phi > 0 && s->eps > 0 && s->rank > 0 && s->d_in == s->gamma * s->alpha &&
           s->d_out == s->phi * s->eps;
}
static inline size_t btt_w0_size(const BTTShape *s) { return (size_t)s->gamma * s->alpha * s->phi * s->rank; }
static inline size_t btt_w1_size(const BTTShape *s) { return (size_t)s->phi * s->gamma * s->rank * s->eps; }
// floats of z per row, and for N rows
static inline size_t btt_z_row(const BTTShape *s) { return (size_t)s->gamma * s->phi * s->rank; }
static inline size_t btt_z_size(const BTTShape *s, int N) { return (size_t)N * btt_z_row(s); }
// multiply-adds per row (= parameters)
static inline size_t btt_flops_per_row(const BTTShape *s) { return btt_w0_size(s) + btt_w1_size(s); }

// The transposed BTT, which is the backward's dx: dZ_f = dY_f W1[f]ᵀ and dX_g = dZ_g W0[g]ᵀ are
// the two stages of a BTT of shape (alpha, gamma, phi, eps)' = (eps, phi, gamma, alpha), same rank,
// on dy, with cores W0'[f] = W1[f]ᵀ (phi blocks of eps x gamma*rho) and W1'[g] = W0[g]ᵀ (gamma
// blocks of phi*rho x alpha). Its saved z' is dZ in the (gamma, phi, rho) layout, the one dW0
// needs: a fused forward kernel thus gives the backward's dx and dZ in one pass over dy.
static inline BTTShape btt_shape_transposed(const BTTShape *s) {
    BTTShape t;
    btt_shape(&t, s->eps, s->phi, s->gamma, s->alpha, s->rank);
    return t;
}
// Element i of dst = `batch` blocks (cols x rows), each the transpose of a (rows x cols) block of
// src, comes from this src element (also the GPU's kernel).
ST_HD static inline size_t st_block_transpose_src(size_t i, int rows, int cols) {
    const size_t per = (size_t)rows * cols, b = i / per, j = i % per;
    return b * per + (j % rows) * cols + j / rows;
}
static inline void st_block_transpose(float *dst, const float *src, int batch, int rows, int cols) {
    for (size_t i = 0; i < (size_t)batch * rows * cols; i++) dst[i] = src[st_block_transpose_src(i, rows, cols)];
}
// W0t (|W1| floats), W1t (|W0| floats): the transposed BTT's cores.
static inline void btt_transposed_cores(float *W0t, float *W1t, const float *W0, const float *W1, const BTTShape *s) {
    st_block_transpose(W0t, W1, s->phi, s->gamma * s->rank, s->eps);
    st_block_transpose(W1t, W0, s->gamma, s->alpha, s->phi * s->rank);
}

// The cores packed for the forward's tiles (w0p: gamma matrices W0[g], alpha x phi*rho; w1p: phi
// matrices W1[f], gamma*rho x eps) and for the backward's dx (w1t: W1[f]^T, eps x gamma*rho;
// w0t: W0[g]^T, phi*rho x alpha), in the calling thread's workspaces ST_WS_W0 and ST_WS_W1.
static inline void btt_pack_forward(StPacked *w0p, StPacked *w1p, const float *W0, const float *W1, const BTTShape *s) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, fr = P * s->rank, gr = G * s->rank;
    *w0p = st_pack(ST_WS_W0, G, 0, A, fr, W0, (size_t)A * fr, fr);
    *w1p = st_pack(ST_WS_W1, P, 0, gr, E, W1, (size_t)gr * E, E);
}
static inline void btt_pack_backward(StPacked *w1t, StPacked *w0t, const float *W0, const float *W1, const BTTShape *s) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, fr = P * s->rank, gr = G * s->rank;
    *w1t = st_pack(ST_WS_W1, P, 1, E, gr, W1, (size_t)gr * E, E);
    *w0t = st_pack(ST_WS_W0, G, 1, fr, A, W0, (size_t)A * fr, fr);
}

// One tile of n rows (internal). x: n rows, row stride ldx. z1: tile buffer of
// n x zrow (layout (gamma, phi, rho)); z2: n rows of zrow, layout (phi, gamma, rho) (the saved z);
// y: n rows, row stride ldy, overwritten (no bias). w0p, w1p: btt_pack_forward's.
static inline void st_btt_fwd_tile(int n, const float *x, int ldx, const StPacked *w0p, const StPacked *w1p, const BTTShape *s,
                                   float *z1, float *z2, float *y, int ldy) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, R = s->rank;
    const int fr = P * R, gr = G * R, zrow = G * P * R;
    for (int g = 0; g < G; g++) st_gemm_packed(n, w0p, g, x + (size_t)g * A, ldx, 0.0f, z1 + (size_t)g * fr, zrow);
    for (int i = 0; i < n; i++) st_transpose(z2 + (size_t)i * zrow, z1 + (size_t)i * zrow, G, P, R);
    for (int f = 0; f < P; f++) st_gemm_packed(n, w1p, f, z2 + (size_t)f * gr, zrow, 0.0f, y + (size_t)f * E, ldy);
}

// Backward of one tile (internal). dy: n rows, stride ldy. dz2: tile buffer
// n x zrow, gets dZ in the (phi, gamma, rho) layout; dz1: n rows of zrow, gets dZ in the
// (gamma, phi, rho) layout; dx (may be NULL): n rows, stride ldx, overwritten. w1t, w0t:
// btt_pack_backward's.
static inline void st_btt_bwd_tile(int n, const float *dy, int ldy, const StPacked *w1t, const StPacked *w0t, const BTTShape *s,
                                   float *dz2, float *dz1, float *dx, int ldx) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, R = s->rank;
    const int fr = P * R, gr = G * R, zrow = G * P * R;
    for (int f = 0; f < P; f++) st_gemm_packed(n, w1t, f, dy + (size_t)f * E, ldy, 0.0f, dz2 + (size_t)f * gr, zrow);
    for (int i = 0; i < n; i++) st_transpose(dz1 + (size_t)i * zrow, dz2 + (size_t)i * zrow, P, G, R);
    if (dx)
        for (int g = 0; g < G; g++) st_gemm_packed(n, w0t, g, dz1 + (size_t)g * fr, zrow, 0.0f, dx + (size_t)g * A, ldx);
}

// y (N, d_out) overwritten; z (btt_z_size floats) saved for the backward. bias may be NULL.
static inline void btt_forward(float *y, float *z, const float *x, const float *W0, const float *W1, const float *bias,
                               int N, const BTTShape *s) {
    const size_t zrow = btt_z_row(s);
    const int ntiles = st_num_tiles(N), din = s->d_in, dout = s->d_out;
    StPacked w0p, w1p;
    st_step("cores packed");
    btt_pack_forward(&w0p, &w1p, W0, W1, s);
    st_step("row tiles: both stages");
    ST_PRAGMA(omp parallel)
    {
        float *z1 = st_workspace(ST_WS_TILE, zrow * ST_TILE_ROWS);
        ST_PRAGMA(omp for schedule(static))
        for (int t = 0; t < ntiles; t++) {
            int r0 = t * ST_TILE_ROWS, n = N - r0 < ST_TILE_ROWS ? N - r0 : ST_TILE_ROWS;
            float *yt = y + (size_t)r0 * dout;
            st_btt_fwd_tile(n, x + (size_t)r0 * din, din, &w0p, &w1p, s, z1, z + (size_t)r0 * zrow, yt, dout);
            if (bias)
                for (int i = 0; i < n; i++)
                    for (int o = 0; o < dout; o++) yt[(size_t)i * dout + o] += bias[o];
        }
    }
}

// Rows of the backward's chunks (st_chunk_rows: dZ rows; the cores, their largest block).
static inline int btt_chunk_rows(const BTTShape *s) {
    const size_t b0 = (size_t)s->alpha * s->phi * s->rank, b1 = (size_t)s->gamma * s->rank * s->eps;
    return st_chunk_rows(btt_z_row(s), btt_w0_size(s) + btt_w1_size(s), b0 > b1 ? b0 : b1);
}

// floats of scratch btt_backward needs: the weight-gradient contributions (|W0| + |W1|) and dZ in
// the (gamma, phi, rho) layout for one chunk of rows.
static inline size_t btt_scratch_size(const BTTShape *s, int N) {
    const int chunk = btt_chunk_rows(s), ch = N < chunk ? N : chunk;
    return btt_w0_size(s) + btt_w1_size(s) + (size_t)(ch > 0 ? ch : 0) * btt_z_row(s);
}

// dx (N, d_in) overwritten (may be NULL); dW0, dW1, dbias accumulated (+=; dbias may be NULL).
// z is what btt_forward saved; scratch holds btt_scratch_size(s, N) floats. Chunk by chunk of
// rows: the dx tiles (dZ = dY W1^T, dX = dZ W0^T), then dW1[f] += Z_f^T dY_f and dW0[g] +=
// X_g^T dZ_g over the chunk's rows, each element's chain continued from the last chunk (the same
// bits as one product over all N rows), added to dW0 and dW1 at the end.
static inline void btt_backward(float *dx, float *dW0, float *dW1, float *dbias, const float *dy, const float *x,
                                const float *z, const float *W0, const float *W1, int N, const BTTShape *s,
                                float *scratch) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, R = s->rank;
    const int fr = P * R, gr = G * R, zrow = G * P * R, din = s->d_in, dout = s->d_out;
    const size_t n0 = btt_w0_size(s), n1 = btt_w1_size(s);
    float *c0 = scratch, *c1 = scratch + n0, *dz1 = scratch + n0 + n1;  // contributions; dZ of a chunk
    StPacked w1t, w0t;
    st_step("cores packed (transposed)");
    btt_pack_backward(&w1t, &w0t, W0, W1, s);
    StGemmJob *jobs = (StGemmJob *)mallocCheck(sizeof(StGemmJob) * (size_t)(G + P));
    const int chunk = btt_chunk_rows(s);
    for (int r0 = 0; r0 < N; r0 += chunk) {
        const int nr = N - r0 < chunk ? N - r0 : chunk, ntiles = st_num_tiles(nr);
        st_step("row tiles: dZ, dx");
        ST_PRAGMA(omp parallel)
        {
            float *dz2 = st_workspace(ST_WS_TILE, (size_t)zrow * ST_TILE_ROWS);
            ST_PRAGMA(omp for schedule(static))
            for (int t = 0; t < ntiles; t++) {
                const int i0 = t * ST_TILE_ROWS, n = nr - i0 < ST_TILE_ROWS ? nr - i0 : ST_TILE_ROWS;
                st_btt_bwd_tile(n, dy + (size_t)(r0 + i0) * dout, dout, &w1t, &w0t, s, dz2, dz1 + (size_t)i0 * zrow,
                                dx ? dx + (size_t)(r0 + i0) * din : NULL, din);
            }
        }
        st_step("weight gradients");
        const int acc = r0 == 0 ? ST_OVERWRITE : ST_CHAIN;
        for (int f = 0; f < P; f++)  // dW1[f] (gamma*rho x eps): Z_f^T dY_f
            jobs[f] = st_job(1, 0, gr, E, nr, z + (size_t)r0 * zrow + (size_t)f * gr, zrow, dy + (size_t)r0 * dout + (size_t)f * E,
                             dout, c1 + (size_t)f * gr * E, E, acc);
        for (int g = 0; g < G; g++)  // dW0[g] (alpha x phi*rho): X_g^T dZ_g
            jobs[P + g] = st_job(1, 0, A, fr, nr, x + (size_t)r0 * din + (size_t)g * A, din, dz1 + (size_t)g * fr, zrow,
                                 c0 + (size_t)g * A * fr, fr, acc);
        st_run_jobs(jobs, G + P);
    }
    free(jobs);
    if (N > 0) {  // (with no rows the contributions were never written)
        st_add(dW0, c0, n0);
        st_add(dW1, c1, n1);
    }
    if (dbias) st_step("bias gradient");
    st_bias_backward(dbias, dy, N, dout);
}
