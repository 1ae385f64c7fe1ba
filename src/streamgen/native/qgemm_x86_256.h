/*
 * 256-bit quantized matmul, shared by the AVX2 and AVX-VNNI variants: a quad image of a
 * row group is two 256-bit halves (rows 0-7, rows 8-15), each done as its own 8-row pass.
 * The only difference between the variants is the 4-input dot product (dot_quads):
 *
 *   AVX-VNNI  vpdpbusd                                  u8 x s8 -> s32
 *   AVX2      vpmaddubsw (u8 x s8 -> s16 pairs), summed in int16 while they cannot
 *             overflow, vpmaddwd by 1 -> s32
 *
 * The including file sets SG_X86_VNNI and its `#pragma GCC target`, and names the table.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "qgemm_kernels.h"

#define INLINE static inline __attribute__((always_inline))
enum { ROW_TILE = SG_ROW_TILE };

INLINE void unpack_half(const sg_qformat *f, const uint8_t *tile, int b, int half, __m256i wq[8]) {
    const int64_t lane0 = 32 * half;
    if (f->bits == 8) { /* AVX2: as q - 128, signed (dot_quads' sign trick) */
        for (int j = 0; j < 8; j++) {
            wq[j] = _mm256_loadu_si256((const __m256i *)(tile + (int64_t)b * 512 + 64 * j + lane0));
#if !SG_X86_VNNI
            wq[j] = _mm256_xor_si256(wq[j], _mm256_set1_epi8((char)0x80));
#endif
        }
        return;
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int j = 0; j < 4; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(tile + (int64_t)b * 256 + 64 * j + lane0));
        wq[j] = _mm256_and_si256(v, low4);
        wq[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
    const uint8_t *qh = tile + sg_qh_offset(f) + (int64_t)b * f->qh_bytes + lane0;
    if (f->bits == 5) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)qh), bit4 = _mm256_set1_epi8(0x10);
        for (int j = 0; j < 8; j++) {
            const __m256i s = j <= 4 ? _mm256_slli_epi16(h, 4 - j) : _mm256_srli_epi16(h, j - 4);
            wq[j] = _mm256_or_si256(wq[j], _mm256_and_si256(s, bit4));
        }
    } else if (f->bits == 6) {
        const __m256i bits45 = _mm256_set1_epi8(0x30);
        for (int j = 0; j < 8; j++) {
            const __m256i h = _mm256_loadu_si256((const __m256i *)(qh + 64 * (j / 4)));
            const int s = 2 * (j % 4);
            const __m256i t = s < 4 ? _mm256_slli_epi16(h, 4 - s) : _mm256_srli_epi16(h, s - 4);
            wq[j] = _mm256_or_si256(wq[j], _mm256_and_si256(t, bits45));
        }
    }
}

/* The 4 activations at p in every 32-bit lane (a broadcast load). */
INLINE __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}

#if !SG_X86_VNNI
/* Quads summed in int16 before one vpmaddwd: each vpmaddubsw lane is two products of a
 * weight q < 2^bits and an activation |a| <= 127, so 2^15 / (2 * (2^bits - 1) * 127)
 * lanes fit: 8 quads at 4 bits, 4 at 5, 2 at 6. */
INLINE int quads_per_madd(const sg_qformat *f) { return f->bits == 4 ? 8 : f->bits == 5 ? 4 : 2; }
#endif

/* The 4-input dot products of quads [j0, j0 + n) of a block (weights wq, activations aq),
 * summed in int32, 8 rows:
 *   AVX-VNNI  one vpdpbusd chain;
 *   AVX2      vpmaddubsw per quad, int16 sums of quads_per_madd quads, vpmaddwd by 1;
 *             8-bit quants take the sign trick on q - 128 (unpack_half subtracts the 128),
 *             so their zero point is folded. */
