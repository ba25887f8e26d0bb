// test_structured.c: tests of the structured linear layers (structured/btt.h, monarch.h, moe.h,
// factor.h): default factors; forward against a dense W materialised independently from the
// index formulas; finite-difference gradients of every parameter and the input; Monarch = BTT
// rank 1; MoE with K = E = the softmax mix of all experts; MoE routing and tie-breaks; gradient
// accumulation (exactly 2x); determinism.
// Run with --bench for a quick forward+backward timing at d = 768, N = 4096.
#include <time.h>
#include "../common/rng.h"
#include "../structured/factor.h"
#include "../structured/btt.h"
#include "../structured/monarch.h"
#include "../structured/moe.h"
#include "check.h"

static mt19937_state g_rng;

static float *randn(size_t n, float std) {
    float *p = (float *)mallocCheck(sizeof(float) * (n ? n : 1));
    mt_normal_(p, n, 0.0f, std, &g_rng);
    return p;
}
static float *zeros(size_t n) { return (float *)callocCheck(n ? n : 1, sizeof(float)); }
static float *copyf(const float *a, size_t n) {
    float *p = (float *)mallocCheck(sizeof(float) * (n ? n : 1));
    memcpy(p, a, sizeof(float) * n);
    return p;
}
static int rand_int(int n) { return (int)(mt_u32(&g_rng) % (uint32_t)n); }

// y = x W^T + b in double, W (dout, din) as doubles
static void dense_ref(float *y, const float *x, const double *W, const float *b, int N, int din, int dout) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < dout; o++) {
            double s = b ? b[o] : 0.0;
            for (int i = 0; i < din; i++) s += W[(size_t)o * din + i] * x[(size_t)n * din + i];
            y[(size_t)n * dout + o] = (float)s;
        }
}

// W[o][i] from the BTT index formulas (rank components s, optionally only component only_s >= 0)
static double *btt_materialize(const float *W0, const float *W1, const BTTShape *s, int only_s) {
    const int A = s->alpha, G = s->gamma, P = s->phi, E = s->eps, R = s->rank;
    double *W = (double *)callocCheck((size_t)s->d_out * s->d_in, sizeof(double));
    for (int g = 0; g < G; g++)
        for (int a = 0; a < A; a++)
            for (int f = 0; f < P; f++)
                for (int e = 0; e < E; e++)
                    for (int r = 0; r < R; r++) {
                        if (only_s >= 0 && r != only_s) continue;
                        double w0 = W0[((size_t)g * A + a) * P * R + f * R + r];
                        double w1 = W1[((size_t)f * G * R + g * R + r) * E + e];
                        W[(size_t)(f * E + e) * s->d_in + g * A + a] += w0 * w1;
                    }
    return W;
}

static double *monarch_materialize(const float *R, const float *L, const MonarchShape *m) {
    const int nb = m->nb, p = m->p, s = m->s, q = m->q;
    double *W = (double *)callocCheck((size_t)m->d_out * m->d_in, sizeof(double));
    for (int l = 0; l < nb; l++)
        for (int i = 0; i < s; i++)
            for (int r = 0; r < q; r++) {
                int mi = r * nb + l, k = mi / q, j = mi % q;  // u[mi] = u[k*q + j]
                double lv = L[((size_t)l * s + i) * q + r];
                for (int c = 0; c < p; c++) W[(size_t)(i * nb + l) * m->d_in + k * p + c] += lv * R[((size_t)k * q + j) * p + c];
            }
    return W;
}

// naive top-K: stable selection sort by descending logit (ties to the lower index)
static void naive_topk(const float *lg, int E, int K, int *sel) {
    int idx[64];
    for (int e = 0; e < E; e++) idx[e] = e;
    for (int i = 1; i < E; i++)  // insertion sort, stable
        for (int j = i; j > 0 && lg[idx[j]] > lg[idx[j - 1]]; j--) { int t = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = t; }
    for (int k = 0; k < K; k++) sel[k] = idx[k];
}

// naive BTT-MoE forward in double from materialised experts
static void moe_ref(float *y, const float *x, const float *W0, const float *W1, const float *router, const float *bias,
                    int N, const MoEShape *s) {
    const int E = s->experts, K = s->topk, din = s->btt.d_in, dout = s->btt.d_out;
    double **We = (double **)mallocCheck(sizeof(double *) * (size_t)E);
    for (int e = 0; e < E; e++) We[e] = btt_materialize(W0, W1, &s->btt, e);
    float lg[64];
    int sel[64];
    for (int n = 0; n < N; n++) {
        const float *xn = x + (size_t)n * din;
        for (int e = 0; e < E; e++) {
            double a = 0;
            for (int i = 0; i < din; i++) a += (double)router[(size_t)e * din + i] * xn[i];
            lg[e] = (float)a;
        }
        naive_topk(lg, E, K, sel);
        double g[64], sum = 0;
        for (int k = 0; k < K; k++) { g[k] = exp((double)lg[sel[k]] - lg[sel[0]]); sum += g[k]; }
        for (int o = 0; o < dout; o++) {
            double acc = bias ? bias[o] : 0.0;
            for (int k = 0; k < K; k++) {
                const double *w = We[sel[k]] + (size_t)o * din;
                double d = 0;
                for (int i = 0; i < din; i++) d += w[i] * xn[i];
                acc += g[k] / sum * d;
            }
            y[(size_t)n * dout + o] = (float)acc;
        }
    }
    for (int e = 0; e < E; e++) free(We[e]);
    free(We);
}

// ---------------------------------------------------------------------------------------------
// Finite differences. A layer under test is a closure: forward(params) -> L = sum y*r (+ c*aux).

typedef struct {
    int kind;  // 0 btt, 1 monarch, 2 moe
    BTTShape bs;
    MonarchShape ms;
    MoEShape es;
    int N;
    float *x, *w0, *w1, *router, *bias, *r, *y, *z;
    MoEState st;
    float c_aux;
} Layer;

static double layer_loss(Layer *L) {
    double aux = 0.0;
    if (L->kind == 0) btt_forward(L->y, L->z, L->x, L->w0, L->w1, L->bias, L->N, &L->bs);
    else if (L->kind == 1) monarch_forward(L->y, L->z, L->x, L->w0, L->w1, L->bias, L->N, &L->ms);
    else {
        moe_forward(L->y, &L->st, L->x, L->w0, L->w1, L->router, L->bias, L->N, &L->es);
        aux = moe_aux_loss(&L->st, L->N, &L->es).aux;
    }
    int dout = L->kind == 0 ? L->bs.d_out : L->kind == 1 ? L->ms.d_out : L->es.btt.d_out;
    double s = 0.0;
    for (size_t i = 0; i < (size_t)L->N * dout; i++) s += (double)L->y[i] * L->r[i];
    return s + L->c_aux * aux;
}

static void layer_backward(Layer *L, float *dx, float *dw0, float *dw1, float *drouter, float *dbias) {
    if (L->kind == 0) {
        float *scr = zeros(btt_scratch_size(&L->bs, L->N));
        btt_backward(dx, dw0, dw1, dbias, L->r, L->x, L->z, L->w0, L->w1, L->N, &L->bs, scr);
        free(scr);
    } else if (L->kind == 1) {
        float *scr = zeros(monarch_scratch_size(&L->ms, L->N));
        monarch_backward(dx, dw0, dw1, dbias, L->r, L->x, L->z, L->w0, L->w1, L->N, &L->ms, scr);
        free(scr);
    } else {
        float *scr = zeros(moe_scratch_size(&L->es, L->N));
        moe_backward(dx, dw0, dw1, drouter, dbias, L->r, L->c_aux, L->x, &L->st, L->w0, L->w1, L->router, L->N, &L->es, scr);
        free(scr);
    }
}

// 1 when every token selects the same set of experts as in sel0 (the order within the top-K does
// not change the function)
static int same_routing(const int *sel0, const Layer *L) {
    if (!sel0) return 1;
    const int K = L->es.topk, E = L->es.experts;
    for (int n = 0; n < L->N; n++) {
        unsigned long long a = 0, b = 0;
        for (int k = 0; k < K; k++) { a |= 1ull << (sel0[n * K + k] % 64); b |= 1ull << (L->st.sel[n * K + k] % 64); }
        if (a != b || E > 64) {
            if (E > 64) return memcmp(sel0, L->st.sel, sizeof(int) * (size_t)L->N * K) == 0;
            return 0;
        }
    }
    return 1;
}

