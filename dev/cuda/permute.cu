// dev/cuda/permute.cu: the structured plans' permute (structured/gpu_plan.h's PLAN_PERMUTE), each
// row [R][C][blk] -> [C][R][blk], bf16, checked bit for bit against the CPU and timed against the
// memory roofline (it reads and writes each element once and does no arithmetic).
//
//   v1  one element per thread in source order (the first version, now the trainer's fallback):
//       a warp's stores land C·blk elements apart
//   v2  the trainer's plan_permute_gpu (structured/plan_gpu.cuh): whole rows staged in shared
//       memory with coalesced loads, written back in destination order with coalesced stores
//
// Shapes: the permutes of the cuBLAS BTT and Monarch layers at N = 32768 rows (2048 for 4096 -> 16384) (z between the two
// stages of BTT 768 -> 3072 at ranks 1 and 4 and of 4096 -> 16384 at rank 4, both ways; Monarch's
// u and y of 768 -> 3072 with 4 blocks).
//
// Build: make -C dev/cuda permute    Run: ./dev/cuda/permute [version]
#include "harness.cuh"
#include "structured/structured.cuh"

#define NV 2

typedef struct {
    const char *name;
    int R, C, blk;
} PermuteShape;

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const int max_rows = 32768;  // fewer for long rows: at most 64M elements (the CPU reference's time)
    const PermuteShape shapes[] = {
        {"btt 768->3072 r1 fwd (gamma, phi)", 48, 32, 1},  {"btt 768->3072 r1 bwd (phi, gamma)", 32, 48, 1},
        {"btt 768->3072 r4 fwd (gamma, phi)", 48, 32, 4},  {"btt 768->3072 r4 bwd (phi, gamma)", 32, 48, 4},
        {"btt 4096->16384 r4 fwd", 64, 128, 4},           {"monarch 768->3072 4 blocks u (q, nb)", 192, 4, 1},
        {"monarch 768->3072 4 blocks y (nb, s)", 4, 768, 1},
    };
    printf("permute: rows [R][C][blk] -> [C][R][blk], up to %d rows, bf16, on %s\n", max_rows, g_gpu.prop.name);
    for (const PermuteShape &sh : shapes) {
        const int len = sh.R * sh.C * sh.blk, rows = len > (64 << 20) / max_rows ? (64 << 20) / len : max_rows;
        const size_t n = (size_t)rows * len;
        printf("-- %s: R %d C %d blk %d, %d rows of %d elements (%.1f MB each way)\n", sh.name, sh.R, sh.C, sh.blk, rows, len, n * 2 / 1e6);
        float *h = dev_random(n, -4.0f, 4.0f);
        dev_round_bf16(h, n);
        float *ref = (float *)malloc(n * sizeof(float)), *bound = (float *)calloc(n, sizeof(float));  // exact: bound 0
        for (size_t r = 0; r < (size_t)rows; r++)
            for (int j = 0; j < len; j++) ref[r * len + plan_permute_dst_index(j, sh.R, sh.C, sh.blk)] = h[r * len + j];
        floatX *d_src = dev_upload_bf16(h, n), *d_dst;
        cudaCheck(cudaMalloc(&d_dst, n * sizeof(floatX)));
        for (int ver = 1; ver <= NV; ver++) {
            if (v && ver != v) continue;
            cudaCheck(cudaMemset(d_dst, 0xFF, n * sizeof(floatX)));  // NaN: every element must be written
            auto run = [&]() {
                if (ver == 1) {
                    plan_permute_scatter_kernel<<<ceil_div_i((long)n, 256), 256>>>(d_dst, d_src, rows, NULL, len, len, len, sh.R, sh.C, sh.blk, PlanEpi{0, NULL, NULL, NULL});
                    cudaCheckLaunch();
                } else {
                    plan_permute_gpu(d_dst, d_src, rows, len, len, sh.R, sh.C, sh.blk);
                }
            };
            run();
            cudaCheck(cudaDeviceSynchronize());
            float *g = dev_download_bf16(d_dst, n);
            char what[128];
            snprintf(what, sizeof(what), "v%d %s", ver, sh.name);
            float err = dev_check_bounded(what, g, ref, bound, n);
            free(g);
            dev_report(sh.name, ver, dev_time_ms(run), 2.0 * n * sizeof(floatX), 0.0, err);
        }
        cudaCheck(cudaFree(d_src));
        cudaCheck(cudaFree(d_dst));
        free(h); free(ref); free(bound);
    }
    return dev_summary();
}
