// nccl_sim.h: the NCCL subset cuda/multigpu.cuh uses, for the CPU simulator (simify.py rewrites
// `#include <nccl.h>` to this header): the ranks are processes (mpirun, or -pi fs|tcp) that meet in
// one file mapped into each (its path is the ncclUniqueId), so that the GPU trainer's data-parallel
// code runs in CI without GPUs.
//
// Posting a collective never waits, as with NCCL: the rank copies its input into its own ring in
// the file (every rank posts the same collectives with the same sizes, so collective j sits at the
// same ring offset on every rank), counts it in its `posted` counter, and queues it on the stream.
// It finishes when that stream gets to it: after the collectives posted before it (one stream
// runs them in order), and when the default stream waits for it (cuda_sim.h's SIM_STREAM_ORDER:
// the next launch, copy, GEMM or synchronisation, on the default stream or once the default
// stream has waited for an event recorded behind it). cudaStreamQuery(0) says cudaErrorNotReady
// until every rank has posted what it waits for, which is what the trainer's watchdog polls.
// Until a collective finishes its output is not written, so work that reads it without such an
// event reads the rank's own values; and a collective posted on a non-blocking stream that has not
// waited (an event again) for the default stream's work already issued is an error: on a GPU it
// could read its input before that work has written it.
// Finishing, each rank reduces the rings' inputs in rank order into its output (fp32 or fp64 sums,
// ncclAvg then divided by the rank count, bf16 rounded to nearest even once at the end:
// deterministic, the same on every rank) and counts it in its `finished` counter; ring space is
// written again only after every rank has finished the collectives that used it.
// Device pointers must lie in cudaMalloc'd buffers, whole count included (sim_check_range), so a
// rank's ZeRO slice past its buffer fails with the offsets. A blocking wait longer than
// STRUCTGPT_NCCL_TIMEOUT seconds (default 120) ends the process with an error naming the
// collective: a dead rank gives an error, not a hung test (polled through cudaStreamQuery, the
// trainer's own watchdog sees it first).
// Every rank must post the same collectives in the same order (NCCL hangs or corrupts memory
// otherwise): each rank also records what it posted (kind, type, operation, root, count), and a
// collective whose ranks disagree is an error that names both.
// Ring size: SIM_NCCL_RING_MB (default 128) per rank; a larger collective is an error saying so.
// SIM_NCCL_REPORT=1: at ncclCommDestroy each rank prints how many collectives it ran and how many
// of them ran alongside default-stream work (at least one default-stream operation ran between
// their post and their finish): what overlapping communication with computation looks like here.
#pragma once
#include <atomic>
#include <deque>
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