INLINE __m256i dot_quads(const sg_qformat *f, const __m256i *wq, const int8_t *aq, int j0, int n) {
#if SG_X86_VNNI
    (void)f;
    __m256i acc = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wq[j0], bcast4(aq + 4 * j0));
    for (int j = j0 + 1; j < j0 + n; j++) acc = _mm256_dpbusd_avx_epi32(acc, wq[j], bcast4(aq + 4 * j));
    return acc;
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    if (f->bits == 8) { /* wq: q - 128 (unpack_half) */
        for (int j = j0; j < j0 + n; j++) {
            const __m256i s = wq[j], x = bcast4(aq + 4 * j);
            const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(s, s), _mm256_sign_epi8(x, s));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
        }
        return acc;
    }
    const int per = quads_per_madd(f);
    for (int c = j0; c < j0 + n; c += per) {
        __m256i p = _mm256_maddubs_epi16(wq[c], bcast4(aq + 4 * c));
        for (int j = c + 1; j < c + per && j < j0 + n; j++)
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(wq[j], bcast4(aq + 4 * j)));
        acc = c == j0 ? _mm256_madd_epi16(p, ones) : _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    return acc;
#endif
}

/* The zero point still to subtract after dot_quads (AVX2 folds the 8-bit one). */
INLINE int zero_point(const sg_qformat *f) {
#if SG_X86_VNNI
    return f->zp;
#else
    return f->bits == 8 ? 0 : f->zp;
#endif
}

INLINE __m256 u8_to_ps(const uint8_t *p) {
    __m128i v;
    memcpy(&v, p, 8); /* the low 8 bytes */
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}
INLINE __m256 i8_to_ps(const uint8_t *p) {
    __m128i v;
    memcpy(&v, p, 8);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}
INLINE __m256 f16_to_ps(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* One block-half's weights as the rows' dot products take them: the 8 unpacked quads
 * and the scales and mins of its 8 outputs. */
typedef struct {
    __m256i wq[8];
    __m256 sc0, sc1, mn;
} block_half;

INLINE void load_block_half(const sg_qformat *f, const uint8_t *tile, int b, int half, block_half *u) {
    unpack_half(f, tile, b, half, u->wq);
    const uint8_t *sc = tile + sg_sc_offset(f) + (int64_t)b * f->sc_bytes;
    const uint8_t *mp = tile + sg_mn_offset(f) + (int64_t)b * f->mn_bytes;
    const float *sup = (const float *)(tile + sg_sup_offset(f)) + 8 * half;
    u->sc1 = _mm256_setzero_ps(), u->mn = _mm256_setzero_ps();
    if (f->scale_kind == SG_SCALE_F16) u->sc0 = f16_to_ps(sc + 16 * half);
    else if (f->scale_kind == SG_SCALE_K_U8) u->sc0 = _mm256_mul_ps(_mm256_loadu_ps(sup), u8_to_ps(sc + 8 * half));
    else {
        u->sc0 = _mm256_mul_ps(_mm256_loadu_ps(sup), i8_to_ps(sc + 8 * half));
        u->sc1 = _mm256_mul_ps(_mm256_loadu_ps(sup), i8_to_ps(sc + 16 + 8 * half));
    }
    if (f->min_kind == SG_MIN_F16) u->mn = f16_to_ps(mp + 16 * half);
    if (f->min_kind == SG_MIN_K) u->mn = _mm256_mul_ps(_mm256_loadu_ps(sup + 16), u8_to_ps(mp + 8 * half));
}

/* acc += block blk of activation row `row` against one block-half's 8 outputs. */
INLINE __m256 row_block(const sg_qformat *f, const block_half *u, const sg_qact *a, int64_t row,
                        int64_t blk, __m256 acc) {
    const int64_t in = a->in, at = row * (in / SG_QBLOCK) + blk;
    const int zp = zero_point(f);
    const int8_t *aq = a->q + row * in + blk * SG_QBLOCK;
    const int32_t *s16 = a->s16 + row * (in / 16) + blk * 2;
    const __m256 da = _mm256_set1_ps(a->d[at]);
    if (f->sub == 32) {
        __m256i isum = dot_quads(f, u->wq, aq, 0, 8);
        if (zp) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(zp * (s16[0] + s16[1])));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(u->sc0, da), acc);
    } else {
        const __m256i lo = _mm256_sub_epi32(dot_quads(f, u->wq, aq, 0, 4), _mm256_set1_epi32(zp * s16[0]));
        const __m256i hi = _mm256_sub_epi32(dot_quads(f, u->wq, aq, 4, 4), _mm256_set1_epi32(zp * s16[1]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(u->sc0, da), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(u->sc1, da), acc);
    }
    if (f->min_kind != SG_MIN_NONE) acc = _mm256_fmadd_ps(u->mn, _mm256_set1_ps(a->ds[at]), acc);
    return acc;
}

