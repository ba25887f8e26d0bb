// moe.h: BTT-MoE linear layer on the CPU (E experts, top-K routing), forward and backward.
//
// Math (DESIGN.md, "Structures"): a BTT with rank E whose rank components are the experts. With
// the cores W0 (gamma, alpha, phi*E) and W1 (phi, gamma*E, eps) (a BTTShape with rank = E), expert e
// is the rank-1 BTT with cores
//   W0_e[g, a, f]  = W0[g, a, f*E + e]      W1_e[f, g, e'] = W1[f, g*E + e, e'].
// Router R (E, d_in), no bias:  logits = R x;  S = top-K of logits (descending, ties to the lower
// index);  gate = softmax(logits[S]);  y = sum_{k<K} gate_k * (W_{S_k} x) + b.
// aux = E * sum_e Phat_e * fhat_e + 0.1 * mean_t(logsumexp(logits_t)^2), Phat the mean over tokens
// of the full softmax, fhat_e = (selections of e) / (N*K) (a constant for gradients).
//
// Computation: only the K selected experts run for a token. The forward sorts the (token, k)
// pairs by expert (counting sort, tokens ascending within an expert), packs each expert's rank-1
// cores straight from the strided rank components, and runs each expert's two BTT stages on its
// token group in row tiles: stage 1 reads the group's rows of x through row pointers (no gathered
// copy) and writes z in its natural (gamma, phi) layout, which is the saved one; stage 2 reads
// z's phi = f columns with a stride (no transpose). Experts are processed one after another
// (threads split each expert's group), so y rows accumulate the experts in ascending expert
// order (a token's first expert writes its row, with the bias): deterministic, no races. The
// backward's dx rows likewise.
//
// Layouts of the saved state (for N rows):
//   logits (N, E); sel (N, K); gate (N, K); lse (N) = logsumexp of each row of logits;
//   counts (E), offsets (E+1), order (N*K): the pairs p = t*K + k grouped by expert, expert e's
//     pairs at order[offsets[e] .. offsets[e+1]);
//   z (N*K, gamma*phi) in the grouped order: row w holds pair order[w]'s intermediate,
//     z[w*gamma*phi + g*phi + f] = z[g, f] of expert sel[t,k] on token t.
// Backward, per expert, chunk by chunk of its group's rows (gathered x and dy rows): dZu = dY .
// W1_e^T (unscaled by the gate), which gives d gate = <z, dZu>; dZ = gate * dZu; dx += dZ's dX;
// dW1_e = (gate*Z)^T dY and dW0_e = X^T dZ, scattered into the strided rank components of dW0 and
// dW1. A token's d logits (the gate softmax and the aux loss) once its last expert has its d gate,
// and dx += dlogits R there; at the end drouter += dlogits^T x.
#pragma once
#include "btt.h"
#include "routing.h"

typedef struct {
    BTTShape btt;  // rank == experts
    int experts, topk;
} MoEShape;

static inline void moe_shape(MoEShape *s, int alpha, int gamma, int phi, int eps, int experts, int topk) {
    btt_shape(&s->btt, alpha, gamma, phi, eps, experts);
    s->experts = experts;
    s->topk = topk;
}
static inline void moe_shape_default(MoEShape *s, int d_in, int d_out, int experts, int topk) {
    btt_shape_default(&s->btt, d_in, d_out, experts);
    s->experts = experts;
    s->topk = topk;
}
static inline int moe_shape_ok(const MoEShape *s) {
    return btt_shape_ok(&s->btt) && s->btt.rank == s->experts && s->topk >= 1 && s->topk <= s->experts;
}
// the rank-1 BTT shape of one expert
static inline BTTShape moe_expert_shape(const MoEShape *s) {
    BTTShape b = s->btt;
    b.rank = 1;
    return b;
}
static inline size_t moe_router_size(const MoEShape *s) { return (size_t)s->experts * s->btt.d_in; }
static inline size_t moe_z_row(const MoEShape *s) { return (size_t)s->btt.gamma * s->btt.phi; }
// multiply-adds per row: router + K rank-1 experts
static inline size_t moe_flops_per_row(const MoEShape *s) {
    BTTShape b = moe_expert_shape(s);
    return moe_router_size(s) + (size_t)s->topk * btt_flops_per_row(&b);
}

