// linear.h: a linear layer of any structure as parameter-table entries: its named tensors with
// shapes, learning-rate multipliers and decay flags, and its initialisation. The trainers and the
// optimizer see only the table; the structure lives here.
#pragma once
#include <math.h>
#include "../common/params.h"
#include "../common/rng.h"
#include "btt.h"
#include "monarch.h"
#include "moe.h"
#include "spec.h"

#define LINEAR_MAX_TENSORS 3

// One linear layer of the model. w[] are the structure's tensors in a fixed order — dense: W;
// btt: W0, W1; monarch: R, L; btt_moe: W0, W1, router — and bias is -1 when there is none.
typedef struct {
    LinearSpec spec;
    int layer;          // -1 for the head
    int role;           // StructRole; a fused qkv layer has role SR_Q and d_out 3C
    int fused_qkv;
    int used;           // 0 for the k and v slots of a fused qkv layer
    int nw;
    int w[LINEAR_MAX_TENSORS];
    int bias;
} LinearDesc;

static inline int linear_num_weight_tensors(StructKind k) {
    return k == STRUCT_DENSE ? 1 : k == STRUCT_BTT_MOE ? 3 : 2;
}

// Shape, fan-in and fan-out of weight tensor i of a structure (fans for init and LR multipliers).
static inline void linear_tensor_shape(const LinearSpec *s, int i, int *ndim, size_t shape[3], int *fan_in, int *fan_out) {
    int r = s->rank;
    switch (s->kind) {
        case STRUCT_DENSE:
            *ndim = 2; shape[0] = (size_t)s->d_out; shape[1] = (size_t)s->d_in;
            *fan_in = s->d_in; *fan_out = s->d_out;
            return;
        case STRUCT_BTT:
        case STRUCT_BTT_MOE: {
            // a BTT-MoE expert is a rank-1 BTT: its fans are those of rank 1
            int rf = s->kind == STRUCT_BTT ? r : 1;
            if (i == 0) {
                *ndim = 3; shape[0] = (size_t)s->gamma; shape[1] = (size_t)s->alpha; shape[2] = (size_t)s->phi * r;
                *fan_in = s->alpha; *fan_out = rf * s->phi;
            } else if (i == 1) {
                *ndim = 3; shape[0] = (size_t)s->phi; shape[1] = (size_t)s->gamma * r; shape[2] = (size_t)s->eps;
                *fan_in = rf * s->gamma; *fan_out = s->eps;
            } else {  // router
                *ndim = 2; shape[0] = (size_t)s->experts; shape[1] = (size_t)s->d_in;
                *fan_in = s->d_in; *fan_out = s->experts;
            }
            return;
        }
        default: {  // monarch
            int nb = s->blocks, p = s->d_in / nb, so = s->d_out / nb, q = p < so ? p : so;
            *ndim = 3;
            shape[0] = (size_t)nb;
            if (i == 0) { shape[1] = (size_t)q; shape[2] = (size_t)p; *fan_in = p; *fan_out = q; }
            else { shape[1] = (size_t)so; shape[2] = (size_t)q; *fan_in = q; *fan_out = so; }
            return;
        }
    }
}

static const char *const linear_tensor_names[NUM_STRUCTS][LINEAR_MAX_TENSORS] = {
    {"w", "", ""}, {"W0", "W1", ""}, {"R", "L", ""}, {"W0", "W1", "router"}};

// Learning-rate multiplier of weight tensor i: η·base_width/(n_cores·fan_in) for structured
// cores, η·base_width/d_in for routers (and, with µP, for dense hidden matrices), else 1.
static inline float linear_lr_mult(const LinearSpec *s, int i, int base_width, int mup, int is_head) {
    if (!s->lr_mult_on) return 1.0f;
    int ndim, fi, fo;
    size_t shape[3];
    linear_tensor_shape(s, i, &ndim, shape, &fi, &fo);
    if (s->kind == STRUCT_DENSE) return (mup && !is_head) ? (float)base_width / (float)s->d_in : 1.0f;
    if (s->kind == STRUCT_BTT_MOE && i == 2) return (float)base_width / (float)s->d_in;
    return (float)base_width / (2.0f * (float)fi);
}

// A layer's linear by name: "h.L.ROLE", or "lm_head".
static inline void linear_layer_name(const LinearDesc *ld, char *buf, size_t cap) {
    if (ld->layer < 0) snprintf(buf, cap, "lm_head");
    else snprintf(buf, cap, "h.%d.%s", ld->layer, struct_role_names[ld->role]);
}

