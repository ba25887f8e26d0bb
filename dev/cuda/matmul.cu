// dev/cuda/matmul.cu: the trainer's dense linear layer on cuBLASLt (cuda/matmul.cuh), forward
//   out (N, OC) = inp (N, C) @ w^T + bias     [w: (OC, C) row-major, as the parameter table]
//   with pre_gelu: pre_gelu = that, out = GELU(pre_gelu)
// and backward
//   dinp (N, C) = dout @ w (overwritten); with pre_gelu: dinp = (dout @ w) * gelu'(pre_gelu)
//   dw (OC, C) += dout^T @ inp;  dbias (OC) += column sums of dout
// checked against a double CPU reference and timed in TFLOP/s against the bf16 peak.
//
// The versions are the trainer's GELU fusion modes (g_gpu.gelu_fusion, the -ge flag), so that
// the cuBLASLt epilogue paths and the separate-kernel fallbacks are checked against the SAME CPU
// reference: this is what verifies the GELU_AUX / DGELU aux-buffer layout and leading dimension.
//   v1  gelu_fusion 0: BIAS epilogue, GELU and its backward as separate kernels (the default below sm_90)
//   v2  gelu_fusion 1: forward GELU_AUX_BIAS epilogue; backward GELU as a separate kernel
//   v3  gelu_fusion 2: forward GELU_AUX_BIAS, backward DGELU epilogue (the default on sm_90+)
// Cases without a GELU take the same path in every version (checked in each anyway).
//
// Shapes (N = B*T = 4096): fc 768 -> 3072 (forward with GELU), fcproj 3072 -> 768 (backward
// through the GELU: pre_gelu is fc's output), attproj 768 -> 768 (also without bias).
// The CPU reference covers every column of a sample of rows (every 41st and the last) of out
// and dinp, the same sample of rows of dw, and all of dbias; that keeps it under a few seconds.
//
// Build: make -C dev/cuda matmul    Run: ./dev/cuda/matmul [version]
#include "harness.cuh"
#include "cuda/matmul.cuh"

#define NV 3

// ----------------------------------------------------------------------------------------------
// error model, per element
//
//  fp32 accumulation (cuBLASLt, any order or split): ACC_REL * sum_k |a_k b_k|. The rigorous
//    worst case K 2^-24 sum|a_k b_k| is far looser than any real sum; the random-walk estimate is
//    about sqrt(K) 2^-24 <= 2^-18 for K <= 4096, and ACC_REL = 2^-16 allows 4x that.
//  every bf16 rounding of a result y: 2^-8 |y| (BF16_REL, +1%).
//  a bias added after a rounded matmul (add_bias_kernel, only when cuBLASLt has no BIAS
//    epilogue algorithm): one more 2^-8 |acc|.
//  dw += (beta = 1 into the bf16 gradient): two roundings, of the product and of the sum.
//    On an H200 (cuBLAS 13.0, 2026-12-04) one rounding of the exact sum was
//    exceeded in 3% of dw's elements in every version (e.g. -20.5 for -20.6007: 0.1007 off, one
//    rounding allows 0.097), as if the product were rounded to bf16 before C is added. Allowing
//    the product's rounding too is our reading of that, not yet re-run on a GPU; restricting
//    cuBLASLt to fp32 split-K reduction (CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK) changed nothing.
//  GELU: the separate kernels use tanh.approx.f32 (error < 2^-10, see gelu.cu); the cuBLASLt
//    epilogue's own GELU is unspecified, and the erf GELU differs from the tanh one by < 4.8e-4
//    in value and < 8.7e-4 in derivative: GELU_VARIANT = 1e-3 (times |upstream| for the DGELU).

#define ACC_REL (1.0 / 65536.0)
#define BF16_REL (1.01 / 256.0)
#define TANH_APPROX_ERR (1.0 / 1024.0 + 2e-6)
#define GELU_VARIANT 1e-3

// ----------------------------------------------------------------------------------------------
// CPU reference helpers

// every stride-th index below n, and n - 1
static int *sample_indices(int n, int stride, int *count) {
    int *r = (int *)malloc((size_t)(n / stride + 2) * sizeof(int)), k = 0;
    for (int i = 0; i < n; i += stride) r[k++] = i;
    if (r[k - 1] != n - 1) r[k++] = n - 1;
    *count = k;
    return r;
}

