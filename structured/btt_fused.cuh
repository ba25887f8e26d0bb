// structured/btt_fused.cuh: the BTT forward as ONE kernel that keeps the intermediate z on chip.
//
//   int btt_fused_geom(&g, s, smem_limit, tm_only)                  -> 1 and the geometry, or 0
//   int btt_fused_supported(const BTTShape *s, size_t smem_limit)   -> tile rows tm, or 0
//   int btt_forward_fused(y, z_or_null, x, W0, W1, bias_or_null, N, s)  -> 1 done, 0 not supported
//   int btt_forward_fused_tm(..., tm)   the same with the tile rows forced (dev/cuda/btt_forward.cu)
//   int btt_forward_fused_seg(...)      S BTTs of one shape in one launch over grouped rows
//                                       (BTT-MoE's experts): the tile table is built on the GPU
//                                       from the segments' counts, x rows are read through
//                                       `order` (no gather, no host round trip), each row's z
//                                       components optionally scaled by its gates between the
//                                       stages (BTT-MoE grouped by set); btt_tiles.h
// When these return 0 nothing was launched: call btt_forward_gpu (btt_gpu.cuh) instead.
//
// Design (tile geometry and every index: common/btt_tiles.h, emulated on the CPU by
// tests/test_btt_tiles.c). A block of 8 warps (256 threads) owns a tile of tm rows (16, 32 or 64)
// and loops over tiles with stride gridDim.x (grid = the blocks resident at once, at most the number
// of tiles). A tile is computed in npg groups of pg output blocks (phi = npg * pg): group q needs
// only columns q*pg*rho .. of each W0[g]'s output, so its z tile is tm x pg*gamma*rho; x is read
// once per group. bt_choose picks (tm, pg) within the opt-in shared memory by modelled L2 bytes per
// row, 2(|W0| + |W1|)/tm + 2 d_in npg: one group of 64 rows where it fits (GPT-2 small's 768 <->
// 3072 rank 1), else more rows in groups over fewer rows whole; at widths 2048 and 4096 the whole z
// tile mostly fits no tile size, and groups make the kernel run there. Of the tile rows the model
// costs within 2.5x of the least, the one with the most blocks resident per SM runs
// (bt_pick_resident: on an H200, 3072 -> 768 rank 1 ran 1.55x faster at tm 16 with 2 blocks per SM
// than at tm 64 with 1). Per tile and group:
//   stage 1: for each chunk of gc g blocks (about 4096 x elements), the chunk x[tile rows, chunk]
//     goes to shared memory from registers that were loaded one chunk ahead (16-byte loads issued
//     before the previous chunk's MMAs; a group's chunk 0 is loaded before the previous group's or
//     tile's last chunk and stage 2), rows past N zero-filled, so the tail tile computes on zeros
//     and never reads past x; warps compute 16x16 blocks of Z1_g = X_g W0[g] with wmma bf16
//     m16n16k16, fp32 accumulate (A by ldmatrix from shared memory, B straight from W0 in global
//     memory, ldm phi*rho), store each through a per-warp fp32 staging tile, round to bf16 (as the
//     baseline stores z) and scatter into the z tile in the saved (phi, gamma, rho) layout.
//   barrier; if z_or_null: the z tile's rows < N go to global as 16-byte vectors (the saved z for
//     the backward: a contiguous copy of the group's slice of each row, the tile already has the
//     saved layout).
//   stage 2: for each f of the group, Y_f (tm x eps) = Z_f (tm x gamma*rho, from shared memory)
//     W1[f]: a warp item is one f and nb (<= 3) 16-column tiles over all tm rows (mt x nb
//     accumulators; each B fragment, from global and prefetched one k-step ahead, serves mt
//     m-tiles); fp32 accumulate, + bias, one rounding to bf16, 16-byte stores of rows < N.
//   Shared memory per block: tm x (pg*gamma*rho + pad) bf16 (z tile) + tm x (gc*alpha + pad) bf16
//   (x chunk) + 8 x 16 x 20 fp32 (staging). Rows padded to 64 + 8 elements: wmma ldm a multiple of
//   8, fragment pointers 32-byte aligned, consecutive rows 16 bytes apart mod 128 (conflict-free
//   ldmatrix).
//   Supported: alpha, phi*rho, gamma*rho, eps multiples of 16 (wmma tiles exact), a group with
//   pg*rho a multiple of 16 within the opt-in shared memory; x, y, z, bias 16-byte aligned; W0, W1
//   32-byte aligned.
//   Geometries (tm, groups; tests/test_btt_tiles.c works them out by hand): H100 (227 KB): 768->3072
//   and 3072->768 rank 1 (zrow 1536): 64, 1 (217,088 bytes, 1 block of 8 warps per SM); 768->3072
//   rank 2: 64, 2; rank 4: 64, 4; 768->768 rank 4: 64, 2; 2048->8192 rank 2: 64, 8; 4096->16384
//   rank 1: 64, 8. A100 (163 KB): 768->3072 rank 1: 64, 2; rank 4: 64, 8.
//
// Memory traffic per row (bf16; zrow = gamma*phi*rho = 1536 for 768->3072 rank 1):
//   baseline (GEMM, permute, GEMM, bias kernel): x read d_in; T1 write + read 2 zrow; z write + read
//     2 zrow; y write d_out, + read + write 2 d_out for the bias = 19,968 bytes/row at 768->3072
//     rank 1 without the bias pass (32,256 with it), in four launches, the GEMMs with K = alpha = 16.
//   fused: x read d_in; z write zrow only when saved; y write d_out = 7,680 bytes/row (10,752 with
//     z): 2.6x (1.9x) less DRAM traffic than the baseline without its bias pass. The dense layer
//     moves the same x + y (7,680 bytes/row) but does 13.7x the flops (2 d_in d_out = 4.7 MFLOP/row:
//     compute-bound, ~6.7 ns/row at 700 TFLOP/s), while the fused kernel is bandwidth-bound
//     (~2.6 ns/row without z, ~3.6 with z at 3 TB/s) if its shared-memory and L2 traffic keep up.
//   Weights (W0 + W1 = 344,064 bytes at 768->3072 rank 1) stay in L2 and every tile reads them:
//   (|W0| + |W1|) * 2 / tm bytes per row from L2 (5,376 at tm 64), not from DRAM; with npg > 1
//   groups x is read npg - 1 more times, from L2 (bt_l2_bytes_per_row counts both).
// The backward's dx and dZ are this kernel too: the forward of the transposed BTT (btt.h,
// btt_shape_transposed: cores W1[f]ᵀ and W0[g]ᵀ) on dy, whose saved z is dZ in the layout dW0
// needs; the supported shapes are the same set (alpha, phi*rho, gamma*rho, eps only swap roles).
// g_btt_wstage (-sk 2) stages each x chunk's slice of W0 in shared memory with the chunk and
// prefetches stage 2's first W1 fragments across items (btt_tiles.h: ws).
// What is left: the weight gradients fused with the dx pass (now cuBLAS GEMMs over all rows for a
// plain BTT, seg_wgrad.cuh for BTT-MoE's experts: they read z, dy, x and dZ once more); cp.async
// (or TMA) double buffering of
// the x chunks instead of the register prefetch, and staging W1[f] in shared memory (B fragments now
// come from L1/L2, 4 32-bit loads + transposes per fragment); wgmma on sm_90; writing accumulators
// without the fp32 staging round trip (mma.sync with its documented register layout: both stages
// have it, MMA / g_btt_mma, stage 2 on W1 packed in fragment order before each launch; the
// trainer's -sk 5, not yet measured on a GPU); a z layout
// or lane mapping that lets rank 1 scatter more than 2 bytes per store (even ranks store runs of
// 2 to 8 elements, bt_z1_vec).
#pragma once
#include <mma.h>
#include "../common/btt_tiles.h"
#include "../common/utils.h"
#include "../cuda/common.cuh"
#include "../cuda/mma.cuh"
#include "btt.h"

