// dev/cuda/layernorm_backward.cu: LayerNorm backward. Given dout, the forward's input x and its
// fp32 mean/rstd, accumulates (+=) into all three gradients, as the trainer does:
//   dinp[r][i] += (w[i] dout[r][i] - mean_i(w dout) - n[r][i] mean_i(w dout n)) * rstd[r]
//   dw[i] += sum_r dout[r][i] n[r][i],  db[i] += sum_r dout[r][i],  n = (x - mean) * rstd
//
//   v1  naive: one thread per row for dinp, one thread per column (serial over rows) for dw, db
//   v2  the trainer's layernorm_backward (cuda/layernorm.cuh: warp per row for dinp, then the
//       deterministic column_sums of cuda/reduce.cuh through its fp32 scratch for dw and db)
//   v3  a candidate, here only: one pass. A block per chunk of rows (the chunks depend on N
//       alone), a warp per row holding the row's dout and x in registers (read once, where v2
//       reads them for dinp and again for the column sums: 6 row-sized transfers become 4), each
//       lane adding its columns' dw and db terms of its rows in registers; the block's warps add
//       theirs in warp order through shared memory and the block writes one partial per chunk,
//       which column_sums_final_kernel adds in chunk order: deterministic, like v2. dinp is
//       computed exactly as v2 computes it (the same sums in the same order): the same bits.
//
// Shapes: N = B*T = 8*1024 rows, C = 768 and C = 1024.
//
// Build: make -C dev/cuda layernorm_backward    Run: ./dev/cuda/layernorm_backward [version]
#include "harness.cuh"
#include "cuda/layernorm.cuh"

#define NV 3

// ----------------------------------------------------------------------------------------------
// v1

__global__ void layernorm_backward_dinp_naive_kernel(floatX *dinp, const floatX *dout, const floatX *inp, const floatX *w, const float *mean,
                                                     const float *rstd, int N, int C) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= N) return;
    const floatX *d = dout + (size_t)row * C, *x = inp + (size_t)row * C;
    floatX *di = dinp + (size_t)row * C;
    float m = mean[row], s = rstd[row];
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int i = 0; i < C; i++) {
        float n = ((float)x[i] - m) * s, dn = (float)w[i] * (float)d[i];
        dnorm_mean += dn;
        dnorm_norm_mean += dn * n;
    }
    dnorm_mean /= C;
    dnorm_norm_mean /= C;
    for (int i = 0; i < C; i++) {
        float n = ((float)x[i] - m) * s, dn = (float)w[i] * (float)d[i];
        di[i] = (floatX)((float)di[i] + (dn - dnorm_mean - n * dnorm_norm_mean) * s);
    }
}

// threads are columns, so each row step reads a contiguous stretch of the row
__global__ void layernorm_backward_params_naive_kernel(floatX *dw, floatX *db, const floatX *dout, const floatX *inp, const float *mean,
                                                       const float *rstd, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float gw = 0.0f, gb = 0.0f;
    for (int r = 0; r < N; r++) {
        float d = (float)dout[(size_t)r * C + c];
        gw += d * (((float)inp[(size_t)r * C + c] - mean[r]) * rstd[r]);
        gb += d;
    }
    dw[c] = (floatX)((float)dw[c] + gw);
    db[c] = (floatX)((float)db[c] + gb);
}

static void layernorm_backward_naive(floatX *dinp, floatX *dw, floatX *db, const floatX *dout, const floatX *inp, const floatX *w,
                                     const float *mean, const float *rstd, int N, int C) {
    layernorm_backward_dinp_naive_kernel<<<ceil_div_i(N, 256), 256>>>(dinp, dout, inp, w, mean, rstd, N, C);
    cudaCheckLaunch();
    layernorm_backward_params_naive_kernel<<<ceil_div_i(C, 256), 256>>>(dw, db, dout, inp, mean, rstd, N, C);
    cudaCheckLaunch();
}

