// structured/structured.cuh: BTT, Monarch and BTT-MoE linear layers on the GPU, forward and
// backward: gpu_plan.h's plans on cuBLAS strided-batched bf16 GEMMs (fp32 accumulation), and the
// BTT-MoE routing, grouping, gather/combine and gradient kernels.
//
// The baseline (-sk 0): each BTT/Monarch stage is one batched GEMM with the intermediate going
// through memory and one transpose kernel between the stages. Every stride and offset it uses
// comes from gpu_plan.h, whose plans tests/test_gpu_plan.c replays on the CPU against btt.h,
// monarch.h and moe.h. With -sk 1 (g_st_fused) BTT runs btt_fused.cuh's kernel, which keeps z on
// chip: the forward, and the backward's dx and dZ as the forward of the transposed BTT (btt.h)
// on dy; the weight gradients, which reduce over all rows, stay cuBLAS GEMMs. Monarch's forward
// runs monarch_fused.cuh's kernel (u on chip), its backward's dx, du and dyt that file's backward
// kernel (du on chip), then the same weight-gradient GEMMs, where a model of their memory traffic
// says they move fewer bytes than the plans (not at large widths with few blocks).
// -sk 4 (g_st_zt): BTT, Monarch and BTT-MoE's experts on plans that store z (u) transposed, a row
// per element of the intermediate with the layer's rows (BTT-MoE: a tile's rows) side by side, so
// that both stages' GEMMs read it through one stride each and the permute of z (u) goes, forward
// and backward (BTT of rank > 1 permutes W0's columns instead, |W0| elements); its saved z is then
// in that layout, so its forward pairs with its own backward only.
// A layer's bias and the fc layer's GELU (and, backward, the GELU' on dx) ride on the last op
// that writes the output (gpu_plan.h's plan_set_epilogue): cuBLASLt epilogues on a GEMM (our
// kernel after it where cuBLASLt has no algorithm), the permute kernel's own on a permute.
//
// BTT-MoE on the GPU (cost scales with k/E: only the selected experts run):
//   router logits (fp32) = x Rᵀ; one thread per token picks the top-k, the gate softmax and the
//   logsumexp (moe.h's st_moe_route_row); one block per expert scans the (token, k) pairs in order
//   and writes that expert's pairs, ascending, into `order` (no atomics: deterministic, and the
//   same grouping as the CPU's counting sort), each expert's rows padded with zero rows to whole
//   tiles (gpu_plan.h, tiled plans); the experts' rank-1 cores are copied out of the strided rank
//   components (moe.h's index maps); with -sk 1 every expert runs in ONE segmented launch of
//   btt_fused.cuh's kernel, which reads the counts on the device and gathers x rows on the fly;
//   else the inputs are gathered into the tiles and every tile of every expert runs at once, each
//   plan op one pointer-array batched GEMM (pointers written on the device from the tile table)
//   or one permute; each token adds its k gated expert outputs in k order. The backward likewise:
//   with -sk 1 every expert's dx and dZ in one segmented launch (dy rows read through the
//   grouping) and its dW0 and dW1 in one seg_wgrad launch each (seg_wgrad.cuh); on the plans,
//   per-tile fp32 weight-gradient partials summed per expert in tile order. The aux loss stays on
//   the device: its statistics (in doubles, so that data-parallel ranks can sum them with one
//   NCCL all-reduce), f̂ and the loss itself (moe_aux_stats_gpu, moe_aux_finish_gpu); the trainer
//   reads every layer's loss once per step, with the cross-entropy. So a BTT-MoE layer never
//   waits for the host, and its GEMM shapes depend on N alone.
#pragma once
#include "../cuda/common.cuh"
#include "../cuda/matmul.cuh"
#include "../cuda/reduce.cuh"
#include "btt_fused.cuh"
#include "exec_model.h"
#include "gpu_plan.h"
#include "monarch_fused.cuh"
#include "seg_wgrad.cuh"
#include "linear.h"
#include "spec.h"
#include "tune.cuh"

// 1: BTT forwards, and the backward's dx and dZ, run btt_fused.cuh's kernel, Monarch forwards and
// backward dx monarch_fused.cuh's, where they support the shape (Monarch: and its traffic model
// says they pay) (-sk 1 in the trainer); 0: the cuBLAS plans, the default: on an H200 the fused
// kernels were slower than the plans in every layer and whole-model config of
// dev/bench/structured.sh (dev/bench/RESULTS.md).
static int g_st_fused = 0;
// 1: BTT, Monarch and BTT-MoE layers run the plans with z (u) stored transposed, which need no
// permute of it (gpu_plan.h, -sk 4; BTT-MoE: each tile's z).
static int g_st_zt = 0;
// -sk's setting, 0..4 (the trainer's flag; st_set_kernels applies it)
static int g_st_sk = 0;
// BTT forwards and backwards that ran split (-sk 3), and every structure's on -sk 4's plans
// (the tests check that they did, not -sk 0's plans)
static long g_st_split_runs = 0, g_st_zt_runs = 0;
// -sk's setting: which structured kernels run (g_st_fused, g_st_zt), and with 2 and 3 the fused
// BTT kernel with W0 staged (btt_fused.cuh's g_btt_wstage).
static void st_set_kernels(int sk) {
    g_st_sk = sk;
    g_st_fused = sk == 4 ? 0 : sk;
    g_st_zt = sk == 4;
    g_btt_wstage = sk == 2 || sk == 3;
}

// ----------------------------------------------------------------------------------------------
// plan execution

