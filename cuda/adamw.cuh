// cuda/adamw.cuh: fused AdamW over the parameter table in one launch (a table of chunks): fp32 master weights (optional) and moments, per-tensor lr multiplier and decay flag, stochastic rounding to the bf16 weights.
#pragma once
#include "common.cuh"
#include "../common/params.h"
#include "../common/zero.h"

// The stochastic-rounding seed of tensor `tensor` at update `t` (1-based): a pure function, so
// that a resumed run re-derives the bf16 weights of its checkpoint's step bit for bit.
__host__ __device__ inline unsigned int adamw_seed(long t, int tensor) {
    return squirrel_noise5((unsigned int)tensor, squirrel_noise5((unsigned int)t, 0x5eed1234u));
}

// The same update as the CPU trainer's gpt2_update, for element i of a tensor (its index j in
// the tensor, which the rounding hashes: an element rounds the same however the tensor is split
// over ranks or chunks). master NULL (-w 0): the bf16 weight is the one being updated, and
// stochastic rounding keeps it unbiased.
__device__ __forceinline__ void adamw_element(floatX *params, float *master, const floatX *grads, float *m, float *v, size_t i, size_t j,
                                              float lr, float beta1, float beta2, float bc1, float bc2, float eps, float wd, float grad_scale,
                                              unsigned int seed) {
    float g = (float)grads[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float mhat = mi / bc1, vhat = vi / bc2;
    float p = master ? master[i] : (float)params[i];
    p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
    if (master) master[i] = p;
    params[i] = stochastic_round_bf16(p, j, seed);
}

// One launch updates every tensor: the table's tensors (this rank's ZeRO-1 slice of them) cut
// into chunks of at most ADAMW_CHUNK elements, each inside one tensor, a block per chunk. GPT-2
// 124M has 148 tensors, two thirds of them bias and LayerNorm vectors (gpt2_124M_btt4: 268, gpt2_124M_btt_moe: 340):
// a launch per tensor cost more in launches than the small tensors' updates.
#define ADAMW_CHUNK 8192
#define ADAMW_THREADS 512
typedef struct {
    size_t off;       // the chunk's first element in params, master and grads
    size_t moff;      // ... in m and v (from the slice's start with ZeRO-1)
    size_t j0;        // ... in its tensor (what the rounding hashes)
    unsigned int n;   // elements, <= ADAMW_CHUNK
    int tensor;       // its tensor's index in the table (the rounding seed)
    float lr_mult;    // the tensor's
    int decay;        // the tensor's weight decay flag
} AdamWChunk;

// The chunk table of a parameter table and a ZeRO-1 slice (NULL or stage 0: every element),
// built once on the host and kept on the device. pt_total, lo, hi: what it was built for.
typedef struct {
    AdamWChunk *chunks;  // device
    int n;
    size_t pt_total, lo, hi;
} AdamWPlan;

// The chunks on the host (count only, with out NULL); returns their number.
static int adamw_chunks(AdamWChunk *out, const ParamTable *pt, const ZeroShard *z) {
    int n = 0, sharded = z && z->stage;
    for (int i = 0; i < pt->n; i++) {
        const ParamTensor *p = &pt->t[i];
        size_t j0 = 0, j1 = p->numel;
        if (sharded) zero_tensor_range(p, z, &j0, &j1);
        for (size_t j = j0; j < j1; j += ADAMW_CHUNK, n++) {
            if (!out) continue;
            AdamWChunk *c = &out[n];
            c->off = p->offset + j;
            c->moff = c->off - (sharded ? z->lo : 0);
            c->j0 = j;
            c->n = (unsigned int)(j1 - j < ADAMW_CHUNK ? j1 - j : ADAMW_CHUNK);
            c->tensor = i;
            c->lr_mult = p->lr_mult;
            c->decay = p->decay;
        }
    }
    return n;
}

static void adamw_plan_free(AdamWPlan *plan) {
    if (plan->chunks) cudaCheck(cudaFree(plan->chunks));
    memset(plan, 0, sizeof(*plan));
}

// (Re)builds plan for pt and z unless it was built for them (the same table size and slice).
static void adamw_plan_build(AdamWPlan *plan, const ParamTable *pt, const ZeroShard *z) {
    const int sharded = z && z->stage;
    const size_t lo = sharded ? z->lo : 0, hi = sharded ? z->hi : pt->total;
    if (plan->chunks && plan->pt_total == pt->total && plan->lo == lo && plan->hi == hi) return;
    adamw_plan_free(plan);
    const int n = adamw_chunks(NULL, pt, z);
    plan->pt_total = pt->total;
    plan->lo = lo;
    plan->hi = hi;
    if (n == 0) return;  // an empty slice: nothing to update
    AdamWChunk *h = (AdamWChunk *)mallocCheck((size_t)n * sizeof(AdamWChunk));
    adamw_chunks(h, pt, z);
    plan->chunks = cudaMallocNamed(AdamWChunk, n, "AdamW's chunk table");
    cudaCheck(cudaMemcpy(plan->chunks, h, (size_t)n * sizeof(AdamWChunk), cudaMemcpyHostToDevice));
    plan->n = n;
    free(h);
}

__global__ void __launch_bounds__(ADAMW_THREADS) adamw_chunks_kernel(floatX *params, float *master, const floatX *grads, float *m, float *v,
                                                                     const AdamWChunk *chunks, int nchunks, float lr, float beta1, float beta2,
                                                                     float bc1, float bc2, float eps, float wd, float grad_scale, long t) {
    for (int b = blockIdx.x; b < nchunks; b += gridDim.x) {
        const AdamWChunk c = chunks[b];
        const unsigned int seed = adamw_seed(t, c.tensor);
        const float clr = lr * c.lr_mult, cwd = c.decay ? wd : 0.0f;  // the products the host formed per tensor before
        for (unsigned int k = threadIdx.x; k < c.n; k += blockDim.x)
            adamw_element(params + c.off, master ? master + c.off : NULL, grads + c.off, m + c.moff, v + c.moff, k, c.j0 + k, clr, beta1, beta2,
                          bc1, bc2, eps, cwd, grad_scale, seed);
    }
}

// AdamW step t (1-based) over plan's chunks (adamw_plan_build): one launch.
static void adamw_update_plan(const AdamWPlan *plan, floatX *params, float *master, const floatX *grads, float *m, float *v, float lr,
                              float beta1, float beta2, float eps, float weight_decay, float grad_scale, long t) {
    if (plan->n == 0) return;
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    const int grid = plan->n < 65535 * 16 ? plan->n : 65535 * 16;
    adamw_chunks_kernel<<<grid, ADAMW_THREADS>>>(params, master, grads, m, v, plan->chunks, plan->n, lr, beta1, beta2, bc1, bc2, eps,
                                                 weight_decay, grad_scale, t);
    cudaCheckLaunch();
}

// The same without a kept plan (tests, dev programs): builds one, updates, frees it. With a ZeRO-1
// slice z (stage 1), only the elements in [z->lo, z->hi), whose moments m and v are indexed from z->lo.
static void adamw_update_range(const ParamTable *pt, floatX *params, float *master, const floatX *grads, float *m, float *v, float lr,
                               float beta1, float beta2, float eps, float weight_decay, float grad_scale, long t, const ZeroShard *z) {
    AdamWPlan plan;
    memset(&plan, 0, sizeof(plan));
    adamw_plan_build(&plan, pt, z);
    adamw_update_plan(&plan, params, master, grads, m, v, lr, beta1, beta2, eps, weight_decay, grad_scale, t);
    adamw_plan_free(&plan);
}

// AdamW step t (1-based) over every tensor of the table
static void adamw_update(const ParamTable *pt, floatX *params, float *master, const floatX *grads, float *m, float *v, float lr,
                         float beta1, float beta2, float eps, float weight_decay, float grad_scale, long t) {
    adamw_update_range(pt, params, master, grads, m, v, lr, beta1, beta2, eps, weight_decay, grad_scale, t, NULL);
}

// bf16 weights from the master weights: round to nearest (t = 0: a fresh or loaded model), or
// stochastically with update t's seeds (a resumed run: the bits the uninterrupted run had)
__global__ void master_to_bf16_kernel(floatX *params, const float *master, size_t n, unsigned int seed, int stochastic) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        params[i] = stochastic ? stochastic_round_bf16(master[i], i, seed) : __float2bfloat16_rn(master[i]);
}

static inline int grid_for(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    return (int)(b < 65536 ? (b ? b : 1) : 65536);
}

// t = 0: round to nearest; t > 0: the rounding update t did
static void master_to_bf16(const ParamTable *pt, floatX *params, const float *master, long t) {
    for (int i = 0; i < pt->n; i++) {
        const ParamTensor *p = &pt->t[i];
        master_to_bf16_kernel<<<grid_for(p->numel, 512), 512>>>(params + p->offset, master + p->offset, p->numel, adamw_seed(t, i), t > 0);
        cudaCheckLaunch();
    }
}
