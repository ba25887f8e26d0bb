// dev/cuda/structured_weight.cu: a BTT's or Monarch's weight matrix W (d_in x d_out) from its
// cores, and the cores' gradients from dW: the extra work of running the layer as dense GEMMs
// (-sm 1, -sm 2), done in every forward and backward.
//   v1  the plans on the d_in rows of the identity (below): W is the layer's forward of I, the
//       gradients its weight backward with dy = dW; the trainer's way until 2026-12-04
//   v2  straight from the cores: one kernel writes W, two read dW once each (materialize.cuh's
//       btt_weight_gpu and its backward; Monarch: one thread per output element, below)
//   v3  Monarch only (BTT's are v2's): the trainer's since 2026-12-05 (materialize.cuh:
//       monarch_weight_gpu and its backward), a tiled product per (input block, output column
//       class), operands through shared memory with coalesced loads
// Each is checked against the DESIGN.md formulas on the CPU in double, walking the layer's
// intermediate elements (BTT: z[g, f, s]; Monarch: u[k q + j]) and adding each one's products,
//   BTT      W[g α + a, f ε + e]  += W0[g, a, f ρ + s] W1[f, g ρ + s, e]
//   Monarch  W[k p + c, i nb + l] += R[k, j, c] L[l, i, r]    (u index k q + j = r nb + l)
// (each checked against btt.h's / monarch.h's forward of the identity on the first rows), and
// the gradients the same way, accumulated onto nonzero gradients. Then both directions are timed,
// with GB/s on the least traffic (W written once; dW read once), next to one dense forward GEMM
// x W at N rows (the work they are added to).
//
// Build: make -C dev/cuda structured_weight
// Run:   ./dev/cuda/structured_weight [version: 0 all, 1, 2, 3] [largest d_in, default 4096] [N, default 32768]
#include "harness.cuh"
#include "structured/structured.cuh"

typedef struct {
    int kind, d_in, d_out, rank_or_blocks;
} WCase;

// ----------------------------------------------------------------------------------------------
// v2's Monarch kernels (the trainer's 2026-12-04 .. 05): one thread (dR: one warp) per output
// element, walking its own rows of L and R (or dW) with the sum's index, so each warp load touches
// up to 32 rows. (v2's BTT kernels are the trainer's: btt_weight_gpu and its backward.)

__global__ void v2_monarch_weight_kernel(floatX *W, int ldw, const floatX *R, const floatX *L, int nb, int p, int s, int q) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x, in = blockIdx.y;
    if (o >= nb * s) return;
    const int k = in / p, c = in % p, i = o / nb, l = o % nb;
    int lo, hi;
    monarch_r_range(k, l, q, nb, &lo, &hi);
    const floatX *lrow = L + ((size_t)l * s + i) * q;
    float acc = 0.0f;
    for (int r = lo; r < hi; r++) acc += (float)lrow[r] * (float)R[((size_t)k * q + (r * nb + l - k * q)) * p + c];
    W[(size_t)in * ldw + o] = (floatX)acc;
}

// dR[k, j, c] += Σ_i dW[k p + c, i nb + l] L[l, i, r] for r nb + l = k q + j: a warp per row of dW
// (k, c) and column class l, its lanes along i, one warp sum per r of the class.
__global__ void v2_monarch_weight_backward_r_kernel(floatX *dR, const floatX *dW, int ldw, const floatX *L, int nb, int p, int s, int q) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= nb * p * nb) return;
    const int in = warp / nb, l = warp % nb, k = in / p, c = in % p;
    int lo, hi;
    monarch_r_range(k, l, q, nb, &lo, &hi);
    const floatX *dw = dW + (size_t)in * ldw + l;
    for (int r = lo; r < hi; r++) {
        const floatX *lcol = L + (size_t)l * s * q + r;
        float acc = 0.0f;
        for (int i = lane; i < s; i += 32) acc += (float)dw[(size_t)i * nb] * (float)lcol[(size_t)i * q];
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) {
            floatX *out = dR + ((size_t)k * q + (r * nb + l - k * q)) * p + c;
            *out = (floatX)((float)*out + acc);
        }
    }
}