#define SIM_NCCL_MAX_RANKS 64
struct SimNcclHeader {
    std::atomic<unsigned> arrived;     // ranks that have mapped the file (ncclCommInitRank)
    std::atomic<unsigned long> posted[SIM_NCCL_MAX_RANKS];    // collectives each rank has posted
    std::atomic<unsigned long> finished[SIM_NCCL_MAX_RANKS];  // and finished (read every rank's input)
};
// what a rank posted, for the check that every rank posted the same (the last SIM_NCCL_DESCS of
// each rank, after the rings)
struct SimNcclDesc {
    int kind, type, op, root;
    size_t count;
};
#define SIM_NCCL_DESCS 4096
// a collective queued on a stream: posted (input in the ring), not yet finished
struct SimNcclQueued {
    int kind;  // 1 all-reduce, 2 reduce-scatter, 3 all-gather, 4 reduce (to root)
    void *recv;
    size_t count;  // all-reduce, reduce: count; reduce-scatter: recvcount; all-gather: sendcount
    ncclDataType_t type;
    ncclRedOp_t op;
    int root;             // reduce: the rank that gets the result
    cudaStream_t stream;
    unsigned long index;  // which post of the communicator (0, 1, ...)
    bool joined;          // the default stream waits for it
    size_t off, bytes;    // its input in every rank's ring
    unsigned long work;   // g_sim_default_work when posted
    const char *what;
};
struct SimNcclComm {
    int nranks, rank;
    size_t ring_bytes, map_bytes;
    char *base;  // header, then one ring per rank
    char path[128];
    char last_error[256];
    std::deque<SimNcclQueued> queued;  // in posting order
    unsigned long posted;              // collectives posted
    size_t head;                       // where the next input goes in the ring
    unsigned long overlapped;          // finished after default-stream work that was issued after them
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

// Polls done() until it holds, sleeping between polls; after STRUCTGPT_NCCL_TIMEOUT seconds an
// error naming `what` (a rank that died never arrives).
template <class F>
inline ncclResult_t sim_nccl_poll(ncclComm_t comm, F done, const char *what) {
    const double t0 = sim_nccl_now(), limit = sim_nccl_timeout();
    while (!done()) {
        if (sim_nccl_now() - t0 > limit)
            return sim_nccl_fail(comm, ncclRemoteError, "rank %d waited %.0f s in %s for the other ranks", comm->rank, limit, what);
        sched_yield();
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
    return ncclSuccess;
}

inline ncclResult_t ncclCommInitRank(ncclComm_t *out, int nranks, ncclUniqueId id, int rank) {
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks) return sim_nccl_fail(NULL, ncclInvalidArgument, "rank %d of %d", rank, nranks);
    if (nranks > SIM_NCCL_MAX_RANKS) return sim_nccl_fail(NULL, ncclInvalidArgument, "%d ranks: the stand-in has room for %d", nranks, SIM_NCCL_MAX_RANKS);
    const char *mb = getenv("SIM_NCCL_RING_MB");
    SimNcclComm *c = new SimNcclComm();
    c->nranks = nranks;
    c->rank = rank;
    c->ring_bytes = (size_t)(mb && atoi(mb) > 0 ? atoi(mb) : 128) << 20;
    c->map_bytes = 4096 + (size_t)nranks * (c->ring_bytes + SIM_NCCL_DESCS * sizeof(SimNcclDesc));
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
    // every rank has the file mapped before rank 0 removes its name
    std::atomic<unsigned> &arrived = ((SimNcclHeader *)c->base)->arrived;
    arrived.fetch_add(1);
    ncclResult_t r = sim_nccl_poll(c, [&] { return arrived.load() == (unsigned)nranks; }, "ncclCommInitRank");
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
static_assert(sizeof(SimNcclHeader) <= 4096, "nccl_sim: the header's page");
inline char *sim_nccl_ring(ncclComm_t c, int r) { return c->base + 4096 + (size_t)r * c->ring_bytes; }
inline SimNcclDesc *sim_nccl_desc(ncclComm_t c, int r, unsigned long index) {
    return (SimNcclDesc *)(c->base + 4096 + (size_t)c->nranks * c->ring_bytes) + (size_t)r * SIM_NCCL_DESCS + index % SIM_NCCL_DESCS;
}
inline const char *sim_nccl_kind_name(int kind) {
    static const char *const n[] = {"?", "ncclAllReduce", "ncclReduceScatter", "ncclAllGather", "ncclReduce"};
    return kind >= 1 && kind <= 4 ? n[kind] : n[0];
}
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

// Sums element off + i of every rank's input to q, i < count, into recv[i] (ncclAvg: then /
// nranks); in fp32 for fp32 and bf16, as NCCL's kernels for these types, in fp64 for fp64.
inline void sim_nccl_reduce(ncclComm_t c, const SimNcclQueued &q, char *recv, size_t off, size_t count) {
    const bool fp32 = q.type != ncclFloat64;
    for (size_t i = 0; i < count; i++) {
        double acc = sim_nccl_get(sim_nccl_ring(c, 0) + q.off, off + i, q.type);
        for (int r = 1; r < c->nranks; r++) {
            const double v = sim_nccl_get(sim_nccl_ring(c, r) + q.off, off + i, q.type);
            acc = fp32 ? (double)((float)acc + (float)v) : acc + v;
        }
        if (q.op == ncclAvg) acc = fp32 ? (double)((float)acc / (float)c->nranks) : acc / c->nranks;
        sim_nccl_put(recv, i, q.type, acc);
    }
}

// the fewest collectives any rank has posted (which = 0) or finished (which = 1)
inline unsigned long sim_nccl_min(ncclComm_t c, int which) {
    SimNcclHeader *h = (SimNcclHeader *)c->base;
    unsigned long m = ~0ul;
    for (int r = 0; r < c->nranks; r++) {
        unsigned long v = (which ? h->finished[r] : h->posted[r]).load();
        if (v < m) m = v;
    }
    return m;
}
// waits until every rank has posted (which = 0) or finished (which = 1) more than `index` collectives
inline ncclResult_t sim_nccl_wait_all(ncclComm_t c, int which, unsigned long index, const char *what) {
    return sim_nccl_poll(c, [&] { return sim_nccl_min(c, which) > index; }, what);
}

// The queued collectives of the one communicator this process has (the trainer's), finished by
// the streams: see the top of the file. The default stream waits for every queued collective up
// to the last one joined to it (one stream runs them in order).
inline ncclComm_t g_sim_nccl_queued_comm = nullptr;
inline size_t sim_nccl_waited_for(ncclComm_t c, bool all) {  // how many of the queued ones
    if (all) return c->queued.size();
    for (size_t i = c->queued.size(); i > 0; i--)
        if (c->queued[i - 1].joined) return i;
    return 0;
}
inline bool sim_nccl_queued_ready(bool all) {
    ncclComm_t c = g_sim_nccl_queued_comm;
    if (!c) return true;
    const size_t n = sim_nccl_waited_for(c, all);
    return n == 0 || sim_nccl_min(c, 0) > c->queued[n - 1].index;
}
inline void sim_nccl_finish_front(ncclComm_t c) {
    SimNcclQueued q = c->queued.front();
    c->queued.pop_front();
    if (sim_nccl_wait_all(c, 0, q.index, q.what) != ncclSuccess) {
        fflush(stdout);
        fprintf(stderr, "nccl_sim: ERROR: %s; another rank probably died\n", c->last_error);
        exit(EXIT_FAILURE);
    }
    const SimNcclDesc *mine = sim_nccl_desc(c, c->rank, q.index);
    for (int r = 0; r < c->nranks; r++) {
        const SimNcclDesc *o = sim_nccl_desc(c, r, q.index);
        if (o->kind != mine->kind || o->type != mine->type || o->op != mine->op || o->root != mine->root || o->count != mine->count)
            sim_fail("collective #%lu differs between ranks: rank %d posted %s (count %zu, type %d, op %d, root %d), rank %d %s (count %zu, "
                     "type %d, op %d, root %d); every rank must issue the same collectives in the same order",
                     q.index, c->rank, sim_nccl_kind_name(mine->kind), mine->count, mine->type, mine->op, mine->root, r,
                     sim_nccl_kind_name(o->kind), o->count, o->type, o->op, o->root);
    }
    const size_t es = sim_nccl_esize(q.type);
    if (q.kind == 1) sim_nccl_reduce(c, q, (char *)q.recv, 0, q.count);
    if (q.kind == 2) sim_nccl_reduce(c, q, (char *)q.recv, (size_t)c->rank * q.count, q.count);
    if (q.kind == 3)
        for (int k = 0; k < c->nranks; k++) memcpy((char *)q.recv + (size_t)k * q.count * es, sim_nccl_ring(c, k) + q.off, q.count * es);
    if (q.kind == 4 && c->rank == q.root) sim_nccl_reduce(c, q, (char *)q.recv, 0, q.count);
    ((SimNcclHeader *)c->base)->finished[c->rank].store(q.index + 1);
    if (g_sim_default_work > q.work) c->overlapped++;
}
inline void sim_nccl_queued_finish(bool all) {
    ncclComm_t c = g_sim_nccl_queued_comm;
    if (!c) return;
    for (size_t n = sim_nccl_waited_for(c, all); n > 0; n--) sim_nccl_finish_front(c);
}
// events: a stream's mark is the number of collectives posted so far; the default stream waiting
// for an event recorded on s joins s's collectives posted before it
inline unsigned long sim_nccl_queued_mark(cudaStream_t) { return g_sim_nccl_queued_comm ? g_sim_nccl_queued_comm->posted : 0; }
inline void sim_nccl_queued_join(cudaStream_t s, unsigned long mark) {
    ncclComm_t c = g_sim_nccl_queued_comm;
    if (!c) return;
    for (SimNcclQueued &q : c->queued)
        if (q.stream == s && q.index < mark) q.joined = true;
}

// Posts a collective: this rank's input into its ring (once every rank has finished the
// collectives that used that space before), counted as posted, queued; the rest when the stream
// gets to it.
inline ncclResult_t sim_nccl_post(ncclComm_t c, int kind, const void *send, size_t send_bytes, void *recv, size_t recv_bytes, size_t count,
                                  ncclDataType_t t, ncclRedOp_t op, int root, cudaStream_t stream, const char *what) {
    if (!c) return sim_nccl_fail(NULL, ncclInvalidUsage, "%s: no communicator", what);
    if (send_bytes > c->ring_bytes)
        return sim_nccl_fail(c, ncclInvalidUsage, "%s: %zu bytes, more than the simulator's %zu-byte ring (SIM_NCCL_RING_MB)", what,
                             send_bytes, c->ring_bytes);
    sim_check_range(send, send_bytes, what);
    if (recv_bytes) sim_check_range(recv, recv_bytes, what);
    if (!sim_stream_after_default(stream))
        sim_fail("%s on a non-blocking stream that has not waited for the work already issued to the default stream: on a GPU it "
                 "may read its input before that work has written it (cudaEventRecord on the default stream, then "
                 "cudaStreamWaitEvent on the collective's stream)", what);
    if (sim_stream_joins_default(stream)) sim_nccl_queued_finish(false);  // the default stream's earlier work, collectives included
    // 256-byte aligned places one after another, back to the start when the rest of the ring is too
    // short; at that wrap every rank must have finished every collective of the lap before (this
    // rank's queued ones first), which frees the whole ring: the only time a post waits
    const size_t bytes = (send_bytes + 255) / 256 * 256;
    const unsigned long index = c->posted;
    size_t off = c->head;
    if (off + bytes > c->ring_bytes || index >= SIM_NCCL_DESCS && sim_nccl_min(c, 1) + SIM_NCCL_DESCS <= index) {
        off = 0;  // (also when the descriptors would wrap onto one not yet checked everywhere)
        sim_nccl_queued_finish(true);
        if (sim_nccl_wait_all(c, 1, index - 1, what) != ncclSuccess) return ncclRemoteError;
    }
    c->head = off + bytes;
    *sim_nccl_desc(c, c->rank, index) = SimNcclDesc{kind, (int)t, (int)op, root, count};
    memcpy(sim_nccl_ring(c, c->rank) + off, send, send_bytes);
    c->queued.push_back(
        SimNcclQueued{kind, recv, count, t, op, root, stream, index, sim_stream_joins_default(stream), off, bytes, g_sim_default_work, what});
    c->posted++;
    ((SimNcclHeader *)c->base)->posted[c->rank].store(c->posted);
    g_sim_nccl_queued_comm = c;
    g_sim_queued_finish = sim_nccl_queued_finish;
    g_sim_queued_ready = sim_nccl_queued_ready;
    g_sim_queued_mark = sim_nccl_queued_mark;
    g_sim_queued_join = sim_nccl_queued_join;
    return ncclSuccess;
}

inline ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t t, ncclRedOp_t op, ncclComm_t c, cudaStream_t s) {
    const size_t b = count * sim_nccl_esize(t);
    return sim_nccl_post(c, 1, send, b, recv, b, count, t, op, 0, s, "ncclAllReduce");
}
// send holds nranks * recvcount elements; recv gets block `rank` of the reduction
inline ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t recvcount, ncclDataType_t t, ncclRedOp_t op, ncclComm_t c,
                                      cudaStream_t s) {
    const size_t es = sim_nccl_esize(t);
    if (!c) return sim_nccl_fail(NULL, ncclInvalidUsage, "ncclReduceScatter: no communicator");
    return sim_nccl_post(c, 2, send, (size_t)c->nranks * recvcount * es, recv, recvcount * es, recvcount, t, op, 0, s, "ncclReduceScatter");
}
// recv gets every rank's sendcount elements, in rank order
inline ncclResult_t ncclAllGather(const void *send, void *recv, size_t sendcount, ncclDataType_t t, ncclComm_t c, cudaStream_t s) {
    const size_t es = sim_nccl_esize(t);
    if (!c) return sim_nccl_fail(NULL, ncclInvalidUsage, "ncclAllGather: no communicator");
    return sim_nccl_post(c, 3, send, sendcount * es, recv, (size_t)c->nranks * sendcount * es, sendcount, t, ncclSum, 0, s, "ncclAllGather");
}
// root's recv gets the reduction of every rank's send; the other ranks' recv is not touched
inline ncclResult_t ncclReduce(const void *send, void *recv, size_t count, ncclDataType_t t, ncclRedOp_t op, int root, ncclComm_t c,
                               cudaStream_t s) {
    if (!c) return sim_nccl_fail(NULL, ncclInvalidUsage, "ncclReduce: no communicator");
    if (root < 0 || root >= c->nranks) return sim_nccl_fail(c, ncclInvalidArgument, "ncclReduce: root %d of %d ranks", root, c->nranks);
    const size_t b = count * sim_nccl_esize(t);
    return sim_nccl_post(c, 4, send, b, recv, c->rank == root ? b : 0, count, t, op, root, s, "ncclReduce");
}
// a group's collectives run here one after another, which is one order NCCL may run them in
inline ncclResult_t ncclGroupStart() { return ncclSuccess; }
inline ncclResult_t ncclGroupEnd() { return ncclSuccess; }

inline ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    SIM_STREAM_SYNC();
    const char *rep = getenv("SIM_NCCL_REPORT");
    if (comm && rep && atoi(rep))
        fprintf(stderr, "nccl_sim: rank %d: %lu collectives, %lu alongside default-stream work\n", comm->rank, comm->posted, comm->overlapped);
    if (g_sim_nccl_queued_comm == comm) g_sim_nccl_queued_comm = nullptr;
    return sim_nccl_release(comm);
}
inline ncclResult_t ncclCommAbort(ncclComm_t comm) {  // the queued collectives are dropped
    if (g_sim_nccl_queued_comm == comm) g_sim_nccl_queued_comm = nullptr;
    return sim_nccl_release(comm);
}
