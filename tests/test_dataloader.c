// test_dataloader.c: exact batch contents, rank slicing, wrap-around, shuffling, resume and shard errors;
// the eval loader's rows, scored positions, choices and file errors.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "common/dataloader.h"
#include "common/evalloader.h"
#include "tests/check.h"

static char g_dir[256];

// Token i of shard k is k*10000 + i, so a token names its shard and offset (shards stay < 10000 tokens).
static void write_shard(const char *path, int shard_id, long ntok, int magic, int version, long header_ntok, long drop_bytes) {
    int32_t header[256];
    memset(header, 0, sizeof(header));
    header[0] = magic; header[1] = version; header[2] = (int32_t)header_ntok;
    unsigned short *toks = (unsigned short *)mallocCheck(sizeof(unsigned short) * (size_t)(ntok > 0 ? ntok : 1));
    for (long i = 0; i < ntok; i++) toks[i] = (unsigned short)((shard_id * 10000 + i) % 60000);
    FILE *fp = fopenCheck(path, "wb");
    fwriteCheck(header, sizeof(int32_t), 256, fp, path);
    fwriteCheck(toks, sizeof(unsigned short), (size_t)ntok, fp, path);
    fcloseCheck(fp, path);
    free(toks);
    if (drop_bytes > 0 && truncate(path, 1024 + 2 * ntok - drop_bytes) != 0) { perror("truncate"); exit(2); }
}

