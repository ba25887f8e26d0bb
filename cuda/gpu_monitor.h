// gpu_monitor.h: -lg, one line of the GPU's state (utilisation, SM clock, power, temperature,
// memory, clock-limit reasons) through NVML, which is loaded with dlopen only when asked for, so
// that the trainer neither links against the driver's libnvidia-ml nor needs it without -lg.
#pragma once
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

// The few NVML types used here, as nvml.h declares them (the toolkit does not always ship it).
typedef int nvmlReturn_t;  // 0: success
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
enum { NVML_CLOCK_SM = 1, NVML_TEMPERATURE_GPU = 0, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1 };

typedef struct {
    void *lib;
    nvmlDevice_t dev;
    nvmlReturn_t (*shutdown)(void);
    nvmlReturn_t (*utilization)(nvmlDevice_t, nvmlUtilization_t *);
    nvmlReturn_t (*clock)(nvmlDevice_t, int, unsigned int *);
    nvmlReturn_t (*max_clock)(nvmlDevice_t, int, unsigned int *);
    nvmlReturn_t (*power)(nvmlDevice_t, unsigned int *);        // milliwatts
    nvmlReturn_t (*power_limit)(nvmlDevice_t, unsigned int *);  // milliwatts
    nvmlReturn_t (*temperature)(nvmlDevice_t, int, unsigned int *);
    nvmlReturn_t (*temperature_threshold)(nvmlDevice_t, int, unsigned int *);
    nvmlReturn_t (*memory)(nvmlDevice_t, nvmlMemory_t *);
    nvmlReturn_t (*limit_reasons)(nvmlDevice_t, unsigned long long *);
} GpuMonitor;

// Opens NVML for the GPU at this PCI address ("domain:bus:device.0", as cudaDeviceProp gives it).
// Returns 0, or -1 with the reason in err.
static inline int gpu_monitor_open(GpuMonitor *g, const char *pci_bus_id, char *err, size_t errlen) {
    memset(g, 0, sizeof(*g));
    g->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!g->lib) {
        snprintf(err, errlen, "cannot load libnvidia-ml.so.1 (NVML, installed with the NVIDIA driver): %s", dlerror());
        return -1;
    }
    struct { void **fn; const char *names[2]; } syms[] = {
        {(void **)&g->shutdown, {"nvmlShutdown", NULL}},
        {(void **)&g->utilization, {"nvmlDeviceGetUtilizationRates", NULL}},
        {(void **)&g->clock, {"nvmlDeviceGetClockInfo", NULL}},
        {(void **)&g->max_clock, {"nvmlDeviceGetMaxClockInfo", NULL}},
        {(void **)&g->power, {"nvmlDeviceGetPowerUsage", NULL}},
        {(void **)&g->power_limit, {"nvmlDeviceGetEnforcedPowerLimit", NULL}},
        {(void **)&g->temperature, {"nvmlDeviceGetTemperature", NULL}},
        {(void **)&g->temperature_threshold, {"nvmlDeviceGetTemperatureThreshold", NULL}},
        {(void **)&g->memory, {"nvmlDeviceGetMemoryInfo", NULL}},
        // renamed in the R535 drivers; the old name stays for older ones
        {(void **)&g->limit_reasons, {"nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"}},
    };
    for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
        for (int k = 0; k < 2 && syms[i].names[k] && !*syms[i].fn; k++) *syms[i].fn = dlsym(g->lib, syms[i].names[k]);
        if (!*syms[i].fn) {
            snprintf(err, errlen, "libnvidia-ml.so.1 has no %s; is the driver older than NVML's API v2?", syms[i].names[0]);
            dlclose(g->lib);
            g->lib = NULL;
            return -1;
        }
    }
    nvmlReturn_t (*init)(void) = (nvmlReturn_t (*)(void))dlsym(g->lib, "nvmlInit_v2");
    nvmlReturn_t (*by_bus)(const char *, nvmlDevice_t *) = (nvmlReturn_t (*)(const char *, nvmlDevice_t *))dlsym(g->lib, "nvmlDeviceGetHandleByPciBusId_v2");
    nvmlReturn_t rc = -1;
    if (!init || !by_bus || (rc = init()) != 0) {
        snprintf(err, errlen, "NVML did not start (%s, code %d)", init && by_bus ? "nvmlInit_v2" : "nvmlInit_v2 or nvmlDeviceGetHandleByPciBusId_v2 missing", rc);
    } else if ((rc = by_bus(pci_bus_id, &g->dev)) != 0) {
        snprintf(err, errlen, "NVML does not know the GPU at PCI address %s (code %d)", pci_bus_id, rc);
        g->shutdown();
    } else {
        return 0;
    }
    dlclose(g->lib);
    g->lib = NULL;
    return -1;
}

