// structured/tune.cuh: each structured layer's own kernels (one byte per linear layer: its -sk
// value, for BTT and Monarch dense GEMMs on the materialized weight as -sm, for BTT-MoE its tokens
// grouped by set of experts as -mg 1 (on the plans or the fused kernels), or one -sk value's
// forward with another's backward, -sk 0..3 and 5), and the timing -at 1 chooses them by.
//
// Why per layer and measured: on the H200 (dev/bench/RESULTS.md) which path is fastest depends on
// the shape: the cuBLAS plans won at width 768, the fused kernel at rank 1 and width 4096, dense
// GEMMs on the materialized weight where the plans move more bytes than the GEMM costs. A model
// mixes those shapes (q, k, v at C x C; fc at C x 4C), and one global -sk cannot be right for all.
#pragma once
#include "spec.h"

// A layer's kernels: 0..3 as -sk, ST_K_DENSE (as -sm), ST_K_ZT (as -sk 4), ST_K_SETS (-sk 0's
// plans with BTT-MoE's tokens grouped by set of experts, as -mg 1) or ST_K_MMA (as -sk 5),
// forward and backward alike; or a forward and a backward on different ones of the pairable
// kernels, -sk 0..3 and ST_K_MMA (ST_K_MIXED + 4·fwd + bwd of -sk 0..3; ST_K_MIXED_MMA + fwd for a
// forward of -sk 0..3 with ST_K_MMA's backward, ST_K_MIXED_MMA + 4 + bwd for the other way).
// The byte a resume state keeps per linear layer (common/checkpoint.h) is this, or ST_K_NONE for
// the dense layers, which have no choice. (ST_K_MMA and its pairs came last, so that the bytes of
// states written before them mean what they meant.)
// Why the directions may differ: the forward and backward of one path are different kernels (the
// fused forward is one kernel, its backward that kernel on the transposed BTT and cuBLAS weight
// gradients; the split backward's first stage reads dy with its row stride), and the H200 runs
// had their speeds relative to the plans differ. The paths of -sk 0..3 and 5 save the same z
// (Monarch: u; BTT-MoE: z of its grouped rows, and the backward builds its own tile table), so any
// of their backwards can follow any of their forwards; a dense forward saves none, so dense is
// both ways or neither. -sk 4 saves z (u) transposed, which only its own backward reads: both
// ways or neither too. So does -mg 1: its z has a row per token (the rank-k BTT of the token's
// experts, gated), which only its own backward reads. It may run on the fused kernels instead of
// the plans (ST_K_SETS_FUSED + the -sk value 1, 2, 3 or 5, as -mg 1 with that -sk), and since
// the set path's forwards (plans or fused) all save that one z, which all its backwards read, a
// set path's forward may pair with another of its backwards (ST_K_SETS_PAIR + 6·fwd + bwd, -sk
// values 0..3, 5): pairs within the set path, never with the expert path's.
// ST_K_END: one past the largest byte a choice takes.
enum {
    ST_K_DENSE = 4, ST_K_ZT = 5, ST_K_SETS = 6, ST_K_MMA = 7, ST_K_COUNT = 8,
    ST_K_MIXED = 8, ST_K_MIXED_MMA = ST_K_MIXED + 16, ST_K_SETS_FUSED = ST_K_MIXED_MMA + 8, ST_K_SETS_PAIR = ST_K_SETS_FUSED + 6,
    ST_K_END = ST_K_SETS_PAIR + 36, ST_K_NONE = 255
};
// The -sk value (1, 2, 3 or 5) of byte k's fused kernels where k groups by set on them both ways, else 0.
static inline int st_kernel_sets_fused(int k) {
    const int sk = k - ST_K_SETS_FUSED;
    return k >= ST_K_SETS_FUSED && k < ST_K_SETS_PAIR && sk >= 1 && sk != 4 ? sk : 0;
}
// The -sk value (0..3, 5) of byte k's forward (bwd 0) or backward (1) where k groups by set, else -1.
static inline int st_kernel_set_sk(int k, int bwd) {
    if (k == ST_K_SETS) return 0;
    if (st_kernel_sets_fused(k)) return st_kernel_sets_fused(k);
    if (k < ST_K_SETS_PAIR || k >= ST_K_END) return -1;
    const int f = (k - ST_K_SETS_PAIR) / 6, b = (k - ST_K_SETS_PAIR) % 6;
    return f == b || f == 4 || b == 4 ? -1 : bwd ? b : f;  // (the diagonal is the singles')
}
// The byte of the set path with its forward on -sk fwd's kernels and its backward on bwd's.
static inline int st_kernel_set_byte(int fwd, int bwd) {
    if (fwd == bwd) return fwd ? ST_K_SETS_FUSED + fwd : ST_K_SETS;
    return ST_K_SETS_PAIR + 6 * fwd + bwd;
}
// -at 1 times the candidates (st_kernel_candidates) in slots, a column each of its table: the
// singles 0 .. ST_K_COUNT - 1 as their bytes, then -mg 1 with -sk 1, 2 and 5.
#define ST_K_SLOTS (ST_K_COUNT + 3)
static const char *const st_kernel_names[ST_K_SLOTS] = {"-sk 0", "-sk 1", "-sk 2", "-sk 3", "dense", "-sk 4", "-mg 1", "-sk 5",
                                                        "-mg1 -sk1", "-mg1 -sk2", "-mg1 -sk5"};
