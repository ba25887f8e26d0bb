// cuda/flash_attention.cuh: causal flash attention of our own (forward + deterministic backward) on bf16 tensor cores through nvcuda::wmma; no T x T buffer.
//
// Interface (the layouts of cuda/attention.cuh): qkv is (B, T, 3C) with each row q | k | v and head
// h at h*hs .. h*hs+hs-1 of each part; out and dout are (B, T, C); lse and the backward's scratch are
// (B, NH, T) fp32. Head sizes 16, 32, 64 and 128 (a template each), any T >= 1. Pointers must be
// 16-byte aligned (cudaMalloc'd buffers at offsets that are multiples of 8 elements: always so with
// C = NH * hs and hs a multiple of 8). flash_attention_supported(hs, T) says whether the shape is
// handled (head size, grid limit, shared memory of this GPU); otherwise use cuda/attention.cuh.
//
// Design (FlashAttention-2 style, one head per block column). The tile geometry lives in
// common/flash_tiles.h, shared with the CPU emulation tests/test_flash_tiles.c which runs exactly
// this algorithm on the CPU in CI. Tiles are FT_BR = FT_BC = 64 rows; a block is 4 warps (128
// threads) and warp w owns 16 rows of the block's tile (the wmma M); within a warp, row r belongs
// to lanes 2r and 2r+1, which take the even and odd columns of the row (softmax statistics are
// combined across the pair with one shuffle).
//  - forward: grid (B*NH, T/64 query tiles, last tiles first since they are the longest). The
//    block loads its 64 x hs Q tile (wmma fragments stay in registers), then for each key tile
//    0 .. ft_causal_k_tiles (fully masked tiles are never visited): K, V tiles to shared memory,
//    S = Q·Kᵀ (16 x 64 per warp, fp32 accumulators) to the warp's shared scratch, online softmax
//    in the exp2 domain (running max m, running sum l, the fp32 O rows held by the lanes rescaled
//    by exp2(m_old - m_new)), P rounded to bf16, P·V to the scratch and added to O. Diagonal and
//    partial tiles apply the mask per element (-INFINITY; a row with no key yet keeps m = -inf and
//    uses 0 as the exponent base so that nothing becomes NaN). At the end O / l is written as bf16
//    and lse = (m + log2 l)·ln 2 (natural log of Σ exp(scale·q·k)) for the backward.
//  - backward: D = rowsum(dout ∘ out) (one warp per row, fixed shuffle tree) into the scratch;
//    then two kernels that each own what they write:
//      dK/dV kernel: grid (B*NH, key tiles, key tile 0 = the longest first); the block keeps its
//        64 keys' K, V fragments and dK, dV accumulators in registers and walks query tiles
//        ft_first_q_tile .. last: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, P = exp2(S·scale·log2e - lse·log2e),
//        dS = P ∘ (dP - D), both rounded to bf16, dV += Pᵀ·dO, dK += dSᵀ·Q; dK is scaled at the end.
//      dQ kernel: grid (B*NH, query tiles); the block keeps Q, dO fragments and the dQ
//        accumulators, walks key tiles 0 .. ft_causal_k_tiles recomputing S, dP, P, dS the same
//        way, dQ += dS·K; dQ is scaled at the end.
//    Every row < T of dqkv is written exactly once (q part by the dQ kernel, k and v parts by the
//    dK/dV kernel), so dqkv needs no zeroing.
//
// Why deterministic: no floating-point atomics and no split reductions. Each output element (a row
// of O/lse, of dK/dV, of dQ) is produced by exactly one warp that accumulates its tile sums in a
// fixed loop order; the wmma MMAs and the shuffle trees are fixed, so repeated runs are
// bit-identical. The price is that S and dP are computed twice in the backward (once per kernel):
// 7 tile GEMMs instead of the 5 of an atomic-add dQ (FLOPs reported as 2.5x forward in dev/cuda).
//
// Memory traffic: no (T x T) buffer (the cuBLAS path keeps B·NH·T² bf16 probabilities per layer).
// Forward reads each Q tile once and each K/V tile once per query tile that sees it (about
// T/128 times on average, mostly from L2: one head's K and V are 256 KB at T = 1024, hs = 64) and
// writes out (bf16) and lse (fp32, B·NH·T). Backward reads q, k, v, out, dout once for D and the
// tiles like the forward in each kernel, and writes dqkv once.
//
// Launch geometry: 128 threads per block; forward and dQ grid (B*NH, ceil(T/64)), dK/dV grid
// (B*NH, ceil(T/64)), D kernel 256 threads per block, one warp per (b, t, h). Dynamic shared memory
// per block (FlashGeom): hs = 64: forward 44 KB, dK/dV 70.5 KB, dQ 61 KB; hs = 32: 36 / 62.5 /
// 53 KB; hs = 128: 76 / 86.5 / 77 KB. The first tile a block loads (Q, or K and V) goes through the
// buffers of the loop's tiles: its fragments are in registers before the loop's first
// __syncthreads. Above 48 KB the kernel's dynamic shared memory attribute is raised. Registers
// (ptxas; sm_80 / sm_90 / sm_100): hs = 64 forward 128 / 128 / 128, dK/dV 176 / 174 / 167, dQ 128 /
// 138 / 128; hs = 128 up to 255. No kernel spills on any of them (tests/test_ptxas.sh checks it;
// FlashGeom's unroll factors are what keeps it so).
//
// What is left: no split-KV (one block per (head, query tile): at small B·NH·T/64 the GPU is not
// full), no cp.async double buffering of the K/V tiles, no Hopper TMA/wgmma (sm_90 runs the sm_80
// mma.sync path that wmma compiles to), the softmax goes through shared memory instead of staying
// in the accumulator registers (wmma's fragment layout is opaque), and S/dP are recomputed by both
// backward kernels (see above). Not measured on a GPU yet: see dev/cuda/attention_forward.cu and
// dev/cuda/attention_backward.cu.
#pragma once
#include <math.h>
#include <mma.h>
#include "common.cuh"
#include "mma.cuh"
#include "../common/flash_tiles.h"

