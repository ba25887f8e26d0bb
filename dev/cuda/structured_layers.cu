// dev/cuda/structured_layers.cu: the structured-layer benchmark of issue 5. For each width d and
// layer shape (fc: d -> 4d, the MLP's first layer; sq: d -> d), N = 32768 rows, it times one
// forward + backward (dx and every weight gradient) of the trainer's linear layers on the GPU:
//   dense         matmul_forward + matmul_backward (cuda/matmul.cuh, cuBLASLt)
//   btt_r1/2/4    btt_forward_gpu + btt_backward_gpu, default factors (structured/btt_gpu.cuh)
//   monarch_4     monarch_forward_gpu + monarch_backward_gpu, 4 blocks
//   monarch_sqrt  the same with the largest divisor of d not above sqrt(d) that divides d_out
//   btt_moe_8x2   moe_forward_gpu + moe_backward_gpu, 8 experts, top 2 (router gradient included;
//                 the aux loss is not: daux = 0)
//   *_fused       the structured rows again with the trainer's -sk 1: btt_fused.cuh's one-kernel
//                 forward (BTT-MoE: every expert in one segmented launch, no host wait for the
//                 counts) and the same kernel for the backward's dx and dZ (the transposed BTT,
//                 btt.h), seg_wgrad.cuh for the experts' weight gradients, monarch_fused.cuh's
//                 forward and backward dx for Monarch; only where the kernels support the shape.
//                 A BTT or BTT-MoE row's description gives the kernel's tile rows x groups of
//                 output blocks, forward and backward (btt_tiles.h, bt_choose)
//   *_ws          the BTT and BTT-MoE fused rows with the trainer's -sk 2: btt_fused.cuh's kernel with
//                 each x chunk's slice of W0 staged in shared memory (btt_tiles.h, ws)
//   *_mma         the *_ws rows with the trainer's -sk 5: the same kernel on raw mma.sync, W1 packed
//                 in fragment order before each launch (timed with it)
//                 Monarch has _ws and _mma rows where the trainer runs it on those BTT kernels (nb
//                 divides q: it is a BTT of rank q/nb, monarch.h; the staged kernel takes the shape
//                 within the traffic bound): at 1024 and 4096 its sqrt(d) blocks, rank 1
//   *_split       the BTT rows with the trainer's -sk 3: the fused kernel's stage 1 alone (W0 staged)
//                 writes z (forward) and dZ from dy (backward), cuBLAS does the rest
//   *_zt          the BTT, Monarch and BTT-MoE rows with the trainer's -sk 4: the cuBLAS plans with
//                 z (u) stored transposed, so that no permute of it runs (gpu_plan.h)
//   *_sm          the BTT and Monarch rows as the trainer's -sm 1 runs them: dense GEMMs on the
//                 weight materialized from the cores (st_dense_*), a dense layer's time plus the
//                 materialization's
//   *_sets        the BTT-MoE row with the trainer's -mg 1: its tokens grouped by set of experts,
//                 each set a rank-2 BTT on the plans (structured/moe_sets.cuh)
//   *_sets_ws     the same with -mg 1 -sk 2 (_sets_mma: -sk 5): the set path's forward and
//                 backward dx each one launch of the fused kernel over the sets, the gates applied
//                 between its stages, the sets' weight gradients by seg_wgrad
// No bias anywhere (the PyTorch baseline of dev/bench/structured_torch.py has none either).
// Every row reports, next to the time:
//   FLOPs       2 x spec_forward_macs (structured/spec.h) per row, x 3 for forward + backward
//   FLOP ratio  FLOPs / dense FLOPs of the same shape
//   floor       the roofline floor max(FLOPs / peak bf16, bytes / DRAM bandwidth), the bytes being
//               the least any implementation moves: x, y, dy, dx once each in bf16, plus the
//               weights read and the weight gradients written once (2 bytes each)
//   % of floor  floor / time (100% = at the roofline)
//   vs dense    time / dense time of the same shape (< 1: faster than dense)
// and, before it is timed, the layer's forward on the first CHECK_ROWS rows (for BTT also the
// backward's dx) is compared with the CPU layers (btt.h, monarch.h, moe.h; a plain loop for dense) on the same bf16 inputs: the
// benchmark times the function the trainer computes, not just some kernels of the right size.
//
// Output: a fixed-width table (ms are the mean of -r timed runs after -w untimed ones, CUDA
// events), each row followed by a machine-readable line, which dev/bench/structured.sh joins with
// structured_torch.py's lines of the same d/din/dout/struct (and leaves off the screen):
//   RESULT d=768 din=768 dout=3072 struct=btt_r1 ms=... fwd_ms=... flops=... flop_ratio=...
//          floor_ms=... pct_floor=... vs_dense=... check=ok|FAIL|off
// (one line each; the keys are stable), plus one DEVICE line (name, peak_tflops, gbps, N), a
// RUNNING line before each case and a DONE line at the end. A CUDA error is sticky: the process
// ends there and every later case would fail with it. So the rows print as they come, and where
// DONE is missing structured.sh starts a new process for the rest, without the case named by the
// last RUNNING line (-x).
// Exit status 1 when a forward check failed (the timings are still printed).
//
// Build: make -C dev/cuda structured_layers
// Run:   ./dev/cuda/structured_layers [-d 768,1024,2048,4096] [-s fc,sq] [-n 32768] [-w 3] [-r 20]
//                                     [-k dense,btt_r1,...] [-x btt_r1_mma,...] [-c 0|1] [--probe]
// GPU memory: at most about 10 GB (d = 4096, BTT-MoE); every case frees what it allocated.
#include "harness.cuh"
#include "structured/structured.cuh"

