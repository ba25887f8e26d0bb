// utils.h: checked wrappers for libc calls (file and line in every error) and small helpers.
#pragma once
#include <errno.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

// Print "error: ..." to stderr and exit(1). Every user-caused failure ends here, so the
// message must name the file, flag or value and say what to do.
static inline void fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(EXIT_FAILURE);
}

// Whether `name` is one of the comma-separated entries of `list` (command-line lists: structured_layers'
// -k and -x, test_gpt2cu's --units).
static inline int list_has(const char *list, const char *name) {
    const size_t n = strlen(name);
    for (const char *p = strstr(list, name); p; p = strstr(p + 1, name))
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) return 1;
    return 0;
}

static inline FILE *fopen_check(const char *path, const char *mode, const char *file, int line) {
    FILE *fp = fopen(path, mode);
    if (fp == NULL) {
        fprintf(stderr, "error: cannot open '%s' (mode %s): %s\n  (at %s:%d) check that the path exists and is readable/writable\n",
                path, mode, strerror(errno), file, line);
        exit(EXIT_FAILURE);
    }
    return fp;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

// fread that distinguishes a short (truncated) file from an I/O error. `what` names the
// thing being read, e.g. the file path, for the message.
static inline void fread_check(void *ptr, size_t size, size_t n, FILE *fp, const char *what, const char *file, int line) {
    size_t got = fread(ptr, size, n, fp);
    if (got != n) {
        if (feof(fp)) {
            fprintf(stderr, "error: '%s' is truncated: wanted %zu items of %zu bytes, got %zu\n  (at %s:%d) the file is incomplete or corrupt; re-create it\n",
                    what, n, size, got, file, line);
        } else {
            fprintf(stderr, "error: reading '%s' failed: %s (at %s:%d)\n", what, strerror(errno), file, line);
        }
        exit(EXIT_FAILURE);
    }
}
#define freadCheck(ptr, size, n, fp, what) fread_check(ptr, size, n, fp, what, __FILE__, __LINE__)

static inline void fwrite_check(const void *ptr, size_t size, size_t n, FILE *fp, const char *what, const char *file, int line) {
    if (fwrite(ptr, size, n, fp) != n) {
        fprintf(stderr, "error: writing '%s' failed: %s (at %s:%d) is the disk full?\n", what, strerror(errno), file, line);
        exit(EXIT_FAILURE);
    }
}
#define fwriteCheck(ptr, size, n, fp, what) fwrite_check(ptr, size, n, fp, what, __FILE__, __LINE__)

static inline void fseek_check(FILE *fp, long off, int whence, const char *what, const char *file, int line) {
    if (fseek(fp, off, whence) != 0) {
        fprintf(stderr, "error: seek in '%s' to %ld failed: %s (at %s:%d)\n", what, off, strerror(errno), file, line);
        exit(EXIT_FAILURE);
    }
}
#define fseekCheck(fp, off, whence, what) fseek_check(fp, off, whence, what, __FILE__, __LINE__)

static inline void fclose_check(FILE *fp, const char *what, const char *file, int line) {
    if (fclose(fp) != 0) {
        fprintf(stderr, "error: closing '%s' failed: %s (at %s:%d)\n", what, strerror(errno), file, line);
        exit(EXIT_FAILURE);
    }
}
#define fcloseCheck(fp, what) fclose_check(fp, what, __FILE__, __LINE__)

// Large buffers (parameters, gradients, AdamW moments, activations) ask for transparent huge
// pages where the kernel gives them only on request (THP "madvise" mode): the first touch of
// a 2 MB page costs one fault instead of 512, which makes a GPT-2 124M CPU run's first step
// about 1.8x faster. The aligned middle of the block is advised; free() is unchanged.
#define HUGE_ADVISE_MIN ((size_t)8 << 20)
static inline void advise_huge(void *p, size_t size) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t page = (uintptr_t)2 << 20, lo = ((uintptr_t)p + page - 1) & ~(page - 1), hi = ((uintptr_t)p + size) & ~(page - 1);
    if (size >= HUGE_ADVISE_MIN && hi > lo) (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);  // a hint: failure is harmless
#else
    (void)p, (void)size;
#endif
}

static inline void *malloc_check(size_t size, const char *file, int line) {
    void *p = malloc(size);
    if (p == NULL && size > 0) {
        fprintf(stderr, "error: out of memory allocating %zu bytes (at %s:%d); try a smaller -b or -t\n", size, file, line);
        exit(EXIT_FAILURE);
    }
    advise_huge(p, size);
    return p;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

static inline void *calloc_check(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n, size);
    if (p == NULL && n > 0 && size > 0) {
        fprintf(stderr, "error: out of memory allocating %zu x %zu bytes (at %s:%d); try a smaller -b or -t\n", n, size, file, line);
        exit(EXIT_FAILURE);
    }
    advise_huge(p, n * size);
    return p;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

static inline void *realloc_check(void *old, size_t size, const char *file, int line) {
    void *p = realloc(old, size);
    if (p == NULL && size > 0) {
        fprintf(stderr, "error: out of memory growing a buffer to %zu bytes (at %s:%d)\n", size, file, line);
        exit(EXIT_FAILURE);
    }
    return p;
}
#define reallocCheck(old, size) realloc_check(old, size, __FILE__, __LINE__)

// Atomic file writes: write to "<path>.tmp", then atomic_close() fsyncs and renames over
// <path>, so a crash mid-write never leaves a damaged file where a good one was.
static inline FILE *atomic_open(const char *path, char *tmp_path, size_t tmp_cap) {
    int n = snprintf(tmp_path, tmp_cap, "%s.tmp", path);
    if (n < 0 || (size_t)n >= tmp_cap) fatal("output path too long: '%s'", path);
    return fopenCheck(tmp_path, "wb");
}
static inline void atomic_close(FILE *fp, const char *tmp_path, const char *path) {
    if (fflush(fp) != 0 || fsync(fileno(fp)) != 0) {
        fatal("flushing '%s' failed: %s; is the disk full? '%s' was left untouched", tmp_path, strerror(errno), path);
    }
    fcloseCheck(fp, tmp_path);
    if (rename(tmp_path, path) != 0) {
        fatal("renaming '%s' to '%s' failed: %s", tmp_path, path, strerror(errno));
    }
}

// Wall-clock seconds from a monotonic clock, for step timings.
static inline double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
