// tests/fused_ptx.cu: compiled to PTX by tests/test_fused_ptx.sh. The fused structured kernels and
// flash attention come with their headers (every instantiation). For the wmma loads, each pair
// below loads a fragment once with wmma::load_matrix_sync (generic_*) and once with
// cuda/mma.cuh's inline-PTX loads (ours_*), then feeds it to one mma_sync and stores
// the result, so that the PTX shows which registers the load fills and in which order the mma reads
// them.
#include <mma.h>
#define BT_MMA_STAGE1_CANDIDATE 1  // stage 1 alone on mma.sync too (dev/cuda only)
#include "structured/btt_fused.cuh"
#include "structured/monarch_fused.cuh"
#include "structured/seg_wgrad.cuh"
#include "cuda/flash_attention.cuh"
using namespace nvcuda;

// c = a b, stored: the mma that shows which load registers feed which operand positions
template <class FA, class FB>
__device__ __forceinline__ void mma_out(float *out, const FA &a, const FB &b) {
    WmmaAcc c;
    wmma::fill_fragment(c, 0.0f);
    wmma::mma_sync(c, a, b, c);
    wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
}

__global__ void generic_a(float *out, int ldm) {
    __shared__ __align__(128) floatX s[16 * 64];
    WmmaA a;
    WmmaB b;
    wmma::load_matrix_sync(a, s, ldm);
    wmma::fill_fragment(b, (floatX)1.0f);
    mma_out(out, a, b);
}
__global__ void ours_a(float *out, int ldm) {
    __shared__ __align__(128) floatX s[16 * 64];
    WmmaA a;
    WmmaB b;
    wmma_load_a_shared(a, s, ldm);
    wmma::fill_fragment(b, (floatX)1.0f);
    mma_out(out, a, b);
}
__global__ void generic_b(float *out, const floatX *__restrict__ w, int ldm) {
    WmmaA a;
    WmmaB b;
    wmma::fill_fragment(a, (floatX)1.0f);
    wmma::load_matrix_sync(b, w, ldm);
    mma_out(out, a, b);
}
__global__ void ours_b(float *out, const floatX *__restrict__ w, int ldm) {
    WmmaA a;
    WmmaB b;
    wmma::fill_fragment(a, (floatX)1.0f);
    wmma_load_b_global(b, w, ldm);
    mma_out(out, a, b);
}
__global__ void generic_bs(float *out, int ldm) {
    __shared__ __align__(128) floatX s[16 * 64];
    WmmaA a;
    WmmaB b;
    wmma::fill_fragment(a, (floatX)1.0f);
    wmma::load_matrix_sync(b, s, ldm);
    mma_out(out, a, b);
}
__global__ void ours_bs(float *out, int ldm) {
    __shared__ __align__(128) floatX s[16 * 64];
    WmmaA a;
    WmmaB b;
    wmma::fill_fragment(a, (floatX)1.0f);
    wmma_load_b_shared(b, s, ldm);
    mma_out(out, a, b);
}
__global__ void generic_bc(float *out, int ldm) {
    __shared__ __align__(128) floatX s[16 * 64];
    WmmaA a;
    WmmaBCol b;
    wmma::fill_fragment(a, (floatX)1.0f);
    wmma::load_matrix_sync(b, s, ldm);
    mma_out(out, a, b);
}
__global__ void ours_bc(float *out, int ldm) {
    __shared__ __align__(128) floatX s[16 * 64];
    WmmaA a;
    WmmaBCol b;
    wmma::fill_fragment(a, (floatX)1.0f);
    wmma_load_b_col_shared(b, s, ldm);
    mma_out(out, a, b);
}
// the accumulator's store into shared memory, then out (so that it is not dead)
// c = w[0..255] w[256..511] (so that the accumulator is not a constant)
__device__ __forceinline__ void product_of(WmmaAcc &c, const floatX *__restrict__ w) {
    WmmaA a;
    WmmaB b;
    wmma::load_matrix_sync(a, w, 16);
    wmma::load_matrix_sync(b, w + 256, 16);
    wmma::fill_fragment(c, 0.0f);
    wmma::mma_sync(c, a, b, c);
}
__global__ void generic_st(float *out, const floatX *__restrict__ w, int ldm) {
    __shared__ __align__(128) float s[16 * 64];
    WmmaAcc c;
    product_of(c, w);
    wmma::store_matrix_sync(s, c, ldm, wmma::mem_row_major);
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x * 3];
}
__global__ void ours_st(float *out, const floatX *__restrict__ w, int ldm) {
    __shared__ __align__(128) float s[16 * 64];
    WmmaAcc c;
    product_of(c, w);
    wmma_store_shared(s, c, ldm);
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x * 3];
}
__global__ void generic_ac(float *out, int ldm) {
    __shared__ __align__(128) floatX s[16 * 64];
    WmmaACol a;
    WmmaB b;
    wmma::load_matrix_sync(a, s, ldm);
    wmma::fill_fragment(b, (floatX)1.0f);
    mma_out(out, a, b);
}
__global__ void ours_ac(float *out, int ldm) {
    __shared__ __align__(128) floatX s[16 * 64];
    WmmaACol a;
    WmmaB b;
    wmma_load_a_col_shared(a, s, ldm);
    wmma::fill_fragment(b, (floatX)1.0f);
    mma_out(out, a, b);
}
