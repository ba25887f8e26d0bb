// stop.h: a graceful stop on SIGTERM, SIGUSR1 or Ctrl-C (SIGINT): the training loop finishes its
// step, writes a checkpoint (with -o) and exits, so that -y 1 carries on as if nothing happened.
//
// Why: a cluster scheduler preempts or times out a job with SIGTERM (SLURM, Kubernetes) or a signal
// asked for ahead of time (`sbatch --signal=USR1@120`), then kills it a grace period later. A step
// is seconds, a checkpoint a few more; everything since the last -n checkpoint would be lost.
// The handler only records the signal (async-signal-safe: a flag and a write(2)); the loop polls
// stop_requested() at each step's end. A second Ctrl-C stops at once, as Ctrl-C usually does.
#pragma once
#include <signal.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t g_stop_signal = 0;

static inline const char *stop_signal_name(int sig) {
    switch (sig) {
        case SIGTERM: return "SIGTERM";
        case SIGINT: return "SIGINT";
        case SIGUSR1: return "SIGUSR1";
        default: return "a signal";
    }
}

static void stop_handler(int sig) {
    if (sig == SIGINT && g_stop_signal != 0) {  // the second Ctrl-C: the default action, now
        signal(SIGINT, SIG_DFL);
        raise(SIGINT);
        return;
    }
    if (g_stop_signal == 0) g_stop_signal = sig;
    const char *name = stop_signal_name(sig);
    const char *msg = ": stopping after this step (checkpoint with -o, then exit; Ctrl-C again stops at once)\n";
    ssize_t rc = write(STDERR_FILENO, "\nreceived ", 10);
    rc = write(STDERR_FILENO, name, strlen(name));
    rc = write(STDERR_FILENO, msg, strlen(msg));
    (void)rc;
}

// From here on SIGTERM, SIGUSR1 and SIGINT ask for a stop instead of killing the process.
static inline void stop_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = stop_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;  // a read or write the signal interrupts carries on
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

// The signal that asked for a stop, or 0.
static inline int stop_requested(void) { return (int)g_stop_signal; }
