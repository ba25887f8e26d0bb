// exec_model.h: the modelled time of a BTT or Monarch layer on its cuBLAS plans against the dense
// GEMMs on its materialized weight (-sm 2 picks, per layer, whichever is faster).
//
//   PlanRates plan_rates(peak_tflops, peak_gbps)        a GPU's modelled rates from its peaks
//   double plan_seconds(&plan, &rates)                  one plan
//   double st_plans_seconds(kind, shape, N, zt, &rates) forward + backward (dx, weights) on the plans
//                                                       (zt: -sk 4's, z stored transposed)
//   double st_dense_gemms_seconds(din, dout, N, &rates) the same layer as a dense one
//   double st_materialized_seconds(kind, shape, N, &r)  -sm 1's: the dense GEMMs plus rebuilding W
//                                                       twice and the cores' gradients from dW
//   int st_as_dense_pays(kind, shape, N, zt, &rates)    1: -sm 1's way is modelled faster
//   double st_moe_seconds(shape, N, sets, &rates)       a BTT-MoE layer, forward + backward, on the
//                                                       tiled plans grouped by expert or (sets) by set
//   int st_moe_sets_pay(shape, N, &rates)               1: -mg 1's grouping by set is modelled faster
//
// The model: each op of a plan takes max(FLOPs / GEMM rate, bytes / DRAM rate) plus a launch,
// its bytes every operand read once and every output written once (plan_op_elems, the cores
// included). A permute whose contiguous runs are shorter than 8 elements (Monarch's u: runs of nb)
// moves its bytes at a lower rate. Calibrated on the H200 (dev/bench/RESULTS.md, the run at
// dfb9d13: dense GEMMs 684–783 TFLOP/s, the plans' permutes 2.5–2.8 TB/s, Monarch's u permute
// 0.81 TB/s): the GEMM rate is 76% of the peak bf16 rate, DRAM 62% of the peak bandwidth, the
// short-run permute 17% (measured when such rows took the permute's 2-byte path; they now take
// the 16-byte one, not yet measured), a launch 4 µs. tests/test_gpu_plan.c holds the model to
// those measured layer times. The kernels that build W from the cores (-sm) have not run on a
// GPU: their rate is a guess (dev/cuda/structured_weight will measure it).
// Header-only C11 that also compiles as CUDA C++.
#pragma once
#include "gpu_plan.h"
#include "spec.h"

typedef struct {
    double gemm_flops;    // FLOP/s a large bf16 GEMM reaches
    double dram_bytes;    // bytes/s a plan's streaming ops reach
    double narrow_bytes;  // bytes/s of a permute with runs under 8 elements
    double simt_flops;    // FLOP/s of the CUDA-core kernels that build W and read dW (a guess until measured)
    double launch_s;      // per launch
} PlanRates;

// peak_tflops 0 (a GPU not in the table): the H200's ratio of GEMM rate to bandwidth.
static inline PlanRates plan_rates(double peak_tflops, double peak_gbps) {
    PlanRates r;
    r.dram_bytes = 0.62 * peak_gbps * 1e9;
    r.narrow_bytes = 0.17 * peak_gbps * 1e9;
    r.gemm_flops = peak_tflops > 0 ? 0.76 * peak_tflops * 1e12 : r.dram_bytes * (0.76 * 989.0e12) / (0.62 * 4800.0e9);
    r.simt_flops = r.gemm_flops / 45.0;  // about a quarter of the H200's 67 fp32 TFLOP/s: reads from L2, not registers
    r.launch_s = 4e-6;
    return r;
}

static inline double plan_op_seconds(const PlanOp *o, const PlanRates *r) {
    const double bytes = 2.0 * plan_op_elems(o, 1);
    if (o->kind == PLAN_PERMUTE) return bytes / ((long)o->C * o->blk >= 8 ? r->dram_bytes : r->narrow_bytes) + r->launch_s;
    const double t_flops = 2.0 * o->M * o->N * (double)o->K * o->batch * (o->tiles ? o->tiles : 1) / r->gemm_flops;
    const double t_bytes = bytes / r->dram_bytes;
    return (t_flops > t_bytes ? t_flops : t_bytes) + r->launch_s;
}

static inline double plan_seconds(const Plan *p, const PlanRates *r) {
    double t = 0.0;
    for (int i = 0; i < p->n; i++) t += plan_op_seconds(&p->op[i], r);
    return t;
}

// Forward, then backward with dx and the weight gradients, over N rows (kind STRUCT_BTT: shape is
// a BTTShape; else a MonarchShape), on -sk 0's plans or (zt) -sk 4's.
static inline double st_plans_seconds(int kind, const void *shape, int N, int zt, const PlanRates *r) {
    Plan f, b;
    memset(&f, 0, sizeof(f));
    memset(&b, 0, sizeof(b));
    if (kind == STRUCT_BTT) plan_btt_layer(&f, &b, (const BTTShape *)shape, N, zt, 1);
    else plan_monarch_layer(&f, &b, (const MonarchShape *)shape, N, zt, 1);
    return plan_seconds(&f, r) + plan_seconds(&b, r);
}