// A lane's 8 fp32 of the warp's staging tile (row bt_epi_row, columns bt_epi_col ..): two 16-byte
// loads (byte offset 80*row + 4*col, col 0 or 8: 16-byte aligned). The 8 lanes of one load phase
// are 8 rows, 80 bytes apart: 8 distinct 16-byte bank groups, no conflict (8 scalar loads at this
// stride would be 4-way conflicted).
__device__ __forceinline__ void bt_stg_read8(float v[8], const float *stg, int er, int ec) {
    const float4 *p = reinterpret_cast<const float4 *>(stg + er * BT_STG_LD + ec);
    float4 a = p[0], b = p[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// The 8 values of a stage-1 lane, rounded to bf16, into the z tile at bt_z1_run's indices idx, in
// runs of vw (bt_z1_vec: consecutive indices, the first a multiple of vw).
__device__ __forceinline__ void bt_z1_store(floatX *zs, const int idx[8], const float v[8], int vw) {
    if (vw == 8) {
        *reinterpret_cast<uint4 *>(zs + idx[0]) =
            make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
    } else if (vw == 4) {
#pragma unroll
        for (int h = 0; h < 8; h += 4)
            *reinterpret_cast<uint2 *>(zs + idx[h]) = make_uint2(pack_bf16x2(v[h], v[h + 1]), pack_bf16x2(v[h + 2], v[h + 3]));
    } else if (vw == 2) {
#pragma unroll
        for (int h = 0; h < 8; h += 2) *reinterpret_cast<unsigned *>(zs + idx[h]) = pack_bf16x2(v[h], v[h + 1]);
    } else {
#pragma unroll
        for (int t = 0; t < 8; t++) zs[idx[t]] = (floatX)v[t];
    }
}

// Two stage-1 values of row m, block gi, columns c (even) and c + 1, rounded to bf16, into the z
// tile: one 4-byte store where they are neighbours there (rho even: the same f, s and s + 1, the
// first at an even index), else two (rank 1: f and f + 1 lie gr apart).
__device__ __forceinline__ void bt_z1_store2(floatX *zs, const BtGeom *g, int m, int gi, int c, float v0, float v1) {
    const int at = bt_z1_at(g, m, gi, c);
    if (g->R % 2 == 0) {
        *reinterpret_cast<unsigned *>(zs + at) = pack_bf16x2(v0, v1);
    } else {
        zs[at] = (floatX)v0;
        zs[bt_z1_at(g, m, gi, c + 1)] = (floatX)v1;
    }
}

// This thread's part of x chunk ch of tile `tile` (rows past the tile's: zeros) into registers,
// and from registers into the x chunk buffer (btt_tiles.h: bt_x_fill_per, BT_XVEC).
__device__ __forceinline__ void bt_x_load(uint4 pre[BT_XVEC], const floatX *__restrict__ x, const BtGeom &g, const BtSeg &sg, int N, int tile,
                                          int ch) {
    const BtTile tl = bt_tile_at(&g, &sg, N, tile);
    BtWalk it;
    bt_walk_begin(&it, bt_x_fill_per(&g, bt_chunk_gcount(&g, ch)), threadIdx.x, BT_THREADS);
#pragma unroll
    for (int k = 0; k < BT_XVEC; k++, bt_walk_next(&it))
        if (it.o < g.tm)
            pre[k] = it.o < tl.rows ? ld16_ro(x + bt_x_global(&g, bt_x_row(&sg, tl.r0 + it.o), ch, it.i * 8)) : make_uint4(0, 0, 0, 0);  // tail: zeros
}
__device__ __forceinline__ void bt_x_store(floatX *xs, const uint4 pre[BT_XVEC], const BtGeom &g, int ch) {
    BtWalk it;
    bt_walk_begin(&it, bt_x_fill_per(&g, bt_chunk_gcount(&g, ch)), threadIdx.x, BT_THREADS);
#pragma unroll
    for (int k = 0; k < BT_XVEC; k++, bt_walk_next(&it))
        if (it.o < g.tm) st16(xs + bt_x_smem(&g, it.o, it.i * 8), pre[k]);
}

// With ws: this thread's part of W0 chunk (q, ch) of tile `tile` (its segment's cores) into
// registers, and from registers into the W0 chunk buffer (btt_tiles.h: bt_w_fill_per, BT_WVEC).
__device__ __forceinline__ void bt_w_load(uint4 pre[BT_WVEC], const floatX *__restrict__ W0, const BtGeom &g, const BtSeg &sg, int N, int tile,
                                          int q, int ch) {
    const floatX *__restrict__ W0s = W0 + bt_tile_at(&g, &sg, N, tile).seg * sg.w0_stride;
    const int rows = bt_chunk_gcount(&g, ch) * g.A;
    BtWalk it;
    bt_walk_begin(&it, bt_w_fill_per(&g), threadIdx.x, BT_THREADS);
#pragma unroll
    for (int k = 0; k < BT_WVEC; k++, bt_walk_next(&it))
        if (it.o < rows) pre[k] = ld16_ro(W0s + bt_w_global(&g, q, ch, it.o, it.i * 8));
}
__device__ __forceinline__ void bt_w_store(floatX *ws, const uint4 pre[BT_WVEC], const BtGeom &g, int ch) {
    const int rows = bt_chunk_gcount(&g, ch) * g.A;
    BtWalk it;
    bt_walk_begin(&it, bt_w_fill_per(&g), threadIdx.x, BT_THREADS);
#pragma unroll
    for (int k = 0; k < BT_WVEC; k++, bt_walk_next(&it))
        if (it.o < rows) st16(ws + bt_w_smem(&g, it.o, it.i * 8), pre[k]);
}

// Two bf16 of a word (lo first, as they lie in memory) times a and b, rounded to bf16 again.
__device__ __forceinline__ unsigned bt_scale_bf16x2(unsigned w, float a, float b) {
    return pack_bf16x2(__uint_as_float(w << 16) * a, __uint_as_float(w & 0xffff0000u) * b);
}

// BtSeg.gate (BTT-MoE's set path): the z tile's rows < rows in place, each value of rank
// component s of row m times gate[(r0 + m)·rho + s], rounded to bf16 again (as the cuBLAS plans'
// permute of z does it: moe_sets.cuh), 16 bytes a thread. rho divides 8 and a vector starts at a
// column that is a multiple of 8, so its 8 values are components 0 .. rho - 1 over and over.
__device__ __forceinline__ void bt_z_gate(floatX *zs, const BtGeom &g, const float *__restrict__ gate, int r0, int rows) {
    BtWalk it;
    for (bt_walk_begin(&it, bt_zcopy_per(&g), threadIdx.x, BT_THREADS); it.o < rows; bt_walk_next(&it)) {
        const float *gr = gate + (size_t)(r0 + it.o) * g.R;
        float gv[8];
#pragma unroll
        for (int t = 0; t < 8; t++) gv[t] = __ldg(gr + (t & (g.R - 1)));  // column it.i·8 + t's component (rho a power of 2)
        floatX *p = zs + bt_z_smem(&g, it.o, it.i * 8);
        uint4 v = ld16(p);
        v.x = bt_scale_bf16x2(v.x, gv[0], gv[1]);
        v.y = bt_scale_bf16x2(v.y, gv[2], gv[3]);
        v.z = bt_scale_bf16x2(v.z, gv[4], gv[5]);
        v.w = bt_scale_bf16x2(v.w, gv[6], gv[7]);
        st16(p, v);
    }
}

// One of a lane's four values chosen by a lane-dependent index, as selects (no local memory).
__device__ __forceinline__ uint32_t bt_pick4(const uint32_t v[4], int i) { return i == 0 ? v[0] : i == 1 ? v[1] : i == 2 ? v[2] : v[3]; }

// A 16x16 fp32 result of two m16n8k16 halves (d[h], cuda/mma.cuh's layout) + bias, rounded to bf16
// and written to y as one 16-byte store per lane. Lane t of each quad (t = l % 4) holds, packed,
// v[0] = row g cols 2t.. of half 0, v[1] = of half 1, v[2], v[3] = the same of row g + 8; the quad
// transposes them (shuffles in 3 rounds) so that lane t gets v[t] of all four lanes: 8 consecutive
// columns (half t & 1) of row g + 8 (t >> 1). tile_row0: the tile's row of D's row 0; rows: the
// tile's valid rows (rows past them were computed on zeros and are not stored).
__device__ __forceinline__ void bt_y_store_mma(floatX *__restrict__ y, const floatX *__restrict__ bias, const BtGeom &g, const float d[2][4],
                                               int r0, int tile_row0, int rows, int f, int n, int lane) {
    const int t = lane % 4, gq = lane / 4;
    float b[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    if (bias) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const floatX *bp = bias + bt_bias(&g, f, n, h * 8 + 2 * t);
            b[h][0] = (float)bp[0];
            b[h][1] = (float)bp[1];
        }
    }
    uint32_t v[4], o[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int h = 0; h < 2; h++) {
        v[h] = pack_bf16x2(d[h][0] + b[h][0], d[h][1] + b[h][1]);
        v[2 + h] = pack_bf16x2(d[h][2] + b[h][0], d[h][3] + b[h][1]);
    }
#pragma unroll
    for (int s = 0; s < 4; s++) {  // round s: lane t takes quad lane (t + s) & 3's value for t
        const int src = (t + s) & 3;
        const uint32_t r = s == 0 ? bt_pick4(v, t) : __shfl_sync(0xffffffffu, bt_pick4(v, (t - s) & 3), (lane & ~3) | src);
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (src == k) o[k] = r;
    }
    const int m = tile_row0 + gq + 8 * (t >> 1);
    if (m < rows) __stwb(reinterpret_cast<uint4 *>(y + bt_y_global(&g, r0 + m, f, n, 8 * (t & 1))), make_uint4(o[0], o[1], o[2], o[3]));
}

// Stage 2 on mma.sync for group q of a tile: the same items as the wmma stage 2 (bt_walk over pg
// x ntg), A by ldmatrix from the z tile, B from W1p (W1 packed in fragment order, bt_w1p_block:
// one coalesced 16-byte load per lane and n-tile, the next k-step's, or the next item's first, in
// flight while this one computes), the result out through bt_y_store_mma: no staging tile, no
// warp barrier.
template <int MT, int NB>
__device__ __forceinline__ void bt_stage2_mma(floatX *__restrict__ y, const floatX *zs, const floatX *__restrict__ W1p, const floatX *__restrict__ bias,
                                              const BtGeom &g, int q, int r0, int rows, int warp, int lane) {
    const int lr = lane % 16, lc = (lane / 16) * 8;  // the row this lane addresses in ldmatrix
    // item (f, j)'s k-step kk: its NB packed B tiles, a 16-byte vector per lane each
    auto load_b = [&](uint4 dst[NB], int f, int kk, int j) {
#pragma unroll
        for (int b = 0; b < NB; b++) dst[b] = ld16_ro(W1p + bt_w1p_block(&g, f, kk, bt_s2_ntile(&g, j, b)) + lane * 8);
    };
    BtWalk it;
    bt_walk_begin(&it, g.ntg, warp, BT_WARPS);
    uint4 bf[NB], bn[NB];
    if (it.o < g.pg) load_b(bf, q * g.pg + it.o, 0, it.i);
    while (it.o < g.pg) {
        const int fl = it.o, f = q * g.pg + fl, j = it.i;
        BtWalk nx = it;
        bt_walk_next(&nx);
        float acc[MT][NB][2][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int b = 0; b < NB; b++)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[mt][b][e / 4][e % 4] = 0.0f;
        for (int kk = 0; kk < g.ks2; kk++) {
            const int more = kk + 1 < g.ks2, ahead = more || nx.o < g.pg;
            if (more) load_b(bn, f, kk + 1, j);
            else if (ahead) load_b(bn, q * g.pg + nx.o, 0, nx.i);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                uint32_t a[4];
                mma_ldsm_x4(a, zs + bt_s2_a(&g, mt, fl, kk) + lr * g.zld + lc);
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    mma_bf16_16816(acc[mt][b][0], a, bf[b].x, bf[b].y);  // columns 0..7 of the n-tile
                    mma_bf16_16816(acc[mt][b][1], a, bf[b].z, bf[b].w);  // 8..15
                }
            }
            if (ahead) {
#pragma unroll
                for (int b = 0; b < NB; b++) bf[b] = bn[b];
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int b = 0; b < NB; b++) bt_y_store_mma(y, bias, g, acc[mt][b], r0, mt * 16, rows, f, bt_s2_ntile(&g, j, b), lane);
        it = nx;
    }
}

