/*
 * Attention's inner loops on AVX-512 (an sg_attend_kernels table: attention_kernels.h),
 * giving the bits of attention_tiles.h's AVX2 loops, so a row's attention is the same on
 * either ISA and a step may take whichever loop is faster for its shape.
 *
 * Scores of many queries run with keys along the lanes: a block's 16 keys are transposed
 * once (kt[d][key]), then each query costs one FMA of a broadcast query element per
 * dimension, in the AVX2 loops' 8 chains (dimensions d mod 8, in order) and with their
 * reduction tree; a few queries (a decode) do not repay the transpose and take the AVX2
 * loops. Values accumulate 64 output dimensions of up to 6 outputs per pass, one FMA
 * per (output, key) in key order as the AVX2 loops do; the softmax terms come 16 at a
 * time and are added in the AVX2 order. A float16 cache is read in place, each vector
 * widened as it is loaded (the _f16 entries).
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "attention_kernels.h"
#include "attention_tiles.h"

#define INLINE static inline __attribute__((always_inline))
enum { CHAINS = 8, QUERY_GROUP = 3, OUTPUT_GROUP = 6, LANES = 16, TRANSPOSE_QUERIES = 6 };

/* Keys and values are read as the cache holds them: float32, or float16 widened in the
 * loads (F16, a constant after inlining; the same floats, so the same bits, as loops
 * over a widened copy, without the copy). Element i of the vectors at p: */
INLINE const void *kv_at(const void *p, int64_t i, const int F16) {
    return (const char *)p + i * (F16 ? 2 : 4);
}
INLINE __m256 kv_load8(const void *p, const int F16) {
    return F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)) : _mm256_loadu_ps((const float *)p);
}
INLINE __m512 kv_load16(const void *p, const int F16) {
    return F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps((const float *)p);
}
INLINE __m512 kv_load16_masked(const void *p, __mmask16 m, const int F16) {
    return F16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)) : _mm512_maskz_loadu_ps(m, p);
}
INLINE float kv_elem(const void *p, const int F16) {
    return F16 ? f16_to_f32(*(const uint16_t *)p) : *(const float *)p;
}

/* r[0..16) (16 rows of 16 floats) -> its transpose, in place. */
INLINE void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) { /* per 128-bit lane: u[4g + e] = rows 4g.. at dim e */
        u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
        u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int e = 0; e < 4; e++) { /* the 4 x 4 transpose of 128-bit lanes */
        const __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44);
        const __m512 v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
        const __m512 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
        const __m512 v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
        r[e] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        r[4 + e] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        r[8 + e] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        r[12 + e] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
}

/* kt[d * 16 + k] = element d of key k (keys past count repeat the last one). */
INLINE void transpose_keys(const void *kb, int64_t stride, int64_t count, int64_t D, float *kt,
                           const int F16) {
    const void *rows[LANES];
    for (int k = 0; k < LANES; k++) rows[k] = kv_at(kb, (k < count ? k : count - 1) * stride, F16);
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES) {
        __m512 r[LANES];
        for (int k = 0; k < LANES; k++) r[k] = kv_load16(kv_at(rows[k], d, F16), F16);
        transpose16(r);
        for (int e = 0; e < LANES; e++) _mm512_storeu_ps(kt + (d + e) * LANES, r[e]);
    }
    for (; d < D; d++)
        for (int k = 0; k < LANES; k++) kt[d * LANES + k] = kv_elem(kv_at(rows[k], d, F16), F16);
}

/* NQ (compile-time after inlining) queries against the 16 transposed keys at kt, with
 * attention_tiles.h's arithmetic: 8 chains per query (dimensions d mod 8, in order) and
 * its reduction ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7)), then the scale. */