// An op's epilogue (gpu_plan.h, PLAN_EPI_*) as its kernels apply it: the value v of output
// element `at` (column `col`) in fp32, bias added, then GELU (pre-activation written to pre) or
// times GELU' of pre. Returns what to store.
typedef struct {
    int epi;
    const floatX *bias;  // indexed by output column (a permute's row position)
    floatX *pre;         // the output's shape, same offsets
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
    dst[at] = e.epi ? (floatX)plan_epi_apply(e, (float)src[r * src_ld + j], at, k) : src[r * src_ld + j];
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
                             const int *rows_dev = NULL, PlanEpi e = PlanEpi{0, NULL, NULL}) {
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
    void (*kern)(floatX *, const floatX *, int, const int *, int, int, int, int, int, int, int, PlanEpi) =
        vec ? plan_permute_rows_kernel<8> : plan_permute_rows_kernel<1>;
    static size_t smem_set[2] = {48 * 1024, 48 * 1024};  // the dynamic limit each version has been given
    if (smem > smem_set[vec]) {
        cudaCheck(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        smem_set[vec] = smem;
    }
    kern<<<grid, PERMUTE_THREADS, smem>>>(dst, src, rows, rows_dev, src_ld, dst_ld, R, C, blk, pitch, rpb, e);
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
            const PlanEpi e = {o->epi, buf[PB_BIAS], buf[PB_PRE] ? buf[PB_PRE] + o->c_off : NULL};
            const long n = (long)o->M * o->N * o->batch;
            plan_epilogue_kernel<<<ceil_div_i(n, 256), 256>>>(buf[o->c] + o->c_off, e, o->M, o->N, o->batch, o->ldc, o->sc, o->bias_stride);
            cudaCheckLaunch();
        }
    } else {
        const PlanEpi e = {o->epi, buf[PB_BIAS], buf[PB_PRE] ? buf[PB_PRE] + o->dst_off : NULL};
        plan_permute_gpu(buf[o->dst] + o->dst_off, buf[o->src] + o->src_off, o->rows, o->src_ld, o->dst_ld, o->R, o->C, o->blk, NULL, e);
    }
}
static void plan_run_gpu(const Plan *p, floatX *const *buf) {
    for (int i = 0; i < p->n; i++) plan_op_run_gpu(&p->op[i], buf);
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
static void plan_tiled_run_gpu(const Plan *p, void *const *buf, const int *tile_expert, const int *rows_in_use, void **ptrs) {
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
        plan_tile_ptrs_kernel<<<ceil_div_i(total, 256), 256>>>(ptrs, a, tile_expert, rows_in_use);
        cudaCheckLaunch();
    }
    const float alpha = 1.0f;
    for (int i = 0; i < p->n; i++) {
        const PlanOp *o = &p->op[i];
        if (o->kind == PLAN_PERMUTE) {
            plan_permute_gpu((floatX *)buf[o->dst] + o->dst_off, (const floatX *)buf[o->src] + o->src_off, o->rows, o->src_ld, o->dst_ld, o->R,
                             o->C, o->blk, rows_in_use);
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

// The epilogue flags for an output with this bias and pre-activation buffer.
static inline int st_epi(const void *bias, const void *pre_gelu) { return (bias ? PLAN_EPI_BIAS : 0) | (pre_gelu ? PLAN_EPI_GELU : 0); }

// ----------------------------------------------------------------------------------------------
// BTT and Monarch

// n elements rounded up to 16 bytes (bf16): where the next region of a scratch starts.
static inline size_t st_pad8_elems(size_t n) { return (n + 7) / 8 * 8; }
// -sk 4's reordered W0 (and dW0) in the scratch: |W0| rounded up to 16 bytes.
static inline size_t btt_zt_w0_pad(const BTTShape *s) { return st_pad8_elems(btt_w0_size(s)); }

// y (N, d_out) overwritten, z (N, zrow) saved; scratch: btt_gpu_scratch_elems(s, N) elements.
// With pre_gelu (the fc layer): pre_gelu = the layer's output + bias, y = its GELU. The plans add
// the bias (and the GELU) in their last GEMM's cuBLASLt epilogue: no extra pass over y.
// y_ld (0: d_out): y's row stride, for a column block of wider rows (q, k, v in qkv; the plans
// only, and then pre_gelu, if any, has that stride too).
static void btt_forward_gpu(floatX *y, floatX *z, const floatX *x, const floatX *W0, const floatX *W1, const floatX *bias, int N,
                            const BTTShape *s, floatX *scratch, floatX *pre_gelu = NULL, int y_ld = 0) {
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Y] = y; buf[PB_Z] = z; buf[PB_W0] = (floatX *)W0; buf[PB_W1] = (floatX *)W1; buf[PB_T1] = scratch;
    buf[PB_BIAS] = (floatX *)bias; buf[PB_PRE] = pre_gelu;
    Plan p = {};
    if (g_st_zt) {  // -sk 4: z stored transposed, no permute of it (W0 reordered into the scratch at rank > 1)
        buf[PB_W0R] = scratch;
        if (!z) buf[PB_Z] = scratch + btt_zt_w0_pad(s);
        plan_btt_forward_zt(&p, s, N);
        g_st_zt_runs++;
    } else if (g_st_fused == 3) {  // split: the fused kernel's stage 1 writes z (into scratch when not saved), cuBLAS y from it
        floatX *zz = z ? z : scratch;
        if (btt_stage1_fused(zz, x, 0, W0, N, s)) {
            g_st_split_runs++;
            buf[PB_Z] = zz;
            plan_btt_forward_from_z(&p, s, N, 0);
        }
    } else if (g_st_fused && !y_ld && btt_forward_fused(pre_gelu ? pre_gelu : y, z, x, W0, W1, bias, N, s)) {
        if (pre_gelu) gelu_forward(y, pre_gelu, (size_t)N * s->d_out);
        return;
    }
    if (!p.n) plan_btt_forward(&p, s, N, 0);
    if (y_ld) plan_set_ld(&p, PB_Y, y_ld);
    const int epi = st_epi(bias, pre_gelu);
    if (epi && !plan_set_epilogue(&p, PB_Y, epi)) fatal("internal: the BTT forward plan took no epilogue");
    plan_run_gpu(&p, buf);
}

// dst (n elements) = blocks (cols x rows), each the transpose of a (rows x cols) block of src (btt.h).
__global__ void block_transpose_kernel(floatX *dst, const floatX *src, size_t n, int rows, int cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[st_block_transpose_src(i, rows, cols)];
}
static void block_transpose_gpu(floatX *dst, const floatX *src, size_t n, int rows, int cols) {
    block_transpose_kernel<<<ceil_div_i((long)n, 256), 256>>>(dst, src, n, rows, cols);
    cudaCheckLaunch();
}

// The transposed BTT's cores (btt.h's btt_transposed_cores) for `copies` consecutive BTTs of
// shape s (BTT-MoE's experts): W0t gets copies·|W1| elements, W1t copies·|W0| (NULL: not needed,
// as by the first stage alone).
static void btt_transposed_cores_gpu(floatX *W0t, floatX *W1t, const floatX *W0, const floatX *W1, const BTTShape *s, int copies) {
    block_transpose_gpu(W0t, W1, btt_w1_size(s) * copies, s->gamma * s->rank, s->eps);
    if (W1t) block_transpose_gpu(W1t, W0, btt_w0_size(s) * copies, s->alpha, s->phi * s->rank);
}

// Scratch elements btt_backward_gpu needs for N rows: the baseline's T1 and T2, the fused
// backward's T1 and transposed cores, or -sk 4's T1 and reordered W0 and dW0, whichever is more
// (the forward needs less: -sk 4's reordered W0, or the split's z when not saved).
static inline size_t btt_gpu_scratch_elems(const BTTShape *s, int N) {
    const size_t plan = (size_t)N * plan_btt_scratch_row(s), fused = (size_t)N * btt_z_row(s) + btt_w0_size(s) + btt_w1_size(s);
    const size_t zt = st_pad8_elems((size_t)N * btt_z_row(s)) + 2 * btt_zt_w0_pad(s);
    const size_t most = plan > fused ? plan : fused;
    return most > zt ? most : zt;
}

// dx overwritten (may be NULL); dW0, dW1, dbias accumulated; scratch: btt_gpu_scratch_elems.
// With g_st_fused and dx, dx and dZ come from ONE fused launch over dy (the transposed BTT, btt.h)
// instead of GEMM, permute, GEMM; the weight gradients stay cuBLAS GEMMs (they reduce over rows).
// With pre_gelu (the pre-activation whose GELU was x), dx is the gradient before that GELU (the
// plans: the dx GEMM's DGELU epilogue). dy_ld (0: d_out): dy's row stride; dx_acc: dx += instead
// of = (the plans only; not with pre_gelu). With g_st_fused 3 (split), T1 comes from the fused
// kernel's stage 1 on dy (W0 staged), dx and the weight gradients from cuBLAS (dy_ld, the epilogue
// and dx_acc as the plans). Returns 1 when it ran the whole fused kernel (not split).
static int btt_backward_gpu(floatX *dx, floatX *dW0, floatX *dW1, floatX *dbias, const floatX *dy, const floatX *x, const floatX *z,
                             const floatX *W0, const floatX *W1, int N, const BTTShape *s, floatX *scratch, float *colsum_scratch,
                             const floatX *pre_gelu = NULL, int dy_ld = 0, int dx_acc = 0) {
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Z] = (floatX *)z; buf[PB_W0] = (floatX *)W0; buf[PB_W1] = (floatX *)W1; buf[PB_DY] = (floatX *)dy;
    buf[PB_DX] = dx; buf[PB_DW0] = dW0; buf[PB_DW1] = dW1;
    buf[PB_T1] = scratch; buf[PB_T2] = scratch + (size_t)N * btt_z_row(s);
    Plan p = {};
    const BTTShape ts = btt_shape_transposed(s);
    int fused = 0, split = 0;
    // split: the fused kernel's stage 1 on dy writes T1 = dZ (the transposed BTT's saved z), then
    // cuBLAS dx and the weight gradients from it; fused: the whole kernel writes dx and T1
    const int try_split = g_st_fused == 3, try_fused = g_st_fused && !try_split && dx && !dy_ld && !dx_acc;
    if ((try_split || try_fused) && btt_fused_supported(&ts, btt_fused_smem_limit())) {
        floatX *W0t = buf[PB_T2], *W1t = W0t + btt_w1_size(s);
        btt_transposed_cores_gpu(W0t, try_split ? NULL : W1t, W0, W1, s, 1);
        if (try_split) {
            split = btt_stage1_fused(buf[PB_T1], dy, dy_ld, W0t, N, &ts);
            g_st_split_runs += split;
        } else {
            fused = btt_forward_fused(dx, buf[PB_T1], dy, W0t, W1t, NULL, N, &ts);
        }
    }
    if (fused) {
        plan_btt_backward_weights(&p, s, N, 0, 1);
        if (pre_gelu) gelu_backward_inplace(dx, pre_gelu, (size_t)N * s->d_in);
    } else {
        if (split) plan_btt_backward_from_t1(&p, s, N, 0, dx != NULL, 1);
        else if (g_st_zt) {  // z stored transposed (-sk 4): T1 = dZ so, then W0's and dW0's reordered copies
            buf[PB_W0R] = scratch + st_pad8_elems((size_t)N * btt_z_row(s));
            buf[PB_DW0R] = buf[PB_W0R] + btt_zt_w0_pad(s);
            plan_btt_backward_zt(&p, s, N, dx != NULL, 1);
            g_st_zt_runs++;
        }
        else {
            plan_btt_backward_dz(&p, s, N, 0);
            plan_btt_backward_rest(&p, s, N, 0, dx != NULL, 1);
        }
        if (dy_ld) plan_set_ld(&p, PB_DY, dy_ld);
        buf[PB_PRE] = (floatX *)pre_gelu;
        if (dx && pre_gelu && !plan_set_epilogue(&p, PB_DX, PLAN_EPI_DGELU)) fatal("internal: the BTT backward plan took no epilogue");
        if (dx && dx_acc && (pre_gelu || !plan_set_accumulate(&p, PB_DX))) fatal("internal: the BTT backward plan cannot add to dx");
    }
    plan_run_gpu(&p, buf);
    if (dbias) column_sums(dbias, NULL, dy, NULL, NULL, NULL, N, s->d_out, colsum_scratch, dy_ld);
    return fused;
}

// Scratch elements Monarch's forward and backward need for N rows: the plans' T1..T3, the fused
// forward's transposed cores, or the fused backward's aligned copies of the cores, dyt and du,
// whichever is more.
static inline size_t monarch_gpu_scratch_elems(const MonarchShape *m, int N) {
    const size_t cores = monarch_r_size(m) + monarch_l_size(m);
    const size_t plan = (size_t)N * plan_monarch_scratch_row(m), fused_bwd = cores + (size_t)N * (m->d_out + monarch_u_row(m));
    const size_t most = plan > cores ? plan : cores;
    return most > fused_bwd ? most : fused_bwd;
}

// y overwritten, u (N, nb·q) saved; scratch: monarch_gpu_scratch_elems. With g_st_fused, one
// launch of monarch_fused.cuh's kernel (u on chip) where it supports the shape and pays (its
// traffic model: MF_MAX_L2_PER_DRAM); it saves the same u as the baseline, so either backward can
// follow either forward. Returns 1 when it ran fused.
// With pre_gelu: pre_gelu = the layer's output + bias, y = its GELU; the plans apply both in
// their last op, the output permute.
// y_ld: y's row stride (0: d_out; as btt_forward_gpu's).
static int monarch_forward_gpu(floatX *y, floatX *u, const floatX *x, const floatX *R, const floatX *L, const floatX *bias, int N,
                               const MonarchShape *m, floatX *scratch, floatX *pre_gelu = NULL, int y_ld = 0) {
    if (g_st_fused && !y_ld && monarch_fused_fwd_pays(m, btt_fused_smem_limit())) {
        floatX *Rt = scratch, *Lt = scratch + monarch_r_size(m);
        block_transpose_gpu(Rt, R, monarch_r_size(m), m->q, m->p);  // Rt[k] = R[k]ᵀ (p x q)
        block_transpose_gpu(Lt, L, monarch_l_size(m), m->s, m->q);  // Lt[l] = L[l]ᵀ (q x s)
        if (monarch_forward_fused(pre_gelu ? pre_gelu : y, u, x, Rt, Lt, bias, N, m, btt_fused_smem_limit())) {
            if (pre_gelu) gelu_forward(y, pre_gelu, (size_t)N * m->d_out);
            return 1;
        }
    }
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Y] = y; buf[PB_Z] = u; buf[PB_W0] = (floatX *)R; buf[PB_W1] = (floatX *)L;
    buf[PB_T1] = scratch; buf[PB_T2] = scratch + (size_t)N * monarch_u_row(m);
    buf[PB_BIAS] = (floatX *)bias; buf[PB_PRE] = pre_gelu;
    Plan p = {};
    if (g_st_zt) {  // -sk 4: u stored transposed, no permute of it
        plan_monarch_forward_ut(&p, m, N);
        g_st_zt_runs++;
    } else {
        plan_monarch_forward(&p, m, N);
    }
    if (y_ld) plan_set_ld(&p, PB_Y, y_ld);
    const int epi = st_epi(bias, pre_gelu);
    if (epi && !plan_set_epilogue(&p, PB_Y, epi)) fatal("internal: the Monarch forward plan took no epilogue");
    plan_run_gpu(&p, buf);
    return 0;
}

