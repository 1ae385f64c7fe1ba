/*
 * The row-tile driver and the per-type entry points shared by the SIMD kernel files.
 *
 * The including file (qgemm_avx512.c, qgemm_x86_256.h) defines, before including this:
 *   ROW_TILE     activation rows per register tile (8 or 4)
 *   group_rows   (f, group, a, row0, NR, y, ldy, col0): one row group's 16 outputs for
 *                rows [row0, row0 + NR), always inlined so NR is a constant
 *   optionally SG_GROUPS_AT_ONCE and groups_rows (f, group, group_bytes, NG, a, row0, NR,
 *                y, ldy, col0): NG consecutive groups a pass, for a decode's 1-2 rows
 * and gets gemm_<type>() entry points and SG_KERNEL_TABLE, their table.
 */
#ifndef SG_QGEMM_DRIVER_H
#define SG_QGEMM_DRIVER_H

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
    /* More rows than a tile: each group unpacked once into
     * u (the including file's block_half, unpack_group and unpacked_rows; the same bits),
     * then every tile of rows reads it. */
    const int64_t blocks = w->in_features / SG_QBLOCK;
    block_half *u = a->m > ROW_TILE
                        ? (block_half *)aligned_alloc(64, (size_t)(2 * blocks) * sizeof(block_half))
                        : NULL;
    if (u != NULL) {
        for (int64_t g = g0; g < g1; g++) {
            unpack_group(f, w->data + g * group_bytes, blocks, u);
            for (int half = 0; half < 2; half++) {
                const int64_t col0 = g * SG_GROUP_ROWS;
                int64_t row = 0;
                for (; row + ROW_TILE <= a->m; row += ROW_TILE)
                    unpacked_rows(f, u, half, a, row, ROW_TILE, y, ldy, col0);
                switch (a->m - row) {
                case 3: unpacked_rows(f, u, half, a, row, 3, y, ldy, col0); break;
                case 2: unpacked_rows(f, u, half, a, row, 2, y, ldy, col0); break;
                case 1: unpacked_rows(f, u, half, a, row, 1, y, ldy, col0); break;
                default: break;
                }
            }
        }
        free(u);
        return;
    }
#endif
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *group = w->data + g * group_bytes;
        const int64_t col0 = g * SG_GROUP_ROWS;
        int64_t row = 0;
        for (; row + ROW_TILE <= a->m; row += ROW_TILE) group_rows(f, group, a, row, ROW_TILE, y, ldy, col0);
        if (ROW_TILE > 4 && a->m - row >= 4) {
            group_rows(f, group, a, row, 4, y, ldy, col0);
            row += 4;
        }
        switch (a->m - row) {
        case 3: group_rows(f, group, a, row, 3, y, ldy, col0); break;
        case 2: group_rows(f, group, a, row, 2, y, ldy, col0); break;
        case 1: group_rows(f, group, a, row, 1, y, ldy, col0); break;
        default: break;
        }
    }
}

SG_DEFINE_KERNELS(gemm)
#define SG_KERNEL_TABLE SG_KERNELS_OF(gemm)

#endif