// Tensor name for a layer's linear: llm.c's names for the dense fused qkv and the dense
// attn_proj, fc and fc_proj (so that all-dense tables are llm.c's), "h.L.ROLE.T" otherwise.
static inline void linear_tensor_name(const LinearDesc *ld, int i, char *buf, size_t cap) {
    static const char *const llmc_w[NUM_BLOCK_ROLES] = {"qkvw", "", "", "attprojw", "fcw", "fcprojw"};
    static const char *const llmc_b[NUM_BLOCK_ROLES] = {"qkvb", "", "", "attprojb", "fcb", "fcprojb"};
    const char *t = i < 0 ? "b" : linear_tensor_names[ld->spec.kind][i];
    int llmc = ld->layer >= 0 && ld->spec.kind == STRUCT_DENSE && (ld->fused_qkv || ld->role >= SR_ATTN_PROJ);
    if (llmc) { snprintf(buf, cap, "h.%d.%s", ld->layer, i < 0 ? llmc_b[ld->role] : llmc_w[ld->role]); return; }
    char layer[32];
    linear_layer_name(ld, layer, sizeof(layer));
    snprintf(buf, cap, "%s.%s", layer, t);
}

static inline void linear_add_weights(ParamTable *pt, LinearDesc *ld, int base_width, int mup) {
    ld->nw = linear_num_weight_tensors(ld->spec.kind);
    for (int i = 0; i < ld->nw; i++) {
        int ndim, fi, fo;
        size_t shape[3];
        linear_tensor_shape(&ld->spec, i, &ndim, shape, &fi, &fo);
        char name[64];
        linear_tensor_name(ld, i, name, sizeof(name));
        ld->w[i] = params_add(pt, name, ndim, shape, linear_lr_mult(&ld->spec, i, base_width, mup, ld->layer < 0), 1);
    }
}

static inline void linear_add_bias(ParamTable *pt, LinearDesc *ld) {
    ld->bias = -1;
    if (!ld->spec.bias) return;
    char name[64];
    linear_tensor_name(ld, -1, name, sizeof(name));
    size_t shape[1] = {(size_t)ld->spec.d_out};
    ld->bias = params_add(pt, name, 1, shape, 1.0f, 0);
}

// Draws the layer's weights from rng in tensor order. Dense: N(0, 0.02), times residual_scale
// for projections into the residual stream (GPT-2). Structured cores: N(0, √min(fan_in, fan_out)
// / fan_in); the last core of a residual projection or of the head starts at zero (no draw).
// Routers: zero, or N(0, router_init). Biases stay zero.
static inline void linear_init(const LinearDesc *ld, const ParamTable *pt, float *params, int zero_last, float residual_scale,
                               mt19937_state *rng) {
    const LinearSpec *s = &ld->spec;
    for (int i = 0; i < ld->nw; i++) {
        const ParamTensor *p = &pt->t[ld->w[i]];
        float *w = params + p->offset;
        int ndim, fi, fo;
        size_t shape[3];
        linear_tensor_shape(s, i, &ndim, shape, &fi, &fo);
        if (s->kind == STRUCT_DENSE) {
            mt_normal_(w, p->numel, 0.0f, 0.02f * residual_scale, rng);
        } else if (s->kind == STRUCT_BTT_MOE && i == 2) {
            if (s->router_init > 0.0f) mt_normal_(w, p->numel, 0.0f, s->router_init, rng);
        } else if (!(zero_last && i == 1)) {
            float std = sqrtf((float)(fi < fo ? fi : fo)) / (float)fi;
            mt_normal_(w, p->numel, 0.0f, std, rng);
        }
    }
}

// The shape structs of btt.h, monarch.h and moe.h for a layer's spec (both trainers' kernels
// take these).
static inline BTTShape btt_shape_of(const LinearSpec *s) {
    BTTShape b;
    btt_shape(&b, s->alpha, s->gamma, s->phi, s->eps, s->rank);
    return b;
}
static inline MonarchShape monarch_shape_of(const LinearSpec *s) {
    MonarchShape m;
    monarch_shape(&m, s->d_in, s->d_out, s->blocks);
    return m;
}
static inline MoEShape moe_shape_of(const LinearSpec *s) {
    MoEShape m;
    moe_shape(&m, s->alpha, s->gamma, s->phi, s->eps, s->experts, s->topk);
    return m;
}
// The BTT a BTT layer computes, or one expert of a BTT-MoE layer: the shape the fused BTT kernel
// runs for either.
static inline BTTShape btt_kernel_shape_of(const LinearSpec *s) {
    if (s->kind != STRUCT_BTT_MOE) return btt_shape_of(s);
    const MoEShape m = moe_shape_of(s);
    return moe_expert_shape(&m);
}
