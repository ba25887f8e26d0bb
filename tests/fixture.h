// fixture.h: the test fixtures written by dev/reference.py (versions 1 and 2), read into arrays in a
// model's parameter-table order, and llm.c's GPT-2 debug-state files; shared by test_gpt2.c and
// test_gpt2.cu, which build the model from the fixture's config text between the two reading steps.
#pragma once
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../common/gpt2.h"
#include "../common/utils.h"

#define FIXTURE_MAGIC 20241123
#define LLMC_DEBUG_STATE_MAGIC 20240327

typedef struct {
    int version, B, T, n_steps, V, Vp, n_routed, n_tensors;
    size_t num_params;
    float lr, beta1, beta2, eps, weight_decay, grad_clip, moe_aux_weight;
    char *config_text;
    // all in the model's table order (version 2 fixtures are mapped by tensor name)
    float *params, *logits, *grads, *final_params;
    float *losses, *ce_losses, *auxes, *norms;
    float loss, ce_loss, aux;
    int *inputs, *targets;
    float *ref_lr_mult;  // per table tensor, from a version 2 directory (NULL for version 1)
    int *ref_decay;
    // the routing section (version 2 with routed layers; dev/fixtures/README.md): routed layers
    // in forward order, the experts each token went to at every step, router logits at step 0
    LinearDesc *routed;         // [n_routed] copies of the model's routed layers
    int *route_sel;             // [n_steps][routed j][B*T][K_j]
    float *route_logits;        // [routed j][B*T][E_j]
    size_t route_sel_step;      // ints per step: B*T * sum of K_j
    int has_routing;            // header[10]
    FILE *fp;            // open between fixture_open and fixture_read_body
} Fixture;

// Reads the header, hyperparameters and config text; the caller builds the model from
// f->config_text and then calls fixture_read_body with its layout.
static inline void fixture_open(Fixture *f, const char *path) {
    memset(f, 0, sizeof(*f));
    FILE *fp = fopenCheck(path, "rb");
    int header[256];
    float hyper[64];
    freadCheck(header, sizeof(int), 256, fp, path);
    if (header[0] != FIXTURE_MAGIC || (header[1] != 1 && header[1] != 2))
        fatal("'%s' is not a version 1 or 2 fixture (magic %d version %d); regenerate with python dev/reference.py", path, header[0], header[1]);
    f->version = header[1];
    freadCheck(hyper, sizeof(float), 64, fp, path);
    f->B = header[2]; f->T = header[3]; f->n_steps = header[4];
    f->n_tensors = header[6];
    f->V = header[7]; f->Vp = header[8];
    f->n_routed = f->version == 2 ? header[9] : 0;
    f->lr = hyper[0]; f->beta1 = hyper[1]; f->beta2 = hyper[2]; f->eps = hyper[3];
    f->weight_decay = hyper[4]; f->grad_clip = hyper[5];
    f->moe_aux_weight = f->version == 2 ? hyper[6] : 0.0f;
    f->config_text = (char *)callocCheck((size_t)header[5] + 1, 1);
    freadCheck(f->config_text, 1, (size_t)header[5], fp, path);
    f->has_routing = f->version == 2 ? header[10] : 0;
    f->fp = fp;
}

// Offsets of routed layer j (forward order) in a step's route_sel and in route_logits.
static inline size_t fixture_route_sel_off(const Fixture *f, int step, int j) {
    size_t off = (size_t)step * f->route_sel_step, BT = (size_t)f->B * f->T;
    for (int i = 0; i < j; i++) off += BT * f->routed[i].spec.topk;
    return off;
}
static inline size_t fixture_route_logits_off(const Fixture *f, int j) {
    size_t off = 0, BT = (size_t)f->B * f->T;
    for (int i = 0; i < j; i++) off += BT * f->routed[i].spec.experts;
    return off;
}

// The routing section, against the model's routed layers in forward order.
static inline void fixture_read_routing(Fixture *f, const char *path, const GPT2Layout *g) {
    FILE *fp = f->fp;
    size_t BT = (size_t)f->B * f->T, ksum = 0, esum = 0;
    int n = 0;
    f->routed = (LinearDesc *)callocCheck((size_t)f->n_routed + 1, sizeof(LinearDesc));
    for (int i = 0; i <= g->config.num_layers * NUM_BLOCK_ROLES; i++) {
        const LinearDesc *ld = i < g->config.num_layers * NUM_BLOCK_ROLES ? &g->linears[i] : &g->head;
        if (!ld->used || ld->spec.kind != STRUCT_BTT_MOE) continue;
        if (n == f->n_routed) fatal("'%s': the model built from its config has more than %d routed layers", path, f->n_routed);
        f->routed[n++] = *ld;
        ksum += (size_t)ld->spec.topk;
        esum += (size_t)ld->spec.experts;
    }
    if (n != f->n_routed) fatal("'%s' has %d routed layers, the model built from its config %d", path, f->n_routed, n);
    f->route_sel_step = BT * ksum;
    f->route_sel = (int *)mallocCheck(f->route_sel_step * f->n_steps * sizeof(int));
    f->route_logits = (float *)mallocCheck(BT * esum * sizeof(float));
    freadCheck(f->route_sel, sizeof(int), f->route_sel_step * f->n_steps, fp, path);
    freadCheck(f->route_logits, sizeof(float), BT * esum, fp, path);
    for (int st = 0; st < f->n_steps; st++)
        for (int j = 0; j < n; j++) {
            const int *p = f->route_sel + fixture_route_sel_off(f, st, j);
            int K = f->routed[j].spec.topk, E = f->routed[j].spec.experts;
            for (size_t t = 0; t < BT; t++)
                for (int k = 0; k < K; k++) {
                    int e = p[t * K + k];
                    if (e < 0 || e >= E || (k > 0 && e <= p[t * K + k - 1]))
                        fatal("'%s': routing section: step %d routed layer %d token %zu: expert %d is not a valid ascending selection of %d of %d; regenerate with python dev/reference.py",
                              path, st, j, t, e, K, E);
                }
        }
}