#define CHECK_ROWS 32
#define MAX_DIMS 16
#define MAX_CASES 44  // at most 42: 7 layers, 6 fused ones, 4 with W0 staged, 4 on mma.sync, 3 split, 4 Monarch on the BTT kernels, 6 -sk 4,
                      // 3 by set and 5 dense-executed ones

// ----------------------------------------------------------------------------------------------
// device-side random fill: the large buffers (dy is 1 GiB at d = 4096) never pass through the host

__global__ void fill_uniform_kernel(floatX *p, size_t n, unsigned int seed, float lo, float hi) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned int r = squirrel_noise5((unsigned int)i + 198491317u * (unsigned int)(i >> 32), seed);
        p[i] = (floatX)(lo + (hi - lo) * (float)(r >> 8) * (1.0f / 16777216.0f));
    }
}

static unsigned int g_seed = 1234;
static void fill_uniform(floatX *p, size_t n, float a) {
    size_t blocks = (n + 255) / 256;
    if (blocks > 16384) blocks = 16384;
    fill_uniform_kernel<<<(unsigned)blocks, 256>>>(p, n, g_seed++, -a, a);
    cudaCheckLaunch();
}

static floatX *alloc_bf16(size_t n, const char *what) { return cudaMallocNamed(floatX, n, what); }
static floatX *alloc_random(size_t n, float a, const char *what) {
    floatX *p = alloc_bf16(n, what);
    fill_uniform(p, n, a);
    return p;
}
static floatX *alloc_zero(size_t n, const char *what) {
    floatX *p = alloc_bf16(n, what);
    cudaCheck(cudaMemset(p, 0, n * sizeof(floatX)));
    return p;
}
static void free_dev(void *p) {
    if (p) cudaCheck(cudaFree(p));
}

// ----------------------------------------------------------------------------------------------
// the cases

typedef struct {
    char name[32];  // the RESULT struct= key
    char desc[64];  // factors / blocks, for people
    LinearSpec spec;
    int fused;      // -sk during the case: 1 the fused kernels (btt_fused.cuh, monarch_fused.cuh, seg_wgrad.cuh); 2 W0 staged; 3 split; 4 z transposed; 5 on mma.sync
    int dense;      // the trainer's -sm 1: dense GEMMs on the weight materialized from the cores (st_dense_*)
    int sets;       // the trainer's -mg 1: BTT-MoE's tokens grouped by set of experts (moe_sets.cuh)
} Case;

// The Monarch "sqrt(d)" block count: the largest divisor of d not above sqrt(d) that also
// divides d_out (768 -> 24, 1024 -> 32, 2048 -> 32, 4096 -> 64).
static int monarch_sqrt_blocks(int d, int dout) {
    int best = 1;
    for (int b = 1; (long)b * b <= d; b++)
        if (d % b == 0 && dout % b == 0) best = b;
    return best;
}