// dx overwritten (may be NULL); dR, dL, dbias accumulated; scratch: monarch_gpu_scratch_elems.
// With g_st_fused, dx, du and dyt come from ONE launch of monarch_fused.cuh's backward kernel
// instead of permute, GEMM, permute, GEMM, where it supports the shape and pays (as the forward);
// the weight gradients stay cuBLAS GEMMs. With pre_gelu, dx is the gradient before the GELU of
// pre_gelu (the plans: the dx GEMM's DGELU epilogue). dy_ld, dx_acc: as btt_backward_gpu's.
// Returns 1 when it ran fused.
static int monarch_backward_gpu(floatX *dx, floatX *dR, floatX *dL, floatX *dbias, const floatX *dy, const floatX *x, const floatX *u,
                                const floatX *R, const floatX *L, int N, const MonarchShape *m, floatX *scratch, float *colsum_scratch,
                                const floatX *pre_gelu = NULL, int dy_ld = 0, int dx_acc = 0) {
    floatX *buf[PB_COUNT] = {0};
    buf[PB_X] = (floatX *)x; buf[PB_Z] = (floatX *)u; buf[PB_W0] = (floatX *)R; buf[PB_W1] = (floatX *)L; buf[PB_DY] = (floatX *)dy;
    buf[PB_DX] = dx; buf[PB_DW0] = dR; buf[PB_DW1] = dL;
    const size_t urow = monarch_u_row(m), nr = monarch_r_size(m), nl = monarch_l_size(m);
    Plan p = {};
    int fused = 0;
    MbGeom g;
    if (g_st_fused && !dy_ld && !dx_acc && monarch_fused_bwd_choose(&g, m, btt_fused_smem_limit()) && monarch_fused_bwd_pays(&g, m)) {
        // the kernel reads the cores with wmma, which wants 32-byte aligned rows: parameters in the
        // flat buffer need not be, so those are copied (|R| + |L| elements, small next to dy)
        floatX *Rc = scratch, *Lc = Rc + nr, *dyt = Lc + nl, *du = dyt + (size_t)N * m->d_out;
        const floatX *Ra = R, *La = L;
        if ((uintptr_t)R % 32) { cudaCheck(cudaMemcpyAsync(Rc, R, nr * sizeof(floatX), cudaMemcpyDeviceToDevice)); Ra = Rc; }
        if ((uintptr_t)L % 32) { cudaCheck(cudaMemcpyAsync(Lc, L, nl * sizeof(floatX), cudaMemcpyDeviceToDevice)); La = Lc; }
        fused = monarch_backward_fused(dx, du, dyt, dy, Ra, La, N, m, btt_fused_smem_limit());
        buf[PB_T2] = dyt; buf[PB_T3] = du;
    }
    if (fused) {
        plan_monarch_backward_weights(&p, m, N);
        if (dx && pre_gelu) gelu_backward_inplace(dx, pre_gelu, (size_t)N * m->d_in);
    } else {
        buf[PB_T1] = scratch; buf[PB_T2] = scratch + (size_t)N * urow; buf[PB_T3] = buf[PB_T2] + (size_t)N * m->d_out;
        buf[PB_PRE] = (floatX *)pre_gelu;
        if (g_st_zt) {
            plan_monarch_backward_ut(&p, m, N, dx != NULL);
            g_st_zt_runs++;
        } else {
            plan_monarch_backward(&p, m, N, dx != NULL);
        }
        if (dy_ld) plan_set_ld(&p, PB_DY, dy_ld);
        if (dx && pre_gelu && !plan_set_epilogue(&p, PB_DX, PLAN_EPI_DGELU)) fatal("internal: the Monarch backward plan took no epilogue");
        if (dx && dx_acc && (pre_gelu || !plan_set_accumulate(&p, PB_DX))) fatal("internal: the Monarch backward plan cannot add to dx");
    }
    plan_run_gpu(&p, buf);
    if (dbias) column_sums(dbias, NULL, dy, NULL, NULL, NULL, N, m->d_out, colsum_scratch, dy_ld);
    return fused;
}

// ----------------------------------------------------------------------------------------------
// BTT and Monarch as dense GEMMs (-sm 1; -sm 2 for the layers exec_model.h finds faster so)
//
// A BTT or Monarch layer is x ↦ x W(θ) (+ b) for a d_in x d_out matrix W of its cores θ. Where
// its plans move more bytes per row than a dense GEMM costs in FLOPs (small widths, higher
// ranks), W can be materialized and the layer run as dense GEMMs, with dL/dθ from dW = xᵀ dy.
// Each element of W is a short sum of products of the cores' entries (ρ of them for a BTT, q/nb
// for a Monarch), written by one kernel; the cores' gradients come from two kernels that read dW
// once each. (Until 2026-12-04 W was the plans' forward on the d_in rows of the identity and
// dL/dθ their weight backward on those rows, din rows of x and z through memory several times:
// dev/cuda/structured_weight v1.)
// The result is the same function up to W's bf16 rounding; the layer costs a dense layer's time
// plus a few passes over W (it can never beat dense, only stop trailing it). W is rebuilt in
// every forward and backward (it depends on the weights only), in one scratch shared by the
// layers (st_dense_*).

static int g_st_dense = 0;  // 1: BTT and Monarch layers run as dense GEMMs on materialized weights; 2: those exec_model.h picks

// n elements rounded up to 16 bytes (bf16): the W, dW and bias regions of the -sm scratch.
static inline size_t st_pad8(size_t n) { return (n + 7) / 8 * 8; }

// A BTT's or Monarch's d_in and d_out.
static void st_dense_dims(int kind, const void *shape, int *din, int *dout) {
    if (kind == STRUCT_BTT) {
        const BTTShape *s = (const BTTShape *)shape;
        *din = s->d_in; *dout = s->d_out;
    } else {
        const MonarchShape *m = (const MonarchShape *)shape;
        *din = m->d_in; *dout = m->d_out;
    }
}

// Scratch elements one layer run alone needs (st_dense_forward/backward: W and dW, each rounded
// up to 16 bytes).
static size_t st_dense_elems(int kind, const void *shape) {
    int din, dout;
    st_dense_dims(kind, shape, &din, &dout);
    return 2 * st_pad8((size_t)din * dout);
}
static size_t btt_dense_elems(const BTTShape *s) { return st_dense_elems(STRUCT_BTT, s); }
static size_t monarch_dense_elems(const MonarchShape *m) { return st_dense_elems(STRUCT_MONARCH, m); }

// BTT's W straight from the cores, no identity rows: element (g α + a, f ε + e) is
// Σ_s W0[g, a, f ρ + s] W1[f, g ρ + s, e] (btt.h), summed in fp32 and rounded once. It writes W
// once and reads the cores from cache, where the plans on the identity rows move din rows of x,
// z (several times) and y. One thread per element, a row of W per grid row.
__global__ void btt_weight_kernel(floatX *W, int ldw, const floatX *W0, const floatX *W1, int A, int G, int P, int E, int R) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    if (o >= P * E) return;
    const int g = i / A, f = o / E, e = o % E;
    const floatX *w0 = W0 + (size_t)i * P * R + (size_t)f * R;
    const floatX *w1 = W1 + ((size_t)f * G * R + (size_t)g * R) * E + e;
    float acc = 0.0f;
    for (int s = 0; s < R; s++) acc += (float)w0[s] * (float)w1[(size_t)s * E];
    W[(size_t)i * ldw + o] = (floatX)acc;
}

// dW0[g, a, f ρ + s] += Σ_e dW[g α + a, f ε + e] W1[f, g ρ + s, e]: a warp per (row i, block f),
// its lanes along e (contiguous in dW's row and in W1's), the rank's sums reduced across the warp.
__global__ void btt_weight_backward_w0_kernel(floatX *dW0, const floatX *dW, int ldw, const floatX *W1, int A, int G, int P, int E, int R,
                                              int din) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= din * P) return;
    const int i = warp / P, f = warp % P, g = i / A;
    const floatX *dw = dW + (size_t)i * ldw + (size_t)f * E;
    for (int s = 0; s < R; s++) {
        const floatX *w1 = W1 + ((size_t)f * G * R + (size_t)g * R + s) * E;
        float acc = 0.0f;
        for (int e = lane; e < E; e += 32) acc += (float)dw[e] * (float)w1[e];
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) {
            floatX *out = dW0 + (size_t)i * P * R + (size_t)f * R + s;
            *out = (floatX)((float)*out + acc);
        }
    }
}

// dW1[f, g ρ + s, e] += Σ_a W0[g, a, f ρ + s] dW[g α + a, f ε + e]: a thread per (f, g, e) and its
// ρ sums over a; neighbouring threads read neighbouring e of dW's rows.
__global__ void btt_weight_backward_w1_kernel(floatX *dW1, const floatX *dW, int ldw, const floatX *W0, int A, int G, int P, int E, int R) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)P * G * E) return;
    const int e = (int)(t % E), g = (int)(t / E % G), f = (int)(t / ((size_t)E * G));
    const floatX *dw = dW + (size_t)g * A * ldw + (size_t)f * E + e;
    const floatX *w0 = W0 + (size_t)g * A * P * R + (size_t)f * R;
    for (int s = 0; s < R; s++) {
        float acc = 0.0f;
        for (int a = 0; a < A; a++) acc += (float)w0[(size_t)a * P * R + s] * (float)dw[(size_t)a * ldw];
        floatX *out = dW1 + ((size_t)f * G * R + (size_t)g * R + s) * E + e;
        *out = (floatX)((float)*out + acc);
    }
}

static void btt_weight_gpu(floatX *W, int ldw, const BTTShape *b, const floatX *W0, const floatX *W1) {
    const dim3 grid(ceil_div_i(b->d_out, 256), b->d_in);
    btt_weight_kernel<<<grid, 256>>>(W, ldw ? ldw : b->d_out, W0, W1, b->alpha, b->gamma, b->phi, b->eps, b->rank);
    cudaCheckLaunch();
}

static void btt_weight_backward_gpu(floatX *dW0, floatX *dW1, const floatX *dW, int ldw, const BTTShape *b, const floatX *W0, const floatX *W1) {
    const int ld = ldw ? ldw : b->d_out;
    btt_weight_backward_w0_kernel<<<ceil_div_i((long)b->d_in * b->phi * 32, 256), 256>>>(dW0, dW, ld, W1, b->alpha, b->gamma, b->phi, b->eps,
                                                                                         b->rank, b->d_in);
    cudaCheckLaunch();
    btt_weight_backward_w1_kernel<<<ceil_div_i((long)b->phi * b->gamma * b->eps, 256), 256>>>(dW1, dW, ld, W0, b->alpha, b->gamma, b->phi,
                                                                                            b->eps, b->rank);
    cudaCheckLaunch();
}

