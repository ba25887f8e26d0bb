// train_gpt2.c: GPT-2 training on the CPU in fp32 with OpenMP (and a CBLAS when built with one):
// the readable reference implementation of structgpt. llm.c's model, files and flags.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef OMP
#include <omp.h>
#endif
#ifdef USE_CBLAS
#include <cblas.h>
#endif
#include "common/args.h"
#include "common/checkpoint.h"
#include "common/ckpt_writer.h"
#include "common/config.h"
#include "common/dataloader.h"
#include "common/gpt2.h"
#include "common/logger.h"
#include "common/multiproc.h"
#include "common/rng.h"
#include "common/sampler.h"
#include "common/schedule.h"
#include "common/step_profile.h"
#include "common/tokenizer.h"
#include "common/utils.h"
#include "common/zero.h"
#include "structured/btt.h"
#include "structured/monarch.h"
#include "structured/moe.h"

// ----------------------------------------------------------------------------------------------
// Kernels. Shapes: B batch, T time, C channels, OC output channels, NH heads, Vp padded vocab.

// e^x in plain arithmetic so that loops calling it vectorize (libm's expf/tanhf are scalar calls):
// x = n ln2 + r with |r| <= ln2/2, a degree-7 series for e^r, 2^n put in the exponent bits.
// Relative error ~2e-7 over [-87, 88]; inputs outside are clamped (e^-87 ~ 1.6e-38).
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    return p * s.f;
}

// tanh(u) as an odd rational function u P(u^2) / Q(u^2) (minimax, a few ulp) on |u| <= 7.905, where
// float tanh reaches +-1; relative accuracy holds near 0 too, unlike 1 - 2 / (e^{2u} + 1).
static inline float fast_tanhf(float u) {
    u = u < -7.90531110763549805f ? -7.90531110763549805f : (u > 7.90531110763549805f ? 7.90531110763549805f : u);
    float u2 = u * u;
    float p = -2.76076847742355e-16f;
    p = p * u2 + 2.00018790482477e-13f;
    p = p * u2 - 8.60467152213735e-11f;
    p = p * u2 + 5.12229709037114e-08f;
    p = p * u2 + 1.48572235717979e-05f;
    p = p * u2 + 6.37261928875436e-04f;
    p = p * u2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * u2 + 1.18534705686654e-04f;
    q = q * u2 + 2.26843463243900e-03f;
    q = q * u2 + 4.89352518554385e-03f;
    return u * p / q;
}

void encoder_forward(float *out, const int *inp, const float *wte, const float *wpe, int B, int T, int C) {
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *we = wte + (size_t)inp[b * T + t] * C, *pe = wpe + (size_t)t * C;
            for (int i = 0; i < C; i++) o[i] = we[i] + pe[i];
        }
    }
}

// Serial on purpose: tokens repeat within a batch, and a fixed summation order keeps runs deterministic.
void encoder_backward(float *dwte, float *dwpe, const float *dout, const int *inp, int B, int T, int C) {
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            const float *d = dout + ((size_t)b * T + t) * C;
            float *dwe = dwte + (size_t)inp[b * T + t] * C, *dpe = dwpe + (size_t)t * C;
            for (int i = 0; i < C; i++) { dwe[i] += d[i]; dpe[i] += d[i]; }
        }
    }
}

// LayerNorm over C per row, eps 1e-5, biased variance; mean and 1/std kept for the backward.
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *bias, int N, int C) {
#pragma omp parallel for
    for (int r = 0; r < N; r++) {
        const float *x = inp + (size_t)r * C;
        float m = 0.0f;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        float v = 0.0f;
        for (int i = 0; i < C; i++) { float d = x[i] - m; v += d * d; }
        v /= C;
        float s = 1.0f / sqrtf(v + 1e-5f);
        float *o = out + (size_t)r * C;
        for (int i = 0; i < C; i++) o[i] = (s * (x[i] - m)) * w[i] + bias[i];
        mean[r] = m;
        rstd[r] = s;
    }
}

// dinp is accumulated into (it is the residual stream's gradient); dw, db likewise.
void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                        const float *mean, const float *rstd, int N, int C) {
#pragma omp parallel for
    for (int r = 0; r < N; r++) {
        const float *d = dout + (size_t)r * C, *x = inp + (size_t)r * C;
        float m = mean[r], s = rstd[r];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int i = 0; i < C; i++) {
            float n = (x[i] - m) * s, dn = w[i] * d[i];
            dnorm_mean += dn;
            dnorm_norm_mean += dn * n;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        float *di = dinp + (size_t)r * C;
        for (int i = 0; i < C; i++) {
            float n = (x[i] - m) * s, dn = w[i] * d[i];
            di[i] += (dn - dnorm_mean - n * dnorm_norm_mean) * s;
        }
    }
    // parameter gradients: reduce over rows per channel, in row order, parallel over blocks of 64
    // channels so that rows are read contiguously (deterministic)
#pragma omp parallel for schedule(static)
    for (int i0 = 0; i0 < C; i0 += 64) {
        int w = C - i0 < 64 ? C - i0 : 64;
        float gw[64], gb[64];
        for (int j = 0; j < w; j++) gw[j] = gb[j] = 0.0f;
        for (int r = 0; r < N; r++) {
            const float *d = dout + (size_t)r * C + i0, *x = inp + (size_t)r * C + i0;
            float m = mean[r], s = rstd[r];
            for (int j = 0; j < w; j++) {
                gw[j] += (x[j] - m) * s * d[j];
                gb[j] += d[j];
            }
        }
        for (int j = 0; j < w; j++) { dw[i0 + j] += gw[j]; db[i0 + j] += gb[j]; }
    }
}

// ----------------------------------------------------------------------------------------------
// GEMM: C (M x N) = [C +] A (M x K) * B (K x N), with A[m][k] = A[m * rsa + k * csa] and
// B[k][n] = B[k * rsb + n * csb], so one routine serves all three products of a linear layer.
// Threads own disjoint blocks of C (split along the longer of M, N) and every element is summed
// in the same k order whatever the thread count: results are deterministic.
// With a CBLAS, each thread calls a single-threaded sgemm on its block (BLAS threading is turned
// off: a second thread pool spinning against OpenMP's cost ~30% of a step). Without,
// common/gemm.h's packed, register-tiled kernel, the one the structured layers use.

#ifndef USE_CBLAS
static void gm_block(int m0, int m1, int n0, int n1, int K, const float *A, size_t rsa, size_t csa, const float *B,
                     size_t rsb, size_t csb, float *C, size_t ldc, int accumulate) {
    cg_gemm(m1 - m0, n1 - n0, K, A + (size_t)m0 * rsa, rsa, csa, B + (size_t)n0 * csb, rsb, csb, C + (size_t)m0 * ldc + n0,
            ldc, accumulate);
}
#define GM_SPLIT_M CG_MR
#define GM_SPLIT_N CG_NR
#else
// CBLAS on one block; a unit stride along k or m/n picks the transposition.
static void gm_block(int m0, int m1, int n0, int n1, int K, const float *A, size_t rsa, size_t csa, const float *B,
                     size_t rsb, size_t csb, float *C, size_t ldc, int accumulate) {
    enum CBLAS_TRANSPOSE ta = csa == 1 ? CblasNoTrans : CblasTrans, tb = csb == 1 ? CblasNoTrans : CblasTrans;
    int lda = (int)(csa == 1 ? rsa : csa), ldb = (int)(csb == 1 ? rsb : csb);
    cblas_sgemm(CblasRowMajor, ta, tb, m1 - m0, n1 - n0, K, 1.0f, A + (size_t)m0 * rsa, lda, B + (size_t)n0 * csb, ldb,
                accumulate ? 1.0f : 0.0f, C + (size_t)m0 * ldc + n0, (int)ldc);
}
#define GM_SPLIT_M 8
#define GM_SPLIT_N 16
#endif

