// structured/materialize.cuh: BTT and Monarch layers as dense GEMMs on their materialized weight
// (-sm 1; -sm 2 for the layers exec_model.h finds faster so).
//
// A BTT or Monarch layer is x ↦ x W(θ) (+ b) for a d_in x d_out matrix W of its cores θ. Where
// its plans move more bytes per row than a dense GEMM costs in FLOPs (small widths, higher
// ranks), W can be materialized and the layer run as dense GEMMs, with dL/dθ from dW = xᵀ dy.
// Each element of W is a short sum of products of the cores' entries (ρ of them for a BTT, q/nb
// for a Monarch), written by one kernel; the cores' gradients come from two kernels that read dW
// once each. (Until 2026-12-04 W was the plans' forward on the d_in rows of the identity and
// dL/dθ their weight backward on those rows, din rows of x and z through memory several times:
// dev/cuda/structured_weight v1.)
// The result is the same function up to W's bf16 rounding; the layer costs a dense layer's time
// plus a few passes over W (it can never beat dense, only stop trailing it). W is rebuilt in
// every forward and backward (it depends on the weights only), in one scratch shared by the
// layers (st_dense_*); the W, dW and bias regions start on 16 bytes.
#pragma once
#include "../cuda/matmul.cuh"
#include "../cuda/reduce.cuh"
#include "exec_model.h"
#include "plan_gpu.cuh"
#include "spec.h"
#include "step_hook.h"

static int g_st_dense = 0;  // 1: BTT and Monarch layers run as dense GEMMs on materialized weights; 2: those exec_model.h picks

// A BTT's or Monarch's d_in and d_out.
static void st_dense_dims(int kind, const void *shape, int *din, int *dout) {
    if (kind == STRUCT_BTT) {
        const BTTShape *s = (const BTTShape *)shape;
        *din = s->d_in; *dout = s->d_out;
    } else {
        const MonarchShape *m = (const MonarchShape *)shape;
        *din = m->d_in; *dout = m->d_out;
    }
}

// Scratch elements one layer run alone needs (st_dense_forward/backward: W and dW, each rounded
// up to 16 bytes).
static size_t st_dense_elems(int kind, const void *shape) {
    int din, dout;
    st_dense_dims(kind, shape, &din, &dout);
    return 2 * st_pad8_elems((size_t)din * dout);
}
static size_t btt_dense_elems(const BTTShape *s) { return st_dense_elems(STRUCT_BTT, s); }
static size_t monarch_dense_elems(const MonarchShape *m) { return st_dense_elems(STRUCT_MONARCH, m); }

// BTT's W straight from the cores, no identity rows: element (g α + a, f ε + e) is
// Σ_s W0[g, a, f ρ + s] W1[f, g ρ + s, e] (btt.h), summed in fp32 and rounded once. It writes W
// once and reads the cores from cache, where the plans on the identity rows move din rows of x,
// z (several times) and y. One thread per element, a row of W per grid row.
__global__ void btt_weight_kernel(floatX *W, int ldw, const floatX *W0, const floatX *W1, int A, int G, int P, int E, int R) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    if (o >= P * E) return;
    const int g = i / A, f = o / E, e = o % E;
    const floatX *w0 = W0 + (size_t)i * P * R + (size_t)f * R;
    const floatX *w1 = W1 + ((size_t)f * G * R + (size_t)g * R) * E + e;
    float acc = 0.0f;
    for (int s = 0; s < R; s++) acc += (float)w0[s] * (float)w1[(size_t)s * E];
    W[(size_t)i * ldw + o] = (floatX)acc;
}

// dW0[g, a, f ρ + s] += Σ_e dW[g α + a, f ε + e] W1[f, g ρ + s, e]: a warp per (row i, block f),
// its lanes along e (contiguous in dW's row and in W1's), the rank's sums reduced across the warp.
__global__ void btt_weight_backward_w0_kernel(floatX *dW0, const floatX *dW, int ldw, const floatX *W1, int A, int G, int P, int E, int R,
                                              int din) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= din * P) return;
    const int i = warp / P, f = warp % P, g = i / A;
    const floatX *dw = dW + (size_t)i * ldw + (size_t)f * E;
    for (int s = 0; s < R; s++) {
        const floatX *w1 = W1 + ((size_t)f * G * R + (size_t)g * R + s) * E;
        float acc = 0.0f;
        for (int e = lane; e < E; e += 32) acc += (float)dw[e] * (float)w1[e];
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) {
            floatX *out = dW0 + (size_t)i * P * R + (size_t)f * R + s;
            *out = (floatX)((float)*out + acc);
        }
    }
}

