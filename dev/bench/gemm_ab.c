// gemm_ab.c: several versions of common/gemm.h timed in ONE process, alternating: on a shared
// machine whose speed drifts by 25% from minute to minute, only that separates a few per cent.
// dev/bench/gemm_ab.sh builds it: each version's translation unit (GEMM_AB_TU, NAME = ab_gemm_I,
// its own copy of gemm.h on the include path) and the driver (GEMM_AB_VARIANTS = how many).
//
// The driver times the three products of a linear layer d_in -> d_out over 4096 rows as the
// trainer runs them (train_gpt2.c's gemm() splits these shapes along M between two threads):
// forward y = x W^T, backward dx = dy W and dW = dy^T x. Each version's best of `rounds`, its
// GFLOP/s, its ratio to version 0 and whether its results have version 0's bits (after one
// untimed round).
#ifdef GEMM_AB_TU
#include "common/gemm.h"
void NAME(int M, int N, int K, const float *A, size_t rsa, size_t csa, const float *B, size_t rsb, size_t csb, float *C,
          size_t ldc, int acc) {
    cg_gemm(M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, acc);
}
#else
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef void gemm_fn(int, int, int, const float *, size_t, size_t, const float *, size_t, size_t, float *, size_t, int);
#define AB_DECL(i) gemm_fn ab_gemm_##i;
AB_DECL(0) AB_DECL(1) AB_DECL(2) AB_DECL(3)
static gemm_fn *const versions[4] = {ab_gemm_0, ab_gemm_1, ab_gemm_2, ab_gemm_3};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float *alloc_floats(size_t n) {
    float *p = (float *)aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    if (!p) { fprintf(stderr, "gemm_ab: out of memory (%zu floats)\n", n); exit(1); }
    return p;
}

int main(int argc, char **argv) {
    const int NV = GEMM_AB_VARIANTS, T = 4096;
    // the threads split T rows and d_out columns in halves
    if (argc != 4 || atoi(argv[1]) < 2 || atoi(argv[2]) < 2 || atoi(argv[2]) % 2 || atoi(argv[3]) < 1) {
        fprintf(stderr, "usage: %s d_in d_out rounds   (d_in >= 2, d_out >= 2 and even; rounds >= 1)\n", argv[0]);
        return 1;
    }
    const int Ci = atoi(argv[1]), Co = atoi(argv[2]), R = atoi(argv[3]);
    float *x = alloc_floats((size_t)T * Ci), *w = alloc_floats((size_t)Ci * Co), *dy = alloc_floats((size_t)T * Co);
    float *y[4], *dx[4], *dw[4];
    for (int v = 0; v < NV; v++) {
        y[v] = alloc_floats((size_t)T * Co);
        dx[v] = alloc_floats((size_t)T * Ci);
        dw[v] = alloc_floats((size_t)Ci * Co);
    }
    srand(1);
    for (size_t i = 0; i < (size_t)T * Ci; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    for (size_t i = 0; i < (size_t)Ci * Co; i++) w[i] = rand() / (float)RAND_MAX - 0.5f;
    for (size_t i = 0; i < (size_t)T * Co; i++) dy[i] = rand() / (float)RAND_MAX - 0.5f;
    double best[4][3];
    for (int v = 0; v < NV; v++) best[v][0] = best[v][1] = best[v][2] = 1e30;
    for (int r = -1; r < R; r++)  // round -1 warms up: first touches, packing buffers
        for (int v = 0; v < NV; v++) {
            gemm_fn *g = versions[v];
            double t[4];
            t[0] = now_s();
#pragma omp parallel num_threads(2)
            {
                const int m0 = omp_get_thread_num() * (T / 2);
                g(T / 2, Co, Ci, x + (size_t)m0 * Ci, Ci, 1, w, 1, Ci, y[v] + (size_t)m0 * Co, Co, 0);
            }
            t[1] = now_s();
#pragma omp parallel num_threads(2)
            {
                const int m0 = omp_get_thread_num() * (T / 2);
                g(T / 2, Ci, Co, dy + (size_t)m0 * Co, Co, 1, w, Ci, 1, dx[v] + (size_t)m0 * Ci, Ci, 0);
            }
            t[2] = now_s();
#pragma omp parallel num_threads(2)
            {
                const int m0 = omp_get_thread_num() * (Co / 2);
                g(Co / 2, Ci, T, dy + m0, 1, Co, x, Ci, 1, dw[v] + (size_t)m0 * Ci, Ci, 0);
            }
            t[3] = now_s();
            for (int j = 0; j < 3 && r >= 0; j++)
                if (t[j + 1] - t[j] < best[v][j]) best[v][j] = t[j + 1] - t[j];
        }
    const double gf = 2.0 * T * Ci * Co / 1e9;
    for (int v = 0; v < NV; v++) {
        const int same = !memcmp(y[v], y[0], sizeof(float) * (size_t)T * Co) && !memcmp(dx[v], dx[0], sizeof(float) * (size_t)T * Ci) &&
                         !memcmp(dw[v], dw[0], sizeof(float) * (size_t)Ci * Co);
        printf("%5d -> %-5d version %d: forward %6.1f  dx %6.1f  dW %6.1f GFLOP/s | over version 0: %.2f %.2f %.2f | %s\n", Ci,
               Co, v, gf / best[v][0], gf / best[v][1], gf / best[v][2], best[0][0] / best[v][0], best[0][1] / best[v][1],
               best[0][2] / best[v][2], same ? "same bits" : "DIFFERENT BITS");
    }
    return 0;
}
#endif