static void gemm(int M, int N, int K, const float *A, size_t rsa, size_t csa, const float *B, size_t rsb, size_t csb,
                 float *C, size_t ldc, int accumulate) {
    if (M <= 0 || N <= 0) return;
#ifdef USE_CBLAS
    static int blas_single = 0;
    if (!blas_single) { openblas_set_num_threads(1); blas_single = 1; }
#endif
    int nt = 1;
#ifdef OMP
    nt = omp_get_max_threads();
    if ((double)M * N * K < 2e6) nt = 1;  // tiny products are not worth waking the other threads
#endif
    int split_n = N >= M;
    int units = split_n ? (N + GM_SPLIT_N - 1) / GM_SPLIT_N : (M + GM_SPLIT_M - 1) / GM_SPLIT_M;
    if (nt > units) nt = units;
#pragma omp parallel for schedule(static, 1) num_threads(nt)
    for (int t = 0; t < nt; t++) {
        int u0 = (int)((long)units * t / nt), u1 = (int)((long)units * (t + 1) / nt);
        int m0 = 0, m1 = M, n0 = 0, n1 = N;
        if (split_n) { n0 = u0 * GM_SPLIT_N; n1 = u1 * GM_SPLIT_N < N ? u1 * GM_SPLIT_N : N; }
        else { m0 = u0 * GM_SPLIT_M; m1 = u1 * GM_SPLIT_M < M ? u1 * GM_SPLIT_M : M; }
        if (K <= 0) {  // an empty product: C = [C +] 0
            if (!accumulate) for (int m = m0; m < m1; m++) memset(C + (size_t)m * ldc + n0, 0, (size_t)(n1 - n0) * sizeof(float));
        } else if (m1 > m0 && n1 > n0) {
            gm_block(m0, m1, n0, n1, K, A, rsa, csa, B, rsb, csb, C, ldc, accumulate);
        }
    }
}

// out (N, OC) += bias (OC), every row; nothing without a bias.
static void bias_forward(float *out, const float *bias, int N, int OC) {
    if (!bias) return;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        float *o = out + (size_t)r * OC;
        for (int j = 0; j < OC; j++) o[j] += bias[j];
    }
}

// out (N, OC) = inp (N, C) @ w^T (w is OC x C) + bias. Overwrites out.
void matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N, int C, int OC) {
    gemm(N, OC, C, inp, (size_t)C, 1, w, 1, (size_t)C, out, (size_t)OC, 0);
    bias_forward(out, bias, N, OC);
}

// dinp (N, C) = dout (N, OC) @ w (OC, C), overwritten; dw (OC, C) += dout^T @ inp; dbias += sum_rows dout.
void matmul_backward(float *dinp, float *dw, float *dbias, const float *dout, const float *inp, const float *w,
                     int N, int C, int OC) {
    if (dinp) gemm(N, C, OC, dout, (size_t)OC, 1, w, (size_t)C, 1, dinp, (size_t)C, 0);
    gemm(OC, C, N, dout, 1, (size_t)OC, inp, (size_t)C, 1, dw, (size_t)C, 1);
    st_bias_backward(dbias, dout, N, OC);  // column sums, each in row order (structured/factor.h)
}

// Causal multi-head attention. qkv (B, T, 3C) holds q | k | v; att (B, NH, T, T) keeps the
// softmax probabilities (the only thing the backward needs); out (B, T, C). The products run on
// common/gemm.h's kernel, per head and block of ATT_ROWS query rows, over the keys up to the
// block's last row (the causal triangle, to the block's edge).
#define ATT_ROWS 64
void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
    const int hs = C / NH, C3 = 3 * C, nblk = (T + ATT_ROWS - 1) / ATT_ROWS;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int bh = 0; bh < B * NH; bh++)
        for (int blk = 0; blk < nblk; blk++) {
            const int b = bh / NH, h = bh % NH, i0 = blk * ATT_ROWS, i1 = i0 + ATT_ROWS < T ? i0 + ATT_ROWS : T;
            const float *q = qkv + (size_t)b * T * C3 + h * hs, *k = q + C, *v = q + 2 * C;
            float *a = att + ((size_t)bh * T + i0) * T;
            // scores of rows i0..i1 against keys 0..i1: q k^T (k read as its transpose)
            cg_gemm(i1 - i0, i1, hs, q + (size_t)i0 * C3, (size_t)C3, 1, k, 1, (size_t)C3, a, (size_t)T, 0);
            for (int t = i0; t < i1; t++) {
                float *r = a + (size_t)(t - i0) * T, maxv = -INFINITY, sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) { r[t2] *= scale; maxv = r[t2] > maxv ? r[t2] : maxv; }
                for (int t2 = 0; t2 <= t; t2++) { r[t2] = fast_expf(r[t2] - maxv); sum += r[t2]; }
                const float inv = 1.0f / sum;
                for (int t2 = 0; t2 <= t; t2++) r[t2] *= inv;
                for (int t2 = t + 1; t2 < T; t2++) r[t2] = 0.0f;
            }
            cg_gemm(i1 - i0, hs, i1, a, (size_t)T, 1, v, (size_t)C3, 1, out + ((size_t)b * T + i0) * C + h * hs, (size_t)C, 0);
        }
}

// dqkv (B, T, 3C) is overwritten. Parallel over (b, h): each owns its slice of dqkv, so no races.
// Per head: datt = dout v^T and the softmax's backward give dS (T x T, lower triangle) in a
// per-thread buffer; then dq = dS k, dk = dS^T q and dv = att^T dout, each a block of rows at a
// time over the part of the triangle that is not zero.
void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att, int B, int T, int C, int NH) {
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel
    {
        float *ds = (float *)mallocCheck((size_t)T * T * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * NH; bh++) {
            const int b = bh / NH, h = bh % NH;
            const float *q = qkv + (size_t)b * T * C3 + h * hs, *k = q + C, *v = q + 2 * C;
            const float *a = att + (size_t)bh * T * T, *d = dout + (size_t)b * T * C + h * hs;
            float *dq = dqkv + (size_t)b * T * C3 + h * hs, *dk = dq + C, *dv = dq + 2 * C;
            for (int i0 = 0; i0 < T; i0 += ATT_ROWS) {
                const int i1 = i0 + ATT_ROWS < T ? i0 + ATT_ROWS : T;
                cg_gemm(i1 - i0, i1, hs, d + (size_t)i0 * C, (size_t)C, 1, v, 1, (size_t)C3, ds + (size_t)i0 * T, (size_t)T, 0);
                for (int t = i0; t < i1; t++) {  // through the softmax, then the scaled q.k
                    const float *ar = a + (size_t)t * T;
                    float *r = ds + (size_t)t * T, dot = 0.0f;
                    for (int t2 = 0; t2 <= t; t2++) dot += r[t2] * ar[t2];
                    for (int t2 = 0; t2 <= t; t2++) r[t2] = ar[t2] * (r[t2] - dot) * scale;
                    for (int t2 = t + 1; t2 < T; t2++) r[t2] = 0.0f;
                }
                cg_gemm(i1 - i0, hs, i1, ds + (size_t)i0 * T, (size_t)T, 1, k, (size_t)C3, 1, dq + (size_t)i0 * C3, (size_t)C3, 0);
            }
            for (int j0 = 0; j0 < T; j0 += ATT_ROWS) {  // keys j0..j1 get rows j0..T of dS and att
                const int j1 = j0 + ATT_ROWS < T ? j0 + ATT_ROWS : T;
                cg_gemm(j1 - j0, hs, T - j0, ds + (size_t)j0 * T + j0, 1, (size_t)T, q + (size_t)j0 * C3, (size_t)C3, 1,
                        dk + (size_t)j0 * C3, (size_t)C3, 0);
                cg_gemm(j1 - j0, hs, T - j0, a + (size_t)j0 * T + j0, 1, (size_t)T, d + (size_t)j0 * C, (size_t)C, 1,
                        dv + (size_t)j0 * C3, (size_t)C3, 0);
            }
        }
        free(ds);
    }
}

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)
void gelu_forward(float *out, const float *inp, size_t N) {
#pragma omp parallel for
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + fast_tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
    }
}

