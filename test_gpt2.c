// test_gpt2.c: test mode on the CPU: the model against PyTorch fixtures (dev/reference.py) —
// logits, loss, every gradient, 10 AdamW steps and the final weights — and against llm.c's
// GPT-2 124M debug state when gpt2_124M.bin and gpt2_124M_debug_state.bin are present.
#define TESTING
#include "train_gpt2.c"
#include <glob.h>
#include "tests/check.h"

#define FIXTURE_MAGIC 20241123

typedef struct {
    int B, T, n_steps, V, Vp;
    size_t num_params;
    float lr, beta1, beta2, eps, weight_decay, grad_clip;
    char *config_text;
    float *params, *logits, *grads, *losses, *norms, *final_params;
    float loss;
    int *inputs, *targets;
} Fixture;

static void fixture_read(Fixture *f, const char *path) {
    FILE *fp = fopenCheck(path, "rb");
    int header[256];
    float hyper[64];
    freadCheck(header, sizeof(int), 256, fp, path);
    if (header[0] != FIXTURE_MAGIC || header[1] != 1)
        fatal("'%s' is not a version-1 fixture (magic %d version %d); regenerate with python dev/reference.py", path, header[0], header[1]);
    freadCheck(hyper, sizeof(float), 64, fp, path);
    f->B = header[2]; f->T = header[3]; f->n_steps = header[4];
    f->num_params = (size_t)header[6]; f->V = header[7]; f->Vp = header[8];
    f->lr = hyper[0]; f->beta1 = hyper[1]; f->beta2 = hyper[2]; f->eps = hyper[3];
    f->weight_decay = hyper[4]; f->grad_clip = hyper[5];
    f->config_text = (char *)callocCheck((size_t)header[5] + 1, 1);
    freadCheck(f->config_text, 1, (size_t)header[5], fp, path);
    size_t BT = (size_t)f->B * f->T, P = f->num_params;
    f->params = (float *)mallocCheck(P * sizeof(float));
    f->inputs = (int *)mallocCheck(BT * sizeof(int));
    f->targets = (int *)mallocCheck(BT * sizeof(int));
    f->logits = (float *)mallocCheck(BT * f->V * sizeof(float));
    f->grads = (float *)mallocCheck(P * sizeof(float));
    f->losses = (float *)mallocCheck(f->n_steps * sizeof(float));
    f->norms = (float *)mallocCheck(f->n_steps * sizeof(float));
    f->final_params = (float *)mallocCheck(P * sizeof(float));
    freadCheck(f->params, sizeof(float), P, fp, path);
    freadCheck(f->inputs, sizeof(int), BT, fp, path);
    freadCheck(f->targets, sizeof(int), BT, fp, path);
    freadCheck(f->logits, sizeof(float), BT * f->V, fp, path);
    freadCheck(&f->loss, sizeof(float), 1, fp, path);
    freadCheck(f->grads, sizeof(float), P, fp, path);
    freadCheck(f->losses, sizeof(float), f->n_steps, fp, path);
    freadCheck(f->norms, sizeof(float), f->n_steps, fp, path);
    freadCheck(f->final_params, sizeof(float), P, fp, path);
    fcloseCheck(fp, path);
}