static int make_cases(Case *c, int din, int dout) {
    int n = 0;
    memset(c, 0, sizeof(Case) * MAX_CASES);
    // dense
    snprintf(c[n].name, sizeof(c[n].name), "dense");
    snprintf(c[n].desc, sizeof(c[n].desc), "%dx%d", dout, din);
    c[n].spec.kind = STRUCT_DENSE;
    n++;
    // BTT ranks 1, 2, 4 with the default factors
    const int ranks[3] = {1, 2, 4};
    for (int i = 0; i < 3; i++) {
        LinearSpec *s = &c[n].spec;
        s->kind = STRUCT_BTT;
        s->rank = ranks[i];
        default_factors(din, &s->alpha, &s->gamma);
        default_factors(dout, &s->phi, &s->eps);
        snprintf(c[n].name, sizeof(c[n].name), "btt_r%d", ranks[i]);
        snprintf(c[n].desc, sizeof(c[n].desc), "%dx%d>%dx%d r%d", s->alpha, s->gamma, s->phi, s->eps, s->rank);
        n++;
    }
    // Monarch, 4 blocks and ~sqrt(d) blocks
    const int blocks[2] = {4, monarch_sqrt_blocks(din, dout)};
    const char *names[2] = {"monarch_4", "monarch_sqrt"};
    for (int i = 0; i < 2; i++) {
        c[n].spec.kind = STRUCT_MONARCH;
        c[n].spec.blocks = blocks[i];
        snprintf(c[n].name, sizeof(c[n].name), "%s", names[i]);
        snprintf(c[n].desc, sizeof(c[n].desc), "%d blocks", blocks[i]);
        n++;
    }
    // BTT-MoE 8 experts, top 2
    {
        LinearSpec *s = &c[n].spec;
        s->kind = STRUCT_BTT_MOE;
        s->experts = 8;
        s->rank = 8;
        s->topk = 2;
        default_factors(din, &s->alpha, &s->gamma);
        default_factors(dout, &s->phi, &s->eps);
        snprintf(c[n].name, sizeof(c[n].name), "btt_moe_8x2");
        snprintf(c[n].desc, sizeof(c[n].desc), "%dx%d>%dx%d 8/top2", s->alpha, s->gamma, s->phi, s->eps);
        n++;
    }
    // the same layers with the fused kernels, where they support the shape (so a "_fused" row is
    // never the cuBLAS path under another name)
    for (int i = 0, n0 = n; i < n0; i++) {
        const LinearSpec *s = &c[i].spec;
        if (s->kind == STRUCT_DENSE) continue;
        LinearSpec full = *s;
        full.d_in = din;
        full.d_out = dout;
        int ok;
        c[n] = c[i];
        if (s->kind == STRUCT_MONARCH) {
            MonarchShape ms = monarch_shape_of(&full);
            MbGeom g;  // as the trainer's dispatch decides: supported and within the traffic bound
            const int f = monarch_fused_fwd_pays(&ms, btt_fused_smem_limit());
            const int b = monarch_fused_bwd_choose(&g, &ms, btt_fused_smem_limit()) && monarch_fused_bwd_pays(&g, &ms);
            ok = f || b;
            snprintf(c[n].desc, sizeof(c[n].desc), "%d blocks (%s)", s->blocks, f && b ? "fwd+bwd" : f ? "fwd only" : "bwd only");
        } else {
            const BTTShape b = btt_kernel_shape_of(&full);
            const BTTShape bt = btt_shape_transposed(&b);
            BtGeom gf = {}, gb = {};  // the forward's and the backward dx's (transposed) tile rows x groups
            ok = btt_fused_geom(&gf, &b, btt_fused_smem_limit(), 0);
            const int okb = btt_fused_geom(&gb, &bt, btt_fused_smem_limit(), 0);
            char who[16];
            snprintf(who, sizeof(who), s->kind == STRUCT_BTT ? "r%d" : "%d/top%d", s->kind == STRUCT_BTT ? s->rank : s->experts, s->topk);
            if (ok && okb) snprintf(c[n].desc, sizeof(c[n].desc), "%s fwd %dx%d bwd %dx%d", who, gf.tm, gf.npg, gb.tm, gb.npg);
            else if (ok) snprintf(c[n].desc, sizeof(c[n].desc), "%s fwd %dx%d (fwd only)", who, gf.tm, gf.npg);
        }
        if (!ok) continue;
        c[n].fused = 1;
        snprintf(c[n].name, sizeof(c[n].name), "%.24s_fused", c[i].name);
        n++;
    }
    // the fused BTT and BTT-MoE rows again with W0 staged (-sk 2), where that geometry fits too
    for (int i = 0, n0 = n; i < n0; i++) {
        const LinearSpec *s = &c[i].spec;
        if (c[i].fused != 1 || (s->kind != STRUCT_BTT && s->kind != STRUCT_BTT_MOE)) continue;
        LinearSpec full = *s;
        full.d_in = din;
        full.d_out = dout;
        const BTTShape b = btt_kernel_shape_of(&full);
        const BTTShape bt = btt_shape_transposed(&b);
        BtGeom gf = {}, gb = {};
        const int ok = btt_fused_geom_ws(&gf, &b, btt_fused_smem_limit(), 0, 1), okb = btt_fused_geom_ws(&gb, &bt, btt_fused_smem_limit(), 0, 1);
        if (!ok) continue;
        c[n] = c[i];
        c[n].fused = 2;
        char base[40];
        snprintf(base, sizeof(base), "%.31s", c[i].name);
        base[strlen(base) - strlen("_fused")] = '\0';
        snprintf(c[n].name, sizeof(c[n].name), "%.24s_ws", base);
        if (okb) snprintf(c[n].desc, sizeof(c[n].desc), "W0 staged fwd %dx%d bwd %dx%d", gf.tm, gf.npg, gb.tm, gb.npg);
        else snprintf(c[n].desc, sizeof(c[n].desc), "W0 staged fwd %dx%d (fwd only)", gf.tm, gf.npg);
        n++;
        c[n] = c[n - 1];  // the same kernel on mma.sync (-sk 5), in its own geometry (no staging tile)
        c[n].fused = 5;
        snprintf(c[n].name, sizeof(c[n].name), "%.24s_mma", base);
        g_btt_mma = 1;
        BtGeom mf = {}, mb = {};
        const int okm = btt_fused_geom_ws(&mf, &b, btt_fused_smem_limit(), 0, 1), okmb = btt_fused_geom_ws(&mb, &bt, btt_fused_smem_limit(), 0, 1);
        g_btt_mma = 0;
        if (okm && okmb) snprintf(c[n].desc, sizeof(c[n].desc), "mma.sync fwd %dx%d bwd %dx%d", mf.tm, mf.npg, mb.tm, mb.npg);
        else if (okm) snprintf(c[n].desc, sizeof(c[n].desc), "mma.sync fwd %dx%d (fwd only)", mf.tm, mf.npg);
        n += okm;
        if (s->kind != STRUCT_BTT) continue;  // split: BTT's own paths (BTT-MoE's experts run as -sk 2)
        c[n] = c[n - 1];
        c[n].fused = 3;
        snprintf(c[n].name, sizeof(c[n].name), "%.24s_split", base);
        if (okb) snprintf(c[n].desc, sizeof(c[n].desc), "split, stage 1 fwd %dx%d bwd %dx%d", gf.tm, gf.npg, gb.tm, gb.npg);
        else snprintf(c[n].desc, sizeof(c[n].desc), "split, stage 1 fwd %dx%d (fwd only)", gf.tm, gf.npg);
        n++;
    }
    // Monarch on the BTT kernels, W0 staged (-sk 2) and on mma.sync (-sk 5), where the kernel takes the
    // BTT the Monarch is (monarch.h; nb divides q) and its traffic bound holds, as the trainer decides
    for (int i = 0, n0 = n; i < n0; i++) {
        if (c[i].fused || c[i].spec.kind != STRUCT_MONARCH) continue;
        LinearSpec full = c[i].spec;
        full.d_in = din;
        full.d_out = dout;
        const MonarchShape ms = monarch_shape_of(&full);
        for (int sk = 2; sk <= 5; sk += 3) {
            BTTShape b;
            st_set_kernels(sk);
            const int f = monarch_btt_pays(&b, &ms, 0), bw = monarch_btt_pays(&b, &ms, 1);
            st_set_kernels(0);
            if (!f && !bw) continue;
            c[n] = c[i];
            c[n].fused = sk;
            snprintf(c[n].name, sizeof(c[n].name), "%.24s_%s", c[i].name, sk == 2 ? "ws" : "mma");
            snprintf(c[n].desc, sizeof(c[n].desc), "as BTT r%d%s (%s)", ms.q / ms.nb, sk == 5 ? " mma" : "", f && bw ? "fwd+bwd" : f ? "fwd only" : "bwd only");
            n++;
        }
    }
    // every structure on the plans with z (u) stored transposed (-sk 4)
    for (int i = 0, n0 = n; i < n0; i++) {
        if (c[i].fused || !st_kind_tunable(c[i].spec.kind)) continue;
        c[n] = c[i];
        c[n].fused = 4;
        snprintf(c[n].name, sizeof(c[n].name), "%.24s_zt", c[i].name);
        snprintf(c[n].desc, sizeof(c[n].desc), "%.40s, -sk 4", c[i].desc);
        n++;
    }
    // BTT-MoE grouped by set of experts on the plans (-mg 1)
    for (int i = 0, n0 = n; i < n0; i++) {
        if (c[i].fused || c[i].spec.kind != STRUCT_BTT_MOE) continue;
        LinearSpec full = c[i].spec;
        full.d_in = din;
        full.d_out = dout;
        const MoEShape ms = moe_shape_of(&full);
        if (!moe_set_count(&ms)) continue;
        c[n] = c[i];
        c[n].sets = 1;
        snprintf(c[n].name, sizeof(c[n].name), "%.24s_sets", c[i].name);
        snprintf(c[n].desc, sizeof(c[n].desc), "%.32s, %d sets", c[i].desc, moe_set_count(&ms));
        n++;
        // on the fused kernels over the sets, W0 staged (-mg 1 -sk 2) and on mma.sync (-mg 1 -sk 5)
        const BTTShape bk = moe_set_shape(&ms);
        const int si = n - 1;
        for (int mma = 0; mma < 2; mma++) {
            BtGeom gk = {};
            g_btt_mma = mma;
            const int ok = btt_fused_geom_ws(&gk, &bk, btt_fused_smem_limit(), 0, 1);
            g_btt_mma = 0;
            if (!ok) continue;
            c[n] = c[si];
            c[n].fused = mma ? 5 : 2;
            snprintf(c[n].name, sizeof(c[n].name), "%.16s_sets_%s", c[i].name, mma ? "mma" : "ws");
            snprintf(c[n].desc, sizeof(c[n].desc), "%d sets, fused %s fwd %dx%d", moe_set_count(&ms), mma ? "mma.sync" : "W0 staged", gk.tm, gk.npg);
            n++;
        }
    }
    // BTT and Monarch as dense GEMMs on their materialized weight (-sm 1)
    for (int i = 0, n0 = n; i < n0; i++) {
        if (c[i].fused || (c[i].spec.kind != STRUCT_BTT && c[i].spec.kind != STRUCT_MONARCH)) continue;
        c[n] = c[i];
        c[n].dense = 1;
        snprintf(c[n].name, sizeof(c[n].name), "%.24s_sm", c[i].name);
        snprintf(c[n].desc, sizeof(c[n].desc), "%.40s, as dense", c[i].desc);
        n++;
    }
    if (n > MAX_CASES) {
        fprintf(stderr, "structured_layers: internal: %d cases, room for %d (MAX_CASES)\n", n, MAX_CASES);
        exit(1);
    }
    for (int i = 0; i < n; i++) {
        c[i].spec.d_in = din;
        c[i].spec.d_out = dout;
        c[i].spec.bias = 0;
        c[i].spec.lr_mult_on = 1;
    }
    return n;
}