// Compares grad[i] with central differences of layer_loss over nsample random entries of p.
static void fd_check(Layer *L, float *p, const float *grad, size_t n, int nsample, float h, float atol, float rtol,
                     const char *name) {
    if (nsample > (int)n) nsample = (int)n;
    float *an = zeros((size_t)nsample), *fd = zeros((size_t)nsample);
    int *sel0 = NULL, skipped = 0, used = 0;
    size_t nsel = 0;
    if (L->kind == 2) {
        nsel = (size_t)L->N * L->es.topk;
        sel0 = (int *)mallocCheck(sizeof(int) * nsel);
        layer_loss(L);
        memcpy(sel0, L->st.sel, sizeof(int) * nsel);
    }
    for (int k = 0; k < nsample; k++) {
        size_t i = nsample == (int)n ? (size_t)k : (size_t)rand_int((int)n);
        float orig = p[i];
        p[i] = orig + h;
        double lp = layer_loss(L);
        int same = same_routing(sel0, L);
        p[i] = orig - h;
        double lm = layer_loss(L);
        same = same && same_routing(sel0, L);
        p[i] = orig;
        if (!same) { skipped++; continue; }  // the perturbation changed the routing
        an[used] = grad[i];
        fd[used] = (float)((lp - lm) / (2.0 * h));
        used++;
    }
    char buf[200];
    snprintf(buf, sizeof buf, "%s (%d entries, h=%g, %d skipped: routing changed)", name, used, h, skipped);
    check_close(an, fd, (size_t)used, atol, rtol, buf);
    if (skipped > nsample / 4) check_true(0, buf, "too many perturbations changed the routing");
    free(sel0);
    free(an);
    free(fd);
    if (L->kind == 2) layer_loss(L);  // restore the state for the unperturbed parameters
}

static void layer_init(Layer *L, int N, int with_bias) {
    int din, dout;
    size_t n0, n1, nz;
    if (L->kind == 0) { din = L->bs.d_in; dout = L->bs.d_out; n0 = btt_w0_size(&L->bs); n1 = btt_w1_size(&L->bs); nz = btt_z_size(&L->bs, N); }
    else if (L->kind == 1) { din = L->ms.d_in; dout = L->ms.d_out; n0 = monarch_r_size(&L->ms); n1 = monarch_l_size(&L->ms); nz = monarch_u_size(&L->ms, N); }
    else { din = L->es.btt.d_in; dout = L->es.btt.d_out; n0 = btt_w0_size(&L->es.btt); n1 = btt_w1_size(&L->es.btt); nz = 1; }
    L->N = N;
    L->x = randn((size_t)N * din, 1.0f);
    L->w0 = randn(n0, 0.3f);
    L->w1 = randn(n1, 0.3f);
    L->bias = with_bias ? randn((size_t)dout, 0.5f) : NULL;
    L->r = randn((size_t)N * dout, 1.0f);
    L->y = zeros((size_t)N * dout);
    L->z = zeros(nz);
    L->router = NULL;
    if (L->kind == 2) {
        L->router = randn(moe_router_size(&L->es), 0.5f);
        moe_state_alloc(&L->st, &L->es, N);
    }
}
static void layer_free(Layer *L) {
    free(L->x); free(L->w0); free(L->w1); free(L->bias); free(L->r); free(L->y); free(L->z); free(L->router);
    if (L->kind == 2) moe_state_free(&L->st);
}

// full gradient test of a layer: every parameter and the input, plus accumulation and dx overwrite
static void grad_tests(Layer *L, const char *tag, float h, float atol, float rtol, int nsample) {
    int din = L->kind == 0 ? L->bs.d_in : L->kind == 1 ? L->ms.d_in : L->es.btt.d_in;
    int dout = L->kind == 0 ? L->bs.d_out : L->kind == 1 ? L->ms.d_out : L->es.btt.d_out;
    size_t n0 = L->kind == 1 ? monarch_r_size(&L->ms) : btt_w0_size(L->kind == 0 ? &L->bs : &L->es.btt);
    size_t n1 = L->kind == 1 ? monarch_l_size(&L->ms) : btt_w1_size(L->kind == 0 ? &L->bs : &L->es.btt);
    size_t nr = L->kind == 2 ? moe_router_size(&L->es) : 0, nx = (size_t)L->N * din;
    float *dx = zeros(nx), *dw0 = zeros(n0), *dw1 = zeros(n1), *dr = zeros(nr), *db = zeros((size_t)dout);
    layer_loss(L);
    layer_backward(L, dx, dw0, dw1, dr, L->bias ? db : NULL);
    char name[200];
    const char *n0name = L->kind == 1 ? "dR" : "dW0", *n1name = L->kind == 1 ? "dL" : "dW1";
    snprintf(name, sizeof name, "%s fd dx", tag); fd_check(L, L->x, dx, nx, nsample, h, atol, rtol, name);
    snprintf(name, sizeof name, "%s fd %s", tag, n0name); fd_check(L, L->w0, dw0, n0, nsample, h, atol, rtol, name);
    snprintf(name, sizeof name, "%s fd %s", tag, n1name); fd_check(L, L->w1, dw1, n1, nsample, h, atol, rtol, name);
    if (L->bias) { snprintf(name, sizeof name, "%s fd dbias", tag); fd_check(L, L->bias, db, (size_t)dout, nsample, h, atol, rtol, name); }
    if (nr) { snprintf(name, sizeof name, "%s fd drouter", tag); fd_check(L, L->router, dr, nr, nsample, h, atol, rtol, name); }
    // a second backward accumulates exactly 2x; dx is overwritten, not accumulated
    float *dx2 = copyf(dx, nx), *w0x2 = zeros(n0), *w1x2 = zeros(n1), *drx2 = zeros(nr), *dbx2 = zeros((size_t)dout);
    for (size_t i = 0; i < n0; i++) w0x2[i] = 2.0f * dw0[i];
    for (size_t i = 0; i < n1; i++) w1x2[i] = 2.0f * dw1[i];
    for (size_t i = 0; i < nr; i++) drx2[i] = 2.0f * dr[i];
    for (int i = 0; i < dout; i++) dbx2[i] = 2.0f * db[i];
    for (size_t i = 0; i < nx; i++) dx[i] = 1e30f;
    layer_backward(L, dx, dw0, dw1, dr, L->bias ? db : NULL);
    snprintf(name, sizeof name, "%s backward twice: %s exactly 2x", tag, n0name); check_close(dw0, w0x2, n0, 0, 0, name);
    snprintf(name, sizeof name, "%s backward twice: %s exactly 2x", tag, n1name); check_close(dw1, w1x2, n1, 0, 0, name);
    if (nr) { snprintf(name, sizeof name, "%s backward twice: drouter exactly 2x", tag); check_close(dr, drx2, nr, 0, 0, name); }
    if (L->bias) { snprintf(name, sizeof name, "%s backward twice: dbias exactly 2x", tag); check_close(db, dbx2, (size_t)dout, 0, 0, name); }
    snprintf(name, sizeof name, "%s backward: dx overwritten, identical", tag); check_close(dx, dx2, nx, 0, 0, name);
    // dx may be NULL: the weight gradients are the same
    float *a0 = zeros(n0), *a1 = zeros(n1), *ar = zeros(nr);
    layer_backward(L, NULL, a0, a1, ar, NULL);
    for (size_t i = 0; i < n0; i++) a0[i] *= 2.0f;
    snprintf(name, sizeof name, "%s backward with dx = NULL: same %s", tag, n0name); check_close(a0, w0x2, n0, 0, 0, name);
    free(a0); free(a1); free(ar);
    free(dx); free(dw0); free(dw1); free(dr); free(db); free(dx2); free(w0x2); free(w1x2); free(drx2); free(dbx2);
}

// ---------------------------------------------------------------------------------------------

static void test_factors(void) {
    struct { int d, a, b; } c[] = {{768, 16, 48}, {1024, 32, 32}, {3072, 32, 96}, {512, 16, 32},
                                   {4096, 64, 64}, {50304, 24, 2096}, {97, 1, 97}, {1, 1, 1}, {12, 2, 6}};
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        int a, b;
        default_factors(c[i].d, &a, &b);
        char name[100], why[100];
        snprintf(name, sizeof name, "default_factors(%d) = (%d, %d)", c[i].d, c[i].a, c[i].b);
        snprintf(why, sizeof why, "got (%d, %d)", a, b);
        check_true(a == c[i].a && b == c[i].b, name, why);
    }
    BTTShape s;
    btt_shape_default(&s, 768, 3072, 2);
    check_true(s.alpha == 16 && s.gamma == 48 && s.phi == 32 && s.eps == 96 && btt_shape_ok(&s), "btt_shape_default 768->3072",
               "wrong factors");
    MonarchShape m;
    monarch_shape(&m, 768, 3072, 4);
    check_true(m.p == 192 && m.s == 768 && m.q == 192, "monarch_shape 768->3072 nb=4", "wrong p, s, q");
    monarch_shape(&m, 768, 100, 8);
    check_true(m.q == 0, "monarch_shape: nb not dividing d_out gives q = 0", "q != 0");
}

