// test_units.c: unit tests of the CPU trainer's pieces: PyTorch-exact RNG and llm.c-exact init,
// checkpoint round trips (same bytes as llm.c's layout), bf16 checkpoints, config-file errors,
// AdamW by hand, gradient accumulation, and the parameter table.
#define TESTING
#include "../train_gpt2.c"
#include <glob.h>
#include <sys/wait.h>
#include "check.h"


static void test_rng_matches_torch(void) {
    const char *path = "dev/fixtures/rng_normal.bin";
    FILE *fp = fopenCheck(path, "rb");
    int header[256];
    freadCheck(header, sizeof(int), 256, fp, path);
    mt19937_state rng;
    for (int c = 0; c < header[2]; c++) {
        int meta[3];
        float ms[2];
        freadCheck(meta, sizeof(int), 3, fp, path);
        freadCheck(ms, sizeof(float), 2, fp, path);
        int n = meta[2];
        float *want = (float *)mallocCheck((size_t)n * sizeof(float)), *got = (float *)mallocCheck((size_t)n * sizeof(float));
        freadCheck(want, sizeof(float), (size_t)n, fp, path);
        if (meta[0] >= 0) mt_seed(&rng, (uint32_t)meta[0]);
        if (meta[1] == 0) mt_normal_(got, (size_t)n, ms[0], ms[1], &rng);
        else mt_uniform_(got, (size_t)n, 0.0f, 1.0f, &rng);
        char name[128];
        snprintf(name, sizeof(name), "rng case %d (seed %d, %s, n=%d) equals torch", c, meta[0], meta[1] ? "rand" : "normal_", n);
        // torch's vectorised log/sin/cos may differ from libm in the last bit
        check_close(got, want, (size_t)n, 1e-6f * ms[1], 1e-6f, name);
        free(want);
        free(got);
    }
    fcloseCheck(fp, path);
}

static void test_init_matches_llmc(void) {
    const char *path = "dev/fixtures/init_llmc.bin";
    FILE *fp = fopenCheck(path, "rb");
    int header[256];
    freadCheck(header, sizeof(int), 256, fp, path);
    char *text = (char *)callocCheck((size_t)header[3] + 1, 1);
    freadCheck(text, 1, (size_t)header[3], fp, path);
    float *want = (float *)mallocCheck((size_t)header[2] * sizeof(float));
    freadCheck(want, sizeof(float), (size_t)header[2], fp, path);
    fcloseCheck(fp, path);
    ConfigFile cf;
    config_parse_text(&cf, path, text);
    GPT2Config c;
    gpt2_config_from_file(&cf, &c);
    config_free(&cf);
    GPT2Layout g;
    gpt2_layout_build(&g, &c);
    check_true(g.params.total == (size_t)header[2], "init: parameter count equals torch's", "sizes differ");
    if (g.params.total == (size_t)header[2]) {
        float *got = (float *)mallocCheck(g.params.total * sizeof(float));
        gpt2_init_random(&g, got, 42);
        check_close(got, want, g.params.total, 1e-7f, 1e-6f, "init from seed 42 equals llm.c's order on torch's generator");
        free(got);
    }
    gpt2_layout_free(&g);
    free(text);
    free(want);
}

// Reads the state file at arg (1000 parameters, no master weights) as for a model of 9 linear layers.
static void read_state_9_kernels(const void *arg) {
    TrainState st;
    float *mv = (float *)mallocCheck(2000 * sizeof(float));
    uint8_t kb[9];
    state_read((const char *)arg, &st, mv, mv + 1000, NULL, 1000, kb, 9);
    free(mv);
}

