// common/btt_tiles.h: the tile geometry and every index the fused BTT forward kernel
// (structured/btt_fused.cuh) computes, shared with its CPU emulation (tests/test_btt_tiles.c).
//
// Math and layouts are structured/btt.h's: x row = gamma blocks of alpha (i = g*alpha + a);
// W0 (gamma, alpha, phi*rho); W1 (phi, gamma*rho, eps); z[g, f, s] = sum_a W0[g, a, f*rho+s] x[g*alpha+a];
// y[f*eps+e] = sum_{g,s} W1[f, g*rho+s, e] z[g, f, s] (+ bias); saved z row layout (phi, gamma, rho).
//
// Geometry. One thread block of BT_WARPS warps owns a tile of tm rows (tm = 16*mt, mt in {1,2,4};
// blocks loop over tiles tile = blockIdx.x, += gridDim.x). Where the whole z tile (tm x zrow) does
// not fit, or fitting it would cost rows per tile, a tile is computed in npg groups of pg phi
// blocks: group q is the BTT onto output blocks f = q*pg .. q*pg + pg - 1, whose z is columns
// q*pg*rho .. of every W0[g]'s output and whose stage 2 needs nothing else; x is read once per
// group (from L2 after the first). pg = phi is the single group. Shared memory, byte offsets from
// the 128-byte aligned dynamic buffer:
//   z tile   [tm][zld] bf16 at off_z: row m, column fl*gr + g*rho + s = z[g, q*pg + fl, s] of tile row
//            m: group q's slice of the saved (phi, gamma, rho) layout, so Z_f (the stage-2 A matrix)
//            is rows x [fl*gr, fl*gr + gr).
//   x chunk  [tm][xld] bf16 at off_x: gc consecutive g blocks of x (gc*alpha columns), rows of the
//            tile past N zero-filled.
//   W0 chunk [gc*alpha][wld] bf16 at off_w, only when ws (the W0-staged kernel, below): rows
//            g*alpha + a of W0 for the x chunk's g blocks, columns q*pg*rho .. + pg*rho (group q's).
//   staging  BT_WARPS x [16][BT_STG_LD] fp32 at off_stg: one 16x16 accumulator per warp on its way
//            out (wmma stores fp32 only; lanes then convert to bf16 and scatter). None in the
//            kernel on mma.sync (mma): its lanes hold their accumulators in a documented layout.
// Row strides zld, xld = cols rounded up to 64, + 8 elements: a multiple of 8 (wmma ldm for bf16),
// every fragment pointer 32-byte aligned, and consecutive rows 16 bytes apart modulo 128, so the 8
// rows of one 8x16-byte phase of a fragment load fall in distinct banks.
//
// Per group q: stage 1, per x chunk ch (g0 = ch*gc, gcount = g blocks in it): items (gl, nt, mt),
// warp w takes items w, w + BT_WARPS, ... (row-major, mt fastest): the 16x16 block of Z1_g (g = g0 +
// gl) at tile rows mt*16.., columns nt*16.. of fl*rho + s, K = alpha in ks1 steps; A from the x
// chunk, B = W0[g] straight from global (ldm fr, columns from q*pg*rho). The fp32 result goes
// through the warp's staging tile; lane l then takes row bt_epi_row(l) and the 8 columns
// bt_epi_col(l).., rounds them to bf16 and writes them to the z tile at bt_z1_run's indices.
// Stage 2: items (fl, j), fl < pg, j < ntg, f = q*pg + fl, warp w takes items w, w + BT_WARPS, ...:
// the warp computes the mt x nb fragments of Y_f at tile rows 0..tm-1, y columns f*eps +
// (j*nb + b)*16 .., b < nb, K = gr in ks2 steps; A = Z_f from the z tile (ldm zld), B = W1[f]
// straight from global (ldm eps). Each fragment goes through the staging tile; lanes add the bias
// and write 8 bf16 (16 bytes) of a row that is < N.
// x chunks are prefetched one ahead through registers (BT_XVEC 16-byte vectors per thread): each
// barrier-protected fill only stores what the thread loaded while the previous chunk (or, for a
// group's chunk 0, the previous group's or tile's last chunk and stage 2) computed.
// Barriers (per tile and group): before each x chunk is filled (the previous chunk's readers are
// done), after it is filled (the chunk is visible; at ch = 0 this one also orders the previous
// group's stage-2 reads of the z tile before this group's stage-1 writes), and after the last chunk
// (z tile complete) — then the optional copy of the z tile to global and stage 2, which both only
// read the z tile. The first barrier is redundant at ch = 0 (kept: a uniform loop); the emulation's
// race checker fails when any of the others is removed.
//
// Stage 1 alone (s1only, ws kernels: -sk 3 and dev/cuda/btt_forward v9, v10): the tiles stop after
// writing their z tile to the saved z; a cuBLAS GEMM then makes y from z (structured/btt_gpu.cuh). That is
// the plans' forward without their T1 round trip and permute (GEMM, permute, GEMM), or the fused
// kernel with stage 2 handed to cuBLAS, for one more pass over z.
//
// W0 staged (ws = 1, -sk 2; dev/cuda/btt_forward v7+): the H200 runs of the first kernel (ws = 0)
// reached 12-37 TFLOP/s and under 0.9 TB/s, and their time grew with the stage-1 work: each
// stage-1 item waited on its B fragments from L2 (4 scalar loads each, nothing to overlap them
// with at 8 warps per SM), one k-step after another. With ws the x chunk's slice of W0 travels with
// the x chunk (prefetched one chunk ahead through BT_WVEC more registers per thread, stored at the
// same barrier), so stage 1 reads only shared memory; and stage 2 loads an item's first k-step of
// W1 fragments during the previous item's last k-step and epilogue. wld = pg*rho + 8: a multiple
// of 8, fragment pointers 32-byte aligned (rows k*16 apart: 32*wld bytes), and rows 16*(odd)
// bytes apart, so 8 rows of a fragment phase fall in distinct 16-byte bank groups.
//
// Plain C11 that also compiles as CUDA C++ (BT_HD marks what the kernel calls).
#pragma once
#include <stddef.h>

