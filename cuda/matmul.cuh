// cuda/matmul.cuh: dense linear layers on cuBLASLt with bias and GELU epilogues (forward: BIAS, GELU_AUX_BIAS; backward: DGELU), deterministic dbias, GELU kernels.
#pragma once
#include "common.cuh"
#include "reduce.cuh"

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2/pi)

// ----------------------------------------------------------------------------------------------
// GELU (tanh approximation, as GPT-2 and the CPU trainer), used when it is not fused

// GELU and its derivative, the one formula every kernel that applies them uses
static __device__ __forceinline__ float gelu_f(float v) {
    float cube = 0.044715f * v * v * v;
    return 0.5f * v * (1.0f + tanhf(GELU_SCALING_FACTOR * (v + cube)));
}
static __device__ __forceinline__ float gelu_grad_f(float v) {
    float th = tanhf(GELU_SCALING_FACTOR * (v + 0.044715f * v * v * v));
    float sech2 = 1.0f - th * th;
    return 0.5f * (1.0f + th) + 0.5f * v * sech2 * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * v * v);
}

__global__ void gelu_forward_kernel(floatX *out, const floatX *inp, size_t n8) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    x128 x = load128(inp + i * 8), o;
    for (int k = 0; k < 8; k++) o[k] = (floatX)gelu_f((float)x[k]);
    store128(out + i * 8, o);
}

// d = gelu'(pre) * d, in place
__global__ void gelu_backward_inplace_kernel(floatX *d, const floatX *pre, size_t n8) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    x128 x = load128(pre + i * 8), g = load128(d + i * 8), o;
    for (int k = 0; k < 8; k++) o[k] = (floatX)(gelu_grad_f((float)x[k]) * (float)g[k]);
    store128(d + i * 8, o);
}

static void gelu_forward(floatX *out, const floatX *inp, size_t n) {
    size_t n8 = n / 8;
    gelu_forward_kernel<<<ceil_div_i((long)n8, 256), 256>>>(out, inp, n8);
    cudaCheckLaunch();
}
static void gelu_backward_inplace(floatX *d, const floatX *pre, size_t n) {
    size_t n8 = n / 8;
    gelu_backward_inplace_kernel<<<ceil_div_i((long)n8, 256), 256>>>(d, pre, n8);
    cudaCheckLaunch();
}

// out (N, OC) += bias, broadcast over rows (the fallback when the BIAS epilogue is unavailable)
__global__ void add_bias_kernel(floatX *out, const floatX *bias, size_t N, int OC) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * (size_t)OC / 8) return;
    int c = (int)((i * 8) % OC);
    x128 o = load128(out + i * 8), b = load128(bias + c);
    for (int k = 0; k < 8; k++) o[k] = (floatX)((float)o[k] + (float)b[k]);
    store128(out + i * 8, o);
}

// ----------------------------------------------------------------------------------------------
// cuBLASLt. Column-major view of our row-major buffers: a row-major (rows, cols) matrix is a
// column-major (cols, rows) one. D (m, n) = op(A) (m, k) · op(B) (k, n) [+ D] [epilogue].

// Largest power of two (<= 256) that divides the address: cuBLASLt assumes 256-byte aligned
// buffers unless told otherwise, and our parameter tensors sit at arbitrary offsets.
static inline uint32_t ptr_alignment(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t al = 256;
    while (al > 1 && (a % al) != 0) al >>= 1;
    return al;
}

// One cuBLASLt matmul as data, column-major: D (m x n, ldd) = op(A) (m x k) · op(B) (k x n) [+ D]
// [epilogue], `batch` products with element strides sa, sb, sd. A leading dimension of 0 is the
// packed one. Epilogues: bias (length m, bias_stride further on per product); with gelu_aux,
// forward GELU_AUX(_BIAS) (gelu_aux = the pre-activation written, D = its GELU) or, with
// backward, DGELU (D times GELU' of gelu_aux, read); gelu_aux has D's shape with aux_ld and
// aux_stride (0: ldd and sd).
typedef struct {
    floatX *d;
    const floatX *a, *b;
    int m, n, k, transA, transB, accumulate;
    int64_t lda, ldb, ldd;
    int batch;
    int64_t sa, sb, sd;
    const floatX *bias;
    int64_t bias_stride;
    floatX *gelu_aux;
    int64_t aux_ld, aux_stride;
    int backward;
} LtMatmul;

