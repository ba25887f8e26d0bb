// tests/cuda_sim/cuda_sim.h: a CPU simulator of the subset of CUDA this project uses, so that the
// kernels in cuda/*.cuh and structured/*.cuh run, and are checked, on a machine without a GPU.
//
// It replaces <cuda_runtime.h>, <cuda_bf16.h>, <cublas_v2.h>, <cublasLt.h> and <mma.h>: the
// sources are copied by tests/cuda_sim/simify.py, which rewrites those includes into this header
// and every launch `k<<<g, b, s, st>>>(args)` into
// `sim_launch(k, sim_cfg(g, b, s, st).at("k", __FILE__, __LINE__), args)`, and compiled with
// g++ -std=c++20 (-DBT_WMMA_GENERIC: structured/btt_fused.cuh without its inline PTX). Kernel code
// itself is compiled as written.
//
// Execution model
//  - A block runs as one fiber (user-level context, its own stack) per CUDA thread on one OS
//    thread. Fibers switch only at barriers: __syncthreads, __syncwarp and the warp collectives
//    (__shfl*_sync, __ballot_sync, __any/__all_sync, __match_any_sync), which are real barriers
//    over the warp's lanes (a collective waits for every live lane of its mask). Blocks are
//    independent: each OS worker runs one block at a time (SIM_THREADS workers, default 2).
//  - `__shared__` is `thread_local`: static shared arrays are per worker, i.e. per running block,
//    and refilled with 0xFF when a block's first thread reaches them (SIM_SHARED_POISON).
//    Dynamic shared memory (`extern __shared__ T name[]`) is a per-worker array (defined by the
//    sim_extern_shared.inc simify.py writes), filled with 0xFF (NaN) at every block start, with a
//    PROT_NONE page right after the launch's byte count rounded up to a page and a 0xFF canary
//    between the two that is checked when the block ends.
//  - SIM_SERIAL=1 (or sim_set_random_order(1)): the runnable fibers are picked in random order at
//    every switch and blocks run in random order on one worker (seed SIM_SEED, default 1), so a
//    read that is not ordered after its write by a barrier sees a different value (or the NaN
//    garbage) from run to run; tests compare such runs bit for bit with the default order.
//  - Device memory (cudaMalloc) is host memory with a PROT_NONE page right after each buffer
//    (rounded up to 256 bytes, like cudaMalloc's alignment) and one before; the bytes between
//    the size and the 256-byte boundary are a canary checked after every launch; new memory is
//    0xFF-filled (reads of never-written memory give NaN); freed memory stays PROT_NONE (use after
//    free faults). A fault prints the kernel, block, thread and the buffer it overran.
//  - Checked and reported as errors (process exits with status 3): launch configurations CUDA
//    rejects (returned as cudaErrorInvalidConfiguration / cudaErrorInvalidValue by
//    cudaGetLastError, as on a GPU), host code touching the pinned memory of a cudaMemcpyAsync it
//    has not waited for (the pages are protected until then), dynamic shared memory above 48 KB without
//    cudaFuncSetAttribute, misaligned 16-byte (int4/float4) and 4-byte (__nv_bfloat162) vector
//    accesses, wmma pointer (32-byte) and ldm rules, deadlocks (threads waiting at different
//    barriers), warp collectives with mismatched masks or reading a lane that did not take part,
//    cuBLAS/cuBLASLt arguments (leading dimensions, types, operand ranges that leave their
//    cudaMalloc buffer, outputs aliasing inputs, cuBLASLt layout/epilogue rules).
//  - cuBLAS / cuBLASLt: naive GEMMs, fp32 accumulation, bf16 results rounded to nearest; the
//    cuBLASLt epilogues DEFAULT, BIAS, GELU(_AUX)(_BIAS), DGELU (tanh GELU, as cuBLASLt).
//    sim_cublaslt_refuse_epilogues (bits sim_lt_epi_bit(epilogue)) makes the heuristic find no
//    algorithm for those epilogues, to exercise callers' fallbacks.
//  - Environment: SIM_THREADS (workers, default 2), SIM_SERIAL, SIM_SEED, SIM_STACK_KB (fiber stacks,
//    default 512), SIM_PROFILE=1 (wall time per kernel and cuBLAS call at exit, the 25 longest;
//    2: every one, with the total of calls: what a GPU would launch), SIM_STATS=1,
//    SIM_FILL_MB (garbage fill of new buffers, default their first 256 MB).
//    tests/cuda_sim/README.md has the build commands.
// Not modelled: true concurrency between blocks or with the host, the GPU memory model (weak
// ordering, caches, __threadfence semantics; a warp collective orders its lanes' memory accesses
// here, so a missing __syncwarp right after a shuffle is not seen), timing and performance,
// fast-math precision, tensor-core and cuBLAS accumulation orders, device-pointer dereferences from
// host code, streams (all work is synchronous), register / local memory limits and
// __launch_bounds__, inline PTX, collectives
// whose lanes use different (disjoint) masks at the same time (reported as an error).
#pragma once
#ifndef CUDA_SIM_H
#define CUDA_SIM_H

#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#if !defined(__x86_64__) && !defined(SIM_USE_UCONTEXT)
#define SIM_USE_UCONTEXT 1
#endif
#ifdef SIM_USE_UCONTEXT
#include <ucontext.h>
#endif

// ================================================================================================
// qualifiers

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__
#ifndef __CUDA_SIM__
#define __CUDA_SIM__ 1
#endif

// ================================================================================================
// diagnostics

struct SimJob;
struct SimWorker;
struct SimFiber;
inline thread_local SimWorker *t_sim_w = nullptr;
inline thread_local const char *t_sim_host_op = nullptr;  // cuBLAS call being emulated (for fault reports)
inline void sim_describe_context(char *buf, size_t cap);

[[noreturn]] inline void sim_fail(const char *fmt, ...) {
    char msg[2048], ctx[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    sim_describe_context(ctx, sizeof(ctx));
    fflush(stdout);
    fprintf(stderr, "cuda_sim: ERROR: %s\n  %s\n", msg, ctx);
    fflush(stderr);
    _exit(3);
}

inline int sim_env_int(const char *name, int def) {
    const char *s = getenv(name);
    return s && *s ? atoi(s) : def;
}

// ================================================================================================
// vector types (16-, 8- and 4-byte copies check their alignment: load128/store128 and the
// __nv_bfloat162 loads go through these copies)

inline void sim_check_align(const void *p, size_t a, const char *what) {
    if ((uintptr_t)p % a) sim_fail("misaligned %s at %p (needs %zu-byte alignment)", what, p, a);
}
template <class T>
inline const T *sim_launder(const T *p) {
    asm("" : "+r"(p));
    return p;
}

#define SIM_VEC4(NAME, T, AL)                                                                              \
    struct alignas(AL) NAME {                                                                              \
        T x, y, z, w;                                                                                      \
        NAME() = default;                                                                                  \
        constexpr NAME(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}                                     \
        NAME(const NAME &o) {                                                                              \
            sim_check_align(&o, AL, #NAME " load");                                                        \
            memcpy((void *)this, sim_launder(&o), sizeof(NAME));                                           \
        }                                                                                                  \
        NAME &operator=(const NAME &o) {                                                                   \
            sim_check_align(this, AL, #NAME " store");                                                     \
            sim_check_align(&o, AL, #NAME " load");                                                        \
            memcpy((void *)sim_launder(this), sim_launder(&o), sizeof(NAME));                              \
            return *this;                                                                                  \
        }                                                                                                  \
    };
SIM_VEC4(int4, int, 16)
SIM_VEC4(uint4, unsigned int, 16)
SIM_VEC4(float4, float, 16)
#undef SIM_VEC4
struct alignas(8) int2 { int x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 {  // 8-byte copies check their alignment (btt_fused.cuh's z stores of 4 bf16)
    unsigned int x, y;
    uint2() = default;
    constexpr uint2(unsigned a, unsigned b) : x(a), y(b) {}
    uint2(const uint2 &o) {
        sim_check_align(&o, 8, "uint2 load");
        memcpy((void *)this, sim_launder(&o), sizeof(uint2));
    }
    uint2 &operator=(const uint2 &o) {
        sim_check_align(this, 8, "uint2 store");
        sim_check_align(&o, 8, "uint2 load");
        memcpy((void *)sim_launder(this), sim_launder(&o), sizeof(uint2));
        return *this;
    }
};
inline uint2 make_uint2(unsigned a, unsigned b) { return uint2(a, b); }
inline int4 make_int4(int a, int b, int c, int d) { return int4(a, b, c, d); }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4(a, b, c, d); }
inline float4 make_float4(float a, float b, float c, float d) { return float4(a, b, c, d); }
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline int2 make_int2(int a, int b) { return int2{a, b}; }

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
    constexpr dim3(uint3 u) : x(u.x), y(u.y), z(u.z) {}
};
inline thread_local uint3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim, gridDim;
static constexpr int warpSize = 32;

// ================================================================================================
// bf16 (round to nearest even; NaN -> 0x7FFF as CUDA)

inline unsigned short sim_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float sim_bf2f(unsigned short b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned short sim_d2bf(double d) {  // directly from double (not through float)
    if (d != d) return 0x7FFF;
    float f = (float)d;  // nearest float; fix the rare double-rounding case below
    unsigned short r = sim_f2bf(f);
    double lo = sim_bf2f(r), err = d - lo;
    unsigned short other = err > 0 ? (unsigned short)(r + ((r & 0x8000) ? -1 : 1)) : (unsigned short)(r + ((r & 0x8000) ? 1 : -1));
    if (err != 0 && (other & 0x7F80) != 0x7F80 && fabs(d - (double)sim_bf2f(other)) < fabs(err)) r = other;
    return r;
}

struct __nv_bfloat16_raw { unsigned short x; };
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(sim_f2bf(f)) {}
    __nv_bfloat16(double d) : __x(sim_d2bf(d)) {}
    __nv_bfloat16(int i) : __x(sim_d2bf((double)i)) {}
    __nv_bfloat16(unsigned int i) : __x(sim_d2bf((double)i)) {}
    __nv_bfloat16(long i) : __x(sim_d2bf((double)i)) {}
    __nv_bfloat16(unsigned long i) : __x(sim_d2bf((double)i)) {}
    __nv_bfloat16(long long i) : __x(sim_d2bf((double)i)) {}
    __nv_bfloat16(unsigned long long i) : __x(sim_d2bf((double)i)) {}
    __nv_bfloat16(short i) : __x(sim_d2bf((double)i)) {}
    __nv_bfloat16(unsigned short i) : __x(sim_d2bf((double)i)) {}
    __nv_bfloat16(const __nv_bfloat16_raw &r) : __x(r.x) {}
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
    operator float() const { return sim_bf2f(__x); }
    __nv_bfloat16 &operator=(float f) { __x = sim_f2bf(f); return *this; }
    __nv_bfloat16 &operator=(double d) { __x = sim_d2bf(d); return *this; }
};
typedef __nv_bfloat16 nv_bfloat16;
#define SIM_BF_OP(op)                                                                                        \
    inline __nv_bfloat16 operator op(const __nv_bfloat16 &a, const __nv_bfloat16 &b) {                     \
        return __nv_bfloat16((float)a op(float) b);                                                          \
    }                                                                                                        \
    inline __nv_bfloat16 &operator op##=(__nv_bfloat16 &a, const __nv_bfloat16 &b) {                        \
        a = __nv_bfloat16((float)a op(float) b);                                                             \
        return a;                                                                                            \
    }
SIM_BF_OP(+)
SIM_BF_OP(-)
SIM_BF_OP(*)
SIM_BF_OP(/)
#undef SIM_BF_OP
#define SIM_BF_CMP(op) \
    inline bool operator op(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return (float)a op(float) b; }
SIM_BF_CMP(==)
SIM_BF_CMP(!=)
SIM_BF_CMP(<)
SIM_BF_CMP(>)
SIM_BF_CMP(<=)
SIM_BF_CMP(>=)
#undef SIM_BF_CMP
inline __nv_bfloat16 operator-(const __nv_bfloat16 &a) {
    __nv_bfloat16 r;
    r.__x = (unsigned short)(a.__x ^ 0x8000u);
    return r;
}

struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
    __nv_bfloat162(const __nv_bfloat162 &o) {
        sim_check_align(&o, 4, "__nv_bfloat162 load");
        memcpy((void *)this, sim_launder(&o), 4);
    }
    __nv_bfloat162 &operator=(const __nv_bfloat162 &o) {
        sim_check_align(this, 4, "__nv_bfloat162 store");
        sim_check_align(&o, 4, "__nv_bfloat162 load");
        memcpy((void *)sim_launder(this), sim_launder(&o), 4);
        return *this;
    }
};
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b)); }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(a)); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
inline float __low2float(__nv_bfloat162 v) { return (float)v.x; }
inline float __high2float(__nv_bfloat162 v) { return (float)v.y; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{(float)v.x, (float)v.y}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 b;
    b.__x = u;
    return b;
}
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }

