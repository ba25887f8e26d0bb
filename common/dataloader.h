// dataloader.h: reads llm.c uint16 token shards into (inputs, targets) batches, with seeded shuffling and exact resume.
#pragma once
#include <glob.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "utils.h"

#define DATALOADER_MAGIC 20240520
#define DATALOADER_VERSION 1
#define DATALOADER_HEADER_INTS 256
#define DATALOADER_HEADER_BYTES (DATALOADER_HEADER_INTS * (long)sizeof(int32_t))

// Position of the NEXT batch. shard_idx is a position in the epoch's shard order and
// sample_idx a position in that shard's sample order; both orders are pure functions of
// (seed, epoch, shard), so these three numbers are all a resume needs.
typedef struct { int epoch; int shard_idx; long sample_idx; } DataLoaderState;

typedef struct {
    int B, T, rank, nproc, shuffle; unsigned long long seed;
    int num_shards; char **shard_paths; long *shard_ntok;   // shard list from glob(), sorted
    int epoch, shard_idx; long sample_idx;                   // position
    long num_samples;          // global batches in the current shard
    long *order;               // sample order of the current shard (identity when !shuffle)
    int *shard_order;          // shard order of the current epoch
    int vocab_size;            // > 0: every token read is checked against it (set by the trainer)
    FILE *fp; unsigned short *buffer; int *inputs; int *targets;  // inputs/targets: B*T ints each
    long num_tokens_total;
} DataLoader;

// splitmix64's finalizer: a cheap, well-mixed hash, so that the permutations do not depend
// on libc's rand() and every rank (and every platform) draws the same ones.
static inline uint64_t dl_mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t dl_seed3(uint64_t seed, uint64_t epoch, uint64_t stream) {
    return dl_mix64(dl_mix64(dl_mix64(seed) ^ epoch) ^ stream);
}

static inline uint64_t dl_next(uint64_t *state) {
    *state += 0x9E3779B97F4A7C15ULL;
    return dl_mix64(*state);
}

// Rejection sampling, so that every permutation is equally likely (plain modulo is biased).
static inline uint64_t dl_below(uint64_t *state, uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t r;
    do { r = dl_next(state); } while (r >= limit);
    return r % n;
}

// Stream id for the shard order; sample orders use the shard's sorted index, which is smaller.
#define DL_SHARD_ORDER_STREAM 0xFFFFFFFFFFFFFFFFULL

static inline long dataloader_shard_samples(const DataLoader *dl, int shard) {
    return (dl->shard_ntok[shard] - 1) / ((long)dl->B * dl->T * dl->nproc);
}

static inline long dataloader_num_batches(const DataLoader *dl) {
    long n = 0;
    for (int i = 0; i < dl->num_shards; i++) n += dataloader_shard_samples(dl, i);
    return n;
}

static inline void dataloader_make_shard_order(DataLoader *dl) {
    for (int i = 0; i < dl->num_shards; i++) dl->shard_order[i] = i;
    if (!dl->shuffle) return;
    uint64_t st = dl_seed3(dl->seed, (uint64_t)dl->epoch, DL_SHARD_ORDER_STREAM);
    for (int i = dl->num_shards - 1; i > 0; i--) {
        int j = (int)dl_below(&st, (uint64_t)i + 1);
        int tmp = dl->shard_order[i]; dl->shard_order[i] = dl->shard_order[j]; dl->shard_order[j] = tmp;
    }
}

// Prepares the shard at (epoch, shard_idx): its sample order and an open file.
static inline void dataloader_load_shard(DataLoader *dl) {
    int shard = dl->shard_order[dl->shard_idx];
    dl->num_samples = dataloader_shard_samples(dl, shard);
    for (long i = 0; i < dl->num_samples; i++) dl->order[i] = i;
    if (dl->shuffle) {
        uint64_t st = dl_seed3(dl->seed, (uint64_t)dl->epoch, (uint64_t)shard);
        for (long i = dl->num_samples - 1; i > 0; i--) {
            long j = (long)dl_below(&st, (uint64_t)i + 1);
            long tmp = dl->order[i]; dl->order[i] = dl->order[j]; dl->order[j] = tmp;
        }
    }
    if (dl->fp != NULL) fclose(dl->fp);  // read-only: a close error cannot lose data
    dl->fp = fopenCheck(dl->shard_paths[shard], "rb");
}

