// gpt2.h: the GPT-2 model described as data, shared by the CPU and GPU trainers: the parameter
// table in llm.c's checkpoint order, the linear layers (role, shapes, tensors), llm.c-exact
// random initialisation, and FLOP counts.
#pragma once
#include <math.h>
#include "checkpoint.h"
#include "config.h"
#include "params.h"
#include "rng.h"
#include "../structured/linear.h"
#include "../structured/spec.h"

// Per-block tensors that are not linear layers.
typedef struct { int ln1w, ln1b, ln2w, ln2b; } BlockNorms;

typedef struct {
    GPT2Config config;
    StructConfig structure;
    ParamTable params;
    int wte, wpe, lnfw, lnfb;
    BlockNorms *norms;     // [L]
    LinearDesc *linears;   // [L * NUM_BLOCK_ROLES]; a fused qkv sits in the q slot, k and v unused
    LinearDesc head;       // used only when the head is untied (structured or dense)
} GPT2Layout;

static inline LinearDesc *gpt2_linear(const GPT2Layout *g, int layer, int role) {
    return &g->linears[layer * NUM_BLOCK_ROLES + role];
}

// Linear layer i of gpt2_num_linears: the blocks' in layer-major order, then the head.
static inline int gpt2_num_linears(const GPT2Layout *g) { return g->config.num_layers * NUM_BLOCK_ROLES + 1; }
static inline const LinearDesc *gpt2_linear_at(const GPT2Layout *g, int i) {
    return i < g->config.num_layers * NUM_BLOCK_ROLES ? &g->linears[i] : &g->head;
}

// Builds the table. For an all-dense model the order is llm.c's — wte, wpe, then each kind of
// tensor for all layers in turn (ln1w of every layer, ln1b of every layer, qkvw, ...), then
// lnfw, lnfb — so that the flat buffer is byte for byte an llm.c checkpoint's payload. A
// structured layer puts its cores where the dense weight would be and its bias where the bias
// would be; an untied head comes last. Takes ownership of sc.
static inline void gpt2_layout_build_structured(GPT2Layout *g, const GPT2Config *c, StructConfig *sc) {
    memset(g, 0, sizeof(*g));
    g->config = *c;
    g->structure = *sc;
    memset(sc, 0, sizeof(*sc));
    sc = &g->structure;
    params_init(&g->params);
    int L = c->num_layers;
    size_t C = (size_t)c->channels;
    g->norms = (BlockNorms *)callocCheck((size_t)L, sizeof(BlockNorms));
    g->linears = (LinearDesc *)callocCheck((size_t)L * NUM_BLOCK_ROLES, sizeof(LinearDesc));
    for (int l = 0; l < L; l++) {
        int fused = struct_fused_qkv(sc, l);
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            LinearDesc *ld = gpt2_linear(g, l, r);
            ld->spec = *struct_spec(sc, l, (StructRole)r);
            ld->layer = l;
            ld->role = r;
            ld->used = !(fused && (r == SR_K || r == SR_V));
            ld->fused_qkv = fused && r == SR_Q;
            if (ld->fused_qkv) ld->spec.d_out = 3 * (int)C;
            ld->bias = -1;
        }
    }
    ParamTable *pt = &g->params;
    size_t s[2];
    char name[64];
    s[0] = (size_t)c->padded_vocab_size; s[1] = C;
    g->wte = params_add(pt, "wte", 2, s, 1.0f, 1);
    s[0] = (size_t)c->max_seq_len;
    g->wpe = params_add(pt, "wpe", 2, s, 1.0f, 1);
    // llm.c's groups in order: norms, then for each role its weights and then its biases
    enum { G_LN1W, G_LN1B, G_QKV_W, G_QKV_B, G_ATT_W, G_ATT_B, G_LN2W, G_LN2B, G_FC_W, G_FC_B, G_FCP_W, G_FCP_B, NUM_GROUPS };
    for (int grp = 0; grp < NUM_GROUPS; grp++) {
        for (int l = 0; l < L; l++) {
            int *norm = grp == G_LN1W ? &g->norms[l].ln1w : grp == G_LN1B ? &g->norms[l].ln1b
                      : grp == G_LN2W ? &g->norms[l].ln2w : grp == G_LN2B ? &g->norms[l].ln2b : NULL;
            if (norm) {
                static const char *const nn[] = {"ln1w", "ln1b", "", "", "", "", "ln2w", "ln2b"};
                snprintf(name, sizeof(name), "h.%d.%s", l, nn[grp]);
                s[0] = C;
                *norm = params_add(pt, name, 1, s, 1.0f, 0);
                continue;
            }
            int first = grp <= G_QKV_B ? SR_Q : grp <= G_ATT_B ? SR_ATTN_PROJ : grp <= G_FC_B ? SR_FC : SR_FC_PROJ;
            int last = grp <= G_QKV_B ? SR_V : first;
            int weights = grp == G_QKV_W || grp == G_ATT_W || grp == G_FC_W || grp == G_FCP_W;
            for (int r = first; r <= last; r++) {
                LinearDesc *ld = gpt2_linear(g, l, r);
                if (!ld->used) continue;
                if (weights) linear_add_weights(pt, ld, sc->base_width, sc->mup);
                else linear_add_bias(pt, ld);
            }
        }
    }
    s[0] = C;
    g->lnfw = params_add(pt, "lnfw", 1, s, 1.0f, 0);
    g->lnfb = params_add(pt, "lnfb", 1, s, 1.0f, 0);
    memset(&g->head, 0, sizeof(g->head));
    g->head.spec = sc->lm_head;
    g->head.layer = -1;
    g->head.role = SR_LM_HEAD;
    g->head.bias = -1;
    g->head.used = !sc->head_tied;
    if (g->head.used) {
        linear_add_weights(pt, &g->head, sc->base_width, sc->mup);
        linear_add_bias(pt, &g->head);
    }
}