#ifdef __CUDACC__
#define BT_HD __host__ __device__
#else
#define BT_HD
#endif

#define BT_WARPS 8
#define BT_THREADS (32 * BT_WARPS)
#define BT_FR 16                 // wmma m = n = k
#define BT_STG_LD 20             // fp32 staging row stride (multiple of 4: wmma ldm for fp32)
#define BT_XCHUNK_ELEMS 4096     // target tm * chunk columns of the x chunk (about 8 KB)
#define BT_XVEC 8                // at most this many 16-byte x vectors per thread per chunk (register prefetch;
                                 // 8 lets alpha = 128 at 32 rows take the 4 g blocks that give all 8 warps a
                                 // stage-1 item: the transposed BTT of 4096 -> 16384's backward)
#define BT_WVEC 4                // at most this many 16-byte W0 vectors per thread per chunk (ws: gc is capped so)
#define BT_SMEM_ALIGN 128

typedef struct {
    int A, G, P, E, R;           // alpha, gamma, phi, eps, rho
    int din, dout, fr, gr, zrow; // gamma*alpha, phi*eps, phi*rho, gamma*rho, gamma*phi*rho
    int tm, mt;                  // rows per tile, 16-row m-tiles per tile
    int pg, npg, zt;             // phi blocks per group, groups (phi/pg), z tile columns (pg*gr)
    int nt1, ks1;                // stage 1: n-tiles per g block and group (pg*rho/16), k-steps (alpha/16)
    int nb, ntg, ks2;            // stage 2: n-tiles per item, items per f ((eps/16)/nb), k-steps (gr/16)
    int gc, nchunks;             // g blocks per x chunk, x chunks per tile and group
    int xc, xld, zld;            // x chunk columns (gc*alpha); smem row strides (elements)
    int ws, wld;                 // W0 chunk staged in smem (0/1) and its row stride (elements; 0 when not)
    int xs;                      // x's row stride (elements): din, unless the launcher sets a wider one
    int s1only;                  // 1: stage 1 and the saved z only, no y (ws kernels; the launcher sets it)
    int mma;                     // 1: the kernel on raw mma.sync (ws only), which has no fp32 staging tile
    int off_z, off_x, off_w, off_stg, smem_bytes;  // dynamic shared memory layout (bytes; off_w = off_stg when not ws;
                                                   // smem_bytes = off_stg with mma)
} BtGeom;