typedef struct {
    float *logits;  // (N, E)
    int *sel;       // (N, K) selected experts, descending logit order, ties to the lower index
    float *gate;    // (N, K) softmax over the selected logits
    float *z;       // (N*K, gamma*phi) the experts' intermediates, rows grouped as order, layout (gamma, phi)
    float *lse;     // (N) logsumexp over all E logits
    float *fhat;    // (E) share of the top-k selections per expert, over every rank's tokens (the
                    // aux loss's f̂; the forward sets the local value, moe_aux_from_stats the global)
    int *counts;    // (E) selections per expert
    int *offsets;   // (E+1) start of each expert's pairs in order
    int *order;     // (N*K) pair indices t*K + k grouped by expert, ascending t within an expert
    int capacity;   // rows the buffers hold
    int owns;       // 1 when moe_state_alloc allocated the buffers
} MoEState;

static inline size_t moe_state_floats(const MoEShape *s, int N) {
    size_t E = (size_t)s->experts, K = (size_t)s->topk;
    return (size_t)N * (E + K + K * moe_z_row(s) + 1) + E;
}
static inline size_t moe_state_ints(const MoEShape *s, int N) {
    size_t E = (size_t)s->experts, K = (size_t)s->topk;
    return (size_t)N * K * 2 + 2 * E + 1;
}
// Points the state at caller-owned memory (moe_state_floats / moe_state_ints elements).
static inline void moe_state_bind(MoEState *st, const MoEShape *s, int N, float *fmem, int *imem) {
    size_t E = (size_t)s->experts, K = (size_t)s->topk;
    st->logits = fmem;
    st->gate = st->logits + (size_t)N * E;
    st->lse = st->gate + (size_t)N * K;
    st->z = st->lse + (size_t)N;
    st->fhat = st->z + (size_t)N * K * moe_z_row(s);
    st->sel = imem;
    st->order = st->sel + (size_t)N * K;
    st->counts = st->order + (size_t)N * K;
    st->offsets = st->counts + E;
    st->capacity = N;
    st->owns = 0;
}
static inline void moe_state_alloc(MoEState *st, const MoEShape *s, int N) {
    float *f = (float *)mallocCheck(sizeof(float) * moe_state_floats(s, N));
    int *i = (int *)mallocCheck(sizeof(int) * moe_state_ints(s, N));
    moe_state_bind(st, s, N, f, i);
    st->owns = 1;
}
static inline void moe_state_free(MoEState *st) {
    if (st->owns) { free(st->logits); free(st->sel); }
    memset(st, 0, sizeof(*st));
}

// Where element i of W0 (gamma, alpha, phi*E) or of W1 (phi, gamma*E, eps) goes among the
// experts' contiguous rank-1 cores w0x (E, gamma, alpha, phi) / w1x (E, phi, gamma, eps): the
// one index map of the CPU extraction, the GPU's extraction and its gradient scatter.
ST_HD static inline size_t st_moe_w0_expert_index(size_t i, int E, size_t p0) { return (i % (size_t)E) * p0 + i / (size_t)E; }
ST_HD static inline size_t st_moe_w1_expert_index(size_t i, int E, int Ep, size_t p1) {
    size_t o = i % (size_t)Ep, rest = i / (size_t)Ep;
    return (rest % (size_t)E) * p1 + (rest / (size_t)E) * (size_t)Ep + o;
}

