// logger.h: llm.c-style main.log writer (one "s:<step> key:value ..." line per event) and the
// run.txt beside it, rank 0 only.
#pragma once
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include "utils.h"
#include "../structured/routing.h"

typedef struct { int active; char path[1024]; char dir[1024]; } Logger;

// mkdir -p: creates every missing component; fatal if one exists as a non-directory or
// cannot be created, because losing the whole log silently is worse than stopping at start.
static inline void logger_mkdir_p(const char *dir) {
    char buf[1024];
    size_t len = strlen(dir);
    if (len >= sizeof(buf)) fatal("log directory path is too long (%zu chars): '%s'; choose a shorter -o", len, dir);
    memcpy(buf, dir, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] != '/' && buf[i] != '\0') continue;
        char saved = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
            fatal("cannot create log directory '%s' (at '%s'): %s; choose a writable -o directory", dir, buf, strerror(errno));
        }
        buf[i] = saved;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        fatal("log directory '%s' exists but is not a directory; choose another -o", dir);
    }
}

static inline void logger_init(Logger *l, const char *log_dir, int rank, int resume) {
    l->active = 0;
    l->path[0] = '\0';
    if (log_dir == NULL || log_dir[0] == '\0' || rank != 0) return;
    logger_mkdir_p(log_dir);
    int n = snprintf(l->path, sizeof(l->path), "%s/main.log", log_dir);
    if (n < 0 || (size_t)n >= sizeof(l->path) || strlen(log_dir) >= sizeof(l->dir) - 16)
        fatal("log path '%s/main.log' is too long; choose a shorter -o", log_dir);
    snprintf(l->dir, sizeof(l->dir), "%s", log_dir);
    // Open once now, so an unwritable log fails at startup rather than after the first step.
    FILE *fp = fopenCheck(l->path, resume ? "a" : "w");
    fcloseCheck(fp, l->path);
    l->active = 1;
}

// Opens, appends and closes on every line, so a crash loses at most the line being written.
static inline void logger_append_path(const char *path, const char *text) {
    FILE *fp = fopenCheck(path, "a");
    if (fputs(text, fp) == EOF || fflush(fp) != 0) {
        fatal("writing '%s' failed: %s; is the disk full?", path, strerror(errno));
    }
    fcloseCheck(fp, path);
}

static inline void logger_append(Logger *l, const char *line) {
    if (l->active) logger_append_path(l->path, line);
}

// Appends text to run.txt beside main.log: what the run is (train_main.h's write_run_info).
static inline void logger_append_run_info(Logger *l, const char *text) {
    if (!l->active) return;
    char path[1100];
    snprintf(path, sizeof(path), "%s/run.txt", l->dir);
    logger_append_path(path, text);
}

static inline void logger_log_val(Logger *l, int step, float val_loss) {
    char line[128];
    snprintf(line, sizeof(line), "s:%d tel:%.4f\n", step, val_loss);
    logger_append(l, line);
}

static inline void logger_log_eval(Logger *l, int step, float eval_acc) {
    char line[128];
    snprintf(line, sizeof(line), "s:%d eval:%.4f\n", step, eval_acc);
    logger_append(l, line);
}

// routing is NULL for a model without BTT-MoE layers, whose lines keep llm.c's format; else the
// line also has its aux loss, balance term and expert loads (routing.h), "aux:nan" when broken.
static inline void logger_log_train(Logger *l, int step, float train_loss, float lr, float grad_norm,
                                    const MoERouting *routing, float tokens_per_s) {
    char line[256];
    if (routing) {
        snprintf(line, sizeof(line), "s:%d trl:%.4f lr:%.6f norm:%.2f aux:%.4f bal:%.4f lmax:%.3f lmin:%.3f tok/s:%.0f\n",
                 step, train_loss, lr, grad_norm, routing->aux, routing->balance, routing->load_max, routing->load_min,
                 tokens_per_s);
    } else {
        snprintf(line, sizeof(line), "s:%d trl:%.4f lr:%.6f norm:%.2f tok/s:%.0f\n",
                 step, train_loss, lr, grad_norm, tokens_per_s);
    }
    logger_append(l, line);
}
