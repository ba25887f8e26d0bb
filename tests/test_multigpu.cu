// test_multigpu.cu: cuda/multigpu.cuh on its own, one process per GPU (mpirun -np N ./test_multigpu,
// or each process with -pn N -pr R -pi fs|tcp -pf ...; alone, with a communicator of one rank, so
// that one GPU already runs NCCL). Every collective the GPU trainer issues is checked against host
// arithmetic on values that bf16 holds exactly (small integers: any summation order gives the same
// bits), the gradient blocks written by a kernel on the default stream just before each is handed
// to NCCL, as the trainer's backward does. Then, on a GPU, the time and bus bandwidth of averaging
// a GPT-2 124M gradient vector whole and block by block (-b 0 skips it; -b 2 runs it on the
// simulator too, on a small model, for the code path). Rank 0 prints
// "N passed, N failed"; a check fails when it fails on any rank.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common/gpt2.h"
#include "common/multiproc.h"
#include "common/zero.h"
#include "cuda/common.cuh"
#include "cuda/multigpu.cuh"

#ifndef USE_NCCL
#error "test_multigpu tests the NCCL collectives: build it with -DUSE_NCCL (the Makefile does where it finds NCCL)"
#endif

static MultiProc g_mp;
static int g_passed = 0, g_failed = 0;

// A check over every rank: fails if it failed on any (the count is summed through NCCL).
static void check_all(int cond, const char *name, const char *why) {
    float bad = cond ? 0.0f : 1.0f;
    g_mp.sum_floats(&bad, 1);
    if (bad == 0.0f) g_passed++;
    else g_failed++;
    if (g_mp.rank != 0) return;
    if (bad == 0.0f) printf("ok %s\n", name);
    else printf("FAIL %s: on %.0f of %d ranks%s%s\n", name, bad, g_mp.nproc, cond ? "" : "; rank 0: ", cond ? "" : why);
    fflush(stdout);
}

// rank r's gradient element i, and the average over n ranks: small integers, exact in bf16
static float grad_value(size_t i, int r) { return (float)((i * 7) % 13) + 2.0f * (float)r; }
static float grad_mean(size_t i, int n) { return (float)((i * 7) % 13) + (float)(n - 1); }
// the weight element i of the slice owned by rank `owner`
static float weight_value(size_t i, int owner) { return (float)((i * 5) % 11) + 16.0f * (float)owner; }

// what the backward does to a block's gradients before they go to NCCL: writes them, here on the
// default stream, so that a collective not ordered after it would read the -1 fill
__global__ void write_grads_kernel(floatX *grads, size_t offset, size_t count, int rank) {
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < count; j += (size_t)gridDim.x * blockDim.x) {
        size_t i = offset + j;
        grads[i] = (floatX)((float)((i * 7) % 13) + 2.0f * (float)rank);
    }
}

static void fill_host_bf16(floatX *h, size_t n, float v) {
    for (size_t i = 0; i < n; i++) h[i] = (floatX)v;
}