// The parameter tensors of block l (its LayerNorms, its linear layers' weights and biases), or
// with l = num_layers every tensor in no block (embeddings, final LayerNorm, an untied head), into
// idx: room for GPT2_BLOCK_MAX_TENSORS, or params.n for the rest; returns how many. Together they
// are every tensor once (the GPU trainer averages a block's gradients as soon as its backward is done).
#define GPT2_BLOCK_MAX_TENSORS (4 + NUM_BLOCK_ROLES * (LINEAR_MAX_TENSORS + 1))
static inline int gpt2_block_tensors(const GPT2Layout *g, int l, int *idx) {
    const int L = g->config.num_layers;
    if (l < L) {
        const BlockNorms *nm = &g->norms[l];
        int n = 0;
        idx[n++] = nm->ln1w; idx[n++] = nm->ln1b; idx[n++] = nm->ln2w; idx[n++] = nm->ln2b;
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            const LinearDesc *ld = gpt2_linear(g, l, r);
            if (!ld->used) continue;
            for (int i = 0; i < ld->nw; i++) idx[n++] = ld->w[i];
            if (ld->bias >= 0) idx[n++] = ld->bias;
        }
        return n;
    }
    unsigned char *in_block = (unsigned char *)callocCheck((size_t)g->params.n, 1);
    int tmp[GPT2_BLOCK_MAX_TENSORS];
    for (int b = 0; b < L; b++) {
        int k = gpt2_block_tensors(g, b, tmp);
        for (int i = 0; i < k; i++) in_block[tmp[i]] = 1;
    }
    int n = 0;
    for (int i = 0; i < g->params.n; i++)
        if (!in_block[i]) idx[n++] = i;
    free(in_block);
    return n;
}

// Every block's parameter ranges (params_ranges of gpt2_block_tensors): block l's at
// (*ranges)[first[l] .. first[l + 1]), l = num_layers the tensors in no block. Returns first
// (num_layers + 2 ints); *ranges has params.n entries; the caller frees both.
static inline int *gpt2_block_ranges(const GPT2Layout *g, ParamRange **ranges) {
    const int L = g->config.num_layers;
    int *idx = (int *)mallocCheck((size_t)g->params.n * sizeof(int)), *first = (int *)mallocCheck((size_t)(L + 2) * sizeof(int));
    *ranges = (ParamRange *)mallocCheck((size_t)g->params.n * sizeof(ParamRange));
    first[0] = 0;
    for (int l = 0; l <= L; l++) first[l + 1] = first[l] + params_ranges(&g->params, idx, gpt2_block_tensors(g, l, idx), *ranges + first[l]);
    free(idx);
    return first;
}