// MT = tm / 16 m-tiles, NB = n-tiles per stage-2 item, WS = W0 staged: compile-time, so the
// accumulators are registers (and the geometry's mt, tm, nb, ws are constants below); WS = 0 makes
// the loads, in the order, of the kernel measured on the H200. gp is bt_geom_pgw's for tm = 16*MT.
// WS = 1 asks for one block per SM at least: without it ptxas held some instantiations to 128
// registers and spilled. WS = 2: W0 staged and stage 1 alone (s1only; NB unused, 1), two blocks
// per SM (no stage-2 accumulators: it fits 128 registers), so small tiles can keep 16 warps busy.
// MMA = 1 (with WS >= 1: W0 staged): both stages on raw mma.sync (cuda/mma.cuh). Stage 1: both
// operands by ldmatrix from shared memory, each 16x16 item as two m16n8 halves whose accumulators
// each lane rounds and stores straight into the z tile. Stage 2 (bt_stage2_mma): z by ldmatrix,
// W1 packed in B-fragment order (the W1 argument is then btt_w1_packed's), y through a quad
// transpose in registers. No fp32 staging tile, no warp barrier (g_btt_mma; dev/cuda/btt_forward
// v13, v14, not yet measured on a GPU).
template <int MT, int NB, int WS, int MMA = 0>
__global__ void __launch_bounds__(BT_THREADS, WS == 2 ? 2 : WS ? 1 : 0) btt_fused_kernel(floatX *__restrict__ y, floatX *__restrict__ zout,
                                                               const floatX *__restrict__ x, const floatX *__restrict__ W0,
                                                               const floatX *__restrict__ W1, const floatX *__restrict__ bias, int N,
                                                               BtGeom gp, BtSeg sg) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    BtGeom g = gp;
    g.mt = MT; g.tm = 16 * MT; g.nb = NB; g.ws = WS != 0; g.s1only = WS == 2; g.mma = MMA;  // the host's values, as compile-time constants
    extern __shared__ __align__(128) unsigned char bt_smem[];
    floatX *zs = (floatX *)(bt_smem + g.off_z);
    floatX *xs = (floatX *)(bt_smem + g.off_x);
    floatX *wsm = (floatX *)(bt_smem + g.off_w);  // the W0 chunk (g.ws only)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *stg = MMA ? nullptr : (float *)(bt_smem + bt_stg_off(&g, warp));  // (the mma.sync geometry has none)
    const int er = bt_epi_row(lane), ec = bt_epi_col(lane), vw = bt_z1_vec(&g);
    const int ntiles = sg.tiles ? *sg.ntiles : bt_num_tiles(N, g.tm);
    uint4 pre[BT_XVEC];  // this thread's part of the next x chunk (16 bytes each), loaded one chunk ahead
    uint4 prew[BT_WVEC];  // ws: the same of the next W0 chunk
    if ((int)blockIdx.x < ntiles) {
        bt_x_load(pre, x, g, sg, N, blockIdx.x, 0);
        if (WS) bt_w_load(prew, W0, g, sg, N, blockIdx.x, 0, 0);
    }

    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const BtTile tl = bt_tile_at(&g, &sg, N, tile);
        const int r0 = tl.r0, rows = tl.rows;
        const floatX *__restrict__ W0s = W0 + tl.seg * sg.w0_stride, *__restrict__ W1s = W1 + tl.seg * sg.w1_stride;

        for (int q = 0; q < g.npg; q++) {  // groups of pg output blocks (one group: the whole z tile)
            // ---- stage 1: z tile = x tile . W0 (group q's columns), chunk by chunk of g blocks
            for (int ch = 0; ch < g.nchunks; ch++) {
                const int g0 = ch * g.gc, gcount = bt_chunk_gcount(&g, ch);
                __syncthreads();  // the previous chunk's readers of the x chunk are done (not needed at ch = 0)
                bt_x_store(xs, pre, g, ch);
                if (WS) bt_w_store(wsm, prew, g, ch);
                __syncthreads();  // x (and W0) chunk visible to every warp; also orders the previous group's
                                  // (or tile's) stage-2 reads of the z tile before this group's stage-1 writes
                int ntile, nq, nch;  // prefetch: in flight during this chunk's MMAs (the last chunk's: also stage 2)
                if (bt_next_step(&g, ntiles, gridDim.x, tile, q * g.nchunks + ch, &ntile, &nq, &nch)) {
                    bt_x_load(pre, x, g, sg, N, ntile, nch);
                    if (WS) bt_w_load(prew, W0, g, sg, N, ntile, nq, nch);
                }
                BtWalk it;
                for (bt_walk_begin(&it, bt_s1_per(&g), warp, BT_WARPS); it.o < gcount; bt_walk_next(&it)) {
                    int mt, nt;
                    const int gl = it.o;
                    bt_s1_split(&g, it.i, &mt, &nt);
                    if constexpr (MMA) {
                        static_assert(!MMA || WS, "stage 1 on mma.sync reads W0 from its staged chunk");
                        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
                        const int lr = lane % 16, lc = (lane / 16) * 8;  // the row this lane addresses in ldmatrix
                        for (int kk = 0; kk < g.ks1; kk++) {
                            uint32_t a[4], b[4];
                            mma_ldsm_x4(a, xs + bt_s1_a(&g, mt, gl, kk) + lr * g.xld + lc);
                            mma_ldsm_x4_trans(b, wsm + bt_s1_bs(&g, gl, kk, nt) + lr * g.wld + lc);
                            mma_bf16_16816(acc[0], a, b[0], b[1]);  // columns nt*16 + 0..7
                            mma_bf16_16816(acc[1], a, b[2], b[3]);  // nt*16 + 8..15
                        }
                        // lane: rows mt*16 + lane/4 (+8), columns c, c + 1 of each half
                        const int m = mt * 16 + lane / 4;
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const int c = nt * 16 + h * 8 + 2 * (lane % 4);
                            bt_z1_store2(zs, &g, m, g0 + gl, c, acc[h][0], acc[h][1]);
                            bt_z1_store2(zs, &g, m + 8, g0 + gl, c, acc[h][2], acc[h][3]);
                        }
                        continue;
                    }
                    WmmaAcc acc;
                    wmma::fill_fragment(acc, 0.0f);
                    for (int kk = 0; kk < g.ks1; kk++) {
                        WmmaA a;
                        WmmaB b;
                        wmma_load_a_shared(a, xs + bt_s1_a(&g, mt, gl, kk), g.xld);
                        if (WS) wmma_load_b_shared(b, wsm + bt_s1_bs(&g, gl, kk, nt), g.wld);
                        else wmma_load_b_global(b, W0s + bt_s1_b(&g, q, g0 + gl, kk, nt), g.fr);
                        wmma::mma_sync(acc, a, b, acc);
                    }
                    __syncwarp();  // every lane has read the staging tile's previous contents
                    wmma::store_matrix_sync(stg, acc, BT_STG_LD, wmma::mem_row_major);
                    __syncwarp();  // the stored tile is visible to every lane
                    float src[8];
                    bt_stg_read8(src, stg, er, ec);
                    int idx[8];
                    bt_z1_run(&g, mt * 16 + er, g0 + gl, nt * 16 + ec, idx);
                    bt_z1_store(zs, idx, src, vw);  // bf16 z, as the baseline stores it
                }
            }
            __syncthreads();  // z tile complete
            // BTT-MoE by set: each component times its gate, before z is saved (forward) or after
            // (backward); the gate and the save walk the tile alike, so each thread rewrites only
            // vectors it alone reads in between: one barrier, before stage 2 reads the tile
            if (sg.gate && !sg.gate_late) bt_z_gate(zs, g, sg.gate, r0, rows);

            // ---- saved z: the tile's rows < N, already in the saved layout (group q's slice of a row)
            if (zout) {
                BtWalk it;
                for (bt_walk_begin(&it, bt_zcopy_per(&g), threadIdx.x, BT_THREADS); it.o < rows; bt_walk_next(&it))
                    st16(zout + bt_z_global(&g, r0 + it.o, q, it.i * 8), ld16(zs + bt_z_smem(&g, it.o, it.i * 8)));
            }
            if (sg.gate) {
                if (sg.gate_late) bt_z_gate(zs, g, sg.gate, r0, rows);
                __syncthreads();
            }

            if (WS == 2) continue;  // stage 1 alone: y comes from z on cuBLAS
            if constexpr (MMA) {  // W1s: packed in fragment order (btt_w1_packed)
                bt_stage2_mma<MT, NB>(y, zs, W1s, bias, g, q, r0, rows, warp, lane);
                continue;
            }

            // ---- stage 2: Y_f = Z_f . W1[f] (+ bias) for the group's f
            // With ws an item's first B fragments are loaded during the previous item's last k-step
            // (bn), so they are in flight through its epilogue.
            BtWalk it2;
            WmmaB bf[NB], bn[NB];
            bt_walk_begin(&it2, g.ntg, warp, BT_WARPS);
            if (WS && it2.o < g.pg) {
#pragma unroll
                for (int b = 0; b < NB; b++) wmma_load_b_global(bf[b], W1s + bt_s2_b(&g, q * g.pg + it2.o, 0, bt_s2_ntile(&g, it2.i, b)), g.E);
            }
            while (it2.o < g.pg) {
                const int fl = it2.o, f = q * g.pg + fl, j = it2.i;
                BtWalk nx = it2;  // the warp's next item
                bt_walk_next(&nx);
                const int pipe_next = WS && nx.o < g.pg;
                WmmaAcc acc[MT][NB];
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int b = 0; b < NB; b++) wmma::fill_fragment(acc[mt][b], 0.0f);
                if (!WS) {
#pragma unroll
                    for (int b = 0; b < NB; b++) wmma_load_b_global(bf[b], W1s + bt_s2_b(&g, f, 0, bt_s2_ntile(&g, j, b)), g.E);
                }
                for (int kk = 0; kk < g.ks2; kk++) {
                    const int more = kk + 1 < g.ks2;
                    if (more) {  // the next k-step's B fragments are in flight while this one computes
#pragma unroll
                        for (int b = 0; b < NB; b++) wmma_load_b_global(bn[b], W1s + bt_s2_b(&g, f, kk + 1, bt_s2_ntile(&g, j, b)), g.E);
                    } else if (pipe_next) {  // ws: the next item's first k-step
#pragma unroll
                        for (int b = 0; b < NB; b++)
                            wmma_load_b_global(bn[b], W1s + bt_s2_b(&g, q * g.pg + nx.o, 0, bt_s2_ntile(&g, nx.i, b)), g.E);
                    }
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        WmmaA a;
                        wmma_load_a_shared(a, zs + bt_s2_a(&g, mt, fl, kk), g.zld);
#pragma unroll
                        for (int b = 0; b < NB; b++) wmma::mma_sync(acc[mt][b], a, bf[b], acc[mt][b]);
                    }
                    if (more) {
#pragma unroll
                        for (int b = 0; b < NB; b++) bf[b] = bn[b];
                    }
                }
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                    for (int b = 0; b < NB; b++) {
                        const int n = bt_s2_ntile(&g, j, b), row = r0 + mt * 16 + er;
                        __syncwarp();  // every lane has read the staging tile's previous contents
                        wmma::store_matrix_sync(stg, acc[mt][b], BT_STG_LD, wmma::mem_row_major);
                        __syncwarp();
                        if (mt * 16 + er < rows) {  // tail: rows past the tile's are computed (on zeros) but not stored
                            float v[8];
                            bt_stg_read8(v, stg, er, ec);
                            if (bias) {
                                x128 bv = load128(bias + bt_bias(&g, f, n, ec));
#pragma unroll
                                for (int t = 0; t < 8; t++) v[t] += (float)bv[t];
                            }
                            uint4 o = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]),
                                                 pack_bf16x2(v[6], v[7]));
                            __stwb(reinterpret_cast<uint4 *>(y + bt_y_global(&g, row, f, n, ec)), o);  // one 16-byte store
                        }
                    }
                }
                if (pipe_next) {
#pragma unroll
                    for (int b = 0; b < NB; b++) bf[b] = bn[b];
                }
                it2 = nx;
            }
        }
    }
