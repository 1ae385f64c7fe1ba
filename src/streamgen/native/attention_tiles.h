/*
 * The inner loops of attention (attention.c), over one KV head's keys of one cache block:
 * scores of several queries against several keys, and values accumulated into several
 * outputs, each key / value vector loaded once for all of them.
 *
 * Batch invariance: every score and every output element is computed with the same
 * arithmetic whatever the other queries of the tile are (missing queries and keys of a
 * short tile repeat the last one and are discarded), so a row gets the same bits alone,
 * among a batch, or in a draft tree.
 */
#ifndef SG_ATTENTION_TILES_H
#define SG_ATTENTION_TILES_H

#include <stdint.h>

#include "simd_f32.h"

enum { QK_QUERIES = 4, PV_OUTPUTS = 6 };

#if SG_AVX2
/* [a0 a1 a2 a3] -> their horizontal sums, each ((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7)). */
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#endif

#if SG_AVX2 && SG_F16C
/* Keys and values read as the cache holds them: 8 floats at element i of p, float32 or
 * float16 widened as it loads (F16: a constant after inlining; the same floats). */
static inline __attribute__((always_inline)) __m256 tile_load8(const void *p, int64_t i,
                                                               const int F16) {
    return F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
               : _mm256_loadu_ps((const float *)p + i);
}
#define SG_TILES_F16 1
#elif SG_AVX2
static inline __attribute__((always_inline)) __m256 tile_load8(const void *p, int64_t i,
                                                               const int F16) {
    (void)F16;
    return _mm256_loadu_ps((const float *)p + i);
}
#define SG_TILES_F16 0
#else
#define SG_TILES_F16 0
#endif

#if SG_AVX2
/* tile_dots' SIMD loop (D % 8 == 0) over float32 or float16 keys. */
static inline __attribute__((always_inline)) void tile_dots_simd(
    const float *const *q, int64_t nq, const void *kb, int64_t stride, int64_t count, int64_t D,
    float scale, float *s, int64_t s_stride, const int F16) {
    const float *q0 = q[0], *q1 = q[nq > 1 ? 1 : 0], *q2 = q[nq > 2 ? 2 : 0];
    const float *q3 = q[nq > 3 ? 3 : 0];
    for (int64_t k = 0; k < count; k += 2) {
        const int64_t k0 = k * stride, k1 = (k + 1 < count ? k + 1 : k) * stride;
        __m256 a00 = _mm256_setzero_ps(), a10 = a00, a20 = a00, a30 = a00;
        __m256 a01 = a00, a11 = a00, a21 = a00, a31 = a00;
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 x0 = tile_load8(kb, k0 + d, F16), x1 = tile_load8(kb, k1 + d, F16);
            const __m256 y0 = _mm256_loadu_ps(q0 + d), y1 = _mm256_loadu_ps(q1 + d);
            const __m256 y2 = _mm256_loadu_ps(q2 + d), y3 = _mm256_loadu_ps(q3 + d);
            a00 = _mm256_fmadd_ps(y0, x0, a00), a01 = _mm256_fmadd_ps(y0, x1, a01);
            a10 = _mm256_fmadd_ps(y1, x0, a10), a11 = _mm256_fmadd_ps(y1, x1, a11);
            a20 = _mm256_fmadd_ps(y2, x0, a20), a21 = _mm256_fmadd_ps(y2, x1, a21);
            a30 = _mm256_fmadd_ps(y3, x0, a30), a31 = _mm256_fmadd_ps(y3, x1, a31);
        }
        float r0[4], r1[4];
        const __m128 sc = _mm_set1_ps(scale);
        _mm_storeu_ps(r0, _mm_mul_ps(hsum4(a00, a10, a20, a30), sc));
        _mm_storeu_ps(r1, _mm_mul_ps(hsum4(a01, a11, a21, a31), sc));
        for (int64_t j = 0; j < nq; j++) {
            s[j * s_stride + k] = r0[j];
            if (k + 1 < count) s[j * s_stride + k + 1] = r1[j];
        }
    }
}
#endif