static inline BT_HD int bt_ceil_div(int a, int b) { return (a + b - 1) / b; }
static inline BT_HD int bt_round_up(int a, int b) { return bt_ceil_div(a, b) * b; }
// smem row stride for `cols` bf16 columns (see the top comment)
static inline BT_HD int bt_pad_ld(int cols) { return bt_round_up(cols, 64) + 8; }

// 1 when wmma 16x16x16 tiles cover the shape exactly: alpha, phi*rho, gamma*rho and eps multiples
// of 16 (then d_in, d_out and zrow are multiples of 16, so every 16-byte vector and 32-byte
// fragment pointer the kernel forms is aligned, given aligned base pointers).
static inline int bt_shape_ok(int A, int G, int P, int E, int R) {
    if (A <= 0 || G <= 0 || P <= 0 || E <= 0 || R <= 0) return 0;
    if (A % 16 || (P * R) % 16 || (G * R) % 16 || E % 16) return 0;
    if ((long long)G * P * R * 64 + 4096 > (1LL << 30)) return 0;  // keeps every smem offset in int
    return 1;
}

// Fills *g for tile rows tm (16, 32 or 64) and groups of pg phi blocks (pg divides phi, pg*rho a
// multiple of 16; pg = phi: the whole z tile at once), W0 staged in smem when ws, for the kernel on
// mma.sync when mma (ws only: its stages write their accumulators from registers, so its shared
// memory has no staging tile, 10,240 bytes less). Returns 0 when the shape, tm or pg is not
// supported; the smem size is not checked here (bt_choose does).
static inline int bt_geom_pgwm(BtGeom *g, int A, int G, int P, int E, int R, int tm, int pg, int ws, int mma) {
    if (!bt_shape_ok(A, G, P, E, R) || (tm != 16 && tm != 32 && tm != 64) || (mma && !ws)) return 0;
    if (pg <= 0 || P % pg || (pg * R) % 16) return 0;
    g->A = A; g->G = G; g->P = P; g->E = E; g->R = R;
    g->din = G * A; g->dout = P * E; g->fr = P * R; g->gr = G * R; g->zrow = G * P * R;
    g->tm = tm; g->mt = tm / 16;
    g->pg = pg; g->npg = P / pg; g->zt = pg * g->gr;
    g->nt1 = pg * R / 16; g->ks1 = A / 16;
    int nt2 = E / 16;
    g->nb = nt2 % 3 == 0 ? 3 : nt2 % 2 == 0 ? 2 : 1;
    g->ntg = nt2 / g->nb; g->ks2 = g->gr / 16;
    // x chunk: about BT_XCHUNK_ELEMS elements, but enough g blocks that every warp has a stage-1 item
    int gc = BT_XCHUNK_ELEMS / (tm * A), need = bt_ceil_div(BT_WARPS, g->mt * g->nt1);
    if (gc < need) gc = need;
    if (gc < 1) gc = 1;
    if (gc > G) gc = G;
    const int cap = BT_XVEC * BT_THREADS * 8 / (tm * A);  // the chunk fits the prefetch registers
    if (gc > cap) gc = cap;
    if (ws) {  // and so does its W0 slice (gc*alpha rows of pg*rho)
        const int wcap = BT_WVEC * BT_THREADS * 8 / (A * pg * R);
        if (gc > wcap) gc = wcap;
    }
    if (gc < 1) return 0;                                  // alpha > 16384 / tm: one g block does not fit
    g->gc = gc; g->nchunks = bt_ceil_div(G, gc);
    g->xc = gc * A; g->xld = bt_pad_ld(g->xc); g->zld = bt_pad_ld(g->zt);
    g->ws = ws != 0; g->wld = ws ? pg * R + 8 : 0;
    g->xs = g->din; g->s1only = 0; g->mma = mma != 0;
    g->off_z = 0;
    g->off_x = bt_round_up(g->off_z + tm * g->zld * 2, BT_SMEM_ALIGN);
    g->off_w = bt_round_up(g->off_x + tm * g->xld * 2, BT_SMEM_ALIGN);
    g->off_stg = bt_round_up(g->off_w + (ws ? g->xc * g->wld * 2 : 0), BT_SMEM_ALIGN);
    g->smem_bytes = g->off_stg + (g->mma ? 0 : BT_WARPS * 16 * BT_STG_LD * 4);
    return 1;
}
static inline int bt_geom_pgw(BtGeom *g, int A, int G, int P, int E, int R, int tm, int pg, int ws) {
    return bt_geom_pgwm(g, A, G, P, E, R, tm, pg, ws, 0);
}
static inline int bt_geom_pg(BtGeom *g, int A, int G, int P, int E, int R, int tm, int pg) {
    return bt_geom_pgw(g, A, G, P, E, R, tm, pg, 0);
}

