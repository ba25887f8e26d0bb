// dev/cuda/encoder.cu: token + position embedding. Forward out[b,t,:] = wte[inp[b,t],:] +
// wpe[t,:] (bf16); backward dwte[tok,:] += sum of dout over the positions holding tok, dwpe[t,:]
// += sum over b of dout[b,t,:], deterministic: the positions of each distinct token are
// bucketed on the host (encoder_buckets_build, as the trainer does once per batch) and each wte
// row is summed by one block in position order. Checked against a CPU reference and timed.
//
//   v1  naive forward: one element per thread, 2-byte loads (written here)
//   v2  the trainer's encoder_forward (cuda/encoder.cuh: 8 channels per thread, 128-bit loads)
//       and encoder_backward (bucketed, deterministic); the backward has this one version
//
// Shape: B = 8, T = 1024, C = 768, V = 50257. Half of the tokens are drawn from the first 100
// ids (so that tokens repeat, up to ~70 times, as in text), half from the whole vocabulary.
//
// Build: make -C dev/cuda encoder    Run: ./dev/cuda/encoder [version]
#include "harness.cuh"
#include "cuda/encoder.cuh"

#define NV 2

// ----------------------------------------------------------------------------------------------
// v1

__global__ void encoder_forward_naive_kernel(floatX *out, const int *inp, const floatX *wte, const floatX *wpe, int B, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)B * T * C) return;
    size_t bt = i / C;
    int c = (int)(i % C), t = (int)(bt % T);
    out[i] = (floatX)((float)wte[(size_t)inp[bt] * C + c] + (float)wpe[(size_t)t * C + c]);
}

// ----------------------------------------------------------------------------------------------
// Tolerances
//  forward: exact — the fp32 sum of two bf16 values rounded to nearest-even bf16 is the same
//    IEEE operation on the host (the reference adds in float too) and on the device
//  dwte, rows of tokens in the batch: rtol 2^-8 (+1%) = 3.95e-3 for the one bf16 rounding of
//    (prior + sum), atol cmax^2 2^-24 (+1e-6) for the fp32 sum of at most cmax terms of
//    magnitude <= 1 (cmax: the most repeated token's count, printed)
//  dwte, rows of tokens not in the batch: unchanged, bit for bit
//  dwpe: rtol 3.95e-3, atol 1e-5 (>= B^2 2^-24 for the fp32 sum over B = 8)
#define TOL_RTOL 3.95e-3f
#define TOL_WPE_ATOL 1e-5f

