// test_gpt2.c: test mode on the CPU: the model against PyTorch fixtures (dev/reference.py) —
// logits, loss, every gradient, 10 AdamW steps and the final weights — and against llm.c's
// GPT-2 124M debug state when gpt2_124M.bin and gpt2_124M_debug_state.bin are present.
#define TESTING
#include "train_gpt2.c"
#include "tests/check.h"
#include "tests/fixture.h"

// Reads a fixture and builds the model it describes into m.
static void fixture_read(Fixture *f, GPT2 *m, const char *path) {
    fixture_open(f, path);
    memset(m, 0, sizeof(*m));
    gpt2_build_from_config_text(m, path, f->config_text);
    fixture_read_body(f, path, &m->layout);
}

// Final weights after Adam steps: every coordinate within 10% of one step (lr·lr_mult), and all
// but 0.1% of them (at least one) within 1%. Adam's step is about lr whatever the gradient's size,
// so the few coordinates whose gradient is near zero carry fp32-vs-fp64 rounding in step units,
// while a wrong update rule, bias correction or weight decay moves most coordinates.
static void check_weights_after_adam(const float *got, const float *want, size_t n, float step, const char *name) {
    size_t loose = 0, allowed = n / 1000 > 1 ? n / 1000 : 1, worst = 0;
    double maxdiff = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= 0.01 * step)) loose++;
        if (d > maxdiff || d != d) { maxdiff = d; worst = i; }
    }
    int ok = loose <= allowed && maxdiff <= 0.1 * step;
    char why[256];
    snprintf(why, sizeof(why), "%zu of %zu coordinates beyond 1%% of a step (%.2e; allowed %zu), max |diff| %.3g at [%zu] (limit %.2e)",
             loose, n, 0.01 * step, allowed, maxdiff, worst, 0.1 * step);
    if (ok) {
        g_checks_passed++;
        printf("ok %s (n=%zu, max |diff| %.3g, %zu beyond 1%% of a step)\n", name, n, maxdiff, loose);
    } else {
        g_checks_failed++;
        printf("FAIL %s: %s\n", name, why);
    }
}

static float max_abs(const float *x, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) if (fabsf(x[i]) > m) m = fabsf(x[i]);
    return m;
}

// Compares the logits' first V columns of each row (the padded columns are not in the reference).
static void check_logits(const GPT2 *m, const float *expected, int BT, int V, float atol, float rtol, const char *name) {
    float *got = (float *)mallocCheck((size_t)BT * V * sizeof(float));
    for (int r = 0; r < BT; r++) memcpy(got + (size_t)r * V, m->logits + (size_t)r * m->config.padded_vocab_size, V * sizeof(float));
    check_close(got, expected, (size_t)BT * V, atol, rtol, name);
    free(got);
}

// Every tensor of the table against the reference, with a tolerance relative to the tensor's scale.
static void check_tensors(const GPT2 *m, const float *got, const float *expected, float rel, const char *what, const char *fixture) {
    for (int i = 0; i < m->layout.params.n; i++) {
        const ParamTensor *p = &m->layout.params.t[i];
        char name[256];
        snprintf(name, sizeof(name), "%s %s %s", fixture, what, p->name);
        float scale = max_abs(expected + p->offset, p->numel);
        check_close(got + p->offset, expected + p->offset, p->numel, rel * scale + 1e-8f, 0.0f, name);
    }
}

// How many (step's, routed layer, token) selections differ from the reference's routing section
// (the last forward was at step `step`); selections compare as sets (moe.h keeps top-k order).
static int routing_mismatches(const GPT2 *m, const Fixture *f, int step) {
    int bad = 0, BT = f->B * f->T;
    for (int j = 0; j < f->n_routed; j++) {
        const LinearDesc *ld = &f->routed[j];
        const MoEState *st = ld->layer < 0 ? &m->head_acts.moe : &m->blocks[ld->layer].lin[ld->role].moe;
        const int K = ld->spec.topk, *ref = f->route_sel + fixture_route_sel_off(f, step, j);
        for (int t = 0; t < BT; t++)
            for (int k = 0; k < K; k++) {
                int found = 0;
                for (int i = 0; i < K; i++) found |= st->sel[(size_t)t * K + i] == ref[(size_t)t * K + k];
                bad += !found;
            }
    }
    return bad;
}

