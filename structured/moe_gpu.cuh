// structured/moe_gpu.cuh: the BTT-MoE layer on the GPU, forward and backward (cost scales with
// k/E: only the selected experts run):
//   router logits (fp32) = x Rᵀ; one thread per token picks the top-k, the gate softmax and the
//   logsumexp (moe.h's st_moe_route_row); moe_group.cuh's counting sort over chunks of the
//   (token, k) pairs writes each expert's pairs, ascending, into `order` (deterministic, and the
//   same grouping as the CPU's), each expert's rows padded with zero rows to whole tiles
//   (gpu_plan.h, tiled plans); the experts' rank-1 cores are copied out of the strided rank
//   components (moe.h's index maps); with -sk 1 every expert runs in ONE segmented launch of
//   btt_fused.cuh's kernel, which reads the counts on the device and gathers x rows on the fly;
//   else the inputs are gathered into the tiles and every tile of every expert runs at once, each
//   plan op one pointer-array batched GEMM (pointers written on the device from the tile table)
//   or one permute; each token adds its k gated expert outputs in k order. The backward likewise:
//   with -sk 1 every expert's dx and dZ in one segmented launch (dy rows read through the
//   grouping) and its dW0 and dW1 in one seg_wgrad launch each (seg_wgrad.cuh); on the plans,
//   per-tile fp32 weight-gradient partials summed per expert in tile order. The aux loss stays on
//   the device: its statistics (in doubles, so that data-parallel ranks can sum them with one
//   NCCL all-reduce), f̂ and the loss itself (moe_aux_stats_gpu, moe_aux_finish_gpu); the trainer
//   reads every layer's loss once per step, with the cross-entropy. So a BTT-MoE layer never
//   waits for the host, and its GEMM shapes depend on N alone.
#pragma once
#include "../cuda/reduce.cuh"
#include "btt_fused.cuh"
#include "btt_gpu.cuh"
#include "moe_group.cuh"
#include "exec_model.h"
#include "moe_sets.cuh"
#include "plan_gpu.cuh"
#include "seg_wgrad.cuh"
#include "select.cuh"

// What a BTT-MoE layer keeps from its forward for its backward (device unless marked host).
// Grouped rows: each expert's (token, k) pairs, padded with zero rows to whole tiles of
// tile_rows rows (gpu_plan.h, tiled plans), expert after expert, then the spare tile.
typedef struct {
    float *logits;        // (N, E) fp32
    float *gate;          // (N, K)
    float *lse;           // (N)
    int *sel;             // (N, K)
    int *order;           // (grouped rows): grouped row -> pair, -1 for a padding row
    int *pos;             // (N·K): pair -> grouped row
    int *counts, *offsets;  // (E), (E+1): expert e's pairs are grouped rows [offsets[e], offsets[e] + counts[e]);
                            // offsets are multiples of tile_rows and offsets[E] the rows of the tiles in use
    int *tile_expert;     // (max tiles) the expert of each tile in use
    int *group;           // moe_group_gpu's scratch (per expert and chunk of pairs)
    double *stats;        // MOE_AUX_STATS(E) aux statistics (moe.h's layout)
    int *tiles;           // the fused forward's tile table and count (btt_fused.cuh)
    float *fhat;          // (E) f̂ for the aux gradient (set by moe_aux_finish_gpu)
    floatX *z;            // (grouped rows, gamma·phi)
    int N;                // rows of the last forward
    int tile_rows;        // host: from the allocation's N (moe_tile_rows), for every N up to it
    int capacity;         // host: the allocation's N
    const int *forced_sel;  // test mode only: (N, K) experts each token is routed to instead of its
                            // top-k (st_moe_route_row's `only`); NULL in training
    // The set path (-mg 1, moe_sets.cuh): allocated where the shape takes it and the allocation
    // asked for it (g_moe_sets, or -at 1's room for every choice). Then order, pos, counts, offsets
    // and tile_expert serve whichever grouping ran.
    int sets;             // host: the set path's arrays exist
    int use_sets;         // host: forwards on the plans (-sk 0) group by set (-mg, or -at 1's choice); needs sets
    int sets_ran;         // host: the last forward grouped by set (its backward must too)
    int sets_fused_ran;   // host: and on the fused kernel, which leaves z's padding rows unwritten
    int S, set_tile_rows;  // host: sets C(E, k), their tile rows
    int *sid, *kof;       // (N), (N, K): each token's set and the selection each component is
    int *set_experts;     // (S, K) each set's experts, ascending
    int *members;         // (E, C(E-1, K-1)) q·K + j of each set q containing the expert (j its place)
    float *rgate;         // (grouped rows, K) each grouped row's gates in component order
    size_t bytes[4];      // host: the four allocations' bytes (stats, z, tiles, sid), counted off when freed
} MoEGPUState;

// -mg 1: BTT-MoE layers on the cuBLAS plans (-sk 0) group their tokens by set of experts
// (moe_sets.cuh) where the shape allows; 2: those exec_model.h models faster so at the layer's
// rows on this GPU; 0: by expert. Read when a layer's state is allocated.
static int g_moe_sets = 0;
static long g_moe_sets_runs = 0;        // set-path forwards and backwards run (tests)
static long g_moe_sets_fused_runs = 0;  // set-path forwards on the fused kernel (tests)
// The set path for this shape at N rows if g_moe_sets asks for it: its number of sets, else 0.
static inline int moe_sets_wanted(const MoEShape *s, int N) {
    if (!g_moe_sets || !moe_set_count(s)) return 0;
    if (g_moe_sets == 2) {
        const PlanRates r = plan_rates(gpu_peak_bf16_tflops(g_gpu.prop.name), gpu_peak_gbps());
        if (!st_moe_sets_pay(s, N, &r)) return 0;
    }
    return moe_set_count(s);
}

// Shared by every BTT-MoE layer: extracted cores, gathered rows, the tiled plans' weight-gradient
// partials and pointers, scratch.
typedef struct {
    floatX *w0x, *w1x, *dw0x, *dw1x;  // (E, gamma, alpha, phi), (E, phi, gamma, eps); dw0x/dw1x: the fused path's
    floatX *w0t, *w1t;                // the transposed BTTs' cores (fused backward): (E, phi, eps, gamma), (E, gamma, phi, alpha)
    floatX *xg, *yg, *dxg;            // (grouped rows, d_in), (grouped rows, d_out) (also the gathered dy), (grouped rows, d_in)
    floatX *t1, *t2;                  // (grouped rows, gamma·phi)
    float *dgate, *dlogits;           // (N·K), (N, E)
    float *part0, *part1;             // (max tiles + 1) · |W0 of an expert|, · |W1 of an expert|: per-tile dW0, dW1
    void **ptrs;                      // the tiled plans' batch-slot pointers
    floatX *dlogits_bf16;             // (N, E)
} MoEGPUScratch;

// The grouping's sizes for N tokens: grouped rows, groups, tiles, the grouping's scratch ints and
// the saved z's elements, each the larger of the expert path's (T rows a tile) and, with S > 0
// sets, the set path's (Ts rows a tile).
typedef struct { size_t rows, groups, tiles, group_ints, z; } MoEGroupSizes;
static inline MoEGroupSizes moe_group_sizes(const MoEShape *s, int N, int T, int S, int Ts) {
    const int E = s->experts, NK = N * s->topk;
    MoEGroupSizes g;
    g.rows = moe_grouped_rows(NK, E, T);
    g.groups = (size_t)E;
    g.tiles = (size_t)moe_max_tiles(NK, E, T);
    g.group_ints = moe_group_scratch_ints(NK, E);
    g.z = g.rows * moe_z_row(s);
    if (S > 0) {
        const size_t rows = moe_grouped_rows(N, S, Ts), tiles = (size_t)moe_max_tiles(N, S, Ts), gi = moe_group_scratch_ints(N, S);
        const size_t z = rows * moe_z_row(s) * s->topk;
        if (rows > g.rows) g.rows = rows;
        if ((size_t)S > g.groups) g.groups = (size_t)S;
        if (tiles > g.tiles) g.tiles = tiles;
        if (gi > g.group_ints) g.group_ints = gi;
        if (z > g.z) g.z = z;
    }
    return g;
}