static void count_check(const char *what, size_t bad, size_t n, const char *first_msg) {
    if (bad) {
        g_dev_fail++;
        printf("FAIL %s: %zu of %zu; first: %s\n", what, bad, n, first_msg);
    } else {
        g_dev_pass++;
    }
}

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const int B = 8, T = 1024, C = 768, V = 50257, BT = B * T;
    const size_t BTC = (size_t)BT * C, VC = (size_t)V * C, TC = (size_t)T * C;
    printf("encoder: B %d, T %d, C %d, V %d, on %s\n", B, T, C, V, g_gpu.prop.name);

    int *inp = (int *)malloc(BT * sizeof(int));
    for (int i = 0; i < BT; i++) inp[i] = dev_uniform() < 0.5f ? (int)(dev_uniform() * 100) : (int)(dev_uniform() * V) % V;
    inp[0] = V - 1;  // the last row of wte
    inp[1] = 0;
    float *wte = dev_random(VC, -1.0f, 1.0f), *wpe = dev_random(TC, -1.0f, 1.0f);
    float *dout = dev_random(BTC, -1.0f, 1.0f), *dwte0 = dev_random(VC, -1.0f, 1.0f), *dwpe0 = dev_random(TC, -1.0f, 1.0f);
    dev_round_bf16(wte, VC); dev_round_bf16(wpe, TC);
    dev_round_bf16(dout, BTC); dev_round_bf16(dwte0, VC); dev_round_bf16(dwpe0, TC);

    // forward reference
    float *ref_out = (float *)malloc(BTC * sizeof(float));
    for (int bt = 0; bt < BT; bt++)
        for (int c = 0; c < C; c++)
            ref_out[(size_t)bt * C + c] = dev_bf2f(dev_f2bf(wte[(size_t)inp[bt] * C + c] + wpe[(size_t)(bt % T) * C + c]));

    // backward reference (double), with its own token numbering (independent of the buckets)
    int *uidx = (int *)malloc(V * sizeof(int)), *ucount = (int *)calloc(V, sizeof(int)), U_ref = 0, cmax = 0;
    for (int i = 0; i < V; i++) uidx[i] = -1;
    for (int p = 0; p < BT; p++) {
        if (uidx[inp[p]] < 0) uidx[inp[p]] = U_ref++;
        if (++ucount[inp[p]] > cmax) cmax = ucount[inp[p]];
    }
    double *acc = (double *)calloc((size_t)U_ref * C, sizeof(double));
    for (int p = 0; p < BT; p++)
        for (int c = 0; c < C; c++) acc[(size_t)uidx[inp[p]] * C + c] += dout[(size_t)p * C + c];
    float *ref_dwte = (float *)malloc(VC * sizeof(float));
    for (int tok = 0; tok < V; tok++)
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)tok * C + c;
            ref_dwte[i] = uidx[tok] < 0 ? dwte0[i] : (float)(dwte0[i] + acc[(size_t)uidx[tok] * C + c]);
        }
    float *ref_dwpe = (float *)malloc(TC * sizeof(float));
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++) {
            double s = dwpe0[(size_t)t * C + c];
            for (int b = 0; b < B; b++) s += dout[((size_t)b * T + t) * C + c];
            ref_dwpe[(size_t)t * C + c] = (float)s;
        }
    free(acc);
    const float tol_wte_atol = (float)((double)cmax * cmax / 16777216.0 + 1e-6);
    printf("   %d distinct tokens, the most repeated %d times (dwte atol %.2g)\n", U_ref, cmax, tol_wte_atol);

    // the trainer's bucketing, on the host
    int *h_buckets = (int *)malloc((3 * (size_t)BT + 2) * sizeof(int)), *h_count = (int *)calloc(V, sizeof(int));
    int used = encoder_buckets_build(h_buckets, h_count, inp, BT, V);
    int U = h_buckets[0];
    {
        char msg[96];
        snprintf(msg, sizeof(msg), "buckets say %d distinct tokens, the reference %d", U, U_ref);
        count_check("encoder_buckets_build distinct tokens", U == U_ref ? 0 : 1, 1, msg);
    }

    floatX *d_wte = dev_upload_bf16(wte, VC), *d_wpe = dev_upload_bf16(wpe, TC), *d_dout = dev_upload_bf16(dout, BTC);
    floatX *d_dwte0 = dev_upload_bf16(dwte0, VC), *d_dwpe0 = dev_upload_bf16(dwpe0, TC), *d_out, *d_dwte, *d_dwpe;
    int *d_inp = dev_upload(inp, BT), *d_buckets;
    cudaCheck(cudaMalloc(&d_buckets, (3 * (size_t)BT + 2) * sizeof(int)));
    cudaCheck(cudaMemcpy(d_buckets, h_buckets, (size_t)used * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMalloc(&d_out, BTC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dwte, VC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dwpe, TC * sizeof(floatX)));

    for (int ver = 1; ver <= NV; ver++) {
        if (v && ver != v) continue;
        char what[96];
        cudaCheck(cudaMemset(d_out, 0xFF, BTC * sizeof(floatX)));  // NaN: must be overwritten
        auto fwd = [&]() {
            if (ver == 1) {
                encoder_forward_naive_kernel<<<ceil_div_i((long)BTC, 256), 256>>>(d_out, d_inp, d_wte, d_wpe, B, T, C);
                cudaCheckLaunch();
            } else {
                encoder_forward(d_out, d_inp, d_wte, d_wpe, B, T, C);
            }
        };
        fwd();
        cudaCheck(cudaDeviceSynchronize());
        float *g = dev_download_bf16(d_out, BTC);
        snprintf(what, sizeof(what), "v%d encoder_forward", ver);
        float err = dev_check(what, g, ref_out, BTC, 0.0f, 0.0f);
        free(g);
        // minimum traffic: the gathered wte rows and wpe rows read, out written, the token ids
        float ms = dev_time_ms(fwd);
        dev_report("encoder_forward", ver, ms, 3.0 * BTC * sizeof(floatX) + 4.0 * BT, (double)BTC, err);
        if (ver != 2) continue;

        // backward (v2 only), accumulating onto the priors
        cudaCheck(cudaMemcpy(d_dwte, d_dwte0, VC * sizeof(floatX), cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemcpy(d_dwpe, d_dwpe0, TC * sizeof(floatX), cudaMemcpyDeviceToDevice));
        auto bwd = [&]() { encoder_backward(d_dwte, d_dwpe, d_dout, d_buckets, U, B, T, C); };
        bwd();
        cudaCheck(cudaDeviceSynchronize());
        float *gw = dev_download_bf16(d_dwte, VC);
        // touched rows: gathered and checked with tolerance; the others must not change at all
        float *gt = (float *)malloc((size_t)U_ref * C * sizeof(float)), *rt = (float *)malloc((size_t)U_ref * C * sizeof(float));
        size_t k = 0, bad = 0;
        char first[160] = "";
        for (int tok = 0; tok < V; tok++) {
            const float *grow = gw + (size_t)tok * C, *rrow = ref_dwte + (size_t)tok * C;
            if (uidx[tok] >= 0) {
                memcpy(gt + k, grow, C * sizeof(float));
                memcpy(rt + k, rrow, C * sizeof(float));
                k += C;
            } else {
                for (int c = 0; c < C; c++)
                    if (memcmp(&grow[c], &rrow[c], sizeof(float)) != 0) {
                        if (!bad) snprintf(first, sizeof(first), "token %d channel %d: %g, was %g", tok, c, grow[c], rrow[c]);
                        bad++;
                    }
            }
        }
        snprintf(what, sizeof(what), "v%d encoder_backward dwte (tokens in the batch)", ver);
        err = dev_check(what, gt, rt, k, tol_wte_atol, TOL_RTOL);
        snprintf(what, sizeof(what), "v%d encoder_backward dwte (other tokens unchanged)", ver);
        count_check(what, bad, VC - k, first);
        free(gw); free(gt); free(rt);
        float *gp = dev_download_bf16(d_dwpe, TC);
        snprintf(what, sizeof(what), "v%d encoder_backward dwpe", ver);
        err = fmaxf(err, dev_check(what, gp, ref_dwpe, TC, TOL_WPE_ATOL, TOL_RTOL));
        free(gp);
        // minimum traffic: read dout, read+write the touched wte rows and wpe, the buckets
        double bytes = (double)BTC * sizeof(floatX) + 2.0 * U * C * sizeof(floatX) + 2.0 * TC * sizeof(floatX) + 4.0 * used;
        ms = dev_time_ms(bwd);  // keeps accumulating; not checked again
        dev_report("encoder_backward", ver, ms, bytes, 2.0 * BTC, err);
    }

    cudaCheck(cudaFree(d_wte)); cudaCheck(cudaFree(d_wpe)); cudaCheck(cudaFree(d_dout)); cudaCheck(cudaFree(d_dwte0));
    cudaCheck(cudaFree(d_dwpe0)); cudaCheck(cudaFree(d_out)); cudaCheck(cudaFree(d_dwte)); cudaCheck(cudaFree(d_dwpe));
    cudaCheck(cudaFree(d_inp)); cudaCheck(cudaFree(d_buckets));
    free(inp); free(wte); free(wpe); free(dout); free(dwte0); free(dwpe0); free(ref_out);
    free(uidx); free(ucount); free(ref_dwte); free(ref_dwpe); free(h_buckets); free(h_count);
    return dev_summary();
}
