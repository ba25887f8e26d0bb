// dev/cuda/monarch_backward.cu: the Monarch linear layer's backward (dx, dR, dL; structured/monarch.h's
// math and layouts) on the GPU:
//   v1  baseline: monarch_backward_gpu with -sk 0: permute dy into dyt, GEMM dUt = dYt L, permute
//       into du, GEMM dx = dU R, then the dL and dR GEMMs on dyt and du
//   v2  fused: monarch_backward_gpu with -sk 1: dx, du and dyt from ONE launch of monarch_fused.cuh's
//       backward kernel (du on chip, dy read once where the whole dyt tile fits), then the same dL
//       and dR GEMMs; the geometry (rows per tile, blocks per group) by the kernel's L2-traffic model
//   v3  v2 with the whole-tile rule instead (g_monarch_bwd_whole_tile: every block in one group,
//       32 or 16 rows): which of the two choices is right is for this program to say on a GPU
//   v4  on the BTT kernel, -sk 2 (monarch_gpu.cuh; where nb divides q the Monarch is a BTT,
//       structured/monarch.h): dy permuted into dyt, the transposed BTT's kernel (W0 staged) on it
//       writes dx and du with each block's rows reordered, permuted back (rank > 1), then the same
//       dL and dR GEMMs. Declined where the staged kernel cannot take the shape (the trainer then
//       runs v2)
//   v5  v4 with the BTT kernel on mma.sync (-sk 5)
// v2 and v3 run even where the trainer's dispatch would decline the kernel (g_monarch_fused_force),
// with the traffic model's figures printed, so that this program measures where the model's bound
// (MF_MAX_L2_PER_DRAM) should be.
// and, as the number to beat, the dense layer's backward of the same shape (matmul_backward, v0).
// The cores are passed 16 bytes off a 32-byte boundary, as parameters in the trainer's flat buffer
// may be: v2 then copies them aligned (|R| + |L| elements), and that copy is timed with it.
//
// Shapes (N = 32768 rows by default): 768 -> 3072 with 4 and 24 blocks, 1024 -> 4096 with 4, 8 and 32,
// 3072 -> 768 with 4, 2048 -> 8192 with 4 (its dyt tile does not fit: groups of blocks).
// flops = 4 N (|R| + |L|) (dx and the weight gradients); bytes = the minimum: dy, x, u read, dx
// written, the cores read and their gradients written once (bf16).
//
// Checks (every version), at Nc = 1024 rows (the weight gradients sum over every row), against monarch.h's fp32
// monarch_backward on the bf16 inputs and on their absolute values (the _abs sums) for the bounds,
// with u = 2^-8:
//   dx: du rounded once, dx accumulated in fp32 and rounded once: u |dx| + 1.02 u dx_abs
//   dL = dYtᵀ Ut with the forward's bf16 u: u |dL| + 2.05 u dL_abs (+ 2^-16 for the fp32 sum)
//   dR = dUᵀ X with du rounded: u |dR| + 2.05 u dR_abs
// (the gradients start at zero; monarch_backward_gpu accumulates into them). Also at Nc - 13 rows:
// dx's last row, and nothing written at or past row Nc - 13.
//
// Build: make -C dev/cuda monarch_backward    Run: ./dev/cuda/monarch_backward [version (0: all) [N]]
#include "harness.cuh"
#include "cuda/matmul.cuh"
#include "structured/structured.cuh"

#define NV 5
#define U_BF16 (1.0 / 256.0)

typedef struct { int d_in, d_out, nb; } Case;

