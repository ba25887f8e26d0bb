// tests/cuda_sim/test_sim_kernels.cpp: the GPU trainer's kernels, run on the CPU through the CUDA
// simulator (tests/cuda_sim/cuda_sim.h) on the sources simify.py rewrote, against independent CPU
// references; plus the simulator's own checks (it must catch what it claims to catch).
//
//   python3 tests/cuda_sim/simify.py            # -> build/cuda_sim/src
//   g++ -O2 -std=c++20 -pthread -fno-strict-aliasing -Wno-unknown-pragmas -DBT_WMMA_GENERIC -I build/cuda_sim/src -I tests/cuda_sim -I.
//       tests/cuda_sim/test_sim_kernels.cpp -o build/cuda_sim/test_sim_kernels
//   build/cuda_sim/test_sim_kernels [group ...]  # "N passed, N failed"; groups: sim layernorm matmul classifier
//                                                # adamw norm encoder attention structured fused order (default all)
//   SIM_SERIAL=1 build/cuda_sim/test_sim_kernels # everything in random thread/block order
//
// Inputs are bf16-exact (rounded on the host), references compute in double from those inputs.
// Tolerances, |got - ref| <= atol + rtol |ref| unless said otherwise (bf16 has 8 significant bits,
// relative spacing 2^-8 = 0.0039; a bf16 result is within half of that of the fp32 value):
//   LayerNorm out                 1.5e-2 + 1e-2 |ref|    mean, rstd (fp32)    1e-5 + 1e-5 |ref|
//   LayerNorm dinp, dw, db        1e-2 * max|ref| (+ 1e-2 |ref|)  (accumulated into bf16)
//   matmul out / pre-GELU         1e-2 * max|ref| + 1e-2 |ref|;  dinp, dw, dbias the same
//   classifier loss (fp32)        1e-4 + 1e-5 |ref|; dlogits 2e-3 * dloss-scale + 1e-2 |ref|
//   AdamW                         master/m/v 1e-6 relative, bf16 weights bit-exact (same rounding)
//   global norm                   1e-5 relative;  encoder bit-exact (fp32 sums in the same order)
//   attention (both paths)        out 2e-2 * max|ref| (+ 2e-2 |ref|); dqkv 3e-2 * max|ref| of each
//                                 of q, k, v (P and dS rounded to bf16 inside)
//   structured layers             y, dx 2e-2 * max|ref|; weight gradients 2e-2 * max|ref| of the
//                                 tensor (the GPU rounds its intermediates z, u, dy*gate to bf16);
//                                 fused vs cuBLAS path 1e-2 * max|ref| + 1e-2 |ref| (same roundings);
//                                 the fused Monarch backward's dyt exact (a permutation of dy)
//   traffic model ratios          5e-3 absolute, against counts worked out by hand
//   determinism                   bit-identical (memcmp), run to run and in random thread order
#define BT_MMA_STAGE1_CANDIDATE 1  // stage 1 alone on mma.sync too (test_btt_fused_mma)
#ifndef BT_WMMA_GENERIC
#define BT_WMMA_GENERIC 1  // btt_fused.cuh's switch: wmma::load_matrix_sync instead of its inline PTX loads
#endif
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "common/utils.h"
#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/adamw.cuh"
#include "cuda/attention.cuh"
#include "cuda/classifier.cuh"
#include "cuda/encoder.cuh"
#include "cuda/flash_attention.cuh"
#include "cuda/global_norm.cuh"
#include "cuda/layernorm.cuh"
#include "cuda/matmul.cuh"
#include "cuda/reduce.cuh"
#include "structured/structured.cuh"
#include "structured/btt_fused.cuh"
#include "tests/check.h"

// ------------------------------------------------------------------------------------------------
// helpers

typedef std::vector<float> Vec;

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static double urand() {  // [0, 1)
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) * (1.0 / 9007199254740992.0);
}
static float nrand() {
    double u1 = urand(), u2 = urand();
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
static float bfr(float x) { return (float)__nv_bfloat16(x); }  // round to bf16 (nearest even)
static Vec rand_bf16(size_t n, float std, float mean = 0.0f) {
    Vec v(n);
    for (auto &x : v) x = bfr(mean + std * nrand());
    return v;
}
static floatX *up_bf16(const Vec &h) {
    std::vector<floatX> t(h.begin(), h.end());
    floatX *d = nullptr;
    cudaCheck(cudaMalloc(&d, t.size() * sizeof(floatX)));
    cudaCheck(cudaMemcpy(d, t.data(), t.size() * sizeof(floatX), cudaMemcpyHostToDevice));
    return d;
}
template <class T>
static T *up(const std::vector<T> &h) {
    T *d = nullptr;
    cudaCheck(cudaMalloc(&d, h.size() * sizeof(T)));
    cudaCheck(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <class T>
static T *dev_alloc(size_t n) {
    T *d = nullptr;
    cudaCheck(cudaMalloc(&d, (n ? n : 1) * sizeof(T)));
    return d;
}
static Vec down_bf16(const floatX *d, size_t n) {
    std::vector<floatX> t(n);
    cudaCheck(cudaMemcpy(t.data(), d, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    return Vec(t.begin(), t.end());
}
template <class T>
static std::vector<T> down(const T *d, size_t n) {
    std::vector<T> h(n);
    cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}
static std::vector<uint16_t> down_bits(const floatX *d, size_t n) {
    std::vector<uint16_t> h(n);
    cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    return h;
}
static float max_abs(const Vec &v) {
    float m = 0;
    for (float x : v) m = fmaxf(m, fabsf(x));
    return m;
}
// |got - ref| <= frac * max|ref| + rtol |ref| (+ 1e-6)
static void check_scaled(const Vec &got, const Vec &ref, float frac, float rtol, const char *name) {
    check_close(got.data(), ref.data(), ref.size(), frac * max_abs(ref) + 1e-6f, rtol, name);
}
template <class T>
static void check_same(const std::vector<T> &a, const std::vector<T> &b, const char *name) {
    bool same = a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
    size_t first = 0;
    if (!same)
        while (first < a.size() && first < b.size() && memcmp(&a[first], &b[first], sizeof(T)) == 0) first++;
    char why[128];
    snprintf(why, sizeof(why), "differs (first at element %zu of %zu)", first, a.size());
    check_true(same, name, why);
}
static char g_name[512];
static const char *nm(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_name, sizeof(g_name), fmt, ap);
    va_end(ap);
    return g_name;
}
static double gelu_d(double x) { return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }
static double dgelu_d(double x) {
    double u = 0.7978845608028654 * (x + 0.044715 * x * x * x), th = tanh(u);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x);
}
// launches written by hand in this file (it is not rewritten by simify.py)
#define LAUNCH(k, grid, block, smem, ...) sim_launch(k, sim_cfg(grid, block, smem).at(#k, __FILE__, __LINE__), __VA_ARGS__)

// ================================================================================================
// LayerNorm (cuda/layernorm.cuh, cuda/reduce.cuh)

static void ln_ref(const Vec &x, const Vec &w, const Vec &b, int N, int C, Vec &out, Vec &mean, Vec &rstd) {
    out.assign((size_t)N * C, 0);
    mean.assign(N, 0);
    rstd.assign(N, 0);
    for (int r = 0; r < N; r++) {
        const float *xr = &x[(size_t)r * C];
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += xr[c];
        m /= C;
        for (int c = 0; c < C; c++) v += (xr[c] - m) * (xr[c] - m);
        double s = 1.0 / sqrt(v / C + 1e-5);
        for (int c = 0; c < C; c++) out[(size_t)r * C + c] = (float)((xr[c] - m) * s * w[c] + b[c]);
        mean[r] = (float)m;
        rstd[r] = (float)s;
    }
}

static void test_layernorm(int N, int C) {
    Vec x = rand_bf16((size_t)N * C, 1.0f, 0.3f), x2 = rand_bf16((size_t)N * C, 0.5f), w = rand_bf16(C, 0.2f, 1.0f), b = rand_bf16(C, 0.1f);
    floatX *dx = up_bf16(x), *dx2 = up_bf16(x2), *dw = up_bf16(w), *db = up_bf16(b), *dout = dev_alloc<floatX>((size_t)N * C),
           *dres = dev_alloc<floatX>((size_t)N * C);
    float *dmean = dev_alloc<float>(N), *drstd = dev_alloc<float>(N);
    Vec out, mean, rstd;
    ln_ref(x, w, b, N, C, out, mean, rstd);
    layernorm_forward(dout, dmean, drstd, dx, dw, db, N, C);
    check_close(down_bf16(dout, (size_t)N * C).data(), out.data(), out.size(), 1.5e-2f, 1e-2f, nm("layernorm forward N=%d C=%d: out", N, C));
    check_close(down(dmean, N).data(), mean.data(), N, 1e-5f, 1e-5f, nm("layernorm forward N=%d C=%d: mean", N, C));
    check_close(down(drstd, N).data(), rstd.data(), N, 1e-5f, 1e-5f, nm("layernorm forward N=%d C=%d: rstd", N, C));

    // fused residual: res = bf16(x + x2), out = LN(res)
    Vec res((size_t)N * C);
    for (size_t i = 0; i < res.size(); i++) res[i] = bfr(x[i] + x2[i]);
    ln_ref(res, w, b, N, C, out, mean, rstd);
    fused_residual_layernorm_forward(dres, dout, dmean, drstd, dx, dx2, dw, db, N, C);
    check_same(down_bf16(dres, res.size()), res, nm("fused residual layernorm N=%d C=%d: residual (bit-exact)", N, C));
    check_close(down_bf16(dout, (size_t)N * C).data(), out.data(), out.size(), 1.5e-2f, 1e-2f, nm("fused residual layernorm N=%d C=%d: out", N, C));
    check_close(down(drstd, N).data(), rstd.data(), N, 1e-5f, 1e-5f, nm("fused residual layernorm N=%d C=%d: rstd", N, C));

    // backward: dinp, dw, db are accumulated into
    Vec g = rand_bf16((size_t)N * C, 1.0f), dinp0 = rand_bf16((size_t)N * C, 0.1f), dw0 = rand_bf16(C, 0.1f), db0 = rand_bf16(C, 0.1f);
    Vec dinp = dinp0, dwr = dw0, dbr = db0;
    for (int r = 0; r < N; r++) {
        double sd = 0, sdn = 0;
        for (int c = 0; c < C; c++) {
            double n = (res[(size_t)r * C + c] - mean[r]) * rstd[r], dn = (double)w[c] * g[(size_t)r * C + c];
            sd += dn;
            sdn += dn * n;
        }
        sd /= C;
        sdn /= C;
        for (int c = 0; c < C; c++) {
            double n = (res[(size_t)r * C + c] - mean[r]) * rstd[r], dn = (double)w[c] * g[(size_t)r * C + c];
            dinp[(size_t)r * C + c] += (float)((dn - sd - n * sdn) * rstd[r]);
        }
    }
    for (int c = 0; c < C; c++) {
        double sw = 0, sb = 0;
        for (int r = 0; r < N; r++) {
            double n = (res[(size_t)r * C + c] - mean[r]) * rstd[r];
            sw += g[(size_t)r * C + c] * n;
            sb += g[(size_t)r * C + c];
        }
        dwr[c] += (float)sw;
        dbr[c] += (float)sb;
    }
    floatX *dg = up_bf16(g), *ddinp = up_bf16(dinp0), *ddw = up_bf16(dw0), *ddb = up_bf16(db0);
    float *scratch = dev_alloc<float>(column_sums_scratch_floats(C));
    layernorm_backward(ddinp, ddw, ddb, dg, dres, dw, dmean, drstd, N, C, scratch);
    check_scaled(down_bf16(ddinp, dinp.size()), dinp, 1e-2f, 1e-2f, nm("layernorm backward N=%d C=%d: dinp (accumulated)", N, C));
    check_scaled(down_bf16(ddw, C), dwr, 1e-2f, 1e-2f, nm("layernorm backward N=%d C=%d: dweight (accumulated)", N, C));
    check_scaled(down_bf16(ddb, C), dbr, 1e-2f, 1e-2f, nm("layernorm backward N=%d C=%d: dbias (accumulated)", N, C));
    void *bufs[] = {dx, dx2, dw, db, dout, dres, dmean, drstd, dg, ddinp, ddw, ddb, scratch};
    for (void *p : bufs) cudaCheck(cudaFree(p));
}

// Column sums in one launch (cuda/reduce.cuh): the last of a column block's chunks adds them.
// Calls of many shapes in a row (1 to 64 chunks; C not a multiple of the 64-column blocks; dout a
// column block of wider rows; the LayerNorm weight term), each against a double reference,
// accumulating onto the outputs, and each repeated for identical bits: a block that miscounted
// its arrivals, or counts left over from the previous launch, would leave columns unsummed.
// the two-launch column sums (the trainer's until 2026-12-05): partials, then column_sums_final_kernel
__global__ void k_colsum_partials(float *partial, const floatX *dout, const floatX *x, const float *mean, const float *rstd, int N, int C,
                                  int rows_per_chunk, int ld) {
    column_sums_block_partial(partial, dout, x, mean, rstd, N, C, rows_per_chunk, ld);
}
static void column_sums_two_launches(floatX *o0, floatX *o1, const floatX *dout, const floatX *x, const float *mean, const float *rstd, int N,
                                     int C, float *scratch, int ld) {
    int chunks, rows_per_chunk;
    column_sums_chunks(N, &chunks, &rows_per_chunk);
    dim3 grid(ceil_div_i(C, COLSUM_COLS), chunks), block(32, COLSUM_ROWS);
    LAUNCH(k_colsum_partials, grid, block, 0, scratch, dout, x, mean, rstd, N, C, rows_per_chunk, ld ? ld : C);
    LAUNCH(column_sums_final_kernel, ceil_div_i(C, 256), 256, 0, o0, o1, (const float *)scratch, C, chunks);
}

static void test_column_sums() {
    struct Case { int N, C, ld, with_x; } cases[] = {{1, 2, 0, 0}, {33, 70, 0, 1}, {5000, 200, 0, 0}, {2049, 64, 0, 1},
                                                     {700, 96, 300, 0}, {64, 1030, 0, 0}, {3, 70, 0, 1}, {4100, 130, 0, 1}};
    float *scratch = dev_alloc<float>(column_sums_scratch_floats(1030));
    int ok_all = 1, same_all = 1;
    char first[200] = "";
    for (const Case &k : cases) {
        const int ld = k.ld ? k.ld : k.C;
        Vec dout = rand_bf16((size_t)k.N * ld, 1.0f), x = rand_bf16((size_t)k.N * k.C, 1.0f), mean(k.N), rstd(k.N);
        for (int r = 0; r < k.N; r++) mean[r] = 0.1f * nrand(), rstd[r] = 0.5f + (float)urand();
        Vec s0 = rand_bf16(k.C, 0.5f), s1 = rand_bf16(k.C, 0.5f), r0(k.C), r1(k.C);
        for (int c = 0; c < k.C; c++) {
            double a = s0[c], b = s1[c];
            for (int r = 0; r < k.N; r++) {
                a += dout[(size_t)r * ld + c];
                if (k.with_x) b += (double)dout[(size_t)r * ld + c] * ((x[(size_t)r * k.C + c] - mean[r]) * rstd[r]);
            }
            r0[c] = (float)a, r1[c] = (float)b;
        }
        floatX *ddout = up_bf16(dout), *dx = up_bf16(x);
        float *dmean = up(mean), *drstd = up(rstd);
        std::vector<uint16_t> bits[3];
        for (int rep = 0; rep < 3; rep++) {  // twice in one launch, then in two
            floatX *o0 = up_bf16(s0), *o1 = up_bf16(s1);
            if (rep < 2) column_sums(o0, k.with_x ? o1 : nullptr, ddout, k.with_x ? dx : nullptr, dmean, drstd, k.N, k.C, scratch, k.ld);
            else column_sums_two_launches(o0, k.with_x ? o1 : nullptr, ddout, k.with_x ? dx : nullptr, dmean, drstd, k.N, k.C, scratch, k.ld);
            Vec g0 = down_bf16(o0, k.C), g1 = down_bf16(o1, k.C);
            double scale = 1.0;
            for (int c = 0; c < k.C; c++) scale = std::max(scale, (double)fabsf(r0[c]));
            for (int c = 0; c < k.C; c++) {
                // bf16 output (2^-8 relative) plus fp32 sums over up to 5000 rows
                int good = fabs(g0[c] - r0[c]) <= 1e-2 * fabs(r0[c]) + 1e-4 * scale &&
                           (!k.with_x || fabs(g1[c] - r1[c]) <= 1e-2 * fabs(r1[c]) + 1e-2) && (k.with_x || g1[c] == s1[c]);
                if (!good && ok_all) snprintf(first, sizeof(first), "N=%d C=%d ld=%d x=%d column %d: %g %g, want %g %g", k.N, k.C, k.ld, k.with_x, c, g0[c], g1[c], r0[c], r1[c]);
                ok_all &= good;
            }
            bits[rep] = down_bits(o0, k.C);
            std::vector<uint16_t> b1 = down_bits(o1, k.C);
            bits[rep].insert(bits[rep].end(), b1.begin(), b1.end());
            cudaCheck(cudaFree(o0));
            cudaCheck(cudaFree(o1));
        }
        same_all &= bits[0] == bits[1] && bits[1] == bits[2];
        void *bufs[] = {ddout, dx, dmean, drstd};
        for (void *p : bufs) cudaCheck(cudaFree(p));
    }
    check_true(ok_all, "column sums, one launch: 8 shapes in a row (1 to 64 chunks, partial column blocks, a row stride, the LayerNorm term), accumulated",
               first);
    check_true(same_all, "column sums, one launch: each shape twice gives identical bits, and the two-launch sums' bits", "differ");
    cudaCheck(cudaFree(scratch));
}

// ================================================================================================
// matmul (cuda/matmul.cuh) in the three GELU-fusion modes, with cuBLASLt refusing epilogues

static void test_matmul(int N, int C, int OC, int fusion, unsigned refuse, const char *refuse_name) {
    g_gpu.gelu_fusion = fusion;
    sim_cublaslt_refuse_epilogues = refuse;
    Vec inp = rand_bf16((size_t)N * C, 1.0f), w = rand_bf16((size_t)OC * C, 0.3f), bias = rand_bf16(OC, 0.5f);
    floatX *dinp_ = up_bf16(inp), *dw_ = up_bf16(w), *dbias_ = up_bf16(bias);
    floatX *out = dev_alloc<floatX>((size_t)N * OC), *pre = dev_alloc<floatX>((size_t)N * OC);
    Vec ref((size_t)N * OC);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias[o];
            for (int c = 0; c < C; c++) s += (double)inp[(size_t)n * C + c] * w[(size_t)o * C + c];
            ref[(size_t)n * OC + o] = (float)s;
        }
    Vec ref_nb = ref, ref_gelu(ref.size());
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) ref_nb[(size_t)n * OC + o] -= bias[o];
    for (size_t i = 0; i < ref.size(); i++) ref_gelu[i] = (float)gelu_d(ref[i]);
    char tag[160];
    snprintf(tag, sizeof(tag), "matmul N=%d C=%d OC=%d gelu_fusion %d%s%s", N, C, OC, fusion, refuse ? ", cuBLASLt refuses " : "",
             refuse ? refuse_name : "");
    matmul_forward(out, dinp_, dw_, dbias_, N, C, OC, NULL);
    check_scaled(down_bf16(out, ref.size()), ref, 1e-2f, 1e-2f, nm("%s: forward with bias", tag));
    matmul_forward(out, dinp_, dw_, NULL, N, C, OC, NULL);
    check_scaled(down_bf16(out, ref.size()), ref_nb, 1e-2f, 1e-2f, nm("%s: forward without bias", tag));
    matmul_forward(out, dinp_, dw_, dbias_, N, C, OC, pre);
    check_scaled(down_bf16(pre, ref.size()), ref, 1e-2f, 1e-2f, nm("%s: forward with GELU: pre-GELU", tag));
    check_scaled(down_bf16(out, ref.size()), ref_gelu, 1e-2f, 1e-2f, nm("%s: forward with GELU: GELU", tag));

    // backward: dinp = dout w (times gelu'(pre) when given, pre = the layer's input pre-activation)
    Vec dout = rand_bf16((size_t)N * OC, 1.0f), pre_in = rand_bf16((size_t)N * C, 1.0f), dw0 = rand_bf16((size_t)OC * C, 0.1f),
        db0 = rand_bf16(OC, 0.1f);
    Vec dinp_ref((size_t)N * C), dinp_gelu((size_t)N * C), dw_ref = dw0, db_ref = db0;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            double s = 0;
            for (int o = 0; o < OC; o++) s += (double)dout[(size_t)n * OC + o] * w[(size_t)o * C + c];
            dinp_ref[(size_t)n * C + c] = (float)s;
            dinp_gelu[(size_t)n * C + c] = (float)(s * dgelu_d(pre_in[(size_t)n * C + c]));
        }
    for (int o = 0; o < OC; o++) {
        double sb = 0;
        for (int n = 0; n < N; n++) sb += dout[(size_t)n * OC + o];
        db_ref[o] += (float)sb;
        for (int c = 0; c < C; c++) {
            double s = 0;
            for (int n = 0; n < N; n++) s += (double)dout[(size_t)n * OC + o] * inp[(size_t)n * C + c];
            dw_ref[(size_t)o * C + c] += (float)s;
        }
    }
    floatX *ddout = up_bf16(dout), *dpre_in = up_bf16(pre_in), *ddw = up_bf16(dw0), *ddb = up_bf16(db0), *ddinp = dev_alloc<floatX>((size_t)N * C);
    float *scratch = dev_alloc<float>(column_sums_scratch_floats(OC));
    matmul_backward(ddinp, ddw, ddb, ddout, dinp_, dw_, N, C, OC, NULL, scratch);
    check_scaled(down_bf16(ddinp, dinp_ref.size()), dinp_ref, 1e-2f, 1e-2f, nm("%s: backward dinp", tag));
    check_scaled(down_bf16(ddw, dw_ref.size()), dw_ref, 1e-2f, 1e-2f, nm("%s: backward dweight (accumulated)", tag));
    check_scaled(down_bf16(ddb, OC), db_ref, 1e-2f, 1e-2f, nm("%s: backward dbias (accumulated)", tag));
    matmul_backward(ddinp, ddw, NULL, ddout, dinp_, dw_, N, C, OC, dpre_in, scratch);  // dw accumulates again: not checked
    check_scaled(down_bf16(ddinp, dinp_gelu.size()), dinp_gelu, 1e-2f, 1e-2f, nm("%s: backward dinp through GELU", tag));
    void *bufs[] = {dinp_, dw_, dbias_, out, pre, ddout, dpre_in, ddw, ddb, ddinp, scratch};
    for (void *p : bufs) cudaCheck(cudaFree(p));
    sim_cublaslt_refuse_epilogues = 0;
    g_gpu.gelu_fusion = 2;
}

