// dev/cuda/harness.cuh: what every kernel-development program in dev/cuda/ shares: seeded random
// inputs, bf16 conversion, a checker against a CPU reference with stated tolerances, CUDA-event
// timing, and the device's roofline (peak bf16 TFLOP/s and memory bandwidth) for the printout.
//
// A program here is  ./NAME [version]  : it checks every version (or the one given) against its
// CPU reference and times it, printing one line per version:
//   version  ms  GB/s or TFLOP/s  % of roofline  max error
// and ends with "N passed, N failed" like the test programs.
#pragma once
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cuda/common.cuh"

// ----------------------------------------------------------------------------------------------
// inputs: a fixed-seed xorshift so that every run checks the same numbers

static uint64_t g_dev_rng = 0x9E3779B97F4A7C15ull;
static inline float dev_uniform(void) {  // [0, 1)
    g_dev_rng ^= g_dev_rng << 13; g_dev_rng ^= g_dev_rng >> 7; g_dev_rng ^= g_dev_rng << 17;
    return (float)((g_dev_rng >> 40) * (1.0 / 16777216.0));
}
static inline float *dev_random(size_t n, float lo, float hi) {
    float *p = (float *)malloc(n * sizeof(float));
    if (!p) { fprintf(stderr, "error: host malloc of %zu floats failed\n", n); exit(EXIT_FAILURE); }
    for (size_t i = 0; i < n; i++) p[i] = lo + (hi - lo) * dev_uniform();
    return p;
}
static inline int *dev_random_ints(size_t n, int hi) {
    int *p = (int *)malloc(n * sizeof(int));
    if (!p) { fprintf(stderr, "error: host malloc of %zu ints failed\n", n); exit(EXIT_FAILURE); }
    for (size_t i = 0; i < n; i++) p[i] = (int)(dev_uniform() * hi) % hi;
    return p;
}

// host fp32 <-> bf16 (round to nearest even), so the CPU reference sees exactly the GPU's inputs
static inline uint16_t dev_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float dev_bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// rounds a host array to bf16 in place (the CPU reference then computes on what the GPU reads)
static inline void dev_round_bf16(float *p, size_t n) { for (size_t i = 0; i < n; i++) p[i] = dev_bf2f(dev_f2bf(p[i])); }

