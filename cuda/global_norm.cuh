// cuda/global_norm.cuh: deterministic global L2 norm of the bf16 gradients (fixed grid, per-block partials, ordered final sum, fp64).
#pragma once
#include "common.cuh"

#define NORM_BLOCKS 512
#define NORM_THREADS 512

// Sums in fp64: a bf16 value's square is exact in fp32, and fp64 sums of them round the same
// whichever way the vector is cut, so the sum of squares over ZeRO-1's slices (each rank's, then
// summed over ranks) gives the same float norm as over the whole vector: -z 1 stays bit-identical
// to -z 0. (fp32 partials differed in the last bits with 3 ranks.)

// partial[block] = Σ g² over a fixed grid-stride slice; independent of the GPU (fixed grid). Acc:
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
    global_norm_partial_kernel<Acc><<<NORM_BLOCKS, NORM_THREADS>>>(scratch, g, n);
    cudaCheckLaunch();
    global_norm_final_kernel<Acc><<<1, 1024>>>(scratch + NORM_BLOCKS, scratch, NORM_BLOCKS);
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