// Modelled L2 -> SM bytes per row (bf16): every tile reads all of W0 and W1 (each group its
// slice; stage 1 alone, s1only, no W1), and x once per group. y and the saved z are written once
// whatever the geometry.
static inline double bt_l2_bytes_per_row(const BtGeom *g) {
    const double w = (double)g->din * g->fr + (g->s1only ? 0.0 : (double)g->dout * g->gr);
    return 2.0 * w / g->tm + 2.0 * g->din * g->npg;
}

// For each tile rows tm (64, 32, 16; tm_only: that one) the geometry with the largest group of
// phi blocks pg that fits smem_limit bytes of shared memory per block (smaller groups only add x
// reads), into out in that order; whole_z keeps pg = phi (the rule before groups); ws stages W0
// (its chunk counts against the limit); mma: for the kernel on mma.sync (no staging tile; ws only).
// Returns how many (0: nothing fits, or the shape is not supported).
static inline int bt_choose_per_tm(BtGeom out[3], int A, int G, int P, int E, int R, size_t smem_limit, int tm_only, int whole_z, int ws,
                                   int mma) {
    int n = 0;
    for (int tm = 64; tm >= 16; tm /= 2) {
        if (tm_only && tm != tm_only) continue;
        for (int pg = P; pg >= (whole_z ? P : 1); pg--) {
            if (!bt_geom_pgwm(&out[n], A, G, P, E, R, tm, pg, ws, mma) || (size_t)out[n].smem_bytes > smem_limit) continue;
            n++;
            break;
        }
    }
    return n;
}

// The geometry the traffic model prefers within smem_limit: of bt_choose_per_tm's, the least
// bt_l2_bytes_per_row, ties to the larger tm. Returns 0 when nothing fits or the shape is not
// supported. Where the whole z tile of 64 rows fits that is the choice; at widths 2048 and 4096
// (z rows of 4096 to 32768 elements) most shapes fit only in groups.
static inline int bt_choose(BtGeom *out, int A, int G, int P, int E, int R, size_t smem_limit, int tm_only, int whole_z, int ws, int mma) {
    BtGeom c[3];
    const int n = bt_choose_per_tm(c, A, G, P, E, R, smem_limit, tm_only, whole_z, ws, mma);
    int best = 0;
    for (int i = 1; i < n; i++)
        if (bt_l2_bytes_per_row(&c[i]) < bt_l2_bytes_per_row(&c[best])) best = i;
    if (n) *out = c[best];
    return n > 0;
}