// (rows, cols) -> (cols, rows)
static float *transpose(const float *a, int rows, int cols) {
    float *t = (float *)malloc((size_t)rows * cols * sizeof(float));
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) t[(size_t)c * rows + r] = a[(size_t)r * cols + c];
    return t;
}

// For each sampled row s of X (R, K): acc[s][j] = sum_k X[rows[s]][k] M[k][j] and
// aabs[s][j] = sum_k |X[rows[s]][k] M[k][j]|, M (K, J) row-major; in double. The inner loop runs
// over j (contiguous, independent), so it vectorises without reassociating any sum.
static void ref_rows(double *acc, double *aabs, const float *X, int K, const int *rows, int nr, const float *M, int J) {
    for (int s = 0; s < nr; s++) {
        double *a = acc + (size_t)s * J, *b = aabs + (size_t)s * J;
        for (int j = 0; j < J; j++) a[j] = b[j] = 0.0;
        const float *x = X + (size_t)rows[s] * K;
        for (int k = 0; k < K; k++) {
            double xv = x[k], ax = fabs(xv);
            const float *m = M + (size_t)k * J;
            for (int j = 0; j < J; j++) {
                a[j] += xv * m[j];
                b[j] += ax * fabs((double)m[j]);
            }
        }
    }
}

static float *gather_rows(const float *full, const int *rows, int nr, int cols) {
    float *g = (float *)malloc((size_t)nr * cols * sizeof(float));
    for (int s = 0; s < nr; s++) memcpy(g + (size_t)s * cols, full + (size_t)rows[s] * cols, cols * sizeof(float));
    return g;
}

static float *falloc(size_t n) { return (float *)malloc(n * sizeof(float)); }

// ----------------------------------------------------------------------------------------------

