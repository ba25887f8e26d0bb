// cuda/layernorm.cuh: LayerNorm and fused residual + LayerNorm forward, LayerNorm backward (fp32 statistics, deterministic weight gradients).
#pragma once
#include "common.cuh"
#include "reduce.cuh"

// One warp per row; each lane owns the same 8-column chunks in every pass, so a lane re-reads
// only what it wrote itself. eps 1e-5, biased variance (as the CPU trainer and GPT-2).
// With inp2: res = inp1 + inp2 is written (bf16) and normalised; else res = inp1 is read.
__global__ void layernorm_forward_kernel(floatX *out, float *mean, float *rstd, floatX *res, const floatX *inp1, const floatX *inp2,
                                         const floatX *w, const floatX *b, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    size_t base = (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane * 8; c < C; c += 256) {
        x128 a = load128(inp1 + base + c);
        if (inp2) {
            x128 bb = load128(inp2 + base + c), r;
            for (int k = 0; k < 8; k++) r[k] = (floatX)((float)a[k] + (float)bb[k]);
            store128(res + base + c, r);
            a = r;
        }
        for (int k = 0; k < 8; k++) sum += (float)a[k];
    }
    const floatX *x = inp2 ? res : inp1;
    float m = warp_sum(sum) / C;
    float var = 0.0f;
    for (int c = lane * 8; c < C; c += 256) {
        x128 a = load128(x + base + c);
        for (int k = 0; k < 8; k++) { float d = (float)a[k] - m; var += d * d; }
    }
    float s = rsqrtf(warp_sum(var) / C + 1e-5f);
    for (int c = lane * 8; c < C; c += 256) {
        x128 a = load128(x + base + c), ww = load128(w + c), bb = load128(b + c), o;
        for (int k = 0; k < 8; k++) o[k] = (floatX)((s * ((float)a[k] - m)) * (float)ww[k] + (float)bb[k]);
        store128(out + base + c, o);
    }
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = s;
    }
}

static void layernorm_forward(floatX *out, float *mean, float *rstd, const floatX *inp, const floatX *w, const floatX *b, int N, int C) {
    layernorm_forward_kernel<<<ceil_div_i(N, 8), 256>>>(out, mean, rstd, NULL, inp, NULL, w, b, N, C);
    cudaCheckLaunch();
}

// res = inp1 + inp2; out = LayerNorm(res)
static void fused_residual_layernorm_forward(floatX *res, floatX *out, float *mean, float *rstd, const floatX *inp1, const floatX *inp2,
                                             const floatX *w, const floatX *b, int N, int C) {
    layernorm_forward_kernel<<<ceil_div_i(N, 8), 256>>>(out, mean, rstd, res, inp1, inp2, w, b, N, C);
    cudaCheckLaunch();
}

// dinp += the gradient through the normalisation (warp per row; rows are independent)
__global__ void layernorm_backward_dinp_kernel(floatX *dinp, const floatX *dout, const floatX *inp, const floatX *w, const float *mean,
                                               const float *rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    size_t base = (size_t)row * C;
    float m = mean[row], s = rstd[row];
    float dmean = 0.0f, dnorm_mean = 0.0f;
    for (int c = lane * 8; c < C; c += 256) {
        x128 d = load128(dout + base + c), x = load128(inp + base + c), ww = load128(w + c);
        for (int k = 0; k < 8; k++) {
            float n = ((float)x[k] - m) * s, dn = (float)ww[k] * (float)d[k];
            dmean += dn;
            dnorm_mean += dn * n;
        }
    }
    dmean = warp_sum(dmean) / C;
    dnorm_mean = warp_sum(dnorm_mean) / C;
    for (int c = lane * 8; c < C; c += 256) {
        x128 d = load128(dout + base + c), x = load128(inp + base + c), ww = load128(w + c), di = load128(dinp + base + c);
        for (int k = 0; k < 8; k++) {
            float n = ((float)x[k] - m) * s, dn = (float)ww[k] * (float)d[k];
            di[k] = (floatX)((float)di[k] + (dn - dmean - n * dnorm_mean) * s);
        }
        store128(dinp + base + c, di);
    }
}

// dinp (the residual stream's gradient), dw and db are accumulated into.
static void layernorm_backward(floatX *dinp, floatX *dw, floatX *db, const floatX *dout, const floatX *inp, const floatX *w,
                               const float *mean, const float *rstd, int N, int C, float *scratch) {
    layernorm_backward_dinp_kernel<<<ceil_div_i(N, 8), 256>>>(dinp, dout, inp, w, mean, rstd, N, C);
    cudaCheckLaunch();
    column_sums(db, dw, dout, inp, mean, rstd, N, C, scratch);
}