// The slots as -ax names them (the columns above without spaces).
static const char *const st_kernel_tokens[ST_K_SLOTS] = {"sk0", "sk1", "sk2", "sk3", "dense", "sk4", "mg1", "sk5", "mg1sk1", "mg1sk2", "mg1sk5"};
// -ax's list (comma-separated tokens) as a mask of slots, or -1 with why in err. sk0 is no choice to
// leave out: the plans are what every other choice is checked against.
static inline int st_tune_skip_parse(const char *list, char *err, size_t cap) {
    int mask = 0;
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        const size_t n = e ? (size_t)(e - p) : strlen(p);
        int slot = -1;
        for (int k = 0; k < ST_K_SLOTS; k++)
            if (strlen(st_kernel_tokens[k]) == n && strncmp(p, st_kernel_tokens[k], n) == 0) slot = k;
        if (slot <= 0) {
            snprintf(err, cap, "'%.*s' is %s; the choices -ax can leave out are sk1 sk2 sk3 dense sk4 mg1 sk5 mg1sk1 mg1sk2 mg1sk5", (int)n, p,
                     slot == 0 ? "the cuBLAS plans, the reference every choice is checked against" : "no choice of -at 1's");
            return -1;
        }
        mask |= 1 << slot;
        p = e ? e + 1 : p + n;
    }
    return mask;
}

// The slot of a candidate byte k, or -1 (a pair, or a byte that is no candidate: -mg 1 -sk 3 runs as -sk 2's).
static inline int st_kernel_slot(int k) {
    if (k >= 0 && k < ST_K_COUNT) return k;
    const int sk = st_kernel_sets_fused(k);
    return sk == 1 ? ST_K_COUNT : sk == 2 ? ST_K_COUNT + 1 : sk == 5 ? ST_K_COUNT + 2 : -1;
}
// Whether byte k groups BTT-MoE's tokens by set of experts (-mg 1, on the plans or fused).
static inline int st_kernel_by_set(int k) { return st_kernel_set_sk(k, 0) >= 0; }
// The choices whose saved state no other choice's backward reads (dense saves none): both ways or neither.
static inline int st_kernel_unpaired(int k) { return k == ST_K_DENSE || k == ST_K_ZT || st_kernel_by_set(k); }