#endif
}

// ----------------------------------------------------------------------------------------------
// host side

// Opt-in shared memory per block of the current device (queried once: one device per process).
static inline size_t btt_fused_smem_limit(void) {
    static int limit = -1;
    if (limit < 0) {
        int dev = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    }
    return (size_t)limit;
}

// 1: the geometry rule before groups (the largest tile rows whose whole z tile fits; shapes whose z
// tile of 16 rows does not fit are not supported), for comparison in dev/cuda/btt_forward.
static int g_btt_whole_z = 0;
// 1: stage W0 in shared memory with each x chunk and prefetch stage 2's W1 fragments across items
// (btt_tiles.h, ws; the trainer's -sk 2, dev/cuda/btt_forward v7+). Not yet measured on a GPU,
// so -sk 1 keeps the kernel as measured.
static int g_btt_wstage = 0;
// 1: where W0 is staged (g_btt_wstage, or stage 1 alone), the kernel on raw mma.sync (its MMA:
// both stages, stage 2 on W1 packed by btt_w1_packed; the trainer's -sk 5, dev/cuda/btt_forward
// v13, v14). Not yet run on a GPU: -at 1 times it against the others and checks its results
// against the plans'. Stage 1 alone on mma.sync (v14; no -sk runs it) is compiled only where
// BT_MMA_STAGE1_CANDIDATE is defined before this header (the dev/cuda programs that time it, the
// simulator's kernel tests, tests/fused_ptx.cu, tests/test_ptxas.sh): three kernels the trainer
// would never run.
static int g_btt_mma = 0;
// 1 when the kernel for g runs on mma.sync (and, with stage 2, reads W1 packed): the geometry says
// so, since it lays out shared memory without the staging tile the wmma kernel needs
static inline int btt_fused_mma(const BtGeom *g) { return g->mma; }
// Launches of the whole kernel on mma.sync (the tests check that -sk 5 ran it, not a fallback)
static long g_btt_mma_launches = 0;

