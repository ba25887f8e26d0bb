// dev/cuda/seg_wgrad.cu: BTT-MoE's expert weight gradients, C[s][b] = Σ_{rows of segment s}
// A[r, b-block]ᵀ B[r, b-block] (structured/seg_wgrad.cuh), on the GPU:
//   v1  per segment one cuBLAS strided-batched GEMM (the -sk 0 backward's way: the segment sizes
//       must be on the host, here they are given; S launches)
//   v2  seg_wgrad: one launch for every segment, the row ranges read on the device
//   v3  seg_wgrad reading A and B through a grouping (row order[w] / K) with a gate on B, as the
//       -sk 1 backward reads x and dy (no gathered copies)
// Shapes: the GPT-2 768 -> 3072 BTT-MoE layer, 8 experts, top 2, N = 32768 tokens (65,536 grouped
// rows, uneven segments): dW1 (M = gamma 48, Nn = eps 96, batch phi 32; A = z, B = dy) and dW0
// (M = alpha 16, Nn = phi 32, batch gamma 48; A = x, B = dZ).
// flops = 2 rows·batch·M·Nn; bytes = the minimum: A and B rows once, C once (bf16).
// Reference: double sums over the bf16 inputs on every 7th batch entry, all segments; one bf16
// rounding of an fp32 sum: |gpu - ref| <= 2^-8 |ref| (+1%) + 2^-16 Σ|a b| (fp32 accumulation).
//
// Build: make -C dev/cuda seg_wgrad    Run: ./dev/cuda/seg_wgrad [version (0: all) [tokens]]
#include "harness.cuh"
#include "structured/structured.cuh"

#define NV 3

typedef struct { const char *name; int M, Nn, batch; } Shape;

