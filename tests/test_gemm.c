// test_gemm.c: common/gemm.h, the CPU GEMM kernel of the dense and structured layers, against a
// double-precision reference on awkward shapes and strides (every transposition, edges of the
// micro-tile and of the packed blocks, K = 0, accumulate), that nothing outside C is written,
// and that every element is one multiply-add chain in k order: splitting a product along K, M or
// N, packing B beforehand or reading it in place gives the same bits. The Makefile builds it for
// each kernel this machine can run (AVX-512, AVX2+FMA, plain C).
#include <math.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>
#include "../common/gemm.h"
#include "check.h"

static uint64_t g_rng = 88172645463325252ull;
static float frand(void) {  // xorshift64, uniform in [-1, 1)
    g_rng ^= g_rng << 13; g_rng ^= g_rng >> 7; g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) * (2.0 / 16777216.0) - 1.0);
}

typedef struct {
    int M, N, K, ta, tb, acc;
} Case;

// op(A) (M x K) and op(B) (K x N) stored transposed or not, with padded leading dimensions.
typedef struct {
    float *A, *B;
    size_t rsa, csa, rsb, csb;
} Operands;

static Operands make_operands(const Case *c) {
    Operands o;
    const size_t lda = (size_t)(c->ta ? c->M : c->K) + 3, ldb = (size_t)(c->tb ? c->K : c->N) + 5;
    const size_t na = lda * (size_t)((c->ta ? c->K : c->M) + 1), nb = ldb * (size_t)((c->tb ? c->N : c->K) + 1);
    o.A = (float *)malloc(sizeof(float) * na);
    o.B = (float *)malloc(sizeof(float) * nb);
    for (size_t i = 0; i < na; i++) o.A[i] = frand();
    for (size_t i = 0; i < nb; i++) o.B[i] = frand();
    o.rsa = c->ta ? 1 : lda; o.csa = c->ta ? lda : 1;
    o.rsb = c->tb ? 1 : ldb; o.csb = c->tb ? ldb : 1;
    return o;
}

// The exact chain each element must be: c = fma(a_k, b_k, c) for k = 0, 1, ... from C or 0.
static float fma_chain(const Operands *o, int i, int j, int K, float start) {
    float c = start;
    for (int k = 0; k < K; k++) c = fmaf(o->A[i * o->rsa + k * o->csa], o->B[k * o->rsb + j * o->csb], c);
    return c;
}

static void test_case(const Case *c) {
    Operands o = make_operands(c);
    const int M = c->M, N = c->N, K = c->K, ldc = N + 7, rows = M + 2;
    const float sentinel = 12345.0f;
    float *C = (float *)malloc(sizeof(float) * (size_t)rows * ldc), *C0 = (float *)malloc(sizeof(float) * (size_t)rows * ldc);
    for (int i = 0; i < rows * ldc; i++) C0[i] = (i / ldc < M && i % ldc < N) ? frand() : sentinel;
    memcpy(C, C0, sizeof(float) * (size_t)rows * ldc);
    cg_gemm(M, N, K, o.A, o.rsa, o.csa, o.B, o.rsb, o.csb, C, (size_t)ldc, c->acc);

    char name[96];
    snprintf(name, sizeof name, "%s: M %d N %d K %d %s%s%s", CG_ISA, M, N, K, c->ta ? "At" : "A", c->tb ? "Bt" : "B",
             c->acc ? " C+=" : "");
    // against double precision: |error| <= 1e-6 * (sum |a||b| + |c|) + 1e-30
    double worst = 0.0;
    int outside = 0, chain_diff = 0;
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < ldc; j++) {
            const float got = C[(size_t)i * ldc + j];
            if (i >= M || j >= N) { outside += got != sentinel; continue; }
            const double start = c->acc ? C0[(size_t)i * ldc + j] : 0.0;
            double ref = start, mag = fabs(start);
            for (int k = 0; k < K; k++) {
                const double p = (double)o.A[i * o.rsa + k * o.csa] * o.B[k * o.rsb + j * o.csb];
                ref += p;
                mag += fabs(p);
            }
            const double e = fabs(got - ref) / (mag + 1e-30);
            if (e > worst) worst = e;
            chain_diff += got != fma_chain(&o, i, j, K, (float)start);
        }
    char what[96];
    snprintf(what, sizeof what, "worst relative error %.3g", worst);
    char n1[320];
    snprintf(n1, sizeof n1, "%s: equals the float64 product (relative to sum |a||b| + |c|, tol 1e-6)", name);
    check_true(worst <= 1e-6, n1, what);
    snprintf(n1, sizeof n1, "%s: nothing outside C (M x N of ldc %d) written", name, ldc);
    snprintf(what, sizeof what, "%d elements changed", outside);
    check_true(outside == 0, n1, what);
