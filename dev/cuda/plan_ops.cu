// dev/cuda/plan_ops.cu: where the cuBLAS baseline's structured layers (-sk 0, -sk 4) spend their time.
// Each layer's forward and backward plans (structured/gpu_plan.h: batched GEMMs and permutes) run
// op by op through the trainer's plan_op_run_gpu, each op timed alone against its own roofline
// (its operands read and its output written once), then the whole plans. The layer's forward y and
// input gradient dx are checked against the CPU layers (btt.h, monarch.h) on the first rows.
//
// The trainer's plans: -sk 0's, and -sk 4's (z, u stored transposed, no permute of it; BTT of rank
// > 1 reorders W0's columns instead), whose GEMMs take other operand layouts; what it tells is which op to replace
// next: on an H200 the BTT layers ran 2.4-12x their layer floor after the permute was rewritten
// (dev/bench/RESULTS.md), without a split between the GEMMs and the permutes.
//
// Build: make -C dev/cuda plan_ops    Run: ./dev/cuda/plan_ops [rows, default 32768]
#include "harness.cuh"
#include "structured/structured.cuh"

#define CHECK_ROWS 32

typedef struct {
    const char *name;
    int kind;  // STRUCT_BTT or STRUCT_MONARCH
    int d_in, d_out, rank, blocks;
    int zt;  // -sk 4's plans (z, u stored transposed: no permute of it)
} PlanCase;

static double op_bytes(const PlanOp *o) { return plan_op_elems(o, 1) * sizeof(floatX); }
static double op_flops(const PlanOp *o) { return o->kind == PLAN_GEMM ? 2.0 * o->M * o->N * o->K * o->batch : 0.0; }

static void op_report(const char *phase, int i, const PlanOp *o, float ms) {
    char desc[64], what[160];
    plan_op_describe(o, desc, sizeof(desc));
    if (o->kind == PLAN_GEMM)
        snprintf(what, sizeof(what), "%s [%dx%dx%d x%d]", desc, o->M, o->N, o->K, o->batch);
    else
        snprintf(what, sizeof(what), "%s [%d rows of %dx%dx%d]", desc, o->rows, o->R, o->C, o->blk);
    const double bytes = op_bytes(o), flops = op_flops(o), floor_s = dev_floor_s(bytes, flops);
    printf("  %s %d %-52s %8.4f ms %8.1f MB %7.1f GB/s %7.2f TFLOP/s %5.1f%% roofline\n", phase, i + 1, what, ms, bytes / 1e6,
           bytes / (ms * 1e-3) / 1e9, flops / (ms * 1e-3) / 1e12, 100.0 * floor_s / (ms * 1e-3));
}

// The first rows of a device buffer against the CPU's (dev_check_rows)
static void check_rows(const char *what, const floatX *d, const float *ref, int rows, int cols) {
    float *g = dev_download_bf16(d, (size_t)rows * cols);
    dev_check_rows(what, g, ref, rows, cols, NULL, NULL);
    free(g);
}

