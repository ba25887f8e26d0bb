// fake_nvml.c: a stand-in libnvidia-ml.so.1 with fixed readings, for testing -lg on the CUDA
// simulator (cuda/gpu_monitor.h loads NVML with dlopen, so LD_LIBRARY_PATH picks this one).
// FAKE_NVML_FAIL=power makes the power reading fail as on a GPU that does not report it;
// FAKE_NVML_LOG=<file> receives the PCI address the trainer asked for. Built without the
// clock-reason calls (-DNO_REASONS), or with only their pre-R535 name (-DOLD_REASONS_NAME).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { unsigned int gpu, memory; } util_t;
typedef struct { unsigned long long total, free, used; } mem_t;
static int fail(const char *what) {
    const char *f = getenv("FAKE_NVML_FAIL");
    return f && strcmp(f, what) == 0 ? 3 : 0;  // 3: NVML_ERROR_NOT_SUPPORTED
}
static int the_device;

int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlDeviceGetHandleByPciBusId_v2(const char *bus, void **dev) {
    const char *log = getenv("FAKE_NVML_LOG");
    if (log) {
        FILE *fp = fopen(log, "w");
        if (fp) { fprintf(fp, "%s\n", bus); fclose(fp); }
    }
    *dev = &the_device;
    return 0;
}
int nvmlDeviceGetUtilizationRates(void *d, util_t *u) { u->gpu = 97; u->memory = 55; return 0; }
int nvmlDeviceGetClockInfo(void *d, int type, unsigned int *mhz) { *mhz = type == 1 ? 1755 : 0; return 0; }
int nvmlDeviceGetMaxClockInfo(void *d, int type, unsigned int *mhz) { *mhz = type == 1 ? 1980 : 0; return 0; }
int nvmlDeviceGetPowerUsage(void *d, unsigned int *mw) { *mw = 612345; return fail("power"); }
int nvmlDeviceGetEnforcedPowerLimit(void *d, unsigned int *mw) { *mw = 700000; return 0; }
int nvmlDeviceGetTemperature(void *d, int sensor, unsigned int *c) { *c = sensor == 0 ? 64 : 0; return 0; }
int nvmlDeviceGetTemperatureThreshold(void *d, int kind, unsigned int *c) { *c = kind == 1 ? 87 : 0; return 0; }
int nvmlDeviceGetMemoryInfo(void *d, mem_t *m) {
    m->total = 80ull << 30;
    m->used = 70ull << 30;
    m->free = m->total - m->used;
    return 0;
}
#ifndef NO_REASONS
#ifdef OLD_REASONS_NAME
int nvmlDeviceGetCurrentClocksThrottleReasons(void *d, unsigned long long *r) { *r = 0x1; return 0; }
#else
int nvmlDeviceGetCurrentClocksEventReasons(void *d, unsigned long long *r) { *r = 0x4 | 0x20 | 0x400; return 0; }
#endif
#endif