// with_sets: the set path's arrays, 1 wherever the shape takes it (-at 1 may time it), 0 nowhere,
// -1 where g_moe_sets asks for it. Either way the layer groups by set where g_moe_sets asks
// (use_sets; -at 1 then sets it per layer).
static void moe_gpu_state_alloc(MoEGPUState *st, const MoEShape *s, int N, const char *what, int with_sets = -1) {
    const size_t E = (size_t)s->experts, NK = (size_t)N * s->topk;
    memset(st, 0, sizeof(*st));
    st->tile_rows = moe_tile_rows(s, N);
    st->capacity = N;
    st->S = with_sets < 0 ? moe_sets_wanted(s, N) : with_sets ? moe_set_count(s) : 0;
    st->sets = st->S > 0;
    st->use_sets = st->sets && moe_sets_wanted(s, N) > 0;
    st->set_tile_rows = st->sets ? moe_set_tile_rows(s, N) : 0;
    const MoEGroupSizes gs = moe_group_sizes(s, N, st->tile_rows, st->S, st->set_tile_rows);
    const size_t bytes = MOE_AUX_STATS(E) * sizeof(double) + ((size_t)N * E + NK + N) * 4 + NK * 4 * 2 + gs.rows * 4 + (2 * gs.groups + 1) * 4 +
                         gs.tiles * 4 + gs.group_ints * 4 + E * 4;
    char name[160];
    snprintf(name, sizeof(name), "%s: BTT-MoE routing state (logits, gates, selections, grouping)", what);
    char *mem = cudaMallocNamed(char, bytes, name);
    st->bytes[0] = bytes;
    st->stats = (double *)mem; mem += MOE_AUX_STATS(E) * sizeof(double);  // first: 8-byte aligned
    st->logits = (float *)mem; mem += (size_t)N * E * 4;
    st->gate = (float *)mem; mem += NK * 4;
    st->lse = (float *)mem; mem += (size_t)N * 4;
    st->sel = (int *)mem; mem += NK * 4;
    st->pos = (int *)mem; mem += NK * 4;
    st->order = (int *)mem; mem += gs.rows * 4;
    st->counts = (int *)mem; mem += gs.groups * 4;
    st->offsets = (int *)mem; mem += (gs.groups + 1) * 4;
    st->tile_expert = (int *)mem; mem += gs.tiles * 4;
    st->group = (int *)mem; mem += gs.group_ints * 4;
    st->fhat = (float *)mem;
    snprintf(name, sizeof(name), "%s: BTT-MoE saved z (grouped rows x gamma*phi)", what);
    st->z = cudaMallocNamed(floatX, gs.z, name);
    st->bytes[1] = gs.z * sizeof(floatX);
    cudaCheck(cudaMemset(st->z, 0, gs.z * sizeof(floatX)));  // the spare tile's rows are read, never used
    snprintf(name, sizeof(name), "%s: BTT-MoE fused forward's tile table", what);
    size_t table = btt_fused_seg_scratch_ints((int)NK, (int)E, 16);  // by expert; by set (a row a token, S segments) where larger
    if (st->sets && btt_fused_seg_scratch_ints(N, st->S, 16) > table) table = btt_fused_seg_scratch_ints(N, st->S, 16);
    st->tiles = cudaMallocNamed(int, table, name);
    st->bytes[2] = table * sizeof(int);
    if (st->sets) {  // the set path's per-token arrays and tables
        const int K = s->topk, per = (int)moe_binom((int)E - 1, K - 1);
        const size_t ints = (size_t)N + NK + (size_t)st->S * K + E * per + gs.rows * K;  // the last: rgate (floats)
        snprintf(name, sizeof(name), "%s: BTT-MoE set path (sets, their experts, per-expert counts)", what);
        st->sid = cudaMallocNamed(int, ints, name);
        st->bytes[3] = ints * sizeof(int);
        st->kof = st->sid + N;
        st->set_experts = st->kof + NK;
        st->members = st->set_experts + (size_t)st->S * K;
        st->rgate = (float *)(st->members + E * per);
        int *host = (int *)mallocCheck(((size_t)st->S * K + E * per) * sizeof(int));
        moe_set_tables(host, host + (size_t)st->S * K, (int)E, K);
        cudaCheck(cudaMemcpy(st->set_experts, host, ((size_t)st->S * K + E * per) * sizeof(int), cudaMemcpyHostToDevice));
        free(host);
    }
}

static void moe_gpu_state_free(MoEGPUState *st) {
    cuda_free_named(st->stats, st->bytes[0]);
    cuda_free_named(st->z, st->bytes[1]);
    cuda_free_named(st->tiles, st->bytes[2]);
    cuda_free_named(st->sid, st->bytes[3]);
    memset(st, 0, sizeof(*st));
}

// The scratch regions of layers up to N rows of shape s (bf16 elements and floats; the caller
// allocates the max over layers, moe_gpu_scratch_bind points into it). S > 0: room for the set
// path too (S sets of Ts-row tiles): its rank-k cores in the cores' region, its rows, partials
// and pointers where they are larger.
typedef struct {
    size_t w0x, w1x, w0c, w1c, rows_in, rows_out, rows_z, bf16_end;  // bf16 offsets (w0c, w1c: the groups' cores, w0x, w1x
                                                                   // their gradients and transposes: each the larger of
                                                                   // the experts' and, with sets, the sets')
    size_t part0, part1, ptrs, f32_end;                             // float offsets (ptrs: 16-byte aligned)
} MoEScratchLayout;
static inline MoEScratchLayout moe_scratch_layout(const MoEShape *s, int N, int tile_rows, int S = 0, int Ts = 0) {
    const BTTShape b1 = moe_expert_shape(s);
    const size_t E = (size_t)s->experts, NK = (size_t)N * s->topk, p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1);
    const MoEGroupSizes gs = moe_group_sizes(s, N, tile_rows, S, Ts);
    Plan f, d, r;
    plan_moe_tiled(&f, &d, &r, &b1, moe_max_tiles((int)NK, (int)E, tile_rows), tile_rows, 1, 0);  // -sk 4's take as many pointers (the same GEMMs)
    size_t np = plan_tile_ptr_count(&f);
    if (plan_tile_ptr_count(&d) > np) np = plan_tile_ptr_count(&d);
    if (plan_tile_ptr_count(&r) > np) np = plan_tile_ptr_count(&r);
    MoEScratchLayout L;
    L.w0x = E * p0; L.w1x = E * p1;
    L.w0c = L.w0x; L.w1c = L.w1x;
    L.part0 = ((size_t)moe_max_tiles((int)NK, (int)E, tile_rows) + 1) * p0;
    L.part1 = ((size_t)moe_max_tiles((int)NK, (int)E, tile_rows) + 1) * p1;
    if (S > 0) {
        const BTTShape bk = moe_set_shape(s);
        const size_t q0 = btt_w0_size(&bk), q1 = btt_w1_size(&bk), tiles = (size_t)moe_max_tiles(N, S, Ts) + 1;
        if (S * q0 > L.w0c) L.w0c = S * q0;
        if (S * q1 > L.w1c) L.w1c = S * q1;
        if (S * q0 > L.w0x) L.w0x = S * q0;  // the fused set backward's gradients and transposed cores
        if (S * q1 > L.w1x) L.w1x = S * q1;
        if (tiles * q0 > L.part0) L.part0 = tiles * q0;
        if (tiles * q1 > L.part1) L.part1 = tiles * q1;
        Plan sp[3];
        plan_moe_tiled(&sp[0], &sp[1], &sp[2], &bk, moe_max_tiles(N, S, Ts), Ts, 1, 0);
        for (int i = 0; i < 3; i++)
            if (plan_tile_ptr_count(&sp[i]) > np) np = plan_tile_ptr_count(&sp[i]);
    }
    L.rows_in = gs.rows * s->btt.d_in; L.rows_out = gs.rows * s->btt.d_out; L.rows_z = gs.z;
    L.bf16_end = L.w0c + L.w1c + 2 * (L.w0x + L.w1x) + 2 * L.rows_in + L.rows_out + 2 * L.rows_z + (size_t)N * E + 8;
    const size_t head = NK + (size_t)N * E + L.part0 + L.part1;
    L.ptrs = (head + 3) / 4 * 4;
    L.f32_end = L.ptrs + np * (sizeof(void *) / sizeof(float));
    return L;
}
// The scratch a layer allocated as st needs (bf16 elements, floats), with the set path's room where st has it.
static inline MoEScratchLayout moe_state_scratch_layout(const MoEGPUState *st, const MoEShape *s) {
    return moe_scratch_layout(s, st->capacity, st->tile_rows, st->S, st->set_tile_rows);
}
// The same for a layer moe_gpu_state_alloc(.., N, .., -1) allocates (g_moe_sets as it is now).
static inline MoEScratchLayout moe_scratch_layout_for(const MoEShape *s, int N) {
    const int S = moe_sets_wanted(s, N);
    return moe_scratch_layout(s, N, moe_tile_rows(s, N), S, S ? moe_set_tile_rows(s, N) : 0);
}
static size_t moe_gpu_scratch_elems(const MoEShape *s, int N) { return moe_scratch_layout_for(s, N).bf16_end; }
static size_t moe_gpu_scratch_floats(const MoEShape *s, int N) { return moe_scratch_layout_for(s, N).f32_end; }

// The state allocated again with the set path's arrays (with_sets, where the shape takes it) or
// without them (its z then shrinks to the expert path's), if it has the other; its use_sets and
// test mode's forced routing are kept (use_sets only with the arrays). Between a backward and the
// next forward: -at 1's room for every choice, then the layer's choice.
static void moe_gpu_state_refit(MoEGPUState *st, const MoEShape *s, int with_sets, const char *what) {
    const int want = with_sets && moe_set_count(s) > 0;
    if (!st->capacity || st->sets == want) return;
    const int *forced = st->forced_sel, N = st->capacity, use = st->use_sets && want;
    moe_gpu_state_free(st);
    moe_gpu_state_alloc(st, s, N, what, want);
    st->forced_sel = forced;
    st->use_sets = use;
}