static void run_fixture(const char *path) {
    Fixture f;
    GPT2 m;
    fixture_read(&f, &m, path);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    printf("# fixture %s (v%d): B=%d T=%d V=%d, %zu params in %d tensors, %d routed layers, %d steps\n", base, f.version, f.B, f.T,
           f.V, f.num_params, m.layout.params.n, m.n_routed, f.n_steps);
    char name[256];
    const GPT2Layout *g = &m.layout;
    if (f.version == 2) {
        // the structure-aware learning rates and decay flags, tensor by tensor, against the reference's
        int ok = 1;
        char why[256] = "";
        for (int i = 0; i < g->params.n && ok; i++) {
            const ParamTensor *p = &g->params.t[i];
            if (fabsf(p->lr_mult - f.ref_lr_mult[i]) > 1e-6f * fabsf(f.ref_lr_mult[i]) || p->decay != f.ref_decay[i]) {
                ok = 0;
                snprintf(why, sizeof(why), "%s: lr_mult %g decay %d, reference %g decay %d", p->name, p->lr_mult, p->decay,
                         f.ref_lr_mult[i], f.ref_decay[i]);
            }
        }
        snprintf(name, sizeof(name), "%s lr multipliers and decay flags of all %d tensors", base, g->params.n);
        check_true(ok, name, why);
        snprintf(name, sizeof(name), "%s routed layers and aux weight", base);
        check_true(m.n_routed == f.n_routed && (f.n_routed == 0 || fabsf(g->structure.moe_aux_weight - f.moe_aux_weight) < 1e-7f),
                   name, "differ from the reference");
    }
    memcpy(m.params, f.params, f.num_params * sizeof(float));
    gpt2_alloc_activations(&m, f.B, f.T);

    // forward and backward at the initial weights
    float ce = gpt2_forward(&m, f.inputs, f.targets, f.B, f.T);
    float aux = m.routing.aux, total = gpt2_total_loss(&m, ce);
    snprintf(name, sizeof(name), "%s logits", base);
    check_logits(&m, f.logits, f.B * f.T, f.V, 1e-5f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s loss", base);
    check_close(&total, &f.loss, 1, 1e-5f, 1e-5f, name);
    if (f.n_routed > 0) {
        snprintf(name, sizeof(name), "%s cross-entropy without aux", base);
        check_close(&ce, &f.ce_loss, 1, 1e-5f, 1e-5f, name);
        snprintf(name, sizeof(name), "%s aux loss", base);
        check_close(&aux, &f.aux, 1, 1e-5f, 1e-5f, name);
    }
    gpt2_zero_grad(&m);
    gpt2_backward(&m, 1.0f, f.B, f.T);
    check_tensors(&m, m.grads, f.grads, 1e-4f, "grad", base);

    // the reference's training: same batch each step, clip, AdamW with the table's multipliers
    memcpy(m.params, f.params, f.num_params * sizeof(float));
    float *losses = (float *)mallocCheck(f.n_steps * sizeof(float));
    float *auxes = (float *)mallocCheck(f.n_steps * sizeof(float));
    float *norms = (float *)mallocCheck(f.n_steps * sizeof(float));
    int route_bad = 0;
    for (int s = 0; s < f.n_steps; s++) {
        float l = gpt2_forward(&m, f.inputs, f.targets, f.B, f.T);
        if (f.n_routed > 0) route_bad += routing_mismatches(&m, &f, s);
        losses[s] = gpt2_total_loss(&m, l);
        auxes[s] = m.routing.aux;
        gpt2_zero_grad(&m);
        gpt2_backward(&m, 1.0f, f.B, f.T);
        norms[s] = gpt2_grad_norm(&m);
        float scale = norms[s] > f.grad_clip ? f.grad_clip / norms[s] : 1.0f;
        gpt2_update(&m, f.lr, f.beta1, f.beta2, f.eps, f.weight_decay, scale, s + 1);
        printf("  step %2d loss %.6f (ref %.6f) aux %.6f (ref %.6f) norm %.6f (ref %.6f)\n", s + 1, losses[s], f.losses[s],
               auxes[s], f.auxes[s], norms[s], f.norms[s]);
    }
    if (f.n_routed > 0) {
        char why[96];
        snprintf(why, sizeof(why), "%d selections differ", route_bad);
        snprintf(name, sizeof(name), "%s routing: every token's experts at every step and routed layer as the reference's", base);
        check_true(route_bad == 0, name, why);
    }
    snprintf(name, sizeof(name), "%s losses over %d steps", base, f.n_steps);
    check_close(losses, f.losses, f.n_steps, 1e-4f, 1e-5f, name);
    if (f.n_routed > 0) {
        snprintf(name, sizeof(name), "%s aux losses over %d steps", base, f.n_steps);
        check_close(auxes, f.auxes, f.n_steps, 1e-4f, 1e-4f, name);
    }
    snprintf(name, sizeof(name), "%s grad norms over %d steps", base, f.n_steps);
    check_close(norms, f.norms, f.n_steps, 1e-4f, 1e-4f, name);
    // Final weights (see check_weights_after_adam). The bias of a separate k layer is the exception: adding a constant vector to every key of a
    // sequence adds the same q·b to every score of a query, which the softmax ignores, so its
    // gradient is zero in exact arithmetic (checked above) and Adam turns rounding noise into
    // lr-sized steps in either implementation. Its final values are not comparable.
    for (int i = 0; i < g->params.n; i++) {
        const ParamTensor *p = &g->params.t[i];
        size_t len = strlen(p->name);
        if (len > 4 && strcmp(p->name + len - 4, ".k.b") == 0) continue;
        float step = f.lr * p->lr_mult;
        snprintf(name, sizeof(name), "%s weights after training %s", base, p->name);
        if (len > 5 && strcmp(p->name + len - 5, ".qkvb") == 0) {  // the fused bias: its q and v parts
            size_t C = (size_t)m.config.channels;
            snprintf(name, sizeof(name), "%s weights after training %s (q part)", base, p->name);
            check_weights_after_adam(m.params + p->offset, f.final_params + p->offset, C, step, name);
            snprintf(name, sizeof(name), "%s weights after training %s (v part)", base, p->name);
            check_weights_after_adam(m.params + p->offset + 2 * C, f.final_params + p->offset + 2 * C, C, step, name);
            continue;
        }
        check_weights_after_adam(m.params + p->offset, f.final_params + p->offset, p->numel, step, name);
    }
    free(losses);
    free(auxes);
    free(norms);
    gpt2_free(&m);
    fixture_free(&f);
}

// llm.c's own check: GPT-2 124M weights, one batch, its PyTorch logits, loss and gradients, and
// the losses of 10 AdamW steps (lr 1e-4, betas 0.9/0.999, weight decay 0.01 on every tensor, as
// llm.c's CPU update does, no clipping) that llm.c's test_gpt2.c checks.
static void run_llmc_124M(const char *model_path, const char *state_path) {
    GPT2 m;
    gpt2_build(&m, model_path);
    DebugState d;
    debug_state_read(&d, state_path, m.config.vocab_size, m.num_params);
    int B = d.B, T = d.T, V = m.config.vocab_size;
    size_t BT = (size_t)B * T;
    int *x = d.x, *y = d.y;
    float *logits = d.logits, loss = d.loss, *grads = d.grads;
    gpt2_alloc_activations(&m, B, T);
    const float *expected_losses = llmc_124M_expected_losses;
    for (int i = 0; i < m.layout.params.n; i++) m.layout.params.t[i].decay = 1;
    float losses[10];
    for (int s = 0; s < 10; s++) {
        losses[s] = gpt2_forward(&m, x, y, B, T);
        if (s == 0) {
            check_logits(&m, logits, (int)BT, V, 1e-2f, 0.0f, "llm.c 124M logits");
            check_close(&losses[0], &loss, 1, 1e-4f, 0.0f, "llm.c 124M loss");
        }
        gpt2_zero_grad(&m);
        gpt2_backward(&m, 1.0f, B, T);
        if (s == 0) check_tensors(&m, m.grads, grads, 2e-2f, "grad", "llm.c 124M");
        gpt2_update(&m, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.01f, 1.0f, s + 1);
        printf("  step %d loss %.6f (llm.c %.6f)\n", s, losses[s], expected_losses[s]);
    }
    check_close(losses, expected_losses, 10, 1e-2f, 0.0f, "llm.c 124M losses over 10 steps");
    debug_state_free(&d);
    gpt2_free(&m);
}

int main(int argc, char **argv) {
    fixture_for_each_model(argc > 1 ? argv[1] : "dev/fixtures", run_fixture);
    if (llmc_124M_present()) run_llmc_124M(LLMC_124M_MODEL, LLMC_124M_STATE);
    return test_summary();
}
