// gemm.h: the CPU GEMM kernel, single-threaded, that the dense matmuls (train_gpt2.c) and the
// structured layers (structured/factor.h) share: C = [C +] A·B with A and B given by strides,
// B packed into column strips (or read in place), A read in place or through row pointers, a
// register-tiled micro-kernel (AVX-512, AVX2+FMA, or plain C that auto-vectorizes, chosen at
// compile time).
//
// Every element of C is one fused multiply-add chain over k in ascending order, starting from C
// (accumulate) or from zero, whatever the blocking and the thread that runs it: a product split
// along K, M or N between calls or threads gives the same bits as one call (the vector kernels
// fuse explicitly; plain C leaves the contraction to the compiler, consistently within a build).
// Header-only, valid C11 and C++ (nvcc and the CUDA simulator include it through factor.h).
#pragma once
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))) && !defined(CG_PLAIN_C)
#include <immintrin.h>
#endif

#ifdef __cplusplus
#define CG_THREAD_LOCAL thread_local
#else
#define CG_THREAD_LOCAL _Thread_local
#endif

// Micro-tile: CG_MR rows of C (A's elements broadcast) by CG_NR columns (vectors of packed B).
// The accumulators fill most of the vector registers: 16 of AVX-512's 32, 12 of AVX2's 16.
#if defined(__AVX512F__) && !defined(CG_PLAIN_C)
#define CG_ISA "AVX-512"
#define CG_MR 8
#define CG_NR 32
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CG_PLAIN_C)
#define CG_ISA "AVX2+FMA"
#define CG_MR 6
#define CG_NR 16
#else
#define CG_ISA "plain C"
#define CG_MR 4
#define CG_NR 16
#endif
#define CG_KC 256  // depth of a packed block: a strip of it (kc x NR floats, 32 KB) stays in L1
#define CG_NC 256  // columns packed at once: kc x nc (256 KB) stays in L2 beside A's rows and C's
                   // (512 measured 3-13% slower on Zen 5, two threads, 768-2048 wide layers)
#define CG_MC 96   // rows of A worked through per strip sweep: mc x kc of A (96 KB) stays in L2

// ----------------------------------------------------------------------------------------------
// Packed B: for each block of CG_KC rows of k, the columns in strips of CG_NR, each strip k-major
// (kc x CG_NR, zero-padded past N). Block pc (its first k) starts at pc * ncols_padded.

static inline size_t cg_padded_cols(int N) { return (size_t)(N + CG_NR - 1) / CG_NR * CG_NR; }
// Floats a packed K x N matrix takes.
static inline size_t cg_packed_size(int K, int N) { return (size_t)K * cg_padded_cols(N); }

