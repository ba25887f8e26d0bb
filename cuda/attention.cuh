// cuda/attention.cuh: causal multi-head attention forward/backward: cuBLAS strided-batched GEMMs + our own causal softmax kernels (the portable path).
//
// Design. This is llm.c's non-cuDNN attention: q, k, v are permuted to (B, NH, T, hs), the scores
// q·kᵀ go through one strided-batched GEMM into an fp32 (B, NH, T, T) scratch, a warp-per-row
// causal softmax writes the bf16 probabilities `att` (kept per layer for the backward), and a
// second GEMM gives att·v. The full T x T square is computed (2x the causal FLOPs) and att costs
// B·NH·T²·2 bytes per layer: at 124M, B=64, T=1024 that is 19 GB over 12 layers. It is the
// trainer's -fa 0 because it is simple, deterministic and runs on every sm_80+ GPU with nothing
// but cuBLAS, at any head size; -fa 1 (flash_attention.cuh, ours) and -fa 2 (cudnn_attention.h)
// need no T x T buffer.
#pragma once
#include "common.cuh"

// Element idx of a (B, NH, T, hs) tensor: its offset in a token-major buffer whose rows (one per
// (b, t)) are row_len wide with head h's hs values at h·hs (qkv: row_len 3C, the q part; out: C).
__device__ inline size_t attn_token_major_offset(size_t idx, int T, int NH, int hs, size_t row_len) {
    const int d = (int)(idx % hs);
    size_t rest = idx / hs;
    const int t = (int)(rest % T);
    rest /= T;
    const int h = (int)(rest % NH), b = (int)(rest / NH);
    return ((size_t)b * T + t) * row_len + (size_t)h * hs + d;
}

// qkv (B, T, 3, NH, hs) -> q, k, v each (B, NH, T, hs); backward = 1: the reverse, dq, dk, dv ->
// dqkv (every element of dqkv written)
__global__ void attn_permute_kernel(floatX *q, floatX *k, floatX *v, floatX *qkv, int B, int T, int NH, int hs, int backward) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * NH * T * hs) return;
    const size_t C = (size_t)NH * hs, o = attn_token_major_offset(idx, T, NH, hs, 3 * C);
    if (backward) {
        qkv[o] = q[idx];
        qkv[o + C] = k[idx];
        qkv[o + 2 * C] = v[idx];
    } else {
        q[idx] = qkv[o];
        k[idx] = qkv[o + C];
        v[idx] = qkv[o + 2 * C];
    }
}

// (B, NH, T, hs) <-> (B, T, C); to_btc = 1: y -> out, else the reverse
__global__ void attn_unpermute_kernel(floatX *btc, floatX *bnth, int B, int T, int NH, int hs, int to_btc) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * NH * T * hs) return;
    const size_t o = attn_token_major_offset(idx, T, NH, hs, (size_t)NH * hs);
    if (to_btc) btc[o] = bnth[idx];
    else bnth[idx] = btc[o];
}

// One warp per row (b, h, t): att[t2] = softmax_t2(scale * pre[t2]) over t2 <= t, 0 above.
__global__ void attn_softmax_forward_kernel(floatX *att, const float *pre, int rows, int T, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % T;
    const float *p = pre + (size_t)row * T;
    float m = -FLT_MAX, s = 0.0f;
    for (int i = lane; i <= t; i += 32) {
        float x = p[i] * scale;
        if (x > m) { s = s * __expf(m - x) + 1.0f; m = x; }
        else s += __expf(x - m);
    }
    warp_softmax_reduce(m, s);
    float inv = 1.0f / s;
    floatX *a = att + (size_t)row * T;
    for (int i = lane; i < T; i += 32) a[i] = (floatX)(i <= t ? __expf(p[i] * scale - m) * inv : 0.0f);
}

// One warp per row, in place: att (probabilities) becomes the gradient of the unscaled scores,
// scale * att * (datt - Σ att·datt) on t2 <= t and 0 above.
__global__ void attn_softmax_backward_kernel(floatX *att_dpre, const float *datt, int rows, int T, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % T;
    floatX *a = att_dpre + (size_t)row * T;
    const float *d = datt + (size_t)row * T;
    float dot = 0.0f;
    for (int i = lane; i <= t; i += 32) dot += (float)a[i] * d[i];
    dot = warp_sum(dot);
    for (int i = lane; i < T; i += 32) a[i] = (floatX)(i <= t ? scale * (float)a[i] * (d[i] - dot) : 0.0f);
}

