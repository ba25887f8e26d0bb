// tests/test_cudnn_graph.cpp: what of cuDNN attention (cuda/cudnn_attention.cpp, -fa 2) can be
// checked without a GPU:
//   1. the views the graphs take of the trainer's buffers address exactly the elements the
//      trainer's own attention kernels use (qkv (B, T, 3, NH, HS), out (B, T, NH, HS), lse
//      (B, NH, T)), each once;
//   2. the forward and backward graphs of the shapes the trainer runs pass the cuDNN frontend's
//      validation for an A100 (sm 80) and an H100 (sm 90): tensor dims and types, and the
//      SDPA nodes' rules for that GPU;
//   3. that validation is real: it refuses head sizes cuDNN cannot do (not a multiple of 8; a
//      backward above 128 on sm 80 or above 256 on sm 90), where the trainer falls back to -fa 1;
//   4. cuDNN itself, given an H100's and an A100's device properties (deviceless, as for its
//      ahead-of-time compilation), lowers both graphs, finds engines by its heuristics, and has
//      one that supports each graph on that device; the program says whether the backward's is
//      the deterministic algorithm. cuDNN loads libcuda.so.1 for this: the driver where there is
//      one, else the CUDA toolkit's stub library (lib64/stubs), which is enough here.
// Building the plans (loading kernels) and running them, and their numbers, are test_gpt2cu's
// (-fa 2) on a GPU.
#include "cuda/cudnn_attention.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include <initializer_list>

#include <vector>

#include "tests/check.h"

static char g_name[256];
#define NAME(...) (snprintf(g_name, sizeof(g_name), __VA_ARGS__), g_name)

// the element offset of logical index (b, h, t, d) in a layout
static long long addr(const CudnnAttLayout &l, int b, int h, int t, int d) {
    return l.offset + b * l.stride[0] + h * l.stride[1] + t * l.stride[2] + d * l.stride[3];
}

static void check_layouts(int B, int T, int NH, int HS) {
    const long long C = (long long)NH * HS;
    // qkv: q, k and v together must cover the (B, T, 3C) buffer once, each at the trainer's index
    std::vector<int> hits((size_t)B * T * 3 * C, 0);
    int wrong = 0, bad_dims = 0;
    for (int part = 0; part < 3; part++) {
        CudnnAttLayout l = cudnn_attention_layout((CudnnAttTensor)(CUDNN_ATT_Q + part), B, T, NH, HS);
        if (l.dim[0] != B || l.dim[1] != NH || l.dim[2] != T || l.dim[3] != HS) bad_dims++;
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++)
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < HS; d++) {
                        long long want = ((long long)b * T + t) * 3 * C + part * C + (long long)h * HS + d;  // flash_attention.cuh
                        long long got = addr(l, b, h, t, d);
                        if (got != want) wrong++;
                        if (got >= 0 && got < (long long)hits.size()) hits[got]++;
                    }
    }
    int not_once = 0;
    for (int h : hits) not_once += h != 1;
    check_true(!wrong && !bad_dims && !not_once, NAME("cuDNN views of q, k, v = the trainer's qkv (B, T, 3C) layout, each element once (B=%d T=%d NH=%d HS=%d)", B, T, NH, HS),
               "a view addresses other elements than the trainer's kernels");

    CudnnAttLayout o = cudnn_attention_layout(CUDNN_ATT_OUT, B, T, NH, HS);
    std::vector<int> ohits((size_t)B * T * C, 0);
    wrong = 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++)
                for (int d = 0; d < HS; d++) {
                    long long got = addr(o, b, h, t, d);
                    wrong += got != ((long long)b * T + t) * C + (long long)h * HS + d;
                    if (got >= 0 && got < (long long)ohits.size()) ohits[got]++;
                }
    not_once = 0;
    for (int h : ohits) not_once += h != 1;
    check_true(!wrong && !not_once && o.offset == 0 && o.dim[1] == NH && o.dim[2] == T && o.dim[3] == HS,
               NAME("cuDNN view of out and dout = the trainer's (B, T, C) layout (B=%d T=%d NH=%d HS=%d)", B, T, NH, HS), "wrong view");

    CudnnAttLayout s = cudnn_attention_layout(CUDNN_ATT_STATS, B, T, NH, HS);
    wrong = 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) wrong += addr(s, b, h, t, 0) != ((long long)b * NH + h) * T + t;  // the lse layout
    check_true(!wrong && s.dim[3] == 1 && s.offset == 0, NAME("cuDNN view of stats = the trainer's lse (B, NH, T) layout (B=%d T=%d NH=%d)", B, T, NH),
               "wrong view");
}

