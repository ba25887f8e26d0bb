// cuda/common.cuh: cudaCheck/cublasCheck with file:line, floatX = __nv_bfloat16, 128-bit packed loads, stochastic rounding, warp/block reductions, named cudaMalloc.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <float.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

// ----------------------------------------------------------------------------------------------
// error checks: every CUDA / cuBLAS call goes through one of these, naming the file and line

// What the program was doing, where the call's file and line do not say it (-at 1 names the layer
// and the kernels it was timing, and the flag that leaves them out): NULL, or printed with the error.
static const char *g_cuda_context = NULL;
static inline void cuda_check(cudaError_t err, const char *file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "error: CUDA: %s (at %s:%d)%s%s\n", cudaGetErrorString(err), file, line, g_cuda_context ? ", while " : "",
                g_cuda_context ? g_cuda_context : "");
        exit(EXIT_FAILURE);
    }
}
#define cudaCheck(err) cuda_check((err), __FILE__, __LINE__)

static inline void cublas_check(cublasStatus_t status, const char *file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "error: cuBLAS: %s (status %d, at %s:%d)%s%s\n", cublasGetStatusString(status), (int)status, file, line,
                g_cuda_context ? ", while " : "", g_cuda_context ? g_cuda_context : "");
        exit(EXIT_FAILURE);
    }
}
#define cublasCheck(status) cublas_check((status), __FILE__, __LINE__)

// launch errors show up at the next call; this makes them show up at the launch that caused them
#define cudaCheckLaunch() cudaCheck(cudaGetLastError())

// ----------------------------------------------------------------------------------------------
// precision: parameters, gradients and activations are bf16; master weights, AdamW moments,
// LayerNorm statistics, losses and the gradient norm are fp32

typedef __nv_bfloat16 floatX;
#define CUBLAS_LOWP CUDA_R_16BF

static inline int ceil_div_i(long a, long b) { return (int)((a + b - 1) / b); }

// 16 bytes of T, loaded and stored as one int4 (pointers must be 16-byte aligned)
template <class T>
struct alignas(16) Packed128 {
    static constexpr int size = 16 / sizeof(T);
    T payload[size];
    __device__ Packed128() {}
    __device__ static Packed128 zeros() {
        Packed128 p;
        for (int k = 0; k < size; k++) p.payload[k] = (T)0.0f;
        return p;
    }
    __device__ T &operator[](int i) { return payload[i]; }
    __device__ const T &operator[](int i) const { return payload[i]; }
};
typedef Packed128<floatX> x128;
typedef Packed128<float> f128;

template <class T>
__device__ inline Packed128<T> load128(const T *p) {
    Packed128<T> r;
    *reinterpret_cast<int4 *>(&r) = *reinterpret_cast<const int4 *>(p);
    return r;
}
template <class T>
__device__ inline void store128(T *p, Packed128<T> v) {
    *reinterpret_cast<int4 *>(p) = *reinterpret_cast<int4 *>(&v);
}

// 16 bytes moved as they are (4 words, no element view): a Packed128 of bf16 lives in registers as 8
// halves, and nvcc may split its store128 into four 4-byte (or 2-byte) stores; a uint4 that came
// from a 16-byte load stays one ld/st .v4.u32. For copies (shared <-> global) that do no arithmetic.
__device__ __forceinline__ uint4 ld16(const void *p) { return *reinterpret_cast<const uint4 *>(p); }
__device__ __forceinline__ uint4 ld16_ro(const void *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }  // read-only global
__device__ __forceinline__ void st16(void *p, uint4 v) { *reinterpret_cast<uint4 *>(p) = v; }
// Two floats rounded to bf16 (nearest even, as (floatX)f) packed as they lie in memory: lo first.
// Computed bf16 values leave a kernel as four of these in one __stwb(uint4) (st.global.v4): an x128
// temporary, or a plain uint4 assignment, is split by nvcc into 2- or 4-byte stores there.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned *>(&h);
}

// ----------------------------------------------------------------------------------------------
// stochastic rounding fp32 -> bf16. The random bits are a hash of (element index, seed) only, so
// the result does not depend on the launch configuration: the same seed rounds the same master
// weights to the same bf16 weights, which is what makes resume bit-identical (see adamw.cuh).

__host__ __device__ inline unsigned int squirrel_noise5(unsigned int x, unsigned int seed) {
    unsigned int b = x;
    b *= 0xd2a80a3fu;
    b += seed;
    b ^= (b >> 9);
    b += 0xa884f197u;
    b ^= (b >> 11);
    b *= 0x6C736F4Bu;
    b ^= (b >> 13);
    b += 0xB79F3ABBu;
    b ^= (b >> 15);
    b *= 0x1b56c4f5u;
    b ^= (b >> 17);
    return b;
}

__device__ inline floatX stochastic_round_bf16(float in, size_t idx, unsigned int seed) {
    unsigned int r = squirrel_noise5((unsigned int)idx + 198491317u * (unsigned int)(idx >> 32), seed);
    unsigned int threshold = r & 0xFFFFu;
    unsigned int bits = __float_as_uint(in);
    unsigned int low = bits & 0xFFFFu;
    bits = low > threshold ? (bits | 0xFFFFu) : (bits & ~0xFFFFu);
    return __float2bfloat16_rn(__uint_as_float(bits));
}

// ----------------------------------------------------------------------------------------------
// reductions (fixed trees: deterministic)