// Checks header and size of one shard and returns its token count; every problem is fatal
// because training on a half-written shard silently would be far worse than stopping.
static inline long dataloader_validate_shard(const char *path, long batch_tokens) {
    FILE *fp = fopenCheck(path, "rb");
    fseekCheck(fp, 0, SEEK_END, path);
    long fsize = ftell(fp);
    if (fsize < 0) fatal("cannot get the size of '%s': %s", path, strerror(errno));
    if (fsize < DATALOADER_HEADER_BYTES) {
        fatal("'%s' has %ld bytes, less than the %ld-byte shard header: truncated or corrupt, re-create it",
              path, fsize, DATALOADER_HEADER_BYTES);
    }
    fseekCheck(fp, 0, SEEK_SET, path);
    int32_t header[DATALOADER_HEADER_INTS];
    freadCheck(header, sizeof(int32_t), DATALOADER_HEADER_INTS, fp, path);
    fcloseCheck(fp, path);
    if (header[0] != DATALOADER_MAGIC) {
        fatal("'%s' is not an llm.c data shard: magic %d, expected %d", path, (int)header[0], DATALOADER_MAGIC);
    }
    if (header[1] != DATALOADER_VERSION) {
        fatal("'%s' has data shard version %d, expected %d; re-create it with the current data script",
              path, (int)header[1], DATALOADER_VERSION);
    }
    long ntok = (long)header[2];
    if (ntok < 0) fatal("'%s' header says %ld tokens: corrupt, re-create it", path, ntok);
    long expected = DATALOADER_HEADER_BYTES + 2 * ntok;
    if (fsize != expected) {
        fatal("'%s' header says %ld tokens (size %ld expected) but the file has %ld bytes: truncated or corrupt, re-create it",
              path, ntok, expected, fsize);
    }
    if (ntok < batch_tokens + 1) {
        fatal("'%s' has %ld tokens but one batch needs B*T*nproc+1 = %ld; use a smaller -b or -t",
              path, ntok, batch_tokens + 1);
    }
    return ntok;
}

static inline void dataloader_reset(DataLoader *dl) {
    dl->epoch = 0;
    dl->shard_idx = 0;
    dl->sample_idx = 0;
    dataloader_make_shard_order(dl);
    dataloader_load_shard(dl);
}

// 1 when the pattern names at least one file.
static inline int dataloader_pattern_matches(const char *pattern) {
    if (pattern == NULL || pattern[0] == '\0') return 0;
    glob_t g;
    if (glob(pattern, 0, NULL, &g) != 0) return 0;
    int any = g.gl_pathc > 0;
    globfree(&g);
    return any;
}

static inline void dataloader_init(DataLoader *dl, const char *pattern, int B, int T, int rank, int nproc,
                                   int shuffle, unsigned long long seed) {
    memset(dl, 0, sizeof(*dl));
    if (pattern == NULL || pattern[0] == '\0') fatal("no data shard pattern given; pass one with -i");
    if (B <= 0 || T <= 0) fatal("batch size B=%d and sequence length T=%d must be positive; check -b and -t", B, T);
    if (nproc <= 0 || rank < 0 || rank >= nproc) fatal("process rank %d is not in [0, %d); check the launcher", rank, nproc);
    dl->B = B; dl->T = T; dl->rank = rank; dl->nproc = nproc; dl->shuffle = shuffle; dl->seed = seed;

    glob_t g;
    int rc = glob(pattern, 0, NULL, &g);
    if (rc == GLOB_NOMATCH || (rc == 0 && g.gl_pathc == 0)) {
        if (rc == 0) globfree(&g);
        fatal("no data shards match '%s'; prepare data first, e.g. python data/tinyshakespeare.py", pattern);
    }
    if (rc != 0) fatal("glob('%s') failed (code %d); check the -i pattern and directory permissions", pattern, rc);
    if (g.gl_pathc > 0x7fffffff) fatal("'%s' matches too many files (%zu)", pattern, (size_t)g.gl_pathc);
    dl->num_shards = (int)g.gl_pathc;
    dl->shard_paths = (char **)mallocCheck(sizeof(char *) * (size_t)dl->num_shards);
    dl->shard_ntok = (long *)mallocCheck(sizeof(long) * (size_t)dl->num_shards);
    long batch_tokens = (long)B * T * nproc;
    long max_samples = 0;
    for (int i = 0; i < dl->num_shards; i++) {
        size_t len = strlen(g.gl_pathv[i]);
        dl->shard_paths[i] = (char *)mallocCheck(len + 1);
        memcpy(dl->shard_paths[i], g.gl_pathv[i], len + 1);
        dl->shard_ntok[i] = dataloader_validate_shard(dl->shard_paths[i], batch_tokens);
        dl->num_tokens_total += dl->shard_ntok[i];
        long ns = dataloader_shard_samples(dl, i);
        if (ns > max_samples) max_samples = ns;
    }
    globfree(&g);

    dl->order = (long *)mallocCheck(sizeof(long) * (size_t)max_samples);
    dl->shard_order = (int *)mallocCheck(sizeof(int) * (size_t)dl->num_shards);
    dl->buffer = (unsigned short *)mallocCheck(sizeof(unsigned short) * ((size_t)B * (size_t)T + 1));
    dl->inputs = (int *)mallocCheck(sizeof(int) * (size_t)B * (size_t)T);
    dl->targets = (int *)mallocCheck(sizeof(int) * (size_t)B * (size_t)T);
    dataloader_reset(dl);
}

