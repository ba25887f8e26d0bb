// nccl_sim.h: the NCCL subset cuda/multigpu.cuh uses, for the CPU simulator (simify.py rewrites
// `#include <nccl.h>` to this header): the ranks are processes (mpirun, or -pi fs|tcp) that meet in
// one file mapped into each (its path is the ncclUniqueId), so that the GPU trainer's data-parallel
// code runs in CI without GPUs.
//
// Each collective: every rank copies its input into its own slot of the file and arrives at a
// barrier, and the call returns: the collective is queued on the stream, as NCCL's are. It
// finishes when the stream gets to it (cuda_sim.h's SIM_STREAM_ORDER: the next launch, copy, GEMM
// or synchronisation; cudaStreamQuery says cudaErrorNotReady until every rank has arrived, which
// is what the trainer's watchdog polls): each rank reduces the slots in rank order into its output
// (fp32 or fp64 sums, ncclAvg then divided by the rank count, bf16 rounded to nearest even once at
// the end: deterministic, the same on every rank). One barrier per collective is enough because
// the slots alternate between two sets: a rank writes a set again only after every rank has
// arrived at the next collective's barrier, so after each finished reading it. Once every rank
// has arrived, nothing in the collective waits any more, as with NCCL.
// Device pointers must lie in cudaMalloc'd buffers, whole count included (sim_check_range), so a
// rank's ZeRO slice past its buffer fails with the offsets. A blocking wait longer than
// STRUCTGPT_NCCL_TIMEOUT seconds (default 120) ends the process with an error naming the
// collective: a dead rank gives an error, not a hung test (polled through cudaStreamQuery, the
// trainer's own watchdog sees it first).
// Slot size: SIM_NCCL_SLOT_MB (default 64) per rank; a larger collective is an error saying so.
#pragma once
#include <atomic>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "cuda_sim.h"

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
} ncclResult_t;
// the types and operations the trainer uses (another one does not compile here)
typedef enum { ncclFloat32 = 7, ncclFloat = 7, ncclFloat64 = 8, ncclDouble = 8, ncclBfloat16 = 9 } ncclDataType_t;
typedef enum { ncclSum = 0, ncclAvg = 4 } ncclRedOp_t;
typedef struct { char internal[128]; } ncclUniqueId;

struct SimNcclHeader {
    std::atomic<unsigned> arrived;     // ranks at the current barrier
    std::atomic<unsigned> generation;  // barriers completed
};
// a collective queued on the stream: posted (input in the slot, arrived at the barrier)
struct SimNcclQueued {
    int kind;  // 0 none, 1 all-reduce, 2 reduce-scatter, 3 all-gather
    void *recv;
    size_t count;  // all-reduce: count; reduce-scatter: recvcount; all-gather: sendcount
    ncclDataType_t type;
    ncclRedOp_t op;
    unsigned gen;  // the barrier's generation when this rank arrived
    int set;       // which of the two sets of slots holds the inputs
    const char *what;
};
struct SimNcclComm {
    int nranks, rank;
    size_t slot_bytes, map_bytes;
    char *base;  // header, then two sets of nranks slots
    char path[128];
    char last_error[256];
    SimNcclQueued queued;
    unsigned long posted;  // collectives posted (their parity picks the set of slots)
};
typedef SimNcclComm *ncclComm_t;
inline char g_sim_nccl_error[256];

inline const char *ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclSystemError: return "unhandled system error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        default: return "internal error";
    }
}
inline const char *ncclGetLastError(ncclComm_t comm) { return comm ? comm->last_error : g_sim_nccl_error; }

inline ncclResult_t sim_nccl_fail(ncclComm_t comm, ncclResult_t r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_sim_nccl_error, sizeof(g_sim_nccl_error), fmt, ap);  // ncclGetLastError(NULL): the last error of any
    va_end(ap);
    if (comm) snprintf(comm->last_error, sizeof(comm->last_error), "%s", g_sim_nccl_error);
    return r;
}

inline ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    static int made = 0;
    memset(id, 0, sizeof(*id));
    const char *tmp = getenv("TMPDIR");
    snprintf(id->internal, sizeof(id->internal), "%s/sim_nccl_%d_%d_%ld", tmp && *tmp ? tmp : "/tmp", (int)getpid(), made++, (long)time(NULL));
    return ncclSuccess;
}