int main(int argc, char **argv) {
    gpu_init(0);
    const int N = argc > 1 ? atoi(argv[1]) : 32768;
    if (N < CHECK_ROWS) {
        fprintf(stderr, "plan_ops: rows must be at least %d (got '%s')\n", CHECK_ROWS, argv[1]);
        return 1;
    }
    const PlanCase cases[] = {
        {"btt 768->3072 r1", STRUCT_BTT, 768, 3072, 1, 0, 0},    {"btt 768->3072 r1 -sk 4", STRUCT_BTT, 768, 3072, 1, 0, 1},
        {"btt 768->3072 r4", STRUCT_BTT, 768, 3072, 4, 0, 0},    {"btt 768->3072 r4 -sk 4", STRUCT_BTT, 768, 3072, 4, 0, 1},
        {"btt 2048->8192 r2", STRUCT_BTT, 2048, 8192, 2, 0, 0},  {"btt 2048->8192 r2 -sk 4", STRUCT_BTT, 2048, 8192, 2, 0, 1},
        {"monarch 768->3072 4 blocks", STRUCT_MONARCH, 768, 3072, 0, 4, 0},
        {"monarch 768->3072 4 blocks -sk 4", STRUCT_MONARCH, 768, 3072, 0, 4, 1},
        {"monarch 2048->8192 4 blocks", STRUCT_MONARCH, 2048, 8192, 0, 4, 0},
        {"monarch 2048->8192 4 blocks -sk 4", STRUCT_MONARCH, 2048, 8192, 0, 4, 1},
    };
    printf("plan_ops: the cuBLAS plans of structured layers op by op, N = %d rows, bf16, on %s\n", N, g_gpu.prop.name);
    for (const PlanCase &c : cases) {
        BTTShape s;
        MonarchShape m;
        size_t zrow, w0n, w1n, t1n, t2n, t3n;
        Plan fwd = {}, bwd = {};
        if (c.kind == STRUCT_BTT) {
            btt_shape_default(&s, c.d_in, c.d_out, c.rank);
            zrow = btt_z_row(&s); w0n = btt_w0_size(&s); w1n = btt_w1_size(&s);
            t1n = t2n = (size_t)N * zrow; t3n = 1;
            plan_btt_layer(&fwd, &bwd, &s, N, c.zt, 1);
        } else {
            monarch_shape(&m, c.d_in, c.d_out, c.blocks);
            zrow = monarch_u_row(&m); w0n = monarch_r_size(&m); w1n = monarch_l_size(&m);
            t1n = t3n = (size_t)N * zrow; t2n = (size_t)N * c.d_out;
            plan_monarch_layer(&fwd, &bwd, &m, N, c.zt, 1);
        }
        printf("-- %s: intermediate row %zu elements, %d forward and %d backward ops\n", c.name, zrow, fwd.n, bwd.n);
        float *hx = dev_random((size_t)N * c.d_in, -1.0f, 1.0f), *hdy = dev_random((size_t)N * c.d_out, -1.0f, 1.0f);
        float *hw0 = dev_random(w0n, -0.1f, 0.1f), *hw1 = dev_random(w1n, -0.1f, 0.1f);
        dev_round_bf16(hx, (size_t)N * c.d_in); dev_round_bf16(hdy, (size_t)N * c.d_out);
        dev_round_bf16(hw0, w0n); dev_round_bf16(hw1, w1n);
        floatX *buf[PB_COUNT];
        buf[PB_X] = dev_upload_bf16(hx, (size_t)N * c.d_in);
        buf[PB_DY] = dev_upload_bf16(hdy, (size_t)N * c.d_out);
        buf[PB_W0] = dev_upload_bf16(hw0, w0n);
        buf[PB_W1] = dev_upload_bf16(hw1, w1n);
        const size_t sizes[PB_COUNT] = {0, (size_t)N * c.d_out, (size_t)N * zrow, 0, 0, 0, (size_t)N * c.d_in, w0n, w1n, t1n, t2n, t3n, 0, 0, w0n, w0n};
        for (int b = 0; b < PB_COUNT; b++) {
            if (b == PB_X || b == PB_DY || b == PB_W0 || b == PB_W1) continue;
            cudaCheck(cudaMalloc(&buf[b], sizes[b] * sizeof(floatX)));
            cudaCheck(cudaMemset(buf[b], 0, sizes[b] * sizeof(floatX)));  // the weight gradients accumulate
        }
        cudaCheck(cudaMemset(buf[PB_Y], 0xFF, sizes[PB_Y] * sizeof(floatX)));  // NaN: must be written
        cudaCheck(cudaMemset(buf[PB_DX], 0xFF, sizes[PB_DX] * sizeof(floatX)));
        plan_run_gpu(&fwd, buf);
        plan_run_gpu(&bwd, buf);
        cudaCheck(cudaDeviceSynchronize());

        // the CPU layers on the first rows (row-local: y and dx of a row need only that row)
        const int CR = CHECK_ROWS;
        float *ry = (float *)calloc((size_t)CR * c.d_out, sizeof(float)), *rdx = (float *)calloc((size_t)CR * c.d_in, sizeof(float));
        float *rz = (float *)calloc((size_t)CR * zrow, sizeof(float)), *dw0 = (float *)calloc(w0n, sizeof(float)),
              *dw1 = (float *)calloc(w1n, sizeof(float));
        float *scr;
        char what[128];
        if (c.kind == STRUCT_BTT) {
            scr = (float *)calloc(btt_scratch_size(&s, CR), sizeof(float));
            btt_forward(ry, rz, hx, hw0, hw1, NULL, CR, &s);
            btt_backward(rdx, dw0, dw1, NULL, hdy, hx, rz, hw0, hw1, CR, &s, scr);
        } else {
            scr = (float *)calloc(monarch_scratch_size(&m, CR), sizeof(float));
            monarch_forward(ry, rz, hx, hw0, hw1, NULL, CR, &m);
            monarch_backward(rdx, dw0, dw1, NULL, hdy, hx, rz, hw0, hw1, CR, &m, scr);
        }
        snprintf(what, sizeof(what), "%s: y, first %d rows", c.name, CR);
        check_rows(what, buf[PB_Y], ry, CR, c.d_out);
        snprintf(what, sizeof(what), "%s: dx, first %d rows", c.name, CR);
        check_rows(what, buf[PB_DX], rdx, CR, c.d_in);
        free(ry); free(rdx); free(rz); free(dw0); free(dw1); free(scr);

        float sum_f = 0.0f, sum_b = 0.0f;
        for (int i = 0; i < fwd.n; i++) {
            float ms = dev_time_ms([&]() { plan_op_run_gpu(&fwd.op[i], buf); });
            op_report("fwd", i, &fwd.op[i], ms);
            sum_f += ms;
        }
        for (int i = 0; i < bwd.n; i++) {
            float ms = dev_time_ms([&]() { plan_op_run_gpu(&bwd.op[i], buf); });
            op_report("bwd", i, &bwd.op[i], ms);
            sum_b += ms;
        }
        const float mf = dev_time_ms([&]() { plan_run_gpu(&fwd, buf); }), mb = dev_time_ms([&]() { plan_run_gpu(&bwd, buf); });
        printf("   forward plan %.4f ms (its ops alone: %.4f), backward plan %.4f ms (%.4f)\n", mf, sum_f, mb, sum_b);
        for (int b = 0; b < PB_COUNT; b++) cudaCheck(cudaFree(buf[b]));
        free(hx); free(hdy); free(hw0); free(hw1);
    }
    return dev_summary();
}