// ----------------------------------------------------------------------------------------------
// forward check on the first rows: the CPU layer on the same bf16 values

static float *download_rows(const floatX *d, size_t n) { return dev_download_bf16(d, n); }

// ----------------------------------------------------------------------------------------------

typedef struct {
    int dims[MAX_DIMS], ndims;
    int shape_fc, shape_sq;
    int N, warmup, reps, check;
    char only[256];  // comma-separated struct names, empty = all
    char skip[2048];  // comma-separated struct names not to run (dense runs regardless)
} Args;

static int parse_list(const char *s, int *out, int cap) {
    int n = 0;
    const char *p = s;
    while (*p && n < cap) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v <= 0 || v > (1 << 20)) fatal("'%s': expected a comma-separated list of positive widths, e.g. 768,1024", s);
        out[n++] = (int)v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') fatal("'%s': expected a comma-separated list of positive widths, e.g. 768,1024", s);
    }
    return n;
}

static int wanted(const Args *a, const char *name) { return (!a->only[0] || list_has(a->only, name)) && !list_has(a->skip, name); }

static void usage(void) {
    printf("usage: structured_layers [-d 768,1024,2048,4096] [-s fc|sq|fc,sq] [-n 32768] [-w 3] [-r 20] [-k NAMES] [-x NAMES] [-c 0|1] [--probe]\n"
           "  -d  widths d;  -s  shapes: fc = d -> 4d (default), sq = d -> d;  -n  rows;  -w/-r  untimed/timed repetitions\n"
           "  -k  only these structures (dense,btt_r1,btt_r2,btt_r4,monarch_4,monarch_sqrt,btt_moe_8x2, and btt_r1_fused ...\n"
           "      monarch_4_fused ... btt_moe_8x2_fused for the fused kernels, btt_r1_ws ... btt_moe_8x2_ws for them with W0\n"
           "      staged, btt_r1_mma ... btt_moe_8x2_mma on mma.sync (-sk 5), btt_r1_split ... btt_r4_split split (-sk 3), btt_r1_zt ... btt_moe_8x2_zt with z\n"
           "      transposed (-sk 4), btt_r1_sm ... monarch_sqrt_sm as dense GEMMs, btt_moe_8x2_sets by set of experts (-mg 1),\n"
           "      btt_moe_8x2_sets_ws and _sets_mma on the fused kernels (-mg 1 -sk 2, 5);\n"
           "      dense always runs)\n"
           "  -x  not these structures (after -k; dense runs regardless)\n"
           "  -c  forward check against the CPU layers on the first %d rows (default 1);  --probe  print the GPU and exit\n",
           CHECK_ROWS);
}