// ================================================================================================
// classifier (cuda/classifier.cuh)

static void test_classifier(int N, int V, int Vp, float dloss) {
    Vec logits((size_t)N * Vp);
    for (auto &x : logits) x = bfr(2.0f * nrand());
    std::vector<int> tgt(N);
    for (int i = 0; i < N; i++) tgt[i] = (int)(urand() * V);
    floatX *dl = up_bf16(logits);
    int *dt = up(tgt);
    float *dloss_d = dev_alloc<float>(N);
    Vec loss(N), grad((size_t)N * Vp, 0.0f);
    for (int r = 0; r < N; r++) {
        const float *l = &logits[(size_t)r * Vp];
        double m = -1e30, s = 0;
        for (int i = 0; i < V; i++) m = fmax(m, l[i]);
        for (int i = 0; i < V; i++) s += exp(l[i] - m);
        loss[r] = (float)(log(s) + m - l[tgt[r]]);
        for (int i = 0; i < V; i++) grad[(size_t)r * Vp + i] = (float)(dloss * (exp(l[i] - m) / s - (i == tgt[r] ? 1.0 : 0.0)));
    }
    fused_classifier(dl, dloss_d, dt, N, V, Vp, dloss);
    char tag[96];
    snprintf(tag, sizeof(tag), "classifier N=%d V=%d Vp=%d dloss %g", N, V, Vp, dloss);
    check_close(down(dloss_d, N).data(), loss.data(), N, 1e-4f, 1e-5f, nm("%s: losses", tag));
    if (dloss != 0.0f) {
        Vec got = down_bf16(dl, grad.size());
        check_close(got.data(), grad.data(), grad.size(), 2e-3f * fabsf(dloss), 1e-2f, nm("%s: dlogits in place (0 on padded columns)", tag));
    } else {
        check_same(down_bf16(dl, logits.size()), logits, nm("%s: logits untouched without dloss", tag));
    }
    cudaCheck(cudaFree(dl));
    cudaCheck(cudaFree(dt));
    cudaCheck(cudaFree(dloss_d));
}

// ================================================================================================
// AdamW (cuda/adamw.cuh): exact fp32 update, stochastic rounding, master_to_bf16, ZeRO slices

static void test_adamw() {
    ParamTable pt;
    params_init(&pt);
    size_t s0[2] = {37, 29}, s1[1] = {64}, s2[2] = {128, 41};
    params_add(&pt, "w0", 2, s0, 1.0f, 1);
    params_add(&pt, "b0", 1, s1, 0.5f, 0);
    params_add(&pt, "w1", 2, s2, 2.0f, 1);
    size_t n = pt.total;
    Vec master(n), g(n), m(n, 0.0f), v(n, 0.0f);
    for (auto &x : master) x = 0.1f * nrand();
    floatX *dp = dev_alloc<floatX>(n), *dg = nullptr;
    float *dmaster = up(master), *dm = up(m), *dv = up(v);
    master_to_bf16(&pt, dp, dmaster, 0);
    {
        std::vector<uint16_t> got = down_bits(dp, n), want(n);
        for (size_t i = 0; i < n; i++) want[i] = __nv_bfloat16(master[i]).__x;
        check_same(got, want, "master_to_bf16 t=0: round to nearest (bit-exact)");
    }
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.7f;
    std::vector<uint16_t> after1;
    for (int t = 1; t <= 3; t++) {
        g = rand_bf16(n, 1.0f);
        if (dg) cudaCheck(cudaFree(dg));
        dg = up_bf16(g);
        adamw_update(&pt, dp, dmaster, dg, dm, dv, lr, b1, b2, eps, wd, gs, t);
        float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
        std::vector<uint16_t> want(n);
        for (int ti = 0; ti < pt.n; ti++) {
            const ParamTensor *p = &pt.t[ti];
            unsigned seed = adamw_seed(t, ti);
            for (size_t j = 0; j < p->numel; j++) {
                size_t i = p->offset + j;
                float gg = g[i] * gs;
                m[i] = b1 * m[i] + (1.0f - b1) * gg;
                v[i] = b2 * v[i] + (1.0f - b2) * gg * gg;
                float mh = m[i] / bc1, vh = v[i] / bc2;
                master[i] -= lr * p->lr_mult * (mh / (sqrtf(vh) + eps) + (p->decay ? wd : 0.0f) * master[i]);
                want[i] = stochastic_round_bf16(master[i], j, seed).__x;
            }
        }
        check_close(down(dmaster, n).data(), master.data(), n, 1e-7f, 1e-6f, nm("adamw step %d: master weights", t));
        check_close(down(dm, n).data(), m.data(), n, 1e-9f, 1e-6f, nm("adamw step %d: first moments", t));
        check_close(down(dv, n).data(), v.data(), n, 1e-12f, 1e-6f, nm("adamw step %d: second moments", t));
        std::vector<uint16_t> got = down_bits(dp, n);
        check_same(got, want, nm("adamw step %d: bf16 weights = stochastic rounding of the master weights (bit-exact)", t));
        int bracket = 1;
        for (size_t i = 0; i < n; i++) {
            float lo = sim_bf2f((uint16_t)(__float_as_uint(master[i]) >> 16)), hi = sim_bf2f((uint16_t)((__float_as_uint(master[i]) >> 16) + 1));
            float x = sim_bf2f(got[i]);
            if (x != lo && x != hi) bracket = 0;
        }
        check_true(bracket, nm("adamw step %d: each bf16 weight is one of the two bf16 neighbours of its master weight", t), "not bracketed");
        if (t == 1) after1 = got;
    }
    // master_to_bf16 with t > 0 re-derives the rounding of update t
    master_to_bf16(&pt, dp, dmaster, 3);
    {
        std::vector<uint16_t> got = down_bits(dp, n), want(n);
        for (int ti = 0; ti < pt.n; ti++)
            for (size_t j = 0; j < pt.t[ti].numel; j++)
                want[pt.t[ti].offset + j] = stochastic_round_bf16(master[pt.t[ti].offset + j], j, adamw_seed(3, ti)).__x;
        check_same(got, want, "master_to_bf16 t=3 re-derives update 3's stochastic rounding (resume)");
    }
    // determinism: the same three updates again from the same state give the same bits
    {
        std::vector<float> master0(n), gz(n);
        g_rng = 99;
        for (auto &x : master0) x = 0.1f * nrand();
        std::vector<uint16_t> runs[2];
        for (int r = 0; r < 2; r++) {
            cudaCheck(cudaMemcpy(dmaster, master0.data(), n * 4, cudaMemcpyHostToDevice));
            cudaCheck(cudaMemset(dm, 0, n * 4));
            cudaCheck(cudaMemset(dv, 0, n * 4));
            g_rng = 1234;
            for (int t = 1; t <= 2; t++) {
                Vec gg = rand_bf16(n, 1.0f);
                cudaCheck(cudaFree(dg));
                dg = up_bf16(gg);
                adamw_update(&pt, dp, dmaster, dg, dm, dv, lr, b1, b2, eps, wd, 1.0f, t);
            }
            runs[r] = down_bits(dp, n);
            std::vector<float> mm = down(dmaster, n);
            runs[r].insert(runs[r].end(), (uint16_t *)mm.data(), (uint16_t *)(mm.data() + n));
        }
        check_same(runs[0], runs[1], "adamw determinism: two runs give bit-identical weights and master weights");
    }
    // ZeRO-1: two ranks' slices together equal the unsharded update
    {
        std::vector<float> master0(n);
        for (auto &x : master0) x = 0.1f * nrand();
        Vec gg = rand_bf16(n, 1.0f);
        cudaCheck(cudaFree(dg));
        dg = up_bf16(gg);
        cudaCheck(cudaMemcpy(dmaster, master0.data(), n * 4, cudaMemcpyHostToDevice));
        cudaCheck(cudaMemset(dm, 0, n * 4));
        cudaCheck(cudaMemset(dv, 0, n * 4));
        adamw_update(&pt, dp, dmaster, dg, dm, dv, lr, b1, b2, eps, wd, 1.0f, 1);
        std::vector<uint16_t> full = down_bits(dp, n);
        std::vector<float> full_master = down(dmaster, n);
        cudaCheck(cudaMemcpy(dmaster, master0.data(), n * 4, cudaMemcpyHostToDevice));
        for (int rank = 0; rank < 2; rank++) {
            ZeroShard z;
            zero_shard_init(&z, 1, n, rank, 2);
            float *zm = dev_alloc<float>(z.shard), *zv = dev_alloc<float>(z.shard);
            cudaCheck(cudaMemset(zm, 0, z.shard * 4));
            cudaCheck(cudaMemset(zv, 0, z.shard * 4));
            adamw_update_range(&pt, dp, dmaster, dg, zm, zv, lr, b1, b2, eps, wd, 1.0f, 1, &z);
            cudaCheck(cudaFree(zm));
            cudaCheck(cudaFree(zv));
        }
        check_same(down_bits(dp, n), full, "adamw ZeRO-1: two ranks' slices give the unsharded bf16 weights");
        check_same(down(dmaster, n), full_master, "adamw ZeRO-1: two ranks' slices give the unsharded master weights");
    }
    void *bufs[] = {dp, dg, dmaster, dm, dv};
    for (void *p : bufs) cudaCheck(cudaFree(p));
    params_free(&pt);
    (void)after1;
}

// AdamW's chunk table (one launch for every tensor): tensors of several chunks, ZeRO-1 slices of
// 3 ranks cutting chunks and tensors anywhere. The table covers each rank's elements once, in
// chunks inside one tensor; the slices' updates together are the unsharded update, bit for bit
// (the rounding hashes the element's index in its tensor, not in its chunk or slice).
static void test_adamw_chunks() {
    ParamTable pt;
    params_init(&pt);
    size_t s0[2] = {100, 200}, s1[1] = {100}, s2[1] = {9000}, s3[2] = {3, 7};
    params_add(&pt, "w0", 2, s0, 1.0f, 1);  // 20000: three chunks, the last short
    params_add(&pt, "b0", 1, s1, 0.5f, 0);
    params_add(&pt, "w1", 1, s2, 2.0f, 1);
    params_add(&pt, "w2", 2, s3, 1.0f, 1);
    const size_t n = pt.total;
    int cover_ok = 1;
    for (int ranks = 1; ranks <= 3; ranks++)
        for (int rank = 0; rank < ranks; rank++) {
            ZeroShard z;
            zero_shard_init(&z, ranks > 1, n, rank, ranks);
            const size_t lo = ranks > 1 ? z.lo : 0, hi = ranks > 1 ? z.hi : n;
            std::vector<AdamWChunk> c(adamw_chunks(NULL, &pt, &z));
            adamw_chunks(c.data(), &pt, &z);
            std::vector<int> seen(n, 0);
            for (const AdamWChunk &k : c) {
                const ParamTensor *p = &pt.t[k.tensor];
                cover_ok &= k.n > 0 && k.n <= ADAMW_CHUNK && k.j0 + k.n <= p->numel && k.off == p->offset + k.j0 &&
                            k.moff == k.off - (ranks > 1 ? z.lo : 0) && k.lr_mult == p->lr_mult && k.decay == p->decay;
                for (size_t i = k.off; i < k.off + k.n && i < n; i++) seen[i]++;
            }
            for (size_t i = 0; i < n; i++) cover_ok &= seen[i] == (i >= lo && i < hi);
        }
    check_true(cover_ok, "adamw chunks: each of a rank's elements in one chunk, chunks inside a tensor and at most ADAMW_CHUNK long (1-3 ranks)",
               "wrong table");
    Vec master0(n), g = rand_bf16(n, 1.0f), m0(n), v0(n);
    for (size_t i = 0; i < n; i++) master0[i] = 0.1f * nrand(), m0[i] = 0.01f * nrand(), v0[i] = 1e-4f * urand();
    floatX *dp = dev_alloc<floatX>(n), *dg = up_bf16(g);
    float *dmaster = up(master0), *dm = up(m0), *dv = up(v0);
    adamw_update(&pt, dp, dmaster, dg, dm, dv, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.8f, 4);
    std::vector<uint16_t> full = down_bits(dp, n);
    Vec full_master = down(dmaster, n), full_m = down(dm, n), full_v = down(dv, n);
    cudaCheck(cudaMemcpy(dmaster, master0.data(), n * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(dp, 0xFF, n * 2));
    Vec zm_all(n), zv_all(n);
    for (int rank = 0; rank < 3; rank++) {
        ZeroShard z;
        zero_shard_init(&z, 1, n, rank, 3);
        float *zm = up(Vec(m0.begin() + z.lo, m0.begin() + z.hi)), *zv = up(Vec(v0.begin() + z.lo, v0.begin() + z.hi));
        AdamWPlan plan;
        memset(&plan, 0, sizeof(plan));
        adamw_plan_build(&plan, &pt, &z);
        adamw_update_plan(&plan, dp, dmaster, dg, zm, zv, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.8f, 4);
        adamw_plan_free(&plan);
        Vec a = down(zm, z.hi - z.lo), b = down(zv, z.hi - z.lo);
        std::copy(a.begin(), a.end(), zm_all.begin() + z.lo);
        std::copy(b.begin(), b.end(), zv_all.begin() + z.lo);
        cudaCheck(cudaFree(zm));
        cudaCheck(cudaFree(zv));
    }
    check_same(down_bits(dp, n), full, "adamw chunks, 3 ranks' slices: the unsharded bf16 weights, bit for bit");
    check_true(down(dmaster, n) == full_master && zm_all == full_m && zv_all == full_v,
               "adamw chunks, 3 ranks' slices: the unsharded master weights and moments, bit for bit", "differ");
    void *bufs[] = {dp, dg, dmaster, dm, dv};
    for (void *p : bufs) cudaCheck(cudaFree(p));
    params_free(&pt);
}

// ================================================================================================
// global norm, encoder

static void test_global_norm(size_t n) {
    Vec g = rand_bf16(n, 0.3f);
    double s = 0;
    for (float x : g) s += (double)x * x;
    floatX *dg = up_bf16(g);
    double *scratch = dev_alloc<double>(NORM_BLOCKS + 1);
    float a = global_norm(dg, n, scratch), b = global_norm(dg, n, scratch);
    float ref = (float)sqrt(s);
    check_close(&a, &ref, 1, 0.0f, 1e-6f, nm("global_norm n=%zu", n));
    check_true(memcmp(&a, &b, 4) == 0, nm("global_norm n=%zu: bit-identical on a second run", n), "differs");
    // ZeRO-1: the squares summed over slices (2 to 5 ranks' shards, the last one short), then over
    // the slices, give the whole vector's norm to the bit
    int same = 1;
    for (size_t ranks = 2; ranks <= 5; ranks++) {
        size_t shard = (n + ranks - 1) / ranks;
        double sq = 0.0;
        for (size_t lo = 0; lo < n; lo += shard) sq += global_norm_squared(dg + lo, std::min(shard, n - lo), scratch);
        float z = (float)sqrt(sq);
        same &= memcmp(&z, &a, 4) == 0;
    }
    check_true(same, nm("global_norm n=%zu: the norm from 2, 3, 4 and 5 slices' sums of squares is the whole vector's, bit for bit", n), "differs");
    cudaCheck(cudaFree(dg));
    cudaCheck(cudaFree(scratch));
}

static void test_encoder(int B, int T, int C, int V) {
    int BT = B * T;
    std::vector<int> inp(BT);
    for (int i = 0; i < BT; i++) inp[i] = (int)(urand() * (V / 3));  // repeats, so that buckets hold several positions
    Vec wte = rand_bf16((size_t)V * C, 0.5f), wpe = rand_bf16((size_t)T * C, 0.5f);
    floatX *dwte = up_bf16(wte), *dwpe = up_bf16(wpe), *dout = dev_alloc<floatX>((size_t)BT * C);
    int *dinp = up(inp);
    encoder_forward(dout, dinp, dwte, dwpe, B, T, C);
    Vec ref((size_t)BT * C);
    for (int i = 0; i < BT; i++)
        for (int c = 0; c < C; c++) ref[(size_t)i * C + c] = bfr(wte[(size_t)inp[i] * C + c] + wpe[(size_t)(i % T) * C + c]);
    check_same(down_bf16(dout, ref.size()), ref, nm("encoder forward B=%d T=%d C=%d (bit-exact)", B, T, C));

    Vec g = rand_bf16((size_t)BT * C, 1.0f), gwte = rand_bf16((size_t)V * C, 0.1f), gwpe = rand_bf16((size_t)T * C, 0.1f);
    Vec rwte = gwte, rwpe = gwpe;
    std::vector<int> buf(3 * BT + 2), count(V, 0);
    int used = encoder_buckets_build(buf.data(), count.data(), inp.data(), BT, V);
    int U = buf[0];
    for (int v = 0; v < V; v++) {  // each token's positions in increasing order, summed in fp32
        float acc[1024] = {0};
        bool any = false;
        for (int i = 0; i < BT; i++)
            if (inp[i] == v) {
                any = true;
                for (int c = 0; c < C; c++) acc[c] += g[(size_t)i * C + c];
            }
        if (any)
            for (int c = 0; c < C; c++) rwte[(size_t)v * C + c] = bfr(gwte[(size_t)v * C + c] + acc[c]);
    }
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++) {
            float acc = 0;
            for (int b = 0; b < B; b++) acc += g[((size_t)b * T + t) * C + c];
            rwpe[(size_t)t * C + c] = bfr(gwpe[(size_t)t * C + c] + acc);
        }
    floatX *dg = up_bf16(g), *dgwte = up_bf16(gwte), *dgwpe = up_bf16(gwpe);
    int *dbuck = dev_alloc<int>(3 * BT + 2);
    cudaCheck(cudaMemcpy(dbuck, buf.data(), used * sizeof(int), cudaMemcpyHostToDevice));
    encoder_backward(dgwte, dgwpe, dg, dbuck, U, B, T, C);
    check_same(down_bf16(dgwte, rwte.size()), rwte, nm("encoder backward B=%d T=%d C=%d: dwte, %d distinct tokens (bit-exact)", B, T, C, U));
    check_same(down_bf16(dgwpe, rwpe.size()), rwpe, nm("encoder backward B=%d T=%d C=%d: dwpe (bit-exact)", B, T, C));
    void *bufs[] = {dwte, dwpe, dout, dinp, dg, dgwte, dgwpe, dbuck};
    for (void *p : bufs) cudaCheck(cudaFree(p));
}

// ================================================================================================
// attention: cuBLAS path (cuda/attention.cuh) and flash (cuda/flash_attention.cuh) against a
// naive reference and against each other

struct AttnRef {
    Vec out, dqkv;
};
static AttnRef attn_ref(const Vec &qkv, const Vec &dout, int B, int T, int C, int NH) {
    int hs = C / NH;
    AttnRef r;
    r.out.assign((size_t)B * T * C, 0);
    r.dqkv.assign((size_t)B * T * 3 * C, 0);
    double scale = 1.0 / sqrt((double)hs);
    std::vector<double> p(T), dp(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = &qkv[((size_t)b * T + t) * 3 * C + h * hs];
                double m = -1e300;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = &qkv[((size_t)b * T + t2) * 3 * C + C + h * hs];
                    double s = 0;
                    for (int d = 0; d < hs; d++) s += (double)q[d] * k[d];
                    p[t2] = s * scale;
                    m = fmax(m, p[t2]);
                }
                double sum = 0;
                for (int t2 = 0; t2 <= t; t2++) sum += (p[t2] = exp(p[t2] - m));
                for (int t2 = 0; t2 <= t; t2++) p[t2] /= sum;
                const float *go = &dout[((size_t)b * T + t) * C + h * hs];
                double dot = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v = &qkv[((size_t)b * T + t2) * 3 * C + 2 * C + h * hs];
                    double dpv = 0;
                    for (int d = 0; d < hs; d++) {
                        r.out[((size_t)b * T + t) * C + h * hs + d] += (float)(p[t2] * v[d]);
                        dpv += (double)go[d] * v[d];
                        r.dqkv[((size_t)b * T + t2) * 3 * C + 2 * C + h * hs + d] += (float)(p[t2] * go[d]);  // dv
                    }
                    dp[t2] = dpv;
                    dot += p[t2] * dpv;
                }
                for (int t2 = 0; t2 <= t; t2++) {
                    double ds = p[t2] * (dp[t2] - dot) * scale;
                    const float *k = &qkv[((size_t)b * T + t2) * 3 * C + C + h * hs];
                    for (int d = 0; d < hs; d++) {
                        r.dqkv[((size_t)b * T + t) * 3 * C + h * hs + d] += (float)(ds * k[d]);        // dq
                        r.dqkv[((size_t)b * T + t2) * 3 * C + C + h * hs + d] += (float)(ds * q[d]);  // dk
                    }
                }
            }
    return r;
}
// dqkv checked per part (q, k, v), each relative to its own max
static void check_dqkv(const Vec &got, const Vec &ref, int BT, int C, float frac, const char *tag) {
    const char *parts[3] = {"dq", "dk", "dv"};
    for (int part = 0; part < 3; part++) {
        Vec g, r;
        for (int i = 0; i < BT; i++)
            for (int c = 0; c < C; c++) {
                g.push_back(got[(size_t)i * 3 * C + part * C + c]);
                r.push_back(ref[(size_t)i * 3 * C + part * C + c]);
            }
        check_scaled(g, r, frac, 2e-2f, nm("%s: %s", tag, parts[part]));
    }
}

struct AttnOut {
    Vec out, dqkv;
    std::vector<uint16_t> out_bits, dqkv_bits;
    std::vector<float> lse;
};
static AttnOut run_flash(const Vec &qkv, const Vec &dout, int B, int T, int C, int NH) {
    size_t BT = (size_t)B * T;
    floatX *dq = up_bf16(qkv), *dgo = up_bf16(dout), *o = dev_alloc<floatX>(BT * C), *dqkv = dev_alloc<floatX>(BT * 3 * C);
    float *lse = dev_alloc<float>((size_t)B * NH * T), *scr = dev_alloc<float>((size_t)B * NH * T);
    flash_attention_forward(o, lse, dq, B, T, C, NH);
    flash_attention_backward(dqkv, dgo, dq, o, lse, scr, B, T, C, NH);
    AttnOut r;
    r.out = down_bf16(o, BT * C);
    r.dqkv = down_bf16(dqkv, BT * 3 * C);
    r.out_bits = down_bits(o, BT * C);
    r.dqkv_bits = down_bits(dqkv, BT * 3 * C);
    r.lse = down(lse, (size_t)B * NH * T);
    void *bufs[] = {dq, dgo, o, dqkv, lse, scr};
    for (void *p : bufs) cudaCheck(cudaFree(p));
    return r;
}
static AttnOut run_cublas_attention(const Vec &qkv, const Vec &dout, int B, int T, int C, int NH) {
    size_t BT = (size_t)B * T, att_n = (size_t)B * NH * T * T;
    floatX *dq = up_bf16(qkv), *dgo = up_bf16(dout), *o = dev_alloc<floatX>(BT * C), *dqkv = dev_alloc<floatX>(BT * 3 * C),
           *att = dev_alloc<floatX>(att_n), *scr7 = dev_alloc<floatX>(7 * BT * C);
    AttnScratch s;
    s.q = scr7; s.k = scr7 + BT * C; s.v = scr7 + 2 * BT * C; s.y = scr7 + 3 * BT * C;
    s.dq = scr7 + 4 * BT * C; s.dk = scr7 + 5 * BT * C; s.dv = scr7 + 6 * BT * C;
    s.scores = dev_alloc<float>(att_n);
    attention_forward(o, att, dq, &s, B, T, C, NH);
    AttnOut r;
    r.out = down_bf16(o, BT * C);
    attention_backward(dqkv, dgo, dq, att, &s, B, T, C, NH);
    r.dqkv = down_bf16(dqkv, BT * 3 * C);
    void *bufs[] = {dq, dgo, o, dqkv, att, scr7, s.scores};
    for (void *p : bufs) cudaCheck(cudaFree(p));
    return r;
}

