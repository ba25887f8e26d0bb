// step_profile.h: -pt 1, where a training step's time goes, for both trainers: the parts of a step
// (each kind of layer's forward and backward, linear layers by role and structure, the gradients'
// averaging, norm and update, the host's data loading), summed over the timed steps and printed
// as a table at the end of the run.
//
// A trainer marks where each part begins (prof_mark); the time from one mark to the next goes to
// the earlier mark's part, so the parts tile the step and add up to its time. The clock is the
// trainer's: wall time by default (the CPU trainer, whose work is synchronous); the GPU trainer
// records an event on its stream at each mark, so that a part is the GPU's time from the part's
// first kernel to the next part's, the GPU's waits for the host included. Marks outside
// prof_step_begin/prof_step_end (validation, sampling, the untimed first step) cost nothing.
//
// -pt 2 also times the steps inside a linear layer (prof_mark_step, through structured/step_hook.h:
// the structured layers mark their packed weights, plan ops, BTT-MoE's routing and gathers...). A step lasts from its mark to the next mark
// of either kind and is a part of its own, named after its layer's part; the layer's part keeps
// its whole time (from its mark to the next layer-level mark), so the first table is the same
// either way, and a second one breaks each layer down.
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gpt2.h"
#include "utils.h"

#define PROF_MAX_PARTS 512  // -pt 2, every linear layer BTT-MoE: about 190 parts (-at 1 mixing kernels: up to twice)
#define PROF_NAME_LEN 112

typedef struct {
    char name[PROF_NAME_LEN];
    double ms, flops;  // summed over the profiled steps
    long calls;
    int parent;        // -1: a part of the step; else a step inside the layer part `parent` (-pt 2)
} ProfPart;

typedef struct {
    int on, in_step;
    int steps_on;     // -pt 2: prof_mark_step's marks count
    int layer_part;   // the part of the last linear layer's mark, -1 after any other mark
    long steps_dropped;  // step marks left out because the parts table was full
    int n_parts, overflowed;  // overflowed: the parts past PROF_MAX_PARTS - 1 share the last entry
    ProfPart part[PROF_MAX_PARTS];
    int *mark_part;          // this step's marks: the part each begins
    double *wall;            // the default clock's readings, one per mark
    int n_marks, cap;
    long steps;
    // the clock: reading i taken at mark i (and one at the step's end); the ms from reading i to
    // reading j, waiting for the work between them where the clock needs that
    void (*record)(int i);
    double (*elapsed_ms)(int i, int j);
    void (*release)(void);  // what the clock holds (may be NULL)
    // an external profiler's range (the GPU trainer: cudaProfilerStart/Stop, so that
    // `ncu --profile-from-start off` records the run's last step only); may be NULL
    void (*capture)(int on);
    int capturing;
} StepProfile;

static StepProfile g_prof;

static inline void prof_wall_record(int i) { g_prof.wall[i] = now_seconds(); }
static inline double prof_wall_elapsed(int i, int j) { return (g_prof.wall[j] - g_prof.wall[i]) * 1e3; }

// Turns profiling on with a clock (record NULL: wall time, kept here). Another clock keeps its own
// readings, growing their storage as record sees new indices.
static inline void prof_enable(void (*record)(int), double (*elapsed_ms)(int, int), void (*release)(void), void (*capture)(int)) {
    memset(&g_prof, 0, sizeof(g_prof));
    g_prof.on = 1;
    g_prof.record = record ? record : prof_wall_record;
    g_prof.elapsed_ms = record ? elapsed_ms : prof_wall_elapsed;
    g_prof.release = record ? release : NULL;
    g_prof.capture = capture;
    g_prof.layer_part = -1;
}

static inline void prof_free(void) {
    if (g_prof.release) g_prof.release();
    g_prof.release = NULL;
    free(g_prof.mark_part);
    free(g_prof.wall);
    g_prof.mark_part = NULL;
    g_prof.wall = NULL;
    g_prof.on = g_prof.in_step = 0;
}

