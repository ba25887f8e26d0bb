// rng.h: PyTorch-compatible CPU random numbers (mt19937, uniform, normal_) so that a model
// initialised here from seed 42 is bit-identical to llm.c's and to torch.manual_seed(42).
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define MT_N 624
#define MT_M 397

typedef struct {
    uint32_t state[MT_N];
    int index;
    // torch's normal_distribution<double> caches the second Box-Muller sample between calls
    int has_cached_normal;
    double cached_normal;
} mt19937_state;

static inline void mt_seed(mt19937_state *s, uint32_t seed) {
    s->state[0] = seed;
    for (int i = 1; i < MT_N; i++) {
        s->state[i] = 1812433253u * (s->state[i - 1] ^ (s->state[i - 1] >> 30)) + (uint32_t)i;
    }
    s->index = MT_N;  // regenerate on first draw
    s->has_cached_normal = 0;
    s->cached_normal = 0.0;
}

static inline void mt_twist(mt19937_state *s) {
    for (int i = 0; i < MT_N; i++) {
        uint32_t y = (s->state[i] & 0x80000000u) | (s->state[(i + 1) % MT_N] & 0x7fffffffu);
        uint32_t next = s->state[(i + MT_M) % MT_N] ^ (y >> 1);
        if (y & 1u) next ^= 0x9908b0dfu;
        s->state[i] = next;
    }
    s->index = 0;
}

static inline uint32_t mt_u32(mt19937_state *s) {
    if (s->index >= MT_N) mt_twist(s);
    uint32_t y = s->state[s->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

static inline uint64_t mt_u64(mt19937_state *s) {
    uint32_t hi = mt_u32(s);
    uint32_t lo = mt_u32(s);
    return ((uint64_t)hi << 32) | lo;
}

// uniform in [0, 1) with 24 random bits, as torch does for float tensors
static inline float mt_uniform_f32(mt19937_state *s) {
    return (float)(mt_u32(s) & ((1u << 24) - 1)) * (1.0f / (float)(1u << 24));
}

static inline double mt_uniform_f64(mt19937_state *s) {
    return (double)(mt_u64(s) & ((1ull << 53) - 1)) * (1.0 / (double)(1ull << 53));
}

static inline void mt_uniform_(float *data, size_t n, float lo, float hi, mt19937_state *s) {
    for (size_t i = 0; i < n; i++) data[i] = mt_uniform_f32(s) * (hi - lo) + lo;
}

// Box-Muller on 16 uniforms: the pairs (j, j+8) give two normals. This is torch's
// vectorised path for float tensors of 16 or more elements.
static inline void normal_fill_16(float *data, float mean, float std) {
    for (int j = 0; j < 8; j++) {
        float u1 = 1.0f - data[j];
        float u2 = data[j + 8];
        float radius = sqrtf(-2.0f * logf(u1));
        float theta = 2.0f * (float)M_PI * u2;
        data[j] = radius * cosf(theta) * std + mean;
        data[j + 8] = radius * sinf(theta) * std + mean;
    }
}

// torch.Tensor.normal_(mean, std) on a float32 CPU tensor of n elements.
static inline void mt_normal_(float *data, size_t n, float mean, float std, mt19937_state *s) {
    if (n >= 16) {
        for (size_t i = 0; i < n; i++) data[i] = mt_uniform_f32(s);
        for (size_t i = 0; i + 16 <= n; i += 16) normal_fill_16(data + i, mean, std);
        if (n % 16 != 0) {
            // torch redraws the last 16 elements so that the tail gets a full Box-Muller block
            float *tail = data + n - 16;
            for (int i = 0; i < 16; i++) tail[i] = mt_uniform_f32(s);
            normal_fill_16(tail, mean, std);
        }
        return;
    }
    // small tensors: one double-precision normal per element, with the spare sample cached
    for (size_t i = 0; i < n; i++) {
        double z;
        if (s->has_cached_normal) {
            z = s->cached_normal;
            s->has_cached_normal = 0;
        } else {
            double u1 = mt_uniform_f64(s);
            double u2 = mt_uniform_f64(s);
            double r = sqrt(-2.0 * log1p(-u2));
            double theta = 2.0 * M_PI * u1;
            s->cached_normal = r * sin(theta);
            s->has_cached_normal = 1;
            z = r * cos(theta);
        }
        data[i] = (float)(z * std + mean);
    }
}

// xorshift* for sampling text: tiny state that fits in the resume file.
static inline uint32_t xorshift_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static inline float xorshift_f32(uint64_t *state) {  // [0, 1)
    return (xorshift_u32(state) >> 8) / 16777216.0f;
}