static void test_attention(int B, int T, int NH, int hs, bool cublas_path) {
    int C = NH * hs;
    Vec qkv = rand_bf16((size_t)B * T * 3 * C, 1.0f), dout = rand_bf16((size_t)B * T * C, 1.0f);
    AttnRef ref = attn_ref(qkv, dout, B, T, C, NH);
    char tag[128];
    AttnOut fl;
    bool flash_ok = flash_attention_supported(hs, T);
    if (flash_ok) {
        fl = run_flash(qkv, dout, B, T, C, NH);
        snprintf(tag, sizeof(tag), "flash attention B=%d T=%d NH=%d hs=%d", B, T, NH, hs);
        check_scaled(fl.out, ref.out, 2e-2f, 2e-2f, nm("%s: out", tag));
        check_dqkv(fl.dqkv, ref.dqkv, B * T, C, 3e-2f, tag);
        // lse = log sum exp of the scaled scores (fp32)
        Vec lref((size_t)B * NH * T);
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++)
                for (int t = 0; t < T; t++) {
                    double m = -1e300, s = 0;
                    std::vector<double> sc(t + 1);
                    for (int t2 = 0; t2 <= t; t2++) {
                        double d = 0;
                        for (int e = 0; e < hs; e++)
                            d += (double)qkv[((size_t)b * T + t) * 3 * C + h * hs + e] * qkv[((size_t)b * T + t2) * 3 * C + C + h * hs + e];
                        sc[t2] = d / sqrt((double)hs);
                        m = fmax(m, sc[t2]);
                    }
                    for (int t2 = 0; t2 <= t; t2++) s += exp(sc[t2] - m);
                    lref[((size_t)b * NH + h) * T + t] = (float)(m + log(s));
                }
        check_close(fl.lse.data(), lref.data(), lref.size(), 2e-3f, 1e-3f, nm("%s: lse", tag));
        AttnOut again = run_flash(qkv, dout, B, T, C, NH);
        check_true(again.out_bits == fl.out_bits && again.dqkv_bits == fl.dqkv_bits && again.lse == fl.lse,
                   nm("%s: deterministic (bit-identical second run)", tag), "differs");
    } else {
        check_true(hs != 16 && hs != 32 && hs != 64 && hs != 128, nm("flash attention supports hs=%d T=%d", hs, T), "unsupported");
    }
    if (cublas_path) {
        AttnOut cb = run_cublas_attention(qkv, dout, B, T, C, NH);
        snprintf(tag, sizeof(tag), "cuBLAS attention B=%d T=%d NH=%d hs=%d", B, T, NH, hs);
        check_scaled(cb.out, ref.out, 2e-2f, 2e-2f, nm("%s: out", tag));
        check_dqkv(cb.dqkv, ref.dqkv, B * T, C, 3e-2f, tag);
        if (flash_ok) {
            snprintf(tag, sizeof(tag), "flash vs cuBLAS attention B=%d T=%d NH=%d hs=%d", B, T, NH, hs);
            check_scaled(fl.out, cb.out, 2e-2f, 2e-2f, nm("%s: out", tag));
            check_dqkv(fl.dqkv, cb.dqkv, B * T, C, 3e-2f, tag);
        }
    }
}

// ================================================================================================
// structured layers (structured/structured.cuh) against the CPU layers (btt.h, monarch.h, moe.h)

struct Dev {
    std::vector<void *> p;
    template <class T>
    T *add(T *x) {
        p.push_back((void *)x);
        return x;
    }
    ~Dev() {
        for (void *x : p) cudaCheck(cudaFree(x));
    }
};

// Random bf16 inputs of a BTT layer and the CPU layer's forward and backward on them.
struct BttRef {
    BTTShape s;
    Vec x, W0, W1, bias, dy, y, z, dx, dW0, dW1, db;
    BttRef(int N, int alpha, int gamma, int phi, int eps, int rank) {
        btt_shape(&s, alpha, gamma, phi, eps, rank);
        x = rand_bf16((size_t)N * s.d_in, 1.0f);
        W0 = rand_bf16(btt_w0_size(&s), 1.0f / sqrtf((float)alpha));
        W1 = rand_bf16(btt_w1_size(&s), 1.0f / sqrtf((float)gamma * rank));
        bias = rand_bf16(s.d_out, 0.1f);
        dy = rand_bf16((size_t)N * s.d_out, 1.0f);
        y.assign((size_t)N * s.d_out, 0.0f); z.assign(btt_z_size(&s, N), 0.0f); dx.assign((size_t)N * s.d_in, 0.0f);
        dW0.assign(W0.size(), 0.0f); dW1.assign(W1.size(), 0.0f); db.assign(s.d_out, 0.0f);
        Vec scr(btt_scratch_size(&s, N));
        btt_forward(y.data(), z.data(), x.data(), W0.data(), W1.data(), bias.data(), N, &s);
        btt_backward(dx.data(), dW0.data(), dW1.data(), db.data(), dy.data(), x.data(), z.data(), W0.data(), W1.data(), N, &s, scr.data());
    }
};