// Monarch's W straight from R and L. Output column i nb + l reads u element r nb + l, which lies in
// input block k's stage 1 (element j = r nb + l - k q of it) for the r of [lo, hi) that
// monarch_r_range gives for (k, l) (q / nb of them, at least one when q >= nb; none for some
// blocks when q < nb). So for each pair (k, l) of an input block and an output column class:
//   W[k p + c, i nb + l]  = Σ_r L[l, i, r] R[(r nb + l) p + c]              (a product over r)
//   dR[(r nb + l) p + c] += Σ_i L[l, i, r] dW[k p + c, i nb + l]            (over i)
//   dL[l, i, r]          += Σ_c dW[k p + c, i nb + l] R[(r nb + l) p + c]   (over c)
// Each is a small product per (k, l), computed by blocks of MW_T x 8 threads over MW_T x MW_T
// tiles of the output (thread (tx, ty): column tx, rows ty + 8u, u < MW_T / 8), both operands
// staged through shared memory in chunks of MW_T along the sum with coalesced loads (each load's
// lanes along the operand's contiguous index: R's c, L's r, dW's i nb + l, nb elements apart),
// fp32 sums in a fixed order (deterministic). Until 2026-12-05 one thread per output element
// walked its own rows of L and R, each warp load touching 32 rows (dev/cuda/structured_weight v2).
__device__ __forceinline__ void monarch_r_range(int k, int l, int q, int nb, int *lo, int *hi) {
    const int a = k * q - l, b = (k + 1) * q - l;  // r nb in [a, b)
    *lo = a > 0 ? (a + nb - 1) / nb : 0;
    *hi = b > 0 ? (b + nb - 1) / nb : 0;
    if (*hi > q) *hi = q;
}
#define MW_T 32
#define MW_ROWS (MW_T / 8)  // output rows per thread

// blockIdx: x i tile, y c tile, z = k nb + l. W overwritten (zeros where (k, l) meet in no u element).
__global__ void __launch_bounds__(MW_T * 8) monarch_weight_kernel(floatX *W, int ldw, const floatX *R, const floatX *L, int nb, int p, int s, int q) {
    __shared__ float Ls[MW_T][MW_T + 1], Rs[MW_T][MW_T + 1];  // [i][r], [r][c]
    const int tx = threadIdx.x, ty = threadIdx.y, k = blockIdx.z / nb, l = blockIdx.z % nb;
    const int i0 = blockIdx.x * MW_T, c0 = blockIdx.y * MW_T;
    int lo, hi;
    monarch_r_range(k, l, q, nb, &lo, &hi);
    float acc[MW_ROWS] = {};
    for (int r0 = lo; r0 < hi; r0 += MW_T) {
        for (int u = 0; u < MW_ROWS; u++) {
            const int a = ty + 8 * u;  // Ls row i0 + a, Rs row r0 + a; lane tx along r, resp. c
            Ls[a][tx] = i0 + a < s && r0 + tx < hi ? (float)L[((size_t)l * s + i0 + a) * q + r0 + tx] : 0.0f;
            Rs[a][tx] = r0 + a < hi && c0 + tx < p ? (float)R[((size_t)(r0 + a) * nb + l) * p + c0 + tx] : 0.0f;
        }
        __syncthreads();
        const int n = min(MW_T, hi - r0);
        for (int t = 0; t < n; t++) {
            const float lv = Ls[tx][t];  // this thread's i = i0 + tx
#pragma unroll
            for (int u = 0; u < MW_ROWS; u++) acc[u] += lv * Rs[t][ty + 8 * u];
        }
        __syncthreads();
    }
    if (i0 + tx < s)
        for (int u = 0; u < MW_ROWS; u++)
            if (c0 + ty + 8 * u < p) W[(size_t)(k * p + c0 + ty + 8 * u) * ldw + (size_t)(i0 + tx) * nb + l] = (floatX)acc[u];
}

// blockIdx: x c tile, y r tile (from lo), z = k nb + l.
__global__ void __launch_bounds__(MW_T * 8) monarch_weight_backward_r_kernel(floatX *dR, const floatX *dW, int ldw, const floatX *L, int nb, int p, int s, int q) {
    __shared__ float Ls[MW_T][MW_T + 1], Ds[MW_T][MW_T + 1];  // [i][r], [i][c]
    const int tx = threadIdx.x, ty = threadIdx.y, k = blockIdx.z / nb, l = blockIdx.z % nb, c0 = blockIdx.x * MW_T;
    int lo, hi;
    monarch_r_range(k, l, q, nb, &lo, &hi);
    const int r0 = lo + blockIdx.y * MW_T;
    if (r0 >= hi) return;  // uniform over the block
    float acc[MW_ROWS] = {};
    for (int i0 = 0; i0 < s; i0 += MW_T) {
        for (int u = 0; u < MW_ROWS; u++) {
            const int a = ty + 8 * u;  // Ls row i0 + a (lane tx along r); Ds column c0 + a (lane tx along i)
            Ls[a][tx] = i0 + a < s && r0 + tx < hi ? (float)L[((size_t)l * s + i0 + a) * q + r0 + tx] : 0.0f;
            Ds[tx][a] = i0 + tx < s && c0 + a < p ? (float)dW[(size_t)(k * p + c0 + a) * ldw + (size_t)(i0 + tx) * nb + l] : 0.0f;
        }
        __syncthreads();
        const int n = min(MW_T, s - i0);
        for (int t = 0; t < n; t++) {
            const float dv = Ds[t][tx];  // this thread's c = c0 + tx
#pragma unroll
            for (int u = 0; u < MW_ROWS; u++) acc[u] += Ls[t][ty + 8 * u] * dv;
        }
        __syncthreads();
    }
    if (c0 + tx < p)
        for (int u = 0; u < MW_ROWS; u++) {
            const int r = r0 + ty + 8 * u;
            if (r < hi) {
                floatX *out = dR + ((size_t)r * nb + l) * p + c0 + tx;
                *out = (floatX)((float)*out + acc[u]);
            }
        }
}

// blockIdx: x r tile (from lo), y i tile, z = k nb + l.
__global__ void __launch_bounds__(MW_T * 8) monarch_weight_backward_l_kernel(floatX *dL, const floatX *dW, int ldw, const floatX *R, int nb, int p, int s, int q) {
    __shared__ float Ds[MW_T][MW_T + 1], Rs[MW_T][MW_T + 1];  // [c][i], [c][r]
    const int tx = threadIdx.x, ty = threadIdx.y, k = blockIdx.z / nb, l = blockIdx.z % nb, i0 = blockIdx.y * MW_T;
    int lo, hi;
    monarch_r_range(k, l, q, nb, &lo, &hi);
    const int r0 = lo + blockIdx.x * MW_T;
    if (r0 >= hi) return;  // uniform over the block
    float acc[MW_ROWS] = {};
    for (int c0 = 0; c0 < p; c0 += MW_T) {
        for (int u = 0; u < MW_ROWS; u++) {
            const int a = ty + 8 * u;  // Ds row c0 + a (lane tx along i); Rs column r0 + a (lane tx along c)
            Ds[a][tx] = c0 + a < p && i0 + tx < s ? (float)dW[(size_t)(k * p + c0 + a) * ldw + (size_t)(i0 + tx) * nb + l] : 0.0f;
            Rs[tx][a] = r0 + a < hi && c0 + tx < p ? (float)R[((size_t)(r0 + a) * nb + l) * p + c0 + tx] : 0.0f;
        }
        __syncthreads();
        const int n = min(MW_T, p - c0);
        for (int t = 0; t < n; t++) {
            const float rv = Rs[t][tx];  // this thread's r = r0 + tx
#pragma unroll
            for (int u = 0; u < MW_ROWS; u++) acc[u] += Ds[t][ty + 8 * u] * rv;
        }
        __syncthreads();
    }
    if (r0 + tx < hi)
        for (int u = 0; u < MW_ROWS; u++) {
            const int i = i0 + ty + 8 * u;
            if (i < s) {
                floatX *out = dL + ((size_t)l * s + i) * q + r0 + tx;
                *out = (floatX)((float)*out + acc[u]);
            }
        }
}

// The r tiles of the largest (k, l) range: ceil(q / nb) + 1 values of r at most.
static inline int monarch_r_tiles(const MonarchShape *m) { return ceil_div_i(m->q / m->nb + 2, MW_T); }

static void monarch_weight_gpu(floatX *W, int ldw, const MonarchShape *m, const floatX *R, const floatX *L) {
    const dim3 grid(ceil_div_i(m->s, MW_T), ceil_div_i(m->p, MW_T), m->nb * m->nb), block(MW_T, 8);
    monarch_weight_kernel<<<grid, block>>>(W, ldw ? ldw : m->d_out, R, L, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
}

static void monarch_weight_backward_gpu(floatX *dR, floatX *dL, const floatX *dW, int ldw, const MonarchShape *m, const floatX *R,
                                        const floatX *L) {
    const int ld = ldw ? ldw : m->d_out;
    const dim3 block(MW_T, 8);
    monarch_weight_backward_r_kernel<<<dim3(ceil_div_i(m->p, MW_T), monarch_r_tiles(m), m->nb * m->nb), block>>>(dR, dW, ld, L, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
    monarch_weight_backward_l_kernel<<<dim3(monarch_r_tiles(m), ceil_div_i(m->s, MW_T), m->nb * m->nb), block>>>(dL, dW, ld, R, m->nb, m->p, m->s, m->q);
    cudaCheckLaunch();
}

// W (din x dout, row stride ldw; 0: dout) of a BTT's (W0, W1) or a Monarch's (R, L) cores.
static void st_dense_weight(floatX *W, int ldw, int kind, const void *shape, const floatX *W0, const floatX *W1) {
    if (kind == STRUCT_BTT) btt_weight_gpu(W, ldw, (const BTTShape *)shape, W0, W1);
    else monarch_weight_gpu(W, ldw, (const MonarchShape *)shape, W0, W1);
}

// dW0, dW1 += the cores' gradients for dL/dW = dW (row stride ldw; 0: dout).
static void st_dense_weight_backward(floatX *dW0, floatX *dW1, const floatX *dW, int ldw, int kind, const void *shape, const floatX *W0,
                                     const floatX *W1) {
    if (kind == STRUCT_BTT) btt_weight_backward_gpu(dW0, dW1, dW, ldw, (const BTTShape *)shape, W0, W1);
    else monarch_weight_backward_gpu(dW0, dW1, dW, ldw, (const MonarchShape *)shape, W0, W1);
}

// y (N, d_out) = x W + bias; with pre_gelu, pre_gelu = that and y = its GELU (the dense layer's
// epilogues). mem: btt_dense_elems / monarch_dense_elems.
static void st_dense_forward(floatX *y, floatX *pre_gelu, const floatX *x, const floatX *W0, const floatX *W1, const floatX *bias, int N,
                             int kind, const void *shape, floatX *mem) {
    int din, dout;
    st_dense_dims(kind, shape, &din, &dout);
    st_dense_weight(mem, 0, kind, shape, W0, W1);
    matmul_forward(y, x, mem, bias, N, din, dout, pre_gelu, 1);
}

// dx (may be NULL; with pre_gelu the gradient before its GELU) = dy Wᵀ; dW0, dW1, dbias
// accumulated: dW = xᵀ dy, then the cores' gradients from it.
static void st_dense_backward(floatX *dx, floatX *dW0, floatX *dW1, floatX *dbias, const floatX *dy, const floatX *x, const floatX *W0,
                              const floatX *W1, int N, int kind, const void *shape, floatX *mem, float *colsum_scratch,
                              const floatX *pre_gelu) {
    int din, dout;
    st_dense_dims(kind, shape, &din, &dout);
    floatX *W = mem, *dW = mem + st_pad8((size_t)din * dout);
    st_dense_weight(W, 0, kind, shape, W0, W1);
    matmul_backward(dx, dW, dbias, dy, x, W, N, din, dout, pre_gelu, colsum_scratch, 1);
    st_dense_weight_backward(dW0, dW1, dW, 0, kind, shape, W0, W1);
}

// Several BTT or Monarch layers on one input whose outputs lie side by side in each output row
// (q, k and v in qkv) run as ONE dense layer: their W side by side in a (din, Σ d_out) matrix, one
// GEMM forward and two backward, as a dense model's fused qkv; no split copies, no sums of dx.
typedef struct {
    int kind;  // STRUCT_BTT or STRUCT_MONARCH
    BTTShape btt;
    MonarchShape monarch;
    const floatX *W0, *W1, *bias;  // bias may be NULL
    floatX *dW0, *dW1, *dbias;
} StDenseLayer;

static const void *st_dense_layer_shape(const StDenseLayer *l) { return l->kind == STRUCT_BTT ? (const void *)&l->btt : (const void *)&l->monarch; }

// The group's input and output widths; fatal unless every layer has the same d_in.
static void st_dense_group_dims(const StDenseLayer *g, int S, int *din, int *dout) {
    *dout = 0;
    for (int i = 0; i < S; i++) {
        int di, d;
        st_dense_dims(g[i].kind, st_dense_layer_shape(&g[i]), &di, &d);
        if (i == 0) *din = di;
        else if (di != *din) fatal("internal: a dense group's layers read inputs of %d and %d", *din, di);
        *dout += d;
    }
}

// Scratch: W and dW (din, Σ d_out), then the bias row.
static size_t st_dense_group_elems(const StDenseLayer *g, int S) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    return 2 * st_pad8((size_t)din * dout) + st_pad8(dout);
}

// Binds the scratch (W, dW) and materializes every layer's W into its column block of the
// group's W.
static void st_dense_group_weight(floatX **W, floatX **dW, const StDenseLayer *g, int S, floatX *mem) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    *W = mem; *dW = mem + st_pad8((size_t)din * dout);
    int col = 0;
    for (int i = 0; i < S; i++) {
        const void *shape = st_dense_layer_shape(&g[i]);
        int di, d;
        st_dense_dims(g[i].kind, shape, &di, &d);
        st_dense_weight(*W + col, dout, g[i].kind, shape, g[i].W0, g[i].W1);
        col += d;
    }
}