// Points sc into the shared scratch (mem: the bf16 elements, fmem: the floats of
// moe_state_scratch_layout(st)) for a call on N rows with st's tile rows.
static void moe_gpu_scratch_bind(MoEGPUScratch *sc, const MoEGPUState *st, const MoEShape *s, int N, floatX *mem, float *fmem) {
    if (N > st->capacity) fatal("internal: BTT-MoE layer called on %d rows, allocated for %d", N, st->capacity);
    const MoEScratchLayout L = moe_scratch_layout(s, N, st->tile_rows, st->S, st->set_tile_rows);
    const size_t NK = (size_t)N * s->topk;
    sc->w0x = mem; mem += L.w0c;
    sc->w1x = mem; mem += L.w1c;
    sc->dw0x = mem; mem += L.w0x;
    sc->dw1x = mem; mem += L.w1x;
    sc->w0t = mem; mem += L.w1x;
    sc->w1t = mem; mem += L.w0x;
    sc->xg = mem; mem += L.rows_in;
    sc->dxg = mem; mem += L.rows_in;
    sc->yg = mem; mem += L.rows_out;
    sc->t1 = mem; mem += L.rows_z;
    sc->t2 = mem; mem += L.rows_z;
    sc->dlogits_bf16 = mem;
    sc->dgate = fmem;
    sc->dlogits = fmem + NK;
    sc->part0 = sc->dlogits + (size_t)N * s->experts;
    sc->part1 = sc->part0 + L.part0;
    sc->ptrs = (void **)(fmem + L.ptrs);
}

// sid, kof (may be NULL): the set path's, each token's set of experts (moe_sets.cuh).
__global__ void moe_route_kernel(int *sel, float *gate, float *lse, const float *logits, const int *only, int N, int E, int K, int *sid,
                                 int *kof) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    st_moe_route_row(logits + (size_t)t * E, E, K, only ? only + (size_t)t * K : NULL, sel + (size_t)t * K, gate + (size_t)t * K, lse + t);
    if (sid) moe_set_of_row(sid + t, kof + (size_t)t * K, sel + (size_t)t * K, K);
}

// Each group's cores (G groups of K experts: w0g (G, gamma, alpha, phi·K), w1g (G, phi, gamma·K,
// eps)) copied out of the rank components W0 (gamma, alpha, phi·E) and W1 (phi, gamma·E, eps):
// component j of group q is expert set_experts[q·K + j] (moe_sets.cuh), or with set_experts NULL
// (K = 1, G = E) expert q itself. q0, q1: one group's core sizes.
__global__ void moe_group_cores_kernel(floatX *w0g, floatX *w1g, const floatX *W0, const floatX *W1, const int *set_experts, int G, int E,
                                       int K, int Ep, size_t q0, size_t q1) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, n0 = (size_t)G * q0;
    if (i < n0) {
        const size_t q = i / q0, l = i % q0;
        w0g[i] = W0[(l / K) * E + (set_experts ? set_experts[q * K + l % K] : (int)q)];
    } else if (i < n0 + (size_t)G * q1) {
        const size_t q = (i - n0) / q1, l = (i - n0) % q1, o = l % Ep, r = l / Ep;
        w1g[i - n0] = W1[((r / K) * E + (set_experts ? set_experts[q * K + r % K] : (int)q)) * Ep + o];
    }
}

// dW0/dW1 (the strided rank components) += dw0x/dw1x (each expert's core gradients, the fused path's).
__global__ void moe_cores_scatter_kernel(floatX *dW0, floatX *dW1, const floatX *dw0x, const floatX *dw1x, size_t n0, size_t n1, int E, int Ep,
                                         size_t p0, size_t p1) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n0) {
        dW0[i] = (floatX)((float)dW0[i] + (float)dw0x[st_moe_w0_expert_index(i, E, p0)]);
    } else if (i < n0 + n1) {
        i -= n0;
        dW1[i] = (floatX)((float)dW1[i] + (float)dw1x[st_moe_w1_expert_index(i, E, Ep, p1)]);
    }
}

// dW0/dW1 (the strided rank components) += for each expert e, over the groups that hold its
// component in order, over each group's tiles in order, the tiled backward's fp32 partial of that
// component: one bf16 rounding. Groups: the experts (members NULL, K = 1: expert e's group is e
// alone), or the sets (members: the `per` sets containing e as q·K + j, j its place in set q;
// moe_sets.cuh). part0/part1: tile t's at t·p0, t·p1 (a group's core sizes); offsets: the groups'
// grouped rows (multiples of T). offsets NULL: one partial per group, group q's at q·p (the fused
// set backward's per-set core gradients, bf16: P = floatX).
template <class P>
__global__ void moe_partials_scatter_kernel(floatX *dW0, floatX *dW1, const P *part0, const P *part1, const int *offsets, const int *members,
                                            size_t n0, size_t n1, int E, int K, int Ep, int per, size_t p0, size_t p1, int T) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n0 + n1) return;
    const int w1 = i >= n0;
    int e;
    size_t base, step;  // the element's place in a group's core is base + j·step
    if (!w1) {  // W0[g, a, f·E + e] -> (g, a, f·K + j)
        e = (int)(i % E);
        base = (i / E) * K;
        step = 1;
    } else {  // W1[f, g·E + e, o] -> (f, g·K + j, o)
        const size_t l = i - n0, o = l % Ep, r = l / Ep;
        e = (int)(r % E);
        base = (r / E) * K * Ep + o;
        step = Ep;
    }
    const P *part = w1 ? part1 : part0;
    const size_t p = w1 ? p1 : p0;
    float acc = 0.0f;
    for (int m = 0; m < per; m++) {
        const int qj = members ? members[e * per + m] : e, q = qj / K, j = qj % K;
        const P *pq = part + base + j * step;
        const int t0 = offsets ? offsets[q] / T : q, t1 = offsets ? offsets[q + 1] / T : q + 1;
        for (int t = t0; t < t1; t++) acc += (float)pq[(size_t)t * p];
    }
    floatX *g = w1 ? dW1 + (i - n0) : dW0 + i;
    *g = (floatX)((float)*g + acc);
}

// Grouped row w of dst = src row order[w] / K (src rows src_ld apart), zeros for a padding row,
// for the rows in use (*rows_in_use of `rows`), 8 elements per thread (d % 8 == 0); then `spare`
// rows of zeros after the `rows`: the tiled plans' spare tile, whose products nothing reads but
// which should not be products of whatever another layer left in the scratch (NaN included).
__global__ void moe_gather_kernel(floatX *dst, const floatX *src, const int *order, const int *rows_in_use, int rows, int spare, int K, int d,
                                  int src_ld) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int per = d / 8;
    if (i >= (size_t)(rows + spare) * per) return;
    int w = (int)(i / per), c = (int)(i % per) * 8;
    if (w < rows && w >= *rows_in_use) return;
    x128 v;
    if (w < rows && order[w] >= 0) v = load128(src + (size_t)(order[w] / K) * src_ld + c);
    else
        for (int j = 0; j < 8; j++) v[j] = (floatX)0.0f;
    store128(dst + (size_t)w * d + c, v);
}

static void moe_gather(floatX *dst, const floatX *src, const MoEGPUState *st, int E, int rows, int spare, int K, int d, int src_ld = 0) {
    moe_gather_kernel<<<ceil_div_i((long)(rows + spare) * d / 8, 256), 256>>>(dst, src, st->order, st->offsets + E, rows, spare, K, d,
                                                                                src_ld ? src_ld : d);
    cudaCheckLaunch();
}

// acc[0..8) += Σ_k gate[t·K + k] · src[pos[t·K + k]][c .. c + 8) (gate NULL: 1), in k order: token
// t's k expert rows of the grouped buffer src (rows d apart), the combines' shared step.
static __device__ __forceinline__ void moe_add_experts(float (&acc)[8], const floatX *src, const float *gate, const int *pos, int t, int K,
                                                       int d, int c) {
    for (int k = 0; k < K; k++) {
        const int pr = t * K + k;
        const float g = gate ? gate[pr] : 1.0f;
        const x128 v = load128(src + (size_t)pos[pr] * d + c);
        for (int j = 0; j < 8; j++) acc[j] += g * (float)v[j];
    }
}