// A fake llm.c checkpoint with known bytes loads, and writing it back gives the same bytes.
static void test_checkpoint_round_trip(void) {
    GPT2Config c = {16, 100, 128, 2, 2, 32};
    GPT2Layout g;
    gpt2_layout_build(&g, &c);
    size_t n = g.params.total;
    float *w = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) w[i] = sinf((float)i * 0.37f);
    const char *a = "/tmp/structgpt_unit_a.bin", *b = "/tmp/structgpt_unit_b.bin";
    FILE *fp = fopenCheck(a, "wb");  // written by hand, the way llm.c lays it out
    int header[256] = {0};
    header[0] = 20240326; header[1] = 3; header[2] = 16; header[3] = 100; header[4] = 2; header[5] = 2; header[6] = 32; header[7] = 128;
    fwriteCheck(header, sizeof(int), 256, fp, a);
    fwriteCheck(w, sizeof(float), n, fp, a);
    fcloseCheck(fp, a);
    GPT2 m;
    gpt2_build(&m, a);
    check_true(m.num_params == n && memcmp(m.params, w, n * sizeof(float)) == 0, "llm.c v3 checkpoint loads exactly", "weights differ");
    check_true(m.config.num_layers == 2 && m.config.channels == 32 && m.config.padded_vocab_size == 128,
               "llm.c v3 header fields", "config differs");
    model_write_fp32(b, &m.config, m.config_text, m.params, m.num_params);
    FILE *fa = fopenCheck(a, "rb"), *fb = fopenCheck(b, "rb");
    int same = 1, ca, cb;
    do { ca = fgetc(fa); cb = fgetc(fb); if (ca != cb) same = 0; } while (ca != EOF && cb != EOF && same);
    fclose(fa); fclose(fb);
    check_true(same, "a checkpoint written here has the same bytes as the llm.c file it came from", "bytes differ");
    gpt2_free(&m);

    // bf16 (version 5): the high half of each float, read back as exactly that value
    fp = fopenCheck(a, "wb");
    header[1] = 5;
    fwriteCheck(header, sizeof(int), 256, fp, a);
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &w[i], 4);
        uint16_t h = (uint16_t)(u >> 16);
        fwriteCheck(&h, 2, 1, fp, a);
        u &= 0xffff0000u;
        memcpy(&w[i], &u, 4);
    }
    fcloseCheck(fp, a);
    gpt2_build(&m, a);
    check_true(memcmp(m.params, w, n * sizeof(float)) == 0, "llm.c v5 (bf16) checkpoint loads exactly", "weights differ");
    // and ours: model_write_bf16 of bf16-exact weights gives the same bytes as the hand-written file
    model_write_bf16_from_fp32(b, &m.config, m.params, m.num_params);
    fa = fopenCheck(a, "rb"); fb = fopenCheck(b, "rb");
    same = 1;
    do { ca = fgetc(fa); cb = fgetc(fb); if (ca != cb) same = 0; } while (ca != EOF && cb != EOF && same);
    fclose(fa); fclose(fb);
    check_true(same, "a v5 checkpoint written here has the same bytes as the llm.c-layout file", "bytes differ");
    gpt2_free(&m);
    // round to nearest even, by hand: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 (rounds to 1, even),
    // 1 + 3*2^-8 a tie between 1 + 2^-7 and 1 + 2^-6 (rounds up, to even), 1 + 2^-8 + 2^-20 rounds up
    check_true(float_to_bf16(1.0f + 0x1p-8f) == 0x3F80 && float_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3F82 &&
                   float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3F81 && float_to_bf16(-2.0f) == 0xC000 &&
                   (float_to_bf16(NAN) & 0x7FC0) == 0x7FC0,
               "float_to_bf16 rounds to nearest, ties to even, and keeps NaN", "wrong bits");

    // resume state with and without master weights: fields, moments and master read back exactly
    {
        const size_t k = 1000;
        float *mm = (float *)mallocCheck(3 * k * sizeof(float)), *back = (float *)mallocCheck(3 * k * sizeof(float));
        for (size_t i = 0; i < 3 * k; i++) mm[i] = cosf((float)i);
        TrainState st, st2;
        memset(&st, 0, sizeof(st));
        st.step = 17; st.num_params = (int64_t)k; st.dl_sample_idx = 5; st.sample_rng = 0x1234567890ull;
        for (int i = 0; i < 150; i++) outlier_push(&st.loss_window, 1.0 / (i + 1));
        for (int i = 0; i < 30; i++) outlier_push(&st.norm_window, 2.0 + i);
        state_write(a, &st, mm, mm + k, mm + 2 * k, NULL, 0);
        int got = state_read(a, &st2, back, back + k, back + 2 * k, k, NULL, 0);
        check_true(got == 1 && st2.has_master == 1 && st2.step == 17 && st2.dl_sample_idx == 5 && st2.sample_rng == 0x1234567890ull &&
                       memcmp(mm, back, 3 * k * sizeof(float)) == 0 && memcmp(&st.loss_window, &st2.loss_window, sizeof(OutlierWindow)) == 0 &&
                       memcmp(&st.norm_window, &st2.norm_window, sizeof(OutlierWindow)) == 0,
                   "resume state with master weights and outlier windows reads back exactly", "differs");
        got = state_read(a, &st2, back, back + k, NULL, k, NULL, 0);  // a reader that keeps its own weights skips them
        check_true(got == 0 && memcmp(mm, back, 2 * k * sizeof(float)) == 0, "resume state: master weights can be skipped", "differs");
        // the GPU trainer's kernels per linear layer follow the arrays, with or without master
        // weights, and a reader that skips the master weights still finds them
        {
            const uint8_t kern[7] = {0, 3, 255, 4, 1, 20, 0};  // 20: -at 1's pair of -sk 3 forward, -sk 0 backward
            uint8_t kb[7];
            for (int with_master = 0; with_master <= 1; with_master++) {
                state_write(b, &st, mm, mm + k, with_master ? mm + 2 * k : NULL, kern, 7);
                for (int skip = 0; skip <= with_master; skip++) {
                    memset(kb, 0xEE, sizeof(kb));
                    got = state_read(b, &st2, back, back + k, skip ? NULL : back + 2 * k, k, kb, 7);
                    check_true(got == (with_master && !skip) && st2.n_kernels == 7 && memcmp(kb, kern, 7) == 0 &&
                                   memcmp(mm, back, 2 * k * sizeof(float)) == 0,
                               with_master ? (skip ? "resume state: kernels after skipped master weights" : "resume state: kernels after master weights")
                                           : "resume state: kernels after the moments", "differs");
                }
            }
            got = state_read(b, &st2, back, back + k, NULL, k, NULL, 0);  // the CPU trainer: has no kernels, ignores them
            check_true(got == 0 && st2.n_kernels == 7 && memcmp(mm, back, 2 * k * sizeof(float)) == 0, "resume state: a reader without kernels ignores them",
                       "differs");
            char err[1024];
            int rc = run_child(read_state_9_kernels, b, 2, err, sizeof(err));
            check_true(rc != 0 && strstr(err, b) && strstr(err, "kernels of 7 linear layers") && strstr(err, "this model has 9"),
                       "a state holding another model's kernels is an error naming the file and both counts", err);
            state_write(b, &st, mm, mm + k, NULL, NULL, 0);
            got = state_read(b, &st2, back, back + k, NULL, k, kb, 7);
            check_true(st2.n_kernels == 0, "resume state without kernels reads n_kernels 0", "differs");
        }
        state_write(b, &st, mm, mm + k, NULL, NULL, 0);
        memset(back + 2 * k, 0, k * sizeof(float));
        got = state_read(b, &st2, back, back + k, back + 2 * k, k, NULL, 0);
        check_true(got == 0 && st2.has_master == 0 && back[2 * k] == 0.0f, "resume state without master weights says so", "differs");
        // a version-1 file (before the outlier windows): the same fields, arrays, and empty windows
        {
            int header[256] = {0};
            header[0] = STATE_MAGIC;
            header[1] = 1;
            FILE *fp = fopenCheck(b, "wb");
            fwriteCheck(header, sizeof(int), 256, fp, b);
            fwriteCheck(&st, STATE_V1_BYTES, 1, fp, b);
            fwriteCheck(mm, sizeof(float), 2 * k, fp, b);
            fcloseCheck(fp, b);
            memset(back, 0, 2 * k * sizeof(float));
            got = state_read(b, &st2, back, back + k, NULL, k, NULL, 0);
            check_true(got == 0 && st2.n_kernels == 0 && st2.step == 17 && st2.sample_rng == 0x1234567890ull && memcmp(mm, back, 2 * k * sizeof(float)) == 0 &&
                           st2.loss_window.count == 0 && st2.norm_window.count == 0,
                       "a version-1 resume state loads, with empty outlier windows", "differs");
        }
        free(mm);
        free(back);
    }
    gpt2_layout_free(&g);
    free(w);
    remove(a);
    remove(b);
}

// Parses a config file and builds its parameter table, without allocating the weights.
static void build_layout_from(const void *arg) {
    ConfigFile cf;
    config_parse_file(&cf, (const char *)arg);
    GPT2Config c;
    gpt2_config_from_file(&cf, &c);
    StructConfig sc;
    struct_config_parse(&cf, &c, &sc);
    GPT2Layout g;
    gpt2_layout_build_structured(&g, &c, &sc);
    gpt2_layout_free(&g);
    config_free(&cf);
}

static void build_from(const void *arg) {
    GPT2 m;
    gpt2_build(&m, (const char *)arg);
}