// The forward's and the backward's kernels of byte k (0..3, ST_K_DENSE, ST_K_ZT, ST_K_SETS or
// ST_K_MMA each; by set, the set path's single of that -sk), and the byte of a pair (fwd != bwd,
// both pairable by expert).
static inline int st_kernel_fwd(int k) {
    if (st_kernel_by_set(k)) return st_kernel_set_byte(st_kernel_set_sk(k, 0), st_kernel_set_sk(k, 0));
    if (k >= ST_K_MIXED_MMA) return k < ST_K_MIXED_MMA + 4 ? k - ST_K_MIXED_MMA : ST_K_MMA;
    return k >= ST_K_MIXED ? (k - ST_K_MIXED) / 4 : k;
}
static inline int st_kernel_bwd(int k) {
    if (st_kernel_by_set(k)) return st_kernel_set_byte(st_kernel_set_sk(k, 1), st_kernel_set_sk(k, 1));
    if (k >= ST_K_MIXED_MMA) return k < ST_K_MIXED_MMA + 4 ? ST_K_MMA : k - ST_K_MIXED_MMA - 4;
    return k >= ST_K_MIXED ? (k - ST_K_MIXED) % 4 : k;
}
static inline int st_kernel_pair(int fwd, int bwd) {
    if (fwd == bwd) return fwd;
    if (bwd == ST_K_MMA) return ST_K_MIXED_MMA + fwd;
    if (fwd == ST_K_MMA) return ST_K_MIXED_MMA + 4 + bwd;
    return ST_K_MIXED + 4 * fwd + bwd;
}
// The -sk value (0..5) of byte k's forward or backward (dense: 0, which then does not run; -mg 1:
// 0, the plans it runs on, or its fused kernels'), and the byte of a layer whose forward runs -sk
// fwd and backward -sk bwd (-sk 4 is both or neither) by expert.
static inline int st_kernel_sk(int k, int bwd) {
    if (st_kernel_by_set(k)) return st_kernel_set_sk(k, bwd);
    if (k == ST_K_DENSE) return 0;
    if (k == ST_K_ZT) return 4;
    const int one = bwd ? st_kernel_bwd(k) : st_kernel_fwd(k);
    return one == ST_K_MMA ? 5 : one;
}
static inline int st_kernel_of_sk(int fwd, int bwd) {
    if (fwd == 4 || bwd == 4) return ST_K_ZT;
    return st_kernel_pair(fwd == 5 ? ST_K_MMA : fwd, bwd == 5 ? ST_K_MMA : bwd);
}

// "-sk 3", "dense", "-mg 1 -sk 2" (the set path on -sk 2's fused kernels) or "-sk 3 fwd, -sk 0
// bwd" into buf ("kernels 38" for a byte that is none of them).
static inline void st_kernel_label(char *buf, size_t cap, int k) {
    if (k >= 0 && k < ST_K_COUNT) snprintf(buf, cap, "%s", st_kernel_names[k]);
    else if (st_kernel_sets_fused(k)) snprintf(buf, cap, "-mg 1 -sk %d", st_kernel_sets_fused(k));
    else if (st_kernel_by_set(k)) snprintf(buf, cap, "-mg 1, -sk %d fwd, -sk %d bwd", st_kernel_set_sk(k, 0), st_kernel_set_sk(k, 1));
    else if (k >= ST_K_MIXED && k < ST_K_SETS_FUSED)
        snprintf(buf, cap, "%s fwd, %s bwd", st_kernel_names[st_kernel_fwd(k) & 7], st_kernel_names[st_kernel_bwd(k) & 7]);  // (singles: 0..7)
    else snprintf(buf, cap, "kernels %d", k);
}

static inline int st_kind_tunable(int kind) { return kind == STRUCT_BTT || kind == STRUCT_MONARCH || kind == STRUCT_BTT_MOE; }
// BTT and Monarch layers can also run as dense GEMMs on their materialized weight; BTT-MoE cannot.
static inline int st_kind_densifiable(int kind) { return kind == STRUCT_BTT || kind == STRUCT_MONARCH; }