// The experts' rank-1 cores packed for the forward's tiles, straight from the strided rank
// components: matrix e*gamma + g of w0p is W0_e[g] (alpha x phi) = W0[g, a, f*E + e], matrix
// e*phi + f of w1p is W1_e[f] (gamma x eps) = W1[f, g*E + e, o].
static inline void moe_pack_forward(StPacked *w0p, StPacked *w1p, const float *W0, const float *W1, const MoEShape *s) {
    const int E = s->experts, A = s->btt.alpha, G = s->btt.gamma, P = s->btt.phi, Ep = s->btt.eps;
    *w0p = st_packed_alloc(ST_WS_W0, E * G, A, P);
    *w1p = st_packed_alloc(ST_WS_W1, E * P, G, Ep);
    ST_PRAGMA(omp parallel for schedule(static))
    for (int i = 0; i < E * (G + P); i++) {
        if (i < E * G) {
            const int e = i / G, g = i % G;
            cg_pack(w0p->buf + (size_t)i * w0p->size, A, P, W0 + (size_t)g * A * P * E + e, (size_t)P * E, E);
        } else {
            const int j = i - E * G, e = j / P, f = j % P;
            cg_pack(w1p->buf + (size_t)j * w1p->size, G, Ep, W1 + (size_t)f * G * E * Ep + (size_t)e * Ep, (size_t)E * Ep, 1);
        }
    }
}
// The same for the backward's dx: matrix e*phi + f of w1t is W1_e[f]^T (eps x gamma), matrix
// e*gamma + g of w0t is W0_e[g]^T (phi x alpha).
static inline void moe_pack_backward(StPacked *w1t, StPacked *w0t, const float *W0, const float *W1, const MoEShape *s) {
    const int E = s->experts, A = s->btt.alpha, G = s->btt.gamma, P = s->btt.phi, Ep = s->btt.eps;
    *w1t = st_packed_alloc(ST_WS_W1, E * P, Ep, G);
    *w0t = st_packed_alloc(ST_WS_W0, E * G, P, A);
    ST_PRAGMA(omp parallel for schedule(static))
    for (int i = 0; i < E * (G + P); i++) {
        if (i < E * P) {
            const int e = i / P, f = i % P;
            cg_pack(w1t->buf + (size_t)i * w1t->size, Ep, G, W1 + (size_t)f * G * E * Ep + (size_t)e * Ep, 1, (size_t)E * Ep);
        } else {
            const int j = i - E * P, e = j / G, g = j % G;
            cg_pack(w0t->buf + (size_t)j * w0t->size, P, A, W0 + (size_t)g * A * P * E + e, E, (size_t)P * E);
        }
    }
}

// Top-K (descending, ties to the lower index), gate softmax and logsumexp for one row (also the
// GPU's routing kernel, one thread per token). only: NULL, or K distinct experts to pick from
// instead of all E (test mode forces a bf16 GPU onto a float64 reference's routing where a top-k
// near-tie would flip; the order, gates and lse are computed from lg as usual).
ST_HD static inline void st_moe_route_row(const float *lg, int E, int K, const int *only, int *sel, float *gate, float *lse) {
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int skip = 0;
            for (int j = 0; j < k; j++) skip |= sel[j] == e;
            if (only) {
                int listed = 0;
                for (int j = 0; j < K; j++) listed |= only[j] == e;
                skip |= !listed;
            }
            if (skip) continue;
            if (best < 0 || lg[e] > lg[best]) best = e;
        }
        sel[k] = best;
    }
    float m = lg[sel[0]], sum = 0.0f;
    for (int k = 0; k < K; k++) { gate[k] = expf(lg[sel[k]] - m); sum += gate[k]; }
    for (int k = 0; k < K; k++) gate[k] /= sum;
    float mx = lg[0];
    for (int e = 1; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
    float se = 0.0f;
    for (int e = 0; e < E; e++) se += expf(lg[e] - mx);
    *lse = mx + logf(se);
}

// Experts run in ascending order, so the lowest of a token's K selections sl writes its y and dx
// rows and the highest finishes them.
static inline int moe_first_expert(const int *sl, int K, int e) {
    for (int k = 0; k < K; k++)
        if (sl[k] < e) return 0;
    return 1;
}
static inline int moe_last_expert(const int *sl, int K, int e) {
    for (int k = 0; k < K; k++)
        if (sl[k] > e) return 0;
    return 1;
}