#define FT_LOG2E 1.4426950408889634f
#define FT_LN2 0.6931471805599453f

// Shared-memory geometry of the kernels for head size D. All region sizes are multiples of 32
// bytes, so that every wmma pointer (a region start, plus multiples of 16 rows and 16 columns) is
// 32-byte aligned as wmma requires; the bf16 leading dimensions are multiples of 8 elements and the
// fp32 ones multiples of 4 (wmma's ldm rules), each padded so that consecutive rows start 4 banks
// apart.
template <int D>
struct FlashGeom {
    static_assert(D == 16 || D == 32 || D == 64 || D == 128, "flash attention: head size 16, 32, 64 or 128");
    static_assert(FT_BR == FT_BC, "flash attention: the kernels alias the query and key tile buffers");
    static_assert(FT_WARP_ROWS == 16 && FT_LANES_PER_ROW == 2 && FT_BC % 32 == 0, "flash attention: warp geometry");
    static constexpr int LDH = D + 8;      // bf16 64 x D tile (Q, K, V, dO), elements per row
    static constexpr int LDS = FT_BC + 4;  // fp32 16 x 64 score tile (S, dP) per warp
    static constexpr int LDO = D + 4;      // fp32 16 x D staging (P·V, final O / dQ / dK / dV) per warp
    static constexpr int LDP = FT_BC + 8;  // bf16 16 x 64 P or dS per warp
    static constexpr int TILE = FT_BC * LDH;                                             // elements
    static constexpr int SCR_F = 16 * LDS > 16 * LDO ? 16 * LDS : 16 * LDO;              // fp32, forward, per warp
    static constexpr int SCR_B = 2 * 16 * LDS > 16 * LDO ? 2 * 16 * LDS : 16 * LDO;      // fp32, backward (S, dP), per warp
    static constexpr int PT = 16 * LDP;                                                  // bf16, per warp
    // Unrolling of the backward kernels' two inner loops, the elementwise P, dS loop and the dK, dV
    // (or dQ) update, from ptxas's reports (tests/test_ptxas.sh): unrolled fully, sm_80 spilled
    // (dK/dV at hs 64 past 255 registers, at hs 128 9 KB of local memory per thread) and every GPU
    // spilled at hs 128, whose accumulators and K, V fragments alone hold 192 registers.
    static constexpr int UNROLL_ELEM = D >= 128 ? 8 : 4;
    static constexpr int UNROLL_UPD = D >= 128 ? 1 : FT_BR / 16;
    static constexpr size_t FWD_BYTES = 2 * TILE * sizeof(floatX) + FT_NWARPS * (SCR_F * sizeof(float) + PT * sizeof(floatX));
    static constexpr size_t DKDV_BYTES =
        2 * TILE * sizeof(floatX) + FT_NWARPS * (SCR_B * sizeof(float) + 2 * PT * sizeof(floatX)) + 2 * FT_BR * sizeof(float);
    static constexpr size_t DQ_BYTES = 2 * TILE * sizeof(floatX) + FT_NWARPS * (SCR_B * sizeof(float) + PT * sizeof(floatX));
    static_assert((TILE * sizeof(floatX)) % 32 == 0 && (SCR_F * sizeof(float)) % 32 == 0 && (SCR_B * sizeof(float)) % 32 == 0 &&
                      (16 * LDS * sizeof(float)) % 32 == 0 && (PT * sizeof(floatX)) % 32 == 0,
                  "flash attention: shared regions must keep 32-byte alignment");
    static_assert(LDH % 8 == 0 && LDP % 8 == 0 && LDS % 4 == 0 && LDO % 4 == 0, "flash attention: wmma ldm");
};