// The trainer's gradient averaging on layout g (stage 0 or ZeRO-1): block ranges from last to first,
// each written by a kernel right before it is handed over, then the tensors in no block, then the join.
static void test_grad_averaging(const GPT2Layout *g, int stage, const char *what) {
    const int L = g->config.num_layers, R = g_mp.rank, N = g_mp.nproc;
    ZeroShard z;
    zero_shard_init(&z, stage, g->params.total, R, N);
    size_t n = z.padded;
    floatX *h = (floatX *)mallocCheck(n * sizeof(floatX));
    fill_host_bf16(h, n, -1.0f);
    floatX *d = cudaMallocNamed(floatX, n, "test: gradients");
    cudaCheck(cudaMemcpy(d, h, n * sizeof(floatX), cudaMemcpyHostToDevice));
    ParamRange *r;
    int *first = gpt2_block_ranges(g, &r);
    for (int l = L - 1; l >= -1; l--) {  // the blocks from the last, then (as after the encoder) the rest
        int b = l >= 0 ? l : L;
        for (int i = first[b]; i < first[b + 1]; i++) {
            write_grads_kernel<<<64, 256>>>(d, r[i].offset, r[i].count, R);
            cudaCheckLaunch();
        }
        multigpu_average_grad_ranges(d, r + first[b], first[b + 1] - first[b], &z);
    }
    multigpu_grads_join();
    cudaCheck(cudaMemcpy(h, d, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    size_t bad = 0, first_bad = 0;
    float got = 0.0f, want = 0.0f;
    for (size_t i = 0; i < g->params.total; i++) {
        int mine = i >= z.lo && i < z.hi;  // stage 0: every element
        float w = mine ? grad_mean(i, N) : grad_value(i, R);
        if ((float)h[i] != w && !bad++) { first_bad = i; got = (float)h[i]; want = w; }
    }
    char name[256], why[256];
    snprintf(name, sizeof(name), "%s: %zu gradients averaged block by block%s exactly (%d blocks, %d rank%s)", what, g->params.total,
             stage ? " onto each slice's owner (ZeRO-1), the rest untouched," : "", L, N, N > 1 ? "s" : "");
    snprintf(why, sizeof(why), "%zu wrong; first at %zu: %g, expected %g", bad, first_bad, got, want);
    check_all(bad == 0, name, why);
    cudaCheck(cudaFree(d));
    free(h); free(first); free(r);
}

// ZeRO-1's all-gather: every rank's slice (and only its slice) to every rank, bf16 and fp32.
static void test_allgather(size_t total, int fp32) {
    const int R = g_mp.rank, N = g_mp.nproc;
    ZeroShard z;
    zero_shard_init(&z, 1, total, R, N);
    if (!z.stage) zero_shard_init(&z, 0, total, R, N);
    size_t shard = z.stage ? z.shard : total, n = shard * (size_t)N, es = fp32 ? sizeof(float) : sizeof(floatX);
    char *h = (char *)mallocCheck(n * es);
    for (size_t i = 0; i < n; i++) {
        int owner = (int)(i / shard);
        float v = owner == R ? weight_value(i, owner) : -3.0f;
        if (fp32) ((float *)h)[i] = v;
        else ((floatX *)h)[i] = (floatX)v;
    }
    void *d = cuda_malloc_named(n * es, "test: weights");
    cudaCheck(cudaMemcpy(d, h, n * es, cudaMemcpyHostToDevice));
    multigpu_allgather(d, shard, fp32, R);
    cudaCheck(cudaMemcpy(h, d, n * es, cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        float v = fp32 ? ((float *)h)[i] : (float)((floatX *)h)[i];
        if (v != weight_value(i, (int)(i / shard))) bad++;
    }
    char name[160], why[64];
    snprintf(name, sizeof(name), "all-gather of %d slices of %zu %s weights: every rank holds every slice", N, shard, fp32 ? "fp32" : "bf16");
    snprintf(why, sizeof(why), "%zu elements wrong", bad);
    check_all(bad == 0, name, why);
    cudaCheck(cudaFree(d));
    free(h);
}

static void test_host_and_device_sums(void) {
    const int R = g_mp.rank, N = g_mp.nproc;
    float f[5];
    double dd[3], *d_dev = cudaMallocNamed(double, 3, "test: doubles");
    for (int i = 0; i < 5; i++) f[i] = (float)(R + 10 * i);
    g_mp.sum_floats(f, 5);
    int ok = 1;
    for (int i = 0; i < 5; i++) ok &= f[i] == (float)(N * 10 * i + N * (N - 1) / 2);
    check_all(ok, "host all-reduce of floats: the sum over ranks", "a sum differs");
    for (int i = 0; i < 3; i++) dd[i] = (double)R * (i + 1) + 0.25;
    g_mp.sum_doubles(dd, 3);
    ok = 1;
    for (int i = 0; i < 3; i++) ok &= dd[i] == (double)(N * (N - 1) / 2) * (i + 1) + 0.25 * N;
    check_all(ok, "host all-reduce of doubles: the sum over ranks", "a sum differs");
    for (int i = 0; i < 3; i++) dd[i] = 1.5 * R + i;
    cudaCheck(cudaMemcpy(d_dev, dd, sizeof(dd), cudaMemcpyHostToDevice));
    multigpu_sum_device_doubles(d_dev, 3);  // queued: the copy below waits for it
    cudaCheck(cudaMemcpy(dd, d_dev, sizeof(dd), cudaMemcpyDeviceToHost));
    ok = 1;
    for (int i = 0; i < 3; i++) ok &= dd[i] == 1.5 * (N * (N - 1) / 2) + (double)N * i;
    check_all(ok, "device all-reduce of doubles (BTT-MoE's routing statistics), read after it by a copy", "a sum differs");
    g_mp.barrier();
    check_all(1, "barrier", NULL);
    cudaCheck(cudaFree(d_dev));
}

// Time of averaging layout g's gradients, whole (one range) and block by block as the trainer does
// (here with nothing to overlap), and the bus bandwidth NCCL's tests would print for it.
static void bench_grad_averaging(const GPT2Layout *g, int stage, int reps) {
    const int L = g->config.num_layers, R = g_mp.rank, N = g_mp.nproc;
    ZeroShard z;
    zero_shard_init(&z, stage, g->params.total, R, N);
    floatX *d = cudaMallocNamed(floatX, z.padded, "bench: gradients");
    cudaCheck(cudaMemset(d, 0, z.padded * sizeof(floatX)));
    ParamRange *r;
    int *first = gpt2_block_ranges(g, &r);
    ParamRange whole = {0, g->params.total};
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    double bytes = (double)g->params.total * sizeof(floatX);
    // NCCL's bus bandwidth: all-reduce moves 2(N-1)/N of the data over each link, reduce(-scatter) (N-1)/N
    double bus = N > 1 ? (stage ? 1.0 : 2.0) * (N - 1) / N : 1.0;
    for (int way = 0; way < 2; way++) {
        float best = 1e30f;
        for (int rep = 0; rep <= reps; rep++) {  // rep 0 warms up
            g_mp.barrier();
            cudaCheck(cudaEventRecord(e0, 0));
            if (way == 0) multigpu_average_grad_ranges(d, &whole, 1, &z);
            else
                for (int l = L; l >= 0; l--) multigpu_average_grad_ranges(d, r + first[l], first[l + 1] - first[l], &z);
            multigpu_grads_join();
            cudaCheck(cudaEventRecord(e1, 0));
            cudaCheck(cudaEventSynchronize(e1));
            float ms;
            cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
            if (rep > 0 && ms < best) best = ms;
        }
        float mean = best;  // over the ranks (they wait for each other, so their times are close)
        g_mp.sum_floats(&mean, 1);
        mean /= N;
        if (R == 0)
            printf("bench: %s of %.1f MB of bf16 gradients, %s (%d range%s): %.3f ms (best of %d, mean over ranks), "
                   "%s %.1f GB/s%s\n", stage ? "ZeRO-1 reduce" : "all-reduce", bytes / 1e6, way ? "block by block" : "whole",
                   way ? first[L + 1] : 1, way ? "s" : "", mean, reps, N > 1 ? "bus bandwidth" : "one rank: NCCL's local copy,",
                   bus * bytes / (mean * 1e-3) / 1e9, strstr(g_gpu.prop.name, "simulator") ? " (simulator: timings mean nothing)" : "");
    }
    cudaCheck(cudaEventDestroy(e0));
    cudaCheck(cudaEventDestroy(e1));
    cudaCheck(cudaFree(d));
    free(r); free(first);
}

int main(int argc, char **argv) {
    multiproc_init(&g_mp, &argc, &argv);
    LaunchArgs la = {0, 0, 8, NULL, NULL};
    int bench = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *f = argv[i], *v = argv[i + 1];
        if (!strcmp(f, "-pn")) la.pn = atoi(v);
        else if (!strcmp(f, "-pr")) la.pr = atoi(v);
        else if (!strcmp(f, "-pg")) la.pg = atoi(v);
        else if (!strcmp(f, "-pi")) la.pi = v;
        else if (!strcmp(f, "-pf")) la.pf = v;
        else if (!strcmp(f, "-b")) bench = atoi(v);
        else fatal("%s: unknown flag (flags: -pn -pr -pg -pi -pf as train_gpt2cu's; -b 0: no bandwidth figures, 2: also on the "
                   "simulator)", f);
    }
    multigpu_init(&g_mp, &la, 1);  // a communicator even for one rank: one GPU runs NCCL too
    if (g_mp.rank == 0) printf("test_multigpu: %d rank%s, GPU %s\n", g_mp.nproc, g_mp.nproc > 1 ? "s" : "", g_gpu.prop.name);
    test_host_and_device_sums();
    // a small model whose table no rank count divides evenly, and a structured one with an untied head
    GPT2Config c = {64, 1000, pad_vocab(1000), 3, 4, 64};
    GPT2Layout g;
    gpt2_layout_build(&g, &c);
    test_grad_averaging(&g, 0, "dense 3 blocks");
    test_grad_averaging(&g, 1, "dense 3 blocks");
    test_allgather(g.params.total, 0);
    test_allgather(g.params.total, 1);
    gpt2_layout_free(&g);
    const char *text = "n_layer = 2\nn_head = 4\nn_embd = 96\nvocab_size = 300\nmax_seq_len = 16\nlm_head = monarch\n"
                       "[linear]\nstruct = btt\nrank = 2\n[linear.v]\nstruct = btt_moe\n[linear.fc]\nstruct = monarch\nblocks = 4\n"
                       "[linear.lm_head]\nblocks = 4\n";
    ConfigFile cf;
    config_parse_text(&cf, "structured", text);
    gpt2_config_from_file(&cf, &c);
    StructConfig sc;
    struct_config_parse(&cf, &c, &sc);
    gpt2_layout_build_structured(&g, &c, &sc);
    test_grad_averaging(&g, 0, "structured 2 blocks, untied head");
    test_grad_averaging(&g, 1, "structured 2 blocks, untied head");
    gpt2_layout_free(&g);
    config_free(&cf);
    int simulated = strstr(g_gpu.prop.name, "simulator") != NULL;
    if (bench == 2 || (bench == 1 && !simulated)) {  // -b 2 on the simulator: the code path, on d2, timings meaningless
        GPT2Config cb;
        gpt2_config_from_depth_name(simulated ? "d2" : "d12", &cb);
        gpt2_layout_build(&g, &cb);
        bench_grad_averaging(&g, 0, simulated ? 1 : 5);
        if (g_mp.nproc > 1) bench_grad_averaging(&g, 1, simulated ? 1 : 5);
        gpt2_layout_free(&g);
    }
    if (g_mp.rank == 0) printf("%d passed, %d failed\n", g_passed, g_failed);
    int failed = g_failed;
    multigpu_finalize();
    multiproc_finalize(&g_mp);
    return failed ? 1 : 0;
}
