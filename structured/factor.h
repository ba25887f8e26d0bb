// factor.h: dimension factorisation for structured layers, and the small CPU kernels that
// btt.h, monarch.h and moe.h share (GEMM dispatch, blocked transposes, deterministic parallel
// GEMM "jobs").
//
// Conventions for every structured layer on the CPU:
//  - row-major everywhere; x is N rows of d_in floats, y N rows of d_out floats;
//  - one GEMM entry point, st_gemm(): common/gemm.h's packed, register-tiled kernel;
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
#include "../common/gemm.h"
#include "../common/utils.h"
#include "step_hook.h"
#if defined(__AVX__) && !defined(CG_PLAIN_C)
#include <immintrin.h>
#endif

// Functions the CUDA kernels share with the CPU code (structured/*_gpu.cuh).
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

// ----------------------------------------------------------------------------------------------
// GEMM, single-threaded: C (M x N) = beta * C + op(A) (M x K) . op(B) (K x N), row-major.
// op(A)[i][k] = ta ? A[k * lda + i] : A[i * lda + k]; op(B)[k][j] = tb ? B[j * ldb + k] : B[k * ldb + j].
// beta is 0 (overwrite; C is not read) or 1. Always common/gemm.h's kernel, also in a CBLAS
// build: a BLAS's per-call overhead dominates the small products of the structured layers, and
// each element is then one multiply-add chain in k order, the same in every build.
static inline void st_gemm(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                           float beta, float *C, int ldc) {
    cg_gemm(M, N, K, A, ta ? 1 : (size_t)lda, ta ? (size_t)lda : 1, B, tb ? 1 : (size_t)ldb, tb ? (size_t)ldb : 1, C,
            (size_t)ldc, beta != 0.0f);
}

// ----------------------------------------------------------------------------------------------
// Buffers a thread keeps from one layer call to the next, one per slot: the packed weights (the
// calling thread's) and the row tiles' buffers (each worker's). Allocated per call, they were
// handed back to the OS on free and their fresh pages cleared by the kernel on the next call:
// 12-22% of a BTT-MoE layer's time on one thread. Only the size is kept; the contents are
// garbage on entry.
enum { ST_WS_TILE, ST_WS_W0, ST_WS_W1, ST_WS_EYE, ST_WS_COUNT };  // EYE: the trainer's identity for small BTT layers

static inline float *st_workspace(int slot, size_t floats) {
    static CG_THREAD_LOCAL float *buf[ST_WS_COUNT];
    static CG_THREAD_LOCAL size_t cap[ST_WS_COUNT];
    if (floats > cap[slot]) {
        free(buf[slot]);
        const size_t n = (floats + 15) / 16 * 16;  // whole cache lines, as aligned_alloc wants
        buf[slot] = (float *)aligned_alloc(64, sizeof(float) * n);
        if (!buf[slot]) fatal("out of memory for a structured layer's work buffer (%zu bytes)", sizeof(float) * n);
        cap[slot] = n;
    }
    return buf[slot];
}

// Weights packed once per layer call for the row tiles' products (common/gemm.h's layout): `count`
// matrices op(B_i) (K x N), B_i = B + i*stride, op as st_gemm's tb; matrix i at buf + i*size.
// Packing them per tile would cost as much as the tile's multiply-adds at these sizes. The buffer
// is the calling thread's workspace `slot`, valid until the next st_pack into that slot.
typedef struct {
    float *buf;
    size_t size;
    int K, N;
} StPacked;

// Room for `count` packed K x N matrices in workspace `slot` (filled by the caller, cg_pack).
static inline StPacked st_packed_alloc(int slot, int count, int K, int N) {
    StPacked p;
    p.K = K; p.N = N;
    p.size = cg_packed_size(K, N);
    p.buf = st_workspace(slot, p.size * (size_t)(count > 0 ? count : 1) + CG_NR);
    return p;
}
static inline StPacked st_pack(int slot, int count, int tb, int K, int N, const float *B, size_t stride, int ldb) {
    StPacked p = st_packed_alloc(slot, count, K, N);
    const size_t rsb = tb ? 1 : (size_t)ldb, csb = tb ? (size_t)ldb : 1;
    ST_PRAGMA(omp parallel for schedule(static))
    for (int i = 0; i < count; i++) cg_pack(p.buf + (size_t)i * p.size, K, N, B + (size_t)i * stride, rsb, csb);
    return p;
}