inline double sim_nccl_timeout() {
    const char *t = getenv("STRUCTGPT_NCCL_TIMEOUT");
    return t && atof(t) > 0 ? atof(t) : 120.0;
}
inline double sim_nccl_now() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// A barrier over the ranks of comm in two halves: arrive (returns the generation it waits out)
// and passed (whether every rank has arrived since). The last to arrive opens it.
inline unsigned sim_nccl_arrive(ncclComm_t comm) {
    SimNcclHeader *h = (SimNcclHeader *)comm->base;
    const unsigned gen = h->generation.load();
    if (h->arrived.fetch_add(1) + 1 == (unsigned)comm->nranks) {
        h->arrived.store(0);
        h->generation.fetch_add(1);
    }
    return gen;
}
inline bool sim_nccl_passed(ncclComm_t comm, unsigned gen) { return ((SimNcclHeader *)comm->base)->generation.load() != gen; }
inline ncclResult_t sim_nccl_wait(ncclComm_t comm, unsigned gen, const char *what) {
    const double t0 = sim_nccl_now(), limit = sim_nccl_timeout();
    while (!sim_nccl_passed(comm, gen)) {
        if (sim_nccl_now() - t0 > limit)
            return sim_nccl_fail(comm, ncclRemoteError, "rank %d waited %.0f s in %s for the other ranks", comm->rank, limit, what);
        sched_yield();
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
    return ncclSuccess;
}
// every rank of comm: returns once all have arrived
inline ncclResult_t sim_nccl_barrier(ncclComm_t comm, const char *what) { return sim_nccl_wait(comm, sim_nccl_arrive(comm), what); }

inline ncclResult_t ncclCommInitRank(ncclComm_t *out, int nranks, ncclUniqueId id, int rank) {
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks) return sim_nccl_fail(NULL, ncclInvalidArgument, "rank %d of %d", rank, nranks);
    const char *mb = getenv("SIM_NCCL_SLOT_MB");
    SimNcclComm *c = new SimNcclComm();
    c->nranks = nranks;
    c->rank = rank;
    c->slot_bytes = (size_t)(mb && atoi(mb) > 0 ? atoi(mb) : 64) << 20;
    c->map_bytes = 4096 + 2 * (size_t)nranks * c->slot_bytes;
    snprintf(c->path, sizeof(c->path), "%s", id.internal);
    int fd = open(c->path, O_RDWR | O_CREAT, 0600);
    if (fd < 0) return sim_nccl_fail(NULL, ncclSystemError, "open %s: %s", c->path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || ((size_t)st.st_size < c->map_bytes && ftruncate(fd, (off_t)c->map_bytes) != 0)) {
        close(fd);
        return sim_nccl_fail(NULL, ncclSystemError, "sizing %s: %s", c->path, strerror(errno));
    }
    void *m = mmap(NULL, c->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return sim_nccl_fail(NULL, ncclSystemError, "mmap %s: %s", c->path, strerror(errno));
    c->base = (char *)m;
    ncclResult_t r = sim_nccl_barrier(c, "ncclCommInitRank");
    if (r != ncclSuccess) {
        snprintf(g_sim_nccl_error, sizeof(g_sim_nccl_error), "%s", c->last_error);
        return r;
    }
    if (rank == 0) unlink(c->path);  // every rank has it mapped: nothing is left behind
    *out = c;
    return ncclSuccess;
}
inline ncclResult_t sim_nccl_release(ncclComm_t comm) {
    if (!comm) return ncclSuccess;
    munmap(comm->base, comm->map_bytes);
    delete comm;
    return ncclSuccess;
}
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t *r) {
    *r = ncclSuccess;
    return ncclSuccess;
}

inline size_t sim_nccl_esize(ncclDataType_t t) { return t == ncclBfloat16 ? 2 : t == ncclFloat64 ? 8 : 4; }
inline char *sim_nccl_slot(ncclComm_t c, int set, int r) { return c->base + 4096 + ((size_t)set * c->nranks + r) * c->slot_bytes; }
inline double sim_nccl_get(const char *p, size_t i, ncclDataType_t t) {
    switch (t) {
        case ncclBfloat16: return (double)(float)((const __nv_bfloat16 *)p)[i];
        case ncclFloat64: return ((const double *)p)[i];
        default: return (double)((const float *)p)[i];
    }
}
inline void sim_nccl_put(char *p, size_t i, ncclDataType_t t, double v) {
    switch (t) {
        case ncclBfloat16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn((float)v); break;
        case ncclFloat64: ((double *)p)[i] = v; break;
        default: ((float *)p)[i] = (float)v; break;
    }
}

// Sums element off + i of every rank's slot, i < count, into recv[i] (ncclAvg: then / nranks);
// in fp32 for fp32 and bf16, as NCCL's kernels for these types, in fp64 for fp64.
inline void sim_nccl_reduce_slots(ncclComm_t c, int set, char *recv, size_t off, size_t count, ncclDataType_t t, ncclRedOp_t op) {
    const bool fp32 = t != ncclFloat64;
    for (size_t i = 0; i < count; i++) {
        double acc = sim_nccl_get(sim_nccl_slot(c, set, 0), off + i, t);
        for (int r = 1; r < c->nranks; r++) {
            const double v = sim_nccl_get(sim_nccl_slot(c, set, r), off + i, t);
            acc = fp32 ? (double)((float)acc + (float)v) : acc + v;
        }
        if (op == ncclAvg) acc = fp32 ? (double)((float)acc / (float)c->nranks) : acc / c->nranks;
        sim_nccl_put(recv, i, t, acc);
    }
}