// plan_permute_gpu (the plans' [R][C][blk] -> [C][R][blk] per row) bit for bit, with row strides
// wider than a row (the columns between must stay as they were), against plan_permute_dst_index.
// The shape decides the path: 16-byte or 2-byte accesses, several rows per block or one (above
// 48 KB, the opt-in), or the scatter fallback when a row exceeds the opt-in. Sub-rows (C·blk) of
// any length: a 16-byte load may span several. scaled: with PlanEpi.scale (BTT-MoE's set path:
// element x of each [blk] run of row r times scale[r·blk + x], one bf16 rounding).
static void test_permute(int rows, int R, int C, int blk, int src_pad, int dst_pad, const char *path, int scaled = 0) {
    const int len = R * C * blk, sld = len + src_pad, dld = len + dst_pad;
    Vec src = rand_bf16((size_t)rows * sld, 1.0f), dst0 = rand_bf16((size_t)rows * dld, 1.0f), want = dst0, scale((size_t)rows * blk);
    for (float &v : scale) v = 0.5f + 0.25f * nrand();
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < len; j++) {
            const float v = src[(size_t)r * sld + j];
            want[(size_t)r * dld + plan_permute_dst_index(j, R, C, blk)] = scaled ? bfr(v * scale[(size_t)r * blk + j % blk]) : v;
        }
    floatX *s_d = up_bf16(src), *d_d = up_bf16(dst0);
    float *sc_d = NULL;
    if (scaled) {
        cudaCheck(cudaMalloc(&sc_d, scale.size() * sizeof(float)));
        cudaCheck(cudaMemcpy(sc_d, scale.data(), scale.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    plan_permute_gpu(d_d, s_d, rows, sld, dld, R, C, blk, NULL, PlanEpi{0, NULL, NULL, sc_d});
    check_same(down_bf16(d_d, want.size()), want, nm("permute %d rows [%d][%d][%d] -> [C][R][blk], row strides %d/%d (%s)%s, bit-exact", rows, R, C,
                                                     blk, sld, dld, path, scaled ? ", each run's elements scaled" : ""));
    cudaCheck(cudaFree(s_d));
    cudaCheck(cudaFree(d_d));
    if (sc_d) cudaCheck(cudaFree(sc_d));
}

static void test_btt(int N, int alpha, int gamma, int phi, int eps, int rank) {
    BttRef c(N, alpha, gamma, phi, eps, rank);
    const BTTShape &s = c.s;
    const int din = s.d_in, dout = s.d_out;
    const Vec &x = c.x, &W0 = c.W0, &W1 = c.W1, &bias = c.bias, &dy = c.dy, &y = c.y, &z = c.z, &dx = c.dx, &dW0 = c.dW0, &dW1 = c.dW1, &db = c.db;
    Dev d;
    floatX *x_d = d.add(up_bf16(x)), *W0_d = d.add(up_bf16(W0)), *W1_d = d.add(up_bf16(W1)), *b_d = d.add(up_bf16(bias)), *dy_d = d.add(up_bf16(dy));
    floatX *y_d = d.add(dev_alloc<floatX>((size_t)N * dout)), *z_d = d.add(dev_alloc<floatX>(btt_z_size(&s, N))),
           *s_d = d.add(dev_alloc<floatX>((size_t)N * plan_btt_scratch_row(&s))), *dx_d = d.add(dev_alloc<floatX>((size_t)N * din));
    floatX *dW0_d = d.add(up_bf16(Vec(W0.size(), 0.0f))), *dW1_d = d.add(up_bf16(Vec(W1.size(), 0.0f))), *db_d = d.add(up_bf16(Vec(dout, 0.0f)));
    float *col = d.add(dev_alloc<float>(column_sums_scratch_floats(dout)));
    btt_forward_gpu(y_d, z_d, x_d, W0_d, W1_d, b_d, N, &s, s_d);
    btt_backward_gpu(dx_d, dW0_d, dW1_d, db_d, dy_d, x_d, z_d, W0_d, W1_d, N, &s, s_d, col);
    char tag[128];
    snprintf(tag, sizeof(tag), "btt %d->%d (alpha %d gamma %d phi %d eps %d rank %d) N=%d", din, dout, alpha, gamma, phi, eps, rank, N);
    check_scaled(down_bf16(y_d, y.size()), y, 2e-2f, 0.0f, nm("%s: y", tag));
    check_scaled(down_bf16(z_d, z.size()), z, 2e-2f, 0.0f, nm("%s: saved z", tag));
    check_scaled(down_bf16(dx_d, dx.size()), dx, 2e-2f, 0.0f, nm("%s: dx", tag));
    check_scaled(down_bf16(dW0_d, dW0.size()), dW0, 2e-2f, 0.0f, nm("%s: dW0", tag));
    check_scaled(down_bf16(dW1_d, dW1.size()), dW1, 2e-2f, 0.0f, nm("%s: dW1", tag));
    check_scaled(down_bf16(db_d, db.size()), db, 2e-2f, 0.0f, nm("%s: dbias", tag));
    // dx = NULL (the first layer's input needs no gradient) must still give the weight gradients
    cudaCheck(cudaMemset(dW0_d, 0, W0.size() * 2));
    btt_backward_gpu(NULL, dW0_d, dW1_d, NULL, dy_d, x_d, z_d, W0_d, W1_d, N, &s, s_d, col);
    check_scaled(down_bf16(dW0_d, dW0.size()), dW0, 2e-2f, 0.0f, nm("%s: dW0 with dx = NULL", tag));
}

// fused (an -sk value): 1, the forward and the backward through monarch_fused.cuh, which the shape
// must support; 2, 3 or 5, through the BTT kernels on the BTT the Monarch is (monarch_gpu.cuh's
// monarch_btt_pays must hold both ways); also compared with the baseline's y, u, dx and gradients.
// The cores then sit 16 bytes off a 32-byte boundary, as parameters in the flat buffer may (the
// backward copies them aligned).
static void test_monarch(int N, int din, int dout, int nb, int fused = 0) {
    MonarchShape m;
    monarch_shape(&m, din, dout, nb);
    char tag[128];
    char how[40] = "";
    if (fused) snprintf(how, sizeof(how), fused == 1 ? " (fused)" : " (-sk %d: as a BTT)", fused);
    snprintf(tag, sizeof(tag), "monarch %d->%d nb=%d N=%d%s", din, dout, nb, N, how);
    MbGeom bg;
    BTTShape bs;
    const size_t lim = btt_fused_smem_limit();
    const int mf_bwd = monarch_fused_bwd_choose(&bg, &m, lim) && monarch_fused_bwd_pays(&bg, &m);
    st_set_kernels(fused);
    const int as_btt = monarch_btt_pays(&bs, &m, 0) && monarch_btt_pays(&bs, &m, 1);
    st_set_kernels(0);
    if (fused == 1 && !check_true(monarch_fused_fwd_pays(&m, lim) && mf_bwd, nm("%s: the fused kernels support the shape and pay", tag),
                                  "they do not: the test would check the cuBLAS path"))
        return;
    if (fused > 1 && !check_true(as_btt, nm("%s: the BTT kernels take the shape both ways and pay", tag), "they do not: another path would run"))
        return;
    Vec x = rand_bf16((size_t)N * din, 1.0f), R = rand_bf16(monarch_r_size(&m), 1.0f / sqrtf((float)m.p)),
        L = rand_bf16(monarch_l_size(&m), 1.0f / sqrtf((float)m.q)), bias = rand_bf16(dout, 0.1f), dy = rand_bf16((size_t)N * dout, 1.0f);
    Vec y((size_t)N * dout), u(monarch_u_size(&m, N)), dx((size_t)N * din), dR(R.size(), 0.0f), dL(L.size(), 0.0f), db(dout, 0.0f),
        scr(monarch_scratch_size(&m, N));
    monarch_forward(y.data(), u.data(), x.data(), R.data(), L.data(), bias.data(), N, &m);
    monarch_backward(dx.data(), dR.data(), dL.data(), db.data(), dy.data(), x.data(), u.data(), R.data(), L.data(), N, &m, scr.data());
    Dev d;
    const int off = fused ? 8 : 0;  // elements: 16 bytes
    Vec Rp(off, 0.0f), Lp(off, 0.0f);
    Rp.insert(Rp.end(), R.begin(), R.end());
    Lp.insert(Lp.end(), L.begin(), L.end());
    floatX *x_d = d.add(up_bf16(x)), *R_d = d.add(up_bf16(Rp)) + off, *L_d = d.add(up_bf16(Lp)) + off, *b_d = d.add(up_bf16(bias)),
           *dy_d = d.add(up_bf16(dy));
    floatX *y_d = d.add(dev_alloc<floatX>((size_t)N * dout)), *u_d = d.add(dev_alloc<floatX>(monarch_u_size(&m, N))),
           *s_d = d.add(dev_alloc<floatX>(monarch_gpu_scratch_elems(&m, N))), *dx_d = d.add(dev_alloc<floatX>((size_t)N * din));
    floatX *dR_d = d.add(up_bf16(Vec(R.size(), 0.0f))), *dL_d = d.add(up_bf16(Vec(L.size(), 0.0f))), *db_d = d.add(up_bf16(Vec(dout, 0.0f)));
    float *col = d.add(dev_alloc<float>(column_sums_scratch_floats(dout)));
    if (fused) {  // the baseline's results first, then the fused kernels' over them
        monarch_forward_gpu(y_d, u_d, x_d, R_d, L_d, b_d, N, &m, s_d);
        Vec yb = down_bf16(y_d, y.size()), ub = down_bf16(u_d, u.size());
        monarch_backward_gpu(dx_d, dR_d, dL_d, db_d, dy_d, x_d, u_d, R_d, L_d, N, &m, s_d, col);
        Vec gb[3] = {down_bf16(dx_d, dx.size()), down_bf16(dR_d, dR.size()), down_bf16(dL_d, dL.size())};
        cudaCheck(cudaMemset(y_d, 0xFF, y.size() * sizeof(floatX)));  // NaN: every element must be written again
        cudaCheck(cudaMemset(u_d, 0xFF, u.size() * sizeof(floatX)));
        cudaCheck(cudaMemset(dx_d, 0xFF, dx.size() * sizeof(floatX)));
        cudaCheck(cudaMemset(dR_d, 0, dR.size() * sizeof(floatX)));  // the gradients accumulate
        cudaCheck(cudaMemset(dL_d, 0, dL.size() * sizeof(floatX)));
        cudaCheck(cudaMemset(db_d, 0, db.size() * sizeof(floatX)));
        st_set_kernels(fused);
        const long btt_runs = g_monarch_btt_runs, mma = g_btt_mma_launches;
        check_true(monarch_forward_gpu(y_d, u_d, x_d, R_d, L_d, b_d, N, &m, s_d) == 1, nm("%s: the fused forward ran", tag), "the cuBLAS one ran");
        check_true(monarch_backward_gpu(dx_d, dR_d, dL_d, db_d, dy_d, x_d, u_d, R_d, L_d, N, &m, s_d, col) == 1, nm("%s: the fused backward ran", tag),
                   "the cuBLAS one ran");
        check_true(g_monarch_btt_runs - btt_runs == (fused > 1 ? 2 : 0) && g_btt_mma_launches - mma == (fused == 5 ? 2 : 0),
                   nm("%s: %s", tag, fused > 1 ? "both ran on the BTT kernels" : "neither ran on the BTT kernels"), "they did not");
        st_set_kernels(0);
        check_scaled(down_bf16(y_d, y.size()), yb, 1e-2f, 1e-2f, nm("%s: y vs the cuBLAS baseline", tag));
        check_scaled(down_bf16(u_d, u.size()), ub, 1e-2f, 1e-2f, nm("%s: saved u vs the cuBLAS baseline", tag));
        check_scaled(down_bf16(dx_d, dx.size()), gb[0], 1e-2f, 1e-2f, nm("%s: dx vs the cuBLAS baseline", tag));
        check_scaled(down_bf16(dR_d, dR.size()), gb[1], 1e-2f, 1e-2f, nm("%s: dR vs the cuBLAS baseline", tag));
        check_scaled(down_bf16(dL_d, dL.size()), gb[2], 1e-2f, 1e-2f, nm("%s: dL vs the cuBLAS baseline", tag));
    } else {
        monarch_forward_gpu(y_d, u_d, x_d, R_d, L_d, b_d, N, &m, s_d);
        monarch_backward_gpu(dx_d, dR_d, dL_d, db_d, dy_d, x_d, u_d, R_d, L_d, N, &m, s_d, col);
    }
    check_scaled(down_bf16(y_d, y.size()), y, 2e-2f, 0.0f, nm("%s: y", tag));
    check_scaled(down_bf16(u_d, u.size()), u, 2e-2f, 0.0f, nm("%s: saved u", tag));
    check_scaled(down_bf16(dx_d, dx.size()), dx, 2e-2f, 0.0f, nm("%s: dx", tag));
    check_scaled(down_bf16(dR_d, dR.size()), dR, 2e-2f, 0.0f, nm("%s: dR", tag));
    check_scaled(down_bf16(dL_d, dL.size()), dL, 2e-2f, 0.0f, nm("%s: dL", tag));
    check_scaled(down_bf16(db_d, db.size()), db, 2e-2f, 0.0f, nm("%s: dbias", tag));
    // dx = NULL (the first layer's input needs no gradient) must still give the weight gradients
    cudaCheck(cudaMemset(dR_d, 0, dR.size() * sizeof(floatX)));
    cudaCheck(cudaMemset(dL_d, 0, dL.size() * sizeof(floatX)));
    st_set_kernels(fused);  // (the BTT kernel's backward needs dx: then -sk 1's Monarch kernel runs where it pays)
    const int want = fused ? mf_bwd : 0;
    check_true(monarch_backward_gpu(NULL, dR_d, dL_d, NULL, dy_d, x_d, u_d, R_d, L_d, N, &m, s_d, col) == want,
               nm("%s: dx = NULL runs the %s backward", tag, want ? "Monarch kernel's" : "cuBLAS"), "it ran the other one");
    st_set_kernels(0);
    check_scaled(down_bf16(dR_d, dR.size()), dR, 2e-2f, 0.0f, nm("%s: dR with dx = NULL", tag));
    check_scaled(down_bf16(dL_d, dL.size()), dL, 2e-2f, 0.0f, nm("%s: dL with dx = NULL", tag));
}

// Where the BTT kernels decline a Monarch layer under -sk 2, 3, 5 (the Monarch kernel of -sk 1 runs
// instead), forward and backward apart: GPT-2's fc in 4 blocks is the BTT of rank 48 (alpha 192,
// eps 768), whose W0 slices (192 x 48 for one phi block) outgrow the staged kernel's register
// prefetch (BT_WVEC) both ways; 1024 -> 4096 in 8 blocks (rank 16) takes the forward, but the
// backward's geometry (16 rows, 8 groups) reads 144 KB a row from L2 against the plans' 34 KB of
// DRAM, over MF_MAX_L2_PER_DRAM.
static void test_monarch_btt_declined(int din, int dout, int nb, int sk, int want_fwd, int want_bwd) {
    MonarchShape m;
    BTTShape b;
    monarch_shape(&m, din, dout, nb);
    st_set_kernels(sk);
    const int fwd = monarch_btt_pays(&b, &m, 0), bwd = monarch_btt_pays(&b, &m, 1), mf = monarch_fused_fwd_pays(&m, btt_fused_smem_limit());
    st_set_kernels(0);
    check_true(monarch_btt_shape(&b, &m) && fwd == want_fwd && bwd == want_bwd && mf,
               nm("monarch %d->%d nb=%d -sk %d (a BTT of rank %d): the BTT kernels %s the forward, %s the backward", din, dout, nb, sk, m.q / nb,
                  want_fwd ? "take" : "decline", want_bwd ? "take" : "decline"),
               "the other way");
}

// -at 1's question, whether -sk 2 runs a Monarch layer on the BTT kernels both ways, asked under
// other flags (set by hand, as some tests set them): the answers, and the flags left as they were.
static void test_monarch_btt_candidate(void) {
    MonarchShape a, b, c;
    monarch_shape(&a, 1024, 4096, 32);  // rank 1: both ways
    monarch_shape(&b, 768, 3072, 4);    // rank 48: neither (staging)
    monarch_shape(&c, 1024, 4096, 8);   // rank 16: the forward only (traffic bound)
    g_st_sk = 0; g_st_fused = 1; g_st_zt = 0; g_btt_wstage = 0; g_btt_mma = 1;
    const int ra = monarch_btt_candidate(&a), rb = monarch_btt_candidate(&b), rc = monarch_btt_candidate(&c);
    const int kept = g_st_sk == 0 && g_st_fused == 1 && g_st_zt == 0 && g_btt_wstage == 0 && g_btt_mma == 1;
    st_set_kernels(0);
    check_true(ra && !rb && !rc && kept, "monarch_btt_candidate: 1024 -> 4096 in 32 blocks yes, 768 -> 3072 in 4 and 1024 -> 4096 in 8 no; flags kept",
               "another answer, or flags changed");
}

static void check_ratio(double got, double want, const char *name) {  // to 0.005
    const float g = (float)got, w = (float)want;
    check_close(&g, &w, 1, 0.005f, 0.0f, name);
}

// The fused Monarch kernels' traffic model (monarch_fused.cuh) against figures worked out by hand
// for an H100's 227 KB (each call's comment), and the dispatch following it: at a declined shape
// monarch_*_gpu run the baseline even with -sk 1, and the fused kernels with g_monarch_fused_force.
static void test_monarch_traffic(int din, int dout, int nb, double want_fwd_ratio, int want_fwd, double want_bwd_ratio, int want_bwd) {
    MonarchShape m;
    monarch_shape(&m, din, dout, nb);
    const size_t lim = 227 * 1024;
    char tag[128];
    snprintf(tag, sizeof(tag), "monarch traffic model %d->%d nb=%d", din, dout, nb);
    MfGeom fg;
    const int tm = monarch_fused_supported(&m, lim);
    const double fr = tm && mf_geom(&fg, &m, tm) ? mf_l2_bytes_per_row(&fg) / monarch_baseline_bytes_per_row(&m, 0) : -1.0;
    check_ratio(fr, want_fwd_ratio, nm("%s: forward L2 / baseline DRAM bytes per row", tag));
    check_true(monarch_fused_fwd_pays(&m, lim) == want_fwd, nm("%s: the forward %s", tag, want_fwd ? "pays" : "is declined"), "the other way");
    MbGeom bg;
    const double br = monarch_fused_bwd_choose(&bg, &m, lim) ? mb_l2_bytes_per_row(&bg) / monarch_baseline_bytes_per_row(&m, 1) : -1.0;
    check_ratio(br, want_bwd_ratio, nm("%s: backward L2 / baseline DRAM bytes per row", tag));
    check_true(br > 0 && monarch_fused_bwd_pays(&bg, &m) == want_bwd, nm("%s: the backward %s", tag, want_bwd ? "pays" : "is declined"),
               "the other way");
}

// A declined shape through the dispatch: the baseline with -sk 1, the fused kernel when forced.
static void test_monarch_declined_dispatch() {
    MonarchShape m;
    monarch_shape(&m, 2048, 8192, 4);
    const int N = 16;
    Dev d;
    floatX *x_d = d.add(up_bf16(rand_bf16((size_t)N * 2048, 1.0f))), *dy_d = d.add(up_bf16(rand_bf16((size_t)N * 8192, 1.0f)));
    floatX *R_d = d.add(up_bf16(rand_bf16(monarch_r_size(&m), 0.05f))), *L_d = d.add(up_bf16(rand_bf16(monarch_l_size(&m), 0.05f)));
    floatX *u_d = d.add(dev_alloc<floatX>(monarch_u_size(&m, N))), *dx_d = d.add(dev_alloc<floatX>((size_t)N * 2048));
    floatX *dR_d = d.add(up_bf16(Vec(monarch_r_size(&m), 0.0f))), *dL_d = d.add(up_bf16(Vec(monarch_l_size(&m), 0.0f)));
    floatX *s_d = d.add(dev_alloc<floatX>(monarch_gpu_scratch_elems(&m, N)));
    cudaCheck(cudaMemset(u_d, 0, monarch_u_size(&m, N) * sizeof(floatX)));
    g_st_fused = 1;
    check_true(monarch_backward_gpu(dx_d, dR_d, dL_d, NULL, dy_d, x_d, u_d, R_d, L_d, N, &m, s_d, NULL) == 0,
               "monarch 2048->8192 nb=4 with -sk 1: the declined backward runs the baseline", "it ran the fused kernel");
    g_monarch_fused_force = 1;
    check_true(monarch_backward_gpu(dx_d, dR_d, dL_d, NULL, dy_d, x_d, u_d, R_d, L_d, N, &m, s_d, NULL) == 1,
               "monarch 2048->8192 nb=4 with -sk 1, forced: the fused backward runs", "it ran the baseline");
    g_monarch_fused_force = 0;
    g_st_fused = 0;
}

// monarch_fused.cuh's backward kernel itself, with shared memory limited to smem_limit bytes (and
// whole_tile: g_monarch_bwd_whole_tile) so that it chooses the geometry want_tm, want_G (worked out
// by hand from the traffic model in each call's comment): dyt (exactly dy permuted), du and dx
// against monarch.h's backward, whose scratch holds the same dyt and du; rows past N untouched;
// with dx = NULL, du and dyt alone.
static void test_monarch_fused_backward(int N, int din, int dout, int nb, size_t smem_limit, int want_tm, int want_G, int whole_tile = 0) {
    MonarchShape m;
    monarch_shape(&m, din, dout, nb);
    char tag[200];
    snprintf(tag, sizeof(tag), "fused monarch backward %d->%d nb=%d N=%d, %zu bytes of shared memory%s", din, dout, nb, N, smem_limit,
             whole_tile ? ", whole-tile rule" : "");
    MbGeom g;
    g_monarch_bwd_whole_tile = whole_tile;  // for the launches below too (they choose again); reset at the end
    const int chose = monarch_fused_bwd_choose(&g, &m, smem_limit);
    if (!check_true(chose && g.tm == want_tm && g.G == want_G,
                    nm("%s: tile rows %d, groups of %d blocks", tag, want_tm, want_G), "another geometry (or none) was chosen"))
        return;
    const size_t urow = monarch_u_row(&m);
    Vec x = rand_bf16((size_t)N * din, 1.0f), R = rand_bf16(monarch_r_size(&m), 1.0f / sqrtf((float)m.p)),
        L = rand_bf16(monarch_l_size(&m), 1.0f / sqrtf((float)m.q)), dy = rand_bf16((size_t)N * dout, 1.0f);
    Vec y((size_t)N * dout), u(monarch_u_size(&m, N)), dx((size_t)N * din), dR(R.size(), 0.0f), dL(L.size(), 0.0f),
        scr(monarch_scratch_size(&m, N));
    monarch_forward(y.data(), u.data(), x.data(), R.data(), L.data(), NULL, N, &m);
    monarch_backward(dx.data(), dR.data(), dL.data(), NULL, dy.data(), x.data(), u.data(), R.data(), L.data(), N, &m, scr.data());
    // the CPU backward's scratch (monarch.h): the dR, dL contributions, then dyt and du of its last
    // chunk of rows, here all N rows (N is below a chunk)
    if (!check_true((size_t)N <= (size_t)monarch_chunk_rows(&m), nm("%s: N within one CPU chunk of rows", tag),
                    "the CPU scratch holds only the last chunk's dyt and du"))
        return;
    const auto rows0 = scr.begin() + (long)(monarch_r_size(&m) + monarch_l_size(&m));
    const Vec dyt(rows0, rows0 + (long)N * dout), du(rows0 + (long)N * dout, rows0 + (long)N * (dout + urow));
    Dev d;
    const int pad = 40;  // rows past N: must stay NaN
    floatX *dy_d = d.add(up_bf16(dy)), *R_d = d.add(up_bf16(R)), *L_d = d.add(up_bf16(L));
    floatX *dx_d = d.add(dev_alloc<floatX>((size_t)(N + pad) * din)), *du_d = d.add(dev_alloc<floatX>((N + pad) * urow)),
           *dyt_d = d.add(dev_alloc<floatX>((size_t)(N + pad) * dout));
    for (int with_dx = 1; with_dx >= 0; with_dx--) {
        cudaCheck(cudaMemset(dx_d, 0xFF, (size_t)(N + pad) * din * sizeof(floatX)));
        cudaCheck(cudaMemset(du_d, 0xFF, (N + pad) * urow * sizeof(floatX)));
        cudaCheck(cudaMemset(dyt_d, 0xFF, (size_t)(N + pad) * dout * sizeof(floatX)));
        check_true(monarch_backward_fused(with_dx ? dx_d : NULL, du_d, dyt_d, dy_d, R_d, L_d, N, &m, smem_limit) == 1,
                   nm("%s%s: launched", tag, with_dx ? "" : ", dx = NULL"), "refused");
        Vec gyt = down_bf16(dyt_d, (size_t)(N + pad) * dout), gu = down_bf16(du_d, (N + pad) * urow), gx = down_bf16(dx_d, (size_t)(N + pad) * din);
        check_close(gyt.data(), dyt.data(), dyt.size(), 0.0f, 0.0f, nm("%s%s: dyt (dy permuted, exact)", tag, with_dx ? "" : ", dx = NULL"));
        check_scaled(Vec(gu.begin(), gu.begin() + du.size()), du, 1e-2f, 1e-2f, nm("%s%s: du", tag, with_dx ? "" : ", dx = NULL"));
        if (with_dx) check_scaled(Vec(gx.begin(), gx.begin() + dx.size()), dx, 2e-2f, 0.0f, nm("%s: dx", tag));
        bool untouched = true;
        for (size_t i = (size_t)N * dout; i < gyt.size(); i++) untouched &= std::isnan(gyt[i]);
        for (size_t i = (size_t)N * urow; i < gu.size(); i++) untouched &= std::isnan(gu[i]);
        for (size_t i = with_dx ? (size_t)N * din : 0; i < gx.size(); i++) untouched &= std::isnan(gx[i]);
        check_true(untouched, nm("%s%s: nothing written past row N%s", tag, with_dx ? "" : ", dx = NULL", with_dx ? "" : " (dx not at all)"),
                   "it was");
    }
    g_monarch_bwd_whole_tile = 0;
}

// The fc layer's GELU and every layer's bias in a structured layer's last op (the plans'
// epilogues: cuBLASLt's on BTT's last GEMM, the output permute's on Monarch's, the combine on
// BTT-MoE's), against the same layer without them followed by the separate kernels: forward
// pre = layer(x) + b and y = GELU(pre); backward dx times GELU' of a given pre-activation. refuse:
// cuBLASLt finds no algorithm for these epilogues (the fallback kernel runs instead).
static void test_structured_gelu(int kind, int N, unsigned refuse, const char *why) {
    const int din = 48, dout = 192;
    BTTShape bs;
    MonarchShape ms;
    MoEShape es;
    btt_shape(&bs, 4, 12, 8, 24, 2);
    monarch_shape(&ms, din, dout, 4);
    moe_shape(&es, 4, 12, 8, 24, 4, 2);
    const char *names[3] = {"btt r2", "monarch 4 blocks", "btt_moe 4/top-2"};
    char tag[160];
    snprintf(tag, sizeof(tag), "%s %d->%d N=%d, GELU and bias on the way out%s", names[kind], din, dout, N, why);
    size_t n0 = kind == 0 ? btt_w0_size(&bs) : kind == 1 ? monarch_r_size(&ms) : btt_w0_size(&es.btt);
    size_t n1 = kind == 0 ? btt_w1_size(&bs) : kind == 1 ? monarch_l_size(&ms) : btt_w1_size(&es.btt);
    Dev d;
    floatX *x_d = d.add(up_bf16(rand_bf16((size_t)N * din, 1.0f))), *W0_d = d.add(up_bf16(rand_bf16(n0, 0.3f))),
           *W1_d = d.add(up_bf16(rand_bf16(n1, 0.2f))), *R_d = d.add(up_bf16(rand_bf16(moe_router_size(&es), 0.3f))),
           *b_d = d.add(up_bf16(rand_bf16(dout, 0.5f))), *dy_d = d.add(up_bf16(rand_bf16((size_t)N * dout, 1.0f)));
    Vec pre_in = rand_bf16((size_t)N * din, 1.0f);
    floatX *pin_d = d.add(up_bf16(pre_in));
    floatX *y_d = d.add(dev_alloc<floatX>((size_t)N * dout)), *out_d = d.add(dev_alloc<floatX>((size_t)N * dout)),
           *pre_d = d.add(dev_alloc<floatX>((size_t)N * dout)), *dx_d = d.add(dev_alloc<floatX>((size_t)N * din)),
           *dxg_d = d.add(dev_alloc<floatX>((size_t)N * din));
    floatX *g0 = d.add(up_bf16(Vec(n0, 0.0f))), *g1 = d.add(up_bf16(Vec(n1, 0.0f))), *gr = d.add(up_bf16(Vec(moe_router_size(&es), 0.0f)));
    float *col = d.add(dev_alloc<float>(column_sums_scratch_floats(dout)));
    const size_t zsz = kind == 0 ? btt_z_size(&bs, N) : monarch_u_size(&ms, N);
    floatX *z_d = d.add(dev_alloc<floatX>(zsz ? zsz : 1));
    const size_t scr = kind == 0 ? btt_gpu_scratch_elems(&bs, N) : monarch_gpu_scratch_elems(&ms, N);
    floatX *s_d = d.add(dev_alloc<floatX>(kind == 2 ? moe_gpu_scratch_elems(&es, N) : scr));
    float *f_d = d.add(dev_alloc<float>(kind == 2 ? moe_gpu_scratch_floats(&es, N) : 1));
    MoEGPUState gst;
    memset(&gst, 0, sizeof(gst));
    MoEGPUScratch sc;
    if (kind == 2) {
        moe_gpu_state_alloc(&gst, &es, N, "test");
        cudaCheck(cudaMemset(gst.fhat, 0, 4 * sizeof(float)));
        moe_gpu_scratch_bind(&sc, &gst, &es, N, s_d, f_d);
    }
    sim_cublaslt_refuse_epilogues = refuse;
    for (int with = 0; with <= 1; with++) {  // 0: plain (the reference), 1: with the pre-activations
        floatX *y = with ? out_d : y_d, *pre = with ? pre_d : NULL, *dx = with ? dx_d : dxg_d;
        const floatX *pin = with ? pin_d : NULL;
        if (kind == 0) {
            btt_forward_gpu(y, z_d, x_d, W0_d, W1_d, b_d, N, &bs, s_d, pre);
            btt_backward_gpu(dx, g0, g1, NULL, dy_d, x_d, z_d, W0_d, W1_d, N, &bs, s_d, col, pin);
        } else if (kind == 1) {
            monarch_forward_gpu(y, z_d, x_d, W0_d, W1_d, b_d, N, &ms, s_d, pre);
            monarch_backward_gpu(dx, g0, g1, NULL, dy_d, x_d, z_d, W0_d, W1_d, N, &ms, s_d, col, pin);
        } else {
            moe_forward_gpu(y, &gst, &sc, x_d, W0_d, W1_d, R_d, b_d, N, &es, pre);
            moe_backward_gpu(dx, g0, g1, gr, NULL, dy_d, 0.0f, x_d, &gst, &sc, W0_d, W1_d, R_d, &es, col, pin);
        }
    }
    sim_cublaslt_refuse_epilogues = 0;
    Vec y = down_bf16(y_d, (size_t)N * dout), out = down_bf16(out_d, (size_t)N * dout), pre = down_bf16(pre_d, (size_t)N * dout);
    Vec dxp = down_bf16(dxg_d, (size_t)N * din), dx = down_bf16(dx_d, (size_t)N * din), gy(y.size()), gdx(dx.size());
    for (size_t i = 0; i < y.size(); i++) gy[i] = (float)(0.5 * y[i] * (1.0 + tanh(0.7978845608028654 * (y[i] + 0.044715 * y[i] * y[i] * y[i]))));
    for (size_t i = 0; i < dx.size(); i++) {
        const double v = pre_in[i], th = tanh(0.7978845608028654 * (v + 0.044715 * v * v * v));
        gdx[i] = (float)(dxp[i] * (0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v)));
    }
    check_scaled(pre, y, 1e-2f, 0.0f, nm("%s: pre-activation = the plain layer's output", tag));
    check_scaled(out, gy, 1e-2f, 0.0f, nm("%s: y = GELU(pre)", tag));
    check_scaled(dx, gdx, 1e-2f, 0.0f, nm("%s: dx = plain dx times GELU'(pre)", tag));
    if (kind == 2) moe_gpu_state_free(&gst);
}

// The CPU's grouping of the selections sel (pairs p) by expert: expert e's pairs ascending at
// order[offsets[e] ...], then -1 up to a whole tile of T rows; pos the inverse; counts; each tile's expert.
static void cpu_group(const std::vector<int> &sel, int E, int T, std::vector<int> &counts, std::vector<int> &order, std::vector<int> &pos,
                      std::vector<int> &offsets, std::vector<int> &tile_expert) {
    const int NK = (int)sel.size();
    counts.assign(E, 0), order.clear(), pos.assign(NK, 0), offsets.assign(E + 1, 0), tile_expert.clear();
    for (int e = 0; e < E; e++) {
        offsets[e] = (int)order.size();
        for (int p = 0; p < NK; p++)
            if (sel[p] == e) { pos[p] = (int)order.size(); order.push_back(p); counts[e]++; }
        while (order.size() % T) order.push_back(-1);
        while (tile_expert.size() < order.size() / T) tile_expert.push_back(e);
    }
    offsets[E] = (int)order.size();
}

// moe_group.cuh's counting sort on NK selections (experts 0..E-1; a share `hot` of them expert
// E - 1) in chunks of 32·steps pairs, against the CPU's: every entry of order (with the -1
// padding), pos, counts, offsets and the tile table exact, on outputs filled with a sentinel; and
// the same bits again (a second run on the sentinel).
static void test_moe_group(int NK, int E, int T, int steps, double hot, const char *what) {
    std::vector<int> sel(NK);
    for (int p = 0; p < NK; p++) sel[p] = urand() < hot ? E - 1 : (int)(urand() * E) % E;
    std::vector<int> rc, ro, rp, roff, rte;
    cpu_group(sel, E, T, rc, ro, rp, roff, rte);
    const int rows = moe_max_tiles(NK, E, T) * T;
    check_true((int)ro.size() <= rows, nm("moe_group %s: the CPU's rows within moe_max_tiles", what), "more rows");
    int *sel_d = up(sel), *order = dev_alloc<int>(rows), *pos = dev_alloc<int>(NK), *counts = dev_alloc<int>(E),
        *offsets = dev_alloc<int>(E + 1), *te = dev_alloc<int>(rows / T), *scr = dev_alloc<int>(moe_group_scratch_ints(NK, E, steps));
    std::vector<int> o1, p1;
    for (int run = 0; run < 2; run++) {
        cudaCheck(cudaMemset(order, 0x7F, (size_t)rows * sizeof(int)));
        cudaCheck(cudaMemset(pos, 0x7F, (size_t)NK * sizeof(int)));
        cudaCheck(cudaMemset(counts, 0x7F, (size_t)E * sizeof(int)));
        cudaCheck(cudaMemset(offsets, 0x7F, (size_t)(E + 1) * sizeof(int)));
        cudaCheck(cudaMemset(te, 0x7F, (size_t)(rows / T) * sizeof(int)));
        moe_group_gpu(order, pos, counts, offsets, te, scr, sel_d, NK, E, T, steps);
        std::vector<int> go = down(order, ro.size()), gp = down(pos, NK);
        if (run == 1) {
            check_same(go, o1, nm("moe_group %s: order the same bits on a second run", what));
            check_same(gp, p1, nm("moe_group %s: pos the same bits on a second run", what));
            break;
        }
        o1 = go, p1 = gp;
        char why[160];
        snprintf(why, sizeof why, "%d chunks of %d pairs", moe_group_chunks(NK, steps), 32 * steps);
        check_same(down(counts, E), rc, nm("moe_group %s: counts (%s)", what, why));
        check_same(down(offsets, E + 1), roff, nm("moe_group %s: offsets", what));
        check_same(go, ro, nm("moe_group %s: order, -1 in %d padding rows", what, (int)ro.size() - NK));
        check_same(gp, rp, nm("moe_group %s: pos", what));
        check_same(down(te, rte.size()), rte, nm("moe_group %s: tile table (%zu tiles of %d rows)", what, rte.size(), T));
    }
    for (int *p : {sel_d, order, pos, counts, offsets, te, scr}) cudaCheck(cudaFree(p));
}

// moe_gate_backward_t_kernel (-sk 0's gate step) on `rows` grouped rows of a (G, P, R) z, the
// first `in_use` of them in use, every 5th a padding row, with max_bytes of shared memory (gc
// gammas a chunk, 0: straight): t1 = gate·dZu moved to (gamma, phi, rho) and t2 = gate·z exactly
// (the same fp32 product, one bf16 rounding), zeros in padding rows, rows past in_use untouched;
// dgate = <z, dZu> within 1e-5 relative (fp32 sums in another order); z unchanged.
// sets (the set path, R = k experts a row): row w is token order[w] with its own gate per
// component (a shuffled kof), z saved gated: t1 as above with each component's gate, t2 untouched,
// dgate of each (token, k) = <z_j, dZu_j> / its gate (0 for a gate of 0, given to one token).
static void test_moe_gate_t(int G, int P, int R, int rows, int in_use, size_t max_bytes, int want_gc, int sets = 0) {
    const int zrow = G * P * R, gc = moe_gate_t_chunk(G, P, R, max_bytes);
    char what[160];
    snprintf(what, sizeof what, "moe gate step (-sk 0%s) G%d P%d R%d, %d of %d rows, %zu bytes: %d gammas a chunk", sets ? ", by set" : "", G, P,
             R, in_use, rows, max_bytes, gc);
    check_true(gc == want_gc, nm("%s: the chunk as worked out by hand (%d)", what, want_gc), "differs");
    const Vec z = rand_bf16((size_t)rows * zrow, 1.0f), dzu = rand_bf16((size_t)rows * zrow, 1.0f);
    const int ng = sets ? R : 1;  // gates a row
    std::vector<int> order(rows), kof((size_t)rows * R);
    std::vector<float> gate((size_t)rows * ng);
    for (int w = 0; w < rows; w++) {
        order[w] = w % 5 == 4 ? -1 : rows - 1 - w;
        for (int j = 0; j < ng; j++) gate[(size_t)w * ng + j] = 0.1f + (float)urand();
        for (int j = 0; j < R; j++) kof[(size_t)w * R + j] = (j + w) % R;  // component j is the token's selection (j + w) % R
    }
    if (sets) gate[(size_t)(rows - 1) * ng + 1] = 0.0f;  // token rows - 1 (row 0): a gate of 0
    MoEGPUState st = {};
    int *order_d = up(order), *offs = up(std::vector<int>{0, in_use}), *kof_d = up(kof);  // offsets[E = 1]: the rows in use
    st.order = order_d, st.offsets = offs;
    float *gate_d = up(gate), *dgate = up(std::vector<float>(gate.size(), -7.0f));
    st.gate = gate_d;
    floatX *z_d = up_bf16(z), *t2 = up_bf16(dzu), *t1 = up_bf16(Vec((size_t)rows * zrow, 3.0f));
    BTTShape b = {};
    b.gamma = G, b.phi = P, b.rank = R;
    moe_gate_backward_t(dgate, t1, t2, z_d, &st, 1, rows, &b, max_bytes, sets ? kof_d : NULL, sets);
    const Vec g1 = down_bf16(t1, (size_t)rows * zrow), g2 = down_bf16(t2, (size_t)rows * zrow), gz = down_bf16(z_d, (size_t)rows * zrow);
    const std::vector<float> gd = down(dgate, gate.size());
    Vec r1((size_t)rows * zrow), r2((size_t)rows * zrow);
    std::vector<float> rd(gate.size(), -7.0f);
    for (int w = 0; w < rows; w++) {
        const size_t o = (size_t)w * zrow;
        if (w >= in_use) {
            for (int i = 0; i < zrow; i++) r1[o + i] = 3.0f, r2[o + i] = dzu[o + i];
            continue;
        }
        const int p = order[w];
        double dot[8] = {0};
        auto pair = [&](int s) { return sets ? p * R + kof[(size_t)p * R + s] : p; };  // the (token, k) of component s
        auto g_of = [&](int s) { return p >= 0 ? gate[pair(s)] : 0.0f; };
        for (int f = 0; f < P; f++)
            for (int gg = 0; gg < G; gg++)
                for (int s = 0; s < R; s++) {
                    const size_t src = o + ((size_t)f * G + gg) * R + s, dst = o + ((size_t)gg * P + f) * R + s;
                    r1[dst] = bfr(g_of(sets ? s : 0) * dzu[src]);
                    dot[sets ? s : 0] += (double)z[src] * dzu[src];
                }
        for (int i = 0; i < zrow; i++) r2[o + i] = sets && p >= 0 ? dzu[o + i] : bfr(g_of(0) * z[o + i]);  // padding rows: zeros
        if (p >= 0)
            for (int s = 0; s < ng; s++) rd[pair(s)] = sets ? (g_of(s) != 0.0f ? (float)(dot[s] / g_of(s)) : 0.0f) : (float)dot[0];
    }
    check_close(g1.data(), r1.data(), r1.size(), 0.0f, 0.0f, nm("%s: t1 = gate·dZu in (gamma, phi, rho), exact", what));
    check_close(g2.data(), r2.data(), r2.size(), 0.0f, 0.0f, nm(sets ? "%s: t2 untouched (the saved z is gated), padding rows zero" : "%s: t2 = gate·z, exact", what));
    check_close(gz.data(), z.data(), z.size(), 0.0f, 0.0f, nm("%s: the saved z unchanged", what));
    check_close(gd.data(), rd.data(), rd.size(), 1e-5f, 1e-5f,
                nm(sets ? "%s: dgate of each (token, k) = <z_j, dZu_j> / its gate, 0 for a gate of 0" : "%s: dgate = <z, dZu>", what));
    for (void *p : {(void *)order_d, (void *)offs, (void *)kof_d, (void *)gate_d, (void *)dgate, (void *)z_d, (void *)t1, (void *)t2})
        cudaCheck(cudaFree(p));
}

// fused: the experts as one segmented launch of btt_fused.cuh (-sk 1), which the shape must
// support; 2: the forward fused, the backward on the tiled plans, with the saved z poisoned (NaN)
// before the forward: the fused forward leaves the padding rows, which the tiled weight gradients
// sum over, unwritten.
// sets: grouped by set of experts (-mg 1; with fused, on the fused kernels both ways): the same
// checks against the CPU layer, but not of the grouping by expert.
static void test_moe(int N, int alpha, int gamma, int phi, int eps, int E, int K, int fused = 0, int sets = 0) {
    MoEShape s;
    moe_shape(&s, alpha, gamma, phi, eps, E, K);
    g_st_fused = fused != 0;
    if (fused) {
        const BTTShape b1 = moe_expert_shape(&s);
        check_true(btt_fused_supported(&b1, btt_fused_smem_limit()) > 0, nm("btt_moe E=%d: the fused kernel supports the expert shape", E),
                   "it does not: the test would check the cuBLAS path");
    }
    const int din = s.btt.d_in, dout = s.btt.d_out, NK = N * K;
    Vec x = rand_bf16((size_t)N * din, 1.0f), W0 = rand_bf16(btt_w0_size(&s.btt), 1.0f / sqrtf((float)alpha)),
        W1 = rand_bf16(btt_w1_size(&s.btt), 1.0f / sqrtf((float)gamma)), R = rand_bf16(moe_router_size(&s), 2.0f / sqrtf((float)din)),
        bias = rand_bf16(dout, 0.1f), dy = rand_bf16((size_t)N * dout, 1.0f);
    const float daux = 0.05f;
    MoEState st;
    moe_state_alloc(&st, &s, N);
    Vec y((size_t)N * dout), dx((size_t)N * din), dW0(W0.size(), 0.0f), dW1(W1.size(), 0.0f), dR(R.size(), 0.0f), db(dout, 0.0f),
        scr(moe_scratch_size(&s, N));
    moe_forward(y.data(), &st, x.data(), W0.data(), W1.data(), R.data(), bias.data(), N, &s);
    const MoERouting rref = moe_aux_loss(&st, N, &s);
    const float aux_ref = rref.aux;
    moe_backward(dx.data(), dW0.data(), dW1.data(), dR.data(), db.data(), dy.data(), daux, x.data(), &st, W0.data(), W1.data(), R.data(), N, &s,
                 scr.data());
    Dev d;
    floatX *x_d = d.add(up_bf16(x)), *W0_d = d.add(up_bf16(W0)), *W1_d = d.add(up_bf16(W1)), *R_d = d.add(up_bf16(R)), *b_d = d.add(up_bf16(bias)),
           *dy_d = d.add(up_bf16(dy));
    floatX *y_d = d.add(dev_alloc<floatX>((size_t)N * dout)), *dx_d = d.add(dev_alloc<floatX>((size_t)N * din));
    floatX *dW0_d = d.add(up_bf16(Vec(W0.size(), 0.0f))), *dW1_d = d.add(up_bf16(Vec(W1.size(), 0.0f))), *dR_d = d.add(up_bf16(Vec(R.size(), 0.0f))),
           *db_d = d.add(up_bf16(Vec(dout, 0.0f)));
    float *col = d.add(dev_alloc<float>(column_sums_scratch_floats(dout)));
    MoEGPUState gst;
    memset(&gst, 0, sizeof(gst));
    g_moe_sets = sets;
    moe_gpu_state_alloc(&gst, &s, N, "test");
    floatX *s_d = d.add(dev_alloc<floatX>(moe_gpu_scratch_elems(&s, N)));
    float *f_d = d.add(dev_alloc<float>(moe_gpu_scratch_floats(&s, N)));
    g_moe_sets = 0;
    MoEGPUScratch sc;
    moe_gpu_scratch_bind(&sc, &gst, &s, N, s_d, f_d);
    MoERouting *aux_d = d.add(dev_alloc<MoERouting>(1));
    const long sruns0 = g_moe_sets_runs, sfwd0 = g_moe_sets_fused_runs, sbwd0 = g_moe_sets_fused_bwd_runs;
    if (fused == 2)  // NaN over z's grouped rows: what the fused forward leaves unwritten (padding rows) the tiled backward must not take in
        cudaCheck(cudaMemset(gst.z, 0xFF, (sets ? moe_grouped_rows(N, gst.S, gst.set_tile_rows) * moe_z_row(&s) * K
                                                : moe_grouped_rows(NK, E, gst.tile_rows) * moe_z_row(&s)) * sizeof(floatX)));
    const unsigned long waits0 = g_sim_full_waits;
    moe_forward_gpu(y_d, &gst, &sc, x_d, W0_d, W1_d, R_d, b_d, N, &s);
    moe_aux_stats_gpu(&gst, &s);
    moe_aux_finish_gpu(&gst, N, &s, aux_d);  // on the device: aux and f̂ without a host round trip
    const unsigned long fwd_waits = g_sim_full_waits - waits0;
    const MoERouting rgpu = down(aux_d, 1)[0];
    const float aux = rgpu.aux;
    char tag[160];
    snprintf(tag, sizeof(tag), "btt_moe %d->%d E=%d top-%d N=%d%s%s%s", din, dout, E, K, N, sets ? " by set" : "",
             fused == 1 ? " (fused segmented forward and backward)" : fused ? " (fused forward, tiled backward)" : "",
             g_btt_mma ? " on mma.sync (W0 staged, W1 packed)" : "");
    // routing: the GPU's selections from its own (bf16-input) logits, and the CPU's
    std::vector<float> lg = down(gst.logits, (size_t)N * E), gate = down(gst.gate, NK), lse = down(gst.lse, N);
    const int T = gst.tile_rows, rows = (int)moe_grouped_rows(NK, E, T);
    std::vector<int> sel = down(gst.sel, NK), pos = down(gst.pos, NK), counts = down(gst.counts, E), offsets = down(gst.offsets, E + 1),
                     tile_expert = down(gst.tile_expert, moe_max_tiles(NK, E, T));
    Vec lref((size_t)N * E);
    for (int t = 0; t < N; t++)
        for (int e = 0; e < E; e++) {
            double sacc = 0;
            for (int c = 0; c < din; c++) sacc += (double)x[(size_t)t * din + c] * R[(size_t)e * din + c];
            lref[(size_t)t * E + e] = (float)sacc;
        }
    check_close(lg.data(), lref.data(), lref.size(), 1e-4f, 1e-4f, nm("%s: router logits (fp32)", tag));
    int sel_ok = 1, gate_ok = 1;
    for (int t = 0; t < N; t++) {
        int rs[64];
        float rg[64], rl;
        st_moe_route_row(&lg[(size_t)t * E], E, K, NULL, rs, rg, &rl);
        for (int k = 0; k < K; k++) {
            sel_ok &= rs[k] == sel[(size_t)t * K + k];
            gate_ok &= fabsf(rg[k] - gate[(size_t)t * K + k]) <= 1e-6f && fabsf(rl - lse[t]) <= 1e-5f * (1 + fabsf(rl));
        }
    }
    check_true(sel_ok, nm("%s: top-k selections from the logits", tag), "differ");
    check_true(gate_ok, nm("%s: gates and logsumexp from the logits", tag), "differ");
    int same_as_cpu = 0;
    for (int i = 0; i < NK; i++) same_as_cpu += sel[i] == st.sel[i];
    check_true(same_as_cpu == NK, nm("%s: selections equal the CPU layer's (no near-ties in this draw)", tag), "differ");
    // grouping: as the CPU's (cpu_group); by set, each token's set instead
    if (sets) {
        const int S = moe_set_count(&s);
        std::vector<int> sid = down(gst.sid, N), gcounts = down(gst.counts, S);
        std::vector<int> want(S, 0);
        int sid_ok = 1;
        for (int t = 0; t < N; t++) {
            int c[MOE_SET_MAX_K];
            for (int k = 0; k < K; k++) c[k] = sel[(size_t)t * K + k];
            std::sort(c, c + K);
            const int q = moe_set_rank(c, K);
            sid_ok &= sid[t] == q;
            want[q]++;
        }
        check_true(sid_ok && gcounts == want, nm("%s: each token's set and the sets' counts (%d sets)", tag, S), "differ");
    }
    std::vector<int> rc, ro, rp, roff, rte;
    cpu_group(sel, E, T, rc, ro, rp, roff, rte);
    std::vector<int> order = down(gst.order, ro.size());
    tile_expert.resize(rte.size());
    if (!sets)
        check_true(counts == rc && offsets == roff && order == ro && pos == rp && tile_expert == rte && (int)ro.size() + T <= rows,
                   nm("%s: grouping (counts, offsets, order, pos, tiles of %d rows: %d of at most %d; %d pairs)", tag, T,
                      (int)rte.size(), moe_max_tiles(NK, E, T), NK),
                   "differs");
    check_close(&aux, &aux_ref, 1, 1e-4f, 1e-3f, nm("%s: aux loss", tag));
    {  // the routing report: the loads from the same counts as the CPU's (the grouping check above)
        const float got[3] = {rgpu.balance, rgpu.load_max, rgpu.load_min}, want[3] = {rref.balance, rref.load_max, rref.load_min};
        check_close(got, want, 3, 1e-4f, 1e-3f, nm("%s: routing report (balance %.4f, loads %.3f..%.3f)", tag, rgpu.balance, rgpu.load_min, rgpu.load_max));
    }
    check_close(down(gst.fhat, E).data(), st.fhat, E, 1e-6f, 0.0f, nm("%s: f-hat on the device (the aux gradient's)", tag));
    check_scaled(down_bf16(y_d, y.size()), y, 2e-2f, 0.0f, nm("%s: y", tag));
    const unsigned long waits1 = g_sim_full_waits;
    if (fused == 2) g_st_fused = 0;
    const int ran_fused = moe_backward_gpu(dx_d, dW0_d, dW1_d, dR_d, db_d, dy_d, daux, x_d, &gst, &sc, W0_d, W1_d, R_d, &s, col);
    const unsigned long bwd_waits = g_sim_full_waits - waits1;
    check_true(ran_fused == (fused == 1), nm("%s: the %s backward ran", tag, fused == 1 ? "fused segmented" : "cuBLAS"), "the other one ran");
    if (sets) {
        char runs[96];
        snprintf(runs, sizeof(runs), "%ld runs, %ld fused forwards, %ld fused backwards", g_moe_sets_runs - sruns0, g_moe_sets_fused_runs - sfwd0,
                 g_moe_sets_fused_bwd_runs - sbwd0);
        check_true(g_moe_sets_runs - sruns0 == 2 && g_moe_sets_fused_runs - sfwd0 == (fused != 0) && g_moe_sets_fused_bwd_runs - sbwd0 == (fused == 1),
                   nm("%s: the set path both ways, its forward fused%s", tag, fused == 1 ? ", its backward too" : fused ? " only" : " neither"), runs);
    }
    // the layer runs from the device's counts alone: the host never waits in its forward or backward
    char why[96];
    snprintf(why, sizeof(why), "%lu waits in the forward, %lu in the backward", fwd_waits, bwd_waits);
    check_true(fwd_waits == 0 && bwd_waits == 0, nm("%s: no host wait in the forward or the backward", tag), why);
    check_scaled(down_bf16(dx_d, dx.size()), dx, 2e-2f, 0.0f, nm("%s: dx", tag));
    check_scaled(down_bf16(dW0_d, dW0.size()), dW0, 2e-2f, 0.0f, nm("%s: dW0", tag));
    check_scaled(down_bf16(dW1_d, dW1.size()), dW1, 2e-2f, 0.0f, nm("%s: dW1", tag));
    check_scaled(down_bf16(dR_d, dR.size()), dR, 2e-2f, 0.0f, nm("%s: drouter", tag));
    check_scaled(down_bf16(db_d, db.size()), db, 2e-2f, 0.0f, nm("%s: dbias", tag));
    moe_gpu_state_free(&gst);
    moe_state_free(&st);
    g_st_fused = 0;
}

// separate q, k, v (structured.cuh): a column block of a (N, 3C) buffer to and from (N, C), and +=
static void test_qkv_parts(int N, int C) {
    Vec qkv = rand_bf16((size_t)N * 3 * C, 1.0f), part = rand_bf16((size_t)N * C, 1.0f), other = rand_bf16((size_t)N * C, 1.0f);
    Dev d;
    floatX *qkv_d = d.add(up_bf16(qkv)), *part_d = d.add(up_bf16(part)), *buf = d.add(dev_alloc<floatX>((size_t)N * C)), *o_d = d.add(up_bf16(other));
    int ok = 1;
    for (int r = 0; r < 3; r++) {
        qkv_part_copy(qkv_d, buf, r, N, C, 0);  // out of qkv
        Vec got = down_bf16(buf, (size_t)N * C);
        for (int i = 0; i < N; i++)
            for (int c = 0; c < C; c++) ok &= got[(size_t)i * C + c] == qkv[(size_t)i * 3 * C + r * C + c];
    }
    check_true(ok, nm("qkv_part_copy N=%d C=%d: q, k, v column blocks out of (N, 3C) (bit-exact)", N, C), "differs");
    qkv_part_copy(qkv_d, part_d, 1, N, C, 1);  // into the k block
    Vec got = down_bf16(qkv_d, qkv.size()), want = qkv;
    for (int i = 0; i < N; i++)
        for (int c = 0; c < C; c++) want[(size_t)i * 3 * C + C + c] = part[(size_t)i * C + c];
    check_same(got, want, nm("qkv_part_copy N=%d C=%d: into the k block, q and v untouched (bit-exact)", N, C));
    add_inplace(o_d, part_d, (size_t)N * C);
    Vec sum(other.size());
    for (size_t i = 0; i < sum.size(); i++) sum[i] = bfr(other[i] + part[i]);
    check_same(down_bf16(o_d, sum.size()), sum, nm("add_inplace n=%d (bit-exact)", N * C));
}

// The fused BTT forward (structured/btt_fused.cuh, dev/cuda only so far): against the CPU layer and
// against the cuBLAS baseline (btt_forward_gpu), with the tile rows forced when tm > 0; groups: the
// number of phi-block groups the geometry must have (0: any).
static void test_btt_fused(int N, int alpha, int gamma, int phi, int eps, int rank, int tm, int groups = 0) {
    BTTShape s;
    btt_shape(&s, alpha, gamma, phi, eps, rank);
    const int din = s.d_in, dout = s.d_out;
    Vec x = rand_bf16((size_t)N * din, 1.0f), W0 = rand_bf16(btt_w0_size(&s), 1.0f / sqrtf((float)alpha)),
        W1 = rand_bf16(btt_w1_size(&s), 1.0f / sqrtf((float)gamma * rank)), bias = rand_bf16(dout, 0.1f);
    Vec y((size_t)N * dout), z(btt_z_size(&s, N));
    btt_forward(y.data(), z.data(), x.data(), W0.data(), W1.data(), bias.data(), N, &s);
    Dev d;
    floatX *x_d = d.add(up_bf16(x)), *W0_d = d.add(up_bf16(W0)), *W1_d = d.add(up_bf16(W1)), *b_d = d.add(up_bf16(bias));
    floatX *y_d = d.add(dev_alloc<floatX>((size_t)N * dout)), *z_d = d.add(dev_alloc<floatX>(z.size())), *y2_d = d.add(dev_alloc<floatX>((size_t)N * dout)),
           *z2_d = d.add(dev_alloc<floatX>(z.size())), *s_d = d.add(dev_alloc<floatX>((size_t)N * plan_btt_scratch_row(&s)));
    BtGeom geo;
    const int chosen = btt_fused_geom(&geo, &s, btt_fused_smem_limit(), tm) ? geo.tm : 0;
    int ok = tm > 0 ? btt_forward_fused_tm(y_d, z_d, x_d, W0_d, W1_d, b_d, N, &s, tm) : btt_forward_fused(y_d, z_d, x_d, W0_d, W1_d, b_d, N, &s);
    char tag[160];
    snprintf(tag, sizeof(tag), "fused btt %d->%d (alpha %d gamma %d phi %d eps %d rank %d) N=%d tm %d, %d group(s)", din, dout, alpha, gamma, phi, eps,
             rank, N, chosen, chosen ? geo.npg : 0);
    if (!check_true(ok, nm("%s: supported and launched", tag), "btt_forward_fused returned 0")) return;
    if (groups) check_true(geo.npg == groups, nm("%s: in %d groups", tag, groups), "the geometry differs");
    btt_forward_gpu(y2_d, z2_d, x_d, W0_d, W1_d, b_d, N, &s, s_d);
    Vec yf = down_bf16(y_d, y.size()), zf = down_bf16(z_d, z.size());
    check_scaled(yf, y, 2e-2f, 0.0f, nm("%s: y vs the CPU layer", tag));
    check_scaled(zf, z, 2e-2f, 0.0f, nm("%s: saved z vs the CPU layer", tag));
    check_scaled(yf, down_bf16(y2_d, y.size()), 1e-2f, 1e-2f, nm("%s: y vs the cuBLAS baseline", tag));
    check_scaled(zf, down_bf16(z2_d, z.size()), 1e-2f, 1e-2f, nm("%s: z vs the cuBLAS baseline", tag));
    // without z and bias
    floatX *y3_d = d.add(dev_alloc<floatX>((size_t)N * dout));
    Vec ynb = y;
    for (int r = 0; r < N; r++)
        for (int o = 0; o < dout; o++) ynb[(size_t)r * dout + o] -= bias[o];
    tm > 0 ? btt_forward_fused_tm(y3_d, NULL, x_d, W0_d, W1_d, NULL, N, &s, tm) : btt_forward_fused(y3_d, NULL, x_d, W0_d, W1_d, NULL, N, &s);
    check_scaled(down_bf16(y3_d, y.size()), ynb, 2e-2f, 0.0f, nm("%s: y without z and bias", tag));
}

// Stages 1 and 2 on mma.sync (g_btt_mma, with W0 staged; stage 2 on W1 packed in fragment order):
// the whole kernel and stage 1 alone (btt_stage1_fused) against the CPU layer and against the
// same kernel on wmma. tm > 0: at those tile rows, where mma_groups > 0 says in how many groups of
// output blocks the mma.sync geometry (no staging tile) runs and wmma_groups the wmma one's.
static void test_btt_fused_mma(int N, int alpha, int gamma, int phi, int eps, int rank, int tm = 0, int mma_groups = 0, int wmma_groups = 0) {
    const BttRef c(N, alpha, gamma, phi, eps, rank);
    const BTTShape &s = c.s;
    const Vec &y = c.y, &z = c.z;
    const int din = s.d_in, dout = s.d_out;
    Dev d;
    floatX *x_d = d.add(up_bf16(c.x)), *W0_d = d.add(up_bf16(c.W0)), *W1_d = d.add(up_bf16(c.W1)), *b_d = d.add(up_bf16(c.bias));
    floatX *y_d[2], *z_d[2], *z1_d = d.add(dev_alloc<floatX>(z.size()));
    int groups[2];
    g_btt_wstage = 1;
    int ok = 1;
    for (int mma = 0; mma < 2; mma++) {
        y_d[mma] = d.add(dev_alloc<floatX>(y.size()));
        z_d[mma] = d.add(dev_alloc<floatX>(z.size()));
        g_btt_mma = mma;
        BtGeom g;
        groups[mma] = btt_fused_geom(&g, &s, btt_fused_smem_limit(), tm) ? g.npg : 0;
        ok &= btt_forward_fused_tm(y_d[mma], z_d[mma], x_d, W0_d, W1_d, b_d, N, &s, tm);
    }
    ok &= btt_stage1_fused(z1_d, x_d, 0, W0_d, N, &s, tm);  // still with mma
    g_btt_mma = 0;
    g_btt_wstage = 0;
    char tag[192], rows[16] = "", got[48];
    if (tm) snprintf(rows, sizeof(rows), " tm %d", tm);
    snprintf(tag, sizeof(tag), "fused btt on mma.sync, %d->%d (alpha %d gamma %d phi %d eps %d rank %d) N=%d%s", din, dout, alpha, gamma, phi,
             eps, rank, N, rows);
    if (!check_true(ok, nm("%s: supported and launched", tag), "btt_forward_fused or btt_stage1_fused returned 0")) return;
    snprintf(got, sizeof(got), "%d and %d", groups[1], groups[0]);
    if (mma_groups)
        check_true(groups[1] == mma_groups && groups[0] == wmma_groups,
                   nm("%s: %d group(s) of output blocks on mma.sync (no staging tile), %d on wmma", tag, mma_groups, wmma_groups), got);
    Vec yf = down_bf16(y_d[1], y.size()), zf = down_bf16(z_d[1], z.size());
    check_scaled(yf, y, 2e-2f, 0.0f, nm("%s: y vs the CPU layer", tag));
    check_scaled(zf, z, 2e-2f, 0.0f, nm("%s: saved z vs the CPU layer", tag));
    check_scaled(down_bf16(z1_d, z.size()), z, 2e-2f, 0.0f, nm("%s: stage 1 alone, z vs the CPU layer", tag));
    check_scaled(yf, down_bf16(y_d[0], y.size()), 1e-2f, 1e-2f, nm("%s: y vs the kernel on wmma", tag));
    check_scaled(zf, down_bf16(z_d[0], z.size()), 1e-2f, 1e-2f, nm("%s: z vs the kernel on wmma", tag));
}

// BtSeg.gate (BTT-MoE grouped by set, its forward fused: -mg 1 with -sk 1, 2 or 5): S segments
// of one rank-R BTT shape in one launch over grouped rows, a row a token (x rows read through
// order, K = 1), segments padded to whole 16-row tiles with rows the kernel must skip, one segment
// empty; each row's z components times its gates between the stages. The saved z bit for bit the
// ungated launch's z times the gate, rounded to bf16 once more (the plans' permute's rounding), or
// with late (the backward's order: saved, then gated) the ungated launch's z itself; y against
// stage 2 on the gated z in double; nothing written in the padding rows.
static void test_btt_fused_gate(int N, int alpha, int gamma, int phi, int eps, int R, int S, int ws, int mma, int late = 0) {
    BTTShape s;
    btt_shape(&s, alpha, gamma, phi, eps, R);
    const int din = s.d_in, dout = s.d_out, zrow = (int)btt_z_size(&s, 1), gr = gamma * R;
    const size_t p0 = btt_w0_size(&s), p1 = btt_w1_size(&s);
    std::vector<int> counts(S), offsets(S + 1, 0), order, tok(N);
    int left = N;
    for (int q = 0; q < S; q++) {  // segment 1 empty, the rest a share each, the last what is left
        counts[q] = q == 1 ? 0 : q == S - 1 ? left : (int)(urand() * 2.0 * N / S);
        if (counts[q] > left) counts[q] = left;
        left -= counts[q];
        offsets[q + 1] = offsets[q] + (counts[q] + 15) / 16 * 16;
    }
    for (int t = 0; t < N; t++) tok[t] = t;
    for (int t = N - 1; t > 0; t--) std::swap(tok[t], tok[(int)(urand() * (t + 1))]);  // tokens in shuffled order
    const int rows = offsets[S];
    order.assign(rows, -1);
    for (int q = 0, t = 0; q < S; q++)
        for (int i = 0; i < counts[q]; i++) order[offsets[q] + i] = tok[t++];
    Vec x = rand_bf16((size_t)N * din, 1.0f), W0 = rand_bf16(p0 * S, 1.0f / sqrtf((float)alpha)), W1 = rand_bf16(p1 * S, 1.0f / sqrtf((float)gr));
    std::vector<float> gate((size_t)rows * R);
    for (auto &v : gate) v = (float)urand();
    Dev d;
    floatX *x_d = d.add(up_bf16(x)), *W0_d = d.add(up_bf16(W0)), *W1_d = d.add(up_bf16(W1));
    int *ord_d = d.add(up(order)), *cnt_d = d.add(up(counts)), *off_d = d.add(up(offsets));
    int *tab_d = d.add(dev_alloc<int>(btt_fused_seg_scratch_ints(N, S, 16)));
    float *gate_d = d.add(up(gate));
    floatX *y_d[2], *z_d[2];
    g_btt_wstage = ws;
    g_btt_mma = mma;
    int ok = 1;
    for (int gt = 0; gt < 2; gt++) {
        y_d[gt] = d.add(dev_alloc<floatX>((size_t)rows * dout));
        z_d[gt] = d.add(dev_alloc<floatX>((size_t)rows * zrow));
        cudaCheck(cudaMemset(y_d[gt], 0xff, (size_t)rows * dout * sizeof(floatX)));  // NaN where nothing may be written
        cudaCheck(cudaMemset(z_d[gt], 0xff, (size_t)rows * zrow * sizeof(floatX)));
        ok &= btt_forward_fused_seg(y_d[gt], z_d[gt], x_d, ord_d, 1, W0_d, W1_d, cnt_d, off_d, S, N, &s, tab_d, gt ? gate_d : NULL, late);
    }
    g_btt_wstage = g_btt_mma = 0;
    const char *how = mma ? "on mma.sync" : ws ? "W0 staged" : "wmma";
    char tag[192];
    snprintf(tag, sizeof(tag), "fused btt by set, gated%s (%s): %d sets of rank %d, %d->%d, %d tokens in %d grouped rows",
             late ? " after the save" : "", how, S, R, din, dout, N, rows);
    if (!check_true(ok, nm("%s: supported and launched", tag), "btt_forward_fused_seg returned 0")) return;
    const std::vector<uint16_t> z0 = down_bits(z_d[0], (size_t)rows * zrow), z1 = down_bits(z_d[1], (size_t)rows * zrow),
                                y1b = down_bits(y_d[1], (size_t)rows * dout);
    const Vec y1 = down_bf16(y_d[1], (size_t)rows * dout);
    size_t zbad = 0, padbad = 0;
    Vec zg((size_t)rows * zrow, 0.0f), yref((size_t)rows * dout, 0.0f);
    for (int w = 0; w < rows; w++) {
        if (order[w] < 0) {  // padding: untouched (still all bits set)
            for (int c = 0; c < zrow; c++) padbad += z1[(size_t)w * zrow + c] != 0xffff;
            for (int c = 0; c < dout; c++) padbad += y1b[(size_t)w * dout + c] != 0xffff;
            continue;
        }
        for (int c = 0; c < zrow; c++) {  // column c = (f, g, s): component s = c % R
            const float u = sim_bf2f(z0[(size_t)w * zrow + c]), v = sim_bf2f(z1[(size_t)w * zrow + c]);
            const float want = bfr(u * gate[(size_t)w * R + c % R]), saved = late ? u : want;
            zbad += !(v == saved || (saved != saved && v != v));
            zg[(size_t)w * zrow + c] = want;
        }
    }
    for (int q = 0; q < S; q++)  // y = Σ_{g,s} z[(f, g, s)] W1_q[f, g·R + s, e] on the gated z
        for (int w = offsets[q]; w < offsets[q] + counts[q]; w++)
            for (int f = 0; f < phi; f++)
                for (int e = 0; e < eps; e++) {
                    double acc = 0.0;
                    for (int k = 0; k < gr; k++) acc += (double)zg[(size_t)w * zrow + f * gr + k] * W1[q * p1 + ((size_t)f * gr + k) * eps + e];
                    yref[(size_t)w * dout + f * eps + e] = (float)acc;
                }
    char why[96];
    snprintf(why, sizeof(why), "%zu of %zu elements differ", zbad, (size_t)N * zrow);
    check_true(zbad == 0, nm(late ? "%s: z saved ungated, bit for bit" : "%s: z = bf16(ungated z x its gate), bit for bit", tag), why);
    snprintf(why, sizeof(why), "%zu padding elements written", padbad);
    check_true(padbad == 0, nm("%s: padding rows of y and z untouched", tag), why);
    Vec yv, rv;
    for (int w = 0; w < rows; w++)
        if (order[w] >= 0)
            for (int c = 0; c < dout; c++) yv.push_back(y1[(size_t)w * dout + c]), rv.push_back(yref[(size_t)w * dout + c]);
    check_scaled(yv, rv, 1e-2f, 1e-2f, nm("%s: y vs stage 2 on the gated z (double)", tag));
}

// The fused BTT backward (-sk 1): dx and dZ from one launch of the fused kernel on dy with the
// transposed cores, then the weight-gradient GEMMs; against the CPU layer and the cuBLAS baseline.
static void test_btt_fused_backward(int N, int alpha, int gamma, int phi, int eps, int rank) {
    BttRef c(N, alpha, gamma, phi, eps, rank);
    const BTTShape &s = c.s, ts = btt_shape_transposed(&s);
    const int din = s.d_in, dout = s.d_out;
    char tag[160];
    snprintf(tag, sizeof(tag), "fused btt backward %d->%d (alpha %d gamma %d phi %d eps %d rank %d) N=%d", din, dout, alpha, gamma, phi, eps, rank, N);
    if (!check_true(btt_fused_supported(&ts, btt_fused_smem_limit()) > 0, nm("%s: the kernel supports the transposed shape", tag),
                    "it does not: the test would check the cuBLAS path"))
        return;
    const Vec &x = c.x, &W0 = c.W0, &W1 = c.W1, &bias = c.bias, &dy = c.dy, &y = c.y, &z = c.z, &dx = c.dx, &dW0 = c.dW0, &dW1 = c.dW1, &db = c.db;
    Dev d;
    floatX *x_d = d.add(up_bf16(x)), *W0_d = d.add(up_bf16(W0)), *W1_d = d.add(up_bf16(W1)), *b_d = d.add(up_bf16(bias)), *dy_d = d.add(up_bf16(dy));
    floatX *y_d = d.add(dev_alloc<floatX>((size_t)N * dout)), *z_d = d.add(dev_alloc<floatX>(z.size())),
           *s_d = d.add(dev_alloc<floatX>(btt_gpu_scratch_elems(&s, N)));
    float *col = d.add(dev_alloc<float>(column_sums_scratch_floats(dout)));
    Vec got[2][4];  // [fused][dx, dW0, dW1, dbias]
    for (int fused = 0; fused < 2; fused++) {
        g_st_fused = fused;
        floatX *dx_d = d.add(dev_alloc<floatX>((size_t)N * din)), *dW0_d = d.add(up_bf16(Vec(W0.size(), 0.0f))),
               *dW1_d = d.add(up_bf16(Vec(W1.size(), 0.0f))), *db_d = d.add(up_bf16(Vec(dout, 0.0f)));
        btt_forward_gpu(y_d, z_d, x_d, W0_d, W1_d, b_d, N, &s, s_d);
        const int ran_fused = btt_backward_gpu(dx_d, dW0_d, dW1_d, db_d, dy_d, x_d, z_d, W0_d, W1_d, N, &s, s_d, col);
        check_true(ran_fused == fused, nm("%s: -sk %d runs the %s backward", tag, fused, fused ? "fused" : "cuBLAS"), "it ran the other one");
        got[fused][0] = down_bf16(dx_d, dx.size());
        got[fused][1] = down_bf16(dW0_d, dW0.size());
        got[fused][2] = down_bf16(dW1_d, dW1.size());
        got[fused][3] = down_bf16(db_d, db.size());
    }
    g_st_fused = 0;
    const Vec *ref[4] = {&dx, &dW0, &dW1, &db};
    const char *what[4] = {"dx", "dW0", "dW1", "dbias"};
    for (int i = 0; i < 4; i++) {
        check_scaled(got[1][i], *ref[i], 2e-2f, 0.0f, nm("%s: %s vs the CPU layer", tag, what[i]));
        check_scaled(got[1][i], got[0][i], 1e-2f, 1e-2f, nm("%s: %s vs the cuBLAS baseline", tag, what[i]));
    }
}

// seg_wgrad (structured/seg_wgrad.cuh): per-segment AᵀB over row ranges read on the device,
// against a float64 loop over the same bf16 values; segments of 0, 1, 15, 16, 17 and 40 rows
// (empty, a partial step, exact steps, a tail), batch entries, overwrite and accumulate. With
// K > 0 the rows are read through a random grouping (BTT-MoE's fused backward): A and B are x- and
// dy-like buffers of rows / K + 1 rows, grouped row w is row order[w] / K, and B is scaled by a
// gate per pair and rounded to bf16.
struct SegCase {
    std::vector<int> counts, offsets, order;
    int rows, M, Nn, batch, lda, ldb, ldc, K;
    Vec A, B, C0, gate;
    int row(int w) const { return K ? order[w] / K : w; }  // the A and B row of grouped row w
    float b(int w, size_t col) const {
        const float v = B[(size_t)row(w) * ldb + col];
        return K ? bfr(gate[order[w]] * v) : v;
    }
};
static SegCase seg_case(int M, int Nn, int batch, int K = 0) {
    SegCase c;
    c.counts = {17, 0, 40, 1, 16, 15};
    c.rows = 0;
    for (int n : c.counts) { c.offsets.push_back(c.rows); c.rows += n; }
    c.M = M; c.Nn = Nn; c.batch = batch; c.K = K;
    c.lda = batch * M + 8; c.ldb = batch * Nn + 16; c.ldc = Nn + 8;  // row padding: strides are not the widths
    const int src_rows = K ? c.rows / K + 1 : c.rows;
    c.A = rand_bf16((size_t)src_rows * c.lda, 1.0f);
    c.B = rand_bf16((size_t)src_rows * c.ldb, 1.0f);
    c.C0 = rand_bf16(c.counts.size() * (size_t)batch * M * c.ldc, 1.0f);
    if (K) {
        c.order.resize(c.rows);
        for (int w = 0; w < c.rows; w++) c.order[w] = w;
        for (int w = c.rows - 1; w > 0; w--) std::swap(c.order[w], c.order[(int)(urand() * (w + 1))]);  // a random grouping
        c.gate = rand_bf16(c.rows, 0.5f, 0.5f);
    }
    return c;
}
template <class T>
static T *seg_upload(Dev &d, const std::vector<T> &v) {
    T *p = d.add(dev_alloc<T>(v.size()));
    cudaCheck(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
}
static std::vector<uint16_t> seg_run(const SegCase &c, int accumulate, Vec *out) {
    Dev d;
    floatX *A_d = d.add(up_bf16(c.A)), *B_d = d.add(up_bf16(c.B)), *C_d = d.add(up_bf16(c.C0));
    int *cnt_d = seg_upload(d, c.counts), *off_d = seg_upload(d, c.offsets), *ord_d = c.K ? seg_upload(d, c.order) : NULL;
    float *g_d = c.K ? seg_upload(d, c.gate) : NULL;
    SegWgrad p = {A_d, B_d, C_d, c.lda, c.ldb, c.ldc, c.M, c.Nn, (long long)c.M * c.ldc, (long long)c.batch * c.M * c.ldc,
                  c.M, c.Nn, c.batch, (int)c.counts.size(), cnt_d, off_d, accumulate, ord_d, c.K, c.K > 0, c.K > 0, g_d};
    check_true(seg_wgrad(&p), nm("seg_wgrad M=%d Nn=%d batch %d K %d: launched", c.M, c.Nn, c.batch, c.K), "not supported");
    if (out) *out = down_bf16(C_d, c.C0.size());
    return down_bits(C_d, c.C0.size());
}
static void test_seg_wgrad(int M, int Nn, int batch, int K = 0) {
    SegCase c = seg_case(M, Nn, batch, K);
    char grouping[64] = "";
    if (K) snprintf(grouping, sizeof(grouping), ", through a grouping (K %d) with a gate on B", K);
    for (int accumulate = 0; accumulate < 2; accumulate++) {
        Vec got, want = c.C0;
        seg_run(c, accumulate, &got);
        for (size_t s = 0; s < c.counts.size(); s++)
            for (int b = 0; b < batch; b++)
                for (int m = 0; m < M; m++)
                    for (int n = 0; n < Nn; n++) {
                        double acc = 0.0;
                        for (int w = c.offsets[s]; w < c.offsets[s] + c.counts[s]; w++)
                            acc += (double)c.A[(size_t)c.row(w) * c.lda + b * M + m] * c.b(w, (size_t)b * Nn + n);
                        float &wv = want[((s * batch + b) * M + m) * (size_t)c.ldc + n];
                        wv = bfr((float)acc + (accumulate ? wv : 0.0f));
                    }
        // outside the M x Nn tiles (the ldc padding) nothing may change
        check_close(got.data(), want.data(), want.size(), 1e-3f, 8e-3f,  // fp32 sums, one bf16 rounding: 2^-8 relative
                    nm("seg_wgrad M=%d Nn=%d batch %d, 6 segments (0..40 rows)%s%s", M, Nn, batch, grouping, accumulate ? ", accumulated" : ""));
    }
}

// ================================================================================================
// random thread order (SIM_SERIAL): the kernels' results must not depend on the order in which a
// block's threads run between barriers, nor on the block order

template <class F>
static void check_order_independent(const char *what, F run) {
    std::vector<uint16_t> base = run();
    int same = 1;
    for (unsigned long long seed = 1; seed <= 2; seed++) {
        sim_set_random_order(1, seed);
        std::vector<uint16_t> r = run();
        sim_set_random_order(0);
        same &= r == base;
    }
    check_true(same, nm("random thread/block order (2 seeds) gives bit-identical results: %s", what), "the result depends on the order");
}
static std::vector<uint16_t> bits_of(const Vec &v) {
    std::vector<uint16_t> b(v.size() * 2);
    memcpy(b.data(), v.data(), v.size() * 4);
    return b;
}
template <class T>
static void append_bits(std::vector<uint16_t> &out, const std::vector<T> &v) {
    size_t o = out.size();
    out.resize(o + (v.size() * sizeof(T) + 1) / 2);
    memcpy(out.data() + o, v.data(), v.size() * sizeof(T));
}

static void test_random_order() {
    const int N = 19, C = 320;
    Vec x = rand_bf16((size_t)N * C, 1.0f), x2 = rand_bf16((size_t)N * C, 1.0f), w = rand_bf16(C, 0.2f, 1.0f), b = rand_bf16(C, 0.1f),
        g = rand_bf16((size_t)N * C, 1.0f);
    check_order_independent("layernorm forward (fused residual) and backward (column sums)", [&] {
        Dev d;
        floatX *dx = d.add(up_bf16(x)), *dx2 = d.add(up_bf16(x2)), *dw = d.add(up_bf16(w)), *db = d.add(up_bf16(b)), *dg = d.add(up_bf16(g));
        floatX *out = d.add(dev_alloc<floatX>((size_t)N * C)), *res = d.add(dev_alloc<floatX>((size_t)N * C)),
               *din = d.add(up_bf16(Vec((size_t)N * C, 0.0f))), *gw = d.add(up_bf16(Vec(C, 0.0f))), *gb = d.add(up_bf16(Vec(C, 0.0f)));
        float *mean = d.add(dev_alloc<float>(N)), *rstd = d.add(dev_alloc<float>(N)), *scr = d.add(dev_alloc<float>(column_sums_scratch_floats(C)));
        fused_residual_layernorm_forward(res, out, mean, rstd, dx, dx2, dw, db, N, C);
        layernorm_backward(din, gw, gb, dg, res, dw, mean, rstd, N, C, scr);
        std::vector<uint16_t> r = down_bits(out, (size_t)N * C);
        append_bits(r, down_bits(din, (size_t)N * C));
        append_bits(r, down_bits(gw, C));
        append_bits(r, down_bits(gb, C));
        append_bits(r, down(rstd, N));
        return r;
    });
    const int V = 1000, Vp = 1024, R = 5;
    Vec lg = rand_bf16((size_t)R * Vp, 2.0f);
    check_order_independent("classifier (block softmax reduction, in-place dlogits)", [&] {
        Dev d;
        std::vector<int> t = {3, 999, 0, 500, 77};
        floatX *l = d.add(up_bf16(lg));
        int *tg = d.add(up(t));
        float *loss = d.add(dev_alloc<float>(R));
        fused_classifier(l, loss, tg, R, V, Vp, 0.25f);
        std::vector<uint16_t> r = down_bits(l, lg.size());
        append_bits(r, down(loss, R));
        return r;
    });
    Vec gg = rand_bf16(30011, 1.0f);
    check_order_independent("global_norm (block_sum, 4 blocks)", [&] {
        Dev d;
        floatX *dg = d.add(up_bf16(gg));
        double *scr = d.add(dev_alloc<double>(NORM_BLOCKS + 1));
        float n = global_norm(dg, gg.size(), scr);
        return bits_of(Vec{n});
    });
    Vec qkv = rand_bf16((size_t)1 * 70 * 3 * 64, 1.0f), dout = rand_bf16((size_t)70 * 64, 1.0f);
    check_order_independent("flash attention forward + backward (wmma, shuffles, shared tiles)", [&] {
        AttnOut a = run_flash(qkv, dout, 1, 70, 64, 2);
        std::vector<uint16_t> r = a.out_bits;
        append_bits(r, a.dqkv_bits);
        append_bits(r, a.lse);
        return r;
    });
    Vec qkv2 = rand_bf16((size_t)2 * 33 * 3 * 32, 1.0f), dout2 = rand_bf16((size_t)2 * 33 * 32, 1.0f);
    check_order_independent("cuBLAS attention softmax kernels", [&] {
        AttnOut a = run_cublas_attention(qkv2, dout2, 2, 33, 32, 2);
        std::vector<uint16_t> r = bits_of(a.out);
        append_bits(r, a.dqkv);
        return r;
    });
    check_order_independent("fused Monarch forward (u tile, y staging, block barriers)", [&] {
        MonarchShape m;
        monarch_shape(&m, 768, 3072, 24);
        const int Nm = 37;
        g_rng = 99;
        Vec xx = rand_bf16((size_t)Nm * 768, 1.0f), R = rand_bf16(monarch_r_size(&m), 0.2f), L = rand_bf16(monarch_l_size(&m), 0.2f),
            b = rand_bf16(3072, 0.1f);
        Dev d;
        floatX *x_d = d.add(up_bf16(xx)), *R_d = d.add(up_bf16(R)), *L_d = d.add(up_bf16(L)), *b_d = d.add(up_bf16(b));
        floatX *y_d = d.add(dev_alloc<floatX>((size_t)Nm * 3072)), *u_d = d.add(dev_alloc<floatX>(monarch_u_size(&m, Nm))),
               *s_d = d.add(dev_alloc<floatX>(monarch_gpu_scratch_elems(&m, Nm)));
        g_st_fused = 1;
        monarch_forward_gpu(y_d, u_d, x_d, R_d, L_d, b_d, Nm, &m, s_d);
        g_st_fused = 0;
        std::vector<uint16_t> r = down_bits(y_d, (size_t)Nm * 3072);
        append_bits(r, down_bits(u_d, monarch_u_size(&m, Nm)));
        return r;
    });
    check_order_independent("fused Monarch backward (dyt groups, du tile, block barriers)", [&] {
        MonarchShape m;
        monarch_shape(&m, 768, 3072, 24);
        const int Nm = 37;
        g_rng = 98;
        Vec dy = rand_bf16((size_t)Nm * 3072, 1.0f), R = rand_bf16(monarch_r_size(&m), 0.2f), L = rand_bf16(monarch_l_size(&m), 0.2f);
        Dev d;
        floatX *dy_d = d.add(up_bf16(dy)), *R_d = d.add(up_bf16(R)), *L_d = d.add(up_bf16(L));
        floatX *dx_d = d.add(dev_alloc<floatX>((size_t)Nm * 768)), *du_d = d.add(dev_alloc<floatX>(monarch_u_size(&m, Nm))),
               *dyt_d = d.add(dev_alloc<floatX>((size_t)Nm * 3072));
        std::vector<uint16_t> r;
        for (size_t limit : {(size_t)227 * 1024, (size_t)44 * 1024}) {  // one group; groups of 2 of the 24 blocks
            if (!monarch_backward_fused(dx_d, du_d, dyt_d, dy_d, R_d, L_d, Nm, &m, limit))
                check_true(false, nm("fused Monarch backward with %zu bytes of shared memory: launched", limit), "refused");
            append_bits(r, down_bits(dx_d, (size_t)Nm * 768));
            append_bits(r, down_bits(du_d, monarch_u_size(&m, Nm)));
            append_bits(r, down_bits(dyt_d, (size_t)Nm * 3072));
        }
        return r;
    });
    check_order_independent("seg_wgrad (per-warp shared steps, segments read on the device)", [&] {
        g_rng = 777;
        SegCase c = seg_case(32, 48, 2);
        return seg_run(c, 1, NULL);
    });
    check_order_independent("btt_moe routing, grouping (ballots), gather/combine, backward", [&] {
        MoEShape s;
        moe_shape(&s, 4, 12, 4, 12, 8, 2);
        const int Nm = 150;
        g_rng = 4242;
        Vec xx = rand_bf16((size_t)Nm * 48, 1.0f), W0 = rand_bf16(btt_w0_size(&s.btt), 0.5f), W1 = rand_bf16(btt_w1_size(&s.btt), 0.3f),
            R = rand_bf16(moe_router_size(&s), 0.3f), dy = rand_bf16((size_t)Nm * 48, 1.0f);
        Dev d;
        floatX *x_d = d.add(up_bf16(xx)), *W0_d = d.add(up_bf16(W0)), *W1_d = d.add(up_bf16(W1)), *R_d = d.add(up_bf16(R)), *dy_d = d.add(up_bf16(dy));
        floatX *y_d = d.add(dev_alloc<floatX>((size_t)Nm * 48)), *dx_d = d.add(dev_alloc<floatX>((size_t)Nm * 48));
        floatX *g0 = d.add(up_bf16(Vec(W0.size(), 0.0f))), *g1 = d.add(up_bf16(Vec(W1.size(), 0.0f))), *gr = d.add(up_bf16(Vec(R.size(), 0.0f)));
        float *col = d.add(dev_alloc<float>(column_sums_scratch_floats(48)));
        MoEGPUState gst;
        memset(&gst, 0, sizeof(gst));
        moe_gpu_state_alloc(&gst, &s, Nm, "test");
        floatX *s_d = d.add(dev_alloc<floatX>(moe_gpu_scratch_elems(&s, Nm)));
        float *f_d = d.add(dev_alloc<float>(moe_gpu_scratch_floats(&s, Nm)));
        MoEGPUScratch sc;
        moe_gpu_scratch_bind(&sc, &gst, &s, Nm, s_d, f_d);
        float *aux_d = d.add(dev_alloc<float>(4));
        moe_forward_gpu(y_d, &gst, &sc, x_d, W0_d, W1_d, R_d, NULL, Nm, &s);
        moe_aux_stats_gpu(&gst, &s);
        moe_aux_finish_gpu(&gst, Nm, &s, (MoERouting *)aux_d);
        moe_backward_gpu(dx_d, g0, g1, gr, NULL, dy_d, 0.05f, x_d, &gst, &sc, W0_d, W1_d, R_d, &s, col);
        std::vector<uint16_t> r = down_bits(y_d, (size_t)Nm * 48);
        append_bits(r, down(gst.order, (size_t)Nm * 2));
        append_bits(r, down_bits(dx_d, (size_t)Nm * 48));
        append_bits(r, down_bits(g0, W0.size()));
        append_bits(r, down_bits(gr, R.size()));
        append_bits(r, down(gst.stats, 17));
        append_bits(r, down(aux_d, 4));
        moe_gpu_state_free(&gst);
        return r;
    });
    check_order_independent("encoder backward (bucketed dwte, dwpe)", [&] {
        const int B = 3, T = 9, Cc = 64, V = 20;
        std::vector<int> inp(B * T);
        for (int i = 0; i < B * T; i++) inp[i] = (i * 7) % 5;
        std::vector<int> buf(3 * B * T + 2), count(V, 0);
        int used = encoder_buckets_build(buf.data(), count.data(), inp.data(), B * T, V);
        Dev d;
        g_rng = 777;
        Vec ge = rand_bf16((size_t)B * T * Cc, 1.0f);
        floatX *dg = d.add(up_bf16(ge)), *wte = d.add(up_bf16(Vec((size_t)V * Cc, 0.0f))), *wpe = d.add(up_bf16(Vec((size_t)T * Cc, 0.0f)));
        int *bk = d.add(dev_alloc<int>(buf.size()));
        cudaCheck(cudaMemcpy(bk, buf.data(), used * sizeof(int), cudaMemcpyHostToDevice));
        encoder_backward(wte, wpe, dg, bk, buf[0], B, T, Cc);
        std::vector<uint16_t> r = down_bits(wte, (size_t)V * Cc);
        append_bits(r, down_bits(wpe, (size_t)T * Cc));
        return r;
    });
}

// ================================================================================================
// the simulator's own checks: what it must catch (fatal ones in a forked child)

__global__ void k_write(float *p, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = 1.0f;
}
__global__ void k_misaligned(floatX *out, const floatX *in) { store128(out, load128(in + 1)); }
__global__ void k_shfl_deadlock(float *out) {
    float v = threadIdx.x;
    if (threadIdx.x % 32 != 5) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}
__global__ void k_shfl_exited(float *out) {
    if (threadIdx.x % 32 >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 16);
}
__global__ void k_smem_overrun(int bytes, int extra) {
    extern __shared__ __align__(128) unsigned char flash_smem[];
    flash_smem[bytes + extra] = 1;
}
// each thread reads a neighbour's shared value: with the barrier right, without it a race
__global__ void k_neighbour(float *out, int with_barrier) {
    __shared__ float sh[256];
    sh[threadIdx.x] = (float)threadIdx.x + 1000.0f * blockIdx.x;  // differs per block: a stale value is visible
    if (with_barrier) __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = sh[(threadIdx.x + 33) % blockDim.x];
}
// reads its static shared value before writing it (simify.py adds SIM_SHARED_POISON to the
// sources' declarations; this file is not simified, so it is written out here)
__global__ void k_stale_shared(float *out) {
    __shared__ float sh[32]; SIM_SHARED_POISON(sh);
    out[blockIdx.x * 32 + threadIdx.x] = sh[threadIdx.x];
    __syncthreads();
    sh[threadIdx.x] = 1.0f + blockIdx.x;
}
__global__ void k_collectives(unsigned *out) {
    unsigned lane = threadIdx.x % 32;
    unsigned b = __ballot_sync(0xffffffffu, lane % 3 == 0);
    float s = __shfl_down_sync(0xffffffffu, (float)lane, 3);
    int idx = __shfl_sync(0xffffffffu, (int)lane * 10, 31 - (int)lane);
    unsigned m = __match_any_sync(0xffffffffu, lane / 4);
    int all = __all_sync(0xffffffffu, lane < 32), any = __any_sync(0xffffffffu, lane == 17);
    int cnt = __syncthreads_count(threadIdx.x % 2);
    out[threadIdx.x * 7 + 0] = b;
    out[threadIdx.x * 7 + 1] = (unsigned)s;
    out[threadIdx.x * 7 + 2] = (unsigned)idx;
    out[threadIdx.x * 7 + 3] = m;
    out[threadIdx.x * 7 + 4] = (unsigned)all;
    out[threadIdx.x * 7 + 5] = (unsigned)any;
    out[threadIdx.x * 7 + 6] = (unsigned)cnt;
}

// cuda/mma.cuh's instructions: A (16x16) and B (16x16, K x N), row-major in shared memory with a
// row stride of 24 elements; the lanes' ldmatrix registers (A plain, B transposed) go out as they
// are, then D = A B (two m16n8 halves, accumulated onto 1) in the documented accumulator layout.
#define MMA_T_LD 24
__global__ void k_mma(uint32_t *regs, float *D, const floatX *A, const floatX *B) {
    __shared__ __align__(16) floatX sa[16 * MMA_T_LD], sb[16 * MMA_T_LD]; SIM_SHARED_POISON(sa); SIM_SHARED_POISON(sb);
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) {
        sa[(i / 16) * MMA_T_LD + i % 16] = A[i];
        sb[(i / 16) * MMA_T_LD + i % 16] = B[i];
    }
    __syncwarp();
    uint32_t a[4], b[4];
    mma_ldsm_x4(a, sa + (lane % 16) * MMA_T_LD + (lane / 16) * 8);
    mma_ldsm_x4_trans(b, sb + (lane % 16) * MMA_T_LD + (lane / 16) * 8);
    for (int i = 0; i < 4; i++) {
        regs[lane * 8 + i] = a[i];
        regs[lane * 8 + 4 + i] = b[i];
    }
    float d[2][4];
    for (int h = 0; h < 2; h++) {
        for (int q = 0; q < 4; q++) d[h][q] = 1.0f;
        mma_bf16_16816(d[h], a, b[2 * h], b[2 * h + 1]);
    }
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; h++)
        for (int q = 0; q < 4; q++) D[(g + (q >= 2 ? 8 : 0)) * 16 + h * 8 + 2 * t + q % 2] = d[h][q];
}
__global__ void k_mma_diverged(float *out) {
    uint32_t a[4] = {0, 0, 0, 0};
    float d[4] = {0, 0, 0, 0};
    if (threadIdx.x < 16) mma_bf16_16816(d, a, 0, 0);  // half the warp
    out[threadIdx.x] = d[0];
}
static void child_mma_diverged(const void *) {
    float *p;
    cudaCheck(cudaMalloc(&p, 32 * sizeof(float)));
    LAUNCH(k_mma_diverged, 1, 32, 0, p);
}
static void expect_child(void (*fn)(const void *), const char *must_say, const char *what);
static void test_mma_instructions() {
    Vec A = rand_bf16(256, 1.0f), B = rand_bf16(256, 1.0f);
    floatX *A_d = up_bf16(A), *B_d = up_bf16(B);
    uint32_t *r_d = dev_alloc<uint32_t>(32 * 8);
    float *D_d = dev_alloc<float>(256);
    LAUNCH(k_mma, 1, 32, 0, r_d, D_d, A_d, B_d);
    std::vector<uint32_t> r = down(r_d, 32 * 8);
    std::vector<float> D = down(D_d, 256);
    auto bits = [](float v) { return (uint32_t)__nv_bfloat16(v).__x; };
    auto pair = [&](const Vec &M, int row, int col, int row2, int col2) { return bits(M[row * 16 + col]) | bits(M[row2 * 16 + col2]) << 16; };
    int bad_a = 0, bad_b = 0;
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        // PTX ISA, mma.m16n8k16 (.bf16): a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
        // b0 (k 2t, 2t+1; n g), b1 (k 2t+8, 2t+9; n g), here for n = 0..7 (b[0..1]) and 8..15 (b[2..3])
        const uint32_t wa[4] = {pair(A, g, 2 * t, g, 2 * t + 1), pair(A, g + 8, 2 * t, g + 8, 2 * t + 1), pair(A, g, 2 * t + 8, g, 2 * t + 9),
                                pair(A, g + 8, 2 * t + 8, g + 8, 2 * t + 9)};
        const uint32_t wb[4] = {pair(B, 2 * t, g, 2 * t + 1, g), pair(B, 2 * t + 8, g, 2 * t + 9, g), pair(B, 2 * t, g + 8, 2 * t + 1, g + 8),
                                pair(B, 2 * t + 8, g + 8, 2 * t + 9, g + 8)};
        for (int i = 0; i < 4; i++) {
            bad_a += r[l * 8 + i] != wa[i];
            bad_b += r[l * 8 + 4 + i] != wb[i];
        }
    }
    check_true(bad_a == 0, "sim: ldmatrix.x4 gives each lane the pairs of the mma A fragment", nm("%d of 128 registers differ", bad_a));
    check_true(bad_b == 0, "sim: ldmatrix.x4.trans of a row-major K x N tile gives the mma B fragments", nm("%d of 128 registers differ", bad_b));
    double worst = 0.0;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            double want = 1.0;
            for (int k = 0; k < 16; k++) want += (double)A[i * 16 + k] * B[k * 16 + j];
            worst = fmax(worst, fabs(D[i * 16 + j] - want) / (1.0 + fabs(want)));
        }
    // bf16 products are exact in fp32; 16 fp32 additions: within 16 * 2^-24 of the sum's magnitude
    check_true(worst < 1e-5, "sim: mma.m16n8k16 D = A B + C in the documented accumulator layout", nm("worst relative error %.3g", worst));
    expect_child(child_mma_diverged, "every lane of the warp must execute it", "an mma.sync that half the warp skips");
    cudaCheck(cudaFree(A_d));
    cudaCheck(cudaFree(B_d));
    cudaCheck(cudaFree(r_d));
    cudaCheck(cudaFree(D_d));
}