/* NR rows' 8 outputs stored from their accumulators (pairs: each pair is one row). */
INLINE void store_rows(const sg_qact *a, const __m256 *acc, int64_t row0, const int NR, float *y,
                       int64_t out, int64_t col) {
    if (a->pairs) /* NR and row0 are even */
        for (int r = 0; r + 1 < NR; r += 2)
            _mm256_storeu_ps(y + (row0 + r) / 2 * out + col, _mm256_add_ps(acc[r], acc[r + 1]));
    else
        for (int r = 0; r < NR; r++) _mm256_storeu_ps(y + (row0 + r) * out + col, acc[r]);
}

/* y[row0 .. row0 + NR) for slices of 8 outputs: halves [half0, half0 + NH) of NG
 * consecutive row groups from group (group_bytes apart), NG NH NR float accumulators
 * (at most 8). Each output's arithmetic is the same whichever slices share a pass (they
 * only interleave). */
INLINE void slices_rows(const sg_qformat *f, const uint8_t *group, int64_t group_bytes,
                        const int NG, const int half0, const int NH, const sg_qact *a,
                        int64_t row0, const int NR, float *y, int64_t out, int64_t col0) {
    const int64_t blocks = a->in / SG_QBLOCK, tb = f->blocks_per_tile;
    const int64_t tile_bytes = sg_tile_bytes(f);
    __m256 accs[8];
    for (int i = 0; i < NG * NH * NR; i++) accs[i] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < blocks; blk++) {
        /* each group's weight stream ahead of its loads (qgemm_kernels.h) */
        for (int gi = 0; gi < NG; gi++) sg_prefetch_ahead(group + gi * group_bytes, blk, tile_bytes / tb);
#pragma GCC unroll 8
        for (int slice = 0; slice < NG * NH; slice++) {
            const uint8_t *tile = group + (slice / NH) * group_bytes + (blk / tb) * tile_bytes;
            block_half u;
            load_block_half(f, tile, (int)(blk % tb), half0 + slice % NH, &u);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) accs[slice * NR + r] = row_block(f, &u, a, row0 + r, blk, accs[slice * NR + r]);
        }
    }
    for (int slice = 0; slice < NG * NH; slice++)
        store_rows(a, accs + slice * NR, row0, NR, y, out,
                   col0 + (slice / NH) * SG_GROUP_ROWS + 8 * (half0 + slice % NH));
}

/* A row group unpacked once for all the row tiles of a step (more rows than a tile):
 * every tile would otherwise unpack the group's blocks again, and the unpacking costs
 * as much as the dot products at 4 rows. u: [blocks][2 halves]. */
INLINE void unpack_group(const sg_qformat *f, const uint8_t *group, int64_t blocks, block_half *u) {
    const int64_t tb = f->blocks_per_tile, tile_bytes = sg_tile_bytes(f);
    for (int64_t blk = 0; blk < blocks; blk++) {
        sg_prefetch_ahead(group, blk, tile_bytes / tb);
        for (int half = 0; half < 2; half++)
            load_block_half(f, group + (blk / tb) * tile_bytes, (int)(blk % tb), half, u + 2 * blk + half);
    }
}

/* Rows [row0, row0 + NR) of one half of an unpacked group: the same arithmetic as
 * slices_rows, the weights read from u. */
INLINE void unpacked_rows(const sg_qformat *f, const block_half *u, int half, const sg_qact *a,
                          int64_t row0, const int NR, float *y, int64_t out, int64_t col0) {
    const int64_t blocks = a->in / SG_QBLOCK;
    __m256 acc[8];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < blocks; blk++)
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) acc[r] = row_block(f, u + 2 * blk + half, a, row0 + r, blk, acc[r]);
    store_rows(a, acc, row0, NR, y, out, col0 + 8 * half);
}

