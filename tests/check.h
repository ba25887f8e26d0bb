// check.h: the minimal test harness shared by every C test program.
// Each check prints "ok <name>" or "FAIL <name>: <why>"; test_summary() prints
// "N passed, N failed" and returns the exit code. tests/run_all.sh adds the counts up.
#pragma once
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static int g_checks_passed = 0, g_checks_failed = 0;

static inline int check_true(int cond, const char *name, const char *why) {
    if (cond) { g_checks_passed++; printf("ok %s\n", name); }
    else { g_checks_failed++; printf("FAIL %s: %s\n", name, why ? why : "condition false"); }
    fflush(stdout);
    return cond;
}

// Compare two float arrays; passes when every |a-b| <= atol + rtol*|b|. Prints the worst error.
static inline int check_close(const float *a, const float *b, size_t n, float atol, float rtol, const char *name) {
    double maxdiff = 0.0, worst_excess = -1e30;
    size_t wi = 0;
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        double lim = atol + rtol * fabs((double)b[i]);
        if (!(d <= lim)) bad = 1;  // also catches NaN
        if (d > maxdiff) maxdiff = d;
        if (d - lim > worst_excess || d != d) { worst_excess = d - lim; wi = i; }
    }
    if (!bad) {
        g_checks_passed++;
        printf("ok %s (n=%zu, max |diff| %.3g; tol %.1e + %.1e*|ref|)\n", name, n, maxdiff, atol, rtol);
    } else {
        g_checks_failed++;
        printf("FAIL %s: at [%zu] got %.9g expected %.9g, |diff| %.3g > tol %.1e + %.1e*|ref| (max |diff| %.3g)\n", name, wi,
               a[wi], b[wi], fabs((double)a[wi] - (double)b[wi]), atol, rtol, maxdiff);
    }
    fflush(stdout);
    return !bad;
}

// Runs fn(arg) in a forked child, captures the child's stdout (which_fd 1) or stderr (2) into buf
// and returns its exit status (-1 if it was killed): how the tests check that bad input exits
// non-zero with a message naming the file.
static inline int run_child(void (*fn)(const void *), const void *arg, int which_fd, char *buf, size_t cap) {
    int fds[2];
    if (pipe(fds) != 0) { perror("pipe"); exit(2); }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); exit(2); }
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], which_fd);
        fn(arg);
        fflush(stdout);
        _exit(0);
    }
    close(fds[1]);
    size_t n = 0;
    ssize_t r;
    while (n + 1 < cap && (r = read(fds[0], buf + n, cap - 1 - n)) > 0) n += (size_t)r;
    buf[n] = '\0';
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static inline int test_summary(void) {
    printf("%d passed, %d failed\n", g_checks_passed, g_checks_failed);
    return g_checks_failed == 0 ? 0 : 1;
}