// Whether byte k is a valid choice for a layer of this kind (ST_K_NONE exactly for dense ones).
// Monarch takes 0..3 and -sk 5 too (-sk 2, 3 and 5 the BTT kernels where they take its shape, else
// -sk 1's Monarch kernels), BTT-MoE
// 0..3 (2 and 3 the same: its experts' fused kernel with W0 staged) and 5 (that on mma.sync);
// every kind -sk 4; BTT-MoE -mg 1, on the plans or the fused kernels of -sk 1, 2, 3 or 5, where
// sets (its shape can group by set: gpu_plan.h's moe_set_count).
static inline int st_kernel_valid(int kind, int k, int sets = 1) {
    if (!st_kind_tunable(kind)) return k == ST_K_NONE;
    if (k >= ST_K_SETS_FUSED) return kind == STRUCT_BTT_MOE && sets && st_kernel_by_set(k);
    if (k >= ST_K_MIXED) return k < ST_K_END && st_kernel_fwd(k) != st_kernel_bwd(k);  // (bytes 8, 13, 18 and 23 are no pair)
    if (k == ST_K_SETS) return kind == STRUCT_BTT_MOE && sets;
    return k >= 0 && k < ST_K_COUNT && (k != ST_K_DENSE || st_kind_densifiable(kind));
}

// The choices that run differently for a layer of this kind, into out: BTT -sk 0..3 and dense;
// Monarch -sk 0, 1 and dense, and where it runs on the BTT kernels (alt: monarch.h's Monarch as a
// BTT, the staged kernel takes its shape) -sk 2 and 3; BTT-MoE -sk 0, 1 and 2; each also -sk 4
// (gpu_plan.h has its plans for every structure); BTT, BTT-MoE and Monarch with alt -sk 5 (the
// BTT kernel on mma.sync); last, BTT-MoE with sets (alt: its shape groups by set) -mg 1, then
// -mg 1 on the fused kernels of -sk 1, 2 and 5.
// Returns how many (at most ST_K_SLOTS: each has its slot).
// (-at 1 times these, each both ways, and may then pair one's forward with another's backward.)
static inline int st_kernel_candidates(int kind, int out[ST_K_SLOTS], int alt = 0) {
    int n = 0;
    const int sets = kind == STRUCT_BTT_MOE && alt, as_btt = kind == STRUCT_MONARCH && alt;
    if (kind == STRUCT_BTT || as_btt) {
        for (int k = 0; k <= ST_K_DENSE; k++) out[n++] = k;
    } else if (kind == STRUCT_MONARCH) {
        out[n++] = 0; out[n++] = 1; out[n++] = ST_K_DENSE;
    } else if (kind == STRUCT_BTT_MOE) {
        out[n++] = 0; out[n++] = 1; out[n++] = 2;
    }
    if (st_kind_tunable(kind)) out[n++] = ST_K_ZT;
    if (kind == STRUCT_BTT || kind == STRUCT_BTT_MOE || as_btt) out[n++] = ST_K_MMA;
    if (sets) {
        out[n++] = ST_K_SETS;
        out[n++] = ST_K_SETS_FUSED + 1;
        out[n++] = ST_K_SETS_FUSED + 2;
        out[n++] = ST_K_SETS_FUSED + 5;
    }
    return n;
}

// The candidate that runs what kernels k run for this kind (Monarch's -sk 2, 3 and 5 are its 1
// unless alt, st_kernel_candidates', BTT-MoE's -sk 3 its 2, by expert or by set; a pair, each
// direction so).
static inline int st_kernel_canonical(int kind, int k, int alt = 0) {
    if (st_kernel_by_set(k)) {
        const int f = st_kernel_set_sk(k, 0), b = st_kernel_set_sk(k, 1);
        return st_kernel_set_byte(f == 3 ? 2 : f, b == 3 ? 2 : b);
    }
    if (k >= ST_K_MIXED)
        return st_kernel_pair(st_kernel_canonical(kind, st_kernel_fwd(k), alt), st_kernel_canonical(kind, st_kernel_bwd(k), alt));
    if (kind == STRUCT_MONARCH && !alt && ((k >= 1 && k <= 3) || k == ST_K_MMA)) return 1;
    if (kind == STRUCT_BTT_MOE && k == 3) return 2;
    return k;
}

