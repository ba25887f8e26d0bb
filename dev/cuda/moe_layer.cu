// dev/cuda/moe_layer.cu: a BTT-MoE layer's forward + backward, versions of how the experts run
// (v1-v3 on the cuBLAS baseline, -sk 0):
//   v1  per expert: the expert counts are copied to the host (the host waits for the routing),
//       then each expert's plans run on its rows (gpu_plan.h's plan_btt_*; 3 launches per expert
//       forward, 5 backward): the trainer's path until 2026-12-04
//   v2  tiled: each expert's rows padded to whole tiles, every tile of every expert in one
//       pointer-array batched GEMM per plan op, pointers written on the device from the tile
//       table, the weight gradients as per-tile fp32 partials summed per expert; nothing waits
//       and the GEMM shapes depend on N alone (gpu_plan.h, tiled plans): the trainer's
//       moe_forward_gpu / moe_backward_gpu
//   v3  grouped by set of experts (the trainer's -mg 1, structured/moe_sets.cuh): each token one
//       row of its set's rank-k BTT (28 sets for 8 experts top 2) on v2's tiled plans: x and dy
//       gathered once a token instead of k times, y written once in grouped order and copied back
//       instead of k expert rows combined; the permute between the two GEMMs scales z by the
//       gates. Modelled at 0.86x v2's time at 768 -> 3072, 32K tokens (exec_model.h,
//       st_moe_seconds: more padding, rank-2 weight partials); not yet measured
//   v4  v3 on the fused kernels (the trainer's -mg 1 -sk 2: W0 staged): the forward ONE launch of
//       the fused BTT kernel over the sets, x rows read through the grouping (no gathered copy),
//       the gates applied to the z tile in shared memory between the stages, the gated z saved
//       once and y written once a token; the backward's dx and dZu one launch on dy likewise (dZu
//       saved, then gated for dx), the sets' weight gradients by seg_wgrad. Not yet measured
//   v5  by expert, forward and backward on the fused kernels (the trainer's -sk 2, W0 staged):
//       what v4 is up against
// All are checked against the CPU layer (moe.h) on a draw of CHECK_N tokens routed as the CPU
// routes them (the GPU follows its selections, as in test mode): y and dx on every row, dW0, dW1
// and the router's gradient. Then each is timed at N tokens twice: with the same input every
// repetition (v1's expert shapes repeat, as in a benchmark of one layer), and with two inputs
// alternating (the routing, so v1's GEMM shapes, change every repetition, as in training).
//
// Build: make -C dev/cuda moe_layer    Run: ./dev/cuda/moe_layer [version: 0 all, 1 .. 5] [tokens, default 32768]
#include "harness.cuh"
#include "structured/structured.cuh"

#define CHECK_N 256

typedef struct {
    const char *name;
    int d_in, d_out, experts, topk;
} MoECase;

// v1's host copies of the last forward's grouping (counts and unpadded offsets)
static int g_h_counts[64], g_h_offsets[65];

// v1: the forward up to the grouping as the trainer's, but unpadded (tiles of one row); then
// the host waits for the counts and runs each expert's plan on its rows. te1: NK ints (the tile
// table of one-row tiles, which v1 does not use).
static void v1_forward(floatX *y, MoEGPUState *st, MoEGPUScratch *sc, int *te1, const floatX *x, const floatX *W0, const floatX *W1,
                       const floatX *router, int N, const MoEShape *s) {
    const int E = s->experts, K = s->topk, din = s->btt.d_in, dout = s->btt.d_out, NK = N * K;
    const BTTShape b1 = moe_expert_shape(s);
    const size_t p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1);
    moe_route_group_gpu(st, sc, te1, 1, x, W0, W1, router, N, s);
    cudaCheck(cudaMemcpy(g_h_counts, st->counts, (size_t)E * sizeof(int), cudaMemcpyDeviceToHost));  // the wait
    g_h_offsets[0] = 0;
    for (int e = 0; e < E; e++) g_h_offsets[e + 1] = g_h_offsets[e] + g_h_counts[e];
    moe_gather(sc->xg, x, st, E, NK, 0, K, din);
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = sc->xg; buf[PB_Y] = sc->yg; buf[PB_Z] = st->z; buf[PB_T1] = sc->t1;
    for (int e = 0; e < E; e++) {
        if (g_h_counts[e] == 0) continue;
        buf[PB_W0] = sc->w0x + p0 * e; buf[PB_W1] = sc->w1x + p1 * e;
        Plan p = {};
        plan_btt_forward(&p, &b1, g_h_counts[e], g_h_offsets[e]);
        plan_run_gpu(&p, buf);
    }
    moe_combine_kernel<<<ceil_div_i((long)N * dout / 8, 256), 256>>>(y, sc->yg, st->gate, st->pos, NULL, N, K, dout, NULL, dout, 0);
    cudaCheckLaunch();
}

