// gpt2.h: the GPT-2 model described as data, shared by the CPU and GPU trainers: the parameter
// table in llm.c's checkpoint order, the linear layers (role, shapes, tensors), llm.c-exact
// random initialisation, and FLOP counts.
#pragma once
#include <math.h>
#include "config.h"
#include "params.h"
#include "rng.h"

// The linear roles of a block. q, k and v are fused into one qkv matmul while all three are dense.
typedef enum { ROLE_QKV, ROLE_ATTN_PROJ, ROLE_FC, ROLE_FC_PROJ, NUM_ROLES } LinearRole;
static const char *const linear_role_names[NUM_ROLES] = {"qkv", "attn_proj", "fc", "fc_proj"};

// One linear layer of one block: y = x W^T + b, W (out, in). `weight` and `bias` index the table.
typedef struct {
    LinearRole role;
    int layer;
    int in, out;
    int weight, bias;
} LinearDesc;

// Per-block tensors that are not linear layers.
typedef struct { int ln1w, ln1b, ln2w, ln2b; } BlockNorms;

typedef struct {
    GPT2Config config;
    ParamTable params;
    int wte, wpe, lnfw, lnfb;
    BlockNorms *norms;     // [L]
    LinearDesc *linears;   // [L * NUM_ROLES], index layer * NUM_ROLES + role
} GPT2Layout;

static inline LinearDesc *gpt2_linear(const GPT2Layout *g, int layer, LinearRole role) {
    return &g->linears[layer * NUM_ROLES + role];
}

static inline void linear_shape(const GPT2Config *c, LinearRole role, int *in, int *out) {
    int C = c->channels;
    switch (role) {
        case ROLE_QKV: *in = C; *out = 3 * C; break;
        case ROLE_ATTN_PROJ: *in = C; *out = C; break;
        case ROLE_FC: *in = C; *out = 4 * C; break;
        default: *in = 4 * C; *out = C; break;
    }
}

