// cuda/global_norm.cuh: deterministic global L2 norm of the bf16 gradients (a grid fixed by n, per-block partials, ordered final sum, fp64).
#pragma once
#include "common.cuh"

#define NORM_BLOCKS 512  // the most blocks (the scratch's partials); fewer for short vectors
#define NORM_THREADS 512
#define NORM_MIN_PER_THREAD 16  // a block starts only for this many elements per thread

// The partial kernel's grid for n elements: a function of n alone (never of the GPU), so a vector
// is always summed the same way. A small model's 100K gradients take 13 blocks, not 512 idle ones.
static inline int global_norm_blocks(size_t n) {
    const size_t per_block = (size_t)NORM_THREADS * NORM_MIN_PER_THREAD;
    const size_t b = (n + per_block - 1) / per_block;
    return b < 1 ? 1 : (b > NORM_BLOCKS ? NORM_BLOCKS : (int)b);
}

// Sums in fp64: a bf16 value's square is exact in fp32, and fp64 sums of them round the same
// whichever way the vector is cut, so the sum of squares over ZeRO-1's slices (each rank's, then
// summed over ranks) gives the same float norm as over the whole vector: -z 1 stays bit-identical
// to -z 0. (fp32 partials differed in the last bits with 3 ranks.)

// partial[block] = Σ g² over a grid-stride slice; independent of the GPU (grid from n). Acc:
// the accumulator type (double here; dev/cuda/global_norm.cu's v2 is float)
template <class Acc>
__global__ void global_norm_partial_kernel(Acc *partial, const floatX *g, size_t n) {
    Acc s = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = (float)g[i];
        s += (Acc)(v * v);
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <class Acc>
__global__ void global_norm_final_kernel(Acc *out, const Acc *partial, int n) {
    Acc s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    s = block_sum(s);
    if (threadIdx.x == 0) *out = s;
}

// Σ g² into scratch[NORM_BLOCKS] (queued; scratch holds NORM_BLOCKS + 1 Acc)
template <class Acc>
static void global_norm_squared_launch(const floatX *g, size_t n, Acc *scratch) {
    const int blocks = global_norm_blocks(n);
    global_norm_partial_kernel<Acc><<<blocks, NORM_THREADS>>>(scratch, g, n);
    cudaCheckLaunch();
    global_norm_final_kernel<Acc><<<1, 1024>>>(scratch + NORM_BLOCKS, scratch, blocks);
    cudaCheckLaunch();
}

// Returns Σ g² (synchronises). scratch holds NORM_BLOCKS + 1 doubles.
static double global_norm_squared(const floatX *g, size_t n, double *scratch) {
    global_norm_squared_launch(g, n, scratch);
    double sq = 0.0;
    cudaCheck(cudaMemcpy(&sq, scratch + NORM_BLOCKS, sizeof(double), cudaMemcpyDeviceToHost));
    return sq;
}
// Returns ||g||_2 (synchronises).
static float global_norm(const floatX *g, size_t n, double *scratch) { return (float)sqrt(global_norm_squared(g, n, scratch)); }