// y[t] = bias + Σ_k gate[t, k] · src[pos[t·K + k]] (gate NULL: plain sum), summed in k order in
// fp32; with pre (the fc layer): pre[t] = that and y[t] = its GELU. y and pre rows ld apart;
// acc: y[t] += that instead (no pre then).
__global__ void moe_combine_kernel(floatX *y, const floatX *src, const float *gate, const int *pos, const floatX *bias, int N, int K, int d,
                                   floatX *pre, int ld, int acc_y) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int per = d / 8;
    if (i >= (size_t)N * per) return;
    int t = (int)(i / per), c = (int)(i % per) * 8;
    float acc[8];
    for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    if (acc_y) {
        x128 o = load128(y + (size_t)t * ld + c);
        for (int j = 0; j < 8; j++) acc[j] = (float)o[j];
    }
    if (bias) {
        x128 b = load128(bias + c);
        for (int j = 0; j < 8; j++) acc[j] += (float)b[j];
    }
    moe_add_experts(acc, src, gate, pos, t, K, d, c);
    x128 o;
    for (int j = 0; j < 8; j++) o[j] = (floatX)acc[j];
    if (pre) {
        store128(pre + (size_t)t * ld + c, o);
        for (int j = 0; j < 8; j++) o[j] = (floatX)gelu_f((float)o[j]);  // of the pre-activation as kept (bf16), which the backward's GELU' reads
    }
    store128(y + (size_t)t * ld + c, o);
}

// The backward's input gradient in one pass over dx, for E <= MOE_DX_ONE_PASS_EXPERTS: dx[t]
// (= or, with acc_dx, +=) Σ_k gate·dxg[pos[t·K + k]] (gate NULL: the tiled plans' dxg, already
// gated) + Σ_e dlogits[t, e]·R[e] (the router's share), summed in fp32 in that order; with pre,
// times GELU'(pre); rounded to bf16 once. The combine, a GEMM for the router's share and GELU'
// read and wrote dx three times; with few experts the router's share is E multiply-adds per
// element, R (E x d_in) stays in cache. 8 elements per thread (d_in % 8 == 0).
#define MOE_DX_ONE_PASS_EXPERTS 64
__global__ void moe_dx_kernel(floatX *dx, const floatX *dxg, const float *gate, const int *pos, const float *dlogits, const floatX *router,
                              const floatX *pre, int N, int K, int E, int din, int acc_dx) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int per = din / 8;
    if (i >= (size_t)N * per) return;
    const int t = (int)(i / per), c = (int)(i % per) * 8;
    float acc[8];
    if (acc_dx) {
        const x128 o = load128(dx + (size_t)t * din + c);
        for (int j = 0; j < 8; j++) acc[j] = (float)o[j];
    } else {
        for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    }
    moe_add_experts(acc, dxg, gate, pos, t, K, din, c);
    for (int e = 0; e < E; e++) {
        const float l = dlogits[(size_t)t * E + e];
        const x128 r = load128(router + (size_t)e * din + c);
        for (int j = 0; j < 8; j++) acc[j] += l * (float)r[j];
    }
    if (pre) {
        const x128 p = load128(pre + (size_t)t * din + c);
        for (int j = 0; j < 8; j++) acc[j] *= gelu_grad_f((float)p[j]);
    }
    x128 o;
    for (int j = 0; j < 8; j++) o[j] = (floatX)acc[j];
    store128(dx + (size_t)t * din + c, o);
}

// The fused backward's gate step, a warp per grouped row w (pair or token pr = order[w]): dgate of
// each component, then dZ = gate·dZu in place for dW0. z is in the saved (phi, gamma, rho) layout,
// dZu in the fused kernel's (gamma, phi, rho) of G x P x R. By expert (kof NULL, R = 1): dgate[pr]
// = <z_w, dZu_w>; its dW1 reads dy and the gate itself. By set (kof, moe_sets.cuh: R = k, z gated
// already, dx gated inside the kernel): component j (element i: j = i % R; R divides 32, so each
// lane's elements are of component lane % R) has dgate[pr·R + kof[pr·R + j]] = <gate·z, dZu>_j /
// gate (0 where the gate is 0), as the plans' set path has it. A padding row's z and dZu are zeroed.
__global__ void moe_gate_backward_fused_kernel(float *dgate, floatX *dzu, floatX *z, const float *gate, const int *order,
                                               const int *rows_in_use, int rows, int G, int P, int R, const int *kof) {
    const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32, zrow = G * P * R;
    if (w >= rows || w >= *rows_in_use) return;
    const int pr = order[w];
    floatX *zr = z + (size_t)w * zrow, *dz = dzu + (size_t)w * zrow;
    if (pr < 0) {
        for (int i = lane; i < zrow; i += 32) zr[i] = dz[i] = (floatX)0.0f;
        return;
    }
    float s = 0.0f;
    for (int i = lane; i < zrow; i += 32) {
        const int j = ((i / R) % G) * P * R + (i / (G * R)) * R + i % R;  // z's (f, g, s) in dZu's layout
        s += (float)zr[i] * (float)dz[j];
    }
    for (int o = 16; o >= R; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);  // lanes of one component: every lane its sum
    // (every lane's reads of dz are before the shuffles, so before the writes below)
    const int at = kof ? pr * R + kof[(size_t)pr * R + lane % R] : pr;  // this lane's component's gate
    const float g = gate[at];
    if (lane < R) dgate[at] = !kof ? s : g != 0.0f ? s / g : 0.0f;
    for (int i = lane; i < zrow; i += 32) dz[i] = (floatX)(g * (float)dz[i]);
}

// Zeros over the padding rows (order -1) of the grouped rows in use of z (rows x zrow): where the
// fused set forward left them unwritten and the plans' set backward reads them (its dW1 sums z
// times the zero dy rows gathered there: anything but zeros there could be NaN).
__global__ void moe_zero_padding_rows_kernel(floatX *z, const int *order, const int *rows_in_use, int rows, int zrow) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, per = (size_t)zrow / 8;
    if (i >= (size_t)rows * per) return;
    const int w = (int)(i / per);
    if (w < *rows_in_use && order[w] < 0) st16(z + (size_t)w * zrow + (i % per) * 8, make_uint4(0, 0, 0, 0));
}

// -sk 0's gate backward on the tiled plans, z and dZu (in t2) in the saved (phi, gamma, rho)
// layout; a warp per grouped row w in use (pair p = order[w]), writing
//   t1_w = gate·dZu_w in the (gamma, phi, rho) layout the rest of the backward reads: the plan's
//          permute of dZ is done here, through shared memory, gc gammas at a time (each phi's run
//          of gc·rho elements read in order, t1's range written in order; gc 0: straight, for
//          rows of phi·rho over the shared memory);
//   dgate[p] = <z_w, dZu_w>, then t2_w = gate·z_w over dZu_w: dW1 = Zᵀ (gate·dY) = (gate·Z)ᵀ dY
//          reads t2 for Z, so neither the saved z nor the gathered dy is scaled.
// That moves 4 zrow elements a row (z and dZu read, t1 and t2 written) where the gate step on dy,
// then the permute, moved 5 zrow + 2 d_out; and z stays as the forward left it. Padding rows:
// zeros in t1 and t2 (the tiled weight gradients sum over them; z is not read there, a fused
// forward leaves it unwritten).
// The set path (kof not NULL, moe_sets.cuh): a row is a token t = order[w] and its rank R = k
// components are its experts, each with its own gate: component j (element i: j = i % R) takes
// gate[t·R + kof[t·R + j]] and its dot product goes to dgate there. R divides 32, so each lane's
// elements are all of component lane % R, and the lanes of a component sum by shuffles down to R.
// z_gated (the set path's saved z is gate·z already): dgate = <gate·z, dZu> / gate (0 where the
// gate is 0: its softmax gradient is then 0 whatever dgate is), and t2 is not written (the rest
// reads the saved z).
#define MOE_GATE_T_WARPS 8
#define MOE_GATE_T_SMEM (48 * 1024)  // the default limit: no opt-in needed
__global__ void __launch_bounds__(32 * MOE_GATE_T_WARPS) moe_gate_backward_t_kernel(float *dgate, floatX *t1, floatX *t2, const floatX *z,
                                                                                     const float *gate, const int *order,
                                                                                     const int *rows_in_use, int rows, int G, int P,
                                                                                     int R, int gc, const int *kof, int z_gated) {
    extern __shared__ __align__(16) unsigned char gate_smem[];  // per warp: P runs of gc·R bf16
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, w = blockIdx.x * MOE_GATE_T_WARPS + warp;
    if (w >= rows || w >= *rows_in_use) return;
    const int zrow = G * P * R, pr = order[w];
    floatX *a = t1 + (size_t)w * zrow, *b = t2 + (size_t)w * zrow;
    if (pr < 0) {
        for (int i = lane; i < zrow; i += 32) a[i] = b[i] = (floatX)0.0f;
        return;
    }
    const int nc = kof ? R : 1;  // gates a row: one per component on the set path, else one
    const int p = kof ? pr * R + kof[pr * R + lane % R] : pr;  // this lane's (token, k) pair
    const float g = gate[p];
    if (gc == 0) {  // the plan's permute of dZ ([P][G][R] -> [G][P][R]) element by element
        for (int j = lane; j < zrow; j += 32) a[plan_permute_dst_index(j, P, G, R)] = (floatX)(g * (float)b[j]);
        __syncwarp();  // every lane's reads of dZu before any lane overwrites it below
    } else {
        floatX *sh = reinterpret_cast<floatX *>(gate_smem) + (size_t)warp * P * gc * R;
        for (int g0 = 0; g0 < G; g0 += gc) {
            const int n = min(gc, G - g0) * R;  // elements of each phi's run
            for (int i = lane; i < P * n; i += 32) sh[i] = b[((i / n) * G + g0) * R + i % n];
            __syncwarp();
            floatX *dst = a + (size_t)g0 * P * R;  // t1's elements gg·P·R .. of gammas g0 .. g0 + n/R
            for (int k = lane; k < P * n; k += 32) {
                const int gl = k / (P * R), f = (k / R) % P, s = k % R;
                dst[k] = (floatX)(g * (float)sh[f * n + gl * R + s]);
            }
            __syncwarp();
        }
    }
    const floatX *zr = z + (size_t)w * zrow;
    float dot = 0.0f;
    for (int i = lane; i < zrow; i += 32) {  // each element read, then overwritten, by the same lane
        const float v = (float)zr[i];
        dot += v * (float)b[i];
        if (!z_gated) b[i] = (floatX)(g * v);
    }
    for (int o = 16; o >= nc; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);  // over the lanes of one gate
    if (z_gated) dot = g != 0.0f ? dot / g : 0.0f;
    if (lane < nc) dgate[p] = dot;
}