// -at 1 keeps the flags' choice (the incumbent) unless another is faster by more than this
// fraction: timings within noise should not change what a run computes.
#define ST_TUNE_MARGIN 0.03
// A time that marks a refused choice (its results disagree with the plans'), and one left out by
// -ax (never timed; above any sum of refused times over ranks).
#define ST_TUNE_REFUSED 1e30
#define ST_TUNE_LEFT_OUT 1e290

// Which of n timings t to run: the fastest, unless the incumbent's is within the margin of it.
static inline int st_tune_pick(const double *t, int n, int incumbent) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (t[i] < t[best]) best = i;
    return incumbent >= 0 && incumbent < n && t[best] >= (1.0 - ST_TUNE_MARGIN) * t[incumbent] ? incumbent : best;
}

// The kernels byte a unit runs, from its nc candidates' forward and backward times tf, tb
// (ST_TUNE_REFUSED: refused). The options: each candidate both ways, and with mix (not with -x 0)
// the fastest forward among the pairable ones (-sk 0..3, 5) with the fastest backward among them,
// and the same among the set path's (-mg 1 on the plans or fused: one z layout of their own); the
// least total wins, unless the incumbent's (a candidate byte; -1: none) is within the margin.
static inline int st_tune_pick_pair(const int *cand, const double *tf, const double *tb, int nc, int incumbent, int mix) {
    int opt[ST_K_SLOTS + 2], n = 0, inc = -1, f = -1, b = -1, sf = -1, sb = -1;
    double tt[ST_K_SLOTS + 2];
    for (int c = 0; c < nc; c++) {
        const int ok = tf[c] < ST_TUNE_REFUSED && tb[c] < ST_TUNE_REFUSED;
        if (ok && cand[c] == incumbent) inc = n;
        opt[n] = cand[c];
        tt[n++] = ok ? tf[c] + tb[c] : ST_TUNE_REFUSED;
        if (ok && st_kernel_by_set(cand[c])) {  // pairs among the set path's own
            if (sf < 0 || tf[c] < tf[sf]) sf = c;
            if (sb < 0 || tb[c] < tb[sb]) sb = c;
        }
        if (!ok || st_kernel_unpaired(cand[c])) continue;  // both ways or neither
        if (f < 0 || tf[c] < tf[f]) f = c;
        if (b < 0 || tb[c] < tb[b]) b = c;
    }
    if (mix && f >= 0 && f != b) {
        opt[n] = st_kernel_pair(cand[f], cand[b]);
        tt[n++] = tf[f] + tb[b];
    }
    if (mix && sf >= 0 && sf != sb) {
        opt[n] = st_kernel_set_byte(st_kernel_set_sk(cand[sf], 0), st_kernel_set_sk(cand[sb], 1));
        tt[n++] = tf[sf] + tb[sb];
    }
    return opt[st_tune_pick(tt, n, inc)];
}

// The shape a layer's kernels depend on (not its initialization or learning rates).
static inline int st_same_shape(const LinearSpec *a, const LinearSpec *b) {
    return a->kind == b->kind && a->d_in == b->d_in && a->d_out == b->d_out && a->bias == b->bias && a->rank == b->rank &&
           a->alpha == b->alpha && a->gamma == b->gamma && a->phi == b->phi && a->eps == b->eps && a->blocks == b->blocks &&
           a->experts == b->experts && a->topk == b->topk;
}