/* s[j * s_stride + k] = scale * dot(q[j], key k) for j < nq queries (nq <= QK_QUERIES) and
 * the count keys at kb + k * stride. */
static inline void tile_dots(const float *const *q, int64_t nq, const float *kb, int64_t stride,
                             int64_t count, int64_t D, float scale, float *s, int64_t s_stride) {
#if SG_AVX2
    if (D % 8 == 0) {
        tile_dots_simd(q, nq, kb, stride, count, D, scale, s, s_stride, 0);
        return;
    }
#endif
    for (int64_t j = 0; j < nq; j++)
        for (int64_t k = 0; k < count; k++)
            s[j * s_stride + k] = dot_f32(q[j], kb + k * stride, D) * scale;
}

#if SG_AVX2
/* NJ outputs (a compile-time count after inlining), 16 dims at a time: o[j] += sum over
 * the keys, in order, of p[j][k] * v[k]. */
static inline __attribute__((always_inline)) void tile_values_avx2(
    const float *const *p, float *const *o, const int NJ, const void *vb, int64_t stride,
    int64_t count, int64_t D, const int F16) {
    for (int64_t d = 0; d < D; d += 16) {
        __m256 lo[PV_OUTPUTS], hi[PV_OUTPUTS];
        for (int j = 0; j < NJ; j++) lo[j] = _mm256_loadu_ps(o[j] + d), hi[j] = _mm256_loadu_ps(o[j] + d + 8);
        for (int64_t k = 0; k < count; k++) {
            const __m256 v0 = tile_load8(vb, k * stride + d, F16);
            const __m256 v1 = tile_load8(vb, k * stride + d + 8, F16);
            for (int j = 0; j < NJ; j++) {
                const __m256 pk = _mm256_broadcast_ss(p[j] + k);
                lo[j] = _mm256_fmadd_ps(pk, v0, lo[j]);
                hi[j] = _mm256_fmadd_ps(pk, v1, hi[j]);
            }
        }
        for (int j = 0; j < NJ; j++) _mm256_storeu_ps(o[j] + d, lo[j]), _mm256_storeu_ps(o[j] + d + 8, hi[j]);
    }
}

/* tile_values' SIMD loop (D % 16 == 0) over float32 or float16 values. */
static inline __attribute__((always_inline)) void tile_values_simd(
    const float *const *p, float *const *o, int64_t nj, const void *vb, int64_t stride,
    int64_t count, int64_t D, const int F16) {
    switch (nj) {
    case 1: tile_values_avx2(p, o, 1, vb, stride, count, D, F16); return;
    case 2: tile_values_avx2(p, o, 2, vb, stride, count, D, F16); return;
    case 3: tile_values_avx2(p, o, 3, vb, stride, count, D, F16); return;
    case 4: tile_values_avx2(p, o, 4, vb, stride, count, D, F16); return;
    case 5: tile_values_avx2(p, o, 5, vb, stride, count, D, F16); return;
    default: tile_values_avx2(p, o, 6, vb, stride, count, D, F16); return;
    }
}
#endif

/* o[j][0..D) += sum over k < count of p[j][k] * v[k * stride + 0..D) for j < nj outputs
 * (nj <= PV_OUTPUTS), each value vector loaded once for all of them. */
static inline void tile_values(const float *const *p, float *const *o, int64_t nj, const float *vb,
                               int64_t stride, int64_t count, int64_t D) {
#if SG_AVX2
    if (D % 16 == 0) {
        tile_values_simd(p, o, nj, vb, stride, count, D, 0);
        return;
    }
#endif
    for (int64_t j = 0; j < nj; j++)
        for (int64_t k = 0; k < count; k++) axpy_f32(p[j][k], vb + k * stride, o[j], D);
}

#endif
