// dev/cuda/moe_group.cu: BTT-MoE's grouping of the (token, k) pairs by expert, the step between
// the router's top-k and the experts (order, pos, counts, offsets and the tile table; each
// expert's rows padded to whole tiles of T):
//   v1  a block per expert walks all NK pairs in order, 256 a step with two barriers each, after a
//       block per expert counted them (the trainer's until 2026-12-05; here only)
//   v2  structured/moe_group.cuh: a counting sort over chunks of 1024 pairs, a warp each (count,
//       one block's scan per expert over the chunks, scatter): the trainer's
// Both are deterministic. Checked exactly against a CPU counting sort (order, pos, counts,
// offsets, tile_expert: every entry, on outputs filled with a sentinel first) on routings drawn
// like a router's (k distinct experts per token), uniform and skewed (half the pairs to one
// expert), and timed. bytes = the minimum: the selections read once, order, pos, counts, offsets
// and the tile table written once.
// Cases: the 124M model's 768 -> 3072 layer, 8 experts top 2, at N tokens (default 32768: the
// benchmark's; 16384 is a B = 16, T = 1024 step), and at 4N (B = 64); 64 experts top 2; 1024
// experts (the most a config takes) top 4 at N / 8; tile rows from moe_tile_rows as the trainer.
//
// Build: make -C dev/cuda moe_group    Run: ./dev/cuda/moe_group [version (0: all) [tokens]]
#include "harness.cuh"
#include "structured/structured.cuh"

#define NV 2

// ---- v1: the trainer's kernels until 2026-12-05
__global__ void v1_count_kernel(int *counts, const int *sel, int NK) {
    int e = blockIdx.x, c = 0;
    for (int p = threadIdx.x; p < NK; p += blockDim.x) c += sel[p] == e;
    float total = block_sum((float)c);  // exact: counts stay far below 2^24
    if (threadIdx.x == 0) counts[e] = (int)total;
}

static __device__ __forceinline__ int v1_padded(int c, int T) { return (c + T - 1) / T * T; }

__global__ void v1_group_kernel(int *order, int *pos, int *offsets, int *tile_expert, const int *counts, const int *sel, int NK, int E, int T) {
    __shared__ int warp_tot[32];
    int e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    int base = 0;
    for (int i = 0; i < e; i++) base += v1_padded(counts[i], T);
    const int padded = v1_padded(counts[e], T);
    if (threadIdx.x == 0) {
        offsets[e] = base;
        if (e == E - 1) offsets[E] = base + padded;
    }
    for (int j = threadIdx.x; j < padded / T; j += blockDim.x) tile_expert[base / T + j] = e;
    for (int w = base + counts[e] + threadIdx.x; w < base + padded; w += blockDim.x) order[w] = -1;
    int running = base;
    for (int p0 = 0; p0 < NK; p0 += blockDim.x) {
        int p = p0 + threadIdx.x;
        int mine = p < NK && sel[p] == e;
        unsigned mask = __ballot_sync(0xffffffffu, mine);
        int before_in_warp = __popc(mask & ((1u << lane) - 1u));
        __syncthreads();  // warp_tot of the previous chunk has been read
        if (lane == 0) warp_tot[warp] = __popc(mask);
        __syncthreads();
        int before = running + before_in_warp, chunk_total = 0;
        for (int w = 0; w < nw; w++) {
            if (w < warp) before += warp_tot[w];
            chunk_total += warp_tot[w];
        }
        if (mine) { order[before] = p; pos[p] = before; }
        running += chunk_total;
    }
}

typedef struct {
    int *order, *pos, *counts, *offsets, *tile_expert, *scratch;
} GroupOut;

static void run_version(int v, const GroupOut *o, const int *sel, int NK, int E, int T) {
    if (v == 1) {
        v1_count_kernel<<<E, 256>>>(o->counts, sel, NK);
        cudaCheckLaunch();
        v1_group_kernel<<<E, 256>>>(o->order, o->pos, o->offsets, o->tile_expert, o->counts, sel, NK, E, T);
        cudaCheckLaunch();
    } else {
        moe_group_gpu(o->order, o->pos, o->counts, o->offsets, o->tile_expert, o->scratch, sel, NK, E, T);
    }
}