// dinp = gelu'(inp) * dout, overwritten.
void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N) {
#pragma omp parallel for
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = fast_tanhf(u);
        float sech2 = 1.0f - th * th;
        float g = 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = g * dout[i];
    }
}

void residual_forward(float *out, const float *a, const float *b, size_t N) {
#pragma omp parallel for
    for (size_t i = 0; i < N; i++) out[i] = a[i] + b[i];
}

// Softmax over the real V columns of logits (N, Vp) and cross-entropy against targets. When
// dlogits is given (it may be logits itself), writes dloss * (probs - onehot) there (padded
// columns 0), computing each exponential once. Returns the mean loss.
float crossentropy_softmax(float *dlogits, float *losses, const float *logits, const int *targets, int N, int V, int Vp,
                           float dloss) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        const float *l = logits + (size_t)r * Vp;
        float maxv = -INFINITY;
        for (int i = 0; i < V; i++) maxv = l[i] > maxv ? l[i] : maxv;
        float lt = l[targets[r]];
        float sum = 0.0f;
        if (dlogits) {
            float *d = dlogits + (size_t)r * Vp;
            for (int i = 0; i < V; i++) { float e = fast_expf(l[i] - maxv); d[i] = e; sum += e; }
            float f = dloss / sum;
            for (int i = 0; i < V; i++) d[i] *= f;
            d[targets[r]] -= dloss;
            for (int i = V; i < Vp; i++) d[i] = 0.0f;
        } else {
            for (int i = 0; i < V; i++) sum += fast_expf(l[i] - maxv);
        }
        losses[r] = logf(sum) + maxv - lt;
    }
    double mean = 0.0;
    for (int r = 0; r < N; r++) mean += losses[r];
    return (float)(mean / N);
}

// ----------------------------------------------------------------------------------------------
// The model

// What a linear layer's forward keeps for its backward beyond its input: BTT's z, Monarch's u,
// BTT-MoE's routing and per-expert intermediates. Dense layers keep nothing.
typedef struct {
    float *inter;
    MoEState moe;
    int has_moe;
} LinearActs;

typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd;  // input of q, k, v
    float *qkv, *att, *atty;           // qkv: (BT, 3C) rows of q | k | v; atty: attention output
    float *res2;                       // residual after attention
    float *ln2, *ln2_mean, *ln2_rstd;  // input of fc
    float *fch, *fch_gelu;             // fc output before / after GELU
    float *res3;                       // residual after the MLP: the block's output
    LinearActs lin[NUM_BLOCK_ROLES];
} BlockActs;

typedef struct {
    GPT2Layout layout;
    GPT2Config config;
    char *config_text;  // the structure config, stored in structured checkpoints (NULL if dense)
    float *params, *grads, *m, *v;
    size_t num_params;
    // activations, sized for max_B x max_T
    int max_B, max_T;
    float *acts_memory;
    float *encoded;
    BlockActs *blocks;
    LinearActs head_acts;
    float *lnf, *lnf_mean, *lnf_rstd, *logits, *losses;
    // backward scratch, reused by every layer
    float *scratch_memory;
    float *dres, *dln, *dbig, *dbig2, *dqkv, *datty, *split_a, *split_b;
    float *lin_scratch;
    float mean_loss;  // cross-entropy of the last forward with targets; -1 if none
    MoERouting routing;  // BTT-MoE aux loss and routing of the last forward, over the routed layers (zero without any)
    int n_routed;        // routed (btt_moe) layers
    int routed_seen;     // routed layers the current forward has run
    int *inputs, *targets;
    // data parallel: with sync_aux set (training forwards on every rank), BTT-MoE layers sum their
    // aux-loss statistics over ranks so that f̂ and P̂ are those of the global batch
    const MultiProc *mp;
    int sync_aux;
    // the training step's micro-batches so far: each one's loss and routing (trainer_step_losses)
    float *micro_loss;
    MoERouting *micro_routing;
    int micro_cap;
    // ZeRO-1 (-z 1 under mpirun): this rank updates and keeps AdamW moments for zero.lo..hi only;
    // params and grads are allocated with zero.padded elements for the collectives
    ZeroShard zero;
} GPT2;

// Small BTT layers through their dense matrix. At widths of a few hundred a BTT's block products
// have sides of 16 and run at a third of the dense kernel's speed or less, so that rank 4 at width
// 256 is slower than the dense layer it replaces (dev/bench/RESULTS.md, "Small widths"). There the
// layer builds its matrix as the BTT of the identity (W^T, d_in x d_out: row i is the layer's
// output for e_i, through btt_forward), runs as a dense layer, and gets the cores' gradients as
// the BTT backward of the identity with dW^T = x^T dy as its output gradient: the same function
// and gradients, summed in another order. Saved for the backward: W^T and the identity's z.
// -1: chosen by cost (btt_via_dense), 0: never, 1: always (tests).
static int g_btt_dense = -1;
static int btt_via_dense(const BTTShape *s, int N) {
    if (g_btt_dense >= 0) return g_btt_dense;
    // in dense multiply-adds: a BTT one costs about 2.5 at these sizes (measured 1.7-3.2 at widths
    // 128-1024); building W^T runs the BTT on d_in rows. Monotonic in N: false at the largest N
    // (the allocation's) is false at every smaller one.
    const double F = (double)btt_flops_per_row(s), D = (double)s->d_in * s->d_out;
    return 2.5 * F * N > D * N + 2.5 * F * s->d_in;
}
static size_t btt_dense_inter_size(const BTTShape *s) { return (size_t)s->d_in * s->d_out + btt_z_size(s, s->d_in); }
static const float *btt_identity(int n) {  // n x n, in the calling thread's workspace
    float *eye = st_workspace(ST_WS_EYE, (size_t)n * n);
    memset(eye, 0, sizeof(float) * (size_t)n * n);
    for (int i = 0; i < n; i++) eye[(size_t)i * n + i] = 1.0f;
    return eye;
}
static void btt_dense_forward(float *out, float *inter, const float *inp, const float *w0, const float *w1, const float *bias, int N,
                              const BTTShape *s) {
    const int din = s->d_in, dout = s->d_out;
    float *WT = inter, *zI = inter + (size_t)din * dout;
    btt_forward(WT, zI, btt_identity(din), w0, w1, NULL, din, s);  // (-pt 2: its steps build W)
    st_step("dense GEMM on W");
    gemm(N, dout, din, inp, (size_t)din, 1, WT, (size_t)dout, 1, out, (size_t)dout, 0);
    bias_forward(out, bias, N, dout);
}
// scratch: d_in x d_out for dW^T, then btt_scratch_size(s, d_in)
static void btt_dense_backward(float *dinp, float *dw0, float *dw1, float *dbias, const float *dout, const float *inp,
                               const float *inter, const float *w0, const float *w1, int N, const BTTShape *s, float *scratch) {
    const int din = s->d_in, dou = s->d_out;
    const float *WT = inter, *zI = inter + (size_t)din * dou;
    st_step("dense GEMMs (dx, dW)");
    if (dinp) gemm(N, din, dou, dout, (size_t)dou, 1, WT, 1, (size_t)dou, dinp, (size_t)din, 0);  // dy W
    float *dWT = scratch;
    gemm(din, dou, N, inp, 1, (size_t)din, dout, (size_t)dou, 1, dWT, (size_t)dou, 0);  // x^T dy
    btt_backward(NULL, dw0, dw1, NULL, dWT, btt_identity(din), zI, w0, w1, din, s, scratch + (size_t)din * dou);
    st_bias_backward(dbias, dout, N, dou);
}