// ================================================================================================
// device math and bit intrinsics

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned int i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int i; memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; memcpy(&i, &d, 8); return i; }
inline int __float2int_rn(float f) { return (int)nearbyintf(f); }
inline int __float2int_rz(float f) { return (int)f; }
inline unsigned int __float2uint_rn(float f) { return (unsigned int)nearbyintf(f); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
    return (x >> 16) | (x << 16);
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
// cache-hinted loads and stores: plain accesses (vector types still check their alignment)
template <class T>
inline T __ldg(const T *p) { return *p; }
template <class T>
inline T __ldcs(const T *p) { return *p; }
template <class T>
inline T __ldcg(const T *p) { return *p; }
template <class T>
inline T __ldca(const T *p) { return *p; }
template <class T>
inline T __ldlu(const T *p) { return *p; }
template <class T>
inline T __ldcv(const T *p) { return *p; }
template <class T>
inline void __stcs(T *p, T v) { *p = v; }
template <class T>
inline void __stcg(T *p, T v) { *p = v; }
template <class T>
inline void __stwb(T *p, T v) { *p = v; }
template <class T>
inline void __stwt(T *p, T v) { *p = v; }
inline size_t __cvta_generic_to_shared(const void *p) { return (size_t)p; }
inline size_t __cvta_generic_to_global(const void *p) { return (size_t)p; }
inline long long clock64() { return (long long)std::chrono::steady_clock::now().time_since_epoch().count(); }

inline void __nanosleep(unsigned) {}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { sim_fail("__trap() called"); }
[[noreturn]] inline void __brkpt() { sim_fail("__brkpt() called"); }

// CUDA's min/max overloads (host code of this project calls them on ints)
#define SIM_MINMAX(T)                                  \
    inline T min(T a, T b) { return a < b ? a : b; } \
    inline T max(T a, T b) { return a > b ? a : b; }
SIM_MINMAX(int)
SIM_MINMAX(unsigned int)
SIM_MINMAX(long)
SIM_MINMAX(unsigned long)
SIM_MINMAX(long long)
SIM_MINMAX(unsigned long long)
#undef SIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }

// atomics (a block's threads never run at the same time; blocks on different workers may)
template <class T>
inline T sim_atomic_rmw(T *p, T v, int op) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    for (;;) {
        T nv = op == 0 ? (T)(old + v) : op == 1 ? (v < old ? v : old) : op == 2 ? (v > old ? v : old) : v;
        if (a.compare_exchange_weak(old, nv)) return old;
    }
}
inline float atomicAdd(float *p, float v) { return sim_atomic_rmw(p, v, 0); }
inline double atomicAdd(double *p, double v) { return sim_atomic_rmw(p, v, 0); }
inline int atomicAdd(int *p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned int atomicAdd(unsigned int *p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline int atomicSub(int *p, int v) { return std::atomic_ref<int>(*p).fetch_sub(v); }
inline int atomicMax(int *p, int v) { return sim_atomic_rmw(p, v, 2); }
inline int atomicMin(int *p, int v) { return sim_atomic_rmw(p, v, 1); }
inline unsigned int atomicMax(unsigned int *p, unsigned int v) { return sim_atomic_rmw(p, v, 2); }
inline unsigned int atomicMin(unsigned int *p, unsigned int v) { return sim_atomic_rmw(p, v, 1); }
inline int atomicExch(int *p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
inline unsigned int atomicExch(unsigned int *p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).exchange(v); }
inline float atomicExch(float *p, float v) { return std::atomic_ref<float>(*p).exchange(v); }
inline int atomicCAS(int *p, int cmp, int v) {
    std::atomic_ref<int>(*p).compare_exchange_strong(cmp, v);
    return cmp;
}
inline unsigned int atomicCAS(unsigned int *p, unsigned int cmp, unsigned int v) {
    std::atomic_ref<unsigned int>(*p).compare_exchange_strong(cmp, v);
    return cmp;
}
inline unsigned long long atomicCAS(unsigned long long *p, unsigned long long cmp, unsigned long long v) {
    std::atomic_ref<unsigned long long>(*p).compare_exchange_strong(cmp, v);
    return cmp;
}

// ================================================================================================
// runtime types and errors

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxBlockDimX = 2,
    cudaDevAttrMaxGridDimX = 5,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrClockRate = 13,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMemoryClockRate = 36,
    cudaDevAttrGlobalMemoryBusWidth = 37,
    cudaDevAttrL2CacheSize = 38,
    cudaDevAttrMaxThreadsPerMultiProcessor = 39,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
// Streams: the default stream is the legacy one (0); a created stream is blocking (ordered with
// it both ways, as the legacy default stream orders them) unless cudaStreamNonBlocking. Launches,
// copies and GEMMs run when issued; what a stream-order model needs to see is the ordering that
// events give between the default stream and a non-blocking one (see SIM_STREAM_ORDER below).
struct CUstream_st {
    bool blocking;
    unsigned long default_seen;  // default-stream operations this stream's later work is ordered after
};
typedef CUstream_st *cudaStream_t;
struct CUevent_st {
    double t;
    cudaStream_t stream;         // where it was last recorded
    unsigned long default_work;  // default-stream operations issued when it was recorded
    unsigned long mark;          // its stream's queued-work mark when recorded
    unsigned long copies;        // asynchronous pinned copies issued when it was recorded
};
typedef CUevent_st *cudaEvent_t;
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem, sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor, totalConstMem, memPitch;
    int regsPerBlock, warpSize, maxThreadsPerBlock, maxThreadsDim[3], maxGridSize[3], clockRate, memoryClockRate, memoryBusWidth;
    int major, minor, multiProcessorCount, l2CacheSize, maxThreadsPerMultiProcessor, regsPerMultiprocessor, concurrentKernels;
    int unifiedAddressing, managedMemory, pciBusID, pciDeviceID, pciDomainID, asyncEngineCount, computeMode;
};

struct cudaFuncAttributes {
    size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
    int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, maxDynamicSharedSizeBytes;
};

// the simulated device: an H100-like sm_90 (the limits a launch is checked against)
#define SIM_DEVICE_NAME "CPU simulator (tests/cuda_sim)"
#define SIM_SMEM_OPTIN (227 * 1024)
#define SIM_SMEM_DEFAULT (48 * 1024)
// the simulated GPU's memory: 80 GiB, or SIM_GPU_MB (a small card, to reach out-of-memory paths
// without touching gigabytes)
inline size_t sim_total_mem() {
    static const size_t total = [] {
        const char *e = getenv("SIM_GPU_MB");
        return e && atol(e) > 0 ? (size_t)atol(e) << 20 : 80ull << 30;
    }();
    return total;
}
#define SIM_TOTAL_MEM sim_total_mem()

inline cudaError_t g_sim_last_error = cudaSuccess;

// Work queued on a stream by code outside this header (nccl_sim.h's collectives). A collective
// queued on the default stream, or on a stream the default stream has since waited for through an
// event, is finished by the next default-stream operation (launch, copy, memset, GEMM), and
// cudaStreamQuery(0) reports cudaErrorNotReady while it cannot finish without waiting, as with a
// real stream that holds a collective whose peers have not arrived. One on a non-blocking stream
// that the default stream does not wait for stays unfinished while the default stream works on
// (its output not yet written), until something orders it: so a missing event shows as a wrong
// result. Whole-device waits (cudaDeviceSynchronize, cudaFree) finish everything.
inline void (*g_sim_queued_finish)(bool all) = nullptr;  // finish what the default stream waits for (all: everything; may block)
inline bool (*g_sim_queued_ready)(bool all) = nullptr;   // whether that would finish without waiting
inline unsigned long (*g_sim_queued_mark)(cudaStream_t) = nullptr;      // a stream's work so far, for an event recorded on it
inline void (*g_sim_queued_join)(cudaStream_t, unsigned long) = nullptr;  // the default stream waits for that work
inline unsigned long g_sim_default_work = 0;  // operations issued to the default stream
// host waits for everything queued on the default stream (a synchronous cudaMemcpy, a stream or
// device synchronize, an event recorded after the last work): what leaves a GPU idle until the
// host queues more (SIM_STATS=1 prints the count)
inline unsigned long g_sim_full_waits = 0;
#define SIM_STREAM_ORDER()                                          \
    do {                                                            \
        if (g_sim_queued_finish) g_sim_queued_finish(false);        \
        g_sim_default_work++;                                       \
    } while (0)
#define SIM_STREAM_SYNC()                                           \
    do {                                                            \
        if (g_sim_queued_finish) g_sim_queued_finish(true);         \
    } while (0)
// whether work issued to stream s now is ordered after everything already issued to the default stream
inline bool sim_stream_after_default(cudaStream_t s) { return !s || s->blocking || s->default_seen == g_sim_default_work; }
// whether the default stream's next operation waits for work issued to s now
inline bool sim_stream_joins_default(cudaStream_t s) { return !s || s->blocking; }
inline int g_sim_quiet = 0;  // tests expecting a rejected launch / cuBLAS call set this: no message
inline std::mutex g_sim_mu;  // allocations, launch errors, statistics

inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInitializationError: return "initialization error";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevicePointer: return "invalid device pointer";
        case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorNotReady: return "device not ready";
        case cudaErrorNoDevice: return "no CUDA-capable device is detected";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
        case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
        case cudaErrorLaunchFailure: return "unspecified launch failure";
    }
    return "unknown error";
}
inline const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        default: return "cudaError";
    }
}
inline cudaError_t sim_set_error(cudaError_t e) {
    if (e != cudaSuccess) {
        std::lock_guard<std::mutex> g(g_sim_mu);
        g_sim_last_error = e;
    }
    return e;
}
inline cudaError_t cudaGetLastError() {
    std::lock_guard<std::mutex> g(g_sim_mu);
    cudaError_t e = g_sim_last_error;
    g_sim_last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() {
    std::lock_guard<std::mutex> g(g_sim_mu);
    return g_sim_last_error;
}

// ================================================================================================
// device memory: guarded mappings, a registry for range checks and fault reports

struct SimAlloc {
    uintptr_t ptr = 0, map_base = 0;
    size_t size = 0, padded = 0, map_len = 0;
    unsigned long long id = 0;
    bool freed = false;
};
inline std::map<uintptr_t, SimAlloc> &sim_allocs() {  // live buffers, keyed by ptr
    static std::map<uintptr_t, SimAlloc> *m = new std::map<uintptr_t, SimAlloc>();
    return *m;
}
inline std::map<uintptr_t, SimAlloc> &sim_freed_allocs() {  // freed ones (their pages stay PROT_NONE)
    static std::map<uintptr_t, SimAlloc> *m = new std::map<uintptr_t, SimAlloc>();
    return *m;
}
inline size_t g_sim_bytes_live = 0;
inline unsigned long long g_sim_alloc_count = 0;
static constexpr unsigned char SIM_GARBAGE = 0xFF;
static constexpr size_t SIM_PAGE = 4096;
// bytes at the start of a new buffer filled with garbage: 256 MB, or SIM_FILL_MB (0: none, so that
// a test can allocate GPU-sized models without touching their memory)
inline size_t sim_fill_limit() {
    static const size_t lim = [] {
        const char *e = getenv("SIM_FILL_MB");
        return (e && *e ? (size_t)atol(e) : 256) << 20;
    }();
    return lim;
}

// the live allocation holding [p, p + n), or null (lock held by the caller)
inline const SimAlloc *sim_find_in(const std::map<uintptr_t, SimAlloc> &m, uintptr_t a) {
    auto it = m.upper_bound(a);
    if (it == m.begin()) return nullptr;
    --it;
    const SimAlloc &al = it->second;
    return a >= al.ptr && a < al.ptr + al.padded ? &al : nullptr;
}
inline const SimAlloc *sim_find_alloc_locked(const void *p, bool include_freed = false) {
    const SimAlloc *al = sim_find_in(sim_allocs(), (uintptr_t)p);
    if (!al && include_freed) al = sim_find_in(sim_freed_allocs(), (uintptr_t)p);
    return al;
}
// the allocation whose mapping (guards included) holds address a (for fault reports)
inline const SimAlloc *sim_find_mapping(uintptr_t a) {
    for (auto *m : {&sim_allocs(), &sim_freed_allocs()})
        for (auto &kv : *m)
            if (a >= kv.second.map_base && a < kv.second.map_base + kv.second.map_len) return &kv.second;
    return nullptr;
}

// Fails unless [p, p + bytes) lies inside one live cudaMalloc buffer.
inline void sim_check_range(const void *p, size_t bytes, const char *what) {
    if (bytes == 0) return;
    std::lock_guard<std::mutex> g(g_sim_mu);
    const SimAlloc *a = sim_find_alloc_locked(p);
    if (!a) {
        const SimAlloc *f = sim_find_alloc_locked(p, true);
        if (f) sim_fail("%s: %p is in freed device buffer #%llu (%zu bytes)", what, p, f->id, f->size);
        sim_fail("%s: %p (%zu bytes) is not device memory from cudaMalloc", what, p, bytes);
    }
    uintptr_t end = (uintptr_t)p + bytes;
    if (end > a->ptr + a->size)
        sim_fail("%s: [%p, +%zu bytes) runs %zu bytes past the end of device buffer #%llu (%zu bytes, offset %zu)", what, p, bytes,
                 (size_t)(end - (a->ptr + a->size)), a->id, a->size, (size_t)((uintptr_t)p - a->ptr));
}
inline bool sim_is_device_ptr(const void *p) {
    std::lock_guard<std::mutex> g(g_sim_mu);
    return sim_find_alloc_locked(p) != nullptr;
}

// canary bytes of a live buffer: [size, padded) after it and the gap before it inside its first page
// the number of bytes of [p, p + n) up to the last one that is not garbage (0: untouched)
inline size_t sim_dirty_extent(const unsigned char *p, size_t n) {
    for (size_t i = n; i > 0; i--)
        if (p[i - 1] != SIM_GARBAGE) return i;
    return 0;
}
inline void sim_check_canary_locked(const SimAlloc &a, const char *when) {
    const unsigned char *t = (const unsigned char *)a.ptr;
    if (size_t e = sim_dirty_extent(t + a.size, a.padded - a.size))
        sim_fail("device buffer #%llu (%zu bytes) was written %zu bytes past its end (found by %s)", a.id, a.size, e, when);
    const unsigned char *lead = (const unsigned char *)(a.map_base + SIM_PAGE);
    for (const unsigned char *q = lead; q < t; q++)
        if (*q != SIM_GARBAGE)
            sim_fail("device buffer #%llu (%zu bytes) was written %zu bytes before its start (found by %s)", a.id, a.size,
                     (size_t)(t - q), when);
}
inline void sim_check_all_tails(const char *when) {  // the bytes after each live buffer's end (cheap)
    std::lock_guard<std::mutex> g(g_sim_mu);
    for (auto &kv : sim_allocs()) {
        const SimAlloc &a = kv.second;
        const unsigned char *t = (const unsigned char *)a.ptr;
        if (size_t e = sim_dirty_extent(t + a.size, a.padded - a.size))
            sim_fail("device buffer #%llu (%zu bytes) was written %zu bytes past its end (found after %s)", a.id, a.size, e, when);
    }
}

inline void sim_install_handlers();

inline cudaError_t cudaMalloc(void **p, size_t size) {
    sim_install_handlers();
    if (!p) return sim_set_error(cudaErrorInvalidValue);
    if (size == 0) { *p = nullptr; return cudaSuccess; }
    std::lock_guard<std::mutex> g(g_sim_mu);
    if (size > SIM_TOTAL_MEM || g_sim_bytes_live + size > SIM_TOTAL_MEM) {
        g_sim_last_error = cudaErrorMemoryAllocation;
        return cudaErrorMemoryAllocation;
    }
    size_t padded = (size + 255) & ~(size_t)255, body = (padded + SIM_PAGE - 1) & ~(SIM_PAGE - 1);
    size_t len = body + 2 * SIM_PAGE;
    void *m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        g_sim_last_error = cudaErrorMemoryAllocation;
        return cudaErrorMemoryAllocation;
    }
    uintptr_t base = (uintptr_t)m;
    if (mprotect((void *)(base + SIM_PAGE), body, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, len);
        g_sim_last_error = cudaErrorMemoryAllocation;
        return cudaErrorMemoryAllocation;
    }
    SimAlloc a;
    a.map_base = base;
    a.map_len = len;
    a.ptr = base + SIM_PAGE + body - padded;  // ends where the guard page starts
    a.size = size;
    a.padded = padded;
    a.id = ++g_sim_alloc_count;
    const size_t fill = sim_fill_limit();
    memset((void *)(base + SIM_PAGE), SIM_GARBAGE, body < fill ? body : fill);
    if (body > fill) memset((void *)(a.ptr + size), SIM_GARBAGE, padded - size);
    sim_allocs()[a.ptr] = a;
    g_sim_bytes_live += size;
    *p = (void *)a.ptr;
    return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMalloc(T **p, size_t size) {
    return cudaMalloc((void **)p, size);
}
inline cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    SIM_STREAM_SYNC();  // (cudaFree waits for the device)
    std::lock_guard<std::mutex> g(g_sim_mu);
    auto &m = sim_allocs();
    auto it = m.find((uintptr_t)p);
    if (it == m.end()) {
        g_sim_last_error = cudaErrorInvalidValue;
        auto f = sim_freed_allocs().find((uintptr_t)p);
        if (f != sim_freed_allocs().end()) sim_fail("cudaFree(%p): device buffer #%llu freed twice", p, f->second.id);
        return cudaErrorInvalidValue;
    }
    SimAlloc a = it->second;
    sim_check_canary_locked(a, "cudaFree");
    madvise((void *)a.map_base, a.map_len, MADV_DONTNEED);
    mprotect((void *)a.map_base, a.map_len, PROT_NONE);
    a.freed = true;
    m.erase(it);
    sim_freed_allocs()[a.ptr] = a;
    g_sim_bytes_live -= a.size;
    return cudaSuccess;
}
// ---- pinned host memory and asynchronous copies
// cudaMallocHost memory is a mapping of its own, in whole pages. An asynchronous copy between it
// and the device is done when issued here, but on a GPU it runs later, and the host may touch its
// host side only once it has waited for it: an event recorded behind it synchronized, its stream
// or the device synchronized, or a synchronous cudaMemcpy (which waits for the default stream).
// Until then the copy's host pages are protected, read-only for the source of a host-to-device
// copy and inaccessible for the destination of a device-to-host one, so that a host that touches
// them too early faults here, with the copy's call site. (Whole pages: a host access to another
// part of a page an unfinished copy uses faults too.) Copies from or to pageable memory are
// staged by CUDA (the call returns once the host side is read or written) and stay plain copies.
struct SimInflightCopy {
    uintptr_t lo, hi;  // the host pages
    int prot;          // PROT_READ (host-to-device source) or PROT_NONE (device-to-host destination)
    cudaStream_t stream;
    unsigned long seq;
    const char *file;
    int line;
};
inline std::map<uintptr_t, size_t> &sim_pinned() {  // base -> mapped length
    static std::map<uintptr_t, size_t> *m = new std::map<uintptr_t, size_t>();
    return *m;
}
inline std::vector<SimInflightCopy> &sim_inflight() {
    static std::vector<SimInflightCopy> *v = new std::vector<SimInflightCopy>();
    return *v;
}
inline unsigned long g_sim_copy_seq = 0;  // asynchronous pinned copies issued so far
inline size_t sim_page() { return (size_t)sysconf(_SC_PAGESIZE); }
// The pinned allocation holding [p, p + n), or 0.
inline uintptr_t sim_pinned_base(const void *p, size_t n) {
    auto &m = sim_pinned();
    auto it = m.upper_bound((uintptr_t)p);
    if (it == m.begin()) return 0;
    --it;
    return (uintptr_t)p + n <= it->first + it->second ? it->first : 0;
}
// Every unfinished copy's protection, the strictest where two share a page.
inline void sim_inflight_protect() {
    for (auto &c : sim_inflight())
        if (c.prot == PROT_READ) mprotect((void *)c.lo, c.hi - c.lo, PROT_READ);
    for (auto &c : sim_inflight())
        if (c.prot == PROT_NONE) mprotect((void *)c.lo, c.hi - c.lo, PROT_NONE);
}
// The copies the host has now waited for: on stream s (all: every stream) issued up to seq.
inline void sim_copies_finish(bool all, cudaStream_t s, unsigned long seq) {
    auto &v = sim_inflight();
    bool any = false;
    for (size_t i = 0; i < v.size();) {
        if (all || (v[i].stream == s && v[i].seq <= seq)) {
            mprotect((void *)v[i].lo, v[i].hi - v[i].lo, PROT_READ | PROT_WRITE);
            v.erase(v.begin() + (long)i);
            any = true;
        } else {
            i++;
        }
    }
    if (any) sim_inflight_protect();
}
inline const SimInflightCopy *sim_inflight_at(uintptr_t a) {
    for (auto &c : sim_inflight())
        if (a >= c.lo && a < c.hi) return &c;
    return nullptr;
}