// The geometry the GPU runs: of n candidates (bt_choose_per_tm's) with blocks[i] of them resident
// per SM (0: none fits), those whose modelled bytes are within BT_RESIDENT_SLACK of the least
// compete on resident blocks first, then on bytes (ties to the earlier, larger tm). Why: the
// kernel waits on memory latency far more than on bytes, and more resident warps hide more of
// it. On the first H200 run (dev/bench/RESULTS.md, dev/cuda/btt_forward) 3072 -> 768 rank 1 took
// 0.65 ms at tm 64 (1 block of 8 warps per SM) and 0.42 ms at tm 16 (2 blocks, 2.15x the modelled
// bytes); 768 -> 3072 rank 1, where tm 16 also had 2 blocks but 3.3x the bytes, ran within 4% either
// way; no other shape there had a tm with more blocks, and the least bytes ran within 8% of the
// fastest tm. Returns the index, or -1 when no candidate has a resident block.
#define BT_RESIDENT_SLACK 2.5
static inline int bt_pick_resident(const BtGeom *c, const int *blocks, int n) {
    double bytes[3], least = -1.0;
    for (int i = 0; i < n && i < 3; i++) {
        bytes[i] = bt_l2_bytes_per_row(&c[i]);
        if (blocks[i] > 0 && (least < 0.0 || bytes[i] < least)) least = bytes[i];
    }
    int best = -1;
    for (int i = 0; i < n && i < 3; i++) {
        if (blocks[i] <= 0 || bytes[i] > BT_RESIDENT_SLACK * least) continue;
        if (best < 0 || blocks[i] > blocks[best] || (blocks[i] == blocks[best] && bytes[i] < bytes[best])) best = i;
    }
    return best;
}

static inline BT_HD int bt_num_tiles(int N, int tm) { return bt_ceil_div(N, tm); }
// rows of tile `tile` that exist (the last tile may be partial)
static inline BT_HD int bt_tile_rows(const BtGeom *g, int N, int tile) {
    int r = N - tile * g->tm;
    return r < g->tm ? r : g->tm;
}

// ---- segmented launches (BTT-MoE: every expert's BTT in one launch) ----------------------------
// S BTTs of the same shape over consecutive segments of the (expert-grouped) rows: segment s is
// rows [off[s], off[s+1]) with its own cores W0 + s*w0_stride, W1 + s*w1_stride. Its x rows are
// gathered on the fly: grouped row w reads x row order[w] / K (moe.h's pairs t*K + k), so no
// gathered copy of x is written. Tiles never straddle segments: segment s has ceil(count_s / tm)
// tiles, and the GPU writes the tile table (BT_TILE_INTS ints per tile: segment, first grouped
// row, rows) and the tile count itself (bt_seg_fill), so no host needs the counts and the launch
// has a fixed grid: at most bt_seg_max_tiles tiles. A plain launch is the one-segment case
// (tiles = NULL: tile t is rows t*tm .. of N, segment 0, x rows not remapped). BTT-MoE grouped by
// set of experts (moe_sets.cuh) is C(E, k) segments of rank-k BTTs, a row per token (K = 1), with
// gate: each row's k components of z scaled by its gates once stage 1 has written the z tile
// (forward: z = x W0 then saved gated; backward, the transposed BTT on dy: dZu = dy W1ᵀ saved as
// it is, then gated for dx).
#define BT_TILE_INTS 3
typedef struct {
    const int *tiles;    // tile table, NULL for a plain launch
    const int *ntiles;   // number of tiles in the table (device)
    const int *order;    // grouped row -> pair index (x row = order[w] / K)
    int K;
    size_t w0_stride, w1_stride;  // elements between consecutive segments' W0 and W1
    const float *gate;   // NULL, or rho floats per grouped row: z's rank component s of row w is scaled by
                         // gate[w·rho + s] between the stages (BTT-MoE's set path: each expert's gate; rho
                         // divides 8)
    int gate_late;       // with gate: 0 z is saved gated (the forward's z), 1 saved before the gate (the
                         // backward's dZu, whose dot products with z are the gates' gradients)
} BtSeg;
typedef struct { int seg, r0, rows; } BtTile;
static inline BT_HD int bt_seg_max_tiles(int rows_total, int S, int tm) { return bt_ceil_div(rows_total, tm) + S; }
// Segment s's tiles: table entries base + j (base = tiles of segments < s), j < ceil(count_s/tm).
static inline BT_HD void bt_seg_tile_write(int *table, int base, int j, int s, int off_s, int count_s, int tm) {
    int *t = table + (size_t)(base + j) * BT_TILE_INTS, left = count_s - j * tm;
    t[0] = s;
    t[1] = off_s + j * tm;
    t[2] = left < tm ? left : tm;
}
// Tile t of a launch over N rows (plain) or of the table (segmented).
static inline BT_HD BtTile bt_tile_at(const BtGeom *g, const BtSeg *sg, int N, int t) {
    BtTile r;
    if (sg->tiles) {
        const int *e = sg->tiles + (size_t)t * BT_TILE_INTS;
        r.seg = e[0]; r.r0 = e[1]; r.rows = e[2];
    } else {
        r.seg = 0; r.r0 = t * g->tm; r.rows = bt_tile_rows(g, N, t);
    }
    return r;
}
// x row of grouped row w
static inline BT_HD int bt_x_row(const BtSeg *sg, int w) { return sg->order ? sg->order[w] / sg->K : w; }