static void expect_build_error(const char *content, const char *must_contain, const char *name) {
    const char *path = "/tmp/structgpt_unit.conf";
    FILE *fp = fopenCheck(path, "wb");
    fwriteCheck(content, 1, strlen(content), fp, path);
    fcloseCheck(fp, path);
    char err[4096];
    int rc = run_child(build_from, path, 2, err, sizeof(err));
    char why[4200];
    snprintf(why, sizeof(why), "exit %d, stderr: %s", rc, err);
    check_true(rc != 0 && strstr(err, must_contain) != NULL, name, why);
}

// outlier_push against sums done here in long double: NAN until 100 values, the population z of
// each new value against exactly the 100 before it (the ring wraps), and a constant window
static void test_outlier_window(void) {
    OutlierWindow w;
    memset(&w, 0, sizeof(w));
    double hist[400];
    int nan_first = 1, n_bad = 0;
    double worst = 0.0;
    for (int i = 0; i < 400; i++) {
        double x = i < 100 ? (double)i : 50.0 + 40.0 * sin(0.37 * i) + (i % 97 == 0 ? 500.0 : 0.0);
        double z = outlier_push(&w, x);
        hist[i] = x;
        if (i < 100) { nan_first &= isnan(z); continue; }
        long double sum = 0.0L, ss = 0.0L;
        for (int j = i - 100; j < i; j++) sum += hist[j];
        long double mean = sum / 100.0L;
        for (int j = i - 100; j < i; j++) ss += (hist[j] - mean) * (hist[j] - mean);
        double want = (double)((x - mean) / sqrtl(ss / 100.0L));
        double err = fabs(z - want) / fmax(1.0, fabs(want));
        if (!(err < 1e-12)) n_bad++;
        if (err > worst) worst = err;
    }
    check_true(nan_first, "outlier window: no z-score before 100 values", "a number came early");
    char why[96];
    snprintf(why, sizeof(why), "%d wrong, worst relative error %g", n_bad, worst);
    check_true(n_bad == 0 && w.count == 400, "outlier window: 300 z-scores equal the previous 100 values' (rel 1e-12)", why);
    OutlierWindow c;
    memset(&c, 0, sizeof(c));
    for (int i = 0; i < 100; i++) outlier_push(&c, 5.0);
    double z_same = outlier_push(&c, 5.0), z_up = outlier_push(&c, 6.0);
    snprintf(why, sizeof(why), "z %g, %g", z_same, z_up);
    check_true(z_same == 0.0 && isinf(z_up) && z_up > 0 && outlier_trips(z_up, 3.0f), "outlier window: a constant window gives 0 for its value, +inf above",
               why);
    check_true(!outlier_trips(NAN, 3.0f) && !outlier_trips(10.0, 0.0f) && outlier_trips(3.5, 3.0f) && !outlier_trips(3.0, 3.0f) &&
                   !outlier_trips(-9.0, 3.0f),
               "outlier_trips: only z above a threshold that is on; NAN never", "wrong");
}

static void test_config_errors(void) {
    expect_build_error("n_layer = 2\nn_head = 2\nn_embd = 32\nn_lyer = 3\n", "structgpt_unit.conf:4: unknown key 'n_lyer'", "config: unknown key names file:line");
    expect_build_error("n_layer = two\nn_head = 2\nn_embd = 32\n", "structgpt_unit.conf:1: 'n_layer = two' must be an integer", "config: bad number names file:line");
    expect_build_error("n_head = 2\nn_embd = 32\n", "missing required key 'n_layer'", "config: missing key");
    expect_build_error("n_layer = 2\nn_head = 3\nn_embd = 32\n", "not divisible by n_head", "config: heads must divide n_embd");
    expect_build_error("n_layer = 2\nn_head = 2\nn_layer = 3\nn_embd = 32\n", "structgpt_unit.conf:3: 'n_layer' is already set at line 1", "config: duplicate key");
    expect_build_error("n_layer = 2\n[linear\n", "structgpt_unit.conf:2: bad section header", "config: bad section header");
    expect_build_error("n_layer 2\n", "structgpt_unit.conf:1: expected 'key = value'", "config: line without '='");
    expect_build_error("n_layer = 2\nn_head = 2\nn_embd = 32\nvocab_size = 70000\n", "vocab_size = 70000", "config: vocab too large for uint16 shards");
#define HEAD "n_layer = 2\nn_head = 2\nn_embd = 48\nvocab_size = 100\nmax_seq_len = 16\n"
    expect_build_error(HEAD "[linear]\nstruct = bt\n", "structgpt_unit.conf:7: unknown structure 'bt'", "config: unknown structure");
    expect_build_error(HEAD "[linear]\nstruct = btt\nrnk = 2\n", "structgpt_unit.conf:8: unknown key 'rnk' in [linear]", "config: unknown section key");
    expect_build_error(HEAD "[linear]\nstruct = btt\nrank = x\n", "structgpt_unit.conf:8: 'rank = x' must be an integer", "config: bad number in a section");
    expect_build_error(HEAD "[linear.fc]\nstruct = btt\nin = 4x10\n", "structgpt_unit.conf:8: 'in = 4x10': 4 x 10 = 40 but the input size of layer 0 fc is 48; give factors whose product is 48",
                       "config: factors that do not multiply to the dimension");
    expect_build_error(HEAD "[linear]\nstruct = btt_moe\nexperts = 4\ntopk = 5\n", "structgpt_unit.conf:9: 'topk = 5' exceeds the 4 experts", "config: topk > experts");
    expect_build_error(HEAD "[linear]\nstruct = monarch\nblocks = 5\n", "structgpt_unit.conf:8: 'blocks = 5' does not divide", "config: monarch blocks that do not divide");
    expect_build_error(HEAD "[layer.2]\nstruct = btt\n", "structgpt_unit.conf:7: section [layer.2]: the model has layers 0..1", "config: layer index out of range");
    expect_build_error(HEAD "[linear.mlp]\nstruct = btt\n", "unknown role 'mlp'", "config: unknown role");
    expect_build_error(HEAD "[attention]\nstruct = btt\n", "structgpt_unit.conf:7: unknown section [attention]", "config: unknown section");
    expect_build_error(HEAD "[linear]\nstruct = dense\nexperts = 4\n", "structgpt_unit.conf:8: 'experts' is not an option of dense (set by 'struct = dense' at line 7)", "config: an option of another structure");
    expect_build_error(HEAD "[linear.fc]\nstruct = monarch\nrank = 2\n", "structgpt_unit.conf:8: 'rank' is not an option of monarch", "config: btt option under monarch");
    expect_build_error(HEAD "lm_head = btt\n[linear.lm_head]\nstruct = monarch\n", "the head's structure is set twice", "config: head structure set twice");
#undef HEAD
    // a file that is neither a checkpoint nor a config
    const char bad_magic[16] = {1, 2, 3, 4, 0, 0, 0, 0};
    const char *path = "/tmp/structgpt_unit_bad.bin";
    FILE *fp = fopenCheck(path, "wb");
    fwriteCheck(bad_magic, 1, sizeof(bad_magic), fp, path);
    fcloseCheck(fp, path);
    char err[4096];
    int rc = run_child(build_from, path, 2, err, sizeof(err));
    check_true(rc != 0 && strstr(err, path), "-e of a binary non-checkpoint fails naming the file", err);
    // a truncated checkpoint
    GPT2Config c = {16, 100, 128, 2, 2, 32};
    fp = fopenCheck(path, "wb");
    int header[256];
    model_header_fill(header, &c, 3);
    fwriteCheck(header, sizeof(int), 256, fp, path);
    float z[100] = {0};
    fwriteCheck(z, sizeof(float), 100, fp, path);
    fcloseCheck(fp, path);
    rc = run_child(build_from, path, 2, err, sizeof(err));
    check_true(rc != 0 && strstr(err, "truncated") && strstr(err, path), "truncated checkpoint is reported as truncated", err);
    model_header_fill(header, &c, 4);
    fp = fopenCheck(path, "wb");
    fwriteCheck(header, sizeof(int), 256, fp, path);
    fcloseCheck(fp, path);
    rc = run_child(build_from, path, 2, err, sizeof(err));
    check_true(rc != 0 && strstr(err, "version 4"), "unknown checkpoint version is named", err);
    remove(path);
}