inline cudaError_t cudaMallocHost(void **p, size_t size) {
    size_t len = (size + sim_page() - 1) / sim_page() * sim_page();
    if (len == 0) len = sim_page();
    void *m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { *p = nullptr; return sim_set_error(cudaErrorMemoryAllocation); }
    sim_pinned()[(uintptr_t)m] = len;
    *p = m;
    return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMallocHost(T **p, size_t size) {
    return cudaMallocHost((void **)p, size);
}
inline cudaError_t cudaHostAlloc(void **p, size_t size, unsigned int) { return cudaMallocHost(p, size); }
inline cudaError_t cudaFreeHost(void *p) {
    if (!p) return cudaSuccess;
    auto it = sim_pinned().find((uintptr_t)p);
    if (it == sim_pinned().end()) sim_fail("cudaFreeHost(%p): not memory from cudaMallocHost", p);
    for (auto &c : sim_inflight())
        if (c.lo < it->first + it->second && c.hi > it->first)
            sim_fail("cudaFreeHost(%p) while the cudaMemcpyAsync issued at %s:%d may still use it: wait for the copy first", p, c.file, c.line);
    munmap(p, it->second);
    sim_pinned().erase(it);
    return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b) {
    std::lock_guard<std::mutex> g(g_sim_mu);
    if (total_b) *total_b = SIM_TOTAL_MEM;
    if (free_b) *free_b = SIM_TOTAL_MEM - g_sim_bytes_live;
    return cudaSuccess;
}

// Checks a copy's pointers against its direction (cudaMemcpyDefault: the pointers'), then copies;
// what names the call in messages.
inline cudaError_t sim_copy(void *dst, const void *src, size_t n, cudaMemcpyKind kind, const char *what) {
    if (n == 0) return cudaSuccess;
    bool dd = sim_is_device_ptr(dst), sd = sim_is_device_ptr(src);
    if (kind == cudaMemcpyDefault) kind = (cudaMemcpyKind)((sd ? 2 : 0) | (dd ? 1 : 0));
    if ((int)kind < 0 || (int)kind > 3) return sim_set_error(cudaErrorInvalidMemcpyDirection);
    const char *dirs[] = {"HostToHost", "HostToDevice", "DeviceToHost", "DeviceToDevice"};
    char name[1200];
    snprintf(name, sizeof(name), "%s %s", what, dirs[kind]);
    bool want_dd = kind & 1, want_sd = kind & 2;
    if (want_dd) sim_check_range(dst, n, name);
    else if (dd) sim_fail("%s: destination %p is device memory", name, dst);
    if (want_sd) sim_check_range(src, n, name);
    else if (sd) sim_fail("%s: source %p is device memory", name, src);
    memmove(dst, src, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    g_sim_full_waits++;
    SIM_STREAM_ORDER();
    sim_copies_finish(false, nullptr, g_sim_copy_seq);  // it waits for the default stream's work
    return sim_copy(dst, src, n, kind, "cudaMemcpy");
}
inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t stream = 0,
                                   const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    SIM_STREAM_ORDER();
    bool dd = sim_is_device_ptr(dst), sd = sim_is_device_ptr(src);
    const void *host = dd && !sd ? src : !dd && sd ? dst : nullptr;  // the host side of a host <-> device copy
    if (n == 0 || !host || !sim_pinned_base(host, n)) return sim_copy(dst, src, n, kind, "cudaMemcpyAsync");
    char what[1100];
    snprintf(what, sizeof(what), "cudaMemcpyAsync at %s:%d", file, line);
    uintptr_t lo = (uintptr_t)host / sim_page() * sim_page(), hi = ((uintptr_t)host + n + sim_page() - 1) / sim_page() * sim_page();
    if (!dd) mprotect((void *)lo, hi - lo, PROT_READ | PROT_WRITE);  // an earlier unfinished copy into these pages
    cudaError_t e = sim_copy(dst, src, n, kind, what);
    if (e != cudaSuccess) return e;
    sim_inflight().push_back({lo, hi, dd ? PROT_READ : PROT_NONE, stream, ++g_sim_copy_seq, file, line});
    sim_inflight_protect();
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy2D(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                                cudaMemcpyKind kind) {
    if (width > dpitch || width > spitch) return sim_set_error(cudaErrorInvalidValue);
    for (size_t r = 0; r < height; r++) {
        cudaError_t e = cudaMemcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width, kind);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void *p, int value, size_t n) {
    SIM_STREAM_ORDER();
    if (n == 0) return cudaSuccess;
    sim_check_range(p, n, "cudaMemset");
    memset(p, value, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t = 0) { return cudaMemset(p, value, n); }

// ================================================================================================
// device, streams, events

inline int g_sim_device = 0;
inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : sim_set_error(cudaErrorInvalidDevice); }
inline cudaError_t cudaGetDevice(int *d) {
    *d = 0;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceReset() { return cudaSuccess; }
// the range a profiler (ncu --profile-from-start off) records: nothing to record here
inline cudaError_t cudaProfilerStart() { return cudaSuccess; }
inline cudaError_t cudaProfilerStop() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
    if (d != 0) return sim_set_error(cudaErrorInvalidDevice);
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "%s", SIM_DEVICE_NAME);
    p->totalGlobalMem = SIM_TOTAL_MEM;
    p->sharedMemPerBlock = SIM_SMEM_DEFAULT;
    p->sharedMemPerBlockOptin = SIM_SMEM_OPTIN;
    p->sharedMemPerMultiprocessor = 228 * 1024;
    p->totalConstMem = 65536;
    p->regsPerBlock = 65536;
    p->regsPerMultiprocessor = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
    p->clockRate = 1980000;
    p->memoryClockRate = 2619000;
    p->memoryBusWidth = 5120;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->l2CacheSize = 50 << 20;
    p->maxThreadsPerMultiProcessor = 2048;
    p->concurrentKernels = 1;
    p->unifiedAddressing = 1;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d) {
    if (d != 0) return sim_set_error(cudaErrorInvalidDevice);
    switch (a) {
        case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
        case cudaDevAttrMaxBlockDimX: *v = 1024; break;
        case cudaDevAttrMaxGridDimX: *v = 2147483647; break;
        case cudaDevAttrMaxSharedMemoryPerBlock: *v = SIM_SMEM_DEFAULT; break;
        case cudaDevAttrWarpSize: *v = 32; break;
        case cudaDevAttrClockRate: *v = 1980000; break;
        case cudaDevAttrMultiProcessorCount: *v = 132; break;
        case cudaDevAttrMemoryClockRate: *v = 2619000; break;
        case cudaDevAttrGlobalMemoryBusWidth: *v = 5120; break;
        case cudaDevAttrL2CacheSize: *v = 50 << 20; break;
        case cudaDevAttrMaxThreadsPerMultiProcessor: *v = 2048; break;
        case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
        case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
        case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = 228 * 1024; break;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = SIM_SMEM_OPTIN; break;
        default: return sim_set_error(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize();
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags) {
    *s = new CUstream_st{!(flags & cudaStreamNonBlocking), 0};
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    delete s;
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    g_sim_full_waits++;
    if (g_sim_queued_finish) g_sim_queued_finish(s != nullptr);
    sim_copies_finish(false, s, g_sim_copy_seq);
    return cudaSuccess;
}
inline cudaError_t cudaStreamQuery(cudaStream_t s) {  // launches are synchronous; queued collectives are not
    if (g_sim_queued_ready && !g_sim_queued_ready(s != nullptr)) return cudaErrorNotReady;
    if (g_sim_queued_finish) g_sim_queued_finish(s != nullptr);
    sim_copies_finish(false, s, g_sim_copy_seq);
    return cudaSuccess;
}
// s's later work waits for what e's stream had when e was recorded
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int = 0) {
    if (!e) return sim_set_error(cudaErrorInvalidResourceHandle);
    if (sim_stream_joins_default(s) && e->stream && g_sim_queued_join) g_sim_queued_join(e->stream, e->mark);
    if (s && !s->blocking && sim_stream_joins_default(e->stream) && e->default_work > s->default_seen) s->default_seen = e->default_work;
    return cudaSuccess;
}
inline double sim_now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
inline cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = new CUevent_st{0.0, nullptr, 0, 0, 0};
    return cudaSuccess;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int) { return cudaEventCreate(e); }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0) {
    if (!e) return sim_set_error(cudaErrorInvalidResourceHandle);
    e->t = sim_now_ms();
    e->stream = s;
    e->default_work = g_sim_default_work;
    e->mark = g_sim_queued_mark ? g_sim_queued_mark(s) : 0;
    e->copies = g_sim_copy_seq;
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (e && sim_stream_joins_default(e->stream) && e->default_work == g_sim_default_work) g_sim_full_waits++;
    if (g_sim_queued_finish) g_sim_queued_finish(e && !sim_stream_joins_default(e->stream));
    if (e) sim_copies_finish(false, e->stream, e->copies);
    return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) {  // done: as cudaEventSynchronize
    if (e) sim_copies_finish(false, e->stream, e->copies);
    return cudaSuccess;
}
inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = (float)(b->t - a->t);
    return cudaSuccess;
}

// per-kernel attributes (dynamic shared memory opt-in), keyed by the kernel's address
inline std::map<const void *, int> &sim_kernel_smem_attr() {
    static std::map<const void *, int> *m = new std::map<const void *, int>();
    return *m;
}
template <class K>
inline cudaError_t cudaFuncSetAttribute(K *kernel, cudaFuncAttribute attr, int value) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || value > SIM_SMEM_OPTIN) return sim_set_error(cudaErrorInvalidValue);
        std::lock_guard<std::mutex> g(g_sim_mu);
        sim_kernel_smem_attr()[(const void *)kernel] = value;
        return cudaSuccess;
    }
    if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
    return sim_set_error(cudaErrorInvalidValue);
}
template <class K>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, K *kernel) {
    memset(a, 0, sizeof(*a));
    a->maxThreadsPerBlock = 1024;
    a->numRegs = 64;
    a->binaryVersion = a->ptxVersion = 90;
    std::lock_guard<std::mutex> g(g_sim_mu);
    auto it = sim_kernel_smem_attr().find((const void *)kernel);
    a->maxDynamicSharedSizeBytes = it == sim_kernel_smem_attr().end() ? SIM_SMEM_DEFAULT : it->second;
    return cudaSuccess;
}
template <class K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *n, K, int block, size_t smem) {
    if (block <= 0 || block > 1024) return sim_set_error(cudaErrorInvalidValue);
    int by_threads = 2048 / block, by_smem = smem ? (int)((228 * 1024) / (smem + 1024)) : 32;
    *n = std::min(32, std::min(by_threads, by_smem));
    return cudaSuccess;
}

// ================================================================================================
// fibers

#if defined(__x86_64__) && !defined(SIM_USE_UCONTEXT)
extern "C" void sim_ctx_switch(void **save_sp, void *new_sp);
asm(R"(
    .text
    .weak sim_ctx_switch
    .type sim_ctx_switch, @function
sim_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sim_ctx_switch, .-sim_ctx_switch
)");
#endif

enum { SIM_F_READY = 0, SIM_F_WAIT_BLOCK = 1, SIM_F_WAIT_WARP = 2, SIM_F_DONE = 3 };

struct SimFiber {
    void *sp;
#ifdef SIM_USE_UCONTEXT
    ucontext_t uc;
#endif
    char *stack;  // assigned when the thread starts, returned when it exits
    unsigned tid;
    uint3 idx;
    int state;
    const char *where;  // the barrier it waits at
};

struct SimWarp {
    unsigned exists;   // lanes that belong to the block
    unsigned alive;    // lanes that have not exited
    unsigned arrived;  // lanes waiting at the pending collective
    unsigned mask;     // its mask
    int kind;
    const char *name;
    unsigned gen;
    unsigned part[2];  // participants of the last two collectives (by generation parity)
    uint64_t val[2][32];
};

// one kernel launch, shared by the workers
struct SimJob {
    const char *name, *file;
    int line;
    dim3 grid, block;
    size_t smem;
    void (*thunk)(const void *);
    const void *args;
    unsigned long long nblocks;
    std::atomic<unsigned long long> next{0};
    std::vector<unsigned long long> order;  // block permutation (random mode), else empty
};

struct SimStats {
    unsigned long long launches = 0, blocks = 0, threads = 0;
    std::atomic<unsigned long long> switches{0};
};
inline SimStats g_sim_stats;

inline size_t sim_stack_bytes() {
    static size_t s = (size_t)sim_env_int("SIM_STACK_KB", 512) * 1024;
    return s;
}

struct SimWorker {
    std::vector<char *> free_stacks;  // LIFO: a barrier-free kernel runs its threads on the same two (hot) stacks
    char *pending_stack = nullptr;    // of the thread that just exited: freed once it is switched away from
    unsigned nstacks = 0;
    std::vector<SimFiber> fibers;
    std::vector<SimWarp> warps;
    // runnable threads: a ring (a thread is in it at most once); a released warp goes to the front,
    // so that it runs its next collectives with its 32 stacks hot, a released block to the back
    std::vector<unsigned> runq;
    size_t rq_head = 0, rq_count = 0, rq_mask = 0;
    unsigned nthreads = 0, alive = 0, block_arrived = 0, block_gen = 0;
    int block_acc[2] = {0, 0}, block_part[2] = {0, 0};  // __syncthreads_count/and/or, by generation parity
    void *sched_sp = nullptr;
#ifdef SIM_USE_UCONTEXT
    ucontext_t sched_uc;
#endif
    SimFiber *cur = nullptr;
    const SimJob *job = nullptr;
    uint3 block = {0, 0, 0};
    bool random = false;
    std::mt19937_64 rng;
    char *altstack = nullptr;
    unsigned long long switches = 0;
};

inline bool g_sim_random = sim_env_int("SIM_SERIAL", 0) != 0;
inline unsigned long long g_sim_seed = (unsigned long long)sim_env_int("SIM_SEED", 1);
inline void sim_set_random_order(int on, unsigned long long seed = 1) {
    g_sim_random = on != 0;
    g_sim_seed = seed;
}

inline SimWorker *sim_worker() {
    if (!t_sim_w) {
        t_sim_w = new SimWorker();
        // an alternate signal stack, so that a fiber stack overflow can still be reported
        t_sim_w->altstack = (char *)malloc(1 << 16);
        stack_t ss;
        memset(&ss, 0, sizeof(ss));
        ss.ss_sp = t_sim_w->altstack;
        ss.ss_size = 1 << 16;
        sigaltstack(&ss, nullptr);
    }
    return t_sim_w;
}

