// structured/moe_group.cuh: BTT-MoE's (token, k) pairs grouped by expert on the GPU, a
// deterministic counting sort spread over chunks of the pairs, and the tiles the experts fill.
//
//   moe_group_chunks(NK, steps)           chunks of 32·steps pairs
//   moe_group_scratch_ints(NK, E, steps)  ints of scratch moe_group_gpu takes
//   moe_group_gpu(order, pos, counts, offsets, tile_expert, scratch, sel, NK, E, T, steps)
//
// What it writes (the CPU's counting sort, moe.h, with padding): expert e's pairs in ascending
// pair order at order[offsets[e] ...], then -1 up to a whole tile of T rows; pos[p] the grouped row
// of pair p; counts[e]; offsets[E] the rows of the tiles in use; tile_expert[i] the expert of tile i.
//
// Why chunks: the first version gave each expert one block that walked all NK pairs in order,
// 256 at a time with two barriers a step: at GPT-2's 32K tokens, top 2, 256 dependent steps on 8
// of the GPU's SMs, while everything else of the layer waits. Here three launches:
//   1. count    a warp per chunk (32·steps pairs): how many of its pairs chose each expert
//   2. scan     one block: per expert, the exclusive prefix of its chunk counts (where each chunk's
//               pairs of that expert start within the expert), its total, the padded offsets, the
//               tile table, the padding rows
//   3. scatter  a warp per chunk again: a pair's grouped row is its expert's offset + its chunk's
//               prefix + the pairs of that expert before it in the chunk (__match_any_sync finds
//               those of each step of 32; a running count per expert in shared memory the rest)
// No global atomics and nothing that depends on scheduling: the same order every run, the CPU's.
// The chunk counts are stored expert-major (scratch[e·C + c]) so that the scan reads them coalesced.
#pragma once
#include "../cuda/common.cuh"
#include "spec.h"

#define MOE_GROUP_MAX_STEPS 32  // steps of 32 pairs per chunk: 1024 pairs, each lane's 32 selections in registers
#define MOE_GROUP_SCAN_THREADS 1024
static_assert(STRUCT_MAX_EXPERTS <= MOE_GROUP_SCAN_THREADS, "moe_group_scan_kernel takes one thread per expert");

static inline int moe_group_chunks(int NK, int steps) { return NK > 0 ? (NK + 32 * steps - 1) / (32 * steps) : 1; }
static inline size_t moe_group_scratch_ints(int NK, int E, int steps = MOE_GROUP_MAX_STEPS) {
    return (size_t)E * moe_group_chunks(NK, steps);
}

// Lane's selection of each step of chunk c (-1 past NK, or for a value that is no expert).
static __device__ __forceinline__ void moe_group_load(int (&v)[MOE_GROUP_MAX_STEPS], const int *sel, int c, int NK, int E, int steps) {
    const int p0 = c * steps * 32 + (int)threadIdx.x;
#pragma unroll
    for (int s = 0; s < MOE_GROUP_MAX_STEPS; s++) {
        const int p = p0 + s * 32;
        const int e = s < steps && p < NK ? sel[p] : -1;
        v[s] = e >= 0 && e < E ? e : -1;
    }
}

// Block c (one warp): cnt[e·C + c] = the pairs of chunk c that chose expert e.
__global__ void __launch_bounds__(32) moe_group_count_kernel(int *cnt, const int *sel, int NK, int E, int C, int steps) {
    extern __shared__ int sh_count[];  // E
    const int c = blockIdx.x, lane = threadIdx.x;
    for (int e = lane; e < E; e += 32) sh_count[e] = 0;
    int v[MOE_GROUP_MAX_STEPS];
    moe_group_load(v, sel, c, NK, E, steps);
    __syncwarp();
#pragma unroll
    for (int s = 0; s < MOE_GROUP_MAX_STEPS; s++) {
        if (s == steps) break;
        const unsigned peers = __match_any_sync(0xffffffffu, v[s]);
        if (v[s] >= 0 && lane == __ffs(peers) - 1) sh_count[v[s]] += __popc(peers);  // one lane per expert of the step
        __syncwarp();
    }
    for (int e = lane; e < E; e += 32) cnt[(size_t)e * C + c] = sh_count[e];
}

// Inclusive sum over the warp's lanes.
static __device__ __forceinline__ int moe_warp_scan(int v) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
        const int u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    return v;
}

