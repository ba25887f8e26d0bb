// spec.h: what each linear layer is: the LinearSpec of every (layer, role), resolved from a
// config file's [linear], [linear.ROLE], [layer.N] and [layer.N.ROLE] sections, validated with
// file:line errors, with its parameter count and forward FLOPs.
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../common/config.h"
#include "../common/utils.h"
#include "factor.h"

typedef enum { STRUCT_DENSE, STRUCT_BTT, STRUCT_MONARCH, STRUCT_BTT_MOE, NUM_STRUCTS } StructKind;
static const char *const struct_names[NUM_STRUCTS] = {"dense", "btt", "monarch", "btt_moe"};

// The linear roles of a block, as config files name them, then the head.
typedef enum { SR_Q, SR_K, SR_V, SR_ATTN_PROJ, SR_FC, SR_FC_PROJ, NUM_BLOCK_ROLES, SR_LM_HEAD = NUM_BLOCK_ROLES } StructRole;
static const char *const struct_role_names[NUM_BLOCK_ROLES + 1] = {"q", "k", "v", "attn_proj", "fc", "fc_proj", "lm_head"};

#define STRUCT_MAX_EXPERTS 1024  // btt_moe: the most experts a layer may have

typedef struct {
    StructKind kind;
    int d_in, d_out;
    int bias;                     // 1: a bias vector of d_out, added once
    int rank;                     // btt: ρ; btt_moe: = experts
    int alpha, gamma, phi, eps;   // btt, btt_moe: d_in = γ·α, d_out = φ·ε
    int blocks;                   // monarch
    int experts, topk;            // btt_moe
    float router_init;            // btt_moe: std of the router's random init (0: zeros)
    int lr_mult_on;               // structure-aware learning rates (1, default) or plain lr (0)
} LinearSpec;

typedef struct {
    int n_layer;
    LinearSpec *block;            // [n_layer * NUM_BLOCK_ROLES]
    LinearSpec lm_head;           // kind DENSE with head_tied = 1: the tied wte
    int head_tied;
    float moe_aux_weight;
    int base_width;
    int mup;
    int any_structured;           // 0: the model is plain GPT-2 (llm.c's checkpoint format)
} StructConfig;

static inline LinearSpec *struct_spec(const StructConfig *sc, int layer, StructRole role) {
    return &sc->block[layer * NUM_BLOCK_ROLES + role];
}

// q, k and v run as one fused matmul exactly when all three are dense (with bias): llm.c's qkv.
static inline int struct_fused_qkv(const StructConfig *sc, int layer) {
    for (int r = SR_Q; r <= SR_V; r++) {
        const LinearSpec *s = struct_spec(sc, layer, (StructRole)r);
        if (s->kind != STRUCT_DENSE || !s->bias) return 0;
    }
    return 1;
}

static inline void struct_role_shape(const GPT2Config *c, StructRole role, int *in, int *out) {
    int C = c->channels;
    *in = C;
    *out = C;
    if (role == SR_FC) *out = 4 * C;
    if (role == SR_FC_PROJ) *in = 4 * C;
    if (role == SR_LM_HEAD) *out = c->padded_vocab_size;
}

// Multiply-adds per token of the forward pass (= parameters for every structure but btt_moe,
// whose router is dense and whose cores are used by only topk of the experts).
static inline double spec_forward_macs(const LinearSpec *s) {
    switch (s->kind) {
        case STRUCT_DENSE: return (double)s->d_in * s->d_out;
        case STRUCT_BTT: return (double)s->rank * ((double)s->d_in * s->phi + (double)s->gamma * s->d_out);
        case STRUCT_MONARCH: {
            int p = s->d_in / s->blocks, q_ = s->d_out / s->blocks, q = p < q_ ? p : q_;
            return (double)s->blocks * q * (p + q_);
        }
        default: return (double)s->topk * ((double)s->d_in * s->phi + (double)s->gamma * s->d_out) + (double)s->experts * s->d_in;
    }
}