namespace flash_wmma {
using namespace nvcuda;
// cuda/mma.cuh's types: their shared-memory loads and stores name the state space (ldmatrix, not
// generic 32-bit loads; the kernels as measured on the H200 used wmma::load_matrix_sync)
typedef WmmaA FragA;
typedef WmmaB FragBRow;     // B[k][n] at p[k*ld + n]
typedef WmmaBCol FragBCol;  // B[k][n] at p[n*ld + k]: a row-major tile, transposed
typedef WmmaAcc FragC;
}  // namespace flash_wmma

// FT_BC rows t0 .. t0+FT_BC-1 of one head into a bf16 tile (row stride LDH); zeros for rows >= T.
// src points at row 0 of the head (b, h), row_stride is 3C (q/k/v) or C (out/dout). Whole block.
template <int D>
__device__ inline void flash_load_tile(floatX *dst, const floatX *src, size_t row_stride, int t0, int T) {
    constexpr int LDH = FlashGeom<D>::LDH, CH = D / 8;  // 16-byte chunks per row
    for (int idx = threadIdx.x; idx < FT_BC * CH; idx += FT_THREADS) {
        int r = idx / CH, ch = idx % CH, t = t0 + r;
        x128 v = t < T ? load128(src + (size_t)t * row_stride + ch * 8) : x128::zeros();
        store128(dst + r * LDH + ch * 8, v);
    }
}

// The backward kernels' two shared pieces. A warp's 16 rows of two tiles (row stride LDH) into A
// fragments, which stay in registers for the whole kernel:
template <int D, int LDH>
__device__ __forceinline__ void flash_warp_rows(flash_wmma::FragA *fa, flash_wmma::FragA *fb, const floatX *ta, const floatX *tb, int warp) {
#pragma unroll
    for (int k = 0; k < D / 16; k++) {
        wmma_load_shared(fa[k], ta + warp * 16 * LDH + k * 16, LDH);
        wmma_load_shared(fb[k], tb + warp * 16 * LDH + k * 16, LDH);
    }
}
// and, against the NT 16-row blocks of two shared tiles X, Y, the warp's S = A·Xᵀ and dP = B·Yᵀ
// (16 x 16·NT each, fp32) into sS and sdP (row stride LDS).
template <int D, int NT, int LDH, int LDS>
__device__ __forceinline__ void flash_two_products(float *sS, float *sdP, const flash_wmma::FragA *fa, const flash_wmma::FragA *fb,
                                                   const floatX *sX, const floatX *sY) {
    using namespace flash_wmma;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        FragC s, dp;
        wmma::fill_fragment(s, 0.0f);
        wmma::fill_fragment(dp, 0.0f);
#pragma unroll
        for (int k = 0; k < D / 16; k++) {
            FragBCol xb, yb;
            wmma_load_shared(xb, sX + n * 16 * LDH + k * 16, LDH);
            wmma::mma_sync(s, fa[k], xb, s);
            wmma_load_shared(yb, sY + n * 16 * LDH + k * 16, LDH);
            wmma::mma_sync(dp, fb[k], yb, dp);
        }
        wmma_store_shared(sS + n * 16, s, LDS);
        wmma_store_shared(sdP + n * 16, dp, LDS);
    }
}

// A warp's 16 staged fp32 rows (row stride LDO) times mult, rounded to bf16, to rows t0 .. t0+15
// (those < T) of dst (row 0 of the head, row stride row_stride).
template <int D>
__device__ inline void flash_store_rows(floatX *dst, size_t row_stride, int t0, int T, const float *stage, float mult, int lane) {
    constexpr int LDO = FlashGeom<D>::LDO, CH = D / 8;
    for (int idx = lane; idx < 16 * CH; idx += 32) {
        int r = idx / CH, ch = idx % CH, t = t0 + r;
        if (t >= T) continue;
        const float *s = stage + r * LDO + ch * 8;
        __stwb(reinterpret_cast<uint4 *>(dst + (size_t)t * row_stride + ch * 8),  // one 16-byte store (pack_bf16x2)
               make_uint4(pack_bf16x2(s[0] * mult, s[1] * mult), pack_bf16x2(s[2] * mult, s[3] * mult), pack_bf16x2(s[4] * mult, s[5] * mult),
                          pack_bf16x2(s[6] * mult, s[7] * mult)));
    }
}

// ----------------------------------------------------------------------------------------------
// forward

