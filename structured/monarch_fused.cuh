// structured/monarch_fused.cuh: the Monarch forward, and the backward's dx, each as ONE kernel that
// keeps the intermediate (u, du) on chip.
//
// Math and layouts are structured/monarch.h's: nb blocks, p = d_in/nb, s = d_out/nb, q = min(p, s);
//   u[k*q + j] = Σ_c R[k, j, c] x[k*p + c];   y[i*nb + l] = Σ_r L[l, i, r] u[r*nb + l] + b[i*nb + l]
// saved u row (nb, q): u_saved[l*q + r] = u[r*nb + l], as monarch_forward_gpu's baseline saves it,
// so either backward runs on it unchanged.
//
// One block of MF_WARPS warps per tile of tm = 16*MT rows (MT = 1, 2 or 4). The cores come
// transposed (monarch_transposed_cores_gpu): Rt[k] = R[k]ᵀ (p x q), Lt[l] = L[l]ᵀ (q x s), so both
// stages are row-major wmma B operands read straight from global memory (L2-resident weights).
//   stage 1, for each block k: the block copies X_k, the tile's rows of x columns k*p .. k*p + p,
//     into the x tile (rows past N as zeros: the last tile never reads past x); barrier; items
//     (n-tile of q, m-tile), warp w taking w, w + MF_WARPS, ... (the m-tile fastest, so that warps
//     running at the same time read the same core tile, which L1 then serves once); the fp32 result
//     through the warp's staging tile, rounded to bf16 (as the baseline stores u) and scattered to
//     the u tile at the saved layout's position of u[k*q + j]; barrier (the x tile is refilled).
//     So x is read once, and each core element once per tile. Where X_k is at most MF_XVEC 16-byte
//     vectors per thread (tm*p <= 16384), X_{k+1} is loaded into registers right after the first
//     barrier, so that its latency hides behind X_k's MMAs (the BTT kernel's register prefetch).
//   the u tile's rows < N to global when saving (a contiguous copy).
//   stage 2, in steps of js n-tiles of the output (js*nb items >= MF_WARPS where possible): item
//     (l, n-tile) computes Yt_l = Ut_l Lt[l] for all tm rows (A from the u tile: the saved layout
//     makes Ut_l contiguous); lanes add the bias and scatter bf16 values into the y staging tile at
//     their y columns i*nb + l, so that after a barrier the block writes js*16*nb contiguous y
//     columns per row as 16-byte vectors (y's interleaving of the nb blocks would otherwise make
//     every store a 2-byte one, nb elements apart); barrier before the next step reuses it.
// Shared memory: u tile tm x (nb*q + pad); the x tile tm x (p + pad) and the y staging tile
// tm x (js*16*nb + pad), which are never live at once, in one region; per warp a 16x20 fp32 staging
// tile. Needs p, q, s multiples of 16, d_in, d_out multiples of 8, x, y, u, bias 16-byte aligned
// and the transposed cores 32-byte aligned (monarch_fused_supported).
// Not yet: a prefetch for X_k larger than MF_XVEC vectors per thread (3072 -> 768 in 4 blocks at
// 64 rows), e.g. by cp.async into a second x tile.
//
// The backward's dx is not a Monarch of the same kind (its first stage reads dy strided, its second
// writes dx contiguously), so it has its own kernel, monarch_fused_bwd_kernel (below the forward).
#pragma once
#include <mma.h>
#include "../common/btt_tiles.h"
#include "../cuda/common.cuh"
#include "../cuda/mma.cuh"
#include "gpu_plan.h"
#include "monarch.h"

#define MF_WARPS 8
#define MF_THREADS (32 * MF_WARPS)
#define MF_STG_LD BT_STG_LD  // the per-warp fp32 staging tiles and padded row strides are btt_tiles.h's
#define MF_XVEC 8            // at most this many 16-byte x vectors per thread are prefetched (registers)

