// cuda/reduce.cuh: deterministic column sums over rows (bias gradients, LayerNorm weight/bias gradients): fixed row chunks, then an ordered sum, in one launch.
#pragma once
#include "common.cuh"

// Rows are split into at most COLSUM_MAX_CHUNKS chunks whose size depends only on N, each chunk's
// partial sums are reduced in a fixed tree, and the chunks are added in order: the result is
// bit-identical from run to run (the one atomic only counts which block comes last).
#define COLSUM_MAX_CHUNKS 64
#define COLSUM_COLS 64  // columns per block: 32 threads x 2 adjacent columns (128-byte rows)
#define COLSUM_ROWS 8   // threadIdx.y

// Floats of scratch column_sums needs for up to max_cols columns.
static inline size_t column_sums_scratch_floats(int max_cols) { return (size_t)COLSUM_MAX_CHUNKS * 2 * max_cols; }

// The block's share: partial[chunk][0][c] = sum of dout over the chunk's rows; partial[chunk][1][c]
// = sum of dout * (x - mean) * rstd (only when x is given: the LayerNorm weight gradient).
__device__ __forceinline__ void column_sums_block_partial(float *partial, const floatX *dout, const floatX *x, const float *mean,
                                                          const float *rstd, int N, int C, int rows_per_chunk, int ld) {
    __shared__ float sh[2][COLSUM_ROWS][COLSUM_COLS];
    int c = blockIdx.x * COLSUM_COLS + 2 * threadIdx.x;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
    float s0a = 0.0f, s0b = 0.0f, s1a = 0.0f, s1b = 0.0f;
    if (c < C) {
        for (int r = r0 + threadIdx.y; r < r1; r += COLSUM_ROWS) {
            __nv_bfloat162 d = *reinterpret_cast<const __nv_bfloat162 *>(dout + (size_t)r * ld + c);
            float da = __low2float(d), db = __high2float(d);
            s0a += da;
            s0b += db;
            if (x) {
                __nv_bfloat162 xv = *reinterpret_cast<const __nv_bfloat162 *>(x + (size_t)r * C + c);
                float m = mean[r], s = rstd[r];
                s1a += da * ((__low2float(xv) - m) * s);
                s1b += db * ((__high2float(xv) - m) * s);
            }
        }
    }
    sh[0][threadIdx.y][2 * threadIdx.x] = s0a;
    sh[0][threadIdx.y][2 * threadIdx.x + 1] = s0b;
    sh[1][threadIdx.y][2 * threadIdx.x] = s1a;
    sh[1][threadIdx.y][2 * threadIdx.x + 1] = s1b;
    __syncthreads();
    // 2 sums x 64 columns = 128 outputs; threads (x, y) with y < 4 each finish one, in row order
    int t = threadIdx.y * 32 + threadIdx.x;
    if (t < 2 * COLSUM_COLS) {
        int which = t / COLSUM_COLS, col = t % COLSUM_COLS, cc = blockIdx.x * COLSUM_COLS + col;
        float s = 0.0f;
        for (int y = 0; y < COLSUM_ROWS; y++) s += sh[which][y][col];
        if (cc < C) partial[((size_t)blockIdx.y * 2 + which) * C + cc] = s;
    }
}

// out0[c] += sum over chunks of partial[.][0][c]; out1 likewise with [1] (when given): the
// chunks in order, read from L2 (column_sums_kernel's come from other blocks of its launch)
__device__ __forceinline__ void column_sums_finish(floatX *out0, floatX *out1, const float *partial, int C, int chunks, int c) {
    float s0 = 0.0f, s1 = 0.0f;
    for (int k = 0; k < chunks; k++) {
        s0 += __ldcg(&partial[((size_t)k * 2) * C + c]);
        s1 += __ldcg(&partial[((size_t)k * 2 + 1) * C + c]);
    }
    if (out0) out0[c] = (floatX)((float)out0[c] + s0);
    if (out1) out1[c] = (floatX)((float)out1[c] + s1);
}