static inline void gpt2_layout_build(GPT2Layout *g, const GPT2Config *c) {
    StructConfig sc;
    struct_config_dense(c, &sc);
    gpt2_layout_build_structured(g, c, &sc);
}

static inline void gpt2_layout_free(GPT2Layout *g) {
    params_free(&g->params);
    struct_config_free(&g->structure);
    free(g->norms);
    free(g->linears);
    memset(g, 0, sizeof(*g));
}

static inline float *gpt2_tensor(const GPT2Layout *g, float *base, int idx) { return base + g->params.t[idx].offset; }

// Random init, for all-dense models exactly llm.c's gpt2_build_from_random (itself PyTorch's
// module order): one mt19937 stream from `seed`, drawing wte (real vocab rows only), wpe, then for
// each layer the weights of q/k/v (or the fused qkv), attn_proj, fc, fc_proj, then an untied head
// (see linear_init for each structure). LayerNorm weights are 1; biases and padded rows 0.
static inline void gpt2_init_random(const GPT2Layout *g, float *params, uint32_t seed) {
    const GPT2Config *c = &g->config;
    memset(params, 0, g->params.total * sizeof(float));
    for (int l = 0; l < c->num_layers; l++) {
        int idx[2] = {g->norms[l].ln1w, g->norms[l].ln2w};
        for (int k = 0; k < 2; k++)
            for (size_t j = 0; j < g->params.t[idx[k]].numel; j++) params[g->params.t[idx[k]].offset + j] = 1.0f;
    }
    for (size_t j = 0; j < (size_t)c->channels; j++) params[g->params.t[g->lnfw].offset + j] = 1.0f;
    mt19937_state rng;
    mt_seed(&rng, seed);
    float residual_scale = 1.0f / sqrtf(2.0f * (float)c->num_layers);
    mt_normal_(gpt2_tensor(g, params, g->wte), (size_t)c->vocab_size * c->channels, 0.0f, 0.02f, &rng);
    mt_normal_(gpt2_tensor(g, params, g->wpe), g->params.t[g->wpe].numel, 0.0f, 0.02f, &rng);
    for (int l = 0; l < c->num_layers; l++) {
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            const LinearDesc *ld = gpt2_linear(g, l, r);
            if (!ld->used) continue;
            int residual = r == SR_ATTN_PROJ || r == SR_FC_PROJ;
            linear_init(ld, &g->params, params, residual, residual ? residual_scale : 1.0f, &rng);
        }
    }
    if (g->head.used) linear_init(&g->head, &g->params, params, 1, 1.0f, &rng);
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
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            const LinearDesc *ld = gpt2_linear(g, l, r);
            if (ld->used) mm += spec_forward_macs(&ld->spec);
        }
    mm += g->head.used ? spec_forward_macs(&g->head.spec) : (double)c->vocab_size * c->channels;
    // QK^T and AV: 2·T·C multiply-adds per token per layer, counted without the causal
    // discount as PaLM's MFU does (6·N + 12·L·C·T per token)
    double attn = 2.0 * c->num_layers * (double)c->channels * T;
    return 6.0 * mm + 6.0 * attn;
}