template <int D>
__global__ void __launch_bounds__(FT_THREADS) flash_fwd_kernel(floatX *out, float *lse, const floatX *qkv, int T, int C, int NH, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // bf16 wmma needs sm_80+ (gpu_init refuses older GPUs); this keeps multi-arch builds compiling
#else
    using namespace flash_wmma;
    typedef FlashGeom<D> G;
    constexpr int LDH = G::LDH, LDS = G::LDS, LDO = G::LDO, LDP = G::LDP;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    floatX *sK = (floatX *)flash_smem;  // K tile; before the loop, the Q tile
    floatX *sV = sK + G::TILE;
    float *scr_all = (float *)(sV + G::TILE);                      // per warp: S (16 x LDS) or P·V, O (16 x LDO)
    floatX *sP_all = (floatX *)(scr_all + FT_NWARPS * G::SCR_F);  // per warp: P (16 x LDP)

    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    const int qt = (int)gridDim.y - 1 - (int)blockIdx.y;  // the last query tiles have the most key tiles: start them first
    const int q0 = qt * FT_BR;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = lane / FT_LANES_PER_ROW, c0 = lane % FT_LANES_PER_ROW;
    const int qi = q0 + warp * FT_WARP_ROWS + r;  // this lane's query row
    float *scr = scr_all + warp * G::SCR_F;
    floatX *sP = sP_all + warp * G::PT;
    const size_t row3 = 3 * (size_t)C;

    // the Q tile through the K buffer into registers: this warp's 16 rows, D/16 fragments
    flash_load_tile<D>(sK, qkv + ft_qkv_offset(b, 0, h, 0, T, C, D), row3, q0, T);
    __syncthreads();
    FragA qf[D / 16];
#pragma unroll
    for (int k = 0; k < D / 16; k++) wmma_load_shared(qf[k], sK + warp * 16 * LDH + k * 16, LDH);

    float m = -INFINITY, l = 0.0f, o[D / 2];  // row r's running max (log2 units), sum, and columns c0, c0+2, ... of O
#pragma unroll
    for (int e = 0; e < D / 2; e++) o[e] = 0.0f;

    const int nkt = ft_causal_k_tiles(qt, T);
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * FT_BC;
        __syncthreads();  // every warp is done with the previous K, V (at kt = 0: with the Q tile)
        flash_load_tile<D>(sK, qkv + ft_qkv_offset(b, 0, h, 1, T, C, D), row3, k0, T);
        flash_load_tile<D>(sV, qkv + ft_qkv_offset(b, 0, h, 2, T, C, D), row3, k0, T);
        __syncthreads();

        // S = Q_w·Kᵀ: 16 x FT_BC, fp32, into the warp's scratch
#pragma unroll
        for (int n = 0; n < FT_BC / 16; n++) {
            FragC acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int k = 0; k < D / 16; k++) {
                FragBCol kf;
                wmma_load_shared(kf, sK + n * 16 * LDH + k * 16, LDH);
                wmma::mma_sync(acc, qf[k], kf, acc);
            }
            wmma_store_shared(scr + n * 16, acc, LDS);
        }
        __syncwarp();

        // online softmax of row r over this tile (exp2 domain: x = s·scale·log2 e)
        const bool need_mask = ft_tile_needs_mask(qt, kt, T);
        float x[FT_BC / 2], mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < FT_BC / 2; jj++) {
            const int c = c0 + 2 * jj;
            float v = scr[r * LDS + c] * scale_log2;
            if (need_mask && ft_masked(qi, k0 + c, T)) v = -INFINITY;
            x[jj] = v;
            mx = fmaxf(mx, v);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the row's other lane
        const float m_new = fmaxf(m, mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no key yet: exp2(-inf - 0) = 0, not NaN
        const float alpha = exp2f(m - m_use);                   // 0 on the first tile (m = -inf)
        float rs = 0.0f;
#pragma unroll
        for (int jj = 0; jj < FT_BC / 2; jj++) {
            const float p = exp2f(x[jj] - m_use);
            rs += p;
            sP[r * LDP + c0 + 2 * jj] = __float2bfloat16_rn(p);
        }
        rs += __shfl_xor_sync(0xffffffffu, rs, 1);  // a + b on one lane, b + a on the other: the same bits
        l = l * alpha + rs;
        m = m_new;
#pragma unroll
        for (int e = 0; e < D / 2; e++) o[e] *= alpha;
        __syncwarp();  // P complete, and every lane is done reading S from the scratch

        // P·V: 16 x D, fp32, into the scratch (over S), then added to O
        FragA pf[FT_BC / 16];
#pragma unroll
        for (int k = 0; k < FT_BC / 16; k++) wmma_load_shared(pf[k], sP + k * 16, LDP);
#pragma unroll
        for (int n = 0; n < D / 16; n++) {
            FragC acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int k = 0; k < FT_BC / 16; k++) {
                FragBRow vf;
                wmma_load_shared(vf, sV + k * 16 * LDH + n * 16, LDH);
                wmma::mma_sync(acc, pf[k], vf, acc);
            }
            wmma_store_shared(scr + n * 16, acc, LDO);
        }
        __syncwarp();
#pragma unroll
        for (int e = 0; e < D / 2; e++) o[e] += scr[r * LDO + c0 + 2 * e];
        __syncwarp();  // done reading the scratch before the next tile's S overwrites it
    }

    // O / l (bf16) through the scratch to out; lse for the backward
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // l = 0 only on padding rows (qi >= T), never stored
#pragma unroll
    for (int e = 0; e < D / 2; e++) scr[r * LDO + c0 + 2 * e] = o[e] * inv;
    if (c0 == 0 && qi < T) lse[ft_lse_offset(b, h, qi, NH, T)] = (m + log2f(l)) * FT_LN2;
    __syncwarp();
    flash_store_rows<D>(out + ft_out_offset(b, 0, h, T, C, D), (size_t)C, q0 + warp * FT_WARP_ROWS, T, scr, 1.0f, lane);
