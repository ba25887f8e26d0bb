// dev/cuda/monarch_forward.cu: the Monarch linear layer's forward, y = Monarch(x) + bias with the
// saved u (structured/monarch.h's math and layouts), on the GPU:
//   v1  baseline: monarch_forward_gpu with -sk 0 (structured/monarch_gpu.cuh): strided-batched
//       cuBLAS GEMM into T1, permute into the saved u, GEMM into T2, permute into y, bias kernel —
//       u and the stage-2 output round-trip through DRAM
//   v2  fused: monarch_forward_gpu with -sk 1: the cores transposed (two small kernels), then
//       monarch_fused.cuh's one kernel, u in shared memory (written once, as the saved u), y
//       staged in shared memory so that it leaves as 16-byte vectors. Run even where the trainer's
//       dispatch would decline it (g_monarch_fused_force), with the traffic model's figures printed,
//       so that this program measures where the model's bound (MF_MAX_L2_PER_DRAM) should be
//   v3, v4  v2 with at most 32 and 16 rows per tile (g_monarch_fwd_max_tm), where v2 took more:
//       fewer rows re-read the cores more often but leave shared memory for more resident blocks
//   v5  on the BTT kernel, -sk 2 (monarch_gpu.cuh; where nb divides q the Monarch is a BTT of rank
//       q/nb, structured/monarch.h): its cores rebuilt (two small kernels), the BTT kernel with W0
//       staged writes u and the Monarch's y before its output permute, the plans' permute y with
//       the bias. Forced past the traffic bound as v2; declined where the staged kernel cannot
//       take the shape (the trainer then runs v2)
//   v6  v5 with the BTT kernel on mma.sync (-sk 5)
// and, as the number to beat, the dense cuBLASLt layer of the same shape (matmul_forward, v0).
// Each version is also checked at N - 13 rows (a partial last tile) for its values and for not
// writing past row N - 13.
//
// Shapes (N = 32768 rows by default): 768 -> 3072 with 4 and 24 blocks (the benchmark's
// monarch_4 and monarch_sqrt), 1024 -> 4096 with 4, 8 and 32 (8 and 32: BTTs of rank 16 and 1),
// 3072 -> 768 with 4, 2048 -> 8192 with 4 (near the traffic model's bound: where the fused kernel
// stops paying).
// flops = 2 N (|R| + |L|); bytes = the minimum: x, R, L, bias, y and the saved u, bf16.
//
// Reference: monarch.h's fp32 monarch_forward on the bf16-rounded inputs, on a sample of rows
// (every 41st and the last), and on absolute values for the bounds (u_abs = Σ|R||x|, y_abs =
// Σ|L| u_abs). With u = 2^-8 (bf16 round to nearest, relative):
//   u (fp32 accumulation, one rounding): |u - u_ref| <= u |u_ref| + 2^-16 u_abs
//   y fused (u rounded, fp32 accumulation, + bias, one rounding): u |y_ref| + 1.02 u y_abs
//   y baseline and v5, v6 (y rounded before the permute or bias kernel adds the bias and rounds again):
//     u (|y_ref| + |y_ref - bias|) + 1.02 u y_abs
//
// Build: make -C dev/cuda monarch_forward    Run: ./dev/cuda/monarch_forward [version (0: all) [N]]
#include "harness.cuh"
#include "cuda/matmul.cuh"
#include "structured/structured.cuh"

#define NV 6
#define U_BF16 (1.0 / 256.0)

typedef struct { int d_in, d_out, nb; } Case;