// Gammas per shared-memory chunk of moe_gate_backward_t_kernel for a (gamma, phi, rho) z, or 0
// (straight) where one phi·rho run does not fit; max_bytes: the block's shared memory.
static inline int moe_gate_t_chunk(int G, int P, int R, size_t max_bytes) {
    const size_t per_warp = max_bytes / MOE_GATE_T_WARPS / sizeof(floatX);
    const size_t gc = per_warp / ((size_t)P * R);
    return (int)(gc < (size_t)G ? gc : (size_t)G);
}
// E: the groups (experts, or sets with kof = st->kof; b1 then the sets' rank-k shape).
static void moe_gate_backward_t(float *dgate, floatX *t1, floatX *t2, const floatX *z, const MoEGPUState *st, int E, int rows,
                                const BTTShape *b1, size_t max_bytes = MOE_GATE_T_SMEM, const int *kof = NULL, int z_gated = 0) {
    if (kof && 32 % b1->rank) fatal("internal: moe_gate_backward_t: a set of %d experts", b1->rank);
    const int gc = moe_gate_t_chunk(b1->gamma, b1->phi, b1->rank, max_bytes);
    const size_t sh = (size_t)MOE_GATE_T_WARPS * b1->phi * gc * b1->rank * sizeof(floatX);
    moe_gate_backward_t_kernel<<<ceil_div_i(rows, MOE_GATE_T_WARPS), 32 * MOE_GATE_T_WARPS, sh>>>(
        dgate, t1, t2, z, st->gate, st->order, st->offsets + E, rows, b1->gamma, b1->phi, b1->rank, gc, kof, z_gated);
    cudaCheckLaunch();
}

// The same on -sk 4's layout, where each tile of T grouped rows keeps its z and dZu transposed
// (zrow rows of T): a block takes 32 consecutive rows of one tile (threadIdx.x, so that a warp's
// loads are consecutive) in 8 slices of the elements (threadIdx.y), summed over the slices in
// order; each element is read and scaled by the thread that sums it. dW1 = Zᵀ (gate·dY) =
// (gate·Z)ᵀ dY, so z is scaled here, in place, instead of dy (zrow elements a row, not d_out, and
// z is already being read): -sk 4's saved z is its own, read by nothing after this backward. A
// padding row's z and dZu are zeroed, as above.
#define MOE_GATE_ZT_COLS 32
#define MOE_GATE_ZT_SLICES 8
__global__ void __launch_bounds__(MOE_GATE_ZT_COLS * MOE_GATE_ZT_SLICES) moe_gate_backward_zt_kernel(float *dgate, floatX *dzu, floatX *z,
                                                                                                     const float *gate, const int *order,
                                                                                                     const int *rows_in_use, int T, int zrow) {
    __shared__ float part[MOE_GATE_ZT_SLICES][MOE_GATE_ZT_COLS];
    const int tile = blockIdx.x, t = blockIdx.y * MOE_GATE_ZT_COLS + threadIdx.x;
    if ((long)tile * T >= *rows_in_use) return;  // the whole block: no barrier is skipped by some
    const int w = tile * T + t, pr = t < T ? order[w] : -1;
    const size_t base = (size_t)tile * T * zrow + t;
    float s = 0.0f;
    if (t < T) {
        const float g = pr >= 0 ? gate[pr] : 0.0f;  // padding: zeros
        for (int c = threadIdx.y; c < zrow; c += MOE_GATE_ZT_SLICES) {
            const size_t at = base + (size_t)c * T;
            const float d = (float)dzu[at], v = (float)z[at];
            s += v * d;
            dzu[at] = (floatX)(g * d);
            z[at] = (floatX)(g * v);
        }
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && pr >= 0) {
        float sum = 0.0f;
        for (int j = 0; j < MOE_GATE_ZT_SLICES; j++) sum += part[j][threadIdx.x];
        dgate[pr] = sum;
    }
}

__global__ void moe_dlogits_kernel(float *dlogits, floatX *dlogits_bf16, const float *logits, const float *lse, const float *gate,
                                   const float *dgate, const int *sel, const float *fhat, int N, int E, int K, float daux) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    float *dl = dlogits + (size_t)t * E;
    st_moe_dlogits_row(dl, logits + (size_t)t * E, lse[t], gate + (size_t)t * K, dgate + (size_t)t * K, sel + (size_t)t * K, fhat, E, K, N,
                       daux);
    for (int e = 0; e < E; e++) dlogits_bf16[(size_t)t * E + e] = (floatX)dl[e];
}

// moe.h's MOE_AUX_STATS layout: block j < E: stats[j] = Σ_t softmax(logits_t)_j; block E:
// stats[2E] = Σ_t lse_t² and stats[E + e] = counts[e] (members not NULL: counts are the sets',
// each expert's the sum over its sets). fp32 sums in a fixed order, stored as doubles.
__global__ void moe_aux_stats_kernel(double *stats, const float *logits, const float *lse, const int *counts, int N, int E,
                                     const int *members, int per, int K) {
    int j = blockIdx.x;
    float s = 0.0f;
    for (int t = threadIdx.x; t < N; t += blockDim.x) s += j < E ? __expf(logits[(size_t)t * E + j] - lse[t]) : lse[t] * lse[t];
    s = block_sum(s);
    if (threadIdx.x == 0) stats[j < E ? j : 2 * E] = s;
    if (j == E)
        for (int e = threadIdx.x; e < E; e += blockDim.x) stats[E + e] = members ? moe_set_expert_count(counts, members, e, per, K) : counts[e];
}

// One thread: the aux loss and routing, and f̂, from the statistics of n_total tokens (moe.h's formula).
__global__ void moe_aux_finish_kernel(MoERouting *out, float *fhat, const double *stats, long n_total, int E, int K) {
    *out = st_moe_aux_from_stats(fhat, stats, n_total, E, K);
}

// Router logits, top-k and gates of N tokens (sets: also each token's set, st->sid and st->kof).
static void moe_route_gpu(MoEGPUState *st, const floatX *x, const floatX *router, int N, const MoEShape *s, int sets = 0) {
    const int E = s->experts, K = s->topk, din = s->btt.d_in;
    if (N > st->capacity) fatal("internal: BTT-MoE layer called on %d rows, allocated for %d", N, st->capacity);
    st->N = N;
    // logits (fp32, row-major N x E) = x Rᵀ: column-major (E x N) = Rᵀ-op (E x din) · x (din x N)
    st_step("router logits");
    st_gemm_ex(CUBLAS_OP_T, CUBLAS_OP_N, E, N, din, router, CUBLAS_LOWP, din, x, CUBLAS_LOWP, din, 0.0f, st->logits, CUDA_R_32F, E);
    st_step("top-k, gate softmax");
    moe_route_kernel<<<ceil_div_i(N, 128), 128>>>(st->sel, st->gate, st->lse, st->logits, st->forced_sel, N, E, K, sets ? st->sid : NULL,
                                                  sets ? st->kof : NULL);
    cudaCheckLaunch();
}

// How a layer's tokens were grouped into tiles of rows for the tiled plans: by expert (a row per
// (token, k) pair through the expert's rank-1 BTT) or by set of experts (moe_sets.cuh: a row per
// token through the set's rank-k BTT, its components gated in the forward's permute).
typedef struct {
    int sets;            // 1: by set
    int groups;          // G: experts or sets; group q's rows are offsets[q] .. offsets[q + 1]
    int tile_rows;       // T
    int per_token;       // grouped rows a token makes (K by expert, 1 by set); order's entries divide by it
    BTTShape shape;      // a group's BTT
    const int *set_experts;  // by set: each set's experts (its cores); else NULL
    const int *kof;      // by set: each (token, k)'s component of its set's BTT (the gate step); else NULL
    const int *members;  // by set: the `per` sets that contain each expert (the weight partials' sum); else NULL
    int per;
} MoEGrouping;
static inline MoEGrouping moe_grouping(const MoEGPUState *st, const MoEShape *s, int sets) {
    MoEGrouping g;
    g.sets = sets;
    g.groups = sets ? st->S : s->experts;
    g.tile_rows = sets ? st->set_tile_rows : st->tile_rows;
    g.per_token = sets ? 1 : s->topk;
    g.shape = sets ? moe_set_shape(s) : moe_expert_shape(s);
    g.set_experts = sets ? st->set_experts : NULL;
    g.kof = sets ? st->kof : NULL;
    g.members = sets ? st->members : NULL;
    g.per = sets ? (int)moe_binom(s->experts - 1, s->topk - 1) : 1;
    return g;
}
// The grouped rows of the tile slots N tokens can fill (the spare tile after them not included).
static inline int moe_grouping_rows(const MoEGrouping *g, int N) { return moe_max_tiles(N * g->per_token, g->groups, g->tile_rows) * g->tile_rows; }

