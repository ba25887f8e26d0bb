// dev/cuda/layernorm_forward.cu: LayerNorm forward over rows of C (eps 1e-5, biased variance),
// bf16 in/out, fp32 mean and rstd, checked against a double CPU reference and timed.
//
//   v1  naive: one thread per row, three serial passes (written here, for comparison)
//   v2  the trainer's layernorm_forward (cuda/layernorm.cuh: one warp per row, 128-bit loads)
//   v3  the trainer's fused_residual_layernorm_forward: res = inp1 + inp2 (bf16), out = LN(res)
//
// Shapes: N = B*T = 8*1024 rows, C = 768 and C = 1024.
//
// Build: make -C dev/cuda layernorm_forward     Run: ./dev/cuda/layernorm_forward [version]
#include "harness.cuh"
#include "cuda/layernorm.cuh"

#define NV 3

// ----------------------------------------------------------------------------------------------
// v1: one thread per row

__global__ void layernorm_forward_naive_kernel(floatX *out, float *mean, float *rstd, const floatX *inp, const floatX *w,
                                               const floatX *b, int N, int C) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= N) return;
    const floatX *x = inp + (size_t)row * C;
    float m = 0.0f;
    for (int i = 0; i < C; i++) m += (float)x[i];
    m /= C;
    float var = 0.0f;
    for (int i = 0; i < C; i++) {
        float d = (float)x[i] - m;
        var += d * d;
    }
    float s = rsqrtf(var / C + 1e-5f);
    floatX *o = out + (size_t)row * C;
    for (int i = 0; i < C; i++) o[i] = (floatX)((s * ((float)x[i] - m)) * (float)w[i] + (float)b[i]);
    mean[row] = m;
    rstd[row] = s;
}

static void layernorm_forward_naive(floatX *out, float *mean, float *rstd, const floatX *inp, const floatX *w, const floatX *b, int N,
                                    int C) {
    layernorm_forward_naive_kernel<<<ceil_div_i(N, 256), 256>>>(out, mean, rstd, inp, w, b, N, C);
    cudaCheckLaunch();
}

// ----------------------------------------------------------------------------------------------
// CPU reference (double): out = (x - mean) * rstd * w + b per row

static void ref_layernorm(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b, int N, int C) {
    for (int r = 0; r < N; r++) {
        const float *xr = x + (size_t)r * C;
        double m = 0.0;
        for (int i = 0; i < C; i++) m += xr[i];
        m /= C;
        double var = 0.0;
        for (int i = 0; i < C; i++) var += (xr[i] - m) * (xr[i] - m);
        var /= C;
        double s = 1.0 / sqrt(var + 1e-5);
        for (int i = 0; i < C; i++) out[(size_t)r * C + i] = (float)((xr[i] - m) * s * w[i] + b[i]);
        mean[r] = (float)m;
        rstd[r] = (float)s;
    }
}