INLINE void scores_group(const float *const *q, const int NQ, const float *kt, int64_t D,
                         float scale, float *s, int64_t s_stride, __mmask16 keep) {
    __m512 acc[QUERY_GROUP][CHAINS];
    for (int j = 0; j < NQ; j++)
        for (int c = 0; c < CHAINS; c++) acc[j][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += CHAINS)
        for (int c = 0; c < CHAINS; c++) {
            __m512 kv = _mm512_loadu_ps(kt + (d + c) * LANES);
            /* kv in a register, so each FMA's memory operand is its query broadcast: one
             * load per FMA, where GCC would otherwise load kt again for every query. */
            __asm__("" : "+v"(kv));
            for (int j = 0; j < NQ; j++)
                acc[j][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[j][d + c]), kv, acc[j][c]);
        }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int j = 0; j < NQ; j++) {
        const __m512 lo = _mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]),
                                        _mm512_add_ps(acc[j][2], acc[j][3]));
        const __m512 hi = _mm512_add_ps(_mm512_add_ps(acc[j][4], acc[j][5]),
                                        _mm512_add_ps(acc[j][6], acc[j][7]));
        _mm512_mask_storeu_ps(s + j * s_stride, keep, _mm512_mul_ps(_mm512_add_ps(lo, hi), sc));
    }
}

/* _mm256_hadd_ps in each 256-bit half: [a0+a1, a2+a3, b0+b1, b2+b3] per 128-bit lane. */
INLINE __m512 hadd512(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}

/* NQ (compile-time) queries against 8 keys with the keys in pairs: a register holds keys
 * 2p and 2p + 1, 8 dimensions each, so each FMA is attention_tiles.h's (dimension d mod 8
 * in lane d mod 8) for two keys, and the reduction is its hsum4, two keys at a time:
 * no transpose, for a decode's few queries. Keys past count repeat the last one. */
INLINE void scores_pairs(const float *const *q, const int NQ, const void *kb, int64_t stride,
                         int64_t count, int64_t D, float scale, float *s, int64_t s_stride,
                         const int F16) {
    const void *k[8];
    for (int i = 0; i < 8; i++) k[i] = kv_at(kb, (i < count ? i : count - 1) * stride, F16);
    __m512 acc[3][4];
    for (int j = 0; j < NQ; j++)
        for (int p = 0; p < 4; p++) acc[j][p] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        __m512 kv[4];
        for (int p = 0; p < 4; p++)
            kv[p] = _mm512_insertf32x8(
                _mm512_castps256_ps512(kv_load8(kv_at(k[2 * p], d, F16), F16)),
                kv_load8(kv_at(k[2 * p + 1], d, F16), F16), 1);
        for (int j = 0; j < NQ; j++) {
            const __m512 qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q[j] + d));
            for (int p = 0; p < 4; p++) acc[j][p] = _mm512_fmadd_ps(qv, kv[p], acc[j][p]);
        }
    }
    /* t, per 128-bit lane L of each pair register: keys 0, 2, 4, 6 (L0: dims 0-3 summed,
     * L1: dims 4-7), keys 1, 3, 5, 7 (L2, L3); then L0 + L1 and L2 + L3. */
    const __m512i order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __m512 sc = _mm512_set1_ps(scale);
    const __mmask16 keep = (__mmask16)((1u << (count < 8 ? count : 8)) - 1u);
    for (int j = 0; j < NQ; j++) {
        const __m512 t = hadd512(hadd512(acc[j][0], acc[j][1]), hadd512(acc[j][2], acc[j][3]));
        const __m512 r = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));
        _mm512_mask_storeu_ps(s + j * s_stride, keep,
                              _mm512_mul_ps(_mm512_permutexvar_ps(order, r), sc));
    }
}

/* A decode's few queries, 8 keys and up to 3 queries at a time. */
INLINE void scores_few(const float *const *q, int64_t nq, const void *kb, int64_t stride,
                       int64_t count, int64_t D, float scale, float *s, int64_t s_stride,
                       const int F16) {
    for (int64_t k = 0; k < count; k += 8)
        for (int64_t j = 0; j < nq; j += 3) {
            const float *const *qj = q + j;
            const void *kk = kv_at(kb, k * stride, F16);
            float *sj = s + j * s_stride + k;
            switch (nq - j < 3 ? nq - j : 3) {
            case 1: scores_pairs(qj, 1, kk, stride, count - k, D, scale, sj, s_stride, F16); break;
            case 2: scores_pairs(qj, 2, kk, stride, count - k, D, scale, sj, s_stride, F16); break;
            default: scores_pairs(qj, 3, kk, stride, count - k, D, scale, sj, s_stride, F16); break;
            }
        }
}

