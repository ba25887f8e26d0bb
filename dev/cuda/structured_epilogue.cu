// dev/cuda/structured_epilogue.cu: a structured layer's bias and GELU (the MLP's fc layer, and
// the GELU' on the next layer's dx), two versions of where they are applied:
//   v1  separate passes over the output: the plans without them, then the bias kernel and the
//       GELU kernel (forward), the GELU' kernel over dx (backward): the trainer's way until
//       2026-12-04
//   v2  on the way out of the last op that writes the output (gpu_plan.h, plan_set_epilogue):
//       cuBLASLt's BIAS / GELU_AUX_BIAS epilogues on BTT's last batched GEMM and DGELU on its dx
//       GEMM (our kernel after the GEMM where cuBLASLt has none), the permute kernel's own on
//       Monarch's output permute and DGELU on its dx GEMM: the trainer's btt_*_gpu / monarch_*_gpu
// Each is checked against the CPU layers (btt.h, monarch.h) on the first rows: y = GELU(x W + b),
// the pre-activation x W + b, and dx = (dy Wᵀ) GELU'(pre) for a given pre-activation of x. Then
// forward + backward is timed at N rows, next to the same layer without bias and GELU (the floor
// of what the epilogue can cost).
//
// Build: make -C dev/cuda structured_epilogue    Run: ./dev/cuda/structured_epilogue [version: 0 all, 1, 2] [rows, default 32768]
#include "harness.cuh"
#include "structured/structured.cuh"

#define CHECK_ROWS 32

typedef struct {
    const char *name;
    int kind;  // STRUCT_BTT or STRUCT_MONARCH
    int d_in, d_out, rank, blocks;
} EpiCase;

typedef struct {
    BTTShape b;
    MonarchShape m;
    int kind, N;
    floatX *x, *dy, *y, *pre, *pre_in, *dx, *W0, *W1, *dW0, *dW1, *bias, *z, *scratch;
    size_t n0, n1, zrow;
} Layer;

static floatX *upload(const float *h, size_t n) { return dev_upload_bf16(h, n); }

static float *host_random(size_t n, float a) {
    float *h = dev_random(n, -a, a);
    dev_round_bf16(h, n);
    return h;
}

// version 0: neither bias nor GELU (the reference time); 1: separate passes; 2: epilogues
static void step(Layer *L, int version, int fwd_only) {
    const int N = L->N, din = L->kind == STRUCT_BTT ? L->b.d_in : L->m.d_in, dout = L->kind == STRUCT_BTT ? L->b.d_out : L->m.d_out;
    const floatX *bias = version ? L->bias : NULL;
    floatX *pre = version == 2 ? L->pre : NULL, *yout = version == 1 ? L->pre : L->y;
    const floatX *pre_in = version == 2 ? L->pre_in : NULL;
    if (L->kind == STRUCT_BTT) btt_forward_gpu(yout, L->z, L->x, L->W0, L->W1, version == 1 ? NULL : bias, N, &L->b, L->scratch, pre);
    else monarch_forward_gpu(yout, L->z, L->x, L->W0, L->W1, version == 1 ? NULL : bias, N, &L->m, L->scratch, pre);
    if (version == 1) {  // the old way: the bias, then the GELU, each a pass over the output
        st_add_bias(L->pre, L->bias, N, dout);
        gelu_forward(L->y, L->pre, (size_t)N * dout);
    }
    if (fwd_only) return;
    if (L->kind == STRUCT_BTT) btt_backward_gpu(L->dx, L->dW0, L->dW1, NULL, L->dy, L->x, L->z, L->W0, L->W1, N, &L->b, L->scratch, NULL, pre_in);
    else monarch_backward_gpu(L->dx, L->dW0, L->dW1, NULL, L->dy, L->x, L->z, L->W0, L->W1, N, &L->m, L->scratch, NULL, pre_in);
    if (version == 1) gelu_backward_inplace(L->dx, L->pre_in, (size_t)N * din);
}

