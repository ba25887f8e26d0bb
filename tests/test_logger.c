// test_logger.c: main.log line formats, truncate vs. append on resume, inactive loggers, directory creation.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "common/logger.h"
#include "tests/check.h"

// Whole file into buf; returns -1 if the file does not exist.
static long slurp(const char *path, char *buf, size_t cap) {
    FILE *fp = fopen(path, "rb");
    if (fp == NULL) { buf[0] = '\0'; return -1; }
    size_t n = fread(buf, 1, cap - 1, fp);
    buf[n] = '\0';
    fclose(fp);
    return (long)n;
}

static int file_is(const char *path, const char *want, const char *name) {
    char got[4096], why[4400];
    slurp(path, got, sizeof(got));
    snprintf(why, sizeof(why), "got:\n%s--- expected:\n%s---", got, want);
    return check_true(strcmp(got, want) == 0, name, why);
}

int main(void) {
    char dir[] = "/tmp/test_logger_XXXXXX";
    if (mkdtemp(dir) == NULL) { perror("mkdtemp"); return 2; }
    char logdir[512], logpath[600];
    snprintf(logdir, sizeof(logdir), "%s/run/sub", dir);  // two missing levels: mkdir -p
    snprintf(logpath, sizeof(logpath), "%s/main.log", logdir);

    Logger l;
    logger_init(&l, logdir, 0, 0);
    check_true(l.active == 1 && strcmp(l.path, logpath) == 0, "init: active, path is <dir>/main.log", l.path);
    struct stat sb;
    check_true(stat(logdir, &sb) == 0 && S_ISDIR(sb.st_mode), "init: creates missing directories", NULL);
    file_is(logpath, "", "init: creates an empty main.log");

    logger_log_val(&l, 0, 10.98766f);
    const MoERouting routed = {1.4321f, 1.0125f, 2.25f, 0.0f}, broken = {NAN, NAN, 4.0f, 0.0f};
    logger_log_train(&l, 1, 10.5f, 6e-4f, 1.234f, NULL, 12345.6f);
    logger_log_train(&l, 2, 9.25f, 5.5e-4f, 0.5f, &routed, 999.4f);
    logger_log_eval(&l, 2, 0.3125f);
    const char *first =
        "s:0 tel:10.9877\n"
        "s:1 trl:10.5000 lr:0.000600 norm:1.23 tok/s:12346\n"
        "s:2 trl:9.2500 lr:0.000550 norm:0.50 aux:1.4321 bal:1.0125 lmax:2.250 lmin:0.000 tok/s:999\n"
        "s:2 eval:0.3125\n";
    file_is(logpath, first, "lines: exact text (aux, balance and loads only for routed models)");

    logger_log_train(&l, 3, 1.0f, 1e-4f, 2.0f, &broken, 1.0f);
    char got[4096];
    slurp(logpath, got, sizeof(got));
    check_true(strstr(got, "s:3 trl:1.0000 lr:0.000100 norm:2.00 aux:nan bal:nan lmax:4.000 lmin:0.000 tok/s:1\n") != NULL, "lines: NaN aux loss is visible", got);

    Logger r;
    logger_init(&r, logdir, 0, 1);
    logger_log_val(&r, 4, 3.5f);
    slurp(logpath, got, sizeof(got));
    check_true(strncmp(got, first, strlen(first)) == 0 && strstr(got, "lmin:0.000 tok/s:1\ns:4 tel:3.5000\n") != NULL,
               "resume=1: appends after the existing lines", got);

    Logger fresh;
    logger_init(&fresh, logdir, 0, 0);
    file_is(logpath, "", "resume=0: truncates main.log");
    logger_log_eval(&fresh, 7, 0.5f);
    file_is(logpath, "s:7 eval:0.5000\n", "resume=0: then writes new lines");

    char otherdir[512], otherpath[600];
    snprintf(otherdir, sizeof(otherdir), "%s/rank1", dir);
    snprintf(otherpath, sizeof(otherpath), "%s/main.log", otherdir);
    Logger in1, in2, in3;
    logger_init(&in1, otherdir, 1, 0);
    logger_init(&in2, NULL, 0, 0);
    logger_init(&in3, "", 0, 0);
    logger_log_val(&in1, 0, 1.0f); logger_log_train(&in1, 0, 1, 1, 1, &routed, 1); logger_log_eval(&in1, 0, 1.0f);
    logger_log_val(&in2, 0, 1.0f); logger_log_val(&in3, 0, 1.0f);
    check_true(!in1.active && !in2.active && !in3.active, "inactive: rank != 0, NULL dir, empty dir", NULL);
    check_true(stat(otherdir, &sb) != 0, "inactive: rank 1 creates no directory", NULL);
    file_is(logpath, "s:7 eval:0.5000\n", "inactive: rank-0 log untouched by inactive loggers");

    // a log dir that cannot be created (a regular file is in the way): non-zero exit naming it
    char blocker[512], baddir[600];
    snprintf(blocker, sizeof(blocker), "%s/afile", dir);
    snprintf(baddir, sizeof(baddir), "%s/afile/logs", dir);
    FILE *fp = fopenCheck(blocker, "w"); fcloseCheck(fp, blocker);
    int fds[2];
    if (pipe(fds) != 0) { perror("pipe"); return 2; }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]); dup2(fds[1], 2);
        Logger bad;
        logger_init(&bad, baddir, 0, 0);
        _exit(0);
    }
    close(fds[1]);
    char err[2048]; size_t n = 0; ssize_t rd;
    while (n + 1 < sizeof(err) && (rd = read(fds[0], err + n, sizeof(err) - 1 - n)) > 0) n += (size_t)rd;
    err[n] = '\0'; close(fds[0]);
    int status; waitpid(pid, &status, 0);
    check_true(WIFEXITED(status) && WEXITSTATUS(status) != 0, "uncreatable log dir: exits non-zero", err);
    check_true(strstr(err, baddir) != NULL, "uncreatable log dir: message names the directory", err);

    unlink(logpath); unlink(blocker);
    snprintf(otherdir, sizeof(otherdir), "%s/run", dir);
    rmdir(logdir); rmdir(otherdir); rmdir(dir);
    return test_summary();
}