static void check_validates(int B, int T, int NH, int HS, int sm, int expect_ok, const char *expect_why, const char *what) {
    char why[1024] = "";
    int ok = cudnn_attention_check(B, T, NH, HS, sm, NULL, NULL, why, sizeof(why));
    if (expect_ok) {
        check_true(ok, NAME("cuDNN attention graphs validate on sm %d: %s (B=%d T=%d NH=%d HS=%d)", sm, what, B, T, NH, HS), why);
    } else {
        char detail[1200];
        snprintf(detail, sizeof(detail), "%s (wanted a refusal mentioning '%s')", ok ? "validated" : why, expect_why);
        check_true(!ok && strstr(why, expect_why) != NULL,
                   NAME("cuDNN refuses on sm %d: %s (B=%d T=%d NH=%d HS=%d): %s", sm, what, B, T, NH, HS, why), detail);
    }
}

// Device properties as cuDNN serializes them (CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION), filled
// with each GPU's cudaGetDeviceProperties values (deviceVer: 100 x the compute capability).
static const char *H100_SXM =
    "{\"deviceName\": \"NVIDIA H100 80GB HBM3\", \"cudaDeviceId\": 0, \"deviceVer\": 900, \"driverVer\": 13000, \"pciDeviceId\": 9008,"
    " \"multiProcessorCount\": 132, \"totalGlobalMem\": 85020000256, \"l2CacheSize\": 52428800, \"smClockRateKHz\": 1980000,"
    " \"memClockRateKHz\": 2619000, \"maxGridSize\": [2147483647, 65535, 65535], \"maxBlockSize\": [1024, 1024, 64],"
    " \"maxThreadsPerBlock\": 1024, \"maxThreadsPerSM\": 2048, \"maxCtasPerSM\": 32, \"warpSize\": 32, \"regsPerBlock\": 65536,"
    " \"maxRegistersPerSM\": 65536, \"maxSharedMemoryPerBlock\": 49152, \"maxSharedMemoryPerBlockOptin\": 232448,"
    " \"reservedSharedMemoryPerBlock\": 1024, \"isTccDriver\": 0, \"supportCoopLaunch\": 1}";
static const char *A100_SXM =
    "{\"deviceName\": \"NVIDIA A100-SXM4-80GB\", \"cudaDeviceId\": 0, \"deviceVer\": 800, \"driverVer\": 13000, \"pciDeviceId\": 8370,"
    " \"multiProcessorCount\": 108, \"totalGlobalMem\": 85097971712, \"l2CacheSize\": 41943040, \"smClockRateKHz\": 1410000,"
    " \"memClockRateKHz\": 1593000, \"maxGridSize\": [2147483647, 65535, 65535], \"maxBlockSize\": [1024, 1024, 64],"
    " \"maxThreadsPerBlock\": 1024, \"maxThreadsPerSM\": 2048, \"maxCtasPerSM\": 32, \"warpSize\": 32, \"regsPerBlock\": 65536,"
    " \"maxRegistersPerSM\": 65536, \"maxSharedMemoryPerBlock\": 49152, \"maxSharedMemoryPerBlockOptin\": 166912,"
    " \"reservedSharedMemoryPerBlock\": 1024, \"isTccDriver\": 0, \"supportCoopLaunch\": 1}";

