// dev/cuda/gelu.cu: GELU (tanh approximation, as GPT-2 and the CPU trainer) forward and its
// backward in place (d = gelu'(pre) * d), bf16, checked against a double CPU reference with the
// exact tanh and timed. These kernels run when the GELU is not fused into cuBLASLt's epilogue
// (gelu_fusion 0, -r recompute, and the fallback when cuBLASLt has no epilogue algorithm).
//
//   v1  naive: one element per thread, 2-byte loads and stores (written here)
//   v2  the trainer's gelu_forward / gelu_backward_inplace (cuda/matmul.cuh: 8 elements per
//       thread, 128-bit loads and stores)
//
// Shape: n = B*T*4C = 8*1024*3072 (the fc activation of GPT-2 small at T = 1024).
//
// Build: make -C dev/cuda gelu    Run: ./dev/cuda/gelu [version]
#include "harness.cuh"
#include "cuda/matmul.cuh"

#define NV 2
#define GELU_K 0.7978845608028654f  // sqrt(2/pi)

// ----------------------------------------------------------------------------------------------
// v1

__global__ void gelu_forward_naive_kernel(floatX *out, const floatX *inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = (float)inp[i];
    out[i] = (floatX)(0.5f * x * (1.0f + tanhf(GELU_K * (x + 0.044715f * x * x * x))));
}

__global__ void gelu_backward_naive_kernel(floatX *d, const floatX *pre, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = (float)pre[i];
    float th = tanhf(GELU_K * (x + 0.044715f * x * x * x));
    float grad = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
    d[i] = (floatX)(grad * (float)d[i]);
}

// ----------------------------------------------------------------------------------------------
// CPU reference (double, exact tanh) and per-element error bounds
//
// The GPU's tanhf is tanh.approx.f32 under --use_fast_math (max error about 2^-11 over the whole
// range; 2^-10 is used here). Forward: out = 0.5 x (1 + tanh(u)), so the approximation adds
// 0.5 |x| dtanh; backward: d(grad)/d(tanh) = 0.5 - x th K (1 + 3 0.044715 x^2), so it adds
// |d| dtanh (0.5 + |x| |th| K (1 + 0.134 x^2)). fp32 evaluation adds ~2e-6 relative to dtanh
// and 1e-6 absolute. On top, the result is rounded once to bf16: 2^-8 (+1%) of its magnitude.

#define TANH_APPROX_ERR (1.0 / 1024.0 + 2e-6)
#define BF16_HALF_ULP_REL (1.01 / 256.0)

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const size_t n = (size_t)8 * 1024 * 4 * 768;
    printf("gelu: n = %zu (B 8, T 1024, 4C 3072), on %s\n", n, g_gpu.prop.name);

    float *x = dev_random(n, -5.0f, 5.0f), *d = dev_random(n, -1.0f, 1.0f);
    dev_round_bf16(x, n);
    dev_round_bf16(d, n);
    float *ref_f = (float *)malloc(n * sizeof(float)), *bound_f = (float *)malloc(n * sizeof(float));
    float *ref_b = (float *)malloc(n * sizeof(float)), *bound_b = (float *)malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        double xi = x[i], th;
        double y = dev_gelu(xi), g = dev_gelu_grad(xi, &th);
        double ea = 0.5 * fabs(xi) * TANH_APPROX_ERR + 1e-6;
        ref_f[i] = (float)y;
        bound_f[i] = (float)(ea + BF16_HALF_ULP_REL * (fabs(y) + ea));
        double eb = fabs((double)d[i]) * (TANH_APPROX_ERR * (0.5 + fabs(xi) * fabs(th) * GELU_K * (1.0 + 3.0 * 0.044715 * xi * xi)) + 1e-6);
        ref_b[i] = (float)(g * d[i]);
        bound_b[i] = (float)(eb + BF16_HALF_ULP_REL * (fabs(g * d[i]) + eb));
    }

    floatX *d_x = dev_upload_bf16(x, n), *d_d0 = dev_upload_bf16(d, n), *d_out, *d_d;
    cudaCheck(cudaMalloc(&d_out, n * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_d, n * sizeof(floatX)));

    for (int ver = 1; ver <= NV; ver++) {
        if (v && ver != v) continue;
        char what[64];
        // forward
        cudaCheck(cudaMemset(d_out, 0xFF, n * sizeof(floatX)));  // NaN: must be overwritten
        auto fwd = [&]() {
            if (ver == 1) {
                gelu_forward_naive_kernel<<<ceil_div_i((long)n, 256), 256>>>(d_out, d_x, n);
                cudaCheckLaunch();
            } else {
                gelu_forward(d_out, d_x, n);
            }
        };
        fwd();
        cudaCheck(cudaDeviceSynchronize());
        float *g = dev_download_bf16(d_out, n);
        snprintf(what, sizeof(what), "v%d gelu_forward", ver);
        float err = dev_check_bounded(what, g, ref_f, bound_f, n);
        free(g);
        float ms = dev_time_ms(fwd);
        dev_report("gelu_forward", ver, ms, 2.0 * n * sizeof(floatX), 10.0 * n, err);  // ~10 flops (tanh as one)

        // backward, in place
        cudaCheck(cudaMemcpy(d_d, d_d0, n * sizeof(floatX), cudaMemcpyDeviceToDevice));
        auto bwd = [&]() {
            if (ver == 1) {
                gelu_backward_naive_kernel<<<ceil_div_i((long)n, 256), 256>>>(d_d, d_x, n);
                cudaCheckLaunch();
            } else {
                gelu_backward_inplace(d_d, d_x, n);
            }
        };
        bwd();
        cudaCheck(cudaDeviceSynchronize());
        g = dev_download_bf16(d_d, n);
        snprintf(what, sizeof(what), "v%d gelu_backward_inplace", ver);
        err = dev_check_bounded(what, g, ref_b, bound_b, n);
        free(g);
        ms = dev_time_ms(bwd);  // keeps multiplying d in place; not checked again
        dev_report("gelu_backward_inplace", ver, ms, 3.0 * n * sizeof(floatX), 18.0 * n, err);
    }

    cudaCheck(cudaFree(d_x));
    cudaCheck(cudaFree(d_d0));
    cudaCheck(cudaFree(d_out));
    cudaCheck(cudaFree(d_d));
    free(x); free(d); free(ref_f); free(bound_f); free(ref_b); free(bound_b);
    return dev_summary();
}