// C (M x N) = beta * C + A (M x K, row stride lda) . packed matrix i.
static inline void st_gemm_packed(int M, const StPacked *p, int i, const float *A, int lda, float beta, float *C, int ldc) {
    cg_gemm_packed(M, p->N, p->K, A, (size_t)lda, 1, p->buf + (size_t)i * p->size, C, (size_t)ldc, beta != 0.0f);
}
// The same with row r of A at rows[r] + off (rows gathered by index without copying them).
static inline void st_gemm_packed_rows(int M, const StPacked *p, int i, const float *const *rows, size_t off, float *C, int ldc) {
    cg_gemm_packed_rows(M, p->N, p->K, NULL, 0, rows, off, 1, p->buf + (size_t)i * p->size, C, (size_t)ldc, 0);
}

// ----------------------------------------------------------------------------------------------
// Blocked transpose of one row: src viewed as [R][C][blk] -> dst [C][R][blk]. The block sizes
// the layers use (1, 2, 4, 8: rank, experts) get fixed-size copies, which compile to moves; single
// floats with R and C multiples of 8 (or 4) go 8 x 8 (4 x 4) through vector registers (scalar moves
// were a third of a Monarch layer's time at sqrt(d) blocks), pairs of floats 4 x 4.
#define ST_TRANSPOSE_BLK(B)                                                                                        \
    for (int r = 0; r < R; r++)                                                                                    \
        for (int c = 0; c < C; c++) memcpy(dst + ((size_t)c * R + r) * (B), src + ((size_t)r * C + c) * (B), sizeof(float) * (B));