template <class T>
__device__ inline T warp_sum_t(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ inline float warp_sum(float v) { return warp_sum_t(v); }
__device__ inline double warp_sum(double v) { return warp_sum_t(v); }
__device__ inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
template <class T>
__device__ inline T block_sum_t(T v) {
    __shared__ T sh[32];
    __syncthreads();  // sh may still be read by a previous call
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_sum_t(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : (T)0;
    return warp_sum_t(v);
}
__device__ inline float block_sum(float v) { return block_sum_t(v); }
__device__ inline double block_sum(double v) { return block_sum_t(v); }

// online-softmax pair (running max, sum of exp(x - max)): merge two
__device__ inline void softmax_merge(float &m, float &s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
    m = mn;
}
__device__ inline void warp_softmax_reduce(float &m, float &s) {
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        softmax_merge(m, s, m2, s2);
    }
}

// ----------------------------------------------------------------------------------------------
// device memory: every allocation is named, so that running out says what and how much

static int g_oom_hint_B = 0;        // the trainer sets -b here so that the message can name it
static int g_oom_weights = 0;       // 1 while the trainer allocates weights, gradients and AdamW state
static size_t g_gpu_bytes = 0;      // total allocated through cuda_malloc_named
static const char *g_oom_note = NULL;  // a line more for an out-of-memory error, while set

static inline void *cuda_malloc_named(size_t bytes, const char *what) {
    void *p = NULL;
    if (bytes == 0) bytes = 16;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();  // clear the sticky error
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        fprintf(stderr, "error: out of GPU memory allocating %s: %.3f GiB (%zu bytes; %.2f GiB free of %.2f GiB): %s\n", what,
                bytes / 1073741824.0, bytes, free_b / 1073741824.0, total_b / 1073741824.0, cudaGetErrorString(err));
        if (g_oom_weights)  // before any activation: the batch size is not what to change
            fprintf(stderr, "  the model's weights and optimizer state alone do not fit: -w 0 goes without the fp32 master weights (4 bytes\n"
                            "  per parameter less), -z 1 with more GPUs shards the AdamW moments over them; or train a smaller model\n");
        else
            fprintf(stderr, "  use a smaller -b (now %d) with -d for the same total batch, or recompute activations with -r 1 (GELU) or -r 2 "
                            "(GELU and LayerNorm)\n", g_oom_hint_B);
        if (g_oom_note) fprintf(stderr, "  %s\n", g_oom_note);
        exit(EXIT_FAILURE);
    }
    g_gpu_bytes += bytes;
    return p;
}
#define cudaMallocNamed(type, n, what) ((type *)cuda_malloc_named((size_t)(n) * sizeof(type), (what)))

// Frees p (NULL: nothing), which cuda_malloc_named allocated with `bytes`, and counts them off.
static inline void cuda_free_named(void *p, size_t bytes) {
    if (!p) return;
    cudaCheck(cudaFree(p));
    g_gpu_bytes -= bytes ? bytes : 16;
}

// ----------------------------------------------------------------------------------------------
// one GPU context per process: cuBLAS for the strided-batched attention GEMMs, cuBLASLt for the
// linear layers (with epilogues), one workspace

typedef struct {
    cublasHandle_t cublas;
    cublasLtHandle_t cublaslt;
    void *lt_workspace;
    size_t lt_workspace_size;
    cudaDeviceProp prop;
    int gelu_fusion;  // 0: none, 1: GELU fused into the fc forward, 2: also its backward (DGELU epilogue)
} GPUContext;

static GPUContext g_gpu;

// Exits with one clear line when there is no usable GPU.
static inline void gpu_init(int device) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        fprintf(stderr, "error: no CUDA GPU available (%s); train on the CPU with ./train_gpt2\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        exit(EXIT_FAILURE);
    }
    cudaCheck(cudaSetDevice(device));
    cudaCheck(cudaGetDeviceProperties(&g_gpu.prop, device));
    if (g_gpu.prop.major < 8) {
        fprintf(stderr, "error: %s has compute capability %d.%d; this trainer needs bf16 tensor cores (8.0 or newer)\n",
                g_gpu.prop.name, g_gpu.prop.major, g_gpu.prop.minor);
        exit(EXIT_FAILURE);
    }
    cublasCheck(cublasCreate(&g_gpu.cublas));
    cublasCheck(cublasLtCreate(&g_gpu.cublaslt));
    g_gpu.lt_workspace_size = 32u << 20;  // Hopper's cuBLASLt kernels want up to 32 MiB
    g_gpu.lt_workspace = cuda_malloc_named(g_gpu.lt_workspace_size, "cuBLASLt workspace");
    g_gpu.gelu_fusion = g_gpu.prop.major >= 9 ? 2 : 0;  // llm.c's default
}

// Peak DRAM bandwidth in GB/s from the device's memory clock and bus width (2 transfers per clock).
static inline double gpu_peak_gbps(void) {
    int clock_khz = 0, bus_bits = 0, device = 0;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device));
    cudaCheck(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
    return 2.0 * clock_khz * 1e3 * (bus_bits / 8.0) / 1e9;
}

// Peak dense bf16 tensor-core TFLOP/s by device name; 0 when the device is not in the table.
static inline double gpu_peak_bf16_tflops(const char *name) {
    if (strstr(name, "H200")) return 989.0;
    if (strstr(name, "H100")) {
        if (strstr(name, "PCIe")) return 756.0;
        if (strstr(name, "NVL")) return 0.0;  // not in the table: no MFU rather than a wrong one
        return 989.0;                          // SXM ("NVIDIA H100 80GB HBM3")
    }
    if (strstr(name, "A100")) return 312.0;
    return 0.0;
}
