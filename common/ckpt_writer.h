// ckpt_writer.h: checkpoints written in the background (-na 1): the trainer copies its weights and
// optimizer state into host buffers kept here (a snapshot: a fraction of a second), and training
// goes on while a thread writes, fsyncs and renames the files (seconds for GPT-2 124M). The files
// are byte for byte those of a synchronous write; the driver writes the DONE marker only once
// every rank's thread has finished.
#pragma once
#include <pthread.h>
#include <signal.h>
#include "checkpoint.h"

// One rank's files of a checkpoint, as host memory.
typedef struct {
    char model_path[1100];       // empty: this rank writes no model file
    int model_version;           // MODEL_VERSION_FP32 or _STRUCT_FP32 (fp32 words), _BF16 (bf16 words)
    GPT2Config config;
    const char *config_text;     // a structured model's config (the model's own, alive for the run), else NULL
    const void *model;           // n_model words
    size_t n_model;
    char state_path[1100];
    TrainState st;               // st.num_params: the length of m, v and master
    const float *m, *v, *master;  // master NULL: the state holds none
    const uint8_t *kernels;      // n_kernels bytes (the trainer's, alive for the run), or NULL
    int n_kernels;
} CkptFiles;

static inline void ckpt_files_write(const CkptFiles *f) {
    if (f->model_path[0]) {
        if (f->model_version == MODEL_VERSION_BF16) model_write_bf16(f->model_path, &f->config, (const uint16_t *)f->model, f->n_model);
        else model_write_fp32(f->model_path, &f->config, f->config_text, (const float *)f->model, f->n_model);
    }
    state_write(f->state_path, &f->st, f->m, f->v, f->master, f->kernels, f->n_kernels);
}

enum { CKPT_BUF_MODEL, CKPT_BUF_M, CKPT_BUF_V, CKPT_BUF_MASTER, CKPT_NUM_BUFS };

typedef struct {
    void *buf[CKPT_NUM_BUFS];    // the snapshot, kept from one checkpoint to the next
    size_t cap[CKPT_NUM_BUFS];
    CkptFiles files;
    pthread_t thread;
    int running;                 // a thread was started and has not been joined
    int done;                    // set by the thread once its files are in place (__atomic)
} CkptWriter;

// A snapshot buffer of at least `bytes` (its old contents are not kept).
static inline void *ckpt_buffer(CkptWriter *w, int slot, size_t bytes) {
    if (bytes > w->cap[slot]) {
        free(w->buf[slot]);
        w->buf[slot] = mallocCheck(bytes);
        w->cap[slot] = bytes;
    }
    return w->buf[slot];
}

static inline void *ckpt_writer_main(void *arg) {
    CkptWriter *w = (CkptWriter *)arg;
    sigset_t all;  // signals (a stop request) go to the training thread
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    ckpt_files_write(&w->files);  // an error ends the process with its message, as a synchronous write would
    __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

// Writes w->files on a new thread; the previous one must have been joined.
static inline void ckpt_writer_start(CkptWriter *w) {
    if (w->running) fatal("internal: a checkpoint write started before the previous one was joined");
    __atomic_store_n(&w->done, 0, __ATOMIC_RELEASE);
    int err = pthread_create(&w->thread, NULL, ckpt_writer_main, w);
    if (err) fatal("cannot start the checkpoint writer thread: %s; -na 0 writes checkpoints without one", strerror(err));
    w->running = 1;
}

// Whether the files are in place (nothing running counts as done).
static inline int ckpt_writer_done(const CkptWriter *w) { return !w->running || __atomic_load_n(&w->done, __ATOMIC_ACQUIRE); }

// Waits for the thread's files.
static inline void ckpt_writer_join(CkptWriter *w) {
    if (!w->running) return;
    int err = pthread_join(w->thread, NULL);
    if (err) fatal("cannot join the checkpoint writer thread: %s", strerror(err));
    w->running = 0;
}

static inline void ckpt_writer_free(CkptWriter *w) {
    ckpt_writer_join(w);
    for (int i = 0; i < CKPT_NUM_BUFS; i++) free(w->buf[i]);
    memset(w, 0, sizeof(*w));
}