// The table printed at start: every linear layer with role, structure, shape, parameters and
// forward FLOPs per token, then the totals against the same model all-dense.
static inline void gpt2_print_layer_table(const GPT2Layout *g, FILE *out) {
    const GPT2Config *c = &g->config;
    double params = 0, flops = 0, dense_params = 0, dense_flops = 0;
    fprintf(out, "%-6s %-10s %-30s %-12s %12s %14s\n", "layer", "role", "structure", "shape", "params", "fwd FLOP/tok");
    char desc[96], shape[32];
    for (int l = 0; l <= c->num_layers; l++) {
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            const LinearDesc *ld = l < c->num_layers ? gpt2_linear(g, l, r) : (r == 0 ? &g->head : NULL);
            if (!ld) break;
            const LinearSpec *s = &ld->spec;
            int tied = l == c->num_layers && !g->head.used;
            if (!ld->used && !tied) continue;
            double p = tied ? 0.0 : (double)spec_num_params(s), f = 2.0 * (tied ? (double)c->vocab_size * c->channels : spec_forward_macs(s));
            double dp = (double)s->d_in * s->d_out + (s->bias ? s->d_out : 0), df = 2.0 * (double)s->d_in * s->d_out;
            if (tied) { dp = 0.0; df = f; }
            params += p; flops += f; dense_params += dp; dense_flops += df;
            if (tied) snprintf(desc, sizeof(desc), "dense (tied to wte)");
            else spec_describe(s, desc, sizeof(desc));
            snprintf(shape, sizeof(shape), "%dx%d", s->d_in, s->d_out);
            const char *role = ld->fused_qkv ? "qkv" : struct_role_names[ld->role];
            if (l < c->num_layers) fprintf(out, "%-6d %-10s %-30s %-12s %12.0f %14.0f\n", l, role, desc, shape, p, f);
            else fprintf(out, "%-6s %-10s %-30s %-12s %12.0f %14.0f\n", "-", "lm_head", desc, shape, p, f);
        }
    }
    fprintf(out, "linear layers: %.2fM parameters, %.2f MFLOP/token forward; all-dense: %.2fM, %.2f MFLOP/token (%.1f%% params, %.1f%% FLOPs)\n",
            params / 1e6, flops / 1e6, dense_params / 1e6, dense_flops / 1e6, 100.0 * params / dense_params, 100.0 * flops / dense_flops);
}

// ---------------------------------------------------------------------------------------------
// Where a model comes from: the trainers' -e argument and the fixtures' config text.

// The layout of a config file's text (`where` names it in messages). Returns the text, malloc'd,
// when the model is structured (it is stored in checkpoints), else NULL.
static inline char *gpt2_layout_from_config_text(GPT2Layout *g, const char *where, const char *text) {
    ConfigFile cf;
    config_parse_text(&cf, where, text);
    GPT2Config c;
    gpt2_config_from_file(&cf, &c);
    StructConfig sc;
    struct_config_parse(&cf, &c, &sc);
    int structured = sc.any_structured;
    gpt2_layout_build_structured(g, &c, &sc);
    config_free(&cf);
    char *kept = NULL;
    if (structured) {
        kept = (char *)mallocCheck(strlen(text) + 1);
        strcpy(kept, text);
    }
    return kept;
}

// What -e gave: a layout, and either a checkpoint whose weights follow (fp open at them, with its
// version) or nothing (the caller initialises from seed 42).
typedef struct {
    FILE *fp;           // non-NULL: read the weights with model_params_read, then close it
    int version;
    char *config_text;  // a structured model's config (owned by the caller), else NULL
} ModelSource;

// -e: "dN" (a GPT-2 preset), an llm.c or structured checkpoint, or a model config file.
static inline void gpt2_layout_from_spec(GPT2Layout *g, const char *spec, ModelSource *src) {
    memset(src, 0, sizeof(*src));
    GPT2Config c;
    if (gpt2_config_from_depth_name(spec, &c)) {
        gpt2_layout_build(g, &c);
        return;
    }
    FILE *fp = fopen(spec, "rb");
    if (!fp) fatal("-e '%s': no such file; -e takes an llm.c checkpoint, dN (e.g. d12 for a fresh GPT-2 124M), or a config file", spec);
    int magic = 0;
    size_t got = fread(&magic, sizeof(int), 1, fp);
    fseekCheck(fp, 0, SEEK_SET, spec);
    if (got == 1 && magic == MODEL_MAGIC) {
        char *text = NULL;
        src->version = model_header_read(fp, spec, &c, &text);
        if (text) {
            char where[1200];
            snprintf(where, sizeof(where), "%s (stored config)", spec);
            src->config_text = gpt2_layout_from_config_text(g, where, text);
            free(text);
            if (memcmp(&g->config, &c, sizeof(c)) != 0) fatal("'%s': its header and its stored config disagree; the file is corrupt", spec);
        } else {
            gpt2_layout_build(g, &c);
        }
        src->fp = fp;
        return;
    }
    fcloseCheck(fp, spec);
    ConfigFile cf;
    config_parse_file(&cf, spec);
    src->config_text = gpt2_layout_from_config_text(g, spec, cf.text);
    config_free(&cf);
}