static Args parse_args(int argc, char **argv) {
    Args a;
    memset(&a, 0, sizeof(a));
    a.ndims = parse_list("768,1024,2048,4096", a.dims, MAX_DIMS);
    a.shape_fc = 1;
    a.N = 32768;
    a.warmup = 3;
    a.reps = 20;
    a.check = 1;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (strcmp(f, "-h") == 0 || strcmp(f, "--help") == 0) { usage(); exit(EXIT_SUCCESS); }
        if (strcmp(f, "--probe") == 0) continue;
        if (i + 1 >= argc) fatal("flag %s needs a value (see -h)", f);
        const char *v = argv[++i];
        if (strcmp(f, "-d") == 0) a.ndims = parse_list(v, a.dims, MAX_DIMS);
        else if (strcmp(f, "-s") == 0) {
            a.shape_fc = strstr(v, "fc") != NULL;
            a.shape_sq = strstr(v, "sq") != NULL;
            if (!a.shape_fc && !a.shape_sq) fatal("-s %s: shapes are fc (d -> 4d) and sq (d -> d), e.g. -s fc,sq", v);
        } else if (strcmp(f, "-n") == 0) a.N = atoi(v);
        else if (strcmp(f, "-w") == 0) a.warmup = atoi(v);
        else if (strcmp(f, "-r") == 0) a.reps = atoi(v);
        else if (strcmp(f, "-c") == 0) a.check = atoi(v);
        else if (strcmp(f, "-k") == 0 || strcmp(f, "-x") == 0) {
            char *dst = f[1] == 'k' ? a.only : a.skip;
            const size_t cap = f[1] == 'k' ? sizeof(a.only) : sizeof(a.skip);
            if (strlen(v) >= cap) fatal("%s: the list of names is %zu characters, over the %zu this program keeps", f, strlen(v), cap - 1);
            snprintf(dst, cap, "%s", v);
        }
        else fatal("unknown flag %s (see -h)", f);
    }
    if (a.N < CHECK_ROWS || a.N % 8) fatal("-n %d: rows must be a multiple of 8 and at least %d", a.N, CHECK_ROWS);
    if (a.warmup < 0 || a.reps < 1) fatal("-w %d -r %d: need -w >= 0 and -r >= 1", a.warmup, a.reps);
    for (int i = 0; i < a.ndims; i++)
        if (a.dims[i] % 8) fatal("-d: width %d is not a multiple of 8 (bf16 GEMMs and 128-bit loads need it)", a.dims[i]);
    return a;
}

// The shared row buffers of one (d_in, d_out) shape.
typedef struct {
    int N, din, dout;
    floatX *x, *y, *dy, *dx;
} Rows;

