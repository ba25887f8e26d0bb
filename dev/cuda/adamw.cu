// dev/cuda/adamw.cu: the trainer's fused AdamW step over a parameter table (cuda/adamw.cuh,
// common/params.h): fp32 master weights and moments, per-tensor lr multiplier and decay flag,
// stochastic rounding of the master weights to the bf16 weights. Checked against a double CPU
// AdamW (the CPU trainer's gpt2_update written out again), and timed.
//
//   v1  one grid-stride kernel launch per tensor (written here; the trainer's until 2026-12-05)
//   v2  the trainer's: adamw_update_plan, every tensor in one launch over a table of chunks of at
//       most ADAMW_CHUNK elements, each inside one tensor (cuda/adamw.cuh); the same per-element
//       update (adamw_element), so it must give v1's bits exactly
//
// What is checked, after one update t = 7 from random state:
//  - master, m, v against the CPU reference (tolerances below)
//  - bf16 params: each is one of the two bf16 neighbours of the GPU's own master (truncated, or
//    truncated + 1 ulp away from zero; exactly the master when it is representable), and within
//    one bf16 ulp of the reference master
//  - the rounding is unbiased: mean over all elements of (rounded up - fraction) ~ 0
//  - determinism: the same update again from the same state gives identical bf16 and master
//  - resume: master_to_bf16(t) (what a resumed run does) gives the update's bf16 bit for bit,
//    and master_to_bf16(0) is round-to-nearest-even of the master
//
// Table: "wte" (50304, 768) with decay, "ln.w" (768) without, "odd" (3, 333) with decay and
// lr_mult 0.5 (odd size, odd offsets). About 38.6M elements (on the CPU simulator wte has 4099
// rows: 3.1M).
// Then GPT-2 124M's own table, as the trainer lays it out (common/gpt2.h: 148 tensors, 124.5M
// elements; on the CPU simulator the same at width 64), where most tensors are
// vectors of 768 and one launch per tensor costs more than its work: each version timed on it,
// and v2's bf16 weights, master weights and moments must be v1's bit for bit.
//
// Build: make -C dev/cuda adamw    Run: ./dev/cuda/adamw [version]
#include <vector>
#include "harness.cuh"
#include "cuda/adamw.cuh"
#include "common/gpt2.h"

#define NV 2

// v1: one launch per tensor
__global__ void adamw_tensor_kernel(floatX *params, float *master, const floatX *grads, float *m, float *v, size_t n, float lr, float beta1,
                                    float beta2, float bc1, float bc2, float eps, float wd, float grad_scale, unsigned int seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        adamw_element(params, master, grads, m, v, i, i, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale, seed);
}
static void adamw_v1(const ParamTable *pt, floatX *params, float *master, const floatX *grads, float *m, float *v, float lr, float beta1,
                     float beta2, float eps, float wd, float grad_scale, long t) {
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    for (int i = 0; i < pt->n; i++) {
        const ParamTensor *p = &pt->t[i];
        const size_t o = p->offset;
        adamw_tensor_kernel<<<grid_for(p->numel, 512), 512>>>(params + o, master + o, grads + o, m + o, v + o, p->numel, lr * p->lr_mult, beta1,
                                                              beta2, bc1, bc2, eps, p->decay ? wd : 0.0f, grad_scale, adamw_seed(t, i));
        cudaCheckLaunch();
    }
}


// Tolerances (master in [-0.5, 0.5], g in [-0.1, 0.1] * 0.75, m in [-0.01, 0.01], v >= m^2):
//  m: atol 5e-9 (+ rtol 1e-6): b1 m + (1 - b1) g in fp32, <= 3 roundings of terms <= 0.017
//     (3 2^-24 0.017 = 3e-9); 1 - b1 is exact in fp32 and the reference uses the same float b1
//  v: rtol 1e-6: positive terms, <= 4 roundings (2.4e-7)
//  master: atol 1e-7 (+ rtol 1e-7): the final fp32 rounding of p (<= 3e-8 at |p| 0.5) plus the
//     update lr * m^/(sqrt(v^) + eps) (|.| <= ~1.2e-3) with fast-math division and sqrt (~1e-6
//     relative): 1e-9
//  params vs reference master: rtol 2^-7 (+1%: one bf16 ulp is at most 2^-7 |x|; the 1% covers a
//     master just above a power of two whose reference is just below) + atol 1e-7
//  unbiasedness: |mean| < 1e-3 (its standard deviation is <= 0.5 / sqrt(n) = 8e-5)
#define TOL_M_ATOL 5e-9f
#define TOL_M_RTOL 1e-6f
#define TOL_V_RTOL 1e-6f
#define TOL_V_ATOL 1e-15f
#define TOL_P_ATOL 1e-7f
#define TOL_P_RTOL 1e-7f
#define TOL_BF16_RTOL (1.01f / 128.0f)
#define TOL_BIAS 1e-3