// ---- CPU reference and checks

typedef struct {
    int *order, *pos, *counts, *offsets, *tile_expert;
    int rows, tiles;
} GroupRef;

static GroupRef cpu_group(const int *sel, int NK, int E, int T, int max_rows) {
    GroupRef r;
    r.order = (int *)malloc((size_t)max_rows * sizeof(int));
    r.pos = (int *)malloc((size_t)NK * sizeof(int));
    r.counts = (int *)calloc((size_t)E, sizeof(int));
    r.offsets = (int *)malloc((size_t)(E + 1) * sizeof(int));
    r.tile_expert = (int *)malloc((size_t)(max_rows / T + 1) * sizeof(int));
    int w = 0;
    for (int e = 0; e < E; e++) {
        r.offsets[e] = w;
        for (int p = 0; p < NK; p++)
            if (sel[p] == e) { r.pos[p] = w; r.order[w++] = p; r.counts[e]++; }
        while (w % T) r.order[w++] = -1;
        for (int t = r.offsets[e] / T; t < w / T; t++) r.tile_expert[t] = e;
    }
    r.offsets[E] = w;
    r.rows = w;
    r.tiles = w / T;
    return r;
}

static void free_ref(GroupRef *r) { free(r->order); free(r->pos); free(r->counts); free(r->offsets); free(r->tile_expert); }

static void check_ints(const char *what, const int *dev, const int *ref, size_t n) {
    int *h = (int *)malloc(n * sizeof(int) + 1);
    cudaCheck(cudaMemcpy(h, dev, n * sizeof(int), cudaMemcpyDeviceToHost));
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (h[i] != ref[i]) { if (!bad) first = i; bad++; }
    if (bad) {
        g_dev_fail++;
        printf("FAIL %s: %zu of %zu entries differ; first at %zu: gpu %d cpu %d\n", what, bad, n, first, h[first], ref[first]);
    } else {
        g_dev_pass++;
    }
    free(h);
}

// Each token's K distinct experts: the first from a skewed draw (expert 0 with probability `hot`),
// the rest uniform among the others.
static int *draw_routing(int N, int E, int K, float hot) {
    int *sel = (int *)malloc((size_t)N * K * sizeof(int));
    for (int t = 0; t < N; t++) {
        for (int k = 0; k < K; k++) {
            int e;
            for (;;) {
                e = k == 0 && dev_uniform() < hot ? 0 : (int)(dev_uniform() * E) % E;
                int dup = 0;
                for (int j = 0; j < k; j++) dup |= sel[(size_t)t * K + j] == e;
                if (!dup) break;
            }
            sel[(size_t)t * K + k] = e;
        }
    }
    return sel;
}

