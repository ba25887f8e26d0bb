// test_btt_tiles.c: the fused BTT forward kernel (structured/btt_fused.cuh) run on the CPU, tile by
// tile, with the geometry and every index of common/btt_tiles.h (the header the kernel includes),
// and compared with btt.h's fp32 btt_forward.
//
// The emulation is a transcription of the kernel: blocks loop over tiles with stride grid; per x
// chunk a barrier, the store of the 256 "threads'" prefetch registers into the x chunk, a barrier,
// the prefetch of the next chunk (the next tile's chunk 0 after a tile's last; 16-byte vectors,
// rows past N zero-filled), warp items walked as the kernel walks them, each a 16x16 fp32 fragment accumulated k-step by
// k-step (16-term fp32 sums) from A fragments read out of the emulated shared memory and B
// fragments out of W0; the fragment goes through the warp's staging tile, and "lanes" (row
// bt_epi_row, 8 columns from bt_epi_col) round it to bf16 into the z tile at bt_z1_run's indices
// (checked to be consecutive and aligned in the runs of bt_z1_vec the kernel stores as one);
// then the barrier, the z copy-out, and stage 2 (mt x nb fragments per item, bias, bf16 rounding,
// stores of rows < N only). Shared memory is one byte buffer laid out by the geometry's offsets,
// so overlapping regions would corrupt each other. Every access also goes through a checker:
//   - bounds of the dynamic smem size, of x, W0, W1, bias, y, z;
//   - wmma preconditions: fragment pointers 32-byte aligned (smem offset, or global element offset
//     * 2 with 32-byte aligned bases), ldm a multiple of 8 (bf16) or 4 (fp32); 16-byte vectors aligned;
//   - shared-memory races between warps: each 2-byte unit remembers the barrier epoch and warp of
//     its last write and its readers; a read of another warp's write, or a write over another warp's
//     read or write, within one epoch (no __syncthreads between) is a race; reading a unit never
//     written is an error (e.g. a tail row that was not zero-filled);
//   - every y (and saved z) element of rows < N written exactly once, nothing else written.
// What it cannot see: the order of the sums inside one tensor-core MMA (fp32-level), intra-warp
// ordering of the staging tile (the kernel's __syncwarp pairs, reviewed by hand), launch geometry.
// Segmented launches (BTT-MoE: every expert in one launch, x rows gathered through `order`) run
// through the same emulation with a tile table (test_seg_case).
//
// Tolerances, with u = 2^-8 (bf16 round to nearest: |bf16(v) - v| <= u|v|), z_abs = Σ_a |W0||x| and
// y_abs = Σ |W1| z_abs (btt_forward on absolute values, an upper bound of Σ|W1||z|):
//   z: |z - z_ref| <= u |z_ref| + 2^-16 z_abs          (one rounding + fp32 sums of <= 64 terms)
//   y: |y - y_ref| <= u |y_ref| + 1.02 u y_abs         (z's rounding carried through W1, fp32 sums,
//                                                       one final rounding of y + bias)
// plus the RMS error of y and z relative to the RMS of the reference <= 2^-7 (expected ~2^-9: a
// wrong block or offset gives errors of the order of the values themselves).
#include <stdint.h>
#include "../common/btt_tiles.h"
#include "../common/rng.h"
#include "../structured/btt.h"
#include "check.h"

// ----------------------------------------------------------------------------------------------
// bf16 round to nearest even (finite inputs), as __float2bfloat16_rn and the harness's dev_f2bf

static uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float bf16r(float f) { return bf2f(f2bf(f)); }

// ----------------------------------------------------------------------------------------------
// emulated shared memory with a race checker (per 2-byte unit)

typedef struct {
    unsigned char *mem;
    int bytes;
    int *w_epoch, *w_warp, *r_epoch, *r_warp;  // r_warp -2: read by several warps this epoch
    int epoch;
    long errors;
    char first[256];
} Smem;

static void sm_error(Smem *s, const char *fmt, int a, int b) {
    if (s->errors++ == 0) snprintf(s->first, sizeof(s->first), fmt, a, b);
}

static void sm_init(Smem *s, int bytes) {
    s->bytes = bytes;
    s->mem = (unsigned char *)mallocCheck((size_t)bytes);
    memset(s->mem, 0xFF, (size_t)bytes);  // NaN-ish garbage
    int units = bytes / 2;
    s->w_epoch = (int *)mallocCheck(sizeof(int) * units);
    s->w_warp = (int *)mallocCheck(sizeof(int) * units);
    s->r_epoch = (int *)mallocCheck(sizeof(int) * units);
    s->r_warp = (int *)mallocCheck(sizeof(int) * units);
    for (int i = 0; i < units; i++) s->w_epoch[i] = s->r_epoch[i] = -1;
    s->epoch = 0;
    s->errors = 0;
    s->first[0] = 0;
}
static void sm_free(Smem *s) {
    free(s->mem); free(s->w_epoch); free(s->w_warp); free(s->r_epoch); free(s->r_warp);
}
static void sm_sync(Smem *s) { s->epoch++; }  // __syncthreads()

static int sm_check(Smem *s, int off, int len) {
    if (off < 0 || off + len > s->bytes || off % 2) {
        sm_error(s, "smem access out of range or misaligned at byte %d (size %d)", off, s->bytes);
        return 0;
    }
    return 1;
}
static void sm_note_read(Smem *s, int off, int len, int warp) {
    for (int u = off / 2; u < (off + len) / 2; u++) {
        if (s->w_epoch[u] < 0) sm_error(s, "smem read of a never-written unit at byte %d (warp %d)", 2 * u, warp);
        else if (s->w_epoch[u] == s->epoch && s->w_warp[u] != warp)
            sm_error(s, "smem race: read after another warp's write without a barrier at byte %d (warp %d)", 2 * u, warp);
        if (s->r_epoch[u] != s->epoch) { s->r_epoch[u] = s->epoch; s->r_warp[u] = warp; }
        else if (s->r_warp[u] != warp) s->r_warp[u] = -2;
    }
}
static void sm_note_write(Smem *s, int off, int len, int warp) {
    for (int u = off / 2; u < (off + len) / 2; u++) {
        if (s->w_epoch[u] == s->epoch && s->w_warp[u] != warp)
            sm_error(s, "smem race: two warps write byte %d without a barrier (warp %d)", 2 * u, warp);
        if (s->r_epoch[u] == s->epoch && s->r_warp[u] != warp)
            sm_error(s, "smem race: write over another warp's read without a barrier at byte %d (warp %d)", 2 * u, warp);
        s->w_epoch[u] = s->epoch;
        s->w_warp[u] = warp;
    }
}
static float sm_rd_bf16(Smem *s, int off, int warp) {
    if (!sm_check(s, off, 2)) return NAN;
    sm_note_read(s, off, 2, warp);
    uint16_t v;
    memcpy(&v, s->mem + off, 2);
    return bf2f(v);
}
static void sm_wr_bf16(Smem *s, int off, float f, int warp) {  // f already bf16-valued
    if (!sm_check(s, off, 2)) return;
    sm_note_write(s, off, 2, warp);
    uint16_t v = f2bf(f);
    memcpy(s->mem + off, &v, 2);
}
static float sm_rd_f32(Smem *s, int off, int warp) {
    if (!sm_check(s, off, 4)) return NAN;
    sm_note_read(s, off, 4, warp);
    float v;
    memcpy(&v, s->mem + off, 4);
    return v;
}
static void sm_wr_f32(Smem *s, int off, float v, int warp) {
    if (!sm_check(s, off, 4)) return;
    sm_note_write(s, off, 4, warp);
    memcpy(s->mem + off, &v, 4);
}

// ----------------------------------------------------------------------------------------------
// global memory (bounds-checked) and the kernel's arguments

typedef struct {
    const float *x, *W0, *W1, *bias;  // bias may be NULL
    size_t nx, nW0, nW1;
    float *y, *z;                     // z may be NULL (not saved)
    unsigned char *ycnt, *zcnt;       // writes per element
    size_t ny, nz;
    long gerrors;
    char gfirst[256];
} Args;

