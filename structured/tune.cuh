// structured/tune.cuh: each structured layer's own kernels (one byte per linear layer: its -sk
// value, or for BTT and Monarch dense GEMMs on the materialized weight as -sm), and the timing
// -at 1 chooses them by.
//
// Why per layer and measured: on the H200 (dev/bench/RESULTS.md) which path is fastest depends on
// the shape: the cuBLAS plans won at width 768, the fused kernel at rank 1 and width 4096, dense
// GEMMs on the materialized weight where the plans move more bytes than the GEMM costs. A model
// mixes those shapes (q, k, v at C x C; fc at C x 4C), and one global -sk cannot be right for all.
#pragma once
#include "spec.h"

// A layer's kernels: 0..3 as -sk, or ST_K_DENSE (as -sm). The byte a resume state keeps per
// linear layer (common/checkpoint.h) is this, or ST_K_NONE for the dense layers, which have no choice.
enum { ST_K_DENSE = 4, ST_K_COUNT = 5, ST_K_NONE = 255 };
static const char *const st_kernel_names[ST_K_COUNT] = {"-sk 0", "-sk 1", "-sk 2", "-sk 3", "dense"};

static inline int st_kind_tunable(int kind) { return kind == STRUCT_BTT || kind == STRUCT_MONARCH || kind == STRUCT_BTT_MOE; }
// BTT and Monarch layers can also run as dense GEMMs on their materialized weight; BTT-MoE cannot.
static inline int st_kind_densifiable(int kind) { return kind == STRUCT_BTT || kind == STRUCT_MONARCH; }

// Whether byte k is a valid choice for a layer of this kind (ST_K_NONE exactly for dense ones).
// Monarch takes 0..3 too (its fused kernels are the same with -sk 1, 2 and 3), BTT-MoE 0..3 (2 and 3
// the same: its experts' fused kernel with W0 staged).
static inline int st_kernel_valid(int kind, int k) {
    if (!st_kind_tunable(kind)) return k == ST_K_NONE;
    return k >= 0 && k < (st_kind_densifiable(kind) ? ST_K_COUNT : ST_K_DENSE);
}

// The choices that run differently for a layer of this kind, into out: BTT all five; Monarch -sk
// 0, 1 and dense; BTT-MoE -sk 0, 1 and 2. Returns how many.
static inline int st_kernel_candidates(int kind, int out[ST_K_COUNT]) {
    if (kind == STRUCT_BTT) {
        for (int k = 0; k < ST_K_COUNT; k++) out[k] = k;
        return ST_K_COUNT;
    }
    if (kind == STRUCT_MONARCH) { out[0] = 0; out[1] = 1; out[2] = ST_K_DENSE; return 3; }
    if (kind == STRUCT_BTT_MOE) { out[0] = 0; out[1] = 1; out[2] = 2; return 3; }
    return 0;
}

// The candidate that runs what kernels k run for this kind (Monarch's -sk 2 and 3 are its 1,
// BTT-MoE's -sk 3 its 2).
static inline int st_kernel_canonical(int kind, int k) {
    if (kind == STRUCT_MONARCH && k >= 1 && k <= 3) return 1;
    if (kind == STRUCT_BTT_MOE && k == 3) return 2;
    return k;
}

// -at 1 keeps the flags' choice (the incumbent) unless another is faster by more than this
// fraction: timings within noise should not change what a run computes.
#define ST_TUNE_MARGIN 0.03

// Which of n timings t to run: the fastest, unless the incumbent's is within the margin of it.
static inline int st_tune_pick(const double *t, int n, int incumbent) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (t[i] < t[best]) best = i;
    return incumbent >= 0 && incumbent < n && t[best] >= (1.0 - ST_TUNE_MARGIN) * t[incumbent] ? incumbent : best;
}

// The shape a layer's kernels depend on (not its initialization or learning rates).
static inline int st_same_shape(const LinearSpec *a, const LinearSpec *b) {
    return a->kind == b->kind && a->d_in == b->d_in && a->d_out == b->d_out && a->bias == b->bias && a->rank == b->rank &&
           a->alpha == b->alpha && a->gamma == b->gamma && a->phi == b->phi && a->eps == b->eps && a->blocks == b->blocks &&
           a->experts == b->experts && a->topk == b->topk;
}

// "btt r4 768x3072", "monarch 4 768x3072", "dense 768x768" into buf.
static inline void st_shape_name(char *buf, size_t cap, const LinearSpec *s) {
    if (s->kind == STRUCT_BTT) snprintf(buf, cap, "btt r%d %dx%d", s->rank, s->d_in, s->d_out);
    else if (s->kind == STRUCT_MONARCH) snprintf(buf, cap, "monarch %d %dx%d", s->blocks, s->d_in, s->d_out);
    else if (s->kind == STRUCT_BTT_MOE) snprintf(buf, cap, "btt_moe %d/%d %dx%d", s->experts, s->topk, s->d_in, s->d_out);
    else snprintf(buf, cap, "dense %dx%d", s->d_in, s->d_out);
}

// The layer numbers in on[0..n) (1: that layer) as ranges, "0-11" or "0,2,5-7", into buf.
static inline void st_layer_ranges(char *buf, size_t cap, const int *on, int n) {
    size_t at = 0;
    buf[0] = '\0';
    for (int l = 0; l < n && at < cap; l++) {
        if (!on[l] || (l > 0 && on[l - 1])) continue;
        int e = l;
        while (e + 1 < n && on[e + 1]) e++;
        int w = e > l ? snprintf(buf + at, cap - at, "%s%d-%d", at ? "," : "", l, e) : snprintf(buf + at, cap - at, "%s%d", at ? "," : "", l);
        if (w < 0) break;
        at += (size_t)w;
    }
}

// bf16 values uniform in [-1, 1) from a hash of (i, seed): the timing runs' inputs. Not zeros: a
// GPU draws less power on zeros and may clock higher than it will in training.
__global__ void st_tune_fill_kernel(floatX *p, size_t n, uint32_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ (uint32_t)(i >> 32) * 40503u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = (floatX)((float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}
static void st_tune_fill(floatX *p, size_t n, uint32_t seed) {
    if (!p || !n) return;
    st_tune_fill_kernel<<<1024, 256>>>(p, n, seed);
    cudaCheckLaunch();
}

// Milliseconds of fn(ctx) on the default stream: one run untimed (cuBLASLt's heuristics, kernels'
// first-launch attributes), then the least of `reps` timed runs.
static double st_time_ms(void (*fn)(void *), void *ctx, int reps) {
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    fn(ctx);
    float best = 0.0f;
    for (int r = 0; r < reps; r++) {
        cudaCheck(cudaEventRecord(e0, 0));
        fn(ctx);
        cudaCheck(cudaEventRecord(e1, 0));
        cudaCheck(cudaEventSynchronize(e1));
        float ms = 0.0f;
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        if (r == 0 || ms < best) best = ms;
    }
    cudaCheck(cudaEventDestroy(e0));
    cudaCheck(cudaEventDestroy(e1));
    return best;
}