// ----------------------------------------------------------------------------------------------
// v3

#define LNB3_WARPS 8
#define LNB3_MAX_CHUNKS 256  // partials: at most this many blocks of rows (scratch: 2 C floats each)
#define LNB3_MIN_ROWS 16     // rows per block at least, where N allows fewer than the most chunks

// Blocks of rows for N rows (the same on every GPU: the sums' order depends on N alone).
static inline int lnb3_chunks(int N, int *rows_per_chunk) {
    int chunks = ceil_div_i(N, LNB3_MIN_ROWS);
    if (chunks > LNB3_MAX_CHUNKS) chunks = LNB3_MAX_CHUNKS;
    *rows_per_chunk = ceil_div_i(N, chunks);
    return ceil_div_i(N, *rows_per_chunk);
}

// CH: 256-column steps per row (C <= 256 CH, C % 8 == 0). partial[(chunk·2 + 0)·C + c] = Σ dout,
// [(chunk·2 + 1)·C + c] = Σ dout·n over the chunk's rows (column_sums_block_partial's layout).
template <int CH>
__global__ void __launch_bounds__(32 * LNB3_WARPS) layernorm_backward_fused_kernel(floatX *dinp, float *partial, const floatX *dout,
                                                                                  const floatX *inp, const floatX *w, const float *mean,
                                                                                  const float *rstd, int N, int C, int rows_per_chunk) {
    __shared__ float red[2 * 256 * CH];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = blockIdx.x * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
    x128 ww[CH];
    float gb[CH][8], gw[CH][8];
#pragma unroll
    for (int j = 0; j < CH; j++) {
        const int c = lane * 8 + 256 * j;
        ww[j] = c < C ? load128(w + c) : x128::zeros();
#pragma unroll
        for (int k = 0; k < 8; k++) gb[j][k] = gw[j][k] = 0.0f;
    }
    for (int row = r0 + warp; row < r1; row += LNB3_WARPS) {
        const size_t base = (size_t)row * C;
        const float m = mean[row], s = rstd[row];
        x128 d[CH], x[CH];
        float dmean = 0.0f, dnorm_mean = 0.0f;
#pragma unroll
        for (int j = 0; j < CH; j++) {
            const int c = lane * 8 + 256 * j;
            d[j] = c < C ? load128(dout + base + c) : x128::zeros();
            x[j] = c < C ? load128(inp + base + c) : x128::zeros();
            if (c >= C) continue;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float n = ((float)x[j][k] - m) * s, dv = (float)d[j][k], dn = (float)ww[j][k] * dv;
                dmean += dn;
                dnorm_mean += dn * n;
                gb[j][k] += dv;
                gw[j][k] += dv * n;
            }
        }
        dmean = warp_sum(dmean) / C;
        dnorm_mean = warp_sum(dnorm_mean) / C;
#pragma unroll
        for (int j = 0; j < CH; j++) {
            const int c = lane * 8 + 256 * j;
            if (c >= C) continue;
            x128 di = load128(dinp + base + c);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float n = ((float)x[j][k] - m) * s, dn = (float)ww[j][k] * (float)d[j][k];
                di[k] = (floatX)((float)di[k] + (dn - dmean - n * dnorm_mean) * s);
            }
            store128(dinp + base + c, di);
        }
    }
    // the warps' column sums, added in warp order
    for (int wi = 0; wi < LNB3_WARPS; wi++) {
        if (warp == wi) {
#pragma unroll
            for (int j = 0; j < CH; j++)
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const int c = lane * 8 + 256 * j + k;
                    red[c] = wi ? red[c] + gb[j][k] : gb[j][k];
                    red[256 * CH + c] = wi ? red[256 * CH + c] + gw[j][k] : gw[j][k];
                }
        }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        partial[((size_t)blockIdx.x * 2) * C + c] = red[c];
        partial[((size_t)blockIdx.x * 2 + 1) * C + c] = red[256 * CH + c];
    }
}