// dL[l, i, r] += Σ_c dW[k p + c, i nb + l] R[k, j, c] for k q + j = r nb + l: a thread per (r, column
// i nb + l), neighbouring threads on neighbouring columns of dW's rows.
__global__ void v2_monarch_weight_backward_l_kernel(floatX *dL, const floatX *dW, int ldw, const floatX *R, int nb, int p, int s, int q) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)q * nb * s) return;
    const int o = (int)(t % ((size_t)nb * s)), r = (int)(t / ((size_t)nb * s)), i = o / nb, l = o % nb;
    const int u = r * nb + l, k = u / q, j = u % q;
    const floatX *dw = dW + (size_t)k * p * ldw + o, *rrow = R + ((size_t)k * q + j) * p;
    float acc = 0.0f;
    for (int c = 0; c < p; c++) acc += (float)dw[(size_t)c * ldw] * (float)rrow[c];
    floatX *out = dL + ((size_t)l * s + i) * q + r;
    *out = (floatX)((float)*out + acc);
}

static void v2_monarch_weight(floatX *W, const MonarchShape *m, const floatX *R, const floatX *L) {
    v2_monarch_weight_kernel<<<dim3(ceil_div_i(m->d_out, 256), m->d_in), 256>>>(W, m->d_out, R, L, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
}
static void v2_monarch_weight_backward(floatX *dR, floatX *dL, const floatX *dW, const MonarchShape *m, const floatX *R, const floatX *L) {
    v2_monarch_weight_backward_r_kernel<<<ceil_div_i((long)m->d_in * m->nb * 32, 256), 256>>>(dR, dW, m->d_out, L, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
    v2_monarch_weight_backward_l_kernel<<<ceil_div_i((long)m->q * m->d_out, 256), 256>>>(dL, dW, m->d_out, R, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
}

// ----------------------------------------------------------------------------------------------
// v1: the plans on the identity's rows. The workspace: the identity (din, din), the plans'
// intermediate on its rows (din, z or u row; the weight backward reads what the forward left
// there) and their scratch for din rows.

static void inter_rows(int kind, const void *shape, int *din, int *dout, size_t *row, size_t *scratch_row) {
    st_dense_dims(kind, shape, din, dout);
    *row = kind == STRUCT_BTT ? btt_z_row((const BTTShape *)shape) : monarch_u_row((const MonarchShape *)shape);
    *scratch_row = kind == STRUCT_BTT ? plan_btt_scratch_row((const BTTShape *)shape) : plan_monarch_scratch_row((const MonarchShape *)shape);
}

static size_t v1_ws_elems(int kind, const void *shape) {
    int din, dout;
    size_t row, srow;
    inter_rows(kind, shape, &din, &dout, &row, &srow);
    return (size_t)din * din + (size_t)din * row + (size_t)din * srow + 16;
}

__global__ void eye_kernel(floatX *eye, int n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n * n) eye[i] = (floatX)(i / n == i % n ? 1.0f : 0.0f);
}

static void v1_weight(floatX *W, floatX *ws, int kind, const void *shape, const floatX *W0, const floatX *W1) {
    int din, dout;
    size_t row, srow;
    inter_rows(kind, shape, &din, &dout, &row, &srow);
    floatX *eye = ws, *z = ws + (size_t)din * din, *scratch = z + (size_t)din * row;
    eye_kernel<<<ceil_div_i((long)din * din, 256), 256>>>(eye, din);
    cudaCheckLaunch();
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = eye; buf[PB_Y] = W; buf[PB_Z] = z; buf[PB_W0] = (floatX *)W0; buf[PB_W1] = (floatX *)W1; buf[PB_T1] = scratch;
    Plan p = {};
    if (kind == STRUCT_BTT) {
        plan_btt_forward(&p, (const BTTShape *)shape, din, 0);
    } else {
        buf[PB_T2] = scratch + (size_t)din * row;
        plan_monarch_forward(&p, (const MonarchShape *)shape, din);
    }
    plan_run_gpu(&p, buf);
}

static void v1_weight_backward(floatX *dW0, floatX *dW1, const floatX *dW, floatX *ws, int kind, const void *shape, const floatX *W0,
                               const floatX *W1) {
    int din, dout;
    size_t row, srow;
    inter_rows(kind, shape, &din, &dout, &row, &srow);
    floatX *eye = ws, *z = ws + (size_t)din * din, *scratch = z + (size_t)din * row;
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = eye; buf[PB_Z] = z; buf[PB_W0] = (floatX *)W0; buf[PB_W1] = (floatX *)W1; buf[PB_DY] = (floatX *)dW;
    buf[PB_DW0] = dW0; buf[PB_DW1] = dW1; buf[PB_T1] = scratch; buf[PB_T2] = scratch + (size_t)din * row;
    Plan p = {};
    if (kind == STRUCT_BTT) {
        plan_btt_backward_dz(&p, (const BTTShape *)shape, din, 0);
        plan_btt_backward_rest(&p, (const BTTShape *)shape, din, 0, 0, 1);
    } else {
        buf[PB_T3] = buf[PB_T2] + (size_t)din * dout;
        plan_monarch_backward(&p, (const MonarchShape *)shape, din, 0);
    }
    plan_run_gpu(&p, buf);
}

// ----------------------------------------------------------------------------------------------
// the CPU reference: W, and the gradients added to g0, g1, in double

static void reference(double *W, double *g0, double *g1, const float *W0, const float *W1, const float *dW, int kind, const void *shape) {
    if (kind == STRUCT_BTT) {
        const BTTShape *b = (const BTTShape *)shape;
        const int A = b->alpha, G = b->gamma, P = b->phi, E = b->eps, R = b->rank, dout = b->d_out;
        for (int g = 0; g < G; g++)
            for (int f = 0; f < P; f++)
                for (int s = 0; s < R; s++)  // the element z[g, f, s]
                    for (int a = 0; a < A; a++) {
                        const size_t i0 = ((size_t)(g * A + a) * P + f) * R + s, row = (size_t)(g * A + a) * dout + (size_t)f * E;
                        for (int e = 0; e < E; e++) {
                            const size_t i1 = (((size_t)f * G + g) * R + s) * E + e;
                            W[row + e] += (double)W0[i0] * W1[i1];
                            g0[i0] += (double)dW[row + e] * W1[i1];
                            g1[i1] += (double)W0[i0] * dW[row + e];
                        }
                    }
    } else {
        const MonarchShape *m = (const MonarchShape *)shape;
        const int nb = m->nb, p = m->p, s = m->s, q = m->q, dout = m->d_out;
        for (int k = 0; k < nb; k++)
            for (int j = 0; j < q; j++) {  // the element u[k q + j] = u[r nb + l]
                const int u = k * q + j, l = u % nb, r = u / nb;
                for (int c = 0; c < p; c++) {
                    const size_t ir = ((size_t)k * q + j) * p + c, row = (size_t)(k * p + c) * dout;
                    for (int i = 0; i < s; i++) {
                        const size_t il = ((size_t)l * s + i) * q + r, col = (size_t)i * nb + l;
                        W[row + col] += (double)W0[ir] * W1[il];
                        g0[ir] += (double)dW[row + col] * W1[il];
                        g1[il] += (double)W0[ir] * dW[row + col];
                    }
                }
            }
    }
}

// ----------------------------------------------------------------------------------------------

static float *host_random(size_t n, float a) {
    float *h = dev_random(n, -a, a);
    dev_round_bf16(h, n);
    return h;
}

static float *to_float(const double *d, size_t n) {
    float *f = (float *)malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) f[i] = (float)d[i];
    return f;
}

int main(int argc, char **argv) {
    gpu_init(0);
    const int version = dev_version_arg(argc, argv, 3);
    const int max_din = argc > 2 ? atoi(argv[2]) : 4096, N = argc > 3 ? atoi(argv[3]) : 32768;
    if (max_din < 64 || N < 1) {
        fprintf(stderr, "structured_weight: the largest d_in must be at least 64 and N positive (got '%s', %d)\n", argc > 2 ? argv[2] : "", N);
        return 1;
    }
    const WCase cases[] = {
        {STRUCT_BTT, 768, 3072, 1},       {STRUCT_BTT, 768, 3072, 4},      {STRUCT_BTT, 3072, 768, 4},
        {STRUCT_BTT, 768, 768, 2},        {STRUCT_BTT, 2048, 8192, 2},     {STRUCT_BTT, 4096, 16384, 1},
        {STRUCT_MONARCH, 768, 3072, 4},   {STRUCT_MONARCH, 3072, 768, 4},  {STRUCT_MONARCH, 768, 768, 24},
        {STRUCT_MONARCH, 768, 3072, 48},  {STRUCT_MONARCH, 2048, 8192, 32},  // q < nb: some blocks meet in no u element
    };
    printf("structured_weight: W from a structured layer's cores and the cores' gradients from dW, bf16, on %s (dense GEMM at N = %d rows)\n",
           g_gpu.prop.name, N);
    int first[2] = {1, 1};
    for (const WCase &c : cases) {
        if (c.d_in > max_din) continue;
        BTTShape b;
        MonarchShape m;
        const void *shape;
        size_t n0, n1;
        char name[64];
        float s0, s1;
        if (c.kind == STRUCT_BTT) {
            btt_shape_default(&b, c.d_in, c.d_out, c.rank_or_blocks);
            shape = &b; n0 = btt_w0_size(&b); n1 = btt_w1_size(&b);
            s0 = sqrtf(1.0f / b.alpha); s1 = sqrtf(1.0f / (b.gamma * b.rank));
            snprintf(name, sizeof(name), "btt r%d %d->%d", c.rank_or_blocks, c.d_in, c.d_out);
        } else {
            monarch_shape(&m, c.d_in, c.d_out, c.rank_or_blocks);
            shape = &m; n0 = monarch_r_size(&m); n1 = monarch_l_size(&m);
            s0 = sqrtf(1.0f / m.p); s1 = sqrtf(1.0f / m.q);
            snprintf(name, sizeof(name), "monarch %d blocks %d->%d", c.rank_or_blocks, c.d_in, c.d_out);
        }
        const size_t nw = (size_t)c.d_in * c.d_out;
        float *hw0 = host_random(n0, s0), *hw1 = host_random(n1, s1), *hdw = host_random(nw, 1.0f), *hg0 = host_random(n0, 0.5f),
              *hg1 = host_random(n1, 0.5f);
        double *dW_ref = (double *)calloc(nw, sizeof(double)), *d0 = (double *)malloc(n0 * sizeof(double)),
               *d1 = (double *)malloc(n1 * sizeof(double));
        for (size_t i = 0; i < n0; i++) d0[i] = hg0[i];
        for (size_t i = 0; i < n1; i++) d1[i] = hg1[i];
        reference(dW_ref, d0, d1, hw0, hw1, hdw, c.kind, shape);
        float *rW = to_float(dW_ref, nw), *r0 = to_float(d0, n0), *r1 = to_float(d1, n1);
        if (first[c.kind == STRUCT_BTT]) {  // the formula is the CPU layer's: its forward of the identity's first rows
            const int rows = 16;
            float *eye = (float *)calloc((size_t)rows * c.d_in, sizeof(float)), *y = (float *)malloc((size_t)rows * c.d_out * sizeof(float));
            for (int i = 0; i < rows; i++) eye[(size_t)i * c.d_in + i] = 1.0f;
            if (c.kind == STRUCT_BTT) {
                float *z = (float *)malloc(btt_z_size(&b, rows) * sizeof(float));
                btt_forward(y, z, eye, hw0, hw1, NULL, rows, &b);
                free(z);
            } else {
                float *u = (float *)malloc(monarch_u_size(&m, rows) * sizeof(float));
                monarch_forward(y, u, eye, hw0, hw1, NULL, rows, &m);
                free(u);
            }
            char what[192];
            snprintf(what, sizeof(what), "%s: the CPU formula's W = the CPU layer's forward of the identity (first %d rows)", name, rows);
            dev_check(what, y, rW, (size_t)rows * c.d_out, 1e-5f, 1e-5f);
            free(eye); free(y);
            first[c.kind == STRUCT_BTT] = 0;
        }
        floatX *W0 = dev_upload_bf16(hw0, n0), *W1 = dev_upload_bf16(hw1, n1), *dW = dev_upload_bf16(hdw, nw);
        floatX *g0 = dev_upload_bf16(hg0, n0), *g1 = dev_upload_bf16(hg1, n1), *W, *ws = NULL, *x, *y;
        cudaCheck(cudaMalloc(&W, nw * sizeof(floatX)));
        if (version == 0 || version == 1) cudaCheck(cudaMalloc(&ws, v1_ws_elems(c.kind, shape) * sizeof(floatX)));
        cudaCheck(cudaMalloc(&x, (size_t)N * c.d_in * sizeof(floatX)));
        cudaCheck(cudaMalloc(&y, (size_t)N * c.d_out * sizeof(floatX)));
        cudaCheck(cudaMemset(x, 0, (size_t)N * c.d_in * sizeof(floatX)));
        const float dense_ms = dev_time_ms([&]() { matmul_forward(y, x, W, NULL, N, c.d_in, c.d_out, NULL, 1); });
        const double bytes = 2.0 * nw;
        float ms[4][2] = {{0}};
        for (int v = 1; v <= 3; v++) {
            if (version && v != version) continue;
            if (v == 3 && c.kind != STRUCT_MONARCH) continue;  // BTT: v2's kernels
            const int old_monarch = v == 2 && c.kind == STRUCT_MONARCH;
            auto fwd = [&]() {
                if (v == 1) v1_weight(W, ws, c.kind, shape, W0, W1);
                else if (old_monarch) v2_monarch_weight(W, &m, W0, W1);
                else st_dense_weight(W, 0, c.kind, shape, W0, W1);
            };
            auto bwd = [&]() {
                if (v == 1) v1_weight_backward(g0, g1, dW, ws, c.kind, shape, W0, W1);
                else if (old_monarch) v2_monarch_weight_backward(g0, g1, dW, &m, W0, W1);
                else st_dense_weight_backward(g0, g1, dW, 0, c.kind, shape, W0, W1);
            };
            dev_copy_bf16(g0, hg0, n0);  // the previous version's timing kept adding to them
            dev_copy_bf16(g1, hg1, n1);
            fwd();
            bwd();
            cudaCheck(cudaDeviceSynchronize());
            char what[192];
            float *gW = dev_download_bf16(W, nw), *gg0 = dev_download_bf16(g0, n0), *gg1 = dev_download_bf16(g1, n1);
            // bf16 outputs: W rounded once (v1: the intermediate rounded to bf16 too); the gradients summed onto bf16
            snprintf(what, sizeof(what), "%s v%d: W", name, v);
            dev_check(what, gW, rW, nw, 1e-4f, 8e-3f);
            snprintf(what, sizeof(what), "%s v%d: d%s (onto nonzero ones)", name, v, c.kind == STRUCT_BTT ? "W0" : "R");
            dev_check(what, gg0, r0, n0, 4e-3f, 8e-3f);
            snprintf(what, sizeof(what), "%s v%d: d%s (onto nonzero ones)", name, v, c.kind == STRUCT_BTT ? "W1" : "L");
            dev_check(what, gg1, r1, n1, 4e-3f, 8e-3f);
            free(gW); free(gg0); free(gg1);
            ms[v][0] = dev_time_ms(fwd);
            ms[v][1] = dev_time_ms(bwd);  // keeps adding to g0, g1: checked above, timed here
            printf("  %-28s v%d  W %8.4f ms %7.1f GB/s   gradients %8.4f ms %7.1f GB/s   (W + gradients) / dense fwd GEMM %.3f\n", name, v,
                   ms[v][0], bytes / (ms[v][0] * 1e-3) / 1e9, ms[v][1], bytes / (ms[v][1] * 1e-3) / 1e9, (ms[v][0] + ms[v][1]) / dense_ms);
        }
        printf("  %-28s dense forward GEMM x W at N = %d: %.4f ms\n", name, N, dense_ms);
        if (!version) printf("  %-28s v2 / v1: W %.3fx, gradients %.3fx\n", name, ms[2][0] / ms[1][0], ms[2][1] / ms[1][1]);
        if (!version && c.kind == STRUCT_MONARCH) printf("  %-28s v3 / v2: W %.3fx, gradients %.3fx\n", name, ms[3][0] / ms[2][0], ms[3][1] / ms[2][1]);
        free(hw0); free(hw1); free(hdw); free(hg0); free(hg1); free(dW_ref); free(d0); free(d1); free(rW); free(r0); free(r1);
        floatX *bufs[] = {W0, W1, dW, g0, g1, W, ws, x, y};
        for (floatX *p : bufs)
            if (p) cudaCheck(cudaFree(p));
    }
    return dev_summary();
}