static int btt_fused_blocks_per_sm(const BtGeom *g);

// W1 in stage 2's B-fragment order (btt_tiles.h, bt_w1p_src): one thread per 16 bytes packed.
__global__ void btt_w1_pack_kernel(floatX *__restrict__ dst, const floatX *__restrict__ src, int gr, int E, size_t vecs) {
    for (size_t v = blockIdx.x * (size_t)blockDim.x + threadIdx.x; v < vecs; v += (size_t)gridDim.x * blockDim.x) {
        alignas(16) floatX e[8];
#pragma unroll
        for (int j = 0; j < 8; j++) e[j] = src[bt_w1p_src(gr, E, v * 8 + j)];
        st16(dst + v * 8, *reinterpret_cast<const uint4 *>(e));
    }
}

// The mma.sync kernel's stage 2 (g_btt_mma with W0 staged) reads W1 packed: packed here, before
// each launch, into a buffer kept for the process and grown as needed (one device per process; on
// the launch's stream, so a launch that follows reads its own). nseg cores of shape s. Packing
// once per optimizer step would save one read and write of W1 per launch (W1 is 0.1-2% of the
// bytes a layer moves at the trainer's rows); -at 1's timings include it.
static const floatX *btt_w1_packed(const floatX *W1, const BTTShape *s, int nseg) {
    static floatX *buf = NULL;
    static size_t cap = 0;
    const size_t n = btt_w1_size(s) * (size_t)nseg;
    if (n > cap) {
        if (buf) cudaCheck(cudaFree(buf));
        buf = cudaMallocNamed(floatX, n, "scratch: BTT W1 packed for the mma.sync kernel (-sk 5)");
        cap = n;
    }
    const int gr = s->gamma * s->rank, vecs_per_block = 256;
    const size_t vecs = n / 8;
    const int blocks = (int)((vecs + vecs_per_block - 1) / vecs_per_block);
    btt_w1_pack_kernel<<<blocks < 4096 ? blocks : 4096, vecs_per_block>>>(buf, W1, gr, s->eps, vecs);
    cudaCheckLaunch();
    return buf;
}
// The W1 a launch of the kernel for g reads: W1 itself, or on mma.sync (counted) its nseg cores packed.
static const floatX *btt_fused_w1(const BtGeom *g, const floatX *W1, const BTTShape *s, int nseg) {
    if (!btt_fused_mma(g)) return W1;
    g_btt_mma_launches++;
    return btt_w1_packed(W1, s, nseg);
}

