// test_rendezvous.c: the launch without MPI (common/rendezvous.h, -pi fs|tcp -pf): forked
// processes as ranks must all receive rank 0's blob through a shared directory and through TCP,
// leave no files behind, and fail with a clear message (not a hang) when a rank is missing or
// the arguments are wrong. "N passed, N failed".
#include <sys/wait.h>
#include "../common/rendezvous.h"
#include "check.h"

#define BLOB 128  // the size of an ncclUniqueId

// Runs nproc ranks as children; each writes what it received to out + rank * BLOB via a pipe.
// Returns the number of ranks that exited 0.
static int g_delay_rank0_ms = 0;  // rank 0 starts this late (the others are already polling)
static int run_ranks(const char *method, const char *where, int nproc, unsigned char *out, double timeout_s) {
    int ok = 0;
    int fds[64][2];
    pid_t pids[64];
    for (int r = 0; r < nproc; r++) {
        if (pipe(fds[r]) != 0) { perror("pipe"); exit(2); }
        fflush(stdout);
        pids[r] = fork();
        if (pids[r] == 0) {
            unsigned char blob[BLOB];
            for (int i = 0; i < BLOB; i++) blob[i] = r == 0 ? (unsigned char)(i * 7 + 3) : 0;
            if (r == 0 && g_delay_rank0_ms) rdv_sleep_ms(g_delay_rank0_ms);
            rendezvous_broadcast(method, where, r, nproc, blob, BLOB, timeout_s);
            if (write(fds[r][1], blob, BLOB) != BLOB) _exit(3);
            _exit(0);
        }
        close(fds[r][1]);
    }
    for (int r = 0; r < nproc; r++) {
        ssize_t got = read(fds[r][0], out + (size_t)r * BLOB, BLOB);
        close(fds[r][0]);
        int st;
        waitpid(pids[r], &st, 0);
        if (got == BLOB && WIFEXITED(st) && WEXITSTATUS(st) == 0) ok++;
    }
    return ok;
}

static int all_equal_rank0(const unsigned char *out, int nproc) {
    for (int r = 0; r < nproc; r++)
        for (int i = 0; i < BLOB; i++)
            if (out[(size_t)r * BLOB + i] != (unsigned char)(i * 7 + 3)) return 0;
    return 1;
}

static int free_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = 0;
    socklen_t len = sizeof(sa);
    if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof(sa)) != 0 || getsockname(s, (struct sockaddr *)&sa, &len) != 0) {
        perror("free_port");
        exit(2);
    }
    close(s);
    return ntohs(sa.sin_port);
}

typedef struct { const char *method, *where; int rank, nproc; double timeout; } Solo;
static void solo(const void *arg) {  // one rank alone: its partners never come
    const Solo *s = (const Solo *)arg;
    unsigned char blob[BLOB] = {0};
    rendezvous_broadcast(s->method, s->where, s->rank, s->nproc, blob, BLOB, s->timeout);
}
static void expect_error(Solo s, const char *must, const char *name) {
    char err[2048];
    int rc = run_child(solo, &s, 2, err, sizeof(err));
    char why[2300];
    snprintf(why, sizeof(why), "exit %d, stderr: %s", rc, err);
    check_true(rc != 0 && strstr(err, must) != NULL, name, why);
}

int main(void) {
    char dir[] = "/tmp/structgpt_rdv_XXXXXX";
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 2; }
    unsigned char out[8 * BLOB];

    memset(out, 0, sizeof(out));
    int ok = run_ranks("fs", dir, 4, out, 10.0);
    check_true(ok == 4 && all_equal_rank0(out, 4), "fs: 4 ranks all receive rank 0's id through the shared directory", "a rank failed or got other bytes");
    char path[1200];
    snprintf(path, sizeof(path), "%s/%s", dir, RENDEZVOUS_FILE);
    int leftovers = access(path, F_OK) == 0;
    for (int r = 1; r < 4; r++) {
        char ack[1300];
        snprintf(ack, sizeof(ack), "%s.ack.%d", path, r);
        leftovers |= access(ack, F_OK) == 0;
    }
    check_true(!leftovers, "fs: rank 0 removes the id and the acknowledgements (no stale id for the next run)", "files left in the directory");
    memset(out, 0, sizeof(out));
    ok = run_ranks("fs", dir, 2, out, 10.0);
    check_true(ok == 2 && all_equal_rank0(out, 2), "fs: a second run in the same directory works", "failed");

    // a stale id left by a crashed run (an hour old) must not be read: rank 0 starts late here
    FILE *fp = fopen(path, "wb");
    for (int i = 0; i < BLOB; i++) fputc(0xEE, fp);
    fclose(fp);
    char cmd[1300];
    snprintf(cmd, sizeof(cmd), "touch -d '1 hour ago' '%s'", path);
    if (system(cmd) != 0) fprintf(stderr, "warning: touch failed\n");
    g_delay_rank0_ms = 300;
    memset(out, 0, sizeof(out));
    ok = run_ranks("fs", dir, 3, out, 10.0);
    g_delay_rank0_ms = 0;
    check_true(ok == 3 && all_equal_rank0(out, 3), "fs: a stale id file from a crashed run is ignored", "a rank read the stale id");

    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", free_port());
    memset(out, 0, sizeof(out));
    ok = run_ranks("tcp", addr, 4, out, 10.0);
    check_true(ok == 4 && all_equal_rank0(out, 4), "tcp: 4 ranks all receive rank 0's id over a socket", "a rank failed or got other bytes");
    snprintf(addr, sizeof(addr), "localhost:%d", free_port());
    memset(out, 0, sizeof(out));
    ok = run_ranks("tcp", addr, 3, out, 10.0);
    check_true(ok == 3 && all_equal_rank0(out, 3), "tcp: a host name (localhost) works too", "failed");

    expect_error((Solo){"fs", dir, 1, 2, 0.3}, "found no id from rank 0", "fs: a rank whose rank 0 never comes stops after the timeout");
    expect_error((Solo){"fs", dir, 0, 3, 0.3}, "did not pick up the id", "fs: rank 0 whose partners never come stops after the timeout");
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", free_port());
    expect_error((Solo){"tcp", addr, 0, 2, 0.3}, "only 0 of 1 ranks connected", "tcp: rank 0 alone stops after the timeout");
    expect_error((Solo){"tcp", addr, 1, 2, 0.3}, "could not reach rank 0", "tcp: a rank that cannot reach rank 0 stops after the timeout");
    expect_error((Solo){"tcp", "node001", 1, 2, 0.3}, "needs HOST:PORT", "tcp: -pf without a port is refused");
    expect_error((Solo){"tcp", "node001:99999", 1, 2, 0.3}, "needs HOST:PORT", "tcp: a port out of range is refused");
    expect_error((Solo){"nfs", dir, 1, 2, 0.3}, "unknown init method", "an unknown -pi method is refused");
    expect_error((Solo){"fs", "/nonexistent/dir", 1, 2, 0.3}, "not a directory", "fs: a -pf that is not a directory is refused");
    expect_error((Solo){"fs", "", 1, 2, 0.3}, "needs -pf", "a missing -pf is refused");
    remove(path);
    rmdir(dir);
    return test_summary();
}