// Tolerances (inputs x1 in [-1, 2], x2 in [-0.5, 0.5], w in [0.5, 1.5], b in [-0.5, 0.5]; the
// normalised values stay below 2.2 in magnitude):
//  mean: atol 1e-4 — fp32 sum of C <= 1024 values: worst case (C-1) 2^-24 sum|x| / C ~ 6.5e-5
//        for the naive serial sum (the warp tree's bound is far smaller); no rtol (mean ~0.5)
//  rstd: rtol 1e-4 — the fp32 variance sum of C positive terms (C 2^-24 = 6e-5 relative),
//        halved by the square root, plus rsqrtf's approximation (~2^-22)
//  out:  rtol 2^-8 (+1%) = 3.95e-3 for the one bf16 rounding of the output, atol 1e-3 for the
//        fp32 statistics' errors above through (x - m) * s * w: 1e-4 * 1.1 * 1.5 + 1e-4 * 2.2 * 1.5
//  res:  exact — the fp32 sum of two bf16 values rounded to nearest-even bf16 is the same IEEE
//        operation on the host (the reference does it in float too) and on the device
#define TOL_MEAN_ATOL 1e-4f
#define TOL_RSTD_RTOL 1e-4f
#define TOL_OUT_ATOL 1e-3f
#define TOL_OUT_RTOL 3.95e-3f

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const int B = 8, T = 1024, N = B * T;
    const int Cs[2] = {768, 1024};
    printf("layernorm_forward: N = %d rows, C = 768 and 1024, on %s\n", N, g_gpu.prop.name);

    for (int ci = 0; ci < 2; ci++) {
        const int C = Cs[ci];
        const size_t NC = (size_t)N * C;
        float *x1 = dev_random(NC, -1.0f, 2.0f), *x2 = dev_random(NC, -0.5f, 0.5f);
        float *w = dev_random(C, 0.5f, 1.5f), *b = dev_random(C, -0.5f, 0.5f);
        dev_round_bf16(x1, NC);
        dev_round_bf16(x2, NC);
        dev_round_bf16(w, C);
        dev_round_bf16(b, C);

        // references: LN(x1) for v1/v2; res = bf16(x1 + x2), LN(res) for v3
        float *ref_out = (float *)malloc(NC * sizeof(float)), *ref_mean = (float *)malloc(N * sizeof(float)),
              *ref_rstd = (float *)malloc(N * sizeof(float));
        ref_layernorm(ref_out, ref_mean, ref_rstd, x1, w, b, N, C);
        float *ref_res = (float *)malloc(NC * sizeof(float)), *fref_out = (float *)malloc(NC * sizeof(float)),
              *fref_mean = (float *)malloc(N * sizeof(float)), *fref_rstd = (float *)malloc(N * sizeof(float));
        for (size_t i = 0; i < NC; i++) ref_res[i] = dev_bf2f(dev_f2bf(x1[i] + x2[i]));
        ref_layernorm(fref_out, fref_mean, fref_rstd, ref_res, w, b, N, C);

        floatX *d_x1 = dev_upload_bf16(x1, NC), *d_x2 = dev_upload_bf16(x2, NC), *d_w = dev_upload_bf16(w, C), *d_b = dev_upload_bf16(b, C);
        floatX *d_out, *d_res;
        float *d_mean, *d_rstd;
        cudaCheck(cudaMalloc(&d_out, NC * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_res, NC * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_mean, N * sizeof(float)));
        cudaCheck(cudaMalloc(&d_rstd, N * sizeof(float)));

        for (int ver = 1; ver <= NV; ver++) {
            if (v && ver != v) continue;
            // poison the outputs (bf16 and fp32 NaN) so that anything left unwritten fails
            cudaCheck(cudaMemset(d_out, 0xFF, NC * sizeof(floatX)));
            cudaCheck(cudaMemset(d_res, 0xFF, NC * sizeof(floatX)));
            cudaCheck(cudaMemset(d_mean, 0xFF, N * sizeof(float)));
            cudaCheck(cudaMemset(d_rstd, 0xFF, N * sizeof(float)));
            auto run = [&]() {
                if (ver == 1) layernorm_forward_naive(d_out, d_mean, d_rstd, d_x1, d_w, d_b, N, C);
                else if (ver == 2) layernorm_forward(d_out, d_mean, d_rstd, d_x1, d_w, d_b, N, C);
                else fused_residual_layernorm_forward(d_res, d_out, d_mean, d_rstd, d_x1, d_x2, d_w, d_b, N, C);
            };
            run();
            cudaCheck(cudaDeviceSynchronize());
            const float *r_out = ver == 3 ? fref_out : ref_out, *r_mean = ver == 3 ? fref_mean : ref_mean,
                        *r_rstd = ver == 3 ? fref_rstd : ref_rstd;
            char what[96];
            float *g_out = dev_download_bf16(d_out, NC), *g_mean = dev_download_f32(d_mean, N), *g_rstd = dev_download_f32(d_rstd, N);
            snprintf(what, sizeof(what), "v%d C=%d out", ver, C);
            float err = dev_check(what, g_out, r_out, NC, TOL_OUT_ATOL, TOL_OUT_RTOL);
            snprintf(what, sizeof(what), "v%d C=%d mean", ver, C);
            dev_check(what, g_mean, r_mean, N, TOL_MEAN_ATOL, 0.0f);
            snprintf(what, sizeof(what), "v%d C=%d rstd", ver, C);
            dev_check(what, g_rstd, r_rstd, N, 0.0f, TOL_RSTD_RTOL);
            if (ver == 3) {
                float *g_res = dev_download_bf16(d_res, NC);
                snprintf(what, sizeof(what), "v%d C=%d residual", ver, C);
                dev_check(what, g_res, ref_res, NC, 0.0f, 0.0f);
                free(g_res);
            }
            free(g_out);
            free(g_mean);
            free(g_rstd);

            // minimum traffic: read the input(s), write out (and res), fp32 mean/rstd, w and b;
            // ~8 flops per element (sum, subtract, square, add, subtract, scale, weight, bias)
            double io = ver == 3 ? 4.0 : 2.0;
            double bytes = io * NC * sizeof(floatX) + 2.0 * N * sizeof(float) + 2.0 * C * sizeof(floatX);
            double flops = 8.0 * NC + (ver == 3 ? NC : 0.0);
            float ms = dev_time_ms(run);
            snprintf(what, sizeof(what), "%s C=%d", ver == 3 ? "fused_residual_ln" : "layernorm_forward", C);
            dev_report(what, ver, ms, bytes, flops, err);
        }

        cudaCheck(cudaFree(d_x1));
        cudaCheck(cudaFree(d_x2));
        cudaCheck(cudaFree(d_w));
        cudaCheck(cudaFree(d_b));
        cudaCheck(cudaFree(d_out));
        cudaCheck(cudaFree(d_res));
        cudaCheck(cudaFree(d_mean));
        cudaCheck(cudaFree(d_rstd));
        free(x1); free(x2); free(w); free(b);
        free(ref_out); free(ref_mean); free(ref_rstd);
        free(ref_res); free(fref_out); free(fref_mean); free(fref_rstd);
    }
    return dev_summary();
}
