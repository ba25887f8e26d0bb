// dev/cuda/classifier.cu: fused softmax + cross-entropy over the padded vocabulary. logits
// (BT, Vp) bf16, the first V columns real; losses[r] = logsumexp(logits[r][:V]) - logits[r][t]
// in fp32; with dloss != 0 the logits row is overwritten in place with
// dloss * (softmax - onehot(t)) on the real columns and 0 on the padded ones (what the lm-head
// backward reads); with dloss == 0 the logits are left as they are.
//
//   v1  naive: one block per row, three passes (max; sum of exp; write), written here
//   v2  the trainer's fused_classifier (cuda/classifier.cuh: one online-softmax read pass, one
//       write pass)
//
// Shape: BT = 4*1024 rows, V = 50257, Vp = 50304. The padded columns hold large garbage (20..40)
// so that including them anywhere would show. The CPU reference covers every 4th row (1024
// rows, every column) to stay under a few seconds.
//
// Build: make -C dev/cuda classifier    Run: ./dev/cuda/classifier [version]
#include "harness.cuh"
#include "cuda/classifier.cuh"

#define NV 2

// ----------------------------------------------------------------------------------------------
// v1

__device__ inline float block_max_naive(float v) {
    __shared__ float sh[32];
    __syncthreads();
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_max(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -FLT_MAX;
    return warp_max(v);
}

__global__ void classifier_naive_kernel(floatX *logits, float *losses, const int *targets, int V, int Vp, float dloss) {
    size_t row = blockIdx.x;
    floatX *l = logits + row * Vp;
    float m = -FLT_MAX;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, (float)l[i]);
    m = block_max_naive(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf((float)l[i] - m);
    s = block_sum(s);
    int target = targets[row];
    if (threadIdx.x == 0) losses[row] = logf(s) + m - (float)l[target];
    if (dloss == 0.0f) return;
    __syncthreads();  // thread 0 has read l[target] before its owner overwrites it
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float y = 0.0f;
        if (i < V) y = dloss * (expf((float)l[i] - m) / s - (i == target ? 1.0f : 0.0f));
        l[i] = (floatX)y;
    }
}

// ----------------------------------------------------------------------------------------------
// Tolerances
//  losses: atol 1e-4 (+ rtol 1e-5): relative error of the fp32 sum of exps: ~50 serial adds per
//    thread and a 10-level tree (60 2^-24 = 4e-6), plus the online rescalings (a few per thread)
//    and the 10 merge levels, each __expf(d) off by ~|d log2 e| 2^-24 + 2 ulp, |d| <= 20 (2e-6
//    each): < 5e-5 in all, i.e. < 5e-5 in the loss (~10); __logf adds ~1e-6.
//  dlogits, real columns: rtol 4.1e-3 = 2^-8 (+1%, the bf16 rounding) + 1.5e-4 for the fp32 p
//    (relative error < 5e-5 as above, plus __expf and the approximate division) and no atol:
//    dloss = 1/BT is a power of two, the values (>= 1e-13) are far from fp32/bf16 denormals, and
//    the target column's dloss (p - 1) keeps |p - 1| >= 0.5 with these logits (no cancellation).
//  padded columns: exactly 0.  Forward only (dloss 0): the logits are unchanged, bit for bit.
#define TOL_LOSS_ATOL 1e-4f
#define TOL_LOSS_RTOL 1e-5f
#define TOL_DLOGITS_RTOL 4.1e-3