// The one place a linear layer is computed, whatever its structure: out (N, d_out) from inp.
static void linear_forward(GPT2 *m, const LinearDesc *ld, LinearActs *la, float *out, const float *inp, int N) {
    const GPT2Layout *g = &m->layout;
    float *P = m->params;
    const LinearSpec *s = &ld->spec;
    const float *b = ld->bias >= 0 ? gpt2_tensor(g, P, ld->bias) : NULL;
    const float *w0 = gpt2_tensor(g, P, ld->w[0]), *w1 = ld->nw > 1 ? gpt2_tensor(g, P, ld->w[1]) : NULL;
    prof_mark_linear(ld, 0, N, 0);
    switch (s->kind) {
        case STRUCT_DENSE: matmul_forward(out, inp, w0, b, N, s->d_in, s->d_out); break;
        case STRUCT_BTT: {
            BTTShape bs = btt_shape_of(s);
            if (btt_via_dense(&bs, N)) btt_dense_forward(out, la->inter, inp, w0, w1, b, N, &bs);
            else btt_forward(out, la->inter, inp, w0, w1, b, N, &bs);
            break;
        }
        case STRUCT_MONARCH: { MonarchShape ms = monarch_shape_of(s); monarch_forward(out, la->inter, inp, w0, w1, b, N, &ms); break; }
        default: {
            MoEShape ms = moe_shape_of(s);
            moe_forward(out, &la->moe, inp, w0, w1, gpt2_tensor(g, P, ld->w[2]), b, N, &ms);
            MoERouting r;
            if (m->sync_aux && m->mp && m->mp->nproc > 1) {
                double stats[MOE_AUX_STATS(STRUCT_MAX_EXPERTS)];
                moe_aux_stats(&la->moe, N, &ms, stats);
                multiproc_sum_doubles(m->mp, stats, MOE_AUX_STATS(ms.experts));
                r = moe_aux_from_stats(&la->moe, stats, (long)N * m->mp->nproc, &ms);
            } else {
                r = moe_aux_loss(&la->moe, N, &ms);
            }
            moe_routing_fold(&m->routing, &r, m->routed_seen++);
            break;
        }
    }
}

// dinp (N, d_in) is overwritten (may be NULL); the layer's gradients are accumulated. daux is
// d(loss)/d(this layer's aux loss), used by BTT-MoE only.
static void linear_backward(GPT2 *m, const LinearDesc *ld, const LinearActs *la, float *dinp, const float *dout,
                            const float *inp, int N, float daux) {
    const GPT2Layout *g = &m->layout;
    float *P = m->params, *G = m->grads;
    const LinearSpec *s = &ld->spec;
    float *db = ld->bias >= 0 ? gpt2_tensor(g, G, ld->bias) : NULL;
    const float *w0 = gpt2_tensor(g, P, ld->w[0]), *w1 = ld->nw > 1 ? gpt2_tensor(g, P, ld->w[1]) : NULL;
    float *dw0 = gpt2_tensor(g, G, ld->w[0]), *dw1 = ld->nw > 1 ? gpt2_tensor(g, G, ld->w[1]) : NULL;
    prof_mark_linear(ld, 1, N, 0);
    switch (s->kind) {
        case STRUCT_DENSE: matmul_backward(dinp, dw0, db, dout, inp, w0, N, s->d_in, s->d_out); break;
        case STRUCT_BTT: {
            BTTShape bs = btt_shape_of(s);
            if (btt_via_dense(&bs, N)) btt_dense_backward(dinp, dw0, dw1, db, dout, inp, la->inter, w0, w1, N, &bs, m->lin_scratch);
            else btt_backward(dinp, dw0, dw1, db, dout, inp, la->inter, w0, w1, N, &bs, m->lin_scratch);
            break;
        }
        case STRUCT_MONARCH: {
            MonarchShape ms = monarch_shape_of(s);
            monarch_backward(dinp, dw0, dw1, db, dout, inp, la->inter, w0, w1, N, &ms, m->lin_scratch);
            break;
        }
        default: {
            MoEShape ms = moe_shape_of(s);
            moe_backward(dinp, dw0, dw1, gpt2_tensor(g, G, ld->w[2]), db, dout, daux, inp, &la->moe, w0, w1,
                         gpt2_tensor(g, P, ld->w[2]), N, &ms, m->lin_scratch);
            break;
        }
    }
}

// Floats a linear layer keeps between forward and backward for N rows, and its backward scratch.
static size_t linear_inter_size(const LinearSpec *s, int N) {
    if (s->kind == STRUCT_BTT) {  // (a smaller N may take the BTT path: btt_via_dense)
        BTTShape b = btt_shape_of(s);
        const size_t z = btt_z_size(&b, N), d = btt_dense_inter_size(&b);
        return btt_via_dense(&b, N) && d > z ? d : z;
    }
    if (s->kind == STRUCT_MONARCH) { MonarchShape ms = monarch_shape_of(s); return monarch_u_size(&ms, N); }
    return 0;
}
static size_t linear_scratch_size(const LinearSpec *s, int N) {
    if (s->kind == STRUCT_BTT) {
        BTTShape b = btt_shape_of(s);
        const size_t sc = btt_scratch_size(&b, N), d = (size_t)b.d_in * b.d_out + btt_scratch_size(&b, b.d_in);
        return btt_via_dense(&b, N) && d > sc ? d : sc;
    }
    if (s->kind == STRUCT_MONARCH) { MonarchShape ms = monarch_shape_of(s); return monarch_scratch_size(&ms, N); }
    if (s->kind == STRUCT_BTT_MOE) { MoEShape ms = moe_shape_of(s); return moe_scratch_size(&ms, N); }
    return 0;
}