static inline void dataloader_next_batch(DataLoader *dl) {
    long BT = (long)dl->B * dl->T;
    long sample = dl->order[dl->sample_idx];
    long offset = sample * BT * dl->nproc + (long)dl->rank * BT;
    const char *path = dl->shard_paths[dl->shard_order[dl->shard_idx]];
    fseekCheck(dl->fp, DATALOADER_HEADER_BYTES + 2 * offset, SEEK_SET, path);
    freadCheck(dl->buffer, sizeof(unsigned short), (size_t)BT + 1, dl->fp, path);
    for (long i = 0; i < BT; i++) {
        dl->inputs[i] = (int)dl->buffer[i];
        dl->targets[i] = (int)dl->buffer[i + 1];
    }
    if (dl->vocab_size > 0) {
        for (long i = 0; i <= BT; i++)
            if ((int)dl->buffer[i] >= dl->vocab_size)
                fatal("'%s' holds token %d at position %ld, outside the model's vocabulary of %d: the data was prepared with "
                      "another tokenizer (GPT-2 data needs vocab_size = 50257, --vocab char data 96)",
                      path, (int)dl->buffer[i], offset + i, dl->vocab_size);
    }
    // Advance eagerly so that get_state always names the batch that will be read next.
    dl->sample_idx++;
    if (dl->sample_idx >= dl->num_samples) {
        dl->sample_idx = 0;
        dl->shard_idx++;
        if (dl->shard_idx >= dl->num_shards) {
            dl->shard_idx = 0;
            dl->epoch++;
            dataloader_make_shard_order(dl);
        }
        dataloader_load_shard(dl);
    }
}

static inline DataLoaderState dataloader_get_state(const DataLoader *dl) {
    DataLoaderState st;
    st.epoch = dl->epoch;
    st.shard_idx = dl->shard_idx;
    st.sample_idx = dl->sample_idx;
    return st;
}

static inline void dataloader_set_state(DataLoader *dl, DataLoaderState st) {
    if (st.epoch < 0 || st.shard_idx < 0 || st.shard_idx >= dl->num_shards) {
        fatal("saved data position (epoch %d, shard %d, sample %ld) does not fit the %d data shard(s) starting with '%s'; "
              "resume with the same data (-i), or start a fresh run",
              st.epoch, st.shard_idx, st.sample_idx, dl->num_shards, dl->shard_paths[0]);
    }
    dl->epoch = st.epoch;
    dl->shard_idx = st.shard_idx;
    dataloader_make_shard_order(dl);
    long ns = dataloader_shard_samples(dl, dl->shard_order[st.shard_idx]);
    if (st.sample_idx < 0 || st.sample_idx >= ns) {
        fatal("saved data position (epoch %d, shard %d, sample %ld) does not fit '%s', which has %ld batches of B=%d T=%d nproc=%d; "
              "resume with the same data (-i), -b, -t and number of processes, or start a fresh run",
              st.epoch, st.shard_idx, st.sample_idx, dl->shard_paths[dl->shard_order[st.shard_idx]], ns,
              dl->B, dl->T, dl->nproc);
    }
    dl->sample_idx = st.sample_idx;
    dataloader_load_shard(dl);
}

static inline void dataloader_free(DataLoader *dl) {
    if (dl->fp != NULL) fclose(dl->fp);  // read-only: a close error cannot lose data
    for (int i = 0; i < dl->num_shards; i++) free(dl->shard_paths[i]);
    free(dl->shard_paths);
    free(dl->shard_ntok);
    free(dl->order);
    free(dl->shard_order);
    free(dl->buffer);
    free(dl->inputs);
    free(dl->targets);
    memset(dl, 0, sizeof(*dl));
}