inline char *sim_new_stack(unsigned index) {
    size_t sz = sim_stack_bytes();
    char *m = (char *)mmap(nullptr, sz + SIM_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) sim_fail("cannot map a %zu KB fiber stack", sz / 1024);
    mprotect(m, SIM_PAGE, PROT_NONE);  // overflow guard
    (void)index;
    return m + SIM_PAGE;
}
inline std::vector<std::pair<uintptr_t, uintptr_t>> &sim_stack_guards() {  // for fault reports
    static auto *v = new std::vector<std::pair<uintptr_t, uintptr_t>>();
    return *v;
}

inline void sim_init_fiber(SimWorker *w, SimFiber &f);

// The next thread to run (FIFO, or random in SIM_SERIAL mode), its stack assigned on its first
// run; null when none is runnable.
inline SimFiber *sim_pick_next(SimWorker *w) {
    if (w->rq_count == 0) return nullptr;
    if (w->random) {
        size_t k = (w->rq_head + (size_t)(w->rng() % w->rq_count)) & w->rq_mask;
        std::swap(w->runq[w->rq_head], w->runq[k]);
    }
    unsigned t = w->runq[w->rq_head];
    w->rq_head = (w->rq_head + 1) & w->rq_mask;
    w->rq_count--;
    SimFiber *f = &w->fibers[t];
    if (!f->stack) {  // first run: a stack from the pool (never the one an exiting thread still runs on)
        if (w->free_stacks.empty()) {
            char *st = sim_new_stack(w->nstacks++);
            w->free_stacks.push_back(st);
            std::lock_guard<std::mutex> g(g_sim_mu);
            sim_stack_guards().push_back({(uintptr_t)st - SIM_PAGE, (uintptr_t)st});
        }
        f->stack = w->free_stacks.back();
        w->free_stacks.pop_back();
        sim_init_fiber(w, *f);
    }
    return f;
}
// after every switch: the stack of a thread that exited can now be reused
inline void sim_after_switch(SimWorker *w) {
    if (w->pending_stack) {
        w->free_stacks.push_back(w->pending_stack);
        w->pending_stack = nullptr;
    }
#ifdef SIM_DEBUG
    for (size_t i = 0; i < w->free_stacks.size(); i++) {
        for (size_t j = i + 1; j < w->free_stacks.size(); j++)
            if (w->free_stacks[i] == w->free_stacks[j]) sim_fail("internal: stack freed twice");
        for (unsigned t = 0; t < w->nthreads; t++)
            if (w->fibers[t].stack == w->free_stacks[i]) sim_fail("internal: live stack of thread %u is free (state %d)", t, w->fibers[t].state);
    }
#endif
}
// The current thread has set its state (waiting, or exited): run the next runnable thread, or
// return to the scheduler when there is none. Returns when this thread is resumed.
inline void sim_yield(SimWorker *w) {
    SimFiber *from = w->cur;
    if (from->state == SIM_F_DONE) {
        w->pending_stack = from->stack;
        from->stack = nullptr;
    }
    SimFiber *to = sim_pick_next(w);
    if (to == from) return;  // this thread released the barrier it waited at and runs on
    w->switches++;
#ifdef SIM_DEBUG
    if (to) {
        uintptr_t sp = (uintptr_t)to->sp, lo = (uintptr_t)to->stack, hi = lo + sim_stack_bytes();
        if (sp < lo || sp >= hi) sim_fail("internal: thread %u's saved sp %p outside its stack [%p, %p)", to->tid, to->sp, (void *)lo, (void *)hi);
        if (((void **)to->sp)[6] == nullptr) sim_fail("internal: thread %u (state %d) would return to null", to->tid, to->state);
    }
#endif
    if (to) {
        w->cur = to;
        threadIdx = to->idx;
#ifdef SIM_USE_UCONTEXT
        swapcontext(&from->uc, &to->uc);
#else
        sim_ctx_switch(&from->sp, to->sp);
#endif
    } else {
#ifdef SIM_USE_UCONTEXT
        swapcontext(&from->uc, &w->sched_uc);
#else
        sim_ctx_switch(&from->sp, w->sched_sp);
#endif
    }
    sim_after_switch(w);
}

inline void sim_make_ready(SimWorker *w, unsigned tid) {  // at the back
    w->fibers[tid].state = SIM_F_READY;
    w->runq[(w->rq_head + w->rq_count++) & w->rq_mask] = tid;
}
inline void sim_make_ready_front(SimWorker *w, unsigned tid) {
    w->fibers[tid].state = SIM_F_READY;
    w->rq_head = (w->rq_head - 1) & w->rq_mask;
    w->runq[w->rq_head] = tid;
    w->rq_count++;
}

inline void sim_release_block(SimWorker *w) {
    w->block_arrived = 0;
    w->block_gen++;
    w->block_acc[w->block_gen & 1] = 0;
    w->block_part[w->block_gen & 1] = 0;
    for (unsigned t = 0; t < w->nthreads; t++)
        if (w->fibers[t].state == SIM_F_WAIT_BLOCK) sim_make_ready(w, t);
}

inline void sim_try_release_warp(SimWorker *w, SimWarp &wp, unsigned warp_index) {
    if (!wp.arrived) return;
    unsigned need = wp.mask & wp.alive;
    if ((wp.arrived & need) != need) return;
    unsigned par = wp.gen & 1;
    wp.part[par] = wp.arrived;
    wp.gen++;
    unsigned a = wp.arrived;
    wp.arrived = 0;
    for (unsigned l = 32; l-- > 0;)  // lanes in order at the front
        if (a >> l & 1) sim_make_ready_front(w, warp_index * 32 + l);
}

inline void sim_describe_context(char *buf, size_t cap) {
    SimWorker *w = t_sim_w;
    if (w && w->job && w->cur) {
        snprintf(buf, cap, "in kernel %s (launched at %s:%d) grid (%u,%u,%u) block (%u,%u,%u): blockIdx (%u,%u,%u) threadIdx (%u,%u,%u)",
                 w->job->name, w->job->file, w->job->line, w->job->grid.x, w->job->grid.y, w->job->grid.z, w->job->block.x,
                 w->job->block.y, w->job->block.z, w->block.x, w->block.y, w->block.z, w->cur->idx.x, w->cur->idx.y, w->cur->idx.z);
    } else if (w && w->job) {
        snprintf(buf, cap, "in kernel %s (launched at %s:%d), blockIdx (%u,%u,%u), between threads", w->job->name, w->job->file,
                 w->job->line, w->block.x, w->block.y, w->block.z);
    } else if (t_sim_host_op) {
        snprintf(buf, cap, "in %s (host side)", t_sim_host_op);
    } else {
        snprintf(buf, cap, "in host code");
    }
}

inline SimWorker *sim_in_kernel(const char *what) {
    SimWorker *w = t_sim_w;
    if (!w || !w->cur) sim_fail("%s called outside a kernel", what);
    return w;
}

// ------------------------------------------------------------------------------------------------
// barriers

inline void __syncthreads() {
    SimWorker *w = sim_in_kernel("__syncthreads");
    SimFiber *f = w->cur;
    f->state = SIM_F_WAIT_BLOCK;
    f->where = "__syncthreads";
    w->block_arrived++;
    if (w->block_arrived == w->alive) sim_release_block(w);
    sim_yield(w);
}
inline int sim_syncthreads_reduce(int pred) {  // returns the number of true predicates; participants in *n
    SimWorker *w = sim_in_kernel("__syncthreads_count/and/or");
    unsigned par = w->block_gen & 1;
    w->block_acc[par] += pred != 0;
    w->block_part[par] += 1;
    __syncthreads();
    return w->block_acc[par];
}
inline int __syncthreads_count(int pred) { return sim_syncthreads_reduce(pred); }
inline int __syncthreads_and(int pred) {
    SimWorker *w = sim_in_kernel("__syncthreads_and");
    unsigned par = w->block_gen & 1;
    int t = sim_syncthreads_reduce(pred);
    return t == w->block_part[par];
}
inline int __syncthreads_or(int pred) { return sim_syncthreads_reduce(pred) > 0; }

// A warp collective: this lane deposits `val` and waits for every live lane of `mask`. Returns
// the generation parity under which the values of the participants can be read.
inline unsigned sim_warp_collective(int kind, const char *name, unsigned mask, uint64_t val) {
    SimWorker *w = sim_in_kernel(name);
    SimFiber *f = w->cur;
    unsigned wi = f->tid / 32, lane = f->tid % 32;
    SimWarp &wp = w->warps[wi];
    if (!(mask >> lane & 1)) sim_fail("%s: lane %u calls it with mask 0x%08x, which does not include itself", name, lane, mask);
    if (wp.arrived == 0) {
        wp.mask = mask;
        wp.kind = kind;
        wp.name = name;
    } else if (wp.mask != mask || wp.kind != kind) {
        sim_fail("warp %u: lane %u is at %s (mask 0x%08x) while lanes 0x%08x wait at %s (mask 0x%08x): lanes of a warp must meet "
                 "at the same collective with the same mask",
                 wi, lane, name, mask, wp.arrived, wp.name, wp.mask);
    }
    unsigned par = wp.gen & 1;
    wp.val[par][lane] = val;
    wp.arrived |= 1u << lane;
    f->state = SIM_F_WAIT_WARP;
    f->where = name;
    sim_try_release_warp(w, wp, wi);
    sim_yield(w);
    return par;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { sim_warp_collective(1, "__syncwarp", mask, 0); }

template <class T>
inline uint64_t sim_to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type larger than 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
inline T sim_from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}
// mode 0 idx, 1 up, 2 down, 3 xor
template <class T>
inline T sim_shfl(int mode, const char *name, unsigned mask, T v, int arg, int width) {
    if (width <= 0 || width > 32 || (width & (width - 1))) sim_fail("%s: width %d is not a power of two <= 32", name, width);
    unsigned par = sim_warp_collective(2, name, mask, sim_to_bits(v));
    SimWorker *w = t_sim_w;
    unsigned lane = w->cur->tid % 32, wi = w->cur->tid / 32, seg = lane & ~(unsigned)(width - 1);
    int src;
    switch (mode) {
        case 0: src = (int)seg + (arg & (width - 1)); break;
        case 1: src = (int)lane - arg; if (src < (int)seg) src = (int)lane; break;
        case 2: src = (int)lane + arg; if (src >= (int)seg + width) src = (int)lane; break;
        default: src = (int)(lane ^ (unsigned)arg); if (src >= (int)seg + width) src = (int)lane; break;
    }
    const SimWarp &wp = w->warps[wi];
    if (src < 0 || src > 31 || !(wp.part[par] >> src & 1))
        sim_fail("%s: lane %u reads lane %d, which did not take part (participants 0x%08x): undefined value", name, lane, src,
                 wp.part[par]);
    return sim_from_bits<T>(wp.val[par][src]);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return sim_shfl(0, "__shfl_sync", mask, v, src, width); }
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) { return sim_shfl(1, "__shfl_up_sync", mask, v, (int)d, width); }
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return sim_shfl(2, "__shfl_down_sync", mask, v, (int)d, width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) { return sim_shfl(3, "__shfl_xor_sync", mask, v, m, width); }

inline unsigned sim_vote(const char *name, unsigned mask, int pred) {
    unsigned par = sim_warp_collective(3, name, mask, pred != 0);
    SimWorker *w = t_sim_w;
    const SimWarp &wp = w->warps[w->cur->tid / 32];
    unsigned r = 0;
    for (unsigned l = 0; l < 32; l++)
        if ((wp.part[par] >> l & 1) && wp.val[par][l]) r |= 1u << l;
    return r;
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return sim_vote("__ballot_sync", mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return sim_vote("__any_sync", mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    unsigned par = sim_warp_collective(3, "__all_sync", mask, pred != 0);
    SimWorker *w = t_sim_w;
    const SimWarp &wp = w->warps[w->cur->tid / 32];
    for (unsigned l = 0; l < 32; l++)
        if ((wp.part[par] >> l & 1) && !wp.val[par][l]) return 0;
    return 1;
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) {
    unsigned par = sim_warp_collective(4, "__match_any_sync", mask, sim_to_bits(v));
    SimWorker *w = t_sim_w;
    unsigned lane = w->cur->tid % 32;
    const SimWarp &wp = w->warps[w->cur->tid / 32];
    unsigned r = 0;
    for (unsigned l = 0; l < 32; l++)
        if ((wp.part[par] >> l & 1) && wp.val[par][l] == wp.val[par][lane]) r |= 1u << l;
    return r;
}

// ------------------------------------------------------------------------------------------------
// the raw tensor-core instructions of cuda/mma.cuh (ldmatrix, mma.sync m16n8k16 bf16), emulated
// from the register layouts that header documents: each lane posts a pointer (its row address,
// or its operand registers), every lane of the warp must take part, each lane reads what its
// registers hold from the others', and a second meeting keeps any lane from going on (and
// overwriting what it posted, or shared memory another lane has not read yet) before all have read.
// The layouts were read from the PTX ISA's tables, and checked on 2026-12-06 against a second
// source, CUTLASS's SM80 16x8x16 traits (cute's (thread, value) -> column-major index layouts:
// A ((4,8),(2,2,2)):((32,1),(16,8,128)) on 16x16, B ((4,8),(2,2)):((16,1),(8,64)) on 8x16 (n, k),
// C ((4,8),(2,2)):((32,1),(16,8)) on 16x8), which give the lane, register and half used below.

// out[l] = what lane l posted; all 32 lanes must meet here
inline void sim_warp_all(const char *name, uint64_t v, uint64_t out[32]) {
    unsigned par = sim_warp_collective(5, name, 0xffffffffu, v);
    const SimWarp &wp = t_sim_w->warps[t_sim_w->cur->tid / 32];
    if (wp.part[par] != 0xffffffffu) sim_fail("%s: only lanes 0x%08x took part: every lane of the warp must execute it", name, wp.part[par]);
    for (int l = 0; l < 32; l++) out[l] = wp.val[par][l];
}
inline float sim_bf16_half(uint32_t w, int hi) {
    const uint32_t u = (hi ? w >> 16 : w & 0xFFFFu) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline void sim_ldmatrix_x4(uint32_t r[4], const void *p, int trans) {
    const char *name = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    if ((uintptr_t)p % 16) sim_fail("%s: lane %d's row address %p is not 16-byte aligned", name, t_sim_w->cur->tid % 32, p);
    uint64_t rows[32];
    sim_warp_all(name, (uint64_t)(uintptr_t)p, rows);
    const int lane = t_sim_w->cur->tid % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; i++) {
        uint16_t lo, hi;
        if (!trans) {  // row g, columns 2t, 2t + 1 of matrix i
            const uint16_t *row = (const uint16_t *)(uintptr_t)rows[i * 8 + g];
            lo = row[2 * t];
            hi = row[2 * t + 1];
        } else {  // column g, rows 2t, 2t + 1
            lo = ((const uint16_t *)(uintptr_t)rows[i * 8 + 2 * t])[g];
            hi = ((const uint16_t *)(uintptr_t)rows[i * 8 + 2 * t + 1])[g];
        }
        r[i] = (uint32_t)lo | (uint32_t)hi << 16;
    }
    __syncwarp();
}
struct SimMmaOperands {
    uint32_t a[4], b[2];
};
inline void sim_mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    const SimMmaOperands mine = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
    uint64_t in[32];
    sim_warp_all("mma.m16n8k16", (uint64_t)(uintptr_t)&mine, in);
    const int lane = t_sim_w->cur->tid % 32, g = lane / 4, t = lane % 4;
    auto op = [&](int l) { return (const SimMmaOperands *)(uintptr_t)in[l]; };
    // A[row][k] is in lane (row % 8)·4 + (k % 8)/2, register (row >= 8) + 2 (k >= 8), half k % 2;
    // B[k][n] in lane n·4 + (k % 8)/2, register k >= 8, half k % 2
    float out[4];
    for (int q = 0; q < 4; q++) {
        const int row = g + (q >= 2 ? 8 : 0), col = 2 * t + q % 2;
        float acc = d[q];
        for (int k = 0; k < 16; k++) {
            const float av = sim_bf16_half(op((row % 8) * 4 + (k % 8) / 2)->a[(row >= 8) + 2 * (k >= 8)], k % 2);
            const float bv = sim_bf16_half(op(col * 4 + (k % 8) / 2)->b[k >= 8], k % 2);
            acc += av * bv;
        }
        out[q] = acc;
    }
    __syncwarp();
    for (int q = 0; q < 4; q++) d[q] = out[q];
}

inline unsigned __activemask() {
    SimWorker *w = sim_in_kernel("__activemask");
    return w->warps[w->cur->tid / 32].alive;
}
inline unsigned __lanemask_lt() {
    SimWorker *w = sim_in_kernel("__lanemask_lt");
    return (1u << (w->cur->tid % 32)) - 1u;
}

// ------------------------------------------------------------------------------------------------
// dynamic shared memory: the per-worker arrays simify.py defines for every `extern __shared__`
// name (all of them alias the launch's dynamic shared memory)

#define SIM_DYN_SMEM_ARRAY (SIM_SMEM_OPTIN + 2 * 4096)
struct SimDynSmem {
    unsigned char *(*addr)();
    const char *name;
};
inline std::vector<SimDynSmem> &sim_dyn_smem_regs() {
    static std::vector<SimDynSmem> *v = new std::vector<SimDynSmem>();
    return *v;
}
inline bool sim_register_dyn_smem(unsigned char *(*addr)(), const char *name) {
    sim_dyn_smem_regs().push_back(SimDynSmem{addr, name});
    return true;
}
// `extern thread_local T name[]` inside a function makes g++ call the variable's TLS init
// function _ZTH<len><name> (a weak reference it never defines here): define it as a no-op (and
// silence -Waddress about the check g++ makes on its address before calling it).
#pragma GCC diagnostic ignored "-Waddress"
#define SIM_EXTERN_SHARED(T, name, tls_init)                                                                \
    alignas(4096) thread_local T name[SIM_DYN_SMEM_ARRAY / sizeof(T)];                                       \
    extern "C" __attribute__((weak)) void tls_init() {}                                                      \
    static const bool sim_dyn_smem_reg_##name = sim_register_dyn_smem([]() { return (unsigned char *)name; }, #name);

// Per worker and array: where its PROT_NONE guard page is now (byte offset; -1: none). The guard
// moves only when a launch's byte count needs it elsewhere (mprotect is costly).
inline thread_local std::vector<long> t_sim_smem_guard;
inline void sim_smem_begin_block(size_t smem) {
    size_t guard_at = (smem + SIM_PAGE - 1) & ~(SIM_PAGE - 1);
    auto &regs = sim_dyn_smem_regs();
    if (t_sim_smem_guard.size() < regs.size()) t_sim_smem_guard.resize(regs.size(), -1);
    for (size_t i = 0; i < regs.size(); i++) {
        unsigned char *p = regs[i].addr();
        if ((uintptr_t)p % SIM_PAGE == 0 && t_sim_smem_guard[i] != (long)guard_at) {
            if (t_sim_smem_guard[i] >= 0) mprotect(p + t_sim_smem_guard[i], SIM_PAGE, PROT_READ | PROT_WRITE);
            mprotect(p + guard_at, SIM_PAGE, PROT_NONE);
            t_sim_smem_guard[i] = (long)guard_at;
        }
        memset(p, SIM_GARBAGE, guard_at);
    }
}
inline void sim_smem_end_block(size_t smem) {
    size_t guard_at = (smem + SIM_PAGE - 1) & ~(SIM_PAGE - 1);
    for (auto &r : sim_dyn_smem_regs()) {
        unsigned char *p = r.addr();
        if (size_t e = sim_dirty_extent(p + smem, guard_at - smem))
            sim_fail("dynamic shared memory (%s) written %zu bytes past the %zu bytes of the launch", r.name, e, smem);
    }
}

// ------------------------------------------------------------------------------------------------
// running blocks

extern "C" inline void sim_fiber_entry() {
    SimWorker *w = t_sim_w;
    sim_after_switch(w);
    w->job->thunk(w->job->args);
    // the thread exits: it no longer counts for barriers
    SimFiber *f = w->cur;
    f->state = SIM_F_DONE;
    f->where = "exit";
    w->alive--;
    unsigned wi = f->tid / 32;
    SimWarp &wp = w->warps[wi];
    wp.alive &= ~(1u << (f->tid % 32));
    sim_try_release_warp(w, wp, wi);
    if (w->block_arrived && w->block_arrived == w->alive) sim_release_block(w);
    sim_yield(w);
    sim_fail("internal: an exited fiber was resumed");
}

inline void sim_init_fiber(SimWorker *w, SimFiber &f) {
#ifdef SIM_USE_UCONTEXT
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = sim_stack_bytes() - 64;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, (void (*)())sim_fiber_entry, 0);
    (void)w;
#else
    (void)w;
    // the stack's top is staggered by a hash of its address, so that the hot top lines
    // of many stacks do not all map to the same cache sets
    uintptr_t top = ((uintptr_t)f.stack + sim_stack_bytes() - 64 - ((uintptr_t)f.stack >> 12) % 61 * 64) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;                     // fake return address of sim_fiber_entry
    *--sp = (void *)&sim_fiber_entry;    // where sim_ctx_switch returns to
    for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    f.sp = sp;
#endif
}

