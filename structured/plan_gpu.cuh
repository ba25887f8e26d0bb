// structured/plan_gpu.cuh: gpu_plan.h's plans on the GPU: the epilogue and permute kernels, a plan
// run op by op (strided-batched cuBLAS GEMMs) or tiled (BTT-MoE's experts: pointer-array batched
// GEMMs over the tiles in use), and the small helpers the structured layers share.
#pragma once
#include "../cuda/common.cuh"
#include "../cuda/matmul.cuh"
#include "../cuda/reduce.cuh"
#include "gpu_plan.h"
#include "step_hook.h"

// An op's epilogue (gpu_plan.h, PLAN_EPI_*) as its kernels apply it: the value v of output
// element `at` (column `col`) in fp32, bias added, then GELU (pre-activation written to pre) or
// times GELU' of pre. Returns what to store.
typedef struct {
    int epi;
    const floatX *bias;  // indexed by output column (a permute's row position)
    floatX *pre;         // the output's shape, same offsets
    const float *scale;  // permutes only (may be NULL): element x of each [blk] run of row r is multiplied
                         // by scale[r·blk + x] (BTT-MoE's set path: each rank component's gate)
} PlanEpi;
static __device__ __forceinline__ float plan_epi_apply(const PlanEpi &e, float v, size_t at, int col) {
    if (e.epi & PLAN_EPI_BIAS) v += (float)e.bias[col];
    if (e.epi & PLAN_EPI_GELU) {  // of the pre-activation as kept (bf16), which the backward's GELU' reads
        const floatX p = (floatX)v;
        e.pre[at] = p;
        v = gelu_f((float)p);
    }
    if (e.epi & PLAN_EPI_DGELU) v *= gelu_grad_f((float)e.pre[at]);
    return v;
}
static __device__ __forceinline__ float bf16_bits_to_float(uint32_t h) { return __uint_as_float(h << 16); }
static __device__ __forceinline__ uint32_t float_to_bf16_bits(float v) {
    floatX b = (floatX)v;
    return *reinterpret_cast<uint16_t *>(&b);
}

// The epilogue over a batched GEMM's output when cuBLASLt has no algorithm for it: batch entry b
// is columns b·sc .. + cols of `rows` rows of ldc, bias entry b·bias_stride + j.
__global__ void plan_epilogue_kernel(floatX *out, PlanEpi e, int rows, int cols, int batch, int ldc, long long sc, long long bias_stride) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols * batch) return;
    const int j = (int)(i % cols), b = (int)((i / cols) % batch);
    const size_t r = i / ((size_t)cols * batch), at = r * ldc + (size_t)b * sc + j;
    PlanEpi eb = e;
    if (eb.bias) eb.bias += b * bias_stride;
    out[at] = (floatX)plan_epi_apply(eb, (float)out[at], at, j);
}

// The plans' permute, each row [R][C][blk] -> [C][R][blk]. v1 (dev/cuda/permute.cu): one element
// per thread in source order, so a warp's 2-byte stores land C·blk elements apart: on an H200 this
// made the cuBLAS BTT and Monarch layers several times slower than their GEMMs alone
// (dev/bench/RESULTS.md). Kept as the fallback for rows too long for shared memory.
__global__ void plan_permute_scatter_kernel(floatX *dst, const floatX *src, int rows, const int *rows_dev, int len, int src_ld, int dst_ld, int R,
                                            int C, int blk, PlanEpi e) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (rows_dev && *rows_dev < rows) rows = *rows_dev;
    if (idx >= (size_t)rows * len) return;
    size_t r = idx / len;
    int j = (int)(idx % len);
    const int k = (int)plan_permute_dst_index(j, R, C, blk);
    const size_t at = r * dst_ld + k;
    const floatX v = e.scale ? (floatX)((float)src[r * src_ld + j] * e.scale[r * blk + k % blk]) : src[r * src_ld + j];
    dst[at] = e.epi ? (floatX)plan_epi_apply(e, (float)v, at, k) : v;
}

