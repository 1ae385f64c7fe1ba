/*
 * The linear layers of the native dense step (decode_kernels.c): y [m, out] = x [m, in] @
 * W^T + b for weights in [out, in] layout, float32 or bfloat16 (widened in registers), over
 * the few rows of a small step; quantized weights go on to the quantized core (qgemm.c).
 *
 * Register tiles: 8 weight rows streamed at once for one input row (plain decoding), 4
 * weight rows x 2 input rows otherwise, with the next weight block prefetched. Built with
 * -mavx2 -mfma where the CPU has them (build.py); the scalar loops serve the rest.
 */
#include <stdint.h>

#include "dense_step.h"
#include "simd_f32.h"

#if SG_AVX2
static inline __m256 load8(const void *w, int32_t dtype, int64_t i) {
    return dtype == SG_BF16 ? load8_bf16((const uint16_t *)w + i) : _mm256_loadu_ps((const float *)w + i);
}
#endif

/* y[r, o] = sum_i w[o, i] x[r, i] for weight rows [o0, o0 + 4) and input rows [r0, r0 + 2):
 * 4 x 2 accumulators, each weight vector loaded (and widened) once per pair of rows.
 * Inlined with a constant dtype, so the loop has no branch. */
static inline __attribute__((always_inline)) void gemm_tile_4x2(
    const void *w, int32_t dtype, const float *x, float *y, int64_t o0, int64_t r0, int nr,
    int64_t in, int64_t out, int prefetch_next) {
    const size_t elem = dtype == SG_BF16 ? 2 : 4;
    const char *w0 = (const char *)w + (size_t)(o0 * in) * elem;
    const char *w1 = w0 + (size_t)in * elem, *w2 = w1 + (size_t)in * elem, *w3 = w2 + (size_t)in * elem;
    const float *x0 = x + r0 * in, *x1 = nr > 1 ? x0 + in : x0;
    float s[4][2] = {{0}};
    int64_t i = 0;
#if SG_AVX2
    __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a10 = _mm256_setzero_ps();
    __m256 a11 = _mm256_setzero_ps(), a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps();
    __m256 a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
    /* The first tile of a weight block streams it from memory: fetch the next block
     * meanwhile, so the later tiles (from L1) overlap with that stream. */
    const char *next = w3 + (size_t)in * elem;
    for (; i + 8 <= in; i += 8) {
        if (prefetch_next) {
            const size_t off = (size_t)i * elem;
            _mm_prefetch(next + off, _MM_HINT_T0);
            _mm_prefetch(next + (size_t)in * elem + off, _MM_HINT_T0);
            _mm_prefetch(next + 2 * (size_t)in * elem + off, _MM_HINT_T0);
            _mm_prefetch(next + 3 * (size_t)in * elem + off, _MM_HINT_T0);
        }
        const __m256 v0 = load8(w0, dtype, i), v1 = load8(w1, dtype, i);
        const __m256 v2 = load8(w2, dtype, i), v3 = load8(w3, dtype, i);
        const __m256 xa = _mm256_loadu_ps(x0 + i);
        a00 = _mm256_fmadd_ps(v0, xa, a00), a10 = _mm256_fmadd_ps(v1, xa, a10);
        a20 = _mm256_fmadd_ps(v2, xa, a20), a30 = _mm256_fmadd_ps(v3, xa, a30);
        if (nr > 1) { /* constant after inlining */
            const __m256 xb = _mm256_loadu_ps(x1 + i);
            a01 = _mm256_fmadd_ps(v0, xb, a01), a11 = _mm256_fmadd_ps(v1, xb, a11);
            a21 = _mm256_fmadd_ps(v2, xb, a21), a31 = _mm256_fmadd_ps(v3, xb, a31);
        }
    }
    s[0][0] = hsum256(a00), s[0][1] = hsum256(a01), s[1][0] = hsum256(a10), s[1][1] = hsum256(a11);
    s[2][0] = hsum256(a20), s[2][1] = hsum256(a21), s[3][0] = hsum256(a30), s[3][1] = hsum256(a31);
#endif
    const void *rows[4] = {w0, w1, w2, w3};
    for (; i < in; i++)
        for (int k = 0; k < 4; k++) {
            const float wv = load_elem(rows[k], dtype, i);
            s[k][0] += wv * x0[i];
            s[k][1] += wv * x1[i];
        }
    for (int k = 0; k < 4; k++) {
        y[r0 * out + o0 + k] = s[k][0];
        if (nr > 1) y[(r0 + 1) * out + o0 + k] = s[k][1];
    }
}

/* y[r, o0 .. o0 + 8) for one input row: 8 weight rows streamed at once (memory-level
 * parallelism for the matrix-vector product of plain decoding). */