// When the fused kernels pay. They read every core element once per tile of rows (from L2), where
// the cuBLAS baseline's GEMMs tile far more rows per core read but move their intermediates through
// DRAM: with few blocks at large widths the cores (about d_in·d_out / nb) dwarf a row, and the
// fused kernels would read more than the baseline. The dispatch (monarch_gpu.cuh) runs them only
// while their modelled L2 bytes per row stay within MF_MAX_L2_PER_DRAM times the baseline's DRAM
// bytes per row. 4: an H100's L2 delivers roughly 2 to 3 times its HBM bandwidth, with margin; a
// guess until dev/cuda/monarch_forward and monarch_backward (which run the kernels regardless,
// g_monarch_fused_force, and print both figures) have measured the crossover on a GPU. (BTT's
// fused kernel is not bounded: at widths 768 to 4096, d -> d and d -> 4d, rank 1 to 4, in the
// geometry bt_choose picks, the same model gives at most 3.0 times the baseline's bytes (the
// backward's dx of 4096 -> 16384 rank 4; forwards at most 1.24), under this bound everywhere.)
#define MF_MAX_L2_PER_DRAM 4.0
static int g_monarch_fused_force = 0;

// The baseline's DRAM bytes per row (bf16), from its plans (gpu_plan.h) at one row: the forward's
// GEMM, permute, GEMM, permute, and the bias kernel (y read and written); the backward's dx part,
// which is its plan less the weight-gradient GEMMs (the same on either path). Cores left out.
static inline double monarch_baseline_bytes_per_row(const MonarchShape *m, int backward) {
    Plan p = {}, w = {};
    if (!backward) {
        plan_monarch_forward(&p, m, 1);
        return 2.0 * (plan_activation_elems(&p) + 2.0 * m->d_out);
    }
    plan_monarch_backward(&p, m, 1, 1);
    plan_monarch_backward_weights(&w, m, 1);
    return 2.0 * (plan_activation_elems(&p) - plan_activation_elems(&w));
}

// ---- shared by both kernels (four GEMM loops, two launchers)

typedef WmmaAcc MfAcc;

// acc[mt] = A_mt B for the MT m-tiles of a tile, over K = 16*ksteps: A_mt from shared memory at
// a + mt*16*lda (row-major), B a 16-column strip of a row-major core in global memory at b (ld ldb),
// each of its fragments loaded once for all MT m-tiles. The loads name their state space
// (cuda/mma.cuh): A by ldmatrix, where wmma::load_matrix_sync on these plain pointers gave generic
// 32-bit loads (the kernels as measured on the H200, 2026-12-04, loaded both operands that way).
template <int MT>
__device__ inline void mf_mma_mtiles(MfAcc (&acc)[MT], const floatX *a, int lda, const floatX *b, int ldb, int ksteps) {
    using namespace nvcuda;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) wmma::fill_fragment(acc[mt], 0.0f);
    for (int kk = 0; kk < ksteps; kk++) {
        WmmaB fb;
        wmma_load_b_global(fb, b + (size_t)kk * 16 * ldb, ldb);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            WmmaA fa;
            wmma_load_a_shared(fa, a + mt * 16 * lda + kk * 16, lda);
            wmma::mma_sync(acc[mt], fa, fb, acc[mt]);
        }
    }
}

// The warp's accumulator into its fp32 staging tile (16 x MF_STG_LD), ready for the lanes' epilogue.
__device__ inline void mf_to_staging(float *stg, const MfAcc &acc) {
    __syncwarp();  // the previous epilogue has read the tile
    nvcuda::wmma::store_matrix_sync(stg, acc, MF_STG_LD, nvcuda::wmma::mem_row_major);
    __syncwarp();
}