static void path_in(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", g_dir, name); }

// True when inputs are start..start+BT-1 and targets are one further, i.e. a contiguous slice at `start`.
static int batch_is(const DataLoader *dl, int first_token) {
    long BT = (long)dl->B * dl->T;
    for (long i = 0; i < BT; i++) {
        if (dl->inputs[i] != first_token + i || dl->targets[i] != first_token + i + 1) return 0;
    }
    return 1;
}

typedef struct { const char *pattern; int B, T, rank, nproc; int set_bad_state; } ChildArgs;

// dataloader_init (and optionally a bad set_state) on the arguments, for run_child.
static void child_init(const void *arg) {
    const ChildArgs *a = (const ChildArgs *)arg;
    DataLoader dl;
    dataloader_init(&dl, a->pattern, a->B, a->T, a->rank, a->nproc, 0, 1);
    if (a->set_bad_state) {
        DataLoaderState st = { 0, 0, 1000000 };
        dataloader_set_state(&dl, st);
    }
    dataloader_free(&dl);
}

static void expect_fail(const char *name, const ChildArgs *a, const char *must_contain1, const char *must_contain2) {
    char err[4096], why[4400];
    int code = run_child(child_init, a, 2, err, sizeof(err));
    snprintf(why, sizeof(why), "exit %d, stderr: %s", code, err);
    check_true(code != 0 && code != -1, name, why);
    char nm[256];
    snprintf(nm, sizeof(nm), "%s: message names '%s'", name, must_contain1);
    check_true(strstr(err, must_contain1) != NULL, nm, why);
    if (must_contain2) {
        snprintf(nm, sizeof(nm), "%s: message says '%s'", name, must_contain2);
        check_true(strstr(err, must_contain2) != NULL, nm, why);
    }
}

// ---- eval files (llm.c's multiple-choice format), written here word by word
// The three examples of the tests below: {label, context, 4 completions}; 0 ends a token list.
static const int g_ex[3][6][8] = {
    {{2}, {10, 11, 12}, {20}, {21, 22}, {23, 24, 25}, {26}},
    {{0}, {30}, {40, 41}, {42}, {43}, {44}},
    {{3}, {1, 2, 3, 4, 5, 6}, {50, 51}, {52, 53}, {54, 55}, {56, 57}},
};
static int list_len(const int *l) { int n = 0; while (n < 8 && l[n]) n++; return n; }

// Writes the examples; `corrupt` changes one thing: 1 the magic, 2 a label of 4, 3 example 1's
// index, 4 a token of 60000, 5 two bytes more at the end, 6 the last 4 bytes cut, 7 a shard's magic
static void write_eval(const char *path, int corrupt) {
    uint16_t w[512];
    int n = 0;
    for (int i = 0; i < 3; i++) {
        int start = n;
        w[n++] = 65535; w[n++] = 0; w[n++] = (uint16_t)(corrupt == 3 && i == 1 ? 7 : i);
        w[n++] = (uint16_t)(corrupt == 2 && i == 2 ? 4 : g_ex[i][0][0]); w[n++] = 4;
        for (int s = 1; s <= 5; s++) {
            int len = list_len(g_ex[i][s]);
            w[n++] = (uint16_t)len;
            for (int t = 0; t < len; t++) w[n++] = (uint16_t)(corrupt == 4 && i == 1 && s == 3 ? 60000 : g_ex[i][s][t]);
        }
        w[start + 1] = (uint16_t)(2 * (n - start));
    }
    if (corrupt == 5) w[n++] = 0;
    if (corrupt == 6) n -= 2;
    int32_t header[256] = {0};
    header[0] = corrupt == 1 ? 12345 : corrupt == 7 ? 20240520 : EVAL_MAGIC; header[1] = 1; header[2] = 3; header[3] = 64;
    FILE *fp = fopen(path, "wb");
    fwrite(header, sizeof(header), 1, fp);
    fwrite(w, sizeof(uint16_t), (size_t)n, fp);
    fclose(fp);
}

typedef struct { const char *path; int B, T, vocab; } EvalArgs;
static void child_eval_init(const void *arg) {
    const EvalArgs *a = (const EvalArgs *)arg;
    EvalLoader e;
    evalloader_init(&e, a->path, a->B, a->T, a->vocab);
    evalloader_free(&e);
}
static void expect_eval_fail(const char *name, const EvalArgs *a, const char *must_contain) {
    char err[4096], why[4400];
    int code = run_child(child_eval_init, a, 2, err, sizeof(err));
    snprintf(why, sizeof(why), "exit %d, stderr: %s", code, err);
    check_true(code != 0 && code != -1 && strstr(err, a->path) && strstr(err, must_contain), name, why);
}

static int row_is(const EvalLoader *e, int r, const int *in, const int *tg, int start, int end) {
    return memcmp(e->inputs + r * e->T, in, (size_t)e->T * sizeof(int)) == 0 && memcmp(e->targets + r * e->T, tg, (size_t)e->T * sizeof(int)) == 0 &&
           e->row_start[r] == start && e->row_end[r] == end;
}

static void test_evalloader(void) {
    char path[512];
    path_in(path, sizeof(path), "eval.bin");
    write_eval(path, 0);
    EvalLoader e;
    evalloader_init(&e, path, 8, 5, 100);  // 2 examples per batch of 8 rows; T 5
    check_true(e.n == 3 && e.max_comp == 4 && e.per_batch == 2 && e.ex[2].label == 3 && e.ex[0].ctx_len == 3 && e.ex[0].comp_len[2] == 3 &&
                   e.ex[2].comp[3][1] == 57 && e.truncated_rows == 4,
               "eval file: 3 examples parsed (labels, lengths, tokens; example 2's 4 rows exceed T + 1 = 6)", "wrong fields");
    evalloader_fill(&e, 0, 2);
    // example 0, completion 0: 10 11 12 | 20 -> scored position 2 (predicts 20)
    int in0[5] = {10, 11, 12, 0, 0}, tg0[5] = {11, 12, 20, 0, 0};
    // completion 2: 10 11 12 | 23 24 25, exactly T + 1 tokens -> positions 2..4
    int in2[5] = {10, 11, 12, 23, 24}, tg2[5] = {11, 12, 23, 24, 25};
    // example 1, completion 1 (row 5): 30 | 42 -> position 0
    int in5[5] = {30, 0, 0, 0, 0}, tg5[5] = {42, 0, 0, 0, 0};
    check_true(row_is(&e, 0, in0, tg0, 2, 3) && row_is(&e, 2, in2, tg2, 2, 5) && row_is(&e, 5, in5, tg5, 0, 1),
               "eval rows: context + completion, targets shifted by one, only the completion's positions scored", "rows differ");
    // losses: 1e9 wherever a position is not scored, so that a wrong mask shows. Example 0's rows have
    // means 2, 1.5, 1.2, 3 but sums 2, 3, 3.6, 3: the mean picks 2 (its label), a sum would pick 0.
    // Example 1: a tie of 0.5 between completions 0 and 1 goes to the first, its label.
    float losses[8 * 5];
    for (int i = 0; i < 40; i++) losses[i] = 1e9f;
    const float v[8] = {2.0f, 1.5f, 1.2f, 3.0f, 0.5f, 0.5f, 2.0f, 2.0f};
    for (int r = 0; r < 8; r++)
        for (int t = e.row_start[r]; t < e.row_end[r]; t++) losses[r * 5 + t] = v[r];
    int right = evalloader_correct(&e, losses, 0, 2);
    check_true(right == 2, "eval choice: least mean loss per completion token, ties to the first", "not 2 right");
    losses[2 * 5 + 2] = 2.5f;  // completion 2's mean becomes (2.5 + 1.2 + 1.2) / 3 = 1.63 > 1.5: completion 1 wins, wrongly
    check_true(evalloader_correct(&e, losses, 0, 2) == 1, "eval choice: a completion that loses its lead loses the example", "not 1 right");
    // example 2 alone: 1 2 3 4 5 6 | 50 51 is 8 > T + 1 tokens: its first 2 go; positions 3..4 scored
    evalloader_fill(&e, 2, 1);
    int in8[5] = {3, 4, 5, 6, 50}, tg8[5] = {4, 5, 6, 50, 51}, zero[5] = {0};
    check_true(row_is(&e, 0, in8, tg8, 3, 5) && row_is(&e, 4, zero, zero, 0, 0) && row_is(&e, 7, zero, zero, 0, 0),
               "eval rows: a row longer than T + 1 loses its first context tokens; the batch's other rows are padding", "rows differ");
    evalloader_free(&e);

    // rows only as long as the longest example needs (8 tokens: 7 positions), rounded up to 64
    evalloader_init(&e, path, 8, 1024, 100);
    int t1024 = e.T;
    evalloader_free(&e);
    evalloader_init(&e, path, 8, 32, 100);
    int t32 = e.T;
    evalloader_free(&e);
    char why[64];
    snprintf(why, sizeof(why), "rows of %d and %d", t1024, t32);
    check_true(t1024 == 64 && t32 == 32, "eval rows: 64 positions under -t 1024 (the longest row needs 7), -t 32 under -t 32", why);

    EvalArgs a = {path, 8, 5, 100};
    a.B = 3;
    expect_eval_fail("eval error: fewer rows than completions", &a, "use -b >= 4");
    a.B = 8;
    a.vocab = 50;
    expect_eval_fail("eval error: a token outside the vocabulary", &a, "token 50, outside the model's vocabulary of 50");
    a.vocab = 100;
    const char *want[8] = {NULL, "is not an eval file", "label 4 of 4", "carries index 7", "token 60000",
                           "2 bytes follow its 3 examples", "which do not fit the file: truncated", "is a token shard"};
    const char *name[8] = {NULL, "eval error: bad magic", "eval error: label out of range", "eval error: examples out of order",
                           "eval error: a token of 60000 in a file", "eval error: trailing bytes", "eval error: truncated file",
                           "eval error: a token shard given as eval file"};
    for (int c = 1; c <= 7; c++) {
        write_eval(path, c);
        expect_eval_fail(name[c], &a, want[c]);
    }
    a.path = "/nonexistent/hellaswag_val.bin";
    expect_eval_fail("eval error: missing file says how to make it", &a, "python data/hellaswag.py");
    unlink(path);
}

int main(void) {
    snprintf(g_dir, sizeof(g_dir), "/tmp/test_dataloader_XXXXXX");
    if (mkdtemp(g_dir) == NULL) { perror("mkdtemp"); return 2; }
    char p0[512], p1[512], pat[512];
    path_in(p0, sizeof(p0), "train_000.bin");
    path_in(p1, sizeof(p1), "train_001.bin");
    path_in(pat, sizeof(pat), "train_*.bin");
    write_shard(p0, 0, 81, 20240520, 1, 81, 0);  // B=2,T=4: 80/8 = 10 samples, the last ends exactly at token 80
    write_shard(p1, 1, 50, 20240520, 1, 50, 0);  // 49/8 = 6 samples, 1 token left over
    const int B = 2, T = 4;

    // --- single process, no shuffle: exact contents, shard and epoch wrap ---
    {
        DataLoader dl;
        dataloader_init(&dl, pat, B, T, 0, 1, 0, 0);
        check_true(dl.num_shards == 2 && strcmp(dl.shard_paths[0], p0) == 0 && strcmp(dl.shard_paths[1], p1) == 0,
                   "nproc1: two shards found in sorted order", NULL);
        check_true(dl.num_tokens_total == 131, "nproc1: num_tokens_total = 81+50", NULL);
        check_true(dataloader_num_batches(&dl) == 16, "nproc1: num_batches = 10+6", NULL);
        int ok = 1;
        for (int j = 0; j < 10; j++) { dataloader_next_batch(&dl); ok &= batch_is(&dl, j * 8); }
        check_true(ok, "nproc1: shard 0 batches are tokens [8j, 8j+9) in order", NULL);
        DataLoaderState st = dataloader_get_state(&dl);
        check_true(st.epoch == 0 && st.shard_idx == 1 && st.sample_idx == 0, "nproc1: after shard 0 the state points at shard 1", NULL);
        ok = 1;
        for (int j = 0; j < 6; j++) { dataloader_next_batch(&dl); ok &= batch_is(&dl, 10000 + j * 8); }
        check_true(ok, "nproc1: then shard 1 batches in order", NULL);
        st = dataloader_get_state(&dl);
        check_true(st.epoch == 1 && st.shard_idx == 0 && st.sample_idx == 0, "nproc1: after the last shard the state is epoch 1 start", NULL);
        dataloader_next_batch(&dl);
        check_true(batch_is(&dl, 0), "nproc1: epoch 1 starts again at shard 0 token 0", NULL);
        dataloader_next_batch(&dl);
        check_true(batch_is(&dl, 8), "nproc1: epoch 1 second batch", NULL);
        dataloader_reset(&dl);
        st = dataloader_get_state(&dl);
        dataloader_next_batch(&dl);
        check_true(st.epoch == 0 && st.shard_idx == 0 && st.sample_idx == 0 && batch_is(&dl, 0), "nproc1: reset goes back to the first batch", NULL);
        // targets are the inputs shifted by one, checked element by element against the file
        check_true(dl.inputs[0] == 0 && dl.targets[0] == 1 && dl.inputs[7] == 7 && dl.targets[7] == 8, "nproc1: first batch spot values", NULL);
        dataloader_free(&dl);
    }

    // --- two processes: rank r reads [j*B*T*2 + r*B*T, +B*T+1) ---
    {
        DataLoader r0, r1, big;
        dataloader_init(&r0, pat, B, T, 0, 2, 0, 0);
        dataloader_init(&r1, pat, B, T, 1, 2, 0, 0);
        dataloader_init(&big, pat, 2 * B, T, 0, 1, 0, 0);
        check_true(dataloader_num_batches(&r0) == 5 + 3, "nproc2: num_batches = 80/16 + 49/16", NULL);
        check_true(dataloader_num_batches(&big) == 5 + 3, "nproc2: same count as one process with 2B", NULL);
        int ok0 = 1, ok1 = 1, okunion = 1;
        for (int j = 0; j < 8; j++) {
            dataloader_next_batch(&r0); dataloader_next_batch(&r1); dataloader_next_batch(&big);
            int base = j < 5 ? j * 16 : 10000 + (j - 5) * 16;
            ok0 &= batch_is(&r0, base);
            ok1 &= batch_is(&r1, base + 8);
            for (int i = 0; i < 8; i++) {
                okunion &= r0.inputs[i] == big.inputs[i] && r1.inputs[i] == big.inputs[8 + i];
                okunion &= r0.targets[i] == big.targets[i] && r1.targets[i] == big.targets[8 + i];
            }
        }
        check_true(ok0, "nproc2: rank 0 reads [16j, 16j+9)", NULL);
        check_true(ok1, "nproc2: rank 1 reads [16j+8, 16j+17)", NULL);
        check_true(okunion, "nproc2: rank0 ++ rank1 equals the 1-process batch with B doubled", NULL);
        dataloader_next_batch(&r1);
        check_true(batch_is(&r1, 8), "nproc2: rank 1 wraps to epoch 1 at token 8", NULL);
        dataloader_free(&r0); dataloader_free(&r1); dataloader_free(&big);
    }

    // --- shuffle: permutation per epoch, not identity, deterministic in the seed ---
    {
        enum { NB = 16, EPOCHS = 3 };
        int seen[EPOCHS][NB];  // global batch id (shard*10 + sample) in reading order
        DataLoader dl, dl2, dl3, r1;
        dataloader_init(&dl, pat, B, T, 0, 1, 1, 1337);
        dataloader_init(&dl2, pat, B, T, 0, 1, 1, 1337);
        dataloader_init(&dl3, pat, B, T, 0, 1, 1, 4242);
        int contiguous = 1, same_seed = 1, diff_seed = 0, epoch_ok = 1;
        for (int e = 0; e < EPOCHS; e++) {
            for (int k = 0; k < NB; k++) {
                DataLoaderState st = dataloader_get_state(&dl);
                epoch_ok &= st.epoch == e;
                dataloader_next_batch(&dl); dataloader_next_batch(&dl2); dataloader_next_batch(&dl3);
                int first = dl.inputs[0];
                int shard = first / 10000, off = first % 10000;
                contiguous &= off % 8 == 0 && batch_is(&dl, first);
                seen[e][k] = shard * 10 + off / 8;
                same_seed &= memcmp(dl.inputs, dl2.inputs, sizeof(int) * 8) == 0 && memcmp(dl.targets, dl2.targets, sizeof(int) * 8) == 0;
                diff_seed |= dl.inputs[0] != dl3.inputs[0];
            }
        }
        check_true(contiguous, "shuffle: every batch is still a contiguous aligned slice", NULL);
        check_true(epoch_ok, "shuffle: epoch counter advances every 16 batches", NULL);
        int perm_ok = 1, not_identity = 0, epochs_differ = 0;
        for (int e = 0; e < EPOCHS; e++) {
            int count[NB] = {0};  // ids 0..9 are shard 0's samples, 10..15 shard 1's
            for (int k = 0; k < NB; k++) {
                int id = seen[e][k];
                if (id < 0 || id >= NB) { perm_ok = 0; continue; }
                count[id]++;
            }
            for (int id = 0; id < NB; id++) perm_ok &= count[id] == 1;
            for (int k = 0; k < NB; k++) {
                if (seen[e][k] != k) not_identity = 1;  // unshuffled reading order is ids 0..15
                if (e > 0 && seen[e][k] != seen[0][k]) epochs_differ = 1;
            }
        }
        check_true(perm_ok, "shuffle: each sample of each shard exactly once per epoch", NULL);
        check_true(not_identity, "shuffle: order differs from the unshuffled order", NULL);
        check_true(epochs_differ, "shuffle: epochs use different orders", NULL);
        check_true(same_seed, "shuffle: same seed gives identical batches", NULL);
        check_true(diff_seed, "shuffle: a different seed gives a different order", NULL);
        // within each shard's run the samples are not in increasing order (sample order shuffled, not only shard order)
        int sample_shuffled = 0;
        for (int k = 1; k < NB; k++) {
            if (seen[0][k] / 10 == seen[0][k - 1] / 10 && seen[0][k] < seen[0][k - 1]) sample_shuffled = 1;
        }
        check_true(sample_shuffled, "shuffle: samples within a shard are permuted", NULL);

        // data parallel: rank 1 with the same seed follows the same sample order, offset by B*T
        DataLoader s0;
        dataloader_init(&s0, pat, B, T, 0, 2, 1, 99);
        dataloader_init(&r1, pat, B, T, 1, 2, 1, 99);
        int ranks_agree = 1;
        for (int k = 0; k < 20; k++) {
            dataloader_next_batch(&s0); dataloader_next_batch(&r1);
            ranks_agree &= r1.inputs[0] == s0.inputs[0] + 8 && s0.inputs[0] % 16 == 0 && batch_is(&r1, r1.inputs[0]);
        }
        check_true(ranks_agree, "shuffle: ranks with the same seed read the two halves of the same global batch", NULL);
        dataloader_free(&s0); dataloader_free(&r1);
        dataloader_free(&dl); dataloader_free(&dl2); dataloader_free(&dl3);
    }

    // --- shuffle with many shards: shard order and per-shard sample order both change per epoch ---
    {
        enum { NS = 6, EP = 4 };
        char paths[NS][512], mpat[512];
        for (int k = 0; k < NS; k++) {
            char nm[64];
            snprintf(nm, sizeof(nm), "multi_%03d.bin", k);
            path_in(paths[k], sizeof(paths[k]), nm);
            write_shard(paths[k], k, 8 * (4 + k) + 1, 20240520, 1, 8 * (4 + k) + 1, 0);  // shard k: 4+k samples
        }
        path_in(mpat, sizeof(mpat), "multi_*.bin");
        DataLoader dl;
        dataloader_init(&dl, mpat, B, T, 0, 1, 1, 2024);
        long nb = dataloader_num_batches(&dl);
        check_true(nb == 4 + 5 + 6 + 7 + 8 + 9, "multi: num_batches sums every shard", NULL);
        int shard_seq[EP][NS], sample_seq[EP][9];  // shard order; shard 5's sample order
        memset(shard_seq, 0, sizeof(shard_seq)); memset(sample_seq, 0, sizeof(sample_seq));
        int ok = 1;
        for (int e = 0; e < EP; e++) {
            int nshard = 0, nsample = 0, prev = -1, count[NS][9];
            memset(count, 0, sizeof(count));
            for (long k = 0; k < nb; k++) {
                dataloader_next_batch(&dl);
                int shard = dl.inputs[0] / 10000, sample = (dl.inputs[0] % 10000) / 8;
                ok &= batch_is(&dl, dl.inputs[0]) && shard < NS && sample < 4 + shard;
                if (!ok) break;
                count[shard][sample]++;
                if (shard != prev) { if (nshard < NS) shard_seq[e][nshard] = shard; nshard++; prev = shard; }
                if (shard == 5) sample_seq[e][nsample++] = sample;
            }
            ok &= nshard == NS;  // each shard read as one contiguous run
            for (int s = 0; s < NS; s++) for (int j = 0; j < 4 + s; j++) ok &= count[s][j] == 1;
        }
        check_true(ok, "multi: every epoch reads each shard in one run and each sample once", NULL);
        int shard_perm_changes = 0, shard_not_sorted = 0, sample_perm_changes = 0;
        for (int e = 0; e < EP; e++) {
            for (int s = 0; s < NS; s++) if (shard_seq[e][s] != s) shard_not_sorted = 1;
            if (e > 0 && memcmp(shard_seq[e], shard_seq[0], sizeof(shard_seq[0])) != 0) shard_perm_changes = 1;
            if (e > 0 && memcmp(sample_seq[e], sample_seq[0], sizeof(sample_seq[0])) != 0) sample_perm_changes = 1;
        }
        check_true(shard_not_sorted, "multi: shard order is shuffled", NULL);
        check_true(shard_perm_changes, "multi: shard order changes between epochs", NULL);
        check_true(sample_perm_changes, "multi: a shard's sample order changes between epochs", NULL);
        dataloader_free(&dl);
        for (int k = 0; k < NS; k++) unlink(paths[k]);
    }

    // --- the smallest usable shard: exactly B*T*nproc+1 tokens gives one batch ---
    {
        char edge[512], epat[512];
        path_in(edge, sizeof(edge), "edge_000.bin"); path_in(epat, sizeof(epat), "edge_*.bin");
        write_shard(edge, 3, 9, 20240520, 1, 9, 0);
        DataLoader dl;
        dataloader_init(&dl, epat, B, T, 0, 1, 1, 5);
        check_true(dataloader_num_batches(&dl) == 1, "edge: B*T+1 tokens is one batch", NULL);
        dataloader_next_batch(&dl);
        int ok = batch_is(&dl, 30000);
        dataloader_next_batch(&dl);
        ok &= batch_is(&dl, 30000) && dataloader_get_state(&dl).epoch == 2;
        check_true(ok, "edge: the single batch repeats every epoch", NULL);
        dataloader_free(&dl);
        write_shard(edge, 3, 8, 20240520, 1, 8, 0);  // one token short
        ChildArgs a = { epat, B, T, 0, 1, 0 };
        expect_fail("error: shard of exactly B*T tokens", &a, edge, "B*T*nproc+1 = 9");
        unlink(edge);
    }

    // --- resume: get_state / set_state reproduces the following batches exactly ---
    for (int shuffle = 0; shuffle <= 1; shuffle++) {
        DataLoader a, b;
        dataloader_init(&a, pat, B, T, 0, 1, shuffle, 7);
        for (int k = 0; k < 13; k++) dataloader_next_batch(&a);
        DataLoaderState st = dataloader_get_state(&a);
        int expect[40][8];
        for (int k = 0; k < 40; k++) { dataloader_next_batch(&a); memcpy(expect[k], a.inputs, sizeof(expect[k])); }
        dataloader_init(&b, pat, B, T, 0, 1, shuffle, 7);
        dataloader_next_batch(&b);  // a fresh loader somewhere else: set_state must override its position
        dataloader_set_state(&b, st);
        int ok = 1;
        for (int k = 0; k < 40; k++) {
            dataloader_next_batch(&b);
            ok &= memcmp(expect[k], b.inputs, sizeof(expect[k])) == 0 && b.targets[7] == b.inputs[7] + 1;
        }
        check_true(ok, shuffle ? "resume (shuffle): 40 batches across shards and epochs match" : "resume (no shuffle): 40 batches match", NULL);
        DataLoaderState st2 = dataloader_get_state(&b), st3 = dataloader_get_state(&a);
        check_true(st2.epoch == st3.epoch && st2.shard_idx == st3.shard_idx && st2.sample_idx == st3.sample_idx,
                   "resume: states agree afterwards", NULL);
        dataloader_free(&a); dataloader_free(&b);
    }

    // --- errors: each exits non-zero and names the file ---
    {
        char bad[512], badpat[512];
        ChildArgs a = { NULL, B, T, 0, 1, 0 };

        path_in(bad, sizeof(bad), "magic_000.bin"); path_in(badpat, sizeof(badpat), "magic_*.bin");
        write_shard(bad, 0, 81, 12345, 1, 81, 0);
        a.pattern = badpat; expect_fail("error: bad magic", &a, bad, "magic 12345");
        unlink(bad);

        path_in(bad, sizeof(bad), "version_000.bin"); path_in(badpat, sizeof(badpat), "version_*.bin");
        write_shard(bad, 0, 81, 20240520, 7, 81, 0);
        a.pattern = badpat; expect_fail("error: wrong version", &a, bad, "version 7");
        unlink(bad);

        path_in(bad, sizeof(bad), "trunc_000.bin"); path_in(badpat, sizeof(badpat), "trunc_*.bin");
        write_shard(bad, 0, 81, 20240520, 1, 81, 10);
        a.pattern = badpat; expect_fail("error: truncated shard", &a, bad, "truncated or corrupt");
        unlink(bad);

        path_in(bad, sizeof(bad), "long_000.bin"); path_in(badpat, sizeof(badpat), "long_*.bin");
        write_shard(bad, 0, 81, 20240520, 1, 70, 0);  // header says fewer tokens than the file holds
        a.pattern = badpat; expect_fail("error: size larger than header says", &a, bad, "1164 expected");
        unlink(bad);

        path_in(bad, sizeof(bad), "tiny_000.bin"); path_in(badpat, sizeof(badpat), "tiny_*.bin");
        write_shard(bad, 0, 100, 20240520, 1, 100, 1000);  // shorter than the header itself
        a.pattern = badpat; expect_fail("error: file shorter than the header", &a, bad, "truncated or corrupt");
        unlink(bad);

        a.pattern = pat; a.B = 8; a.T = 8;  // 65 tokens needed, shard 1 has 50
        expect_fail("error: batch larger than a shard", &a, p1, "B*T*nproc+1 = 65");
        a.B = 4; a.T = 4; a.nproc = 4;  // 65 again, only through nproc
        expect_fail("error: batch larger than a shard (via nproc)", &a, p1, "use a smaller -b or -t");
        a.B = B; a.T = T; a.nproc = 1;

        path_in(badpat, sizeof(badpat), "nothing_*.bin");
        a.pattern = badpat; expect_fail("error: no matching files", &a, badpat, "prepare data first");

        a.pattern = pat; a.rank = 1; a.nproc = 1;
        expect_fail("error: rank outside nproc", &a, "rank 1", NULL);
        a.rank = 0;

        a.set_bad_state = 1;
        expect_fail("error: resume state outside the shard", &a, p0, "sample 1000000");
        a.set_bad_state = 0;

        // a good shard before a bad one is not enough: every shard is validated at init
        path_in(bad, sizeof(bad), "train_002.bin");
        write_shard(bad, 2, 81, 20240520, 1, 81, 2);
        expect_fail("error: a later shard is validated too", &a, bad, "truncated or corrupt");
        unlink(bad);
    }

    test_evalloader();
    unlink(p0); unlink(p1);
    rmdir(g_dir);
    return test_summary();
}