#ifndef CG_PLAIN_C  // plain C leaves contraction to the compiler; the vector kernels use fma
    snprintf(n1, sizeof n1, "%s: each element is the fma chain over k in order", name);
    snprintf(what, sizeof what, "%d of %d elements differ", chain_diff, M * N);
    check_true(chain_diff == 0, n1, what);
#else
    (void)chain_diff;
#endif

    // the same bits when split along K (two calls), M and N (row and column blocks), or packed
    float *S = (float *)malloc(sizeof(float) * (size_t)rows * ldc);
    int diffs[5] = {0, 0, 0, 0, 0};
    if (K > 1) {
        const int k1 = K / 3 + 1;
        memcpy(S, C0, sizeof(float) * (size_t)rows * ldc);
        cg_gemm(M, N, k1, o.A, o.rsa, o.csa, o.B, o.rsb, o.csb, S, (size_t)ldc, c->acc);
        cg_gemm(M, N, K - k1, o.A + k1 * o.csa, o.rsa, o.csa, o.B + k1 * o.rsb, o.rsb, o.csb, S, (size_t)ldc, 1);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) diffs[0] += S[(size_t)i * ldc + j] != C[(size_t)i * ldc + j];
    }
    memcpy(S, C0, sizeof(float) * (size_t)rows * ldc);
    const int m1 = M / 2, n1c = N / 3;
    cg_gemm(m1, N, K, o.A, o.rsa, o.csa, o.B, o.rsb, o.csb, S, (size_t)ldc, c->acc);
    cg_gemm(M - m1, n1c, K, o.A + m1 * o.rsa, o.rsa, o.csa, o.B, o.rsb, o.csb, S + (size_t)m1 * ldc, (size_t)ldc, c->acc);
    cg_gemm(M - m1, N - n1c, K, o.A + m1 * o.rsa, o.rsa, o.csa, o.B + n1c * o.csb, o.rsb, o.csb, S + (size_t)m1 * ldc + n1c,
            (size_t)ldc, c->acc);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) diffs[1] += S[(size_t)i * ldc + j] != C[(size_t)i * ldc + j];
    float *P = (float *)aligned_alloc(64, sizeof(float) * (cg_packed_size(K, N) + CG_NR));
    cg_pack(P, K, N, o.B, o.rsb, o.csb);
    memcpy(S, C0, sizeof(float) * (size_t)rows * ldc);
    cg_gemm_packed(M, N, K, o.A, o.rsa, o.csa, P, S, (size_t)ldc, c->acc);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < ldc; j++) diffs[2] += S[(size_t)i * ldc + j] != C[(size_t)i * ldc + j];
    // row by row: M = 1 always reads B in place when B's rows are contiguous
    memcpy(S, C0, sizeof(float) * (size_t)rows * ldc);
    for (int i = 0; i < M; i++)
        cg_gemm(1, N, K, o.A + i * o.rsa, o.rsa, o.csa, o.B, o.rsb, o.csb, S + (size_t)i * ldc, (size_t)ldc, c->acc);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < ldc; j++) diffs[3] += S[(size_t)i * ldc + j] != C[(size_t)i * ldc + j];
    // rows given by pointers (cg_gemm_packed_rows), in reverse order and one element in (off 1):
    // row i of the result is row M-1-i of A[:, 1:] times B[1:, :]
    if (K > 1) {
        const float **rows = (const float **)malloc(sizeof(float *) * (size_t)(M > 0 ? M : 1));
        for (int i = 0; i < M; i++) rows[i] = o.A + (size_t)(M - 1 - i) * o.rsa;
        float *P1 = (float *)aligned_alloc(64, sizeof(float) * (cg_packed_size(K - 1, N) + CG_NR));
        cg_pack(P1, K - 1, N, o.B + o.rsb, o.rsb, o.csb);
        float *R1 = (float *)malloc(sizeof(float) * (size_t)M * N), *R2 = (float *)malloc(sizeof(float) * (size_t)M * N);
        cg_gemm_packed_rows(M, N, K - 1, NULL, 0, rows, o.csa, o.csa, P1, R1, (size_t)N, 0);
        cg_gemm(M, N, K - 1, o.A + o.csa, o.rsa, o.csa, o.B + o.rsb, o.rsb, o.csb, R2, (size_t)N, 0);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) diffs[4] += R1[(size_t)i * N + j] != R2[(size_t)(M - 1 - i) * N + j];
        free(rows); free(P1); free(R1); free(R2);
    }
    const char *how[5] = {"split along K into two calls", "split into row and column blocks", "with B packed beforehand (cg_gemm_packed)",
                          "one row per call", "with A's rows given by pointers, reversed and offset (cg_gemm_packed_rows)"};
    for (int h = 0; h < 5; h++) {
        snprintf(n1, sizeof n1, "%s: %s gives the same bits", name, how[h]);
        snprintf(what, sizeof what, "%d elements differ", diffs[h]);
        check_true(diffs[h] == 0, n1, what);
    }
    free(P);
    free(S);
    free(C);
    free(C0);
    free(o.A);
    free(o.B);
}