// Opts kernel k in to `bytes` of dynamic shared memory when a launch needs more than *set, the
// amount granted so far to that instantiation.
template <class K>
static void mf_opt_in_smem(K k, int bytes, int *set) {
    if (bytes <= *set) return;
    cudaCheck(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    *set = bytes;
}

typedef struct {
    int nb, p, q, s, din, dout, urow;
    int tm, mt, js;                    // tile rows, 16-row m-tiles, output n-tiles per stage-2 step
    int uld, yld, xld;                 // smem row strides (elements)
    int off_u, off_y, off_stg;         // dynamic shared memory layout (bytes); the x tile is at off_y
    int smem_bytes;
} MfGeom;

// Fills *g for tile rows tm (16, 32 or 64); 0 when the shape or tm is not supported.
static inline int mf_geom(MfGeom *g, const MonarchShape *m, int tm) {
    if (m->q <= 0 || m->p % 16 || m->q % 16 || m->s % 16 || (tm != 16 && tm != 32 && tm != 64)) return 0;
    if ((long long)m->nb * m->q > (1 << 20) || (long long)m->nb * m->s > (1 << 20)) return 0;  // smem offsets stay in int
    g->nb = m->nb; g->p = m->p; g->q = m->q; g->s = m->s; g->din = m->d_in; g->dout = m->d_out; g->urow = m->nb * m->q;
    g->tm = tm; g->mt = tm / 16;
    const int nts = m->s / 16;
    g->js = (MF_WARPS + m->nb - 1) / m->nb;
    if (g->js > nts) g->js = nts;
    g->uld = bt_pad_ld(g->urow);
    g->yld = bt_pad_ld(g->js * 16 * m->nb);
    g->xld = bt_pad_ld(m->p);
    g->off_u = 0;
    g->off_y = bt_round_up(g->off_u + tm * g->uld * 2, BT_SMEM_ALIGN);
    const int yx = g->yld > g->xld ? g->yld : g->xld;  // the y staging and x tiles share the region
    g->off_stg = bt_round_up(g->off_y + tm * yx * 2, BT_SMEM_ALIGN);
    g->smem_bytes = g->off_stg + MF_WARPS * 16 * MF_STG_LD * 4;
    return 1;
}

// MT m-tiles per tile (compile-time: stage 2's accumulators are registers).
template <int MT>
__global__ void __launch_bounds__(MF_THREADS) monarch_fused_kernel(floatX *__restrict__ y, floatX *__restrict__ uout, const floatX *__restrict__ x,
                                                                   const floatX *__restrict__ Rt, const floatX *__restrict__ Lt,
                                                                   const floatX *__restrict__ bias, int N, MfGeom g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    extern __shared__ __align__(128) unsigned char mf_smem[];
    floatX *us = (floatX *)(mf_smem + g.off_u), *ys = (floatX *)(mf_smem + g.off_y);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tm = 16 * MT;
    float *stg = (float *)(mf_smem + g.off_stg) + warp * 16 * MF_STG_LD;
    const int r0 = blockIdx.x * tm, rows = N - r0 < tm ? N - r0 : tm;
    const int er = lane % 16, ec = (lane / 16) * 8;  // epilogue: this lane's row and 8 columns of a 16x16 tile

    // ---- stage 1: u tile (saved layout) = X_k Rt[k] for every block k, X_k through the x tile
    floatX *xs = ys;  // the x tile: stage 1 only, in the y staging tile's region
    const int nq = g.q / 16, vrow = g.p / 8, nx = tm * vrow;  // nx: 16-byte vectors of one X_k
    // X_{k+1} is loaded into registers while the MMAs run on X_k, where it takes at most MF_XVEC
    // vectors per thread; else each X_k is loaded between the barriers
    const bool prefetch = nx <= MF_XVEC * MF_THREADS;
    x128 xr[MF_XVEC];
    auto load_x = [&](int k) {
#pragma unroll
        for (int i = 0; i < MF_XVEC; i++) {
            const int v = threadIdx.x + i * MF_THREADS, m = v / vrow, c = (v % vrow) * 8;
            if (v < nx) xr[i] = m < rows ? load128(x + (size_t)(r0 + m) * g.din + k * g.p + c) : x128::zeros();
        }
    };
    if (prefetch) load_x(0);
    for (int k = 0; k < g.nb; k++) {
        if (prefetch) {
#pragma unroll
            for (int i = 0; i < MF_XVEC; i++) {
                const int v = threadIdx.x + i * MF_THREADS;
                if (v < nx) store128(xs + (v / vrow) * g.xld + (v % vrow) * 8, xr[i]);
            }
        } else {
            for (int v = threadIdx.x; v < nx; v += MF_THREADS) {
                const int m = v / vrow, c = (v % vrow) * 8;
                store128(xs + m * g.xld + c, m < rows ? load128(x + (size_t)(r0 + m) * g.din + k * g.p + c) : x128::zeros());
            }
        }
        __syncthreads();  // X_k complete
        if (prefetch && k + 1 < g.nb) load_x(k + 1);  // in flight during the MMAs below
        for (int it = warp; it < nq * MT; it += MF_WARPS) {
            const int mt = it % MT, nt = it / MT;
            MfAcc acc[1];
            mf_mma_mtiles<1>(acc, xs + mt * 16 * g.xld, g.xld, Rt + (size_t)k * g.p * g.q + nt * 16, g.q, g.p / 16);
            mf_to_staging(stg, acc[0]);
            for (int t = 0; t < 8; t++) {
                const int m = k * g.q + nt * 16 + ec + t;  // u index; saved at (m % nb) * q + m / nb
                us[(mt * 16 + er) * g.uld + (m % g.nb) * g.q + m / g.nb] = (floatX)stg[er * MF_STG_LD + ec + t];
            }
        }
        __syncthreads();  // the x tile is free for the next block; after the last, the u tile is complete
    }
    if (uout)
        for (int v = threadIdx.x; v < rows * (g.urow / 8); v += MF_THREADS) {
            const int m = v / (g.urow / 8), c = (v % (g.urow / 8)) * 8;
            st16(uout + (size_t)(r0 + m) * g.urow + c, ld16(us + m * g.uld + c));
        }

    // ---- stage 2: y in steps of js output n-tiles (js*16*nb contiguous y columns)
    const int nts = g.s / 16;
    for (int j0 = 0; j0 < nts; j0 += g.js) {
        const int jn = nts - j0 < g.js ? nts - j0 : g.js;
        for (int it = warp; it < g.nb * jn; it += MF_WARPS) {
            const int l = it % g.nb, jj = it / g.nb, j = j0 + jj;
            MfAcc acc[MT];
            mf_mma_mtiles<MT>(acc, us + l * g.q, g.uld, Lt + (size_t)l * g.q * g.s + j * 16, g.s, g.q / 16);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mf_to_staging(stg, acc[mt]);
                for (int t = 0; t < 8; t++) {
                    const int i = j * 16 + ec + t;  // Yt_l column = y column i*nb + l
                    float v = stg[er * MF_STG_LD + ec + t] + (bias ? (float)bias[i * g.nb + l] : 0.0f);
                    ys[(mt * 16 + er) * g.yld + (jj * 16 + ec + t) * g.nb + l] = (floatX)v;
                }
            }
        }
        __syncthreads();  // the staged y columns are complete
        const int w = jn * 16 * g.nb / 8;  // 16-byte vectors per row in this step
        for (int v = threadIdx.x; v < rows * w; v += MF_THREADS) {
            const int m = v / w, c = (v % w) * 8;
            st16(y + (size_t)(r0 + m) * g.dout + (size_t)j0 * 16 * g.nb + c, ld16(ys + m * g.yld + c));
        }
        __syncthreads();  // the staging tile is free for the next step
    }
#endif
}