// The group's bias (NULL when no layer has one; the forward's only): the layers' own when they lie
// one after the other, else gathered into the scratch after W and dW (zeros for a layer without).
static const floatX *st_dense_group_bias(const StDenseLayer *g, int S, floatX *mem) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    floatX *bias = mem + 2 * st_pad8((size_t)din * dout);
    int col = 0, any_bias = 0, adjacent = 1;
    for (int i = 0; i < S; i++) {
        int di, d;
        st_dense_dims(g[i].kind, st_dense_layer_shape(&g[i]), &di, &d);
        any_bias |= g[i].bias != NULL;
        if (!g[i].bias || (i > 0 && g[i].bias != g[0].bias + col)) adjacent = 0;
        col += d;
    }
    if (!any_bias) return NULL;
    if (adjacent) return g[0].bias;
    col = 0;
    for (int i = 0; i < S; i++) {
        int di, d;
        st_dense_dims(g[i].kind, st_dense_layer_shape(&g[i]), &di, &d);
        if (g[i].bias) cudaCheck(cudaMemcpyAsync(bias + col, g[i].bias, (size_t)d * sizeof(floatX), cudaMemcpyDeviceToDevice, 0));
        else cudaCheck(cudaMemsetAsync(bias + col, 0, (size_t)d * sizeof(floatX), 0));
        col += d;
    }
    return bias;
}

// y (N, Σ d_out): layer i's output in its column block. mem: st_dense_group_elems.
static void st_dense_group_forward(floatX *y, const floatX *x, int N, const StDenseLayer *g, int S, floatX *mem) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    floatX *W, *dW;
    st_dense_group_weight(&W, &dW, g, S, mem);
    matmul_forward(y, x, W, st_dense_group_bias(g, S, mem), N, din, dout, NULL, 1);
}

// dx (N, din) = dy Wᵀ, overwritten; each layer's gradients (and bias gradient) accumulated.
static void st_dense_group_backward(floatX *dx, const floatX *dy, const floatX *x, int N, const StDenseLayer *g, int S, floatX *mem,
                                    float *colsum_scratch) {
    int din, dout;
    st_dense_group_dims(g, S, &din, &dout);
    floatX *W, *dW;
    st_dense_group_weight(&W, &dW, g, S, mem);
    matmul_backward(dx, dW, NULL, dy, x, W, N, din, dout, NULL, colsum_scratch, 1);
    int col = 0;
    for (int i = 0; i < S; i++) {
        const void *shape = st_dense_layer_shape(&g[i]);
        int di, d;
        st_dense_dims(g[i].kind, shape, &di, &d);
        st_dense_weight_backward(g[i].dW0, g[i].dW1, dW + col, dout, g[i].kind, shape, g[i].W0, g[i].W1);
        if (g[i].dbias) column_sums(g[i].dbias, NULL, dy + col, NULL, NULL, NULL, N, d, colsum_scratch, dout);
        col += d;
    }
}

// ----------------------------------------------------------------------------------------------
// BTT-MoE

// What a BTT-MoE layer keeps from its forward for its backward (device unless marked host).
// Grouped rows: each expert's (token, k) pairs, padded with zero rows to whole tiles of
// tile_rows rows (gpu_plan.h, tiled plans), expert after expert, then the spare tile.
typedef struct {
    float *logits;        // (N, E) fp32
    float *gate;          // (N, K)
    float *lse;           // (N)
    int *sel;             // (N, K)
    int *order;           // (grouped rows): grouped row -> pair, -1 for a padding row
    int *pos;             // (N·K): pair -> grouped row
    int *counts, *offsets;  // (E), (E+1): expert e's pairs are grouped rows [offsets[e], offsets[e] + counts[e]);
                            // offsets are multiples of tile_rows and offsets[E] the rows of the tiles in use
    int *tile_expert;     // (max tiles) the expert of each tile in use
    double *stats;        // MOE_AUX_STATS(E) aux statistics (moe.h's layout)
    int *tiles;           // the fused forward's tile table and count (btt_fused.cuh)
    float *fhat;          // (E) f̂ for the aux gradient (set by moe_aux_finish_gpu)
    floatX *z;            // (grouped rows, gamma·phi)
    int N;                // rows of the last forward
    int tile_rows;        // host: from the allocation's N (moe_tile_rows), for every N up to it
    int capacity;         // host: the allocation's N
    const int *forced_sel;  // test mode only: (N, K) experts each token is routed to instead of its
                            // top-k (st_moe_route_row's `only`); NULL in training
} MoEGPUState;

// Shared by every BTT-MoE layer: extracted cores, gathered rows, the tiled plans' weight-gradient
// partials and pointers, scratch.
typedef struct {
    floatX *w0x, *w1x, *dw0x, *dw1x;  // (E, gamma, alpha, phi), (E, phi, gamma, eps); dw0x/dw1x: the fused path's
    floatX *w0t, *w1t;                // the transposed BTTs' cores (fused backward): (E, phi, eps, gamma), (E, gamma, phi, alpha)
    floatX *xg, *yg, *dxg;            // (grouped rows, d_in), (grouped rows, d_out) (also the gathered dy), (grouped rows, d_in)
    floatX *t1, *t2;                  // (grouped rows, gamma·phi)
    float *dgate, *dlogits;           // (N·K), (N, E)
    float *part0, *part1;             // (max tiles + 1) · |W0 of an expert|, · |W1 of an expert|: per-tile dW0, dW1
    void **ptrs;                      // the tiled plans' batch-slot pointers
    floatX *dlogits_bf16;             // (N, E)
} MoEGPUScratch;

// The three tiled plans of a BTT-MoE layer's cuBLAS path (tile_rows rows, every tile N·K pairs
// can fill): forward; backward's dZu; the rest of the backward (dx when want_dx, per-tile
// partials). A NULL plan is not built. zt: -sk 4's, each tile's z and dZu stored transposed (the
// same GEMMs and pointers, no permute).
static void moe_tiled_plans(Plan *fwd, Plan *dz, Plan *rest, const MoEShape *s, int N, int tile_rows, int want_dx, int zt) {
    const BTTShape b1 = moe_expert_shape(s);
    const int tiles = moe_max_tiles(N * s->topk, s->experts, tile_rows);
    const size_t p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1);
    Plan *plans[3] = {fwd, dz, rest};
    for (int i = 0; i < 3; i++) {
        if (!plans[i]) continue;
        memset(plans[i], 0, sizeof(Plan));
        if (zt) {
            if (i == 0) plan_btt_forward_zt(plans[i], &b1, tile_rows);
            else if (i == 1) plan_btt_backward_zt_dz(plans[i], &b1, tile_rows);
            else plan_btt_backward_zt_rest(plans[i], &b1, tile_rows, want_dx, 0);
        } else {
            if (i == 0) plan_btt_forward(plans[i], &b1, tile_rows, 0);
            else if (i == 1) plan_btt_backward_dz(plans[i], &b1, tile_rows, 0);
            else plan_btt_backward_rest(plans[i], &b1, tile_rows, 0, want_dx, 0);
        }
        plan_tile(plans[i], tiles, tile_rows, p0, p1, zt ? (size_t)tile_rows * btt_z_row(&b1) : 0);
    }
}

static inline size_t moe_gpu_state_bytes(const MoEShape *s, int N) {
    const size_t E = (size_t)s->experts, NK = (size_t)N * s->topk, T = (size_t)moe_tile_rows(s, N);
    const size_t rows = moe_grouped_rows((int)NK, (int)E, (int)T), tiles = (size_t)moe_max_tiles((int)NK, (int)E, (int)T);
    return MOE_AUX_STATS(E) * sizeof(double) + (size_t)N * E * 4 + NK * 4 + (size_t)N * 4 + NK * 4 * 2 + rows * 4 + (2 * E + 1) * 4 + tiles * 4 +
           E * 4 + rows * moe_z_row(s) * sizeof(floatX);
}