int main(void) {
    printf("common/gemm.h, %s kernel: MR %d, NR %d, KC %d, NC %d\n", CG_ISA, CG_MR, CG_NR, CG_KC, CG_NC);
    // shapes around the micro-tile (MR, NR), the direct-read limit (4 MR rows), the packed blocks
    // (KC deep, NC wide), and the structured layers' small products
    const int Ms[] = {1, 3, CG_MR, CG_MR + 1, 4 * CG_MR, 4 * CG_MR + 1, 64, 100};
    const int Ns[] = {1, 7, 16, 17, CG_NR, CG_NR + 1, 48, 64, CG_NC + 40};
    const int Ks[] = {1, 5, 16, CG_KC, CG_KC + 3, 600};
    int n = 0;
    for (size_t mi = 0; mi < sizeof Ms / sizeof *Ms; mi++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
            for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++) {
                // every transposition and accumulate, spread over the shapes (a quarter of them each)
                Case c = {Ms[mi], Ns[ni], Ks[ki], n & 1, (n >> 1) & 1, (n >> 2) & 1};
                n++;
                if ((size_t)c.M * c.N * c.K > 8000000) continue;  // keep the float64 reference quick
                test_case(&c);
            }
    // B read in place with a row stride of exactly CG_NR (the packed strips' stride) but neither
    // aligned nor padded: its last row ends at the end of a page, followed by a PROT_NONE page.
    // The kernel must not take it for a packed strip (aligned loads fault; full-width loads read
    // past the end); it once inferred "packed" from the stride.
    {
        const int M = 5, N = CG_NR - 3, K = 40;
        const long pg = sysconf(_SC_PAGESIZE);
        const size_t nb = (size_t)(K - 1) * CG_NR + N, bytes = (nb * sizeof(float) + (size_t)pg - 1) / (size_t)pg * (size_t)pg;
        char *map = (char *)mmap(NULL, bytes + (size_t)pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (map == MAP_FAILED || mprotect(map + bytes, (size_t)pg, PROT_NONE) != 0) { perror("mmap"); return 2; }
        // B ends at the guard page; (40 NR - 3) floats before a page boundary, it starts 12 bytes past
        // a 32- and a 64-byte boundary
        float *B = (float *)(map + bytes) - nb, A[5 * 40], C[5 * CG_NR];
        for (size_t i = 0; i < nb; i++) B[i] = frand();
        for (int i = 0; i < M * K; i++) A[i] = frand();
        cg_gemm(M, N, K, A, K, 1, B, CG_NR, 1, C, N, 0);
        int bad = 0;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float r = 0.0f;
                for (int k = 0; k < K; k++) r = fmaf(A[i * K + k], B[(size_t)k * CG_NR + j], r);
#ifndef CG_PLAIN_C
                bad += C[i * N + j] != r;
#else
                bad += fabsf(C[i * N + j] - r) > 1e-5f * (1.0f + fabsf(r));
#endif
            }
        char what[64];
        snprintf(what, sizeof what, "%d of %d elements wrong", bad, M * N);
        check_true(bad == 0, "B in place with a row stride of CG_NR, unaligned, ending at a guard page: read as B, not as a packed strip", what);
        munmap(map, bytes + (size_t)pg);
    }
    // K = 0: C = 0, or C unchanged when accumulating
    for (int acc = 0; acc < 2; acc++) {
        float C[6] = {1, 2, 3, 4, 5, 6}, A[1] = {0}, B[1] = {0};
        cg_gemm(2, 3, 0, A, 1, 1, B, 1, 1, C, 3, acc);
        int ok = 1;
        for (int i = 0; i < 6; i++) ok &= C[i] == (acc ? (float)(i + 1) : 0.0f);
        check_true(ok, acc ? "K = 0 with accumulate leaves C as it was" : "K = 0 sets C to zero", "wrong values");
    }
    return test_summary();
}