// ---- strided walks without a division per step -------------------------------------------------
// A grid of rows x per cells in row-major order, visited at cells k = start, start + stride, ...
// (start < stride): it.o, it.i = k / per, k % per. Thread loops (16-byte vectors) use start = thread,
// stride BT_THREADS; warp loops (fragment items) start = warp, stride BT_WARPS.
typedef struct { int per, o, i, dO, dI; } BtWalk;
static inline BT_HD void bt_walk_begin(BtWalk *it, int per, int start, int stride) {
    it->per = per;
    it->o = start / per; it->i = start % per;
    it->dO = stride / per; it->dI = stride % per;
}
static inline BT_HD void bt_walk_next(BtWalk *it) {
    it->o += it->dO;
    it->i += it->dI;
    if (it->i >= it->per) { it->i -= it->per; it->o++; }
}

// ---- x chunk ---------------------------------------------------------------------------------
static inline BT_HD int bt_chunk_gcount(const BtGeom *g, int ch) {
    int left = g->G - ch * g->gc;
    return left < g->gc ? left : g->gc;
}
// The fill: tm rows (all of them: rows past N are zero-filled) of gcount*alpha/8 16-byte vectors.
// Thread t owns vectors k = 0 .. BT_XVEC-1 of the walk bt_walk_begin(&it, bt_x_fill_per(g, gcount),
// t, BT_THREADS) (bt_walk_next after each), those with it.o < tm: tile row it.o, chunk column it.i*8
// (bt_geom_pg keeps tm * gc * alpha / 8 <= BT_XVEC * BT_THREADS, so that covers the chunk). A thread
// loads its vectors of the NEXT chunk into registers right after storing the current one (so the
// loads are in flight while the current chunk computes) and stores them after the next barrier.
static inline BT_HD int bt_x_fill_per(const BtGeom *g, int gcount) { return gcount * g->A / 8; }
// A tile reads its x chunks once per group: step c = q*nchunks + ch is x chunk ch of group q. The
// x chunk after step c of `tile` for a block whose tiles are tile, tile + grid, ... < ntiles: the
// tile's next step's (chunk 0 again after a group's last), or chunk 0 of the block's next tile
// (prefetched during the last chunk and stage 2). Returns 0 when there is none.
static inline BT_HD int bt_next_chunk(const BtGeom *g, int ntiles, int grid, int tile, int c, int *ntile, int *nch) {
    int n = c + 1;
    *ntile = tile;
    if (n == g->npg * g->nchunks) { *ntile = tile + grid; n = 0; }
    *nch = n % g->nchunks;
    return *ntile < ntiles;
}
// The same step after c, with its group: x chunk *nch and W0 chunk (*nq, *nch) of *ntile.
static inline BT_HD int bt_next_step(const BtGeom *g, int ntiles, int grid, int tile, int c, int *ntile, int *nq, int *nch) {
    const int more = bt_next_chunk(g, ntiles, grid, tile, c, ntile, nch);
    *nq = *ntile == tile ? (c + 1) / g->nchunks : 0;
    return more;
}
static inline BT_HD int bt_x_smem(const BtGeom *g, int m, int col) { return m * g->xld + col; }
static inline BT_HD size_t bt_x_global(const BtGeom *g, int row, int ch, int col) {
    return (size_t)row * g->xs + (size_t)ch * g->gc * g->A + col;
}