// dinp, dw, db accumulated, as layernorm_backward; scratch: LNB3_MAX_CHUNKS · 2 C floats. 0: C is
// not a multiple of 8 or over 1280 (then nothing ran): at 6 steps of 256 columns and more, the
// row and the lane's sums in registers spill (ptxas, sm_90: 16 bytes at 6, 440 at 8).
static int layernorm_backward_fused(floatX *dinp, floatX *dw, floatX *db, const floatX *dout, const floatX *inp, const floatX *w,
                                    const float *mean, const float *rstd, int N, int C, float *scratch) {
    if (C % 8 || C > 5 * 256) return 0;
    int rpc;
    const int chunks = lnb3_chunks(N, &rpc), ch = ceil_div_i(C, 256);
    switch (ch) {
#define LNB3_CASE(K) case K: layernorm_backward_fused_kernel<K><<<chunks, 32 * LNB3_WARPS>>>(dinp, scratch, dout, inp, w, mean, rstd, N, C, rpc); break;
        LNB3_CASE(1) LNB3_CASE(2) LNB3_CASE(3) LNB3_CASE(4) LNB3_CASE(5)
#undef LNB3_CASE
    }
    cudaCheckLaunch();
    column_sums_final_kernel<<<ceil_div_i(C, 256), 256>>>(db, dw, scratch, C, chunks);
    cudaCheckLaunch();
    return 1;
}

// ----------------------------------------------------------------------------------------------
// CPU reference (double), on exactly the GPU's inputs (bf16 values, fp32 mean/rstd); the prior
// contents of dinp, dw, db are added

static void ref_layernorm_backward(float *dinp, float *dw, float *db, const float *dinp0, const float *dw0, const float *db0,
                                   const float *dout, const float *x, const float *w, const float *mean, const float *rstd, int N, int C) {
    double *gw = (double *)calloc(C, sizeof(double)), *gb = (double *)calloc(C, sizeof(double));
    for (int r = 0; r < N; r++) {
        const float *d = dout + (size_t)r * C, *xr = x + (size_t)r * C;
        double m = mean[r], s = rstd[r], dm = 0.0, dnm = 0.0;
        for (int i = 0; i < C; i++) {
            double n = (xr[i] - m) * s, dn = (double)w[i] * d[i];
            dm += dn;
            dnm += dn * n;
            gw[i] += d[i] * n;
            gb[i] += d[i];
        }
        dm /= C;
        dnm /= C;
        for (int i = 0; i < C; i++) {
            double n = (xr[i] - m) * s, dn = (double)w[i] * d[i];
            dinp[(size_t)r * C + i] = (float)(dinp0[(size_t)r * C + i] + (dn - dm - n * dnm) * s);
        }
    }
    for (int i = 0; i < C; i++) {
        dw[i] = (float)(dw0[i] + gw[i]);
        db[i] = (float)(db0[i] + gb[i]);
    }
    free(gw);
    free(gb);
}