// "btt r4 768x3072", "monarch 4 768x3072", "dense 768x768" into buf.
static inline void st_shape_name(char *buf, size_t cap, const LinearSpec *s) {
    if (s->kind == STRUCT_BTT) snprintf(buf, cap, "btt r%d %dx%d", s->rank, s->d_in, s->d_out);
    else if (s->kind == STRUCT_MONARCH) snprintf(buf, cap, "monarch %d %dx%d", s->blocks, s->d_in, s->d_out);
    else if (s->kind == STRUCT_BTT_MOE) snprintf(buf, cap, "btt_moe %d/%d %dx%d", s->experts, s->topk, s->d_in, s->d_out);
    else snprintf(buf, cap, "dense %dx%d", s->d_in, s->d_out);
}

// The layer numbers in on[0..n) (1: that layer) as ranges, "0-11" or "0,2,5-7", into buf.
static inline void st_layer_ranges(char *buf, size_t cap, const int *on, int n) {
    size_t at = 0;
    buf[0] = '\0';
    for (int l = 0; l < n && at < cap; l++) {
        if (!on[l] || (l > 0 && on[l - 1])) continue;
        int e = l;
        while (e + 1 < n && on[e + 1]) e++;
        int w = e > l ? snprintf(buf + at, cap - at, "%s%d-%d", at ? "," : "", l, e) : snprintf(buf + at, cap - at, "%s%d", at ? "," : "", l);
        if (w < 0) break;
        at += (size_t)w;
    }
}