static void g_error(Args *a, const char *what, size_t i, size_t n) {
    if (a->gerrors++ == 0) snprintf(a->gfirst, sizeof(a->gfirst), "%s: element %zu of %zu", what, i, n);
}

// 16x16 fragments as float blocks; loads check the wmma preconditions
typedef float Frag[16][16];

static void frag_load_smem(Frag F, Smem *s, int byte_off, int ldm, int warp) {
    if (byte_off % 32 || ldm % 8) sm_error(s, "wmma smem fragment misaligned: byte %d, ldm %d", byte_off, ldm);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) F[i][j] = sm_rd_bf16(s, byte_off + 2 * (i * ldm + j), warp);
}
static void frag_load_global(Frag F, Args *a, const float *base, size_t n, size_t off, int ldm, const char *what) {
    if ((off * 2) % 32 || ldm % 8) g_error(a, "wmma global fragment misaligned", off, n);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            size_t e = off + (size_t)i * ldm + j;
            if (e >= n) { g_error(a, what, e, n); F[i][j] = NAN; }
            else F[i][j] = base[e];
        }
}
static void frag_zero(Frag C) { memset(C, 0, sizeof(Frag)); }
static void frag_mma(Frag C, Frag A, Frag B) {  // C += A B, one 16-term fp32 sum per element
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float t = 0.0f;
            for (int k = 0; k < 16; k++) t += A[i][k] * B[k][j];
            C[i][j] += t;
        }
}
static void frag_store_staging(Smem *s, int byte_off, Frag C, int warp) {  // store_matrix_sync, fp32 row-major
    if (byte_off % 32 || BT_STG_LD % 4) sm_error(s, "wmma staging store misaligned: byte %d, ldm %d", byte_off, BT_STG_LD);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) sm_wr_f32(s, byte_off + 4 * (i * BT_STG_LD + j), C[i][j], warp);
}

static float g_x(Args *a, size_t i) {
    if (i >= a->nx) { g_error(a, "x read out of range", i, a->nx); return NAN; }
    return a->x[i];
}
static void g_wr(Args *a, float *dst, unsigned char *cnt, size_t n, size_t i, float v, const char *what) {
    if (i >= n) { g_error(a, what, i, n); return; }
    dst[i] = v;
    if (cnt[i] < 255) cnt[i]++;
}

// ----------------------------------------------------------------------------------------------
// the x chunk through the threads' prefetch registers (bt_x_load / bt_x_store in the kernel)

static float g_pre[BT_THREADS][BT_XVEC][8];
static float g_prew[BT_THREADS][BT_WVEC][8];  // ws: the W0 chunk's prefetch registers

static void emu_x_load(const BtGeom *g, Args *a, const BtSeg *sg, int N, int tile, int ch) {
    const BtTile tl = bt_tile_at(g, sg, N, tile);
    for (int t = 0; t < BT_THREADS; t++) {
        BtWalk it;
        bt_walk_begin(&it, bt_x_fill_per(g, bt_chunk_gcount(g, ch)), t, BT_THREADS);
        for (int k = 0; k < BT_XVEC; k++, bt_walk_next(&it)) {
            if (it.o >= g->tm) continue;
            if (it.o >= tl.rows) {  // tail: zeros, no load
                for (int e = 0; e < 8; e++) g_pre[t][k][e] = 0.0f;
                continue;
            }
            size_t gi = bt_x_global(g, bt_x_row(sg, tl.r0 + it.o), ch, it.i * 8);
            if (gi % 8) g_error(a, "x vector load misaligned", gi, a->nx);
            for (int e = 0; e < 8; e++) g_pre[t][k][e] = g_x(a, gi + e);
        }
    }
}
static void emu_x_store(const BtGeom *g, Smem *S, int ch) {
    for (int t = 0; t < BT_THREADS; t++) {
        BtWalk it;
        bt_walk_begin(&it, bt_x_fill_per(g, bt_chunk_gcount(g, ch)), t, BT_THREADS);
        for (int k = 0; k < BT_XVEC; k++, bt_walk_next(&it)) {
            if (it.o >= g->tm) continue;
            int so = g->off_x + 2 * bt_x_smem(g, it.o, it.i * 8);
            if (so % 16) sm_error(S, "x chunk vector store misaligned at byte %d (row %d)", so, it.o);
            for (int e = 0; e < 8; e++) sm_wr_bf16(S, so + 2 * e, g_pre[t][k][e], t / 32);
        }
        if (it.o < g->tm) sm_error(S, "x chunk not covered by BT_XVEC vectors per thread (thread %d, row %d)", t, it.o);
    }
}

// ws: W0 chunk (q, ch) of the tile's segment through the prefetch registers (bt_w_load / bt_w_store)
static void emu_w_load(const BtGeom *g, Args *a, const BtSeg *sg, int N, int tile, int q, int ch) {
    const size_t w0o = (size_t)bt_tile_at(g, sg, N, tile).seg * sg->w0_stride;
    const int rows = bt_chunk_gcount(g, ch) * g->A;
    for (int t = 0; t < BT_THREADS; t++) {
        BtWalk it;
        bt_walk_begin(&it, bt_w_fill_per(g), t, BT_THREADS);
        for (int k = 0; k < BT_WVEC; k++, bt_walk_next(&it)) {
            if (it.o >= rows) continue;
            const size_t gi = w0o + bt_w_global(g, q, ch, it.o, it.i * 8);
            if (gi % 8) g_error(a, "W0 vector load misaligned", gi, a->nW0);
            for (int e = 0; e < 8; e++) {
                if (gi + e >= a->nW0) { g_error(a, "W0 chunk read out of range", gi + e, a->nW0); g_prew[t][k][e] = NAN; }
                else g_prew[t][k][e] = a->W0[gi + e];
            }
        }
    }
}
static void emu_w_store(const BtGeom *g, Smem *S, int ch) {
    const int rows = bt_chunk_gcount(g, ch) * g->A;
    for (int t = 0; t < BT_THREADS; t++) {
        BtWalk it;
        bt_walk_begin(&it, bt_w_fill_per(g), t, BT_THREADS);
        for (int k = 0; k < BT_WVEC; k++, bt_walk_next(&it)) {
            if (it.o >= rows) continue;
            int so = g->off_w + 2 * bt_w_smem(g, it.o, it.i * 8);
            if (so % 16) sm_error(S, "W0 chunk vector store misaligned at byte %d (row %d)", so, it.o);
            for (int e = 0; e < 8; e++) sm_wr_bf16(S, so + 2 * e, g_prew[t][k][e], t / 32);
        }
        if (it.o < rows) sm_error(S, "W0 chunk not covered by BT_WVEC vectors per thread (thread %d, row %d)", t, it.o);
    }
}

// ----------------------------------------------------------------------------------------------
// the kernel, block by block (grid blocks; block b takes tiles b, b + grid, ...); sg: a plain
// launch (tiles NULL) or a segmented one (host copies of the tile table and count)