// st_transpose against its definition, for the shapes the layers use (8 x 8 or 4 x 4 register blocks
// where R and C are multiples of 8 or 4) and others (odd sizes, blocks of several floats).
static void test_transpose(void) {
    const int shapes[][3] = {{48, 16, 1}, {16, 48, 1}, {32, 24, 1}, {24, 32, 1}, {8, 8, 1}, {64, 32, 1},
                             {512, 4, 1}, {4, 192, 1}, {12, 20, 1}, {12, 5, 1}, {16, 12, 1}, {48, 16, 2}, {16, 48, 2}, {32, 64, 2}, {12, 6, 2}, {6, 10, 4}, {3, 7, 3}};
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        const int R = shapes[i][0], C = shapes[i][1], blk = shapes[i][2];
        const size_t n = (size_t)R * C * blk;
        float *src = randn(n, 1.0f), *dst = zeros(n + 8), *ref = zeros(n + 8);
        dst[n] = ref[n] = 7.0f;  // a guard past the end
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                for (int b = 0; b < blk; b++) ref[((size_t)c * R + r) * blk + b] = src[((size_t)r * C + c) * blk + b];
        st_transpose(dst, src, R, C, blk);
        char name[120];
        snprintf(name, sizeof name, "st_transpose [%d][%d][%d] -> [%d][%d][%d]", R, C, blk, C, R, blk);
        check_close(dst, ref, n + 1, 0, 0, name);
        free(src); free(dst); free(ref);
    }
}

static void test_btt_forward(int A, int G, int P, int E, int R, int N, int bias) {
    Layer L;
    memset(&L, 0, sizeof L);
    L.kind = 0;
    btt_shape(&L.bs, A, G, P, E, R);
    layer_init(&L, N, bias);
    double *W = btt_materialize(L.w0, L.w1, &L.bs, -1);
    float *yref = zeros((size_t)N * L.bs.d_out);
    dense_ref(yref, L.x, W, L.bias, N, L.bs.d_in, L.bs.d_out);
    btt_forward(L.y, L.z, L.x, L.w0, L.w1, L.bias, N, &L.bs);
    char name[200];
    snprintf(name, sizeof name, "btt forward = x W^T (%d->%d, a%d g%d f%d e%d rank %d, N=%d%s)", L.bs.d_in, L.bs.d_out, A, G, P, E,
             R, N, bias ? ", bias" : "");
    check_close(L.y, yref, (size_t)N * L.bs.d_out, 1e-4f, 1e-4f, name);
    float *y2 = zeros((size_t)N * L.bs.d_out);
    btt_forward(y2, L.z, L.x, L.w0, L.w1, L.bias, N, &L.bs);
    snprintf(name, sizeof name, "btt forward deterministic (%d->%d rank %d)", L.bs.d_in, L.bs.d_out, R);
    check_close(y2, L.y, (size_t)N * L.bs.d_out, 0, 0, name);
    free(y2); free(W); free(yref);
    layer_free(&L);
}

static void test_monarch_forward(int din, int dout, int nb, int N, int bias) {
    Layer L;
    memset(&L, 0, sizeof L);
    L.kind = 1;
    monarch_shape(&L.ms, din, dout, nb);
    layer_init(&L, N, bias);
    double *W = monarch_materialize(L.w0, L.w1, &L.ms);
    float *yref = zeros((size_t)N * dout);
    dense_ref(yref, L.x, W, L.bias, N, din, dout);
    monarch_forward(L.y, L.z, L.x, L.w0, L.w1, L.bias, N, &L.ms);
    char name[200];
    snprintf(name, sizeof name, "monarch forward = x W^T (%d->%d, nb=%d p=%d s=%d q=%d, N=%d)", din, dout, nb, L.ms.p, L.ms.s, L.ms.q, N);
    check_close(L.y, yref, (size_t)N * dout, 1e-4f, 1e-4f, name);
    free(W); free(yref);
    layer_free(&L);
}

static void test_moe_forward(int A, int G, int P, int E, int ne, int K, int N, float router_std) {
    Layer L;
    memset(&L, 0, sizeof L);
    L.kind = 2;
    moe_shape(&L.es, A, G, P, E, ne, K);
    layer_init(&L, N, 1);
    for (size_t i = 0; i < moe_router_size(&L.es); i++) L.router[i] *= router_std / 0.5f;
    float *yref = zeros((size_t)N * L.es.btt.d_out);
    moe_ref(yref, L.x, L.w0, L.w1, L.router, L.bias, N, &L.es);
    moe_forward(L.y, &L.st, L.x, L.w0, L.w1, L.router, L.bias, N, &L.es);
    char name[200];
    snprintf(name, sizeof name, "moe forward = sum gate * W_e x (%d->%d, E=%d K=%d, N=%d)", L.es.btt.d_in, L.es.btt.d_out, ne, K, N);
    check_close(L.y, yref, (size_t)N * L.es.btt.d_out, 1e-4f, 1e-4f, name);
    // routing against a naive argsort of the layer's own logits, and logits against naive ones
    int ok = 1;
    int sel[64];
    float *lref = zeros((size_t)N * ne);
    for (int n = 0; n < N; n++) {
        naive_topk(L.st.logits + (size_t)n * ne, ne, K, sel);
        for (int k = 0; k < K; k++) ok &= sel[k] == L.st.sel[(size_t)n * K + k];
        for (int e = 0; e < ne; e++) {
            double a = 0;
            for (int i = 0; i < L.es.btt.d_in; i++) a += (double)L.router[(size_t)e * L.es.btt.d_in + i] * L.x[(size_t)n * L.es.btt.d_in + i];
            lref[(size_t)n * ne + e] = (float)a;
        }
    }
    snprintf(name, sizeof name, "moe routing = naive argsort (E=%d K=%d)", ne, K);
    check_true(ok, name, "selected experts differ");
    snprintf(name, sizeof name, "moe logits = R x (E=%d)", ne);
    check_close(L.st.logits, lref, (size_t)N * ne, 1e-4f, 1e-4f, name);
    int cnt_ok = L.st.offsets[ne] == N * K;
    for (int e = 0; e < ne; e++) {
        int c = 0;
        for (int i = 0; i < N * K; i++) c += L.st.sel[i] == e;
        cnt_ok &= c == L.st.counts[e];
    }
    check_true(cnt_ok, "moe counts / offsets consistent with sel", "mismatch");
    free(lref); free(yref);
    layer_free(&L);
}

