// dev/cuda/btt_backward.cu: the BTT linear layer's backward (dx, dW0, dW1; structured/btt.h's math)
// on the GPU:
//   v1  baseline: btt_backward_gpu with -sk 0: GEMM dZ = dY W1ᵀ, permute, GEMM dx, then the dW GEMMs
//   v2  fused: btt_backward_gpu with -sk 1: the cores transposed (two small kernels), then dx and dZ
//       from ONE launch of btt_fused.cuh's kernel on dy (the forward of the transposed BTT, btt.h),
//       then the same dW GEMMs
//   v3  v2 with the fused kernel's W0 staged in shared memory (-sk 2; btt_tiles.h ws): the
//       transposed BTT's W0 is W1ᵀ, whose stage 1 has K = eps (96 at 768 -> 3072: 6 k-steps of B
//       fragments from L2 per item in v2)
//   v4  split (-sk 3): the transposed cores, the fused kernel's stage 1 alone on dy (W0 staged) for
//       T1 = dZ, then dx and the dW GEMMs from T1 on cuBLAS (the plans without GEMM dZ and the permute)
//   v5, v6: v3 and v4 with the kernel on raw mma.sync (g_btt_mma, cuda/mma.cuh; v5 both stages,
//       v6 stage 1 alone; not yet run on a GPU): btt_forward's v13 and v14 on the transposed BTT
// and, as the number to beat, the dense layer's backward of the same shape (matmul_backward, v0).
// Shapes (N = 32768 rows by default): 768 -> 3072 rank 1, 2, 4, 3072 -> 768 rank 1, 2048 -> 8192
// rank 2 and 4096 -> 16384 rank 1 (the fused kernel in groups of output blocks), default factors.
// flops = 4 N (|W0| + |W1|) (dx and the weight gradients); bytes = the minimum: dy, x, z read, dx
// written, the cores read and their gradients written once (bf16).
//
// Checks, at Nc = 1024 rows (the weight gradients sum over every row), against btt.h's fp32
// btt_backward on the bf16 inputs and on their absolute values (the _abs sums) for the bounds,
// with u = 2^-8:
//   dx: dZ rounded once, dx accumulated in fp32 and rounded once: u |dx| + 1.02 u dx_abs
//   dW1 = Zᵀ dY with the forward's bf16 z: u |dW1| + 2.05 u dW1_abs (+ 2^-16 for the fp32 sum)
//   dW0 = Xᵀ dZ with dZ rounded: u |dW0| + 2.05 u dW0_abs
// (the gradients start at zero; btt_backward_gpu accumulates into them).
//
// Build: make -C dev/cuda btt_backward    Run: ./dev/cuda/btt_backward [version (0: all) [N]]
#define BT_MMA_STAGE1_CANDIDATE 1  // stage 1 alone on mma.sync too (v6; v5, both stages, is -sk 5)
#include "harness.cuh"
#include "cuda/matmul.cuh"
#include "structured/structured.cuh"

#define NV 6
#define U_BF16 (1.0 / 256.0)

typedef struct { int d_in, d_out, rank; } Case;