static void count_check(const char *what, size_t bad, size_t n, const char *first_msg) {
    if (bad) {
        g_dev_fail++;
        printf("FAIL %s: %zu of %zu elements; first: %s\n", what, bad, n, first_msg);
    } else {
        g_dev_pass++;
    }
}

static uint16_t *download_bits(const floatX *d, size_t n) {
    uint16_t *h = (uint16_t *)malloc(n * sizeof(uint16_t));
    cudaCheck(cudaMemcpy(h, d, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    return h;
}

static size_t count_diff(const uint16_t *a, const uint16_t *b, size_t n, char *first, size_t first_len) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) {
            if (!bad) snprintf(first, first_len, "element %zu: 0x%04x vs 0x%04x", i, a[i], b[i]);
            bad++;
        }
    return bad;
}

int main(int argc, char **argv) {
    gpu_init(0);
    int vsel = dev_version_arg(argc, argv, NV);

    ParamTable pt;
    params_init(&pt);
#ifdef __CUDA_SIM__
    const size_t s_wte[2] = {4099, 768}, s_ln[1] = {768}, s_odd[2] = {3, 333};  // the simulator: a twelfth of the rows
#else
    const size_t s_wte[2] = {50304, 768}, s_ln[1] = {768}, s_odd[2] = {3, 333};
#endif
    params_add(&pt, "wte", 2, s_wte, 1.0f, 1);
    params_add(&pt, "ln.w", 1, s_ln, 1.0f, 0);
    params_add(&pt, "odd", 2, s_odd, 0.5f, 1);
    const size_t n = pt.total;
    const float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, grad_scale = 0.75f;
    const long t = 7;
    printf("adamw: %d tensors, %zu elements, step t = %ld, on %s\n", pt.n, n, t, g_gpu.prop.name);

    // state: master fp32, grads bf16, m, and v >= m^2 (as a real run's moments are)
    float *master0 = dev_random(n, -0.5f, 0.5f), *grads = dev_random(n, -0.1f, 0.1f), *m0 = dev_random(n, -0.01f, 0.01f);
    dev_round_bf16(grads, n);
    float *v0 = (float *)malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) v0[i] = m0[i] * m0[i] * (1.0f + 3.0f * dev_uniform()) + 1e-6f * dev_uniform();

    // CPU reference in double, with the GPU's float inputs (the lr product is the host's float)
    float *r_master = (float *)malloc(n * sizeof(float)), *r_m = (float *)malloc(n * sizeof(float)), *r_v = (float *)malloc(n * sizeof(float));
    const double bc1 = 1.0 - pow((double)beta1, (double)t), bc2 = 1.0 - pow((double)beta2, (double)t);
    for (int k = 0; k < pt.n; k++) {
        const ParamTensor *p = &pt.t[k];
        const double plr = (double)(lr * p->lr_mult), pwd = p->decay ? (double)wd : 0.0;
        for (size_t j = p->offset; j < p->offset + p->numel; j++) {
            double g = (double)grads[j] * grad_scale;
            double mj = (double)beta1 * m0[j] + (1.0 - (double)beta1) * g;
            double vj = (double)beta2 * v0[j] + (1.0 - (double)beta2) * g * g;
            double w = master0[j];
            w -= plr * ((mj / bc1) / (sqrt(vj / bc2) + (double)eps) + pwd * w);
            r_master[j] = (float)w;
            r_m[j] = (float)mj;
            r_v[j] = (float)vj;
        }
    }

    floatX *d_grads = dev_upload_bf16(grads, n), *d_params, *d_params2;
    float *d_master = dev_upload(master0, n), *d_m = dev_upload(m0, n), *d_v = dev_upload(v0, n);
    cudaCheck(cudaMalloc(&d_params, n * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_params2, n * sizeof(floatX)));
    cudaCheck(cudaMemset(d_params, 0xFF, n * sizeof(floatX)));  // NaN: must be overwritten
    auto reset = [&]() {
        cudaCheck(cudaMemcpy(d_master, master0, n * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(d_m, m0, n * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(d_v, v0, n * sizeof(float), cudaMemcpyHostToDevice));
    };
    AdamWPlan plan;
    memset(&plan, 0, sizeof(plan));
    adamw_plan_build(&plan, &pt, NULL);
    float err = 0.0f;
    for (int ver = 1; ver <= NV; ver++) {
        if (vsel && ver != vsel) continue;
        auto run = [&]() {
            if (ver == 1) adamw_v1(&pt, d_params, d_master, d_grads, d_m, d_v, lr, beta1, beta2, eps, wd, grad_scale, t);
            else adamw_update_plan(&plan, d_params, d_master, d_grads, d_m, d_v, lr, beta1, beta2, eps, wd, grad_scale, t);
        };
        char what[128];
        reset();
        cudaCheck(cudaMemset(d_params, 0xFF, n * sizeof(floatX)));  // NaN: must be overwritten
        run();
        cudaCheck(cudaDeviceSynchronize());
        float *g_master = dev_download_f32(d_master, n), *g_m = dev_download_f32(d_m, n), *g_v = dev_download_f32(d_v, n);
        uint16_t *g_p = download_bits(d_params, n);
        snprintf(what, sizeof(what), "v%d master", ver);
        err = dev_check(what, g_master, r_master, n, TOL_P_ATOL, TOL_P_RTOL);
        snprintf(what, sizeof(what), "v%d m", ver);
        dev_check(what, g_m, r_m, n, TOL_M_ATOL, TOL_M_RTOL);
        snprintf(what, sizeof(what), "v%d v", ver);
        dev_check(what, g_v, r_v, n, TOL_V_ATOL, TOL_V_RTOL);

        // bf16 params: a neighbour of the GPU master; within one ulp of the reference; unbiased
        {
            size_t bad = 0;
            double bias_sum = 0.0;
            char first[160] = "";
            float *pf = (float *)malloc(n * sizeof(float));
            for (size_t i = 0; i < n; i++) {
                uint32_t bits;
                memcpy(&bits, &g_master[i], 4);
                uint16_t lo = (uint16_t)(bits >> 16), hi = (uint16_t)(lo + 1);  // truncated; next away from zero
                uint32_t low = bits & 0xFFFFu;
                int ok = g_p[i] == lo || (low != 0 && g_p[i] == hi);
                if (!ok) {
                    if (!bad) snprintf(first, sizeof(first), "element %zu: master %.9g (0x%08x) -> bf16 0x%04x", i, g_master[i], bits, g_p[i]);
                    bad++;
                }
                bias_sum += (g_p[i] == hi ? 1.0 : 0.0) - low / 65536.0;
                pf[i] = dev_bf2f(g_p[i]);
            }
            snprintf(what, sizeof(what), "v%d params are a bf16 neighbour of master (stochastic rounding)", ver);
            count_check(what, bad, n, first);
            snprintf(what, sizeof(what), "v%d params within 1 bf16 ulp of the reference master", ver);
            dev_check(what, pf, r_master, n, TOL_P_ATOL, TOL_BF16_RTOL);
            double mean = bias_sum / n;
            printf("   stochastic rounding: mean (rounded up - fraction) = %.2e (expect ~0)\n", mean);
            char msg[96];
            snprintf(msg, sizeof(msg), "mean %.3g, allowed %.0e", mean, TOL_BIAS);
            snprintf(what, sizeof(what), "v%d stochastic rounding unbiased", ver);
            count_check(what, fabs(mean) < TOL_BIAS ? 0 : 1, 1, msg);
            free(pf);
        }

        // resume: master_to_bf16 with step t re-derives the same bf16; t = 0 rounds to nearest even
        {
            char first[160] = "";
            cudaCheck(cudaMemset(d_params2, 0xFF, n * sizeof(floatX)));
            master_to_bf16(&pt, d_params2, d_master, t);
            uint16_t *p2 = download_bits(d_params2, n);
            snprintf(what, sizeof(what), "v%d master_to_bf16(t) == the update's bf16", ver);
            count_check(what, count_diff(p2, g_p, n, first, sizeof(first)), n, first);
            master_to_bf16(&pt, d_params2, d_master, 0);
            free(p2);
            p2 = download_bits(d_params2, n);
            uint16_t *rne = (uint16_t *)malloc(n * sizeof(uint16_t));
            for (size_t i = 0; i < n; i++) rne[i] = dev_f2bf(g_master[i]);
            snprintf(what, sizeof(what), "v%d master_to_bf16(0) == round-to-nearest-even", ver);
            count_check(what, count_diff(p2, rne, n, first, sizeof(first)), n, first);
            free(p2);
            free(rne);
        }

        // determinism: the same update from the same state
        {
            char first[160] = "";
            reset();
            cudaCheck(cudaMemset(d_params, 0xFF, n * sizeof(floatX)));
            run();
            uint16_t *p2 = download_bits(d_params, n);
            float *m2 = dev_download_f32(d_master, n);
            snprintf(what, sizeof(what), "v%d same seed, same bf16 params", ver);
            count_check(what, count_diff(p2, g_p, n, first, sizeof(first)), n, first);
            snprintf(what, sizeof(what), "v%d same state, same master", ver);
            count_check(what, memcmp(m2, g_master, n * sizeof(float)) ? 1 : 0, 1, "master differs");
            free(p2);
            free(m2);
        }

        // minimum traffic per element: read grad (2), master, m, v (12); write master, m, v (12),
        // param (2); ~20 flops per element (the rounding hash not counted)
        float ms = dev_time_ms(run);  // keeps stepping the state; not checked again
        dev_report("adamw_update", ver, ms, 28.0 * n, 20.0 * n, err);
        free(g_master); free(g_m); free(g_v); free(g_p);
    }
    adamw_plan_free(&plan);

    // GPT-2 124M's table: many small tensors. Each version from the same state; v2 must be v1's bits.
    {
#ifdef __CUDA_SIM__
        const size_t C = 64;  // the simulator: the same tensors at width 64
#else
        const size_t C = 768;
#endif
        GPT2Config cfg;
        gpt2_config_from_depth_name("d12", &cfg);
        cfg.channels = (int)C;
        GPT2Layout layout;
        memset(&layout, 0, sizeof(layout));
        gpt2_layout_build(&layout, &cfg);
        const ParamTable &gt = layout.params;
        const size_t gn = gt.total;
        printf("GPT-2 (width %zu): %d tensors, %zu elements\n", C, gt.n, gn);
        float *h = dev_random(gn, -0.1f, 0.1f);
        dev_round_bf16(h, gn);
        floatX *gg = dev_upload_bf16(h, gn), *gp;
        float *gmaster = dev_upload(h, gn), *gm, *gv;
        cudaCheck(cudaMalloc(&gp, gn * sizeof(floatX)));
        cudaCheck(cudaMalloc(&gm, gn * sizeof(float)));
        cudaCheck(cudaMalloc(&gv, gn * sizeof(float)));
        AdamWPlan gplan;
        memset(&gplan, 0, sizeof(gplan));
        adamw_plan_build(&gplan, &gt, NULL);
        printf("   v2: %d chunks of at most %d elements\n", gplan.n, ADAMW_CHUNK);
        std::vector<uint16_t> out[NV + 1];
        for (int ver = 1; ver <= NV; ver++) {
            if (vsel && ver != vsel) continue;
            cudaCheck(cudaMemcpy(gmaster, h, gn * sizeof(float), cudaMemcpyHostToDevice));
            cudaCheck(cudaMemset(gm, 0, gn * sizeof(float)));
            cudaCheck(cudaMemset(gv, 0, gn * sizeof(float)));
            auto grun = [&]() {
                if (ver == 1) adamw_v1(&gt, gp, gmaster, gg, gm, gv, lr, beta1, beta2, eps, wd, grad_scale, t);
                else adamw_update_plan(&gplan, gp, gmaster, gg, gm, gv, lr, beta1, beta2, eps, wd, grad_scale, t);
            };
            grun();
            out[ver].resize(gn * 7);  // bf16 params, then master, m, v as pairs of uint16
            cudaCheck(cudaMemcpy(out[ver].data(), gp, gn * 2, cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy(out[ver].data() + gn, gmaster, gn * 4, cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy(out[ver].data() + 3 * gn, gm, gn * 4, cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy(out[ver].data() + 5 * gn, gv, gn * 4, cudaMemcpyDeviceToHost));
            float ms = dev_time_ms(grun);
            char name[64];
            snprintf(name, sizeof(name), "adamw GPT-2 (%d tensors)", gt.n);
            dev_report(name, ver, ms, 28.0 * gn, 20.0 * gn, 0.0f);
        }
        if (!vsel) {
            char first[160] = "";
            count_check("v2 on GPT-2's table: v1's bf16 weights, master weights and moments, bit for bit",
                        count_diff(out[2].data(), out[1].data(), gn * 7, first, sizeof(first)), gn * 7, first);
        }
        adamw_plan_free(&gplan);
        cudaCheck(cudaFree(gg)); cudaCheck(cudaFree(gp)); cudaCheck(cudaFree(gmaster)); cudaCheck(cudaFree(gm)); cudaCheck(cudaFree(gv));
        free(h);
        gpt2_layout_free(&layout);
    }

    cudaCheck(cudaFree(d_grads)); cudaCheck(cudaFree(d_params)); cudaCheck(cudaFree(d_params2));
    cudaCheck(cudaFree(d_master)); cudaCheck(cudaFree(d_m)); cudaCheck(cudaFree(d_v));
    free(master0); free(grads); free(m0); free(v0); free(r_master); free(r_m); free(r_v);
    params_free(&pt);
    return dev_summary();
}