/* NG consecutive row groups, both halves in one pass (the driver's decode hook): for a
 * decode's one or two rows, 2 NG weight streams and accumulator chains in flight, and
 * each 64-byte line of quads used whole in one pass. */
INLINE void groups_rows(const sg_qformat *f, const uint8_t *group, int64_t group_bytes,
                        const int NG, const sg_qact *a, int64_t row0, const int NR, float *y,
                        int64_t out, int64_t col0) {
    slices_rows(f, group, group_bytes, NG, 0, 2, a, row0, NR, y, out, col0);
}

/* One row group (the driver's kernel): up to 2 rows both halves in one pass, more rows
 * a half at a time (NR accumulators beside the 8 unpacked quads). */
INLINE void group_rows(const sg_qformat *f, const uint8_t *group, const sg_qact *a, int64_t row0,
                       const int NR, float *y, int64_t out, int64_t col0) {
    if (NR <= 2) {
        slices_rows(f, group, 0, 1, 0, 2, a, row0, NR, y, out, col0);
        return;
    }
    slices_rows(f, group, 0, 1, 0, 1, a, row0, NR, y, out, col0);
    slices_rows(f, group, 0, 1, 1, 1, a, row0, NR, y, out, col0);
}

/* Decodes (1 or 2 rows: a pair) take this many groups a pass (qgemm_driver.h). */
#define SG_GROUPS_AT_ONCE 2
/* Steps of more rows than a tile unpack each group once (unpack_group, unpacked_rows). */
#define SG_UNPACKED_GROUPS 1

#include "qgemm_driver.h"

/* sg_quantize_act (qgemm.c) eight floats at a time, the same arithmetic: d = max|x| / 127,
 * q = round-half-even(x * (1 / d)) clamped to +-127 (roundps is the rounding mode's
 * nearest-even, as the scalar version's 1.5 * 2^23 trick), sums of q per 16. */
static void quantize_rows(const float *x, int64_t m, int64_t in, sg_qact *a) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.0f);
    for (int64_t r = 0; r < m; r++) {
        for (int64_t blk = 0; blk < in / SG_QBLOCK; blk++) {
            const float *xb = x + r * in + blk * SG_QBLOCK;
            __m256 v[4], mx = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) {
                v[j] = _mm256_loadu_ps(xb + 8 * j);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float d = _mm_cvtss_f32(h) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            const __m256 idv = _mm256_set1_ps(id);
            __m256i qi[4];
            for (int j = 0; j < 4; j++) {
                __m256 q = _mm256_round_ps(_mm256_mul_ps(v[j], idv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm256_min_ps(_mm256_max_ps(q, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
                qi[j] = _mm256_cvtps_epi32(q);
            }
            /* int32 x 32 -> int8 x 32 in order: packs work per 128-bit lane, so permute back */
            const __m256i w01 = _mm256_packs_epi32(qi[0], qi[1]), w23 = _mm256_packs_epi32(qi[2], qi[3]);
            __m256i b = _mm256_packs_epi16(w01, w23);
            b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(a->q + r * in + blk * SG_QBLOCK), b);
            const __m256i s01 = _mm256_add_epi32(qi[0], qi[1]), s23 = _mm256_add_epi32(qi[2], qi[3]);
            int32_t t[16];
            _mm256_storeu_si256((__m256i *)t, s01);
            _mm256_storeu_si256((__m256i *)(t + 8), s23);
            int32_t s0 = 0, s1 = 0;
            for (int k = 0; k < 8; k++) s0 += t[k], s1 += t[8 + k];
            a->d[r * (in / SG_QBLOCK) + blk] = d;
            a->s16[r * (in / 16) + blk * 2] = s0;
            a->s16[r * (in / 16) + blk * 2 + 1] = s1;
            a->ds[r * (in / SG_QBLOCK) + blk] = d * (float)(s0 + s1);
        }
    }
}
