// cuda/mma.cuh: tensor-core operand loads and instructions with their state space and register
// layouts spelled out, for the fused kernels (structured/btt_fused.cuh, monarch_fused.cuh).
//
// 1. wmma fragment loads (WmmaA, WmmaB: 16x16 bf16, row-major; WmmaAcc: fp32). nvcc turns
//    wmma::load_matrix_sync on a plain pointer into generic 32-bit loads (LD.E) even when the
//    pointer is into shared memory; the same PTX instruction with .shared becomes one ldmatrix
//    (LDSM.16.M88.4), and with .global plain global loads. The fragment registers are the ones
//    load_matrix_sync fills (same instruction, same operand order; tests/test_fused_ptx.sh compares
//    the PTX). Pointers 32-byte aligned, ldm a multiple of 8. Define BT_WMMA_GENERIC to use
//    load_matrix_sync instead (the CPU simulator does: it cannot run inline PTX).
//      wmma_load_a_shared(a, p, ldm)   wmma_load_b_shared(b, p, ldm)   wmma_load_b_global(b, p, ldm)
//      wmma_load_a_col_shared(a, p, ldm) (WmmaACol)   wmma_load_b_col_shared(b, p, ldm) (WmmaBCol)
//      wmma_load_shared(frag, p, ldm): any of the shared-memory ones, by fragment type
//      wmma_store_shared(p, acc, ldm): an fp32 accumulator, row-major, into shared memory
//
// 2. The raw instructions, whose accumulators a kernel can place itself instead of going through
//    wmma's opaque fragments and a staging tile:
//   mma_ldsm_x4(r, p)         four 8x8 bf16 matrices from shared memory: lane l gives the address
//                             of row l % 8 of matrix l / 8 (16-byte aligned); lane l receives, of
//                             matrix i, the pair of row l / 4, columns 2 (l % 4), +1 in r[i]
//   mma_ldsm_x4_trans(r, p)   the same, each matrix transposed: r[i] = the pair of column l / 4,
//                             rows 2 (l % 4), +1 of matrix i as stored
//   mma_bf16_16816(d, a, b0, b1)  d += A B, A 16x16 (row), B 16x8 (col), fp32 d:
//        lane l, g = l / 4, t = l % 4:  a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]
//                                       a[2] = A[g][2t+8, +9]    a[3] = A[g+8][2t+8, +9]
//                                       b0 = B[2t, 2t+1][g]      b1 = B[2t+8, 2t+9][g]
//                                       d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
//        (each pair packed low element first, as two bf16 in a 32-bit register)
//
// So for a row-major 16x16 A tile at p (row stride ld elements) mma_ldsm_x4(a, p + (l % 16) * ld +
// (l / 16) * 8) gives a[0..3] above, and for a row-major 16x16 B tile (K x N) mma_ldsm_x4_trans(b,
// p + (l % 16) * ld + (l / 16) * 8) gives b[0], b[1] for columns 0..7 and b[2], b[3] for 8..15.
// Every lane of the warp must execute each of these together (.sync.aligned). sm_80 and later.
// On the CPU simulator (tests/cuda_sim) they are emulated lane by lane from the same layouts.
#pragma once
#include <stdint.h>
#include <mma.h>

typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major> WmmaA;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major> WmmaB;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major> WmmaACol;  // A[m][k] at p[k*ld + m]
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major> WmmaBCol;  // B[k][n] at p[n*ld + k]
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> WmmaAcc;

// One wmma load from shared memory: `name` fills a Frag with PTX's wmma.load.<op>...shared.bf16
// (op: a or b, then row or col), or with load_matrix_sync under BT_WMMA_GENERIC.
#ifdef BT_WMMA_GENERIC
#define WMMA_LOAD_SHARED(name, Frag, op) \
    __device__ __forceinline__ void name(Frag &f, const __nv_bfloat16 *p, unsigned ldm) { nvcuda::wmma::load_matrix_sync(f, p, ldm); }