static void test_moe_ties(void) {
    MoEShape s;
    moe_shape(&s, 4, 6, 4, 5, 6, 3);
    int N = 37, E = 6, K = 3;
    float *x = randn((size_t)N * s.btt.d_in, 1.0f), *w0 = randn(btt_w0_size(&s.btt), 0.3f), *w1 = randn(btt_w1_size(&s.btt), 0.3f);
    float *router = zeros(moe_router_size(&s)), *y = zeros((size_t)N * s.btt.d_out);
    MoEState st;
    moe_state_alloc(&st, &s, N);
    moe_forward(y, &st, x, w0, w1, router, NULL, N, &s);
    int ok = 1, gok = 1;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            ok &= st.sel[n * K + k] == k;
            gok &= fabsf(st.gate[n * K + k] - 1.0f / K) < 1e-6f;
        }
    check_true(ok, "moe zero router: experts 0..K-1 for every token", "other experts selected");
    check_true(gok, "moe zero router: gates 1/K", "gates differ");
    MoERouting r = moe_aux_loss(&st, N, &s);
    // P = 1/E each, f = 1/K on experts < K: balance = E * K * (1/E)(1/K) = 1; lse = log E
    float want = 1.0f + 0.1f * logf((float)E) * logf((float)E);
    check_close(&r.aux, &want, 1, 1e-5f, 1e-5f, "moe aux loss at a zero router = 1 + 0.1 log(E)^2");
    // every token on experts 0..K-1: the busiest has 1/K of the selections (load E/K), the rest none
    const float rgot[3] = {r.balance, r.load_max, r.load_min}, rwant[3] = {1.0f, (float)E / K, 0.0f};
    check_close(rgot, rwant, 3, 1e-6f, 1e-6f, "moe routing at a zero router: balance 1, loads E/K and 0");
    // partial ties: routers rows 1 and 4 equal, row 2 = row 5
    float *rr = randn(moe_router_size(&s), 1.0f);
    memcpy(rr + 4 * s.btt.d_in, rr + 1 * s.btt.d_in, sizeof(float) * s.btt.d_in);
    memcpy(rr + 5 * s.btt.d_in, rr + 2 * s.btt.d_in, sizeof(float) * s.btt.d_in);
    moe_forward(y, &st, x, w0, w1, rr, NULL, N, &s);
    ok = 1;
    int sel[64];
    for (int n = 0; n < N; n++) {
        naive_topk(st.logits + (size_t)n * E, E, K, sel);
        for (int k = 0; k < K; k++) ok &= sel[k] == st.sel[n * K + k];
    }
    check_true(ok, "moe tied router rows: routing = naive stable argsort", "differs");
    // the routing report of a random router, from its selections and probabilities counted here
    {
        double cnt[64] = {0}, P[64] = {0}, bal = 0.0, cmax = 0.0, cmin = 1e30;
        for (int n = 0; n < N; n++) {
            double mx = -1e30, z = 0.0;
            for (int e = 0; e < E; e++) mx = fmax(mx, st.logits[n * E + e]);
            for (int e = 0; e < E; e++) z += exp(st.logits[n * E + e] - mx);
            for (int e = 0; e < E; e++) P[e] += exp(st.logits[n * E + e] - mx) / z / N;
            for (int k = 0; k < K; k++) cnt[st.sel[n * K + k]] += 1.0;
        }
        for (int e = 0; e < E; e++) {
            bal += E * P[e] * cnt[e] / ((double)N * K);
            cmax = fmax(cmax, cnt[e]);
            cmin = fmin(cmin, cnt[e]);
        }
        MoERouting r = moe_aux_loss(&st, N, &s);
        const float rgot[3] = {r.balance, r.load_max, r.load_min};
        const float rwant[3] = {(float)bal, (float)(E * cmax / ((double)N * K)), (float)(E * cmin / ((double)N * K))};
        check_close(rgot, rwant, 3, 1e-5f, 1e-5f, "moe routing of a random router: balance and loads from the counted selections");
        check_true(rwant[1] > 1.0f && rwant[2] < 1.0f, "moe routing of a random router: uneven (so the check above sees max and min)", "even");
    }
    moe_state_free(&st);
    free(x); free(w0); free(w1); free(router); free(y); free(rr);
}

// K = E: the layer is the full softmax mix of all experts, each computed with btt_forward on
// the expert's extracted rank-1 cores
static void test_moe_full_mix(void) {
    MoEShape s;
    int A = 4, G = 6, P = 5, Ep = 8, E = 4, N = 23;
    moe_shape(&s, A, G, P, Ep, E, E);
    int din = s.btt.d_in, dout = s.btt.d_out;
    float *x = randn((size_t)N * din, 1.0f), *w0 = randn(btt_w0_size(&s.btt), 0.3f), *w1 = randn(btt_w1_size(&s.btt), 0.3f);
    float *router = randn(moe_router_size(&s), 0.3f), *bias = randn((size_t)dout, 0.5f), *y = zeros((size_t)N * dout);
    MoEState st;
    moe_state_alloc(&st, &s, N);
    moe_forward(y, &st, x, w0, w1, router, bias, N, &s);
    BTTShape b1 = moe_expert_shape(&s);
    float *c0 = zeros(btt_w0_size(&b1)), *c1 = zeros(btt_w1_size(&b1)), *ye = zeros((size_t)E * N * dout), *z = zeros(btt_z_size(&b1, N));
    for (int e = 0; e < E; e++) {
        for (int g = 0; g < G; g++)
            for (int a = 0; a < A; a++)
                for (int f = 0; f < P; f++) c0[(g * A + a) * P + f] = w0[((g * A + a) * P + f) * E + e];
        for (int f = 0; f < P; f++)
            for (int g = 0; g < G; g++)
                for (int o = 0; o < Ep; o++) c1[(f * G + g) * Ep + o] = w1[((f * G + g) * E + e) * Ep + o];
        btt_forward(ye + (size_t)e * N * dout, z, x, c0, c1, NULL, N, &b1);
    }
    float *yref = zeros((size_t)N * dout);
    for (int n = 0; n < N; n++) {
        double lg[16], mx = -1e30, sum = 0;
        for (int e = 0; e < E; e++) {
            double a = 0;
            for (int i = 0; i < din; i++) a += (double)router[e * din + i] * x[n * din + i];
            lg[e] = a;
            mx = a > mx ? a : mx;
        }
        for (int e = 0; e < E; e++) sum += exp(lg[e] - mx);
        for (int o = 0; o < dout; o++) {
            double acc = bias[o];
            for (int e = 0; e < E; e++) acc += exp(lg[e] - mx) / sum * ye[((size_t)e * N + n) * dout + o];
            yref[n * dout + o] = (float)acc;
        }
    }
    check_close(y, yref, (size_t)N * dout, 1e-5f, 1e-4f, "moe K = E equals the softmax mix of all experts (btt_forward per expert)");
    moe_state_free(&st);
    free(x); free(w0); free(w1); free(router); free(bias); free(y); free(c0); free(c1); free(ye); free(z); free(yref);
}

// Monarch with nb = sqrt(d) equals BTT rank 1 with alpha = p, gamma = phi = nb, eps = s, and
// cores W0[g, a, f] = R[g, f, a], W1[f, g, e] = L[f, e, g]; y_monarch[i*nb + l] = y_btt[l*eps + i].
static void test_monarch_is_btt(int nb, int N) {
    int d = nb * nb;
    MonarchShape m;
    monarch_shape(&m, d, d, nb);
    BTTShape b;
    btt_shape(&b, nb, nb, nb, nb, 1);
    float *x = randn((size_t)N * d, 1.0f), *R = randn(monarch_r_size(&m), 0.3f), *L = randn(monarch_l_size(&m), 0.3f);
    float *W0 = zeros(btt_w0_size(&b)), *W1 = zeros(btt_w1_size(&b));
    for (int g = 0; g < nb; g++)
        for (int a = 0; a < nb; a++)
            for (int f = 0; f < nb; f++) W0[(g * nb + a) * nb + f] = R[(g * nb + f) * nb + a];
    for (int f = 0; f < nb; f++)
        for (int g = 0; g < nb; g++)
            for (int e = 0; e < nb; e++) W1[(f * nb + g) * nb + e] = L[(f * nb + e) * nb + g];
    float *ym = zeros((size_t)N * d), *yb = zeros((size_t)N * d), *u = zeros(monarch_u_size(&m, N)), *z = zeros(btt_z_size(&b, N));
    monarch_forward(ym, u, x, R, L, NULL, N, &m);
    btt_forward(yb, z, x, W0, W1, NULL, N, &b);
    float *yp = zeros((size_t)N * d);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < nb; i++)
            for (int l = 0; l < nb; l++) yp[n * d + i * nb + l] = yb[n * d + l * nb + i];
    char name[120];
    snprintf(name, sizeof name, "monarch nb=%d (d=%d) = btt rank 1 up to the output permutation", nb, d);
    check_close(ym, yp, (size_t)N * d, 1e-5f, 1e-5f, name);
    free(x); free(R); free(L); free(W0); free(W1); free(ym); free(yb); free(u); free(z); free(yp);
}

// dR += the BTT's dW0 and dL += its dW1, each element moved back where monarch_btt_cores took it.
static void monarch_btt_grads_add(float *dR, float *dL, const float *dW0, const float *dW1, const MonarchShape *m) {
    const int nb = m->nb, p = m->p, q = m->q, s = m->s, rho = q / nb;
    for (int g = 0; g < nb; g++)
        for (int a = 0; a < p; a++)
            for (int c = 0; c < q; c++) dR[((size_t)g * q + monarch_btt_row(c, nb, rho)) * p + a] += dW0[((size_t)g * p + a) * q + c];
    for (int f = 0; f < nb; f++)
        for (int r = 0; r < q; r++)
            for (int e = 0; e < s; e++) dL[((size_t)f * s + e) * q + r] += dW1[((size_t)f * q + r) * s + e];
}

