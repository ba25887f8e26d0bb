// outlier.h: the z-score of each step's loss and gradient norm against the previous steps' (for
// -sl / -sg, llm.c's flags: skip the update of a step whose value is an outlier).
#pragma once
#include <math.h>
#include <stdint.h>

// llm.c's window: a step is compared with the 100 before it.
#define OUTLIER_WINDOW 100

// The last OUTLIER_WINDOW values, in a ring; `count` is how many were ever pushed. Plain data, so
// that the resume state stores it as is and a resumed run decides exactly as an unbroken one.
typedef struct {
    double values[OUTLIER_WINDOW];
    int64_t count;
} OutlierWindow;

// The z-score of x against the window's values (population standard deviation), NAN while fewer
// than OUTLIER_WINDOW values have been seen; then x joins the window. Every value joins it, the
// skipped ones too: a window that refused outliers would refuse a lasting change of level forever.
// Mean and variance are summed afresh in slot order each time (100 adds): no drift, and the same
// bits after a resume.
static inline double outlier_push(OutlierWindow *w, double x) {
    double z = NAN;
    if (w->count >= OUTLIER_WINDOW) {
        double sum = 0.0;
        for (int i = 0; i < OUTLIER_WINDOW; i++) sum += w->values[i];
        double mean = sum / OUTLIER_WINDOW, ss = 0.0;
        for (int i = 0; i < OUTLIER_WINDOW; i++) ss += (w->values[i] - mean) * (w->values[i] - mean);
        double sd = sqrt(ss / OUTLIER_WINDOW);
        if (sd > 0.0) z = (x - mean) / sd;
        else z = x == mean ? 0.0 : (x > mean ? INFINITY : -INFINITY);  // a constant window
    }
    w->values[w->count % OUTLIER_WINDOW] = x;
    w->count++;
    return z;
}

// Whether a z-score trips a -sl / -sg threshold (0: off). NAN (window not full) never does.
static inline int outlier_trips(double z, float threshold) { return threshold > 0.0f && z > threshold; }