// y = x W, dx = dy Wᵀ, dW = xᵀ dy: three GEMMs.
static inline double st_dense_gemms_seconds(int din, int dout, int N, const PlanRates *r) {
    const double flops = 6.0 * N * (double)din * dout;
    const double bytes = 2.0 * (3.0 * N * din + 3.0 * N * dout + 3.0 * (double)din * dout);
    const double t_flops = flops / r->gemm_flops, t_bytes = bytes / r->dram_bytes;
    return (t_flops > t_bytes ? t_flops : t_bytes) + 3.0 * r->launch_s;
}

// The dense GEMMs, plus W rebuilt in the forward and in the backward and the cores' gradients
// from dW (materialize.cuh, st_dense_weight*): four passes over W (one kernel writes it, twice; two
// read dW), each max(W's bytes / DRAM rate, its multiply-adds / the CUDA cores' rate) plus a
// launch. Each element of W takes ρ multiply-adds for a BTT, about q/nb for a Monarch.
static inline double st_materialized_seconds(int kind, const void *shape, int N, const PlanRates *r) {
    int din, dout;
    double terms;
    if (kind == STRUCT_BTT) {
        const BTTShape *s = (const BTTShape *)shape;
        din = s->d_in; dout = s->d_out; terms = s->rank;
    } else {
        const MonarchShape *m = (const MonarchShape *)shape;
        din = m->d_in; dout = m->d_out; terms = (double)m->q / m->nb;
        if (terms < 1.0) terms = 1.0;
    }
    const double elems = (double)din * dout, t_bytes = 2.0 * elems / r->dram_bytes, t_flops = 2.0 * elems * terms / r->simt_flops;
    const double pass = (t_bytes > t_flops ? t_bytes : t_flops) + r->launch_s;
    return st_dense_gemms_seconds(din, dout, N, r) + 4.0 * pass;
}

static inline int st_as_dense_pays(int kind, const void *shape, int N, int zt, const PlanRates *r) {
    return st_materialized_seconds(kind, shape, N, r) < st_plans_seconds(kind, shape, N, zt, r);
}

// A BTT-MoE layer's forward and backward on the tiled cuBLAS plans (moe_gpu.cuh), over N tokens:
// grouped by expert (N·k rows of rank-1 BTTs, moe_tile_rows) or, with sets, by set of experts (N
// rows of rank-k BTTs, moe_set_tile_rows; moe_sets.cuh). Every tile slot the routing could fill
// runs (the shapes do not depend on the routing), so the plans are priced at the most tiles, and
// padding rows move like the others. On top of the plans: x and dy gathered into the grouped rows
// (each source row read, each grouped row written), the forward's combine (grouped output rows
// read, y written) and dx's (likewise), the gate step (z and dZu read, t1 written, and t2 on the
// expert path, whose saved z is not gated), and the fp32 per-tile weight-gradient partials
// (written: the plans count them as bf16; read once by the sum into the rank components). The
// router, the grouping and the cores are small and not counted. Not yet checked against a GPU.
static inline double st_moe_seconds(const MoEShape *s, int N, int sets, const PlanRates *r) {
    const int R = sets ? s->topk : 1, G = sets ? moe_set_count(s) : s->experts, rows_total = sets ? N : N * s->topk;
    const int T = sets ? moe_set_tile_rows(s, N) : moe_tile_rows(s, N), tiles = moe_max_tiles(rows_total, G, T);
    BTTShape bk = s->btt;
    bk.rank = R;
    const size_t p0 = btt_w0_size(&bk), p1 = btt_w1_size(&bk);
    Plan f, d, rest;
    plan_moe_tiled(&f, &d, &rest, &bk, tiles, T, 1, 0);
    const double rows = (double)tiles * T, din = s->btt.d_in, dout = s->btt.d_out, zrow = (double)btt_z_row(&bk);
    double elems = rows_total * (din + dout) + rows * (din + dout);  // the gathers of x and dy
    elems += (rows + N) * (dout + din);                              // the combines of y and dx
    elems += (sets ? 3.0 : 4.0) * rows * zrow;                       // the gate step
    elems += 3.0 * (tiles + 1) * (double)(p0 + p1);                  // the partials: fp32 written (2 bytes more), read (4)
    return plan_seconds(&f, r) + plan_seconds(&d, r) + plan_seconds(&rest, r) + 2.0 * elems / r->dram_bytes + 8.0 * r->launch_s;
}
static inline int st_moe_sets_pay(const MoEShape *s, int N, const PlanRates *r) {
    return moe_set_count(s) > 0 && st_moe_seconds(s, N, 1, r) < st_moe_seconds(s, N, 0, r);
}