// The part named `name` (parent: as ProfPart's), added if new. A step that does not fit returns
// -1; a part of the step that does not fit gets the last entry, which gathers them all.
static inline int prof_part_index(const char *name, int parent) {
    for (int p = 0; p < g_prof.n_parts; p++)
        if (g_prof.part[p].parent == parent && strcmp(g_prof.part[p].name, name) == 0) return p;
    if (g_prof.n_parts == PROF_MAX_PARTS - 1) {
        if (parent >= 0) return -1;
        g_prof.overflowed = 1;
        snprintf(g_prof.part[PROF_MAX_PARTS - 1].name, PROF_NAME_LEN, "(the other parts)");
        g_prof.part[PROF_MAX_PARTS - 1].parent = -1;
        return PROF_MAX_PARTS - 1;
    }
    snprintf(g_prof.part[g_prof.n_parts].name, PROF_NAME_LEN, "%s", name);
    g_prof.part[g_prof.n_parts].parent = parent;
    return g_prof.n_parts++;
}

// Reads the clock for the next mark, growing the marks' arrays first.
static inline void prof_record_next(void) {
    if (g_prof.n_marks + 1 >= g_prof.cap) {
        g_prof.cap = g_prof.cap ? 2 * g_prof.cap : 1024;
        g_prof.mark_part = (int *)reallocCheck(g_prof.mark_part, (size_t)g_prof.cap * sizeof(int));
        g_prof.wall = (double *)reallocCheck(g_prof.wall, (size_t)g_prof.cap * sizeof(double));
    }
    g_prof.record(g_prof.n_marks);
}

// The step's part `name` begins here; flops: the work it does from here to the next mark (0 for
// parts whose FLOPs the table does not count: elementwise kernels, the optimizer).
static inline void prof_mark(const char *name, double flops) {
    if (!g_prof.in_step) return;
    int p = prof_part_index(name, -1);
    prof_record_next();
    g_prof.mark_part[g_prof.n_marks++] = p;
    g_prof.part[p].calls++;
    g_prof.part[p].flops += flops;
    g_prof.layer_part = -1;
}

// A linear layer's part begins (prof_mark), and -pt 2's steps that follow belong to it.
static inline void prof_mark_layer(const char *name, double flops) {
    prof_mark(name, flops);
    if (g_prof.in_step) g_prof.layer_part = g_prof.mark_part[g_prof.n_marks - 1];
}

// -pt 2: a step inside the linear layer marked last begins here (its name: what the step does).
// Nothing outside a layer, or without -pt 2.
static inline void prof_mark_step(const char *step) {
    if (!g_prof.in_step || !g_prof.steps_on || g_prof.layer_part < 0) return;
    int p = prof_part_index(step, g_prof.layer_part);
    if (p < 0) { g_prof.steps_dropped++; return; }
    prof_record_next();
    g_prof.mark_part[g_prof.n_marks++] = p;
    g_prof.part[p].calls++;
}

// A linear layer's forward or backward over N rows: a part per role, direction and structure,
// with the FLOPs the MFU counts (2 per weight multiply-add forward, 4 backward). as_dense: a BTT
// or Monarch layer run as dense GEMMs on its materialized weight (the GPU trainer's -sm).
static inline void prof_mark_linear(const LinearDesc *ld, int backward, int N, int as_dense) {
    if (!g_prof.in_step) return;
    char desc[48], name[PROF_NAME_LEN];
    spec_describe(&ld->spec, desc, sizeof(desc));
    const char *role = ld->layer < 0 ? "lm_head" : ld->fused_qkv ? "qkv" : struct_role_names[ld->role];
    snprintf(name, sizeof(name), "%s %s: %s%s", role, backward ? "bwd" : "fwd", desc, as_dense ? " (as dense)" : "");
    prof_mark_layer(name, (backward ? 4.0 : 2.0) * N * spec_forward_macs(&ld->spec));
}