static void emulate(const BtGeom *gp, int grid, int N, Args *a, Smem *err_out, const BtSeg *sg) {
    BtGeom gg = *gp;
    const BtGeom *g = &gg;
    const int ntiles = sg->tiles ? *sg->ntiles : bt_num_tiles(N, g->tm);
    err_out->errors = 0;
    err_out->first[0] = 0;
    for (int block = 0; block < grid; block++) {
        Smem S;
        sm_init(&S, g->smem_bytes);
        if (block < ntiles) {
            emu_x_load(g, a, sg, N, block, 0);
            if (g->ws) emu_w_load(g, a, sg, N, block, 0, 0);
        }
        for (int tile = block; tile < ntiles; tile += grid) {
            const BtTile tl = bt_tile_at(g, sg, N, tile);
            const int r0 = tl.r0, rows = tl.rows;
            const size_t w0o = (size_t)tl.seg * sg->w0_stride, w1o = (size_t)tl.seg * sg->w1_stride;
            for (int q = 0; q < g->npg; q++) {  // groups of pg phi blocks
                // ---- stage 1
                for (int ch = 0; ch < g->nchunks; ch++) {
                    const int g0 = ch * g->gc, gcount = bt_chunk_gcount(g, ch);
                    sm_sync(&S);
                    emu_x_store(g, &S, ch);
                    if (g->ws) emu_w_store(g, &S, ch);
                    sm_sync(&S);
                    int ntile, nq, nch;
                    if (bt_next_step(g, ntiles, grid, tile, q * g->nchunks + ch, &ntile, &nq, &nch)) {
                        emu_x_load(g, a, sg, N, ntile, nch);
                        if (g->ws) emu_w_load(g, a, sg, N, ntile, nq, nch);
                    }
                    for (int warp = 0; warp < BT_WARPS; warp++) {
                        BtWalk it;
                        for (bt_walk_begin(&it, bt_s1_per(g), warp, BT_WARPS); it.o < gcount; bt_walk_next(&it)) {
                            int mt, nt;
                            const int gl = it.o;
                            bt_s1_split(g, it.i, &mt, &nt);
                            Frag acc, A, B;
                            frag_zero(acc);
                            for (int kk = 0; kk < g->ks1; kk++) {
                                frag_load_smem(A, &S, g->off_x + 2 * bt_s1_a(g, mt, gl, kk), g->xld, warp);
                                if (g->ws) frag_load_smem(B, &S, g->off_w + 2 * bt_s1_bs(g, gl, kk, nt), g->wld, warp);
                                else frag_load_global(B, a, a->W0, a->nW0, w0o + bt_s1_b(g, q, g0 + gl, kk, nt), g->fr, "W0 read out of range");
                                frag_mma(acc, A, B);
                            }
                            const int stg = bt_stg_off(g, warp);
                            frag_store_staging(&S, stg, acc, warp);
                            for (int lane = 0; lane < 32; lane++) {
                                const int er = bt_epi_row(lane), ec = bt_epi_col(lane);
                                if ((stg + 4 * (er * BT_STG_LD + ec)) % 16) sm_error(&S, "staging read not 16-byte aligned at byte %d (lane %d)", stg, lane);
                                int idx[8];
                                bt_z1_run(g, mt * 16 + er, g0 + gl, nt * 16 + ec, idx);
                                const int vw = bt_z1_vec(g);  // the kernel stores runs of vw: consecutive and aligned
                                for (int t = 0; t < 8; t += vw) {
                                    if ((g->off_z + 2 * idx[t]) % (2 * vw)) sm_error(&S, "z store of %d bf16 misaligned at byte %d", vw, g->off_z + 2 * idx[t]);
                                    for (int i = 1; i < vw; i++)
                                        if (idx[t + i] != idx[t] + i) sm_error(&S, "z store run of %d not consecutive at element %d", vw, idx[t]);
                                }
                                for (int t = 0; t < 8; t++) {
                                    float v = sm_rd_f32(&S, stg + 4 * (er * BT_STG_LD + ec + t), warp);
                                    sm_wr_bf16(&S, g->off_z + 2 * idx[t], bf16r(v), warp);
                                }
                            }
                        }
                    }
                }
                sm_sync(&S);
                // ---- saved z
                if (a->z) {
                    for (int t = 0; t < BT_THREADS; t++) {
                        BtWalk it;
                        for (bt_walk_begin(&it, bt_zcopy_per(g), t, BT_THREADS); it.o < rows; bt_walk_next(&it)) {
                            const int so = g->off_z + 2 * bt_z_smem(g, it.o, it.i * 8);
                            const size_t gi = bt_z_global(g, r0 + it.o, q, it.i * 8);
                            if (so % 16 || gi % 8) sm_error(&S, "z copy vector misaligned at byte %d (row %d)", so, it.o);
                            for (int e = 0; e < 8; e++)
                                g_wr(a, a->z, a->zcnt, a->nz, gi + e, sm_rd_bf16(&S, so + 2 * e, t / 32), "z write out of range");
                        }
                    }
                }
                if (g->s1only) continue;  // stage 1 alone: no y
                // ---- stage 2
                for (int warp = 0; warp < BT_WARPS; warp++) {
                    BtWalk it2;
                    for (bt_walk_begin(&it2, g->ntg, warp, BT_WARPS); it2.o < g->pg; bt_walk_next(&it2)) {
                        const int fl = it2.o, f = q * g->pg + fl, j = it2.i;
                        static Frag acc[4][3];
                        Frag A, B[3];
                        for (int mt = 0; mt < g->mt; mt++)
                            for (int b = 0; b < g->nb; b++) frag_zero(acc[mt][b]);
                        for (int kk = 0; kk < g->ks2; kk++) {
                            for (int b = 0; b < g->nb; b++)
                                frag_load_global(B[b], a, a->W1, a->nW1, w1o + bt_s2_b(g, f, kk, bt_s2_ntile(g, j, b)), g->E, "W1 read out of range");
                            for (int mt = 0; mt < g->mt; mt++) {
                                frag_load_smem(A, &S, g->off_z + 2 * bt_s2_a(g, mt, fl, kk), g->zld, warp);
                                for (int b = 0; b < g->nb; b++) frag_mma(acc[mt][b], A, B[b]);
                            }
                        }
                        const int stg = bt_stg_off(g, warp);
                        for (int mt = 0; mt < g->mt; mt++)
                            for (int b = 0; b < g->nb; b++) {
                                const int n = bt_s2_ntile(g, j, b);
                                frag_store_staging(&S, stg, acc[mt][b], warp);
                                for (int lane = 0; lane < 32; lane++) {
                                    const int er = bt_epi_row(lane), ec = bt_epi_col(lane), row = r0 + mt * 16 + er;
                                    if (mt * 16 + er >= rows) continue;
                                    if ((stg + 4 * (er * BT_STG_LD + ec)) % 16) sm_error(&S, "staging read not 16-byte aligned at byte %d (lane %d)", stg, lane);
                                    const size_t yi = bt_y_global(g, row, f, n, ec);
                                    if (yi % 8 || bt_bias(g, f, n, ec) % 8) g_error(a, "y/bias vector misaligned", yi, a->ny);
                                    for (int t = 0; t < 8; t++) {
                                        float v = sm_rd_f32(&S, stg + 4 * (er * BT_STG_LD + ec + t), warp);
                                        if (a->bias) v += a->bias[bt_bias(g, f, n, ec + t)];
                                        g_wr(a, a->y, a->ycnt, a->ny, yi + t, bf16r(v), "y write out of range");
                                    }
                                }
                            }
                    }
                }
            }
        }
        if (S.errors && !err_out->errors) snprintf(err_out->first, sizeof(err_out->first), "block %d: %.200s", block, S.first);
        err_out->errors += S.errors;
        sm_free(&S);
    }
}

// ----------------------------------------------------------------------------------------------

static mt19937_state g_rng;

static float *rand_bf16(size_t n, float std) {
    float *p = (float *)mallocCheck(sizeof(float) * (n ? n : 1));
    mt_normal_(p, n, 0.0f, std, &g_rng);
    for (size_t i = 0; i < n; i++) p[i] = bf16r(p[i]);
    return p;
}
static float *absf(const float *a, size_t n) {
    float *p = (float *)mallocCheck(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = fabsf(a[i]);
    return p;
}

// |got - ref| <= u |ref| + c_abs * abs_sum elementwise, and the relative RMS error <= 2^-7
static void check_bounded(const char *name, const float *got, const float *ref, const float *abs_sum, size_t n, double c_abs) {
    const double u = 1.0 / 256.0;
    size_t bad = 0, first = 0;
    double e2 = 0.0, r2 = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]), lim = u * fabs(ref[i]) + c_abs * abs_sum[i];
        if (!(d <= lim)) { if (!bad) first = i; bad++; }
        if (d > worst || d != d) worst = d;
        e2 += d * d;
        r2 += (double)ref[i] * ref[i];
    }
    double rel_rms = r2 > 0 ? sqrt(e2 / r2) : sqrt(e2);
    char why[300];
    if (bad) snprintf(why, sizeof(why), "%zu of %zu outside the bound; first [%zu] got %.7g ref %.7g (abs sum %.4g)", bad, n, first,
                      got[first], ref[first], abs_sum[first]);
    else snprintf(why, sizeof(why), "relative RMS error %.3g > 2^-7", rel_rms);
    char label[200];
    snprintf(label, sizeof(label), "%s (max |diff| %.3g, rel RMS %.2g)", name, worst, rel_rms);
    check_true(!bad && rel_rms <= 1.0 / 128.0, label, why);
}

