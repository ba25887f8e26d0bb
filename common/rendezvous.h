// rendezvous.h: starting N processes without MPI (llm.c's -pn/-pr/-pi/-pf): rank 0 hands a small
// blob (the NCCL unique id) to every other rank through a shared directory (fs) or a TCP socket
// (tcp), with a timeout and a clear error instead of a hang.
//   fs:  -pf DIR        rank 0 writes DIR/structgpt_rendezvous.bin atomically; the others poll for
//                       it, read it and leave DIR/structgpt_rendezvous.ack.RANK; once every rank has
//                       acknowledged, rank 0 removes the files, so a later run never reads a stale id.
//                       (A file left by a crashed rank 0 is ignored when older than 2 minutes
//                       before this rank started, and replaced by the next rank 0.)
//   tcp: -pf HOST:PORT  rank 0 listens on PORT and sends the blob to each rank that connects; the
//                       others connect to HOST:PORT (retrying until the timeout).
#pragma once
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "utils.h"

#define RENDEZVOUS_FILE "structgpt_rendezvous.bin"

static inline double rdv_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static inline void rdv_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static inline void rdv_fs(const char *dir, int rank, int nproc, void *blob, size_t n, double timeout_s) {
    char path[1100], tmp[1200], ack[1200];
    snprintf(path, sizeof(path), "%s/%s", dir, RENDEZVOUS_FILE);
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        fatal("-pf '%s': not a directory; -pi fs needs a directory that every process can read and write", dir);
    double t0 = rdv_now();
    time_t started = time(NULL);
    if (rank == 0) {
        snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid());
        FILE *fp = fopen(tmp, "wb");
        if (!fp) fatal("-pi fs: cannot write '%s' (%s); -pf must be a writable shared directory", tmp, strerror(errno));
        if (fwrite(blob, 1, n, fp) != n || fclose(fp) != 0) fatal("-pi fs: writing '%s' failed (%s)", tmp, strerror(errno));
        if (rename(tmp, path) != 0) fatal("-pi fs: cannot rename '%s' to '%s' (%s)", tmp, path, strerror(errno));
        for (int r = 1; r < nproc; r++) {  // wait for every acknowledgement, then clean up
            snprintf(ack, sizeof(ack), "%s.ack.%d", path, r);
            while (access(ack, F_OK) != 0) {
                if (rdv_now() - t0 > timeout_s)
                    fatal("-pi fs: rank %d did not pick up the id in '%s' within %.0f s; is every process started with -pn %d and the same -pf?",
                          r, path, timeout_s, nproc);
                rdv_sleep_ms(20);
            }
        }
        for (int r = 1; r < nproc; r++) {
            snprintf(ack, sizeof(ack), "%s.ack.%d", path, r);
            remove(ack);
        }
        remove(path);
        return;
    }
    for (;;) {
        struct stat fs;
        int fresh = stat(path, &fs) == 0 && fs.st_mtime >= started - 120;
        FILE *fp = fresh ? fopen(path, "rb") : NULL;
        if (fp) {
            size_t got = fread(blob, 1, n, fp);
            fclose(fp);
            if (got == n) break;
        }
        if (rdv_now() - t0 > timeout_s)
            fatal("-pi fs: rank %d found no id from rank 0 in '%s' within %.0f s; is rank 0 running with the same -pf?", rank, path, timeout_s);
        rdv_sleep_ms(20);
    }
    snprintf(ack, sizeof(ack), "%s.ack.%d", path, rank);
    FILE *fp = fopen(ack, "wb");
    if (!fp || fclose(fp) != 0) fatal("-pi fs: cannot write '%s' (%s)", ack, strerror(errno));
}

// "host:port" -> host (in buf) and port
static inline void rdv_split_addr(const char *addr, char *host, size_t cap, int *port) {
    const char *colon = strrchr(addr, ':');
    char *end;
    long p = colon ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || colon == addr || *end != '\0' || p < 1 || p > 65535 || (size_t)(colon - addr) >= cap)
        fatal("-pf '%s': -pi tcp needs HOST:PORT of rank 0 (e.g. node001:29500)", addr);
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    *port = (int)p;
}

