// zero.h: ZeRO stage 1 as data: which slice of the flat parameter vector each data-parallel rank
// owns (its AdamW moments, and on the GPU its fp32 master weights), and how that slice meets
// each tensor of the parameter table. Shared by the CPU (MPI) and GPU (NCCL) trainers.
//
// The vector of `total` elements is cut into nproc equal slices of shard = ceil(total / nproc);
// buffers that the collectives touch (gradients, weights) are allocated with `padded` =
// shard * nproc elements, the tail zero, so a model whose size does not divide by nproc (any
// structured table) needs no special case: the last rank's slice simply ends in padding.
#pragma once
#include <stddef.h>
#include "params.h"

typedef struct {
    int stage;      // 0: every rank holds the whole optimizer state; 1: sharded
    size_t total;   // parameters
    size_t shard;   // elements per rank (= total with stage 0)
    size_t padded;  // shard * nproc with stage 1, else total
    size_t lo, hi;  // this rank's parameters [lo, hi), hi <= total
} ZeroShard;

static inline void zero_shard_init(ZeroShard *z, int stage, size_t total, int rank, int nproc) {
    z->stage = stage && nproc > 1 ? 1 : 0;
    z->total = total;
    if (!z->stage) {
        z->shard = z->padded = total;
        z->lo = 0;
        z->hi = total;
        return;
    }
    z->shard = (total + (size_t)nproc - 1) / (size_t)nproc;
    z->padded = z->shard * (size_t)nproc;
    z->lo = z->shard * (size_t)rank;
    z->hi = z->lo + z->shard < total ? z->lo + z->shard : total;
    if (z->lo > total) z->lo = total;
}

// The part of tensor p inside this rank's slice: elements [*j0, *j1) of the tensor (empty when
// *j0 == *j1). Element j of the tensor is parameter p->offset + j, and its optimizer state sits
// at p->offset + j - lo in the rank's shard buffers.
static inline void zero_tensor_range(const ParamTensor *p, const ZeroShard *z, size_t *j0, size_t *j1) {
    size_t a = p->offset, b = p->offset + p->numel;
    size_t lo = a > z->lo ? a : z->lo, hi = b < z->hi ? b : z->hi;
    if (hi < lo) hi = lo;
    *j0 = lo - a;
    *j1 = hi - a;
    if (lo >= b || hi <= a) *j0 = *j1 = 0;
}