inline void sim_deadlock(SimWorker *w) {
    char buf[4096];
    size_t n = 0;
    int shown = 0;
    for (unsigned t = 0; t < w->nthreads && shown < 12; t++) {
        const SimFiber &f = w->fibers[t];
        if (f.state == SIM_F_DONE) continue;
        n += snprintf(buf + n, sizeof(buf) - n, "\n    thread %u (lane %u of warp %u) waits at %s", t, t % 32, t / 32, f.where);
        shown++;
        if (n >= sizeof(buf)) break;
    }
    w->cur = nullptr;
    sim_fail("deadlock: %u of %u threads can never leave their barrier (%u at __syncthreads; a warp collective waits for every live "
             "lane of its mask):%s",
             w->alive, w->nthreads, w->block_arrived, buf);
}

// Static __shared__ arrays are thread_local here, so a block would find the values the worker's
// previous block left in them. simify.py puts SIM_SHARED_POISON(name) after each declaration: the
// first thread of a block to reach it (before any thread of the block can have written the array)
// fills the array with garbage, as dynamic shared memory is at every block start, so that a read
// before the block's own write gives NaN (or -1) instead of a plausible stale value.
inline thread_local unsigned long long t_sim_block_serial = 0;  // this worker's blocks, counted
#define SIM_SHARED_POISON(name)                                                             \
    do {                                                                                    \
        static thread_local unsigned long long sim_poisoned_in = 0;                         \
        if (sim_poisoned_in != t_sim_block_serial) {                                        \
            sim_poisoned_in = t_sim_block_serial;                                           \
            memset((void *)&(name), SIM_GARBAGE, sizeof(name));                             \
        }                                                                                   \
    } while (0)

inline void sim_run_block(SimWorker *w, const SimJob &job, unsigned long long lin) {
    w->job = &job;
    t_sim_block_serial++;
    unsigned long long gx = job.grid.x, gy = job.grid.y;
    w->block = uint3{(unsigned)(lin % gx), (unsigned)((lin / gx) % gy), (unsigned)(lin / (gx * gy))};
    blockIdx = w->block;
    blockDim = job.block;
    gridDim = job.grid;
    unsigned n = job.block.x * job.block.y * job.block.z;
    w->nthreads = n;
    if (w->fibers.size() < n) w->fibers.resize(n);
    unsigned nw = (n + 31) / 32;
    if (w->warps.size() < nw) w->warps.resize(nw);
    for (unsigned i = 0; i < nw; i++) {
        SimWarp &wp = w->warps[i];
        unsigned lanes = std::min(32u, n - i * 32);
        wp.exists = wp.alive = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        wp.arrived = 0;
        wp.gen = 0;
        wp.part[0] = wp.part[1] = 0;
    }
    size_t cap = 1;
    while (cap < n) cap <<= 1;
    if (w->runq.size() < cap) w->runq.resize(cap);
    w->rq_mask = cap - 1;
    w->rq_head = 0;
    w->rq_count = 0;
    for (unsigned t = 0; t < n; t++) {
        SimFiber &f = w->fibers[t];
        f.stack = nullptr;
        f.tid = t;
        f.idx = uint3{t % job.block.x, (t / job.block.x) % job.block.y, t / (job.block.x * job.block.y)};
        f.state = SIM_F_READY;
        f.where = "start";
        sim_make_ready(w, t);
    }
    w->alive = n;
    w->block_arrived = 0;
    w->block_gen = 0;
    w->block_acc[0] = w->block_acc[1] = w->block_part[0] = w->block_part[1] = 0;
    sim_smem_begin_block(job.smem);
    while (SimFiber *f = sim_pick_next(w)) {
        w->cur = f;
        threadIdx = f->idx;
#ifdef SIM_USE_UCONTEXT
        swapcontext(&w->sched_uc, &f->uc);
#else
        sim_ctx_switch(&w->sched_sp, f->sp);
#endif
        sim_after_switch(w);
    }
    w->cur = nullptr;
    if (w->alive) sim_deadlock(w);
    sim_smem_end_block(job.smem);
    w->job = nullptr;
    g_sim_stats.switches += w->switches;
    w->switches = 0;
}

// worker pool: blocks of one launch are spread over SIM_THREADS OS threads
struct SimPool {
    std::mutex m;
    std::condition_variable cv, done_cv;
    SimJob *job = nullptr;
    unsigned long long epoch = 0;
    int busy = 0;
    int nworkers = 0;
};
inline SimPool &sim_pool() {
    static SimPool *p = new SimPool();
    return *p;
}
inline int sim_num_threads() {
    static int n = [] {
        int v = sim_env_int("SIM_THREADS", 0);
        if (v <= 0) {
            unsigned hc = std::thread::hardware_concurrency();
            v = hc >= 2 ? 2 : 1;
        }
        return v > 64 ? 64 : v;
    }();
    return n;
}
inline void sim_work(SimJob *job) {
    SimWorker *w = sim_worker();
    w->random = g_sim_random;
    for (;;) {
        unsigned long long b = job->next.fetch_add(1);
        if (b >= job->nblocks) break;
        sim_run_block(w, *job, job->order.empty() ? b : job->order[b]);
    }
}
inline void sim_pool_start() {
    SimPool &p = sim_pool();
    if (p.nworkers) return;
    p.nworkers = sim_num_threads() - 1;
    for (int i = 0; i < p.nworkers; i++) {
        std::thread([&p] {
            unsigned long long seen = 0;
            for (;;) {
                SimJob *job;
                {
                    std::unique_lock<std::mutex> g(p.m);
                    p.cv.wait(g, [&] { return p.epoch != seen; });
                    seen = p.epoch;
                    job = p.job;
                }
                sim_work(job);
                {
                    std::lock_guard<std::mutex> g(p.m);
                    if (--p.busy == 0) p.done_cv.notify_all();
                }
            }
        }).detach();
    }
}


// SIM_PROFILE=1: wall time per kernel name, printed at exit
struct SimProfile {
    std::map<std::string, std::pair<unsigned long long, double>> by_name;
};
inline SimProfile &sim_profile() {
    static SimProfile *p = new SimProfile();
    return *p;
}
inline bool g_sim_profile = sim_env_int("SIM_PROFILE", 0) != 0;
inline void sim_profile_add(const char *name, double sec) {
    std::lock_guard<std::mutex> g(g_sim_mu);
    auto &e = sim_profile().by_name[name];
    e.first++;
    e.second += sec;
}
inline void sim_profile_print() {
    std::vector<std::pair<double, std::string>> v;
    double tot = 0;
    for (auto &kv : sim_profile().by_name) {
        v.push_back({kv.second.second, kv.first});
        tot += kv.second.second;
    }
    std::sort(v.rbegin(), v.rend());
    unsigned long long calls = 0;
    for (auto &kv : sim_profile().by_name) calls += kv.second.first;
    fprintf(stderr, "cuda_sim profile: %.2f s in %llu launches and cuBLAS calls\n", tot, calls);
    const size_t show = sim_env_int("SIM_PROFILE", 0) >= 2 ? v.size() : 25;
    for (size_t i = 0; i < v.size() && i < show; i++)
        fprintf(stderr, "  %8.3f s %6llu x  %s\n", v[i].first, sim_profile().by_name[v[i].second].first, v[i].second.c_str());
}
struct SimProfileScope {
    const char *name;
    double t0;
    explicit SimProfileScope(const char *n) : name(n), t0(g_sim_profile ? sim_now_ms() : 0) {}
    ~SimProfileScope() {
        if (g_sim_profile) sim_profile_add(name, (sim_now_ms() - t0) / 1000.0);
    }
};

inline void sim_run_job(SimJob &job) {
    sim_install_handlers();
    SimProfileScope prof(job.name);
    unsigned long long nthreads = (unsigned long long)job.block.x * job.block.y * job.block.z;
    {
        std::lock_guard<std::mutex> g(g_sim_mu);
        g_sim_stats.launches++;
        g_sim_stats.blocks += job.nblocks;
        g_sim_stats.threads += job.nblocks * nthreads;
    }
    if (g_sim_random) {  // random block order, one worker
        job.order.resize(job.nblocks);
        for (unsigned long long i = 0; i < job.nblocks; i++) job.order[i] = i;
        std::mt19937_64 r(g_sim_seed * 0x9E3779B97F4A7C15ull + g_sim_stats.launches);
        std::shuffle(job.order.begin(), job.order.end(), r);
        sim_worker()->rng.seed(r());
        sim_work(&job);
    } else if (sim_num_threads() == 1 || job.nblocks == 1 || job.nblocks * nthreads < 16384) {  // small: not worth a hand-off
        sim_work(&job);
    } else {
        sim_pool_start();
        SimPool &p = sim_pool();
        {
            std::lock_guard<std::mutex> g(p.m);
            p.job = &job;
            p.busy = p.nworkers;
            p.epoch++;
        }
        p.cv.notify_all();
        sim_work(&job);
        std::unique_lock<std::mutex> g(p.m);
        p.done_cv.wait(g, [&] { return p.busy == 0; });
    }
    sim_check_all_tails(job.name);
}

// ------------------------------------------------------------------------------------------------
// launches: sim_launch(kernel, sim_cfg(grid, block[, smem[, stream]]).at(name, file, line), args...)

struct SimCfg {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    const char *name = "kernel", *file = "?";
    int line = 0;
    SimCfg at(const char *n, const char *f, int l) const {
        SimCfg c = *this;
        c.name = n;
        c.file = f;
        c.line = l;
        return c;
    }
};
inline SimCfg sim_cfg(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = 0) { return SimCfg{grid, block, smem, stream}; }

template <class P, class A>
inline P sim_arg(A &&a) {
    if constexpr (std::is_pointer_v<P> && std::is_integral_v<std::decay_t<A>>) {  // NULL
        if (a != 0) sim_fail("kernel argument: integer %lld passed for a pointer parameter", (long long)a);
        return nullptr;
    } else {
        P p = std::forward<A>(a);
        return p;
    }
}
template <class D>
inline void sim_thunk(const void *p) {
    const D *d = (const D *)p;
    std::apply(d->k, d->args);
}

// validates the configuration as the CUDA runtime does; false (and the launch error set) if rejected
inline bool sim_launch_ok(const void *kernel, const SimCfg &c) {
    const char *why = nullptr;
    cudaError_t err = cudaErrorInvalidConfiguration;
    unsigned long long nt = (unsigned long long)c.block.x * c.block.y * c.block.z;
    if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) why = "a grid dimension is 0";
    else if (c.grid.x > 2147483647u || c.grid.y > 65535u || c.grid.z > 65535u) why = "grid dimension above the limit (2^31-1, 65535, 65535)";
    else if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0) why = "a block dimension is 0";
    else if (c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64 || nt > 1024) why = "more than 1024 threads per block (or a block dimension above 1024, 1024, 64)";
    else if (c.smem > SIM_SMEM_DEFAULT) {
        std::lock_guard<std::mutex> g(g_sim_mu);
        auto it = sim_kernel_smem_attr().find(kernel);
        if (it == sim_kernel_smem_attr().end() || (size_t)it->second < c.smem) {
            why = "dynamic shared memory above 48 KB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize) covering it";
            err = cudaErrorInvalidValue;
        }
    }
    if (!why) return true;
    if (!g_sim_quiet)
        fprintf(stderr, "cuda_sim: launch of %s at %s:%d rejected (%s): grid (%u,%u,%u) block (%u,%u,%u) smem %zu\n", c.name, c.file, c.line,
            why, c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z, c.smem);
    sim_set_error(err);
    return false;
}