static void moe_gpu_state_alloc(MoEGPUState *st, const MoEShape *s, int N, const char *what) {
    const size_t E = (size_t)s->experts, NK = (size_t)N * s->topk, zrow = moe_z_row(s);
    st->tile_rows = moe_tile_rows(s, N);
    st->capacity = N;
    const size_t rows = moe_grouped_rows((int)NK, (int)E, st->tile_rows), tiles = (size_t)moe_max_tiles((int)NK, (int)E, st->tile_rows);
    char name[160];
    snprintf(name, sizeof(name), "%s: BTT-MoE routing state (logits, gates, selections, grouping)", what);
    char *mem = cudaMallocNamed(char, moe_gpu_state_bytes(s, N) - rows * zrow * sizeof(floatX), name);
    st->stats = (double *)mem; mem += MOE_AUX_STATS(E) * sizeof(double);  // first: 8-byte aligned
    st->logits = (float *)mem; mem += (size_t)N * E * 4;
    st->gate = (float *)mem; mem += NK * 4;
    st->lse = (float *)mem; mem += (size_t)N * 4;
    st->sel = (int *)mem; mem += NK * 4;
    st->pos = (int *)mem; mem += NK * 4;
    st->order = (int *)mem; mem += rows * 4;
    st->counts = (int *)mem; mem += E * 4;
    st->offsets = (int *)mem; mem += (E + 1) * 4;
    st->tile_expert = (int *)mem; mem += tiles * 4;
    st->fhat = (float *)mem;
    snprintf(name, sizeof(name), "%s: BTT-MoE saved z (grouped rows x gamma*phi)", what);
    st->z = cudaMallocNamed(floatX, rows * zrow, name);
    cudaCheck(cudaMemset(st->z, 0, rows * zrow * sizeof(floatX)));  // the spare tile's rows are read, never used
    snprintf(name, sizeof(name), "%s: BTT-MoE fused forward's tile table", what);
    st->tiles = cudaMallocNamed(int, btt_fused_seg_scratch_ints((int)NK, (int)E, 16), name);
}

static void moe_gpu_state_free(MoEGPUState *st) {
    if (st->stats) cudaCheck(cudaFree(st->stats));
    if (st->z) cudaCheck(cudaFree(st->z));
    if (st->tiles) cudaCheck(cudaFree(st->tiles));
    memset(st, 0, sizeof(*st));
}

// The scratch regions of layers up to N rows of shape s (bf16 elements and floats; the caller
// allocates the max over layers, moe_gpu_scratch_bind points into it).
typedef struct {
    size_t w0x, w1x, rows_in, rows_out, rows_z, bf16_end;  // bf16 offsets
    size_t part0, part1, ptrs, f32_end;                   // float offsets (ptrs: 16-byte aligned)
} MoEScratchLayout;
static inline MoEScratchLayout moe_scratch_layout(const MoEShape *s, int N, int tile_rows) {
    const BTTShape b1 = moe_expert_shape(s);
    const size_t E = (size_t)s->experts, NK = (size_t)N * s->topk, p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1);
    const size_t rows = moe_grouped_rows((int)NK, (int)E, tile_rows), tiles = (size_t)moe_max_tiles((int)NK, (int)E, tile_rows);
    Plan f, d, r;
    moe_tiled_plans(&f, &d, &r, s, N, tile_rows, 1, 0);  // -sk 4's take as many pointers (the same GEMMs)
    size_t np = plan_tile_ptr_count(&f);
    if (plan_tile_ptr_count(&d) > np) np = plan_tile_ptr_count(&d);
    if (plan_tile_ptr_count(&r) > np) np = plan_tile_ptr_count(&r);
    MoEScratchLayout L;
    L.w0x = E * p0; L.w1x = E * p1;
    L.rows_in = rows * s->btt.d_in; L.rows_out = rows * s->btt.d_out; L.rows_z = rows * moe_z_row(s);
    L.bf16_end = 3 * (L.w0x + L.w1x) + 2 * L.rows_in + L.rows_out + 2 * L.rows_z + (size_t)N * E + 8;
    L.part0 = (tiles + 1) * p0; L.part1 = (tiles + 1) * p1;
    const size_t head = NK + (size_t)N * E + L.part0 + L.part1;
    L.ptrs = (head + 3) / 4 * 4;
    L.f32_end = L.ptrs + np * (sizeof(void *) / sizeof(float));
    return L;
}
static size_t moe_gpu_scratch_elems(const MoEShape *s, int N) { return moe_scratch_layout(s, N, moe_tile_rows(s, N)).bf16_end; }
static size_t moe_gpu_scratch_floats(const MoEShape *s, int N) { return moe_scratch_layout(s, N, moe_tile_rows(s, N)).f32_end; }

// Points sc into the shared scratch (mem: moe_gpu_scratch_elems, fmem: moe_gpu_scratch_floats of
// st's allocation) for a call on N rows with st's tile rows.
static void moe_gpu_scratch_bind(MoEGPUScratch *sc, const MoEGPUState *st, const MoEShape *s, int N, floatX *mem, float *fmem) {
    if (N > st->capacity) fatal("internal: BTT-MoE layer called on %d rows, allocated for %d", N, st->capacity);
    const MoEScratchLayout L = moe_scratch_layout(s, N, st->tile_rows);
    const size_t NK = (size_t)N * s->topk;
    sc->w0x = mem; mem += L.w0x;
    sc->w1x = mem; mem += L.w1x;
    sc->dw0x = mem; mem += L.w0x;
    sc->dw1x = mem; mem += L.w1x;
    sc->w0t = mem; mem += L.w1x;
    sc->w1t = mem; mem += L.w0x;
    sc->xg = mem; mem += L.rows_in;
    sc->dxg = mem; mem += L.rows_in;
    sc->yg = mem; mem += L.rows_out;
    sc->t1 = mem; mem += L.rows_z;
    sc->t2 = mem; mem += L.rows_z;
    sc->dlogits_bf16 = mem;
    sc->dgate = fmem;
    sc->dlogits = fmem + NK;
    sc->part0 = sc->dlogits + (size_t)N * s->experts;
    sc->part1 = sc->part0 + L.part0;
    sc->ptrs = (void **)(fmem + L.ptrs);
}

__global__ void moe_route_kernel(int *sel, float *gate, float *lse, const float *logits, const int *only, int N, int E, int K) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    st_moe_route_row(logits + (size_t)t * E, E, K, only ? only + (size_t)t * K : NULL, sel + (size_t)t * K, gate + (size_t)t * K, lse + t);
}

// Block e: how many of the NK pairs selected expert e (a block-wide count, fixed order).
__global__ void moe_count_kernel(int *counts, const int *sel, int NK) {
    int e = blockIdx.x, c = 0;
    for (int p = threadIdx.x; p < NK; p += blockDim.x) c += sel[p] == e;
    float total = block_sum((float)c);  // exact: counts stay far below 2^24
    if (threadIdx.x == 0) counts[e] = (int)total;
}

static __device__ __forceinline__ int moe_padded(int c, int T) { return (c + T - 1) / T * T; }

// Block e: expert e's pairs in ascending pair order at order[offsets[e] ...] and pos[p], -1 in
// its padding rows, and its tiles' entries of tile_expert; offsets[e] = the padded counts of the
// experts before it. Each chunk of blockDim pairs is ranked with warp ballots; blockDim must be a
// multiple of 32 and at most 1024.
__global__ void moe_group_kernel(int *order, int *pos, int *offsets, int *tile_expert, const int *counts, const int *sel, int NK, int E, int T) {
    __shared__ int warp_tot[32];
    int e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    int base = 0;
    for (int i = 0; i < e; i++) base += moe_padded(counts[i], T);
    const int padded = moe_padded(counts[e], T);
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

// w0x/w1x from the strided rank components (scatter = 0), or dW0/dW1 += dw0x/dw1x (scatter = 1).
__global__ void moe_cores_kernel(floatX *W0, floatX *W1, floatX *w0x, floatX *w1x, size_t n0, size_t n1, int E, int Ep, size_t p0,
                                 size_t p1, int scatter) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n0) {
        size_t j = st_moe_w0_expert_index(i, E, p0);
        if (scatter) W0[i] = (floatX)((float)W0[i] + (float)w0x[j]);
        else w0x[j] = W0[i];
    } else if (i < n0 + n1) {
        i -= n0;
        size_t j = st_moe_w1_expert_index(i, E, Ep, p1);
        if (scatter) W1[i] = (floatX)((float)W1[i] + (float)w1x[j]);
        else w1x[j] = W1[i];
    }
}

// dW0/dW1 (the strided rank components) += the sum over expert e's tiles, in tile order, of the
// tiled backward's fp32 partials (tile t's at part0 + t·p0, part1 + t·p1): one bf16 rounding.
__global__ void moe_partials_scatter_kernel(floatX *dW0, floatX *dW1, const float *part0, const float *part1, const int *offsets, size_t n0,
                                            size_t n1, int E, int Ep, size_t p0, size_t p1, int T) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n0 + n1) return;
    const int w1 = i >= n0;
    const size_t j = w1 ? st_moe_w1_expert_index(i - n0, E, Ep, p1) : st_moe_w0_expert_index(i, E, p0), p = w1 ? p1 : p0;
    const int e = (int)(j / p);
    const float *part = (w1 ? part1 : part0) + j % p;
    float acc = 0.0f;
    for (int t = offsets[e] / T; t < offsets[e + 1] / T; t++) acc += part[(size_t)t * p];
    floatX *g = w1 ? dW1 + (i - n0) : dW0 + i;
    *g = (floatX)((float)*g + acc);
}

// Grouped row w of dst = src row order[w] / K (src rows src_ld apart), zeros for a padding row,
// for the rows in use (*rows_in_use of `rows`), 8 elements per thread (d % 8 == 0)
__global__ void moe_gather_kernel(floatX *dst, const floatX *src, const int *order, const int *rows_in_use, int rows, int K, int d,
                                  int src_ld) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int per = d / 8;
    if (i >= (size_t)rows * per) return;
    int w = (int)(i / per), c = (int)(i % per) * 8;
    if (w >= *rows_in_use) return;
    x128 v;
    if (order[w] >= 0) v = load128(src + (size_t)(order[w] / K) * src_ld + c);
    else
        for (int j = 0; j < 8; j++) v[j] = (floatX)0.0f;
    store128(dst + (size_t)w * d + c, v);
}

static void moe_gather(floatX *dst, const floatX *src, const MoEGPUState *st, int E, int rows, int K, int d, int src_ld = 0) {
    moe_gather_kernel<<<ceil_div_i((long)rows * d / 8, 256), 256>>>(dst, src, st->order, st->offsets + E, rows, K, d, src_ld ? src_ld : d);
    cudaCheckLaunch();
}