static inline __attribute__((always_inline)) void gemv_tile_8(
    const void *w, int32_t dtype, const float *x, float *y, int64_t o0, int64_t in) {
    const size_t elem = dtype == SG_BF16 ? 2 : 4;
    const char *rows[8];
    for (int k = 0; k < 8; k++) rows[k] = (const char *)w + (size_t)((o0 + k) * in) * elem;
    float s[8] = {0};
    int64_t i = 0;
#if SG_AVX2
    __m256 acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
    for (; i + 8 <= in; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        for (int k = 0; k < 8; k++) acc[k] = _mm256_fmadd_ps(load8(rows[k], dtype, i), xv, acc[k]);
    }
    for (int k = 0; k < 8; k++) s[k] = hsum256(acc[k]);
#endif
    for (; i < in; i++)
        for (int k = 0; k < 8; k++) s[k] += load_elem(rows[k], dtype, i) * x[i];
    for (int k = 0; k < 8; k++) y[o0 + k] = s[k];
}

/* y[r, o] for one weight row o and input rows [r0, r1): the remainder tiles. */
static inline __attribute__((always_inline)) void gemm_row(
    const void *w, int32_t dtype, const float *x, float *y, int64_t o, int64_t r0, int64_t r1,
    int64_t in, int64_t out) {
    const size_t elem = dtype == SG_BF16 ? 2 : 4;
    const char *wo = (const char *)w + (size_t)(o * in) * elem;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * in;
        float acc = 0.0f;
        int64_t i = 0;
#if SG_AVX2
        __m256 a = _mm256_setzero_ps();
        for (; i + 8 <= in; i += 8) a = _mm256_fmadd_ps(load8(wo, dtype, i), _mm256_loadu_ps(xr + i), a);
        acc = hsum256(a);
#endif
        for (; i < in; i++) acc += load_elem(wo, dtype, i) * xr[i];
        y[r * out + o] = acc;
    }
}

#define SG_GEMM_BODY(DTYPE)                                                                  \
    do {                                                                                     \
        if (m == 1) {                                                                        \
            int64_t o = 0;                                                                   \
            for (; o + 8 <= out; o += 8) gemv_tile_8(w, DTYPE, x, y, o, in);                 \
            for (; o < out; o++) gemm_row(w, DTYPE, x, y, o, 0, 1, in, out);                 \
            return;                                                                          \
        }                                                                                    \
        const int64_t pairs = m & ~(int64_t)1;                                               \
        int64_t o = 0;                                                                       \
        for (; o + 4 <= out; o += 4) {                                                       \
            const int pf = o + 8 <= out;                                                     \
            for (int64_t r = 0; r < pairs; r += 2)                                           \
                gemm_tile_4x2(w, DTYPE, x, y, o, r, 2, in, out, pf && r == 0);               \
            if (pairs < m) /* the odd last row */                                            \
                gemm_tile_4x2(w, DTYPE, x, y, o, pairs, 1, in, out, pf && pairs == 0);       \
        }                                                                                    \
        for (; o < out; o++) gemm_row(w, DTYPE, x, y, o, 0, m, in, out);                     \
    } while (0)

/* y [m, out] = x [m, in] @ W^T, W [out, in]. */
static void gemm_rows(const void *w, int32_t dtype, const float *x, float *y, int64_t m,
                      int64_t out, int64_t in) {
    if (dtype == SG_BF16)
        SG_GEMM_BODY(SG_BF16);
    else
        SG_GEMM_BODY(SG_F32);
}

/* y [m, out] = x [m, in] @ W^T + b; quantized weights go to the quantized core (qgemm.c),
 * which quantizes x once for all the parts of a fused layer. */
int sg_linear_rows(const sg_linear *lin, const float *x, float *y, int64_t m) {
    const int64_t out = lin->out_features;
    if (lin->dtype == SG_QUANT) return sg_qlinear_parts((const sg_qparts *)lin->weight, x, m, y, out);
    gemm_rows(lin->weight, lin->dtype, x, y, m, out, lin->in_features);
    if (lin->bias != NULL)
        for (int64_t r = 0; r < m; r++)
            for (int64_t o = 0; o < out; o++) y[r * out + o] += load_elem(lin->bias, lin->dtype, o);
    return SG_OK;
}

/* y [m, out] float32 = x [m, in] float32 @ W^T (+ b), W [out, in]. */
int sg_linear_forward(const sg_linear *lin, const float *x, float *y, int64_t m) {
    if (lin->splits != 0) return SG_EINVAL;
    return sg_linear_rows(lin, x, y, m);
}
