// tests/cuda_sim/cudnn_attention_sim.cpp: a stand-in for cuDNN behind cuda/cudnn_attention.h, so
// that the GPU trainer's -fa 2 path (allocation, per-layer logsumexp, dispatch, sampling's shapes,
// resume) runs on the CPU simulator, where device memory is host memory and launches finish before
// they return. It is written from the header's contract alone, in plain loops: every tensor is
// addressed through cudnn_attention_layout, as the real graphs see them; the forward writes the
// output and the natural-log logsumexp of the scaled causal scores; the backward recomputes the
// probabilities from that logsumexp (so it is wrong unless the caller hands back the forward's
// stats) and overwrites all of dqkv. Like cuDNN it refuses head sizes that are not a multiple of 8
// or exceed 256, and is deterministic. Nothing here says anything about cuDNN itself: that is
// tests/test_cudnn_graph.cpp's (without a GPU) and test_gpt2cu's -fa 2 runs (on one).
#include "cuda/cudnn_attention.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace {

float bf16_to_f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
uint16_t f_to_bf16(float f) {  // round to nearest even (no NaN inputs here)
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// element (b, h, t, d) of a tensor laid out as the graphs see it
size_t at(const CudnnAttLayout &l, int b, int h, int t, int d) {
    return (size_t)(l.offset + b * l.stride[0] + h * l.stride[1] + t * l.stride[2] + d * l.stride[3]);
}

struct Views {
    CudnnAttLayout q, k, v, o, s;
    Views(int B, int T, int NH, int HS)
        : q(cudnn_attention_layout(CUDNN_ATT_Q, B, T, NH, HS)), k(cudnn_attention_layout(CUDNN_ATT_K, B, T, NH, HS)),
          v(cudnn_attention_layout(CUDNN_ATT_V, B, T, NH, HS)), o(cudnn_attention_layout(CUDNN_ATT_OUT, B, T, NH, HS)),
          s(cudnn_attention_layout(CUDNN_ATT_STATS, B, T, NH, HS)) {}
};

// scale · q_t · k_j in fp32 from the bf16 inputs
float score(const uint16_t *qkv, const Views &w, int b, int h, int t, int j, int HS, float scale) {
    float acc = 0.0f;
    for (int d = 0; d < HS; d++) acc += bf16_to_f(qkv[at(w.q, b, h, t, d)]) * bf16_to_f(qkv[at(w.k, b, h, j, d)]);
    return acc * scale;
}

}  // namespace

int cudnn_attention_prepare(int B, int T, int NH, int HS, char *why, size_t why_len) {
    const int ok = B > 0 && T > 0 && NH > 0 && HS % 8 == 0 && HS > 0 && HS <= 256;
    if (why && why_len) snprintf(why, why_len, "%s", ok ? "" : "simulated cuDNN: head size must be a multiple of 8, at most 256");
    return ok;
}

int cudnn_attention_deterministic(void) { return 1; }

void cudnn_attention_forward(void *out, float *stats, const void *qkv_, int B, int T, int NH, int HS) {
    const uint16_t *qkv = (const uint16_t *)qkv_;
    uint16_t *o = (uint16_t *)out;
    const Views w(B, T, NH, HS);
    const float scale = 1.0f / sqrtf((float)HS);
    std::vector<float> s(T), acc(HS);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                float m = -INFINITY, sum = 0.0f;
                for (int j = 0; j <= t; j++) m = fmaxf(m, s[j] = score(qkv, w, b, h, t, j, HS, scale));
                for (int j = 0; j <= t; j++) sum += expf(s[j] - m);
                const float lse = m + logf(sum);
                stats[at(w.s, b, h, t, 0)] = lse;
                for (int d = 0; d < HS; d++) acc[d] = 0.0f;
                for (int j = 0; j <= t; j++) {
                    const float p = expf(s[j] - lse);
                    for (int d = 0; d < HS; d++) acc[d] += p * bf16_to_f(qkv[at(w.v, b, h, j, d)]);
                }
                for (int d = 0; d < HS; d++) o[at(w.o, b, h, t, d)] = f_to_bf16(acc[d]);
            }
}

void cudnn_attention_backward(void *dqkv_, const void *dout_, const void *qkv_, const void *out_, const float *stats, int B, int T, int NH,
                              int HS) {
    const uint16_t *qkv = (const uint16_t *)qkv_, *dout = (const uint16_t *)dout_, *out = (const uint16_t *)out_;
    uint16_t *dqkv = (uint16_t *)dqkv_;
    const Views w(B, T, NH, HS);
    const float scale = 1.0f / sqrtf((float)HS);
    std::vector<float> dq((size_t)T * HS), dk((size_t)T * HS), dv((size_t)T * HS);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            std::fill(dq.begin(), dq.end(), 0.0f);
            std::fill(dk.begin(), dk.end(), 0.0f);
            std::fill(dv.begin(), dv.end(), 0.0f);
            for (int t = 0; t < T; t++) {
                const float lse = stats[at(w.s, b, h, t, 0)];
                float D = 0.0f;  // Σ_d dO·O = Σ_j P dP
                for (int d = 0; d < HS; d++) D += bf16_to_f(dout[at(w.o, b, h, t, d)]) * bf16_to_f(out[at(w.o, b, h, t, d)]);
                for (int j = 0; j <= t; j++) {
                    const float p = expf(score(qkv, w, b, h, t, j, HS, scale) - lse);
                    float dp = 0.0f;
                    for (int d = 0; d < HS; d++) dp += bf16_to_f(dout[at(w.o, b, h, t, d)]) * bf16_to_f(qkv[at(w.v, b, h, j, d)]);
                    const float ds = p * (dp - D) * scale;
                    for (int d = 0; d < HS; d++) {
                        dq[(size_t)t * HS + d] += ds * bf16_to_f(qkv[at(w.k, b, h, j, d)]);
                        dk[(size_t)j * HS + d] += ds * bf16_to_f(qkv[at(w.q, b, h, t, d)]);
                        dv[(size_t)j * HS + d] += p * bf16_to_f(dout[at(w.o, b, h, t, d)]);
                    }
                }
            }
            for (int t = 0; t < T; t++)
                for (int d = 0; d < HS; d++) {
                    dqkv[at(w.q, b, h, t, d)] = f_to_bf16(dq[(size_t)t * HS + d]);
                    dqkv[at(w.k, b, h, t, d)] = f_to_bf16(dk[(size_t)t * HS + d]);
                    dqkv[at(w.v, b, h, t, d)] = f_to_bf16(dv[(size_t)t * HS + d]);
                }
        }
}

size_t cudnn_attention_workspace_bytes(void) { return 0; }

void cudnn_attention_destroy(void) {}