// Returns 0 (and does nothing) when cuBLASLt has no algorithm for this epilogue, so that the
// caller can fall back to separate kernels; any other failure is fatal.
static int lt_matmul(const LtMatmul *g) {
    const int m = g->m, n = g->n, k = g->k;
    if (((uintptr_t)g->a % 16) || ((uintptr_t)g->b % 16) || ((uintptr_t)g->d % 16) || ((uintptr_t)g->bias % 16) || ((uintptr_t)g->gelu_aux % 16)) {
        fprintf(stderr, "error: internal: cuBLASLt operands must be 16-byte aligned (m %d n %d k %d)\n", m, n, k);
        exit(EXIT_FAILURE);
    }
    cublasLtMatmulDesc_t op;
    cublasCheck(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t tN = CUBLAS_OP_N, tT = CUBLAS_OP_T;
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, g->transA ? &tT : &tN, sizeof(tN)));
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, g->transB ? &tT : &tN, sizeof(tN)));
    cublasLtMatrixLayout_t la, lb, lc;
    const int64_t ldd = g->ldd ? g->ldd : m;
    if (g->transA) cublasCheck(cublasLtMatrixLayoutCreate(&la, CUBLAS_LOWP, k, m, g->lda ? g->lda : k));
    else cublasCheck(cublasLtMatrixLayoutCreate(&la, CUBLAS_LOWP, m, k, g->lda ? g->lda : m));
    if (g->transB) cublasCheck(cublasLtMatrixLayoutCreate(&lb, CUBLAS_LOWP, n, k, g->ldb ? g->ldb : n));
    else cublasCheck(cublasLtMatrixLayoutCreate(&lb, CUBLAS_LOWP, k, n, g->ldb ? g->ldb : k));
    cublasCheck(cublasLtMatrixLayoutCreate(&lc, CUBLAS_LOWP, m, n, ldd));  // C and D share the layout
    if (g->batch > 1) {
        const int32_t nb = g->batch;
        const int64_t strides[3] = {g->sa, g->sb, g->sd};
        cublasLtMatrixLayout_t ls[3] = {la, lb, lc};
        for (int i = 0; i < 3; i++) {
            cublasCheck(cublasLtMatrixLayoutSetAttribute(ls[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &nb, sizeof(nb)));
            cublasCheck(cublasLtMatrixLayoutSetAttribute(ls[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i], sizeof(strides[i])));
        }
    }

    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
    if (g->gelu_aux) {
        const int64_t ld = g->aux_ld ? g->aux_ld : ldd, as = g->aux_stride ? g->aux_stride : g->sd;
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof(ld)));
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g->gelu_aux, sizeof(g->gelu_aux)));
        if (g->batch > 1) cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, &as, sizeof(as)));
        epi = g->backward ? CUBLASLT_EPILOGUE_DGELU : (g->bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX);
    } else if (g->bias) {
        epi = CUBLASLT_EPILOGUE_BIAS;
    }
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    if (g->bias) {
        cudaDataType_t bt = CUBLAS_LOWP;
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g->bias, sizeof(g->bias)));
        if (g->batch > 1)
            cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &g->bias_stride, sizeof(g->bias_stride)));
    }
    cudaDataType_t st = CUDA_R_32F;
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_SCALE_TYPE, &st, sizeof(st)));

    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &g_gpu.lt_workspace_size,
                                                     sizeof(g_gpu.lt_workspace_size)));
    uint32_t al_a = ptr_alignment(g->a), al_b = ptr_alignment(g->b), al_d = ptr_alignment(g->d);
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d, sizeof(al_d)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof(al_d)));

    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(g_gpu.cublaslt, op, la, lb, lc, lc, pref, 1, &heur, &found);
    int ok = hs == CUBLAS_STATUS_SUCCESS && found > 0;
    if (ok) {
        const float alpha = 1.0f, beta = g->accumulate ? 1.0f : 0.0f;
        cublasCheck(cublasLtMatmul(g_gpu.cublaslt, op, &alpha, g->a, la, g->b, lb, &beta, g->d, lc, g->d, lc, &heur.algo, g_gpu.lt_workspace,
                                   g_gpu.lt_workspace_size, 0));
    }
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    cublasCheck(cublasLtMatmulDescDestroy(op));
    cublasCheck(cublasLtMatrixLayoutDestroy(la));
    cublasCheck(cublasLtMatrixLayoutDestroy(lb));
    cublasCheck(cublasLtMatrixLayoutDestroy(lc));
    return ok;
}