// Any Monarch whose nb divides q is a BTT (monarch.h, monarch_btt_shape): the BTT's y is the
// Monarch's y up to the output permutation, its saved z the Monarch's saved u, its gradients the
// Monarch's moved back (monarch_btt_grads_add, the inverse of monarch_btt_cores), and its
// transposed BTT (the GPU's backward) has the cores and the saved dZ that monarch_gpu.cuh builds
// and reads by the stated formulas.
static void test_monarch_as_btt(int din, int dout, int nb, int N) {
    MonarchShape m;
    monarch_shape(&m, din, dout, nb);
    BTTShape b;
    char name[200];
    snprintf(name, sizeof name, "monarch %d->%d nb %d: a BTT (alpha %d, gamma = phi = %d, eps %d, rank %d)", din, dout, nb, m.p, nb, m.s,
             m.q / nb);
    if (!check_true(monarch_btt_shape(&b, &m) && b.alpha == m.p && b.gamma == nb && b.phi == nb && b.eps == m.s && b.rank * nb == m.q &&
                        b.d_in == din && b.d_out == dout && btt_w0_size(&b) == monarch_r_size(&m) && btt_w1_size(&b) == monarch_l_size(&m) &&
                        btt_z_row(&b) == monarch_u_row(&m),
                    name, "no BTT or the wrong one"))
        return;
    const int p = m.p, s = m.s, q = m.q, rho = b.rank;
    const size_t nr = monarch_r_size(&m), nl = monarch_l_size(&m), urow = monarch_u_row(&m);
    float *x = randn((size_t)N * din, 1.0f), *dy = randn((size_t)N * dout, 1.0f), *R = randn(nr, 0.3f), *L = randn(nl, 0.3f);
    float *bias = randn(dout, 0.5f), *W0 = zeros(nr), *W1 = zeros(nl);
    monarch_btt_cores(W0, W1, R, L, &m);
    // forward: y_btt[l*s + i] = y[i*nb + l] (bias added in the Monarch's order), z = u
    float *ym = zeros((size_t)N * dout), *u = zeros((size_t)N * urow), *yb = zeros((size_t)N * dout), *z = zeros((size_t)N * urow);
    monarch_forward(ym, u, x, R, L, bias, N, &m);
    btt_forward(yb, z, x, W0, W1, NULL, N, &b);
    float *yp = zeros((size_t)N * dout);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < s; i++)
            for (int l = 0; l < nb; l++) yp[(size_t)n * dout + i * nb + l] = yb[(size_t)n * dout + l * s + i] + bias[i * nb + l];
    snprintf(name, sizeof name, "monarch %d->%d nb %d as a BTT: y = the BTT's y permuted (+ bias)", din, dout, nb);
    check_close(ym, yp, (size_t)N * dout, 1e-5f, 1e-5f, name);
    snprintf(name, sizeof name, "monarch %d->%d nb %d as a BTT: the BTT's saved z = the Monarch's saved u", din, dout, nb);
    check_close(z, u, (size_t)N * urow, 1e-5f, 1e-5f, name);
    // backward: dx equal, dR and dL from dW0 and dW1 moved back
    float *dxm = zeros((size_t)N * din), *dR = zeros(nr), *dL = zeros(nl), *scm = zeros(monarch_scratch_size(&m, N));
    float *dxb = zeros((size_t)N * din), *dW0 = zeros(nr), *dW1 = zeros(nl), *scb = zeros(btt_scratch_size(&b, N));
    float *dRb = zeros(nr), *dLb = zeros(nl);
    monarch_backward(dxm, dR, dL, NULL, dy, x, u, R, L, N, &m, scm);
    // the BTT backward takes dy in its own order, yt: dyt[l*s + i] = dy[i*nb + l]
    float *dyt = zeros((size_t)N * dout);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < s; i++)
            for (int l = 0; l < nb; l++) dyt[(size_t)n * dout + l * s + i] = dy[(size_t)n * dout + i * nb + l];
    btt_backward(dxb, dW0, dW1, NULL, dyt, x, z, W0, W1, N, &b, scb);
    monarch_btt_grads_add(dRb, dLb, dW0, dW1, &m);
    // (fp32 sums over the same terms in another order: a few units of 1e-5 at 768 -> 3072, |dx| ~ 1..10)
    snprintf(name, sizeof name, "monarch %d->%d nb %d as a BTT: dx", din, dout, nb);
    check_close(dxb, dxm, (size_t)N * din, 1e-3f, 1e-4f, name);
    snprintf(name, sizeof name, "monarch %d->%d nb %d as a BTT: dR from dW0", din, dout, nb);
    check_close(dRb, dR, nr, 1e-4f, 1e-4f, name);
    snprintf(name, sizeof name, "monarch %d->%d nb %d as a BTT: dL from dW1", din, dout, nb);
    check_close(dLb, dL, nl, 1e-4f, 1e-4f, name);
    // the transposed BTT: W0t = L, W1t[g][f*rho + t] = R[g][t*nb + f]; its saved z is du with block
    // k's j = t*nb + f at k*q + f*rho + t, and dR[k][t*nb + f] = sum_n z'[n][k*q + f*rho + t] x[n][k*p + .]
    const BTTShape tb = btt_shape_transposed(&b);
    float *W0t = zeros(nl), *W1t = zeros(nr), *dxt = zeros((size_t)N * din), *zt = zeros((size_t)N * urow);
    btt_transposed_cores(W0t, W1t, W0, W1, &b);
    float *W1f = zeros(nr);  // (written out here; the GPU builds it by monarch_btt_core_src, checked against this too)
    for (int g = 0; g < nb; g++)
        for (int c = 0; c < q; c++) memcpy(W1f + ((size_t)g * q + c) * p, R + ((size_t)g * q + (c % rho) * nb + c / rho) * p, sizeof(float) * p);
    int src_ok = 1;
    for (size_t i = 0; i < nr; i++) src_ok &= W1f[i] == R[monarch_btt_core_src(i, nb, q, p, 1)];
    snprintf(name, sizeof name, "monarch %d->%d nb %d as a BTT: monarch_btt_core_src(w1t) = R's rows reordered", din, dout, nb);
    check_true(src_ok, name, "another element");
    snprintf(name, sizeof name, "monarch %d->%d nb %d as a BTT: the transposed BTT's cores are L and R's rows reordered", din, dout, nb);
    check_true(memcmp(W0t, L, sizeof(float) * nl) == 0 && memcmp(W1t, W1f, sizeof(float) * nr) == 0, name, "other cores");
    btt_forward(dxt, zt, dyt, W0t, W1t, NULL, N, &tb);
    float *dRz = zeros(nr);
    for (int k = 0; k < nb; k++)
        for (int f = 0; f < nb; f++)
            for (int t = 0; t < rho; t++)
                for (int a = 0; a < p; a++) {
                    double acc = 0.0;
                    for (int n = 0; n < N; n++) acc += (double)zt[(size_t)n * urow + k * q + f * rho + t] * x[(size_t)n * din + k * p + a];
                    dRz[((size_t)k * q + t * nb + f) * p + a] = (float)acc;
                }
    snprintf(name, sizeof name, "monarch %d->%d nb %d as a BTT: dR from the transposed BTT's saved z, rows t*nb + f", din, dout, nb);
    check_close(dRz, dR, nr, 1e-3f, 1e-4f, name);
    free(x); free(dy); free(R); free(L); free(bias); free(W0); free(W1); free(ym); free(u); free(yb); free(z); free(yp);
    free(dxm); free(dR); free(dL); free(scm); free(dxb); free(dW0); free(dW1); free(scb); free(dRb); free(dLb); free(dyt);
    free(W0t); free(W1t); free(dxt); free(zt); free(W1f); free(dRz);
}