// Times one case (forward alone, then forward + backward); checks its forward first. Returns 1
// when the check passed (or was off).
static int run_case(const Case *cs, const Rows *r, const Args *a, float *fwd_ms, float *ms, int *checked) {
    const LinearSpec *sp = &cs->spec;
    const int N = r->N, din = r->din, dout = r->dout, CR = CHECK_ROWS;
    const int check = a->check;
    st_set_kernels(cs->fused);
    float *cx = NULL, *ref = (float *)callocCheck((size_t)CR * dout, sizeof(float)), *gpu = NULL;
    int *skip = NULL, ok = 1;
    double worst = 0.0;
    if (check) cx = download_rows(r->x, (size_t)CR * din);
    char what[128];
    snprintf(what, sizeof(what), "%s %d->%d", cs->name, din, dout);

    if (sp->kind == STRUCT_DENSE) {
        const size_t nw = (size_t)dout * din;
        floatX *W = alloc_random(nw, sqrtf(3.0f / din), "dense W"), *dW = alloc_zero(nw, "dense dW");
        auto fwd = [&]() { matmul_forward(r->y, r->x, W, NULL, N, din, dout, NULL); };
        auto step = [&]() {
            fwd();
            matmul_backward(r->dx, dW, NULL, r->dy, r->x, W, N, din, dout, NULL, NULL);
        };
        if (check) {
            fwd();
            cudaCheck(cudaDeviceSynchronize());
            float *w = dev_download_bf16(W, nw);
            for (int i = 0; i < CR; i++)
                for (int o = 0; o < dout; o++) {
                    double s = 0.0;
                    const float *xr = cx + (size_t)i * din, *wr = w + (size_t)o * din;
                    for (int k = 0; k < din; k++) s += (double)xr[k] * wr[k];
                    ref[(size_t)i * dout + o] = (float)s;
                }
            free(w);
            gpu = download_rows(r->y, (size_t)CR * dout);
            ok = dev_check_rows(what, gpu, ref, CR, dout, NULL, &worst);
        }
        *fwd_ms = dev_time_ms(fwd, a->warmup, a->reps);
        *ms = dev_time_ms(step, a->warmup, a->reps);
        free_dev(W); free_dev(dW);
    } else if (sp->kind == STRUCT_BTT) {
        const BTTShape s = btt_shape_of(sp);
        const size_t n0 = btt_w0_size(&s), n1 = btt_w1_size(&s), zrow = btt_z_row(&s);
        floatX *W0 = alloc_random(n0, sqrtf(3.0f / s.alpha), "BTT W0"), *W1 = alloc_random(n1, sqrtf(3.0f / (s.gamma * s.rank)), "BTT W1");
        floatX *dW0 = alloc_zero(n0, "BTT dW0"), *dW1 = alloc_zero(n1, "BTT dW1");
        floatX *z = alloc_bf16((size_t)N * zrow, "BTT saved z");
        const size_t se = cs->dense ? btt_dense_elems(&s) : btt_gpu_scratch_elems(&s, N);
        floatX *scratch = alloc_bf16(se, "BTT scratch");  // the backward's; the forward uses a part
        auto fwd = [&]() {
            if (cs->dense) st_dense_forward(r->y, NULL, r->x, W0, W1, NULL, N, STRUCT_BTT, &s, scratch);
            else btt_forward_gpu(r->y, z, r->x, W0, W1, NULL, N, &s, scratch);
        };
        auto step = [&]() {
            fwd();
            if (cs->dense) st_dense_backward(r->dx, dW0, dW1, NULL, r->dy, r->x, W0, W1, N, STRUCT_BTT, &s, scratch, NULL, NULL);
            else btt_backward_gpu(r->dx, dW0, dW1, NULL, r->dy, r->x, z, W0, W1, N, &s, scratch, NULL);
        };
        if (check) {
            fwd();
            cudaCheck(cudaDeviceSynchronize());
            float *w0 = dev_download_bf16(W0, n0), *w1 = dev_download_bf16(W1, n1);
            float *cz = (float *)mallocCheck(sizeof(float) * zrow * CR);
            btt_forward(ref, cz, cx, w0, w1, NULL, CR, &s);
            gpu = download_rows(r->y, (size_t)CR * dout);
            ok = dev_check_rows(what, gpu, ref, CR, dout, NULL, &worst);
            // the backward's dx too (row by row, so CR rows of dy give CR rows of dx): with -sk 1 it
            // is the fused transposed BTT
            step();
            cudaCheck(cudaDeviceSynchronize());
            float *cdy = download_rows(r->dy, (size_t)CR * dout), *gdx = download_rows(r->dx, (size_t)CR * din);
            float *rdx = (float *)mallocCheck(sizeof(float) * (size_t)CR * din), *scr = (float *)mallocCheck(sizeof(float) * btt_scratch_size(&s, CR));
            float *t0 = (float *)callocCheck(n0, sizeof(float)), *t1 = (float *)callocCheck(n1, sizeof(float));
            btt_backward(rdx, t0, t1, NULL, cdy, cx, cz, w0, w1, CR, &s, scr);
            char what_dx[160];
            snprintf(what_dx, sizeof(what_dx), "%s dx", what);
            double worst_dx = 0.0;
            ok = dev_check_rows(what_dx, gdx, rdx, CR, din, NULL, &worst_dx) && ok;
            free(w0); free(w1); free(cz); free(cdy); free(gdx); free(rdx); free(scr); free(t0); free(t1);
        }
        *fwd_ms = dev_time_ms(fwd, a->warmup, a->reps);
        *ms = dev_time_ms(step, a->warmup, a->reps);
        free_dev(W0); free_dev(W1); free_dev(dW0); free_dev(dW1); free_dev(z); free_dev(scratch);
    } else if (sp->kind == STRUCT_MONARCH) {
        const MonarchShape m = monarch_shape_of(sp);
        const size_t nr = monarch_r_size(&m), nl = monarch_l_size(&m), urow = monarch_u_row(&m);
        floatX *R = alloc_random(nr, sqrtf(3.0f / m.p), "Monarch R"), *L = alloc_random(nl, sqrtf(3.0f / m.q), "Monarch L");
        floatX *dR = alloc_zero(nr, "Monarch dR"), *dL = alloc_zero(nl, "Monarch dL");
        floatX *u = alloc_bf16((size_t)N * urow, "Monarch saved u");
        const size_t se = cs->dense ? monarch_dense_elems(&m) : monarch_gpu_scratch_elems(&m, N);
        floatX *scratch = alloc_bf16(se, "Monarch scratch");  // the forward's and the backward's
        auto fwd = [&]() {
            if (cs->dense) st_dense_forward(r->y, NULL, r->x, R, L, NULL, N, STRUCT_MONARCH, &m, scratch);
            else monarch_forward_gpu(r->y, u, r->x, R, L, NULL, N, &m, scratch);
        };
        auto step = [&]() {
            fwd();
            if (cs->dense) st_dense_backward(r->dx, dR, dL, NULL, r->dy, r->x, R, L, N, STRUCT_MONARCH, &m, scratch, NULL, NULL);
            else monarch_backward_gpu(r->dx, dR, dL, NULL, r->dy, r->x, u, R, L, N, &m, scratch, NULL);
        };
        if (check) {
            fwd();
            cudaCheck(cudaDeviceSynchronize());
            float *hr = dev_download_bf16(R, nr), *hl = dev_download_bf16(L, nl);
            float *cu = (float *)mallocCheck(sizeof(float) * urow * CR);
            monarch_forward(ref, cu, cx, hr, hl, NULL, CR, &m);
            free(hr); free(hl); free(cu);
            gpu = download_rows(r->y, (size_t)CR * dout);
            ok = dev_check_rows(what, gpu, ref, CR, dout, NULL, &worst);
        }
        *fwd_ms = dev_time_ms(fwd, a->warmup, a->reps);
        *ms = dev_time_ms(step, a->warmup, a->reps);
        free_dev(R); free_dev(L); free_dev(dR); free_dev(dL); free_dev(u); free_dev(scratch);
    } else {
        const MoEShape s = moe_shape_of(sp);
        const int E = s.experts, K = s.topk;
        const size_t n0 = btt_w0_size(&s.btt), n1 = btt_w1_size(&s.btt), nrt = moe_router_size(&s);
        floatX *W0 = alloc_random(n0, sqrtf(3.0f / s.btt.alpha), "BTT-MoE W0");
        floatX *W1 = alloc_random(n1, sqrtf(3.0f / s.btt.gamma), "BTT-MoE W1");  // per expert: rank 1
        floatX *Rt = alloc_random(nrt, sqrtf(3.0f / din), "BTT-MoE router");
        floatX *dW0 = alloc_zero(n0, "BTT-MoE dW0"), *dW1 = alloc_zero(n1, "BTT-MoE dW1"), *dRt = alloc_zero(nrt, "BTT-MoE drouter");
        MoEGPUState st;
        memset(&st, 0, sizeof(st));
        g_moe_sets = cs->sets;  // the state and scratch with the set path's arrays (-mg 1)
        moe_gpu_state_alloc(&st, &s, N, "structured_layers");
        cudaCheck(cudaMemset(st.fhat, 0, (size_t)E * sizeof(float)));  // unused with daux = 0
        MoEGPUScratch sc;
        floatX *mem = alloc_bf16(moe_gpu_scratch_elems(&s, N), "BTT-MoE scratch");
        float *fmem = cudaMallocNamed(float, moe_gpu_scratch_floats(&s, N), "BTT-MoE fp32 scratch");
        moe_gpu_scratch_bind(&sc, &st, &s, N, mem, fmem);
        auto fwd = [&]() { moe_forward_gpu(r->y, &st, &sc, r->x, W0, W1, Rt, NULL, N, &s); };
        auto step = [&]() {
            fwd();
            moe_backward_gpu(r->dx, dW0, dW1, dRt, NULL, r->dy, 0.0f, r->x, &st, &sc, W0, W1, Rt, &s, NULL);
        };
        if (check) {
            fwd();
            cudaCheck(cudaDeviceSynchronize());
            float *w0 = dev_download_bf16(W0, n0), *w1 = dev_download_bf16(W1, n1), *hr = dev_download_bf16(Rt, nrt);
            MoEState cst;
            moe_state_alloc(&cst, &s, CR);
            moe_forward(ref, &cst, cx, w0, w1, hr, NULL, CR, &s);
            int *gsel = (int *)mallocCheck(sizeof(int) * (size_t)CR * K);
            cudaCheck(cudaMemcpy(gsel, st.sel, sizeof(int) * (size_t)CR * K, cudaMemcpyDeviceToHost));
            skip = (int *)callocCheck(CR, sizeof(int));
            int nskip = 0;
            for (int i = 0; i < CR; i++)
                for (int k = 0; k < K; k++)
                    if (gsel[i * K + k] != cst.sel[i * K + k]) { skip[i] = 1; }
            for (int i = 0; i < CR; i++) nskip += skip[i];
            if (nskip) printf("note %s: %d of %d checked rows route differently on the CPU (near-tied logits); not compared\n", what, nskip, CR);
            if (nskip > CR / 4) { printf("FAIL %s: too many routing differences\n", what); ok = 0; }
            free(gsel); free(w0); free(w1); free(hr);
            moe_state_free(&cst);
            gpu = download_rows(r->y, (size_t)CR * dout);
            ok = dev_check_rows(what, gpu, ref, CR, dout, skip, &worst) && ok;
        }
        *fwd_ms = dev_time_ms(fwd, a->warmup, a->reps);
        *ms = dev_time_ms(step, a->warmup, a->reps);
        free_dev(W0); free_dev(W1); free_dev(Rt); free_dev(dW0); free_dev(dW1); free_dev(dRt); free_dev(mem); free_dev(fmem);
        moe_gpu_state_free(&st);
        g_moe_sets = 0;
    }
    cudaCheck(cudaDeviceSynchronize());
    st_set_kernels(0);
    *checked = check;
    free(cx); free(ref); free(gpu); free(skip);
    return ok;
}