// dW1[f, g ρ + s, e] += Σ_a W0[g, a, f ρ + s] dW[g α + a, f ε + e]: a thread per (f, g, e) and its
// ρ sums over a; neighbouring threads read neighbouring e of dW's rows.
__global__ void btt_weight_backward_w1_kernel(floatX *dW1, const floatX *dW, int ldw, const floatX *W0, int A, int G, int P, int E, int R) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)P * G * E) return;
    const int e = (int)(t % E), g = (int)(t / E % G), f = (int)(t / ((size_t)E * G));
    const floatX *dw = dW + (size_t)g * A * ldw + (size_t)f * E + e;
    const floatX *w0 = W0 + (size_t)g * A * P * R + (size_t)f * R;
    for (int s = 0; s < R; s++) {
        float acc = 0.0f;
        for (int a = 0; a < A; a++) acc += (float)w0[(size_t)a * P * R + s] * (float)dw[(size_t)a * ldw];
        floatX *out = dW1 + ((size_t)f * G * R + (size_t)g * R + s) * E + e;
        *out = (floatX)((float)*out + acc);
    }
}

static void btt_weight_gpu(floatX *W, int ldw, const BTTShape *b, const floatX *W0, const floatX *W1) {
    const dim3 grid(ceil_div_i(b->d_out, 256), b->d_in);
    btt_weight_kernel<<<grid, 256>>>(W, ldw ? ldw : b->d_out, W0, W1, b->alpha, b->gamma, b->phi, b->eps, b->rank);
    cudaCheckLaunch();
}

static void btt_weight_backward_gpu(floatX *dW0, floatX *dW1, const floatX *dW, int ldw, const BTTShape *b, const floatX *W0, const floatX *W1) {
    const int ld = ldw ? ldw : b->d_out;
    btt_weight_backward_w0_kernel<<<ceil_div_i((long)b->d_in * b->phi * 32, 256), 256>>>(dW0, dW, ld, W1, b->alpha, b->gamma, b->phi, b->eps,
                                                                                         b->rank, b->d_in);
    cudaCheckLaunch();
    btt_weight_backward_w1_kernel<<<ceil_div_i((long)b->phi * b->gamma * b->eps, 256), 256>>>(dW1, dW, ld, W0, b->alpha, b->gamma, b->phi,
                                                                                            b->eps, b->rank);
    cudaCheckLaunch();
}

// Monarch's W straight from R and L. Output column i nb + l reads u element r nb + l, which lies in
// input block k's stage 1 (element j = r nb + l - k q of it) for the r of [lo, hi) that
// monarch_r_range gives for (k, l) (q / nb of them, at least one when q >= nb; none for some
// blocks when q < nb). So for each pair (k, l) of an input block and an output column class:
//   W[k p + c, i nb + l]  = Σ_r L[l, i, r] R[(r nb + l) p + c]              (a product over r)
//   dR[(r nb + l) p + c] += Σ_i L[l, i, r] dW[k p + c, i nb + l]            (over i)
//   dL[l, i, r]          += Σ_c dW[k p + c, i nb + l] R[(r nb + l) p + c]   (over c)
// Each is a small product per (k, l), computed by blocks of MW_T x 8 threads over MW_T x MW_T
// tiles of the output (thread (tx, ty): column tx, rows ty + 8u, u < MW_T / 8), both operands
// staged through shared memory in chunks of MW_T along the sum with coalesced loads (each load's
// lanes along the operand's contiguous index: R's c, L's r, dW's i nb + l, nb elements apart),
// fp32 sums in a fixed order (deterministic). Until 2026-12-05 one thread per output element
// walked its own rows of L and R, each warp load touching 32 rows (dev/cuda/structured_weight v2).
__device__ __forceinline__ void monarch_r_range(int k, int l, int q, int nb, int *lo, int *hi) {
    const int a = k * q - l, b = (k + 1) * q - l;  // r nb in [a, b)
    *lo = a > 0 ? (a + nb - 1) / nb : 0;
    *hi = b > 0 ? (b + nb - 1) / nb : 0;
    if (*hi > q) *hi = q;
}
#define MW_T 32
#define MW_ROWS (MW_T / 8)  // output rows per thread