// The emulation's outputs: y (ny) and, when nz > 0, the saved z, NaN-filled, with write counters.
static void args_outputs(Args *a, size_t ny, size_t nz) {
    a->ny = ny;
    a->y = (float *)mallocCheck(sizeof(float) * ny);
    a->ycnt = (unsigned char *)callocCheck(ny, 1);
    for (size_t i = 0; i < ny; i++) a->y[i] = NAN;
    if (nz) {
        a->nz = nz;
        a->z = (float *)mallocCheck(sizeof(float) * nz);
        a->zcnt = (unsigned char *)callocCheck(nz, 1);
        for (size_t i = 0; i < nz; i++) a->z[i] = NAN;
    }
}

// Runs the emulation and checks it: no shared-memory or global access errors, every y (and saved
// z) element written exactly once, values within the bounds of check_bounded. z_what names z's
// layout in the labels.
static void emulate_and_check(const char *name, const BtGeom *g, int grid, int N, Args *a, const BtSeg *sg, const float *y_ref,
                              const float *y_abs, const float *z_ref, const float *z_abs, const char *z_what) {
    Smem err;
    emulate(g, grid, N, a, &err, sg);
    char label[300], why[300];
    snprintf(label, sizeof(label), "%s: shared memory (bounds, alignment, races, unwritten reads)", name);
    snprintf(why, sizeof(why), "%ld errors; first: %s", err.errors, err.first);
    check_true(err.errors == 0, label, why);
    snprintf(label, sizeof(label), "%s: global accesses (bounds, alignment)", name);
    snprintf(why, sizeof(why), "%ld errors; first: %s", a->gerrors, a->gfirst);
    check_true(a->gerrors == 0, label, why);
    size_t ybad = 0;
    for (size_t i = 0; i < a->ny; i++) ybad += a->ycnt[i] != (g->s1only ? 0 : 1);
    snprintf(label, sizeof(label), g->s1only ? "%s: no y element written (stage 1 alone)" : "%s: every y element written once", name);
    snprintf(why, sizeof(why), "%zu of %zu elements written a wrong number of times", ybad, a->ny);
    check_true(ybad == 0, label, why);
    snprintf(label, sizeof(label), "%s: y", name);
    if (!g->s1only) check_bounded(label, a->y, y_ref, y_abs, a->ny, 1.02 / 256.0);
    if (a->z) {
        size_t zbad = 0;
        for (size_t i = 0; i < a->nz; i++) zbad += a->zcnt[i] != 1;
        snprintf(label, sizeof(label), "%s: every saved z element written once", name);
        snprintf(why, sizeof(why), "%zu of %zu elements written 0 or >1 times", zbad, a->nz);
        check_true(zbad == 0, label, why);
        snprintf(label, sizeof(label), "%s: saved z %s", name, z_what);
        check_bounded(label, a->z, z_ref, z_abs, a->nz, 1.0 / 65536.0);
    }
}

// 1: the cases run the W0-staged kernel (btt_tiles.h, ws); g_s1: stage 1 alone (s1only, ws only);
// g_xpad: x rows this many elements longer than d_in (xs), the extra ones garbage the kernel must skip
static int g_ws = 0, g_s1 = 0, g_xpad = 0;

// pg: phi blocks per group (P: one group, the whole z tile)
static void test_case(int A, int G, int P, int E, int R, int tm, int pg, int N, int grid, int with_bias, int save_z) {
    BTTShape s;
    btt_shape(&s, A, G, P, E, R);
    BtGeom g;
    char name[200];
    if (g_s1) save_z = 1;
    snprintf(name, sizeof(name), "%s%s%d->%d (alpha %d gamma %d phi %d eps %d rank %d) tm %d, %d groups of %d, N %d grid %d%s%s%s",
             g_ws ? "W0 staged: " : "", g_s1 ? "stage 1 alone: " : "", s.d_in, s.d_out, A, G, P, E, R, tm, P / pg, pg, N, grid,
             with_bias ? " bias" : "", save_z ? " z" : "", g_xpad ? " (x rows padded)" : "");
    if (!check_true(bt_geom_pgw(&g, A, G, P, E, R, tm, pg, g_ws), name, "bt_geom_pgw rejected the shape")) return;
    g.xs = s.d_in + g_xpad;
    g.s1only = g_s1;
    const size_t nx = (size_t)N * s.d_in, ny = (size_t)N * s.d_out, nz = btt_z_size(&s, N);
    const size_t n0 = btt_w0_size(&s), n1 = btt_w1_size(&s);
    float *x = rand_bf16(nx, 1.0f), *W0 = rand_bf16(n0, 1.0f / sqrtf((float)A)), *W1 = rand_bf16(n1, 1.0f / sqrtf((float)(G * R)));
    float *bias = with_bias ? rand_bf16((size_t)s.d_out, 0.5f) : NULL;
    // references: fp32 forward, and the forward on absolute values (error bounds)
    float *y_ref = (float *)callocCheck(ny, sizeof(float)), *z_ref = (float *)callocCheck(nz, sizeof(float));
    float *y_abs = (float *)callocCheck(ny, sizeof(float)), *z_abs = (float *)callocCheck(nz, sizeof(float));
    btt_forward(y_ref, z_ref, x, W0, W1, bias, N, &s);
    float *ax = absf(x, nx), *a0 = absf(W0, n0), *a1 = absf(W1, n1);
    btt_forward(y_abs, z_abs, ax, a0, a1, NULL, N, &s);
    // the emulated kernel
    Args a;
    memset(&a, 0, sizeof(a));
    float *xw = x;  // x as the kernel sees it: rows g.xs apart, the padding garbage (NaN-free, large)
    if (g_xpad) {
        xw = (float *)mallocCheck(sizeof(float) * (size_t)N * g.xs);
        for (int r = 0; r < N; r++)
            for (int i = 0; i < g.xs; i++) xw[(size_t)r * g.xs + i] = i < s.d_in ? x[(size_t)r * s.d_in + i] : 1000.0f + i;
    }
    a.x = xw; a.W0 = W0; a.W1 = W1; a.bias = bias; a.nx = g_xpad ? (size_t)N * g.xs : nx; a.nW0 = n0; a.nW1 = n1;
    args_outputs(&a, ny, save_z ? nz : 0);
    BtSeg plain;
    memset(&plain, 0, sizeof(plain));
    emulate_and_check(name, &g, grid, N, &a, &plain, y_ref, y_abs, z_ref, z_abs, "(N, phi, gamma, rho)");
    if (xw != x) free(xw);
    free(x); free(W0); free(W1); free(bias); free(y_ref); free(z_ref); free(y_abs); free(z_abs); free(ax); free(a0); free(a1);
    free(a.y); free(a.ycnt); free(a.z); free(a.zcnt);
}