// device copies: host fp32 -> bf16 into existing device memory, or into a new allocation
static inline void dev_copy_bf16(floatX *d, const float *h, size_t n) {
    uint16_t *t = (uint16_t *)malloc(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) t[i] = dev_f2bf(h[i]);
    cudaCheck(cudaMemcpy(d, t, n * sizeof(floatX), cudaMemcpyHostToDevice));
    free(t);
}
static inline floatX *dev_upload_bf16(const float *h, size_t n) {
    floatX *d;
    cudaCheck(cudaMalloc(&d, n * sizeof(floatX)));
    dev_copy_bf16(d, h, n);
    return d;
}
template <class T>
static inline T *dev_upload(const T *h, size_t n) {
    T *d;
    cudaCheck(cudaMalloc(&d, n * sizeof(T)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
// device bf16 or fp32 -> new host fp32 array
static inline float *dev_download_bf16(const floatX *d, size_t n) {
    uint16_t *t = (uint16_t *)malloc(n * sizeof(uint16_t));
    float *h = (float *)malloc(n * sizeof(float));
    cudaCheck(cudaMemcpy(t, d, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) h[i] = dev_bf2f(t[i]);
    free(t);
    return h;
}
// rows[0..nr) of a device bf16 (.., cols) matrix -> new host fp32 (nr, cols)
static inline float *dev_download_rows(const floatX *d, const int *rows, int nr, size_t cols) {
    uint16_t *t = (uint16_t *)malloc((size_t)nr * cols * sizeof(uint16_t));
    for (int s = 0; s < nr; s++)
        cudaCheck(cudaMemcpy(t + (size_t)s * cols, d + (size_t)rows[s] * cols, cols * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    float *h = (float *)malloc((size_t)nr * cols * sizeof(float));
    for (size_t i = 0; i < (size_t)nr * cols; i++) h[i] = dev_bf2f(t[i]);
    free(t);
    return h;
}
// 1 when rows [r0, r1) of a device bf16 (.., cols) matrix still hold the 0xFFFF (NaN) fill
static inline int dev_rows_untouched(const floatX *d, int r0, int r1, size_t cols) {
    size_t n = (size_t)(r1 - r0) * cols;
    uint16_t *t = (uint16_t *)malloc(n * sizeof(uint16_t));
    cudaCheck(cudaMemcpy(t, d + (size_t)r0 * cols, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    int ok = 1;
    for (size_t i = 0; i < n; i++) ok &= t[i] == 0xFFFFu;
    free(t);
    return ok;
}
static inline float *dev_download_f32(const float *d, size_t n) {
    float *h = (float *)malloc(n * sizeof(float));
    cudaCheck(cudaMemcpy(h, d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}

// ----------------------------------------------------------------------------------------------
// checking: |gpu - ref| <= atol + rtol * |ref| everywhere; prints the worst element on failure

static int g_dev_pass = 0, g_dev_fail = 0;

static inline float dev_check(const char *what, const float *gpu, const float *ref, size_t n, float atol, float rtol) {
    float worst = 0.0f;
    size_t bad = 0, first_bad = 0;
    for (size_t i = 0; i < n; i++) {
        float err = fabsf(gpu[i] - ref[i]);
        if (!(err <= atol + rtol * fabsf(ref[i]))) {  // NaN fails
            if (bad == 0) first_bad = i;
            bad++;
        }
        if (err > worst || err != err) worst = err;
    }
    if (bad) {
        g_dev_fail++;
        printf("FAIL %s: %zu of %zu elements outside atol %.2g + rtol %.2g; first at %zu: gpu %.6g ref %.6g\n", what, bad, n, atol,
               rtol, first_bad, gpu[first_bad], ref[first_bad]);
    } else {
        g_dev_pass++;
    }
    return worst;
}

// Two results that must be the same bits (determinism, or one sum computed two ways).
static inline void dev_check_same_bits(const char *what, float a, float b) {
    if (memcmp(&a, &b, sizeof(float)) == 0) {
        g_dev_pass++;
    } else {
        g_dev_fail++;
        printf("FAIL %s: %.9g vs %.9g\n", what, a, b);
    }
}

// Like dev_check, with a bound per element: |gpu - ref| <= bound[i] (NaN fails); returns the
// largest |gpu - ref|.
static inline float dev_check_bounded(const char *what, const float *gpu, const float *ref, const float *bound, size_t n) {
    float worst = 0.0f;
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        float err = fabsf(gpu[i] - ref[i]);
        if (!(err <= bound[i])) {
            if (bad == 0) first = i;
            bad++;
        }
        if (err > worst || err != err) worst = err;
    }
    if (bad) {
        g_dev_fail++;
        printf("FAIL %s: %zu of %zu elements outside their bound; first at %zu: gpu %.6g ref %.6g bound %.3g\n", what, bad, n, first,
               gpu[first], ref[first], bound[first]);
    } else {
        g_dev_pass++;
    }
    return worst;
}

// GELU (tanh form, as the trainer's kernels and llm.c) and its derivative in double, the CPU
// references of the GELU and matmul programs; th_out: the tanh, for the error bounds.
#define DEV_GELU_K 0.7978845608028654  // sqrt(2/pi)
static inline double dev_gelu(double x) { return 0.5 * x * (1.0 + tanh(DEV_GELU_K * (x + 0.044715 * x * x * x))); }
static inline double dev_gelu_grad(double x, double *th_out) {
    double th = tanh(DEV_GELU_K * (x + 0.044715 * x * x * x));
    *th_out = th;
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * DEV_GELU_K * (1.0 + 3.0 * 0.044715 * x * x);
}

// |a| elementwise, a new host array (inputs of the error bounds' absolute-value references)
static inline float *dev_fabs_copy(const float *a, size_t n) {
    float *p = (float *)malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = fabsf(a[i]);
    return p;
}

// A layer's output rows against the CPU layer: |gpu - ref| <= 0.02 rms(ref) + 0.02 |ref| on every
// checked element (bf16 storage of an intermediate and of the output is ~0.4% per rounding; a
// wrong stride or layout gives O(1) errors). Rows with skip[r] set are not compared (skip may be
// NULL; structured_layers: BTT-MoE rows whose top-k differs between the GPU's and the CPU's logits,
// a near-tie). Counts a pass or a failure (dev_summary); *worst_rel (may be NULL): the largest
// error over rms(ref). Returns 1 when every element is within its bound.
static inline int dev_check_rows(const char *what, const float *gpu, const float *ref, int rows, int cols, const int *skip, double *worst_rel) {
    double ss = 0.0;
    size_t cnt = 0;
    for (int r = 0; r < rows; r++) {
        if (skip && skip[r]) continue;
        for (int j = 0; j < cols; j++) { ss += (double)ref[(size_t)r * cols + j] * ref[(size_t)r * cols + j]; cnt++; }
    }
    double rms = cnt ? sqrt(ss / cnt) : 0.0, worst = 0.0;
    size_t bad = 0, first = 0;
    for (int r = 0; r < rows; r++) {
        if (skip && skip[r]) continue;
        for (int j = 0; j < cols; j++) {
            size_t i = (size_t)r * cols + j;
            double err = fabs((double)gpu[i] - ref[i]);
            if (!(err <= 0.02 * rms + 0.02 * fabs(ref[i]))) {
                if (!bad) first = i;
                bad++;
            }
            if (rms > 0 && err / rms > worst) worst = err / rms;
            if (err != err) worst = INFINITY;
        }
    }
    if (worst_rel) *worst_rel = worst;
    if (bad) {
        g_dev_fail++;
        printf("FAIL %s: %zu of %zu checked outputs off (rms %.3g); first at row %zu col %zu: gpu %.6g cpu %.6g\n", what, bad, cnt, rms,
               first / cols, first % cols, gpu[first], ref[first]);
        return 0;
    }
    g_dev_pass++;
    return 1;
}

static inline int dev_summary(void) {
    printf("%d passed, %d failed\n", g_dev_pass, g_dev_fail);
    return g_dev_fail ? EXIT_FAILURE : EXIT_SUCCESS;
}

// ----------------------------------------------------------------------------------------------
// timing and roofline

// Mean milliseconds of `reps` launches of f() after `warmup` untimed ones.
template <class F>
static inline float dev_time_ms(F f, int warmup = 3, int reps = 20) {
#ifdef __CUDA_SIM__
    warmup = 0, reps = 1;  // on the CPU simulator only the checks mean anything: one pass
#endif
    for (int i = 0; i < warmup; i++) f();
    cudaEvent_t a, b;
    cudaCheck(cudaEventCreate(&a));
    cudaCheck(cudaEventCreate(&b));
    cudaCheck(cudaEventRecord(a));
    for (int i = 0; i < reps; i++) f();
    cudaCheck(cudaEventRecord(b));
    cudaCheck(cudaEventSynchronize(b));
    float ms = 0.0f;
    cudaCheck(cudaEventElapsedTime(&ms, a, b));
    cudaCheck(cudaEventDestroy(a));
    cudaCheck(cudaEventDestroy(b));
    cudaCheckLaunch();
    return ms / reps;
}

// Peak DRAM bandwidth in GB/s (cuda/common.cuh's, from the device properties).
static inline double dev_peak_gbps(void) { return gpu_peak_gbps(); }

// The roofline floor in seconds: max(bytes / bandwidth, flops / peak), bytes and flops the minimum
// the kernel must move / compute.
static inline double dev_floor_s(double bytes, double flops) {
    double peak = gpu_peak_bf16_tflops(g_gpu.prop.name) * 1e12, floor_s = bytes / (dev_peak_gbps() * 1e9);
    if (peak > 0 && flops / peak > floor_s) floor_s = flops / peak;
    return floor_s;
}
// One result line; "% roofline" is the floor over the measured time.
static inline void dev_report(const char *name, int version, float ms, double bytes, double flops, float max_err) {
    const double floor_s = dev_floor_s(bytes, flops);
    printf("%-28s v%-2d %9.4f ms %9.1f GB/s %9.2f TFLOP/s %6.1f%% roofline  max err %.3g\n", name, version, ms, bytes / (ms * 1e-3) / 1e9,
           flops / (ms * 1e-3) / 1e12, 100.0 * floor_s / (ms * 1e-3), max_err);
}

// Parses the optional version argument: none or "0" means all versions (a program that takes
// more arguments after it needs the "0").
static inline int dev_version_arg(int argc, char **argv, int n_versions) {
    if (argc < 2 || strcmp(argv[1], "0") == 0) return 0;
    int v = atoi(argv[1]);
    if (v < 1 || v > n_versions) {
        fprintf(stderr, "error: version '%s' is not one of 0 (all), 1..%d\n", argv[1], n_versions);
        exit(EXIT_FAILURE);
    }
    return v;
}

// The attention programs' v3, cuDNN's attention (cuda/cudnn_attention.h, linked when the top-level
// make passes USE_CUDNN): 1 when this build has it and cuDNN runs the shape, else a line saying
// why not (the build only when v3 alone was asked for).
#ifdef USE_CUDNN
#include "cuda/cudnn_attention.h"
#endif
static int dev_cudnn_attention_ready(int B, int T, int NH, int hs, int only_v3) {
#ifdef USE_CUDNN
    char why[512];
    if (cudnn_attention_prepare(B, T, NH, hs, why, sizeof why)) return 1;
    printf("v3 skipped: cuDNN cannot run this shape: %s\n", why);
#else
    (void)B; (void)T; (void)NH; (void)hs;
    if (only_v3) printf("v3 skipped: built without cuDNN (build dev/cuda through the top-level make with the cuDNN frontend installed)\n");
#endif
    return 0;
}
