// dev/cuda/btt_weight.cu: a BTT layer's weight matrix W (d_in x d_out) from its cores, and the
// cores' gradients from dW: the extra work of running a BTT as dense GEMMs (-sm 1, -sm 2), done
// in every forward and backward.
//   v1  the plans on the d_in rows of the identity (st_dense_weight_plan, ..._backward_plan): W is
//       the layer's forward of I, the gradients its weight backward with dy = dW; the trainer's
//       way until 2026-12-04
//   v2  straight from the cores (btt_weight_gpu, btt_weight_backward_gpu): one kernel writes W,
//       two read dW once each; the trainer's
// Each is checked against the DESIGN.md formula on the CPU in double,
//   W[g α + a, f ε + e] = Σ_s W0[g, a, f ρ + s] W1[f, g ρ + s, e],
// (itself checked against btt.h's forward of the identity on the first shape) and its gradients
// dW0 = Σ_e dW W1, dW1 = Σ_a W0 dW, accumulated onto nonzero gradients. Then both directions are
// timed, with their GB/s on the least traffic (W written once; dW read once), next to one dense
// forward GEMM x W at N rows (the work they are added to).
//
// Build: make -C dev/cuda btt_weight    Run: ./dev/cuda/btt_weight [version: 0 all, 1, 2] [largest d_in, default 4096] [N, default 32768]
#include "harness.cuh"
#include "structured/structured.cuh"

typedef struct {
    int d_in, d_out, rank;
} WCase;

static float *host_random(size_t n, float a) {
    float *h = dev_random(n, -a, a);
    dev_round_bf16(h, n);
    return h;
}

// W and the cores' gradients (added to g0, g1) in double from the formula.
static void reference(float *W, float *g0, float *g1, const float *W0, const float *W1, const float *dW, const BTTShape *b) {
    const int A = b->alpha, G = b->gamma, P = b->phi, E = b->eps, R = b->rank, din = b->d_in, dout = b->d_out;
    for (int i = 0; i < din; i++)
        for (int o = 0; o < dout; o++) {
            const int g = i / A, a = i % A, f = o / E, e = o % E;
            double w = 0.0;
            for (int s = 0; s < R; s++) {
                const size_t i0 = ((size_t)(g * A + a) * P + f) * R + s, i1 = (((size_t)f * G + g) * R + s) * E + e;
                w += (double)W0[i0] * W1[i1];
                g0[i0] += (float)((double)dW[(size_t)i * dout + o] * W1[i1]);
                g1[i1] += (float)((double)W0[i0] * dW[(size_t)i * dout + o]);
            }
            W[(size_t)i * dout + o] = (float)w;
        }
}