// The kernel's geometry for this shape within smem_limit bytes of shared memory per block, W0
// staged when ws (and then on mma.sync when g_btt_mma), for stage 1 alone when s1only: for each
// tile rows the largest group of output
// blocks that fits (btt_tiles.h, bt_choose_per_tm), then of those the most blocks resident per SM
// on this GPU among the ones the traffic model costs within 2.5x of the least (bt_pick_resident).
// tm_only 16/32/64 fixes the rows, and then (as with g_btt_whole_z) the model alone picks
// (bt_choose). Returns 0 when it cannot run it (then use btt_forward_gpu).
static inline int btt_fused_geom_ws(BtGeom *g, const BTTShape *s, size_t smem_limit, int tm_only, int ws, int s1only = 0) {
    if (!btt_shape_ok(s)) return 0;
    const int mma = g_btt_mma && ws;
    if (tm_only || g_btt_whole_z) return bt_choose(g, s->alpha, s->gamma, s->phi, s->eps, s->rank, smem_limit, tm_only, g_btt_whole_z, ws, mma);
    BtGeom c[3];
    int blocks[3];
    const int n = bt_choose_per_tm(c, s->alpha, s->gamma, s->phi, s->eps, s->rank, smem_limit, 0, 0, ws, mma);
    if (!n) return 0;
    for (int i = 0; i < n; i++) {
        c[i].s1only = s1only;  // its kernel (registers, so residency) and its traffic (no W1 when alone)
        blocks[i] = btt_fused_blocks_per_sm(&c[i]);
    }
    const int i = bt_pick_resident(c, blocks, n);
    if (i < 0) return bt_choose(g, s->alpha, s->gamma, s->phi, s->eps, s->rank, smem_limit, 0, 0, ws, mma);  // none resident: no grid, the plans run
    *g = c[i];
    return 1;
}
// The same as g_btt_wstage says.
static inline int btt_fused_geom(BtGeom *g, const BTTShape *s, size_t smem_limit, int tm_only) {
    return btt_fused_geom_ws(g, s, smem_limit, tm_only, g_btt_wstage);
}