// A segmented launch (BTT-MoE's experts): S segments of grouped rows with the given counts (zeros
// and partial tiles included), each with its own cores; grouped row w reads x row order[w] / K for
// a random permutation `order` of the N*K pairs. The tile table is filled with bt_seg_tile_write as
// the GPU's bt_seg_fill_kernel does; the reference runs btt_forward per segment on gathered rows.
static void test_seg_case(int A, int G, int P, int E, int tm, int pg, int K, const int *counts, int S, int grid) {
    BTTShape s;
    btt_shape(&s, A, G, P, E, 1);
    BtGeom g;
    char name[200];
    int NK = 0;
    for (int e = 0; e < S; e++) NK += counts[e];
    const int N = NK / K;
    snprintf(name, sizeof(name), "%ssegmented: %d experts %d->%d (alpha %d gamma %d phi %d eps %d) tm %d, %d groups, N %d K %d grid %d",
             g_ws ? "W0 staged: " : "", S, s.d_in, s.d_out, A, G, P, E, tm, P / pg, N, K, grid);
    if (!check_true(N * K == NK && bt_geom_pgw(&g, A, G, P, E, 1, tm, pg, g_ws), name, "bad case")) return;
    const size_t n0 = btt_w0_size(&s), n1 = btt_w1_size(&s), zrow = (size_t)g.zrow;
    float *x = rand_bf16((size_t)N * s.d_in, 1.0f), *W0 = rand_bf16(n0 * S, 1.0f / sqrtf((float)A)), *W1 = rand_bf16(n1 * S, 1.0f / sqrtf((float)G));
    int *order = (int *)mallocCheck(sizeof(int) * NK), *offsets = (int *)mallocCheck(sizeof(int) * (S + 1));
    for (int w = 0; w < NK; w++) order[w] = w;
    for (int w = NK - 1; w > 0; w--) {  // Fisher-Yates with the test's generator
        float u;
        mt_uniform_(&u, 1, 0.0f, 1.0f, &g_rng);
        int j = (int)(u * (w + 1));
        if (j > w) j = w;
        int t = order[w]; order[w] = order[j]; order[j] = t;
    }
    offsets[0] = 0;
    for (int e = 0; e < S; e++) offsets[e + 1] = offsets[e] + counts[e];
    int *table = (int *)mallocCheck(sizeof(int) * BT_TILE_INTS * bt_seg_max_tiles(NK, S, tm)), ntiles = 0;
    for (int e = 0; e < S; e++) {
        int mine = bt_ceil_div(counts[e], tm);
        for (int j = 0; j < mine; j++) bt_seg_tile_write(table, ntiles, j, e, offsets[e], counts[e], tm);
        ntiles += mine;
    }
    check_true(ntiles <= bt_seg_max_tiles(NK, S, tm), "segmented: tiles within bt_seg_max_tiles", "too many tiles");
    // reference: each segment's rows gathered, btt_forward with its cores
    float *y_ref = (float *)callocCheck((size_t)NK * s.d_out, sizeof(float)), *z_ref = (float *)callocCheck((size_t)NK * zrow, sizeof(float));
    float *y_abs = (float *)callocCheck((size_t)NK * s.d_out, sizeof(float)), *z_abs = (float *)callocCheck((size_t)NK * zrow, sizeof(float));
    float *xg = (float *)callocCheck((size_t)NK * s.d_in + 1, sizeof(float)), *axg = (float *)callocCheck((size_t)NK * s.d_in + 1, sizeof(float));
    float *a0 = absf(W0, n0 * S), *a1 = absf(W1, n1 * S);
    for (int w = 0; w < NK; w++)
        for (int i = 0; i < s.d_in; i++) {
            xg[(size_t)w * s.d_in + i] = x[(size_t)(order[w] / K) * s.d_in + i];
            axg[(size_t)w * s.d_in + i] = fabsf(xg[(size_t)w * s.d_in + i]);
        }
    for (int e = 0; e < S; e++) {
        if (!counts[e]) continue;
        size_t o = (size_t)offsets[e];
        btt_forward(y_ref + o * s.d_out, z_ref + o * zrow, xg + o * s.d_in, W0 + n0 * e, W1 + n1 * e, NULL, counts[e], &s);
        btt_forward(y_abs + o * s.d_out, z_abs + o * zrow, axg + o * s.d_in, a0 + n0 * e, a1 + n1 * e, NULL, counts[e], &s);
    }
    Args a;
    memset(&a, 0, sizeof(a));
    a.x = x; a.W0 = W0; a.W1 = W1; a.nx = (size_t)N * s.d_in; a.nW0 = n0 * S; a.nW1 = n1 * S;
    args_outputs(&a, (size_t)NK * s.d_out, (size_t)NK * zrow);
    BtSeg sg = {table, &ntiles, order, K, n0, n1, NULL, 0};
    emulate_and_check(name, &g, grid, NK, &a, &sg, y_ref, y_abs, z_ref, z_abs, "(grouped rows)");
    free(x); free(W0); free(W1); free(order); free(offsets); free(table); free(y_ref); free(z_ref); free(y_abs); free(z_abs);
    free(xg); free(axg); free(a0); free(a1); free(a.y); free(a.ycnt); free(a.z); free(a.zcnt);
}

// the walk visits exactly k = start, start + stride, ... in order, as (k / per, k % per)
static void test_walk(void) {
    int ok = 1;
    const int pers[] = {1, 2, 3, 5, 8, 16, 24, 48, 96, 192, 255, 256, 257, 384, 1000};
    for (size_t pi = 0; pi < sizeof(pers) / sizeof(pers[0]); pi++)
        for (int stride = 1; stride <= 256; stride = stride < 8 ? stride + 1 : stride * 2)
            for (int start = 0; start < stride; start += (stride > 8 ? 7 : 1)) {
                BtWalk it;
                int k = start;
                for (bt_walk_begin(&it, pers[pi], start, stride); it.o < 40; bt_walk_next(&it), k += stride)
                    if (it.o != k / pers[pi] || it.i != k % pers[pi]) ok = 0;
                if (k / pers[pi] < 40) ok = 0;  // stopped early
            }
    check_true(ok, "bt_walk visits start, start + stride, ... as (k / per, k % per)", "a step differs from the division");
}