// Each group's cores copied out of the rank components into sc->w0x, sc->w1x.
static void moe_group_cores(MoEGPUScratch *sc, const MoEGrouping *g, const floatX *W0, const floatX *W1, const MoEShape *s) {
    const size_t q0 = btt_w0_size(&g->shape), q1 = btt_w1_size(&g->shape);
    st_step(g->sets ? "sets' cores" : "experts' cores");
    moe_group_cores_kernel<<<ceil_div_i((long)(g->groups * (q0 + q1)), 256), 256>>>(sc->w0x, sc->w1x, W0, W1, g->set_experts, g->groups,
                                                                                   s->experts, g->shape.rank, s->btt.eps, q0, q1);
    cudaCheckLaunch();
}

// The forward up to the experts: router logits, top-k and gates, the grouping by expert in tiles
// of T rows (tile_expert: their experts; T = 1: no padding, dev/cuda/moe_layer's v1) and the
// experts' cores copied out of the rank components.
static void moe_route_group_gpu(MoEGPUState *st, MoEGPUScratch *sc, int *tile_expert, int T, const floatX *x, const floatX *W0,
                                const floatX *W1, const floatX *router, int N, const MoEShape *s) {
    const int E = s->experts, K = s->topk, NK = N * K;
    moe_route_gpu(st, x, router, N, s);
    st->sets_ran = 0;
    st_step("grouping by expert");
    moe_group_gpu(st->order, st->pos, st->counts, st->offsets, tile_expert, st->group, st->sel, NK, E, T);
    const MoEGrouping g = moe_grouping(st, s, 0);
    moe_group_cores(sc, &g, W0, W1, s);
}

// The tiled plans' forward of a grouping (the groups' cores in sc->w0x, sc->w1x): x gathered into
// the grouped rows, every tile's BTT into the grouped output rows sc->yg and the saved z (by set,
// its components scaled by the gates; zt: -sk 4's layout, by expert only).
static void moe_forward_tiled(MoEGPUState *st, MoEGPUScratch *sc, const floatX *x, const MoEShape *s, const MoEGrouping *g, int zt) {
    const int G = g->groups, T = g->tile_rows, rows = moe_grouping_rows(g, st->N);
    Plan f;
    plan_moe_tiled(&f, NULL, NULL, &g->shape, rows / T, T, 1, zt);
    st_step("gather x");
    moe_gather(sc->xg, x, st, G, rows, T, g->per_token, s->btt.d_in);
    void *buf[PB_COUNT] = {0};
    buf[PB_X] = sc->xg; buf[PB_Y] = sc->yg; buf[PB_Z] = st->z; buf[PB_T1] = sc->t1; buf[PB_W0] = sc->w0x; buf[PB_W1] = sc->w1x;
    plan_tiled_run_gpu(&f, buf, st->tile_expert, st->offsets + G, sc->ptrs, g->sets ? "sets" : "experts", g->sets ? st->rgate : NULL);
}

// The set path's forward (moe_sets.cuh; st->sets): the routing, each token's set, the grouping by
// set, the sets' cores; then with g_st_fused (and a shape the kernel takes) every set's rank-k
// BTT in ONE segmented launch of btt_fused.cuh's kernel, x rows read through the grouping, each
// component of the z tile scaled by its gate between the stages; else x gathered once per token
// and per tile the rank-k BTT's plan, whose permute of z scales each component by its gate.
// Either way the saved z is gated and rounded as the plans round it, so either backward reads
// it; each token's row copied back with the bias (and GELU).
static void moe_forward_sets_gpu(floatX *y, MoEGPUState *st, MoEGPUScratch *sc, const floatX *x, const floatX *W0, const floatX *W1,
                                 const floatX *router, const floatX *bias, int N, const MoEShape *s, floatX *pre_gelu, int y_ld) {
    const int K = s->topk, S = st->S, dout = s->btt.d_out;
    const MoEGrouping g = moe_grouping(st, s, 1);
    const int rows = moe_grouping_rows(&g, N);
    moe_route_gpu(st, x, router, N, s, 1);
    st->sets_ran = 1;
    g_moe_sets_runs++;
    st_step("grouping by set");
    moe_group_gpu(st->order, st->pos, st->counts, st->offsets, st->tile_expert, st->group, st->sid, N, S, g.tile_rows);
    moe_set_row_gates_kernel<<<ceil_div_i((long)rows * K, 256), 256>>>(st->rgate, st->gate, st->kof, st->order, st->offsets + S, rows, K);
    cudaCheckLaunch();
    moe_group_cores(sc, &g, W0, W1, s);
    if (g_st_fused) st_step(g_btt_mma ? "sets, fused on mma.sync (one launch; W1 packed first)" : "sets, fused (one launch)");
    // the padding rows of z stay unwritten: the plans' backward gathers zero dy rows there
    const int fused = g_st_fused && btt_forward_fused_seg(sc->yg, st->z, x, st->order, 1, sc->w0x, sc->w1x, st->counts, st->offsets, S, N,
                                                          &g.shape, st->tiles, st->rgate);
    g_moe_sets_fused_runs += fused;
    st->sets_fused_ran = fused;
    if (!fused) moe_forward_tiled(st, sc, x, s, &g, 0);
    st_step(pre_gelu ? "rows back (bias, GELU)" : "rows back (bias)");
    moe_combine_kernel<<<ceil_div_i((long)N * dout / 8, 256), 256>>>(y, sc->yg, NULL, st->pos, bias, N, 1, dout, pre_gelu, y_ld ? y_ld : dout,
                                                                       0);
    cudaCheckLaunch();
}

// Whether a forward now takes the set path: the layer groups by set and the kernels are the
// cuBLAS plans or the fused kernel (-sk 0..3, 5; -sk 4's layout groups by expert).
static inline int moe_sets_now(const MoEGPUState *st) { return st->sets && st->use_sets && !g_st_zt; }

// y (N, d_out) overwritten; st keeps what the backward needs. x, W0, W1, router: the layer's
// input and tensors. With g_st_fused and a shape btt_fused.cuh supports, the experts run as one
// segmented fused launch (x gathered on the fly); else the tiled cuBLAS plans on gathered rows.
// Either way nothing waits for the host. With pre_gelu: pre_gelu = the layer's output, y = its
// GELU (both written by the combine). With st->use_sets (but not -sk 4), grouped by set of
// experts instead (moe_forward_sets_gpu: on the plans, or fused with g_st_fused).
static void moe_forward_gpu(floatX *y, MoEGPUState *st, MoEGPUScratch *sc, const floatX *x, const floatX *W0, const floatX *W1,
                            const floatX *router, const floatX *bias, int N, const MoEShape *s, floatX *pre_gelu = NULL, int y_ld = 0) {
    if (moe_sets_now(st)) {
        moe_forward_sets_gpu(y, st, sc, x, W0, W1, router, bias, N, s, pre_gelu, y_ld);
        return;
    }
    const int E = s->experts, K = s->topk, dout = s->btt.d_out, NK = N * K;
    const BTTShape b1 = moe_expert_shape(s);
    moe_route_group_gpu(st, sc, st->tile_expert, st->tile_rows, x, W0, W1, router, N, s);
    if (g_st_fused) st_step(g_btt_mma ? "experts, fused on mma.sync (one launch; W1 packed first)" : "experts, fused (one launch)");
    const int fused = g_st_fused && btt_forward_fused_seg(sc->yg, st->z, x, st->order, K, sc->w0x, sc->w1x, st->counts, st->offsets, E, NK,
                                                          &b1, st->tiles);
    if (!fused) {
        const MoEGrouping g = moe_grouping(st, s, 0);
        g_st_zt_runs += g_st_zt;
        moe_forward_tiled(st, sc, x, s, &g, g_st_zt);
    }
    st_step(pre_gelu ? "combine (gate, bias, GELU)" : "combine (gate, bias)");
    moe_combine_kernel<<<ceil_div_i((long)N * dout / 8, 256), 256>>>(y, sc->yg, st->gate, st->pos, bias, N, K, dout, pre_gelu,
                                                                       y_ld ? y_ld : dout, 0);
    cudaCheckLaunch();
}