// Reads n_tensors per-tensor arrays in directory order into a table-ordered buffer.
static inline void fixture_read_tensors(FILE *fp, const char *path, const GPT2Layout *g, const int *map, int n, float *dst) {
    if (!map) { freadCheck(dst, sizeof(float), g->params.total, fp, path); return; }
    for (int i = 0; i < n; i++) {
        const ParamTensor *p = &g->params.t[map[i]];
        freadCheck(dst + p->offset, sizeof(float), p->numel, fp, path);
    }
}

// Reads the rest of the fixture against the layout of the model built from its config.
static inline void fixture_read_body(Fixture *f, const char *path, const GPT2Layout *g) {
    FILE *fp = f->fp;
    size_t BT = (size_t)f->B * f->T, P = g->params.total;
    int n = g->params.n, *map = NULL;
    if (f->version == 1) {
        if ((size_t)f->n_tensors != P) fatal("'%s' holds %d parameters, the model built from its config %zu", path, f->n_tensors, P);
    } else {
        n = f->n_tensors;
        map = (int *)mallocCheck((size_t)n * sizeof(int));
        f->ref_lr_mult = (float *)callocCheck((size_t)g->params.n, sizeof(float));
        f->ref_decay = (int *)callocCheck((size_t)g->params.n, sizeof(int));
        size_t covered = 0;
        for (int i = 0; i < n; i++) {  // name[64], ndim + 4 dims, lr_mult, decay + 2 ints
            char name[64];
            int ints[5], tail[3];
            float lr_mult;
            freadCheck(name, 1, 64, fp, path);
            name[63] = '\0';
            freadCheck(ints, sizeof(int), 5, fp, path);
            freadCheck(&lr_mult, sizeof(float), 1, fp, path);
            freadCheck(tail, sizeof(int), 3, fp, path);
            int idx = params_index(&g->params, name);
            if (idx < 0) fatal("'%s': the reference has tensor '%s' that the model built from its config lacks", path, name);
            const ParamTensor *p = &g->params.t[idx];
            int same = ints[0] == p->ndim;
            for (int d = 0; d < p->ndim && same; d++) same = (size_t)ints[1 + d] == p->shape[d];
            if (!same) fatal("'%s': tensor '%s' has another shape in the reference than in the model", path, name);
            map[i] = idx;
            f->ref_lr_mult[idx] = lr_mult;
            f->ref_decay[idx] = tail[0];
            covered += p->numel;
        }
        if (n != g->params.n || covered != P) fatal("'%s': the reference has %d tensors, the model %d", path, n, g->params.n);
    }
    f->num_params = P;
    f->params = (float *)mallocCheck(P * sizeof(float));
    f->grads = (float *)mallocCheck(P * sizeof(float));
    f->final_params = (float *)mallocCheck(P * sizeof(float));
    f->inputs = (int *)mallocCheck(BT * sizeof(int));
    f->targets = (int *)mallocCheck(BT * sizeof(int));
    f->logits = (float *)mallocCheck(BT * f->V * sizeof(float));
    f->losses = (float *)mallocCheck(f->n_steps * sizeof(float));
    f->ce_losses = (float *)mallocCheck(f->n_steps * sizeof(float));
    f->auxes = (float *)callocCheck(f->n_steps, sizeof(float));
    f->norms = (float *)mallocCheck(f->n_steps * sizeof(float));
    fixture_read_tensors(fp, path, g, map, n, f->params);
    freadCheck(f->inputs, sizeof(int), BT, fp, path);
    freadCheck(f->targets, sizeof(int), BT, fp, path);
    freadCheck(f->logits, sizeof(float), BT * f->V, fp, path);
    freadCheck(&f->loss, sizeof(float), 1, fp, path);
    f->ce_loss = f->loss;
    if (f->version == 2) {
        freadCheck(&f->ce_loss, sizeof(float), 1, fp, path);
        freadCheck(&f->aux, sizeof(float), 1, fp, path);
    }
    fixture_read_tensors(fp, path, g, map, n, f->grads);
    freadCheck(f->losses, sizeof(float), f->n_steps, fp, path);
    if (f->version == 2) {
        freadCheck(f->ce_losses, sizeof(float), f->n_steps, fp, path);
        freadCheck(f->auxes, sizeof(float), f->n_steps, fp, path);
    } else {
        memcpy(f->ce_losses, f->losses, f->n_steps * sizeof(float));
    }
    freadCheck(f->norms, sizeof(float), f->n_steps, fp, path);
    fixture_read_tensors(fp, path, g, map, n, f->final_params);
    if (f->n_routed > 0) {
        if (!f->has_routing) fatal("'%s' has routed layers but no routing section (an older file): regenerate with python dev/reference.py", path);
        fixture_read_routing(f, path, g);
    }
    char extra;
    if (fread(&extra, 1, 1, fp) == 1) fatal("'%s' is longer than its header says: regenerate it", path);
    fcloseCheck(fp, path);
    f->fp = NULL;
    free(map);
}