// Packs B (K x N, B(k, n) = B[k*rsb + n*csb]) into dst (cg_packed_size floats, 64-byte aligned).
static inline void cg_pack(float *dst, int K, int N, const float *B, size_t rsb, size_t csb) {
    const size_t np = cg_padded_cols(N);
    for (int pc = 0; pc < K; pc += CG_KC) {
        const int kc = K - pc < CG_KC ? K - pc : CG_KC;
        for (int j0 = 0; j0 < N; j0 += CG_NR) {
            float *d = dst + (size_t)pc * np + (size_t)j0 * kc;
            const int nr = N - j0 < CG_NR ? N - j0 : CG_NR;
            if (csb == 1) {
                for (int k = 0; k < kc; k++) {
                    const float *b = B + (size_t)(pc + k) * rsb + j0;
                    float *dk = d + (size_t)k * CG_NR;
                    for (int j = 0; j < nr; j++) dk[j] = b[j];
                    for (int j = nr; j < CG_NR; j++) dk[j] = 0.0f;
                }
            } else {  // columns of B are contiguous (a transposed matrix): read each one in order
                for (int j = 0; j < CG_NR; j++) {
                    if (j >= nr) {
                        for (int k = 0; k < kc; k++) d[(size_t)k * CG_NR + j] = 0.0f;
                        continue;
                    }
                    const float *b = B + (size_t)pc * rsb + (size_t)(j0 + j) * csb;
                    for (int k = 0; k < kc; k++) d[(size_t)k * CG_NR + j] = b[(size_t)k * rsb];
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Micro-kernel: c (mr x nr of an MR x NR tile, row stride ldc) = [c +] A-rows . b-strip over kc.
// Row r of A starts at ap[r], element k at k*csa; ap has CG_MR entries, those past mr repeat a
// valid row (their results are not stored).
// Row k of the B strip is b + k*ldb. packed: a packed strip (ldb = CG_NR, zero-padded, 64-byte
// aligned), read with plain loads; else B itself (ldb its row stride, any alignment), of which only
// the nr columns are read. (Told, not inferred from ldb: B in place may have a row stride of CG_NR.)

#if defined(__AVX512F__) && !defined(CG_PLAIN_C)
#define CG_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
static inline void cg_kernel(int kc, const float *const *ap, size_t csa, const float *b, size_t ldb, int packed, float *c, size_t ldc,
                             int acc, int mr, int nr) {
    const __mmask16 m0 = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1u);
    const __mmask16 m1 = nr >= 32 ? (__mmask16)0xFFFF : nr <= 16 ? (__mmask16)0 : (__mmask16)((1u << (nr - 16)) - 1u);
#define CG_DECL(r)                                                              \
    const float *a##r = ap[r];                                                  \
    __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();        \
    if (acc && (r) < mr) {                                                      \
        c##r##0 = _mm512_maskz_loadu_ps(m0, c + (size_t)(r) * ldc);             \
        c##r##1 = _mm512_maskz_loadu_ps(m1, c + (size_t)(r) * ldc + 16);        \
    }
    CG_ROWS(CG_DECL)
#undef CG_DECL
    // A packed strip takes plain loads, which ran a few per cent faster than masked ones.
    if (nr <= 16) {  // one vector of columns: half the multiply-adds
        for (int k = 0; k < kc; k++, b += ldb) {
            const __m512 b0 = packed ? _mm512_load_ps(b) : _mm512_maskz_loadu_ps(m0, b);
#define CG_FMA1(r) c##r##0 = _mm512_fmadd_ps(_mm512_set1_ps(*a##r), b0, c##r##0); a##r += csa;
            CG_ROWS(CG_FMA1)
#undef CG_FMA1
        }
    } else {
        for (int k = 0; k < kc; k++, b += ldb) {
            const __m512 b0 = packed ? _mm512_load_ps(b) : _mm512_maskz_loadu_ps(m0, b);
            const __m512 b1 = packed ? _mm512_load_ps(b + 16) : _mm512_maskz_loadu_ps(m1, b + 16);
#define CG_FMA2(r)                                  \
    {                                               \
        const __m512 x = _mm512_set1_ps(*a##r);     \
        c##r##0 = _mm512_fmadd_ps(x, b0, c##r##0);  \
        c##r##1 = _mm512_fmadd_ps(x, b1, c##r##1);  \
        a##r += csa;                                \
    }
            CG_ROWS(CG_FMA2)
#undef CG_FMA2
        }
    }
#define CG_STORE(r)                                                  \
    if ((r) < mr) {                                                  \
        _mm512_mask_storeu_ps(c + (size_t)(r) * ldc, m0, c##r##0);   \
        if (m1) _mm512_mask_storeu_ps(c + (size_t)(r) * ldc + 16, m1, c##r##1); \
    }
    CG_ROWS(CG_STORE)
#undef CG_STORE
}
#undef CG_ROWS

#elif defined(__AVX2__) && defined(__FMA__) && !defined(CG_PLAIN_C)
#define CG_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
static inline void cg_kernel(int kc, const float *const *ap, size_t csa, const float *b, size_t ldb, int packed, float *c, size_t ldc,
                             int acc, int mr, int nr) {
    float t[CG_MR * CG_NR] __attribute__((aligned(32)));
    const int full = nr == CG_NR;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr), lane), m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr - 8), lane);
    if (acc && !full)  // a partial tile goes through t, so that nothing past nr is read or written
        for (int r = 0; r < mr; r++)
            for (int j = 0; j < nr; j++) t[r * CG_NR + j] = c[(size_t)r * ldc + j];
#define CG_DECL(r)                                                                          \
    const float *a##r = ap[r];                                                              \
    __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();                    \
    if (acc && (r) < mr) {                                                                  \
        const float *src = full ? c + (size_t)(r) * ldc : t + (r) * CG_NR;                  \
        c##r##0 = _mm256_loadu_ps(src);                                                     \
        c##r##1 = _mm256_loadu_ps(src + 8);                                                 \
    }
    CG_ROWS(CG_DECL)
#undef CG_DECL
#define CG_FMA2(r)                                  \
    {                                               \
        const __m256 x = _mm256_broadcast_ss(a##r); \
        c##r##0 = _mm256_fmadd_ps(x, b0, c##r##0);  \
        c##r##1 = _mm256_fmadd_ps(x, b1, c##r##1);  \
        a##r += csa;                                \
    }
    if (packed) {  // aligned, zero-padded: plain loads (masked ones cost more here)
        for (int k = 0; k < kc; k++, b += CG_NR) {
            const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
            CG_ROWS(CG_FMA2)
        }
    } else {
        for (int k = 0; k < kc; k++, b += ldb) {
            const __m256 b0 = _mm256_maskload_ps(b, m0), b1 = _mm256_maskload_ps(b + 8, m1);
            CG_ROWS(CG_FMA2)
        }
    }
#undef CG_FMA2
#define CG_STORE(r)                                                         \
    if ((r) < mr) {                                                         \
        float *dst = full ? c + (size_t)(r) * ldc : t + (r) * CG_NR;        \
        _mm256_storeu_ps(dst, c##r##0);                                     \
        _mm256_storeu_ps(dst + 8, c##r##1);                                 \
    }
    CG_ROWS(CG_STORE)
#undef CG_STORE
#undef CG_ROWS
    if (!full)
        for (int r = 0; r < mr; r++)
            for (int j = 0; j < nr; j++) c[(size_t)r * ldc + j] = t[r * CG_NR + j];
}

#else
static inline void cg_kernel(int kc, const float *const *ap, size_t csa, const float *b, size_t ldb, int packed, float *c, size_t ldc,
                             int acc, int mr, int nr) {
    float t[CG_MR][CG_NR];
    for (int r = 0; r < CG_MR; r++)
        for (int j = 0; j < CG_NR; j++) t[r][j] = acc && r < mr && j < nr ? c[(size_t)r * ldc + j] : 0.0f;
    for (int k = 0; k < kc; k++, b += ldb)
        for (int r = 0; r < CG_MR; r++) {
            const float x = ap[r][(size_t)k * csa];
            for (int j = 0; j < nr; j++) t[r][j] += x * b[j];
        }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) c[(size_t)r * ldc + j] = t[r][j];
}
#endif

// ----------------------------------------------------------------------------------------------
// Drivers

// The MR row pointers of rows [i, i+mr) of A, at element koff: A + row*rsa, or rows[row] + off
// when rows is given.
static inline void cg_rows(const float **ap, const float *A, size_t rsa, const float *const *rows, size_t off, size_t koff,
                           int i, int mr) {
    for (int r = 0; r < CG_MR; r++) {
        const int row = i + (r < mr ? r : 0);
        ap[r] = (rows ? rows[row] + off : A + (size_t)row * rsa) + koff;
    }
}

// C (M x N) = [C +] A (M x K) . Bp, Bp = cg_pack of a K x N matrix; row i of A at rows[i] + off
// (element k at k*csa), or at A + i*rsa when rows is NULL.
static inline void cg_gemm_packed_rows(int M, int N, int K, const float *A, size_t rsa, const float *const *rows, size_t off,
                                       size_t csa, const float *Bp, float *C, size_t ldc, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate)
            for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, sizeof(float) * (size_t)N);
        return;
    }
    const size_t np = cg_padded_cols(N);
    const float *ap[CG_MR];
    for (int pc = 0; pc < K; pc += CG_KC) {
        const int kc = K - pc < CG_KC ? K - pc : CG_KC, acc = accumulate || pc > 0;
        const float *Bk = Bp + (size_t)pc * np;
        for (int ic = 0; ic < M; ic += CG_MC) {
            const int mc = M - ic < CG_MC ? M - ic : CG_MC;
            for (int j0 = 0; j0 < N; j0 += CG_NR) {
                const int nr = N - j0 < CG_NR ? N - j0 : CG_NR;
                const float *bs = Bk + (size_t)j0 * kc;
                for (int ir = 0; ir < mc; ir += CG_MR) {
                    const int i = ic + ir, mr = mc - ir < CG_MR ? mc - ir : CG_MR;
                    cg_rows(ap, A, rsa, rows, off, (size_t)pc * csa, i, mr);
                    cg_kernel(kc, ap, csa, bs, CG_NR, 1, C + (size_t)i * ldc + j0, ldc, acc, mr, nr);
                }
            }
        }
    }
}

// C (M x N) = [C +] A (M x K) . Bp, Bp = cg_pack of a K x N matrix.
static inline void cg_gemm_packed(int M, int N, int K, const float *A, size_t rsa, size_t csa, const float *Bp, float *C,
                                  size_t ldc, int accumulate) {
    cg_gemm_packed_rows(M, N, K, A, rsa, NULL, 0, csa, Bp, C, ldc, accumulate);
}

// A thread's packing buffer, kept between calls (CG_KC x CG_NC floats, 256 KB).
static inline float *cg_thread_buffer(void) {
    static CG_THREAD_LOCAL float *buf = NULL;
    if (!buf) {
        buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)CG_KC * CG_NC);
        if (!buf) { fprintf(stderr, "error: out of memory for the GEMM packing buffer (%zu bytes)\n", sizeof(float) * (size_t)CG_KC * CG_NC); exit(EXIT_FAILURE); }
    }
    return buf;
}