typedef void (*MfKernel)(floatX *, floatX *, const floatX *, const floatX *, const floatX *, const floatX *, int, MfGeom);

// The most rows per tile the forward may take (64; dev/cuda/monarch_forward sets 32 and 16 to time
// them: fewer rows leave room for more resident blocks per SM, which may hide latency better).
static int g_monarch_fwd_max_tm = 64;

// The tile rows for this shape within smem_limit bytes (64, else 32, else 16), or 0 when
// unsupported: every core element a tile reads comes from L2, so rows per tile divide that traffic
// (|R| + |L| elements per tile; x, u and y are read or written once whatever tm is).
static inline int monarch_fused_supported(const MonarchShape *m, size_t smem_limit) {
    for (int tm = g_monarch_fwd_max_tm; tm >= 16; tm /= 2) {
        MfGeom g;
        if (mf_geom(&g, m, tm) && (size_t)g.smem_bytes <= smem_limit) return tm;
    }
    return 0;
}

// L2 bytes per row the forward kernel reads at geometry g (model): the cores once per tile, x once.
static inline double mf_l2_bytes_per_row(const MfGeom *g) {
    return 2.0 * ((double)g->nb * g->q * (g->p + g->s) / g->tm + g->din);
}

// 1 when the dispatch should run the fused forward for this shape: supported, and within the
// traffic bound (or g_monarch_fused_force).
static inline int monarch_fused_fwd_pays(const MonarchShape *m, size_t smem_limit) {
    MfGeom g;
    const int tm = monarch_fused_supported(m, smem_limit);
    if (!tm || !mf_geom(&g, m, tm)) return 0;
    return g_monarch_fused_force || mf_l2_bytes_per_row(&g) <= MF_MAX_L2_PER_DRAM * monarch_baseline_bytes_per_row(m, 0);
}