#endif
}

// ----------------------------------------------------------------------------------------------
// backward

// D[b, h, t] = Σ_d dout[b, t, h, d] · out[b, t, h, d]: one warp per (b, t, h), lanes stride over d,
// fixed shuffle tree (warp_sum): deterministic.
__global__ void flash_bwd_dot_kernel(float *Dvec, const floatX *dout, const floatX *out, int B, int T, int C, int NH) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * T * NH) return;  // whole warps only
    const int h = row % NH, bt = row / NH, t = bt % T, b = bt / T, hs = C / NH;
    const size_t off = ft_out_offset(b, t, h, T, C, hs);
    float acc = 0.0f;
    for (int d = lane; d < hs; d += 32) acc += (float)dout[off + d] * (float)out[off + d];
    acc = warp_sum(acc);
    if (lane == 0) Dvec[ft_lse_offset(b, h, t, NH, T)] = acc;
}

// dK, dV of one key tile: the block owns these 64 rows of dqkv's k and v parts and nobody else
// writes them (no atomics).
template <int D>
__global__ void __launch_bounds__(FT_THREADS)
    flash_bwd_dkdv_kernel(floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse, const float *Dvec, int T, int C, int NH,
                          float scale, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // bf16 wmma needs sm_80+ (gpu_init refuses older GPUs); this keeps multi-arch builds compiling
#else
    using namespace flash_wmma;
    typedef FlashGeom<D> G;
    constexpr int LDH = G::LDH, LDS = G::LDS, LDO = G::LDO, LDP = G::LDP;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    floatX *sQ = (floatX *)flash_smem;  // Q tile; before the loop, the K tile
    floatX *sdO = sQ + G::TILE;         // dO tile; before the loop, the V tile
    float *scr_all = (float *)(sdO + G::TILE);                     // per warp: Sᵀ then dPᵀ (16 x LDS each), or a 16 x LDO staging
    floatX *sP_all = (floatX *)(scr_all + FT_NWARPS * G::SCR_B);  // per warp: Pᵀ (16 x LDP)
    floatX *sdS_all = sP_all + FT_NWARPS * G::PT;                  // per warp: dSᵀ (16 x LDP)
    float *sLse = (float *)(sdS_all + FT_NWARPS * G::PT);          // FT_BR: lse·log2 e of the query tile's rows
    float *sDv = sLse + FT_BR;                                     // FT_BR: D of the query tile's rows

    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    const int kt = blockIdx.y;  // key tile 0 meets every query tile: the longest blocks start first
    const int k0 = kt * FT_BC;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = lane / FT_LANES_PER_ROW, c0 = lane % FT_LANES_PER_ROW;
    const int kj = k0 + warp * FT_WARP_ROWS + r;  // this lane's key row
    float *sS = scr_all + warp * G::SCR_B, *sdP = sS + 16 * LDS;
    floatX *sP = sP_all + warp * G::PT, *sdS = sdS_all + warp * G::PT;
    const size_t row3 = 3 * (size_t)C;

    // K, V tiles through the Q, dO buffers into registers: this warp's 16 key rows
    flash_load_tile<D>(sQ, qkv + ft_qkv_offset(b, 0, h, 1, T, C, D), row3, k0, T);
    flash_load_tile<D>(sdO, qkv + ft_qkv_offset(b, 0, h, 2, T, C, D), row3, k0, T);
    __syncthreads();
    FragA kf[D / 16], vf[D / 16];
    flash_warp_rows<D, LDH>(kf, vf, sQ, sdO, warp);
    FragC dK[D / 16], dV[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; n++) {
        wmma::fill_fragment(dK[n], 0.0f);
        wmma::fill_fragment(dV[n], 0.0f);
    }

    const int nqt = ft_num_q_tiles(T);
    for (int qt = ft_first_q_tile(kt); qt < nqt; qt++) {
        const int q0 = qt * FT_BR;
        __syncthreads();  // every warp is done with the previous Q, dO, lse, D (first time: with K, V)
        flash_load_tile<D>(sQ, qkv + ft_qkv_offset(b, 0, h, 0, T, C, D), row3, q0, T);
        flash_load_tile<D>(sdO, dout + ft_out_offset(b, 0, h, T, C, D), (size_t)C, q0, T);
        for (int i = threadIdx.x; i < FT_BR; i += FT_THREADS) {
            const int t = q0 + i;
            sLse[i] = t < T ? lse[ft_lse_offset(b, h, t, NH, T)] * FT_LOG2E : 0.0f;
            sDv[i] = t < T ? Dvec[ft_lse_offset(b, h, t, NH, T)] : 0.0f;
        }
        __syncthreads();

        // Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ: 16 keys x FT_BR queries each, fp32
        flash_two_products<D, FT_BR / 16, LDH, LDS>(sS, sdP, kf, vf, sQ, sdO);
        __syncwarp();

        // Pᵀ and dSᵀ of key row r: query columns c0, c0+2, ...
        const bool need_mask = ft_tile_needs_mask(qt, kt, T);
#pragma unroll (G::UNROLL_ELEM)
        for (int jj = 0; jj < FT_BR / 2; jj++) {
            const int c = c0 + 2 * jj;
            const float p = need_mask && ft_masked(q0 + c, kj, T) ? 0.0f : exp2f(sS[r * LDS + c] * scale_log2 - sLse[c]);
            const float ds = p * (sdP[r * LDS + c] - sDv[c]);
            sP[r * LDP + c] = __float2bfloat16_rn(p);
            sdS[r * LDP + c] = __float2bfloat16_rn(ds);
        }
        __syncwarp();

        // dV += Pᵀ·dO, dK += dSᵀ·Q (sums over this tile's 64 queries)
#pragma unroll (G::UNROLL_UPD)
        for (int k = 0; k < FT_BR / 16; k++) {
            FragA pa, dsa;
            wmma_load_shared(pa, sP + k * 16, LDP);
            wmma_load_shared(dsa, sdS + k * 16, LDP);
#pragma unroll
            for (int n = 0; n < D / 16; n++) {
                FragBRow dob, qb;
                wmma_load_shared(dob, sdO + k * 16 * LDH + n * 16, LDH);
                wmma::mma_sync(dV[n], pa, dob, dV[n]);
                wmma_load_shared(qb, sQ + k * 16 * LDH + n * 16, LDH);
                wmma::mma_sync(dK[n], dsa, qb, dK[n]);
            }
        }
    }

    // dK·scale and dV, each staged through the warp's scratch (16 x LDO), to dqkv
    __syncwarp();
#pragma unroll
    for (int n = 0; n < D / 16; n++) wmma_store_shared(sS + n * 16, dK[n], LDO);
    __syncwarp();
    flash_store_rows<D>(dqkv + ft_qkv_offset(b, 0, h, 1, T, C, D), row3, k0 + warp * FT_WARP_ROWS, T, sS, scale, lane);
    __syncwarp();
#pragma unroll
    for (int n = 0; n < D / 16; n++) wmma_store_shared(sS + n * 16, dV[n], LDO);
    __syncwarp();
    flash_store_rows<D>(dqkv + ft_qkv_offset(b, 0, h, 2, T, C, D), row3, k0 + warp * FT_WARP_ROWS, T, sS, 1.0f, lane);
#endif
}