// y[t] = bias + Σ_k gate[t, k] · src[pos[t·K + k]] (gate NULL: plain sum), summed in k order in
// fp32; with pre (the fc layer): pre[t] = that and y[t] = its GELU. y and pre rows ld apart;
// acc: y[t] += that instead (no pre then).
__global__ void moe_combine_kernel(floatX *y, const floatX *src, const float *gate, const int *pos, const floatX *bias, int N, int K, int d,
                                   floatX *pre, int ld, int acc_y) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int per = d / 8;
    if (i >= (size_t)N * per) return;
    int t = (int)(i / per), c = (int)(i % per) * 8;
    float acc[8];
    for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    if (acc_y) {
        x128 o = load128(y + (size_t)t * ld + c);
        for (int j = 0; j < 8; j++) acc[j] = (float)o[j];
    }
    if (bias) {
        x128 b = load128(bias + c);
        for (int j = 0; j < 8; j++) acc[j] += (float)b[j];
    }
    for (int k = 0; k < K; k++) {
        int pr = t * K + k;
        float g = gate ? gate[pr] : 1.0f;
        x128 v = load128(src + (size_t)pos[pr] * d + c);
        for (int j = 0; j < 8; j++) acc[j] += g * (float)v[j];
    }
    x128 o;
    for (int j = 0; j < 8; j++) o[j] = (floatX)acc[j];
    if (pre) {
        store128(pre + (size_t)t * ld + c, o);
        for (int j = 0; j < 8; j++) o[j] = (floatX)gelu_f((float)o[j]);  // of the pre-activation as kept (bf16), which the backward's GELU' reads
    }
    store128(y + (size_t)t * ld + c, o);
}

// One warp per grouped row w in use (pair p = order[w]): dgate[p] = <z_w, dZu_w>; then dZ =
// gate·dZu (in place) and, when dyg is given, dy_w ← gate·dy_w (for dW1). z is in the saved
// (phi, gamma, rho) layout; dZu too when G == 0, else in the (gamma, phi, rho) layout of G x P x R
// (the fused backward's, whose dW1 reads dy and the gate itself). A padding row's z and dZu are
// zeroed: the tiled weight gradients sum over them (a fused forward does not write them).
__global__ void moe_gate_backward_kernel(float *dgate, floatX *dzu, floatX *dyg, floatX *z, const float *gate, const int *order,
                                         const int *rows_in_use, int rows, int zrow, int dout, int G, int P, int R) {
    int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (w >= rows || w >= *rows_in_use) return;
    int pr = order[w];
    floatX *zr = z + (size_t)w * zrow;
    floatX *dz = dzu + (size_t)w * zrow;
    if (pr < 0) {
        for (int i = lane; i < zrow; i += 32) zr[i] = dz[i] = (floatX)0.0f;
        return;
    }
    float s = 0.0f;
    for (int i = lane; i < zrow; i += 32) {
        const int j = G ? ((i / R) % G) * P * R + (i / (G * R)) * R + i % R : i;  // z's (f, g, s) in dZu's layout
        s += (float)zr[i] * (float)dz[j];
    }
    s = warp_sum(s);
    float g = gate[pr];
    if (lane == 0) dgate[pr] = s;
    for (int i = lane; i < zrow; i += 32) dz[i] = (floatX)(g * (float)dz[i]);
    if (!dyg) return;
    floatX *dy = dyg + (size_t)w * dout;
    for (int i = lane; i < dout; i += 32) dy[i] = (floatX)(g * (float)dy[i]);
}

// The same on -sk 4's layout, where each tile of T grouped rows keeps its z and dZu transposed
// (zrow rows of T): a block takes 32 consecutive rows of one tile (threadIdx.x, so that a warp's
// loads are consecutive) in 8 slices of the elements (threadIdx.y), summed over the slices in
// order; each element is read and scaled by the thread that sums it. dW1 = Zᵀ (gate·dY) =
// (gate·Z)ᵀ dY, so z is scaled here, in place, instead of dy (zrow elements a row, not d_out, and
// z is already being read): -sk 4's saved z is its own, read by nothing after this backward. A
// padding row's z and dZu are zeroed, as above.
#define MOE_GATE_ZT_COLS 32
#define MOE_GATE_ZT_SLICES 8
__global__ void __launch_bounds__(MOE_GATE_ZT_COLS * MOE_GATE_ZT_SLICES) moe_gate_backward_zt_kernel(float *dgate, floatX *dzu, floatX *z,
                                                                                                     const float *gate, const int *order,
                                                                                                     const int *rows_in_use, int T, int zrow) {
    __shared__ float part[MOE_GATE_ZT_SLICES][MOE_GATE_ZT_COLS];
    const int tile = blockIdx.x, t = blockIdx.y * MOE_GATE_ZT_COLS + threadIdx.x;
    if ((long)tile * T >= *rows_in_use) return;  // the whole block: no barrier is skipped by some
    const int w = tile * T + t, pr = t < T ? order[w] : -1;
    const size_t base = (size_t)tile * T * zrow + t;
    float s = 0.0f;
    if (t < T) {
        const float g = pr >= 0 ? gate[pr] : 0.0f;  // padding: zeros
        for (int c = threadIdx.y; c < zrow; c += MOE_GATE_ZT_SLICES) {
            const size_t at = base + (size_t)c * T;
            const float d = (float)dzu[at], v = (float)z[at];
            s += v * d;
            dzu[at] = (floatX)(g * d);
            z[at] = (floatX)(g * v);
        }
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && pr >= 0) {
        float sum = 0.0f;
        for (int j = 0; j < MOE_GATE_ZT_SLICES; j++) sum += part[j][threadIdx.x];
        dgate[pr] = sum;
    }
}

__global__ void moe_dlogits_kernel(float *dlogits, floatX *dlogits_bf16, const float *logits, const float *lse, const float *gate,
                                   const float *dgate, const int *sel, const float *fhat, int N, int E, int K, float daux) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    float *dl = dlogits + (size_t)t * E;
    st_moe_dlogits_row(dl, logits + (size_t)t * E, lse[t], gate + (size_t)t * K, dgate + (size_t)t * K, sel + (size_t)t * K, fhat, E, K, N,
                       daux);
    for (int e = 0; e < E; e++) dlogits_bf16[(size_t)t * E + e] = (floatX)dl[e];
}

// moe.h's MOE_AUX_STATS layout: block j < E: stats[j] = Σ_t softmax(logits_t)_j; block E:
// stats[2E] = Σ_t lse_t² and stats[E + e] = counts[e]. fp32 sums in a fixed order, stored as doubles.
__global__ void moe_aux_stats_kernel(double *stats, const float *logits, const float *lse, const int *counts, int N, int E) {
    int j = blockIdx.x;
    float s = 0.0f;
    for (int t = threadIdx.x; t < N; t += blockDim.x) s += j < E ? __expf(logits[(size_t)t * E + j] - lse[t]) : lse[t] * lse[t];
    s = block_sum(s);
    if (threadIdx.x == 0) stats[j < E ? j : 2 * E] = s;
    if (j == E)
        for (int e = threadIdx.x; e < E; e += blockDim.x) stats[E + e] = counts[e];
}

// One thread: the aux loss and routing, and f̂, from the statistics of n_total tokens (moe.h's formula).
__global__ void moe_aux_finish_kernel(MoERouting *out, float *fhat, const double *stats, long n_total, int E, int K) {
    *out = st_moe_aux_from_stats(fhat, stats, n_total, E, K);
}

// y (N, d_out) overwritten; st keeps what the backward needs. x, W0, W1, router: the layer's
// input and tensors. With g_st_fused and a shape btt_fused.cuh supports, the experts run as one
// segmented fused launch (x gathered on the fly); else the tiled cuBLAS plans on gathered rows.
// Either way nothing waits for the host. With pre_gelu: pre_gelu = the layer's output, y = its
// GELU (both written by the combine).
// The forward up to the experts: router logits, top-k and gates, the grouping by expert in tiles
// of T rows (tile_expert: their experts; T = 1: no padding, dev/cuda/moe_layer's v1) and the
// experts' cores copied out of the rank components.
static void moe_route_group_gpu(MoEGPUState *st, MoEGPUScratch *sc, int *tile_expert, int T, const floatX *x, const floatX *W0,
                                const floatX *W1, const floatX *router, int N, const MoEShape *s) {
    const int E = s->experts, K = s->topk, din = s->btt.d_in, NK = N * K;
    const BTTShape b1 = moe_expert_shape(s);
    const size_t p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1), n0 = p0 * E, n1 = p1 * E;
    if (N > st->capacity) fatal("internal: BTT-MoE layer called on %d rows, allocated for %d", N, st->capacity);
    st->N = N;
    // logits (fp32, row-major N x E) = x Rᵀ: column-major (E x N) = Rᵀ-op (E x din) · x (din x N)
    st_gemm_ex(CUBLAS_OP_T, CUBLAS_OP_N, E, N, din, router, CUBLAS_LOWP, din, x, CUBLAS_LOWP, din, 0.0f, st->logits, CUDA_R_32F, E);
    moe_route_kernel<<<ceil_div_i(N, 128), 128>>>(st->sel, st->gate, st->lse, st->logits, st->forced_sel, N, E, K);
    cudaCheckLaunch();
    moe_count_kernel<<<E, 256>>>(st->counts, st->sel, NK);
    cudaCheckLaunch();
    moe_group_kernel<<<E, 256>>>(st->order, st->pos, st->offsets, tile_expert, st->counts, st->sel, NK, E, T);
    cudaCheckLaunch();
    moe_cores_kernel<<<ceil_div_i((long)(n0 + n1), 256), 256>>>((floatX *)W0, (floatX *)W1, sc->w0x, sc->w1x, n0, n1, E, s->btt.eps, p0, p1, 0);
    cudaCheckLaunch();
}

static void moe_forward_gpu(floatX *y, MoEGPUState *st, MoEGPUScratch *sc, const floatX *x, const floatX *W0, const floatX *W1,
                            const floatX *router, const floatX *bias, int N, const MoEShape *s, floatX *pre_gelu = NULL, int y_ld = 0) {
    const int E = s->experts, K = s->topk, din = s->btt.d_in, dout = s->btt.d_out, NK = N * K, T = st->tile_rows;
    const BTTShape b1 = moe_expert_shape(s);
    moe_route_group_gpu(st, sc, st->tile_expert, T, x, W0, W1, router, N, s);
    const int fused = g_st_fused && btt_forward_fused_seg(sc->yg, st->z, x, st->order, K, sc->w0x, sc->w1x, st->counts, st->offsets, E, NK,
                                                          &b1, st->tiles);
    if (!fused) {
        Plan f;
        moe_tiled_plans(&f, NULL, NULL, s, N, T, 1, g_st_zt);
        g_st_zt_runs += g_st_zt;
        moe_gather(sc->xg, x, st, E, moe_max_tiles(NK, E, T) * T, K, din);
        void *buf[PB_COUNT] = {0};
        buf[PB_X] = sc->xg; buf[PB_Y] = sc->yg; buf[PB_Z] = st->z; buf[PB_T1] = sc->t1; buf[PB_W0] = sc->w0x; buf[PB_W1] = sc->w1x;
        plan_tiled_run_gpu(&f, buf, st->tile_expert, st->offsets + E, sc->ptrs);
    }
    moe_combine_kernel<<<ceil_div_i((long)N * dout / 8, 256), 256>>>(y, sc->yg, st->gate, st->pos, bias, N, K, dout, pre_gelu,
                                                                       y_ld ? y_ld : dout, 0);
    cudaCheckLaunch();
}

