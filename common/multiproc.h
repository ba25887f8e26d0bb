// multiproc.h: data-parallel processes for the trainers: rank, world size and rank on the node,
// and the collectives they need (averaging gradients, summing small statistics, barriers). Built
// with USE_MPI it runs one process per rank under mpirun; without, it is a single process and
// every call is trivial. A trainer whose ranks talk through another library (the GPU trainer's
// NCCL, also when started without MPI by -pi fs|tcp) installs its own host collectives in the
// struct, and everything here then goes through them.
#pragma once
#include <stdlib.h>
#include <string.h>
#include "utils.h"
#ifdef USE_MPI
#define OMPI_SKIP_MPICXX 1   // the C API only (nvcc compiles the GPU trainer as C++)
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

typedef struct {
    int rank;
    int nproc;
    int local_rank;  // rank among the processes on this node (selects the GPU)
    int use_mpi;     // MPI_Init was called (not with -pi fs|tcp)
    // optional host collectives (NULL: MPI's)
    void (*sum_floats)(float *buf, size_t n);
    void (*sum_doubles)(double *buf, int n);
    void (*barrier)(void);
} MultiProc;

#ifdef USE_MPI
static inline void mpi_check(int err, const char *file, int line) {
    if (err != MPI_SUCCESS) {
        char msg[MPI_MAX_ERROR_STRING];
        int len = 0;
        MPI_Error_string(err, msg, &len);
        fprintf(stderr, "error: MPI call failed at %s:%d: %s\n", file, line, msg);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
}
#define mpiCheck(err) mpi_check((err), __FILE__, __LINE__)
#endif

// 1 when the command line asks for a launch without MPI (-pi fs or -pi tcp)
static inline int multiproc_launch_without_mpi(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "-pi") == 0) return strcmp(argv[i + 1], "fs") == 0 || strcmp(argv[i + 1], "tcp") == 0;
    return 0;
}

static inline void multiproc_init(MultiProc *mp, int *argc, char ***argv) {
    memset(mp, 0, sizeof(*mp));
    mp->nproc = 1;
#ifdef USE_MPI
    if (multiproc_launch_without_mpi(*argc, *argv)) return;  // the trainer sets rank and size from -pn/-pr
    mp->use_mpi = 1;
    mpiCheck(MPI_Init(argc, argv));
    // a rank that fails must take the others down instead of leaving them blocked in a collective
    mpiCheck(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &mp->rank));
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &mp->nproc));
    MPI_Comm node;  // the ranks sharing this node's memory: our index among them picks the GPU
    mpiCheck(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, mp->rank, MPI_INFO_NULL, &node));
    mpiCheck(MPI_Comm_rank(node, &mp->local_rank));
    mpiCheck(MPI_Comm_free(&node));
#else
    (void)argc;
    (void)argv;
#endif
}

static inline void multiproc_finalize(MultiProc *mp) {
#ifdef USE_MPI
    if (mp->use_mpi) MPI_Finalize();
#endif
    (void)mp;
}

// In-place average over ranks of n floats (the gradients, a loss).
static inline void multiproc_mean(const MultiProc *mp, float *buf, size_t n) {
    if (mp->nproc == 1) return;
    if (mp->sum_floats) {
        mp->sum_floats(buf, n);
        for (size_t i = 0; i < n; i++) buf[i] /= (float)mp->nproc;
        return;
    }
#ifdef USE_MPI
    const size_t chunk = (size_t)1 << 30;  // MPI counts are ints
    for (size_t i = 0; i < n; i += chunk) {
        int m = (int)(n - i < chunk ? n - i : chunk);
        mpiCheck(MPI_Allreduce(MPI_IN_PLACE, buf + i, m, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
    }
    float inv = 1.0f / (float)mp->nproc;
    for (size_t i = 0; i < n; i++) buf[i] *= inv;
#endif
}

// ZeRO-1 gradients: buf holds nproc * shard floats on every rank; afterwards this rank's slice
// buf[rank * shard, (rank + 1) * shard) is the average over ranks (the rest is stale).
static inline void multiproc_reduce_scatter_mean(const MultiProc *mp, float *buf, size_t shard) {
    if (mp->nproc == 1) return;
#ifdef USE_MPI
    if (shard > (size_t)2147483647) fatal("ZeRO shard of %zu floats exceeds MPI's int count; use more processes", shard);
    float *mine = (float *)mallocCheck(shard * sizeof(float));
    mpiCheck(MPI_Reduce_scatter_block(buf, mine, (int)shard, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
    float inv = 1.0f / (float)mp->nproc, *dst = buf + (size_t)mp->rank * shard;
    for (size_t i = 0; i < shard; i++) dst[i] = mine[i] * inv;
    free(mine);
#else
    (void)buf;
    (void)shard;
#endif
}

// ZeRO-1 weights: every rank's slice buf[r * shard, (r + 1) * shard) to every rank, in place.
static inline void multiproc_allgather(const MultiProc *mp, float *buf, size_t shard) {
    if (mp->nproc == 1) return;
#ifdef USE_MPI
    if (shard > (size_t)2147483647) fatal("ZeRO shard of %zu floats exceeds MPI's int count; use more processes", shard);
    mpiCheck(MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, (int)shard, MPI_FLOAT, MPI_COMM_WORLD));
#else
    (void)buf;
    (void)shard;
#endif
}

// In-place sum over ranks of n doubles (small statistics such as BTT-MoE routing counts).
static inline void multiproc_sum_doubles(const MultiProc *mp, double *buf, int n) {
    if (mp->nproc == 1) return;
    if (mp->sum_doubles) { mp->sum_doubles(buf, n); return; }
#ifdef USE_MPI
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
#else
    (void)buf;
    (void)n;
#endif
}

static inline void multiproc_barrier(const MultiProc *mp) {
    if (mp->nproc > 1 && mp->barrier) { mp->barrier(); return; }
#ifdef USE_MPI
    if (mp->nproc > 1) mpiCheck(MPI_Barrier(MPI_COMM_WORLD));
#endif
    (void)mp;
}

// fatal() ends only this process; under MPI the others would wait forever in the next collective.
static inline void multiproc_abort(const MultiProc *mp) {
#ifdef USE_MPI
    if (mp->nproc > 1 && mp->use_mpi) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
    (void)mp;
}