// dQ of one query tile: the block owns these 64 rows of dqkv's q part (no atomics).
// At head size 128 the bound asks for one block per SM at least: under the bare bound ptxas held
// it to 168 registers on sm_90 and spilled 16 bytes (tests/test_ptxas.sh) once its operands came
// through cuda/mma.cuh's shared-memory loads.
template <int D>
__global__ void __launch_bounds__(FT_THREADS, D >= 128 ? 1 : 0)
    flash_bwd_dq_kernel(floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse, const float *Dvec, int T, int C, int NH,
                        float scale, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // bf16 wmma needs sm_80+ (gpu_init refuses older GPUs); this keeps multi-arch builds compiling
#else
    using namespace flash_wmma;
    typedef FlashGeom<D> G;
    constexpr int LDH = G::LDH, LDS = G::LDS, LDO = G::LDO, LDP = G::LDP;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    floatX *sK = (floatX *)flash_smem;  // K tile; before the loop, the Q tile
    floatX *sV = sK + G::TILE;          // V tile; before the loop, the dO tile
    float *scr_all = (float *)(sV + G::TILE);                       // per warp: S then dP (16 x LDS each), or a 16 x LDO staging
    floatX *sdS_all = (floatX *)(scr_all + FT_NWARPS * G::SCR_B);  // per warp: dS (16 x LDP)

    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    const int qt = (int)gridDim.y - 1 - (int)blockIdx.y;  // longest first
    const int q0 = qt * FT_BR;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = lane / FT_LANES_PER_ROW, c0 = lane % FT_LANES_PER_ROW;
    const int qi = q0 + warp * FT_WARP_ROWS + r;  // this lane's query row
    float *sS = scr_all + warp * G::SCR_B, *sdP = sS + 16 * LDS;
    floatX *sdS = sdS_all + warp * G::PT;
    const size_t row3 = 3 * (size_t)C;

    // Q, dO tiles through the K, V buffers into registers: this warp's 16 query rows
    flash_load_tile<D>(sK, qkv + ft_qkv_offset(b, 0, h, 0, T, C, D), row3, q0, T);
    flash_load_tile<D>(sV, dout + ft_out_offset(b, 0, h, T, C, D), (size_t)C, q0, T);
    __syncthreads();
    FragA qf[D / 16], dof[D / 16];
    flash_warp_rows<D, LDH>(qf, dof, sK, sV, warp);
    const float lse2 = qi < T ? lse[ft_lse_offset(b, h, qi, NH, T)] * FT_LOG2E : 0.0f;
    const float dd = qi < T ? Dvec[ft_lse_offset(b, h, qi, NH, T)] : 0.0f;
    FragC dQ[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; n++) wmma::fill_fragment(dQ[n], 0.0f);

    const int nkt = ft_causal_k_tiles(qt, T);
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * FT_BC;
        __syncthreads();  // every warp is done with the previous K, V (first time: with Q, dO)
        flash_load_tile<D>(sK, qkv + ft_qkv_offset(b, 0, h, 1, T, C, D), row3, k0, T);
        flash_load_tile<D>(sV, qkv + ft_qkv_offset(b, 0, h, 2, T, C, D), row3, k0, T);
        __syncthreads();

        // S = Q_w·Kᵀ and dP = dO_w·Vᵀ: 16 x FT_BC each, fp32
        flash_two_products<D, FT_BC / 16, LDH, LDS>(sS, sdP, qf, dof, sK, sV);
        __syncwarp();

        // dS of query row r: key columns c0, c0+2, ...
        const bool need_mask = ft_tile_needs_mask(qt, kt, T);
#pragma unroll (G::UNROLL_ELEM)
        for (int jj = 0; jj < FT_BC / 2; jj++) {
            const int c = c0 + 2 * jj;
            const float p = need_mask && ft_masked(qi, k0 + c, T) ? 0.0f : exp2f(sS[r * LDS + c] * scale_log2 - lse2);
            sdS[r * LDP + c] = __float2bfloat16_rn(p * (sdP[r * LDS + c] - dd));
        }
        __syncwarp();

        // dQ += dS·K
#pragma unroll (G::UNROLL_UPD)
        for (int k = 0; k < FT_BC / 16; k++) {
            FragA dsa;
            wmma_load_shared(dsa, sdS + k * 16, LDP);
#pragma unroll
            for (int n = 0; n < D / 16; n++) {
                FragBRow kb;
                wmma_load_shared(kb, sK + k * 16 * LDH + n * 16, LDH);
                wmma::mma_sync(dQ[n], dsa, kb, dQ[n]);
            }
        }
    }

    __syncwarp();
