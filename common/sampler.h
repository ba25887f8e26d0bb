// sampler.h: text sampling shared by the trainers: a token drawn from the softmax of one row of
// logits, and its printing through the tokenizer.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include "rng.h"
#include "tokenizer.h"

// Softmax of probs[0..n) in place (they come in as logits), then the token whose cumulative
// probability first exceeds a uniform draw from rng.
static inline int sample_softmax(float *probs, int n, uint64_t *rng) {
    float maxv = -INFINITY, sum = 0.0f;
    for (int i = 0; i < n; i++) if (probs[i] > maxv) maxv = probs[i];
    for (int i = 0; i < n; i++) { probs[i] = expf(probs[i] - maxv); sum += probs[i]; }
    float coin = xorshift_f32(rng) * sum, cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) return i;
    }
    return n - 1;
}

static inline void print_token(const Tokenizer *tok, int id) {
    if (tok && tok->init_ok) {
        const char *piece = tokenizer_decode(tok, (unsigned)id);
        if (piece) safe_printf(piece);
    } else {
        printf("%d ", id);
    }
    fflush(stdout);
}
