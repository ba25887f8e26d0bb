// layers_cpu.c: one linear layer, forward + backward on the CPU, at widths 768, 1024, 2048 and
// 4096 tokens: each structure's time against dense next to its FLOP ratio (issue 3's benchmark).
//   make bench-layers   (or: build/bench_layers_cpu [tokens] [reps] [--results] [--dims 256,512] [--only btt_moe_8x2,...])
// --results adds a line "RESULT d=... struct=... ms=..." per row, with the structure names of
// dev/bench/structured_torch.py (dense, btt_r1, btt_r2, btt_r4, monarch_4, monarch_sqrt,
// btt_moe_8x2), for dev/bench/torch_cpu.sh to join the two.
#define TESTING
#include "../../train_gpt2.c"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fill(float *x, size_t n, float scale, mt19937_state *rng) { mt_normal_(x, n, 0.0f, scale, rng); }

// Times `reps` forward+backward passes of the layer described by ld over N rows; returns ms.
static double time_layer(GPT2 *m, LinearDesc *ld, int N, int reps, float *x, float *y, float *dy, float *dx) {
    LinearActs la;
    size_t scratch = 0;
    linear_acts_alloc(&la, ld, N, &scratch);
    m->lin_scratch = (float *)callocCheck(scratch + 1, sizeof(float));
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) {  // the first pass warms up (page faults, packing buffers)
        double t0 = now_s();
        linear_forward(m, ld, &la, y, x, N);
        linear_backward(m, ld, &la, dx, dy, x, N, 0.01f);
        double dt = now_s() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    free(m->lin_scratch);
    linear_acts_free(&la);
    return best * 1e3;
}

static const char *const CASE_NAMES[] = {"dense", "btt_r1", "btt_r2", "btt_r4", "monarch_4", "monarch_sqrt", "btt_moe_8x2"};

// whether name is one of the comma-separated names in list
static int name_listed(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (strncmp(p, name, n) == 0 && (p[n] == ',' || p[n] == '\0')) return 1;
    return 0;
}

static int usage(const char *prog) {
    fprintf(stderr, "usage: %s [tokens >= 1] [reps >= 1] [--results] [--dims D,D,...] [--only NAME,...]\n"
                    "  --dims: widths (default 768,1024,2048), each a multiple of 4 (Monarch's 4 blocks), e.g. 128,256,384,512\n"
                    "  --only: these structures (and dense, the baseline): btt_r1 btt_r2 btt_r4 monarch_4 monarch_sqrt btt_moe_8x2\n", prog);
    return 1;
}