// The queued collective of the one communicator this process has (the trainer's), finished by
// the stream: see the top of the file.
inline ncclComm_t g_sim_nccl_queued_comm = nullptr;
inline bool sim_nccl_queued_ready() {
    ncclComm_t c = g_sim_nccl_queued_comm;
    return !c || !c->queued.kind || sim_nccl_passed(c, c->queued.gen);
}
inline void sim_nccl_queued_finish() {
    ncclComm_t c = g_sim_nccl_queued_comm;
    if (!c || !c->queued.kind) return;
    SimNcclQueued q = c->queued;
    c->queued.kind = 0;
    if (sim_nccl_wait(c, q.gen, q.what) != ncclSuccess) {
        fflush(stdout);
        fprintf(stderr, "nccl_sim: ERROR: %s; another rank probably died\n", c->last_error);
        exit(EXIT_FAILURE);
    }
    const size_t es = sim_nccl_esize(q.type);
    if (q.kind == 1) sim_nccl_reduce_slots(c, q.set, (char *)q.recv, 0, q.count, q.type, q.op);
    if (q.kind == 2) sim_nccl_reduce_slots(c, q.set, (char *)q.recv, (size_t)c->rank * q.count, q.count, q.type, q.op);
    if (q.kind == 3)
        for (int k = 0; k < c->nranks; k++) memcpy((char *)q.recv + (size_t)k * q.count * es, sim_nccl_slot(c, q.set, k), q.count * es);
}

// posts a collective: the previous one finished first (stream order), this rank's input into its
// slot of this collective's set, arrived at the barrier; the rest when the stream gets to it
inline ncclResult_t sim_nccl_post(ncclComm_t c, int kind, const void *send, size_t send_bytes, void *recv, size_t recv_bytes, size_t count,
                                  ncclDataType_t t, ncclRedOp_t op, const char *what) {
    if (!c) return sim_nccl_fail(NULL, ncclInvalidUsage, "%s: no communicator", what);
    if (send_bytes > c->slot_bytes)
        return sim_nccl_fail(c, ncclInvalidUsage, "%s: %zu bytes, more than the simulator's %zu-byte slot (SIM_NCCL_SLOT_MB)", what,
                             send_bytes, c->slot_bytes);
    sim_check_range(send, send_bytes, what);
    sim_check_range(recv, recv_bytes, what);
    SIM_STREAM_ORDER();
    const int set = (int)(c->posted++ % 2);
    memcpy(sim_nccl_slot(c, set, c->rank), send, send_bytes);
    c->queued = SimNcclQueued{kind, recv, count, t, op, sim_nccl_arrive(c), set, what};
    g_sim_nccl_queued_comm = c;
    g_sim_queued_finish = sim_nccl_queued_finish;
    g_sim_queued_ready = sim_nccl_queued_ready;
    return ncclSuccess;
}

inline ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t t, ncclRedOp_t op, ncclComm_t c, cudaStream_t) {
    const size_t b = count * sim_nccl_esize(t);
    return sim_nccl_post(c, 1, send, b, recv, b, count, t, op, "ncclAllReduce");
}
// send holds nranks * recvcount elements; recv gets block `rank` of the reduction
inline ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t recvcount, ncclDataType_t t, ncclRedOp_t op, ncclComm_t c,
                                      cudaStream_t) {
    const size_t es = sim_nccl_esize(t);
    if (!c) return sim_nccl_fail(NULL, ncclInvalidUsage, "ncclReduceScatter: no communicator");
    return sim_nccl_post(c, 2, send, (size_t)c->nranks * recvcount * es, recv, recvcount * es, recvcount, t, op, "ncclReduceScatter");
}
// recv gets every rank's sendcount elements, in rank order
inline ncclResult_t ncclAllGather(const void *send, void *recv, size_t sendcount, ncclDataType_t t, ncclComm_t c, cudaStream_t) {
    const size_t es = sim_nccl_esize(t);
    if (!c) return sim_nccl_fail(NULL, ncclInvalidUsage, "ncclAllGather: no communicator");
    return sim_nccl_post(c, 3, send, sendcount * es, recv, (size_t)c->nranks * sendcount * es, sendcount, t, ncclSum, "ncclAllGather");
}

inline ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    SIM_STREAM_ORDER();
    if (g_sim_nccl_queued_comm == comm) g_sim_nccl_queued_comm = nullptr;
    return sim_nccl_release(comm);
}
inline ncclResult_t ncclCommAbort(ncclComm_t comm) {  // the queued collective is dropped
    if (g_sim_nccl_queued_comm == comm) g_sim_nccl_queued_comm = nullptr;
    return sim_nccl_release(comm);
}