// ---- W0 chunk (ws) ----------------------------------------------------------------------------
// The fill: gcount*alpha rows of pg*rho/8 16-byte vectors, walked as the x chunk's with
// bt_walk_begin(&it, bt_w_fill_per(g), t, BT_THREADS) while it.o < gcount*alpha, BT_WVEC per
// thread (bt_geom_pgw caps gc so that covers it): chunk row it.o (= gl*alpha + a), column it.i*8.
static inline BT_HD int bt_w_fill_per(const BtGeom *g) { return g->pg * g->R / 8; }
static inline BT_HD int bt_w_smem(const BtGeom *g, int rr, int col) { return rr * g->wld + col; }
// W0 element of chunk ch's row rr, group q's column col (W0's rows g*alpha + a are consecutive)
static inline BT_HD size_t bt_w_global(const BtGeom *g, int q, int ch, int rr, int col) {
    return ((size_t)ch * g->gc * g->A + rr) * g->fr + (size_t)q * g->pg * g->R + col;
}

// ---- stage 1 ---------------------------------------------------------------------------------
// Items: gcount x (nt1 * mt), walked with bt_walk_begin(&it, bt_s1_per(g), warp, BT_WARPS) while
// it.o < gcount: gl = it.o, and it.i splits into (mt, nt) by bt_s1_split (m-tile fastest).
static inline BT_HD int bt_s1_per(const BtGeom *g) { return g->nt1 * g->mt; }
// Stage-1 items of a whole x chunk, for BT_WARPS warps (fewer: idle warps in stage 1)
static inline BT_HD int bt_s1_items(const BtGeom *g) { return g->gc * bt_s1_per(g); }
static inline BT_HD void bt_s1_split(const BtGeom *g, int i, int *mt, int *nt) {
    *mt = i % g->mt;
    *nt = i / g->mt;
}
// A fragment (x chunk, ldm xld): tile rows mt*16.., columns gl*alpha + kk*16..
static inline BT_HD int bt_s1_a(const BtGeom *g, int mt, int gl, int kk) { return mt * 16 * g->xld + gl * g->A + kk * 16; }
// B fragment (W0, ldm fr): W0[gi] rows kk*16.., columns nt*16.. of group q's (q*pg*rho ..)
static inline BT_HD size_t bt_s1_b(const BtGeom *g, int q, int gi, int kk, int nt) {
    return (size_t)gi * g->A * g->fr + (size_t)kk * 16 * g->fr + q * g->pg * g->R + nt * 16;
}
// B fragment from the W0 chunk (ws; ldm wld): rows gl*alpha + kk*16.., columns nt*16..
static inline BT_HD int bt_s1_bs(const BtGeom *g, int gl, int kk, int nt) { return (gl * g->A + kk * 16) * g->wld + nt * 16; }
// z-tile index of stage-1 column c = f*rho + s (f < pg: the group's) of block gi, row m
static inline BT_HD int bt_z1_at_fs(const BtGeom *g, int m, int gi, int f, int s) { return m * g->zld + f * g->gr + gi * g->R + s; }
static inline BT_HD int bt_z1_at(const BtGeom *g, int m, int gi, int c) { return bt_z1_at_fs(g, m, gi, c / g->R, c % g->R); }
// z-tile indices of the 8 consecutive stage-1 columns c0 .. c0+7 of block gi, row m
static inline BT_HD void bt_z1_run(const BtGeom *g, int m, int gi, int c0, int idx[8]) {
    int f = c0 / g->R, s = c0 % g->R;
    for (int t = 0; t < 8; t++) {
        idx[t] = bt_z1_at_fs(g, m, gi, f, s);
        if (++s == g->R) { s = 0; f++; }
    }
}
// The lane stores those 8 values in runs of bt_z1_vec(g) elements: the largest of 8, 4, 2, 1 that
// divides rho. c0 is a multiple of 8, so a run never crosses an f (s runs through whole multiples of
// the run), its indices are consecutive, and the first is a multiple of the run (zld, gr, g*rho and
// s all are): one 16-, 8- or 4-byte store per run instead of 2-byte ones (rank 1: runs of 1).
static inline BT_HD int bt_z1_vec(const BtGeom *g) { return g->R % 8 == 0 ? 8 : g->R % 4 == 0 ? 4 : g->R % 2 == 0 ? 2 : 1; }