static void linear_acts_alloc(LinearActs *la, const LinearDesc *ld, int N, size_t *scratch) {
    memset(la, 0, sizeof(*la));
    if (!ld->used) return;
    size_t n = linear_inter_size(&ld->spec, N);
    if (n) la->inter = (float *)callocCheck(n, sizeof(float));
    if (ld->spec.kind == STRUCT_BTT_MOE) {
        MoEShape ms = moe_shape_of(&ld->spec);
        moe_state_alloc(&la->moe, &ms, N);
        la->has_moe = 1;
    }
    size_t sc = linear_scratch_size(&ld->spec, N);
    if (sc > *scratch) *scratch = sc;
}

static void linear_acts_free(LinearActs *la) {
    free(la->inter);
    if (la->has_moe) moe_state_free(&la->moe);
}

static void gpt2_alloc_params(GPT2 *m) {
    m->config = m->layout.config;
    m->num_params = m->layout.params.total;
    m->params = (float *)callocCheck(m->num_params, sizeof(float));
    m->mean_loss = -1.0f;
    m->n_routed = 0;
    for (int l = 0; l < m->config.num_layers; l++)
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) {
            const LinearDesc *ld = gpt2_linear(&m->layout, l, r);
            if (ld->used && ld->spec.kind == STRUCT_BTT_MOE) m->n_routed++;
        }
    if (m->layout.head.used && m->layout.head.spec.kind == STRUCT_BTT_MOE) m->n_routed++;
}

// A model from a config file's text (`where` names it in messages), weights not initialised.
static void gpt2_build_from_config_text(GPT2 *m, const char *where, const char *text) {
    memset(m, 0, sizeof(*m));
    m->config_text = gpt2_layout_from_config_text(&m->layout, where, text);
    gpt2_alloc_params(m);
}

// -e argument: an llm.c checkpoint, a structured checkpoint, "dN", or a model config file.
void gpt2_build(GPT2 *m, const char *spec) {
    memset(m, 0, sizeof(*m));
    ModelSource src;
    gpt2_layout_from_spec(&m->layout, spec, &src);
    m->config_text = src.config_text;
    gpt2_alloc_params(m);
    if (src.fp) {
        model_params_read(src.fp, spec, src.version, m->params, m->num_params);
        fcloseCheck(src.fp, spec);
    } else {
        gpt2_init_random(&m->layout, m->params, 42);
    }
}

// Activation and scratch buffers for batches up to B x T; called once before the first forward.
void gpt2_alloc_activations(GPT2 *m, int B, int T) {
    const GPT2Config *c = &m->config;
    if (T > c->max_seq_len) fatal("-t %d is longer than the model's max_seq_len %d; use -t <= %d", T, c->max_seq_len, c->max_seq_len);
    size_t BT = (size_t)B * T, C = (size_t)c->channels, L = (size_t)c->num_layers, NH = (size_t)c->num_heads;
    size_t per_block = BT * C * 5 + BT * 4 + BT * 3 * C + B * NH * (size_t)T * T + BT * 4 * C * 2;
    size_t total = BT * C + L * per_block + BT * C + 2 * BT + BT * (size_t)c->padded_vocab_size + BT;
    m->acts_memory = (float *)callocCheck(total, sizeof(float));
    float *p = m->acts_memory;
#define TAKE(ptr, n) do { (ptr) = p; p += (n); } while (0)
    TAKE(m->encoded, BT * C);
    m->blocks = (BlockActs *)callocCheck(L, sizeof(BlockActs));
    size_t lin_scratch = 0;
    for (size_t l = 0; l < L; l++) {
        BlockActs *a = &m->blocks[l];
        TAKE(a->ln1, BT * C); TAKE(a->ln1_mean, BT); TAKE(a->ln1_rstd, BT);
        TAKE(a->qkv, BT * 3 * C); TAKE(a->att, B * NH * (size_t)T * T); TAKE(a->atty, BT * C);
        TAKE(a->res2, BT * C);
        TAKE(a->ln2, BT * C); TAKE(a->ln2_mean, BT); TAKE(a->ln2_rstd, BT);
        TAKE(a->fch, BT * 4 * C); TAKE(a->fch_gelu, BT * 4 * C);
        TAKE(a->res3, BT * C);
        for (int r = 0; r < NUM_BLOCK_ROLES; r++) linear_acts_alloc(&a->lin[r], gpt2_linear(&m->layout, (int)l, r), (int)BT, &lin_scratch);
    }
    linear_acts_alloc(&m->head_acts, &m->layout.head, (int)BT, &lin_scratch);
    TAKE(m->lnf, BT * C); TAKE(m->lnf_mean, BT); TAKE(m->lnf_rstd, BT);
    TAKE(m->logits, BT * c->padded_vocab_size);
    TAKE(m->losses, BT);
    size_t scratch = BT * C * 5 + BT * 4 * C * 2 + BT * 3 * C + lin_scratch;
    m->scratch_memory = (float *)callocCheck(scratch, sizeof(float));
    p = m->scratch_memory;
    TAKE(m->dres, BT * C); TAKE(m->dln, BT * C); TAKE(m->datty, BT * C);
    TAKE(m->split_a, BT * C); TAKE(m->split_b, BT * C);
    TAKE(m->dbig, BT * 4 * C); TAKE(m->dbig2, BT * 4 * C); TAKE(m->dqkv, BT * 3 * C);
    TAKE(m->lin_scratch, lin_scratch);
#undef TAKE
    m->max_B = B;
    m->max_T = T;
    m->inputs = (int *)mallocCheck(BT * sizeof(int));
    m->targets = (int *)mallocCheck(BT * sizeof(int));
}

// Copies column block `part` (of width C) between a (N, 3C) qkv buffer and a (N, C) buffer.
static void qkv_part_copy(float *qkv, float *part_buf, int part, int N, int C, int to_qkv) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        float *q = qkv + (size_t)r * 3 * C + (size_t)part * C, *x = part_buf + (size_t)r * C;
        if (to_qkv) memcpy(q, x, C * sizeof(float));
        else memcpy(x, q, C * sizeof(float));
    }
}

// q, k and v from ln1 into qkv: one fused matmul when all are dense, else three layers.
static void qkv_forward(GPT2 *m, int l, BlockActs *a, int N) {
    const LinearDesc *q = gpt2_linear(&m->layout, l, SR_Q);
    if (q->fused_qkv) { linear_forward(m, q, &a->lin[SR_Q], a->qkv, a->ln1, N); return; }
    for (int r = SR_Q; r <= SR_V; r++) {
        linear_forward(m, gpt2_linear(&m->layout, l, r), &a->lin[r], m->split_a, a->ln1, N);
        prof_mark("q, k, v split copies", 0.0);
        qkv_part_copy(a->qkv, m->split_a, r, N, m->config.channels, 1);
    }
}