// AdamW against a hand computation in double: two tensors, one with decay and lr_mult 1, one
// without decay and lr_mult 0.5, two steps with gradient scaling.
static void test_adamw_by_hand(void) {
    GPT2 m;
    memset(&m, 0, sizeof(m));
    params_init(&m.layout.params);
    size_t s2[2] = {2, 3}, s1[1] = {3};
    params_add(&m.layout.params, "w", 2, s2, 1.0f, 1);
    params_add(&m.layout.params, "b", 1, s1, 0.5f, 0);
    m.num_params = m.layout.params.total;
    m.params = (float *)mallocCheck(9 * sizeof(float));
    m.grads = (float *)mallocCheck(9 * sizeof(float));
    double p[9], mm[9] = {0}, vv[9] = {0};
    for (int i = 0; i < 9; i++) { p[i] = 0.1 * (i - 4); m.params[i] = (float)p[i]; }
    const double lr = 0.01, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1, scale = 0.5;
    for (int t = 1; t <= 2; t++) {
        for (int i = 0; i < 9; i++) m.grads[i] = (float)(0.3 * cos(i + t));
        gpt2_update(&m, (float)lr, (float)b1, (float)b2, (float)eps, (float)wd, (float)scale, t);
        for (int i = 0; i < 9; i++) {
            double g = (double)(float)(0.3 * cos(i + t)) * scale;
            mm[i] = b1 * mm[i] + (1 - b1) * g;
            vv[i] = b2 * vv[i] + (1 - b2) * g * g;
            double mh = mm[i] / (1 - pow(b1, t)), vh = vv[i] / (1 - pow(b2, t));
            double plr = i < 6 ? lr : lr * 0.5, pwd = i < 6 ? wd : 0.0;
            p[i] -= plr * (mh / (sqrt(vh) + eps) + pwd * p[i]);
        }
    }
    float want[9];
    for (int i = 0; i < 9; i++) want[i] = (float)p[i];
    check_close(m.params, want, 9, 1e-6f, 1e-5f, "AdamW with lr multiplier, decay flag and grad scale equals the formula");
    free(m.params); free(m.grads); free(m.m); free(m.v);
    params_free(&m.layout.params);
}

// One batch of 4 sequences equals two micro-batches of 2 with dloss 1/2 each.
static void test_grad_accumulation(void) {
    GPT2 m;
    gpt2_build(&m, "d2");
    int B = 4, T = 8;
    int *x = (int *)mallocCheck((size_t)B * T * sizeof(int)), *y = (int *)mallocCheck((size_t)B * T * sizeof(int));
    for (int i = 0; i < B * T; i++) { x[i] = (i * 7919) % 50257; y[i] = (i * 104729 + 13) % 50257; }
    gpt2_alloc_activations(&m, B, T);
    gpt2_zero_grad(&m);
    float l_full = gpt2_forward(&m, x, y, B, T);
    gpt2_backward(&m, 1.0f, B, T);
    float *full = (float *)mallocCheck(m.num_params * sizeof(float));
    memcpy(full, m.grads, m.num_params * sizeof(float));
    gpt2_zero_grad(&m);
    float l1 = gpt2_forward(&m, x, y, 2, T);
    gpt2_backward(&m, 0.5f, 2, T);
    float l2 = gpt2_forward(&m, x + 2 * T, y + 2 * T, 2, T);
    gpt2_backward(&m, 0.5f, 2, T);
    float l_acc = 0.5f * (l1 + l2);
    check_close(&l_acc, &l_full, 1, 1e-5f, 1e-6f, "accumulated loss equals the full-batch loss");
    float scale = 0.0f;
    for (size_t i = 0; i < m.num_params; i++) if (fabsf(full[i]) > scale) scale = fabsf(full[i]);
    check_close(m.grads, full, m.num_params, 1e-5f * scale, 0.0f, "accumulated gradients equal the full-batch gradients");
    free(full); free(x); free(y);
    gpt2_free(&m);
}

static void test_param_table(void) {
    GPT2Config c;
    gpt2_config_from_depth_name("d12", &c);
    GPT2Layout g;
    gpt2_layout_build(&g, &c);
    // GPT-2 124M: 124,439,808 parameters with the 50257 vocab (llm.c prints 124475904 padded)
    check_true(gpt2_num_params_unpadded(&g) == 124439808, "d12 has GPT-2 124M's 124,439,808 parameters", "count differs");
    check_true(g.params.total == 124475904, "d12 padded total equals llm.c's 124,475,904", "count differs");
    int decayed = 0, ok = 1;
    for (int i = 0; i < g.params.n; i++) {
        decayed += g.params.t[i].decay;
        if (g.params.t[i].decay != (g.params.t[i].ndim >= 2)) ok = 0;
    }
    check_true(ok && decayed == 2 + 4 * 12, "weight decay exactly on the 2-D weights", "decay flags wrong");
    check_true(strcmp(g.params.t[g.norms[3].ln2w].name, "h.3.ln2w") == 0 && g.params.t[0].offset == 0 &&
               g.params.t[gpt2_linear(&g, 0, SR_Q)->w[0]].offset == (size_t)(50304 + 1024) * 768 + 2 * 12 * 768,
               "table order is llm.c's (wte, wpe, ln1w*, ln1b*, qkvw*, ...)", "offsets differ");
    gpt2_layout_free(&g);
}

