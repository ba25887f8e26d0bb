// params.h: parameters described as data: a table of named tensors (shape, offset into one flat
// buffer, learning-rate multiplier, weight-decay flag) that the optimizer, checkpoints, gradient
// norm and weight decay walk without knowing which model or structure produced them.
#pragma once
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include "utils.h"

#define PARAM_MAX_DIMS 4

typedef struct {
    char name[64];        // e.g. "h.3.qkvw"
    int ndim;
    size_t shape[PARAM_MAX_DIMS];
    size_t numel;
    size_t offset;        // in elements, into the flat parameter buffer
    float lr_mult;        // effective lr = lr * lr_mult
    int decay;            // weight decay applies (only >= 2-D weights)
} ParamTensor;

typedef struct {
    int n, cap;
    ParamTensor *t;
    size_t total;         // total number of elements
} ParamTable;

static inline void params_init(ParamTable *pt) { memset(pt, 0, sizeof(*pt)); }
static inline void params_free(ParamTable *pt) { free(pt->t); memset(pt, 0, sizeof(*pt)); }

// Appends a tensor; returns its index. Tensors are laid out in the order they are added.
static inline int params_add(ParamTable *pt, const char *name, int ndim, const size_t *shape, float lr_mult, int decay) {
    if (pt->n == pt->cap) {
        pt->cap = pt->cap ? 2 * pt->cap : 64;
        pt->t = (ParamTensor *)realloc(pt->t, pt->cap * sizeof(ParamTensor));
        if (!pt->t) fatal("out of memory building the parameter table");
    }
    ParamTensor *p = &pt->t[pt->n];
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "%s", name);
    p->ndim = ndim;
    p->numel = 1;
    for (int i = 0; i < ndim; i++) { p->shape[i] = shape[i]; p->numel *= shape[i]; }
    p->offset = pt->total;
    p->lr_mult = lr_mult;
    p->decay = decay;
    pt->total += p->numel;
    return pt->n++;
}

static inline int params_index(const ParamTable *pt, const char *name) {
    for (int i = 0; i < pt->n; i++) if (strcmp(pt->t[i].name, name) == 0) return i;
    return -1;
}

// A contiguous piece of the flat buffer, in elements.
typedef struct {
    size_t offset, count;
} ParamRange;

// The flat-buffer ranges of tensors idx[0..n), in ascending order, adjacent tensors merged into one
// range (out has room for n); returns how many.
static inline int params_ranges(const ParamTable *pt, const int *idx, int n, ParamRange *out) {
    int k = 0;
    for (int i = 0; i < n; i++) {  // insertion sort by offset: a handful of tensors
        ParamRange r = {pt->t[idx[i]].offset, pt->t[idx[i]].numel};
        int j = k++;
        while (j > 0 && out[j - 1].offset > r.offset) { out[j] = out[j - 1]; j--; }
        out[j] = r;
    }
    int m = 0;
    for (int i = 0; i < k; i++) {
        if (out[i].count == 0) continue;
        if (m > 0 && out[m - 1].offset + out[m - 1].count == out[i].offset) out[m - 1].count += out[i].count;
        else out[m++] = out[i];
    }
    return m;
}