// blockIdx: x i tile, y c tile, z = k nb + l. W overwritten (zeros where (k, l) meet in no u element).
__global__ void __launch_bounds__(MW_T * 8) monarch_weight_kernel(floatX *W, int ldw, const floatX *R, const floatX *L, int nb, int p, int s, int q) {
    __shared__ float Ls[MW_T][MW_T + 1], Rs[MW_T][MW_T + 1];  // [i][r], [r][c]
    const int tx = threadIdx.x, ty = threadIdx.y, k = blockIdx.z / nb, l = blockIdx.z % nb;
    const int i0 = blockIdx.x * MW_T, c0 = blockIdx.y * MW_T;
    int lo, hi;
    monarch_r_range(k, l, q, nb, &lo, &hi);
    float acc[MW_ROWS] = {};
    for (int r0 = lo; r0 < hi; r0 += MW_T) {
        for (int u = 0; u < MW_ROWS; u++) {
            const int a = ty + 8 * u;  // Ls row i0 + a, Rs row r0 + a; lane tx along r, resp. c
            Ls[a][tx] = i0 + a < s && r0 + tx < hi ? (float)L[((size_t)l * s + i0 + a) * q + r0 + tx] : 0.0f;
            Rs[a][tx] = r0 + a < hi && c0 + tx < p ? (float)R[((size_t)(r0 + a) * nb + l) * p + c0 + tx] : 0.0f;
        }
        __syncthreads();
        const int n = min(MW_T, hi - r0);
        for (int t = 0; t < n; t++) {
            const float lv = Ls[tx][t];  // this thread's i = i0 + tx
#pragma unroll
            for (int u = 0; u < MW_ROWS; u++) acc[u] += lv * Rs[t][ty + 8 * u];
        }
        __syncthreads();
    }
    if (i0 + tx < s)
        for (int u = 0; u < MW_ROWS; u++)
            if (c0 + ty + 8 * u < p) W[(size_t)(k * p + c0 + ty + 8 * u) * ldw + (size_t)(i0 + tx) * nb + l] = (floatX)acc[u];
}

// blockIdx: x c tile, y r tile (from lo), z = k nb + l.
__global__ void __launch_bounds__(MW_T * 8) monarch_weight_backward_r_kernel(floatX *dR, const floatX *dW, int ldw, const floatX *L, int nb, int p, int s, int q) {
    __shared__ float Ls[MW_T][MW_T + 1], Ds[MW_T][MW_T + 1];  // [i][r], [i][c]
    const int tx = threadIdx.x, ty = threadIdx.y, k = blockIdx.z / nb, l = blockIdx.z % nb, c0 = blockIdx.x * MW_T;
    int lo, hi;
    monarch_r_range(k, l, q, nb, &lo, &hi);
    const int r0 = lo + blockIdx.y * MW_T;
    if (r0 >= hi) return;  // uniform over the block
    float acc[MW_ROWS] = {};
    for (int i0 = 0; i0 < s; i0 += MW_T) {
        for (int u = 0; u < MW_ROWS; u++) {
            const int a = ty + 8 * u;  // Ls row i0 + a (lane tx along r); Ds column c0 + a (lane tx along i)
            Ls[a][tx] = i0 + a < s && r0 + tx < hi ? (float)L[((size_t)l * s + i0 + a) * q + r0 + tx] : 0.0f;
            Ds[tx][a] = i0 + tx < s && c0 + a < p ? (float)dW[(size_t)(k * p + c0 + a) * ldw + (size_t)(i0 + tx) * nb + l] : 0.0f;
        }
        __syncthreads();
        const int n = min(MW_T, s - i0);
        for (int t = 0; t < n; t++) {
            const float dv = Ds[t][tx];  // this thread's c = c0 + tx
#pragma unroll
            for (int u = 0; u < MW_ROWS; u++) acc[u] += Ls[t][ty + 8 * u] * dv;
        }
        __syncthreads();
    }
    if (c0 + tx < p)
        for (int u = 0; u < MW_ROWS; u++) {
            const int r = r0 + ty + 8 * u;
            if (r < hi) {
                floatX *out = dR + ((size_t)r * nb + l) * p + c0 + tx;
                *out = (floatX)((float)*out + acc[u]);
            }
        }
}