// The finish alone, a thread per column (dev/cuda/layernorm_backward's v3 writes the partials)
__global__ void column_sums_final_kernel(floatX *out0, floatX *out1, const float *partial, int C, int chunks) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) column_sums_finish(out0, out1, partial, C, chunks, c);
}

// The chunks of N rows: at most COLSUM_MAX_CHUNKS, of at least 32 rows where N allows; a
// function of N alone.
static inline void column_sums_chunks(int N, int *chunks, int *rows_per_chunk) {
    int n = N < COLSUM_MAX_CHUNKS * 32 ? ceil_div_i(N, 32) : COLSUM_MAX_CHUNKS;
    *rows_per_chunk = ceil_div_i(N, n);
    *chunks = ceil_div_i(N, *rows_per_chunk);
}

// Column sums in one launch: a block per (64 columns, chunk of rows) writes its partials; the
// last of a column block's chunks to finish (arrivals[blockIdx.x], zero before the launch and
// reset by that block) adds the chunks in order (column_sums_finish): the same bits whichever
// block comes last. (Two launches per bias gradient were a third of a GPT-2 step's.)
__global__ void column_sums_kernel(floatX *out0, floatX *out1, float *partial, unsigned int *arrivals, const floatX *dout, const floatX *x,
                                   const float *mean, const float *rstd, int N, int C, int rows_per_chunk, int ld, int chunks) {
    __shared__ int last;
    column_sums_block_partial(partial, dout, x, mean, rstd, N, C, rows_per_chunk, ld);
    __threadfence();  // this block's partials reach every block before it is counted
    __syncthreads();
    const int t = threadIdx.y * 32 + threadIdx.x;
    if (t == 0) last = atomicAdd(&arrivals[blockIdx.x], 1u) == (unsigned int)chunks - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int c = blockIdx.x * COLSUM_COLS + t;
    if (t < COLSUM_COLS && c < C) column_sums_finish(out0, out1, partial, C, chunks, c);
    if (t == 0) arrivals[blockIdx.x] = 0;  // for the next launch
}

// column_sums_kernel's arrival counts, one per column block, zero between launches: allocated
// (zeroed) as the widest call so far needs them, kept for the process. Every launch is on the
// one compute stream, so launches never share them at once.
static unsigned int *g_colsum_arrivals;
static int g_colsum_arrivals_n;
static unsigned int *column_sums_arrivals(int n) {
    if (n > g_colsum_arrivals_n) {
        if (g_colsum_arrivals) {
            cudaCheck(cudaDeviceSynchronize());  // a launch may still count on the old ones
            cudaCheck(cudaFree(g_colsum_arrivals));
        }
        cudaCheck(cudaMalloc(&g_colsum_arrivals, (size_t)n * sizeof(unsigned int)));
        cudaCheck(cudaMemset(g_colsum_arrivals, 0, (size_t)n * sizeof(unsigned int)));
        g_colsum_arrivals_n = n;
    }
    return g_colsum_arrivals;
}

// dsum[c] += Σ_r dout[r][c]; with x: dnorm[c] += Σ_r dout[r][c] * (x[r][c] - mean[r]) * rstd[r].
// C must be even; scratch holds column_sums_scratch_floats(C) floats.
// ld: dout's row stride (0: C; only without x), for a column block of wider rows.
static void column_sums(floatX *dsum, floatX *dnorm, const floatX *dout, const floatX *x, const float *mean, const float *rstd, int N,
                        int C, float *scratch, int ld = 0) {
    if (ld && ld != C && x) {
        fprintf(stderr, "error: internal: column_sums with a row stride takes no x\n");
        exit(EXIT_FAILURE);
    }
    int chunks, rows_per_chunk;
    column_sums_chunks(N, &chunks, &rows_per_chunk);
    dim3 grid(ceil_div_i(C, COLSUM_COLS), chunks), block(32, COLSUM_ROWS);
    column_sums_kernel<<<grid, block>>>(dsum, dnorm, scratch, column_sums_arrivals((int)grid.x), dout, x, mean, rstd, N, C, rows_per_chunk,
                                        ld ? ld : C, chunks);
    cudaCheckLaunch();
}