int main(int argc, char **argv) {
    gpu_init(0);
    const int v = dev_version_arg(argc, argv, NV);
    const int N = argc > 2 ? atoi(argv[2]) : 32768, Nc = N < 1024 ? N : 1024, tail = 13;
    if (N < 32 || N % 8) { fprintf(stderr, "error: N = %s: use a multiple of 8, at least 32\n", argc > 2 ? argv[2] : "?"); return 1; }
    const Case cases[] = {{768, 3072, 4}, {768, 3072, 24}, {1024, 4096, 4}, {1024, 4096, 8}, {1024, 4096, 32}, {3072, 768, 4}, {2048, 8192, 4}};
    printf("monarch_backward: Monarch backward, baseline (cuBLAS) vs fused dx (du on chip), on %s\n", g_gpu.prop.name);
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        MonarchShape m;
        monarch_shape(&m, cases[ci].d_in, cases[ci].d_out, cases[ci].nb);
        const int din = m.d_in, dout = m.d_out;
        const size_t urow = monarch_u_row(&m), nr_ = monarch_r_size(&m), nl = monarch_l_size(&m);
        const size_t NX = (size_t)N * din, NY = (size_t)N * dout, NU = (size_t)N * urow;
        printf("-- %d -> %d, %d blocks: p %d q %d s %d, |R| %zu |L| %zu (dense %zu), N %d\n", din, dout, m.nb, m.p, m.q, m.s, nr_, nl,
               (size_t)din * dout, N);
        int ok[2];  // [whole-tile rule]: the fused kernel takes the shape
        for (int w = 0; w < 2; w++) {
            MbGeom g;
            g_monarch_bwd_whole_tile = w;
            ok[w] = monarch_fused_bwd_choose(&g, &m, btt_fused_smem_limit());
            if (ok[w])
                printf("   v%d geometry: %d rows per tile, groups of %d of %d blocks, %d bytes of shared memory, %.1f KB of L2 reads per row "
                       "(model; baseline %.1f KB of DRAM, ratio %.2f)%s\n",
                       2 + w, g.tm, g.G, m.nb, g.smem_bytes, mb_l2_bytes_per_row(&g) / 1024.0, monarch_baseline_bytes_per_row(&m, 1) / 1024.0,
                       mb_l2_bytes_per_row(&g) / monarch_baseline_bytes_per_row(&m, 1),
                       w == 0 && !monarch_fused_bwd_pays(&g, &m) ? ": the trainer declines it (over MF_MAX_L2_PER_DRAM)" : "");
        }
        g_monarch_bwd_whole_tile = 0;
        float ar = sqrtf(3.0f / m.p), al = sqrtf(3.0f / m.q), ad = sqrtf(3.0f / din);
        float *x = dev_random(NX, -1.0f, 1.0f), *dy = dev_random(NY, -1.0f, 1.0f), *R = dev_random(nr_, -ar, ar), *L = dev_random(nl, -al, al);
        float *wd = dev_random((size_t)dout * din, -ad, ad);
        dev_round_bf16(x, NX); dev_round_bf16(dy, NY); dev_round_bf16(R, nr_); dev_round_bf16(L, nl); dev_round_bf16(wd, (size_t)dout * din);

        // references on the first Nc rows: values, and the same on absolute values for the bounds
        float *xa = dev_fabs_copy(x, (size_t)Nc * din), *dya = dev_fabs_copy(dy, (size_t)Nc * dout), *Ra = dev_fabs_copy(R, nr_), *La = dev_fabs_copy(L, nl);
        float *yr = (float *)malloc((size_t)Nc * dout * 4), *ur = (float *)malloc((size_t)Nc * urow * 4), *ua = (float *)malloc((size_t)Nc * urow * 4);
        float *dxr = (float *)malloc((size_t)Nc * din * 4), *dxa = (float *)malloc((size_t)Nc * din * 4), *scr = (float *)malloc(monarch_scratch_size(&m, Nc) * 4);
        float *dRr = (float *)calloc(nr_, 4), *dLr = (float *)calloc(nl, 4), *dRa = (float *)calloc(nr_, 4), *dLa = (float *)calloc(nl, 4);
        monarch_forward(yr, ur, x, R, L, NULL, Nc, &m);
        monarch_backward(dxr, dRr, dLr, NULL, dy, x, ur, R, L, Nc, &m, scr);
        monarch_forward(yr, ua, xa, Ra, La, NULL, Nc, &m);
        monarch_backward(dxa, dRa, dLa, NULL, dya, xa, ua, Ra, La, Nc, &m, scr);
        float *e_dx = (float *)malloc((size_t)Nc * din * 4), *eR = (float *)malloc(nr_ * 4), *eL = (float *)malloc(nl * 4);
        for (size_t i = 0; i < (size_t)Nc * din; i++) e_dx[i] = (float)(U_BF16 * fabs(dxr[i]) + 1.02 * U_BF16 * dxa[i] + 1e-6);
        for (size_t i = 0; i < nr_; i++) eR[i] = (float)(U_BF16 * fabs(dRr[i]) + (2.05 * U_BF16 + 1.0 / 65536) * dRa[i] + 1e-6);
        for (size_t i = 0; i < nl; i++) eL[i] = (float)(U_BF16 * fabs(dLr[i]) + (2.05 * U_BF16 + 1.0 / 65536) * dLa[i] + 1e-6);

        // the cores 16 bytes past a 32-byte boundary (as in the trainer's parameter buffer)
        floatX *d_x = dev_upload_bf16(x, NX), *d_dy = dev_upload_bf16(dy, NY), *d_wd = dev_upload_bf16(wd, (size_t)dout * din);
        floatX *d_Rb, *d_Lb, *d_y, *d_u, *d_dx, *d_dR, *d_dL, *d_dwd, *d_s;
        cudaCheck(cudaMalloc(&d_Rb, (nr_ + 8) * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_Lb, (nl + 8) * sizeof(floatX)));
        floatX *d_R = d_Rb + 8, *d_L = d_Lb + 8;
        dev_copy_bf16(d_R, R, nr_);
        dev_copy_bf16(d_L, L, nl);
        cudaCheck(cudaMalloc(&d_y, NY * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_u, NU * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dx, NX * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dR, nr_ * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dL, nl * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dwd, (size_t)dout * din * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_s, monarch_gpu_scratch_elems(&m, N) * sizeof(floatX)));
        g_st_fused = 0;
        monarch_forward_gpu(d_y, d_u, d_x, d_R, d_L, NULL, N, &m, d_s);  // the saved u both versions read
        const double flops = 4.0 * N * (double)(nr_ + nl), bytes = 2.0 * ((double)NY + NX + NU + NX + 2.0 * (nr_ + nl));
        char what[160];
        auto dense = [&]() { matmul_backward(d_dx, d_dwd, NULL, d_dy, d_x, d_wd, N, din, dout, NULL, NULL); };
        const float ms_dense = dev_time_ms(dense);
        snprintf(what, sizeof(what), "dense bwd %d->%d (unchecked)", din, dout);
        dev_report(what, 0, ms_dense, 2.0 * (2.0 * NX + NY + 2.0 * din * dout), 4.0 * N * (double)din * dout, 0.0f);
        float ms[NV + 1] = {0};
        for (int ver = 1; ver <= NV; ver++) {
            if (v && v != ver) continue;
            const int as_btt = ver >= 4;
            st_set_kernels(ver == 4 ? 2 : ver == 5 ? 5 : ver >= 2);
            g_monarch_fused_force = ver >= 2;
            g_monarch_bwd_whole_tile = ver == 3;
            BTTShape bs;
            if (as_btt && !monarch_btt_pays(&bs, &m, 1)) {
                printf("   v%d: the BTT kernel does not take this Monarch (nb does not divide q, or W0's slices outgrow the staging)\n", ver);
                continue;
            }
            if (as_btt) printf("   v%d: the transposed BTT of rank %d (alpha %d, eps %d)\n", ver, bs.rank, bs.alpha, bs.eps);
            if (ver >= 2 && !as_btt && !ok[ver - 2]) {
                printf("   v2: the fused kernel does not take this shape here; the trainer falls back to v1\n");
                continue;
            }
            const long btt_runs = g_monarch_btt_runs;
            int ran = -1;
            auto run = [&](int n) { ran = monarch_backward_gpu(d_dx, d_dR, d_dL, NULL, d_dy, d_x, d_u, d_R, d_L, n, &m, d_s, NULL); };
            cudaCheck(cudaMemset(d_dx, 0xFF, NX * sizeof(floatX)));  // NaN: dx must be written
            cudaCheck(cudaMemset(d_dR, 0, nr_ * sizeof(floatX)));     // the gradients accumulate
            cudaCheck(cudaMemset(d_dL, 0, nl * sizeof(floatX)));
            run(Nc);
            cudaCheck(cudaDeviceSynchronize());
            if (ran != (ver >= 2)) { g_dev_fail++; printf("FAIL v%d: monarch_backward_gpu ran the %s path\n", ver, ran ? "fused" : "cuBLAS"); }
            if ((g_monarch_btt_runs != btt_runs) != as_btt) { g_dev_fail++; printf("FAIL v%d: the BTT kernel %s\n", ver, as_btt ? "did not run" : "ran"); }
            float *gdx = dev_download_bf16(d_dx, (size_t)Nc * din), *gR = dev_download_bf16(d_dR, nr_), *gL = dev_download_bf16(d_dL, nl);
            snprintf(what, sizeof(what), "v%d %d->%d nb %d dx", ver, din, dout, m.nb);
            float e = dev_check_bounded(what, gdx, dxr, e_dx, (size_t)Nc * din);
            snprintf(what, sizeof(what), "v%d %d->%d nb %d dR", ver, din, dout, m.nb);
            float e_r = dev_check_bounded(what, gR, dRr, eR, nr_);
            snprintf(what, sizeof(what), "v%d %d->%d nb %d dL", ver, din, dout, m.nb);
            float e_l = dev_check_bounded(what, gL, dLr, eL, nl);
            free(gR); free(gL);
            // Nc - tail rows: the last row's dx, and nothing written at or past it
            const int Nt = Nc - tail, last = Nt - 1;
            cudaCheck(cudaMemset(d_dx, 0xFF, NX * sizeof(floatX)));
            run(Nt);
            cudaCheck(cudaDeviceSynchronize());
            float *ldx = dev_download_rows(d_dx, &last, 1, din);
            snprintf(what, sizeof(what), "v%d %d->%d nb %d dx row %d (the last of N %d)", ver, din, dout, m.nb, last, Nt);
            dev_check_bounded(what, ldx, dxr + (size_t)last * din, e_dx + (size_t)last * din, din);
            if (dev_rows_untouched(d_dx, Nt, Nc, din)) g_dev_pass++;
            else { g_dev_fail++; printf("FAIL v%d %d->%d nb %d: rows >= N %d of dx were written\n", ver, din, dout, m.nb, Nt); }
            free(gdx); free(ldx);
            ms[ver] = dev_time_ms([&]() { run(N); });
            snprintf(what, sizeof(what), "bwd %d->%d nb %d", din, dout, m.nb);
            dev_report(what, ver, ms[ver], bytes, flops, fmaxf(e, fmaxf(e_r, e_l)));
        }
        st_set_kernels(0);
        g_monarch_fused_force = 0;
        g_monarch_bwd_whole_tile = 0;
        for (int ver = 4; ver <= NV; ver++)
            if (ms[ver] > 0) printf("   speedup v%d (on the BTT kernel) over baseline (v1): %.2fx, over the Monarch kernel (v2): %.2fx; dense / v%d: %.2fx\n", ver,
                                    ms[1] > 0 ? ms[1] / ms[ver] : 0.0, ms[2] > 0 ? ms[2] / ms[ver] : 0.0, ver, ms_dense / ms[ver]);
        if (ms[1] > 0) printf("   ratio dense / baseline (v1): %.2fx\n", ms_dense / ms[1]);
        if (ms[2] > 0) printf("   ratio dense / fused (v2): %.2fx\n", ms_dense / ms[2]);
        if (ms[1] > 0 && ms[2] > 0) printf("   speedup fused (v2) over baseline (v1): %.2fx\n", ms[1] / ms[2]);
        if (ms[3] > 0 && ms[2] > 0) printf("   speedup traffic-model geometry (v2) over whole-tile rule (v3): %.2fx\n", ms[3] / ms[2]);
        void *dev[] = {d_x, d_dy, d_Rb, d_Lb, d_wd, d_y, d_u, d_dx, d_dR, d_dL, d_dwd, d_s};
        for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++) cudaCheck(cudaFree(dev[i]));
        free(x); free(dy); free(R); free(L); free(wd); free(xa); free(dya); free(Ra); free(La); free(yr); free(ur); free(ua);
        free(dxr); free(dxa); free(scr); free(dRr); free(dLr); free(dRa); free(dLa); free(e_dx); free(eR); free(eL);
    }
    return dev_summary();
}