// The tile rows the fused kernel would use for this shape (16, 32 or 64), or 0 when it cannot run it.
static inline int btt_fused_supported(const BTTShape *s, size_t smem_limit) {
    BtGeom g;
    return btt_fused_geom(&g, s, smem_limit, 0) ? g.tm : 0;
}

typedef void (*BtFusedKernel)(floatX *, floatX *, const floatX *, const floatX *, const floatX *, const floatX *, int, BtGeom, BtSeg);

// The instantiation for a geometry (mt in {1, 2, 4}, nb in {1, 2, 3}, ws, mma), or NULL.
template <int WS, int MMA>
static BtFusedKernel btt_fused_kernel_ws(const BtGeom *g) {
    switch (g->mt * 4 + g->nb) {
        case 1 * 4 + 1: return btt_fused_kernel<1, 1, WS, MMA>;
        case 1 * 4 + 2: return btt_fused_kernel<1, 2, WS, MMA>;
        case 1 * 4 + 3: return btt_fused_kernel<1, 3, WS, MMA>;
        case 2 * 4 + 1: return btt_fused_kernel<2, 1, WS, MMA>;
        case 2 * 4 + 2: return btt_fused_kernel<2, 2, WS, MMA>;
        case 2 * 4 + 3: return btt_fused_kernel<2, 3, WS, MMA>;
        case 4 * 4 + 1: return btt_fused_kernel<4, 1, WS, MMA>;
        case 4 * 4 + 2: return btt_fused_kernel<4, 2, WS, MMA>;
        case 4 * 4 + 3: return btt_fused_kernel<4, 3, WS, MMA>;
    }
    return NULL;
}
template <int MMA>
static BtFusedKernel btt_fused_stage1_kernel(const BtGeom *g) {
    return g->mt == 1 ? btt_fused_kernel<1, 1, 2, MMA> : g->mt == 2 ? btt_fused_kernel<2, 1, 2, MMA> : g->mt == 4 ? btt_fused_kernel<4, 1, 2, MMA> : NULL;
}
static BtFusedKernel btt_fused_kernel_for(const BtGeom *g) {
    if (g->s1only && !g->ws) return NULL;
    if (btt_fused_mma(g)) {
        if (!g->s1only) return btt_fused_kernel_ws<1, 1>(g);
#ifdef BT_MMA_STAGE1_CANDIDATE
        return btt_fused_stage1_kernel<1>(g);
#else
        fatal("internal: stage 1 alone on mma.sync where structured/btt_fused.cuh was included without BT_MMA_STAGE1_CANDIDATE");
#endif
    }
    if (g->s1only) return btt_fused_stage1_kernel<0>(g);
    return g->ws ? btt_fused_kernel_ws<1, 0>(g) : btt_fused_kernel_ws<0, 0>(g);
}

// Blocks of the kernel for g resident per SM, after opting it in to g's dynamic shared memory
// (cached per instantiation for up to BT_OCC_SIZES smem sizes each, since every geometry choice
// asks for each tile-row count and a model's layers and their transposed BTTs share
// instantiations at other sizes; one device per process); 0 when none fits.
#define BT_OCC_SIZES 8
static int btt_fused_blocks_per_sm(const BtGeom *g) {
    // per (mt 1, 2, 4) x (nb 1, 2, 3) x (ws 0, 1, stage 1 alone) x (mma 0, 1)
    static int attr_bytes[54], occ_bytes[54][BT_OCC_SIZES], occ[54][BT_OCC_SIZES], occ_next[54];
    BtFusedKernel kern = btt_fused_kernel_for(g);
    if (!kern) return 0;
    // 0..53 (mt * 4 + nb reaches 19); stage 1 alone is one kernel whatever nb, so one slot: setting
    // its shared-memory limit from two slots could lower it under the other's
    const int k = (((g->mt == 4 ? 2 : g->mt - 1) * 3 + (g->s1only ? 0 : g->nb - 1)) * 3 + (g->s1only ? 2 : g->ws)) * 2 +
                  btt_fused_mma(g);  // (stage 1 alone without ws has no kernel: returned above)
    if (g->smem_bytes > attr_bytes[k]) {
        cudaCheck(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, g->smem_bytes));
        attr_bytes[k] = g->smem_bytes;
    }
    for (int i = 0; i < BT_OCC_SIZES; i++)
        if (occ_bytes[k][i] == g->smem_bytes) return occ[k][i];
    int per_sm = 0;
    cudaCheck(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, BT_THREADS, (size_t)g->smem_bytes));
    const int i = occ_next[k]++ % BT_OCC_SIZES;  // the oldest size gives way
    occ_bytes[k][i] = g->smem_bytes;
    occ[k][i] = per_sm;
    return per_sm;
}

static int btt_fused_sm_count(void) {
    static int sms = 0;
    if (!sms) {
        int dev = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    }
    return sms;
}

// The grid for up to max_tiles tiles of the kernel for g: the blocks resident at once, at most
// max_tiles (blocks loop over tiles); 0 when no block fits on an SM.
static int btt_fused_grid(const BtGeom *g, int max_tiles) {
    const int per_sm = btt_fused_blocks_per_sm(g), resident = per_sm * btt_fused_sm_count();
    if (per_sm <= 0) return 0;
    return max_tiles < resident ? max_tiles : resident;
}