int main(int argc, char **argv) {
    gpu_init(0);
    const int version = dev_version_arg(argc, argv, 2);
    const int max_din = argc > 2 ? atoi(argv[2]) : 4096, N = argc > 3 ? atoi(argv[3]) : 32768;
    if (max_din < 64 || N < 1) {
        fprintf(stderr, "btt_weight: the largest d_in must be at least 64 and N positive (got '%s', %d)\n", argc > 2 ? argv[2] : "", N);
        return 1;
    }
    const WCase cases[] = {{768, 3072, 1}, {768, 3072, 4}, {3072, 768, 4}, {768, 768, 2}, {2048, 8192, 2}, {4096, 16384, 1}};
    printf("btt_weight: W from a BTT's cores and the cores' gradients from dW, bf16, on %s (dense GEMM at N = %d rows)\n", g_gpu.prop.name, N);
    int first = 1;
    for (const WCase &c : cases) {
        if (c.d_in > max_din) continue;
        BTTShape b;
        btt_shape_default(&b, c.d_in, c.d_out, c.rank);
        const size_t n0 = btt_w0_size(&b), n1 = btt_w1_size(&b), nw = (size_t)c.d_in * c.d_out;
        char name[64];
        snprintf(name, sizeof(name), "btt r%d %d->%d", c.rank, c.d_in, c.d_out);
        float *hw0 = host_random(n0, sqrtf(1.0f / b.alpha)), *hw1 = host_random(n1, sqrtf(1.0f / (b.gamma * b.rank)));
        float *hdw = host_random(nw, 1.0f), *hg0 = host_random(n0, 0.5f), *hg1 = host_random(n1, 0.5f);
        float *rW = (float *)malloc(nw * sizeof(float)), *r0 = (float *)malloc(n0 * sizeof(float)), *r1 = (float *)malloc(n1 * sizeof(float));
        memcpy(r0, hg0, n0 * sizeof(float));
        memcpy(r1, hg1, n1 * sizeof(float));
        reference(rW, r0, r1, hw0, hw1, hdw, &b);
        if (first) {  // the formula is btt.h's layer: its forward of the identity's first rows
            const int rows = 16;
            float *eye = (float *)calloc((size_t)rows * c.d_in, sizeof(float)), *y = (float *)malloc((size_t)rows * c.d_out * sizeof(float));
            float *z = (float *)malloc(btt_z_size(&b, rows) * sizeof(float));
            for (int i = 0; i < rows; i++) eye[(size_t)i * c.d_in + i] = 1.0f;
            btt_forward(y, z, eye, hw0, hw1, NULL, rows, &b);
            char what[192];
            snprintf(what, sizeof(what), "%s: the CPU formula's W = btt.h's forward of the identity (first %d rows)", name, rows);
            dev_check(what, y, rW, (size_t)rows * c.d_out, 1e-5f, 1e-5f);
            free(eye); free(y); free(z);
            first = 0;
        }
        floatX *W0 = dev_upload_bf16(hw0, n0), *W1 = dev_upload_bf16(hw1, n1), *dW = dev_upload_bf16(hdw, nw);
        floatX *g0 = dev_upload_bf16(hg0, n0), *g1 = dev_upload_bf16(hg1, n1), *W, *ws, *x, *y;
        cudaCheck(cudaMalloc(&W, nw * sizeof(floatX)));
        cudaCheck(cudaMalloc(&ws, (st_dense_plan_ws_elems(STRUCT_BTT, &b) + 8) * sizeof(floatX)));
        cudaCheck(cudaMalloc(&x, (size_t)N * c.d_in * sizeof(floatX)));
        cudaCheck(cudaMalloc(&y, (size_t)N * c.d_out * sizeof(floatX)));
        cudaCheck(cudaMemset(x, 0, (size_t)N * c.d_in * sizeof(floatX)));
        const float dense_ms = dev_time_ms([&]() { matmul_forward(y, x, W, NULL, N, c.d_in, c.d_out, NULL, 1); });
        const double bytes = 2.0 * nw;
        float ms[3][2] = {{0}};
        for (int v = 1; v <= 2; v++) {
            if (version && v != version) continue;
            auto fwd = [&]() {
                if (v == 1) st_dense_weight_plan(W, 0, ws, STRUCT_BTT, &b, W0, W1);
                else btt_weight_gpu(W, 0, &b, W0, W1);
            };
            auto bwd = [&]() {
                if (v == 1) st_dense_weight_backward_plan(g0, g1, dW, 0, ws, STRUCT_BTT, &b, W0, W1);
                else btt_weight_backward_gpu(g0, g1, dW, 0, &b, W0, W1);
            };
            dev_copy_bf16(g0, hg0, n0);  // the previous version's timing kept adding to them
            dev_copy_bf16(g1, hg1, n1);
            fwd();
            bwd();
            cudaCheck(cudaDeviceSynchronize());
            char what[192];
            float *gW = dev_download_bf16(W, nw), *gg0 = dev_download_bf16(g0, n0), *gg1 = dev_download_bf16(g1, n1);
            // bf16 outputs: W rounded once (v1: z rounded to bf16 in between), the gradients summed into bf16
            snprintf(what, sizeof(what), "%s v%d: W", name, v);
            dev_check(what, gW, rW, nw, 1e-4f, 8e-3f);
            snprintf(what, sizeof(what), "%s v%d: dW0 (onto nonzero dW0)", name, v);
            dev_check(what, gg0, r0, n0, 4e-3f, 8e-3f);
            snprintf(what, sizeof(what), "%s v%d: dW1 (onto nonzero dW1)", name, v);
            dev_check(what, gg1, r1, n1, 4e-3f, 8e-3f);
            free(gW); free(gg0); free(gg1);
            ms[v][0] = dev_time_ms(fwd);
            ms[v][1] = dev_time_ms(bwd);  // keeps adding to g0, g1: checked above, timed here
            printf("  %-22s v%d  W %8.4f ms %7.1f GB/s   gradients %8.4f ms %7.1f GB/s   (W + gradients) / dense fwd GEMM %.3f\n", name, v,
                   ms[v][0], bytes / (ms[v][0] * 1e-3) / 1e9, ms[v][1], bytes / (ms[v][1] * 1e-3) / 1e9, (ms[v][0] + ms[v][1]) / dense_ms);
        }
        printf("  %-22s dense forward GEMM x W at N = %d: %.4f ms\n", name, N, dense_ms);
        if (!version) printf("  %-22s v2 / v1: W %.3fx, gradients %.3fx\n", name, ms[2][0] / ms[1][0], ms[2][1] / ms[1][1]);
        free(hw0); free(hw1); free(hdw); free(hg0); free(hg1); free(rW); free(r0); free(r1);
        floatX *bufs[] = {W0, W1, dW, g0, g1, W, ws, x, y};
        for (floatX *p : bufs) cudaCheck(cudaFree(p));
    }
    return dev_summary();
}
