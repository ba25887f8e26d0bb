// factor.h: dimension factorisation for structured layers, and the small CPU kernels that
// btt.h, monarch.h and moe.h share (GEMM dispatch, blocked transposes, deterministic parallel
// GEMM "jobs").
//
// Conventions for every structured layer on the CPU:
//  - row-major everywhere; x is N rows of d_in floats, y N rows of d_out floats;
//  - one GEMM entry point, st_gemm(): cblas_sgemm when USE_CBLAS is defined, plain C otherwise;
//    it is called single-threaded, and the callers parallelise with OpenMP over independent
//    blocks of the output with static partitions, so results are deterministic for a given
//    thread count (no atomics, every output element is summed in one fixed order);
//  - weight gradients are accumulated "exactly": the contribution of a call is computed into a
//    temporary and then added, so two identical backward calls give exactly 2x one call.
// Header-only, valid C11 and C++ (nvcc includes these headers too).
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef USE_CBLAS
#include <cblas.h>
#endif
#include "../common/utils.h"

// Functions the CUDA kernels share with the CPU code (structured/structured.cuh).
#ifdef __CUDACC__
#define ST_HD __host__ __device__
#else
#define ST_HD
#endif

// OpenMP pragmas that vanish (without -Wunknown-pragmas noise) when OpenMP is off.
#ifdef _OPENMP
#define ST_PRAGMA(x) _Pragma(#x)
#else
#define ST_PRAGMA(x)
#endif

// Rows of the input processed together by one thread in the row-tiled passes of the
// structured layers: big enough for efficient small GEMMs, small enough that a tile's
// intermediate stays in L2.
#ifndef ST_TILE_ROWS
#define ST_TILE_ROWS 64
#endif

// ----------------------------------------------------------------------------------------------
// Default factors of a dimension, as the papers' code chooses them: the prime factors of d in
// ascending order, each multiplied into whichever factor is currently smaller (the first on a
// tie), the pair then sorted ascending. 768 -> (16, 48), 1024 -> (32, 32), 3072 -> (32, 96),
// 512 -> (16, 32), a prime p -> (1, p). d < 1 gives (0, 0).
static inline void default_factors(int d, int *first, int *second) {
    if (d < 1) { *first = 0; *second = 0; return; }
    long a = 1, b = 1;
    int n = d;
    for (int p = 2; (long)p * p <= n; p++) {
        while (n % p == 0) {
            if (a <= b) a *= p; else b *= p;
            n /= p;
        }
    }
    if (n > 1) { if (a <= b) a *= n; else b *= n; }
    if (a > b) { long t = a; a = b; b = t; }
    *first = (int)a;
    *second = (int)b;
}

// ----------------------------------------------------------------------------------------------
// Threads

static inline int st_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// BLAS is called from inside our own OpenMP regions, one call per output block: its own thread
// pool must be off (as train_gpt2.c does), or a pthread OpenBLAS oversubscribes the cores.
static inline void st_blas_single_thread(void) {
#if defined(USE_CBLAS) && defined(OPENBLAS_VERSION)
    static int done = 0;
    if (!done) { openblas_set_num_threads(1); done = 1; }
#endif
}

// ----------------------------------------------------------------------------------------------
// GEMM, single-threaded: C (M x N) = beta * C + op(A) (M x K) . op(B) (K x N), row-major.
// op(A)[i][k] = ta ? A[k * lda + i] : A[i * lda + k]; op(B)[k][j] = tb ? B[j * ldb + k] : B[k * ldb + j].
// beta is 0 (overwrite; C is not read) or 1.
static inline void st_gemm(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                           float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (beta == 0.0f) for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, sizeof(float) * (size_t)N);
        return;
    }
#ifdef USE_CBLAS
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, 1.0f, A, lda, B,
                ldb, beta, C, ldc);
