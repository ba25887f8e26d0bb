// dev/cuda/seg_wgrad.cu: BTT-MoE's expert weight gradients, C[s][b] = Σ_{rows of segment s}
// A[r, b-block]ᵀ B[r, b-block] (structured/seg_wgrad.cuh), on the GPU:
//   v1  per segment one cuBLAS strided-batched GEMM (the -sk 0 backward's way: the segment sizes
//       must be on the host, here they are given; S launches)
//   v2  seg_wgrad: one launch for every segment, the row ranges read on the device
//   v3  seg_wgrad reading A and B through a grouping (row order[w] / K) with a gate on B, as the
//       -sk 1 backward reads x and dy (no gathered copies)
//   v4  a candidate, here only: v2 with each warp computing a 16 x 16·ST strip of C (ST = 3 or 2
//       accumulators, the largest that divides Nn/16), so that every A step is loaded once per ST
//       output tiles instead of once per tile (v2 re-reads A Nn/16 times, from L2)
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

#define NV 4

// v4: as seg_wgrad_kernel (structured/seg_wgrad.cuh) for grouped rows, with a warp per 16 x 16·STRIP
// strip of C: the A step (16 rows x 16 columns) is loaded once for STRIP MMAs.
template <int STRIP>
__global__ void __launch_bounds__(32 * SW_WARPS) seg_wgrad_strip_kernel(SegWgrad p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    __shared__ __align__(128) floatX sm[SW_WARPS][256 * (1 + STRIP)];  // per warp: the A step, STRIP B steps; later fp32 staging
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tn = p.Nn / (16 * STRIP), strip = blockIdx.x * SW_WARPS + warp;
    if (strip >= (p.M / 16) * tn) return;
    const int b = blockIdx.y, s = blockIdx.z, m0 = (strip / tn) * 16, n0 = (strip % tn) * 16 * STRIP;
    const int r0 = p.offsets[s], rows = p.counts[s], lr = lane / 2, lc = (lane % 2) * 8;
    floatX *As = sm[warp], *Bs = As + 256;
    float *stg = reinterpret_cast<float *>(As);
    const floatX *Ab = p.A + b * p.sa + m0 + lc, *Bb = p.B + b * p.sb + n0 + lc;
    x128 a = x128::zeros(), bv[STRIP];
    for (int j = 0; j < STRIP; j++) bv[j] = x128::zeros();
    if (lr < rows) {
        a = load128(Ab + (size_t)(r0 + lr) * p.lda);
        for (int j = 0; j < STRIP; j++) bv[j] = load128(Bb + (size_t)(r0 + lr) * p.ldb + j * 16);
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[STRIP];
    for (int j = 0; j < STRIP; j++) wmma::fill_fragment(acc[j], 0.0f);
    for (int k = 0; k < rows; k += 16) {
        __syncwarp();
        store128(As + lr * 16 + lc, a);
        for (int j = 0; j < STRIP; j++) store128(Bs + j * 256 + lr * 16 + lc, bv[j]);
        __syncwarp();
        const int nr = k + 16 + lr;
        a = x128::zeros();
        for (int j = 0; j < STRIP; j++) bv[j] = x128::zeros();
        if (nr < rows) {
            a = load128(Ab + (size_t)(r0 + nr) * p.lda);
            for (int j = 0; j < STRIP; j++) bv[j] = load128(Bb + (size_t)(r0 + nr) * p.ldb + j * 16);
        }
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> fa;
        wmma::load_matrix_sync(fa, As, 16);
        for (int j = 0; j < STRIP; j++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, Bs + j * 256, 16);
            wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
    }
    for (int j = 0; j < STRIP; j++) {
        __syncwarp();
        wmma::store_matrix_sync(stg, acc[j], 16, wmma::mem_row_major);
        __syncwarp();
        floatX *c = p.C + s * p.c_seg + b * p.c_batch + (size_t)(m0 + lr) * p.ldc + n0 + j * 16 + lc;
        x128 o;
        for (int t = 0; t < 8; t++) o[t] = (floatX)stg[lr * 16 + lc + t];
        store128(c, o);
    }
#endif
}

typedef struct { const char *name; int M, Nn, batch; } Shape;

int main(int argc, char **argv) {
    gpu_init(0);
    const int v = dev_version_arg(argc, argv, NV);
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
            if (ver == 4 && (Nn / 16) % 3 && (Nn / 16) % 2) {
                printf("   v4: Nn / 16 = %d has no strip of 2 or 3 tiles\n", Nn / 16);
                continue;
            }
            const int ordered = ver == 3;
            SegWgrad p = {ordered ? d_As : d_A, ordered ? d_Bs : d_B, d_C, lda, ldb, Nn, M, Nn, (long long)M * Nn, (long long)nb * M * Nn,
                          M, Nn, nb, E, d_counts, d_offsets, 0, ordered ? d_order : NULL, K, ordered, ordered, ordered ? d_gate : NULL};
            floatX *buf[PB_COUNT] = {0};
            buf[PB_X] = d_A; buf[PB_DY] = d_B; buf[PB_DW0] = d_C;
            auto run = [&]() {
                if (ver == 4) {
                    const int st = (Nn / 16) % 3 == 0 ? 3 : 2, strips = (M / 16) * (Nn / (16 * st));
                    const dim3 grid(ceil_div_i(strips, SW_WARPS), nb, E);
                    if (st == 3) seg_wgrad_strip_kernel<3><<<grid, 32 * SW_WARPS>>>(p);
                    else seg_wgrad_strip_kernel<2><<<grid, 32 * SW_WARPS>>>(p);
                    cudaCheckLaunch();
                    return;
                }
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