// v1's gate step (the trainer's until 2026-12-05): one warp per grouped row w (pair p = order[w]):
// dgate[p] = <z_w, dZu_w>, then dZ = gate·dZu and dy_w ← gate·dy_w (for dW1 = Zᵀ (gate·dY)), in
// place; z and dZu in the saved (phi, gamma, rho) layout.
__global__ void v1_gate_backward_kernel(float *dgate, floatX *dzu, floatX *dyg, const floatX *z, const float *gate, const int *order,
                                        int rows, int zrow, int dout) {
    const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (w >= rows) return;
    const int pr = order[w];
    const floatX *zr = z + (size_t)w * zrow;
    floatX *dz = dzu + (size_t)w * zrow, *dy = dyg + (size_t)w * dout;
    float s = 0.0f;
    for (int i = lane; i < zrow; i += 32) s += (float)zr[i] * (float)dz[i];
    s = warp_sum(s);
    const float g = gate[pr];
    if (lane == 0) dgate[pr] = s;
    for (int i = lane; i < zrow; i += 32) dz[i] = (floatX)(g * (float)dz[i]);
    for (int i = lane; i < dout; i += 32) dy[i] = (floatX)(g * (float)dy[i]);
}

static void v1_backward(floatX *dx, floatX *dW0, floatX *dW1, floatX *drouter, const floatX *dy, const floatX *x, MoEGPUState *st,
                        MoEGPUScratch *sc, const floatX *W0, const floatX *W1, const floatX *router, const MoEShape *s) {
    const int N = st->N, E = s->experts, K = s->topk, din = s->btt.d_in, dout = s->btt.d_out, NK = N * K;
    const BTTShape b1 = moe_expert_shape(s);
    const size_t p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1), n0 = p0 * E, n1 = p1 * E;
    const MoEGrouping g = moe_grouping(st, s, 0);
    moe_group_cores(sc, &g, W0, W1, s);
    moe_gather(sc->yg, dy, st, E, NK, 0, K, dout);
    moe_gather(sc->xg, x, st, E, NK, 0, K, din);
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = sc->xg; buf[PB_Z] = st->z; buf[PB_DY] = sc->yg; buf[PB_DX] = sc->dxg; buf[PB_T1] = sc->t1; buf[PB_T2] = sc->t2;
    for (int e = 0; e < E; e++) {
        if (g_h_counts[e] == 0) continue;
        buf[PB_W1] = sc->w1x + p1 * e;
        Plan p = {};
        plan_btt_backward_dz(&p, &b1, g_h_counts[e], g_h_offsets[e]);
        plan_run_gpu(&p, buf);
    }
    v1_gate_backward_kernel<<<ceil_div_i(NK, 8), 256>>>(sc->dgate, sc->t2, sc->yg, st->z, st->gate, st->order, NK, (int)moe_z_row(s), dout);
    cudaCheckLaunch();
    cudaCheck(cudaMemsetAsync(sc->dw0x, 0, (n0 + n1) * sizeof(floatX)));  // dw1x follows dw0x
    for (int e = 0; e < E; e++) {
        if (g_h_counts[e] == 0) continue;
        buf[PB_W0] = sc->w0x + p0 * e; buf[PB_W1] = sc->w1x + p1 * e;
        buf[PB_DW0] = sc->dw0x + p0 * e; buf[PB_DW1] = sc->dw1x + p1 * e;
        Plan p = {};
        plan_btt_backward_rest(&p, &b1, g_h_counts[e], g_h_offsets[e], 1, 0);
        plan_run_gpu(&p, buf);
    }
    moe_cores_scatter_kernel<<<ceil_div_i((long)(n0 + n1), 256), 256>>>(dW0, dW1, sc->dw0x, sc->dw1x, n0, n1, E, s->btt.eps, p0, p1);
    cudaCheckLaunch();
    moe_dlogits_kernel<<<ceil_div_i(N, 128), 128>>>(sc->dlogits, sc->dlogits_bf16, st->logits, st->lse, st->gate, sc->dgate, st->sel, st->fhat,
                                                    N, E, K, 0.0f);
    cudaCheckLaunch();
    st_gemm_ex(CUBLAS_OP_N, CUBLAS_OP_T, din, E, N, x, CUBLAS_LOWP, din, sc->dlogits_bf16, CUBLAS_LOWP, E, 1.0f, drouter, CUBLAS_LOWP, din);
    moe_combine_kernel<<<ceil_div_i((long)N * din / 8, 256), 256>>>(dx, sc->dxg, NULL, st->pos, NULL, N, K, din, NULL, din, 0);
    cudaCheckLaunch();
    st_gemm_ex(CUBLAS_OP_N, CUBLAS_OP_N, din, N, E, router, CUBLAS_LOWP, din, sc->dlogits_bf16, CUBLAS_LOWP, E, 1.0f, dx, CUBLAS_LOWP, din);
}