#else
    if (beta == 0.0f) for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, sizeof(float) * (size_t)N);
    if (!tb) {
        if (!ta) {  // C[i,:] += A[i,k] * B[k,:], k ascending
            for (int i = 0; i < M; i++) {
                float *c = C + (size_t)i * ldc;
                const float *a = A + (size_t)i * lda;
                for (int k = 0; k < K; k++) {
                    const float av = a[k];
                    const float *b = B + (size_t)k * ldb;
                    for (int j = 0; j < N; j++) c[j] += av * b[j];
                }
            }
        } else {  // A^T B: rank-1 updates, k ascending (the same per-element order)
            for (int k = 0; k < K; k++) {
                const float *a = A + (size_t)k * lda;
                const float *b = B + (size_t)k * ldb;
                for (int i = 0; i < M; i++) {
                    const float av = a[i];
                    float *c = C + (size_t)i * ldc;
                    for (int j = 0; j < N; j++) c[j] += av * b[j];
                }
            }
        }
    } else if (!ta) {  // A B^T: dot products of rows, 8 partial sums in a fixed order
        for (int i = 0; i < M; i++) {
            const float *a = A + (size_t)i * lda;
            float *c = C + (size_t)i * ldc;
            for (int j = 0; j < N; j++) {
                const float *b = B + (size_t)j * ldb;
                float s8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int k = 0;
                for (; k + 8 <= K; k += 8)
                    for (int u = 0; u < 8; u++) s8[u] += a[k + u] * b[k + u];
                float s = ((s8[0] + s8[1]) + (s8[2] + s8[3])) + ((s8[4] + s8[5]) + (s8[6] + s8[7]));
                for (; k < K; k++) s += a[k] * b[k];
                c[j] += s;
            }
        }
    } else {  // A^T B^T: generic
        for (int i = 0; i < M; i++) {
            float *c = C + (size_t)i * ldc;
            for (int j = 0; j < N; j++) {
                float s = 0.0f;
                for (int k = 0; k < K; k++) s += A[(size_t)k * lda + i] * B[(size_t)j * ldb + k];
                c[j] += s;
            }
        }
    }
#endif
}