static void fixture_free(Fixture *f) {
    free(f->config_text); free(f->params); free(f->logits); free(f->grads); free(f->losses);
    free(f->norms); free(f->final_params); free(f->inputs); free(f->targets);
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

static void run_fixture(const char *path) {
    Fixture f;
    fixture_read(&f, path);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    printf("# fixture %s: B=%d T=%d V=%d, %zu params, %d steps\n", base, f.B, f.T, f.V, f.num_params, f.n_steps);
    ConfigFile cf;
    config_parse_text(&cf, path, f.config_text);
    GPT2Config c;
    gpt2_config_from_file(&cf, &c);
    config_check_all_used(&cf, GPT2_CONFIG_KEYS);
    config_free(&cf);
    GPT2 m;
    memset(&m, 0, sizeof(m));
    gpt2_layout_build(&m.layout, &c);
    gpt2_alloc_params(&m);
    char name[256];
    snprintf(name, sizeof(name), "%s parameter count", base);
    check_true(m.num_params == f.num_params && c.vocab_size == f.V && c.padded_vocab_size == f.Vp, name, "table size differs from the fixture");
    if (m.num_params != f.num_params) { fixture_free(&f); gpt2_free(&m); return; }
    memcpy(m.params, f.params, f.num_params * sizeof(float));
    gpt2_alloc_activations(&m, f.B, f.T);

    // forward and backward at the initial weights
    float loss = gpt2_forward(&m, f.inputs, f.targets, f.B, f.T);
    snprintf(name, sizeof(name), "%s logits", base);
    check_logits(&m, f.logits, f.B * f.T, f.V, 1e-5f, 1e-4f, name);
    snprintf(name, sizeof(name), "%s loss", base);
    check_close(&loss, &f.loss, 1, 1e-5f, 1e-5f, name);
    gpt2_zero_grad(&m);
    gpt2_backward(&m, 1.0f, f.B, f.T);
    check_tensors(&m, m.grads, f.grads, 1e-4f, "grad", base);

    // the reference's training: same batch each step, clip, AdamW
    memcpy(m.params, f.params, f.num_params * sizeof(float));
    float *losses = (float *)mallocCheck(f.n_steps * sizeof(float));
    float *norms = (float *)mallocCheck(f.n_steps * sizeof(float));
    for (int s = 0; s < f.n_steps; s++) {
        losses[s] = gpt2_forward(&m, f.inputs, f.targets, f.B, f.T);
        gpt2_zero_grad(&m);
        gpt2_backward(&m, 1.0f, f.B, f.T);
        norms[s] = gpt2_grad_norm(&m);
        float scale = norms[s] > f.grad_clip ? f.grad_clip / norms[s] : 1.0f;
        gpt2_update(&m, f.lr, f.beta1, f.beta2, f.eps, f.weight_decay, scale, s + 1);
        printf("  step %2d loss %.6f (ref %.6f) norm %.6f (ref %.6f)\n", s + 1, losses[s], f.losses[s], norms[s], f.norms[s]);
    }
    snprintf(name, sizeof(name), "%s losses over %d steps", base, f.n_steps);
    check_close(losses, f.losses, f.n_steps, 1e-4f, 1e-5f, name);
    snprintf(name, sizeof(name), "%s grad norms over %d steps", base, f.n_steps);
    check_close(norms, f.norms, f.n_steps, 1e-4f, 1e-4f, name);
    // Adam moves every coordinate by about lr per step whatever the gradient's size, so where a
    // gradient is near zero fp32-vs-fp64 rounding shows up in lr units: allow 1% of lr. A wrong
    // weight decay or bias correction moves weights by far more than that.
    for (int i = 0; i < m.layout.params.n; i++) {
        const ParamTensor *p = &m.layout.params.t[i];
        snprintf(name, sizeof(name), "%s weights after training %s", base, p->name);
        check_close(m.params + p->offset, f.final_params + p->offset, p->numel, 0.01f * f.lr, 0.0f, name);
    }
    free(losses);
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
    FILE *fp = fopenCheck(state_path, "rb");
    int header[256];
    freadCheck(header, sizeof(int), 256, fp, state_path);
    if (header[0] != 20240327 || header[1] != 2) fatal("'%s' is not an llm.c debug state (version 2)", state_path);
    int B = header[2], T = header[3], V = m.config.vocab_size;
    size_t BT = (size_t)B * T;
    int *x = (int *)mallocCheck(BT * sizeof(int)), *y = (int *)mallocCheck(BT * sizeof(int));
    float *logits = (float *)mallocCheck(BT * V * sizeof(float)), loss;
    float *grads = (float *)mallocCheck(m.num_params * sizeof(float));
    freadCheck(x, sizeof(int), BT, fp, state_path);
    freadCheck(y, sizeof(int), BT, fp, state_path);
    freadCheck(logits, sizeof(float), BT * V, fp, state_path);
    freadCheck(&loss, sizeof(float), 1, fp, state_path);
    freadCheck(grads, sizeof(float), m.num_params, fp, state_path);
    fcloseCheck(fp, state_path);
    gpt2_alloc_activations(&m, B, T);
    static const float expected_losses[10] = {5.270007f, 4.059707f, 3.375123f, 2.800783f, 2.315382f,
                                              1.849029f, 1.394656f, 0.999147f, 0.624080f, 0.376511f};
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
    free(x); free(y); free(logits); free(grads);
    gpt2_free(&m);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "dev/fixtures";
    char pattern[1024];
    snprintf(pattern, sizeof(pattern), "%s/dense_*.bin", dir);
    glob_t g;
    if (glob(pattern, 0, NULL, &g) != 0 || g.gl_pathc == 0) fatal("no fixtures match '%s'; run from the repository root", pattern);
    for (size_t i = 0; i < g.gl_pathc; i++) run_fixture(g.gl_pathv[i]);
    globfree(&g);
    FILE *a = fopen("gpt2_124M.bin", "rb"), *b = fopen("gpt2_124M_debug_state.bin", "rb");
    if (a && b) {
        fclose(a); fclose(b);
        run_llmc_124M("gpt2_124M.bin", "gpt2_124M_debug_state.bin");
    } else {
        if (a) fclose(a);
        if (b) fclose(b);
        printf("# llm.c 124M check skipped: gpt2_124M.bin and gpt2_124M_debug_state.bin not in the current directory\n");
    }
    return test_summary();
}