// The backward's dx is a forward of the transposed BTT (btt.h) on dy, whose saved z is the
// backward's dZ in the (gamma, phi, rho) layout (btt_backward's scratch): what lets the GPU run
// its fused forward kernel for the backward.
static void test_btt_transposed(int A, int G, int P, int E, int R, int N) {
    BTTShape s;
    btt_shape(&s, A, G, P, E, R);
    const BTTShape t = btt_shape_transposed(&s);
    const size_t n0 = btt_w0_size(&s), n1 = btt_w1_size(&s);
    float *x = randn((size_t)N * s.d_in, 1.0f), *dy = randn((size_t)N * s.d_out, 1.0f), *W0 = randn(n0, 0.3f), *W1 = randn(n1, 0.3f);
    float *y = zeros((size_t)N * s.d_out), *z = zeros(btt_z_size(&s, N)), *dx = zeros((size_t)N * s.d_in), *dW0 = zeros(n0), *dW1 = zeros(n1);
    float *scr = zeros(btt_scratch_size(&s, N));
    btt_forward(y, z, x, W0, W1, NULL, N, &s);
    btt_backward(dx, dW0, dW1, NULL, dy, x, z, W0, W1, N, &s, scr);
    float *W0t = zeros(n1), *W1t = zeros(n0), *dxt = zeros((size_t)N * s.d_in), *zt = zeros(btt_z_size(&t, N));
    btt_transposed_cores(W0t, W1t, W0, W1, &s);
    btt_forward(dxt, zt, dy, W0t, W1t, NULL, N, &t);
    char name[160];
    snprintf(name, sizeof name, "btt (%d %d %d %d) rank %d: shape transposed = (eps %d, phi %d, gamma %d, alpha %d)", A, G, P, E, R, t.alpha,
             t.gamma, t.phi, t.eps);
    check_true(t.alpha == E && t.gamma == P && t.phi == G && t.eps == A && t.rank == R && t.d_in == s.d_out && t.d_out == s.d_in, name, "wrong");
    // W0t[f, e, g*rho+s] = W1[f, g*rho+s, e] at one entry computed by hand
    const int f = P - 1, e = E / 2, gs = (G - 1) * R + R / 2;
    snprintf(name, sizeof name, "btt rank %d: transposed core W0'[f, e, g*rho+s] = W1[f, g*rho+s, e]", R);
    check_close(&W0t[((size_t)f * E + e) * G * R + gs], &W1[((size_t)f * G * R + gs) * E + e], 1, 0, 0, name);
    snprintf(name, sizeof name, "btt %d->%d rank %d: forward of the transposed BTT on dy = the backward's dx", s.d_in, s.d_out, R);
    check_close(dxt, dx, (size_t)N * s.d_in, 1e-5f, 1e-4f, name);
    // N is within one chunk of rows: the scratch holds the contributions to dW0, dW1, then all of dZ
    snprintf(name, sizeof name, "btt %d->%d rank %d: its saved z = the backward's dZ, (gamma, phi, rho) layout", s.d_in, s.d_out, R);
    check_true(N <= btt_chunk_rows(&s), name, "N spans several chunks: the scratch does not hold all of dZ");
    check_close(zt, scr + n0 + n1, btt_z_size(&s, N), 1e-5f, 1e-4f, name);
    free(x); free(dy); free(W0); free(W1); free(y); free(z); free(dx); free(dW0); free(dW1); free(scr);
    free(W0t); free(W1t); free(dxt); free(zt);
}

// btt_backward works through chunks of rows, continuing each weight-gradient element's chain from
// chunk to chunk: its dW0, dW1 must be the bits of one product over all N rows (st_run_jobs on the
// whole dZ, from the transposed BTT's forward), and its dx those of that forward. N spans nchunks
// chunks (their size depends on the thread count and the width).
static void test_btt_chunked(int A, int G, int P, int E, int R, int nchunks) {
    BTTShape s;
    btt_shape(&s, A, G, P, E, R);
    const int N = nchunks * btt_chunk_rows(&s) - 20;  // the last chunk partial
    const BTTShape t = btt_shape_transposed(&s);
    const size_t n0 = btt_w0_size(&s), n1 = btt_w1_size(&s), zrow = btt_z_row(&s);
    float *x = randn((size_t)N * s.d_in, 1.0f), *dy = randn((size_t)N * s.d_out, 1.0f), *W0 = randn(n0, 0.3f), *W1 = randn(n1, 0.3f);
    float *y = zeros((size_t)N * s.d_out), *z = zeros(btt_z_size(&s, N)), *dx = zeros((size_t)N * s.d_in), *dW0 = zeros(n0), *dW1 = zeros(n1);
    float *scr = zeros(btt_scratch_size(&s, N));
    btt_forward(y, z, x, W0, W1, NULL, N, &s);
    btt_backward(dx, dW0, dW1, NULL, dy, x, z, W0, W1, N, &s, scr);
    float *W0t = zeros(n1), *W1t = zeros(n0), *dxt = zeros((size_t)N * s.d_in), *dz = zeros(btt_z_size(&t, N));
    float *rW0 = zeros(n0), *rW1 = zeros(n1);
    btt_transposed_cores(W0t, W1t, W0, W1, &s);
    btt_forward(dxt, dz, dy, W0t, W1t, NULL, N, &t);
    StGemmJob *jobs = (StGemmJob *)malloc(sizeof(StGemmJob) * (size_t)(G + P));
    for (int f = 0; f < P; f++)
        jobs[f] = st_job(1, 0, G * R, E, N, z + (size_t)f * G * R, (int)zrow, dy + (size_t)f * E, s.d_out, rW1 + (size_t)f * G * R * E, E, ST_ADD);
    for (int g = 0; g < G; g++)
        jobs[P + g] = st_job(1, 0, A, P * R, N, x + (size_t)g * A, s.d_in, dz + (size_t)g * P * R, (int)zrow, rW0 + (size_t)g * A * P * R, P * R, ST_ADD);
    st_run_jobs(jobs, G + P);
    char name[200];
    const int chunk = btt_chunk_rows(&s);
    snprintf(name, sizeof name, "btt %d->%d rank %d, N %d in chunks of %d rows: dW0, dW1, dx = one product over all rows, bit for bit",
             s.d_in, s.d_out, R, N, chunk);
    check_close(dW0, rW0, n0, 0, 0, name);
    check_close(dW1, rW1, n1, 0, 0, name);
    check_close(dx, dxt, (size_t)N * s.d_in, 0, 0, name);
    free(jobs); free(x); free(dy); free(W0); free(W1); free(y); free(z); free(dx); free(dW0); free(dW1); free(scr);
    free(W0t); free(W1t); free(dxt); free(dz); free(rW0); free(rW1);
}

// The same for Monarch: dR, dL over chunks of rows = one product over all rows, bit for bit,
// with dyt and du for all rows computed here from dy with st_gemm.
static void test_monarch_chunked(int din, int dout, int nb, int nchunks) {
    MonarchShape m;
    monarch_shape(&m, din, dout, nb);
    const int p = m.p, s = m.s, q = m.q, urow = nb * q;
    const int N = nchunks * monarch_chunk_rows(&m) - 20;
    const size_t nr = monarch_r_size(&m), nl = monarch_l_size(&m);
    float *x = randn((size_t)N * din, 1.0f), *dy = randn((size_t)N * dout, 1.0f), *R = randn(nr, 0.3f), *L = randn(nl, 0.3f);
    float *y = zeros((size_t)N * dout), *u = zeros(monarch_u_size(&m, N)), *dx = zeros((size_t)N * din), *dR = zeros(nr), *dL = zeros(nl);
    float *scr = zeros(monarch_scratch_size(&m, N));
    monarch_forward(y, u, x, R, L, NULL, N, &m);
    monarch_backward(dx, dR, dL, NULL, dy, x, u, R, L, N, &m, scr);
    float *dyt = zeros((size_t)N * dout), *dut = zeros((size_t)N * urow), *du = zeros((size_t)N * urow), *rR = zeros(nr), *rL = zeros(nl);
    for (int i = 0; i < N; i++) st_transpose(dyt + (size_t)i * dout, dy + (size_t)i * dout, s, nb, 1);
    for (int l = 0; l < nb; l++)
        st_gemm(0, 0, N, q, s, dyt + (size_t)l * s, dout, L + (size_t)l * s * q, q, 0.0f, dut + (size_t)l * q, urow);
    for (int i = 0; i < N; i++) st_transpose(du + (size_t)i * urow, dut + (size_t)i * urow, nb, q, 1);
    StGemmJob *jobs = (StGemmJob *)malloc(sizeof(StGemmJob) * (size_t)(2 * nb));
    for (int l = 0; l < nb; l++)
        jobs[l] = st_job(1, 0, s, q, N, dyt + (size_t)l * s, dout, u + (size_t)l * q, urow, rL + (size_t)l * s * q, q, ST_ADD);
    for (int k = 0; k < nb; k++)
        jobs[nb + k] = st_job(1, 0, q, p, N, du + (size_t)k * q, urow, x + (size_t)k * p, din, rR + (size_t)k * q * p, p, ST_ADD);
    st_run_jobs(jobs, 2 * nb);
    char name[200];
    snprintf(name, sizeof name, "monarch %d->%d nb=%d, N %d in chunks of %d rows: dR, dL = one product over all rows, bit for bit", din,
             dout, nb, N, monarch_chunk_rows(&m));
    check_close(dR, rR, nr, 0, 0, name);
    check_close(dL, rL, nl, 0, 0, name);
    free(jobs); free(x); free(dy); free(R); free(L); free(y); free(u); free(dx); free(dR); free(dL); free(scr);
    free(dyt); free(dut); free(du); free(rR); free(rL);
}

