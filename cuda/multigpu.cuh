// cuda/multigpu.cuh: data parallelism over GPUs with NCCL: one process per GPU, started by mpirun
// (MPI passes the NCCL id) or without MPI by -pn/-pr/-pg -pi fs|tcp -pf (common/rendezvous.h);
// gradient averaging (all-reduce, or with ZeRO-1 a reduce onto the rank that owns each slice, then
// AdamW on the rank's slice and an all-gather), started block by block during the backward so that
// it overlaps the backward of the blocks below, host-side collectives for the shared driver, and a
// watchdog that turns a dead rank into an error instead of a hang. Built with USE_NCCL; without it
// there is one process.
#pragma once
#include "common.cuh"
#include "../common/multiproc.h"
#include "../common/rendezvous.h"
#include "../common/zero.h"
#ifdef USE_NCCL
#include <nccl.h>
#endif

typedef struct {
    int active;              // more than one process, NCCL initialised
    int rank, nranks;
    double timeout_s;        // a collective that takes longer means a rank is gone
#ifdef USE_NCCL
    ncclComm_t comm;
    // Every collective runs on this stream, in the order the ranks issue them, ordered after the
    // default stream's work by an event (to_nccl); the default stream waits for it through another
    // (to_main) where it needs the results. Non-blocking, so that the legacy default stream does not
    // wait for the gradient averaging it has not asked for: the backward goes on meanwhile.
    cudaStream_t stream;
    cudaEvent_t to_nccl, to_main;
#endif
    void *host_tmp;          // device staging buffer for host collectives
    size_t host_tmp_bytes;
} MultiGPU;

static MultiGPU g_mgpu;

#ifdef USE_NCCL
static inline void nccl_check(ncclResult_t r, const char *file, int line) {
    if (r != ncclSuccess) {
        fprintf(stderr, "error: NCCL: %s (%s) at %s:%d\n", ncclGetErrorString(r), ncclGetLastError(NULL), file, line);
        exit(EXIT_FAILURE);
    }
}
#define ncclCheck(r) nccl_check((r), __FILE__, __LINE__)

// The next collectives start after the work already queued on the default stream.
static void mgpu_enter(void) {
    cudaCheck(cudaEventRecord(g_mgpu.to_nccl, 0));
    cudaCheck(cudaStreamWaitEvent(g_mgpu.stream, g_mgpu.to_nccl, 0));
}
// The default stream's next work starts after the collectives issued so far.
static void mgpu_leave(void) {
    cudaCheck(cudaEventRecord(g_mgpu.to_main, g_mgpu.stream));
    cudaCheck(cudaStreamWaitEvent(0, g_mgpu.to_main, 0));
}

// Aborts the communicator before this rank exits on an error: the exit's multigpu_finalize must not
// then destroy (or wait on) a communicator that no longer exists.
static void mgpu_abort(void) {
    ncclCommAbort(g_mgpu.comm);
    g_mgpu.active = 0;
}

