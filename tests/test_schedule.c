// test_schedule.c: learning-rate schedules against hand-computed values, monotonicity and edge cases.
#include <math.h>
#include <stdio.h>
#include "common/schedule.h"
#include "tests/check.h"

static void expect_lr(const LRSchedule *s, int step, float want, const char *name) {
    float got = lr_schedule_get(s, step);
    char nm[160];
    snprintf(nm, sizeof(nm), "%s, step %d: %.6g", name, step, want);
    check_close(&got, &want, 1, 1e-9f, 1e-5f, nm);
}

static int non_increasing_after(const LRSchedule *s, int from, int to) {
    for (int t = from + 1; t <= to; t++) {
        if (lr_schedule_get(s, t) > lr_schedule_get(s, t - 1)) return 0;
    }
    return 1;
}

int main(void) {
    LRScheduleType ty;
    check_true(lr_schedule_type_from_name("cosine", &ty) && ty == LR_COSINE, "name: cosine", NULL);
    check_true(lr_schedule_type_from_name("linear", &ty) && ty == LR_LINEAR, "name: linear", NULL);
    check_true(lr_schedule_type_from_name("constant", &ty) && ty == LR_CONSTANT, "name: constant", NULL);
    check_true(lr_schedule_type_from_name("wsd", &ty) && ty == LR_WSD, "name: wsd", NULL);
    check_true(!lr_schedule_type_from_name("cosin", &ty) && !lr_schedule_type_from_name("", &ty), "name: unknown returns 0", NULL);
    int roundtrip = 1;
    for (int i = LR_COSINE; i <= LR_WSD; i++) {
        roundtrip &= lr_schedule_type_from_name(lr_schedule_name((LRScheduleType)i), &ty) && ty == (LRScheduleType)i;
    }
    check_true(roundtrip, "name: lr_schedule_name round-trips", NULL);

    LRSchedule s;
    s.max_lr = 1e-3f; s.warmup_steps = 10; s.total_steps = 110; s.final_frac = 0.1f; s.decay_frac = 0.0f;

    s.type = LR_COSINE;
    expect_lr(&s, 0, 1e-4f, "cosine");
    expect_lr(&s, 4, 5e-4f, "cosine");
    expect_lr(&s, 9, 1e-3f, "cosine");
    expect_lr(&s, 10, 1e-3f, "cosine");
    expect_lr(&s, 35, 1e-4f + 0.5f * (1.0f + (float)cos(M_PI * 0.25)) * 9e-4f, "cosine");
    expect_lr(&s, 60, 5.5e-4f, "cosine");
    expect_lr(&s, 110, 1e-4f, "cosine");
    expect_lr(&s, 500, 1e-4f, "cosine (past the end stays at min)");
    check_true(non_increasing_after(&s, 10, 200), "cosine: non-increasing after warmup", NULL);

    s.type = LR_LINEAR;
    expect_lr(&s, 0, 1e-4f, "linear");
    expect_lr(&s, 9, 1e-3f, "linear");
    expect_lr(&s, 10, 1e-3f, "linear");
    expect_lr(&s, 35, 1e-4f + 0.75f * 9e-4f, "linear");
    expect_lr(&s, 60, 5.5e-4f, "linear");
    expect_lr(&s, 110, 1e-4f, "linear");
    check_true(non_increasing_after(&s, 10, 200), "linear: non-increasing after warmup", NULL);

    s.type = LR_CONSTANT;
    expect_lr(&s, 0, 1e-4f, "constant (warmup applies)");
    expect_lr(&s, 10, 1e-3f, "constant");
    expect_lr(&s, 109, 1e-3f, "constant (final_frac ignored)");
    expect_lr(&s, 1000, 1e-3f, "constant");

    // wsd, total 110, default decay_frac 0.2: decay starts at 110 - 22 = 88
    s.type = LR_WSD;
    expect_lr(&s, 0, 1e-4f, "wsd");
    expect_lr(&s, 10, 1e-3f, "wsd stable");
    expect_lr(&s, 87, 1e-3f, "wsd stable up to the decay");
    expect_lr(&s, 88, 1e-3f, "wsd decay start (r=0)");
    expect_lr(&s, 93, 1e-4f + (1.0f - sqrtf(5.0f / 22.0f)) * 9e-4f, "wsd");
    expect_lr(&s, 99, 1e-4f + (1.0f - sqrtf(0.5f)) * 9e-4f, "wsd");
    expect_lr(&s, 110, 1e-4f, "wsd end");
    int stable = 1;
    for (int t = 10; t < 88; t++) stable &= lr_schedule_get(&s, t) == 1e-3f;
    check_true(stable, "wsd: exactly max_lr through the stable phase", NULL);
    check_true(lr_schedule_get(&s, 89) < 1e-3f, "wsd: decaying right after the decay start", NULL);
    check_true(non_increasing_after(&s, 10, 200), "wsd: non-increasing after warmup", NULL);
    s.decay_frac = 0.5f;  // decay from 55 to 110
    expect_lr(&s, 54, 1e-3f, "wsd decay_frac 0.5 stable");
    expect_lr(&s, 55, 1e-3f, "wsd decay_frac 0.5 start");
    expect_lr(&s, 66, 1e-4f + (1.0f - sqrtf(0.2f)) * 9e-4f, "wsd decay_frac 0.5");
    s.decay_frac = 0.95f;  // would start at 5, inside warmup: starts at warmup end (10) instead
    expect_lr(&s, 9, 1e-3f, "wsd decay not before warmup");
    expect_lr(&s, 60, 1e-4f + (1.0f - sqrtf(0.5f)) * 9e-4f, "wsd decay clipped to warmup");
    s.decay_frac = 0.0f;

    // edge cases: no warmup, and total <= warmup must not divide by zero
    s.warmup_steps = 0; s.type = LR_COSINE;
    expect_lr(&s, 0, 1e-3f, "cosine no warmup");
    s.warmup_steps = 10; s.total_steps = 10;
    int finite = 1;
    for (int i = LR_COSINE; i <= LR_WSD; i++) {
        s.type = (LRScheduleType)i;
        for (int t = 0; t < 30; t++) finite &= isfinite(lr_schedule_get(&s, t)) && lr_schedule_get(&s, t) > 0.0f;
    }
    check_true(finite, "total == warmup: every schedule finite and positive", NULL);
    s.total_steps = 5; s.type = LR_COSINE;
    expect_lr(&s, 9, 1e-3f, "total < warmup: warmup still reaches max");
    expect_lr(&s, 10, 1e-4f, "total < warmup: after warmup at min");
    s.final_frac = 0.0f; s.total_steps = 110; s.type = LR_LINEAR;
    expect_lr(&s, 110, 0.0f, "linear final_frac 0 ends at 0");

    return test_summary();
}