// moe_backward works expert by expert through chunks of its group's rows: forced chunks of one
// tile must give the bits of one chunk per expert (dx, dW0, dW1, drouter, dbias), and both must
// match a float64 evaluation of the gradients (from the saved routing).
static void test_moe_chunked(int A, int G, int P, int Ep, int E, int K, int N) {
    MoEShape s;
    moe_shape(&s, A, G, P, Ep, E, K);
    const int din = s.btt.d_in, dout = s.btt.d_out;
    const size_t n0 = btt_w0_size(&s.btt), n1 = btt_w1_size(&s.btt), nr = moe_router_size(&s);
    float *x = randn((size_t)N * din, 1.0f), *dy = randn((size_t)N * dout, 1.0f), *W0 = randn(n0, 0.3f), *W1 = randn(n1, 0.3f);
    float *R = randn(nr, 0.5f), *b = randn((size_t)dout, 0.1f), *y = zeros((size_t)N * dout);
    MoEState st;
    moe_state_alloc(&st, &s, N);
    moe_forward(y, &st, x, W0, W1, R, b, N, &s);
    moe_aux_loss(&st, N, &s);
    float *g[2][5];
    for (int v = 0; v < 2; v++) {  // v = 0: one tile per chunk; v = 1: one chunk
        st_chunk_rows_forced = v == 0 ? ST_TILE_ROWS : N;
        float *scr = zeros(moe_scratch_size(&s, N));
        g[v][0] = zeros((size_t)N * din); g[v][1] = zeros(n0); g[v][2] = zeros(n1); g[v][3] = zeros(nr); g[v][4] = zeros((size_t)dout);
        moe_backward(g[v][0], g[v][1], g[v][2], g[v][3], g[v][4], dy, 0.02f, x, &st, W0, W1, R, N, &s, scr);
        free(scr);
    }
    st_chunk_rows_forced = 0;
    int maxg = 0;
    for (int e = 0; e < E; e++) maxg = st.counts[e] > maxg ? st.counts[e] : maxg;
    const size_t len[5] = {(size_t)N * din, n0, n1, nr, (size_t)dout};
    const char *what[5] = {"dx", "dW0", "dW1", "drouter", "dbias"};
    char name[200];
    for (int i = 0; i < 5; i++) {
        snprintf(name, sizeof name, "moe %d->%d E=%d K=%d, N %d (largest group %d) in chunks of %d rows: %s = one chunk, bit for bit", din,
                 dout, E, K, N, maxg, ST_TILE_ROWS, what[i]);
        check_close(g[0][i], g[1][i], len[i], 0, 0, name);
    }
    // float64: dW0, dW1 and the expert part of dx from the saved routing (gates fixed)
    double *rW0 = (double *)calloc(n0, sizeof(double)), *rW1 = (double *)calloc(n1, sizeof(double));
    double *z = (double *)malloc(sizeof(double) * (size_t)G * P), *dz = (double *)malloc(sizeof(double) * (size_t)G * P);
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++) {
            const int e = st.sel[t * K + k];
            const double gt = st.gate[t * K + k];
            const float *xt = x + (size_t)t * din, *dyt = dy + (size_t)t * dout;
            for (int gg = 0; gg < G; gg++)
                for (int f = 0; f < P; f++) {
                    double a = 0;
                    for (int aa = 0; aa < A; aa++) a += (double)W0[((size_t)(gg * A + aa) * P + f) * E + e] * xt[gg * A + aa];
                    z[gg * P + f] = a;
                }
            for (int f = 0; f < P; f++)
                for (int gg = 0; gg < G; gg++) {
                    double a = 0;
                    for (int o = 0; o < Ep; o++) {
                        const size_t wi = ((size_t)(f * G + gg) * E + e) * Ep + o;
                        a += (double)W1[wi] * dyt[f * Ep + o];
                        rW1[wi] += gt * z[gg * P + f] * dyt[f * Ep + o];
                    }
                    dz[gg * P + f] = gt * a;
                }
            for (int gg = 0; gg < G; gg++)
                for (int aa = 0; aa < A; aa++)
                    for (int f = 0; f < P; f++) rW0[((size_t)(gg * A + aa) * P + f) * E + e] += xt[gg * A + aa] * dz[gg * P + f];
        }
    float *fW0 = zeros(n0), *fW1 = zeros(n1);
    for (size_t i = 0; i < n0; i++) fW0[i] = (float)rW0[i];
    for (size_t i = 0; i < n1; i++) fW1[i] = (float)rW1[i];
    snprintf(name, sizeof name, "moe %d->%d E=%d K=%d, N %d in chunks: dW0 = float64", din, dout, E, K, N);
    check_close(g[0][1], fW0, n0, 1e-3f, 1e-4f, name);
    snprintf(name, sizeof name, "moe %d->%d E=%d K=%d, N %d in chunks: dW1 = float64", din, dout, E, K, N);
    check_close(g[0][2], fW1, n1, 1e-3f, 1e-4f, name);
    for (int v = 0; v < 2; v++)
        for (int i = 0; i < 5; i++) free(g[v][i]);
    free(rW0); free(rW1); free(z); free(dz); free(fW0); free(fW1);
    moe_state_free(&st);
    free(x); free(dy); free(W0); free(W1); free(R); free(b); free(y);
}

static void grad_btt(int A, int G, int P, int E, int R, int N, int nsample) {
    Layer L;
    memset(&L, 0, sizeof L);
    L.kind = 0;
    btt_shape(&L.bs, A, G, P, E, R);
    layer_init(&L, N, 1);
    char tag[100];
    snprintf(tag, sizeof tag, "btt %d->%d rank %d", L.bs.d_in, L.bs.d_out, R);
    grad_tests(&L, tag, 0.25f, 2e-3f, 1e-3f, nsample);  // L is linear in each entry: FD is exact up to rounding
    layer_free(&L);
}
static void grad_monarch(int din, int dout, int nb, int N, int nsample) {
    Layer L;
    memset(&L, 0, sizeof L);
    L.kind = 1;
    monarch_shape(&L.ms, din, dout, nb);
    layer_init(&L, N, 1);
    char tag[100];
    snprintf(tag, sizeof tag, "monarch %d->%d nb=%d", din, dout, nb);
    grad_tests(&L, tag, 0.25f, 2e-3f, 1e-3f, nsample);
    layer_free(&L);
}
static void grad_moe(int A, int G, int P, int Ep, int E, int K, int N, int nsample) {
    Layer L;
    memset(&L, 0, sizeof L);
    L.kind = 2;
    moe_shape(&L.es, A, G, P, Ep, E, K);
    layer_init(&L, N, 1);
    L.c_aux = 3.0f;  // weight the aux loss up so that its gradient is visible in the check
    char tag[100];
    snprintf(tag, sizeof tag, "moe %d->%d E=%d K=%d (L = sum y r + 3 aux)", L.es.btt.d_in, L.es.btt.d_out, E, K);
    grad_tests(&L, tag, 1e-2f, 3e-3f, 1e-2f, nsample);  // nonlinear (softmax): small h, looser tolerance
    layer_free(&L);
}