// The statistics of the aux loss over this process's N tokens into st->stats (device doubles,
// moe.h's MOE_AUX_STATS layout). Data-parallel ranks sum them (all-reduce) before the finish.
static void moe_aux_stats_gpu(MoEGPUState *st, const MoEShape *s) {
    const MoEGrouping g = moe_grouping(st, s, st->sets_ran);  // by set, each expert's count sums its sets'
    moe_aux_stats_kernel<<<s->experts + 1, 256>>>(st->stats, st->logits, st->lse, st->counts, st->N, s->experts, g.members, g.per, s->topk);
    cudaCheckLaunch();
}

// The aux loss and routing from st->stats summed over n_total tokens into *out_dev (on the
// device), and f̂ on the device for the backward. Nothing waits: the caller reads out_dev when it
// reads the loss.
static void moe_aux_finish_gpu(MoEGPUState *st, long n_total, const MoEShape *s, MoERouting *out_dev) {
    moe_aux_finish_kernel<<<1, 1>>>(out_dev, st->fhat, st->stats, n_total, s->experts, s->topk);
    cudaCheckLaunch();
}

// The tiled plans' backward of a grouping (the groups' cores in sc->w0x, sc->w1x) up to the
// router: dy and x gathered into the grouped rows, dZu, the gate step (dgate of each (token, k)
// pair; t1 = gate·dZ permuted; by expert t2 = gate·z for the rest's Z, by set the saved z is
// gated already), dx rows (gated) and per-tile weight partials, summed per expert into dW0, dW1
// (by set over the sets that contain it), in a fixed order. zt: -sk 4's layout (by expert only).
static void moe_backward_tiled(floatX *dW0, floatX *dW1, const floatX *dy, const floatX *x, MoEGPUState *st, MoEGPUScratch *sc,
                               const MoEShape *s, const MoEGrouping *g, int want_dx, int dy_ld, int zt) {
    const int G = g->groups, T = g->tile_rows, rows = moe_grouping_rows(g, st->N);
    const size_t n0 = btt_w0_size(&s->btt), n1 = btt_w1_size(&s->btt), q0 = btt_w0_size(&g->shape), q1 = btt_w1_size(&g->shape);
    Plan pd, pr;
    plan_moe_tiled(NULL, &pd, &pr, &g->shape, rows / T, T, want_dx, zt);
    void *buf[PB_COUNT] = {0};
    buf[PB_X] = sc->xg; buf[PB_Z] = st->z; buf[PB_DY] = sc->yg; buf[PB_DX] = sc->dxg; buf[PB_T1] = sc->t1; buf[PB_T2] = sc->t2;
    buf[PB_W0] = sc->w0x; buf[PB_W1] = sc->w1x; buf[PB_DW0] = sc->part0; buf[PB_DW1] = sc->part1;
    st_step("gather dy");  // x too: xg holds the forward's only if no other layer ran since
    moe_gather(sc->yg, dy, st, G, rows, T, g->per_token, s->btt.d_out, dy_ld);
    st_step("gather x");
    moe_gather(sc->xg, x, st, G, rows, T, g->per_token, s->btt.d_in);
    // dZu = dY W1ᵀ: (phi, gamma, rho) layout in t2; -sk 4: each tile's transposed in t1
    plan_tiled_run_gpu(&pd, buf, st->tile_expert, st->offsets + G, sc->ptrs, g->sets ? "sets' dZu" : "experts' dZu");
    st_step("gate backward");
    if (zt) {
        g_st_zt_runs++;
        const dim3 grid(rows / T, ceil_div_i(T, MOE_GATE_ZT_COLS)), block(MOE_GATE_ZT_COLS, MOE_GATE_ZT_SLICES);
        moe_gate_backward_zt_kernel<<<grid, block>>>(sc->dgate, sc->t1, st->z, st->gate, st->order, st->offsets + G, T, (int)moe_z_row(s));
        cudaCheckLaunch();
    } else {
        moe_gate_backward_t(sc->dgate, sc->t1, sc->t2, st->z, st, G, rows, &g->shape, MOE_GATE_T_SMEM, g->kof, g->sets);
        if (!g->sets) buf[PB_Z] = sc->t2;
    }
    plan_tiled_run_gpu(&pr, buf, st->tile_expert, st->offsets + G, sc->ptrs, g->sets ? "sets' dx, dW" : "experts' dx, dW");
    st_step(g->sets ? "dW partials summed per expert over its sets" : "dW partials summed per expert");
    moe_partials_scatter_kernel<float><<<ceil_div_i((long)(n0 + n1), 256), 256>>>(dW0, dW1, (const float *)sc->part0, (const float *)sc->part1,
                                                                                  st->offsets, g->members, n0, n1, s->experts, g->shape.rank,
                                                                                  s->btt.eps, g->per, q0, q1, T);
    cudaCheckLaunch();
}

// The fused backward's first launch for either grouping: the groups' transposed cores (b each,
// from the groups' cores in w0x, w1x), then every group's dx (into dxg) and dZu (into t1) in ONE
// segmented launch of btt_fused.cuh's kernel on dy (the transposed BTT; dy rows read through the
// grouping, rows_total grouped rows, K a token). gate (the set path's per-row gates): dZu saved as
// stage 1 leaves it, then gated in shared memory for dx. 0 (nothing launched but the cores) where
// -sk asks for no fused kernel or it does not take the shape.
static int moe_dx_dzu_fused(MoEGPUState *st, MoEGPUScratch *sc, const floatX *dy, const BTTShape *b, int groups, int K, int rows_total,
                            const float *gate, const char *who) {
    const BTTShape bt = btt_shape_transposed(b);
    if (!g_st_fused || !btt_fused_supported(&bt, btt_fused_smem_limit())) return 0;
    char step[96];
    snprintf(step, sizeof(step), "%s transposed cores", who);
    st_step(step);
    btt_transposed_cores_gpu(sc->w0t, sc->w1t, sc->w0x, sc->w1x, b, groups);
    snprintf(step, sizeof(step), "%s dx, dZu, fused %s", who, g_btt_mma ? "on mma.sync (one launch; W1 packed first)" : "(one launch)");
    st_step(step);
    return btt_forward_fused_seg(sc->dxg, sc->t1, dy, st->order, K, sc->w0t, sc->w1t, st->counts, st->offsets, groups, rows_total, &bt, st->tiles,
                                 gate, gate != NULL);
}

// The rest of the fused backward for either grouping, after moe_dx_dzu_fused: the gate step
// (dgate; dZ = gate·dZu in place in t1; kof: the set path's, moe_gate_backward_fused_kernel), then
// every group's dW1[f] = Z_fᵀ (gate·dY)_f (wgate: the experts' gates; NULL where z is saved gated)
// and dW0[g] = X_gᵀ dZ_g over its rows, into dw1x, dw0x: one seg_wgrad launch each, dy and x read
// through the grouping, no gathered copies.
static void moe_gate_wgrad_fused(MoEGPUState *st, MoEGPUScratch *sc, const floatX *dy, const floatX *x, const MoEShape *s, const BTTShape *b,
                                 int groups, int K, int rows, const int *kof, const float *wgate, const char *who) {
    st_step("gate backward");
    moe_gate_backward_fused_kernel<<<ceil_div_i(rows, 8), 256>>>(sc->dgate, sc->t1, st->z, st->gate, st->order, st->offsets + groups, rows,
                                                                 b->gamma, b->phi, b->rank, kof);
    cudaCheckLaunch();
    const int G = b->gamma, P = b->phi, A = b->alpha, Ee = b->eps, gr = G * b->rank, fr = P * b->rank, zrow = (int)btt_z_row(b);
    const int din = s->btt.d_in, dout = s->btt.d_out;
    SegWgrad w1 = {st->z, dy, sc->dw1x, zrow, dout, Ee, gr, Ee, (long long)gr * Ee, (long long)btt_w1_size(b), gr, Ee, P, groups, st->counts,
                   st->offsets, 0, st->order, K, 0, 1, wgate};
    SegWgrad w0 = {x, sc->t1, sc->dw0x, din, zrow, fr, A, fr, (long long)A * fr, (long long)btt_w0_size(b), A, fr, G, groups, st->counts,
                   st->offsets, 0, st->order, K, 1, 0, NULL};
    char step[64];
    snprintf(step, sizeof(step), "%s dW0, dW1, fused (seg_wgrad)", who);
    st_step(step);
    if (!seg_wgrad(&w1) || !seg_wgrad(&w0)) fatal("internal: seg_wgrad does not take a shape the fused BTT kernel takes");
}