// y (N, d_out) = Monarch(x) + bias; u_or_null: the saved u. Rt, Lt: the transposed cores. Returns
// 0 (nothing launched) when the shape, device or alignment is not supported.
static int monarch_forward_fused(floatX *y, floatX *u_or_null, const floatX *x, const floatX *Rt, const floatX *Lt, const floatX *bias_or_null,
                                 int N, const MonarchShape *m, size_t smem_limit) {
    const int tm = monarch_fused_supported(m, smem_limit);
    MfGeom g;
    if (!tm || !mf_geom(&g, m, tm)) return 0;
    if (((uintptr_t)y | (uintptr_t)u_or_null | (uintptr_t)x | (uintptr_t)bias_or_null) % 16 || ((uintptr_t)Rt | (uintptr_t)Lt) % 32) return 0;
    if (N <= 0) return 1;
    MfKernel k = tm == 64 ? monarch_fused_kernel<4> : tm == 32 ? monarch_fused_kernel<2> : monarch_fused_kernel<1>;
    static int attr[3];  // the opt-in dynamic shared memory set so far, per instantiation
    mf_opt_in_smem(k, g.smem_bytes, &attr[tm / 32]);
    k<<<ceil_div_i(N, tm), MF_THREADS, g.smem_bytes>>>(y, u_or_null, x, Rt, Lt, bias_or_null, N, g);
    cudaCheckLaunch();
    return 1;
}

// ----------------------------------------------------------------------------------------------
// Backward: dx, du and dyt from ONE kernel over dy (monarch.h's backward, same roundings as the
// baseline's plan: du rounded to bf16 once, dx accumulated in fp32 and rounded once):
//   dyt[l*s + i] = dy[i*nb + l]                         (for dL's GEMM; written as the plan's T2)
//   du[r*nb + l] = Σ_i L[l, i, r] dyt[l*s + i]          (natural order; written as the plan's T3)
//   dx[k*p + c]  = Σ_j R[k, j, c] du[k*q + j]
// The weight gradients dL[l] += dYt_lᵀ Ut_l and dR[k] += dU_kᵀ X_k reduce over every row: they stay
// cuBLAS GEMMs on dyt and du (plan_monarch_backward_weights).
//
// One block of MF_WARPS warps per tile of tm = 16*MT rows (monarch_fused_bwd_choose picks tm and
// the group size G from a model of L2 traffic). The cores are read as stored, L[l]
// (s x q) and R[k] (q x p) both row-major wmma B operands (32-byte aligned: the caller copies
// misaligned parameters). For groups of G of the nb blocks l (all nb when they fit):
//   fill: the block reads the tile's dy rows as 16-byte vectors and scatters the group's elements
//     (column i*nb + l) de-interleaved into the dyt tile, tm x G*s (rows past N as zeros); copies
//     the group's dyt columns (contiguous: l*s + i) to global; barrier.
//   stage 1: items (l, n-tile of q, m-tile): dUt_l = dYt_l L[l] over K = s, rounded to bf16 and
//     scattered into the du tile at r*nb + l; barrier (the dyt tile is refilled by the next group).
// With G < nb the tile's dy is read nb/G times (from L2 after the first): the price of more rows per
// tile where the whole dyt tile would not leave room for them, or of d_out 8192 and up at all.
// Then the du tile's rows < N go to global (contiguous), and stage 2: items (k, n-tile of p) with
// MT accumulators: dX_k = dU_k R[k] over K = q, A from the du tile (natural order makes dU_k
// contiguous), each lane storing 8 bf16 of a row as one 16-byte vector (dx's columns k*p + c are
// contiguous). Skipped when dx is NULL.
// Shared memory: dyt tile tm x (G*s + pad), du tile tm x (nb*q + pad), per warp a 16x20 fp32
// staging tile. Needs p, q, s multiples of 16 (as the forward), dy, dx, du, dyt 16-byte aligned.