// dln = the gradient of ln1 through q, k and v, from dqkv.
static void qkv_backward(GPT2 *m, int l, const BlockActs *a, float *dln, int N, float daux) {
    const LinearDesc *q = gpt2_linear(&m->layout, l, SR_Q);
    if (q->fused_qkv) { linear_backward(m, q, &a->lin[SR_Q], dln, m->dqkv, a->ln1, N, daux); return; }
    size_t n = (size_t)N * m->config.channels;
    for (int r = SR_Q; r <= SR_V; r++) {
        prof_mark("q, k, v split copies", 0.0);
        qkv_part_copy(m->dqkv, m->split_a, r, N, m->config.channels, 0);
        linear_backward(m, gpt2_linear(&m->layout, l, r), &a->lin[r], r == SR_Q ? dln : m->split_b, m->split_a, a->ln1, N, daux);
        if (r != SR_Q) {
            prof_mark("q, k, v split copies", 0.0);
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < n; i++) dln[i] += m->split_b[i];
        }
    }
}

// Forward over inputs (B, T). With targets, returns the mean cross-entropy (the BTT-MoE aux loss
// is in m->routing.aux; the training objective is their sum with moe_aux_weight). Without targets,
// returns -1 and leaves the logits for sampling.
float gpt2_forward(GPT2 *m, const int *inputs, const int *targets, int B, int T) {
    if (!m->acts_memory) fatal("internal: gpt2_alloc_activations was not called");
    if (B > m->max_B || T > m->max_T) fatal("internal: batch %dx%d exceeds the allocated %dx%d", B, T, m->max_B, m->max_T);
    const GPT2Config *c = &m->config;
    const GPT2Layout *g = &m->layout;
    int C = c->channels, NH = c->num_heads, V = c->vocab_size, Vp = c->padded_vocab_size;
    int BT = B * T;
    for (int i = 0; i < BT; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) fatal("token %d at position %d is outside the vocabulary [0, %d): wrong data for this model?", inputs[i], i, V);
        if (targets && (targets[i] < 0 || targets[i] >= V)) fatal("target token %d at position %d is outside the vocabulary [0, %d)", targets[i], i, V);
    }
    memcpy(m->inputs, inputs, BT * sizeof(int));
    if (targets) memcpy(m->targets, targets, BT * sizeof(int));
    float *P = m->params;
    m->routing = (MoERouting){0.0f, 0.0f, 0.0f, 0.0f};
    m->routed_seen = 0;
    prof_mark("encoder fwd", 0.0);
    encoder_forward(m->encoded, inputs, gpt2_tensor(g, P, g->wte), gpt2_tensor(g, P, g->wpe), B, T, C);
    const float *res = m->encoded;
    float *proj = m->dln;  // scratch for the projections' outputs before the residual add
    for (int l = 0; l < c->num_layers; l++) {
        BlockActs *a = &m->blocks[l];
        const BlockNorms *n = &g->norms[l];
        prof_mark("layernorm fwd", 0.0);
        layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, res, gpt2_tensor(g, P, n->ln1w), gpt2_tensor(g, P, n->ln1b), BT, C);
        qkv_forward(m, l, a, BT);
        prof_mark_attention(c, 0, B, T);
        attention_forward(a->atty, a->att, a->qkv, B, T, C, NH);
        linear_forward(m, gpt2_linear(g, l, SR_ATTN_PROJ), &a->lin[SR_ATTN_PROJ], proj, a->atty, BT);
        prof_mark("residual fwd", 0.0);
        residual_forward(a->res2, res, proj, (size_t)BT * C);
        prof_mark("layernorm fwd", 0.0);
        layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->res2, gpt2_tensor(g, P, n->ln2w), gpt2_tensor(g, P, n->ln2b), BT, C);
        linear_forward(m, gpt2_linear(g, l, SR_FC), &a->lin[SR_FC], a->fch, a->ln2, BT);
        prof_mark("gelu fwd", 0.0);
        gelu_forward(a->fch_gelu, a->fch, (size_t)BT * 4 * C);
        linear_forward(m, gpt2_linear(g, l, SR_FC_PROJ), &a->lin[SR_FC_PROJ], proj, a->fch_gelu, BT);
        prof_mark("residual fwd", 0.0);
        residual_forward(a->res3, a->res2, proj, (size_t)BT * C);
        res = a->res3;
    }
    prof_mark("layernorm fwd", 0.0);
    layernorm_forward(m->lnf, m->lnf_mean, m->lnf_rstd, res, gpt2_tensor(g, P, g->lnfw), gpt2_tensor(g, P, g->lnfb), BT, C);
    if (g->head.used) linear_forward(m, &g->head, &m->head_acts, m->logits, m->lnf, BT);
    else {
        prof_mark_tied_head(c, 0, BT);
        matmul_forward(m->logits, m->lnf, gpt2_tensor(g, P, g->wte), NULL, BT, C, Vp);
    }
    moe_routing_finish(&m->routing, m->routed_seen);
    if (!targets) { m->mean_loss = -1.0f; return -1.0f; }
    prof_mark("classifier (softmax, loss)", 0.0);
    m->mean_loss = crossentropy_softmax(NULL, m->losses, m->logits, targets, BT, V, Vp, 0.0f);
    return m->mean_loss;
}

// The objective the optimizer minimises: cross-entropy plus the weighted BTT-MoE aux loss.
static inline float gpt2_total_loss(const GPT2 *m, float ce) {
    return ce + (m->n_routed > 0 ? m->layout.structure.moe_aux_weight * m->routing.aux : 0.0f);
}

// Elements of the gradient buffer: the parameters, padded for ZeRO-1's equal slices.
static size_t gpt2_grad_len(const GPT2 *m) { return m->zero.padded > m->num_params ? m->zero.padded : m->num_params; }

void gpt2_zero_grad(GPT2 *m) {
    if (!m->grads) { m->grads = (float *)callocCheck(gpt2_grad_len(m), sizeof(float)); return; }
    size_t n = gpt2_grad_len(m);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < 64; t++) memset(m->grads + n * t / 64, 0, (n * (t + 1) / 64 - n * t / 64) * sizeof(float));
}