int main(int argc, char **argv) {
    int probe = 0;
    for (int i = 1; i < argc; i++) probe |= strcmp(argv[i], "--probe") == 0;
    Args a = parse_args(argc, argv);
    gpu_init(0);
    if (probe) {
        printf("GPU: %s (compute capability %d.%d, %.1f GiB)\n", g_gpu.prop.name, g_gpu.prop.major, g_gpu.prop.minor,
               g_gpu.prop.totalGlobalMem / 1073741824.0);
        return EXIT_SUCCESS;
    }
    // a stand-in for a sticky CUDA error in one case, for tests/test_bench_table.sh's check of the rerun
    const char *fail_at = getenv("STRUCTURED_LAYERS_FAIL_AT");
    const double peak_tf = gpu_peak_bf16_tflops(g_gpu.prop.name), gbps = dev_peak_gbps();
    const double peak = peak_tf * 1e12, bw = gbps * 1e9;
    printf("structured_layers: forward + backward (dx and every weight gradient) of one linear layer, N = %d rows,\n"
           "bf16 storage, fp32 accumulation, no bias; mean of %d timed runs after %d untimed\n",
           a.N, a.reps, a.warmup);
    printf("device: %s | peak bf16 %.0f TFLOP/s (table; 0 = unknown: floor from bytes only) | DRAM %.0f GB/s (properties)\n",
           g_gpu.prop.name, peak_tf, gbps);
    printf("DEVICE name=\"%s\" peak_tflops=%.1f gbps=%.1f N=%d\n", g_gpu.prop.name, peak_tf, gbps, a.N);
    printf("floor = max(FLOPs / peak, bytes / bandwidth), bytes = x, y, dy, dx once + weights read and gradients written once (bf16);\n"
           "%% of floor = floor / time; vs dense = time / dense time; check = forward vs the CPU layer on the first %d rows\n\n",
           CHECK_ROWS);
    printf("%5s %-12s %-18s %-22s %9s %10s %9s %7s %9s %8s %8s %5s\n", "d", "shape", "structure", "layout", "fwd ms", "fwd+bwd ms",
           "GFLOP", "FLOP/d", "floor ms", "%floor", "vs dense", "check");

    int fails = 0;
    for (int di = 0; di < a.ndims; di++) {
        const int d = a.dims[di];
        for (int sh = 0; sh < 2; sh++) {
            if ((sh == 0 && !a.shape_fc) || (sh == 1 && !a.shape_sq)) continue;
            Rows r;
            r.N = a.N;
            r.din = d;
            r.dout = sh == 0 ? 4 * d : d;
            r.x = alloc_random((size_t)r.N * r.din, 1.0f, "x");
            r.dy = alloc_random((size_t)r.N * r.dout, 1.0f, "dy");
            r.y = alloc_bf16((size_t)r.N * r.dout, "y");
            r.dx = alloc_bf16((size_t)r.N * r.din, "dx");
            Case cases[MAX_CASES];
            const int nc = make_cases(cases, r.din, r.dout);
            double dense_flops = 0.0;
            float dense_ms = 0.0f;
            char shape[32];
            snprintf(shape, sizeof(shape), "%d->%d", r.din, r.dout);
            for (int ci = 0; ci < nc; ci++) {
                const Case *cs = &cases[ci];
                if (ci > 0 && !wanted(&a, cs->name)) continue;
                // which case a process that dies here died in (structured.sh runs the rest anew)
                printf("RUNNING d=%d din=%d dout=%d struct=%s\n", d, r.din, r.dout, cs->name);
                fflush(stdout);
                if (fail_at && strcmp(fail_at, cs->name) == 0)
                    fatal("STRUCTURED_LAYERS_FAIL_AT=%s: stopping as a CUDA error would (a test of structured.sh's rerun)", fail_at);
                float fwd_ms = 0.0f, ms = 0.0f;
                int checked = 0;
                int ok = run_case(cs, &r, &a, &fwd_ms, &ms, &checked);
                fails += !ok;
                const double flops = 6.0 * spec_forward_macs(&cs->spec) * r.N;
                const double bytes = 2.0 * (2.0 * r.N * r.din + 2.0 * r.N * r.dout) + 2.0 * 2.0 * (double)spec_num_params(&cs->spec);
                double floor_s = bytes / bw;
                if (peak > 0 && flops / peak > floor_s) floor_s = flops / peak;
                if (ci == 0) { dense_flops = flops; dense_ms = ms; }
                const double floor_ms = floor_s * 1e3, pct = 100.0 * floor_ms / ms;
                const double ratio = flops / dense_flops, vs = dense_ms > 0 ? ms / dense_ms : 0.0;
                const char *chk = checked ? (ok ? "ok" : "FAIL") : "off";
                printf("%5d %-12s %-18s %-22s %9.3f %10.3f %9.1f %7.3f %9.3f %7.1f%% %8.3f %5s\n", d, shape, cs->name, cs->desc, fwd_ms, ms,
                       flops / 1e9, ratio, floor_ms, pct, vs, chk);
                printf("RESULT d=%d din=%d dout=%d struct=%s ms=%.4f fwd_ms=%.4f flops=%.6g flop_ratio=%.5f floor_ms=%.4f pct_floor=%.2f "
                       "vs_dense=%.4f check=%s\n",
                       d, r.din, r.dout, cs->name, ms, fwd_ms, flops, ratio, floor_ms, pct, vs, chk);
                fflush(stdout);
            }
            printf("\n");
            fflush(stdout);
            free_dev(r.x); free_dev(r.dy); free_dev(r.y); free_dev(r.dx);
        }
    }
    if (fails) printf("%d forward check(s) FAILED\n", fails);
    printf("DONE structured_layers: every case ran\n");  // absent: the process died (structured.sh reruns the rest)
    return fails ? EXIT_FAILURE : EXIT_SUCCESS;
}