int main(int argc, char **argv) {
    gpu_init(0);
    const int v = dev_version_arg(argc, argv, NV);
    const int N = argc > 2 ? atoi(argv[2]) : 32768, Nc = N < 1024 ? N : 1024;
    if (N < 16 || N % 8) { fprintf(stderr, "error: N = %s: use a multiple of 8, at least 16\n", argc > 2 ? argv[2] : "?"); return 1; }
    const Case cases[] = {{768, 3072, 1}, {768, 3072, 2}, {768, 3072, 4}, {3072, 768, 1}, {2048, 8192, 2}, {4096, 16384, 1}};
    printf("btt_backward: BTT backward, baseline (cuBLAS) vs fused dx (transposed BTT), on %s\n", g_gpu.prop.name);
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        BTTShape s;
        btt_shape_default(&s, cases[ci].d_in, cases[ci].d_out, cases[ci].rank);
        const BTTShape ts = btt_shape_transposed(&s);
        const int din = s.d_in, dout = s.d_out;
        const size_t zrow = btt_z_row(&s), n0 = btt_w0_size(&s), n1 = btt_w1_size(&s);
        const size_t NX = (size_t)N * din, NY = (size_t)N * dout, NZ = (size_t)N * zrow;
        BtGeom tg;
        const int tg_ok = btt_fused_geom(&tg, &ts, btt_fused_smem_limit(), 0);
        printf("-- %d -> %d rank %d: zrow %zu, |W0| %zu |W1| %zu, N %d; fused (transposed shape) tile rows %d in %d group(s), %d stage-1 items "
               "per x chunk for %d warps\n",
               din, dout, s.rank, zrow, n0, n1, N, tg_ok ? tg.tm : 0, tg_ok ? tg.npg : 0, tg_ok ? bt_s1_items(&tg) : 0, BT_WARPS);
        float a0 = sqrtf(3.0f / s.alpha), a1 = sqrtf(3.0f / (s.gamma * s.rank)), ad = sqrtf(3.0f / din);
        float *x = dev_random(NX, -1.0f, 1.0f), *dy = dev_random(NY, -1.0f, 1.0f), *W0 = dev_random(n0, -a0, a0), *W1 = dev_random(n1, -a1, a1);
        float *wd = dev_random((size_t)dout * din, -ad, ad);
        dev_round_bf16(x, NX); dev_round_bf16(dy, NY); dev_round_bf16(W0, n0); dev_round_bf16(W1, n1); dev_round_bf16(wd, (size_t)dout * din);

        // references on the first Nc rows: values, and the same on absolute values for the bounds
        float *xa = dev_fabs_copy(x, (size_t)Nc * din), *dya = dev_fabs_copy(dy, (size_t)Nc * dout), *W0a = dev_fabs_copy(W0, n0), *W1a = dev_fabs_copy(W1, n1);
        float *yr = (float *)malloc((size_t)Nc * dout * 4), *zr = (float *)malloc((size_t)Nc * zrow * 4), *za = (float *)malloc((size_t)Nc * zrow * 4);
        float *dxr = (float *)malloc((size_t)Nc * din * 4), *dxa = (float *)malloc((size_t)Nc * din * 4), *scr = (float *)malloc(btt_scratch_size(&s, Nc) * 4);
        float *d0r = (float *)calloc(n0, 4), *d1r = (float *)calloc(n1, 4), *d0a = (float *)calloc(n0, 4), *d1a = (float *)calloc(n1, 4);
        btt_forward(yr, zr, x, W0, W1, NULL, Nc, &s);
        btt_backward(dxr, d0r, d1r, NULL, dy, x, zr, W0, W1, Nc, &s, scr);
        btt_forward(yr, za, xa, W0a, W1a, NULL, Nc, &s);
        btt_backward(dxa, d0a, d1a, NULL, dya, xa, za, W0a, W1a, Nc, &s, scr);
        float *e_dx = (float *)malloc((size_t)Nc * din * 4), *e0 = (float *)malloc(n0 * 4), *e1 = (float *)malloc(n1 * 4);
        for (size_t i = 0; i < (size_t)Nc * din; i++) e_dx[i] = (float)(U_BF16 * fabs(dxr[i]) + 1.02 * U_BF16 * dxa[i] + 1e-6);
        for (size_t i = 0; i < n0; i++) e0[i] = (float)(U_BF16 * fabs(d0r[i]) + (2.05 * U_BF16 + 1.0 / 65536) * d0a[i] + 1e-6);
        for (size_t i = 0; i < n1; i++) e1[i] = (float)(U_BF16 * fabs(d1r[i]) + (2.05 * U_BF16 + 1.0 / 65536) * d1a[i] + 1e-6);

        floatX *d_x = dev_upload_bf16(x, NX), *d_dy = dev_upload_bf16(dy, NY), *d_W0 = dev_upload_bf16(W0, n0), *d_W1 = dev_upload_bf16(W1, n1);
        floatX *d_wd = dev_upload_bf16(wd, (size_t)dout * din), *d_y, *d_z, *d_dx, *d_dW0, *d_dW1, *d_dwd, *d_s;
        cudaCheck(cudaMalloc(&d_y, NY * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_z, NZ * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dx, NX * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dW0, n0 * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dW1, n1 * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dwd, (size_t)dout * din * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_s, btt_gpu_scratch_elems(&s, N) * sizeof(floatX)));
        g_st_fused = 0;
        btt_forward_gpu(d_y, d_z, d_x, d_W0, d_W1, NULL, N, &s, d_s);  // the saved z both versions read
        const double flops = 4.0 * N * (double)(n0 + n1), bytes = 2.0 * ((double)NY + NX + NZ + NX + 2.0 * (n0 + n1));
        char what[160];
        auto dense = [&]() { matmul_backward(d_dx, d_dwd, NULL, d_dy, d_x, d_wd, N, din, dout, NULL, NULL); };
        const float ms_dense = dev_time_ms(dense);
        snprintf(what, sizeof(what), "dense bwd %d->%d (unchecked)", din, dout);
        dev_report(what, 0, ms_dense, 2.0 * (2.0 * NX + NY + 2.0 * din * dout), 4.0 * N * (double)din * dout, 0.0f);
        float ms[NV + 1] = {0};
        for (int ver = 1; ver <= NV; ver++) {
            if (v && v != ver) continue;
            st_set_kernels(ver >= 5 ? ver - 3 : ver >= 2 ? ver - 1 : 0);  // v5, v6: -sk 2, 3
            g_btt_mma = ver >= 5;
            if (ver >= 2 && !btt_fused_supported(&ts, btt_fused_smem_limit())) {
                printf("   v%d: the fused kernel does not take the transposed shape here; the trainer falls back to v1\n", ver);
                continue;
            }
            int ran = -1;
            long split = 0;
            auto run = [&](int n) {
                const long before = g_st_split_runs;
                ran = btt_backward_gpu(d_dx, d_dW0, d_dW1, NULL, d_dy, d_x, d_z, d_W0, d_W1, n, &s, d_s, NULL);
                split = g_st_split_runs - before;
            };
            cudaCheck(cudaMemset(d_dx, 0xFF, NX * sizeof(floatX)));  // NaN: dx must be written
            cudaCheck(cudaMemset(d_dW0, 0, n0 * sizeof(floatX)));     // the gradients accumulate
            cudaCheck(cudaMemset(d_dW1, 0, n1 * sizeof(floatX)));
            run(Nc);
            cudaCheck(cudaDeviceSynchronize());
            if (ran != (ver == 2 || ver == 3 || ver == 5) || split != (ver == 4 || ver == 6)) {
                g_dev_fail++;
                printf("FAIL v%d: btt_backward_gpu ran the %s path\n", ver, ran ? "fused" : split ? "split" : "cuBLAS");
            }
            float *gdx = dev_download_bf16(d_dx, (size_t)Nc * din), *g0 = dev_download_bf16(d_dW0, n0), *g1 = dev_download_bf16(d_dW1, n1);
            snprintf(what, sizeof(what), "v%d %d->%d r%d dx", ver, din, dout, s.rank);
            float e = dev_check_bounded(what, gdx, dxr, e_dx, (size_t)Nc * din);
            snprintf(what, sizeof(what), "v%d %d->%d r%d dW0", ver, din, dout, s.rank);
            float e_0 = dev_check_bounded(what, g0, d0r, e0, n0);
            snprintf(what, sizeof(what), "v%d %d->%d r%d dW1", ver, din, dout, s.rank);
            float e_1 = dev_check_bounded(what, g1, d1r, e1, n1);
            free(gdx); free(g0); free(g1);
            ms[ver] = dev_time_ms([&]() { run(N); });
            snprintf(what, sizeof(what), "bwd %d->%d r%d", din, dout, s.rank);
            dev_report(what, ver, ms[ver], bytes, flops, fmaxf(e, fmaxf(e_0, e_1)));
        }
        st_set_kernels(0);
        g_btt_mma = 0;
        if (ms[1] > 0) printf("   ratio dense / baseline (v1): %.2fx\n", ms_dense / ms[1]);
        if (ms[2] > 0) printf("   ratio dense / fused (v2): %.2fx\n", ms_dense / ms[2]);
        if (ms[1] > 0 && ms[2] > 0) printf("   speedup fused (v2) over baseline (v1): %.2fx\n", ms[1] / ms[2]);
        if (ms[3] > 0) printf("   ratio dense / W0 staged (v3): %.2fx; speedup v3 over baseline (v1): %.2fx\n", ms_dense / ms[3], ms[1] > 0 ? ms[1] / ms[3] : 0.0);
        if (ms[4] > 0) printf("   ratio dense / split (v4): %.2fx; speedup v4 over baseline (v1): %.2fx\n", ms_dense / ms[4], ms[1] > 0 ? ms[1] / ms[4] : 0.0);
        if (ms[5] > 0 && ms[3] > 0) printf("   speedup on mma.sync, both stages (v5), over v3: %.2fx; ratio dense / v5: %.2fx\n", ms[3] / ms[5], ms_dense / ms[5]);
        if (ms[6] > 0 && ms[4] > 0) printf("   speedup stage 1 on mma.sync (v6) over v4: %.2fx; ratio dense / v6: %.2fx\n", ms[4] / ms[6], ms_dense / ms[6]);
        void *dev[] = {d_x, d_dy, d_W0, d_W1, d_wd, d_y, d_z, d_dx, d_dW0, d_dW1, d_dwd, d_s};
        for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++) cudaCheck(cudaFree(dev[i]));
        free(x); free(dy); free(W0); free(W1); free(wd); free(xa); free(dya); free(W0a); free(W1a); free(yr); free(zr); free(za);
        free(dxr); free(dxa); free(scr); free(d0r); free(d1r); free(d0a); free(d1a); free(e_dx); free(e0); free(e1);
    }
    return dev_summary();
}