// q, k and v of layer l run as one dense GEMM on their materialized weights (the GPU trainer's
// -sm 1): one part, named after their structure ("mixed" when they differ), with their FLOPs.
static inline void prof_mark_qkv_group(const GPT2Layout *g, int l, int backward, int N) {
    if (!g_prof.in_step) return;
    char desc[48], other[48], name[PROF_NAME_LEN];
    double macs = 0;
    spec_describe(&gpt2_linear(g, l, SR_Q)->spec, desc, sizeof(desc));
    for (int r = SR_Q; r <= SR_V; r++) {
        macs += spec_forward_macs(&gpt2_linear(g, l, r)->spec);
        spec_describe(&gpt2_linear(g, l, r)->spec, other, sizeof(other));
        if (strcmp(desc, other) != 0) snprintf(desc, sizeof(desc), "mixed structures");
    }
    snprintf(name, sizeof(name), "qkv %s: %s (q, k, v as one dense)", backward ? "bwd" : "fwd", desc);
    prof_mark_layer(name, (backward ? 4.0 : 2.0) * N * macs);
}

// The head tied to wte (a plain matmul with the embedding), as prof_mark_linear.
static inline void prof_mark_tied_head(const GPT2Config *c, int backward, int N) {
    prof_mark(backward ? "lm_head bwd: dense (tied to wte)" : "lm_head fwd: dense (tied to wte)",
              (backward ? 4.0 : 2.0) * N * (double)c->vocab_size * c->channels);
}

// Attention's QK^T and AV (both directions, as the MFU counts them: without the causal discount).
static inline void prof_mark_attention(const GPT2Config *c, int backward, int B, int T) {
    prof_mark(backward ? "attention bwd" : "attention fwd", (backward ? 8.0 : 4.0) * B * (double)T * T * c->channels);
}

// A profiled step begins; last: the run's last step, which an external profiler records.
static inline void prof_step_begin(int last) {
    if (!g_prof.on) return;
    g_prof.in_step = 1;
    g_prof.n_marks = 0;
    g_prof.capturing = last && g_prof.capture;
    if (g_prof.capturing) g_prof.capture(1);
}

// The step's end: the last part ends here, and every part's time is added up.
static inline void prof_step_end(void) {
    if (!g_prof.in_step) return;
    prof_record_next();
    if (g_prof.capturing) g_prof.capture(0);
    g_prof.capturing = 0;
    for (int i = 0, next = 0; i < g_prof.n_marks; i++) {  // next: the first part-of-the-step mark after i (or the end)
        ProfPart *p = &g_prof.part[g_prof.mark_part[i]];
        if (p->parent >= 0) { p->ms += g_prof.elapsed_ms(i, i + 1); continue; }
        if (next <= i)
            for (next = i + 1; next < g_prof.n_marks && g_prof.part[g_prof.mark_part[next]].parent >= 0; next++) {}
        p->ms += g_prof.elapsed_ms(i, next);
    }
    g_prof.steps++;
    g_prof.in_step = 0;
}

static inline int prof_cmp_ms(const void *a, const void *b) {
    const ProfPart *x = *(const ProfPart *const *)a, *y = *(const ProfPart *const *)b;
    return x->ms < y->ms ? 1 : x->ms > y->ms ? -1 : strcmp(x->name, y->name);
}