// y (N, d_out) overwritten; st (capacity >= N) gets what the backward needs. bias may be NULL.
static inline void moe_forward(float *y, MoEState *st, const float *x, const float *W0, const float *W1,
                               const float *router, const float *bias, int N, const MoEShape *s) {
    if (N > st->capacity) fatal("moe_forward: %d rows but the MoE state holds %d", N, st->capacity);
    const int E = s->experts, K = s->topk, din = s->btt.d_in, dout = s->btt.d_out;
    const BTTShape b1 = moe_expert_shape(s);
    const size_t zrow = moe_z_row(s);
    const int ntiles = st_num_tiles(N);
    // router logits (R^T packed once) and routing
    st_step("router logits, top-k, gate softmax");
    const StPacked rp = st_pack(ST_WS_W0, 1, 1, din, E, router, 0, din);
    ST_PRAGMA(omp parallel for schedule(static))
    for (int t = 0; t < ntiles; t++) {
        int r0 = t * ST_TILE_ROWS, n = N - r0 < ST_TILE_ROWS ? N - r0 : ST_TILE_ROWS;
        st_gemm_packed(n, &rp, 0, x + (size_t)r0 * din, din, 0.0f, st->logits + (size_t)r0 * E, E);
        for (int r = r0; r < r0 + n; r++)
            st_moe_route_row(st->logits + (size_t)r * E, E, K, NULL, st->sel + (size_t)r * K, st->gate + (size_t)r * K, st->lse + r);
    }
    // counting sort of the (token, k) pairs by expert
    st_step("grouping by expert");
    for (int e = 0; e < E; e++) st->counts[e] = 0;
    for (size_t p = 0; p < (size_t)N * K; p++) st->counts[st->sel[p]]++;
    for (int e = 0; e < E; e++) st->fhat[e] = (float)((double)st->counts[e] / ((double)N * K));
    st->offsets[0] = 0;
    for (int e = 0; e < E; e++) st->offsets[e + 1] = st->offsets[e] + st->counts[e];
    {
        int *next = (int *)mallocCheck(sizeof(int) * (size_t)E);
        for (int e = 0; e < E; e++) next[e] = st->offsets[e];
        for (int p = 0; p < N * K; p++) st->order[next[st->sel[p]]++] = p;
        free(next);
    }
    StPacked w0p, w1p;
    st_step("experts' cores packed");
    moe_pack_forward(&w0p, &w1p, W0, W1, s);
    const int A = b1.alpha, G = b1.gamma, P = b1.phi, Ep = b1.eps, mb = st_l1_rows(zrow);
    st_step("experts");
    ST_PRAGMA(omp parallel)
    {
        float *ye = st_workspace(ST_WS_TILE, (size_t)ST_TILE_ROWS * dout);
        const float *xr[ST_TILE_ROWS];
        for (int e = 0; e < E; e++) {  // every thread walks the experts in order; barrier after each
            const int off = st->offsets[e], nt = st_num_tiles(st->counts[e]);
            ST_PRAGMA(omp for schedule(static))
            for (int t = 0; t < nt; t++) {
                const int j0 = off + t * ST_TILE_ROWS, end = st->offsets[e + 1], n = end - j0 < ST_TILE_ROWS ? end - j0 : ST_TILE_ROWS;
                float *zt = st->z + (size_t)j0 * zrow;
                for (int j = 0; j < n; j++) xr[j] = x + (size_t)(st->order[j0 + j] / K) * din;
                for (int r0 = 0; r0 < n; r0 += mb) {
                    const int m = n - r0 < mb ? n - r0 : mb;
                    float *zr = zt + (size_t)r0 * zrow;
                    for (int g = 0; g < G; g++)  // z[., g, :] = X_g W0_e[g]
                        st_gemm_packed_rows(m, &w0p, e * G + g, xr + r0, (size_t)g * A, zr + (size_t)g * P, (int)zrow);
                    for (int f = 0; f < P; f++)  // Y_f = Z_f W1_e[f], Z_f = z[., :, f]: stride phi
                        cg_gemm_packed(m, Ep, G, zr + f, zrow, (size_t)P, w1p.buf + (size_t)(e * P + f) * w1p.size,
                                       ye + (size_t)r0 * dout + (size_t)f * Ep, dout, 0);
                }
                for (int j = 0; j < n; j++) {  // y = bias (or 0) + the token's experts, in expert order
                    const int pr = st->order[j0 + j], tok = pr / K, *sl = st->sel + (size_t)tok * K;
                    const float gt = st->gate[pr];
                    float *yr = y + (size_t)tok * dout;
                    const float *yj = ye + (size_t)j * dout;
                    if (!moe_first_expert(sl, K, e)) for (int o = 0; o < dout; o++) yr[o] += gt * yj[o];
                    else if (bias) for (int o = 0; o < dout; o++) yr[o] = bias[o] + gt * yj[o];
                    else for (int o = 0; o < dout; o++) yr[o] = gt * yj[o];
                }
            }
        }
    }
}