// The default geometry (bt_choose) on H100 (227 KB opt-in) and A100 (163 KB), and unsupported
// shapes. Expected (tm, pg) worked out by hand from bt_l2_bytes_per_row = 2|W|/tm + 2 d_in npg with
// |W| = d_in phi rho + d_out gamma rho, and the shared memory tm (zld + xld) 2 + 10,240 (zld, xld:
// pg gamma rho and gc alpha rounded up to 64, + 8):
//   768->3072 r1 (|W| 172,032): (64, 32) 217,088 B, the minimum (one group, 64 rows). A100:
//     (64, 16) 118,784 B, 5,376 + 3,072 = 8,448 B/row, under (32, 32) 117,760 B, 10,752 + 1,536.
//   768->3072 r2 (|W| 344,064): (64, 16) 217,088 B, 10,752 + 3,072 = 13,824, under (32, 32)
//     216,064 B, 21,504 + 1,536 = 23,040 (the whole-z rule's choice).
//   768->3072 r4 (|W| 688,128): (64, 8) 217,088 B, 21,504 + 6,144 = 27,648, under (32, 16)
//     216,064 B, 43,008 + 3,072. A100 (the whole z tile of 16 rows does not fit there): (64, 4)
//     118,784 B, 21,504 + 12,288 = 33,792, under (32, 8) 117,760 B, 43,008 + 6,144.
//   768->768 r4 (|W| 196,608): (64, 8), 6,144 + 3,072 = 9,216, under (32, 16), 12,288 + 1,536.
//   2048->8192 r2 (alpha 32 gamma 64 phi 64 eps 128, |W| 1,310,720): (64, 8) 151,552 B, 40,960 +
//     32,768 = 73,728, under (32, 16) 150,528 B, 81,920 + 16,384.
//   4096->16384 r1 (64 64 128 128, |W| 1,572,864): (64, 16) 159,744 B, 49,152 + 65,536 = 114,688,
//     under (32, 32) 150,528 B, 98,304 + 32,768 = 131,072, and (16, 64) 150,016 B, 196,608 +
//     16,384; the whole z tile (8,192 columns) fits at no tile size.
//   16384->4096 r1 (its backward's transposed BTT: 128 128 64 64): no 64-row tile fits (pg 16 needs
//     263,168 B of z tile); (32, 16) 175,104 B, 98,304 + 131,072 = 229,376, under (16, 32)
//     158,208 B, 196,608 + 65,536.
static void test_choose(void) {
    const size_t h100 = 232448, a100 = 166912;
    struct { int A, G, P, E, R; size_t lim; int whole_z, tm, pg; const char *what; } c[] = {
        {16, 48, 32, 96, 1, h100, 0, 64, 32, "768->3072 rank 1, H100: tm 64, one group"},
        {32, 96, 16, 48, 1, h100, 0, 64, 16, "3072->768 rank 1, H100: tm 64, one group"},
        {16, 48, 32, 96, 2, h100, 0, 64, 16, "768->3072 rank 2, H100: tm 64, 2 groups of 16"},
        {16, 48, 32, 96, 2, h100, 1, 32, 32, "768->3072 rank 2, H100, whole-z rule: tm 32"},
        {16, 48, 32, 96, 4, h100, 0, 64, 8, "768->3072 rank 4, H100: tm 64, 4 groups of 8"},
        {16, 48, 32, 96, 4, h100, 1, 16, 32, "768->3072 rank 4, H100, whole-z rule: tm 16"},
        {16, 48, 16, 48, 2, h100, 0, 64, 16, "768->768 rank 2, H100: tm 64, one group"},
        {16, 48, 16, 48, 4, h100, 0, 64, 8, "768->768 rank 4, H100: tm 64, 2 groups of 8"},
        {16, 48, 32, 96, 1, a100, 0, 64, 16, "768->3072 rank 1, A100: tm 64, 2 groups of 16"},
        {16, 48, 32, 96, 4, a100, 0, 64, 4, "768->3072 rank 4, A100: tm 64, 8 groups of 4"},
        {16, 48, 32, 96, 4, a100, 1, 0, 0, "768->3072 rank 4, A100, whole-z rule: unsupported (z tile too big)"},
        {32, 64, 64, 128, 2, h100, 0, 64, 8, "2048->8192 rank 2, H100: tm 64, 8 groups of 8"},
        {64, 64, 128, 128, 1, h100, 0, 64, 16, "4096->16384 rank 1, H100: tm 64, 8 groups of 16"},
        {64, 64, 128, 128, 1, h100, 1, 0, 0, "4096->16384 rank 1, H100, whole-z rule: unsupported"},
        {128, 128, 64, 64, 1, h100, 0, 32, 16, "16384->4096 rank 1 (4096->16384's backward dx), H100: tm 32, 4 groups of 16"},
        {8, 96, 32, 96, 1, h100, 0, 0, 0, "alpha 8: unsupported"},
        {16, 48, 32, 8, 1, h100, 0, 0, 0, "eps 8: unsupported"},
        {16, 9, 32, 96, 1, h100, 0, 0, 0, "gamma*rho 9: unsupported"},
        {16, 48, 3, 96, 1, h100, 0, 0, 0, "phi*rho 3: unsupported"},
    };
    for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++) {
        BtGeom g;
        int ok = bt_choose(&g, c[i].A, c[i].G, c[i].P, c[i].E, c[i].R, c[i].lim, 0, c[i].whole_z, 0, 0);
        char why[100];
        snprintf(why, sizeof(why), "got %s tm %d pg %d", ok ? "" : "nothing,", ok ? g.tm : 0, ok ? g.pg : 0);
        check_true(ok ? g.tm == c[i].tm && g.pg == c[i].pg : c[i].tm == 0, c[i].what, why);
    }
    // groups must divide phi and cover whole 16-column tiles
    BtGeom g;
    check_true(!bt_geom_pg(&g, 16, 48, 32, 96, 1, 64, 8), "bt_geom_pg refuses pg*rho = 8 (not a whole n-tile)", "accepted");
    check_true(!bt_geom_pg(&g, 16, 48, 32, 96, 2, 64, 24), "bt_geom_pg refuses pg = 24 (does not divide phi 32)", "accepted");
    check_true(bt_geom_pg(&g, 16, 48, 32, 96, 2, 64, 8) && g.npg == 4 && g.zt == 8 * 96 && g.nt1 == 1,
               "bt_geom_pg: 768->3072 rank 2 in groups of 8: 4 groups, z tile 768 columns, 1 stage-1 n-tile", "differs");
    // 16384->4096: x chunks of 4 g blocks (the BT_XVEC cap, 32 * 4 * 128 / 8 = 2048 vectors = 8 per
    // thread), so each chunk has gc * mt * nt1 = 4 * 2 * 1 = 8 stage-1 items, one per warp; z tile
    // 32 x 2056 x 2 = 131,584 B + x chunk 32 x 520 x 2 = 33,280 B + staging 10,240 B = 175,104 B
    check_true(bt_choose(&g, 128, 128, 64, 64, 1, h100, 0, 0, 0, 0) && g.gc == 4 && bt_s1_items(&g) == BT_WARPS && g.smem_bytes == 175104,
               "bt_choose: 16384->4096 takes x chunks of 4 g blocks, a stage-1 item per warp, 175,104 B", "differs");
    // W0 staged: the chunk's W0 slice (gc alpha rows of pg rho + 8) adds to shared memory, and caps gc
    // at BT_WVEC vectors per thread. 768->3072 r1 at (64, 32): gc 4, 64 rows x 40 x 2 = 5,120 B more
    // (222,208 B: still fits the H100); wld 40 = 80 bytes, rows 16 x 5 bytes apart.
    check_true(bt_choose(&g, 16, 48, 32, 96, 1, h100, 0, 0, 1, 0) && g.tm == 64 && g.pg == 32 && g.gc == 4 && g.wld == 40 &&
                   g.smem_bytes == 217088 + 5120,
               "bt_choose, W0 staged: 768->3072 rank 1, H100: tm 64, one group, W0 chunk 64 x 40, 222,208 B", "differs");
    // 16384->4096 (alpha 128): the W0 slice of 4 g blocks is 512 rows x 16 columns = 1,024 vectors,
    // exactly BT_WVEC (4) per thread; alpha 256 with pg*rho 32 caps gc at 1 (1,024 vectors)
    check_true(bt_geom_pgw(&g, 128, 128, 64, 64, 1, 32, 16, 1) && g.gc == 4, "bt_geom_pgw, W0 staged: 16384->4096 keeps gc 4", "differs");
    check_true(bt_geom_pgw(&g, 256, 16, 32, 16, 1, 16, 32, 1) && g.gc == 1, "bt_geom_pgw, W0 staged: alpha 256 x 32 columns caps gc at 1",
               "differs");
    check_true(!bt_geom_pgw(&g, 256, 16, 128, 16, 1, 16, 128, 1), "bt_geom_pgw, W0 staged: refuses a g block's slice over BT_WVEC vectors",
               "accepted");
    // the kernel on mma.sync (mma, W0 staged only) has no fp32 staging tile: 8 warps x 16 x 20 x 4 =
    // 10,240 B less. 768->3072 rank 1 on the H100: the same geometry, 222,208 - 10,240 = 211,968 B.
    check_true(!bt_geom_pgwm(&g, 16, 48, 32, 96, 1, 64, 32, 0, 1), "bt_geom_pgwm: mma.sync without W0 staged is refused", "accepted");
    check_true(bt_choose(&g, 16, 48, 32, 96, 1, h100, 0, 0, 1, 1) && g.mma == 1 && g.tm == 64 && g.pg == 32 && g.smem_bytes == 211968 &&
                   g.smem_bytes == g.off_stg,
               "bt_choose, mma.sync: 768->3072 rank 1, H100: tm 64, one group, 211,968 B (no staging tile)", "differs");
    // where those 10 KB decide the group: 768->3072 rank 2 at 32 rows as one group (pg 32): z tile
    // 32 x (3072 + 8) x 2 = 197,120 B, x chunk of 8 g blocks 32 x 136 x 2 = 8,704 B, W0 chunk 128 x
    // 72 x 2 = 18,432 B: 224,256 B, which fits 232,448 alone but not with the staging tile
    // (234,496 B), so the wmma kernel takes 2 groups of 16 and reads x twice
    {
        BtGeom w[3], m[3];
        const size_t h200 = 232448;
        const int nw = bt_choose_per_tm(w, 16, 48, 32, 96, 2, h200, 0, 0, 1, 0), nm = bt_choose_per_tm(m, 16, 48, 32, 96, 2, h200, 0, 0, 1, 1);
        char why[120];
        snprintf(why, sizeof(why), "tm 32: wmma pg %d, mma pg %d (%d B)", nw > 1 ? w[1].pg : 0, nm > 1 ? m[1].pg : 0, nm > 1 ? m[1].smem_bytes : 0);
        check_true(nw == 3 && nm == 3 && w[1].tm == 32 && m[1].tm == 32 && w[1].pg == 16 && m[1].pg == 32 && m[1].smem_bytes == 224256 &&
                       bt_l2_bytes_per_row(&m[1]) < bt_l2_bytes_per_row(&w[1]),
                   "bt_choose_per_tm, mma.sync: 768->3072 rank 2 at 32 rows in one group (224,256 B), where the staging tile leaves room for 2", why);
        // 768->3072 rank 1's backward (the transposed BTT, 3072->768 with alpha 96, phi 48, eps 16)
        // at 64 rows: z tile 64 x (1536 + 8) x 2 = 197,632 B, x chunk (1 g block) 64 x 136 x 2 =
        // 17,408 B, W0 chunk 96 x 56 x 2 = 10,752 B: 225,792 B in one group; with the staging tile
        // the largest group that fits is 16 phi blocks (3 groups)
        const int tw = bt_choose_per_tm(w, 96, 32, 48, 16, 1, h200, 64, 0, 1, 0), tmm = bt_choose_per_tm(m, 96, 32, 48, 16, 1, h200, 64, 0, 1, 1);
        snprintf(why, sizeof(why), "tm 64: wmma pg %d, mma pg %d (%d B)", tw ? w[0].pg : 0, tmm ? m[0].pg : 0, tmm ? m[0].smem_bytes : 0);
        check_true(tw == 1 && tmm == 1 && w[0].pg == 16 && m[0].pg == 48 && m[0].smem_bytes == 225792,
                   "bt_choose_per_tm, mma.sync: 3072->768 (768->3072's backward) at 64 rows in one group (225,792 B), where wmma takes 3", why);
    }
}