// One layer's tensors and state on the device for up to N tokens.
typedef struct {
    MoEShape s;
    int N;
    floatX *x[2], *dy, *y, *dx, *W0, *W1, *R, *dW0, *dW1, *dR, *mem;
    float *fmem;
    int *te1;
    MoEGPUState st;
    MoEGPUScratch sc;
} Layer;

static floatX *upload_random(size_t n, float a, float **host) {
    float *h = dev_random(n, -a, a);
    dev_round_bf16(h, n);
    floatX *d = dev_upload_bf16(h, n);
    if (host) *host = h;
    else free(h);
    return d;
}

static void layer_alloc(Layer *L, const MoECase *c, int N, int version, float **hx, float **hdy, float **hw0, float **hw1, float **hr) {
    BTTShape b;
    btt_shape_default(&b, c->d_in, c->d_out, 1);
    moe_shape(&L->s, b.alpha, b.gamma, b.phi, b.eps, c->experts, c->topk);
    L->N = N;
    const MoEShape *s = &L->s;
    const size_t nx = (size_t)N * c->d_in, ny = (size_t)N * c->d_out, n0 = btt_w0_size(&s->btt), n1 = btt_w1_size(&s->btt),
                 nr = moe_router_size(s);
    L->x[0] = upload_random(nx, 1.0f, hx);
    L->x[1] = upload_random(nx, 1.0f, NULL);
    L->dy = upload_random(ny, 1.0f, hdy);
    L->W0 = upload_random(n0, sqrtf(3.0f / b.alpha), hw0);
    L->W1 = upload_random(n1, sqrtf(3.0f / b.gamma), hw1);
    L->R = upload_random(nr, sqrtf(3.0f / c->d_in), hr);
    cudaCheck(cudaMalloc(&L->y, ny * sizeof(floatX)));
    cudaCheck(cudaMalloc(&L->dx, nx * sizeof(floatX)));
    cudaCheck(cudaMalloc(&L->dW0, n0 * sizeof(floatX)));
    cudaCheck(cudaMalloc(&L->dW1, n1 * sizeof(floatX)));
    cudaCheck(cudaMalloc(&L->dR, nr * sizeof(floatX)));
    cudaCheck(cudaMalloc(&L->te1, (size_t)N * c->topk * sizeof(int)));
    memset(&L->st, 0, sizeof(L->st));
    g_moe_sets = version == 3 || version == 4;  // the state (and the scratch below) with the set path's arrays
    moe_gpu_state_alloc(&L->st, s, N, "moe_layer");
    cudaCheck(cudaMemset(L->st.fhat, 0, (size_t)c->experts * sizeof(float)));  // the aux gradient: daux = 0
    cudaCheck(cudaMalloc(&L->mem, moe_gpu_scratch_elems(s, N) * sizeof(floatX)));
    cudaCheck(cudaMalloc(&L->fmem, moe_gpu_scratch_floats(s, N) * sizeof(float)));
    moe_gpu_scratch_bind(&L->sc, &L->st, s, N, L->mem, L->fmem);
    if ((version == 3 || version == 4) && !L->st.sets) {
        fprintf(stderr, "moe_layer: %s does not take the set path (moe_sets.cuh)\n", c->name);
        exit(1);
    }
}