// C (M x N) = [C +] A (M x K) . B (K x N); A(i, k) = A[i*rsa + k*csa], B(k, n) = B[k*rsb + n*csb].
// B is packed a block (CG_KC x CG_NC) at a time into this thread's buffer, unless its rows are
// contiguous and A has so few rows that packing would cost more than it saves: then the kernel
// reads B in place.
#define CG_DIRECT_M (4 * CG_MR)
static inline void cg_gemm(int M, int N, int K, const float *A, size_t rsa, size_t csa, const float *B, size_t rsb,
                           size_t csb, float *C, size_t ldc, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { cg_gemm_packed(M, N, K, A, rsa, csa, NULL, C, ldc, accumulate); return; }
    if (csb == 1 && M <= CG_DIRECT_M) {
        for (int pc = 0; pc < K; pc += CG_KC) {
            const int kc = K - pc < CG_KC ? K - pc : CG_KC, acc = accumulate || pc > 0;
            for (int j0 = 0; j0 < N; j0 += CG_NR) {
                const int nr = N - j0 < CG_NR ? N - j0 : CG_NR;
                for (int i = 0; i < M; i += CG_MR) {
                    const int mr = M - i < CG_MR ? M - i : CG_MR;
                    const float *ap[CG_MR];
                    cg_rows(ap, A, rsa, NULL, 0, (size_t)pc * csa, i, mr);
                    cg_kernel(kc, ap, csa, B + (size_t)pc * rsb + j0, rsb, 0, C + (size_t)i * ldc + j0, ldc, acc, mr, nr);
                }
            }
        }
        return;
    }
    float *buf = cg_thread_buffer();
    for (int jc = 0; jc < N; jc += CG_NC) {
        const int nc = N - jc < CG_NC ? N - jc : CG_NC;
        for (int pc = 0; pc < K; pc += CG_KC) {
            const int kc = K - pc < CG_KC ? K - pc : CG_KC;
            cg_pack(buf, kc, nc, B + (size_t)pc * rsb + (size_t)jc * csb, rsb, csb);
            cg_gemm_packed(M, nc, kc, A + (size_t)pc * csa, rsa, csa, buf, C + jc, ldc, accumulate || pc > 0);
        }
    }
}