template <class... P, class... A>
inline void sim_launch(void (*kernel)(P...), const SimCfg &cfg, A &&...a) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    typedef std::tuple<std::decay_t<P>...> Tup;
    struct Data {
        void (*k)(P...);
        Tup args;
    };
    Data d{kernel, Tup(sim_arg<std::decay_t<P>>(std::forward<A>(a))...)};
    if (!sim_launch_ok((const void *)kernel, cfg)) return;
    SIM_STREAM_ORDER();
    SimJob job;
    job.name = cfg.name;
    job.file = cfg.file;
    job.line = cfg.line;
    job.grid = cfg.grid;
    job.block = cfg.block;
    job.smem = cfg.smem;
    job.thunk = &sim_thunk<Data>;
    job.args = &d;
    job.nblocks = (unsigned long long)cfg.grid.x * cfg.grid.y * cfg.grid.z;
    sim_run_job(job);
}

inline cudaError_t cudaDeviceSynchronize() {
    g_sim_full_waits++;
    SIM_STREAM_SYNC();
    sim_copies_finish(true, nullptr, 0);
    return cudaSuccess;
}

// Runs fn(i) for i in [0, n) on the worker pool (host-side emulation work: GEMMs).
template <class F>
inline void sim_parallel_for(long n, double work, F &&fn) {
    int nt = g_sim_random ? 1 : sim_num_threads();
    if (nt > n) nt = (int)n;
    if (nt <= 1 || work < 4e6) {
        for (long i = 0; i < n; i++) fn(i);
        return;
    }
    std::atomic<long> next{0};
    std::vector<std::thread> th;
    auto body = [&] {
        for (long i; (i = next.fetch_add(1)) < n;) fn(i);
    };
    for (int t = 1; t < nt; t++) th.emplace_back(body);
    body();
    for (auto &t : th) t.join();
}

// ------------------------------------------------------------------------------------------------
// faults: say where

inline void sim_segv_handler(int sig, siginfo_t *si, void *) {
    uintptr_t a = (uintptr_t)si->si_addr;
    char what[512];
    const SimAlloc *al = sim_find_mapping(a);
    const SimInflightCopy *cp = sim_inflight_at(a);
    if (cp) {
        snprintf(what, sizeof(what),
                 "pinned host memory that the cudaMemcpyAsync issued at %s:%d may still be %s: the host must wait for the copy "
                 "first (cudaEventSynchronize on an event recorded after it, cudaStreamSynchronize, cudaDeviceSynchronize)",
                 cp->file, cp->line, cp->prot == PROT_READ ? "reading (the host wrote it)" : "writing (the host touched it)");
    } else if (al) {
        if (al->freed) snprintf(what, sizeof(what), "in freed device buffer #%llu (%zu bytes): use after cudaFree", al->id, al->size);
        else if (a >= al->ptr + al->padded)
            snprintf(what, sizeof(what), "%zu bytes past the end of device buffer #%llu (%zu bytes)", (size_t)(a - (al->ptr + al->size)), al->id,
                     al->size);
        else if (a < al->ptr)
            snprintf(what, sizeof(what), "%zu bytes before device buffer #%llu (%zu bytes)", (size_t)(al->ptr - a), al->id, al->size);
        else snprintf(what, sizeof(what), "inside device buffer #%llu", al->id);
    } else {
        bool stack = false;
        for (auto &g : sim_stack_guards())
            if (a >= g.first && a < g.second) stack = true;
        if (stack) snprintf(what, sizeof(what), "a fiber stack overflowed (raise SIM_STACK_KB, now %zu)", sim_stack_bytes() / 1024);
        else {
            bool smem = false;
            SimWorker *w = t_sim_w;
            if (w && w->job)
                for (auto &r : sim_dyn_smem_regs()) {
                    uintptr_t p = (uintptr_t)r.addr();
                    if (a >= p && a < p + SIM_DYN_SMEM_ARRAY) {
                        snprintf(what, sizeof(what), "dynamic shared memory (%s) at byte %zu of a %zu-byte launch", r.name, (size_t)(a - p),
                                 w->job->smem);
                        smem = true;
                    }
                }
            if (!smem) snprintf(what, sizeof(what), "not simulated device memory (a null or host pointer?)");
        }
    }
    char ctx[1024];
    sim_describe_context(ctx, sizeof(ctx));
    char out[2048];
    int n = snprintf(out, sizeof(out), "cuda_sim: ERROR: invalid memory access (signal %d) at %p: %s\n  %s\n", sig, si->si_addr, what, ctx);
    fflush(stdout);
    if (write(2, out, (size_t)n)) {}
    _exit(3);
}
inline void sim_install_handlers() {
    static bool done = [] {
        sim_worker();  // alternate signal stack of this thread
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = sim_segv_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
        if (g_sim_random) fprintf(stderr, "cuda_sim: random thread and block order (SIM_SERIAL), seed %llu\n", g_sim_seed);
        if (g_sim_profile) atexit(sim_profile_print);
        if (sim_env_int("SIM_STATS", 0))
            atexit([] {
                fprintf(stderr, "cuda_sim: %llu launches, %llu blocks, %llu threads, %llu fiber switches, %lu waits for the whole queue\n",
                        g_sim_stats.launches, g_sim_stats.blocks, g_sim_stats.threads, g_sim_stats.switches.load(), g_sim_full_waits);
            });
        return true;
    }();
    (void)done;
}

// ================================================================================================
// nvcuda::wmma (16x16x16, bf16/fp16 inputs, fp32 accumulators): lane 0 of the warp performs the
// whole fragment operation (the fragment layout across lanes is opaque, and only what a store
// writes is observable); pointers must be 32-byte aligned and ldm a multiple of 16 bytes.

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "cuda_sim: only 16x16x16 wmma fragments are simulated");
    static constexpr int num_elements = 256;
    float v[16][16];
};
inline bool sim_lane0(const char *what) {
    SimWorker *w = sim_in_kernel(what);
    return w->cur->tid % 32 == 0;
}
inline void sim_wmma_check(const void *p, unsigned ldm, size_t esize, const char *what) {
    if ((uintptr_t)p % 32) sim_fail("wmma::%s: pointer %p is not 32-byte aligned", what, p);
    if ((ldm * esize) % 16) sim_fail("wmma::%s: ldm %u is not a multiple of 16 bytes (%zu-byte elements)", what, ldm, esize);
}
template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L> &f, float x) {
    if (!sim_lane0("fill_fragment")) return;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) f.v[i][j] = x;
}
template <class Use, class T, class U>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major> &f, const U *p, unsigned ldm) {
    static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>, "wmma: operand fragment");
    if (!sim_lane0("load_matrix_sync")) return;
    sim_wmma_check(p, ldm, sizeof(U), "load_matrix_sync (row_major)");
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) f.v[i][j] = (float)p[(size_t)i * ldm + j];
}
template <class Use, class T, class U>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, col_major> &f, const U *p, unsigned ldm) {
    static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>, "wmma: operand fragment");
    if (!sim_lane0("load_matrix_sync")) return;
    sim_wmma_check(p, ldm, sizeof(U), "load_matrix_sync (col_major)");
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) f.v[i][j] = (float)p[(size_t)j * ldm + i];
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p, unsigned ldm, layout_t l) {
    if (!sim_lane0("load_matrix_sync")) return;
    sim_wmma_check(p, ldm, 4, "load_matrix_sync (accumulator)");
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) f.v[i][j] = l == mem_row_major ? p[(size_t)i * ldm + j] : p[(size_t)j * ldm + i];
}
inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ldm, layout_t l) {
    if (!sim_lane0("store_matrix_sync")) return;
    sim_wmma_check(p, ldm, 4, "store_matrix_sync");
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) (l == mem_row_major ? p[(size_t)i * ldm + j] : p[(size_t)j * ldm + i]) = f.v[i][j];
}
template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, T, LA> &a,
                     const fragment<matrix_b, 16, 16, 16, T, LB> &b, const fragment<accumulator, 16, 16, 16, float> &c) {
    if (!sim_lane0("mma_sync")) return;
    float r[16][16];
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float acc = c.v[i][j];
            for (int k = 0; k < 16; k++) acc += a.v[i][k] * b.v[k][j];
            r[i][j] = acc;
        }
    memcpy(d.v, r, sizeof(r));
}
}  // namespace wmma
}  // namespace nvcuda

// ================================================================================================
// cuBLAS

enum cudaDataType_t {
    CUDA_R_32F = 0,
    CUDA_R_64F = 1,
    CUDA_R_16F = 2,
    CUDA_R_8I = 3,
    CUDA_R_32I = 10,
    CUDA_R_16BF = 14,
};
typedef cudaDataType_t cudaDataType;
enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasComputeType_t {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
    CUBLAS_COMPUTE_64F = 70,
};
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TENSOR_OP_MATH = 1, CUBLAS_PEDANTIC_MATH = 2, CUBLAS_TF32_TENSOR_OP_MATH = 3 };
struct SimCublas {
    unsigned magic;
};
typedef SimCublas *cublasHandle_t;

inline const char *cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
        case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
        case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
        case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
        case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
        case CUBLAS_STATUS_LICENSE_ERROR: return "error detected trying to check the license";
    }
    return "unknown error";
}
inline const char *cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS";
    }
}
// a rejected call says why on stderr (cuBLAS would only return the status)
inline cublasStatus_t sim_blas_reject(cublasStatus_t s, const char *fn, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!g_sim_quiet) fprintf(stderr, "cuda_sim: %s returns %s: %s\n", fn, cublasGetStatusName(s), msg);
    return s;
}
inline cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = new SimCublas{0xB1A5};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
    if (!h || h->magic != 0xB1A5) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->magic = 0;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetWorkspace(cublasHandle_t, void *, size_t) { return CUBLAS_STATUS_SUCCESS; }

inline size_t sim_dtype_size(cudaDataType_t t) {
    switch (t) {
        case CUDA_R_32F: return 4;
        case CUDA_R_64F: return 8;
        case CUDA_R_16F: return 2;
        case CUDA_R_16BF: return 2;
        case CUDA_R_8I: return 1;
        case CUDA_R_32I: return 4;
    }
    return 0;
}
inline const char *sim_dtype_name(cudaDataType_t t) {
    switch (t) {
        case CUDA_R_32F: return "CUDA_R_32F";
        case CUDA_R_64F: return "CUDA_R_64F";
        case CUDA_R_16F: return "CUDA_R_16F";
        case CUDA_R_16BF: return "CUDA_R_16BF";
        default: return "unsupported type";
    }
}
inline float sim_half2float(unsigned short h) {
    unsigned s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
inline unsigned short sim_float2half(float f) {
    if (f != f) return 0x7FFF;
    unsigned s = signbit(f) ? 0x8000 : 0;
    float a = fabsf(f);
    if (a >= 65520.0f) return (unsigned short)(s | 0x7C00);
    if (a < ldexpf(1.0f, -14)) return (unsigned short)(s | (unsigned)nearbyintf(a * ldexpf(1.0f, 24)));
    int e;
    float fr = frexpf(a, &e);  // a = fr * 2^e, fr in [0.5, 1)
    unsigned m = (unsigned)nearbyintf(fr * 2048.0f);  // 11 bits incl. the implicit one
    if (m == 2048) { m = 1024; e++; }
    return (unsigned short)(s | ((unsigned)(e + 14) << 10) | (m & 1023));
}
inline float sim_load_elem(const void *p, cudaDataType_t t, size_t i) {
    switch (t) {
        case CUDA_R_32F: return ((const float *)p)[i];
        case CUDA_R_64F: return (float)((const double *)p)[i];
        case CUDA_R_16BF: return sim_bf2f(((const unsigned short *)p)[i]);
        case CUDA_R_16F: return sim_half2float(((const unsigned short *)p)[i]);
        default: sim_fail("internal: element type");
    }
}
inline void sim_store_elem(void *p, cudaDataType_t t, size_t i, float v) {
    switch (t) {
        case CUDA_R_32F: ((float *)p)[i] = v; break;
        case CUDA_R_64F: ((double *)p)[i] = v; break;
        case CUDA_R_16BF: ((unsigned short *)p)[i] = sim_f2bf(v); break;
        case CUDA_R_16F: ((unsigned short *)p)[i] = sim_float2half(v); break;
        default: sim_fail("internal: element type");
    }
}

// A column-major operand: `rows` x `cols` stored with leading dimension ld, `batch` copies `stride`
// elements apart. Its byte range, and a check that it lies inside one cudaMalloc buffer.
struct SimMat {
    const void *p;
    cudaDataType_t t;
    long long rows, cols, ld, stride;
    int batch;
    size_t bytes() const {
        if (rows <= 0 || cols <= 0 || batch <= 0) return 0;
        long long last = (cols - 1) * ld + rows;  // elements of one matrix's span
        long long span = (long long)(batch - 1) * stride + last;
        return (size_t)span * sim_dtype_size(t);
    }
};
inline void sim_check_mat(const SimMat &m, const char *fn, const char *which) {
    char what[256];
    snprintf(what, sizeof(what), "%s: matrix %s (%lld x %lld, ld %lld, %d x stride %lld, %s)", fn, which, m.rows, m.cols, m.ld, m.batch,
             m.stride, sim_dtype_name(m.t));
    if (m.batch > 1 && m.stride < 0) sim_fail("%s: negative batch stride", what);
    sim_check_range(m.p, m.bytes(), what);
}
// Fails if an output element of `out` shares a byte with an element of `in` (cuBLAS does not
// support outputs aliasing inputs; in place C = D is cuBLASLt's only exception).
inline void sim_check_no_alias(const SimMat &out, const SimMat &in, const char *fn, const char *which) {
    uintptr_t o0 = (uintptr_t)out.p, o1 = o0 + out.bytes(), i0 = (uintptr_t)in.p, i1 = i0 + in.bytes();
    if (out.bytes() == 0 || in.bytes() == 0 || o1 <= i0 || i1 <= o0) return;
    // exact test on the overlapping byte span
    uintptr_t lo = std::max(o0, i0), hi = std::min(o1, i1);
    std::vector<unsigned char> mark(hi - lo, 0);
    size_t eo = sim_dtype_size(out.t), ei = sim_dtype_size(in.t);
    for (int b = 0; b < out.batch; b++)
        for (long long c = 0; c < out.cols; c++) {
            uintptr_t s = o0 + ((size_t)b * out.stride + (size_t)c * out.ld) * eo, e = s + out.rows * eo;
            for (uintptr_t x = std::max(s, lo); x < std::min(e, hi); x++) mark[x - lo] = 1;
        }
    for (int b = 0; b < in.batch; b++)
        for (long long c = 0; c < in.cols; c++) {
            uintptr_t s = i0 + ((size_t)b * in.stride + (size_t)c * in.ld) * ei, e = s + in.rows * ei;
            for (uintptr_t x = std::max(s, lo); x < std::min(e, hi); x++)
                if (mark[x - lo]) sim_fail("%s: the output overlaps input %s at byte %p", fn, which, (void *)x);
        }
}

// Fails if two batch entries of an output share an element (the batches would race on a GPU).
inline void sim_check_batches_disjoint(const SimMat &c, const char *fn) {
    if (c.batch <= 1 || c.rows <= 0 || c.cols <= 0) return;
    long long one = (c.cols - 1) * c.ld + c.rows;
    if (c.stride >= one) return;
    std::vector<unsigned char> mark((size_t)((c.batch - 1) * c.stride + one), 0);
    for (int b = 0; b < c.batch; b++)
        for (long long j = 0; j < c.cols; j++)
            for (long long i = 0; i < c.rows; i++) {
                unsigned char &x = mark[(size_t)(b * c.stride + j * c.ld + i)];
                if (x) sim_fail("%s: batch entries %d and an earlier one of the output share element %lld (stride %lld, ld %lld, %lld x %lld)", fn,
                                b, b * c.stride + j * c.ld + i, c.stride, c.ld, c.rows, c.cols);
                x = 1;
            }
}

// one GEMM in column-major terms: D(m x n) = alpha op(A) op(B) + beta C, batched; then epilogue
struct SimGemm {
    int ta, tb;
    long long m, n, k;
    float alpha, beta;
    SimMat A, B, C, D;
    // cuBLASLt epilogue
    int epilogue;  // 0 none, else a cublasLtEpilogue_t value
    const void *bias;
    cudaDataType_t bias_t;
    void *aux;
    long long aux_ld;
    cudaDataType_t aux_t;
    long long bias_stride, aux_stride;  // batched cuBLASLt: per batch entry, in elements
};
inline float sim_gelu(float x) {
    float c = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + c)));
}
inline float sim_dgelu(float x) {
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x), th = tanhf(u);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
}
// batch entry b of g
inline void sim_run_gemm_entry(const SimGemm &g, long b) {
    const long long m = g.m, n = g.n, k = g.k;
    // op(A) as m x k rows, op(B) transposed as n x k rows (contiguous dot products)
    static thread_local std::vector<float> a, bt;  // kept between calls: no page faults per GEMM
    if (a.size() < (size_t)m * k) a.resize((size_t)m * k);
    if (bt.size() < (size_t)n * k) bt.resize((size_t)n * k);
    const size_t abase = (size_t)b * g.A.stride, bbase = (size_t)b * g.B.stride;
    for (long long i = 0; i < m; i++)
        for (long long kk = 0; kk < k; kk++)
            a[i * k + kk] = sim_load_elem(g.A.p, g.A.t, abase + (g.ta ? (size_t)i * g.A.ld + kk : (size_t)kk * g.A.ld + i));
    for (long long j = 0; j < n; j++)
        for (long long kk = 0; kk < k; kk++)
            bt[j * k + kk] = sim_load_elem(g.B.p, g.B.t, bbase + (g.tb ? (size_t)kk * g.B.ld + j : (size_t)j * g.B.ld + kk));
    const size_t cbase = (size_t)b * g.C.stride, dbase = (size_t)b * g.D.stride;
    for (long long j = 0; j < n; j++) {
        const float *bj = &bt[j * k];
        for (long long i = 0; i < m; i++) {
            const float *ai = &a[i * k];
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            long long kk = 0;
            for (; kk + 8 <= k; kk += 8)
                for (int u = 0; u < 8; u++) acc[u] += ai[kk + u] * bj[kk + u];
            float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (; kk < k; kk++) s += ai[kk] * bj[kk];
            float x = g.alpha * s;
            if (g.beta != 0.0f) x += g.beta * sim_load_elem(g.C.p, g.C.t, cbase + (size_t)j * g.C.ld + i);
            int e = g.epilogue;
            const size_t xb = (size_t)b * g.aux_stride;
            if (e == 4 || e == 36 || e == 164) x += sim_load_elem(g.bias, g.bias_t, (size_t)b * g.bias_stride + (size_t)i);  // BIAS, GELU_BIAS, GELU_AUX_BIAS
            if (e == 32 || e == 36 || e == 160 || e == 164) {  // GELU, GELU_BIAS, GELU_AUX, GELU_AUX_BIAS
                if (e & 128) sim_store_elem(g.aux, g.aux_t, xb + (size_t)j * g.aux_ld + i, x);
                x = sim_gelu(x);
            } else if (e == 192) {  // DGELU
                x *= sim_dgelu(sim_load_elem(g.aux, g.aux_t, xb + (size_t)j * g.aux_ld + i));
            }
            sim_store_elem((void *)g.D.p, g.D.t, dbase + (size_t)j * g.D.ld + i, x);
        }
    }
}
inline void sim_run_gemm(const SimGemm &g) {
    if (g.m <= 0 || g.n <= 0) return;
    sim_parallel_for(g.D.batch, (double)g.m * g.n * (g.k + 1) * g.D.batch, [&](long b) { sim_run_gemm_entry(g, b); });
}