// One block of MOE_GROUP_SCAN_THREADS: cnt[e·C + c] becomes the pairs of expert e in chunks
// before c; counts, offsets (each expert's rows padded to whole tiles of T), tile_expert, and -1
// in every padding row of order.
__global__ void __launch_bounds__(MOE_GROUP_SCAN_THREADS) moe_group_scan_kernel(int *cnt, int *counts, int *offsets, int *tile_expert,
                                                                                int *order, int C, int E, int T) {
    __shared__ int sh_n[MOE_GROUP_SCAN_THREADS], sh_base[MOE_GROUP_SCAN_THREADS], sh_warp[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int e = warp; e < E; e += nwarps) {  // a warp per expert, 32 chunks a step
        int run = 0;
        for (int c0 = 0; c0 < C; c0 += 32) {
            const int c = c0 + lane, v = c < C ? cnt[(size_t)e * C + c] : 0, incl = moe_warp_scan(v);
            if (c < C) cnt[(size_t)e * C + c] = run + incl - v;
            run += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0) sh_n[e] = run;
    }
    __syncthreads();
    // offsets: the exclusive sum of the padded counts, a thread per expert
    const int e = threadIdx.x, n = e < E ? sh_n[e] : 0, padded = (n + T - 1) / T * T, incl = moe_warp_scan(padded);
    if (lane == 31) sh_warp[warp] = incl;
    __syncthreads();
    if (warp == 0) sh_warp[lane] = moe_warp_scan(lane < nwarps ? sh_warp[lane] : 0);
    __syncthreads();
    const int base = incl - padded + (warp ? sh_warp[warp - 1] : 0);
    if (e < E) {
        sh_base[e] = base;
        counts[e] = n;
        offsets[e] = base;
        if (e == E - 1) offsets[E] = base + padded;
    }
    __syncthreads();
    for (int x = warp; x < E; x += nwarps) {  // a warp per expert: its tiles and padding rows
        const int b = sh_base[x], m = sh_n[x], pd = (m + T - 1) / T * T;
        for (int j = m + lane; j < pd; j += 32) order[b + j] = -1;
        for (int j = lane; j < pd / T; j += 32) tile_expert[b / T + j] = x;
    }
}

// Block c (one warp): each pair p of chunk c at grouped row offsets[e] + cnt[e·C + c] + (the
// pairs of e before p in the chunk): order[row] = p, pos[p] = row.
__global__ void __launch_bounds__(32) moe_group_scatter_kernel(int *order, int *pos, const int *cnt, const int *offsets, const int *sel,
                                                               int NK, int E, int C, int steps) {
    extern __shared__ int sh_next[];  // E: the next grouped row of each expert
    const int c = blockIdx.x, lane = threadIdx.x;
    for (int e = lane; e < E; e += 32) sh_next[e] = offsets[e] + cnt[(size_t)e * C + c];
    int v[MOE_GROUP_MAX_STEPS];
    moe_group_load(v, sel, c, NK, E, steps);
    __syncwarp();
    const int p0 = c * steps * 32 + lane;
#pragma unroll
    for (int s = 0; s < MOE_GROUP_MAX_STEPS; s++) {
        if (s == steps) break;
        const int e = v[s];
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (e >= 0) {
            const int row = sh_next[e] + __popc(peers & ((1u << lane) - 1u)), p = p0 + s * 32;
            order[row] = p;
            pos[p] = row;
        }
        __syncwarp();
        if (e >= 0 && lane == __ffs(peers) - 1) sh_next[e] += __popc(peers);
        __syncwarp();
    }
}

// Groups the NK pairs' selections sel (experts 0..E-1) by expert in tiles of T rows, as above.
// scratch: moe_group_scratch_ints(NK, E, steps) ints. steps: pairs per chunk / 32, at most
// MOE_GROUP_MAX_STEPS (the trainer's; fewer make more chunks, which the tests use to cross them).
static void moe_group_gpu(int *order, int *pos, int *counts, int *offsets, int *tile_expert, int *scratch, const int *sel, int NK, int E,
                          int T, int steps = MOE_GROUP_MAX_STEPS) {
    if (steps < 1 || steps > MOE_GROUP_MAX_STEPS || E < 1 || E > STRUCT_MAX_EXPERTS || T < 1)
        fatal("internal: moe_group_gpu(steps %d, experts %d, tile rows %d)", steps, E, T);
    const int C = moe_group_chunks(NK, steps);
    const size_t sh = (size_t)E * sizeof(int);
    moe_group_count_kernel<<<C, 32, sh>>>(scratch, sel, NK, E, C, steps);
    cudaCheckLaunch();
    moe_group_scan_kernel<<<1, MOE_GROUP_SCAN_THREADS>>>(scratch, counts, offsets, tile_expert, order, C, E, T);
    cudaCheckLaunch();
    moe_group_scatter_kernel<<<C, 32, sh>>>(order, pos, scratch, offsets, sel, NK, E, C, steps);
    cudaCheckLaunch();
}