int main(int argc, char **argv) {
    int N = 4096, reps = 3, result_lines = 0, npos = 0, widths[16] = {768, 1024, 2048}, nwidths = 3;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--results") == 0) {
            result_lines = 1;
        } else if (strcmp(argv[i], "--dims") == 0 && i + 1 < argc) {
            nwidths = 0;
            for (char *p = argv[++i], *end; *p; p = *end == ',' ? end + 1 : end) {
                long d = strtol(p, &end, 10);
                if (end == p || d < 8 || d > 65536 || d % 4 || nwidths == 16 || (*end && *end != ',')) return usage(argv[0]);
                widths[nwidths++] = (int)d;
            }
        } else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
            only = argv[++i];
        } else if (npos < 2 && argv[i][0] != '-') {
            *(npos++ == 0 ? &N : &reps) = atoi(argv[i]);
        } else {
            return usage(argv[0]);
        }
    }
    if (N < 1 || reps < 1 || nwidths < 1) return usage(argv[0]);
    for (const char *p = only; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {  // every --only name is a structure's
        int known = 0;
        for (size_t i = 0; i < sizeof(CASE_NAMES) / sizeof(CASE_NAMES[0]); i++) {
            size_t n = strlen(CASE_NAMES[i]);
            known |= strncmp(p, CASE_NAMES[i], n) == 0 && (p[n] == ',' || p[n] == '\0');
        }
        if (!known) {
            fprintf(stderr, "--only: unknown structure at '%s'\n", p);
            return usage(argv[0]);
        }
    }
    printf("one linear layer d -> d, forward + backward, %d tokens, best of %d (fp32, %s, %d threads)\n", N, reps,
#ifdef USE_CBLAS
           "dense: OpenBLAS, structured: built-in " CG_ISA " kernel",
#else
           "built-in " CG_ISA " GEMM kernel",
#endif
#ifdef OMP
           omp_get_max_threads()
#else
           1
#endif
    );
    printf("%-6s %-24s %10s %12s %10s %10s %12s\n", "d", "structure", "ms", "GFLOP/s", "time/dense", "FLOP/dense", "speedup");
    mt19937_state rng;
    mt_seed(&rng, 1);
    for (int wi = 0; wi < nwidths; wi++) {
        int d = widths[wi];
        int nb_sqrt = 1;
        while ((nb_sqrt + 1) * (nb_sqrt + 1) <= d) nb_sqrt++;
        while (d % nb_sqrt) nb_sqrt--;  // largest divisor of d not above sqrt(d)
        struct { const char *name; StructKind k; int rank, blocks, experts, topk; } cases[] = {
            {"dense", STRUCT_DENSE, 0, 0, 0, 0}, {"btt_r1", STRUCT_BTT, 1, 0, 0, 0}, {"btt_r2", STRUCT_BTT, 2, 0, 0, 0},
            {"btt_r4", STRUCT_BTT, 4, 0, 0, 0}, {"monarch_4", STRUCT_MONARCH, 0, 4, 0, 0},
            {"monarch_sqrt", STRUCT_MONARCH, 0, nb_sqrt, 0, 0}, {"btt_moe_8x2", STRUCT_BTT_MOE, 0, 0, 8, 2},
        };
        float *x = (float *)mallocCheck((size_t)N * d * sizeof(float)), *y = (float *)mallocCheck((size_t)N * d * sizeof(float));
        float *dy = (float *)mallocCheck((size_t)N * d * sizeof(float)), *dx = (float *)mallocCheck((size_t)N * d * sizeof(float));
        fill(x, (size_t)N * d, 1.0f, &rng);
        fill(dy, (size_t)N * d, 1.0f, &rng);
        double dense_ms = 0, dense_flops = 0;
        for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
            if (ci > 0 && only && !name_listed(only, cases[ci].name)) continue;
            LinearSpec spec;
            memset(&spec, 0, sizeof(spec));
            spec.kind = cases[ci].k; spec.d_in = d; spec.d_out = d; spec.bias = 1; spec.lr_mult_on = 1;
            default_factors(d, &spec.alpha, &spec.gamma);
            default_factors(d, &spec.phi, &spec.eps);
            spec.rank = cases[ci].k == STRUCT_BTT_MOE ? cases[ci].experts : cases[ci].rank;
            spec.blocks = cases[ci].blocks; spec.experts = cases[ci].experts; spec.topk = cases[ci].topk;
            spec.router_init = 0.5f;  // varied routing, so that expert groups differ as in training
            GPT2 m;
            LinearDesc ld;
            single_linear_model(&m, &ld, &spec);
            const LinearSpec *s = &ld.spec;
            m.grads = (float *)callocCheck(m.num_params, sizeof(float));
            fill(m.params, m.num_params, 0.05f, &rng);
            double ms = time_layer(&m, &ld, N, reps, x, y, dy, dx);
            double flops = 6.0 * spec_forward_macs(s) * N;  // forward 2, backward 4 per multiply-add
            if (ci == 0) { dense_ms = ms; dense_flops = flops; }
            char desc[96];
            spec_describe(s, desc, sizeof(desc));
            printf("%-6d %-24s %10.2f %12.1f %10.3f %10.3f %11.2fx\n", d, desc, ms, flops / ms / 1e6, ms / dense_ms,
                   flops / dense_flops, dense_ms / ms);
            if (result_lines) printf("RESULT d=%d din=%d dout=%d struct=%s ms=%.4f\n", d, d, d, cases[ci].name, ms);
            fflush(stdout);
            free(m.params);
            free(m.grads);
            params_free(&m.layout.params);
        }
        free(x); free(y); free(dy); free(dx);
    }
    return 0;
}