typedef struct {
    int nb, p, q, s, din, dout, urow;
    int tm, mt, G;           // tile rows, 16-row m-tiles, dy blocks l per group
    int dld, uld;            // smem row strides (elements) of the dyt and du tiles
    int off_d, off_u, off_stg;
    int smem_bytes;
} MbGeom;

// Fills *g for tile rows tm (16, 32 or 64) and groups of G blocks; 0 when the shape is not supported.
static inline int mb_geom(MbGeom *g, const MonarchShape *m, int tm, int G) {
    if (m->q <= 0 || m->p % 16 || m->q % 16 || m->s % 16 || (tm != 16 && tm != 32 && tm != 64) || G < 1 || G > m->nb) return 0;
    if ((long long)G * m->s > (1 << 20) || (long long)m->nb * m->q > (1 << 20)) return 0;  // smem offsets stay in int
    g->nb = m->nb; g->p = m->p; g->q = m->q; g->s = m->s; g->din = m->d_in; g->dout = m->d_out; g->urow = m->nb * m->q;
    g->tm = tm; g->mt = tm / 16; g->G = G;
    g->dld = bt_pad_ld(G * m->s);
    g->uld = bt_pad_ld(g->urow);
    g->off_d = 0;
    g->off_u = bt_round_up(g->off_d + tm * g->dld * 2, BT_SMEM_ALIGN);
    g->off_stg = bt_round_up(g->off_u + tm * g->uld * 2, BT_SMEM_ALIGN);
    g->smem_bytes = g->off_stg + MF_WARPS * 16 * MF_STG_LD * 4;
    return 1;
}

// How monarch_fused_bwd_choose picks the geometry: 0 (the default) the least modelled L2 traffic;
// 1 the whole dyt tile first (every block in one group, 32 rows then 16, else 16 rows and the largest
// group), the older rule, kept so that dev/cuda/monarch_backward can time both on a GPU.
static int g_monarch_bwd_whole_tile = 0;

// Bytes a block reads from L2 per row of dy for geometry g, the quantity the default choice
// minimises: the cores, |L| + |R| elements per tile (warps working on the same core tile for
// different m-tiles share it through L1), and the tile's dy once per group.
static inline double mb_l2_bytes_per_row(const MbGeom *g) {
    const double cores = (double)g->nb * g->q * (g->s + g->p);
    return 2.0 * (cores / g->tm + (double)g->dout * ((g->nb + g->G - 1) / g->G));
}

