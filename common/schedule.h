// schedule.h: learning-rate schedules (cosine, linear, constant, warmup-stable-decay), all with linear warmup.
#pragma once
#include <math.h>
#include <string.h>

typedef enum { LR_COSINE, LR_LINEAR, LR_CONSTANT, LR_WSD } LRScheduleType;

// min_lr = max_lr * final_frac. decay_frac is used by LR_WSD only: the decay phase is the last
// decay_frac of total_steps; <= 0 means "unset" and gives the default 0.2, so that a zeroed
// struct is usable (use LR_CONSTANT for no decay at all).
typedef struct { LRScheduleType type; float max_lr; int warmup_steps; int total_steps; float final_frac; float decay_frac; } LRSchedule;

#define LR_WSD_DEFAULT_DECAY_FRAC 0.2f

static inline int lr_schedule_type_from_name(const char *name, LRScheduleType *out) {
    if (name == NULL) return 0;
    if (strcmp(name, "cosine") == 0) { *out = LR_COSINE; return 1; }
    if (strcmp(name, "linear") == 0) { *out = LR_LINEAR; return 1; }
    if (strcmp(name, "constant") == 0) { *out = LR_CONSTANT; return 1; }
    if (strcmp(name, "wsd") == 0) { *out = LR_WSD; return 1; }
    return 0;
}

static inline const char *lr_schedule_name(LRScheduleType t) {
    switch (t) {
        case LR_COSINE: return "cosine";
        case LR_LINEAR: return "linear";
        case LR_CONSTANT: return "constant";
        case LR_WSD: return "wsd";
    }
    return "unknown";
}

// Fraction of the way from `start` to `end` at `step`, clamped to [0,1]; an empty span
// (end <= start) counts as already finished rather than dividing by zero.
static inline double lr_span_ratio(int step, int start, int end) {
    if (end <= start) return step >= start ? 1.0 : 0.0;
    double r = (double)(step - start) / (double)(end - start);
    return r < 0.0 ? 0.0 : (r > 1.0 ? 1.0 : r);
}

static inline float lr_schedule_get(const LRSchedule *s, int step) {
    double max_lr = s->max_lr;
    double min_lr = max_lr * s->final_frac;
    int warmup = s->warmup_steps > 0 ? s->warmup_steps : 0;
    int total = s->total_steps;
    if (step < warmup) return (float)(max_lr * (double)(step + 1) / (double)warmup);
    switch (s->type) {
        case LR_CONSTANT:
            return (float)max_lr;
        case LR_LINEAR: {
            double r = lr_span_ratio(step, warmup, total);
            return (float)(min_lr + (1.0 - r) * (max_lr - min_lr));
        }
        case LR_WSD: {
            double frac = s->decay_frac > 0.0f ? s->decay_frac : LR_WSD_DEFAULT_DECAY_FRAC;
            if (frac > 1.0) frac = 1.0;
            int decay_start = total - (int)lround(frac * (double)total);
            if (decay_start < warmup) decay_start = warmup;
            if (step < decay_start) return (float)max_lr;
            double r = lr_span_ratio(step, decay_start, total);
            return (float)(min_lr + (1.0 - sqrt(r)) * (max_lr - min_lr));
        }
        case LR_COSINE:
        default: {
            double r = lr_span_ratio(step, warmup, total);
            return (float)(min_lr + 0.5 * (1.0 + cos(3.14159265358979323846 * r)) * (max_lr - min_lr));
        }
    }
}