// The auxiliary load-balancing loss of the last forward (N rows).
// The aux loss's statistics over this process's N tokens, as 2E+1 doubles that sum across
// data-parallel ranks: Σ_t softmax(logits_t)_e (E), selections per expert (E), Σ_t lse_t² (1).
#define MOE_AUX_STATS(E) (2 * (E) + 1)
static inline void moe_aux_stats(const MoEState *st, int N, const MoEShape *s, double *stats) {
    const int E = s->experts;
    for (int i = 0; i < MOE_AUX_STATS(E); i++) stats[i] = 0.0;
    for (int t = 0; t < N; t++) {
        const float *lg = st->logits + (size_t)t * E;
        const double l = st->lse[t];
        for (int e = 0; e < E; e++) stats[e] += exp((double)lg[e] - l);
        stats[2 * E] += l * l;
    }
    for (int e = 0; e < E; e++) stats[E + e] = (double)st->counts[e];
}

// aux = E·Σ_e P̂_e·f̂_e + 0.1·mean_t(lse_t²) and the routing it reports (routing.h) from
// statistics summed over n_total tokens; writes f̂ (E floats) for the backward. Also the GPU's
// (one thread), so both compute it alike.
ST_HD static inline MoERouting st_moe_aux_from_stats(float *fhat, const double *stats, long n_total, int E, int K) {
    MoERouting r = {0.0f, 0.0f, 0.0f, 0.0f};
    if (n_total <= 0) return r;
    double bal = 0.0, fmax = 0.0, fmin = 1.0;
    for (int e = 0; e < E; e++) {
        double f = stats[E + e] / ((double)n_total * K);
        fhat[e] = (float)f;
        bal += (stats[e] / (double)n_total) * f;
        fmax = f > fmax ? f : fmax;
        fmin = f < fmin ? f : fmin;
    }
    r.balance = (float)(E * bal);
    r.aux = (float)(E * bal + 0.1 * stats[2 * E] / (double)n_total);
    r.load_max = (float)(E * fmax);
    r.load_min = (float)(E * fmin);
    return r;
}
static inline MoERouting moe_aux_from_stats(MoEState *st, const double *stats, long n_total, const MoEShape *s) {
    return st_moe_aux_from_stats(st->fhat, stats, n_total, s->experts, s->topk);
}

// The aux loss and routing of a single process's N tokens.
static inline MoERouting moe_aux_loss(MoEState *st, int N, const MoEShape *s) {
    double *stats = (double *)mallocCheck(sizeof(double) * MOE_AUX_STATS(s->experts));
    moe_aux_stats(st, N, s, stats);
    MoERouting r = moe_aux_from_stats(st, stats, N, s);
    free(stats);
    return r;
}

// d logits of one token (also the GPU's kernel, one thread per token): the gate softmax over the
// selected logits, plus daux times the aux loss's gradient over all E logits. f̂ is the state's:
// global over ranks in data-parallel runs. With N the local token count, each rank's gradient is
// nproc times its share, which averaging across ranks undoes.
ST_HD static inline void st_moe_dlogits_row(float *dl, const float *lg, float lse, const float *gt, const float *dg, const int *sl,
                                            const float *fhat, int E, int K, int N, float daux) {
    for (int e = 0; e < E; e++) dl[e] = 0.0f;
    float gsum = 0.0f;
    for (int k = 0; k < K; k++) gsum += gt[k] * dg[k];
    for (int k = 0; k < K; k++) dl[sl[k]] += gt[k] * (dg[k] - gsum);
    if (daux != 0.0f) {
        const double l = lse;
        double pf = 0.0;
        for (int e = 0; e < E; e++) pf += exp((double)lg[e] - l) * (double)fhat[e];
        for (int e = 0; e < E; e++) {
            double pe = exp((double)lg[e] - l);
            double d = (double)E / N * pe * ((double)fhat[e] - pf) + 0.2 * l * pe / N;
            dl[e] += (float)(daux * d);
        }
    }
}

// Rows of an expert's group that the backward works through at a time: its gathered rows of
// x and dy, dZ and gate*z (row_floats per row) stay in cache for the weight gradients.
static inline int moe_chunk_rows(const MoEShape *s) {
    const BTTShape b1 = moe_expert_shape(s);
    const size_t b0 = (size_t)b1.alpha * b1.phi, bl = (size_t)b1.gamma * b1.eps;
    return st_chunk_rows((size_t)s->btt.d_in + (size_t)s->btt.d_out + 2 * moe_z_row(s), btt_w0_size(&b1) + btt_w1_size(&b1),
                         b0 > bl ? b0 : bl);
}