int main(int argc, char **argv) {
    gpu_init(0);
    const int v = dev_version_arg(argc, argv, NV);
    const int N = argc > 2 ? atoi(argv[2]) : 32768, stride = 41, tail = 13;
    if (N < 64 || N % 8) { fprintf(stderr, "error: N = %s: use a multiple of 8, at least 64\n", argc > 2 ? argv[2] : "?"); return 1; }
    const Case cases[] = {{768, 3072, 4}, {768, 3072, 24}, {1024, 4096, 4}, {1024, 4096, 8}, {1024, 4096, 32}, {3072, 768, 4}, {2048, 8192, 4}};
    printf("monarch_forward: Monarch forward, baseline (cuBLAS) vs fused (u on chip), on %s (peak bf16 %.0f TFLOP/s from the table)\n",
           g_gpu.prop.name, gpu_peak_bf16_tflops(g_gpu.prop.name));
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        MonarchShape m;
        monarch_shape(&m, cases[ci].d_in, cases[ci].d_out, cases[ci].nb);
        const int din = m.d_in, dout = m.d_out;
        const size_t urow = monarch_u_row(&m), nr_ = monarch_r_size(&m), nl = monarch_l_size(&m);
        const size_t NX = (size_t)N * din, NY = (size_t)N * dout, NU = (size_t)N * urow;
        printf("-- %d -> %d, %d blocks: p %d q %d s %d, |R| %zu |L| %zu (dense %zu), N %d; fused tile rows %d\n", din, dout, m.nb, m.p, m.q, m.s,
               nr_, nl, (size_t)din * dout, N, monarch_fused_supported(&m, btt_fused_smem_limit()));
        {
            MfGeom g;
            const int tm = monarch_fused_supported(&m, btt_fused_smem_limit());
            if (tm && mf_geom(&g, &m, tm))
                printf("   traffic model: fused %.1f KB of L2 reads per row, baseline %.1f KB of DRAM per row (ratio %.2f): the trainer %s\n",
                       mf_l2_bytes_per_row(&g) / 1024.0, monarch_baseline_bytes_per_row(&m, 0) / 1024.0,
                       mf_l2_bytes_per_row(&g) / monarch_baseline_bytes_per_row(&m, 0),
                       monarch_fused_fwd_pays(&m, btt_fused_smem_limit()) ? "runs the fused kernel" : "declines it (over MF_MAX_L2_PER_DRAM)");
        }
        float ar = sqrtf(3.0f / m.p), al = sqrtf(3.0f / m.q), ad = sqrtf(3.0f / din);
        float *x = dev_random(NX, -1.0f, 1.0f), *R = dev_random(nr_, -ar, ar), *L = dev_random(nl, -al, al);
        float *bias = dev_random(dout, -0.5f, 0.5f), *wd = dev_random((size_t)dout * din, -ad, ad);
        dev_round_bf16(x, NX); dev_round_bf16(R, nr_); dev_round_bf16(L, nl); dev_round_bf16(bias, dout); dev_round_bf16(wd, (size_t)dout * din);

        // references on every stride-th row, the last row, and the last row of the N - tail run
        const int Nt = N - tail;
        int nr = 0, *rows = (int *)malloc((size_t)(N / stride + 3) * sizeof(int));
        for (int i = 0; i < N; i += stride) rows[nr++] = i;
        rows[nr++] = N - 1;
        float *xs = (float *)malloc((size_t)(nr + 1) * din * sizeof(float));
        for (int s = 0; s < nr; s++) memcpy(xs + (size_t)s * din, x + (size_t)rows[s] * din, din * sizeof(float));
        memcpy(xs + (size_t)nr * din, x + (size_t)(Nt - 1) * din, din * sizeof(float));  // reference row nr: row Nt - 1
        const int nref = nr + 1;
        float *xa = dev_fabs_copy(xs, (size_t)nref * din), *Ra = dev_fabs_copy(R, nr_), *La = dev_fabs_copy(L, nl);
        float *y_ref = (float *)malloc((size_t)nref * dout * 4), *u_ref = (float *)malloc((size_t)nref * urow * 4);
        float *y_abs = (float *)malloc((size_t)nref * dout * 4), *u_abs = (float *)malloc((size_t)nref * urow * 4);
        monarch_forward(y_ref, u_ref, xs, R, L, bias, nref, &m);
        monarch_forward(y_abs, u_abs, xa, Ra, La, NULL, nref, &m);
        float *e_yf = (float *)malloc((size_t)nref * dout * 4), *e_yb = (float *)malloc((size_t)nref * dout * 4), *e_u = (float *)malloc((size_t)nref * urow * 4);
        for (size_t i = 0; i < (size_t)nref * dout; i++) {
            double yr = fabs(y_ref[i]), acc = fabs((double)y_ref[i] - bias[i % dout]);
            e_yf[i] = (float)(U_BF16 * yr + 1.02 * U_BF16 * y_abs[i] + 1e-6);
            e_yb[i] = (float)(U_BF16 * (yr + acc) + 1.02 * U_BF16 * y_abs[i] + 1e-6);
        }
        for (size_t i = 0; i < (size_t)nref * urow; i++) e_u[i] = (float)(U_BF16 * fabs(u_ref[i]) + u_abs[i] / 65536.0 + 1e-6);

        floatX *d_x = dev_upload_bf16(x, NX), *d_R = dev_upload_bf16(R, nr_), *d_L = dev_upload_bf16(L, nl);
        floatX *d_bias = dev_upload_bf16(bias, dout), *d_wd = dev_upload_bf16(wd, (size_t)dout * din), *d_y, *d_u, *d_s;
        cudaCheck(cudaMalloc(&d_y, NY * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_u, NU * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_s, monarch_gpu_scratch_elems(&m, N) * sizeof(floatX)));
        const double flops = 2.0 * N * (double)(nr_ + nl), bytes = 2.0 * ((double)NX + nr_ + nl + dout + NY + NU);
        char what[160];
        auto dense = [&]() { matmul_forward(d_y, d_x, d_wd, d_bias, N, din, dout, NULL); };
        const float ms_dense = dev_time_ms(dense);
        snprintf(what, sizeof(what), "dense %d->%d (unchecked)", din, dout);
        dev_report(what, 0, ms_dense, 2.0 * ((double)NX + (double)din * dout + dout + NY), 2.0 * N * (double)din * dout, 0.0f);
        float ms[NV + 1] = {0};
        g_monarch_fwd_max_tm = 64;
        const int tm_v2 = monarch_fused_supported(&m, btt_fused_smem_limit());
        for (int ver = 1; ver <= NV; ver++) {
            if (v && v != ver) continue;
            const int fused = ver >= 2, as_btt = ver >= 5;
            st_set_kernels(ver == 5 ? 2 : ver == 6 ? 5 : fused);
            g_monarch_fused_force = fused;
            g_monarch_fwd_max_tm = ver == 3 ? 32 : ver == 4 ? 16 : 64;
            BTTShape bs;
            if (as_btt) {
                if (!monarch_btt_pays(&bs, &m, 0)) {
                    printf("   v%d: the BTT kernel does not take this Monarch (nb does not divide q, or W0's slices outgrow the staging)\n", ver);
                    continue;
                }
                printf("   v%d: the BTT of rank %d (alpha %d, gamma = phi = %d, eps %d)\n", ver, bs.rank, bs.alpha, bs.gamma, bs.eps);
            }
            const int tm = fused && !as_btt ? monarch_fused_supported(&m, btt_fused_smem_limit()) : 0;
            if (fused && !as_btt && !tm) {
                printf("   v%d: the fused kernel does not take this shape here (shared memory)%s\n", ver, ver == 2 ? "; the trainer falls back to v1" : "");
                continue;
            }
            if ((ver == 3 || ver == 4) && (tm != g_monarch_fwd_max_tm || tm == tm_v2)) continue;  // only a tile size v2 did not take
            if (fused && !as_btt) printf("   v%d: %d rows per tile\n", ver, tm);
            int ran = -1;
            const long btt_runs = g_monarch_btt_runs;
            auto run = [&](int n) { ran = monarch_forward_gpu(d_y, d_u, d_x, d_R, d_L, d_bias, n, &m, d_s); };
            cudaCheck(cudaMemset(d_y, 0xFF, NY * sizeof(floatX)));  // NaN: unwritten elements fail
            cudaCheck(cudaMemset(d_u, 0xFF, NU * sizeof(floatX)));
            run(N);
            cudaCheck(cudaDeviceSynchronize());
            if (ran != fused) { g_dev_fail++; printf("FAIL v%d: monarch_forward_gpu ran the %s path\n", ver, ran ? "fused" : "cuBLAS"); }
            if ((g_monarch_btt_runs != btt_runs) != as_btt) { g_dev_fail++; printf("FAIL v%d: the BTT kernel %s\n", ver, as_btt ? "did not run" : "ran"); }
            float *gy = dev_download_rows(d_y, rows, nr, dout), *gu = dev_download_rows(d_u, rows, nr, urow);
            snprintf(what, sizeof(what), "v%d %d->%d nb %d y", ver, din, dout, m.nb);
            float ey = dev_check_bounded(what, gy, y_ref, fused && !as_btt ? e_yf : e_yb, (size_t)nr * dout);
            snprintf(what, sizeof(what), "v%d %d->%d nb %d saved u", ver, din, dout, m.nb);
            float eu = dev_check_bounded(what, gu, u_ref, e_u, (size_t)nr * urow);
            free(gy); free(gu);
            ms[ver] = dev_time_ms([&]() { run(N); });
            snprintf(what, sizeof(what), "fwd %d->%d nb %d +u", din, dout, m.nb);
            dev_report(what, ver, ms[ver], bytes, flops, ey > eu ? ey : eu);
            // N - tail rows: the last row's values, and nothing written at or past row N - tail
            cudaCheck(cudaMemset(d_y, 0xFF, NY * sizeof(floatX)));
            cudaCheck(cudaMemset(d_u, 0xFF, NU * sizeof(floatX)));
            run(Nt);
            cudaCheck(cudaDeviceSynchronize());
            int last = Nt - 1;
            float *ly = dev_download_rows(d_y, &last, 1, dout), *lu = dev_download_rows(d_u, &last, 1, urow);
            snprintf(what, sizeof(what), "v%d %d->%d nb %d y row %d (the last of N %d)", ver, din, dout, m.nb, last, Nt);
            dev_check_bounded(what, ly, y_ref + (size_t)nr * dout, (fused && !as_btt ? e_yf : e_yb) + (size_t)nr * dout, dout);
            snprintf(what, sizeof(what), "v%d %d->%d nb %d saved u row %d", ver, din, dout, m.nb, last);
            dev_check_bounded(what, lu, u_ref + (size_t)nr * urow, e_u + (size_t)nr * urow, urow);
            free(ly); free(lu);
            if (dev_rows_untouched(d_y, Nt, N, dout) && dev_rows_untouched(d_u, Nt, N, urow)) g_dev_pass++;
            else { g_dev_fail++; printf("FAIL v%d %d->%d nb %d: rows >= N %d of y or u were written\n", ver, din, dout, m.nb, Nt); }
        }
        st_set_kernels(0);
        g_monarch_fused_force = 0;
        g_monarch_fwd_max_tm = 64;
        if (ms[1] > 0) printf("   ratio dense / baseline (v1): %.2fx\n", ms_dense / ms[1]);
        if (ms[2] > 0) printf("   ratio dense / fused (v2): %.2fx\n", ms_dense / ms[2]);
        if (ms[1] > 0 && ms[2] > 0) printf("   speedup fused (v2) over baseline (v1): %.2fx\n", ms[1] / ms[2]);
        for (int ver = 5; ver <= NV; ver++)
            if (ms[ver] > 0) printf("   speedup v%d (on the BTT kernel) over baseline (v1): %.2fx, over the Monarch kernel (v2): %.2fx; dense / v%d: %.2fx\n", ver,
                                    ms[1] > 0 ? ms[1] / ms[ver] : 0.0, ms[2] > 0 ? ms[2] / ms[ver] : 0.0, ver, ms_dense / ms[ver]);
        for (int ver = 3; ver <= 4; ver++)
            if (ms[ver] > 0 && ms[2] > 0) printf("   speedup v2 (%d rows per tile) over v%d (%d): %.2fx\n", tm_v2, ver, ver == 3 ? 32 : 16, ms[ver] / ms[2]);
        cudaCheck(cudaFree(d_x)); cudaCheck(cudaFree(d_R)); cudaCheck(cudaFree(d_L)); cudaCheck(cudaFree(d_bias)); cudaCheck(cudaFree(d_wd));
        cudaCheck(cudaFree(d_y)); cudaCheck(cudaFree(d_u)); cudaCheck(cudaFree(d_s));
        free(x); free(R); free(L); free(bias); free(wd); free(rows); free(xs); free(xa); free(Ra); free(La);
        free(y_ref); free(u_ref); free(y_abs); free(u_abs); free(e_yf); free(e_yb); free(e_u);
    }
    return dev_summary();
}
