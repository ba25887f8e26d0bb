// test_dataloader.c: exact batch contents, rank slicing, wrap-around, shuffling, resume and shard errors.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "common/dataloader.h"
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

    unlink(p0); unlink(p1);
    rmdir(g_dir);
    return test_summary();
}