// The clock-limit reasons NVML reports as bits, by name; "none" when no bit is set.
static inline void gpu_monitor_reasons(unsigned long long bits, char *out, size_t n) {
    static const struct { unsigned long long bit; const char *name; } r[] = {
        {0x1, "idle"}, {0x2, "application clocks"}, {0x4, "power cap"}, {0x8, "hw slowdown"}, {0x10, "sync boost"},
        {0x20, "sw thermal"}, {0x40, "hw thermal"}, {0x80, "power brake"}, {0x100, "display clocks"},
    };
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < sizeof(r) / sizeof(r[0]); i++) {
        if (!(bits & r[i].bit)) continue;
        int w = snprintf(out + used, n - used, "%s%s", used ? ", " : "", r[i].name);
        if (w < 0 || (size_t)w >= n - used) return;
        used += (size_t)w;
        bits &= ~r[i].bit;
    }
    if (bits) snprintf(out + used, n - used, "%sother (0x%llx)", used ? ", " : "", bits);
    else if (!used) snprintf(out, n, "none");
}

// One line, each figure "n/a" where this GPU or driver does not report it, e.g.
//   GPU: util 98% | mem bw 61% | SM 1980/1980 MHz | 672/700 W | 61/87 C | 71.3/79.6 GiB | clocks limited by: power cap
static inline void gpu_monitor_line(const GpuMonitor *g, char *out, size_t n) {
    char util[24] = "n/a", bw[24] = "n/a", sm[32] = "n/a", pw[32] = "n/a", temp[32] = "n/a", mem[40] = "n/a", why[160] = "n/a";
    nvmlUtilization_t u;
    unsigned int a, b;
    nvmlMemory_t m;
    unsigned long long bits;
    if (g->utilization(g->dev, &u) == 0) { snprintf(util, sizeof(util), "%u%%", u.gpu); snprintf(bw, sizeof(bw), "%u%%", u.memory); }
    if (g->clock(g->dev, NVML_CLOCK_SM, &a) == 0) {
        if (g->max_clock(g->dev, NVML_CLOCK_SM, &b) == 0) snprintf(sm, sizeof(sm), "%u/%u MHz", a, b);
        else snprintf(sm, sizeof(sm), "%u MHz", a);
    }
    if (g->power(g->dev, &a) == 0) {
        if (g->power_limit(g->dev, &b) == 0) snprintf(pw, sizeof(pw), "%u/%u W", (a + 500) / 1000, (b + 500) / 1000);
        else snprintf(pw, sizeof(pw), "%u W", (a + 500) / 1000);
    }
    if (g->temperature(g->dev, NVML_TEMPERATURE_GPU, &a) == 0) {
        if (g->temperature_threshold(g->dev, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, &b) == 0) snprintf(temp, sizeof(temp), "%u/%u C", a, b);
        else snprintf(temp, sizeof(temp), "%u C", a);
    }
    if (g->memory(g->dev, &m) == 0) snprintf(mem, sizeof(mem), "%.1f/%.1f GiB", m.used / 1073741824.0, m.total / 1073741824.0);
    if (g->limit_reasons(g->dev, &bits) == 0) gpu_monitor_reasons(bits, why, sizeof(why));
    snprintf(out, n, "GPU: util %s | mem bw %s | SM %s | %s | %s | %s | clocks limited by: %s", util, bw, sm, pw, temp, mem, why);
}

static inline void gpu_monitor_close(GpuMonitor *g) {
    if (!g->lib) return;
    g->shutdown();
    dlclose(g->lib);
    g->lib = NULL;
}
