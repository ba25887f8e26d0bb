// structured/moe_sets.cuh: BTT-MoE's tokens grouped by their SET of experts (-mg 1), the pieces
// moe_gpu.cuh's set path runs on the cuBLAS plans, and its forward on the fused kernel.
//
// Why: grouped by expert, every token is k rows of the grouped buffers: x gathered k times, each
// expert's y written, read back and added by the combine (k + 1 output rows a token), dy gathered
// k times and dx combined from k rows. But y = Σ_j g_j BTT_{c_j}(x) over the token's experts
// c_0 < ... < c_{k-1} is a rank-k BTT whose rank components are those experts (moe.h: the experts
// ARE rank components) with each component of z scaled by its gate. Tokens with the same set of
// experts share that rank-k BTT, so grouped by set, a token is ONE row: x gathered once, y written
// once in grouped order and copied back by the combine, the two experts' stage 2 summed inside one
// GEMM (K = gamma·k) in fp32. 8 experts, top 2: 28 sets. The costs: 28 sets padded to whole tiles
// instead of 8 experts (at 32K tokens 21% padding rows against 5%), and rank-k weight-gradient
// partials per tile. Modelled on the H200's rates (structured/exec_model.h, st_moe_seconds) at 32K
// tokens, 768 -> 3072: 1.86 ms against 2.16 by expert (1.93x BTT rank 2's time against 2.24x);
// 0.79-0.90 of the expert path's time at 32K-64K tokens for widths 768-4096, 0.88-1.00 at 16K;
// not yet measured on a GPU.
//
// The gate: y = Σ_j g_j z_j W1_j, so the forward's permute of z (gpu_plan.h) multiplies each
// component by its token's gate on the way (PlanEpi.scale): the saved z is the gated one, which
// is what dW1 = (g·z)ᵀ dY reads; d g_j = <z_j, dZu_j> = <(g·z)_j, dZu_j> / g_j (0 where g_j = 0:
// the gate softmax's gradient multiplies it by g_j).
//
// On the fused kernels (-mg 1 with -sk 1, 2, 3 or 5): the forward is every set's rank-k BTT in one
// segmented launch of btt_fused.cuh's kernel (a set a segment, x rows read through the grouping:
// no gathered copy), each z tile's components scaled by their rows' gates in shared memory between
// the stages (BtSeg.gate, from the same per-row gates the permute reads, rounded as it rounds), so
// x is read once, z written once (the saved, gated z) and y once a token. The backward's dx and
// dZu likewise, the kernel on dy with the sets' transposed cores: dZu saved as stage 1 leaves it
// (dgate = <g·z, dZu> / g reads it), then gated in shared memory (BtSeg.gate_late) so that stage 2
// gives dx = Σ_j g_j dZu_j W0_jᵀ, a row a token; then the gate step (dgate, dZ = g·dZu in place)
// and the sets' dW0 = Xᵀ dZ and dW1 = (g·Z)ᵀ dY by seg_wgrad, x and dy read through the grouping,
// each expert's gradient the sum over its sets (one rounding per set's bf16 gradient, then one of
// the fp32 sum). No gathered copy of x or dy, no T1, no per-tile partials.
//
// Sets are numbered by the combinatorial number system: the set c_0 < c_1 < ... < c_{k-1} is
// Σ_j C(c_j, j + 1), 0 .. C(E, k) - 1. Per token the set path keeps sid (its set) and kof (N, k):
// component j of its set is its kof[j]-th selection (gate[t·k + kof[j]]). The rank-k cores of set
// q are copied out of the rank components: W0q[g, a, f·k + j] = W0[g, a, f·E + c_j] and
// W1q[f, g·k + j, e] = W1[f, g·E + c_j, e]; their gradients' per-tile partials go back the same
// way, summed for each expert over the sets that contain it in set order, then over each set's
// tiles in order (deterministic; moe_gpu.cuh's moe_partials_scatter_kernel, the expert path's too).
//
// Supported: k in {2, 4, 8} (the gate step gives each lane of a warp one component: k divides
// 32), at most MOE_MAX_SETS sets (the grouping's limit), d_in and d_out multiples of 8
// (gpu_plan.h, moe_set_count). A set's rows are padded to whole tiles like an expert's: the set
// path is meant for many tokens a set (the 124M models' 16K-64K rows); -mg 2 leaves the others.
#pragma once
#include "../cuda/common.cuh"
#include "gpu_plan.h"
#include "moe.h"
#include "spec.h"

static_assert(MOE_MAX_SETS <= STRUCT_MAX_EXPERTS, "moe_group_gpu groups up to STRUCT_MAX_EXPERTS groups");

// A token's set from its K selections sel: *sid its number (moe_set_rank of the selections
// sorted ascending), kof[j] = which selection is the j-th smallest. A selection's place in the
// sorted set is the count of selections below it (distinct experts): no arrays, no local memory.
// moe_gpu.cuh's routing kernel calls it right after the top-k.
static __device__ __forceinline__ void moe_set_of_row(int *sid, int *kof, const int *sel, int K) {
    int rank = 0;
    for (int j = 0; j < K; j++) {
        const int v = sel[j];
        int below = 0;
        for (int i = 0; i < K; i++) below += sel[i] < v;
        kof[below] = j;
        rank += (int)moe_binom(v, below + 1);  // moe_set_rank's term of the set's below-th expert
    }
    *sid = rank;
}

// An expert's selections from the sets' counts (the aux loss's statistic on the set path): the sum
// over the `per` sets that contain expert e (members, moe_set_tables).
static __device__ __forceinline__ int moe_set_expert_count(const int *set_counts, const int *members, int e, int per, int K) {
    int n = 0;
    for (int m = 0; m < per; m++) n += set_counts[members[e * per + m] / K];
    return n;
}

// Each grouped row's gates in component order (rg: rows x K): row w's token t = order[w] takes
// rg[w·K + j] = gate[t·K + kof[t·K + j]], a padding row zeros; rows in use only. The forward's
// permute of z multiplies each component by its gate with these (PlanEpi.scale).
__global__ void moe_set_row_gates_kernel(float *rg, const float *gate, const int *kof, const int *order, const int *rows_in_use, int rows,
                                         int K) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * K) return;
    const int w = (int)(i / K), j = (int)(i % K);
    if (w >= *rows_in_use) return;
    const int t = order[w];
    rg[i] = t < 0 ? 0.0f : gate[(size_t)t * K + kof[(size_t)t * K + j]];
}
