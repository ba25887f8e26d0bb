// dev/cuda/global_norm.cu: the L2 norm of all bf16 gradients (for clipping), as one float on
// the host; checked against a double CPU sum and timed (each call includes the device-to-host
// copy of the result, as the trainer's gpt2_grad_norm does).
//
//   v1  naive: fp32 grid-stride partial sums, one atomicAdd per warp into one float (written
//       here): fast to write, but the order of the atomics, and so the last bits, vary by run
//   v2  a grid of 512 blocks of 512 threads (fewer blocks below 4M elements: the grid is a
//       function of n, global_norm_blocks) of fp32 partial sums, then one block sums the partials
//       in a fixed tree (written here; the trainer's until 2026-12-04): bit-identical every run
//       and on every GPU, but a vector cut into slices (ZeRO-1's, summed over ranks) gives other bits
//   v3  the trainer's global_norm (cuda/global_norm.cuh): v2's grid and trees in fp64, so that
//       the slices' sums give the whole vector's norm to the bit (ZeRO-1 equals plain data
//       parallelism). Required of v2 and v3: two runs give the same bits; of v3 also: the norm
//       from 3 slices' sums of squares is the whole vector's.
//   v4  a candidate written 2026-12-05, here only (v3 ran at 25% of the DRAM roofline on an H200,
//       its threads reading 2 bytes a load with one fp64 add each in a chain): v3's grid and fp64
//       partials, each thread reading 16 bytes (8 bf16) a load, up to 4 loads in flight; the
//       squares are exact in fp32 and each is added in fp64 as in v3; the elements before the first
//       16-byte boundary and after the last whole vector (a ZeRO slice may start anywhere) one by
//       one. The same requirements as v3, also on a slice that starts off the boundary.
//
// Sizes: n = 124,475,904 (GPT-2 124M with the padded vocabulary) and n = 1001 (fewer elements
// than threads, odd).
//
// Build: make -C dev/cuda global_norm    Run: ./dev/cuda/global_norm [version]
#include "harness.cuh"
#include "cuda/global_norm.cuh"

#define NV 4

// ----------------------------------------------------------------------------------------------
// v1

#define NAIVE_BLOCKS 1024
#define NAIVE_THREADS 256

__global__ void global_norm_naive_kernel(float *out, const floatX *g, size_t n) {
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = (float)g[i];
        s += v * v;
    }
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) atomicAdd(out, s);
}

static float global_norm_naive(const floatX *g, size_t n, float *d_out) {
    cudaCheck(cudaMemset(d_out, 0, sizeof(float)));
    global_norm_naive_kernel<<<NAIVE_BLOCKS, NAIVE_THREADS>>>(d_out, g, n);
    cudaCheckLaunch();
    float sq = 0.0f;
    cudaCheck(cudaMemcpy(&sq, d_out, sizeof(float), cudaMemcpyDeviceToHost));
    return (float)sqrt((double)sq);
}

// ----------------------------------------------------------------------------------------------
// v2

// the trainer's kernels with fp32 accumulators
static float global_norm_fp32(const floatX *g, size_t n, float *scratch) {
    global_norm_squared_launch(g, n, scratch);
    float sq = 0.0f;
    cudaCheck(cudaMemcpy(&sq, scratch + NORM_BLOCKS, sizeof(float), cudaMemcpyDeviceToHost));
    return (float)sqrt((double)sq);
}

// ----------------------------------------------------------------------------------------------
// v4

#define NORM_UNROLL 4

__global__ void global_norm_vec_kernel(double *partial, const floatX *g, size_t n) {
    const size_t head = min(n, (size_t)((16 - (uintptr_t)g % 16) % 16) / sizeof(floatX));  // elements before a 16-byte boundary
    const size_t nv = (n - head) / 8, tail = head + nv * 8;                                 // whole vectors; where the rest starts
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    const uint4 *v = reinterpret_cast<const uint4 *>(g + head);
    double s = 0.0;
    for (size_t i = tid; i < nv; i += NORM_UNROLL * stride) {
        uint4 q[NORM_UNROLL];
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++) q[u] = i + u * stride < nv ? ld16_ro(v + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++) {
            const uint32_t w[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float x = __uint_as_float(k % 2 ? w[k / 2] & 0xFFFF0000u : w[k / 2] << 16);  // bf16 bits -> fp32
                s += (double)(x * x);
            }
        }
    }
    if (tid < head) { const float x = (float)g[tid]; s += (double)(x * x); }
    if (tid < n - tail) { const float x = (float)g[tail + tid]; s += (double)(x * x); }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

static double global_norm_squared_vec(const floatX *g, size_t n, double *scratch) {
    const int blocks = global_norm_blocks(n);
    global_norm_vec_kernel<<<blocks, NORM_THREADS>>>(scratch, g, n);
    cudaCheckLaunch();
    global_norm_final_kernel<double><<<1, 1024>>>(scratch + NORM_BLOCKS, scratch, blocks);
    cudaCheckLaunch();
    double sq = 0.0;
    cudaCheck(cudaMemcpy(&sq, scratch + NORM_BLOCKS, sizeof(double), cudaMemcpyDeviceToHost));
    return sq;
}