// The statistics of the aux loss over this process's N tokens into st->stats (device doubles,
// moe.h's MOE_AUX_STATS layout). Data-parallel ranks sum them (all-reduce) before the finish.
static void moe_aux_stats_gpu(MoEGPUState *st, const MoEShape *s) {
    moe_aux_stats_kernel<<<s->experts + 1, 256>>>(st->stats, st->logits, st->lse, st->counts, st->N, s->experts);
    cudaCheckLaunch();
}

// The aux loss and routing from st->stats summed over n_total tokens into *out_dev (on the
// device), and f̂ on the device for the backward. Nothing waits: the caller reads out_dev when it
// reads the loss.
static void moe_aux_finish_gpu(MoEGPUState *st, long n_total, const MoEShape *s, MoERouting *out_dev) {
    moe_aux_finish_kernel<<<1, 1>>>(out_dev, st->fhat, st->stats, n_total, s->experts, s->topk);
    cudaCheckLaunch();
}

// dx (N, d_in) overwritten (may be NULL); dW0, dW1, drouter, dbias accumulated. With g_st_fused
// and dx, every expert's dx and dZu come from ONE segmented launch of the fused kernel over dy
// (the transposed BTT, btt.h; dy rows read through the grouping), the gate is applied in the
// combine (dx is linear in dZ), and every expert's dW0 and dW1 come from one seg_wgrad launch
// each (seg_wgrad.cuh, reading x and gate·dy through the grouping: no gathered copies). Else the
// tiled cuBLAS plans on gathered rows, their per-tile weight-gradient partials summed per expert.
// Nothing waits for the host either way. With pre_gelu, dx is the gradient before the GELU of
// pre_gelu (a separate pass: dx's router term comes last). dy_ld, dx_acc: as btt_backward_gpu's
// (the plans only). Returns 1 when it ran fused.
static int moe_backward_gpu(floatX *dx, floatX *dW0, floatX *dW1, floatX *drouter, floatX *dbias, const floatX *dy, float daux,
                            const floatX *x, MoEGPUState *st, MoEGPUScratch *sc, const floatX *W0, const floatX *W1,
                            const floatX *router, const MoEShape *s, float *colsum_scratch, const floatX *pre_gelu = NULL, int dy_ld = 0,
                            int dx_acc = 0) {
    if (dx_acc && pre_gelu) fatal("internal: a BTT-MoE backward cannot both add to dx and apply GELU'");
    const int N = st->N, E = s->experts, K = s->topk, din = s->btt.d_in, dout = s->btt.d_out, NK = N * K, T = st->tile_rows;
    const BTTShape b1 = moe_expert_shape(s), b1t = btt_shape_transposed(&b1);
    const size_t p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1), n0 = p0 * E, n1 = p1 * E, zrow = moe_z_row(s);
    const int rows = moe_max_tiles(NK, E, T) * T;  // grouped rows of the tiles (the spare's not included)
    const int cores_blocks = ceil_div_i((long)(n0 + n1), 256);
    moe_cores_kernel<<<cores_blocks, 256>>>((floatX *)W0, (floatX *)W1, sc->w0x, sc->w1x, n0, n1, E, s->btt.eps, p0, p1, 0);
    cudaCheckLaunch();
    int fused = 0;
    if (g_st_fused && dx && !dy_ld && !dx_acc && btt_fused_supported(&b1t, btt_fused_smem_limit())) {  // dxg (ungated) and t1 = dZu, (gamma, phi, rho)
        btt_transposed_cores_gpu(sc->w0t, sc->w1t, sc->w0x, sc->w1x, &b1, E);
        fused = btt_forward_fused_seg(sc->dxg, sc->t1, dy, st->order, K, sc->w0t, sc->w1t, st->counts, st->offsets, E, NK, &b1t, st->tiles);
    }
    Plan pd, pr;
    moe_tiled_plans(NULL, &pd, &pr, s, N, T, dx != NULL, g_st_zt);
    void *buf[PB_COUNT] = {0};  // the tiled plans' buffers (not the fused path's)
    if (!fused) {  // the plans read gathered rows: dy, and x (xg holds the forward's only if no other layer ran since)
        buf[PB_X] = sc->xg; buf[PB_Z] = st->z; buf[PB_DY] = sc->yg; buf[PB_DX] = sc->dxg; buf[PB_T1] = sc->t1; buf[PB_T2] = sc->t2;
        buf[PB_W0] = sc->w0x; buf[PB_W1] = sc->w1x; buf[PB_DW0] = sc->part0; buf[PB_DW1] = sc->part1;
        moe_gather(sc->yg, dy, st, E, rows, K, dout, dy_ld);
        moe_gather(sc->xg, x, st, E, rows, K, din);
        plan_tiled_run_gpu(&pd, buf, st->tile_expert, st->offsets + E, sc->ptrs);  // dZu = dY W1ᵀ: (phi, gamma, rho) layout in t2;
    }                                                                              // -sk 4: each tile's transposed in t1
    if (!fused && g_st_zt) {
        g_st_zt_runs++;
        const dim3 grid(moe_max_tiles(NK, E, T), ceil_div_i(T, MOE_GATE_ZT_COLS)), block(MOE_GATE_ZT_COLS, MOE_GATE_ZT_SLICES);
        moe_gate_backward_zt_kernel<<<grid, block>>>(sc->dgate, sc->t1, st->z, st->gate, st->order, st->offsets + E, T, (int)zrow);
    } else {
        moe_gate_backward_kernel<<<ceil_div_i(rows, 8), 256>>>(sc->dgate, fused ? sc->t1 : sc->t2, fused ? NULL : sc->yg, st->z, st->gate,
                                                               st->order, st->offsets + E, rows, (int)zrow, dout, fused ? b1.gamma : 0, b1.phi,
                                                               b1.rank);
    }
    cudaCheckLaunch();
    if (fused) {  // dW1[e][f] = Z_fᵀ (gate·dY)_f, dW0[e][g] = X_gᵀ dZ_g over expert e's rows (every expert written);
                  // dy and x read through the grouping, no gathered copies
        const int G = b1.gamma, P = b1.phi, A = b1.alpha, Ee = b1.eps, gr = G * b1.rank, fr = P * b1.rank;
        SegWgrad w1 = {st->z, dy, sc->dw1x, (int)zrow, dout, Ee, gr, Ee, (long long)gr * Ee, (long long)p1, gr, Ee, P, E, st->counts,
                       st->offsets, 0, st->order, K, 0, 1, st->gate};
        SegWgrad w0 = {x, sc->t1, sc->dw0x, din, (int)zrow, fr, A, fr, (long long)A * fr, (long long)p0, A, fr, G, E, st->counts,
                       st->offsets, 0, st->order, K, 1, 0, NULL};
        if (!seg_wgrad(&w1) || !seg_wgrad(&w0)) fatal("internal: seg_wgrad does not take a shape the fused BTT kernel takes");
        moe_cores_kernel<<<cores_blocks, 256>>>(dW0, dW1, sc->dw0x, sc->dw1x, n0, n1, E, s->btt.eps, p0, p1, 1);
        cudaCheckLaunch();
    } else {  // dx per tile; dW0, dW1 per tile, then summed per expert into the rank components
        plan_tiled_run_gpu(&pr, buf, st->tile_expert, st->offsets + E, sc->ptrs);
        moe_partials_scatter_kernel<<<cores_blocks, 256>>>(dW0, dW1, sc->part0, sc->part1, st->offsets, n0, n1, E, s->btt.eps, p0, p1, T);
        cudaCheckLaunch();
    }
    moe_dlogits_kernel<<<ceil_div_i(N, 128), 128>>>(sc->dlogits, sc->dlogits_bf16, st->logits, st->lse, st->gate, sc->dgate, st->sel, st->fhat,
                                                    N, E, K, daux);
    cudaCheckLaunch();
    // drouter (E x din) += dlogitsᵀ x: column-major (din x E) = x (din x N) · dlogits-op (N x E)
    st_gemm_ex(CUBLAS_OP_N, CUBLAS_OP_T, din, E, N, x, CUBLAS_LOWP, din, sc->dlogits_bf16, CUBLAS_LOWP, E, 1.0f, drouter, CUBLAS_LOWP, din);
    if (dx) {  // the fused dxg is ungated
        moe_combine_kernel<<<ceil_div_i((long)N * din / 8, 256), 256>>>(dx, sc->dxg, fused ? st->gate : NULL, st->pos, NULL, N, K, din, NULL,
                                                                       din, dx_acc);
        cudaCheckLaunch();
        // dx += dlogits R: column-major (din x N) += R (din x E) · dlogits (E x N)
        st_gemm_ex(CUBLAS_OP_N, CUBLAS_OP_N, din, N, E, router, CUBLAS_LOWP, din, sc->dlogits_bf16, CUBLAS_LOWP, E, 1.0f, dx, CUBLAS_LOWP, din);
        if (pre_gelu) gelu_backward_inplace(dx, pre_gelu, (size_t)N * din);
    }
    if (dbias) column_sums(dbias, NULL, dy, NULL, NULL, NULL, N, dout, colsum_scratch, dy_ld);
    return fused;
}

// ----------------------------------------------------------------------------------------------
// separate q, k, v (any of them structured): column block `part` (width C) of a (N, 3C) qkv
// buffer to or from a (N, C) buffer; and dst += src.

__global__ void qkv_part_copy_kernel(floatX *qkv, floatX *part_buf, int part, int N, int C, int to_qkv) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int per = C / 8;
    if (i >= (size_t)N * per) return;
    size_t r = i / per;
    int c = (int)(i % per) * 8;
    floatX *q = qkv + r * 3 * C + (size_t)part * C + c, *x = part_buf + r * C + c;
    if (to_qkv) store128(q, load128(x));
    else store128(x, load128(q));
}

static void qkv_part_copy(floatX *qkv, floatX *part_buf, int part, int N, int C, int to_qkv) {
    qkv_part_copy_kernel<<<ceil_div_i((long)N * C / 8, 256), 256>>>(qkv, part_buf, part, N, C, to_qkv);
    cudaCheckLaunch();
}

__global__ void add_inplace_kernel(floatX *dst, const floatX *src, size_t n8) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    x128 a = load128(dst + i * 8), b = load128(src + i * 8);
    for (int k = 0; k < 8; k++) a[k] = (floatX)((float)a[k] + (float)b[k]);
    store128(dst + i * 8, a);
}

static void add_inplace(floatX *dst, const floatX *src, size_t n) {
    add_inplace_kernel<<<ceil_div_i((long)(n / 8), 256), 256>>>(dst, src, n / 8);
    cudaCheckLaunch();
}