static inline size_t spec_num_params(const LinearSpec *s) {
    size_t b = s->bias ? (size_t)s->d_out : 0;
    switch (s->kind) {
        case STRUCT_DENSE: return (size_t)s->d_in * s->d_out + b;
        case STRUCT_BTT:
        case STRUCT_MONARCH: return (size_t)spec_forward_macs(s) + b;
        default: return (size_t)s->experts * ((size_t)s->d_in * s->phi + (size_t)s->gamma * s->d_out) + (size_t)s->experts * s->d_in + b;
    }
}

static inline void spec_describe(const LinearSpec *s, char *buf, size_t cap) {
    switch (s->kind) {
        case STRUCT_DENSE: snprintf(buf, cap, "dense"); break;
        case STRUCT_BTT: snprintf(buf, cap, "btt r%d %dx%d>%dx%d", s->rank, s->alpha, s->gamma, s->phi, s->eps); break;
        case STRUCT_MONARCH: snprintf(buf, cap, "monarch %d blocks", s->blocks); break;
        default: snprintf(buf, cap, "btt_moe %d/top%d %dx%d>%dx%d", s->experts, s->topk, s->alpha, s->gamma, s->phi, s->eps); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing. A key is looked up, key by key, in the most specific section that sets it:
// [layer.N.ROLE] > [layer.N] > [linear.ROLE] > [linear]. The head reads only [linear.lm_head].

#define STRUCT_SECTION_KEYS "struct rank in out blocks experts topk router_init lr_mult bias"
#define STRUCT_TOP_KEYS GPT2_CONFIG_KEYS " moe_aux_weight base_width mup lm_head"

static inline int struct_kind_from_name(const char *name, StructKind *out) {
    for (int k = 0; k < NUM_STRUCTS; k++)
        if (strcmp(name, struct_names[k]) == 0) { *out = (StructKind)k; return 1; }
    return 0;
}

static const char *const struct_options[NUM_STRUCTS] = {"bias lr_mult", "rank in out bias lr_mult", "blocks bias lr_mult",
                                                         "experts topk in out router_init bias lr_mult"};

static inline int struct_has_option(StructKind k, const char *key) {
    if (strcmp(key, "struct") == 0) return 1;
    const char *opts = struct_options[k];
    size_t n = strlen(key);
    for (const char *p = strstr(opts, key); p; p = strstr(p + 1, key))
        if ((p == opts || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0')) return 1;
    return 0;
}

static inline int key_is_section_key(const char *key) {
    static const char *const keys[] = {"struct", "rank", "in", "out", "blocks", "experts", "topk", "router_init", "lr_mult", "bias"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) if (strcmp(key, keys[i]) == 0) return 1;
    return 0;
}

// Checks a section name; returns its layer (-1 for none) and role (-1 for all) through the pointers.
static inline void struct_section_parse(const ConfigFile *cf, const ConfigEntry *e, int n_layer, int *layer, int *role) {
    const char *s = e->section;
    *layer = -1;
    *role = -1;
    const char *rest = NULL;
    if (strcmp(s, "linear") == 0) return;
    if (strncmp(s, "linear.", 7) == 0) {
        rest = s + 7;
    } else if (strncmp(s, "layer.", 6) == 0) {
        char *end;
        long l = strtol(s + 6, &end, 10);
        if (end == s + 6 || (*end != '\0' && *end != '.'))
            fatal("%s:%d: section [%s]: write [layer.N] or [layer.N.ROLE] with N a layer index", cf->path, e->line, s);
        if (l < 0 || l >= n_layer)
            fatal("%s:%d: section [%s]: the model has layers 0..%d", cf->path, e->line, s, n_layer - 1);
        *layer = (int)l;
        if (*end == '\0') return;
        rest = end + 1;
    } else {
        fatal("%s:%d: unknown section [%s]; sections are [linear], [linear.ROLE], [layer.N], [layer.N.ROLE]", cf->path, e->line, s);
    }
    for (int r = 0; r <= NUM_BLOCK_ROLES; r++) {
        if (strcmp(rest, struct_role_names[r]) == 0) {
            if (r == SR_LM_HEAD && *layer >= 0)
                fatal("%s:%d: section [%s]: the head is not in a layer; use [linear.lm_head]", cf->path, e->line, s);
            *role = r;
            return;
        }
    }
    fatal("%s:%d: section [%s]: unknown role '%s'; roles are q k v attn_proj fc fc_proj lm_head", cf->path, e->line, s, rest);
}

// The entry for `key` that applies to (layer, role), or NULL.
static inline ConfigEntry *struct_lookup(ConfigFile *cf, int layer, int role, const char *key) {
    char names[4][96];
    int n = 0;
    if (role == SR_LM_HEAD) {
        snprintf(names[n++], sizeof(names[0]), "linear.lm_head");
    } else {
        snprintf(names[n++], sizeof(names[0]), "layer.%d.%s", layer, struct_role_names[role]);
        snprintf(names[n++], sizeof(names[0]), "layer.%d", layer);
        snprintf(names[n++], sizeof(names[0]), "linear.%s", struct_role_names[role]);
        snprintf(names[n++], sizeof(names[0]), "linear");
    }
    for (int i = 0; i < n; i++) {
        ConfigEntry *e = config_find(cf, names[i], key);
        if (e) return e;
    }
    return NULL;
}

static inline int struct_get_int(ConfigFile *cf, int layer, int role, const char *key, int def, long lo, long hi) {
    ConfigEntry *e = struct_lookup(cf, layer, role, key);
    if (!e) return def;
    e->used = 1;
    return config_parse_int(cf, e, lo, hi);
}

static inline float config_parse_float(const ConfigFile *cf, const ConfigEntry *e, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(e->value, &end);
    if (errno || *end != '\0' || end == e->value || !(v >= lo && v <= hi))
        fatal("%s:%d: '%s = %s' must be a number in [%g, %g]", cf->path, e->line, e->key, e->value, lo, hi);
    return (float)v;
}

// "AxB" factors of d; the entry's line is named when they do not multiply to d.
static inline void struct_get_factors(ConfigFile *cf, int layer, int role, const char *key, int d, const char *what, int *first, int *second) {
    ConfigEntry *e = struct_lookup(cf, layer, role, key);
    if (!e) {
        default_factors(d, first, second);
        return;
    }
    e->used = 1;
    char *end;
    long a = strtol(e->value, &end, 10), b = 0;
    int ok = end != e->value && (*end == 'x' || *end == 'X');
    if (ok) {
        const char *s2 = end + 1;
        b = strtol(s2, &end, 10);
        ok = end != s2 && *end == '\0' && a > 0 && b > 0;
    }
    if (!ok) fatal("%s:%d: '%s = %s': write the two factors as AxB, e.g. %s = 16x48", cf->path, e->line, key, e->value, key);
    if (a * b != d) {
        int f1, f2;
        default_factors(d, &f1, &f2);
        char where[64];
        if (role == SR_LM_HEAD) snprintf(where, sizeof(where), "lm_head");
        else snprintf(where, sizeof(where), "layer %d %s", layer, struct_role_names[role]);
        fatal("%s:%d: '%s = %s': %ld x %ld = %ld but the %s of %s is %d; give factors whose product is %d (e.g. %dx%d)",
              cf->path, e->line, key, e->value, a, b, a * b, what, where, d, d, f1, f2);
    }
    *first = (int)a;
    *second = (int)b;
}

static inline void struct_resolve(ConfigFile *cf, int layer, int role, int d_in, int d_out, StructKind kind, LinearSpec *s) {
    memset(s, 0, sizeof(*s));
    s->kind = kind;
    s->d_in = d_in;
    s->d_out = d_out;
    s->bias = struct_get_int(cf, layer, role, "bias", role == SR_LM_HEAD ? 0 : 1, 0, 1);
    s->lr_mult_on = struct_get_int(cf, layer, role, "lr_mult", 1, 0, 1);
    char where[64];
    if (role == SR_LM_HEAD) snprintf(where, sizeof(where), "lm_head");
    else snprintf(where, sizeof(where), "layer %d %s", layer, struct_role_names[role]);
    if (kind == STRUCT_BTT || kind == STRUCT_BTT_MOE) {
        struct_get_factors(cf, layer, role, "in", d_in, "input size", &s->alpha, &s->gamma);
        struct_get_factors(cf, layer, role, "out", d_out, "output size", &s->phi, &s->eps);
    }
    if (kind == STRUCT_BTT) s->rank = struct_get_int(cf, layer, role, "rank", 1, 1, 1 << 16);
    if (kind == STRUCT_MONARCH) {
        ConfigEntry *e = struct_lookup(cf, layer, role, "blocks");
        s->blocks = struct_get_int(cf, layer, role, "blocks", 4, 1, 1 << 16);
        if (d_in % s->blocks != 0 || d_out % s->blocks != 0) {
            if (e) fatal("%s:%d: 'blocks = %d' does not divide the %s's sizes %d -> %d; choose a common divisor", cf->path, e->line, s->blocks, where, d_in, d_out);
            fatal("%s: monarch's default 4 blocks do not divide the %s's sizes %d -> %d; set blocks", cf->path, where, d_in, d_out);
        }
    }
    if (kind == STRUCT_BTT_MOE) {
        s->experts = struct_get_int(cf, layer, role, "experts", 8, 1, STRUCT_MAX_EXPERTS);
        s->rank = s->experts;
        ConfigEntry *e = struct_lookup(cf, layer, role, "topk");
        s->topk = struct_get_int(cf, layer, role, "topk", 2, 1, STRUCT_MAX_EXPERTS);
        if (s->topk > s->experts) {
            if (e) fatal("%s:%d: 'topk = %d' exceeds the %d experts of %s; use topk <= experts", cf->path, e->line, s->topk, s->experts, where);
            fatal("%s: the default topk 2 exceeds the %d experts of %s; set topk", cf->path, s->experts, where);
        }
        ConfigEntry *ri = struct_lookup(cf, layer, role, "router_init");
        if (ri) { ri->used = 1; s->router_init = config_parse_float(cf, ri, 0.0, 100.0); }
    }
}

static inline StructKind struct_get_kind(ConfigFile *cf, int layer, int role, StructKind def) {
    ConfigEntry *e = struct_lookup(cf, layer, role, "struct");
    if (!e) return def;
    e->used = 1;
    StructKind k;
    if (!struct_kind_from_name(e->value, &k))
        fatal("%s:%d: unknown structure '%s'; use dense, btt, monarch or btt_moe", cf->path, e->line, e->value);
    return k;
}

// Fills sc from the config file's top-level structure keys and its sections. Unknown keys and
// sections, and options placed under a structure that does not have them, are errors.
static inline void struct_config_parse(ConfigFile *cf, const GPT2Config *c, StructConfig *sc) {
    memset(sc, 0, sizeof(*sc));
    sc->n_layer = c->num_layers;
    sc->block = (LinearSpec *)callocCheck((size_t)c->num_layers * NUM_BLOCK_ROLES, sizeof(LinearSpec));
    sc->moe_aux_weight = 0.01f;
    ConfigEntry *e = config_find(cf, "", "moe_aux_weight");
    if (e) { e->used = 1; sc->moe_aux_weight = config_parse_float(cf, e, 0.0, 1e6); }
    sc->base_width = config_get_int(cf, "base_width", 768, 1, 1 << 24);
    sc->mup = config_get_int(cf, "mup", 0, 0, 1);
    for (int i = 0; i < cf->n; i++) {  // section names and keys first, so typos are reported as such
        ConfigEntry *x = &cf->entries[i];
        if (x->section[0] == '\0') continue;
        int l, r;
        struct_section_parse(cf, x, c->num_layers, &l, &r);
        if (!key_is_section_key(x->key))
            fatal("%s:%d: unknown key '%s' in [%s]; section keys are: %s", cf->path, x->line, x->key, x->section, STRUCT_SECTION_KEYS);
        // an option of another structure than the one its own section sets is misplaced; an
        // option shadowed by a more specific section, or inherited by another structure, is not
        ConfigEntry *st = config_find(cf, x->section, "struct");
        StructKind k;
        if (st && struct_kind_from_name(st->value, &k) && !struct_has_option(k, x->key))
            fatal("%s:%d: '%s' is not an option of %s (set by 'struct = %s' at line %d); %s options: %s", cf->path, x->line,
                  x->key, st->value, st->value, st->line, st->value, struct_options[k]);
    }
    for (int l = 0; l < c->num_layers; l++) {
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            int in, out;
            struct_role_shape(c, (StructRole)r, &in, &out);
            StructKind k = struct_get_kind(cf, l, r, STRUCT_DENSE);
            struct_resolve(cf, l, r, in, out, k, struct_spec(sc, l, (StructRole)r));
            if (k != STRUCT_DENSE) sc->any_structured = 1;
        }
    }
    // the head: tied to wte unless `lm_head = <structure>` (or [linear.lm_head] struct) says otherwise
    StructKind hk = STRUCT_DENSE;
    int untied = 0;
    e = config_find(cf, "", "lm_head");
    if (e) {
        e->used = 1;
        if (!struct_kind_from_name(e->value, &hk))
            fatal("%s:%d: unknown structure '%s' for lm_head; use dense (tied, the default), btt, monarch or btt_moe", cf->path, e->line, e->value);
        untied = hk != STRUCT_DENSE;  // a dense head is GPT-2's: tied to the token embedding
    }
    ConfigEntry *hs = config_find(cf, "linear.lm_head", "struct");
    if (hs) {
        if (e) fatal("%s:%d: the head's structure is set twice (also at line %d); keep one", cf->path, hs->line, e->line);
        hk = struct_get_kind(cf, 0, SR_LM_HEAD, STRUCT_DENSE);
        untied = hk != STRUCT_DENSE;
    }
    int in, out;
    struct_role_shape(c, SR_LM_HEAD, &in, &out);
    if (untied) {
        struct_resolve(cf, 0, SR_LM_HEAD, in, out, hk, &sc->lm_head);
        sc->any_structured = 1;
    } else {
        memset(&sc->lm_head, 0, sizeof(sc->lm_head));
        sc->lm_head.kind = STRUCT_DENSE;
        sc->lm_head.d_in = in;
        sc->lm_head.d_out = out;
        sc->head_tied = 1;
    }
    if (sc->mup) sc->any_structured = 1;  // µP multipliers change training: not a plain llm.c model
    for (int i = 0; i < cf->n; i++) {
        ConfigEntry *x = &cf->entries[i];
        if (!x->used && x->section[0] == '\0')
            fatal("%s:%d: unknown key '%s'; known keys are: %s", cf->path, x->line, x->key, STRUCT_TOP_KEYS);
    }
}

// All dense, tied: what -e dN and llm.c checkpoints describe.
static inline void struct_config_dense(const GPT2Config *c, StructConfig *sc) {
    memset(sc, 0, sizeof(*sc));
    sc->n_layer = c->num_layers;
    sc->block = (LinearSpec *)callocCheck((size_t)c->num_layers * NUM_BLOCK_ROLES, sizeof(LinearSpec));
    sc->moe_aux_weight = 0.01f;
    sc->base_width = 768;
    for (int l = 0; l < c->num_layers; l++)
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            LinearSpec *s = struct_spec(sc, l, (StructRole)r);
            s->kind = STRUCT_DENSE;
            s->bias = 1;
            s->lr_mult_on = 1;
            struct_role_shape(c, (StructRole)r, &s->d_in, &s->d_out);
        }
    sc->lm_head.kind = STRUCT_DENSE;
    struct_role_shape(c, SR_LM_HEAD, &sc->lm_head.d_in, &sc->lm_head.d_out);
    sc->head_tied = 1;
}

static inline void struct_config_free(StructConfig *sc) {
    free(sc->block);
    memset(sc, 0, sizeof(*sc));
}
