// evalloader.h: multiple-choice evals (HellaSwag) in llm.c's eval file format: the file read and
// checked, batches of one row per completion, and each example's choice (the completion of least
// mean loss per token).
//
// File (llm.c's dev/data write_evalfile; ours: data/hellaswag.py): 256 int32 header (magic
// 20240522, version 1, number of examples, longest example in bytes), then per example a stream of
// uint16: 65535, the example's bytes, its index, the label, the number of completions K, the
// context length and tokens, then K times a completion's length and tokens.
//
// Rows: completion c of an example is the row context + completion, inputs tokens[0 .. L-2] and
// targets tokens[1 .. L-1]; its score is the mean loss over the positions whose target is a
// completion token. A row longer than T + 1 tokens loses its first tokens (the context's start):
// the completion is what is scored, and the nearest context matters most.
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "utils.h"

#define EVAL_MAGIC 20240522
#define EVAL_VERSION 1
#define EVAL_MAX_COMPLETIONS 16

typedef struct {
    int label, n_comp, ctx_len;
    const uint16_t *ctx;
    int comp_len[EVAL_MAX_COMPLETIONS];
    const uint16_t *comp[EVAL_MAX_COMPLETIONS];
} EvalExample;

typedef struct {
    int n;                // examples
    int max_comp;         // the most completions of any example: the rows one example needs
    int B, T, per_batch;  // rows of T tokens (at most the run's -t); examples per batch: B / max_comp
    uint16_t *stream;     // the file's examples (EvalExample points into it)
    EvalExample *ex;
    int *inputs, *targets;     // (B, T) of the current batch
    int *row_start, *row_end;  // per row: scored positions [start, end) (0, 0: a padding row)
    long truncated_rows;       // rows longer than T + 1 tokens, which lose their first context tokens
} EvalLoader;

// Reads and checks `path` (every field, every token < vocab_size) for batches of B rows of at most
// T positions; any fault ends the run naming the file, the example and what is wrong. The rows are
// as long as the longest example needs, rounded up to 64: a forward over B x 1024 for rows of a
// hundred tokens would be mostly padding.
static inline void evalloader_init(EvalLoader *e, const char *path, int B, int T, int vocab_size) {
    memset(e, 0, sizeof(*e));
    FILE *fp = fopen(path, "rb");
    if (!fp)
        fatal("-hf '%s': %s; write it with python data/hellaswag.py (it downloads HellaSwag's validation set), or give -hf <file>",
              path, strerror(errno));
    int32_t header[256];
    freadCheck(header, sizeof(int32_t), 256, fp, path);
    if (header[0] == 20240520) fatal("'%s' is a token shard (magic 20240520), not an eval file; -hf takes data/hellaswag.py's output", path);
    if (header[0] != EVAL_MAGIC) fatal("'%s' is not an eval file (magic %d, expected %d); write it with python data/hellaswag.py", path, header[0], EVAL_MAGIC);
    if (header[1] != EVAL_VERSION) fatal("'%s' has eval file version %d; this build reads version %d", path, header[1], EVAL_VERSION);
    if (header[2] <= 0) fatal("'%s' holds %d examples; re-create it with python data/hellaswag.py", path, header[2]);
    if (fseek(fp, 0, SEEK_END) != 0) fatal("'%s': cannot seek (%s)", path, strerror(errno));
    long bytes = ftell(fp) - 256 * (long)sizeof(int32_t);
    if (bytes <= 0 || bytes % 2) fatal("'%s' is truncated or corrupt: %ld bytes after the header", path, bytes);
    fseek(fp, 256 * (long)sizeof(int32_t), SEEK_SET);
    size_t words = (size_t)bytes / 2;
    e->stream = (uint16_t *)mallocCheck(words * sizeof(uint16_t));
    freadCheck(e->stream, sizeof(uint16_t), words, fp, path);
    fclose(fp);

    e->n = header[2];
    e->ex = (EvalExample *)mallocCheck((size_t)e->n * sizeof(EvalExample));
    size_t at = 0;
    int longest = 0;  // the longest row, in tokens
    for (int i = 0; i < e->n; i++) {
        const size_t start = at;
        // every read below stays inside the example's own stated size, itself inside the file
        if (at + 2 > words || e->stream[at] != 65535)
            fatal("'%s': example %d (at byte %zu) does not start with the delimiter 65535: the file is truncated or corrupt", path, i,
                  1024 + 2 * at);
        size_t len = e->stream[at + 1] / 2, end = start + len;
        if (e->stream[at + 1] % 2 || len < 6 || end > words)
            fatal("'%s': example %d states %d bytes, which do not fit the file: truncated or corrupt", path, i, e->stream[at + 1]);
        EvalExample *x = &e->ex[i];
        if (e->stream[at + 2] != (uint16_t)i) fatal("'%s': example %d carries index %d: examples out of order", path, i, e->stream[at + 2]);
        x->label = e->stream[at + 3];
        x->n_comp = e->stream[at + 4];
        if (x->n_comp < 2 || x->n_comp > EVAL_MAX_COMPLETIONS)
            fatal("'%s': example %d has %d completions; this build takes 2 to %d", path, i, x->n_comp, EVAL_MAX_COMPLETIONS);
        if (x->label >= x->n_comp) fatal("'%s': example %d has label %d of %d completions", path, i, x->label, x->n_comp);
        at += 5;
        const uint16_t **seg[EVAL_MAX_COMPLETIONS + 1];
        int *seg_len[EVAL_MAX_COMPLETIONS + 1];
        seg[0] = &x->ctx;
        seg_len[0] = &x->ctx_len;
        for (int c = 0; c < x->n_comp; c++) {
            seg[c + 1] = &x->comp[c];
            seg_len[c + 1] = &x->comp_len[c];
        }
        for (int s = 0; s <= x->n_comp; s++) {
            if (at >= end) fatal("'%s': example %d ends inside its %s: truncated or corrupt", path, i, s ? "completions" : "context");
            int n = e->stream[at++];
            if (n < 1 || at + (size_t)n > end)
                fatal("'%s': example %d: %s %d has %d tokens, %s", path, i, s ? "completion" : "context", s ? s - 1 : 0, n,
                      n < 1 ? "but needs at least one" : "past the example's end");
            for (int t = 0; t < n; t++)
                if (e->stream[at + t] >= vocab_size)
                    fatal("'%s': example %d holds token %d, outside the model's vocabulary of %d", path, i, e->stream[at + t], vocab_size);
            *seg[s] = e->stream + at;
            *seg_len[s] = n;
            at += n;
        }
        if (at != end) fatal("'%s': example %d states %zu bytes but holds %zu", path, i, 2 * len, 2 * (at - start));
        if (x->n_comp > e->max_comp) e->max_comp = x->n_comp;
        for (int c = 0; c < x->n_comp; c++) {
            const int row = x->ctx_len + x->comp_len[c];
            e->truncated_rows += row > T + 1;  // T: -t, the most a row gets
            if (row > longest) longest = row;
        }
    }
    if (at != words) fatal("'%s': %zu bytes follow its %d examples: truncated header count or corrupt file", path, 2 * (words - at), e->n);
    if (B < e->max_comp)
        fatal("-h 1: '%s' scores up to %d completions per example, one row each; use -b >= %d (now %d)", path, e->max_comp, e->max_comp, B);
    if (T < 2) fatal("-h 1: -t %d leaves no room for a context token and a completion token; use -t >= 2", T);
    const int need = (longest - 1 + 63) / 64 * 64;  // positions of the longest row (inputs: all but its last token)
    e->B = B;
    e->T = need < T ? need : T;
    e->per_batch = B / e->max_comp;
    e->inputs = (int *)mallocCheck((size_t)B * T * sizeof(int));
    e->targets = (int *)mallocCheck((size_t)B * T * sizeof(int));
    e->row_start = (int *)mallocCheck((size_t)B * sizeof(int));
    e->row_end = (int *)mallocCheck((size_t)B * sizeof(int));
}