// The geometry for this shape within smem_limit bytes, 0 when none fits. Default: among 64, 32 and
// 16 rows and every group size that fits, the least L2 traffic per row (ties: more rows, then
// larger groups). Rows per tile divide the core traffic; groups multiply dy's, so a wide d_out
// trades one for the other (768 -> 3072 with 4 blocks: 64 rows in groups of 1, about 2.1x less
// than 16 rows in one group).
static inline int monarch_fused_bwd_choose(MbGeom *g, const MonarchShape *m, size_t smem_limit) {
    if (m->nb <= 0) return 0;
    if (g_monarch_bwd_whole_tile) {
        for (int tm = 32; tm >= 16; tm /= 2)
            if (mb_geom(g, m, tm, m->nb) && (size_t)g->smem_bytes <= smem_limit) return 1;
        for (int G = m->nb - 1; G >= 1; G--)
            if (mb_geom(g, m, 16, G) && (size_t)g->smem_bytes <= smem_limit) return 1;
        return 0;
    }
    int found = 0;
    double best = 0.0;
    for (int tm = 64; tm >= 16; tm /= 2)
        for (int G = m->nb; G >= 1; G--) {
            MbGeom c;
            if (!mb_geom(&c, m, tm, G) || (size_t)c.smem_bytes > smem_limit) continue;
            const double cost = mb_l2_bytes_per_row(&c);
            if (!found || cost < best) { *g = c; best = cost; found = 1; }
        }
    return found;
}

// (MF_THREADS, 1): with the state-space loads of cuda/mma.cuh, ptxas held MT = 4 to 64 registers
// on sm_80 under the bare bound and spilled 12 bytes (tests/test_ptxas.sh); it takes 79 this way.
template <int MT>
__global__ void __launch_bounds__(MF_THREADS, 1) monarch_fused_bwd_kernel(floatX *__restrict__ dx, floatX *__restrict__ du_out,
                                                                       floatX *__restrict__ dyt_out, const floatX *__restrict__ dy,
                                                                       const floatX *__restrict__ R, const floatX *__restrict__ L, int N,
                                                                       MbGeom g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    extern __shared__ __align__(128) unsigned char mf_smem[];
    floatX *ds = (floatX *)(mf_smem + g.off_d), *us = (floatX *)(mf_smem + g.off_u);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tm = 16 * MT;
    float *stg = (float *)(mf_smem + g.off_stg) + warp * 16 * MF_STG_LD;
    const int r0 = blockIdx.x * tm, rows = N - r0 < tm ? N - r0 : tm;
    const int er = lane % 16, ec = (lane / 16) * 8;  // epilogue: this lane's row and 8 columns of a 16x16 tile
    const int nq = g.q / 16, vrow = g.dout / 8;

    for (int g0 = 0; g0 < g.nb; g0 += g.G) {
        const int gn = g.nb - g0 < g.G ? g.nb - g0 : g.G;
        // ---- fill: the group's columns of the tile's dy rows, de-interleaved (dyt order)
        for (int v = threadIdx.x; v < tm * vrow; v += MF_THREADS) {
            const int m = v / vrow, c = (v % vrow) * 8;
            int any = gn == g.nb;  // skip vectors without a column of the group (nb > 8 and G < nb)
            for (int t = 0; t < 8 && !any; t++) {
                const int l = (c + t) % g.nb;
                any = l >= g0 && l < g0 + gn;
            }
            if (!any) continue;
            x128 val = m < rows ? load128(dy + (size_t)(r0 + m) * g.dout + c) : x128::zeros();
            for (int t = 0; t < 8; t++) {
                const int col = c + t, l = col % g.nb;
                if (l >= g0 && l < g0 + gn) ds[m * g.dld + (l - g0) * g.s + col / g.nb] = val[t];
            }
        }
        __syncthreads();  // the group's dyt tile is complete
        if (dyt_out) {
            const int w = gn * g.s / 8;  // 16-byte vectors per row: dyt columns g0*s .. (g0 + gn)*s
            for (int v = threadIdx.x; v < rows * w; v += MF_THREADS) {
                const int m = v / w, c = (v % w) * 8;
                st16(dyt_out + (size_t)(r0 + m) * g.dout + (size_t)g0 * g.s + c, ld16(ds + m * g.dld + c));
            }
        }
        // ---- stage 1: dUt_l = dYt_l L[l] for the group's blocks, into the du tile (natural order)
        const int items1 = gn * nq * MT;
        for (int it = warp; it < items1; it += MF_WARPS) {
            const int mt = it % MT, nt = (it / MT) % nq, lj = it / (MT * nq), l = g0 + lj;
            MfAcc acc[1];
            mf_mma_mtiles<1>(acc, ds + mt * 16 * g.dld + lj * g.s, g.dld, L + (size_t)l * g.s * g.q + nt * 16, g.q, g.s / 16);
            mf_to_staging(stg, acc[0]);
            for (int t = 0; t < 8; t++) {
                const int r = nt * 16 + ec + t;  // dUt_l column r = du index r*nb + l
                us[(mt * 16 + er) * g.uld + r * g.nb + l] = (floatX)stg[er * MF_STG_LD + ec + t];
            }
        }
        __syncthreads();  // the dyt tile is free; after the last group the du tile is complete
    }
    if (du_out)
        for (int v = threadIdx.x; v < rows * (g.urow / 8); v += MF_THREADS) {
            const int m = v / (g.urow / 8), c = (v % (g.urow / 8)) * 8;
            st16(du_out + (size_t)(r0 + m) * g.urow + c, ld16(us + m * g.uld + c));
        }
    if (!dx) return;

    // ---- stage 2: dX_k = dU_k R[k], straight to global as 16-byte vectors
    const int np = g.p / 16;
    for (int it = warp; it < g.nb * np; it += MF_WARPS) {
        const int nt = it % np, k = it / np;
        MfAcc acc[MT];
        mf_mma_mtiles<MT>(acc, us + k * g.q, g.uld, R + (size_t)k * g.q * g.p + nt * 16, g.p, nq);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            mf_to_staging(stg, acc[mt]);
            const int row = mt * 16 + er;
            if (row < rows) {
                const float *v = stg + er * MF_STG_LD + ec;
                __stwb(reinterpret_cast<uint4 *>(dx + (size_t)(r0 + row) * g.din + k * g.p + nt * 16 + ec),
                       make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7])));
            }
        }
    }