/* Transposed keys pay off from TRANSPOSE_QUERIES queries on; fewer take scores_few.
 * D % 8 != 0 (float32 keys only) takes attention_tiles.h's scalar dot products. */
INLINE void scores_of(const float *const *q, int64_t nq, const void *kb, int64_t stride,
                      int64_t count, int64_t D, float scale, float *s, int64_t s_stride,
                      float *scratch, const int F16) {
    if (!F16 && D % CHAINS) {
        for (int64_t j = 0; j < nq; j += QK_QUERIES)
            tile_dots(q + j, nq - j < QK_QUERIES ? nq - j : QK_QUERIES, (const float *)kb, stride,
                      count, D, scale, s + j * s_stride, s_stride);
        return;
    }
    if (nq < TRANSPOSE_QUERIES) {
        scores_few(q, nq, kb, stride, count, D, scale, s, s_stride, F16);
        return;
    }
    transpose_keys(kb, stride, count, D, scratch, F16);
    const __mmask16 keep = (__mmask16)((1u << count) - 1u);
    int64_t j = 0;
    for (; j + QUERY_GROUP <= nq; j += QUERY_GROUP)
        scores_group(q + j, QUERY_GROUP, scratch, D, scale, s + j * s_stride, s_stride, keep);
    switch (nq - j) {
    case 1: scores_group(q + j, 1, scratch, D, scale, s + j * s_stride, s_stride, keep); break;
    case 2: scores_group(q + j, 2, scratch, D, scale, s + j * s_stride, s_stride, keep); break;
    default: break;
    }
}

static void scores_avx512(const float *const *q, int64_t nq, const float *kb, int64_t stride,
                          int64_t count, int64_t D, float scale, float *s, int64_t s_stride,
                          float *scratch) {
    scores_of(q, nq, kb, stride, count, D, scale, s, s_stride, scratch, 0);
}

static void scores_avx512_f16(const float *const *q, int64_t nq, const uint16_t *kb,
                              int64_t stride, int64_t count, int64_t D, float scale, float *s,
                              int64_t s_stride, float *scratch) {
    scores_of(q, nq, kb, stride, count, D, scale, s, s_stride, scratch, 1);
}

/* NJ outputs, dimensions [d, d + 64): 4 vectors each, the 24 accumulators in registers. */
INLINE void values_wide(const float *const *p, float *const *o, const int NJ, const void *vb,
                        int64_t stride, int64_t count, int64_t d, const int F16) {
    __m512 acc[OUTPUT_GROUP][4];
    for (int j = 0; j < NJ; j++)
        for (int c = 0; c < 4; c++) acc[j][c] = _mm512_loadu_ps(o[j] + d + LANES * c);
    for (int64_t k = 0; k < count; k++) {
        const void *v = kv_at(vb, k * stride + d, F16);
        const __m512 v0 = kv_load16(v, F16), v1 = kv_load16(kv_at(v, 16, F16), F16);
        const __m512 v2 = kv_load16(kv_at(v, 32, F16), F16), v3 = kv_load16(kv_at(v, 48, F16), F16);
        for (int j = 0; j < NJ; j++) {
            const __m512 pk = _mm512_set1_ps(p[j][k]);
            acc[j][0] = _mm512_fmadd_ps(pk, v0, acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(pk, v1, acc[j][1]);
            acc[j][2] = _mm512_fmadd_ps(pk, v2, acc[j][2]);
            acc[j][3] = _mm512_fmadd_ps(pk, v3, acc[j][3]);
        }
    }
    for (int j = 0; j < NJ; j++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o[j] + d + LANES * c, acc[j][c]);
}

/* NJ outputs, the dimensions [d, d + 16) under mask m (the last ones of a head). */
INLINE void values_narrow(const float *const *p, float *const *o, const int NJ, const void *vb,
                          int64_t stride, int64_t count, int64_t d, __mmask16 m, const int F16) {
    __m512 acc[OUTPUT_GROUP];
    for (int j = 0; j < NJ; j++) acc[j] = _mm512_maskz_loadu_ps(m, o[j] + d);
    for (int64_t k = 0; k < count; k++) {
        const __m512 v = kv_load16_masked(kv_at(vb, k * stride + d, F16), m, F16);
        for (int j = 0; j < NJ; j++) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[j][k]), v, acc[j]);
    }
    for (int j = 0; j < NJ; j++) _mm512_mask_storeu_ps(o[j] + d, m, acc[j]);
}