int main(int argc, char **argv) {
    gpu_init(0);
    const int v = argc > 1 && strcmp(argv[1], "0") == 0 ? 0 : dev_version_arg(argc, argv, NV);
    const int N = argc > 2 ? atoi(argv[2]) : 32768, K = 2, E = 8, NK = N * K;
    if (N < 16) { fprintf(stderr, "error: tokens = %s: use at least 16\n", argc > 2 ? argv[2] : "?"); return 1; }
    const Shape shapes[] = {{"dW1 768->3072 experts", 48, 96, 32}, {"dW0 768->3072 experts", 16, 32, 48}};
    printf("seg_wgrad: per-expert weight gradients, %d tokens x top-%d over %d experts, on %s\n", N, K, E, g_gpu.prop.name);
    // uneven segments: expert e gets a share ~ (e + 1), expert 3 none; the rest to the last
    int counts[E], offsets[E + 1] = {0}, total = 0;
    for (int e = 0; e < E; e++) {
        counts[e] = e == 3 ? 0 : (int)((long)NK * (e + 1) / 40);
        total += counts[e];
    }
    counts[E - 1] += NK - total;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    int *order = (int *)malloc((size_t)NK * sizeof(int));  // grouped row -> pair: a random permutation
    for (int w = 0; w < NK; w++) order[w] = w;
    for (int w = NK - 1; w > 0; w--) {
        int j = (int)(dev_uniform() * (w + 1)) % (w + 1), t = order[w];
        order[w] = order[j]; order[j] = t;
    }
    float *gate = dev_random(NK, 0.05f, 1.0f);
    int *d_counts = dev_upload(counts, E), *d_offsets = dev_upload(offsets, E + 1), *d_order = dev_upload(order, NK);
    float *d_gate = dev_upload(gate, NK);

    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        const Shape *sh = &shapes[si];
        const int M = sh->M, Nn = sh->Nn, nb = sh->batch, lda = nb * M, ldb = nb * Nn;
        const size_t nc = (size_t)E * nb * M * Nn;
        printf("-- %s: M %d, Nn %d, batch %d, %d grouped rows in %d segments (%d..%d rows)\n", sh->name, M, Nn, nb, NK, E, counts[3],
               counts[E - 1]);
        // A and B rows: grouped (v1, v2: NK rows) and the sources of the grouping (v3: N rows)
        float *A = dev_random((size_t)NK * lda, -1.0f, 1.0f), *B = dev_random((size_t)NK * ldb, -1.0f, 1.0f);
        float *As = dev_random((size_t)N * lda, -1.0f, 1.0f), *Bs = dev_random((size_t)N * ldb, -1.0f, 1.0f);
        dev_round_bf16(A, (size_t)NK * lda); dev_round_bf16(B, (size_t)NK * ldb);
        dev_round_bf16(As, (size_t)N * lda); dev_round_bf16(Bs, (size_t)N * ldb);
        floatX *d_A = dev_upload_bf16(A, (size_t)NK * lda), *d_B = dev_upload_bf16(B, (size_t)NK * ldb);
        floatX *d_As = dev_upload_bf16(As, (size_t)N * lda), *d_Bs = dev_upload_bf16(Bs, (size_t)N * ldb), *d_C;
        cudaCheck(cudaMalloc(&d_C, nc * sizeof(floatX)));
        const double flops = 2.0 * NK * nb * (double)M * Nn;
        const double bytes = 2.0 * ((double)NK * (lda + ldb) + nc), bytes_v3 = 2.0 * ((double)N * (lda + ldb) + nc);

        for (int ver = 1; ver <= NV; ver++) {
            if (v && v != ver) continue;
            const int ordered = ver == 3;
            SegWgrad p = {ordered ? d_As : d_A, ordered ? d_Bs : d_B, d_C, lda, ldb, Nn, M, Nn, (long long)M * Nn, (long long)nb * M * Nn,
                          M, Nn, nb, E, d_counts, d_offsets, 0, ordered ? d_order : NULL, K, ordered, ordered, ordered ? d_gate : NULL};
            floatX *buf[PB_COUNT] = {0};
            buf[PB_X] = d_A; buf[PB_DY] = d_B; buf[PB_DW0] = d_C;
            auto run = [&]() {
                if (ver >= 2) {
                    if (!seg_wgrad(&p)) { fprintf(stderr, "error: seg_wgrad refused the shape\n"); exit(1); }
                    return;
                }
                for (int e = 0; e < E; e++) {  // C[e] (M x Nn per batch entry) = A_eᵀ B_e over the segment's rows
                    Plan pl = {};
                    plan_gemm(&pl, 1, 0, M, Nn, counts[e], PB_X, (size_t)offsets[e] * lda, lda, M, PB_DY, (size_t)offsets[e] * ldb, ldb, Nn,
                              PB_DW0, (size_t)e * nb * M * Nn, Nn, (long long)M * Nn, nb, 0);
                    if (pl.n == 0) cudaCheck(cudaMemsetAsync(d_C + (size_t)e * nb * M * Nn, 0, (size_t)nb * M * Nn * sizeof(floatX)));
                    plan_run_gpu(&pl, buf);
                }
            };
            cudaCheck(cudaMemset(d_C, 0xFF, nc * sizeof(floatX)));  // NaN: every element must be written
            run();
            cudaCheck(cudaDeviceSynchronize());
            float *gc = dev_download_bf16(d_C, nc);
            // reference on every 7th batch entry
            size_t nchk = 0;
            for (int b = 0; b < nb; b += 7) nchk += (size_t)E * M * Nn;
            float *got = (float *)malloc(nchk * sizeof(float)), *ref = (float *)malloc(nchk * sizeof(float)), *bnd = (float *)malloc(nchk * sizeof(float));
            size_t k = 0;
            for (int e = 0; e < E; e++)
                for (int b = 0; b < nb; b += 7)
                    for (int m = 0; m < M; m++)
                        for (int n = 0; n < Nn; n++, k++) {
                            double acc = 0.0, aabs = 0.0;
                            for (int w = offsets[e]; w < offsets[e + 1]; w++) {
                                const int row = ordered ? order[w] / K : w;
                                const float a = (ordered ? As : A)[(size_t)row * lda + b * M + m];
                                float bv = (ordered ? Bs : B)[(size_t)row * ldb + b * Nn + n];
                                if (ordered) bv = dev_bf2f(dev_f2bf(gate[order[w]] * bv));
                                acc += (double)a * bv;
                                aabs += fabs((double)a * bv);
                            }
                            got[k] = gc[(((size_t)e * nb + b) * M + m) * Nn + n];
                            ref[k] = (float)acc;
                            bnd[k] = (float)(1.01 / 256.0 * fabs(acc) + aabs / 65536.0 + 1e-6);
                        }
            char what[160];
            snprintf(what, sizeof(what), "v%d %s", ver, sh->name);
            const float err = dev_check_bounded(what, got, ref, bnd, nchk);
            free(gc); free(got); free(ref); free(bnd);
            const float ms = dev_time_ms(run);
            dev_report(what, ver, ms, ordered ? bytes_v3 : bytes, flops, err);
        }
        cudaCheck(cudaFree(d_A)); cudaCheck(cudaFree(d_B)); cudaCheck(cudaFree(d_As)); cudaCheck(cudaFree(d_Bs)); cudaCheck(cudaFree(d_C));
        free(A); free(B); free(As); free(Bs);
    }
    cudaCheck(cudaFree(d_counts)); cudaCheck(cudaFree(d_offsets)); cudaCheck(cudaFree(d_order)); cudaCheck(cudaFree(d_gate));
    free(order); free(gate);
    return dev_summary();
}
