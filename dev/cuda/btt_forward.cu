// dev/cuda/btt_forward.cu: the BTT linear layer's forward, y = BTT(x) + bias with the saved z
// (structured/btt.h's math and layouts), on the GPU:
//   v1  baseline: btt_forward_gpu (structured/btt_gpu.cuh): strided-batched cuBLAS GEMM into T1
//       (N, gamma, phi, rho), permute kernel into z (N, phi, gamma, rho), strided-batched GEMM into
//       y, bias kernel — z and T1 round-trip through DRAM
//   v2  fused: btt_forward_fused (structured/btt_fused.cuh): one kernel, z stays in shared memory
//       (tile rows tm and groups of phi blocks chosen for the device: the traffic model's largest
//       groups per tm, common/btt_tiles.h bt_choose_per_tm, then the most blocks resident per SM
//       among those within 2.5x of the least modelled bytes, bt_pick_resident), written to DRAM
//       only when saved
//   v3, v4, v5: the fused kernel with tm forced to 16, 32, 64 (tuning; skipped where it does not fit)
//   v6  the fused kernel with the rule before groups (g_btt_whole_z: the largest tm whose whole z
//       tile fits; nothing at 4096 -> 16384), to measure what the model's geometry gains
//   v7  the fused kernel with W0 staged (g_btt_wstage, the trainer's -sk 2; btt_tiles.h ws): each x
//       chunk's slice of W0 goes to shared memory with the chunk, stage 2 prefetches an item's
//       first W1 fragments during the item before
//   v8  v7 with tm forced to 16 (more blocks per SM: v3 was the fastest at 3072 -> 768 on an H200)
//   v9  v7's stage 1 alone (btt_stage1_fused): x -> the saved z, no y; z checked, timed (the part of
//       v7 that is not stage 2; and the first half of v10)
//   v10 split (btt_forward_gpu with -sk 3): v9, then y = Z_f W1[f] + bias on cuBLAS from z (the
//       plans' last GEMM): the plans without their T1 round trip and permute
//   v11, v12: v9 with tm forced to 16, 32 (stage 1 alone fits 128 registers: two blocks per SM where
//       shared memory allows)
//   v13 v7 on raw mma.sync (g_btt_mma; cuda/mma.cuh): stage 1's x and W0 fragments by ldmatrix,
//       each lane's accumulators rounded and stored straight into the z tile (no fp32 staging tile,
//       no warp barriers per 16x16 item); stage 2's z fragments by ldmatrix and W1 packed in
//       B-fragment order (btt_tiles.h bt_w1p_src; packed before each launch, timed with it: one
//       coalesced 16-byte load per lane and n-tile), y out through a quad transpose in registers
//       as 16-byte stores; both written 2026-12-06, not yet run on a GPU
//   v14 v9 (stage 1 alone) the same way
// and, as the number to beat, the dense cuBLASLt layer of the same shape (matmul_forward, v0).
// The fused versions run twice: saving z (training) and without z (inference); each is also
// checked at N - 13 rows (a partial last tile) for its values and for not writing past row N - 13.
//
// Shapes (N = 32768 rows = B*T of 32 x 1024): 768 -> 3072 rank 1, 2, 4, 3072 -> 768 rank 1,
// 2048 -> 8192 rank 2 and 4096 -> 16384 rank 1 with the default factors (768 = 16 x 48,
// 3072 = 32 x 96, 2048 = 32 x 64, 8192 = 64 x 128, 4096 = 64 x 64, 16384 = 128 x 128).
// flops = 2 N (|W0| + |W1|) (the dense line: 2 N d_in d_out); bytes = the minimum: x, W0, W1, bias,
// y (and z when saved), bf16.
//
// Reference: btt.h's fp32 btt_forward on the bf16-rounded inputs, on a sample of rows (every 41st
// and the last), and btt_forward on absolute values for the bounds (z_abs = Σ|W0||x|, y_abs =
// Σ|W1| z_abs). With u = 2^-8 (bf16 round to nearest, relative):
//   z (every version: fp32 accumulation, one rounding): |z - z_ref| <= u |z_ref| + 2^-16 z_abs
//   y fused (z rounded, fp32 accumulation, + bias, one rounding): u |y_ref| + 1.02 u y_abs
//   y baseline (the same, but y is rounded before the bias kernel adds the bias and rounds again):
//     u (|y_ref| + |y_ref - bias|) + 1.02 u y_abs
// (2^-16 covers any fp32 summation order of <= 192 terms; see tests/test_btt_tiles.c, which checks the
// fused kernel's exact tiling against the same bounds on the CPU.)
//
// Build: make -C dev/cuda btt_forward    Run: ./dev/cuda/btt_forward [version (0: all) [N, default 32768]]
#define BT_MMA_STAGE1_CANDIDATE 1  // stage 1 alone on mma.sync too (v14; v13, both stages, is -sk 5)
#include "harness.cuh"
#include "cuda/matmul.cuh"
#include "structured/btt_fused.cuh"
#include "structured/structured.cuh"

