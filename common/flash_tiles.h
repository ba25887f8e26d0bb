// common/flash_tiles.h: tile sizes, causal tile ranges, masking and qkv/out/lse offsets shared by the flash-attention kernels (cuda/flash_attention.cuh) and their CPU emulation (tests/test_flash_tiles.c).
#pragma once
#include <stddef.h>

#ifdef __CUDACC__
#define FT_HD __host__ __device__
#else
#define FT_HD
#endif

// Geometry. A query tile is FT_BR rows, a key tile FT_BC rows. A block of FT_NWARPS warps owns one
// tile (a query tile in the forward and dQ kernels, a key tile in the dK/dV kernel); warp w owns
// its FT_WARP_ROWS = 16 rows (the wmma M dimension), and inside a warp row r (0..15) belongs to
// lanes 2r and 2r+1 (FT_LANES_PER_ROW): lane 2r+c handles the columns c, c+2, c+4, ... of the row.
// The kernels alias the query and key tile buffers, so FT_BR == FT_BC is required there.
#define FT_BR 64
#define FT_BC 64
#define FT_WARP_ROWS 16
#define FT_NWARPS (FT_BR / FT_WARP_ROWS)
#define FT_THREADS (32 * FT_NWARPS)
#define FT_LANES_PER_ROW 2

static inline FT_HD int ft_ceil_div(int a, int b) { return (a + b - 1) / b; }

// number of query tiles / key tiles covering T rows (the last one may be partial)
static inline FT_HD int ft_num_q_tiles(int T) { return ft_ceil_div(T, FT_BR); }
static inline FT_HD int ft_num_k_tiles(int T) { return ft_ceil_div(T, FT_BC); }

// Key tiles 0 .. ft_causal_k_tiles(q_tile, T) - 1 are the ones query tile q_tile attends to under
// the causal mask: those holding a key <= the tile's last (real) query row. Tiles beyond are fully
// masked and skipped.
static inline FT_HD int ft_causal_k_tiles(int q_tile, int T) {
    int last = q_tile * FT_BR + FT_BR;  // one past the tile's last row
    if (last > T) last = T;
    return ft_ceil_div(last, FT_BC);
}

// The first query tile that attends to key tile k_tile (the one holding query row k_tile * FT_BC);
// the dK/dV kernel loops query tiles ft_first_q_tile(k) .. ft_num_q_tiles(T) - 1. This visits the
// same (query tile, key tile) pairs as the forward's 0 .. ft_causal_k_tiles(q) - 1.
static inline FT_HD int ft_first_q_tile(int k_tile) { return k_tile * FT_BC / FT_BR; }

// Score (query i, key j) is masked (probability 0): above the diagonal, or a padding row/column of
// a partial last tile.
static inline FT_HD int ft_masked(int i, int j, int T) { return j > i || j >= T || i >= T; }

// Whether tile (q_tile, k_tile) holds any masked element: the diagonal tiles, and every tile of a
// partial last tile row/column. Other tiles skip the per-element test.
static inline FT_HD int ft_tile_needs_mask(int q_tile, int k_tile, int T) {
    int q_first = q_tile * FT_BR, q_end = q_first + FT_BR, k_end = k_tile * FT_BC + FT_BC;
    return k_end - 1 > q_first || q_end > T || k_end > T;
}

// Offsets (in elements). qkv is (B, T, 3C), each row q | k | v (part 0, 1, 2), head h at
// h*hs .. h*hs+hs-1 of each part; out, dout are (B, T, C); lse and the backward's D are (B, NH, T).
static inline FT_HD size_t ft_qkv_offset(int b, int t, int h, int part, int T, int C, int hs) {
    return ((size_t)b * T + t) * 3 * (size_t)C + (size_t)part * C + (size_t)h * hs;
}
static inline FT_HD size_t ft_out_offset(int b, int t, int h, int T, int C, int hs) {
    return ((size_t)b * T + t) * (size_t)C + (size_t)h * hs;
}
static inline FT_HD size_t ft_lse_offset(int b, int h, int t, int NH, int T) { return ((size_t)b * NH + h) * T + t; }