// blockIdx: x r tile (from lo), y i tile, z = k nb + l.
__global__ void __launch_bounds__(MW_T * 8) monarch_weight_backward_l_kernel(floatX *dL, const floatX *dW, int ldw, const floatX *R, int nb, int p, int s, int q) {
    __shared__ float Ds[MW_T][MW_T + 1], Rs[MW_T][MW_T + 1];  // [c][i], [c][r]
    const int tx = threadIdx.x, ty = threadIdx.y, k = blockIdx.z / nb, l = blockIdx.z % nb, i0 = blockIdx.y * MW_T;
    int lo, hi;
    monarch_r_range(k, l, q, nb, &lo, &hi);
    const int r0 = lo + blockIdx.x * MW_T;
    if (r0 >= hi) return;  // uniform over the block
    float acc[MW_ROWS] = {};
    for (int c0 = 0; c0 < p; c0 += MW_T) {
        for (int u = 0; u < MW_ROWS; u++) {
            const int a = ty + 8 * u;  // Ds row c0 + a (lane tx along i); Rs column r0 + a (lane tx along c)
            Ds[a][tx] = c0 + a < p && i0 + tx < s ? (float)dW[(size_t)(k * p + c0 + a) * ldw + (size_t)(i0 + tx) * nb + l] : 0.0f;
            Rs[tx][a] = r0 + a < hi && c0 + tx < p ? (float)R[((size_t)(r0 + a) * nb + l) * p + c0 + tx] : 0.0f;
        }
        __syncthreads();
        const int n = min(MW_T, p - c0);
        for (int t = 0; t < n; t++) {
            const float rv = Rs[t][tx];  // this thread's r = r0 + tx
#pragma unroll
            for (int u = 0; u < MW_ROWS; u++) acc[u] += Ds[t][ty + 8 * u] * rv;
        }
        __syncthreads();
    }
    if (r0 + tx < hi)
        for (int u = 0; u < MW_ROWS; u++) {
            const int i = i0 + ty + 8 * u;
            if (i < s) {
                floatX *out = dL + ((size_t)l * s + i) * q + r0 + tx;
                *out = (floatX)((float)*out + acc[u]);
            }
        }
}

// The r tiles of the largest (k, l) range: ceil(q / nb) + 1 values of r at most.
static inline int monarch_r_tiles(const MonarchShape *m) { return ceil_div_i(m->q / m->nb + 2, MW_T); }

