// structured/seg_wgrad.cuh: weight gradients of S segments of rows in one launch, the row ranges
// read from device memory: BTT-MoE's per-expert dW0 and dW1 without the counts on the host.
//
//   C[s][b] (M x Nn) (+)= Σ_{r in segment s} A[r, b·sa + (0..M)]ᵀ B[r, b·sb + (0..Nn)]
//
// for segments s < S (rows [offsets[s], offsets[s] + counts[s]) of A and B, device arrays) and
// batch entries b < batch: an expert's dW1[f] = Z_fᵀ dY_f is batch entry f of segment e, its
// dW0[g] = X_gᵀ dZ_g batch entry g. A or B may be read through the grouping instead of as
// gathered rows (grouped row w is row order[w] / K: x and dy need no gathered copy), and B's rows
// scaled by a gate per pair (b_gate[order[w]], rounded to bf16 as a gathered gate·dy would be).
// Every output tile is one warp's, which runs over all of its segment's rows in order:
// deterministic, no atomics, and an empty segment gives zeros.
// Each 16-row step goes through the warp's shared memory (rows past the segment as zeros, so a
// step never mixes in the next segment), with the next step's 16-byte loads in flight during the
// MMA (wmma bf16 m16n16k16, fp32 accumulation; A as a col-major fragment: Aᵀ). The first version:
// A rows are re-read once per 16-column tile of C (from L2 at these sizes).
// Needs M, Nn multiples of 16; lda, ldb, ldc, sa, sb and the C strides multiples of 8; A, B, C
// 16-byte aligned (seg_wgrad_supported).
#pragma once
#include <mma.h>
#include "../cuda/common.cuh"
#include "../cuda/mma.cuh"

#define SW_WARPS 4

typedef struct {
    const floatX *A, *B;
    floatX *C;
    int lda, ldb, ldc;
    long long sa, sb;             // batch strides of A and B (columns within a row)
    long long c_batch, c_seg;     // C strides per batch entry and per segment
    int M, Nn, batch, S;
    const int *counts, *offsets;  // device, S each
    int accumulate;               // 1: C += result, 0: C = result
    const int *order;             // grouped row -> pair (moe.h), for a_ordered / b_ordered / b_gate
    int K;
    int a_ordered, b_ordered;     // 1: row w of A (B) is row order[w] / K of the pointer given
    const float *b_gate;          // B row w times b_gate[order[w]] (NULL: none)
} SegWgrad;

static inline int seg_wgrad_supported(const SegWgrad *p) {
    const long long m8 = p->lda | p->ldb | p->ldc | p->sa | p->sb | p->c_batch | p->c_seg;
    if ((p->a_ordered || p->b_ordered || p->b_gate) && (!p->order || p->K <= 0)) return 0;
    return p->M > 0 && p->Nn > 0 && p->M % 16 == 0 && p->Nn % 16 == 0 && m8 % 8 == 0 &&
           ((uintptr_t)p->A | (uintptr_t)p->B | (uintptr_t)p->C) % 16 == 0;
}

// This lane's 8 elements of A and of B at grouped row w (its segment's), through the grouping and
// the gate where asked.
__device__ __forceinline__ void seg_wgrad_load(x128 &a, x128 &b, const SegWgrad &p, const floatX *Ab, const floatX *Bb, int w) {
    const int pr = p.order ? p.order[w] : w;
    a = load128(Ab + (size_t)(p.a_ordered ? pr / p.K : w) * p.lda);
    b = load128(Bb + (size_t)(p.b_ordered ? pr / p.K : w) * p.ldb);
    if (p.b_gate) {
        const float g = p.b_gate[pr];
        for (int t = 0; t < 8; t++) b[t] = (floatX)(g * (float)b[t]);
    }
}

// grid (ceil(tiles / SW_WARPS), batch, S), SW_WARPS warps per block, one 16x16 tile of C each.
__global__ void __launch_bounds__(32 * SW_WARPS) seg_wgrad_kernel(SegWgrad p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    __shared__ __align__(128) floatX sw_smem[SW_WARPS][2 * 256];  // per warp: the A and B steps, later the fp32 staging
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tn = p.Nn / 16, tile = blockIdx.x * SW_WARPS + warp;
    if (tile >= (p.M / 16) * tn) return;  // whole warps leave: the kernel has no block barrier
    const int b = blockIdx.y, s = blockIdx.z, m0 = (tile / tn) * 16, n0 = (tile % tn) * 16;
    const int r0 = p.offsets[s], rows = p.counts[s];
    floatX *As = sw_smem[warp], *Bs = As + 256;
    float *stg = reinterpret_cast<float *>(As);
    const int lr = lane / 2, lc = (lane % 2) * 8;  // this lane's 8 elements of a 16x16 tile
    const floatX *Ab = p.A + b * p.sa + m0 + lc, *Bb = p.B + b * p.sb + n0 + lc;
    x128 a = x128::zeros(), bv = x128::zeros();
    if (lr < rows) seg_wgrad_load(a, bv, p, Ab, Bb, r0 + lr);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < rows; k += 16) {
        __syncwarp();  // the previous step's fragments are loaded
        store128(As + lr * 16 + lc, a);
        store128(Bs + lr * 16 + lc, bv);
        __syncwarp();
        const int nr = k + 16 + lr;  // next step, in flight during this one's MMA
        a = x128::zeros();
        bv = x128::zeros();
        if (nr < rows) seg_wgrad_load(a, bv, p, Ab, Bb, r0 + nr);
        WmmaACol fa;  // Aᵀ: As[r][m] is (m, r) col-major
        WmmaB fb;
        wmma_load_shared(fa, As, 16);  // ldmatrix (cuda/mma.cuh); load_matrix_sync gave generic loads
        wmma_load_shared(fb, Bs, 16);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    __syncwarp();
    wmma::store_matrix_sync(stg, acc, 16, wmma::mem_row_major);
    __syncwarp();
    floatX *c = p.C + s * p.c_seg + b * p.c_batch + (size_t)(m0 + lr) * p.ldc + n0 + lc;
    x128 o = p.accumulate ? load128(c) : x128::zeros();
    for (int t = 0; t < 8; t++) o[t] = (floatX)(stg[lr * 16 + lc + t] + (p.accumulate ? (float)o[t] : 0.0f));
    store128(c, o);
#endif
}

// Launches it; returns 0 (nothing launched) when the shapes or alignment are not supported.
static int seg_wgrad(const SegWgrad *p) {
    if (!seg_wgrad_supported(p)) return 0;
    if (p->S <= 0 || p->batch <= 0) return 1;
    const int tiles = (p->M / 16) * (p->Nn / 16);
    seg_wgrad_kernel<<<dim3(ceil_div_i(tiles, SW_WARPS), p->batch, p->S), 32 * SW_WARPS>>>(*p);
    cudaCheckLaunch();
    return 1;
}