// v2: a block stages `rpb` whole source rows in shared memory with coalesced (16-byte, V = 8) loads,
// then writes the destination rows in order with coalesced stores, gathering from shared memory.
// A source row's R sub-rows (C·blk elements each) sit `pitch` elements apart, pitch odd, so that
// the gather's walk over r (consecutive destination elements) spreads over the banks. V = 8 needs
// the row length and the strides in multiples of 8 elements and 16-byte aligned rows. (On an H200
// V = 8 moved 2.5-2.8 TB/s; Monarch's u, whose sub-rows of 4 then took V = 1, only 0.8.)
#define PERMUTE_THREADS 256
template <int V>
__global__ void __launch_bounds__(PERMUTE_THREADS) plan_permute_rows_kernel(floatX *dst, const floatX *src, int rows, const int *rows_dev,
                                                                            int src_ld, int dst_ld, int R, int C, int blk, int pitch, int rpb,
                                                                            PlanEpi ep) {
    extern __shared__ __align__(16) unsigned char permute_smem[];
    if (rows_dev && *rows_dev < rows) rows = *rows_dev;
    uint16_t *sm = (uint16_t *)permute_smem;  // raw bf16 bits: the data only moves
    const uint16_t *src16 = (const uint16_t *)src;
    uint16_t *dst16 = (uint16_t *)dst;
    const int cb = C * blk, len = R * cb, span = R * pitch;
    for (long g0 = (long)blockIdx.x * rpb; g0 < rows; g0 += (long)gridDim.x * rpb) {
        const int nr = (int)min((long)rpb, rows - g0), nv = nr * len / V;
        for (int i = threadIdx.x; i < nv; i += PERMUTE_THREADS) {  // stage: source order
            const int e = i * V, rr = e / len, j = e - rr * len;
            int r = j / cb, k = j - r * cb;
            const uint16_t *s = src16 + (size_t)(g0 + rr) * src_ld + j;
            uint16_t *d = sm + rr * span;
            if (V == 8) {  // the 8 elements may cross sub-rows (C·blk < 8 or not a multiple of 8)
                const uint4 q = ld16(s);
                const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    d[r * pitch + k] = (uint16_t)(u % 2 ? w[u / 2] >> 16 : w[u / 2] & 0xFFFFu);
                    if (++k == cb) { k = 0; r++; }
                }
            } else {
                d[r * pitch + k] = s[0];
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < nv; i += PERMUTE_THREADS) {  // gather: destination order
            const int e = i * V, rr = e / len, j = e - rr * len, t = j / blk;
            int x = j - t * blk, c = t / R, r = t - c * R;
            const uint16_t *row = sm + rr * span;
            uint32_t h[V];
#pragma unroll
            for (int u = 0; u < V; u++) {
                h[u] = row[r * pitch + c * blk + x];
                if (++x == blk) { x = 0; if (++r == R) { r = 0; c++; } }
            }
            uint16_t *d = dst16 + (size_t)(g0 + rr) * dst_ld + j;
            if (ep.scale) {  // j is a multiple of V: element u is at j + u of its row
                const float *sr = ep.scale + (size_t)(g0 + rr) * blk;
#pragma unroll
                for (int u = 0; u < V; u++) h[u] = float_to_bf16_bits(bf16_bits_to_float(h[u]) * sr[(j + u) % blk]);
            }
            if (ep.epi) {  // the output's epilogue (Monarch's bias and GELU) on the way out
                const size_t at = (size_t)(g0 + rr) * dst_ld + j;
#pragma unroll
                for (int u = 0; u < V; u++) h[u] = float_to_bf16_bits(plan_epi_apply(ep, bf16_bits_to_float(h[u]), at + u, j + u));
            }
            if (V == 8) __stwb(reinterpret_cast<uint4 *>(d), make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16));
            else d[0] = (uint16_t)h[0];
        }
        __syncthreads();
    }
}