inline bool sim_blas_type_ok(cudaDataType_t a, cudaDataType_t b, cudaDataType_t c, cublasComputeType_t ct) {
    if (ct == CUBLAS_COMPUTE_32F || ct == CUBLAS_COMPUTE_32F_PEDANTIC || ct == CUBLAS_COMPUTE_32F_FAST_TF32 ||
        ct == CUBLAS_COMPUTE_32F_FAST_16BF || ct == CUBLAS_COMPUTE_32F_FAST_16F) {
        if (a != b) return false;
        if (a == CUDA_R_32F) return c == CUDA_R_32F;
        if (a == CUDA_R_16BF || a == CUDA_R_16F) return c == a || c == CUDA_R_32F;
    }
    return false;
}

// The argument checks cuBLAS's GEMMs share: CUBLAS_STATUS_SUCCESS with *run = 0 when there is
// nothing to compute, with *run = 1 when there is; else the status cuBLAS returns.
inline cublasStatus_t sim_blas_gemm_args(const char *fn, cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                         int k, int lda, int ldb, int ldc, int batchCount, cudaDataType_t Atype, cudaDataType_t Btype,
                                         cudaDataType_t Ctype, cublasComputeType_t computeType, const void *alpha, const void *beta,
                                         int *run) {
    *run = 0;
    if (!h || h->magic != 0xB1A5) return sim_blas_reject(CUBLAS_STATUS_NOT_INITIALIZED, fn, "handle");
    if (transa > CUBLAS_OP_C || transb > CUBLAS_OP_C) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "transa/transb");
    if (m < 0 || n < 0 || k < 0 || batchCount < 0)
        return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "m %d n %d k %d batch %d", m, n, k, batchCount);
    long long arows = transa == CUBLAS_OP_N ? m : k, brows = transb == CUBLAS_OP_N ? k : n;
    if (lda < std::max(1LL, arows) || ldb < std::max(1LL, brows) || ldc < std::max(1, m))
        return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "lda %d (op(A) needs >= %lld), ldb %d (>= %lld), ldc %d (>= %d)", lda,
                               std::max(1LL, arows), ldb, std::max(1LL, brows), ldc, std::max(1, m));
    if (!sim_blas_type_ok(Atype, Btype, Ctype, computeType))
        return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "types A %s B %s C %s compute %d", sim_dtype_name(Atype),
                               sim_dtype_name(Btype), sim_dtype_name(Ctype), (int)computeType);
    if (m == 0 || n == 0 || batchCount == 0) return CUBLAS_STATUS_SUCCESS;
    if (!alpha || !beta) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "alpha/beta null");
    *run = 1;
    return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                                 int k, const void *alpha, const void *A, cudaDataType_t Atype, int lda,
                                                 long long strideA, const void *B, cudaDataType_t Btype, int ldb, long long strideB,
                                                 const void *beta, void *C, cudaDataType_t Ctype, int ldc, long long strideC,
                                                 int batchCount, cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    const char *fn = "cublasGemmStridedBatchedEx";
    SimProfileScope prof(fn);
    SIM_STREAM_ORDER();
    (void)algo;
    int run;
    cublasStatus_t st = sim_blas_gemm_args(fn, h, transa, transb, m, n, k, lda, ldb, ldc, batchCount, Atype, Btype, Ctype, computeType, alpha,
                                           beta, &run);
    if (!run) return st;
    long long arows = transa == CUBLAS_OP_N ? m : k, brows = transb == CUBLAS_OP_N ? k : n;
    t_sim_host_op = fn;
    SimGemm g;
    memset((void *)&g, 0, sizeof(g));
    g.ta = transa != CUBLAS_OP_N;
    g.tb = transb != CUBLAS_OP_N;
    g.m = m; g.n = n; g.k = k;
    g.alpha = *(const float *)alpha;
    g.beta = *(const float *)beta;
    g.A = SimMat{A, Atype, arows, transa == CUBLAS_OP_N ? k : m, lda, strideA, batchCount};
    g.B = SimMat{B, Btype, brows, transb == CUBLAS_OP_N ? n : k, ldb, strideB, batchCount};
    g.C = SimMat{C, Ctype, m, n, ldc, strideC, batchCount};
    g.D = g.C;
    if (k > 0) {
        sim_check_mat(g.A, fn, "A");
        sim_check_mat(g.B, fn, "B");
    } else {
        g.A.rows = g.B.rows = 0;
    }
    sim_check_mat(g.C, fn, "C");
    sim_check_batches_disjoint(g.C, fn);
    if (k > 0) {
        sim_check_no_alias(g.C, g.A, fn, "A");
        sim_check_no_alias(g.C, g.B, fn, "B");
    }
    sim_run_gemm(g);
    t_sim_host_op = nullptr;
    return CUBLAS_STATUS_SUCCESS;
}
// Pointer-array batched: Aarray, Barray, Carray are device arrays of batchCount pointers. Entries
// with the same (A, B, C) are one product computed once (they write the same values); otherwise
// no two entries' outputs may share an element, and no output element may be any entry's input.
inline cublasStatus_t cublasGemmBatchedEx(cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                                          const void *alpha, const void *const Aarray[], cudaDataType_t Atype, int lda,
                                          const void *const Barray[], cudaDataType_t Btype, int ldb, const void *beta, void *const Carray[],
                                          cudaDataType_t Ctype, int ldc, int batchCount, cublasComputeType_t computeType,
                                          cublasGemmAlgo_t algo) {
    const char *fn = "cublasGemmBatchedEx";
    SimProfileScope prof(fn);
    SIM_STREAM_ORDER();
    (void)algo;
    int run;
    cublasStatus_t st = sim_blas_gemm_args(fn, h, transa, transb, m, n, k, lda, ldb, ldc, batchCount, Atype, Btype, Ctype, computeType, alpha,
                                           beta, &run);
    if (!run) return st;
    long long arows = transa == CUBLAS_OP_N ? m : k, brows = transb == CUBLAS_OP_N ? k : n;
    t_sim_host_op = fn;
    const size_t pbytes = (size_t)batchCount * sizeof(void *);
    sim_check_range(Aarray, pbytes, "cublasGemmBatchedEx: Aarray (device pointers)");
    sim_check_range(Barray, pbytes, "cublasGemmBatchedEx: Barray (device pointers)");
    sim_check_range(Carray, pbytes, "cublasGemmBatchedEx: Carray (device pointers)");
    std::set<std::array<uintptr_t, 3>> seen;
    std::vector<SimGemm> todo;
    for (int b = 0; b < batchCount; b++) {
        std::array<uintptr_t, 3> key = {(uintptr_t)Aarray[b], (uintptr_t)Barray[b], (uintptr_t)Carray[b]};
        if (!seen.insert(key).second) continue;
        SimGemm g;
        memset((void *)&g, 0, sizeof(g));
        g.ta = transa != CUBLAS_OP_N;
        g.tb = transb != CUBLAS_OP_N;
        g.m = m; g.n = n; g.k = k;
        g.alpha = *(const float *)alpha;
        g.beta = *(const float *)beta;
        g.A = SimMat{Aarray[b], Atype, arows, transa == CUBLAS_OP_N ? k : m, lda, 0, 1};
        g.B = SimMat{Barray[b], Btype, brows, transb == CUBLAS_OP_N ? n : k, ldb, 0, 1};
        g.C = SimMat{Carray[b], Ctype, m, n, ldc, 0, 1};
        g.D = g.C;
        char which[64];
        snprintf(which, sizeof(which), "C of entry %d", b);
        sim_check_mat(g.C, fn, which);
        if (k > 0) {
            snprintf(which, sizeof(which), "A of entry %d", b);
            sim_check_mat(g.A, fn, which);
            snprintf(which, sizeof(which), "B of entry %d", b);
            sim_check_mat(g.B, fn, which);
        }
        todo.push_back(g);
    }
    // every output byte once, and never an input's: each column of a matrix is one byte range, so
    // the outputs' ranges, sorted, must not overlap, and no input range may meet one of them
    struct Span { uintptr_t lo, hi; };
    std::vector<Span> out;
    const size_t ec = sim_dtype_size(Ctype);
    out.reserve(todo.size() * (size_t)n);
    for (auto &g : todo)
        for (long long j = 0; j < n; j++) {
            const uintptr_t a = (uintptr_t)g.C.p + (size_t)j * ldc * ec;
            out.push_back({a, a + (size_t)m * ec});
        }
    std::sort(out.begin(), out.end(), [](const Span &x, const Span &y) { return x.lo < y.lo; });
    for (size_t i = 1; i < out.size(); i++)
        if (out[i].lo < out[i - 1].hi) sim_fail("%s: two different batch entries write the output element at %p", fn, (void *)out[i].lo);
    if (k > 0)
        for (auto &g : todo)
            for (const SimMat *in : {&g.A, &g.B}) {
                const size_t ei = sim_dtype_size(in->t);
                for (long long j = 0; j < in->cols; j++) {
                    const uintptr_t a = (uintptr_t)in->p + (size_t)j * in->ld * ei, e = a + (size_t)in->rows * ei;
                    // the first output range ending after a (ranges are disjoint: sorted by hi too)
                    auto it = std::upper_bound(out.begin(), out.end(), a, [](uintptr_t v, const Span &x) { return v < x.hi; });
                    if (it != out.end() && it->lo < e)
                        sim_fail("%s: an output element at %p is an input of the same call", fn, (void *)std::max(a, it->lo));
                }
            }
    // the entries write disjoint outputs (checked above): spread them over the workers
    double work = 0;
    for (auto &g : todo) work += (double)g.m * g.n * (g.k + 1);
    sim_parallel_for((long)todo.size(), work, [&](long i) { sim_run_gemm_entry(todo[i], 0); });
    t_sim_host_op = nullptr;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                                   const void *alpha, const void *A, cudaDataType_t Atype, int lda, const void *B, cudaDataType_t Btype,
                                   int ldb, const void *beta, void *C, cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                                   cublasGemmAlgo_t algo) {
    return cublasGemmStridedBatchedEx(h, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0, beta, C, Ctype, ldc, 0, 1,
                                      computeType, algo);
}
inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *alpha,
                                  const float *A, int lda, const float *B, int ldb, const float *beta, float *C, int ldc) {
    return cublasGemmEx(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT);
}
inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                                const float *alpha, const float *A, int lda, long long sA, const float *B, int ldb,
                                                long long sB, const float *beta, float *C, int ldc, long long sC, int batch) {
    return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, sA, B, CUDA_R_32F, ldb, sB, beta, C, CUDA_R_32F, ldc,
                                      sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

// ================================================================================================
// cuBLASLt

enum cublasLtMatmulDescAttributes_t {
    CUBLASLT_MATMUL_DESC_COMPUTE_TYPE = 0,
    CUBLASLT_MATMUL_DESC_SCALE_TYPE = 1,
    CUBLASLT_MATMUL_DESC_POINTER_MODE = 2,
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_TRANSC = 5,
    CUBLASLT_MATMUL_DESC_FILL_MODE = 6,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
    CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE = 10,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE = 13,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE = 22,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26,
};
enum cublasLtEpilogue_t {
    CUBLASLT_EPILOGUE_DEFAULT = 1,
    CUBLASLT_EPILOGUE_RELU = 2,
    CUBLASLT_EPILOGUE_BIAS = 4,
    CUBLASLT_EPILOGUE_GELU = 32,
    CUBLASLT_EPILOGUE_GELU_AUX = 32 | 128,
    CUBLASLT_EPILOGUE_GELU_BIAS = 32 | 4,
    CUBLASLT_EPILOGUE_GELU_AUX_BIAS = 32 | 128 | 4,
    CUBLASLT_EPILOGUE_DGELU = 64 | 128,
    CUBLASLT_EPILOGUE_DGELU_BGRAD = 64 | 128 | 16,
    CUBLASLT_EPILOGUE_BGRADA = 256,
    CUBLASLT_EPILOGUE_BGRADB = 512,
};
enum cublasLtMatrixLayoutAttribute_t {
    CUBLASLT_MATRIX_LAYOUT_TYPE = 0,
    CUBLASLT_MATRIX_LAYOUT_ORDER = 1,
    CUBLASLT_MATRIX_LAYOUT_ROWS = 2,
    CUBLASLT_MATRIX_LAYOUT_COLS = 3,
    CUBLASLT_MATRIX_LAYOUT_LD = 4,
    CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5,
    CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6,
};
enum cublasLtMatmulPreferenceAttributes_t {
    CUBLASLT_MATMUL_PREF_SEARCH_MODE = 0,
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
    CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = 3,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};
enum cublasLtOrder_t { CUBLASLT_ORDER_COL = 0, CUBLASLT_ORDER_ROW = 1 };

struct SimLtHandle {
    unsigned magic;
};
typedef SimLtHandle *cublasLtHandle_t;
struct SimLtDesc {
    unsigned magic;
    cublasComputeType_t compute;
    cudaDataType_t scale;
    int32_t transa, transb;
    uint32_t epilogue;
    const void *bias;
    int32_t bias_t;
    void *aux;
    int64_t aux_ld;
    int32_t aux_t;
    int64_t bias_bstride, aux_bstride;  // BIAS_BATCH_STRIDE, EPILOGUE_AUX_BATCH_STRIDE
};
typedef SimLtDesc *cublasLtMatmulDesc_t;
struct SimLtLayout {
    unsigned magic;
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t order, batch;
    int64_t stride;
};
typedef SimLtLayout *cublasLtMatrixLayout_t;
struct SimLtPref {
    unsigned magic;
    uint64_t workspace;
    uint32_t align[4];
};
typedef SimLtPref *cublasLtMatmulPreference_t;
struct cublasLtMatmulAlgo_t {
    uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
};

// tests set bits (1u << epilogue, epilogue < 32; GELU_AUX_BIAS is bit 31 here, DGELU bit 30,
// GELU_AUX bit 29, see sim_lt_epi_bit) to make the heuristic find no algorithm for an epilogue
inline unsigned sim_cublaslt_refuse_epilogues = 0;
inline unsigned sim_lt_epi_bit(uint32_t e) {
    switch (e) {
        case CUBLASLT_EPILOGUE_GELU_AUX_BIAS: return 1u << 31;
        case CUBLASLT_EPILOGUE_DGELU: return 1u << 30;
        case CUBLASLT_EPILOGUE_GELU_AUX: return 1u << 29;
        default: return e < 29 ? 1u << e : 0;
    }
}

inline cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    *h = new SimLtHandle{0x17};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    if (!h || h->magic != 0x17) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale) {
    SimLtDesc *p = new SimLtDesc;
    memset((void *)p, 0, sizeof(*p));
    p->magic = 0xDE5C;
    p->compute = compute;
    p->scale = scale;
    p->epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    p->bias_t = -1;
    p->aux_t = -1;
    *d = p;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    if (!d || d->magic != 0xDE5C) return CUBLAS_STATUS_INVALID_VALUE;
    d->magic = 0;
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const void *buf,
                                                     size_t size) {
    const char *fn = "cublasLtMatmulDescSetAttribute";
    if (!d || d->magic != 0xDE5C) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "descriptor");
    auto want = [&](size_t s) {
        if (size != s) {
            sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "attribute %d takes %zu bytes, got %zu", (int)attr, s, size);
            return false;
        }
        return true;
    };
    switch (attr) {
        case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: if (!want(4)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->compute, buf, 4); break;
        case CUBLASLT_MATMUL_DESC_SCALE_TYPE: if (!want(4)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->scale, buf, 4); break;
        case CUBLASLT_MATMUL_DESC_TRANSA: if (!want(4)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->transa, buf, 4); break;
        case CUBLASLT_MATMUL_DESC_TRANSB: if (!want(4)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->transb, buf, 4); break;
        case CUBLASLT_MATMUL_DESC_EPILOGUE: if (!want(4)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->epilogue, buf, 4); break;
        case CUBLASLT_MATMUL_DESC_BIAS_POINTER: if (!want(8)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->bias, buf, 8); break;
        case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: if (!want(4)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->bias_t, buf, 4); break;
        case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: if (!want(8)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->aux, buf, 8); break;
        case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: if (!want(8)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->aux_ld, buf, 8); break;
        case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE: if (!want(4)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->aux_t, buf, 4); break;
        case CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE: if (!want(8)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->bias_bstride, buf, 8); break;
        case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE: if (!want(8)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->aux_bstride, buf, 8); break;
        default: return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "attribute %d is not simulated", (int)attr);
    }
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type, uint64_t rows, uint64_t cols, int64_t ld) {
    SimLtLayout *p = new SimLtLayout;
    *p = SimLtLayout{0x1A70, type, rows, cols, ld, CUBLASLT_ORDER_COL, 1, 0};
    *l = p;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    if (!l || l->magic != 0x1A70) return CUBLAS_STATUS_INVALID_VALUE;
    l->magic = 0;
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr, const void *buf,
                                                       size_t size) {
    const char *fn = "cublasLtMatrixLayoutSetAttribute";
    if (!l || l->magic != 0x1A70) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "layout");
    switch (attr) {
        case CUBLASLT_MATRIX_LAYOUT_ORDER: if (size != 4) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&l->order, buf, 4); break;
        case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: if (size != 4) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&l->batch, buf, 4); break;
        case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: if (size != 8) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&l->stride, buf, 8); break;
        default: return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "attribute %d is not simulated", (int)attr);
    }
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = new SimLtPref{0x9EF, 0, {256, 256, 256, 256}};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    if (!p || p->magic != 0x9EF) return CUBLAS_STATUS_INVALID_VALUE;
    p->magic = 0;
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr,
                                                           const void *buf, size_t size) {
    const char *fn = "cublasLtMatmulPreferenceSetAttribute";
    if (!p || p->magic != 0x9EF) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "preference");
    switch (attr) {
        case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
            if (size != 8) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "workspace bytes take 8 bytes, got %zu", size);
            memcpy(&p->workspace, buf, 8);
            break;
        case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
        case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
        case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
        case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
            if (size != 4) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "alignments take 4 bytes, got %zu", size);
            memcpy(&p->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, 4);
            break;
        case CUBLASLT_MATMUL_PREF_SEARCH_MODE:
        case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK: break;
        default: return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "attribute %d is not simulated", (int)attr);
    }
    return CUBLAS_STATUS_SUCCESS;
}