// gpt2_block_tensors: blocks 0..L-1 and the rest (l = L) hold every tensor exactly once, block l's
// tensors are those named "h.<l>." (the GPU trainer averages a block's gradients by these), and
// their merged ranges tile the flat buffer [0, total) without gap or overlap.
static int range_offset_cmp(const void *a, const void *b) {
    size_t x = ((const ParamRange *)a)->offset, y = ((const ParamRange *)b)->offset;
    return x < y ? -1 : x > y;
}
static void check_block_partition(const GPT2Layout *g, const char *what) {
    const int L = g->config.num_layers, n = g->params.n;
    int *seen = (int *)calloc((size_t)n, sizeof(int)), *idx = (int *)malloc((size_t)n * sizeof(int)), bad = 0;
    char why[256] = "", prefix[32];
    for (int l = 0; l <= L; l++) {
        int k = gpt2_block_tensors(g, l, idx);
        snprintf(prefix, sizeof(prefix), "h.%d.", l);
        for (int i = 0; i < k; i++) {
            seen[idx[i]]++;
            int named = strncmp(g->params.t[idx[i]].name, prefix, strlen(prefix)) == 0;
            int in_a_block = strncmp(g->params.t[idx[i]].name, "h.", 2) == 0;
            if ((l < L ? !named : in_a_block) && !bad++) snprintf(why, sizeof(why), "%s in block %d", g->params.t[idx[i]].name, l);
        }
    }
    for (int i = 0; i < n; i++)
        if (seen[i] != 1 && !bad++) snprintf(why, sizeof(why), "%s in %d blocks", g->params.t[i].name, seen[i]);
    // the ranges the GPU trainer averages, all blocks together, in offset order
    ParamRange *all;
    int *first = gpt2_block_ranges(g, &all), nr = first[L + 1];
    qsort(all, (size_t)nr, sizeof(ParamRange), range_offset_cmp);
    size_t at = 0;
    for (int i = 0; i < nr; i++) {
        if (all[i].offset != at && !bad++) snprintf(why, sizeof(why), "range %d starts at %zu, expected %zu", i, all[i].offset, at);
        at = all[i].offset + all[i].count;
    }
    if (at != g->params.total && !bad++) snprintf(why, sizeof(why), "ranges end at %zu of %zu", at, g->params.total);
    char name[160];
    snprintf(name, sizeof(name), "%s: %d blocks and the rest hold each of %d tensors once; %d ranges tile the %zu parameters", what, L, n, nr,
             g->params.total);
    check_true(bad == 0, name, why);
    free(seen); free(idx); free(all); free(first);
}
static void test_block_tensors(void) {
    GPT2Config c;
    gpt2_config_from_depth_name("d12", &c);
    GPT2Layout g;
    gpt2_layout_build(&g, &c);
    check_block_partition(&g, "d12");
    gpt2_layout_free(&g);
    const char *text = "n_layer = 3\nn_head = 4\nn_embd = 192\nvocab_size = 500\nmax_seq_len = 16\nlm_head = monarch\n"
                       "[linear]\nstruct = btt\nrank = 2\n[linear.v]\nstruct = btt_moe\n[linear.fc]\nstruct = monarch\nblocks = 4\n"
                       "[linear.lm_head]\nblocks = 4\n[layer.1]\nstruct = dense\n";
    GPT2 m;
    memset(&m, 0, sizeof(m));
    gpt2_build_from_config_text(&m, "block-test", text);
    check_block_partition(&m.layout, "structured, untied monarch head, a dense layer");
    gpt2_free(&m);
}

// Structured init: each core's empirical std is √min(fan_in, fan_out)/fan_in; the last core of
// attn_proj, fc_proj and a structured head is zero; routers start at zero; biases at zero; dense
// layers of a structured model keep GPT-2's N(0, 0.02) (1/√(2L) for residual projections).
static void test_structured_init(void) {
    const char *text = "n_layer = 2\nn_head = 4\nn_embd = 192\nvocab_size = 500\nmax_seq_len = 16\nlm_head = monarch\n"
                       "[linear]\nstruct = btt\nrank = 2\n[linear.v]\nstruct = btt_moe\n[linear.fc]\nstruct = monarch\nblocks = 4\n"
                       "[linear.q]\nstruct = dense\n[linear.lm_head]\nblocks = 4\n";
    GPT2 m;
    memset(&m, 0, sizeof(m));
    gpt2_build_from_config_text(&m, "init-test", text);
    gpt2_init_random(&m.layout, m.params, 42);
    const GPT2Layout *g = &m.layout;
    int checked = 0, bad = 0;
    char why[512] = "";
    for (int l = 0; l <= m.config.num_layers; l++) {
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            const LinearDesc *ld = l < m.config.num_layers ? gpt2_linear(g, l, r) : (r == 0 ? &g->head : NULL);
            if (!ld || !ld->used) continue;
            int residual = ld->role == SR_ATTN_PROJ || ld->role == SR_FC_PROJ || ld->role == SR_LM_HEAD;
            for (int i = 0; i < ld->nw; i++) {
                const ParamTensor *p = &g->params.t[ld->w[i]];
                const float *w = m.params + p->offset;
                double ss = 0.0;
                for (size_t j = 0; j < p->numel; j++) ss += (double)w[j] * w[j];
                double std = sqrt(ss / p->numel), want;
                int ndim, fi, fo;
                size_t shape[3];
                linear_tensor_shape(&ld->spec, i, &ndim, shape, &fi, &fo);
                if (ld->spec.kind == STRUCT_DENSE) want = 0.02 * (residual ? 1.0 / sqrt(2.0 * m.config.num_layers) : 1.0);
                else if (ld->spec.kind == STRUCT_BTT_MOE && i == 2) want = 0.0;
                else if (residual && i == 1) want = 0.0;
                else want = sqrt((double)(fi < fo ? fi : fo)) / fi;
                int ok = want == 0.0 ? std == 0.0 : fabs(std / want - 1.0) < 0.05;
                checked++;
                if (!ok && !bad++) snprintf(why, sizeof(why), "%s: std %.5f, expected %.5f", p->name, std, want);
            }
            if (ld->bias >= 0) {
                const ParamTensor *p = &g->params.t[ld->bias];
                for (size_t j = 0; j < p->numel; j++) if (m.params[p->offset + j] != 0.0f && !bad++) snprintf(why, sizeof(why), "%s not zero", p->name);
            }
        }
    }
    char name[128];
    snprintf(name, sizeof(name), "structured init: std of all %d weight tensors as DESIGN says, zero last cores/routers/biases", checked);
    check_true(bad == 0 && checked >= 20, name, why);
    // lr multipliers: BTT W0 base_width/(2 alpha), W1 base_width/(2 rank gamma); router base_width/d_in
    const LinearDesc *k = gpt2_linear(g, 0, SR_K), *v = gpt2_linear(g, 0, SR_V), *fc = gpt2_linear(g, 0, SR_FC);
    int a, gm;
    default_factors(192, &a, &gm);
    int ok = fabsf(g->params.t[k->w[0]].lr_mult - 768.0f / (2 * a)) < 1e-5f &&
             fabsf(g->params.t[k->w[1]].lr_mult - 768.0f / (2 * 2 * gm)) < 1e-5f &&
             fabsf(g->params.t[v->w[1]].lr_mult - 768.0f / (2 * gm)) < 1e-5f &&
             fabsf(g->params.t[v->w[2]].lr_mult - 768.0f / 192) < 1e-5f &&
             fabsf(g->params.t[fc->w[0]].lr_mult - 768.0f / (2 * 48)) < 1e-5f &&
             fabsf(g->params.t[fc->w[1]].lr_mult - 768.0f / (2 * 48)) < 1e-5f &&
             g->params.t[gpt2_linear(g, 0, SR_Q)->w[0]].lr_mult == 1.0f;
    check_true(ok, "structure-aware lr multipliers (btt, btt_moe cores and router, monarch, dense)", "a multiplier differs");
    gpt2_free(&m);
}