static void run_case(const char *name, int N, int E, int K, float hot, int version) {
    MoEShape s;
    moe_shape(&s, 16, 48, 32, 96, E, K);  // 768 -> 3072 experts: the tile rows as the trainer's
    const int NK = N * K, T = moe_tile_rows(&s, N), max_rows = moe_max_tiles(NK, E, T) * T;
    int *sel_h = draw_routing(N, E, K, hot);
    GroupRef ref = cpu_group(sel_h, NK, E, T, max_rows);
    int *sel = dev_upload(sel_h, (size_t)NK);
    GroupOut o;
    cudaCheck(cudaMalloc(&o.order, (size_t)max_rows * sizeof(int)));
    cudaCheck(cudaMalloc(&o.pos, (size_t)NK * sizeof(int)));
    cudaCheck(cudaMalloc(&o.counts, (size_t)E * sizeof(int)));
    cudaCheck(cudaMalloc(&o.offsets, (size_t)(E + 1) * sizeof(int)));
    cudaCheck(cudaMalloc(&o.tile_expert, (size_t)(max_rows / T) * sizeof(int)));
    cudaCheck(cudaMalloc(&o.scratch, moe_group_scratch_ints(NK, E) * sizeof(int)));
    const double bytes = 4.0 * ((double)NK + ref.rows + NK + E + E + 1 + ref.tiles);
    printf("%s: %d tokens, %d experts, top %d, %s routing: %d pairs in %d tiles of %d rows (%d padding rows); largest expert %d pairs\n", name,
           N, E, K, hot > 0 ? "skewed" : "uniform", NK, ref.tiles, T, ref.rows - NK,
           [&] { int m = 0; for (int e = 0; e < E; e++) m = ref.counts[e] > m ? ref.counts[e] : m; return m; }());
    float ms[NV + 1] = {0};
    for (int v = 1; v <= NV; v++) {
        if (version && v != version) continue;
        cudaCheck(cudaMemset(o.order, 0x7F, (size_t)max_rows * sizeof(int)));
        cudaCheck(cudaMemset(o.pos, 0x7F, (size_t)NK * sizeof(int)));
        cudaCheck(cudaMemset(o.counts, 0x7F, (size_t)E * sizeof(int)));
        cudaCheck(cudaMemset(o.offsets, 0x7F, (size_t)(E + 1) * sizeof(int)));
        cudaCheck(cudaMemset(o.tile_expert, 0x7F, (size_t)(max_rows / T) * sizeof(int)));
        run_version(v, &o, sel, NK, E, T);
        cudaCheck(cudaDeviceSynchronize());
        char what[160];
        snprintf(what, sizeof what, "%s v%d counts", name, v);
        check_ints(what, o.counts, ref.counts, (size_t)E);
        snprintf(what, sizeof what, "%s v%d offsets", name, v);
        check_ints(what, o.offsets, ref.offsets, (size_t)E + 1);
        snprintf(what, sizeof what, "%s v%d order (with -1 padding)", name, v);
        check_ints(what, o.order, ref.order, (size_t)ref.rows);
        snprintf(what, sizeof what, "%s v%d pos", name, v);
        check_ints(what, o.pos, ref.pos, (size_t)NK);
        snprintf(what, sizeof what, "%s v%d tile_expert", name, v);
        check_ints(what, o.tile_expert, ref.tile_expert, (size_t)ref.tiles);
        ms[v] = dev_time_ms([&] { run_version(v, &o, sel, NK, E, T); });
        dev_report(name, v, ms[v], bytes, 0.0, 0.0f);
    }
    if (ms[1] > 0 && ms[2] > 0) printf("%s: v2 takes %.3f of v1's time (%.1fx faster)\n", name, ms[2] / ms[1], ms[1] / ms[2]);
    cudaCheck(cudaFree(o.order)); cudaCheck(cudaFree(o.pos)); cudaCheck(cudaFree(o.counts)); cudaCheck(cudaFree(o.offsets));
    cudaCheck(cudaFree(o.tile_expert)); cudaCheck(cudaFree(o.scratch)); cudaCheck(cudaFree(sel));
    free(sel_h);
    free_ref(&ref);
}

int main(int argc, char **argv) {
    const int version = dev_version_arg(argc, argv, NV);
    const int N = argc > 2 ? atoi(argv[2]) : 32768;
    if (N < 8) { fprintf(stderr, "error: tokens '%s': give at least 8\n", argv[2]); return EXIT_FAILURE; }
    gpu_init(0);
    run_case("8 experts top 2", N, 8, 2, 0.0f, version);
    run_case("8 experts top 2, skewed", N, 8, 2, 0.5f, version);
    run_case("8 experts top 2, 4N tokens", 4 * N, 8, 2, 0.0f, version);
    run_case("64 experts top 2", N, 64, 2, 0.0f, version);
    run_case("1024 experts top 4, N/8 tokens", N / 8, 1024, 4, 0.0f, version);
    return dev_summary();
}