static void layer_free(Layer *L) {
    floatX *bufs[] = {L->x[0], L->x[1], L->dy, L->y, L->dx, L->W0, L->W1, L->R, L->dW0, L->dW1, L->dR, L->mem};
    for (floatX *b : bufs) cudaCheck(cudaFree(b));
    cudaCheck(cudaFree(L->fmem));
    cudaCheck(cudaFree(L->te1));
    moe_gpu_state_free(&L->st);
    g_moe_sets = 0;
}

static void zero_grads(Layer *L) {
    cudaCheck(cudaMemset(L->dW0, 0, btt_w0_size(&L->s.btt) * sizeof(floatX)));
    cudaCheck(cudaMemset(L->dW1, 0, btt_w1_size(&L->s.btt) * sizeof(floatX)));
    cudaCheck(cudaMemset(L->dR, 0, moe_router_size(&L->s) * sizeof(floatX)));
}

static void step(Layer *L, int version, int which_x) {
    const floatX *x = L->x[which_x];
    if (version == 1) {
        v1_forward(L->y, &L->st, &L->sc, L->te1, x, L->W0, L->W1, L->R, L->N, &L->s);
        v1_backward(L->dx, L->dW0, L->dW1, L->dR, L->dy, x, &L->st, &L->sc, L->W0, L->W1, L->R, &L->s);
    } else {
        st_set_kernels(version >= 4 ? 2 : 0);  // v4: by set, v5: by expert, each on the fused kernels both ways
        moe_forward_gpu(L->y, &L->st, &L->sc, x, L->W0, L->W1, L->R, NULL, L->N, &L->s);
        moe_backward_gpu(L->dx, L->dW0, L->dW1, L->dR, NULL, L->dy, 0.0f, x, &L->st, &L->sc, L->W0, L->W1, L->R, &L->s, NULL);
        st_set_kernels(0);
    }
}

// A gradient against the CPU's: within 2% of the reference's largest magnitude (bf16 inputs and
// outputs, one bf16 rounding of the sums).
static void check_grad(const char *what, const floatX *d, const float *ref, size_t n) {
    float *g = dev_download_bf16(d, n), m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(ref[i]));
    dev_check(what, g, ref, n, 0.02f * m, 0.0f);
    free(g);
}

static void check_version(const MoECase *c, int version) {
    Layer L;
    float *hx, *hdy, *hw0, *hw1, *hr;
    layer_alloc(&L, c, CHECK_N, version, &hx, &hdy, &hw0, &hw1, &hr);
    const MoEShape *s = &L.s;
    const int N = CHECK_N, din = c->d_in, dout = c->d_out;
    MoEState cst;
    moe_state_alloc(&cst, s, N);
    float *ry = (float *)calloc((size_t)N * dout, sizeof(float)), *rdx = (float *)calloc((size_t)N * din, sizeof(float));
    float *rw0 = (float *)calloc(btt_w0_size(&s->btt), sizeof(float)), *rw1 = (float *)calloc(btt_w1_size(&s->btt), sizeof(float));
    float *rr = (float *)calloc(moe_router_size(s), sizeof(float)), *scr = (float *)calloc(moe_scratch_size(s, N), sizeof(float));
    moe_forward(ry, &cst, hx, hw0, hw1, hr, NULL, N, s);
    moe_aux_loss(&cst, N, s);
    moe_backward(rdx, rw0, rw1, rr, NULL, hdy, 0.0f, hx, &cst, hw0, hw1, hr, N, s, scr);
    int *sel_d = dev_upload(cst.sel, (size_t)N * c->topk);  // the GPU routes as the CPU (near ties under bf16 logits)
    L.st.forced_sel = sel_d;
    zero_grads(&L);
    const long fused0 = g_moe_sets_fused_runs, sets0 = g_moe_sets_runs, fusedb0 = g_moe_sets_fused_bwd_runs;
    step(&L, version, 0);
    cudaCheck(cudaDeviceSynchronize());
    char what[160];
    // the version ran what it says, not a fallback: v3 and v4 the set path both ways, v4 on the fused kernels
    snprintf(what, sizeof(what), "%s v%d: set-path runs, fused forwards, fused backwards", c->name, version);
    dev_check_same_bits(what, (float)((g_moe_sets_runs - sets0) * 100 + (g_moe_sets_fused_runs - fused0) * 10 + (g_moe_sets_fused_bwd_runs - fusedb0)),
                        version == 3 ? 200.0f : version == 4 ? 211.0f : 0.0f);
    float *gy = dev_download_bf16(L.y, (size_t)N * dout), *gdx = dev_download_bf16(L.dx, (size_t)N * din);
    snprintf(what, sizeof(what), "%s v%d: y, %d rows", c->name, version, N);
    dev_check_rows(what, gy, ry, N, dout, NULL, NULL);
    snprintf(what, sizeof(what), "%s v%d: dx, %d rows", c->name, version, N);
    dev_check_rows(what, gdx, rdx, N, din, NULL, NULL);
    snprintf(what, sizeof(what), "%s v%d: dW0", c->name, version);
    check_grad(what, L.dW0, rw0, btt_w0_size(&s->btt));
    snprintf(what, sizeof(what), "%s v%d: dW1", c->name, version);
    check_grad(what, L.dW1, rw1, btt_w1_size(&s->btt));
    snprintf(what, sizeof(what), "%s v%d: drouter", c->name, version);
    check_grad(what, L.dR, rr, moe_router_size(s));
    free(gy); free(gdx); free(ry); free(rdx); free(rw0); free(rw1); free(rr); free(scr);
    free(hx); free(hdy); free(hw0); free(hw1); free(hr);
    cudaCheck(cudaFree(sel_d));
    moe_state_free(&cst);
    layer_free(&L);
}