// The batch of examples first .. first+count-1 (count <= per_batch): example k's completion c is
// row k * max_comp + c; rows past them are padding (token 0, not scored).
static inline void evalloader_fill(EvalLoader *e, int first, int count) {
    const int T = e->T;
    for (int r = 0; r < e->B; r++) {
        int *in = e->inputs + (size_t)r * T, *tg = e->targets + (size_t)r * T;
        memset(in, 0, (size_t)T * sizeof(int));
        memset(tg, 0, (size_t)T * sizeof(int));
        e->row_start[r] = e->row_end[r] = 0;
        int k = r / e->max_comp, c = r % e->max_comp;
        if (k >= count || c >= e->ex[first + k].n_comp) continue;
        const EvalExample *x = &e->ex[first + k];
        // the row's tokens are ctx ++ comp[c]; keep the last T + 1 of them
        const int L = x->ctx_len + x->comp_len[c], drop = L > T + 1 ? L - (T + 1) : 0;
        for (int t = 0; t + 1 < L - drop; t++) {
            int i = drop + t, j = i + 1;
            in[t] = i < x->ctx_len ? x->ctx[i] : x->comp[c][i - x->ctx_len];
            tg[t] = j < x->ctx_len ? x->ctx[j] : x->comp[c][j - x->ctx_len];
        }
        // position t predicts token drop + t + 1: the completion's tokens from t = ctx_len - 1 - drop
        int s = x->ctx_len - 1 - drop;
        e->row_start[r] = s > 0 ? s : 0;
        e->row_end[r] = L - drop - 1;
    }
}

// Of the batch's examples, how many were answered right, given the forward's per-position
// losses (B, T) of the batch. Mean loss per completion token, least wins, ties to the first.
static inline int evalloader_correct(const EvalLoader *e, const float *losses, int first, int count) {
    int right = 0;
    for (int k = 0; k < count; k++) {
        const EvalExample *x = &e->ex[first + k];
        int best = 0;
        double best_loss = 0.0;
        for (int c = 0; c < x->n_comp; c++) {
            int r = k * e->max_comp + c;
            double s = 0.0;
            for (int t = e->row_start[r]; t < e->row_end[r]; t++) s += losses[(size_t)r * e->T + t];
            s /= (e->row_end[r] - e->row_start[r]);
            if (c == 0 || s < best_loss) { best = c; best_loss = s; }
        }
        right += best == x->label;
    }
    return right;
}

static inline void evalloader_free(EvalLoader *e) {
    free(e->stream); free(e->ex); free(e->inputs); free(e->targets); free(e->row_start); free(e->row_end);
    memset(e, 0, sizeof(*e));
}