// The geometry the GPU runs (bt_pick_resident) for the first H200 run's btt_forward shapes, with
// the blocks per SM that run reported for each tm (dev/bench/RESULTS.md; H200 opt-in 232,448 B,
// the H100's): bt_choose_per_tm's geometries and their modelled bytes per row as that run printed
// them, then the pick. Only 3072->768 rank 1 changes: tm 16 (2 blocks, 21,504 B/row, 2.15x the
// least) over tm 64 (1 block, 9,984), as measured there (0.42 against 0.65 ms); 768->3072 rank 1's
// tm 16 (2 blocks) costs 23,040 = 3.3x 6,912, outside the 2.5x, and stays tm 64 (the two ran within 4%).
static void test_pick_resident(void) {
    const size_t h200 = 232448;
    struct { int A, G, P, E, R; double bytes[3]; int blocks[3], tm; const char *what; } c[] = {
        {16, 48, 32, 96, 1, {6912, 12288, 23040}, {1, 1, 2}, 64, "768->3072 rank 1: tm 16's 2 blocks cost 3.3x the bytes, tm 64 stays"},
        {32, 96, 16, 48, 1, {9984, 13824, 21504}, {1, 1, 2}, 16, "3072->768 rank 1: tm 16, 2 blocks per SM at 2.15x the bytes"},
        {16, 48, 32, 96, 2, {13824, 23040, 44544}, {1, 1, 1}, 64, "768->3072 rank 2: one block each, the least bytes (tm 64)"},
        {16, 48, 32, 96, 4, {27648, 46080, 87552}, {1, 1, 1}, 64, "768->3072 rank 4: one block each, tm 64"},
        {32, 64, 64, 128, 2, {73728, 98304, 172032}, {1, 1, 1}, 64, "2048->8192 rank 2: one block each, tm 64"},
        {64, 64, 128, 128, 1, {114688, 131072, 212992}, {1, 1, 1}, 64, "4096->16384 rank 1: one block each, tm 64"},
        {32, 96, 16, 48, 1, {9984, 13824, 21504}, {0, 1, 2}, 16, "3072->768 rank 1, tm 64 not resident: still tm 16 (slack from the least resident)"},
        {32, 96, 16, 48, 1, {9984, 13824, 21504}, {1, 2, 2}, 32, "3072->768 rank 1, tm 32 and 16 with 2 blocks: the fewer bytes, tm 32"},
    };
    for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++) {
        BtGeom g[3];
        const int n = bt_choose_per_tm(g, c[i].A, c[i].G, c[i].P, c[i].E, c[i].R, h200, 0, 0, 0, 0);
        int bytes_ok = n == 3;
        for (int j = 0; j < n && bytes_ok; j++) bytes_ok = g[j].tm == 64 >> j && bt_l2_bytes_per_row(&g[j]) == c[i].bytes[j];
        const int k = bytes_ok ? bt_pick_resident(g, c[i].blocks, n) : -1;
        char why[100];
        snprintf(why, sizeof(why), "%d geometries%s, picked tm %d", n, bytes_ok ? "" : " (bytes differ)", k >= 0 ? g[k].tm : 0);
        check_true(bytes_ok && k >= 0 && g[k].tm == c[i].tm, c[i].what, why);
    }
    // stage 1 alone (-sk 3) reads no W1: 768->3072 rank 1 costs 2 x 768 x 32 / tm + 2 x 768 =
    // 2,304, 3,072 and 4,608 B/row, so tm 16 (2.0x) with 2 blocks per SM is taken there
    {
        BtGeom w[3];
        const int blocks[3] = {1, 1, 2}, nw = bt_choose_per_tm(w, 16, 48, 32, 96, 1, h200, 0, 0, 1, 0);
        for (int j = 0; j < nw; j++) w[j].s1only = 1;
        const int k = nw == 3 ? bt_pick_resident(w, blocks, nw) : -1;
        check_true(nw == 3 && bt_l2_bytes_per_row(&w[0]) == 2304 && bt_l2_bytes_per_row(&w[1]) == 3072 && bt_l2_bytes_per_row(&w[2]) == 4608 &&
                       k == 2,
                   "bt_pick_resident, stage 1 alone: no W1 in the bytes; 768->3072 rank 1 takes tm 16 with 2 blocks", "differs");
    }
    BtGeom g[3];
    const int none[3] = {0, 0, 0}, n = bt_choose_per_tm(g, 16, 48, 32, 96, 1, h200, 0, 0, 0, 0);
    BtGeom best;
    check_true(bt_pick_resident(g, none, n) == -1 && bt_choose(&best, 16, 48, 32, 96, 1, h200, 0, 0, 0, 0) && best.tm == g[0].tm &&
                   best.pg == g[0].pg && bt_choose_per_tm(g, 16, 48, 32, 96, 1, h200, 32, 0, 0, 0) == 1 && g[0].tm == 32,
               "bt_pick_resident: none resident -> -1; bt_choose is bt_choose_per_tm's least bytes; tm_only gives one", "differs");
}

static void run_cases(void);
// W1 packed in mma.sync's B-fragment order (bt_w1p_src, bt_w1p_block) against the m16n8k16 B
// table as the PTX ISA writes it (b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g], g = lane / 4, t =
// lane % 4; the 16x16 tile's second half is columns 8..15): every W1 element lands exactly once,
// and each lane's 8 elements of block (f, kk, n) are those registers' elements.
static void test_w1_packed(int gr, int E, int nf) {
    const size_t n = (size_t)nf * gr * E;
    unsigned char *seen = (unsigned char *)calloc(n, 1);
    size_t outside = 0, twice = 0, wrong = 0;
    BtGeom g;
    memset(&g, 0, sizeof(g));
    g.E = E; g.gr = gr; g.ks2 = gr / 16;
    for (int f = 0; f < nf; f++)
        for (int kk = 0; kk < gr / 16; kk++)
            for (int nt = 0; nt < E / 16; nt++)
                for (int l = 0; l < 32; l++)
                    for (int j = 0; j < 8; j++) {
                        const size_t p = bt_w1p_block(&g, f, kk, nt) + (size_t)l * 8 + j, src = bt_w1p_src(gr, E, p);
                        const int half = j / 4, reg = (j / 2) % 2, lo = j % 2;  // uint4 .x .y: half 0's b0 b1; .z .w: half 1's
                        const int k = kk * 16 + 2 * (l % 4) + lo + 8 * reg, c = nt * 16 + half * 8 + l / 4;
                        if (src >= n) { outside++; continue; }
                        twice += seen[src]++ > 0;
                        wrong += src != ((size_t)f * gr + k) * E + c;
                    }
    size_t missed = 0;
    for (size_t i = 0; i < n; i++) missed += !seen[i];
    char name[128], why[160];
    snprintf(name, sizeof(name), "W1 packed in fragment order, %d f of %d x %d: a permutation with the mma.sync B table", nf, gr, E);
    snprintf(why, sizeof(why), "%zu outside, %zu twice, %zu missed, %zu not the table's element", outside, twice, missed, wrong);
    check_true(!outside && !twice && !missed && !wrong, name, why);
    free(seen);
}