// -pt 2's second table: each layer part that marked steps (in the first table's order, `order`),
// then its steps, longest first, with their share of the layer's time; "(rest)" is the time
// between the layer's mark and its first step's (host work, a kernel before the first step).
static inline void prof_print_steps(FILE *out, const ProfPart *const *order, int n, int n_steps) {
    const double s = (double)g_prof.steps;
    if (n_steps == 0) {
        fprintf(out, "steps inside the layers (-pt 2): none marked (only the structured layers mark steps)\n");
        return;
    }
    fprintf(out, "steps inside the layers (-pt 2): a step lasts from its mark to the next mark\n");
    fprintf(out, "%-72s %10s %7s %10s\n", "layer / step", "ms/step", "of layer", "calls/step");
    const ProfPart *kids[PROF_MAX_PARTS];
    for (int i = 0; i < n; i++) {
        const int layer = (int)(order[i] - g_prof.part);
        int nk = 0;
        double sum = 0.0;
        for (int p = 0; p < g_prof.n_parts; p++)
            if (g_prof.part[p].parent == layer) { kids[nk++] = &g_prof.part[p]; sum += g_prof.part[p].ms; }
        if (nk == 0) continue;
        qsort(kids, (size_t)nk, sizeof(kids[0]), prof_cmp_ms);
        const double lm = order[i]->ms;
        fprintf(out, "%-72s %10.3f %7s %10.1f\n", order[i]->name, lm / s, "", order[i]->calls / s);
        for (int k = 0; k < nk; k++)
            fprintf(out, "  %-70s %10.3f %6.1f%% %10.1f\n", kids[k]->name, kids[k]->ms / s, lm > 0 ? 100.0 * kids[k]->ms / lm : 0.0,
                    kids[k]->calls / s);
        fprintf(out, "  %-70s %10.3f %6.1f%%\n", "(rest)", (lm - sum) / s, lm > 0 ? 100.0 * (lm - sum) / lm : 0.0);
    }
    if (g_prof.steps_dropped) fprintf(out, "(%ld step marks left out: more than %d parts)\n", g_prof.steps_dropped, PROF_MAX_PARTS);
}

// The table, longest part first: ms per step, share of the step, calls per step and, where the
// part's FLOPs are counted, TFLOP/s. model_flops: the model's FLOPs per step (MFU's count), which
// the counted parts must add up to; measured_ms: the driver's mean step time, for comparison.
static inline void prof_print(FILE *out, double model_flops, double measured_ms) {
    if (!g_prof.on) return;
    if (g_prof.steps == 0) {
        fprintf(out, "step profile (-pt 1): no step was profiled (the first step of a run is not: it warms up); give -x 2 or more\n");
        return;
    }
    const ProfPart *order[PROF_MAX_PARTS];
    int n = 0, n_steps = 0;
    double total_ms = 0.0, total_flops = 0.0;
    for (int p = 0; p < g_prof.n_parts + g_prof.overflowed; p++) {
        const ProfPart *pp = &g_prof.part[p < g_prof.n_parts ? p : PROF_MAX_PARTS - 1];
        if (pp->parent >= 0) { n_steps++; continue; }
        order[n++] = pp;
        total_ms += pp->ms;
        total_flops += pp->flops;
    }
    qsort(order, (size_t)n, sizeof(order[0]), prof_cmp_ms);
    const double s = (double)g_prof.steps;
    fprintf(out, "step profile (-pt 1): the mean of %ld steps; a part lasts from its mark to the next one's\n", g_prof.steps);
    fprintf(out, "%-52s %10s %7s %10s %9s\n", "part", "ms/step", "share", "calls/step", "TFLOP/s");
    for (int i = 0; i < n; i++) {
        const ProfPart *p = order[i];
        char tf[24] = "";
        if (p->flops > 0 && p->ms > 0) snprintf(tf, sizeof(tf), "%.3f", p->flops / (p->ms * 1e-3) / 1e12);
        fprintf(out, "%-52s %10.3f %6.1f%% %10.1f %9s\n", p->name, p->ms / s, total_ms > 0 ? 100.0 * p->ms / total_ms : 0.0, p->calls / s, tf);
    }
    fprintf(out, "%-52s %10.3f %6.1f%% %10s %9.3f\n", "all parts", total_ms / s, 100.0, "",
            total_ms > 0 ? total_flops / (total_ms * 1e-3) / 1e12 : 0.0);
    fprintf(out, "profiled step time %.3f ms against %.3f ms measured; FLOPs in the parts %.1f%% of the model's (6N + attention)\n",
            total_ms / s, measured_ms, model_flops > 0 ? 100.0 * total_flops / s / model_flops : 0.0);
    if (g_prof.steps_on) prof_print_steps(out, order, n, n_steps);
}