static void monarch_weight_gpu(floatX *W, int ldw, const MonarchShape *m, const floatX *R, const floatX *L) {
    const dim3 grid(ceil_div_i(m->s, MW_T), ceil_div_i(m->p, MW_T), m->nb * m->nb), block(MW_T, 8);
    monarch_weight_kernel<<<grid, block>>>(W, ldw ? ldw : m->d_out, R, L, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
}

static void monarch_weight_backward_gpu(floatX *dR, floatX *dL, const floatX *dW, int ldw, const MonarchShape *m, const floatX *R,
                                        const floatX *L) {
    const int ld = ldw ? ldw : m->d_out;
    const dim3 block(MW_T, 8);
    monarch_weight_backward_r_kernel<<<dim3(ceil_div_i(m->p, MW_T), monarch_r_tiles(m), m->nb * m->nb), block>>>(dR, dW, ld, L, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
    monarch_weight_backward_l_kernel<<<dim3(monarch_r_tiles(m), ceil_div_i(m->s, MW_T), m->nb * m->nb), block>>>(dL, dW, ld, R, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
}

// W (din x dout, row stride ldw; 0: dout) of a BTT's (W0, W1) or a Monarch's (R, L) cores.
static void st_dense_weight(floatX *W, int ldw, int kind, const void *shape, const floatX *W0, const floatX *W1) {
    if (kind == STRUCT_BTT) btt_weight_gpu(W, ldw, (const BTTShape *)shape, W0, W1);
    else monarch_weight_gpu(W, ldw, (const MonarchShape *)shape, W0, W1);
}

// dW0, dW1 += the cores' gradients for dL/dW = dW (row stride ldw; 0: dout).
static void st_dense_weight_backward(floatX *dW0, floatX *dW1, const floatX *dW, int ldw, int kind, const void *shape, const floatX *W0,
                                     const floatX *W1) {
    if (kind == STRUCT_BTT) btt_weight_backward_gpu(dW0, dW1, dW, ldw, (const BTTShape *)shape, W0, W1);
    else monarch_weight_backward_gpu(dW0, dW1, dW, ldw, (const MonarchShape *)shape, W0, W1);
}

// y (N, d_out) = x W + bias; with pre_gelu, pre_gelu = that and y = its GELU (the dense layer's
// epilogues). mem: btt_dense_elems / monarch_dense_elems.
static void st_dense_forward(floatX *y, floatX *pre_gelu, const floatX *x, const floatX *W0, const floatX *W1, const floatX *bias, int N,
                             int kind, const void *shape, floatX *mem) {
    int din, dout;
    st_dense_dims(kind, shape, &din, &dout);
    st_step("W from the cores");
    st_dense_weight(mem, 0, kind, shape, W0, W1);
    st_step("dense GEMM");
    matmul_forward(y, x, mem, bias, N, din, dout, pre_gelu, 1);
}

// dx (may be NULL; with pre_gelu the gradient before its GELU) = dy Wᵀ; dW0, dW1, dbias
// accumulated: dW = xᵀ dy, then the cores' gradients from it.
static void st_dense_backward(floatX *dx, floatX *dW0, floatX *dW1, floatX *dbias, const floatX *dy, const floatX *x, const floatX *W0,
                              const floatX *W1, int N, int kind, const void *shape, floatX *mem, float *colsum_scratch,
                              const floatX *pre_gelu) {
    int din, dout;
    st_dense_dims(kind, shape, &din, &dout);
    floatX *W = mem, *dW = mem + st_pad8_elems((size_t)din * dout);
    st_step("W from the cores");
    st_dense_weight(W, 0, kind, shape, W0, W1);
    st_step("dense GEMMs (dx, dW, bias gradient)");
    matmul_backward(dx, dW, dbias, dy, x, W, N, din, dout, pre_gelu, colsum_scratch, 1);
    st_step("cores' gradients from dW");
    st_dense_weight_backward(dW0, dW1, dW, 0, kind, shape, W0, W1);
}

// Several BTT or Monarch layers on one input whose outputs lie side by side in each output row
// (q, k and v in qkv) run as ONE dense layer: their W side by side in a (din, Σ d_out) matrix, one
// GEMM forward and two backward, as a dense model's fused qkv; no split copies, no sums of dx.
typedef struct {
    int kind;  // STRUCT_BTT or STRUCT_MONARCH
    BTTShape btt;
    MonarchShape monarch;
    const floatX *W0, *W1, *bias;  // bias may be NULL
    floatX *dW0, *dW1, *dbias;
} StDenseLayer;

static const void *st_dense_layer_shape(const StDenseLayer *l) { return l->kind == STRUCT_BTT ? (const void *)&l->btt : (const void *)&l->monarch; }

// The group's input and output widths; fatal unless every layer has the same d_in.
static void st_dense_group_dims(const StDenseLayer *g, int S, int *din, int *dout) {
    *dout = 0;
    for (int i = 0; i < S; i++) {
        int di, d;
        st_dense_dims(g[i].kind, st_dense_layer_shape(&g[i]), &di, &d);
        if (i == 0) *din = di;
        else if (di != *din) fatal("internal: a dense group's layers read inputs of %d and %d", *din, di);
        *dout += d;
    }
}

// Scratch: W and dW (din, Σ d_out), then the bias row.
static size_t st_dense_group_elems(const StDenseLayer *g, int S) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    return 2 * st_pad8_elems((size_t)din * dout) + st_pad8_elems(dout);
}

// Binds the scratch (W, dW) and materializes every layer's W into its column block of the
// group's W.
static void st_dense_group_weight(floatX **W, floatX **dW, const StDenseLayer *g, int S, floatX *mem) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    *W = mem; *dW = mem + st_pad8_elems((size_t)din * dout);
    int col = 0;
    for (int i = 0; i < S; i++) {
        const void *shape = st_dense_layer_shape(&g[i]);
        int di, d;
        st_dense_dims(g[i].kind, shape, &di, &d);
        st_dense_weight(*W + col, dout, g[i].kind, shape, g[i].W0, g[i].W1);
        col += d;
    }
}

// The group's bias (NULL when no layer has one; the forward's only): the layers' own when they lie
// one after the other, else gathered into the scratch after W and dW (zeros for a layer without).
static const floatX *st_dense_group_bias(const StDenseLayer *g, int S, floatX *mem) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    floatX *bias = mem + 2 * st_pad8_elems((size_t)din * dout);
    int col = 0, any_bias = 0, adjacent = 1;
    for (int i = 0; i < S; i++) {
        int di, d;
        st_dense_dims(g[i].kind, st_dense_layer_shape(&g[i]), &di, &d);
        any_bias |= g[i].bias != NULL;
        if (!g[i].bias || (i > 0 && g[i].bias != g[0].bias + col)) adjacent = 0;
        col += d;
    }
    if (!any_bias) return NULL;
    if (adjacent) return g[0].bias;
    col = 0;
    for (int i = 0; i < S; i++) {
        int di, d;
        st_dense_dims(g[i].kind, st_dense_layer_shape(&g[i]), &di, &d);
        if (g[i].bias) cudaCheck(cudaMemcpyAsync(bias + col, g[i].bias, (size_t)d * sizeof(floatX), cudaMemcpyDeviceToDevice, 0));
        else cudaCheck(cudaMemsetAsync(bias + col, 0, (size_t)d * sizeof(floatX), 0));
        col += d;
    }
    return bias;
}