// ---- epilogue lanes (staging tile -> bf16) -----------------------------------------------------
// lane l takes row l % 16 and columns (l / 16) * 8 .. + 7 of the warp's 16x16 staging tile
static inline BT_HD int bt_epi_row(int lane) { return lane % 16; }
static inline BT_HD int bt_epi_col(int lane) { return (lane / 16) * 8; }
static inline BT_HD int bt_stg_off(const BtGeom *g, int warp) { return g->off_stg + warp * 16 * BT_STG_LD * 4; }  // bytes

// ---- saved z (global <- z tile): the tile's rows < N of zt/8 16-byte vectors; walk with
// bt_walk_begin(&it, bt_zcopy_per(g), thread, BT_THREADS) while it.o < rows: row it.o, column it.i * 8.
// Group q's z tile is columns q*zt .. of the saved row ((phi, gamma, rho): phi outermost).
static inline BT_HD int bt_zcopy_per(const BtGeom *g) { return g->zt / 8; }
static inline BT_HD int bt_z_smem(const BtGeom *g, int m, int col) { return m * g->zld + col; }
static inline BT_HD size_t bt_z_global(const BtGeom *g, int row, int q, int col) { return (size_t)row * g->zrow + (size_t)q * g->zt + col; }

// ---- stage 2 ---------------------------------------------------------------------------------
// Items: pg x ntg per group, walked with bt_walk_begin(&it, g->ntg, warp, BT_WARPS) while
// it.o < pg: f = q*pg + it.o (fl = it.o in the z tile), j = it.i.
// y n-tile (16 columns of Y_f) of item j, fragment b < nb
static inline BT_HD int bt_s2_ntile(const BtGeom *g, int j, int b) { return j * g->nb + b; }
// A fragment (z tile, ldm zld): tile rows mt*16.., Z_f columns kk*16.. (fl: f within the group)
static inline BT_HD int bt_s2_a(const BtGeom *g, int mt, int fl, int kk) { return mt * 16 * g->zld + fl * g->gr + kk * 16; }
// B fragment (W1, ldm eps): W1[f] rows kk*16.., columns n*16..
static inline BT_HD size_t bt_s2_b(const BtGeom *g, int f, int kk, int n) {
    return (size_t)f * g->gr * g->E + (size_t)kk * 16 * g->E + n * 16;
}
// y element (row, f*eps + n*16 + col) and its bias
static inline BT_HD size_t bt_y_global(const BtGeom *g, int row, int f, int n, int col) {
    return (size_t)row * g->dout + (size_t)f * g->E + n * 16 + col;
}
static inline BT_HD int bt_bias(const BtGeom *g, int f, int n, int col) { return f * g->E + n * 16 + col; }

// Stage 2 on mma.sync (the kernel's MMA instantiations, -sk 5) reads W1 packed in B-fragment order: per f, per
// k-step kk, per n-tile n (fastest), a block of 32 lanes x 8 elements where lane l's 8 are the
// b0, b1 registers of the tile's two 16x8 halves (cuda/mma.cuh's table):
//   element j of lane l = W1[f][kk*16 + 2(l%4) + (j&1) + 8((j>>1)&1)][n*16 + 8(j>>2) + l/4]
// so one 16-byte load per lane, 512 contiguous bytes a warp, brings a whole 16x16 B tile with no
// transposes (a row-major tile gives each lane its k-pairs eps elements apart). Same size as W1;
// segments (BTT-MoE's experts) follow one another as in W1.
static inline BT_HD size_t bt_w1p_block(const BtGeom *g, int f, int kk, int n) {
    return (((size_t)f * g->ks2 + kk) * (g->E / 16) + n) * 256;
}
// The W1 index of packed element p, for cores of gr rows and E columns (f counts on across segments)
static inline BT_HD size_t bt_w1p_src(int gr, int E, size_t p) {
    const int j = (int)(p % 8), l = (int)(p / 8 % 32), nt = E / 16, ks = gr / 16;
    size_t blk = p / 256;
    const int n = (int)(blk % nt);
    blk /= nt;
    const int kk = (int)(blk % ks);
    const size_t f = blk / ks;
    const int k = kk * 16 + 2 * (l % 4) + (j & 1) + 8 * ((j >> 1) & 1), c = n * 16 + 8 * (j >> 2) + l / 4;
    return (f * gr + k) * E + c;
}