// Rows shorter than this many elements (24 KB) are staged several to a block, up to 16.
// rows_dev (may be NULL): a device count that bounds `rows` (a tiled plan's rows in use); e: the
// epilogue on the written rows (e.pre relative to dst's buffer start as dst: same offsets).
#define PERMUTE_GROUP_ELEMS 12288
static void plan_permute_gpu(floatX *dst, const floatX *src, int rows, int src_ld, int dst_ld, int R, int C, int blk,
                             const int *rows_dev = NULL, PlanEpi e = PlanEpi{0, NULL, NULL, NULL}) {
    const int cb = C * blk, len = R * cb, pitch = cb | 1, span = R * pitch;
    const size_t row_bytes = (size_t)span * sizeof(floatX);
    if (rows <= 0 || len <= 0) return;
    if (row_bytes > (size_t)g_gpu.prop.sharedMemPerBlockOptin) {
        size_t n = (size_t)rows * len;
        plan_permute_scatter_kernel<<<ceil_div_i((long)n, 256), 256>>>(dst, src, rows, rows_dev, len, src_ld, dst_ld, R, C, blk, e);
        cudaCheckLaunch();
        return;
    }
    const int rpb = span >= PERMUTE_GROUP_ELEMS ? 1 : (PERMUTE_GROUP_ELEMS / span < 16 ? PERMUTE_GROUP_ELEMS / span : 16);
    const size_t smem = (size_t)rpb * row_bytes;
    const int vec = len % 8 == 0 && src_ld % 8 == 0 && dst_ld % 8 == 0 && (uintptr_t)src % 16 == 0 && (uintptr_t)dst % 16 == 0;
    const long groups = (rows + rpb - 1) / rpb;
    const int grid = (int)(groups < 65535 ? groups : 65535);
    void (*permute_rows)(floatX *, const floatX *, int, const int *, int, int, int, int, int, int, int, PlanEpi) =
        vec ? plan_permute_rows_kernel<8> : plan_permute_rows_kernel<1>;
    static size_t smem_set[2] = {48 * 1024, 48 * 1024};  // the dynamic limit each version has been given
    if (smem > smem_set[vec]) {
        cudaCheck(cudaFuncSetAttribute(permute_rows, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        smem_set[vec] = smem;
    }
    permute_rows<<<grid, PERMUTE_THREADS, smem>>>(dst, src, rows, rows_dev, src_ld, dst_ld, R, C, blk, pitch, rpb, e);
    cudaCheckLaunch();
}

// A GEMM op's epilogue through cuBLASLt's (BIAS, GELU_AUX(_BIAS), DGELU; GELU only with -ge 1,
// DGELU with -ge 2, as the dense layers): 0 when it cannot (alignment, no algorithm), nothing done.
static int plan_gemm_lt_epilogue(const PlanOp *o, floatX *const *buf) {
    if ((o->epi & PLAN_EPI_GELU) && g_gpu.gelu_fusion < 1) return 0;
    if ((o->epi & PLAN_EPI_DGELU) && g_gpu.gelu_fusion < 2) return 0;
    CublasGemmArgs g = plan_to_cublas(o);
    LtMatmul L;
    memset(&L, 0, sizeof(L));
    L.d = buf[g.c] + g.c_off; L.a = buf[g.first] + g.first_off; L.b = buf[g.second] + g.second_off;
    L.m = g.m; L.n = g.n; L.k = g.k; L.transA = g.transa; L.transB = g.transb;
    L.lda = g.lda; L.ldb = g.ldb; L.ldd = g.ldc;
    L.batch = g.batch; L.sa = g.stride_a; L.sb = g.stride_b; L.sd = g.stride_c;
    if (o->epi & PLAN_EPI_BIAS) { L.bias = buf[PB_BIAS]; L.bias_stride = o->bias_stride; }
    if (o->epi & (PLAN_EPI_GELU | PLAN_EPI_DGELU)) { L.gelu_aux = buf[PB_PRE] + g.c_off; L.aux_ld = g.ldc; L.aux_stride = g.stride_c; }
    L.backward = (o->epi & PLAN_EPI_DGELU) != 0;
    const uintptr_t al = (uintptr_t)L.d | (uintptr_t)L.a | (uintptr_t)L.b | (uintptr_t)L.bias | (uintptr_t)L.gelu_aux;
    const long long st = (long long)(L.lda | L.ldb | L.ldd) | L.sa | L.sb | L.sd | L.bias_stride;
    if (al % 16 || st % 8 || g.beta) return 0;
    return lt_matmul(&L);
}

// One op of a plan (dev/cuda/plan_ops.cu times them one by one), then a whole plan.
static void plan_op_run_gpu(const PlanOp *o, floatX *const *buf) {
    if (o->kind == PLAN_GEMM) {
        if (o->epi && plan_gemm_lt_epilogue(o, buf)) return;
        CublasGemmArgs g = plan_to_cublas(o);
        const float alpha = 1.0f, beta = g.beta ? 1.0f : 0.0f;
        cublasCheck(cublasGemmStridedBatchedEx(g_gpu.cublas, g.transa ? CUBLAS_OP_T : CUBLAS_OP_N, g.transb ? CUBLAS_OP_T : CUBLAS_OP_N, g.m,
                                               g.n, g.k, &alpha, buf[g.first] + g.first_off, CUBLAS_LOWP, g.lda, g.stride_a,
                                               buf[g.second] + g.second_off, CUBLAS_LOWP, g.ldb, g.stride_b, &beta, buf[g.c] + g.c_off,
                                               CUBLAS_LOWP, g.ldc, g.stride_c, g.batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        if (o->epi) {  // no cuBLASLt epilogue: our kernel over the output
            const PlanEpi e = {o->epi, buf[PB_BIAS], buf[PB_PRE] ? buf[PB_PRE] + o->c_off : NULL, NULL};
            const long n = (long)o->M * o->N * o->batch;
            plan_epilogue_kernel<<<ceil_div_i(n, 256), 256>>>(buf[o->c] + o->c_off, e, o->M, o->N, o->batch, o->ldc, o->sc, o->bias_stride);
            cudaCheckLaunch();
        }
    } else {
        const PlanEpi e = {o->epi, buf[PB_BIAS], buf[PB_PRE] ? buf[PB_PRE] + o->dst_off : NULL, NULL};
        plan_permute_gpu(buf[o->dst] + o->dst_off, buf[o->src] + o->src_off, o->rows, o->src_ld, o->dst_ld, o->R, o->C, o->blk, NULL, e);
    }
}
// -pt 2: op i of a plan begins, named "<label> op <i>: <what it computes>".
static void plan_op_step(const char *label, int i, const PlanOp *o) {
    if (!g_st_step_hook) return;
    char what[64], name[96];
    plan_op_describe(o, what, sizeof(what));
    snprintf(name, sizeof(name), "%s op %d: %s", label, i + 1, what);
    st_step(name);
}

// label: the plan's name in -pt 2's steps.
static void plan_run_gpu(const Plan *p, floatX *const *buf, const char *label = "plan") {
    for (int i = 0; i < p->n; i++) {
        plan_op_step(label, i, &p->op[i]);
        plan_op_run_gpu(&p->op[i], buf);
    }
}

// A tiled plan (gpu_plan.h: BTT-MoE's experts, tiles from the device's table), by value for the
// pointer kernel, with each op's A, B and C buffers resolved on the host (indexing a parameter
// array with a runtime buffer id would put it in local memory).
typedef struct {
    Plan p;
    char *base[PLAN_MAX_OPS][3];  // op i's A, B and C buffers (DW0/DW1: fp32 partials; the rest bf16)
} PlanTileArgs;

// Every GEMM's batch-slot pointers at once: op after op, its A, B and C arrays of tiles·batch
// pointers each. rows_in_use: the grouped rows this step's tiles hold (device).
__global__ void plan_tile_ptrs_kernel(void **ptrs, PlanTileArgs a, const int *tile_expert, const int *rows_in_use) {
    long j = (long)blockIdx.x * blockDim.x + threadIdx.x, base = 0;
#pragma unroll
    for (int i = 0; i < PLAN_MAX_OPS; i++) {
        const PlanOp &o = a.p.op[i];
        if (i >= a.p.n || o.kind != PLAN_GEMM) continue;
        const long slots = (long)o.tiles * o.batch;
        if (j >= 0 && j < slots) {
            const int t = (int)(j / o.batch), b = (int)(j % o.batch), active = *rows_in_use / o.tile_rows;
            ptrs[base + j] = a.base[i][0] + sizeof(floatX) * plan_tile_offset(&o, 0, t, b, active, tile_expert);
            ptrs[base + slots + j] = a.base[i][1] + sizeof(floatX) * plan_tile_offset(&o, 1, t, b, active, tile_expert);
            ptrs[base + 2 * slots + j] = a.base[i][2] + (o.c_f32 ? sizeof(float) : sizeof(floatX)) * plan_tile_offset(&o, 2, t, b, active, tile_expert);
        }
        j -= slots;
        base += 3 * slots;
    }
}

// ptrs: plan_tile_ptr_count(p) device pointers. One pointer kernel, then per op one
// pointer-array batched GEMM (cuBLAS's A is our B, as plan_to_cublas) or one permute over the
// rows in use.
// permute_scale (may be NULL): the permutes' PlanEpi.scale (rows as the plan's grouped rows).
static void plan_tiled_run_gpu(const Plan *p, void *const *buf, const int *tile_expert, const int *rows_in_use, void **ptrs,
                               const char *label = "plan", const float *permute_scale = NULL) {
    PlanTileArgs a;
    memset(&a, 0, sizeof(a));
    a.p = *p;
    for (int i = 0; i < p->n; i++) {
        a.base[i][0] = (char *)buf[p->op[i].a];
        a.base[i][1] = (char *)buf[p->op[i].b];
        a.base[i][2] = (char *)buf[p->op[i].c];
    }
    const long total = (long)(plan_tile_ptr_count(p) / 3);
    if (total > 0) {
        st_step("tile pointers");
        plan_tile_ptrs_kernel<<<ceil_div_i(total, 256), 256>>>(ptrs, a, tile_expert, rows_in_use);
        cudaCheckLaunch();
    }
    const float alpha = 1.0f;
    for (int i = 0; i < p->n; i++) {
        const PlanOp *o = &p->op[i];
        plan_op_step(label, i, o);
        if (o->kind == PLAN_PERMUTE) {
            plan_permute_gpu((floatX *)buf[o->dst] + o->dst_off, (const floatX *)buf[o->src] + o->src_off, o->rows, o->src_ld, o->dst_ld, o->R,
                             o->C, o->blk, rows_in_use, PlanEpi{0, NULL, NULL, permute_scale});
            continue;
        }
        const int slots = o->tiles * o->batch;
        const float beta = o->beta ? 1.0f : 0.0f;
        cublasCheck(cublasGemmBatchedEx(g_gpu.cublas, o->tb ? CUBLAS_OP_T : CUBLAS_OP_N, o->ta ? CUBLAS_OP_T : CUBLAS_OP_N, o->N, o->M, o->K,
                                        &alpha, (const void *const *)(ptrs + slots), CUBLAS_LOWP, o->ldb, (const void *const *)ptrs,
                                        CUBLAS_LOWP, o->lda, &beta, ptrs + 2 * (size_t)slots, o->c_f32 ? CUDA_R_32F : CUBLAS_LOWP, o->ldc,
                                        slots, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        ptrs += 3 * (size_t)slots;
    }
}

// One cublasGemmEx in column-major terms with mixed types (router: bf16 in, fp32 out).
static void st_gemm_ex(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *A, cudaDataType_t at, int lda,
                       const void *B, cudaDataType_t bt, int ldb, float beta, void *C, cudaDataType_t ct, int ldc) {
    const float alpha = 1.0f;
    cublasCheck(cublasGemmEx(g_gpu.cublas, ta, tb, m, n, k, &alpha, A, at, lda, B, bt, ldb, &beta, C, ct, ldc, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT));
}

static void st_add_bias(floatX *y, const floatX *bias, int N, int dout) {
    if (!bias) return;
    add_bias_kernel<<<ceil_div_i((long)N * dout / 8, 256), 256>>>(y, bias, (size_t)N, dout);
    cudaCheckLaunch();
}

// A backward plan's settings from its caller: dy's row stride (dy_ld, 0: packed), dx's GELU'
// (pre_gelu) in the epilogue of the op that writes dx, dx += instead of = (dx_acc; not with
// pre_gelu). what: the structure, for the internal errors.
static void plan_backward_settings(Plan *p, floatX **buf, const floatX *dx, const floatX *pre_gelu, int dy_ld, int dx_acc, const char *what) {
    if (dy_ld) plan_set_ld(p, PB_DY, dy_ld);
    buf[PB_PRE] = (floatX *)pre_gelu;
    if (dx && pre_gelu && !plan_set_epilogue(p, PB_DX, PLAN_EPI_DGELU)) fatal("internal: the %s backward plan took no epilogue", what);
    if (dx && dx_acc && (pre_gelu || !plan_set_accumulate(p, PB_DX))) fatal("internal: the %s backward plan cannot add to dx", what);
}

// dbias (d_out) += the column sums of dy (N rows, dy_ld apart; 0: d_out); nothing without dbias.
static void st_bias_backward_gpu(floatX *dbias, const floatX *dy, int N, int dout, float *colsum_scratch, int dy_ld) {
    if (!dbias) return;
    st_step("bias gradient");
    column_sums(dbias, NULL, dy, NULL, NULL, NULL, N, dout, colsum_scratch, dy_ld);
}

// The epilogue flags for an output with this bias and pre-activation buffer.
static inline int st_epi(const void *bias, const void *pre_gelu) { return (bias ? PLAN_EPI_BIAS : 0) | (pre_gelu ? PLAN_EPI_GELU : 0); }

// dst (n elements) = blocks (cols x rows), each the transpose of a (rows x cols) block of src (btt.h).
__global__ void block_transpose_kernel(floatX *dst, const floatX *src, size_t n, int rows, int cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[st_block_transpose_src(i, rows, cols)];
}
static void block_transpose_gpu(floatX *dst, const floatX *src, size_t n, int rows, int cols) {
    block_transpose_kernel<<<ceil_div_i((long)n, 256), 256>>>(dst, src, n, rows, cols);
    cudaCheckLaunch();
}

// n elements rounded up to 16 bytes (bf16): where the next region of a scratch starts.
static inline size_t st_pad8_elems(size_t n) { return (n + 7) / 8 * 8; }