// y (N, Σ d_out): layer i's output in its column block. mem: st_dense_group_elems.
static void st_dense_group_forward(floatX *y, const floatX *x, int N, const StDenseLayer *g, int S, floatX *mem) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    floatX *W, *dW;
    st_step("W from the cores");
    st_dense_group_weight(&W, &dW, g, S, mem);
    st_step("dense GEMM");
    matmul_forward(y, x, W, st_dense_group_bias(g, S, mem), N, din, dout, NULL, 1);
}

// dx (N, din) = dy Wᵀ, overwritten; each layer's gradients (and bias gradient) accumulated.
static void st_dense_group_backward(floatX *dx, const floatX *dy, const floatX *x, int N, const StDenseLayer *g, int S, floatX *mem,
                                    float *colsum_scratch) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    floatX *W, *dW;
    st_step("W from the cores");
    st_dense_group_weight(&W, &dW, g, S, mem);
    st_step("dense GEMMs (dx, dW)");
    matmul_backward(dx, dW, NULL, dy, x, W, N, din, dout, NULL, colsum_scratch, 1);
    st_step("cores' and bias gradients");
    int col = 0;
    for (int i = 0; i < S; i++) {
        const void *shape = st_dense_layer_shape(&g[i]);
        int di, d;
        st_dense_dims(g[i].kind, shape, &di, &d);
        st_dense_weight_backward(g[i].dW0, g[i].dW1, dW + col, dout, g[i].kind, shape, g[i].W0, g[i].W1);
        if (g[i].dbias) column_sums(g[i].dbias, NULL, dy + col, NULL, NULL, NULL, N, d, colsum_scratch, dout);
        col += d;
    }
}
