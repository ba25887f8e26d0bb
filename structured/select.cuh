// structured/select.cuh: which structured kernels run (-sk, st_set_kernels) and the counters the
// tests read to see that they did.
#pragma once
#include "btt_fused.cuh"

// 1: BTT forwards, and the backward's dx and dZ, run btt_fused.cuh's kernel, Monarch forwards and
// backward dx monarch_fused.cuh's, where they support the shape (Monarch: and its traffic model
// says they pay) (-sk 1 in the trainer); 0: the cuBLAS plans, the default: on an H200 the fused
// kernels were slower than the plans in every layer and whole-model config of
// dev/bench/structured.sh (dev/bench/RESULTS.md).
static int g_st_fused = 0;
// 1: BTT, Monarch and BTT-MoE layers run the plans with z (u) stored transposed, which need no
// permute of it (gpu_plan.h, -sk 4; BTT-MoE: each tile's z).
static int g_st_zt = 0;
// -sk's setting, 0..5 (the trainer's flag; st_set_kernels applies it)
static int g_st_sk = 0;
// BTT forwards and backwards that ran split (-sk 3), and every structure's on -sk 4's plans
// (the tests check that they did, not -sk 0's plans)
static long g_st_split_runs = 0, g_st_zt_runs = 0;
// -sk's setting: which structured kernels run (g_st_fused, g_st_zt), with 2 and 3 the fused BTT
// kernel with W0 staged (btt_fused.cuh's g_btt_wstage), and with 5 that of 2 on raw mma.sync
// (g_btt_mma: both stages; Monarch's kernels are those of 1, 2 and 3).
static void st_set_kernels(int sk) {
    g_st_sk = sk;
    g_st_fused = sk == 4 ? 0 : sk == 5 ? 2 : sk;
    g_st_zt = sk == 4;
    g_btt_wstage = sk == 2 || sk == 3 || sk == 5;
    g_btt_mma = sk == 5;
}