#if defined(__AVX__) && !defined(CG_PLAIN_C)
// dst (8 x 8, row stride ldd) = src (8 x 8, row stride lds) transposed, in registers.
static inline void st_transpose8x8(float *dst, size_t ldd, const float *src, size_t lds) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + (size_t)i * lds);
    for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // then pairs of pairs: columns j and j+4 of four rows in each
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {  // the two halves of the eight rows
        _mm256_storeu_ps(dst + (size_t)i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (size_t)(i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}
// The same for 4 x 4 (Monarch with 4 blocks).
static inline void st_transpose4x4(float *dst, size_t ldd, const float *src, size_t lds) {
    __m128 r0 = _mm_loadu_ps(src), r1 = _mm_loadu_ps(src + lds), r2 = _mm_loadu_ps(src + 2 * lds), r3 = _mm_loadu_ps(src + 3 * lds);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    _mm_storeu_ps(dst, r0);
    _mm_storeu_ps(dst + ldd, r1);
    _mm_storeu_ps(dst + 2 * ldd, r2);
    _mm_storeu_ps(dst + 3 * ldd, r3);
}
// Pairs of floats (rank 2) moved as doubles, 4 x 4 (bit patterns kept: no arithmetic).
static inline void st_transpose4x4_pairs(float *dst, size_t ldd, const float *src, size_t lds) {
    __m256d r[4], t[4];
    for (int i = 0; i < 4; i++) r[i] = _mm256_castps_pd(_mm256_loadu_ps(src + 2 * (size_t)i * lds));
    t[0] = _mm256_unpacklo_pd(r[0], r[1]);
    t[1] = _mm256_unpackhi_pd(r[0], r[1]);
    t[2] = _mm256_unpacklo_pd(r[2], r[3]);
    t[3] = _mm256_unpackhi_pd(r[2], r[3]);
    _mm256_storeu_ps(dst, _mm256_castpd_ps(_mm256_permute2f128_pd(t[0], t[2], 0x20)));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_castpd_ps(_mm256_permute2f128_pd(t[1], t[3], 0x20)));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_castpd_ps(_mm256_permute2f128_pd(t[0], t[2], 0x31)));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_castpd_ps(_mm256_permute2f128_pd(t[1], t[3], 0x31)));
}
// Quads of floats (rank 4) moved as 128-bit lanes: 4 x 4 of them through AVX-512 registers, else
// 2 x 2 through AVX ones (ldd, lds in quads). One 16-byte store per quad took 13-15% of a rank-4
// BTT layer's time; this stores 64 (32) bytes at a time.
#if defined(__AVX512F__)
static inline void st_transpose4x4_quads(float *dst, size_t ldd, const float *src, size_t lds) {
    __m512 r[4], t[4];
    for (int i = 0; i < 4; i++) r[i] = _mm512_loadu_ps(src + 4 * (size_t)i * lds);
    t[0] = _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(1, 0, 1, 0));  // quads 0, 1 of rows 0 and 1
    t[1] = _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(3, 2, 3, 2));  // quads 2, 3 of rows 0 and 1
    t[2] = _mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(1, 0, 1, 0));
    t[3] = _mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(3, 2, 3, 2));
    _mm512_storeu_ps(dst, _mm512_shuffle_f32x4(t[0], t[2], _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(dst + 4 * ldd, _mm512_shuffle_f32x4(t[0], t[2], _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(dst + 8 * ldd, _mm512_shuffle_f32x4(t[1], t[3], _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(dst + 12 * ldd, _mm512_shuffle_f32x4(t[1], t[3], _MM_SHUFFLE(3, 1, 3, 1)));
}
#define ST_QUADS 4
#else
static inline void st_transpose2x2_quads(float *dst, size_t ldd, const float *src, size_t lds) {
    const __m256 a = _mm256_loadu_ps(src), b = _mm256_loadu_ps(src + 4 * lds);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(a, b, 0x31));
}
#define ST_QUADS 2
#endif
#endif

static inline void st_transpose(float *dst, const float *src, int R, int C, int blk) {
#if defined(__AVX__) && !defined(CG_PLAIN_C)
    if (blk == 1 && R % 8 == 0 && C % 8 == 0) {  // Monarch's and rank-1 BTT's: 8 x 8 blocks in registers
        for (int r = 0; r < R; r += 8)
            for (int c = 0; c < C; c += 8) st_transpose8x8(dst + (size_t)c * R + r, (size_t)R, src + (size_t)r * C + c, (size_t)C);
        return;
    }
    if (blk == 1 && R % 4 == 0 && C % 4 == 0) {
        for (int r = 0; r < R; r += 4)
            for (int c = 0; c < C; c += 4) st_transpose4x4(dst + (size_t)c * R + r, (size_t)R, src + (size_t)r * C + c, (size_t)C);
        return;
    }
    if (blk == 4 && R % ST_QUADS == 0 && C % ST_QUADS == 0) {  // rank 4
        for (int r = 0; r < R; r += ST_QUADS)
            for (int c = 0; c < C; c += ST_QUADS)
#if ST_QUADS == 4
                st_transpose4x4_quads(dst + 4 * ((size_t)c * R + r), (size_t)R, src + 4 * ((size_t)r * C + c), (size_t)C);
#else
                st_transpose2x2_quads(dst + 4 * ((size_t)c * R + r), (size_t)R, src + 4 * ((size_t)r * C + c), (size_t)C);
#endif
        return;
    }
    if (blk == 2 && R % 4 == 0 && C % 4 == 0) {  // rank 2
        for (int r = 0; r < R; r += 4)
            for (int c = 0; c < C; c += 4)
                st_transpose4x4_pairs(dst + 2 * ((size_t)c * R + r), (size_t)R, src + 2 * ((size_t)r * C + c), (size_t)C);
        return;
    }
#endif
    switch (blk) {
        case 1: ST_TRANSPOSE_BLK(1) return;
        case 2: ST_TRANSPOSE_BLK(2) return;
        case 4: ST_TRANSPOSE_BLK(4) return;
        case 8: ST_TRANSPOSE_BLK(8) return;
        default: ST_TRANSPOSE_BLK(blk) return;
    }
}
#undef ST_TRANSPOSE_BLK

// ----------------------------------------------------------------------------------------------
// Parallel GEMM jobs: a list of independent products, each optionally split into chunks of
// output rows (or columns, when it has fewer rows than columns) so that there are enough tasks
// for every thread. Each output element is computed by one st_gemm call over the whole K, so the
// result is deterministic whichever thread runs a task.
// acc = ST_OVERWRITE: C = op(A) op(B). ST_ADD: C += op(A) op(B), computed into a temporary first
// and then added, so the contribution does not depend on what C held (exact 2x on a repeated
// call). ST_CHAIN: C continues each element's multiply-add chain (common/gemm.h), so a product
// run over its K in consecutive parts, the first ST_OVERWRITE, gives the bits of one call.
enum { ST_OVERWRITE = 0, ST_ADD = 1, ST_CHAIN = 2 };
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
    int nt = st_num_threads();
    // Jobs differ in size by 10x and more (a BTT's dW1 and dW0 blocks): each is cut into chunks of
    // at most an eighth of a thread's share of the multiply-adds, and threads take chunks as they
    // finish (dynamic: which thread computes a chunk does not change its bits).
    double total = 0.0;
    for (int i = 0; i < njobs; i++) total += (double)jobs[i].M * jobs[i].N * jobs[i].K;
    const double chunk_cost = total / (8.0 * nt) + 1.0;
    int *nch = (int *)mallocCheck(sizeof(int) * (size_t)njobs);
    int ntasks = 0;
    size_t tmp_max = 0;
    for (int i = 0; i < njobs; i++) {
        int len = jobs[i].M >= jobs[i].N ? jobs[i].M : jobs[i].N;
        int c = (int)((double)jobs[i].M * jobs[i].N * jobs[i].K / chunk_cost) + 1;
        if (c > len / 16) c = len / 16;  // chunks of at least 16 rows (columns)
        if (c < 1) c = 1;
        nch[i] = c;
        ntasks += c;
        if (jobs[i].acc == ST_ADD) {
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
        ST_PRAGMA(omp for schedule(dynamic, 1))
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
            if (j->acc != ST_ADD) {
                st_gemm(j->ta, j->tb, M, N, j->K, A, j->lda, B, j->ldb, j->acc == ST_CHAIN ? 1.0f : 0.0f, C, j->ldc);
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

// dst[i] += src[i]: a backward's weight-gradient contributions, computed apart, added to the
// gradients (exact 2x on a repeat).
static inline void st_add(float *dst, const float *src, size_t n) {
    ST_PRAGMA(omp parallel for schedule(static))
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
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

// Rows of a tile that go through all of a stage's block products together, then the next rows:
// a tile's operands are read one block of columns per product, so a whole tile's rows (64 of a few
// KB) would come from L2 for every block, while a few rows (row_floats each, about 32 KB in all)
// stay in L1 across the blocks (measured: a BTT-MoE forward's expert loop at width 768 in a third
// less time; its backward and BTT's stages, whose operands are contiguous, gained nothing and do not
// use it).
static inline int st_l1_rows(size_t row_floats) {
    const int r = (int)(8192 / (row_floats > 0 ? row_floats : 1)) / CG_MR * CG_MR;
    return r < CG_MR ? CG_MR : r;
}

// Number of row tiles of ST_TILE_ROWS rows for N rows.
static inline int st_num_tiles(int N) { return N <= 0 ? 0 : (N + ST_TILE_ROWS - 1) / ST_TILE_ROWS; }

// Rows of the backward's passes: the dx tiles of a chunk write its dZ (row_floats per row), which
// the weight gradients then read while it is still in cache (a whole layer's dZ is tens of MB).
// About 3 MB of it (measured best on a 2-core Zen 5 among 128 to 4096 rows at widths 768 and 2048).
// But each chunk also reads and writes the weight gradients' partial sums (w_floats), and where one
// weight block is bigger than half an L2 (block_floats) those come from memory every time: there
// the chunk is at least 4 times the weights (Monarch with 4 blocks at width 2048, 1 MB blocks: a
// 1.3x slower backward in chunks of 192 rows than of 2048; BTT's blocks of tens of KB: 1.25x
// slower in chunks of 448 rows than of 128). Whole tiles, a multiple of the thread count (3 tiles
// on 2 threads left one idle a third of the time: BTT-MoE's backward at width 1024). Any
// chunking gives the same bits.
// Tests force a chunk size here (rows, a multiple of ST_TILE_ROWS), to check that chunking does
// not change a bit; 0: the size below.
static int st_chunk_rows_forced = 0;
static inline int st_chunk_rows(size_t row_floats, size_t w_floats, size_t block_floats) {
    if (st_chunk_rows_forced > 0) return st_chunk_rows_forced;
    const size_t row = row_floats > 0 ? row_floats : 1, by_cache = ((size_t)3 << 20) / (sizeof(float) * row),
                 by_weights = sizeof(float) * block_floats > ((size_t)512 << 10) ? (4 * w_floats + row - 1) / row : 0;
    const size_t want = by_cache > by_weights ? by_cache : by_weights, nt = (size_t)st_num_threads();
    size_t tiles = (want + ST_TILE_ROWS / 2) / ST_TILE_ROWS;
    tiles = tiles < nt ? nt : (tiles + nt - 1) / nt * nt;  // the threads split a chunk's tiles evenly
    return (int)(tiles < (1u << 20) ? tiles : (1u << 20)) * ST_TILE_ROWS;
}
