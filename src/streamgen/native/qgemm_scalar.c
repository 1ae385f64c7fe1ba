/*
 * Scalar quantized matmul: the reference arithmetic of qgemm_kernels.h, one value at a
 * time. Always compiled (no target pragma), so every CPU has a variant.
 */
#include "qgemm_kernels.h"
#include "quant_access.h"

static void gemm_scalar(const sg_qformat *f, const sg_qweight *w, const sg_qact *a, float *y,
                        int64_t ldy, int64_t g0, int64_t g1) {
    const int64_t in = w->in_features, blocks = in / SG_QBLOCK, tb = f->blocks_per_tile;
    const int64_t tiles = blocks / tb, tile_bytes = sg_tile_bytes(f);
    const int subs = SG_QBLOCK / f->sub;
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *group = w->data + g * tiles * tile_bytes;
        for (int64_t row = 0; row < a->m; row++) {
            const int8_t *aq = a->q + row * in;
            for (int r = 0; r < SG_GROUP_ROWS; r++) {
                float acc = 0.0f;
                for (int64_t blk = 0; blk < blocks; blk++) {
                    const uint8_t *tile = group + (blk / tb) * tile_bytes;
                    const int b = (int)(blk % tb);
                    const float da = a->d[row * blocks + blk];
                    int32_t asum = 0;
                    const int32_t *s16 = a->s16 + row * (in / 16) + blk * 2;
                    for (int h = 0; h < subs; h++) {
                        const int32_t s = subs == 2 ? s16[h] : s16[0] + s16[1];
                        int32_t isum = 0;
                        for (int k = h * f->sub; k < (h + 1) * f->sub; k++)
                            isum += quant_at(f, tile, b, r, k) * aq[blk * SG_QBLOCK + k];
                        isum -= f->zp * s;
                        asum += s;
                        acc += (float)isum * (scale_at(f, tile, b, r, h) * da);
                    }
                    if (f->min_kind != SG_MIN_NONE) acc += min_at(f, tile, b, r) * (da * (float)asum);
                }
                float *dst = y + (a->pairs ? row / 2 : row) * ldy + g * SG_GROUP_ROWS + r;
                if (a->pairs && row % 2) *dst = *dst + acc; /* the residual's half */
                else *dst = acc;
            }
        }
    }
}

SG_DEFINE_KERNELS(gemm_scalar)

const sg_qgemm_fn sg_qgemm_scalar[SG_QTYPES] = SG_KERNELS_OF(gemm_scalar);