#pragma unroll
    for (int n = 0; n < D / 16; n++) wmma_store_shared(sS + n * 16, dQ[n], LDO);
    __syncwarp();
    flash_store_rows<D>(dqkv + ft_qkv_offset(b, 0, h, 0, T, C, D), row3, q0 + warp * FT_WARP_ROWS, T, sS, scale, lane);
#endif
}

// ----------------------------------------------------------------------------------------------
// host side

// the most dynamic shared memory any of the three kernels needs at head size hs; 0 if unsupported
static inline size_t flash_smem_bytes(int hs) {
#define FT_MAX3(G) (G::FWD_BYTES > G::DKDV_BYTES ? (G::FWD_BYTES > G::DQ_BYTES ? G::FWD_BYTES : G::DQ_BYTES) \
                                                 : (G::DKDV_BYTES > G::DQ_BYTES ? G::DKDV_BYTES : G::DQ_BYTES))
    switch (hs) {
    case 16: return FT_MAX3(FlashGeom<16>);
    case 32: return FT_MAX3(FlashGeom<32>);
    case 64: return FT_MAX3(FlashGeom<64>);
    case 128: return FT_MAX3(FlashGeom<128>);
    default: return 0;
    }
#undef FT_MAX3
}

// Whether these kernels handle head size hs and sequence length T on the current GPU: hs 16, 32, 64
// or 128, 1 <= T with at most 65535 tiles (grid y), and the kernels' shared memory within the
// device's opt-in limit (at most 86.5 KB: every sm_80+ GPU has at least 99 KB).
static int flash_attention_supported(int hs, int T) {
    size_t need = flash_smem_bytes(hs);
    if (need == 0 || T < 1 || ft_num_q_tiles(T) > 65535) return 0;
    int dev = 0, optin = 0;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return need <= (size_t)optin;
}