// Every config shipped in scripts/configs parses and builds its layout.
static void test_shipped_configs(void) {
    glob_t gl;
    int n = 0, ok = 1;
    char why[4700] = "";
    if (glob("scripts/configs/*.conf", 0, NULL, &gl) == 0) {
        for (size_t i = 0; i < gl.gl_pathc; i++) {
            char err[4096];
            int rc = run_child(build_layout_from, gl.gl_pathv[i], 2, err, sizeof(err));
            n++;
            if (rc != 0 && ok) { ok = 0; snprintf(why, sizeof(why), "%s: %s", gl.gl_pathv[i], err); }
        }
        globfree(&gl);
    }
    check_true(ok && n >= 8, "every config in scripts/configs builds (8 or more)", why[0] ? why : "fewer than 8 configs found");
}

// attention_forward / attention_backward (GEMMs on blocks of 64 query rows) against a plain
// float64 evaluation of the same formulas, at T = 150 (three blocks, the last partial), B = 2, NH = 3.
static void test_attention_blocks(void) {
    const int B = 2, T = 150, NH = 3, hs = 16, C = NH * hs, C3 = 3 * C;
    mt19937_state rng;
    mt_seed(&rng, 7);
    float *qkv = (float *)mallocCheck(sizeof(float) * B * T * C3), *dout = (float *)mallocCheck(sizeof(float) * B * T * C);
    mt_normal_(qkv, (size_t)B * T * C3, 0.0f, 1.0f, &rng);
    mt_normal_(dout, (size_t)B * T * C, 0.0f, 1.0f, &rng);
    float *out = (float *)mallocCheck(sizeof(float) * B * T * C), *att = (float *)mallocCheck(sizeof(float) * B * NH * T * T);
    float *dqkv = (float *)mallocCheck(sizeof(float) * B * T * C3);
    attention_forward(out, att, qkv, B, T, C, NH);
    attention_backward(dqkv, dout, qkv, att, B, T, C, NH);
    float *rout = (float *)mallocCheck(sizeof(float) * B * T * C), *ratt = (float *)callocCheck((size_t)B * NH * T * T, sizeof(float));
    float *rd = (float *)callocCheck((size_t)B * T * C3, sizeof(float));
    double *p = (double *)mallocCheck(sizeof(double) * T), *dp = (double *)mallocCheck(sizeof(double) * T);
    double *acc = (double *)callocCheck((size_t)B * T * C3, sizeof(double));
    const double scale = 1.0 / sqrt((double)hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                double mx = -1e300, sum = 0.0;
                for (int u = 0; u <= t; u++) {
                    const float *k = qkv + ((size_t)b * T + u) * C3 + C + h * hs;
                    double s = 0.0;
                    for (int i = 0; i < hs; i++) s += (double)q[i] * k[i];
                    p[u] = s * scale;
                    mx = p[u] > mx ? p[u] : mx;
                }
                for (int u = 0; u <= t; u++) { p[u] = exp(p[u] - mx); sum += p[u]; }
                for (int u = 0; u <= t; u++) { p[u] /= sum; ratt[(((size_t)b * NH + h) * T + t) * T + u] = (float)p[u]; }
                const float *d = dout + ((size_t)b * T + t) * C + h * hs;
                double dot = 0.0;
                for (int u = 0; u <= t; u++) {
                    const float *v = qkv + ((size_t)b * T + u) * C3 + 2 * C + h * hs;
                    double s = 0.0;
                    for (int i = 0; i < hs; i++) s += (double)d[i] * v[i];
                    dp[u] = s;
                    dot += s * p[u];
                }
                for (int i = 0; i < hs; i++) {
                    double o = 0.0;
                    for (int u = 0; u <= t; u++) o += p[u] * qkv[((size_t)b * T + u) * C3 + 2 * C + h * hs + i];
                    rout[((size_t)b * T + t) * C + h * hs + i] = (float)o;
                }
                for (int u = 0; u <= t; u++) {
                    const double g = p[u] * (dp[u] - dot) * scale;
                    double *aq = acc + ((size_t)b * T + t) * C3 + h * hs, *ak = acc + ((size_t)b * T + u) * C3 + C + h * hs;
                    double *av = acc + ((size_t)b * T + u) * C3 + 2 * C + h * hs;
                    const float *k = qkv + ((size_t)b * T + u) * C3 + C + h * hs;
                    for (int i = 0; i < hs; i++) { aq[i] += g * k[i]; ak[i] += g * q[i]; av[i] += p[u] * d[i]; }
                }
            }
    for (size_t i = 0; i < (size_t)B * T * C3; i++) rd[i] = (float)acc[i];
    check_close(att, ratt, (size_t)B * NH * T * T, 1e-6f, 1e-4f, "attention T=150 in blocks of 64 rows: probabilities (zero above the diagonal) = float64");
    check_close(out, rout, (size_t)B * T * C, 1e-5f, 1e-4f, "attention T=150 in blocks of 64 rows: output = float64");
    check_close(dqkv, rd, (size_t)B * T * C3, 1e-5f, 1e-4f, "attention T=150 in blocks of 64 rows: dq, dk, dv = float64");
    free(qkv); free(dout); free(out); free(att); free(dqkv); free(rout); free(ratt); free(rd); free(p); free(dp); free(acc);
}

