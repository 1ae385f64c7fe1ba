/*
 * float32 helpers shared by the dense step (decode_kernels.c) and attention
 * (attention.c): bf16 <-> f32, dot products, axpy and a vector exp. Both files are
 * compiled with -mavx2 -mfma where the CPU has them (build.py); the scalar fallbacks
 * serve the rest. Everything here is static inline: each file gets its own copy.
 */
#ifndef SG_SIMD_F32_H
#define SG_SIMD_F32_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dense_step.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SG_AVX2 1
#else
#define SG_AVX2 0
#endif
#if defined(__F16C__)
#include <immintrin.h>
#define SG_F16C 1
#else
#define SG_F16C 0
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* IEEE half <-> float32, round to nearest even (F16C where built for it, else the same
 * arithmetic in integers: subnormals, infinities and NaN included). */
static inline float f16_to_f32(uint16_t h) {
#if SG_F16C
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal: normalize */
        int e = -1;
        uint32_t m = man;
        do { m <<= 1; e++; } while (!(m & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

static inline uint16_t f32_to_f16(float f) {
#if SG_F16C
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u; /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* rounds to infinity */
    if (a < 0x38800000u) { /* subnormal or zero: the value times 2^24, rounded */
        if (a < 0x33000000u) return sign; /* below half the smallest subnormal */
        const uint32_t m = (a & 0x7fffffu) | 0x800000u, shift = 126u - (a >> 23);
        uint32_t q = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return sign | (uint16_t)q;
    }
    uint32_t q = a - 0x38000000u; /* rebias the exponent: 127 - 15 = 112 */
    q += 0xfffu + ((q >> 13) & 1u);
    return sign | (uint16_t)(q >> 13);
#endif
}

static inline float load_elem(const void *p, int32_t dtype, int64_t i) {
    if (dtype == SG_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    if (dtype == SG_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

static inline void store_elem(void *p, int32_t dtype, int64_t i, float v) {
    if (dtype == SG_BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else if (dtype == SG_F16)
        ((uint16_t *)p)[i] = f32_to_f16(v);
    else
        ((float *)p)[i] = v;
}

/* dst[0..n) = src[0..n) widened to float32 */
static inline void load_row(const void *src, int32_t dtype, int64_t n, float *dst) {
    if (dtype == SG_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    int64_t i = 0;
    if (dtype == SG_F16) {
#if SG_F16C
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < n; i++) dst[i] = f16_to_f32(s[i]);
        return;
    }
#if SG_AVX2
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(s + i));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; i < n; i++) dst[i] = bf16_to_f32(s[i]);
}

/* The vector exp's constants: range reduction x = n ln2 + r (ln2 in two parts), a
 * degree-6 polynomial for e^r (Cephes' expf coefficients). exp256 below and exp512
 * (attention_avx512.c) take the same steps at two widths, for the same bits. */
#define SG_EXP_MAX 88.3762626647949f
#define SG_EXP_LOG2E 1.44269504088896341f
#define SG_EXP_LN2_HI 0.693359375f
#define SG_EXP_LN2_LO -2.12194440e-4f
#define SG_EXP_P0 1.9875691500e-4f
#define SG_EXP_P1 1.3981999507e-3f
#define SG_EXP_P2 8.3334519073e-3f
#define SG_EXP_P3 4.1665795894e-2f
#define SG_EXP_P4 1.6666665459e-1f
#define SG_EXP_P5 5.0000001201e-1f

#if SG_AVX2
static inline float hsum256(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* exp(x) for 8 floats: range reduction x = n ln2 + r, a degree-6 polynomial for e^r
 * (Cephes' expf coefficients, ~2 ulp), 2^n through the exponent bits. exp(-inf) = 0. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(SG_EXP_MAX));
    x = _mm256_max_ps(x, _mm256_set1_ps(-SG_EXP_MAX));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(SG_EXP_LOG2E),
                                               _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(SG_EXP_LN2_HI), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(SG_EXP_LN2_LO), x);
    __m256 y = _mm256_set1_ps(SG_EXP_P0);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(SG_EXP_P1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(SG_EXP_P2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(SG_EXP_P3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(SG_EXP_P4));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(SG_EXP_P5));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(0x7f)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}
#endif

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if SG_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    s = hsum256(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[0..n) += a * x[0..n) */
static inline void axpy_f32(float a, const float *x, float *y, int64_t n) {
    int64_t i = 0;
#if SG_AVX2
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* max(s[0..n)), -inf for none. Exact in any order, so the lanes change nothing. */
static inline float max_f32(const float *s, int64_t n) {
    int64_t k = 0;
    float mx = -INFINITY;
#if SG_AVX2
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    for (; k + 8 <= n; k += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + k));
    float lanes[8];
    _mm256_storeu_ps(lanes, m8);
    for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
#endif
    for (; k < n; k++) mx = s[k] > mx ? s[k] : mx;
    return mx;
}

/* s[k] = exp(s[k] - mx) in place; returns their sum.
 * Batch invariance: a key's exp never depends on where it sits (the tail is padded with
 * -inf, exp = 0, instead of taking a scalar expf), and the sum goes by key position (8
 * lanes, lane l holding keys l, l + 8, ... in order, then one fixed reduction), so keys
 * that are invisible (exp exactly 0) or absent add exact zeros: a row gets the same bits
 * as a decode, inside a prefill chunk or a draft tree. */
static inline float exp_shifted(float *s, int64_t n, float mx) {
    int64_t k = 0;
#if SG_AVX2
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    for (; k + 8 <= n; k += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + k), m8));
        _mm256_storeu_ps(s + k, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    if (k < n) {
        float tail[8];
        for (int t = 0; t < 8; t++) tail[t] = k + t < n ? s[k + t] : -INFINITY;
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(tail), m8));
        _mm256_storeu_ps(tail, e);
        sum8 = _mm256_add_ps(sum8, e);
        for (int64_t t = 0; k + t < n; t++) s[k + t] = tail[t];
    }
    return hsum256(sum8);
#else
    float sum = 0.0f;
    for (; k < n; k++) sum += (s[k] = expf(s[k] - mx));
    return sum;
#endif
}

#endif