// Backward of the last forward (which must have had targets) for the loss
// dloss_scale * (cross-entropy + moe_aux_weight * aux), accumulated into m->grads;
// dloss_scale is 1/grad_accum_steps for gradient accumulation.
void gpt2_backward(GPT2 *m, float dloss_scale, int B, int T) {
    if (m->mean_loss < 0) fatal("internal: gpt2_backward needs a forward with targets first");
    if (!m->grads) gpt2_zero_grad(m);
    const GPT2Config *c = &m->config;
    const GPT2Layout *g = &m->layout;
    int C = c->channels, NH = c->num_heads, V = c->vocab_size, Vp = c->padded_vocab_size, L = c->num_layers;
    int BT = B * T;
    float *P = m->params, *G = m->grads;
    float daux = m->n_routed > 0 ? dloss_scale * g->structure.moe_aux_weight / (float)m->n_routed : 0.0f;
    // the logits buffer becomes dlogits in place
    prof_mark("classifier bwd (softmax, dlogits)", 0.0);
    crossentropy_softmax(m->logits, m->losses, m->logits, m->targets, BT, V, Vp, dloss_scale / BT);
    const float *last = L > 0 ? m->blocks[L - 1].res3 : m->encoded;
    if (g->head.used) linear_backward(m, &g->head, &m->head_acts, m->dln, m->logits, m->lnf, BT, daux);
    else {
        prof_mark_tied_head(c, 1, BT);
        matmul_backward(m->dln, gpt2_tensor(g, G, g->wte), NULL, m->logits, m->lnf, gpt2_tensor(g, P, g->wte), BT, C, Vp);
    }
    prof_mark("layernorm bwd", 0.0);
    memset(m->dres, 0, (size_t)BT * C * sizeof(float));
    layernorm_backward(m->dres, gpt2_tensor(g, G, g->lnfw), gpt2_tensor(g, G, g->lnfb), m->dln, last,
                       gpt2_tensor(g, P, g->lnfw), m->lnf_mean, m->lnf_rstd, BT, C);
    for (int l = L - 1; l >= 0; l--) {
        BlockActs *a = &m->blocks[l];
        const BlockNorms *n = &g->norms[l];
        const float *res_in = l == 0 ? m->encoded : m->blocks[l - 1].res3;
        // MLP: dres is the gradient of res3 and flows unchanged into res2, plus the MLP branch
        linear_backward(m, gpt2_linear(g, l, SR_FC_PROJ), &a->lin[SR_FC_PROJ], m->dbig, m->dres, a->fch_gelu, BT, daux);
        prof_mark("gelu bwd", 0.0);
        gelu_backward(m->dbig2, a->fch, m->dbig, (size_t)BT * 4 * C);
        linear_backward(m, gpt2_linear(g, l, SR_FC), &a->lin[SR_FC], m->dln, m->dbig2, a->ln2, BT, daux);
        prof_mark("layernorm bwd", 0.0);
        layernorm_backward(m->dres, gpt2_tensor(g, G, n->ln2w), gpt2_tensor(g, G, n->ln2b), m->dln, a->res2,
                           gpt2_tensor(g, P, n->ln2w), a->ln2_mean, a->ln2_rstd, BT, C);
        // attention
        linear_backward(m, gpt2_linear(g, l, SR_ATTN_PROJ), &a->lin[SR_ATTN_PROJ], m->datty, m->dres, a->atty, BT, daux);
        prof_mark_attention(c, 1, B, T);
        attention_backward(m->dqkv, m->datty, a->qkv, a->att, B, T, C, NH);
        qkv_backward(m, l, a, m->dln, BT, daux);
        prof_mark("layernorm bwd", 0.0);
        layernorm_backward(m->dres, gpt2_tensor(g, G, n->ln1w), gpt2_tensor(g, G, n->ln1b), m->dln, res_in,
                           gpt2_tensor(g, P, n->ln1w), a->ln1_mean, a->ln1_rstd, BT, C);
    }
    prof_mark("encoder bwd", 0.0);
    encoder_backward(gpt2_tensor(g, G, g->wte), gpt2_tensor(g, G, g->wpe), m->dres, m->inputs, B, T, C);
    m->mean_loss = -1.0f;  // the logits were consumed
}

// Global L2 norm of the gradients, in double. One parallel pass: each thread sums a fixed static
// slice of every tensor, and the per-thread partials are added in thread order, so the result is
// reproducible for a given thread count.
float gpt2_grad_norm(const GPT2 *m) {
    if (m->zero.stage) {  // ZeRO-1: this rank holds the averaged gradients of its slice only
        double s = 0.0;
        const float *g = m->grads + m->zero.lo;
        long n = (long)(m->zero.hi - m->zero.lo);
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (long j = 0; j < n; j++) s += (double)g[j] * g[j];
        multiproc_sum_doubles(m->mp, &s, 1);
        return (float)sqrt(s);
    }
    enum { MAX_PART = 256 };
    double part[MAX_PART];
    int nt = 1;
#ifdef OMP
    nt = omp_get_max_threads() < MAX_PART ? omp_get_max_threads() : MAX_PART;
#endif
    const ParamTable *pt = &m->layout.params;
#pragma omp parallel num_threads(nt)
    {
        int t = 0;
#ifdef OMP
        t = omp_get_thread_num();
#endif
        double s = 0.0;
        for (int i = 0; i < pt->n; i++) {
            const float *gr = m->grads + pt->t[i].offset;
            size_t n = pt->t[i].numel, j0 = n * t / nt, j1 = n * (t + 1) / nt;
            for (size_t j = j0; j < j1; j++) s += (double)gr[j] * gr[j];
        }
        part[t] = s;
    }
    double total = 0.0;
    for (int t = 0; t < nt; t++) total += part[t];
    return (float)sqrt(total);
}

// AdamW over the parameter table (bias-corrected, decoupled weight decay on decay tensors, each
// tensor at lr * lr_mult). grad_scale multiplies the gradient first (clipping).
// With ZeRO-1 only this rank's slice is updated (moments indexed from zero.lo), then every
// rank's slice is gathered so that all ranks hold the same weights again.
static size_t gpt2_moments_len(const GPT2 *m) { return m->zero.stage ? m->zero.shard : m->num_params; }

void gpt2_update(GPT2 *m, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale, int t) {
    if (!m->m) {
        m->m = (float *)callocCheck(gpt2_moments_len(m), sizeof(float));
        m->v = (float *)callocCheck(gpt2_moments_len(m), sizeof(float));
    }
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    const ParamTable *pt = &m->layout.params;
    // one parallel region for all tensors (elementwise, so any split gives the same bits)
#pragma omp parallel
    for (int i = 0; i < pt->n; i++) {
        const ParamTensor *p = &pt->t[i];
        float plr = lr * p->lr_mult, wd = p->decay ? weight_decay : 0.0f;
        size_t j0 = 0, j1 = p->numel;
        if (m->zero.stage) zero_tensor_range(p, &m->zero, &j0, &j1);
        size_t st = p->offset - (m->zero.stage ? m->zero.lo : 0);  // moments of element j at st + j
        float *w = m->params + p->offset, *gr = m->grads + p->offset, *mm = m->m + st, *vv = m->v + st;
#pragma omp for schedule(static) nowait
        for (size_t j = j0; j < j1; j++) {
            float gj = gr[j] * grad_scale;
            float mj = beta1 * mm[j] + (1.0f - beta1) * gj;
            float vj = beta2 * vv[j] + (1.0f - beta2) * gj * gj;
            mm[j] = mj;
            vv[j] = vj;
            float mhat = mj / bc1, vhat = vj / bc2;
            w[j] -= plr * (mhat / (sqrtf(vhat) + eps) + wd * w[j]);
        }
    }
    if (m->zero.stage) multiproc_allgather(m->mp, m->params, m->zero.shard);
}

void gpt2_free(GPT2 *m) {
    if (m->blocks)
        for (int l = 0; l < m->config.num_layers; l++)
            for (int r = 0; r < NUM_BLOCK_ROLES; r++) linear_acts_free(&m->blocks[l].lin[r]);
    linear_acts_free(&m->head_acts);
    free(m->params); free(m->grads); free(m->m); free(m->v); free(m->config_text);
    free(m->acts_memory); free(m->scratch_memory); free(m->blocks);
    free(m->inputs); free(m->targets);
    free(m->micro_loss); free(m->micro_routing);
    gpt2_layout_free(&m->layout);
}

// ----------------------------------------------------------------------------------------------
// Sampling