typedef struct {
    const char *name;
    int N, C, OC;
    int fwd_gelu;    // also the forward with pre_gelu (the fc layer)
    int bwd_gelu;    // also the backward through the GELU (the fc projection; pre_gelu is N x C)
    int fwd_nobias;  // also the forward without bias
} Shape;

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const Shape shapes[] = {
        {"fc", 4096, 768, 3072, 1, 0, 0},
        {"fcproj", 4096, 3072, 768, 0, 1, 0},
        {"attproj", 4096, 768, 768, 0, 0, 1},
    };
    const int stride = 41;
    printf("matmul: cuBLASLt linear layers, on %s (peak bf16 %.0f TFLOP/s from the table; 0 = unknown)\n", g_gpu.prop.name,
           gpu_peak_bf16_tflops(g_gpu.prop.name));

    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        const Shape *sh = &shapes[si];
        const int N = sh->N, C = sh->C, OC = sh->OC;
        const size_t NC = (size_t)N * C, NO = (size_t)N * OC, OCC = (size_t)OC * C;
        printf("-- %s: N %d, C %d, OC %d\n", sh->name, N, C, OC);

        // inputs: |w| <= 3/sqrt(C) makes the outputs ~unit scale
        float a = 3.0f / sqrtf((float)C);
        float *inp = dev_random(NC, -1.0f, 1.0f), *w = dev_random(OCC, -a, a), *bias = dev_random(OC, -0.5f, 0.5f);
        float *dout = dev_random(NO, -1.0f, 1.0f), *pre = dev_random(NC, -5.0f, 5.0f);
        float *dw0 = dev_random(OCC, -1.0f, 1.0f), *db0 = dev_random(OC, -1.0f, 1.0f);
        dev_round_bf16(inp, NC); dev_round_bf16(w, OCC); dev_round_bf16(bias, OC);
        dev_round_bf16(dout, NO); dev_round_bf16(pre, NC); dev_round_bf16(dw0, OCC); dev_round_bf16(db0, OC);

        int nr, noc;
        int *rows = sample_indices(N, stride, &nr), *ocs = sample_indices(OC, stride, &noc);
        const size_t nfo = (size_t)nr * OC, nbi = (size_t)nr * C, nw = (size_t)noc * C;

        // references. forward: (nr, OC); dinp: (nr, C); dw: (noc, C); dbias: (OC)
        double *f_acc = (double *)malloc(nfo * sizeof(double)), *f_abs = (double *)malloc(nfo * sizeof(double));
        float *wT = transpose(w, OC, C);
        ref_rows(f_acc, f_abs, inp, C, rows, nr, wT, OC);
        free(wT);
        double *b_acc = (double *)malloc(nbi * sizeof(double)), *b_abs = (double *)malloc(nbi * sizeof(double));
        ref_rows(b_acc, b_abs, dout, OC, rows, nr, w, C);
        double *w_acc = (double *)malloc(nw * sizeof(double)), *w_abs = (double *)malloc(nw * sizeof(double));
        float *doutT = transpose(dout, N, OC);
        ref_rows(w_acc, w_abs, doutT, N, ocs, noc, inp, C);
        free(doutT);

        float *r_plain = falloc(nfo), *e_plain = falloc(nfo), *r_nobias = falloc(nfo), *e_nobias = falloc(nfo);
        float *r_gelu = falloc(nfo), *e_gelu = falloc(nfo);
        for (size_t i = 0; i < nfo; i++) {
            int oc = (int)(i % OC);
            double acc = f_acc[i], p = acc + bias[oc], ea = ACC_REL * f_abs[i], th;
            r_plain[i] = (float)p;
            e_plain[i] = (float)(ea + BF16_REL * fabs(acc) + BF16_REL * fabs(p));
            r_nobias[i] = (float)acc;
            e_nobias[i] = (float)(ea + BF16_REL * fabs(acc));
            // out = GELU(pre): pre's own error (fallback: rounded, maybe twice) through gelu'
            // (+0.05 for its change over that interval), the GELU approximation, one rounding
            double y = dev_gelu(p), gd = dev_gelu_grad(p, &th);
            double e_pre = ea + BF16_REL * fabs(acc) + BF16_REL * fabs(p);
            double e_out = (fabs(gd) + 0.05) * e_pre + 0.5 * fabs(p) * TANH_APPROX_ERR + GELU_VARIANT;
            r_gelu[i] = (float)y;
            e_gelu[i] = (float)(e_out + BF16_REL * (fabs(y) + e_out));
        }
        float *r_dinp = falloc(nbi), *e_dinp = falloc(nbi), *r_dgelu = falloc(nbi), *e_dgelu = falloc(nbi);
        for (size_t i = 0; i < nbi; i++) {
            int s = (int)(i / C), c = (int)(i % C);
            double acc = b_acc[i], ea = ACC_REL * b_abs[i], x = pre[(size_t)rows[s] * C + c], th;
            r_dinp[i] = (float)acc;
            e_dinp[i] = (float)(ea + BF16_REL * fabs(acc));
            // dinp = acc * gelu'(pre): acc's error (fallback: rounded first) scaled by |gelu'|, the
            // approximation of gelu' (see gelu.cu) and the epilogue variant, times |acc|; one rounding
            double gd = dev_gelu_grad(x, &th), y = acc * gd;
            double dgd = TANH_APPROX_ERR * (0.5 + fabs(x) * fabs(th) * DEV_GELU_K * (1.0 + 3.0 * 0.044715 * x * x)) + GELU_VARIANT;
            double e = fabs(gd) * (ea + BF16_REL * fabs(acc)) + fabs(acc) * dgd;
            r_dgelu[i] = (float)y;
            e_dgelu[i] = (float)(e + BF16_REL * (fabs(y) + e));
        }
        float *r_dw = falloc(nw), *e_dw = falloc(nw);
        for (size_t i = 0; i < nw; i++) {
            int s = (int)(i / C), c = (int)(i % C);
            double y = dw0[(size_t)ocs[s] * C + c] + w_acc[i];
            r_dw[i] = (float)y;
            e_dw[i] = (float)(ACC_REL * w_abs[i] + BF16_REL * (fabs(w_acc[i]) + fabs(y)) + 1e-6);  // two roundings (error model above)
        }
        float *r_db = falloc(OC), *e_db = falloc(OC);
        {
            double *sum = (double *)calloc(OC, sizeof(double)), *sabs = (double *)calloc(OC, sizeof(double));
            for (int n = 0; n < N; n++)
                for (int oc = 0; oc < OC; oc++) {
                    sum[oc] += dout[(size_t)n * OC + oc];
                    sabs[oc] += fabs((double)dout[(size_t)n * OC + oc]);
                }
            for (int oc = 0; oc < OC; oc++) {
                double y = db0[oc] + sum[oc];
                r_db[oc] = (float)y;
                e_db[oc] = (float)(ACC_REL * sabs[oc] + BF16_REL * fabs(y) + 1e-6);
            }
            free(sum);
            free(sabs);
        }
        free(f_acc); free(f_abs); free(b_acc); free(b_abs); free(w_acc); free(w_abs);

        floatX *d_inp = dev_upload_bf16(inp, NC), *d_w = dev_upload_bf16(w, OCC), *d_bias = dev_upload_bf16(bias, OC);
        floatX *d_dout = dev_upload_bf16(dout, NO), *d_pre = dev_upload_bf16(pre, NC);
        floatX *d_dw0 = dev_upload_bf16(dw0, OCC), *d_db0 = dev_upload_bf16(db0, OC);
        floatX *d_out, *d_preg, *d_dinp, *d_dw, *d_db;
        cudaCheck(cudaMalloc(&d_out, NO * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_preg, NO * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dinp, NC * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dw, OCC * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_db, OC * sizeof(floatX)));
        float *d_scratch;
        cudaCheck(cudaMalloc(&d_scratch, column_sums_scratch_floats(OC) * sizeof(float)));

        // which epilogues cuBLASLt has an algorithm for here: where it has none, the "fused"
        // versions silently check the fallback instead (these calls only probe; results unused)
        int has_bias = matmul_cublaslt(d_out, d_w, d_inp, d_bias, OC, N, C, 1, 0, 0, NULL, 0);
        printf("   cuBLASLt BIAS epilogue: %s\n", has_bias ? "available" : "NOT available (add_bias_kernel fallback)");
        if (sh->fwd_gelu) {
            int ok = matmul_cublaslt(d_out, d_w, d_inp, d_bias, OC, N, C, 1, 0, 0, d_preg, 0);
            printf("   cuBLASLt GELU_AUX_BIAS epilogue: %s\n", ok ? "available" : "NOT available (v2/v3 check the fallback)");
        }
        if (sh->bwd_gelu) {
            int ok = matmul_cublaslt(d_dinp, d_w, d_dout, NULL, C, N, OC, 0, 0, 0, d_pre, 1);
            printf("   cuBLASLt DGELU epilogue: %s\n", ok ? "available" : "NOT available (v3 checks the fallback)");
        }
        cudaCheck(cudaDeviceSynchronize());

        const double fl_fwd = 2.0 * N * C * OC, fl_bwd = 4.0 * N * C * OC + (double)N * OC;
        const double by_fwd = 2.0 * (NC + OCC + NO + OC);
        const double by_bwd = 2.0 * (NO + OCC + NC + NC + 2.0 * OCC + 2.0 * OC);  // dout, w, dinp, inp, dw rw, dbias rw
        for (int ver = 1; ver <= NV; ver++) {
            if (v && ver != v) continue;
            g_gpu.gelu_fusion = ver - 1;
            char what[128];
            float ms, err;

            // forward with bias
            cudaCheck(cudaMemset(d_out, 0xFF, NO * sizeof(floatX)));  // NaN: must be overwritten
            auto fwd = [&]() { matmul_forward(d_out, d_inp, d_w, d_bias, N, C, OC, NULL); };
            fwd();
            cudaCheck(cudaDeviceSynchronize());
            {
                float *g = dev_download_bf16(d_out, NO), *gs = gather_rows(g, rows, nr, OC);
                snprintf(what, sizeof(what), "v%d %s forward out", ver, sh->name);
                err = dev_check_bounded(what, gs, r_plain, e_plain, nfo);
                free(g); free(gs);
            }
            ms = dev_time_ms(fwd);
            snprintf(what, sizeof(what), "fwd %s", sh->name);
            dev_report(what, ver, ms, by_fwd, fl_fwd, err);

            if (sh->fwd_nobias) {
                cudaCheck(cudaMemset(d_out, 0xFF, NO * sizeof(floatX)));
                auto fwd0 = [&]() { matmul_forward(d_out, d_inp, d_w, NULL, N, C, OC, NULL); };
                fwd0();
                cudaCheck(cudaDeviceSynchronize());
                float *g = dev_download_bf16(d_out, NO), *gs = gather_rows(g, rows, nr, OC);
                snprintf(what, sizeof(what), "v%d %s forward out (no bias)", ver, sh->name);
                err = dev_check_bounded(what, gs, r_nobias, e_nobias, nfo);
                free(g); free(gs);
                ms = dev_time_ms(fwd0);
                snprintf(what, sizeof(what), "fwd %s no bias", sh->name);
                dev_report(what, ver, ms, by_fwd - 2.0 * OC, fl_fwd, err);
            }

            if (sh->fwd_gelu) {
                cudaCheck(cudaMemset(d_out, 0xFF, NO * sizeof(floatX)));
                cudaCheck(cudaMemset(d_preg, 0xFF, NO * sizeof(floatX)));
                auto fwdg = [&]() { matmul_forward(d_out, d_inp, d_w, d_bias, N, C, OC, d_preg); };
                fwdg();
                cudaCheck(cudaDeviceSynchronize());
                float *g = dev_download_bf16(d_preg, NO), *gs = gather_rows(g, rows, nr, OC);
                snprintf(what, sizeof(what), "v%d %s forward pre_gelu", ver, sh->name);
                err = dev_check_bounded(what, gs, r_plain, e_plain, nfo);
                free(g); free(gs);
                g = dev_download_bf16(d_out, NO);
                gs = gather_rows(g, rows, nr, OC);
                snprintf(what, sizeof(what), "v%d %s forward out = GELU(pre_gelu)", ver, sh->name);
                err = fmaxf(err, dev_check_bounded(what, gs, r_gelu, e_gelu, nfo));
                free(g); free(gs);
                ms = dev_time_ms(fwdg);
                snprintf(what, sizeof(what), "fwd %s +GELU", sh->name);
                dev_report(what, ver, ms, by_fwd + 2.0 * NO, fl_fwd, err);
            }

            // backward, without and (fcproj) with the GELU; dw and dbias accumulate
            for (int wg = 0; wg <= sh->bwd_gelu; wg++) {
                const floatX *pg = wg ? d_pre : NULL;
                cudaCheck(cudaMemcpy(d_dw, d_dw0, OCC * sizeof(floatX), cudaMemcpyDeviceToDevice));
                cudaCheck(cudaMemcpy(d_db, d_db0, OC * sizeof(floatX), cudaMemcpyDeviceToDevice));
                cudaCheck(cudaMemset(d_dinp, 0xFF, NC * sizeof(floatX)));
                cudaCheck(cudaMemset(d_scratch, 0xFF, column_sums_scratch_floats(OC) * sizeof(float)));
                auto bwd = [&]() { matmul_backward(d_dinp, d_dw, d_db, d_dout, d_inp, d_w, N, C, OC, pg, d_scratch); };
                bwd();
                cudaCheck(cudaDeviceSynchronize());
                float *g = dev_download_bf16(d_dinp, NC), *gs = gather_rows(g, rows, nr, C);
                snprintf(what, sizeof(what), "v%d %s backward dinp%s", ver, sh->name, wg ? " (through GELU)" : "");
                err = dev_check_bounded(what, gs, wg ? r_dgelu : r_dinp, wg ? e_dgelu : e_dinp, nbi);
                free(g); free(gs);
                g = dev_download_bf16(d_dw, OCC);
                gs = gather_rows(g, ocs, noc, C);
                snprintf(what, sizeof(what), "v%d %s backward dweight (+=)", ver, sh->name);
                err = fmaxf(err, dev_check_bounded(what, gs, r_dw, e_dw, nw));
                free(g); free(gs);
                g = dev_download_bf16(d_db, OC);
                snprintf(what, sizeof(what), "v%d %s backward dbias (+=)", ver, sh->name);
                err = fmaxf(err, dev_check_bounded(what, g, r_db, e_db, OC));
                free(g);
                ms = dev_time_ms(bwd);  // keeps accumulating into dw, dbias; not checked again
                snprintf(what, sizeof(what), "bwd %s%s", sh->name, wg ? " +DGELU" : "");
                dev_report(what, ver, ms, by_bwd + (wg ? 2.0 * NC : 0.0), fl_bwd, err);
            }
        }

        cudaCheck(cudaFree(d_inp)); cudaCheck(cudaFree(d_w)); cudaCheck(cudaFree(d_bias)); cudaCheck(cudaFree(d_dout));
        cudaCheck(cudaFree(d_pre)); cudaCheck(cudaFree(d_dw0)); cudaCheck(cudaFree(d_db0)); cudaCheck(cudaFree(d_out));
        cudaCheck(cudaFree(d_preg)); cudaCheck(cudaFree(d_dinp)); cudaCheck(cudaFree(d_dw)); cudaCheck(cudaFree(d_db));
        cudaCheck(cudaFree(d_scratch));
        free(inp); free(w); free(bias); free(dout); free(pre); free(dw0); free(db0); free(rows); free(ocs);
        free(r_plain); free(e_plain); free(r_nobias); free(e_nobias); free(r_gelu); free(e_gelu);
        free(r_dinp); free(e_dinp); free(r_dgelu); free(e_dgelu); free(r_dw); free(e_dw); free(r_db); free(e_db);
    }
    return dev_summary();
}
