/*
 * AVX-512 VNNI quantized matmul: one 512-bit register is one quad image of a row group
 * (16 rows x 4 inputs), so one vpdpbusd against 4 broadcast activations advances 16
 * output rows; each unpacked weight block serves ROW_TILE activation rows (8: 8 float
 * accumulators beside the 8 unpacked quad registers fit the 32 zmm registers).
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>
#include <string.h>

#include "qgemm_kernels.h"

#define INLINE static inline __attribute__((always_inline))
enum { ROW_TILE = 8 };

/* wq[j] = the 16 x 4 unsigned quants of quad j of block b. */
INLINE void unpack_block(const sg_qformat *f, const uint8_t *tile, int b, __m512i wq[8]) {
    if (f->bits == 8) {
        for (int j = 0; j < 8; j++) wq[j] = _mm512_loadu_si512(tile + (int64_t)b * 512 + 64 * j);
        return;
    }
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_loadu_si512(tile + (int64_t)b * 256 + 64 * j);
        wq[j] = _mm512_and_si512(v, low4);
        wq[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const uint8_t *qh = tile + sg_qh_offset(f) + (int64_t)b * f->qh_bytes;
    if (f->bits == 5) { /* bit j of the plane -> bit 4 of quad j */
        const __m512i h = _mm512_loadu_si512(qh), bit4 = _mm512_set1_epi8(0x10);
        for (int j = 0; j < 8; j++) {
            const __m512i s = j <= 4 ? _mm512_slli_epi16(h, 4 - j) : _mm512_srli_epi16(h, j - 4);
            wq[j] = _mm512_or_si512(wq[j], _mm512_and_si512(s, bit4));
        }
    } else if (f->bits == 6) { /* bits 2(j % 4).. of plane j / 4 -> bits 4-5 of quad j */
        const __m512i bits45 = _mm512_set1_epi8(0x30);
        for (int j = 0; j < 8; j++) {
            const __m512i h = _mm512_loadu_si512(qh + 64 * (j / 4));
            const int s = 2 * (j % 4);
            const __m512i t = s < 4 ? _mm512_slli_epi16(h, 4 - s) : _mm512_srli_epi16(h, s - 4);
            wq[j] = _mm512_or_si512(wq[j], _mm512_and_si512(t, bits45));
        }
    }
}

/* The 4 activations at p in every 32-bit lane (a broadcast load: no trip through a
 * general register). */
INLINE __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

INLINE __m512 u8_to_ps(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p))); }
INLINE __m512 i8_to_ps(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
INLINE __m512 f16_to_ps(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* Scales of sub-blocks 0 and 1 (1 only where sub = 16) and the min of block b. */
INLINE void block_scales(const sg_qformat *f, const uint8_t *tile, int b, __m512 dsup, __m512 dmin,
                         __m512 *sc0, __m512 *sc1, __m512 *mn) {
    const uint8_t *sc = tile + sg_sc_offset(f) + (int64_t)b * f->sc_bytes;
    if (f->scale_kind == SG_SCALE_F16) {
        *sc0 = f16_to_ps(sc);
    } else if (f->scale_kind == SG_SCALE_K_U8) {
        *sc0 = _mm512_mul_ps(dsup, u8_to_ps(sc));
    } else {
        *sc0 = _mm512_mul_ps(dsup, i8_to_ps(sc));
        *sc1 = _mm512_mul_ps(dsup, i8_to_ps(sc + 16));
    }
    const uint8_t *m = tile + sg_mn_offset(f) + (int64_t)b * f->mn_bytes;
    if (f->min_kind == SG_MIN_F16) *mn = f16_to_ps(m);
    if (f->min_kind == SG_MIN_K) *mn = _mm512_mul_ps(dmin, u8_to_ps(m));
}

/* y[row0 .. row0 + NR, col0 .. col0 + 16 NG) for NG consecutive row groups from group
 * (group_bytes apart), NG * NR <= ROW_TILE. Each output's arithmetic is the same
 * whatever NG is (the groups only interleave): several groups at once keep several
 * weight streams and accumulator chains in flight for a decode's one or two rows. */
INLINE void groups_rows(const sg_qformat *f, const uint8_t *group, int64_t group_bytes,
                        const int NG, const sg_qact *a, int64_t row0, const int NR, float *y,
                        int64_t out, int64_t col0) {
    const int64_t in = a->in, blocks = in / SG_QBLOCK, tb = f->blocks_per_tile;
    const int64_t tile_bytes = sg_tile_bytes(f);
    __m512 accs[ROW_TILE];
    for (int i = 0; i < NG * NR; i++) accs[i] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; blk++) {
        /* each group's weight stream ahead of its loads (qgemm_kernels.h) */
        for (int gi = 0; gi < NG; gi++) sg_prefetch_ahead(group + gi * group_bytes, blk, tile_bytes / tb);
        for (int gi = 0; gi < NG; gi++) {
            __m512 *acc = accs + gi * NR;
            const uint8_t *tile = group + gi * group_bytes + (blk / tb) * tile_bytes;
            const int b = (int)(blk % tb);
            __m512 dsup = _mm512_setzero_ps(), dmin = _mm512_setzero_ps();
            if (f->sup_bytes) dsup = _mm512_loadu_ps((const float *)(tile + sg_sup_offset(f)));
            if (f->min_kind == SG_MIN_K) dmin = _mm512_loadu_ps((const float *)(tile + sg_sup_offset(f) + 64));
            __m512i wq[8];
            unpack_block(f, tile, b, wq);
            __m512 sc0, sc1 = _mm512_setzero_ps(), mn = _mm512_setzero_ps();
            block_scales(f, tile, b, dsup, dmin, &sc0, &sc1, &mn);
            for (int r = 0; r < NR; r++) {
                const int64_t row = row0 + r, at = row * blocks + blk;
                const int8_t *aq = a->q + row * in + blk * SG_QBLOCK;
                /* two chains of four: quads 0-3 (inputs 0-15), quads 4-7 (16-31) */
                __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[0], bcast4(aq));
                __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[4], bcast4(aq + 16));
                for (int j = 1; j < 4; j++) {
                    lo = _mm512_dpbusd_epi32(lo, wq[j], bcast4(aq + 4 * j));
                    hi = _mm512_dpbusd_epi32(hi, wq[j + 4], bcast4(aq + 16 + 4 * j));
                }
                const int32_t *s16 = a->s16 + row * (in / 16) + blk * 2;
                const __m512 da = _mm512_set1_ps(a->d[at]);
                if (f->sub == 32) {
                    __m512i isum = _mm512_add_epi32(lo, hi);
                    if (f->zp) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(f->zp * (s16[0] + s16[1])));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(sc0, da), acc[r]);
                } else {
                    lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(f->zp * s16[0]));
                    hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(f->zp * s16[1]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(sc0, da), acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(sc1, da), acc[r]);
                }
                if (f->min_kind != SG_MIN_NONE) acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a->ds[at]), acc[r]);
            }
        }
    }
    for (int gi = 0; gi < NG; gi++) {
        const __m512 *acc = accs + gi * NR;
        const int64_t col = col0 + gi * SG_GROUP_ROWS;
        if (a->pairs) /* NR and row0 are even: each pair is one output row */
            for (int r = 0; r + 1 < NR; r += 2)
                _mm512_storeu_ps(y + (row0 + r) / 2 * out + col, _mm512_add_ps(acc[r], acc[r + 1]));
        else
            for (int r = 0; r < NR; r++) _mm512_storeu_ps(y + (row0 + r) * out + col, acc[r]);
    }
}

/* One row group (the driver's kernel). */
INLINE void group_rows(const sg_qformat *f, const uint8_t *group, const sg_qact *a, int64_t row0,
                       const int NR, float *y, int64_t out, int64_t col0) {
    groups_rows(f, group, 0, 1, a, row0, NR, y, out, col0);
}

/* Decodes (1 or 2 rows: a pair) take this many groups a pass (qgemm_driver.h). */
#define SG_GROUPS_AT_ONCE 4

#include "qgemm_driver.h"

const sg_qgemm_fn sg_qgemm_avx512vnni[SG_QTYPES] = SG_KERNEL_TABLE;