/* D a multiple of 16. */
INLINE void values_group(const float *const *p, float *const *o, const int NJ, const void *vb,
                         int64_t stride, int64_t count, int64_t D, const int F16) {
    int64_t d = 0;
    for (; d + 4 * LANES <= D; d += 4 * LANES) values_wide(p, o, NJ, vb, stride, count, d, F16);
    for (; d < D; d += LANES)
        values_narrow(p, o, NJ, vb, stride, count, d, (__mmask16)0xffff, F16);
}

/* D % 16 != 0 (float32 values only) takes attention_tiles.h's loops (their scalar tails). */
INLINE void values_of(const float *const *p, float *const *o, int64_t nj, const void *vb,
                      int64_t stride, int64_t count, int64_t D, const int F16) {
    for (int64_t j = 0; j < nj; j += OUTPUT_GROUP) {
        const int64_t group = nj - j < OUTPUT_GROUP ? nj - j : OUTPUT_GROUP;
        if (!F16 && D % LANES) {
            tile_values(p + j, o + j, group, (const float *)vb, stride, count, D);
            continue;
        }
        switch (group) {
        case 1: values_group(p + j, o + j, 1, vb, stride, count, D, F16); break;
        case 2: values_group(p + j, o + j, 2, vb, stride, count, D, F16); break;
        case 3: values_group(p + j, o + j, 3, vb, stride, count, D, F16); break;
        case 4: values_group(p + j, o + j, 4, vb, stride, count, D, F16); break;
        case 5: values_group(p + j, o + j, 5, vb, stride, count, D, F16); break;
        default: values_group(p + j, o + j, 6, vb, stride, count, D, F16); break;
        }
    }
}

static void values_avx512(const float *const *p, float *const *o, int64_t nj, const float *vb,
                          int64_t stride, int64_t count, int64_t D) {
    values_of(p, o, nj, vb, stride, count, D, 0);
}

static void values_avx512_f16(const float *const *p, float *const *o, int64_t nj,
                              const uint16_t *vb, int64_t stride, int64_t count, int64_t D) {
    values_of(p, o, nj, vb, stride, count, D, 1);
}

static float max_avx512(const float *s, int64_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES) m = _mm512_max_ps(m, _mm512_loadu_ps(s + k));
    if (k < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - k)) - 1u);
        m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, s + k));
    }
    return _mm512_reduce_max_ps(m); /* exact in any order */
}

/* exp(x) for 16 floats: simd_f32.h's exp256, step for step (the same bits). */
INLINE __m512 exp512(__m512 x) {
    x = _mm512_min_ps(x, _mm512_set1_ps(SG_EXP_MAX));
    x = _mm512_max_ps(x, _mm512_set1_ps(-SG_EXP_MAX));
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(SG_EXP_LOG2E), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(SG_EXP_LN2_HI), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(SG_EXP_LN2_LO), x);
    __m512 y = _mm512_set1_ps(SG_EXP_P0);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(SG_EXP_P1));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(SG_EXP_P2));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(SG_EXP_P3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(SG_EXP_P4));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(SG_EXP_P5));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(0x7f)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

/* simd_f32.h's exp_shifted, 16 keys per exp: the same terms, added in its order (8
 * lanes, lane l holding keys l, l + 8, ...; absent keys of the tail add exp(-inf) = 0),
 * then its reduction. */
static float exp_shifted_avx512(float *s, int64_t n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += LANES) {
        const __mmask16 part = n - k >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1u);
        const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), part, s + k);
        const __m512 e = exp512(_mm512_sub_ps(x, m));
        _mm512_mask_storeu_ps(s + k, part, e);
        sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
        sum = _mm256_add_ps(sum, _mm512_extractf32x8_ps(e, 1));
    }
    return hsum256(sum);
}

const sg_attend_kernels sg_attend_avx512 = {scores_avx512, values_avx512, max_avx512,
                                            exp_shifted_avx512, scores_avx512_f16,
                                            values_avx512_f16, INT64_MAX};