// Small BTT layers through their dense matrix (train_gpt2.c, btt_via_dense): the same outputs and
// gradients as the BTT path, and the cost rule's choices at the widths measured in RESULTS.md.
static void test_btt_via_dense(void) {
    const int shapes[][6] = {{4, 8, 8, 6, 4, 97}, {16, 16, 16, 16, 4, 300}, {8, 8, 8, 8, 1, 64}, {16, 48, 32, 96, 2, 130}};
    mt19937_state rng;
    mt_seed(&rng, 11);
    for (int c = 0; c < 4; c++) {
        const int *sh = shapes[c], N = sh[5];
        LinearSpec spec;
        memset(&spec, 0, sizeof(spec));
        spec.kind = STRUCT_BTT; spec.alpha = sh[0]; spec.gamma = sh[1]; spec.phi = sh[2]; spec.eps = sh[3]; spec.rank = sh[4];
        spec.d_in = sh[0] * sh[1]; spec.d_out = sh[2] * sh[3]; spec.bias = 1; spec.lr_mult_on = 1;
        GPT2 m;
        LinearDesc ld;
        single_linear_model(&m, &ld, &spec);
        const LinearSpec *sp = &ld.spec;
        mt_normal_(m.params, m.num_params, 0.0f, 0.2f, &rng);
        const int din = sp->d_in, dout = sp->d_out;
        float *x = (float *)mallocCheck(sizeof(float) * N * din), *dy = (float *)mallocCheck(sizeof(float) * N * dout);
        mt_normal_(x, (size_t)N * din, 0.0f, 1.0f, &rng);
        mt_normal_(dy, (size_t)N * dout, 0.0f, 1.0f, &rng);
        float *y[2], *dx[2], *g[2];
        for (int mode = 0; mode < 2; mode++) {
            g_btt_dense = mode;
            LinearActs la;
            size_t scratch = 0;
            linear_acts_alloc(&la, &ld, N, &scratch);
            m.lin_scratch = (float *)callocCheck(scratch + 1, sizeof(float));
            m.grads = (float *)callocCheck(m.num_params, sizeof(float));
            y[mode] = (float *)mallocCheck(sizeof(float) * N * dout);
            dx[mode] = (float *)mallocCheck(sizeof(float) * N * din);
            linear_forward(&m, &ld, &la, y[mode], x, N);
            linear_backward(&m, &ld, &la, dx[mode], dy, x, N, 0.0f);
            g[mode] = m.grads;
            free(m.lin_scratch);
            linear_acts_free(&la);
        }
        g_btt_dense = -1;
        char name[160];
        snprintf(name, sizeof(name), "BTT %dx%d>%dx%d rank %d, %d rows, through its dense matrix: y as the BTT path", sh[0], sh[1], sh[2], sh[3], sh[4], N);
        check_close(y[1], y[0], (size_t)N * dout, 1e-5f, 1e-4f, name);
        snprintf(name, sizeof(name), "BTT %dx%d>%dx%d rank %d, %d rows, through its dense matrix: dx, and the cores' and bias gradients", sh[0], sh[1], sh[2], sh[3], sh[4], N);
        check_close(dx[1], dx[0], (size_t)N * din, 1e-5f, 1e-4f, name);
        check_close(g[1], g[0], m.num_params, 1e-4f, 1e-4f, name);
        for (int mode = 0; mode < 2; mode++) { free(y[mode]); free(dx[mode]); free(g[mode]); }
        free(x); free(dy); free(m.params);
        params_free(&m.layout.params);
    }
    // the rule, 4096 rows (RESULTS.md: at width 256 rank 4 ran at 0.72x dense, rank 1 at 2.68x; at 768
    // rank 4 at 1.76x; at 128 rank 2 at 1.17x); a few rows (sampling) stay BTT
    BTTShape b;
    btt_shape(&b, 16, 16, 16, 16, 4);
    const int r4_256 = btt_via_dense(&b, 4096), r4_256_few = btt_via_dense(&b, 64);
    btt_shape(&b, 16, 16, 16, 16, 1);
    const int r1_256 = btt_via_dense(&b, 4096);
    btt_shape(&b, 16, 48, 16, 48, 4);
    const int r4_768 = btt_via_dense(&b, 4096);
    btt_shape(&b, 8, 16, 8, 16, 2);
    const int r2_128 = btt_via_dense(&b, 4096);
    check_true(r4_256 && !r4_256_few && !r1_256 && !r4_768 && !r2_128,
               "BTT through its dense matrix where the BTT path is slower: rank 4 at width 256 (4096 rows), not with 64 rows, not rank 1, not at 768, not rank 2 at 128",
               "the rule chose otherwise");
}