// C = op(A) op(B), batched over B·NH; fp32 or bf16 output; column-major arguments as cuBLAS.
static void attn_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const floatX *A, int lda, long long sA, const floatX *Bm,
                      int ldb, long long sB, void *Cm, cudaDataType_t ctype, int ldc, long long sC, int batch) {
    const float alpha = 1.0f, beta = 0.0f;
    cublasCheck(cublasGemmStridedBatchedEx(g_gpu.cublas, ta, tb, m, n, k, &alpha, A, CUBLAS_LOWP, lda, sA, Bm, CUBLAS_LOWP, ldb, sB, &beta,
                                           Cm, ctype, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

typedef struct {
    floatX *q, *k, *v, *y;     // (B, NH, T, hs) each: permuted inputs and the output before unpermuting
    floatX *dq, *dk, *dv;      // backward
    float *scores;             // (B, NH, T, T) fp32: q·kᵀ in the forward, d(att) in the backward
} AttnScratch;

// out (B, T, C) from qkv (B, T, 3C); att (B, NH, T, T) keeps the probabilities.
static void attention_forward(floatX *out, floatX *att, const floatX *qkv, AttnScratch *s, int B, int T, int C, int NH) {
    int hs = C / NH, batch = B * NH;
    size_t n = (size_t)B * T * C;
    attn_permute_kernel<<<ceil_div_i((long)n, 256), 256>>>(s->q, s->k, s->v, (floatX *)qkv, B, T, NH, hs, 0);
    cudaCheckLaunch();
    long long sTH = (long long)T * hs, sTT = (long long)T * T;
    // scores[t][t2] = q[t]·k[t2]: column-major (t2, t) = kᵀ-op (T x hs) · q (hs x T)
    attn_gemm(CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, s->k, hs, sTH, s->q, hs, sTH, s->scores, CUDA_R_32F, T, sTT, batch);
    int rows = batch * T;
    attn_softmax_forward_kernel<<<ceil_div_i(rows, 8), 256>>>(att, s->scores, rows, T, 1.0f / sqrtf((float)hs));
    cudaCheckLaunch();
    // y[t][d] = Σ_t2 att[t][t2] v[t2][d]: column-major (d, t) = v (hs x T) · att (T x T)
    attn_gemm(CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, s->v, hs, sTH, att, T, sTT, s->y, CUBLAS_LOWP, hs, sTH, batch);
    attn_unpermute_kernel<<<ceil_div_i((long)n, 256), 256>>>(out, s->y, B, T, NH, hs, 1);
    cudaCheckLaunch();
}

// dqkv (B, T, 3C) is overwritten; att is consumed (it becomes the score gradient in place).
static void attention_backward(floatX *dqkv, const floatX *dout, const floatX *qkv, floatX *att, AttnScratch *s, int B, int T, int C, int NH) {
    int hs = C / NH, batch = B * NH;
    size_t n = (size_t)B * T * C;
    long long sTH = (long long)T * hs, sTT = (long long)T * T;
    attn_permute_kernel<<<ceil_div_i((long)n, 256), 256>>>(s->q, s->k, s->v, (floatX *)qkv, B, T, NH, hs, 0);
    cudaCheckLaunch();
    attn_unpermute_kernel<<<ceil_div_i((long)n, 256), 256>>>((floatX *)dout, s->y, B, T, NH, hs, 0);  // y <- dout permuted
    cudaCheckLaunch();
    // datt[t][t2] = dy[t]·v[t2]   (fp32)
    attn_gemm(CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, s->v, hs, sTH, s->y, hs, sTH, s->scores, CUDA_R_32F, T, sTT, batch);
    // dv[t2][d] = Σ_t att[t][t2] dy[t][d]: column-major (d, t2) = dy (hs x T) · attᵀ
    attn_gemm(CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, s->y, hs, sTH, att, T, sTT, s->dv, CUBLAS_LOWP, hs, sTH, batch);
    int rows = batch * T;
    attn_softmax_backward_kernel<<<ceil_div_i(rows, 8), 256>>>(att, s->scores, rows, T, 1.0f / sqrtf((float)hs));
    cudaCheckLaunch();
    // dq[t][d] = Σ_t2 dpre[t][t2] k[t2][d]: (d, t) = k (hs x T) · dpre (T x T)
    attn_gemm(CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, s->k, hs, sTH, att, T, sTT, s->dq, CUBLAS_LOWP, hs, sTH, batch);
    // dk[t2][d] = Σ_t dpre[t][t2] q[t][d]: (d, t2) = q (hs x T) · dpreᵀ
    attn_gemm(CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, s->q, hs, sTH, att, T, sTT, s->dk, CUBLAS_LOWP, hs, sTH, batch);
    attn_permute_kernel<<<ceil_div_i((long)n, 256), 256>>>(s->dq, s->dk, s->dv, dqkv, B, T, NH, hs, 1);
    cudaCheckLaunch();
}