#define NV 14
#define U_BF16 (1.0 / 256.0)

// every stride-th index below n, and n - 1
static int *sample_rows(int n, int stride, int *count) {
    int *r = (int *)malloc((size_t)(n / stride + 2) * sizeof(int)), k = 0;
    for (int i = 0; i < n; i += stride) r[k++] = i;
    if (r[k - 1] != n - 1) r[k++] = n - 1;
    *count = k;
    return r;
}
static float *gather_rows(const float *full, const int *rows, int nr, size_t cols) {
    float *g = (float *)malloc((size_t)nr * cols * sizeof(float));
    for (int s = 0; s < nr; s++) memcpy(g + (size_t)s * cols, full + (size_t)rows[s] * cols, cols * sizeof(float));
    return g;
}

// the rows of `rows` below n
static int rows_below(const int *rows, int nr, int n) {
    int k = 0;
    while (k < nr && rows[k] < n) k++;
    return k;
}

typedef struct {
    int d_in, d_out, rank;
} Case;

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const int N = argc > 2 ? atoi(argv[2]) : 32768, stride = 41, tail = 13;  // N - tail = 32755: a partial last tile for tm 16, 32, 64
    if (N < 64) {
        fprintf(stderr, "btt_forward: N must be at least 64 (got '%s')\n", argv[2]);
        return 1;
    }
    const Case cases[] = {{768, 3072, 1}, {768, 3072, 2}, {768, 3072, 4}, {3072, 768, 1}, {2048, 8192, 2}, {4096, 16384, 1}};
    printf("btt_forward: BTT forward, baseline (cuBLAS) vs fused (z on chip), on %s (peak bf16 %.0f TFLOP/s from the table; "
           "opt-in smem %zu bytes/block)\n",
           g_gpu.prop.name, gpu_peak_bf16_tflops(g_gpu.prop.name), btt_fused_smem_limit());

    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        BTTShape s;
        btt_shape_default(&s, cases[ci].d_in, cases[ci].d_out, cases[ci].rank);
        const int din = s.d_in, dout = s.d_out;
        const size_t zrow = btt_z_row(&s), n0 = btt_w0_size(&s), n1 = btt_w1_size(&s);
        const size_t NX = (size_t)N * din, NY = (size_t)N * dout, NZ = (size_t)N * zrow;
        printf("-- %d -> %d rank %d: alpha %d gamma %d phi %d eps %d, zrow %zu, |W0| %zu |W1| %zu (dense %zu), N %d; fused default tm %d\n", din,
               dout, s.rank, s.alpha, s.gamma, s.phi, s.eps, zrow, n0, n1, (size_t)din * dout, N, btt_fused_supported(&s, btt_fused_smem_limit()));

        // inputs (bf16-rounded): z and y about unit scale
        float a0 = sqrtf(3.0f / s.alpha), a1 = sqrtf(3.0f / (s.gamma * s.rank)), ad = sqrtf(3.0f / din);
        float *x = dev_random(NX, -1.0f, 1.0f), *W0 = dev_random(n0, -a0, a0), *W1 = dev_random(n1, -a1, a1);
        float *bias = dev_random(dout, -0.5f, 0.5f), *wd = dev_random((size_t)dout * din, -ad, ad);
        dev_round_bf16(x, NX); dev_round_bf16(W0, n0); dev_round_bf16(W1, n1); dev_round_bf16(bias, dout); dev_round_bf16(wd, (size_t)dout * din);

        // references on the sampled rows
        int nr;
        int *rows = sample_rows(N, stride, &nr);
        float *xs = gather_rows(x, rows, nr, din), *xa = dev_fabs_copy(xs, (size_t)nr * din);
        float *W0a = dev_fabs_copy(W0, n0), *W1a = dev_fabs_copy(W1, n1);
        float *y_ref = (float *)malloc((size_t)nr * dout * sizeof(float)), *z_ref = (float *)malloc((size_t)nr * zrow * sizeof(float));
        float *y_abs = (float *)malloc((size_t)nr * dout * sizeof(float)), *z_abs = (float *)malloc((size_t)nr * zrow * sizeof(float));
        btt_forward(y_ref, z_ref, xs, W0, W1, bias, nr, &s);
        btt_forward(y_abs, z_abs, xa, W0a, W1a, NULL, nr, &s);
        float *e_yf = (float *)malloc((size_t)nr * dout * sizeof(float)), *e_yb = (float *)malloc((size_t)nr * dout * sizeof(float));
        float *e_z = (float *)malloc((size_t)nr * zrow * sizeof(float));
        for (size_t i = 0; i < (size_t)nr * dout; i++) {
            double yr = fabs(y_ref[i]), acc = fabs((double)y_ref[i] - bias[i % dout]), ya = y_abs[i];
            e_yf[i] = (float)(U_BF16 * yr + 1.02 * U_BF16 * ya + 1e-6);
            e_yb[i] = (float)(U_BF16 * (yr + acc) + 1.02 * U_BF16 * ya + 1e-6);
        }
        for (size_t i = 0; i < (size_t)nr * zrow; i++) e_z[i] = (float)(U_BF16 * fabs(z_ref[i]) + z_abs[i] / 65536.0 + 1e-6);

        // the last row of the N - tail run (in its partial last tile whatever tm is), referenced separately
        const int Nt = N - tail, last = Nt - 1;
        float *yl_ref = (float *)malloc(dout * sizeof(float)), *zl_ref = (float *)malloc(zrow * sizeof(float));
        float *yl_abs = (float *)malloc(dout * sizeof(float)), *zl_abs = (float *)malloc(zrow * sizeof(float));
        float *e_yl = (float *)malloc(dout * sizeof(float)), *xl_abs = dev_fabs_copy(x + (size_t)last * din, din);
        btt_forward(yl_ref, zl_ref, x + (size_t)last * din, W0, W1, bias, 1, &s);
        btt_forward(yl_abs, zl_abs, xl_abs, W0a, W1a, NULL, 1, &s);
        for (int o = 0; o < dout; o++) e_yl[o] = (float)(U_BF16 * fabs(yl_ref[o]) + 1.02 * U_BF16 * yl_abs[o] + 1e-6);

        floatX *d_x = dev_upload_bf16(x, NX), *d_W0 = dev_upload_bf16(W0, n0), *d_W1 = dev_upload_bf16(W1, n1);
        floatX *d_bias = dev_upload_bf16(bias, dout), *d_wd = dev_upload_bf16(wd, (size_t)dout * din);
        floatX *d_y, *d_z, *d_t1;
        cudaCheck(cudaMalloc(&d_y, NY * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_z, NZ * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_t1, NZ * sizeof(floatX)));

        const double flops = 2.0 * N * (double)(n0 + n1);
        const double bytes_noz = 2.0 * ((double)NX + n0 + n1 + dout + NY), bytes_z = bytes_noz + 2.0 * NZ;
        float ms_base = 0.0f, ms_fused = 0.0f, ms_fused_noz = 0.0f, ms_whole = 0.0f, ms_ws = 0.0f, ms_s1 = 0.0f, ms_split = 0.0f, ms_ws_mma = 0.0f, ms_s1_mma = 0.0f;
        char what[200];

        // dense cuBLASLt, the same shape (w: d_out x d_in): the time to beat
        auto dense = [&]() { matmul_forward(d_y, d_x, d_wd, d_bias, N, din, dout, NULL); };
        const float ms_dense = dev_time_ms(dense);
        snprintf(what, sizeof(what), "dense %d->%d (unchecked)", din, dout);
        dev_report(what, 0, ms_dense, 2.0 * ((double)NX + (double)din * dout + dout + NY), 2.0 * N * (double)din * dout, 0.0f);

        for (int ver = 1; ver <= NV; ver++) {
            if (v && ver != v) continue;
            const int tm_force = ver == 3 || ver == 8 || ver == 11 ? 16 : ver == 4 || ver == 12 ? 32 : ver == 5 ? 64 : 0, wstage = ver >= 7;
            const int s1 = ver == 9 || ver == 11 || ver == 12 || ver == 14;  // stage 1 alone
            const int mma = ver >= 13;
            g_btt_mma = mma;  // the instantiation btt_fused_blocks_per_sm and the runs below take
            if (s1 || ver == 10) {  // the W0-staged geometry btt_stage1_fused takes
                BtGeom g;
                const int ok = btt_fused_geom_ws(&g, &s, btt_fused_smem_limit(), ver == 10 ? 0 : tm_force, 1, 1);
                g.s1only = 1;
                if (!ok) {
                    printf("   v%d: stage 1 (tm %d) not supported here (shared memory); -sk 3 falls back to v1\n", ver, tm_force);
                    continue;
                }
                printf("   v%d stage-1 geometry: tm %d, %d group(s) of %d phi blocks, %d bytes smem/block, %d blocks/SM\n", ver, g.tm, g.npg, g.pg,
                       g.smem_bytes, btt_fused_blocks_per_sm(&g));
            } else if (ver >= 2) {
                BtGeom g;
                g_btt_whole_z = ver == 6;
                const int ok = btt_fused_geom_ws(&g, &s, btt_fused_smem_limit(), tm_force, wstage);
                g_btt_whole_z = 0;
                if (!ok) {
                    printf("   v%d: fused%s tm %d not supported here (shared memory); the caller falls back to v1\n", ver,
                           ver == 6 ? " (whole z tile)" : "", tm_force);
                    continue;
                }
                printf("   v%d geometry: tm %d, %d group(s) of %d phi blocks: %d bytes smem/block, %d blocks/SM, x chunk %d g blocks "
                       "(%d stage-1 items for %d warps), stage-2 items of %d x %d fragments; traffic model %.0f L2 bytes/row\n",
                       ver, g.tm, g.npg, g.pg, g.smem_bytes, btt_fused_blocks_per_sm(&g), g.gc, bt_s1_items(&g), BT_WARPS, g.mt, g.nb,
                       bt_l2_bytes_per_row(&g));
            }
            auto run = [&](floatX *z, int n) {
                if (ver == 1 || ver == 10) {
                    st_set_kernels(ver == 10 ? 3 : 0);
                    const long before = g_st_split_runs;
                    btt_forward_gpu(d_y, z, d_x, d_W0, d_W1, d_bias, n, &s, d_t1);
                    st_set_kernels(0);
                    if (ver == 10 && n > 0 && g_st_split_runs == before) {
                        fprintf(stderr, "error: btt_forward_gpu did not run split\n");
                        exit(EXIT_FAILURE);
                    }
                } else if (s1) {
                    if (!btt_stage1_fused(z ? z : d_t1, d_x, 0, d_W0, n, &s, tm_force)) {
                        fprintf(stderr, "error: btt_stage1_fused refused the shape\n");
                        exit(EXIT_FAILURE);
                    }
                } else {
                    g_btt_whole_z = ver == 6;
                    g_btt_wstage = wstage;
                    const int ran = btt_forward_fused_tm(d_y, z, d_x, d_W0, d_W1, d_bias, n, &s, tm_force);
                    g_btt_whole_z = 0;
                    g_btt_wstage = 0;
                    if (!ran) {
                        fprintf(stderr, "error: btt_forward_fused_tm refused tm %d\n", tm_force);
                        exit(EXIT_FAILURE);
                    }
                }
            };
            const float *e_y = ver == 1 || ver == 10 ? e_yb : e_yf;  // v10: y from cuBLAS with the bias epilogue, as v1
            float err;
            // saving z, all N rows
            cudaCheck(cudaMemset(d_y, 0xFF, NY * sizeof(floatX)));
            cudaCheck(cudaMemset(d_z, 0xFF, NZ * sizeof(floatX)));
            run(d_z, N);
            cudaCheck(cudaDeviceSynchronize());
            {
                float *gy = dev_download_rows(d_y, rows, nr, dout), *gz = dev_download_rows(d_z, rows, nr, zrow);
                snprintf(what, sizeof(what), "v%d %d->%d r%d saved z", ver, din, dout, s.rank);
                err = dev_check_bounded(what, gz, z_ref, e_z, (size_t)nr * zrow);
                if (s1) {  // stage 1 alone: y untouched
                    if (dev_rows_untouched(d_y, 0, N, dout)) g_dev_pass++;
                    else { g_dev_fail++; printf("FAIL v%d %d->%d r%d: stage 1 alone wrote y\n", ver, din, dout, s.rank); }
                } else {
                    snprintf(what, sizeof(what), "v%d %d->%d r%d y", ver, din, dout, s.rank);
                    err = fmaxf(err, dev_check_bounded(what, gy, y_ref, e_y, (size_t)nr * dout));
                }
                free(gy); free(gz);
            }
            float ms = dev_time_ms([&]() { run(d_z, N); });
            if (s1) {  // stage 1 alone: x and W0 read, z written; 2 N |W0| FLOPs
                snprintf(what, sizeof(what), "stage 1 %d->%d r%d +z", din, dout, s.rank);
                dev_report(what, ver, ms, 2.0 * ((double)NX + n0 + NZ), 2.0 * N * (double)n0, err);
            } else {
                snprintf(what, sizeof(what), "fwd %d->%d r%d +z", din, dout, s.rank);
                dev_report(what, ver, ms, bytes_z, flops, err);
            }
            if (ver == 1) ms_base = ms;
            if (ver == 2) ms_fused = ms;
            if (ver == 6) ms_whole = ms;
            if (ver == 7) ms_ws = ms;
            if (ver == 9) ms_s1 = ms;
            if (ver == 10) ms_split = ms;
            if (ver == 13) ms_ws_mma = ms;
            if (ver == 14) ms_s1_mma = ms;
            if (ver == 1 || ver == 10 || s1) {  // the baseline, stage 1 and split always write z
                g_btt_mma = 0;
                continue;
            }

            // without z (inference)
            cudaCheck(cudaMemset(d_y, 0xFF, NY * sizeof(floatX)));
            run(NULL, N);
            cudaCheck(cudaDeviceSynchronize());
            {
                float *gy = dev_download_rows(d_y, rows, nr, dout);
                snprintf(what, sizeof(what), "v%d %d->%d r%d y (z not saved)", ver, din, dout, s.rank);
                err = dev_check_bounded(what, gy, y_ref, e_y, (size_t)nr * dout);
                free(gy);
            }
            ms = dev_time_ms([&]() { run(NULL, N); });
            snprintf(what, sizeof(what), "fwd %d->%d r%d", din, dout, s.rank);
            dev_report(what, ver, ms, bytes_noz, flops, err);
            if (ver == 2) ms_fused_noz = ms;

            // N - tail rows: a partial last tile; rows from N - tail on must stay untouched
            cudaCheck(cudaMemset(d_y, 0xFF, NY * sizeof(floatX)));
            cudaCheck(cudaMemset(d_z, 0xFF, NZ * sizeof(floatX)));
            run(d_z, Nt);
            cudaCheck(cudaDeviceSynchronize());
            {
                int nt = rows_below(rows, nr, Nt);
                float *gy = dev_download_rows(d_y, rows, nt, dout), *gz = dev_download_rows(d_z, rows, nt, zrow);
                snprintf(what, sizeof(what), "v%d %d->%d r%d y at N %d", ver, din, dout, s.rank, Nt);
                dev_check_bounded(what, gy, y_ref, e_y, (size_t)nt * dout);
                snprintf(what, sizeof(what), "v%d %d->%d r%d saved z at N %d", ver, din, dout, s.rank, Nt);
                dev_check_bounded(what, gz, z_ref, e_z, (size_t)nt * zrow);
                free(gy); free(gz);
                float *gyl = dev_download_rows(d_y, &last, 1, dout);
                snprintf(what, sizeof(what), "v%d %d->%d r%d y row %d (the last of N %d)", ver, din, dout, s.rank, last, Nt);
                dev_check_bounded(what, gyl, yl_ref, e_yl, dout);
                free(gyl);
                int untouched = dev_rows_untouched(d_y, Nt, N, dout) && dev_rows_untouched(d_z, Nt, N, zrow);
                if (untouched) g_dev_pass++;
                else { g_dev_fail++; printf("FAIL v%d %d->%d r%d: rows >= N %d of y or z were written\n", ver, din, dout, s.rank, Nt); }
            }
            g_btt_mma = 0;
        }
        if (ms_base > 0) printf("   ratio dense / baseline (v1): %.2fx\n", ms_dense / ms_base);
        if (ms_fused > 0) {
            printf("   ratio dense / fused (v2, saving z): %.2fx;  without z: %.2fx\n", ms_dense / ms_fused, ms_dense / ms_fused_noz);
            if (ms_base > 0) printf("   speedup fused (v2, saving z) over baseline (v1): %.2fx\n", ms_base / ms_fused);
            if (ms_whole > 0) printf("   speedup model geometry (v2) over the whole-z rule (v6), saving z: %.2fx\n", ms_whole / ms_fused);
            if (ms_ws > 0) printf("   speedup W0 staged (v7) over v2, saving z: %.2fx; ratio dense / v7: %.2fx\n", ms_fused / ms_ws, ms_dense / ms_ws);
        }
        if (ms_s1 > 0 && ms_ws > 0) printf("   stage 1 alone (v9) is %.0f%% of v7's time\n", 100.0 * ms_s1 / ms_ws);
        if (ms_split > 0) printf("   ratio dense / split (v10): %.2fx\n", ms_dense / ms_split);
        if (ms_split > 0 && ms_base > 0) printf("   speedup split (v10) over baseline (v1): %.2fx\n", ms_base / ms_split);
        if (ms_ws_mma > 0 && ms_ws > 0) printf("   speedup on mma.sync, both stages (v13), over v7, saving z: %.2fx; ratio dense / v13: %.2fx\n", ms_ws / ms_ws_mma, ms_dense / ms_ws_mma);
        if (ms_s1_mma > 0 && ms_s1 > 0) printf("   speedup stage 1 alone on mma.sync (v14) over v9: %.2fx\n", ms_s1 / ms_s1_mma);

        cudaCheck(cudaFree(d_x)); cudaCheck(cudaFree(d_W0)); cudaCheck(cudaFree(d_W1)); cudaCheck(cudaFree(d_bias)); cudaCheck(cudaFree(d_wd));
        cudaCheck(cudaFree(d_y)); cudaCheck(cudaFree(d_z)); cudaCheck(cudaFree(d_t1));
        free(x); free(W0); free(W1); free(bias); free(wd); free(rows); free(xs); free(xa); free(W0a); free(W1a);
        free(y_ref); free(z_ref); free(y_abs); free(z_abs); free(e_yf); free(e_yb); free(e_z);
        free(yl_ref); free(zl_ref); free(yl_abs); free(zl_abs); free(e_yl); free(xl_abs);
    }
    return dev_summary();
}