// -pt 1's accounting (common/step_profile.h) on a scripted clock: a part gets the time from each
// of its marks to the next mark, marks outside a step count nothing, FLOPs and calls add up, the
// table is sorted and its figures are per step, and parts past the table's size share one entry.
static double g_fake_script[8192], g_fake_reading[8192];
static int g_fake_next;
static void fake_record(int i) { g_fake_reading[i] = g_fake_script[g_fake_next++]; }
static double fake_elapsed(int i, int j) { return g_fake_reading[j] - g_fake_reading[i]; }
static int g_capture_log[16], g_capture_n;
static void fake_capture(int on) { g_capture_log[g_capture_n++] = on; }
static const ProfPart *prof_find(const char *name) {
    for (int p = 0; p < PROF_MAX_PARTS; p++)
        if (strcmp(g_prof.part[p].name, name) == 0) return &g_prof.part[p];
    return NULL;
}
static void test_step_profile(void) {
    const double script[] = {0, 1, 3, 6, 10, 15};
    memcpy(g_fake_script, script, sizeof(script));
    g_fake_next = 0;
    prof_enable(fake_record, fake_elapsed, NULL, NULL);
    prof_mark("ignored", 0.0);  // before any step: no part, no reading
    prof_step_begin(0);
    prof_mark("a", 3e9);
    prof_mark("b", 0.0);
    prof_mark("a", 5e9);
    prof_step_end();
    prof_mark("ignored", 0.0);  // between steps (validation, sampling)
    prof_step_begin(0);
    prof_mark("b", 0.0);
    prof_step_end();
    const ProfPart *a = prof_find("a"), *b = prof_find("b");
    char why[200];
    snprintf(why, sizeof(why), "parts %d, steps %ld, a %g ms %ld calls %g FLOPs, b %g ms %ld calls, readings %d", g_prof.n_parts, g_prof.steps,
             a ? a->ms : -1, a ? a->calls : -1, a ? a->flops : -1, b ? b->ms : -1, b ? b->calls : -1, g_fake_next);
    check_true(g_prof.n_parts == 2 && g_prof.steps == 2 && a && b && a->ms == 4.0 && a->calls == 2 && a->flops == 8e9 && b->ms == 7.0 &&
                   b->calls == 2 && g_fake_next == 6 && !prof_find("ignored"),
               "step profile: each mark's part gets the time to the next mark; marks outside steps are ignored", why);

    FILE *f = tmpfile();
    prof_print(f, 4e9, 5.6);
    rewind(f);
    char text[4096];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    text[n] = 0;
    fclose(f);
    const char *lb = strstr(text, "\nb "), *la = strstr(text, "\na ");
    int ok = lb && la && lb < la && strstr(lb, "3.500   63.6%        1.0") && strstr(la, "2.000   36.4%        1.0     2.000") &&
             strstr(text, "all parts") && strstr(text, "5.500  100.0%") && strstr(text, "5.500 ms against 5.600 ms measured") &&
             strstr(text, "FLOPs in the parts 100.0% of the model's");
    check_true(ok, "step profile: the table is per step, longest part first, with shares, TFLOP/s and the FLOPs' coverage", text);
    prof_free();

    // the last step, and only it, inside an external profiler's range
    g_fake_next = 0;
    prof_enable(fake_record, fake_elapsed, NULL, fake_capture);
    for (int step = 0; step < 3; step++) {
        prof_step_begin(step == 2);
        prof_mark("a", 0.0);
        g_capture_log[g_capture_n++] = 10 + step;  // between begin and end
        prof_step_end();
    }
    int want[] = {10, 11, 1, 12, 0};
    int same = g_capture_n == 5;
    for (int i = 0; same && i < 5; i++) same = g_capture_log[i] == want[i];
    check_true(same, "step profile: the profiler's range opens at the last step's start and closes at its end", "wrong calls");
    prof_free();

    // more distinct parts than the table holds, and more marks than the first allocation
    g_fake_next = 0;
    for (int i = 0; i < 8192; i++) g_fake_script[i] = i;
    prof_enable(fake_record, fake_elapsed, NULL, NULL);
    prof_step_begin(0);
    char name[16];
    const int np = PROF_MAX_PARTS + 6;
    for (int i = 0; i < np; i++) {
        snprintf(name, sizeof(name), "p%d", i);
        prof_mark(name, 0.0);
    }
    for (int i = 0; i < 3000; i++) prof_mark("many", 0.0);
    prof_step_end();
    const ProfPart *other = prof_find("(the other parts)"), *many = prof_find("many");
    snprintf(why, sizeof(why), "parts %d, other %g ms %ld calls, many %p", g_prof.n_parts, other ? other->ms : -1, other ? other->calls : -1,
             (const void *)many);
    check_true(g_prof.n_parts == PROF_MAX_PARTS - 1 && other && other->calls == np - (PROF_MAX_PARTS - 1) + 3000 &&
                   other->ms == (double)(np - (PROF_MAX_PARTS - 1) + 3000) && !many,
               "step profile: parts past the table's size share its last entry; 3000 more marks in one step", why);
    prof_free();

    // -pt 2: steps inside a layer are parts of their own; the layer keeps its whole time
    const double script2[] = {0, 1, 3, 6, 7, 10, 12};
    memcpy(g_fake_script, script2, sizeof(script2));
    g_fake_next = 0;
    prof_enable(fake_record, fake_elapsed, NULL, NULL);
    g_prof.steps_on = 1;
    prof_step_begin(0);
    prof_mark_layer("L", 2e9);
    prof_mark_step("s1");
    prof_mark_step("s2");
    prof_mark_layer("L2", 0.0);
    prof_mark_step("s3");
    prof_mark("other", 0.0);
    prof_mark_step("no layer");  // after a mark that is not a layer's: not counted
    prof_step_end();
    const ProfPart *L = prof_find("L"), *L2 = prof_find("L2"), *s1 = prof_find("s1"), *s2 = prof_find("s2"), *s3 = prof_find("s3"),
                   *ot = prof_find("other");
    snprintf(why, sizeof(why), "L %g, s1 %g, s2 %g, L2 %g, s3 %g, other %g ms; readings %d, parts %d", L ? L->ms : -1, s1 ? s1->ms : -1,
             s2 ? s2->ms : -1, L2 ? L2->ms : -1, s3 ? s3->ms : -1, ot ? ot->ms : -1, g_fake_next, g_prof.n_parts);
    check_true(L && L2 && s1 && s2 && s3 && ot && L->ms == 6.0 && s1->ms == 2.0 && s2->ms == 3.0 && L2->ms == 4.0 && s3->ms == 3.0 &&
                   ot->ms == 2.0 && s1->parent == (int)(L - g_prof.part) && s3->parent == (int)(L2 - g_prof.part) && ot->parent == -1 &&
                   g_fake_next == 7 && g_prof.n_parts == 6 && !prof_find("no layer"),
               "step profile -pt 2: a step lasts to the next mark of either kind, a layer to the next layer-level mark", why);
    f = tmpfile();
    prof_print(f, 2e9, 12.0);
    rewind(f);
    n = fread(text, 1, sizeof(text) - 1, f);
    text[n] = 0;
    fclose(f);
    const char *t2 = strstr(text, "steps inside the layers (-pt 2)");
    const char *l1 = t2 ? strstr(t2, "\nL ") : NULL, *l2 = t2 ? strstr(t2, "\nL2 ") : NULL;
    ok = strstr(text, "12.000 ms against 12.000 ms measured") && t2 && l1 && l2 && l1 < l2 &&
         strstr(l1, "  s2") && strstr(l1, "  s2") < strstr(l1, "  s1") && strstr(l1, "  s1") < l2 &&
         strstr(l1, "3.000   50.0%") && strstr(l1, "2.000   33.3%") && strstr(l1, "1.000   16.7%") &&
         strstr(l2, "3.000   75.0%") && strstr(l2, "1.000   25.0%") && !strstr(t2, "other");
    check_true(ok, "step profile -pt 2: the first table holds the layers whole; the second breaks each down, with its rest", text);
    prof_free();

    // without -pt 2, a step mark takes no reading and makes no part
    g_fake_next = 0;
    prof_enable(fake_record, fake_elapsed, NULL, NULL);
    prof_step_begin(0);
    prof_mark_layer("L", 0.0);
    prof_mark_step("s1");
    prof_step_end();
    check_true(g_fake_next == 2 && g_prof.n_parts == 1 && !prof_find("s1"), "step profile -pt 1: step marks cost nothing", "a step was counted");
    prof_free();
}

int main(void) {
    test_rng_matches_torch();
    test_init_matches_llmc();
    test_checkpoint_round_trip();
    test_outlier_window();
    test_config_errors();
    test_adamw_by_hand();
    test_grad_accumulation();
    test_param_table();
    test_block_tensors();
    test_structured_init();
    test_shipped_configs();
    test_attention_blocks();
    test_btt_via_dense();
    test_step_profile();
    return test_summary();
}