// ----------------------------------------------------------------------------------------------
// Tolerances, on the norm (half the relative error of the sum of squares; every term >= 0, so
// the worst case is (length of the longest chain of fp32 additions) 2^-24 of the sum):
//  v2: rtol 5e-5 — ceil(n / 262144) = 475 serial adds per thread, a 9-level block tree, a
//      10-level final tree: 495 2^-24 = 3e-5 on the sum, 1.5e-5 on the norm
//  v1: rtol 3e-4 — the same 475, a 5-level warp tree, then 8192 atomic adds in a row into one
//      float: 8672 2^-24 = 5.2e-4 on the sum, 2.6e-4 on the norm
//  v3, v4: rtol 1e-6 — fp64 sums (495 2^-53 on the sum), then the norm rounded to fp32 (2^-24)
static const float TOL_RTOL[NV + 1] = {0.0f, 3e-4f, 5e-5f, 1e-6f, 1e-6f};

int main(int argc, char **argv) {
    gpu_init(0);
    int v = dev_version_arg(argc, argv, NV);
    const size_t sizes[2] = {124475904, 1001};
    printf("global_norm: n = %zu and %zu, on %s\n", sizes[0], sizes[1], g_gpu.prop.name);

    double *d_scratch;  // v2 uses it as floats
    float *d_out;
    cudaCheck(cudaMalloc(&d_scratch, (NORM_BLOCKS + 1) * sizeof(double)));
    cudaCheck(cudaMalloc(&d_out, sizeof(float)));
    for (int si = 0; si < 2; si++) {
        const size_t n = sizes[si];
        float *g = dev_random(n, -0.01f, 0.01f);
        dev_round_bf16(g, n);
        double sq = 0.0;
        for (size_t i = 0; i < n; i++) sq += (double)g[i] * g[i];
        float ref = (float)sqrt(sq);
        floatX *d_g = dev_upload_bf16(g, n);
        free(g);

        for (int ver = 1; ver <= NV; ver++) {
            if (v && ver != v) continue;
            char what[96];
            float r1 = 0.0f;
            auto run = [&]() {
                r1 = ver == 1   ? global_norm_naive(d_g, n, d_out)
                     : ver == 2 ? global_norm_fp32(d_g, n, (float *)d_scratch)
                     : ver == 3 ? global_norm(d_g, n, d_scratch)
                                : (float)sqrt(global_norm_squared_vec(d_g, n, d_scratch));
            };
            cudaCheck(cudaMemset(d_scratch, 0xFF, (NORM_BLOCKS + 1) * sizeof(double)));  // NaN: must be overwritten
            run();
            float first = r1;
            snprintf(what, sizeof(what), "v%d n=%zu norm", ver, n);
            float err = dev_check(what, &first, &ref, 1, 0.0f, TOL_RTOL[ver]);
            run();
            if (ver >= 2) {
                snprintf(what, sizeof(what), "v%d n=%zu two runs bit-identical", ver, n);
                dev_check_same_bits(what, first, r1);
            } else {
                printf("   v1 n=%zu: two runs %s (not required: atomics)\n", n,
                       memcmp(&first, &r1, sizeof(float)) == 0 ? "bit-identical this time" : "differ");
            }
            if (ver >= 3) {  // ZeRO-1 over 3 ranks: the slices' sums of squares, summed (n = 1001: slices 334 apart, off 16 bytes)
                const size_t shard = (n + 2) / 3;
                double sq = 0.0;
                for (size_t lo = 0; lo < n; lo += shard) {
                    const size_t len = n - lo < shard ? n - lo : shard;
                    sq += ver == 3 ? global_norm_squared(d_g + lo, len, d_scratch) : global_norm_squared_vec(d_g + lo, len, d_scratch);
                }
                snprintf(what, sizeof(what), "v%d n=%zu norm from 3 slices' sums of squares bit-identical", ver, n);
                dev_check_same_bits(what, (float)sqrt(sq), first);
            }
            if (ver == 4) {  // a vector that starts off a 16-byte boundary, against the CPU
                const size_t off = 3, m = n - off;
                float *h = dev_download_bf16(d_g + off, m);
                double hs = 0.0;
                for (size_t i = 0; i < m; i++) hs += (double)h[i] * h[i];
                free(h);
                const float want = (float)sqrt(hs), got = (float)sqrt(global_norm_squared_vec(d_g + off, m, d_scratch));
                snprintf(what, sizeof(what), "v4 n=%zu from element 3 (6 bytes off the boundary) norm", m);
                dev_check(what, &got, &want, 1, 0.0f, TOL_RTOL[4]);
            }
            float ms = dev_time_ms(run);
            snprintf(what, sizeof(what), "global_norm n=%zu", n);
            dev_report(what, ver, ms, 2.0 * n, 2.0 * n, err);
        }
        cudaCheck(cudaFree(d_g));
    }
    cudaCheck(cudaFree(d_scratch));
    cudaCheck(cudaFree(d_out));
    return dev_summary();
}