// floats of scratch moe_backward needs for N rows
static inline size_t moe_scratch_size(const MoEShape *s, int N) {
    const BTTShape b1 = moe_expert_shape(s);
    const size_t E = (size_t)s->experts, K = (size_t)s->topk, zrow = moe_z_row(s);
    const int ch = N < moe_chunk_rows(s) ? N : moe_chunk_rows(s);
    return btt_w0_size(&b1) + btt_w1_size(&b1)                                                // an expert's core gradients
           + (size_t)N * K + (size_t)N * E                                                      // dgate, dlogits
           + (size_t)(ch > 0 ? ch : 0) * ((size_t)s->btt.d_in + (size_t)s->btt.d_out + 2 * zrow);  // a chunk's X, dY, dZ, gate*Z
}

// dx (N, d_in) overwritten (may be NULL); dW0, dW1, drouter, dbias accumulated (+=; dbias may
// be NULL). daux = d(total loss)/d(this layer's aux). st is what moe_forward saved for these N
// rows; scratch holds moe_scratch_size(s, N) floats. Expert by expert, chunk by chunk of its
// group (as btt.h's backward): the chunk's tiles (dZ, d gate, dx), then the expert's core
// gradients over the chunk's rows, each element's chain continued from the last chunk.
static inline void moe_backward(float *dx, float *dW0, float *dW1, float *drouter, float *dbias, const float *dy,
                                float daux, const float *x, const MoEState *st, const float *W0, const float *W1,
                                const float *router, int N, const MoEShape *s, float *scratch) {
    const int E = s->experts, K = s->topk, din = s->btt.d_in, dout = s->btt.d_out;
    const BTTShape b1 = moe_expert_shape(s);
    const int A = b1.alpha, G = b1.gamma, P = b1.phi, Ep = b1.eps;
    const size_t zrow = moe_z_row(s), p0 = btt_w0_size(&b1), p1 = btt_w1_size(&b1);
    const int chunk = moe_chunk_rows(s), ch = N < chunk ? N : chunk;
    float *dw0e = scratch, *dw1e = dw0e + p0;
    float *dgate = dw1e + p1, *dlogits = dgate + (size_t)N * K;
    // a chunk's rows of x and dy, gathered: the weight gradients sweep them once per core block,
    // which is fast on contiguous rows and slow through row pointers (each sweep misses anew)
    float *Xg = dlogits + (size_t)N * E, *DYg = Xg + (size_t)ch * din;
    float *DZg = DYg + (size_t)ch * dout, *GZg = DZg + (size_t)ch * zrow;  // dZ (gamma, phi), gate*z (phi, gamma)
    StPacked w1t, w0t;
    st_step("experts' cores packed");
    moe_pack_backward(&w1t, &w0t, W0, W1, s);
    StGemmJob *jobs = (StGemmJob *)mallocCheck(sizeof(StGemmJob) * (size_t)(G + P + 1));
    for (int e = 0; e < E; e++) {
        const int ne = st->counts[e];
        if (ne == 0) continue;
        for (int c0 = 0; c0 < ne; c0 += chunk) {
            const int off = st->offsets[e] + c0, nc = ne - c0 < chunk ? ne - c0 : chunk, nt = st_num_tiles(nc);
            const float *zc = st->z + (size_t)off * zrow;
            st_step("experts: gathers, dZ, d gate, dx");
            ST_PRAGMA(omp parallel)
            {
                float *dz2 = st_workspace(ST_WS_TILE, (size_t)ST_TILE_ROWS * (zrow + (size_t)din));
                float *dxe = dz2 + (size_t)ST_TILE_ROWS * zrow;
                ST_PRAGMA(omp for schedule(static))
                for (int t = 0; t < nt; t++) {
                    const int j0 = t * ST_TILE_ROWS, n = nc - j0 < ST_TILE_ROWS ? nc - j0 : ST_TILE_ROWS;
                    for (int j = j0; j < j0 + n; j++) {
                        const int tok = st->order[off + j] / K;
                        memcpy(Xg + (size_t)j * din, x + (size_t)tok * din, sizeof(float) * (size_t)din);
                        memcpy(DYg + (size_t)j * dout, dy + (size_t)tok * dout, sizeof(float) * (size_t)dout);
                    }
                    // dZu (phi, gamma layout) = dY . W1_e^T, unscaled by the gate
                    for (int f = 0; f < P; f++)
                        st_gemm_packed(n, &w1t, e * P + f, DYg + (size_t)j0 * dout + (size_t)f * Ep, dout, 0.0f, dz2 + (size_t)f * G, (int)zrow);
                    for (int j = j0; j < j0 + n; j++) {  // d gate = <z, dZu>; dZ = gate*dZu (gamma, phi); gate*z (phi, gamma)
                        const int pr = st->order[off + j], tok = pr / K, *sl = st->sel + (size_t)tok * K;
                        const float gt = st->gate[pr], *zj = zc + (size_t)j * zrow, *dzj = dz2 + (size_t)(j - j0) * zrow;
                        float *dZ = DZg + (size_t)j * zrow, *gz = GZg + (size_t)j * zrow;
                        float dg = 0.0f;
                        for (int g = 0; g < G; g++)
                            for (int f = 0; f < P; f++) {
                                const float zv = zj[(size_t)g * P + f], dv = dzj[(size_t)f * G + g];
                                dg += zv * dv;
                                dZ[(size_t)g * P + f] = gt * dv;
                                gz[(size_t)f * G + g] = gt * zv;
                            }
                        dgate[pr] = dg;
                        if (moe_last_expert(sl, K, e))  // all the token's d gates are known: its d logits
                            st_moe_dlogits_row(dlogits + (size_t)tok * E, st->logits + (size_t)tok * E, st->lse[tok],
                                               st->gate + (size_t)tok * K, dgate + (size_t)tok * K, sl, st->fhat, E, K, N, daux);
                    }
                    if (!dx) continue;
                    for (int g = 0; g < G; g++)
                        st_gemm_packed(n, &w0t, e * G + g, DZg + (size_t)j0 * zrow + (size_t)g * P, (int)zrow, 0.0f, dxe + (size_t)g * A, din);
                    for (int j = 0; j < n; j++) {  // the token's first expert writes dx, its last adds dlogits . R
                        const int tok = st->order[off + j0 + j] / K, *sl = st->sel + (size_t)tok * K;
                        float *dr = dx + (size_t)tok * din;
                        const float *de = dxe + (size_t)j * din;
                        if (moe_first_expert(sl, K, e)) memcpy(dr, de, sizeof(float) * (size_t)din);
                        else for (int i = 0; i < din; i++) dr[i] += de[i];
                        if (moe_last_expert(sl, K, e)) {  // (one multiply-add chain over the experts)
                            const float *dl = dlogits + (size_t)tok * E;
                            for (int q = 0; q < E; q++)
                                for (int i = 0; i < din; i++) dr[i] += dl[q] * router[(size_t)q * din + i];
                        }
                    }
                }
            }
            st_step("experts: dW0, dW1");
            const int acc = c0 == 0 ? ST_OVERWRITE : ST_CHAIN;
            for (int f = 0; f < P; f++)  // dW1_e[f] (gamma x eps) = (gate*Z)_f^T dY_f
                jobs[f] = st_job(1, 0, G, Ep, nc, GZg + (size_t)f * G, (int)zrow, DYg + (size_t)f * Ep, dout, dw1e + (size_t)f * G * Ep, Ep, acc);
            for (int g = 0; g < G; g++)  // dW0_e[g] (alpha x phi) = X_g^T dZ_g
                jobs[P + g] = st_job(1, 0, A, P, nc, Xg + (size_t)g * A, din, DZg + (size_t)g * P, (int)zrow, dw0e + (size_t)g * A * P, P, acc);
            st_run_jobs(jobs, G + P);
        }
        // the expert's core gradients, scattered into its rank component
        st_step("experts' gradients into the cores");
        ST_PRAGMA(omp parallel for schedule(static))
        for (int ga = 0; ga < G * A; ga++)
            for (int f = 0; f < P; f++) dW0[((size_t)ga * P + f) * E + e] += dw0e[(size_t)ga * P + f];
        ST_PRAGMA(omp parallel for schedule(static))
        for (int fg = 0; fg < P * G; fg++) {
            float *d = dW1 + ((size_t)fg * E + e) * Ep;
            const float *src = dw1e + (size_t)fg * Ep;
            for (int o = 0; o < Ep; o++) d[o] += src[o];
        }
    }
    st_step("router gradient");
    jobs[0] = st_job(1, 0, E, din, N, dlogits, E, x, din, drouter, din, ST_ADD);  // drouter += dlogits^T x
    st_run_jobs(jobs, 1);
    free(jobs);
    if (dbias) st_step("bias gradient");
    st_bias_backward(dbias, dy, N, dout);
}