// libcuda.so.1 for cuDNN's deviceless steps: loaded here (with its soname, so that cuDNN's own
// dlopen finds it) from the driver, else from the toolkit's stubs. Returns where from, or NULL.
static const char *load_libcuda(void) {
    if (dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL)) return "the driver";
    static char path[512];
    const char *roots[] = {getenv("CUDA_HOME"), getenv("CUDA_PATH"), "/usr/local/cuda"};
    for (const char *r : roots) {
        if (!r) continue;
        snprintf(path, sizeof(path), "%s/lib64/stubs/libcuda.so", r);
        if (dlopen(path, RTLD_NOW | RTLD_GLOBAL)) return path;
    }
    return NULL;
}

static void check_deviceless(int B, int T, int NH, int HS, int sm, const char *device, const char *gpu, const char *what) {
    char why[2048] = "";
    int det = 0;
    int ok = cudnn_attention_check(B, T, NH, HS, sm, device, &det, why, sizeof(why));
    if (!ok && strncmp(why, "device properties:", 18) == 0) {  // another cuDNN's serialization, not our graphs
        printf("# skipped: this cuDNN does not take the described %s (%s)\n", gpu, why);
        return;
    }
    check_true(ok, NAME("cuDNN lowers, plans and supports the forward and backward on an %s: %s (B=%d T=%d NH=%d HS=%d)", gpu, what, B, T, NH, HS),
               why);
    if (ok) printf("# %s, %s: the backward is %s%s\n", gpu, what, det ? "cuDNN's deterministic algorithm" : "NOT deterministic: ", det ? "" : why);
}

int main(void) {
    check_layouts(2, 5, 3, 8);
    check_layouts(1, 17, 2, 16);
    check_layouts(3, 4, 4, 64);

    for (int sm = 80; sm <= 90; sm += 10) {
        check_validates(16, 1024, 12, 64, sm, 1, "", "GPT-2 124M, B=16 T=1024");
        check_validates(64, 1024, 12, 64, sm, 1, "", "GPT-2 124M, B=64 T=1024");
        check_validates(16, 1024, 16, 64, sm, 1, "", "GPT-2 350M");
        check_validates(8, 1024, 25, 64, sm, 1, "", "GPT-2 1.5B");
        check_validates(4, 64, 4, 32, sm, 1, "", "a small fixture shape, T=64 HS=32");
        check_validates(2, 7, 2, 8, sm, 1, "", "T=7 HS=8 (dense_small's head size)");
        check_validates(2, 64, 4, 12, sm, 0, "multiple of 8", "head size 12");
    }
    check_validates(2, 64, 2, 256, 90, 1, "", "head size 256");
    check_validates(2, 64, 2, 256, 80, 0, "128", "head size 256 backward");
    check_validates(2, 64, 2, 512, 90, 0, "256", "head size 512 backward");

    const char *libcuda = load_libcuda();
    if (!libcuda) {
        printf("# skipped: cuDNN's deviceless checks (no libcuda.so.1: no driver, and no CUDA toolkit stubs in $CUDA_HOME or /usr/local/cuda)\n");
    } else {
        printf("# libcuda.so.1 for cuDNN: %s\n", libcuda);
        check_deviceless(16, 1024, 12, 64, 90, H100_SXM, "H100", "GPT-2 124M, B=16 T=1024");
        check_deviceless(64, 1024, 12, 64, 90, H100_SXM, "H100", "GPT-2 124M, B=64 T=1024");
        check_deviceless(16, 1024, 16, 64, 90, H100_SXM, "H100", "GPT-2 350M");
        check_deviceless(4, 64, 4, 32, 90, H100_SXM, "H100", "a small fixture shape, T=64 HS=32");
        check_deviceless(16, 1024, 12, 64, 80, A100_SXM, "A100", "GPT-2 124M, B=16 T=1024");
        check_deviceless(16, 1024, 16, 64, 80, A100_SXM, "A100", "GPT-2 350M");
        // the test fixtures' sizes (dev/fixtures: T 7 to 24, head sizes 8 to 64; 12 is refused above),
        // so that test_gpt2cu --cudnn-only runs them on cuDNN rather than skipping them
        for (int hs = 8; hs <= 64; hs *= 2)
            for (int T : {7, 8, 12, 16, 24}) check_deviceless(2, T, 4, hs, 90, H100_SXM, "H100", "a fixture's size");
    }
    return test_summary();
}