int main(int argc, char **argv) {
    gpu_init(0);
    const int version = dev_version_arg(argc, argv, 5);
    const int N = argc > 2 ? atoi(argv[2]) : 32768;
    if (N < 1) {
        fprintf(stderr, "moe_layer: tokens must be a positive number (got '%s')\n", argv[2]);
        return 1;
    }
    const MoECase cases[] = {
        {"btt_moe 768->3072 8/top-2", 768, 3072, 8, 2},
        {"btt_moe 768->768 8/top-2", 768, 768, 8, 2},
        {"btt_moe 2048->8192 8/top-2", 2048, 8192, 8, 2},
    };
    printf("moe_layer: BTT-MoE forward + backward (v1-v3 cuBLAS, v4 by set fused, v5 by expert fused), N = %d tokens, bf16, on %s\n", N,
           g_gpu.prop.name);
    for (const MoECase &c : cases) {
        float ms[6][2] = {{0}};
        for (int v = 1; v <= 5; v++) {
            if (version && v != version) continue;
            check_version(&c, v);
            Layer L;
            layer_alloc(&L, &c, N, v, NULL, NULL, NULL, NULL, NULL);
            zero_grads(&L);
            int flip = 0;
            ms[v][0] = dev_time_ms([&]() { step(&L, v, 0); });
            ms[v][1] = dev_time_ms([&]() { step(&L, v, flip ^= 1); });
            printf("  %-28s v%d  %8.3f ms same routing, %8.3f ms routing changing every step (tiles of %d rows)\n", c.name, v, ms[v][0],
                   ms[v][1], v == 3 || v == 4 ? L.st.set_tile_rows : L.st.tile_rows);
            layer_free(&L);
        }
        if (!version) {
            printf("  %-28s v2 / v1: %.2fx same routing, %.2fx routing changing\n", c.name, ms[2][0] / ms[1][0], ms[2][1] / ms[1][1]);
            printf("  %-28s v3 / v2: %.2fx same routing, %.2fx routing changing\n", c.name, ms[3][0] / ms[2][0], ms[3][1] / ms[2][1]);
            printf("  %-28s v4 / v3: %.2fx same routing, %.2fx routing changing\n", c.name, ms[4][0] / ms[3][0], ms[4][1] / ms[3][1]);
            printf("  %-28s v4 / v5: %.2fx same routing, %.2fx routing changing\n", c.name, ms[4][0] / ms[5][0], ms[4][1] / ms[5][1]);
        }
    }
    return dev_summary();
}