// The expert path's backward up to the router (dxg: each pair's dx row, gated unless fused; the
// cores' gradients accumulated): the fused kernels where g_st_fused and the shape allow, else the
// tiled plans. Returns 1 when it ran fused.
static int moe_backward_experts_body(floatX *dW0, floatX *dW1, const floatX *dy, const floatX *x, MoEGPUState *st, MoEGPUScratch *sc,
                                     const floatX *W0, const floatX *W1, const MoEShape *s, int want_dx, int dy_ld, int dx_acc) {
    const int N = st->N, E = s->experts, K = s->topk;
    const BTTShape b1 = moe_expert_shape(s);
    const size_t p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1), n0 = p0 * E, n1 = p1 * E;
    const MoEGrouping g = moe_grouping(st, s, 0);
    moe_group_cores(sc, &g, W0, W1, s);
    // dxg (ungated) and t1 = dZu, (gamma, phi, rho)
    if (!(want_dx && !dy_ld && !dx_acc && moe_dx_dzu_fused(st, sc, dy, &b1, E, K, N * K, NULL, "experts'"))) {
        moe_backward_tiled(dW0, dW1, dy, x, st, sc, s, &g, want_dx, dy_ld, g_st_zt);
        return 0;
    }
    // dW1[e][f] = Z_fᵀ (gate·dY)_f, dW0[e][g] = X_gᵀ dZ_g over expert e's rows
    moe_gate_wgrad_fused(st, sc, dy, x, s, &b1, E, K, moe_grouping_rows(&g, N), NULL, st->gate, "experts'");
    st_step("experts' gradients into the cores");
    moe_cores_scatter_kernel<<<ceil_div_i((long)(n0 + n1), 256), 256>>>(dW0, dW1, sc->dw0x, sc->dw1x, n0, n1, E, s->btt.eps, p0, p1);
    cudaCheckLaunch();
    return 1;
}

// The set path's backward up to the router (moe_sets.cuh), dxg a row per token, gated: the sets'
// cores, then with g_st_fused (dx wanted, dy contiguous, a shape the kernel takes) every set's dx
// and dZu in ONE segmented launch of the fused kernel on dy (the transposed rank-k BTT, dy rows
// read through the grouping; dZu saved as stage 1 leaves it, then gated in shared memory for dx),
// the gate step (dgate from the gated z and dZu; dZ = gate·dZu in place), and the sets' dW0 and
// dW1 in one seg_wgrad launch each (the gated z and dy; x and dZ), summed per expert over its
// sets; else the tiled plans. Returns 1 when it ran fused.
static long g_moe_sets_fused_bwd_runs = 0;  // set-path backwards on the fused kernel (tests)
static int moe_backward_sets_body(floatX *dW0, floatX *dW1, const floatX *dy, const floatX *x, MoEGPUState *st, MoEGPUScratch *sc,
                                  const floatX *W0, const floatX *W1, const MoEShape *s, int want_dx, int dy_ld, int dx_acc) {
    g_moe_sets_runs++;
    const MoEGrouping g = moe_grouping(st, s, 1);
    moe_group_cores(sc, &g, W0, W1, s);
    const BTTShape bk = g.shape;
    const int N = st->N, S = st->S, K = s->topk, rows = moe_grouping_rows(&g, N), zrow = (int)btt_z_row(&bk);
    // dxg gated inside the kernel, t1 = dZu as stage 1 leaves it
    if (!(want_dx && !dy_ld && !dx_acc && moe_dx_dzu_fused(st, sc, dy, &bk, S, 1, N, st->rgate, "sets'"))) {
        if (st->sets_fused_ran) {
            st_step("z's padding rows zeroed");
            moe_zero_padding_rows_kernel<<<ceil_div_i((long)rows * zrow / 8, 256), 256>>>(st->z, st->order, st->offsets + S, rows, zrow);
            cudaCheckLaunch();
        }
        moe_backward_tiled(dW0, dW1, dy, x, st, sc, s, &g, want_dx, dy_ld, 0);
        return 0;
    }
    g_moe_sets_fused_bwd_runs++;
    // each set's dW1[f] = (gate·Z)_fᵀ dY_f (z is saved gated) and dW0[g] = X_gᵀ dZ_g over its rows
    moe_gate_wgrad_fused(st, sc, dy, x, s, &bk, S, 1, rows, st->kof, NULL, "sets'");
    st_step("sets' gradients summed per expert");
    const size_t q0 = btt_w0_size(&bk), q1 = btt_w1_size(&bk), n0 = btt_w0_size(&s->btt), n1 = btt_w1_size(&s->btt);
    moe_partials_scatter_kernel<floatX><<<ceil_div_i((long)(n0 + n1), 256), 256>>>(dW0, dW1, (const floatX *)sc->dw0x, (const floatX *)sc->dw1x,
                                                                                   (const int *)NULL, st->members, n0, n1, s->experts, K,
                                                                                   s->btt.eps, g.per, q0, q1, 1);
    cudaCheckLaunch();
    return 1;
}

// dx (N, d_in) overwritten (may be NULL); dW0, dW1, drouter, dbias accumulated. With g_st_fused
// and dx, every expert's dx and dZu come from ONE segmented launch of the fused kernel over dy
// (the transposed BTT, btt.h; dy rows read through the grouping), the gate is applied in the
// combine (dx is linear in dZ), and every expert's dW0 and dW1 come from one seg_wgrad launch
// each (seg_wgrad.cuh, reading x and gate·dy through the grouping: no gathered copies). Else the
// tiled cuBLAS plans on gathered rows, their per-tile weight-gradient partials summed per expert.
// Nothing waits for the host either way. With pre_gelu, dx is the gradient before the GELU of
// pre_gelu (a separate pass: dx's router term comes last). dy_ld, dx_acc: as btt_backward_gpu's
// (the plans only). After a forward grouped by set, the set path's backward (its saved z is the
// set path's): on the fused kernels with g_st_fused as above but the gates applied inside the
// kernel (moe_backward_sets_body), else on the plans. Returns 1 when it ran fused.
static int moe_backward_gpu(floatX *dx, floatX *dW0, floatX *dW1, floatX *drouter, floatX *dbias, const floatX *dy, float daux,
                            const floatX *x, MoEGPUState *st, MoEGPUScratch *sc, const floatX *W0, const floatX *W1,
                            const floatX *router, const MoEShape *s, float *colsum_scratch, const floatX *pre_gelu = NULL, int dy_ld = 0,
                            int dx_acc = 0) {
    if (dx_acc && pre_gelu) fatal("internal: a BTT-MoE backward cannot both add to dx and apply GELU'");
    const int N = st->N, E = s->experts, K = s->topk, din = s->btt.d_in, dout = s->btt.d_out;
    // the expert path's fused kernel leaves dxg ungated (the combine then takes the gates); by set
    // dxg is gated on either path
    int fused, dxg_ungated = 0;
    if (st->sets_ran) fused = moe_backward_sets_body(dW0, dW1, dy, x, st, sc, W0, W1, s, dx != NULL, dy_ld, dx_acc);
    else fused = dxg_ungated = moe_backward_experts_body(dW0, dW1, dy, x, st, sc, W0, W1, s, dx != NULL, dy_ld, dx_acc);
    // the router's gradient and dx from the grouped rows: a token's Kc rows of dxg (gated, except
    // the fused path's); the set path has one a token
    const int Kc = st->sets_ran ? 1 : K;
    st_step("router: d logits, d router");
    moe_dlogits_kernel<<<ceil_div_i(N, 128), 128>>>(sc->dlogits, sc->dlogits_bf16, st->logits, st->lse, st->gate, sc->dgate, st->sel, st->fhat,
                                                    N, E, K, daux);
    cudaCheckLaunch();
    // drouter (E x din) += dlogitsᵀ x: column-major (din x E) = x (din x N) · dlogits-op (N x E)
    st_gemm_ex(CUBLAS_OP_N, CUBLAS_OP_T, din, E, N, x, CUBLAS_LOWP, din, sc->dlogits_bf16, CUBLAS_LOWP, E, 1.0f, drouter, CUBLAS_LOWP, din);
    // dx and pre_gelu are read 16 bytes at a time on either path; the one pass also reads R so
    const int one_pass = E <= MOE_DX_ONE_PASS_EXPERTS && (uintptr_t)router % 16 == 0;
    if (dx && one_pass) {
        st_step(pre_gelu ? "dx: combine, router's share, GELU'" : "dx: combine, router's share");
        moe_dx_kernel<<<ceil_div_i((long)N * din / 8, 256), 256>>>(dx, sc->dxg, dxg_ungated ? st->gate : NULL, st->pos, sc->dlogits, router,
                                                                    pre_gelu, N, Kc, E, din, dx_acc);
        cudaCheckLaunch();
    } else if (dx) {
        st_step("dx combine");
        moe_combine_kernel<<<ceil_div_i((long)N * din / 8, 256), 256>>>(dx, sc->dxg, dxg_ungated ? st->gate : NULL, st->pos, NULL, N, Kc, din,
                                                                       NULL, din, dx_acc);
        cudaCheckLaunch();
        // dx += dlogits R: column-major (din x N) += R (din x E) · dlogits (E x N)
        st_step("dx += d logits R");
        st_gemm_ex(CUBLAS_OP_N, CUBLAS_OP_N, din, N, E, router, CUBLAS_LOWP, din, sc->dlogits_bf16, CUBLAS_LOWP, E, 1.0f, dx, CUBLAS_LOWP, din);
        if (pre_gelu) {
            st_step("GELU'");
            gelu_backward_inplace(dx, pre_gelu, (size_t)N * din);
        }
    }
    st_bias_backward_gpu(dbias, dy, N, dout, colsum_scratch, dy_ld);
    return fused;
}