// A value uniform in [-1, 1) from a hash of (i, seed).
__device__ __forceinline__ float st_hash_unit(size_t i, uint32_t seed) {
    uint32_t h = (uint32_t)i * 2654435761u ^ (uint32_t)(i >> 32) * 40503u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    return (float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

// bf16 values uniform in [-1, 1): the timing runs' inputs. Not zeros: a GPU draws less power on
// zeros and may clock higher than it will in training.
__global__ void st_tune_fill_kernel(floatX *p, size_t n, uint32_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (floatX)st_hash_unit(i, seed);
}
static void st_tune_fill(floatX *p, size_t n, uint32_t seed) {
    if (!p || !n) return;
    st_tune_fill_kernel<<<1024, 256>>>(p, n, seed);
    cudaCheckLaunch();
}

// -at 1 also checks what each choice computes against the cuBLAS plans (-sk 0) on the same inputs,
// so that a kernel that fails on some GPU is never chosen however fast it is. Element by element:
// a sum or random projection of a whole output would let a wrong tile of a large one hide in the
// rounding noise of the rest. The reference keeps a sample of the activations' rows (every
// stride-th and the last: a tile of rows or a column that is wrong shows in it) and all of the
// layers' gradients. A choice agrees when max |a - ref| <= ST_TUNE_AGREE · max |ref| in each: the
// paths differ by bf16 roundings (of W when run dense, of other summation orders), about 1% of
// the largest value at most; a wrong, missing or non-finite tile differs by the size of its values.
// Values with the same bits agree, NaN too: memory that neither run wrote (a saved state's rows
// past this routing's tiles, which another layout's run may have left anything in).
#define ST_TUNE_AGREE 0.05
#define ST_TUNE_SAMPLE_ELEMS (1L << 24)  // an activation's sample: at most this many (rows 8 apart or more)
#define ST_SAMPLE_BLOCKS 128

// The row stride of an activation's sample (rows x w).
static inline int st_sample_stride(long rows, long w) {
    long s = (rows * w + ST_TUNE_SAMPLE_ELEMS - 1) / ST_TUNE_SAMPLE_ELEMS;
    return (int)(s < 8 ? 8 : s);
}
// Rows sampled: 0, stride, 2·stride, ... and the last.
__host__ __device__ static inline long st_sample_rows(long rows, int stride) { return rows <= 1 ? rows : (rows - 2) / stride + 2; }

// The sampled rows of p (rows x w, contiguous): with store, copied into ref (in sample order);
// else compared with it, each block's max |p - ref| (infinite for a non-finite value) and max
// |ref| into out[2·block], out[2·block + 1].
__global__ void st_sample_kernel(float *out, floatX *ref, const floatX *p, long rows, int w, int stride, int store) {
    const long n = st_sample_rows(rows, stride) * (long)w;
    float md = 0.0f, mr = 0.0f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long j = i / w, row = j * stride < rows - 1 ? j * stride : rows - 1;
        const floatX v = p[row * w + i % w];
        if (store) { ref[i] = v; continue; }
        const float r = (float)ref[i];
        float d = fabsf((float)v - r);
        if (!(d <= 3.0e38f)) d = INFINITY;  // NaN and infinities
        if (__bfloat16_as_ushort(v) == __bfloat16_as_ushort(ref[i])) d = 0.0f;  // the same bits (a NaN both left unwritten) agree
        md = fmaxf(md, d);
        mr = fmaxf(mr, fabsf(r));
    }
    __shared__ float sd[256], sr[256];
    sd[threadIdx.x] = md;
    sr[threadIdx.x] = mr;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) {
            sd[threadIdx.x] = fmaxf(sd[threadIdx.x], sd[threadIdx.x + o]);
            sr[threadIdx.x] = fmaxf(sr[threadIdx.x], sr[threadIdx.x + o]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && !store) {
        out[2 * blockIdx.x] = sd[0];
        out[2 * blockIdx.x + 1] = sr[0];
    }
}

// One tensor's sample: store (into ref) or compare (returns max |p - ref| / max |ref|, 0 when both
// are 0, infinite for a non-finite value). scratch: 2·ST_SAMPLE_BLOCKS floats on the device.
static double st_sample(floatX *ref, const floatX *p, long rows, int w, int stride, int store, float *scratch) {
    st_sample_kernel<<<ST_SAMPLE_BLOCKS, 256>>>(scratch, ref, p, rows, w, stride, store);
    cudaCheckLaunch();
    if (store) return 0.0;
    float h[2 * ST_SAMPLE_BLOCKS];
    cudaCheck(cudaMemcpy(h, scratch, sizeof(h), cudaMemcpyDeviceToHost));
    float md = 0.0f, mr = 0.0f;
    for (int b = 0; b < ST_SAMPLE_BLOCKS; b++) {
        md = fmaxf(md, h[2 * b]);
        mr = fmaxf(mr, h[2 * b + 1]);
    }
    if (md == 0.0f) return 0.0;
    return mr > 0.0f ? (double)md / mr : INFINITY;
}

// Milliseconds of fwd(ctx) and of bwd(ctx) run after it (NULL: none; ms[1] = 0), on the default
// stream: one run untimed (cuBLASLt's heuristics, kernels' first-launch attributes), then the
// least of `reps` timed runs of each.
static void st_time_ms(void (*fwd)(void *), void (*bwd)(void *), void *ctx, int reps, double ms[2]) {
    cudaEvent_t e[3];
    for (int i = 0; i < 3; i++) cudaCheck(cudaEventCreate(&e[i]));
    fwd(ctx);
    if (bwd) bwd(ctx);
    ms[0] = ms[1] = 0.0;
    for (int r = 0; r < reps; r++) {
        cudaCheck(cudaEventRecord(e[0], 0));
        fwd(ctx);
        cudaCheck(cudaEventRecord(e[1], 0));
        if (bwd) bwd(ctx);
        cudaCheck(cudaEventRecord(e[2], 0));
        cudaCheck(cudaEventSynchronize(e[2]));
        for (int d = 0; d < 2; d++) {
            float t = 0.0f;
            cudaCheck(cudaEventElapsedTime(&t, e[d], e[d + 1]));
            if (r == 0 || t < ms[d]) ms[d] = t;
        }
    }
    if (!bwd) ms[1] = 0.0;
    for (int i = 0; i < 3; i++) cudaCheck(cudaEventDestroy(e[i]));
}