// one pass/fail line from a count of bad elements
static void count_check(const char *what, size_t bad, size_t n, const char *first_msg) {
    if (bad) {
        g_dev_fail++;
        printf("FAIL %s: %zu of %zu elements; first: %s\n", what, bad, n, first_msg);
    } else {
        g_dev_pass++;
    }
}

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const int BT = 4 * 1024, V = 50257, Vp = 50304, STRIDE = 4, NS = BT / STRIDE;
    const float dloss = 1.0f / BT;
    const size_t n = (size_t)BT * Vp;
    printf("classifier: BT = %d, V = %d, Vp = %d (reference on every %dth row), on %s\n", BT, V, Vp, STRIDE, g_gpu.prop.name);

    // targets; sampled rows 0 and 4 get the last real column (in the 8-wide chunk that straddles
    // V) and the first
    int *targets = dev_random_ints(BT, V);
    targets[0] = V - 1;
    targets[4] = 0;
    // logits in bf16: real columns uniform in [-6, 6], the target's raised by 8 in every 3rd
    // row (a confident row; p_target stays < 0.5), padded columns garbage in [20, 40]
    uint16_t *h = (uint16_t *)malloc(n * sizeof(uint16_t));
    for (int r = 0; r < BT; r++)
        for (int i = 0; i < Vp; i++) {
            float f = i < V ? -6.0f + 12.0f * dev_uniform() : 20.0f + 20.0f * dev_uniform();
            if (i == targets[r] && r % 3 == 0) f += 8.0f;
            h[(size_t)r * Vp + i] = dev_f2bf(f);
        }
    // reference per sampled row: max and sum of exp (double); loss
    double *rm = (double *)malloc(NS * sizeof(double)), *rs = (double *)malloc(NS * sizeof(double));
    float *ref_loss = (float *)malloc(NS * sizeof(float));
    for (int s = 0; s < NS; s++) {
        const uint16_t *l = h + (size_t)s * STRIDE * Vp;
        double m = -INFINITY, sum = 0.0;
        for (int i = 0; i < V; i++) m = fmax(m, (double)dev_bf2f(l[i]));
        for (int i = 0; i < V; i++) sum += exp(dev_bf2f(l[i]) - m);
        rm[s] = m;
        rs[s] = sum;
        ref_loss[s] = (float)(log(sum) + m - dev_bf2f(l[targets[s * STRIDE]]));
    }

    floatX *d_logits0, *d_logits;
    cudaCheck(cudaMalloc(&d_logits0, n * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_logits, n * sizeof(floatX)));
    cudaCheck(cudaMemcpy(d_logits0, h, n * sizeof(floatX), cudaMemcpyHostToDevice));
    int *d_targets = dev_upload(targets, BT);
    float *d_losses;
    cudaCheck(cudaMalloc(&d_losses, BT * sizeof(float)));
    uint16_t *g = (uint16_t *)malloc((size_t)NS * Vp * sizeof(uint16_t));
    float *g_loss = (float *)malloc(NS * sizeof(float));

    for (int ver = 1; ver <= NV; ver++) {
        if (v && ver != v) continue;
        for (int mode = 0; mode < 2; mode++) {  // 0: losses only; 1: losses and dlogits in place
            float dl = mode ? dloss : 0.0f;
            char what[96];
            cudaCheck(cudaMemcpy(d_logits, d_logits0, n * sizeof(floatX), cudaMemcpyDeviceToDevice));
            cudaCheck(cudaMemset(d_losses, 0xFF, BT * sizeof(float)));  // NaN: must be overwritten
            auto run = [&]() {
                if (ver == 1) {
                    classifier_naive_kernel<<<BT, 1024>>>(d_logits, d_losses, d_targets, V, Vp, dl);
                    cudaCheckLaunch();
                } else {
                    fused_classifier(d_logits, d_losses, d_targets, BT, V, Vp, dl);
                }
            };
            run();
            cudaCheck(cudaDeviceSynchronize());
            // the sampled rows of the logits and the losses
            cudaCheck(cudaMemcpy2D(g, Vp * sizeof(uint16_t), d_logits, (size_t)STRIDE * Vp * sizeof(floatX), Vp * sizeof(uint16_t), NS,
                                   cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy2D(g_loss, sizeof(float), d_losses, STRIDE * sizeof(float), sizeof(float), NS, cudaMemcpyDeviceToHost));
            snprintf(what, sizeof(what), "v%d losses (dloss %s)", ver, mode ? "1/BT" : "0");
            float err = dev_check(what, g_loss, ref_loss, NS, TOL_LOSS_ATOL, TOL_LOSS_RTOL);

            char first[160] = "";
            if (mode == 0) {
                size_t bad = 0;
                for (int s = 0; s < NS; s++)
                    for (int i = 0; i < Vp; i++)
                        if (g[(size_t)s * Vp + i] != h[(size_t)s * STRIDE * Vp + i]) {
                            if (!bad) snprintf(first, sizeof(first), "row %d col %d changed", s * STRIDE, i);
                            bad++;
                        }
                snprintf(what, sizeof(what), "v%d logits unchanged with dloss 0", ver);
                count_check(what, bad, (size_t)NS * Vp, first);
            } else {
                size_t bad = 0, bad_pad = 0;
                char first_pad[160] = "";
                for (int s = 0; s < NS; s++) {
                    const uint16_t *l = h + (size_t)s * STRIDE * Vp, *gr = g + (size_t)s * Vp;
                    int t = targets[s * STRIDE];
                    for (int i = 0; i < V; i++) {
                        double ref = dloss * (exp(dev_bf2f(l[i]) - rm[s]) / rs[s] - (i == t ? 1.0 : 0.0));
                        double got = dev_bf2f(gr[i]), e = fabs(got - ref);
                        if (!(e <= TOL_DLOGITS_RTOL * fabs(ref))) {
                            if (!bad) snprintf(first, sizeof(first), "row %d col %d: gpu %.6g ref %.6g", s * STRIDE, i, got, ref);
                            bad++;
                        }
                        if (e / (fabs(ref) + 1e-30) > err) err = (float)(e / (fabs(ref) + 1e-30));  // relative, for the report
                    }
                    for (int i = V; i < Vp; i++)
                        if (dev_bf2f(gr[i]) != 0.0f) {
                            if (!bad_pad) snprintf(first_pad, sizeof(first_pad), "row %d col %d: %g", s * STRIDE, i, dev_bf2f(gr[i]));
                            bad_pad++;
                        }
                }
                snprintf(what, sizeof(what), "v%d dlogits (real columns)", ver);
                count_check(what, bad, (size_t)NS * V, first);
                snprintf(what, sizeof(what), "v%d dlogits padded columns == 0", ver);
                count_check(what, bad_pad, (size_t)NS * (Vp - V), first_pad);
            }

            // minimum traffic: read the logits (and write them back with dloss), targets, losses;
            // ~4 flops per real logit for the loss (max, subtract, exp, add), ~4 more for dlogits
            double bytes = (mode ? 2.0 : 1.0) * n * sizeof(floatX) + 8.0 * BT;
            float ms = dev_time_ms(run);  // with dloss the logits become dlogits: later calls read those
            snprintf(what, sizeof(what), "classifier %s", mode ? "loss+dlogits" : "loss only");
            dev_report(what, ver, ms, bytes, (mode ? 8.0 : 4.0) * BT * V, err);
        }
    }
    printf("(max err: the losses' absolute error, or with dlogits the largest relative error of dlogits)\n");

    cudaCheck(cudaFree(d_logits0));
    cudaCheck(cudaFree(d_logits));
    cudaCheck(cudaFree(d_targets));
    cudaCheck(cudaFree(d_losses));
    free(targets); free(h); free(rm); free(rs); free(ref_loss); free(g); free(g_loss);
    return dev_summary();
}
