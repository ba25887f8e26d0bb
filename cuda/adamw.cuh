// cuda/adamw.cuh: fused AdamW over the parameter table: fp32 master weights (optional) and moments, per-tensor lr multiplier and decay flag, stochastic rounding to the bf16 weights.
#pragma once
#include "common.cuh"
#include "../common/params.h"
#include "../common/zero.h"

// The stochastic-rounding seed of tensor `tensor` at update `t` (1-based): a pure function, so
// that a resumed run re-derives the bf16 weights of its checkpoint's step bit for bit.
static inline unsigned int adamw_seed(long t, int tensor) {
    return squirrel_noise5((unsigned int)tensor, squirrel_noise5((unsigned int)t, 0x5eed1234u));
}

// The same update as the CPU trainer's gpt2_update, element by element. idx0: the index within
// its tensor of element 0 here (a ZeRO-1 slice may start inside a tensor), so that the rounding
// of an element does not depend on how the tensor is split over ranks. master NULL (-w 0): the
// bf16 weight is the one being updated, and stochastic rounding keeps it unbiased.
__global__ void adamw_kernel(floatX *params, float *master, const floatX *grads, float *m, float *v, size_t n, float lr, float beta1,
                             float beta2, float bc1, float bc2, float eps, float wd, float grad_scale, unsigned int seed, size_t idx0) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = (float)grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1, vhat = vi / bc2;
        float p = master ? master[i] : (float)params[i];
        p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
        if (master) master[i] = p;
        params[i] = stochastic_round_bf16(p, idx0 + i, seed);
    }
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

// AdamW step t (1-based) over the table's tensors; with a ZeRO-1 slice z (stage 1), only the
// elements in [z->lo, z->hi), whose moments m and v are indexed from z->lo.
static void adamw_update_range(const ParamTable *pt, floatX *params, float *master, const floatX *grads, float *m, float *v, float lr,
                               float beta1, float beta2, float eps, float weight_decay, float grad_scale, long t, const ZeroShard *z) {
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    int sharded = z && z->stage;
    for (int i = 0; i < pt->n; i++) {
        const ParamTensor *p = &pt->t[i];
        size_t j0 = 0, j1 = p->numel;
        if (sharded) zero_tensor_range(p, z, &j0, &j1);
        if (j1 <= j0) continue;
        size_t o = p->offset + j0, mo = o - (sharded ? z->lo : 0);
        adamw_kernel<<<grid_for(j1 - j0, 512), 512>>>(params + o, master ? master + o : NULL, grads + o, m + mo, v + mo, j1 - j0, lr * p->lr_mult, beta1, beta2,
                                                      bc1, bc2, eps, p->decay ? weight_decay : 0.0f, grad_scale, adamw_seed(t, i), j0);
        cudaCheckLaunch();
    }
}

// AdamW step t (1-based) over every tensor of the table
static void adamw_update(const ParamTable *pt, floatX *params, float *master, const floatX *grads, float *m, float *v, float lr,
                         float beta1, float beta2, float eps, float weight_decay, float grad_scale, long t) {
    adamw_update_range(pt, params, master, grads, m, v, lr, beta1, beta2, eps, weight_decay, grad_scale, t, NULL);
}

// t = 0: round to nearest; t > 0: the rounding update t did
static void master_to_bf16(const ParamTable *pt, floatX *params, const float *master, long t) {
    for (int i = 0; i < pt->n; i++) {
        const ParamTensor *p = &pt->t[i];
        master_to_bf16_kernel<<<grid_for(p->numel, 512), 512>>>(params + p->offset, master + p->offset, p->numel, adamw_seed(t, i), t > 0);
        cudaCheckLaunch();
    }
}