#else
#define WMMA_LOAD_SHARED(name, Frag, op)                                                                        \
    __device__ __forceinline__ void name(Frag &f, const __nv_bfloat16 *p, unsigned ldm) {                       \
        const unsigned addr = (unsigned)__cvta_generic_to_shared(p);                                            \
        int *r = reinterpret_cast<int *>(&f);                                                                   \
        asm volatile("wmma.load." op ".m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;"                      \
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                           \
                     : "r"(addr), "r"(ldm)                                                                      \
                     : "memory");                                                                               \
    }
#endif
WMMA_LOAD_SHARED(wmma_load_a_shared, WmmaA, "a.sync.aligned.row")
WMMA_LOAD_SHARED(wmma_load_b_shared, WmmaB, "b.sync.aligned.row")          // e.g. a staged core
WMMA_LOAD_SHARED(wmma_load_a_col_shared, WmmaACol, "a.sync.aligned.col")  // a row-major tile read transposed
WMMA_LOAD_SHARED(wmma_load_b_col_shared, WmmaBCol, "b.sync.aligned.col")  // likewise
#undef WMMA_LOAD_SHARED
// The four from shared memory by fragment type (flash attention's and seg_wgrad's operands all live there).
__device__ __forceinline__ void wmma_load_shared(WmmaA &a, const __nv_bfloat16 *p, unsigned ldm) { wmma_load_a_shared(a, p, ldm); }
__device__ __forceinline__ void wmma_load_shared(WmmaACol &a, const __nv_bfloat16 *p, unsigned ldm) { wmma_load_a_col_shared(a, p, ldm); }
__device__ __forceinline__ void wmma_load_shared(WmmaB &b, const __nv_bfloat16 *p, unsigned ldm) { wmma_load_b_shared(b, p, ldm); }
__device__ __forceinline__ void wmma_load_shared(WmmaBCol &b, const __nv_bfloat16 *p, unsigned ldm) { wmma_load_b_col_shared(b, p, ldm); }
// An fp32 accumulator into shared memory, row-major (p 32-byte aligned, ldm a multiple of 4).
__device__ __forceinline__ void wmma_store_shared(float *p, const WmmaAcc &c, unsigned ldm) {
#ifdef BT_WMMA_GENERIC
    nvcuda::wmma::store_matrix_sync(p, c, ldm, nvcuda::wmma::mem_row_major);
#else
    unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    const float *v = c.x;
    asm volatile("wmma.store.d.sync.aligned.row.m16n16k16.shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;"
                 :
                 : "r"(addr), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3]), "f"(v[4]), "f"(v[5]), "f"(v[6]), "f"(v[7]), "r"(ldm)
                 : "memory");
#endif
}
// B from global memory that the kernel only reads (the cores)
__device__ __forceinline__ void wmma_load_b_global(WmmaB &b, const __nv_bfloat16 *p, unsigned ldm) {
#ifdef BT_WMMA_GENERIC
    nvcuda::wmma::load_matrix_sync(b, p, ldm);
#else
    size_t addr = __cvta_generic_to_global(p);
    int *r = reinterpret_cast<int *>(&b);
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.global.bf16 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "l"(addr), "r"(ldm));  // read-only here: no memory clobber
#endif
}

#if defined(CUDA_SIM_H)
__device__ __forceinline__ void mma_ldsm_x4(uint32_t r[4], const void *p) { sim_ldmatrix_x4(r, p, 0); }
__device__ __forceinline__ void mma_ldsm_x4_trans(uint32_t r[4], const void *p) { sim_ldmatrix_x4(r, p, 1); }
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) { sim_mma_bf16_16816(d, a, b0, b1); }
#else
__device__ __forceinline__ void mma_ldsm_x4(uint32_t r[4], const void *p) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void mma_ldsm_x4_trans(uint32_t r[4], const void *p) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
#endif
