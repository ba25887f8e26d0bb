// cuda/global_norm.cuh: deterministic global L2 norm of the bf16 gradients (fixed grid, per-block partials, ordered final sum).
#pragma once
#include "common.cuh"

#define NORM_BLOCKS 512
#define NORM_THREADS 512

// partial[block] = Σ g² over a fixed grid-stride slice; independent of the GPU (fixed grid)
__global__ void global_norm_partial_kernel(float *partial, const floatX *g, size_t n) {
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = (float)g[i];
        s += v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void global_norm_final_kernel(float *out, const float *partial, int n) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    s = block_sum(s);
    if (threadIdx.x == 0) *out = s;
}

// Returns ||g||_2 (synchronises). scratch holds NORM_BLOCKS + 1 floats.
static float global_norm(const floatX *g, size_t n, float *scratch) {
    global_norm_partial_kernel<<<NORM_BLOCKS, NORM_THREADS>>>(scratch, g, n);
    cudaCheckLaunch();
    global_norm_final_kernel<<<1, 1024>>>(scratch + NORM_BLOCKS, scratch, NORM_BLOCKS);
    cudaCheckLaunch();
    float sq = 0.0f;
    cudaCheck(cudaMemcpy(&sq, scratch + NORM_BLOCKS, sizeof(float), cudaMemcpyDeviceToHost));
    return (float)sqrt((double)sq);
}