int main(void) {
    mt_seed(&g_rng, 1234);
    test_w1_packed(48, 96, 3);   // 768 -> 3072 rank 1 (gamma 48, eps 96)
    test_w1_packed(192, 48, 2);  // rank 4 of the transposed 3072 -> 768
    test_w1_packed(16, 16, 1);
    test_walk();
    test_choose();
    test_pick_resident();
    for (g_ws = 0; g_ws <= 1; g_ws++) run_cases();
    // W0 staged, stage 1 alone (-sk 3), x rows wider than d_in (q, k and v's dy in the qkv gradient)
    g_ws = 1;
    g_s1 = 1;
    test_case(16, 48, 32, 96, 1, 64, 32, 2 * 64 + 7, 2, 0, 1);   // 768 -> 3072 rank 1
    test_case(16, 48, 32, 96, 4, 64, 8, 64 + 40, 1, 0, 1);      // rank 4 in 4 groups
    test_case(96, 32, 48, 16, 1, 32, 48, 2 * 32 + 3, 2, 0, 1);  // 3072 -> 768 transposed (the backward's dZ), alpha 96
    g_xpad = 8;
    test_case(16, 48, 16, 48, 2, 32, 16, 3 * 32 + 5, 2, 0, 1);  // 768 -> 768 rank 2, x rows of 776
    g_xpad = 1536;
    test_case(16, 48, 16, 48, 4, 64, 8, 64 + 9, 2, 0, 1);       // rows of 3 x 768: q, k or v's dy in dqkv
    g_s1 = 0;
    test_case(16, 48, 16, 48, 4, 64, 8, 64 + 9, 2, 1, 1);       // the whole kernel on such x rows too
    g_xpad = 0;
    g_ws = 0;
    return test_summary();
}

// every case, with the kernel as g_ws says
static void run_cases(void) {
    // (alpha, gamma, phi, eps, rank): GPT-2 small's shapes at every tile size, N not a multiple
    // of tm (a partial last tile), grids smaller than the tile count (blocks loop over tiles)
    test_case(16, 48, 32, 96, 1, 64, 32, 2 * 64 + 7, 2, 1, 1);  // 768 -> 3072 rank 1
    test_case(16, 48, 32, 96, 1, 32, 32, 3 * 32 + 19, 2, 1, 1);
    test_case(16, 48, 32, 96, 1, 16, 32, 40, 3, 0, 0);
    test_case(32, 96, 16, 48, 1, 64, 16, 64 + 33, 1, 1, 1);     // 3072 -> 768 rank 1
    test_case(32, 96, 16, 48, 1, 32, 16, 2 * 32 + 1, 2, 0, 1);
    test_case(16, 48, 16, 48, 2, 64, 16, 64 + 50, 2, 1, 1);     // 768 -> 768 rank 2
    test_case(16, 48, 16, 48, 4, 32, 16, 2 * 32 + 9, 2, 1, 1);  // 768 -> 768 rank 4
    test_case(16, 48, 16, 48, 4, 16, 16, 5, 1, 1, 1);           // N < 16: one partial tile
    test_case(16, 48, 32, 96, 2, 32, 32, 32 + 3, 2, 1, 1);      // 768 -> 3072 rank 2
    test_case(16, 48, 32, 96, 4, 16, 32, 16 + 15, 2, 0, 1);     // 768 -> 3072 rank 4
    // other factorizations: nb 1 and 2, a partial last x chunk, alpha 48 (3 k-steps), rho 16
    test_case(16, 20, 4, 80, 4, 32, 4, 32 + 31, 2, 1, 1);      // nb 1, chunks 8 + 8 + 4
    test_case(48, 8, 8, 32, 2, 16, 8, 16 * 3 + 2, 2, 1, 1);    // nb 2, ks1 3
    test_case(16, 3, 4, 32, 16, 64, 4, 64 + 1, 2, 1, 1);       // rho 16: z rows of whole fragments
    test_case(16, 8, 8, 16, 6, 32, 8, 32 + 5, 2, 1, 1);        // rho 6: z stored in runs of 2 that skip across s = 6
    test_case(16, 4, 4, 16, 12, 16, 4, 2 * 16 + 3, 2, 1, 1);    // rho 12: runs of 4
    test_case(128, 16, 16, 16, 1, 64, 16, 64 + 10, 2, 1, 1);    // alpha 128: gc = 2, the most the BT_XVEC registers hold
    test_case(256, 16, 16, 16, 1, 64, 16, 64 + 10, 2, 1, 1);    // alpha 256: the BT_XVEC cap sets gc = 1 (4 of 8 warps busy)
    // groups of phi blocks (bt_choose's geometries where the whole z tile does not fit or costs rows)
    test_case(16, 48, 32, 96, 2, 64, 16, 64 + 7, 2, 1, 1);      // 768 -> 3072 rank 2, H100's default: 2 groups
    test_case(16, 48, 32, 96, 4, 64, 4, 64 + 40, 1, 1, 1);      // rank 4, A100's default: 8 groups of 4
    test_case(16, 16, 64, 16, 1, 16, 16, 3 * 16 + 5, 2, 1, 1);  // one x chunk re-read by 4 groups
    test_case(64, 16, 32, 32, 1, 64, 16, 2 * 64 + 3, 2, 0, 1);  // 8 x chunks per group, 2 groups
    test_case(16, 12, 8, 16, 4, 32, 4, 32 + 17, 3, 1, 0);       // rank 4, nb 1, 2 groups, no z
    test_case(32, 64, 64, 128, 2, 64, 8, 64 + 5, 1, 1, 1);      // 2048 -> 8192 rank 2, H100's default
    test_case(128, 128, 64, 64, 1, 32, 16, 32 + 8, 1, 1, 1);    // 16384 -> 4096 (4096 -> 16384's backward dx): 4 groups, gc 4
    // segmented launches (BTT-MoE experts, rank 1): empty experts, partial and whole tiles, one
    // expert with everything, grids smaller than the tile count
    const int c8[8] = {37, 0, 64, 5, 16, 0, 70, 8};      // 200 pairs = 100 tokens top-2
    test_seg_case(16, 48, 32, 96, 64, 32, 2, c8, 8, 3);        // 768 -> 3072 experts, tm 64
    test_seg_case(32, 96, 16, 48, 32, 16, 2, c8, 8, 5);        // 3072 -> 768 experts, tm 32
    const int c4[4] = {0, 0, 48, 0};                        // all 48 pairs on one expert (K = 1)
    test_seg_case(16, 48, 16, 48, 16, 16, 1, c4, 4, 2);        // 768 -> 768
    const int c3[3] = {1, 2, 3};                            // 6 pairs = 2 tokens top-3
    test_seg_case(16, 32, 16, 32, 16, 16, 3, c3, 3, 8);        // 512 -> 512, grid larger than the tiles
    test_seg_case(16, 48, 32, 96, 64, 16, 2, c8, 8, 3);        // 768 -> 3072 experts in 2 groups (A100's rank-1 default)
}