// One packed, unbatched product (the dense layers').
static int matmul_cublaslt(floatX *d, const floatX *a, const floatX *b, const floatX *bias, int m, int n, int k, int transA,
                           int transB, int accumulate, floatX *gelu_aux, int backward) {
    LtMatmul g;
    memset(&g, 0, sizeof(g));
    g.d = d; g.a = a; g.b = b; g.m = m; g.n = n; g.k = k; g.transA = transA; g.transB = transB; g.accumulate = accumulate;
    g.batch = 1; g.bias = bias; g.gelu_aux = gelu_aux; g.backward = backward;
    return lt_matmul(&g);
}

// The same with no epilogue: there must be an algorithm.
static void matmul_plain(floatX *d, const floatX *a, const floatX *b, int m, int n, int k, int transA, int transB, int accumulate) {
    if (!matmul_cublaslt(d, a, b, NULL, m, n, k, transA, transB, accumulate, NULL, 0)) {
        fprintf(stderr, "error: cuBLASLt found no bf16 algorithm for m %d n %d k %d; the dimensions must be multiples of 8\n", m, n, k);
        exit(EXIT_FAILURE);
    }
}

// out (N, OC) = inp (N, C) @ w^T (w: OC x C; w_t: w is C x OC, out = inp @ w) + bias. With
// pre_gelu: pre_gelu = that, and out = GELU(pre_gelu), fused into the epilogue when
// g_gpu.gelu_fusion >= 1 and cuBLASLt can.
static void matmul_forward(floatX *out, const floatX *inp, const floatX *w, const floatX *bias, int N, int C, int OC, floatX *pre_gelu,
                           int w_t = 0) {
    if (pre_gelu && g_gpu.gelu_fusion >= 1 && matmul_cublaslt(out, w, inp, bias, OC, N, C, !w_t, 0, 0, pre_gelu, 0)) return;
    floatX *dst = pre_gelu ? pre_gelu : out;
    if (!bias || !matmul_cublaslt(dst, w, inp, bias, OC, N, C, !w_t, 0, 0, NULL, 0)) {
        matmul_plain(dst, w, inp, OC, N, C, !w_t, 0, 0);
        if (bias) {
            add_bias_kernel<<<ceil_div_i((long)N * OC / 8, 256), 256>>>(dst, bias, (size_t)N, OC);
            cudaCheckLaunch();
        }
    }
    if (pre_gelu) gelu_forward(out, pre_gelu, (size_t)N * OC);
}

// dinp (N, C) = dout (N, OC) @ w, overwritten (may be NULL); with pre_gelu (the forward's
// pre-activation of this layer's input, N x C) dinp is the gradient before the GELU instead.
// dw (OC, C) += dout^T @ inp; dbias (OC) += column sums of dout (deterministic, reduce.cuh).
// w_t: w and dw are C x OC, and dw is overwritten (a materialized structured layer's scratch).
static void matmul_backward(floatX *dinp, floatX *dw, floatX *dbias, const floatX *dout, const floatX *inp, const floatX *w, int N,
                            int C, int OC, const floatX *pre_gelu, float *scratch, int w_t = 0) {
    if (dbias) column_sums(dbias, NULL, dout, NULL, NULL, NULL, N, OC, scratch);
    if (dinp) {
        int fused = pre_gelu && g_gpu.gelu_fusion >= 2 && matmul_cublaslt(dinp, w, dout, NULL, C, N, OC, w_t, 0, 0, (floatX *)pre_gelu, 1);
        if (!fused) {
            matmul_plain(dinp, w, dout, C, N, OC, w_t, 0, 0);
            if (pre_gelu) gelu_backward_inplace(dinp, pre_gelu, (size_t)N * C);
        }
    }
    if (w_t) matmul_plain(dw, dout, inp, OC, C, N, 0, 1, 0);
    else matmul_plain(dw, inp, dout, C, OC, N, 0, 1, 1);
}