// Generates gen_T tokens after an EOT prompt, printing them through the tokenizer when it loaded.
void gpt2_sample(GPT2 *m, const Tokenizer *tok, int eot, int gen_T, uint64_t *rng) {
    const GPT2Config *c = &m->config;
    int T = gen_T + 1 < m->max_T ? gen_T + 1 : m->max_T;
    int *tokens = (int *)mallocCheck((size_t)T * sizeof(int));
    float *probs = (float *)mallocCheck((size_t)c->vocab_size * sizeof(float));
    tokens[0] = eot;
    printf("generating:\n---\n");
    for (int t = 1; t < T; t++) {
        gpt2_forward(m, tokens, NULL, 1, t);
        memcpy(probs, m->logits + (size_t)(t - 1) * c->padded_vocab_size, (size_t)c->vocab_size * sizeof(float));
        tokens[t] = sample_softmax(probs, c->vocab_size, rng);
        print_token(tok, tokens[t]);
    }
    printf("\n---\n");
    free(tokens);
    free(probs);
}

// ----------------------------------------------------------------------------------------------
// Training: the shared driver (common/train_main.h) with the CPU's hooks

static void trainer_setup(int *argc, char **argv, MultiProc *mp) {
    (void)argc;
    if (multiproc_launch_without_mpi(*argc, argv))
        fatal("-pi fs|tcp starts the GPU trainer's NCCL ranks without MPI; the CPU trainer runs under mpirun (train_gpt2_mpi)");
    (void)mp;
}
// (train 0, -x 0: the gradients and moments are allocated lazily, at the first backward and update,
// so an evaluation never allocates them)
static void trainer_alloc(GPT2 *m, const MultiProc *mp, int B, int T, int zero_stage, int train) {
    m->mp = mp;
    zero_shard_init(&m->zero, zero_stage, m->num_params, mp->rank, mp->nproc);
    if (m->zero.padded > m->num_params) {  // the allgather writes whole slices: pad the weights
        float *p = (float *)callocCheck(m->zero.padded, sizeof(float));
        memcpy(p, m->params, m->num_params * sizeof(float));
        free(m->params);
        m->params = p;
    }
    gpt2_alloc_activations(m, B, T);
}
static void trainer_sync(void) {}
static double trainer_peak_flops(void) { return 0.0; }  // unknown: the step line shows GFLOP/s
static int trainer_n_routed(const GPT2 *m) { return m->n_routed; }
static const float *trainer_row_losses(const GPT2 *m) { return m->losses; }
static void trainer_step_end(GPT2 *m, long step) {}
static void trainer_profile_start(void) { prof_enable(NULL, NULL, NULL, NULL); }  // the work is synchronous: wall time

static void trainer_banner(const GPT2 *m) {
    (void)m;
#ifdef OMP
    printf("| threads               | %-50d |\n", omp_get_max_threads());
#endif
}

static void trainer_moe_fhat(const GPT2 *m, const LinearDesc *ld, float *fhat) {
    const LinearActs *la = ld->layer < 0 ? &m->head_acts : &m->blocks[ld->layer].lin[ld->role];
    memcpy(fhat, la->moe.fhat, (size_t)ld->spec.experts * sizeof(float));
}

static void trainer_micro_step(GPT2 *m, const int *inputs, const int *targets, int B, int T, float dloss_scale, int micro, int last) {
    (void)last;  // the gradients are averaged over ranks after the step's micro-steps (trainer_mean_grads)
    if (micro >= m->micro_cap) {
        m->micro_cap = micro + 1;
        m->micro_loss = (float *)reallocCheck(m->micro_loss, (size_t)m->micro_cap * sizeof(float));
        m->micro_routing = (MoERouting *)reallocCheck(m->micro_routing, (size_t)m->micro_cap * sizeof(MoERouting));
    }
    m->sync_aux = 1;  // every rank runs this, so BTT-MoE layers may sum their statistics over ranks
    m->micro_loss[micro] = gpt2_forward(m, inputs, targets, B, T);
    m->sync_aux = 0;
    m->micro_routing[micro] = m->routing;
    gpt2_backward(m, dloss_scale, B, T);
}

static void trainer_step_losses(GPT2 *m, int n, float *loss, MoERouting *routing) {
    if (n > m->micro_cap) fatal("internal: %d micro-batches' losses asked for, %d ran", n, m->micro_cap);
    memcpy(loss, m->micro_loss, (size_t)n * sizeof(float));
    memcpy(routing, m->micro_routing, (size_t)n * sizeof(MoERouting));
}

static void trainer_mean_grads(GPT2 *m, const MultiProc *mp) {
    if (m->zero.stage) multiproc_reduce_scatter_mean(mp, m->grads, m->zero.shard);
    else multiproc_mean(mp, m->grads, m->num_params);
}

// The data of checkpoint f (its paths and TrainState filled by the driver): copied into w's
// snapshot buffers, or with may_borrow (written at once, before anything changes) pointed at the
// model's own memory.
static void trainer_checkpoint_snapshot(GPT2 *m, CkptFiles *f, CkptWriter *w, int may_borrow) {
    size_t n = m->num_params, nm = gpt2_moments_len(m);
    // before the first update there are no moments yet: write zeros, which is what they are
    if (!m->m) {
        m->m = (float *)callocCheck(nm, sizeof(float));
        m->v = (float *)callocCheck(nm, sizeof(float));
    }
    f->model_version = m->config_text ? MODEL_VERSION_STRUCT_FP32 : MODEL_VERSION_FP32;
    f->config = m->config;
    f->config_text = m->config_text;
    f->n_model = n;
    f->st.num_params = (int64_t)nm;  // this rank's slice with ZeRO-1
    f->master = NULL;
    if (may_borrow) {
        f->model = m->params;
        f->m = m->m;
        f->v = m->v;
        return;
    }
    float *model = f->model_path[0] ? (float *)ckpt_buffer(w, CKPT_BUF_MODEL, n * sizeof(float)) : NULL;
    float *mm = (float *)ckpt_buffer(w, CKPT_BUF_M, nm * sizeof(float)), *vv = (float *)ckpt_buffer(w, CKPT_BUF_V, nm * sizeof(float));
    if (model) memcpy(model, m->params, n * sizeof(float));
    memcpy(mm, m->m, nm * sizeof(float));
    memcpy(vv, m->v, nm * sizeof(float));
    f->model = model;
    f->m = mm;
    f->v = vv;
}

static void trainer_read_state(GPT2 *m, const char *state_path, TrainState *st) {
    if (!m->m) {
        m->m = (float *)callocCheck(gpt2_moments_len(m), sizeof(float));
        m->v = (float *)callocCheck(gpt2_moments_len(m), sizeof(float));
    }
    state_read(state_path, st, m->m, m->v, NULL, gpt2_moments_len(m), NULL, 0);
}
static void trainer_prepare(GPT2 *m) { (void)m; }  // nothing to choose: one kernel per op

#ifdef TESTING
// A model that holds one linear layer, `spec`, as block 0's fc (what the layer benchmark times and
// the unit tests check): ld describes it, m->params holds its weights and bias, uninitialised.
static void single_linear_model(GPT2 *m, LinearDesc *ld, const LinearSpec *spec) {
    memset(m, 0, sizeof(*m));
    params_init(&m->layout.params);
    memset(ld, 0, sizeof(*ld));
    ld->spec = *spec;
    ld->layer = 0; ld->role = SR_FC; ld->used = 1;
    linear_add_weights(&m->layout.params, ld, 768, 0);
    linear_add_bias(&m->layout.params, ld);
    m->num_params = m->layout.params.total;
    m->params = (float *)mallocCheck(m->num_params * sizeof(float));
}
#else
#include "common/train_main.h"
#endif