// Builds the table in llm.c's order: wte, wpe, then for each kind of tensor all layers in turn
// (ln1w of every layer, then ln1b of every layer, ...), then lnfw, lnfb. With this order the flat
// buffer is byte for byte the payload of an llm.c checkpoint.
static inline void gpt2_layout_build(GPT2Layout *g, const GPT2Config *c) {
    memset(g, 0, sizeof(*g));
    g->config = *c;
    params_init(&g->params);
    int L = c->num_layers;
    size_t C = (size_t)c->channels;
    g->norms = (BlockNorms *)callocCheck((size_t)L, sizeof(BlockNorms));
    g->linears = (LinearDesc *)callocCheck((size_t)L * NUM_ROLES, sizeof(LinearDesc));
    ParamTable *pt = &g->params;
    size_t s[2];
    char name[64];
    s[0] = (size_t)c->padded_vocab_size; s[1] = C;
    g->wte = params_add(pt, "wte", 2, s, 1.0f, 1);
    s[0] = (size_t)c->max_seq_len;
    g->wpe = params_add(pt, "wpe", 2, s, 1.0f, 1);

    // llm.c groups, in order; each is either a norm vector or a role's weight or bias
    enum { G_LN1W, G_LN1B, G_QKVW, G_QKVB, G_ATTW, G_ATTB, G_LN2W, G_LN2B, G_FCW, G_FCB, G_FCPW, G_FCPB, NUM_GROUPS };
    static const char *const gnames[NUM_GROUPS] = {"ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                                                   "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb"};
    for (int grp = 0; grp < NUM_GROUPS; grp++) {
        for (int l = 0; l < L; l++) {
            snprintf(name, sizeof(name), "h.%d.%s", l, gnames[grp]);
            int idx;
            if (grp == G_LN1W || grp == G_LN1B || grp == G_LN2W || grp == G_LN2B) {
                s[0] = C;
                idx = params_add(pt, name, 1, s, 1.0f, 0);
                if (grp == G_LN1W) g->norms[l].ln1w = idx;
                if (grp == G_LN1B) g->norms[l].ln1b = idx;
                if (grp == G_LN2W) g->norms[l].ln2w = idx;
                if (grp == G_LN2B) g->norms[l].ln2b = idx;
                continue;
            }
            LinearRole role = (grp <= G_QKVB) ? ROLE_QKV : (grp <= G_ATTB) ? ROLE_ATTN_PROJ : (grp <= G_FCB) ? ROLE_FC : ROLE_FC_PROJ;
            LinearDesc *ld = gpt2_linear(g, l, role);
            ld->role = role;
            ld->layer = l;
            linear_shape(c, role, &ld->in, &ld->out);
            int is_weight = (grp == G_QKVW || grp == G_ATTW || grp == G_FCW || grp == G_FCPW);
            if (is_weight) {
                s[0] = (size_t)ld->out; s[1] = (size_t)ld->in;
                ld->weight = params_add(pt, name, 2, s, 1.0f, 1);
            } else {
                s[0] = (size_t)ld->out;
                ld->bias = params_add(pt, name, 1, s, 1.0f, 0);
            }
        }
    }
    s[0] = C;
    g->lnfw = params_add(pt, "lnfw", 1, s, 1.0f, 0);
    g->lnfb = params_add(pt, "lnfb", 1, s, 1.0f, 0);
}

static inline void gpt2_layout_free(GPT2Layout *g) {
    params_free(&g->params);
    free(g->norms);
    free(g->linears);
    memset(g, 0, sizeof(*g));
}

static inline float *gpt2_tensor(const GPT2Layout *g, float *base, int idx) { return base + g->params.t[idx].offset; }

// Random init exactly as llm.c's gpt2_build_from_random (itself PyTorch's module order): one
// mt19937 stream from `seed`, drawing wte (real vocab rows only), wpe, then for each layer the
// qkv, attn_proj, fc, fc_proj weights; N(0, 0.02), residual projections scaled by 1/sqrt(2L).
// LayerNorm weights are 1, every bias and the padded wte rows are 0.
static inline void gpt2_init_random(const GPT2Layout *g, float *params, uint32_t seed) {
    const GPT2Config *c = &g->config;
    memset(params, 0, g->params.total * sizeof(float));
    for (int i = 0; i < g->params.n; i++) {
        const ParamTensor *p = &g->params.t[i];
        size_t len = strlen(p->name);
        if (len >= 2 && p->name[len - 1] == 'w' && p->ndim == 1) {  // ln1w, ln2w, lnfw
            for (size_t j = 0; j < p->numel; j++) params[p->offset + j] = 1.0f;
        }
    }
    mt19937_state rng;
    mt_seed(&rng, seed);
    float residual_scale = 1.0f / sqrtf(2.0f * (float)c->num_layers);
    mt_normal_(gpt2_tensor(g, params, g->wte), (size_t)c->vocab_size * c->channels, 0.0f, 0.02f, &rng);
    mt_normal_(gpt2_tensor(g, params, g->wpe), g->params.t[g->wpe].numel, 0.0f, 0.02f, &rng);
    for (int l = 0; l < c->num_layers; l++) {
        for (int r = 0; r < NUM_ROLES; r++) {
            const LinearDesc *ld = gpt2_linear(g, l, (LinearRole)r);
            float std = (r == ROLE_ATTN_PROJ || r == ROLE_FC_PROJ) ? 0.02f * residual_scale : 0.02f;
            mt_normal_(gpt2_tensor(g, params, ld->weight), g->params.t[ld->weight].numel, 0.0f, std, &rng);
        }
    }
}

// Parameter count as GPT-2 reports it: without the padded vocabulary rows.
static inline size_t gpt2_num_params_unpadded(const GPT2Layout *g) {
    return g->params.total - (size_t)(g->config.padded_vocab_size - g->config.vocab_size) * g->config.channels;
}

// Training FLOPs per token: 6 per weight multiply-add (forward 2, backward 4) for every matmul
// weight including the tied head, plus attention's QK^T and AV, as in the PaLM paper's MFU.
static inline double gpt2_flops_per_token(const GPT2Layout *g, int T) {
    const GPT2Config *c = &g->config;
    double mm = 0.0;
    for (int l = 0; l < c->num_layers; l++)
        for (int r = 0; r < NUM_ROLES; r++) {
            const LinearDesc *ld = gpt2_linear(g, l, (LinearRole)r);
            mm += (double)ld->in * ld->out;
        }
    mm += (double)c->vocab_size * c->channels;  // lm head
    // QK^T and AV: 2·T·C multiply-adds per token per layer, counted without the causal
    // discount as PaLM's MFU does (6·N + 12·L·C·T per token)
    double attn = 2.0 * c->num_layers * (double)c->channels * T;
    return 6.0 * mm + 6.0 * attn;
}