// Tolerances (x in [-1, 2], w in [-1.5, 1.5], dout in [-1, 1], prior gradients in [-1, 1]):
//  dinp: rtol 2^-8 (+1%) = 3.95e-3: the one bf16 rounding of (prior + delta); atol 2e-4: the fp32
//        row means over C <= 1024 (worst case ~2^-24 sum|w dout| = 2.3e-5 and 2^-24 sum|w dout n|
//        = 2e-5) through (dn - dmean - n dnorm_mean) * rstd with |n| <= 1.8, rstd ~1.15: ~8e-5
//  dw, db: rtol 3.95e-3 (one bf16 rounding); atol 5e-3: fp32 sums over N = 8192 rows. The
//        random-walk estimate sqrt(N) 2^-24 |partial sums <= ~60| = 3e-4 for the naive serial
//        sum (the trainer's chunked tree is ~10x better); the worst-case linear bound (2e-2 for
//        the trainer's 88-deep chain, 0.2 for the serial sum) is never approached with random
//        signs. The sums themselves are ~50, whose bf16 half-ulp is 0.125.
#define TOL_DINP_ATOL 2e-4f
#define TOL_PARAM_ATOL 5e-3f
#define TOL_RTOL 3.95e-3f

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const int B = 8, T = 1024, N = B * T;
    const int Cs[2] = {768, 1024};
    printf("layernorm_backward: N = %d rows, C = 768 and 1024, on %s\n", N, g_gpu.prop.name);

    for (int ci = 0; ci < 2; ci++) {
        const int C = Cs[ci];
        const size_t NC = (size_t)N * C;
        float *x = dev_random(NC, -1.0f, 2.0f), *w = dev_random(C, -1.5f, 1.5f), *dout = dev_random(NC, -1.0f, 1.0f);
        float *dinp0 = dev_random(NC, -1.0f, 1.0f), *dw0 = dev_random(C, -1.0f, 1.0f), *db0 = dev_random(C, -1.0f, 1.0f);
        dev_round_bf16(x, NC);
        dev_round_bf16(w, C);
        dev_round_bf16(dout, NC);
        dev_round_bf16(dinp0, NC);
        dev_round_bf16(dw0, C);
        dev_round_bf16(db0, C);
        // the forward's fp32 statistics of x (inputs here, as in the trainer)
        float *mean = (float *)malloc(N * sizeof(float)), *rstd = (float *)malloc(N * sizeof(float));
        for (int r = 0; r < N; r++) {
            double m = 0.0, var = 0.0;
            for (int i = 0; i < C; i++) m += x[(size_t)r * C + i];
            m /= C;
            for (int i = 0; i < C; i++) var += (x[(size_t)r * C + i] - m) * (x[(size_t)r * C + i] - m);
            mean[r] = (float)m;
            rstd[r] = (float)(1.0 / sqrt(var / C + 1e-5));
        }
        float *ref_dinp = (float *)malloc(NC * sizeof(float)), *ref_dw = (float *)malloc(C * sizeof(float)),
              *ref_db = (float *)malloc(C * sizeof(float));
        ref_layernorm_backward(ref_dinp, ref_dw, ref_db, dinp0, dw0, db0, dout, x, w, mean, rstd, N, C);

        floatX *d_x = dev_upload_bf16(x, NC), *d_w = dev_upload_bf16(w, C), *d_dout = dev_upload_bf16(dout, NC);
        floatX *d_dinp0 = dev_upload_bf16(dinp0, NC), *d_dw0 = dev_upload_bf16(dw0, C), *d_db0 = dev_upload_bf16(db0, C);
        float *d_mean = dev_upload(mean, N), *d_rstd = dev_upload(rstd, N);
        floatX *d_dinp, *d_dw, *d_db;
        cudaCheck(cudaMalloc(&d_dinp, NC * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dw, C * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_db, C * sizeof(floatX)));
        float *d_scratch;
        const size_t scratch_floats = (size_t)LNB3_MAX_CHUNKS * 2 * C;  // v3's (v2 takes column_sums_scratch_floats(C), fewer)
        cudaCheck(cudaMalloc(&d_scratch, scratch_floats * sizeof(float)));
        float *v2_dinp = NULL;  // v2's dinp, which v3's must equal bit for bit

        for (int ver = 1; ver <= NV; ver++) {
            if (v && ver != v) continue;
            // the gradients are accumulated into: start each version from the same priors
            cudaCheck(cudaMemcpy(d_dinp, d_dinp0, NC * sizeof(floatX), cudaMemcpyDeviceToDevice));
            cudaCheck(cudaMemcpy(d_dw, d_dw0, C * sizeof(floatX), cudaMemcpyDeviceToDevice));
            cudaCheck(cudaMemcpy(d_db, d_db0, C * sizeof(floatX), cudaMemcpyDeviceToDevice));
            cudaCheck(cudaMemset(d_scratch, 0xFF, scratch_floats * sizeof(float)));  // NaN: must be overwritten
            auto run = [&]() {
                if (ver == 1) layernorm_backward_naive(d_dinp, d_dw, d_db, d_dout, d_x, d_w, d_mean, d_rstd, N, C);
                else if (ver == 2) layernorm_backward(d_dinp, d_dw, d_db, d_dout, d_x, d_w, d_mean, d_rstd, N, C, d_scratch);
                else if (!layernorm_backward_fused(d_dinp, d_dw, d_db, d_dout, d_x, d_w, d_mean, d_rstd, N, C, d_scratch)) {
                    fprintf(stderr, "error: v3 does not take C = %d\n", C);
                    exit(EXIT_FAILURE);
                }
            };
            run();
            cudaCheck(cudaDeviceSynchronize());
            char what[96];
            float *g_dinp = dev_download_bf16(d_dinp, NC), *g_dw = dev_download_bf16(d_dw, C), *g_db = dev_download_bf16(d_db, C);
            snprintf(what, sizeof(what), "v%d C=%d dinp", ver, C);
            float err = dev_check(what, g_dinp, ref_dinp, NC, TOL_DINP_ATOL, TOL_RTOL);
            snprintf(what, sizeof(what), "v%d C=%d dweight", ver, C);
            float e2 = dev_check(what, g_dw, ref_dw, C, TOL_PARAM_ATOL, TOL_RTOL);
            snprintf(what, sizeof(what), "v%d C=%d dbias", ver, C);
            float e3 = dev_check(what, g_db, ref_db, C, TOL_PARAM_ATOL, TOL_RTOL);
            if (ver == 2) v2_dinp = g_dinp, g_dinp = NULL;  // kept for v3's
            else if (ver == 3 && v2_dinp) {
                size_t same = 0;
                for (size_t i = 0; i < NC; i++) same += memcmp(&g_dinp[i], &v2_dinp[i], sizeof(float)) == 0;
                snprintf(what, sizeof(what), "v3 C=%d dinp: the same bits as v2's (%zu of %zu)", C, same, NC);
                if (same == NC) g_dev_pass++;
                else { g_dev_fail++; printf("FAIL %s\n", what); }
            }
            free(g_dinp);
            free(g_dw);
            free(g_db);

            // minimum traffic: read dout and x, read+write dinp, fp32 mean/rstd, w, read+write dw
            // and db; ~14 flops per element (10 for dinp, 4 for dw/db)
            double bytes = 4.0 * NC * sizeof(floatX) + 2.0 * N * sizeof(float) + 5.0 * C * sizeof(floatX);
            float ms = dev_time_ms(run);  // keeps accumulating; the values are not checked again
            snprintf(what, sizeof(what), "layernorm_backward C=%d", C);
            dev_report(what, ver, ms, bytes, 14.0 * NC, fmaxf(err, fmaxf(e2, e3)));
        }

        cudaCheck(cudaFree(d_x)); cudaCheck(cudaFree(d_w)); cudaCheck(cudaFree(d_dout));
        cudaCheck(cudaFree(d_dinp0)); cudaCheck(cudaFree(d_dw0)); cudaCheck(cudaFree(d_db0));
        cudaCheck(cudaFree(d_mean)); cudaCheck(cudaFree(d_rstd));
        cudaCheck(cudaFree(d_dinp)); cudaCheck(cudaFree(d_dw)); cudaCheck(cudaFree(d_db)); cudaCheck(cudaFree(d_scratch));
        free(x); free(w); free(dout); free(dinp0); free(dw0); free(db0); free(mean); free(rstd);
        free(ref_dinp); free(ref_dw); free(ref_db); free(v2_dinp);
    }
    return dev_summary();
}
