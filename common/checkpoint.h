// checkpoint.h: llm.c model checkpoints (version 3 fp32 and version 5 bf16, read and write; our
// version 10 for structured models) and the resume state (optimizer moments, optional fp32 master
// weights, step, RNG, dataloader position, outlier windows); all writes are atomic.
#pragma once
#include <dirent.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include "config.h"
#include "outlier.h"
#include "utils.h"

#define MODEL_MAGIC 20240326
#define MODEL_VERSION_FP32 3
#define MODEL_VERSION_BF16 5
#define MODEL_VERSION_STRUCT_FP32 10  // ours: fp32, with the structure config text after the header
#define STATE_MAGIC 20241125  // our own: llm.c's state file (20240527) has a different layout
#define STATE_VERSION 2  // 2 added the outlier windows; version 1 files still load (windows empty)

static inline void model_header_fill(int header[256], const GPT2Config *c, int version) {
    memset(header, 0, 256 * sizeof(int));
    header[0] = MODEL_MAGIC;
    header[1] = version;
    header[2] = c->max_seq_len;
    header[3] = c->vocab_size;
    header[4] = c->num_layers;
    header[5] = c->num_heads;
    header[6] = c->channels;
    header[7] = c->padded_vocab_size;
}

// Reads the header of a checkpoint into *c and returns its version (3 or 5: llm.c's; 10: a
// structured model, whose config text is returned in *config_text, malloc'd; else NULL). The file
// stays open at the start of the parameters.
static inline int model_header_read(FILE *fp, const char *path, GPT2Config *c, char **config_text) {
    int header[256];
    freadCheck(header, sizeof(int), 256, fp, path);
    if (header[0] != MODEL_MAGIC)
        fatal("'%s' is not an llm.c model checkpoint (magic %d, expected %d); -e takes a checkpoint, dN, or a config file",
              path, header[0], MODEL_MAGIC);
    int version = header[1];
    if (version != MODEL_VERSION_FP32 && version != MODEL_VERSION_BF16 && version != MODEL_VERSION_STRUCT_FP32)
        fatal("'%s' has checkpoint version %d; this build reads versions 3 (fp32), 5 (bf16) and 10 (structured fp32)", path, version);
    c->max_seq_len = header[2];
    c->vocab_size = header[3];
    c->num_layers = header[4];
    c->num_heads = header[5];
    c->channels = header[6];
    // version-3 files from llm.c's earliest days had no padded vocab field
    c->padded_vocab_size = header[7] ? header[7] : pad_vocab(header[3]);
    gpt2_config_validate(c, path);
    *config_text = NULL;
    if (version == MODEL_VERSION_STRUCT_FP32) {
        if (header[8] <= 0 || header[8] > (1 << 20)) fatal("'%s': stored config length %d is invalid; the file is corrupt", path, header[8]);
        *config_text = (char *)callocCheck((size_t)header[8] + 1, 1);
        freadCheck(*config_text, 1, (size_t)header[8], fp, path);
    }
    return version;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

// fp32 -> bf16, round to nearest even (as PyTorch's .to(torch.bfloat16) and llm.c's export);
// NaN stays a quiet NaN instead of rounding into infinity.
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// Reads n parameters into fp32, converting from bf16 for version 5. Also checks that the file
// holds exactly that many, so a truncated or over-long file is caught here.
static inline void model_params_read(FILE *fp, const char *path, int version, float *params, size_t n) {
    if (version != MODEL_VERSION_BF16) {
        freadCheck(params, sizeof(float), n, fp, path);
    } else {
        const size_t chunk = 1 << 20;
        uint16_t *buf = (uint16_t *)mallocCheck(chunk * sizeof(uint16_t));
        for (size_t i = 0; i < n; i += chunk) {
            size_t m = n - i < chunk ? n - i : chunk;
            freadCheck(buf, sizeof(uint16_t), m, fp, path);
            for (size_t j = 0; j < m; j++) params[i + j] = bf16_to_float(buf[j]);
        }
        free(buf);
    }
    char extra;
    if (fread(&extra, 1, 1, fp) == 1)
        fatal("'%s' is longer than its header says (%zu parameters): corrupt, or written for another model", path, n);
}

// Writes an fp32 checkpoint atomically: llm.c's version 3 for a plain GPT-2 (config_text NULL),
// version 10 with the structure config stored after the header otherwise.
static inline void model_write_fp32(const char *path, const GPT2Config *c, const char *config_text, const float *params, size_t n) {
    char tmp[1100];
    FILE *fp = atomic_open(path, tmp, sizeof(tmp));
    int header[256];
    model_header_fill(header, c, config_text ? MODEL_VERSION_STRUCT_FP32 : MODEL_VERSION_FP32);
    if (config_text) header[8] = (int)strlen(config_text);
    fwriteCheck(header, sizeof(int), 256, fp, tmp);
    if (config_text) fwriteCheck(config_text, 1, strlen(config_text), fp, tmp);
    fwriteCheck(params, sizeof(float), n, fp, tmp);
    atomic_close(fp, tmp, path);
}

// Writes llm.c's version 5 (bf16) atomically from bf16 words, as llm.c's GPU trainer writes and
// reads them. Structured models have no bf16 format: their checkpoints are version 10 (fp32).
static inline void model_write_bf16(const char *path, const GPT2Config *c, const uint16_t *params, size_t n) {
    char tmp[1100];
    FILE *fp = atomic_open(path, tmp, sizeof(tmp));
    int header[256];
    model_header_fill(header, c, MODEL_VERSION_BF16);
    fwriteCheck(header, sizeof(int), 256, fp, tmp);
    fwriteCheck(params, sizeof(uint16_t), n, fp, tmp);
    atomic_close(fp, tmp, path);
}

// The same from fp32 weights, rounded to nearest even.
static inline void model_write_bf16_from_fp32(const char *path, const GPT2Config *c, const float *params, size_t n) {
    uint16_t *h = (uint16_t *)mallocCheck(n * sizeof(uint16_t) + 1);
    for (size_t i = 0; i < n; i++) h[i] = float_to_bf16(params[i]);
    model_write_bf16(path, c, h, n);
    free(h);
}

// ---------------------------------------------------------------------------------------------
// Resume state: everything besides the weights that a run needs to continue bit for bit.

typedef struct {
    int64_t step;             // number of optimizer steps done
    int64_t num_params;       // sanity check against the model
    int64_t rank, nproc;
    int64_t B, T, total_batch_size;
    int64_t dl_epoch, dl_shard_idx, dl_sample_idx;  // train dataloader position (next batch)
    uint64_t sample_rng;      // text sampling RNG
    int64_t has_master;       // 1: fp32 master weights follow m and v (the GPU trainer, whose model
                              // file holds the bf16 weights); 0: the model file is the master copy
    int64_t zero_stage;       // -z: with 1, m, v (and master) are this rank's slice: num_params of them
    int64_t n_kernels;        // bytes after the arrays: the GPU trainer's kernels per linear layer
                              // (structured/tune.cuh), so that -at 1 resumes with the same; 0: none
    uint64_t reserved[17];
    OutlierWindow loss_window, norm_window;  // -sl / -sg history (version 2 on)
} TrainState;
#define STATE_V1_BYTES offsetof(TrainState, loss_window)  // a version-1 file's TrainState

// master may be NULL (the model file is then the exact weights); else it is stored after m and v.
// Then the n_kernels bytes of kernels (NULL, 0: none). A file without them reads as n_kernels 0:
// the field was a reserved zero before.
static inline void state_write(const char *path, const TrainState *st_in, const float *m, const float *v, const float *master,
                               const uint8_t *kernels, int n_kernels) {
    TrainState stc = *st_in;
    const TrainState *st = &stc;
    stc.has_master = master != NULL;
    stc.n_kernels = kernels ? n_kernels : 0;
    char tmp[1100];
    FILE *fp = atomic_open(path, tmp, sizeof(tmp));
    int header[256] = {0};
    header[0] = STATE_MAGIC;
    header[1] = STATE_VERSION;
    fwriteCheck(header, sizeof(int), 256, fp, tmp);
    fwriteCheck(st, sizeof(TrainState), 1, fp, tmp);
    fwriteCheck(m, sizeof(float), (size_t)st->num_params, fp, tmp);
    fwriteCheck(v, sizeof(float), (size_t)st->num_params, fp, tmp);
    if (master) fwriteCheck(master, sizeof(float), (size_t)st->num_params, fp, tmp);
    if (stc.n_kernels) fwriteCheck(kernels, 1, (size_t)stc.n_kernels, fp, tmp);
    atomic_close(fp, tmp, path);
}

// Opens a state file and reads its header and TrainState; the file stays open at the arrays.
static inline FILE *state_open(const char *path, TrainState *st) {
    FILE *fp = fopenCheck(path, "rb");
    int header[256];
    freadCheck(header, sizeof(int), 256, fp, path);
    if (header[0] != STATE_MAGIC)
        fatal("'%s' is not a structgpt resume state (magic %d, expected %d)", path, header[0], STATE_MAGIC);
    if (header[1] != 1 && header[1] != STATE_VERSION)
        fatal("'%s' has state version %d; this build reads versions 1 and %d", path, header[1], STATE_VERSION);
    memset(st, 0, sizeof(*st));
    freadCheck(st, header[1] == 1 ? STATE_V1_BYTES : sizeof(TrainState), 1, fp, path);
    return fp;
}

// The TrainState of a state file without its arrays (to check ranks and -z before reading).
static inline void state_peek(const char *path, TrainState *st) { fcloseCheck(state_open(path, st), path); }

// Reads a state file; m and v (and master, when not NULL) must have room for expected_params
// floats, kernels (when not NULL) for kernels_cap bytes: a state holding kernels for another
// number of linear layers is an error. Returns 1 when the file held master weights (then in
// *master), else 0. st->n_kernels: how many kernel bytes the file held (read only into kernels).
static inline int state_read(const char *path, TrainState *st, float *m, float *v, float *master, size_t expected_params, uint8_t *kernels,
                             int kernels_cap) {
    FILE *fp = state_open(path, st);
    if (st->n_kernels < 0 || st->n_kernels > (1 << 20)) fatal("'%s': %lld kernel bytes is not a valid count; the file is corrupt", path, (long long)st->n_kernels);
    if (kernels && st->n_kernels && st->n_kernels != kernels_cap)
        fatal("'%s' holds the kernels of %lld linear layers, but this model has %d: resume with the model it was written for",
              path, (long long)st->n_kernels, kernels_cap);
    if ((size_t)st->num_params != expected_params)
        fatal("'%s' is for a model of %lld parameters but this model has %zu: resume with the same -e model/config",
              path, (long long)st->num_params, expected_params);
    freadCheck(m, sizeof(float), expected_params, fp, path);
    freadCheck(v, sizeof(float), expected_params, fp, path);
    int got_master = 0;
    if (st->has_master) {
        if (master) {
            freadCheck(master, sizeof(float), expected_params, fp, path);
            got_master = 1;
        } else if (fseek(fp, (long)(expected_params * sizeof(float)), SEEK_CUR) != 0) {
            fatal("'%s': cannot skip its master weights (%s)", path, strerror(errno));
        }
    }
    if (kernels && st->n_kernels) freadCheck(kernels, 1, (size_t)st->n_kernels, fp, path);
    fcloseCheck(fp, path);
    return got_master;
}

// The files of the checkpoint at `step`: the model (rank 0 writes it), each rank's resume state,
// and the DONE marker.
static inline void checkpoint_paths(const char *dir, long step, int rank, char *model, char *state, char *done, size_t cap) {
    snprintf(model, cap, "%s/model_%08ld.bin", dir, step);
    snprintf(state, cap, "%s/state_%08ld_%05d.bin", dir, step, rank);
    snprintf(done, cap, "%s/DONE_%08ld", dir, step);
}

// Latest step with a DONE_<step> marker in dir, or -1. A checkpoint only counts once its marker is
// written, which happens after the model and every state file are safely renamed into place.
static inline long find_latest_checkpoint(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    long best = -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long step;
        char tail;
        if (sscanf(e->d_name, "DONE_%ld%c", &step, &tail) == 1 && step > best) best = step;
    }
    closedir(d);
    return best;
}

static inline void ensure_dir(const char *dir) {
    char buf[1024];
    snprintf(buf, sizeof(buf), "%s", dir);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(buf, 0755);
            *p = '/';
        }
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) fatal("cannot create output directory '%s': %s", dir, strerror(errno));
    struct stat sb;
    if (stat(buf, &sb) != 0 || !S_ISDIR(sb.st_mode)) fatal("'%s' exists and is not a directory; choose another -o", dir);
}