static inline void rdv_io_all(int fd, void *buf, size_t n, int sending, double t0, double timeout_s, const char *what) {
    char *p = (char *)buf;
    size_t done = 0;
    while (done < n) {
        struct pollfd pf = {fd, (short)(sending ? POLLOUT : POLLIN), 0};
        int left_ms = (int)((timeout_s - (rdv_now() - t0)) * 1000);
        if (left_ms <= 0 || poll(&pf, 1, left_ms) <= 0) fatal("-pi tcp: timed out %s after %.0f s", what, timeout_s);
        ssize_t k = sending ? send(fd, p + done, n - done, MSG_NOSIGNAL) : recv(fd, p + done, n - done, 0);
        if (k <= 0) fatal("-pi tcp: connection lost %s (%s)", what, k == 0 ? "closed by the peer" : strerror(errno));
        done += (size_t)k;
    }
}

static inline void rdv_tcp(const char *addr, int rank, int nproc, void *blob, size_t n, double timeout_s) {
    char host[256];
    int port;
    rdv_split_addr(addr, host, sizeof(host), &port);
    double t0 = rdv_now();
    if (rank == 0) {
        int srv = socket(AF_INET, SOCK_STREAM, 0);
        if (srv < 0) fatal("-pi tcp: socket() failed (%s)", strerror(errno));
        int one = 1;
        setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        struct sockaddr_in sa;
        memset(&sa, 0, sizeof(sa));
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_ANY);
        sa.sin_port = htons((uint16_t)port);
        if (bind(srv, (struct sockaddr *)&sa, sizeof(sa)) != 0)
            fatal("-pi tcp: rank 0 cannot listen on port %d (%s); choose a free port in -pf HOST:PORT", port, strerror(errno));
        if (listen(srv, nproc) != 0) fatal("-pi tcp: listen() failed (%s)", strerror(errno));
        for (int served = 1; served < nproc; served++) {
            struct pollfd pf = {srv, POLLIN, 0};
            int left_ms = (int)((timeout_s - (rdv_now() - t0)) * 1000);
            if (left_ms <= 0 || poll(&pf, 1, left_ms) <= 0)
                fatal("-pi tcp: only %d of %d ranks connected to port %d within %.0f s; are all started with -pn %d and -pf %s?", served - 1,
                      nproc - 1, port, timeout_s, nproc, addr);
            int c = accept(srv, NULL, NULL);
            if (c < 0) fatal("-pi tcp: accept() failed (%s)", strerror(errno));
            rdv_io_all(c, blob, n, 1, t0, timeout_s, "sending the id");
            close(c);
        }
        close(srv);
        return;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    char port_s[16];
    snprintf(port_s, sizeof(port_s), "%d", port);
    for (;;) {
        int err = getaddrinfo(host, port_s, &hints, &res);
        if (err == 0) {
            int c = socket(AF_INET, SOCK_STREAM, 0);
            if (c < 0) fatal("-pi tcp: socket() failed (%s)", strerror(errno));
            if (connect(c, res->ai_addr, res->ai_addrlen) == 0) {
                freeaddrinfo(res);
                rdv_io_all(c, blob, n, 0, t0, timeout_s, "receiving the id");
                close(c);
                return;
            }
            close(c);
            freeaddrinfo(res);
        }
        if (rdv_now() - t0 > timeout_s)
            fatal("-pi tcp: rank %d could not reach rank 0 at %s within %.0f s (%s)", rank, addr, timeout_s,
                  err ? gai_strerror(err) : strerror(errno));
        rdv_sleep_ms(50);
    }
}

// Every rank ends with rank 0's n bytes in blob. method: "fs" or "tcp"; where: -pf.
static inline void rendezvous_broadcast(const char *method, const char *where, int rank, int nproc, void *blob, size_t n, double timeout_s) {
    if (nproc <= 1) return;
    if (!where || !where[0]) fatal("-pi %s needs -pf (a shared directory for fs, HOST:PORT of rank 0 for tcp)", method);
    if (strcmp(method, "fs") == 0) rdv_fs(where, rank, nproc, blob, n, timeout_s);
    else if (strcmp(method, "tcp") == 0) rdv_tcp(where, rank, nproc, blob, n, timeout_s);
    else fatal("-pi '%s': unknown init method; use mpi (launched by mpirun), fs or tcp", method);
}