int main(int argc, char **argv) {
    gpu_init(0);
    const int version = dev_version_arg(argc, argv, 2);
    const int N = argc > 2 ? atoi(argv[2]) : 32768;
    if (N < CHECK_ROWS) {
        fprintf(stderr, "structured_epilogue: rows must be at least %d (got '%s')\n", CHECK_ROWS, argv[2]);
        return 1;
    }
    const EpiCase cases[] = {
        {"btt 768->3072 r1", STRUCT_BTT, 768, 3072, 1, 0},
        {"btt 768->3072 r4", STRUCT_BTT, 768, 3072, 4, 0},
        {"btt 3072->768 r4", STRUCT_BTT, 3072, 768, 4, 0},
        {"monarch 768->3072 4 blocks", STRUCT_MONARCH, 768, 3072, 0, 4},
    };
    printf("structured_epilogue: bias + GELU on a structured layer's output, N = %d rows, bf16, on %s\n", N, g_gpu.prop.name);
    for (const EpiCase &c : cases) {
        Layer L;
        memset(&L, 0, sizeof(L));
        L.kind = c.kind;
        L.N = N;
        size_t scr;
        if (c.kind == STRUCT_BTT) {
            btt_shape_default(&L.b, c.d_in, c.d_out, c.rank);
            L.n0 = btt_w0_size(&L.b); L.n1 = btt_w1_size(&L.b); L.zrow = btt_z_row(&L.b);
            scr = btt_gpu_scratch_elems(&L.b, N);
        } else {
            monarch_shape(&L.m, c.d_in, c.d_out, c.blocks);
            L.n0 = monarch_r_size(&L.m); L.n1 = monarch_l_size(&L.m); L.zrow = monarch_u_row(&L.m);
            scr = monarch_gpu_scratch_elems(&L.m, N);
        }
        const int din = c.d_in, dout = c.d_out;
        float *hx = host_random((size_t)N * din, 1.0f), *hdy = host_random((size_t)N * dout, 1.0f), *hb = host_random(dout, 0.5f);
        float *hw0 = host_random(L.n0, sqrtf(1.0f / (c.kind == STRUCT_BTT ? L.b.alpha : L.m.p))),
              *hw1 = host_random(L.n1, sqrtf(1.0f / (c.kind == STRUCT_BTT ? L.b.gamma * L.b.rank : L.m.q)));
        float *hpin = host_random((size_t)N * din, 2.0f);
        L.x = upload(hx, (size_t)N * din); L.dy = upload(hdy, (size_t)N * dout); L.bias = upload(hb, dout);
        L.W0 = upload(hw0, L.n0); L.W1 = upload(hw1, L.n1); L.pre_in = upload(hpin, (size_t)N * din);
        cudaCheck(cudaMalloc(&L.y, (size_t)N * dout * sizeof(floatX)));
        cudaCheck(cudaMalloc(&L.pre, (size_t)N * dout * sizeof(floatX)));
        cudaCheck(cudaMalloc(&L.dx, (size_t)N * din * sizeof(floatX)));
        cudaCheck(cudaMalloc(&L.dW0, L.n0 * sizeof(floatX)));
        cudaCheck(cudaMalloc(&L.dW1, L.n1 * sizeof(floatX)));
        cudaCheck(cudaMalloc(&L.z, (size_t)N * L.zrow * sizeof(floatX)));
        cudaCheck(cudaMalloc(&L.scratch, scr * sizeof(floatX)));
        cudaCheck(cudaMemset(L.dW0, 0, L.n0 * sizeof(floatX)));
        cudaCheck(cudaMemset(L.dW1, 0, L.n1 * sizeof(floatX)));

        // the CPU layer on the first rows: pre = x W + b, y = GELU(pre), dx = (dy Wᵀ) GELU'(pre_in)
        const int CR = CHECK_ROWS;
        float *rpre = (float *)calloc((size_t)CR * dout, sizeof(float)), *rz = (float *)calloc((size_t)CR * L.zrow, sizeof(float));
        float *rdx = (float *)calloc((size_t)CR * din, sizeof(float)), *t0 = (float *)calloc(L.n0, sizeof(float)),
              *t1 = (float *)calloc(L.n1, sizeof(float)), *ry = (float *)calloc((size_t)CR * dout, sizeof(float));
        if (c.kind == STRUCT_BTT) {
            float *s = (float *)calloc(btt_scratch_size(&L.b, CR), sizeof(float));
            btt_forward(rpre, rz, hx, hw0, hw1, hb, CR, &L.b);
            btt_backward(rdx, t0, t1, NULL, hdy, hx, rz, hw0, hw1, CR, &L.b, s);
            free(s);
        } else {
            float *s = (float *)calloc(monarch_scratch_size(&L.m, CR), sizeof(float));
            monarch_forward(rpre, rz, hx, hw0, hw1, hb, CR, &L.m);
            monarch_backward(rdx, t0, t1, NULL, hdy, hx, rz, hw0, hw1, CR, &L.m, s);
            free(s);
        }
        for (size_t i = 0; i < (size_t)CR * dout; i++) ry[i] = (float)dev_gelu(rpre[i]);
        for (size_t i = 0; i < (size_t)CR * din; i++) {
            double th;
            rdx[i] = (float)(rdx[i] * dev_gelu_grad(hpin[i], &th));
        }
        float ms[3][2] = {{0}};
        for (int v = 0; v <= 2; v++) {
            if (version && v && v != version) continue;
            if (v) {  // the check: both outputs and dx on the first rows
                step(&L, v, 0);
                cudaCheck(cudaDeviceSynchronize());
                char what[160];
                float *gy = dev_download_bf16(L.y, (size_t)CR * dout), *gp = dev_download_bf16(L.pre, (size_t)CR * dout),
                      *gdx = dev_download_bf16(L.dx, (size_t)CR * din);
                snprintf(what, sizeof(what), "%s v%d: pre-activation x W + b", c.name, v);
                dev_check_rows(what, gp, rpre, CR, dout, NULL, NULL);
                snprintf(what, sizeof(what), "%s v%d: y = GELU(x W + b)", c.name, v);
                dev_check_rows(what, gy, ry, CR, dout, NULL, NULL);
                snprintf(what, sizeof(what), "%s v%d: dx = (dy W^T) GELU'(pre)", c.name, v);
                dev_check_rows(what, gdx, rdx, CR, din, NULL, NULL);
                free(gy); free(gp); free(gdx);
            }
            ms[v][0] = dev_time_ms([&]() { step(&L, v, 1); });
            ms[v][1] = dev_time_ms([&]() { step(&L, v, 0); });
            printf("  %-28s %-26s fwd %8.4f ms  fwd+bwd %8.4f ms\n", c.name,
                   v == 0 ? "no bias, no GELU" : v == 1 ? "v1 separate passes" : "v2 epilogues", ms[v][0], ms[v][1]);
        }
        if (!version)
            printf("  %-28s v2 / v1: fwd %.2fx, fwd+bwd %.2fx (v1 - none: %.4f ms, v2 - none: %.4f ms)\n", c.name, ms[2][0] / ms[1][0],
                   ms[2][1] / ms[1][1], ms[1][1] - ms[0][1], ms[2][1] - ms[0][1]);
        free(hx); free(hdy); free(hb); free(hw0); free(hw1); free(hpin);
        free(rpre); free(rz); free(rdx); free(t0); free(t1); free(ry);
        floatX *bufs[] = {L.x, L.dy, L.y, L.pre, L.pre_in, L.dx, L.W0, L.W1, L.dW0, L.dW1, L.bias, L.z, L.scratch};
        for (floatX *b : bufs) cudaCheck(cudaFree(b));
    }
    return dev_summary();
}