// ----------------------------------------------------------------------------------------------
// Blocked transpose of one row: src viewed as [R][C][blk] -> dst [C][R][blk].
static inline void st_transpose(float *dst, const float *src, int R, int C, int blk) {
    if (blk == 1) {
        for (int r = 0; r < R; r++) {
            const float *s = src + (size_t)r * C;
            for (int c = 0; c < C; c++) dst[(size_t)c * R + r] = s[c];
        }
        return;
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            memcpy(dst + ((size_t)c * R + r) * blk, src + ((size_t)r * C + c) * blk, sizeof(float) * (size_t)blk);
}

// ----------------------------------------------------------------------------------------------
// Parallel GEMM jobs: a list of independent products, each optionally split into chunks of
// output rows (or columns, when it has fewer rows than columns) so that there are enough tasks
// for every thread. Tasks run with a static schedule; each output element is computed by one
// st_gemm call over the whole K, so the result is deterministic.
// acc = 0: C = op(A) op(B) (overwrite). acc = 1: C += op(A) op(B), computed into a temporary
// first and then added, so the contribution does not depend on what C held (exact 2x on a
// repeated call).
typedef struct {
    int ta, tb, M, N, K;
    const float *A;
    int lda;
    const float *B;
    int ldb;
    float *C;
    int ldc;
    int acc;
} StGemmJob;

static inline StGemmJob st_job(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                               float *C, int ldc, int acc) {
    StGemmJob j;
    j.ta = ta; j.tb = tb; j.M = M; j.N = N; j.K = K;
    j.A = A; j.lda = lda; j.B = B; j.ldb = ldb; j.C = C; j.ldc = ldc; j.acc = acc;
    return j;
}

static inline void st_run_jobs(const StGemmJob *jobs, int njobs) {
    if (njobs <= 0) return;
    st_blas_single_thread();
    int nt = st_num_threads();
    int target = 4 * nt;  // tasks wanted in all
    int per_job = (target + njobs - 1) / njobs;
    if (per_job < 1) per_job = 1;
    // task list: (job, chunk, nchunks)
    int *nch = (int *)mallocCheck(sizeof(int) * (size_t)njobs);
    int ntasks = 0;
    size_t tmp_max = 0;
    for (int i = 0; i < njobs; i++) {
        int len = jobs[i].M >= jobs[i].N ? jobs[i].M : jobs[i].N;
        int c = per_job;
        if (c > len / 16) c = len / 16;  // chunks of at least 16 rows (columns)
        if (c < 1) c = 1;
        nch[i] = c;
        ntasks += c;
        if (jobs[i].acc) {
            size_t other = (size_t)(jobs[i].M >= jobs[i].N ? jobs[i].N : jobs[i].M);
            size_t sz = (size_t)((len + c - 1) / c) * other;
            if (sz > tmp_max) tmp_max = sz;
        }
    }
    int *tjob = (int *)mallocCheck(sizeof(int) * (size_t)ntasks * 2);
    for (int i = 0, t = 0; i < njobs; i++)
        for (int c = 0; c < nch[i]; c++, t++) { tjob[2 * t] = i; tjob[2 * t + 1] = c; }
    ST_PRAGMA(omp parallel)
    {
        float *tmp = tmp_max ? (float *)mallocCheck(sizeof(float) * tmp_max) : NULL;
        ST_PRAGMA(omp for schedule(static))
        for (int t = 0; t < ntasks; t++) {
            const StGemmJob *j = &jobs[tjob[2 * t]];
            int c = tjob[2 * t + 1], n = nch[tjob[2 * t]];
            int by_rows = j->M >= j->N;
            int len = by_rows ? j->M : j->N;
            int s0 = (int)((long)len * c / n), s1 = (int)((long)len * (c + 1) / n);
            if (s1 <= s0) continue;
            const float *A = j->A, *B = j->B;
            float *C = j->C;
            int M = j->M, N = j->N;
            if (by_rows) {
                A += j->ta ? (size_t)s0 : (size_t)s0 * j->lda;
                C += (size_t)s0 * j->ldc;
                M = s1 - s0;
            } else {
                B += j->tb ? (size_t)s0 * j->ldb : (size_t)s0;
                C += s0;
                N = s1 - s0;
            }
            if (!j->acc) {
                st_gemm(j->ta, j->tb, M, N, j->K, A, j->lda, B, j->ldb, 0.0f, C, j->ldc);
            } else {
                st_gemm(j->ta, j->tb, M, N, j->K, A, j->lda, B, j->ldb, 0.0f, tmp, N);
                for (int r = 0; r < M; r++) {
                    float *cr = C + (size_t)r * j->ldc;
                    const float *tr = tmp + (size_t)r * N;
                    for (int q = 0; q < N; q++) cr[q] += tr[q];
                }
            }
        }
        free(tmp);
    }
    free(tjob);
    free(nch);
}

// dbias[j] += sum over rows of dy[:, j], each column summed in row order (exact 2x on a repeat).
static inline void st_bias_backward(float *dbias, const float *dy, int N, int D) {
    if (!dbias) return;
    ST_PRAGMA(omp parallel for schedule(static))
    for (int j0 = 0; j0 < D; j0 += 64) {
        int w = D - j0 < 64 ? D - j0 : 64;
        float s[64];
        for (int j = 0; j < w; j++) s[j] = 0.0f;
        for (int r = 0; r < N; r++) {
            const float *d = dy + (size_t)r * D + j0;
            for (int j = 0; j < w; j++) s[j] += d[j];
        }
        for (int j = 0; j < w; j++) dbias[j0 + j] += s[j];
    }
}

// Number of row tiles of ST_TILE_ROWS rows for N rows.
static inline int st_num_tiles(int N) { return N <= 0 ? 0 : (N + ST_TILE_ROWS - 1) / ST_TILE_ROWS; }