static void flash_check_shape(const char *what, int B, int T, int C, int NH) {
    int hs = NH > 0 ? C / NH : 0;
    if (B < 1 || NH < 1 || hs * NH != C || !flash_attention_supported(hs, T)) {
        fprintf(stderr,
                "error: %s: shape B=%d T=%d C=%d NH=%d (head size %d) is not supported by the flash kernels;"
                " check flash_attention_supported() first and use cuda/attention.cuh otherwise\n",
                what, B, T, C, NH, hs);
        exit(EXIT_FAILURE);
    }
}

// kernels needing more than the default 48 KB of dynamic shared memory must opt in
template <class K>
static void flash_set_smem(K kernel, size_t bytes) {
    if (bytes > 48 * 1024) cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

template <int D>
static void flash_forward_launch(floatX *out, float *lse, const floatX *qkv, int B, int T, int C, int NH) {
    const size_t smem = FlashGeom<D>::FWD_BYTES;
    flash_set_smem(flash_fwd_kernel<D>, smem);
    const float scale = 1.0f / sqrtf((float)D);
    dim3 grid(B * NH, ft_num_q_tiles(T));
    flash_fwd_kernel<D><<<grid, FT_THREADS, smem>>>(out, lse, qkv, T, C, NH, scale * FT_LOG2E);
    cudaCheckLaunch();
}

template <int D>
static void flash_backward_launch(floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse, const float *Dvec, int B, int T,
                                  int C, int NH) {
    const float scale = 1.0f / sqrtf((float)D);
    const size_t smem_kv = FlashGeom<D>::DKDV_BYTES, smem_q = FlashGeom<D>::DQ_BYTES;
    flash_set_smem(flash_bwd_dkdv_kernel<D>, smem_kv);
    flash_set_smem(flash_bwd_dq_kernel<D>, smem_q);
    dim3 grid_kv(B * NH, ft_num_k_tiles(T)), grid_q(B * NH, ft_num_q_tiles(T));
    flash_bwd_dkdv_kernel<D><<<grid_kv, FT_THREADS, smem_kv>>>(dqkv, dout, qkv, lse, Dvec, T, C, NH, scale, scale * FT_LOG2E);
    cudaCheckLaunch();
    flash_bwd_dq_kernel<D><<<grid_q, FT_THREADS, smem_q>>>(dqkv, dout, qkv, lse, Dvec, T, C, NH, scale, scale * FT_LOG2E);
    cudaCheckLaunch();
}

// out (B, T, C) bf16 and lse (B, NH, T) fp32 = logsumexp over keys t2 <= t of q·k/sqrt(hs), from
// qkv (B, T, 3C). No T x T buffer.
static void flash_attention_forward(floatX *out, float *lse, const floatX *qkv, int B, int T, int C, int NH) {
    flash_check_shape("flash_attention_forward", B, T, C, NH);
    switch (C / NH) {
    case 16: flash_forward_launch<16>(out, lse, qkv, B, T, C, NH); break;
    case 32: flash_forward_launch<32>(out, lse, qkv, B, T, C, NH); break;
    case 64: flash_forward_launch<64>(out, lse, qkv, B, T, C, NH); break;
    default: flash_forward_launch<128>(out, lse, qkv, B, T, C, NH); break;
    }
}

// dqkv (B, T, 3C) is overwritten with the gradient of the loss through attention, given dout
// (B, T, C) and the forward's qkv, out and lse. scratch: B*NH*T floats (D = rowsum(dout ∘ out)).
// Deterministic: bit-identical across runs (see the top of the file).
static void flash_attention_backward(floatX *dqkv, const floatX *dout, const floatX *qkv, const floatX *out, const float *lse,
                                     float *scratch, int B, int T, int C, int NH) {
    flash_check_shape("flash_attention_backward", B, T, C, NH);
    const int rows = B * T * NH;
    flash_bwd_dot_kernel<<<ceil_div_i(rows, 8), 256>>>(scratch, dout, out, B, T, C, NH);
    cudaCheckLaunch();
    switch (C / NH) {
    case 16: flash_backward_launch<16>(dqkv, dout, qkv, lse, scratch, B, T, C, NH); break;
    case 32: flash_backward_launch<32>(dqkv, dout, qkv, lse, scratch, B, T, C, NH); break;
    case 64: flash_backward_launch<64>(dqkv, dout, qkv, lse, scratch, B, T, C, NH); break;
    default: flash_backward_launch<128>(dqkv, dout, qkv, lse, scratch, B, T, C, NH); break;
    }
}
