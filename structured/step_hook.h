// structured/step_hook.h: where the steps inside a structured layer begin (st_step), for -pt 2's
// breakdown (common/step_profile.h's prof_mark_step); nothing unless a trainer sets the hook.
// Header-only C11 that also compiles as CUDA C++.
#pragma once

// The trainer's mark (NULL: none). A step lasts until the next mark: the next step's, or the next
// part's of the training step.
static void (*g_st_step_hook)(const char *step) = 0;

static inline void st_step(const char *step) {
    if (g_st_step_hook) g_st_step_hook(step);
}
