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
// What lives where:
//   select.cuh       -sk's flags: which of the paths below run
//   plan_gpu.cuh     gpu_plan.h's plans on cuBLAS, the permute and epilogue kernels
//   btt_gpu.cuh      BTT forward and backward      monarch_gpu.cuh  Monarch's
//   materialize.cuh  BTT and Monarch as dense GEMMs on their rebuilt weight (-sm)
//   moe_gpu.cuh      BTT-MoE: routing, the experts' tiled plans, combine, aux loss
//   moe_group.cuh    BTT-MoE's grouping of the (token, k) pairs by expert (a counting sort)
//   tune.cuh         -at 1's per-layer choice of kernels by timing
// and, here, the copies that let q, k and v run as separate layers.
#pragma once
#include "../cuda/common.cuh"
#include "btt_gpu.cuh"
#include "linear.h"
#include "materialize.cuh"
#include "moe_gpu.cuh"
#include "monarch_gpu.cuh"
#include "plan_gpu.cuh"
#include "select.cuh"
#include "spec.h"
#include "tune.cuh"

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