// Waits for the work queued on the default stream (and the collectives it waits for), watching
// NCCL's asynchronous errors and the clock: a rank that died leaves the others blocked in a
// collective forever, so after timeout_s the communicator is aborted and this rank stops with a
// message.
static void nccl_wait(const char *what) {
    double t0 = now_seconds();
    for (;;) {
        cudaError_t q = cudaStreamQuery(0);
        if (q == cudaSuccess) return;
        if (q != cudaErrorNotReady) cudaCheck(q);
        ncclResult_t async;
        ncclCheck(ncclCommGetAsyncError(g_mgpu.comm, &async));
        if (async != ncclSuccess) {
            fprintf(stderr, "error: NCCL failed during %s: %s (%s); another rank probably died, see its output\n", what,
                    ncclGetErrorString(async), ncclGetLastError(g_mgpu.comm));  // (before the abort frees the communicator)
            mgpu_abort();
            exit(EXIT_FAILURE);
        }
        if (now_seconds() - t0 > g_mgpu.timeout_s) {
            mgpu_abort();
            fprintf(stderr,
                    "error: %s has not finished after %.0f s: another rank has probably died or stalled; stopping this one "
                    "(STRUCTGPT_NCCL_TIMEOUT sets the limit in seconds)\n",
                    what, g_mgpu.timeout_s);
            exit(EXIT_FAILURE);
        }
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
}

static void *mgpu_staging(size_t bytes) {
    if (bytes > g_mgpu.host_tmp_bytes) {
        if (g_mgpu.host_tmp) cudaCheck(cudaFree(g_mgpu.host_tmp));
        g_mgpu.host_tmp = cuda_malloc_named(bytes, "multi-GPU staging buffer");
        g_mgpu.host_tmp_bytes = bytes;
    }
    return g_mgpu.host_tmp;
}

// host collectives for common/multiproc.h, through the GPU
static void mgpu_sum_host(void *buf, size_t n, ncclDataType_t type, size_t esize, const char *what) {
    void *d = mgpu_staging(n * esize);
    cudaCheck(cudaMemcpy(d, buf, n * esize, cudaMemcpyHostToDevice));
    mgpu_enter();
    ncclCheck(ncclAllReduce(d, d, n, type, ncclSum, g_mgpu.comm, g_mgpu.stream));
    mgpu_leave();
    nccl_wait(what);
    cudaCheck(cudaMemcpy(buf, d, n * esize, cudaMemcpyDeviceToHost));
}
static void mgpu_sum_floats(float *buf, size_t n) { mgpu_sum_host(buf, n, ncclFloat, sizeof(float), "a host all-reduce (floats)"); }
static void mgpu_sum_doubles(double *buf, int n) { mgpu_sum_host(buf, (size_t)n, ncclDouble, sizeof(double), "a host all-reduce (doubles)"); }
static void mgpu_barrier(void) {
    float x = 0.0f;
    mgpu_sum_host(&x, 1, ncclFloat, sizeof(float), "a barrier");
}
#endif

// In-place sum over ranks of n device doubles (BTT-MoE routing statistics), queued on the default
// stream: nothing waits here (gpt2_read_loss's multigpu_wait watches it with the rest of the step).
static void multigpu_sum_device_doubles(double *d, int n) {
    if (!g_mgpu.active) return;
#ifdef USE_NCCL
    mgpu_enter();
    ncclCheck(ncclAllReduce(d, d, (size_t)n, ncclDouble, ncclSum, g_mgpu.comm, g_mgpu.stream));
    mgpu_leave();
#else
    (void)d;
    (void)n;
#endif
}

// Waits for the queued work under the watchdog when collectives are in it (more than one rank);
// one process: nothing (the caller's copy waits).
static void multigpu_wait(const char *what) {
#ifdef USE_NCCL
    if (g_mgpu.active) nccl_wait(what);
#else
    (void)what;
#endif
}

// The launch flags of the GPU trainer without MPI (llm.c's): -pn processes, -pr this rank,
// -pg GPUs per node, -pi mpi|fs|tcp, -pf shared directory (fs) or HOST:PORT of rank 0 (tcp).
typedef struct {
    int pn, pr, pg;
    const char *pi, *pf;
} LaunchArgs;

// Picks the GPU (local rank), then, with more than one process (or one, with comm_of_one: tests
// of the collectives on one GPU), creates the NCCL communicator and installs NCCL host collectives
// in mp. With -pi fs|tcp, mp's rank and size come from la.
static void multigpu_init(MultiProc *mp, const LaunchArgs *la, int comm_of_one) {
    int without_mpi = la->pi && (strcmp(la->pi, "fs") == 0 || strcmp(la->pi, "tcp") == 0);
    if (la->pi && !without_mpi && strcmp(la->pi, "mpi") != 0) fatal("-pi '%s': unknown init method; use mpi, fs or tcp", la->pi);
    if (without_mpi) {
        if (la->pn < 1 || la->pr < 0 || la->pr >= la->pn)
            fatal("-pi %s needs -pn <processes> and -pr <rank> with 0 <= rank < processes (got -pn %d -pr %d)", la->pi, la->pn, la->pr);
        if (la->pg < 1) fatal("-pg %d: GPUs per node must be >= 1", la->pg);
        mp->rank = la->pr;
        mp->nproc = la->pn;
        mp->local_rank = la->pr % la->pg;
    } else if (la->pn > 0 && la->pn != mp->nproc) {
        fatal("-pn %d but mpirun started %d processes; with mpirun leave -pn out (or use -pi fs|tcp without mpirun)", la->pn, mp->nproc);
    }
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    int device = err == cudaSuccess && count > 0 ? mp->local_rank % count : 0;
    if (err == cudaSuccess && count > 0 && mp->local_rank >= count)
        fprintf(stderr, "warning: rank %d is local rank %d but this node has %d GPUs; several ranks share GPU %d (NCCL refuses that)\n",
                mp->rank, mp->local_rank, count, device);
    gpu_init(device);
    if (mp->nproc <= 1 && !comm_of_one) return;
#ifdef USE_NCCL
    const char *t = getenv("STRUCTGPT_NCCL_TIMEOUT");
    g_mgpu.timeout_s = t ? atof(t) : 600.0;
    if (g_mgpu.timeout_s <= 0) fatal("STRUCTGPT_NCCL_TIMEOUT='%s' must be a positive number of seconds", t);
    ncclUniqueId id;
    if (mp->rank == 0) ncclCheck(ncclGetUniqueId(&id));
    if (without_mpi) {
        rendezvous_broadcast(la->pi, la->pf, mp->rank, mp->nproc, &id, sizeof(id), g_mgpu.timeout_s);
    } else if (mp->nproc > 1) {  // a communicator of one rank (comm_of_one) already holds its id
#ifdef USE_MPI
        mpiCheck(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
#else
        fatal("internal: more than one process without MPI or -pi fs|tcp");
#endif
    }
    ncclCheck(ncclCommInitRank(&g_mgpu.comm, mp->nproc, id, mp->rank));
    cudaCheck(cudaStreamCreateWithFlags(&g_mgpu.stream, cudaStreamNonBlocking));
    cudaCheck(cudaEventCreateWithFlags(&g_mgpu.to_nccl, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&g_mgpu.to_main, cudaEventDisableTiming));
    g_mgpu.active = 1;
    g_mgpu.rank = mp->rank;
    g_mgpu.nranks = mp->nproc;
    mp->sum_floats = mgpu_sum_floats;
    mp->sum_doubles = mgpu_sum_doubles;
    mp->barrier = mgpu_barrier;
#else
    fatal("%d processes, but this train_gpt2cu was built without NCCL (install NCCL and rebuild: the Makefile finds nccl.h)", mp->nproc);
#endif
}

static void multigpu_finalize(void) {
#ifdef USE_NCCL
    if (g_mgpu.active) {
        cudaCheck(cudaDeviceSynchronize());
        ncclCheck(ncclCommDestroy(g_mgpu.comm));
        cudaCheck(cudaEventDestroy(g_mgpu.to_nccl));
        cudaCheck(cudaEventDestroy(g_mgpu.to_main));
        cudaCheck(cudaStreamDestroy(g_mgpu.stream));
    }
#endif
    if (g_mgpu.host_tmp) cudaCheck(cudaFree(g_mgpu.host_tmp));
    memset(&g_mgpu, 0, sizeof(g_mgpu));
}

// ----------------------------------------------------------------------------------------------
// gradients and weights

// Starts averaging the gradients in ranges r[0..n) (element offsets into grads) over the ranks,
// after the work already queued (the backward that wrote them); nothing waits for it here
// (multigpu_grads_join does). Without ZeRO every rank gets the average; with ZeRO-1 the part of a
// range inside rank k's slice [k * shard, (k + 1) * shard) is reduced onto rank k only, which is
// the reduce-scatter of the whole vector done range by range, and the rest of each rank's
// gradients stays its own.
static void multigpu_average_grad_ranges(floatX *grads, const ParamRange *r, int n, const ZeroShard *z) {
#ifdef USE_NCCL
    if (!g_mgpu.active || n == 0) return;
    mgpu_enter();
    ncclCheck(ncclGroupStart());
    for (int i = 0; i < n; i++) {
        size_t a = r[i].offset, b = r[i].offset + r[i].count;
        if (!z->stage) {
            ncclCheck(ncclAllReduce(grads + a, grads + a, b - a, ncclBfloat16, ncclAvg, g_mgpu.comm, g_mgpu.stream));
            continue;
        }
        for (int k = (int)(a / z->shard); k < g_mgpu.nranks && (size_t)k * z->shard < b; k++) {
            size_t lo = a > (size_t)k * z->shard ? a : (size_t)k * z->shard;
            size_t hi = b < (size_t)(k + 1) * z->shard ? b : (size_t)(k + 1) * z->shard;
            ncclCheck(ncclReduce(grads + lo, grads + lo, hi - lo, ncclBfloat16, ncclAvg, k, g_mgpu.comm, g_mgpu.stream));
        }
    }
    ncclCheck(ncclGroupEnd());
#else
    (void)grads; (void)r; (void)n; (void)z;
#endif
}

// Waits (under the watchdog) for the gradient averaging started so far; the default stream's work
// after this sees the averages.
static void multigpu_grads_join(void) {
#ifdef USE_NCCL
    if (!g_mgpu.active) return;
    mgpu_leave();
    nccl_wait("the gradient averaging");
#endif
}

// ZeRO-1: every rank's slice of buf (bf16 weights or fp32 master weights) to every rank, in place.
static void multigpu_allgather(void *buf, size_t shard, int is_fp32, int rank) {
#ifdef USE_NCCL
    if (!g_mgpu.active) return;
    size_t es = is_fp32 ? sizeof(float) : sizeof(floatX);
    mgpu_enter();
    ncclCheck(ncclAllGather((char *)buf + (size_t)rank * shard * es, buf, shard, is_fp32 ? ncclFloat : ncclBfloat16, g_mgpu.comm, g_mgpu.stream));
    mgpu_leave();
    nccl_wait("the weight all-gather");
#else
    (void)buf; (void)shard; (void)is_fp32; (void)rank;
#endif
}