#endif
}

// 1 when the dispatch should run the fused backward at geometry g (monarch_fused_bwd_choose's):
// within the traffic bound, or g_monarch_fused_force.
static inline int monarch_fused_bwd_pays(const MbGeom *g, const MonarchShape *m) {
    return g_monarch_fused_force || mb_l2_bytes_per_row(g) <= MF_MAX_L2_PER_DRAM * monarch_baseline_bytes_per_row(m, 1);
}

typedef void (*MbKernel)(floatX *, floatX *, floatX *, const floatX *, const floatX *, const floatX *, int, MbGeom);

// dx (N, d_in) overwritten (skipped when NULL), du (N, nb·q) natural order and dyt (N, d_out) for
// the weight gradients; R, L the cores as stored, 32-byte aligned. Returns 0 (nothing launched)
// when the shape, device or alignment is not supported.
static int monarch_backward_fused(floatX *dx_or_null, floatX *du, floatX *dyt, const floatX *dy, const floatX *R, const floatX *L, int N,
                                  const MonarchShape *m, size_t smem_limit) {
    MbGeom g;
    if (!monarch_fused_bwd_choose(&g, m, smem_limit)) return 0;
    if (((uintptr_t)dx_or_null | (uintptr_t)du | (uintptr_t)dyt | (uintptr_t)dy) % 16 || ((uintptr_t)R | (uintptr_t)L) % 32) return 0;
    if (N <= 0) return 1;
    MbKernel k = g.tm == 64 ? monarch_fused_bwd_kernel<4> : g.tm == 32 ? monarch_fused_bwd_kernel<2> : monarch_fused_bwd_kernel<1>;
    static int attr[3];  // the opt-in dynamic shared memory set so far, per instantiation
    mf_opt_in_smem(k, g.smem_bytes, &attr[g.tm / 32]);
    k<<<ceil_div_i(N, g.tm), MF_THREADS, g.smem_bytes>>>(dx_or_null, du, dyt, dy, R, L, N, g);
    cudaCheckLaunch();
    return 1;
}