// the shape checks the heuristic and the matmul share; m, n, k from the layouts
inline cublasStatus_t sim_lt_validate(const char *fn, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                      cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl, long long *m, long long *n, long long *k) {
    if (!d || d->magic != 0xDE5C) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "matmul descriptor");
    cublasLtMatrixLayout_t ls[4] = {a, b, c, dl};
    for (auto *l : ls) {
        if (!l || l->magic != 0x1A70) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "matrix layout");
        if (l->order != CUBLASLT_ORDER_COL) return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "only column-major layouts are simulated");
        if (l->batch != dl->batch) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "batch counts differ: %d and %d (D)", l->batch, dl->batch);
        if (l->batch < 1) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "batch count %d", l->batch);
        if (l->ld < (int64_t)std::max<uint64_t>(1, l->rows))
            return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "ld %lld < rows %llu", (long long)l->ld, (unsigned long long)l->rows);
    }
    if (d->compute != CUBLAS_COMPUTE_32F || d->scale != CUDA_R_32F)
        return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "only CUBLAS_COMPUTE_32F with CUDA_R_32F scale is simulated");
    if (d->transa > 1 || d->transb > 1) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "trans");
    *m = (long long)dl->rows;
    *n = (long long)dl->cols;
    long long am = d->transa ? a->cols : a->rows, ak = d->transa ? a->rows : a->cols;
    long long bk = d->transb ? b->cols : b->rows, bn = d->transb ? b->rows : b->cols;
    *k = ak;
    if (am != *m || bn != *n || bk != ak || c->rows != dl->rows || c->cols != dl->cols)
        return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "shapes: op(A) %lld x %lld, op(B) %lld x %lld, C %llu x %llu, D %lld x %lld",
                               am, ak, bk, bn, (unsigned long long)c->rows, (unsigned long long)c->cols, *m, *n);
    if (!sim_blas_type_ok(a->type, b->type, dl->type, d->compute) || c->type != dl->type)
        return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "types A %s B %s C %s D %s", sim_dtype_name(a->type), sim_dtype_name(b->type),
                               sim_dtype_name(c->type), sim_dtype_name(dl->type));
    uint32_t e = d->epilogue;
    bool known = e == CUBLASLT_EPILOGUE_DEFAULT || e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU ||
                 e == CUBLASLT_EPILOGUE_GELU_AUX || e == CUBLASLT_EPILOGUE_GELU_BIAS || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS ||
                 e == CUBLASLT_EPILOGUE_DGELU;
    if (!known) return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "epilogue %u is not simulated", e);
    if ((e & 4) && !d->bias) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "a BIAS epilogue without BIAS_POINTER");
    if ((e & 4) && d->bias_t != -1 && d->bias_t != (int32_t)dl->type && d->bias_t != CUDA_R_32F)
        return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "bias type %d", d->bias_t);
    if (e & 128) {
        if (!d->aux) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "epilogue %u without EPILOGUE_AUX_POINTER", e);
        if (d->aux_ld < *m || d->aux_ld % 8)
            return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "EPILOGUE_AUX_LD %lld must be >= the rows of D (%lld) and divisible by 8",
                                   (long long)d->aux_ld, *m);
        if (dl->batch > 1 && d->aux_bstride % 8)
            return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "EPILOGUE_AUX_BATCH_STRIDE %lld must be divisible by 8",
                                   (long long)d->aux_bstride);
        if (d->aux_t != -1 && d->aux_t != (int32_t)dl->type)
            return sim_blas_reject(CUBLAS_STATUS_NOT_SUPPORTED, fn, "aux type %d", d->aux_t);
    }
    return CUBLAS_STATUS_SUCCESS;
}
inline uint32_t sim_ptr_align(const void *p) {
    uint32_t al = 256;
    while (al > 1 && ((uintptr_t)p % al)) al >>= 1;
    return al;
}

inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a,
                                                     cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl,
                                                     cublasLtMatmulPreference_t pref, int requested, cublasLtMatmulHeuristicResult_t *res,
                                                     int *returned) {
    const char *fn = "cublasLtMatmulAlgoGetHeuristic";
    *returned = 0;
    if (!h || h->magic != 0x17) return sim_blas_reject(CUBLAS_STATUS_NOT_INITIALIZED, fn, "handle");
    if (!pref || pref->magic != 0x9EF) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "preference");
    if (requested < 1) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "requestedAlgoCount %d", requested);
    long long m, n, k;
    cublasStatus_t s = sim_lt_validate(fn, d, a, b, c, dl, &m, &n, &k);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    // the bias / aux pointers' alignment is part of the problem (cuBLASLt reads them here)
    if ((d->epilogue & 4) && sim_ptr_align(d->bias) < 2) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (sim_cublaslt_refuse_epilogues & sim_lt_epi_bit(d->epilogue)) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset((void *)&res[0], 0, sizeof(res[0]));
    res[0].algo.data[0] = 0x5111;
    for (int i = 0; i < 4; i++) res[0].algo.data[1 + i] = pref->align[i];  // the alignments this algorithm may assume
    res[0].workspaceSize = 0;
    res[0].state = CUBLAS_STATUS_SUCCESS;
    res[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A, cublasLtMatrixLayout_t al,
                                     const void *B, cublasLtMatrixLayout_t bl, const void *beta, const void *C, cublasLtMatrixLayout_t cl,
                                     void *D, cublasLtMatrixLayout_t dl, const cublasLtMatmulAlgo_t *algo, void *workspace, size_t ws_bytes,
                                     cudaStream_t stream) {
    const char *fn = "cublasLtMatmul";
    SimProfileScope prof(fn);
    SIM_STREAM_ORDER();
    (void)stream;
    if (!h || h->magic != 0x17) return sim_blas_reject(CUBLAS_STATUS_NOT_INITIALIZED, fn, "handle");
    long long m, n, k;
    cublasStatus_t s = sim_lt_validate(fn, d, al, bl, cl, dl, &m, &n, &k);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (!alpha || !beta) return sim_blas_reject(CUBLAS_STATUS_INVALID_VALUE, fn, "alpha/beta null");
    t_sim_host_op = fn;
    if (algo) {
        if (algo->data[0] != 0x5111) sim_fail("%s: the algorithm was not returned by cublasLtMatmulAlgoGetHeuristic", fn);
        const void *ptrs[4] = {A, B, C, D};
        const char *names = "ABCD";
        for (int i = 0; i < 4; i++)
            if (sim_ptr_align(ptrs[i]) < algo->data[1 + i])
                sim_fail("%s: %c = %p is %u-byte aligned, but the heuristic was told MIN_ALIGNMENT_%c_BYTES = %llu", fn, names[i], ptrs[i],
                         sim_ptr_align(ptrs[i]), names[i], (unsigned long long)algo->data[1 + i]);
    }
    if (workspace && ws_bytes) sim_check_range(workspace, ws_bytes, "cublasLtMatmul workspace");
    SimGemm g;
    memset((void *)&g, 0, sizeof(g));
    g.ta = d->transa;
    g.tb = d->transb;
    g.m = m; g.n = n; g.k = k;
    g.alpha = *(const float *)alpha;
    g.beta = *(const float *)beta;
    const int nb = dl->batch;
    g.A = SimMat{A, al->type, (long long)al->rows, (long long)al->cols, al->ld, al->stride, nb};
    g.B = SimMat{B, bl->type, (long long)bl->rows, (long long)bl->cols, bl->ld, bl->stride, nb};
    g.C = SimMat{C, cl->type, m, n, cl->ld, cl->stride, nb};
    g.D = SimMat{D, dl->type, m, n, dl->ld, dl->stride, nb};
    if (k > 0) {
        sim_check_mat(g.A, fn, "A");
        sim_check_mat(g.B, fn, "B");
        sim_check_no_alias(g.D, g.A, fn, "A");
        sim_check_no_alias(g.D, g.B, fn, "B");
    }
    if (g.beta != 0.0f) {
        sim_check_mat(g.C, fn, "C");
        if (C != D && ((uintptr_t)C < (uintptr_t)D + g.D.bytes() && (uintptr_t)D < (uintptr_t)C + g.C.bytes()))
            sim_fail("%s: C and D overlap without being the same matrix", fn);
        if (C == D && cl->ld != dl->ld) sim_fail("%s: in-place C = D with different leading dimensions", fn);
    }
    sim_check_mat(g.D, fn, "D");
    sim_check_batches_disjoint(g.D, fn);
    g.epilogue = d->epilogue == CUBLASLT_EPILOGUE_DEFAULT ? 0 : (int)d->epilogue;
    if (d->epilogue & 4) {
        g.bias = d->bias;
        g.bias_t = d->bias_t == -1 ? dl->type : (cudaDataType_t)d->bias_t;
        g.bias_stride = d->bias_bstride;
        if (nb > 1 && d->bias_bstride < 0) sim_fail("%s: negative BIAS_BATCH_STRIDE", fn);
        sim_check_range(g.bias, ((size_t)(nb - 1) * d->bias_bstride + m) * sim_dtype_size(g.bias_t),
                        "cublasLtMatmul bias (length = rows of D, per batch entry BIAS_BATCH_STRIDE further on)");
    }
    if (d->epilogue & 128) {
        g.aux = d->aux;
        g.aux_ld = d->aux_ld;
        g.aux_t = d->aux_t == -1 ? dl->type : (cudaDataType_t)d->aux_t;
        g.aux_stride = d->aux_bstride;
        SimMat aux{g.aux, g.aux_t, m, n, g.aux_ld, d->aux_bstride, nb};
        if (d->epilogue != CUBLASLT_EPILOGUE_DGELU) sim_check_batches_disjoint(aux, fn);
        sim_check_mat(aux, fn, "epilogue aux");
        sim_check_no_alias(g.D, aux, fn, "epilogue aux");
        if (k > 0 && d->epilogue != CUBLASLT_EPILOGUE_DGELU) {
            sim_check_no_alias(aux, g.A, fn, "A (aux output)");
            sim_check_no_alias(aux, g.B, fn, "B (aux output)");
        }
    }
    sim_run_gemm(g);
    t_sim_host_op = nullptr;
    return CUBLAS_STATUS_SUCCESS;
}

// ================================================================================================
// the definitions of this build's `extern __shared__` arrays (written by simify.py)
#if __has_include("sim_extern_shared.inc")
#include "sim_extern_shared.inc"
#endif

#endif  // CUDA_SIM_H