// y (N, d_out) = BTT(x) + bias, overwritten; z_or_null: the saved z (N, phi, gamma, rho) for the
// backward, as btt_forward_gpu writes it. tm: 16, 32 or 64 rows per tile (0: the default geometry),
// in the groups bt_choose picks for those rows. Returns 1 when launched (or N <= 0), 0 when this
// shape, tm, device or pointer alignment is not supported — nothing was done then: call
// btt_forward_gpu.
static int btt_forward_fused_tm(floatX *y, floatX *z_or_null, const floatX *x, const floatX *W0, const floatX *W1,
                                const floatX *bias_or_null, int N, const BTTShape *s, int tm) {
    BtGeom g;
    if (!btt_fused_geom(&g, s, btt_fused_smem_limit(), tm)) return 0;
    if (((uintptr_t)y | (uintptr_t)z_or_null | (uintptr_t)x | (uintptr_t)bias_or_null) % 16 || ((uintptr_t)W0 | (uintptr_t)W1) % 32)
        return 0;
    if (N <= 0) return 1;
    const int grid = btt_fused_grid(&g, bt_num_tiles(N, g.tm));
    if (!grid) return 0;
    BtSeg plain;
    memset(&plain, 0, sizeof(plain));
    W1 = btt_fused_w1(&g, W1, s, 1);
    btt_fused_kernel_for(&g)<<<grid, BT_THREADS, g.smem_bytes>>>(y, z_or_null, x, W0, W1, bias_or_null, N, g, plain);
    cudaCheckLaunch();
    return 1;
}

// Stage 1 alone (btt_tiles.h, s1only), with W0 staged: z (N, zrow) = the saved z of the BTT on x
// (row stride x_ld; 0: d_in), no y. tm: 16, 32 or 64 rows per tile (0: the default geometry).
// Returns 1 when launched (or N <= 0), 0 when the shape, tm, device, stride or alignment is not
// supported (nothing done).
static int btt_stage1_fused(floatX *z, const floatX *x, int x_ld, const floatX *W0, int N, const BTTShape *s, int tm = 0) {
    BtGeom g;
    const int ok = btt_fused_geom_ws(&g, s, btt_fused_smem_limit(), tm, 1, 1);
    if (!ok || (x_ld && (x_ld < s->d_in || x_ld % 8))) return 0;
    if (((uintptr_t)z | (uintptr_t)x) % 16 || (uintptr_t)W0 % 32 || !z) return 0;
    if (N <= 0) return 1;
    g.xs = x_ld ? x_ld : s->d_in;
    g.s1only = 1;
    const int grid = btt_fused_grid(&g, bt_num_tiles(N, g.tm));
    if (!grid) return 0;
    BtSeg plain;
    memset(&plain, 0, sizeof(plain));
    btt_fused_kernel_for(&g)<<<grid, BT_THREADS, g.smem_bytes>>>(NULL, z, x, W0, NULL, NULL, N, g, plain);
    cudaCheckLaunch();
    return 1;
}

// Block s: segment s's entries of the tile table (btt_tiles.h, segmented launches) from the
// segments' row counts; the last block also writes the number of tiles. Fixed order, no atomics.
__global__ void bt_seg_fill_kernel(int *table, int *ntiles, const int *counts, const int *offsets, int S, int tm) {
    const int s = blockIdx.x;
    int base = 0;
    for (int i = 0; i < s; i++) base += bt_ceil_div(counts[i], tm);
    const int mine = bt_ceil_div(counts[s], tm);
    for (int j = threadIdx.x; j < mine; j += blockDim.x) bt_seg_tile_write(table, base, j, s, offsets[s], counts[s], tm);
    if (s == S - 1 && threadIdx.x == 0) *ntiles = base + mine;
}

// Ints of device scratch a segmented launch needs for its tile table and count.
static inline size_t btt_fused_seg_scratch_ints(int rows_total, int S, int tm) {
    return (size_t)bt_seg_max_tiles(rows_total, S, tm) * BT_TILE_INTS + 1;
}

// S BTTs of shape s in one launch, no host round trip (btt_tiles.h, segmented launches): segment
// e is grouped rows [offsets[e], offsets[e] + counts[e]) (device arrays, rows_total = their sum,
// known on the host as an upper bound of the grid), cores W0 + e*|W0|, W1 + e*|W1|, x rows
// order[w] / K. y (rows_total, d_out) and z (rows_total, zrow, may be NULL) in grouped order, no
// bias. gate (may be NULL; rho dividing 8): grouped row w's rank component s of z times
// gate[w·rho + s] between the stages (BtSeg.gate: BTT-MoE by set), the saved z gated unless
// gate_late (then saved as stage 1 left it). scratch: btt_fused_seg_scratch_ints(rows_total, S,
// tm) ints. Returns 0 (nothing launched) when the shape, device or alignment is not supported: use
// the per-segment path then.
static int btt_forward_fused_seg(floatX *y, floatX *z_or_null, const floatX *x, const int *order, int K, const floatX *W0, const floatX *W1,
                                 const int *counts, const int *offsets, int S, int rows_total, const BTTShape *s, int *scratch,
                                 const float *gate = NULL, int gate_late = 0) {
    BtGeom g;
    if (gate && 8 % s->rank) return 0;
    if (!btt_fused_geom(&g, s, btt_fused_smem_limit(), 0)) return 0;
    const int tm = g.tm;
    const size_t w0s = btt_w0_size(s), w1s = btt_w1_size(s);
    if (((uintptr_t)y | (uintptr_t)z_or_null | (uintptr_t)x) % 16 || ((uintptr_t)W0 | (uintptr_t)W1) % 32 || (w0s | w1s) % 16) return 0;
    if (rows_total <= 0 || S <= 0) return 1;
    const int max_tiles = bt_seg_max_tiles(rows_total, S, tm), grid = btt_fused_grid(&g, max_tiles);
    if (!grid) return 0;
    int *table = scratch, *ntiles = scratch + (size_t)max_tiles * BT_TILE_INTS;
    bt_seg_fill_kernel<<<S, 128>>>(table, ntiles, counts, offsets, S, tm);
    cudaCheckLaunch();
    BtSeg sg = {table, ntiles, order, K, w0s, w1s, gate, gate_late};
    W1 = btt_fused_w1(&g, W1, s, S);
    btt_fused_kernel_for(&g)<<<grid, BT_THREADS, g.smem_bytes>>>(y, z_or_null, x, W0, W1, NULL, rows_total, g, sg);
    cudaCheckLaunch();
    return 1;
}

// The same with the default geometry for this device.
static int btt_forward_fused(floatX *y, floatX *z_or_null, const floatX *x, const floatX *W0, const floatX *W1, const floatX *bias_or_null,
                             int N, const BTTShape *s) {
    return btt_forward_fused_tm(y, z_or_null, x, W0, W1, bias_or_null, N, s, 0);
}