// ---------------------------------------------------------------------------------------------
// Quick timing (--bench): forward + backward at d = 768, N = 4096.

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static void bench(void) {
    const int N = 4096, d = 768, reps = 5;
    printf("# timing forward+backward, N=%d, d=%d->%d, %d threads (best of %d)\n", N, d, d, st_num_threads(), reps);
    float *x = randn((size_t)N * d, 1.0f), *dy = randn((size_t)N * d, 1.0f), *y = zeros((size_t)N * d), *dx = zeros((size_t)N * d);
    float *b = randn((size_t)d, 0.1f), *db = zeros((size_t)d);
    {   // dense through the same per-thread-block sgemm scheme
        float *W = randn((size_t)d * d, 0.02f), *dW = zeros((size_t)d * d);
        double best_f = 1e30, best_b = 1e30;
        for (int r = 0; r < reps + 1; r++) {
            double t0 = now_ms();
            StGemmJob j = st_job(0, 1, N, d, d, x, d, W, d, y, d, 0);
            st_run_jobs(&j, 1);
            double t1 = now_ms();
            StGemmJob jb[2] = {st_job(0, 0, N, d, d, dy, d, W, d, dx, d, 0), st_job(1, 0, d, d, N, dy, d, x, d, dW, d, 1)};
            st_run_jobs(jb, 2);
            st_bias_backward(db, dy, N, d);
            double t2 = now_ms();
            if (r) { best_f = t1 - t0 < best_f ? t1 - t0 : best_f; best_b = t2 - t1 < best_b ? t2 - t1 : best_b; }
        }
        printf("# dense                 fwd %7.2f ms  bwd %7.2f ms  total %7.2f ms  (%zu MACs/row)\n", best_f, best_b, best_f + best_b, (size_t)d * d);
        free(W); free(dW);
    }
    int ranks[] = {1, 4};
    for (int ri = 0; ri < 2; ri++) {
        BTTShape s;
        btt_shape_default(&s, d, d, ranks[ri]);
        float *w0 = randn(btt_w0_size(&s), 0.1f), *w1 = randn(btt_w1_size(&s), 0.1f), *z = zeros(btt_z_size(&s, N));
        float *d0 = zeros(btt_w0_size(&s)), *d1 = zeros(btt_w1_size(&s)), *scr = zeros(btt_scratch_size(&s, N));
        double best_f = 1e30, best_b = 1e30;
        for (int r = 0; r < reps + 1; r++) {
            double t0 = now_ms();
            btt_forward(y, z, x, w0, w1, b, N, &s);
            double t1 = now_ms();
            btt_backward(dx, d0, d1, db, dy, x, z, w0, w1, N, &s, scr);
            double t2 = now_ms();
            if (r) { best_f = t1 - t0 < best_f ? t1 - t0 : best_f; best_b = t2 - t1 < best_b ? t2 - t1 : best_b; }
        }
        printf("# btt rank %d            fwd %7.2f ms  bwd %7.2f ms  total %7.2f ms  (%zu MACs/row)\n", ranks[ri], best_f, best_b, best_f + best_b, btt_flops_per_row(&s));
        free(w0); free(w1); free(z); free(d0); free(d1); free(scr);
    }
    int nbs[] = {4, 16, 32};
    for (int ni = 0; ni < 3; ni++) {
        MonarchShape m;
        monarch_shape(&m, d, d, nbs[ni]);
        float *R = randn(monarch_r_size(&m), 0.1f), *L = randn(monarch_l_size(&m), 0.1f), *u = zeros(monarch_u_size(&m, N));
        float *dR = zeros(monarch_r_size(&m)), *dL = zeros(monarch_l_size(&m)), *scr = zeros(monarch_scratch_size(&m, N));
        double best_f = 1e30, best_b = 1e30;
        for (int r = 0; r < reps + 1; r++) {
            double t0 = now_ms();
            monarch_forward(y, u, x, R, L, b, N, &m);
            double t1 = now_ms();
            monarch_backward(dx, dR, dL, db, dy, x, u, R, L, N, &m, scr);
            double t2 = now_ms();
            if (r) { best_f = t1 - t0 < best_f ? t1 - t0 : best_f; best_b = t2 - t1 < best_b ? t2 - t1 : best_b; }
        }
        printf("# monarch nb=%-2d          fwd %7.2f ms  bwd %7.2f ms  total %7.2f ms  (%zu MACs/row)\n", nbs[ni], best_f, best_b, best_f + best_b, monarch_flops_per_row(&m));
        free(R); free(L); free(u); free(dR); free(dL); free(scr);
    }
    {
        MoEShape s;
        moe_shape_default(&s, d, d, 8, 2);
        float *w0 = randn(btt_w0_size(&s.btt), 0.1f), *w1 = randn(btt_w1_size(&s.btt), 0.1f), *rt = randn(moe_router_size(&s), 0.05f);
        float *d0 = zeros(btt_w0_size(&s.btt)), *d1 = zeros(btt_w1_size(&s.btt)), *drt = zeros(moe_router_size(&s));
        float *scr = zeros(moe_scratch_size(&s, N));
        MoEState st;
        moe_state_alloc(&st, &s, N);
        double best_f = 1e30, best_b = 1e30;
        for (int r = 0; r < reps + 1; r++) {
            double t0 = now_ms();
            moe_forward(y, &st, x, w0, w1, rt, b, N, &s);
            double t1 = now_ms();
            moe_backward(dx, d0, d1, drt, db, dy, 0.01f, x, &st, w0, w1, rt, N, &s, scr);
            double t2 = now_ms();
            if (r) { best_f = t1 - t0 < best_f ? t1 - t0 : best_f; best_b = t2 - t1 < best_b ? t2 - t1 : best_b; }
        }
        printf("# btt_moe E=8 K=2        fwd %7.2f ms  bwd %7.2f ms  total %7.2f ms  (%zu MACs/row)\n", best_f, best_b, best_f + best_b, moe_flops_per_row(&s));
        moe_state_free(&st);
        free(w0); free(w1); free(rt); free(d0); free(d1); free(drt); free(scr);
    }
    free(x); free(dy); free(y); free(dx); free(b); free(db);
}

int main(int argc, char **argv) {
    mt_seed(&g_rng, 1337);
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) { bench(); return 0; }
    test_factors();
    test_transpose();
    // forward against materialised W: small non-square shapes, then realistic ones (d = 768, N = 64)
    test_btt_forward(4, 12, 8, 10, 1, 7, 1);   // 48 -> 80
    test_btt_forward(4, 12, 8, 10, 2, 7, 0);
    test_btt_forward(6, 8, 5, 16, 4, 13, 1);   // 48 -> 80, other factors
    test_btt_forward(16, 5, 3, 7, 3, 150, 1);  // 80 -> 21, N spanning several row tiles
    test_btt_forward(16, 48, 16, 48, 1, 64, 1);  // 768 -> 768, default factors
    test_btt_forward(16, 48, 16, 48, 4, 64, 1);
    test_btt_forward(16, 48, 32, 96, 2, 64, 1);  // 768 -> 3072
    test_monarch_forward(48, 80, 4, 9, 1);
    test_monarch_forward(80, 48, 4, 9, 1);
    test_monarch_forward(36, 36, 6, 5, 0);
    test_monarch_forward(768, 3072, 4, 64, 1);
    test_monarch_forward(3072, 768, 4, 64, 1);
    test_monarch_forward(768, 768, 32, 130, 1);
    test_moe_forward(4, 12, 8, 10, 4, 2, 31, 0.5f);   // 48 -> 80, E=4 K=2
    test_moe_forward(6, 8, 4, 5, 5, 1, 31, 0.5f);     // 48 -> 20, E=5 K=1
    test_moe_forward(4, 3, 2, 5, 3, 3, 150, 0.5f);    // K = E, several tiles
    test_moe_forward(16, 48, 16, 48, 8, 2, 64, 0.05f);  // 768 -> 768, E=8 K=2
    test_moe_ties();
    test_moe_full_mix();
    test_monarch_is_btt(8, 11);
    test_monarch_is_btt(4, 70);
    test_monarch_is_btt(32, 64);  // d = 1024
    test_monarch_as_btt(48, 80, 4, 9);     // rank 3
    test_monarch_as_btt(80, 48, 4, 9);
    test_monarch_as_btt(36, 36, 6, 5);     // rank 1
    test_monarch_as_btt(768, 3072, 4, 40);  // GPT-2's fc in 4 blocks: rank 48
    test_monarch_as_btt(3072, 768, 4, 40);
    {  // nb = 24 does not divide q = 32 (768 in 24 blocks): no BTT
        MonarchShape m;
        BTTShape b;
        monarch_shape(&m, 768, 768, 24);
        check_true(!monarch_btt_shape(&b, &m), "monarch 768->768 nb 24 (q 32): not a BTT", "took a BTT shape");
    }
    test_btt_transposed(4, 3, 5, 6, 1, 13);   // 12 -> 30, every factor distinct
    test_btt_transposed(3, 4, 2, 5, 3, 9);    // 12 -> 10, rank 3
    test_btt_transposed(16, 48, 32, 96, 2, 7);  // GPT-2 768 -> 3072 rank 2
    // gradients (finite differences), accumulation, dx overwrite
    grad_btt(4, 12, 8, 10, 1, 5, 30);
    grad_btt(4, 12, 8, 10, 2, 5, 30);
    grad_btt(6, 8, 5, 16, 4, 70, 30);
    grad_btt(16, 48, 16, 48, 4, 64, 12);  // realistic
    grad_monarch(48, 80, 4, 5, 30);
    grad_monarch(80, 48, 4, 70, 30);
    grad_monarch(768, 768, 4, 64, 12);
    grad_moe(4, 12, 8, 10, 4, 2, 9, 40);
    grad_moe(4, 3, 2, 5, 3, 3, 70, 40);
    grad_moe(6, 8, 4, 5, 5, 1, 20, 40);
    // last: their sizes depend on the thread count, so they would shift the random draws of the rest
    test_btt_chunked(16, 48, 16, 48, 4, 3);  // 768 -> 768 rank 4: chunks of 256 rows on 2 threads
    test_btt_chunked(8, 16, 8, 16, 2, 3);    // 128 -> 128: a small dZ row, chunks of 3072 rows
    test_btt_chunked(32, 64, 32, 64, 4, 3);  // 2048 -> 2048 rank 4: the smallest chunks (a tile per thread)
    test_monarch_chunked(768, 768, 4, 3);
    test_monarch_chunked(768, 3072, 32, 3);
    test_moe_chunked(16, 48, 16, 48, 8, 2, 700);  // 768 -> 768, groups of ~175 rows in chunks of 64
    test_moe_chunked(4, 12, 8, 10, 4, 3, 300);    // 48 -> 80, E=4 K=3: groups of ~225 rows
    return test_summary();
}
