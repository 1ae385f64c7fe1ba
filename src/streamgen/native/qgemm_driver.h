/*
 * The row-tile driver and the per-type entry points shared by the SIMD kernel files.
 *
 * The including file (qgemm_avx512.c, qgemm_x86_256.h) defines, before including this:
 *   ROW_TILE     activation rows per register tile (8 or 4)
 *   group_rows   (f, group, a, row0, NR, y, ldy, col0): one row group's 16 outputs for
 *                rows [row0, row0 + NR), always inlined so NR is a constant
 *   optionally SG_GROUPS_AT_ONCE and groups_rows (f, group, group_bytes, NG, a, row0, NR,
 *                y, ldy, col0): NG consecutive groups a pass, for a decode's 1-2 rows
 *   optionally SG_UNPACKED_GROUPS with block_half, unpack_group (f, group, blocks, u) and
 *                unpacked_rows (f, u, half, a, row0, NR, y, ldy, col0): steps of more
 *                rows than a tile unpack each group once
 * and gets gemm_<type>() entry points and SG_KERNEL_TABLE, their table.
 */
#ifndef SG_QGEMM_DRIVER_H
#define SG_QGEMM_DRIVER_H

/* Rows [row0, row0 + NR) of one row group: from the group unpacked in u where the
 * including file unpacks groups (SG_UNPACKED_GROUPS) and u holds it, else packed. */
#ifdef SG_UNPACKED_GROUPS
INLINE void tile_rows(const sg_qformat *f, const uint8_t *group, const block_half *u, const sg_qact *a,
                      int64_t row0, const int NR, float *y, int64_t ldy, int64_t col0) {
    if (u == NULL) {
        group_rows(f, group, a, row0, NR, y, ldy, col0);
        return;
    }
    for (int half = 0; half < 2; half++) unpacked_rows(f, u, half, a, row0, NR, y, ldy, col0);
}
#else
INLINE void tile_rows(const sg_qformat *f, const uint8_t *group, const void *u, const sg_qact *a,
                      int64_t row0, const int NR, float *y, int64_t ldy, int64_t col0) {
    (void)u;
    group_rows(f, group, a, row0, NR, y, ldy, col0);
}
#endif

/* Row groups [g0, g1) of w for every activation row: full tiles, then a tile of 4 (on
 * 8-row files), then the 1-3 rows left. */
INLINE void gemm(const sg_qformat *f, const sg_qweight *w, const sg_qact *a, float *y, int64_t ldy,
                 int64_t g0, int64_t g1) {
    const int64_t group_bytes = (w->in_features / SG_QBLOCK / f->blocks_per_tile) * sg_tile_bytes(f);
#ifdef SG_GROUPS_AT_ONCE
    /* A decode's one or two rows: several groups a pass (the including file's
     * groups_rows, where it defines SG_GROUPS_AT_ONCE; the same bits). */
    if (a->m <= 2) {
        int64_t g = g0;
        for (; g + SG_GROUPS_AT_ONCE <= g1; g += SG_GROUPS_AT_ONCE) {
            if (a->m == 1)
                groups_rows(f, w->data + g * group_bytes, group_bytes, SG_GROUPS_AT_ONCE, a, 0, 1,
                               y, ldy, g * SG_GROUP_ROWS);
            else
                groups_rows(f, w->data + g * group_bytes, group_bytes, SG_GROUPS_AT_ONCE, a, 0, 2,
                               y, ldy, g * SG_GROUP_ROWS);
        }
        g0 = g;
    }
#endif
#ifdef SG_UNPACKED_GROUPS
    /* More rows than a tile: each group unpacked once into u (the including file's
     * block_half and unpack_group; the same bits), then every tile of rows reads it. */
    const int64_t blocks = w->in_features / SG_QBLOCK;
    block_half *u = a->m > ROW_TILE
                        ? (block_half *)aligned_alloc(64, (size_t)(2 * blocks) * sizeof(block_half))
                        : NULL;
#else
    const void *u = NULL;
#endif
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *group = w->data + g * group_bytes;
        const int64_t col0 = g * SG_GROUP_ROWS;
#ifdef SG_UNPACKED_GROUPS
        if (u != NULL) unpack_group(f, group, blocks, u);
#endif
        int64_t row = 0;
        for (; row + ROW_TILE <= a->m; row += ROW_TILE) tile_rows(f, group, u, a, row, ROW_TILE, y, ldy, col0);
        if (ROW_TILE > 4 && a->m - row >= 4) {
            tile_rows(f, group, u, a, row, 4, y, ldy, col0);
            row += 4;
        }
        switch (a->m - row) {
        case 3: tile_rows(f, group, u, a, row, 3, y, ldy, col0); break;
        case 2: tile_rows(f, group, u, a, row, 2, y, ldy, col0); break;
        case 1: tile_rows(f, group, u, a, row, 1, y, ldy, col0); break;
        default: break;
        }
    }
#ifdef SG_UNPACKED_GROUPS
    free(u);
#endif
}

SG_DEFINE_KERNELS(gemm)
#define SG_KERNEL_TABLE SG_KERNELS_OF(gemm)

#endif