static inline void fixture_free(Fixture *f) {
    if (f->fp) fclose(f->fp);
    free(f->config_text); free(f->params); free(f->logits); free(f->grads); free(f->losses); free(f->ce_losses);
    free(f->auxes); free(f->norms); free(f->final_params); free(f->inputs); free(f->targets);
    free(f->ref_lr_mult); free(f->ref_decay); free(f->routed); free(f->route_sel); free(f->route_logits);
    memset(f, 0, sizeof(*f));
}

// llm.c's debug state (version 2): B, T, inputs, targets, logits (B*T*V), loss, and the gradients
// of all num_params (padded-vocabulary) parameters in llm.c's order.
typedef struct {
    int B, T;
    int *x, *y;
    float *logits, loss, *grads;
} DebugState;

static inline void debug_state_read(DebugState *d, const char *path, int V, size_t num_params) {
    FILE *fp = fopenCheck(path, "rb");
    int header[256];
    freadCheck(header, sizeof(int), 256, fp, path);
    if (header[0] != LLMC_DEBUG_STATE_MAGIC || header[1] != 2) fatal("'%s' is not an llm.c debug state (version 2)", path);
    d->B = header[2];
    d->T = header[3];
    size_t BT = (size_t)d->B * d->T;
    d->x = (int *)mallocCheck(BT * sizeof(int));
    d->y = (int *)mallocCheck(BT * sizeof(int));
    d->logits = (float *)mallocCheck(BT * V * sizeof(float));
    d->grads = (float *)mallocCheck(num_params * sizeof(float));
    freadCheck(d->x, sizeof(int), BT, fp, path);
    freadCheck(d->y, sizeof(int), BT, fp, path);
    freadCheck(d->logits, sizeof(float), BT * V, fp, path);
    freadCheck(&d->loss, sizeof(float), 1, fp, path);
    freadCheck(d->grads, sizeof(float), num_params, fp, path);
    fcloseCheck(fp, path);
}

static inline void debug_state_free(DebugState *d) {
    free(d->x); free(d->y); free(d->logits); free(d->grads);
    memset(d, 0, sizeof(*d));
}

// llm.c's test_gpt2.c checks these losses of 10 AdamW steps (lr 1e-4, betas 0.9/0.999, weight
// decay 0.01 on every tensor, no clipping) from the GPT-2 124M weights on its debug batch.
static const float llmc_124M_expected_losses[10] = {5.270007f, 4.059707f, 3.375123f, 2.800783f, 2.315382f,
                                                    1.849029f, 1.394656f, 0.999147f, 0.624080f, 0.376511f};

// Calls run(path) for every model fixture in dir (the RNG and init fixtures have other magics);
// stops with an error when there is none, so a wrong directory cannot pass as "nothing failed".
static inline void fixture_for_each_model(const char *dir, void (*run)(const char *path)) {
    char pattern[1024];
    snprintf(pattern, sizeof(pattern), "%s/*.bin", dir);
    glob_t g;
    int ran = 0;
    if (glob(pattern, 0, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++) {
            FILE *fp = fopenCheck(g.gl_pathv[i], "rb");
            int magic = 0;
            size_t got = fread(&magic, sizeof(int), 1, fp);
            fclose(fp);
            if (got == 1 && magic == FIXTURE_MAGIC) { run(g.gl_pathv[i]); ran++; }
        }
        globfree(&g);
    }
    if (ran == 0) fatal("no model fixtures in '%s'; run from the repository root", dir);
}

// llm.c's 124M check runs when its two files are in the current directory; says so when not.
#define LLMC_124M_MODEL "gpt2_124M.bin"
#define LLMC_124M_STATE "gpt2_124M_debug_state.bin"
static inline int llmc_124M_present(void) {
    FILE *a = fopen(LLMC_124M_MODEL, "rb"), *b = fopen(LLMC_124M_STATE, "rb");
    int both = a && b;
    if (a) fclose(a);
    if (b) fclose(b);
    if (!both) printf("# llm.c 124M check skipped: " LLMC_124M_MODEL " and " LLMC_124M_STATE " not in the current directory\n");
    return both;
}