static void child_oob_guard(const void *) {
    float *p;
    cudaCheck(cudaMalloc(&p, 100 * sizeof(float)));
    LAUNCH(k_write, 1, 256, 0, p, 256);  // 1 KB into a 400-byte buffer: reaches the guard page
}
static void child_oob_canary(const void *) {
    float *p;
    cudaCheck(cudaMalloc(&p, 100 * sizeof(float)));
    LAUNCH(k_write, 1, 128, 0, p, 104);  // 16 bytes past the end, inside the 256-byte rounding
}
static void child_misaligned(const void *) {
    floatX *p;
    cudaCheck(cudaMalloc(&p, 64 * sizeof(floatX)));
    LAUNCH(k_misaligned, 1, 32, 0, p, p);
}
static void child_deadlock(const void *) {
    float *p;
    cudaCheck(cudaMalloc(&p, 64 * sizeof(float)));
    LAUNCH(k_shfl_deadlock, 1, 64, 0, p);
}
static void child_shfl_exited(const void *) {
    float *p;
    cudaCheck(cudaMalloc(&p, 64 * sizeof(float)));
    LAUNCH(k_shfl_exited, 1, 32, 0, p);
}
static void child_smem_guard(const void *) { LAUNCH(k_smem_overrun, 1, 32, 4096, 4096, 100); }
static void child_smem_canary(const void *) { LAUNCH(k_smem_overrun, 1, 32, 1000, 1000, 5); }
static void child_use_after_free(const void *) {
    float *p;
    cudaCheck(cudaMalloc(&p, 64 * sizeof(float)));
    cudaCheck(cudaFree(p));
    LAUNCH(k_write, 1, 64, 0, p, 64);
}
static void child_memcpy_kind(const void *) {
    float *p, h[4] = {0};
    cudaCheck(cudaMalloc(&p, 4 * sizeof(float)));
    cudaMemcpy(p, p, sizeof(h), cudaMemcpyHostToDevice);  // the source is device memory
}
// pinned host memory touched before the asynchronous copy that uses it was waited for
static int *pinned_setup(int **d, int n) {
    int *h;
    cudaCheck(cudaMallocHost(&h, n * sizeof(int)));
    cudaCheck(cudaMalloc(d, n * sizeof(int)));
    for (int i = 0; i < n; i++) h[i] = i;
    return h;
}
static void child_pinned_write_early(const void *) {
    int *d, *h = pinned_setup(&d, 1024);
    cudaCheck(cudaMemcpyAsync(d, h, 1024 * sizeof(int), cudaMemcpyHostToDevice, 0));
    h[5] = -1;  // the next batch's data, written while the GPU may still be reading this one
}
static void child_pinned_read_early(const void *) {
    int *d, *h = pinned_setup(&d, 1024);
    cudaCheck(cudaMemcpyAsync(h, d, 1024 * sizeof(int), cudaMemcpyDeviceToHost, 0));
    printf("%d\n", ((volatile int *)h)[7]);  // read before the copy was waited for
}
static void child_pinned_event_before(const void *) {
    int *d, *h = pinned_setup(&d, 1024);
    cudaEvent_t e;
    cudaCheck(cudaEventCreate(&e));
    cudaCheck(cudaEventRecord(e, 0));  // recorded before the copy: waiting for it does not wait for the copy
    cudaCheck(cudaMemcpyAsync(d, h, 1024 * sizeof(int), cudaMemcpyHostToDevice, 0));
    cudaCheck(cudaEventSynchronize(e));
    h[0] = 3;
}
static void child_pinned_free_early(const void *) {
    int *d, *h = pinned_setup(&d, 64);
    cudaCheck(cudaMemcpyAsync(d, h, 64 * sizeof(int), cudaMemcpyHostToDevice, 0));
    cudaCheck(cudaFreeHost(h));
}
static void child_gemm_range(const void *) {
    floatX *a, *b, *c;
    cudaCheck(cudaMalloc(&a, 16 * 16 * 2));
    cudaCheck(cudaMalloc(&b, 16 * 8 * 2));  // too small for 16 x 16
    cudaCheck(cudaMalloc(&c, 16 * 16 * 2));
    float one = 1, zero = 0;
    cublasHandle_t h;
    cublasCreate(&h);
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 16, 16, 16, &one, a, CUDA_R_16BF, 16, b, CUDA_R_16BF, 16, &zero, c, CUDA_R_16BF, 16,
                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
static void child_gemm_alias(const void *) {
    floatX *a;
    cudaCheck(cudaMalloc(&a, 16 * 16 * 2));
    float one = 1, zero = 0;
    cublasHandle_t h;
    cublasCreate(&h);
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 16, 16, 16, &one, a, CUDA_R_16BF, 16, a, CUDA_R_16BF, 16, &zero, a, CUDA_R_16BF, 16,
                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
// cublasGemmBatchedEx, two 16 x 16 products on one buffer: entry 1's A (overlap_inputs) or its C
// (else) starts 8 columns into entry 0's C
static void gemm_batched_overlap(int overlap_inputs) {
    floatX *buf, *in;
    cudaCheck(cudaMalloc(&buf, 4 * 256 * 2));
    cudaCheck(cudaMalloc(&in, 2 * 256 * 2));
    const void *A[2] = {in, overlap_inputs ? buf + 8 * 16 : in + 256}, *B[2] = {in, in + 256};
    void *C[2] = {buf, overlap_inputs ? buf + 2 * 256 : buf + 8 * 16};
    void **dp;
    cudaCheck(cudaMalloc(&dp, 6 * sizeof(void *)));
    cudaCheck(cudaMemcpy(dp, A, sizeof(A), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(dp + 2, B, sizeof(B), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(dp + 4, C, sizeof(C), cudaMemcpyHostToDevice));
    float one = 1, zero = 0;
    cublasHandle_t h;
    cublasCreate(&h);
    cublasGemmBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 16, 16, 16, &one, (const void *const *)dp, CUDA_R_16BF, 16, (const void *const *)(dp + 2),
                        CUDA_R_16BF, 16, &zero, dp + 4, CUDA_R_16BF, 16, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
static void child_gemm_batched_outputs(const void *) { gemm_batched_overlap(0); }
static void child_gemm_batched_alias(const void *) { gemm_batched_overlap(1); }

static void expect_child(void (*fn)(const void *), const char *must_say, const char *what) {
    char buf[8192];
    int rc = run_child(fn, NULL, 2, buf, sizeof(buf));
    char why[8400];
    snprintf(why, sizeof(why), "exit %d, stderr: %s", rc, buf);
    check_true(rc == 3 && strstr(buf, must_say) != NULL, nm("simulator catches %s (\"%s\")", what, must_say), why);
}

static void test_simulator() {
    // bf16 rounding as the GPU's __float2bfloat16_rn
    {
        float ties[4] = {1.00390625f, 1.01171875f, -1.00390625f, 3.0e38f};
        uint16_t want[4] = {0x3F80, 0x3F82, 0xBF80, 0x7F62};
        int ok = 1;
        for (int i = 0; i < 4; i++) ok &= __float2bfloat16_rn(ties[i]).__x == want[i];
        ok &= __float2bfloat16_rn(NAN).__x == 0x7FFF && __float2bfloat16_rn(INFINITY).__x == 0x7F80 && __float2bfloat16_rn(3.4e38f).__x == 0x7F80;
        check_true(ok, "sim: bf16 round to nearest even, NaN, Inf and overflow", "wrong bits");
    }
    // warp collectives and __syncthreads_count
    {
        unsigned *d = dev_alloc<unsigned>(64 * 7);
        LAUNCH(k_collectives, 1, 64, 0, d);
        std::vector<unsigned> o = down(d, 64 * 7);
        int ok = 1;
        for (unsigned t = 0; t < 64; t++) {
            unsigned lane = t % 32, bal = 0, m = 0;
            for (unsigned l = 0; l < 32; l++) bal |= (l % 3 == 0) << l;
            for (unsigned l = 0; l < 32; l++) m |= (l / 4 == lane / 4) << l;
            ok &= o[t * 7 + 0] == bal && o[t * 7 + 1] == (lane + 3 < 32 ? lane + 3 : lane) && o[t * 7 + 2] == (31 - lane) * 10 &&
                  o[t * 7 + 3] == m && o[t * 7 + 4] == 1 && o[t * 7 + 5] == 1 && o[t * 7 + 6] == 32;
        }
        check_true(ok, "sim: __ballot_sync, __shfl_down_sync, __shfl_sync, __match_any_sync, __all/__any_sync, __syncthreads_count", "wrong");
        cudaCheck(cudaFree(d));
    }
    // launch configurations CUDA rejects come back from cudaGetLastError
    {
        float *p = dev_alloc<float>(64);
        (void)cudaGetLastError();
        g_sim_quiet = 1;  // the rejections below are expected
        LAUNCH(k_write, 0, 32, 0, p, 64);
        cudaError_t e0 = cudaGetLastError();
        LAUNCH(k_write, 1, 1025, 0, p, 64);
        cudaError_t e1 = cudaGetLastError();
        LAUNCH(k_smem_overrun, 1, 32, 60 * 1024, 0, 0);
        cudaError_t e2 = cudaGetLastError();
        cudaCheck(cudaFuncSetAttribute(k_smem_overrun, cudaFuncAttributeMaxDynamicSharedMemorySize, 60 * 1024));
        LAUNCH(k_smem_overrun, 1, 32, 60 * 1024, 0, 0);
        cudaError_t e3 = cudaGetLastError();
        g_sim_quiet = 0;
        check_true(e0 == cudaErrorInvalidConfiguration && e1 == cudaErrorInvalidConfiguration && e2 == cudaErrorInvalidValue && e3 == cudaSuccess,
                   "sim: grid 0, 1025 threads, 60 KB of shared memory without the attribute are launch errors; with it, none",
                   nm("got %d %d %d %d", e0, e1, e2, e3));
        cudaCheck(cudaFree(p));
    }
    // cuBLAS rejects bad leading dimensions as cuBLAS does
    {
        floatX *a = dev_alloc<floatX>(256), *c = dev_alloc<floatX>(256);
        float one = 1, zero = 0;
        g_sim_quiet = 1;
        cublasStatus_t st = cublasGemmEx(g_gpu.cublas, CUBLAS_OP_N, CUBLAS_OP_N, 16, 16, 16, &one, a, CUDA_R_16BF, 8, a, CUDA_R_16BF, 16, &zero, c,
                                         CUDA_R_16BF, 16, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        g_sim_quiet = 0;
        check_true(st == CUBLAS_STATUS_INVALID_VALUE, "sim: cublasGemmEx with lda < m returns CUBLAS_STATUS_INVALID_VALUE", "accepted");
        cudaCheck(cudaFree(a));
        cudaCheck(cudaFree(c));
    }
    // a missing __syncthreads shows up as an order-dependent result
    {
        float *p = dev_alloc<float>(4 * 256);
        auto run = [&](int barrier, unsigned long long seed) {
            cudaCheck(cudaMemset(p, 0, 4 * 256 * sizeof(float)));
            sim_set_random_order(seed != 0, seed);
            LAUNCH(k_neighbour, 4, 256, 0, p, barrier);
            sim_set_random_order(0);
            return down(p, 4 * 256);
        };
        std::vector<float> a = run(0, 1), b = run(0, 2), c = run(1, 1), e = run(1, 2), f = run(1, 0);
        check_true(a != b, "sim: random thread order exposes a missing __syncthreads (results differ between seeds)", "same results");
        check_true(c == e && e == f, "sim: with the barrier the result is the same in every order", "differs");
    }
    // static shared memory: each block finds garbage, not the previous block's values
    {
        float *p = dev_alloc<float>(8 * 32);
        LAUNCH(k_stale_shared, 8, 32, 0, p);
        std::vector<float> o = down(p, 8 * 32);
        int nan = 0;
        for (float v : o) nan += std::isnan(v);
        check_true(nan == 8 * 32, "sim: a static __shared__ array read before its block writes it gives NaN in every block",
                   nm("%d of %d reads NaN", nan, 8 * 32));
        cudaCheck(cudaFree(p));
    }
    expect_child(child_oob_guard, "past the end of device buffer", "an out-of-bounds write reaching the guard page");
    expect_child(child_oob_canary, "written 16 bytes past its end", "an out-of-bounds write inside the allocation's rounding");
    expect_child(child_misaligned, "misaligned int4", "a misaligned 16-byte load");
    expect_child(child_deadlock, "deadlock", "a warp collective a lane never reaches");
    expect_child(child_shfl_exited, "did not take part", "a shuffle reading an exited lane");
    expect_child(child_smem_guard, "dynamic shared memory", "a dynamic shared memory overrun reaching the guard page");
    expect_child(child_smem_canary, "written 6 bytes past the 1000 bytes", "a dynamic shared memory overrun inside the page");
    expect_child(child_use_after_free, "use after cudaFree", "a kernel writing freed memory");
    expect_child(child_memcpy_kind, "source", "cudaMemcpyHostToDevice from device memory");
    expect_child(child_gemm_range, "runs 256 bytes past the end", "a GEMM operand larger than its buffer");
    expect_child(child_gemm_alias, "overlaps input", "a GEMM output aliasing an input");
    expect_child(child_gemm_batched_outputs, "two different batch entries write", "pointer-array GEMM entries sharing output elements");
    expect_child(child_gemm_batched_alias, "is an input of the same call", "a pointer-array GEMM entry reading another's output");
    // asynchronous copies with pinned memory: the host side may be touched once the copy was waited for
    {
        int *d, *h = pinned_setup(&d, 2048);
        cudaEvent_t e;
        cudaCheck(cudaEventCreate(&e));
        cudaCheck(cudaMemcpyAsync(d, h, 2048 * sizeof(int), cudaMemcpyHostToDevice, 0));
        cudaCheck(cudaEventRecord(e, 0));
        cudaCheck(cudaEventSynchronize(e));
        for (int i = 0; i < 2048; i++) h[i] = -i;  // after the event: allowed
        cudaCheck(cudaMemcpyAsync(h, d, 2048 * sizeof(int), cudaMemcpyDeviceToHost, 0));
        cudaCheck(cudaStreamSynchronize(0));
        int ok = 1;
        for (int i = 0; i < 2048; i++) ok &= h[i] == i;
        cudaCheck(cudaMemcpyAsync(d, h, 1024 * sizeof(int), cudaMemcpyHostToDevice, 0));
        std::vector<int> back = down(d, 2048);  // a synchronous copy waits for the default stream
        h[0] = 7;
        cudaCheck(cudaMemcpyAsync(h + 1024, d, 1024 * sizeof(int), cudaMemcpyDeviceToHost, 0));
        cudaCheck(cudaDeviceSynchronize());
        ok &= back[2047] == 2047 && h[1024] == 0 && h[0] == 7;
        check_true(ok, "sim: pinned memory touched after its asynchronous copy was waited for (event, stream, copy, device)", "wrong values");
        cudaCheck(cudaFreeHost(h));
        cudaCheck(cudaFree(d));
        cudaCheck(cudaEventDestroy(e));
    }
    expect_child(child_pinned_write_early, "may still be reading (the host wrote it)", "the host writing pinned memory an async copy reads");
    expect_child(child_pinned_read_early, "may still be writing (the host touched it)", "the host reading pinned memory an async copy writes");
    expect_child(child_pinned_event_before, "may still be reading", "waiting for an event recorded before the async copy");
    expect_child(child_pinned_free_early, "cudaFreeHost", "cudaFreeHost while an async copy may use the memory");
}

// ================================================================================================

int main(int argc, char **argv) {
    // groups to run (default all): sim layernorm matmul classifier adamw norm encoder attention structured fused order
    auto want = [&](const char *g) {
        if (argc < 2) return true;
        for (int i = 1; i < argc; i++)
            if (strcmp(argv[i], g) == 0) return true;
        return false;
    };
    gpu_init(0);
    printf("# device: %s (sm_%d%d), %d simulator threads%s\n", g_gpu.prop.name, g_gpu.prop.major, g_gpu.prop.minor, sim_num_threads(),
           g_sim_random ? ", random thread order (SIM_SERIAL)" : "");
    if (want("sim")) {
        test_simulator();
        test_mma_instructions();
    }
    if (want("layernorm")) {
        test_layernorm(37, 320);
        test_layernorm(16, 64);
        test_layernorm(2100, 64);  // column sums with the row count above 64 chunks of 32
        test_layernorm(9, 1024);
    }
    if (want("matmul")) {
        for (int fusion = 0; fusion <= 2; fusion++) test_matmul(24, 64, 96, fusion, 0, "");
        test_matmul(20, 40, 72, 2, sim_lt_epi_bit(CUBLASLT_EPILOGUE_GELU_AUX_BIAS) | sim_lt_epi_bit(CUBLASLT_EPILOGUE_DGELU),
                    "GELU_AUX_BIAS and DGELU");
        test_matmul(20, 40, 72, 2, sim_lt_epi_bit(CUBLASLT_EPILOGUE_BIAS) | sim_lt_epi_bit(CUBLASLT_EPILOGUE_GELU_AUX_BIAS), "BIAS and GELU_AUX_BIAS");
    }
    if (want("classifier")) {
        test_classifier(6, 1000, 1024, 1.0f / 6);
        test_classifier(3, 300, 384, 0.5f);
        test_classifier(2, 250, 256, 0.0f);
        test_classifier(1, 50257, 50304, 1.0f);
    }
    if (want("layernorm")) test_column_sums();
    if (want("adamw")) {
        test_adamw();
        test_adamw_chunks();
    }
    if (want("norm")) {
        test_global_norm(70001);
        test_global_norm(100);
        test_global_norm(300001);  // 37 blocks, more elements than their threads: the grid-stride loop
        // past global_norm_blocks' cap: the most blocks, and still the grid-stride loop
        test_global_norm((size_t)NORM_BLOCKS * NORM_THREADS * NORM_MIN_PER_THREAD + 12345);
    }
    if (want("encoder")) {
        test_encoder(2, 12, 64, 50);
        test_encoder(1, 5, 1024, 7);
    }
    if (want("attention")) {
        test_attention(2, 40, 2, 32, true);
        test_attention(1, 70, 2, 64, true);
        test_attention(2, 24, 3, 16, true);
        test_attention(1, 65, 1, 128, false);
        test_attention(1, 130, 1, 32, true);  // three query/key tiles, the last partial
        test_attention(1, 1, 2, 32, false);
    }
    if (want("structured")) {
        test_permute(37, 12, 8, 2, 0, 0, "16-byte, several rows per block, the last group partial");
        test_permute(21, 48, 32, 1, 8, 16, "16-byte, wider row strides");
        test_permute(19, 24, 4, 1, 0, 0, "16-byte loads across sub-rows of 4 (Monarch's u)");
        test_permute(23, 8, 3, 4, 8, 0, "16-byte loads across sub-rows of 12");
        test_permute(9, 7, 5, 3, 3, 1, "2-byte: odd sizes and strides");
        test_permute(3, 64, 128, 4, 0, 0, "one 64 KB row per block, over the 48 KB default");
        test_permute(5, 64, 100, 4, 0, 0, "a 50 KB row: the limit raised above stays");
        test_permute(2, 128, 256, 4, 0, 0, "a row over the opt-in: the scatter kernel");
        test_permute(37, 48, 32, 2, 8, 0, "16-byte, BTT-MoE's set path (rank 2)", 1);
        test_permute(9, 7, 5, 4, 3, 1, "2-byte", 1);
        test_permute(2, 128, 256, 4, 0, 0, "the scatter kernel", 1);
        test_btt(37, 4, 12, 8, 24, 2);   // 48 -> 192
        test_btt(29, 8, 24, 4, 12, 1);   // 192 -> 48
        test_btt(16, 12, 4, 6, 8, 4);    // 48 -> 48, non-default factors
        test_qkv_parts(37, 48);
        test_monarch(37, 64, 256, 4);
        test_monarch(21, 64, 64, 8);
        test_monarch(21, 64, 64, 2);
        test_monarch(13, 256, 64, 4);
        test_moe_group(300, 8, 64, 1, 0.0, "300 pairs, 8 experts, chunks of 32");
        test_moe_group(5000, 8, 128, 32, 0.7, "5000 pairs, 8 experts, 70% to the last, chunks of 1024 (the trainer's)");
        test_moe_group(2000, 1024, 16, 2, 0.0, "2000 pairs, 1024 experts (most empty), tiles of 16");
        test_moe_group(777, 3, 1, 3, 0.0, "777 pairs, 3 experts, tiles of 1 (no padding)");
        test_moe_group(64, 1, 64, 1, 0.0, "64 pairs, 1 expert, one whole tile");
        test_moe_group(1, 5, 64, 32, 0.0, "1 pair");
        // the gate step: per warp 48 KB / 8 / 2 = 3072 elements; 768 -> 3072 experts (P 32): all 48
        // gammas at once; 42 elements a warp for P·R = 21: 2 gammas a chunk, 5 = 2 + 2 + 1; 39 for
        // P·R = 40: straight
        test_moe_gate_t(48, 32, 1, 21, 19, 48 * 1024, 48);
        test_moe_gate_t(5, 7, 3, 13, 13, 8 * 42 * 2, 2);
        test_moe_gate_t(6, 40, 1, 11, 9, 8 * 39 * 2, 0);
        test_moe_gate_t(48, 32, 2, 21, 19, 48 * 1024, 48, 1);  // the set path, 2 and 4 experts a row, chunked and straight
        test_moe_gate_t(5, 8, 4, 13, 12, 8 * 8 * 4 * 2 * 2, 2, 1);
        test_moe_gate_t(6, 40, 2, 11, 9, 8 * 79 * 2, 0, 1);
        test_moe(150, 4, 12, 4, 12, 8, 2);  // 48 -> 48, 300 (token, k) pairs
        test_moe(37, 4, 12, 8, 24, 4, 3);   // 48 -> 192 top-3
        test_moe(20, 8, 24, 4, 12, 4, 1);   // 192 -> 48 top-1
        test_moe(300, 4, 12, 4, 12, 4, 2);  // 600 pairs over 4 experts: several 64-row tiles each, the last partial
        test_moe(100, 4, 12, 4, 12, 72, 2);  // 72 experts: dx in three passes (moe_dx_kernel takes up to 64), most experts empty
        for (int kind = 0; kind < 3; kind++) {
            test_structured_gelu(kind, 37, 0, "");
            test_structured_gelu(kind, 37, ~0u, " (cuBLASLt refuses the epilogues)");
        }
    }
    if (want("fused")) {
        test_btt_fused(37, 16, 4, 2, 32, 8, 0);      // 64 -> 64 rank 8, default tile rows, a partial tile
        test_btt_fused(70, 16, 4, 2, 32, 8, 16);     // tm 16: 5 tiles
        test_btt_fused(20, 16, 48, 32, 96, 1, 0);    // GPT-2 768 -> 3072 rank 1 (tm 64: 217 KB of shared memory)
        test_btt_fused(33, 32, 24, 16, 48, 2, 32);   // 768 -> 768 rank 2, tm 32
        test_btt_fused(16 * 1056 + 37, 16, 4, 2, 32, 8, 16);  // more tiles than resident blocks: the grid-stride tile loop
        test_btt_fused(40, 16, 48, 32, 96, 2, 0, 2); // 768 -> 3072 rank 2: tm 64 in 2 groups of 16 phi blocks
        test_btt_fused(70, 16, 48, 32, 96, 4, 0, 4); // rank 4: tm 64 in 4 groups of 8, a partial second tile
        test_btt_fused(21, 32, 64, 64, 128, 1, 0, 4); // 2048 -> 8192 rank 1: tm 64 in 4 groups (no whole z tile fits)
        test_btt_fused_mma(37, 16, 4, 2, 32, 8);     // 64 -> 64 rank 8 (4-byte z stores), a partial tile
        test_btt_fused_mma(20, 16, 48, 32, 96, 1);   // GPT-2 768 -> 3072 rank 1 (z pairs gr apart)
        test_btt_fused_mma(70, 16, 48, 32, 96, 4);   // rank 4, groups, a partial second tile
        test_btt_fused_mma(33, 48, 16, 16, 48, 2);   // 768 -> 768, alpha 48: 3 k-steps
        test_btt_fused_mma(45, 96, 32, 48, 16, 1);   // 3072 -> 768 as 768 -> 3072's backward runs it: eps 16 (one n-tile), 6 k-steps
        test_btt_fused_mma(40, 16, 48, 32, 96, 2, 32, 1, 2);  // 768 -> 3072 rank 2 at 32 rows: the whole z tile fits without the staging tile
        test_btt_fused_backward(37, 16, 4, 2, 32, 8);    // 64 -> 64 rank 8, a partial tile
        test_btt_fused_backward(20, 16, 48, 32, 96, 1);  // GPT-2 768 -> 3072 rank 1 (transposed: 3072 -> 768)
        test_btt_fused_backward(45, 16, 48, 32, 96, 2);  // rank 2
        test_btt_fused_backward(19, 48, 16, 16, 48, 1);  // 768 -> 768 with alpha 48, eps 48 (the transposed x chunks differ)
        test_btt_fused_backward(33, 32, 64, 64, 128, 1); // 2048 -> 8192 rank 1 (transposed: tm 32 in 2 groups)
        test_monarch(37, 64, 256, 4, 1);    // p 16, q 16, s 64: the largest u scatter stride relative to q; a partial tile
        test_monarch(40, 768, 3072, 4, 1);  // GPT-2 fc, Monarch 4 (p = q = 192, s = 768), two output steps of 2 n-tiles
        test_monarch(33, 768, 3072, 24, 1); // the benchmark's sqrt-Monarch at 768: nb 24 (p = q = 32, s = 128), q not a multiple of nb
        test_monarch(20, 512, 256, 8, 1);   // d_out < d_in: q = s = 32 < p = 64
        test_monarch(21, 3072, 768, 4, 1);  // GPT-2 proj, Monarch 4: p 768, q = s = 192
        test_monarch(100, 768, 3072, 4, 1); // 64-row tiles both ways (the backward in groups of 1): a full tile, a partial one
        test_monarch(100, 3072, 768, 4, 1); // GPT-2 proj at 64 rows: X_k of 24 vectors per thread, 8 prefetched, 16 loaded after
        test_monarch_btt_candidate();
        for (int sk : {2, 3, 5}) {          // as a BTT (monarch.h)
            test_monarch(37, 1024, 4096, 32, sk);  // the benchmark's sqrt-Monarch at 1024: rank 1 (p = q = 32, s = 128)
            test_monarch(70, 256, 256, 4, sk);     // rank 16 (p = q = s = 64): dR by a GEMM per block, 2 tiles of 64 rows
            test_monarch(21, 512, 2048, 8, sk);    // rank 8 (p = q = 64, s = 256), a partial tile
            test_monarch(40, 2048, 512, 8, sk);    // rank 2 (p = 256, q = s = 64)
            test_monarch_btt_declined(768, 3072, 4, sk, 0, 0);
            if (sk != 3) test_monarch_btt_declined(1024, 4096, 8, sk, 1, 0);  // (-sk 3's first stage alone reads no W1: it pays)
        }
        // the backward kernel's geometries. Model: L2 bytes per row = 2 (|L| + |R|) / tm + 2 d_out
        // ceil(nb / G), least wins (ties: more rows, larger groups); smem = tm (pad(G s) + pad(nb q))
        // 2 + 10240 with pad(c) = round_up(c, 64) + 8 (each part rounded up to 128 bytes).
        // 64 -> 256, nb 4 (|L| + |R| = 5120): 64 rows, one group (53 KB), a partial second tile
        test_monarch_fused_backward(70, 64, 256, 4, 227 * 1024, 64, 4);
        // 64 -> 1024, nb 4, 40 KB: 64 rows fit no group; 32 rows groups of 1 (4640 B/row); 16 rows
        // groups of 3 (3136, a short last group) ties 2 (3136): groups of 3
        test_monarch_fused_backward(37, 64, 1024, 4, 40 * 1024, 16, 3);
        // 768 -> 3072, nb 24, 44 KB: only 16 rows fit (du tile 24.8 KB), groups of 2 of 24 (vectors
        // with no column of the group are skipped)
        test_monarch_fused_backward(19, 768, 3072, 24, 44 * 1024, 16, 2);
        // 80 -> 320, nb 5, 16896 bytes: 16 rows, groups of 1 (vectors hold columns of every block)
        test_monarch_fused_backward(33, 80, 320, 5, 16896, 16, 1);
        // GPT-2 fc, 768 -> 3072 nb 4, an H100's 227 KB: 64 rows in groups of 1 (208.7 KB; 47616
        // B/row) beat 16 rows in one group (133.6 KB; 98304 B/row); the whole-tile rule takes the latter
        test_monarch_fused_backward(70, 768, 3072, 4, 227 * 1024, 64, 1);
        test_monarch_fused_backward(37, 768, 3072, 4, 227 * 1024, 16, 4, 1);
        // the traffic model, bytes per row (fused L2 / baseline DRAM). Forward: 2 (|L| + |R|) / tm +
        // 2 d_in against 2 (d_in + 4 urow + 5 d_out); backward: the geometry's model above against
        // 2 (3 d_out + 4 urow + d_in). 768 -> 3072 nb 4: forward tm 64 (135 KB): 24576 / 38400;
        // backward (64, 1): 47616 / 26112
        test_monarch_traffic(768, 3072, 4, 24576.0 / 38400, 1, 47616.0 / 26112, 1);
        // 2048 -> 8192 nb 4 (|L| + |R| = 5242880): forward tm 32 (175 KB): 331776 / 102400 = 3.24,
        // pays; backward (16, 2): 688128 / 69632 = 9.88, declined
        test_monarch_traffic(2048, 8192, 4, 331776.0 / 102400, 1, 688128.0 / 69632, 0);
        test_monarch_declined_dispatch();
        test_seg_wgrad(16, 16, 1);
        test_seg_wgrad(48, 96, 3);   // GPT-2 768 -> 3072 experts' dW1 shape (gamma x eps), 3 of its 32 f
        test_seg_wgrad(16, 32, 5);   // more batch entries than tiles per entry
        test_seg_wgrad(32, 16, 2, 2);  // through a grouping, K = 2 and 3
        test_seg_wgrad(16, 48, 3, 3);
        test_moe(150, 16, 16, 16, 16, 8, 2, 1);  // BTT-MoE 256 -> 256, every expert in one segmented launch
        test_moe(41, 16, 48, 32, 96, 8, 2, 1);   // GPT-2 768 -> 3072 experts (tm 64): partial tiles, maybe empty experts
        test_moe(30, 16, 16, 16, 32, 4, 1, 1);   // 256 -> 512 top-1
        test_moe(150, 16, 16, 16, 16, 8, 2, 2);  // the fused forward's z read by the tiled backward
        g_btt_wstage = g_btt_mma = 1;            // the segmented launches on mma.sync: W1 packed for every expert
        test_moe(41, 16, 48, 32, 96, 8, 2, 1);
        g_btt_wstage = g_btt_mma = 0;
        // grouped by set (-mg 1): on the plans, on the fused kernels both ways (W0 staged; on
        // mma.sync), and the fused forward's z (padding rows NaN) under the plans' backward
        test_moe(150, 16, 16, 16, 16, 8, 2, 0, 1);
        g_btt_wstage = 1;
        test_moe(150, 16, 16, 16, 16, 8, 2, 1, 1);
        test_moe(60, 16, 48, 32, 96, 4, 2, 1, 1);
        g_btt_mma = 1;
        test_moe(60, 16, 48, 32, 96, 4, 2, 1, 1);
        g_btt_wstage = g_btt_mma = 0;
        test_moe(150, 16, 16, 16, 16, 8, 2, 2, 1);
        // BTT-MoE by set, fused (-mg 1 -sk 1, 2, 5): gates between the stages, each kernel
        for (int v = 0; v < 3; v++) test_btt_fused_gate(150, 16, 16, 16, 16, 2, 28, v > 0, v == 2);  // 256 -> 256, 8 experts top 2
        test_btt_fused_gate(90, 16, 48, 32, 96, 2, 6, 1, 1);   // GPT-2 768 -> 3072, 4 experts top 2 (6 sets)
        test_btt_fused_gate(70, 16, 16, 16, 16, 4, 15, 0, 0);  // 6 experts top 4: rank 4
        test_btt_fused_gate(70, 16, 16, 16, 16, 4, 15, 1, 1);
        // the backward's order (the transposed BTT of the set path: dZu saved, then gated for dx)
        test_btt_fused_gate(150, 16, 16, 16, 16, 2, 28, 1, 0, 1);
        test_btt_fused_gate(90, 32, 96, 16, 48, 2, 6, 1, 1, 1);  // 3072 -> 768: the transposed BTT of 768 -> 3072's sets
    }
    if (want("order")) test_random_order();
    return test_summary();
}
