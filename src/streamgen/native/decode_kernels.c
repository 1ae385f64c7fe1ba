/*
 * streamgen's native CPU path for small steps: the decoder layers of a
 * Llama-family model over a few rows (decodes, short chunks, draft trees), in one call.
 *
 * Why: at batch 1 a decode step is ~120 matrix-vector products plus ~30
 * small tensor ops per layer. Through torch each small op costs a dispatch
 * (5-20 us), ~15 ms per step of SmolLM2, and a bf16 matrix-vector product
 * runs at half the memory bandwidth on CPUs without native bf16 units. Here a
 * step is one foreign call: the residual stream stays in float32, weights
 * and the KV cache stay in the model's dtype (float32 or bfloat16), and the
 * bf16 -> f32 widening happens in registers.
 *
 * sg_paged_attention is the same attention on its own, for the torch path's larger steps
 * (attention/native.py): it reads the paged cache in place, where the torch reference
 * gathers every sequence's blocks, padded to the longest, in every layer.
 *
 * Semantics are those of streamgen/model/llama.py with the torch reference
 * attention backend (HF "rotate_half" rope, bottom-right causal attention,
 * optional sliding window); tests/native/ checks every kernel against torch.
 *
 * Layouts (row-major, contiguous):
 *   linear weight   [out, in]   (the loader keeps this layout where the kernels are used)
 *   KV cache        [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables    [num_seqs, bt_stride] int64
 *
 * Single-threaded and reentrant (no globals). Built by streamgen/native/build.py
 * with -mavx2 -mfma where the CPU has them; a scalar path serves the rest.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_layout.h"
#include "thread_pool.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SG_AVX2 1
#else
#define SG_AVX2 0
#endif

enum { SG_F32 = 0, SG_BF16 = 1, SG_QUANT = 2 }; /* SG_QUANT: weight is an sg_qparts */
enum { SG_OK = 0, SG_ENOMEM = -1, SG_EINVAL = -2 };
enum { ATTEND_ROWS = 32 }; /* rows of one sequence whose scores are held at once */

typedef struct {
    const void *weight;
    const void *bias; /* NULL: no bias; same dtype as weight */
    int32_t dtype;
    int32_t splits; /* 0: [out, in]; S >= 1: [S, in, out / S] */
    int64_t out_features;
    int64_t in_features;
} sg_linear;

typedef struct {
    sg_linear qkv, o, gate_up, down;
    const void *input_norm;
    const void *post_norm;
    void *k_cache;
    void *v_cache;
} sg_layer;

typedef struct {
    int64_t hidden, q_size, kv_size, intermediate;
    int64_t num_heads, num_kv_heads, head_dim, block_size;
    int64_t window; /* 0: none */
    float eps, scale;
    int32_t dtype; /* norm weights and KV cache */
    int32_t _pad;
    const sg_qctx *qctx; /* a quantized model's kernel context (its pool); NULL: serial */
} sg_model;

/* ----- scalar helpers ------------------------------------------------------------ */
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

static inline float load_elem(const void *p, int32_t dtype, int64_t i) {
    return dtype == SG_BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_elem(void *p, int32_t dtype, int64_t i, float v) {
    if (dtype == SG_BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* dst[0..n) = src[0..n) widened to float32 */
static void load_row(const void *src, int32_t dtype, int64_t n, float *dst) {
    if (dtype == SG_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    int64_t i = 0;
#if SG_AVX2
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(s + i));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; i < n; i++) dst[i] = bf16_to_f32(s[i]);
}

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
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                               _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
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

/* ----- linear layers ------------------------------------------------------------- */

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
static int linear_forward(const sg_linear *lin, const float *x, float *y, int64_t m) {
    const int64_t out = lin->out_features;
    if (lin->dtype == SG_QUANT) return sg_qlinear_parts((const sg_qparts *)lin->weight, x, m, y, out);
    gemm_rows(lin->weight, lin->dtype, x, y, m, out, lin->in_features);
    if (lin->bias != NULL)
        for (int64_t r = 0; r < m; r++)
            for (int64_t o = 0; o < out; o++) y[r * out + o] += load_elem(lin->bias, lin->dtype, o);
    return SG_OK;
}

/* ----- small ops ------------------------------------------------------------------ */

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w */
static void rms_norm(const float *x, const void *w, int32_t dtype, float *out, int64_t m,
                     int64_t n, float eps) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * n;
        float *orow = out + r * n;
        float inv = 1.0f / sqrtf(dot_f32(xr, xr, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) orow[i] = xr[i] * inv * load_elem(w, dtype, i);
    }
}

/* HF rotate_half on one head: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin. */
static void rope_head(float *x, const float *cos_t, const float *sin_t, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos_t[i] - x2 * sin_t[i];
        x[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
    }
}

/* out = silu(gate) * up */
static void silu_mul(const float *gate, const float *up, float *out, int64_t n) {
    int64_t i = 0;
#if SG_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                                _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* s[k] = exp(s[k] - mx) in place; returns their sum.
 * Batch invariance: a key's exp never depends on where it sits (the tail is padded with
 * -inf, exp = 0, instead of taking a scalar expf), and the sum runs key by key in order,
 * so keys that are invisible (exp exactly 0) or absent change nothing: a row gets the
 * same bits as a decode, inside a prefill chunk or a draft tree. */
static float exp_shifted(float *s, int64_t n, float mx) {
    int64_t k = 0;
#if SG_AVX2
    const __m256 m8 = _mm256_set1_ps(mx);
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(s + k, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + k), m8)));
    if (k < n) {
        float tail[8];
        for (int t = 0; t < 8; t++) tail[t] = k + t < n ? s[k + t] : -INFINITY;
        _mm256_storeu_ps(tail, exp256(_mm256_sub_ps(_mm256_loadu_ps(tail), m8)));
        for (int64_t t = 0; k + t < n; t++) s[k + t] = tail[t];
    }
#else
    for (; k < n; k++) s[k] = expf(s[k] - mx);
#endif
    float sum = 0.0f;
    for (k = 0; k < n; k++) sum += s[k];
    return sum;
}

/* ----- attention -------------------------------------------------------------------- */

/* The rows of one step (see sg_forward_layers for the arguments). */
typedef struct {
    const float *cos_t, *sin_t;
    const int64_t *slots, *query_start, *seq_lens, *block_tables;
    int64_t num_seqs, bt_stride;
    const uint8_t *tree_mask; /* [m, tree_stride] or NULL (causal) */
    int64_t tree_stride;
} sg_step;

/* Whether row i of a chunk (prefix keys before it) sees the key at position k. */
static inline int visible(const sg_model *md, const sg_step *st, int64_t row, int64_t i,
                          int64_t prefix, int64_t k) {
    const int64_t pos = prefix + i;
    if (md->window > 0 && k <= pos - md->window) return 0;
    if (k < prefix) return 1;
    const int64_t j = k - prefix; /* a token of the chunk itself */
    return st->tree_mask != NULL ? st->tree_mask[row * st->tree_stride + j] != 0 : j <= i;
}

/* The elems values at element offset off of a cache (a block's rows) as float32: the
 * cache itself (float32) or their widened copy in buf (bf16). */
static inline const float *cache_block(const void *cache, int32_t dt, int64_t off,
                                       int64_t elems, float *buf) {
    if (dt == SG_F32) return (const float *)cache + off;
    load_row((const uint16_t *)cache + off, dt, elems, buf);
    return buf;
}

/* s[k] = scale * dot(q, key k) for the count keys of one block (key k at kb[k * stride]),
 * four keys at a time with one combined horizontal sum. A block's last keys run the same
 * four-key code (the missing ones repeat its last key), so a key's score does not depend
 * on how full its block is: see exp_shifted on batch invariance. */
static inline void block_dots(const float *q, const float *kb, int64_t stride, int64_t count,
                              int64_t D, float scale, float *s) {
    int64_t k = 0;
#if SG_AVX2
    if (D % 8 == 0) {
        for (; k < count; k += 4) {
            const int64_t last = count - 1;
            const float *k0 = kb + k * stride;
            const float *k1 = kb + (k + 1 < last ? k + 1 : last) * stride;
            const float *k2 = kb + (k + 2 < last ? k + 2 : last) * stride;
            const float *k3 = kb + (k + 3 < last ? k + 3 : last) * stride;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
            }
            /* [a0 a1 a2 a3] partial sums per 128-bit lane, then the two lanes added */
            const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            float four[4];
            _mm_storeu_ps(four, _mm_mul_ps(sum, _mm_set1_ps(scale)));
            for (int64_t j = 0; j < 4 && k + j < count; j++) s[k + j] = four[j];
        }
        return;
    }
#endif
    for (; k < count; k++) s[k] = dot_f32(q, kb + k * stride, D) * scale;
}

/* o[0..D) += sum over k < count of p[k] * v[k * stride + 0..D): one query head's values
 * over one cache block, the accumulators held in registers across the block. */
static inline void accumulate_values(const float *p, const float *v, int64_t stride,
                                     int64_t count, float *o, int64_t D) {
    int64_t d = 0;
#if SG_AVX2
    for (; d + 32 <= D; d += 32) {
        __m256 a0 = _mm256_loadu_ps(o + d), a1 = _mm256_loadu_ps(o + d + 8);
        __m256 a2 = _mm256_loadu_ps(o + d + 16), a3 = _mm256_loadu_ps(o + d + 24);
        for (int64_t k = 0; k < count; k++) {
            const __m256 pk = _mm256_set1_ps(p[k]);
            const float *vk = v + k * stride + d;
            a0 = _mm256_fmadd_ps(pk, _mm256_loadu_ps(vk), a0);
            a1 = _mm256_fmadd_ps(pk, _mm256_loadu_ps(vk + 8), a1);
            a2 = _mm256_fmadd_ps(pk, _mm256_loadu_ps(vk + 16), a2);
            a3 = _mm256_fmadd_ps(pk, _mm256_loadu_ps(vk + 24), a3);
        }
        _mm256_storeu_ps(o + d, a0);
        _mm256_storeu_ps(o + d + 8, a1);
        _mm256_storeu_ps(o + d + 16, a2);
        _mm256_storeu_ps(o + d + 24, a3);
    }
#endif
    if (d < D)
        for (int64_t k = 0; k < count; k++)
            if (p[k] != 0.0f) axpy_f32(p[k], v + k * stride + d, o + d, D - d);
}

/* The arguments of one attention call, shared by its tiles. */
typedef struct {
    const sg_model *md;
    const void *k_cache, *v_cache;
    const sg_step *st;
    const float *q;
    int64_t q_stride;
    float *out;
    int64_t out_stride;
} attend_args;

/* Rows [i0, i0 + ATTEND_ROWS) of sequence b. scores: >= num_heads * ATTEND_ROWS * seq_len
 * floats; kbuf: >= block_size * num_kv_heads * head_dim floats (one block, widened from
 * bf16). Keys are walked block by block, each cached row (every KV head) read once for
 * all the rows and query heads of the tile: a block is one contiguous run of memory.
 * Every row is computed on its own (the tile changes no result). */
static void attend_tile(const attend_args *a, int64_t b, int64_t i0, float *scores, float *kbuf) {
    const sg_model *md = a->md;
    const sg_step *st = a->st;
    const int64_t D = md->head_dim, KVH = md->num_kv_heads, group = md->num_heads / KVH;
    const int64_t bs = md->block_size, row_elems = KVH * D;
    const int32_t dt = md->dtype;
    const int64_t seq_first = st->query_start[b], seq_q_len = st->query_start[b + 1] - seq_first;
    const int64_t n = st->seq_lens[b], prefix = n - seq_q_len;
    const int64_t *table = st->block_tables + b * st->bt_stride;
    const int64_t first = seq_first + i0;
    const int64_t q_len = seq_q_len - i0 < ATTEND_ROWS ? seq_q_len - i0 : ATTEND_ROWS;
    /* Causal: keys past the tile's last row are invisible to all its rows. Skipping them
     * changes no bit (they would add exact zeros), and halves a prefill's attention. */
    const int64_t last_key = prefix + i0 + q_len;
    const int64_t nv = st->tree_mask == NULL && last_key < n ? last_key : n;
    /* scores[(i * num_heads + h) * n + key]: row i, query head h */
    for (int64_t blk = 0, key = 0; key < nv; blk++) {
        const int64_t count = key + bs < nv ? bs : nv - key;
        const float *kb = cache_block(a->k_cache, dt, table[blk] * bs * row_elems,
                                      count * row_elems, kbuf);
        for (int64_t i = 0; i < q_len; i++) {
            float *sc = scores + i * md->num_heads * n + key;
            const float *qi = a->q + (first + i) * a->q_stride;
            for (int64_t h = 0; h < md->num_heads; h++)
                block_dots(qi + h * D, kb + (h / group) * D, row_elems, count, D, md->scale,
                           sc + h * n);
            for (int64_t k = 0; k < count; k++)
                if (!visible(md, st, first + i, i0 + i, prefix, key + k))
                    for (int64_t h = 0; h < md->num_heads; h++) sc[h * n + k] = -INFINITY;
        }
        key += count;
    }
    for (int64_t r = 0; r < q_len * md->num_heads; r++) {
        float *sc = scores + r * n, mx = -INFINITY;
        for (int64_t key = 0; key < nv; key++) mx = sc[key] > mx ? sc[key] : mx;
        const float inv = 1.0f / exp_shifted(sc, nv, mx);
        for (int64_t key = 0; key < nv; key++) sc[key] *= inv;
    }
    for (int64_t i = 0; i < q_len; i++)
        memset(a->out + (first + i) * a->out_stride, 0, (size_t)(md->num_heads * D) * sizeof(float));
    for (int64_t blk = 0, key = 0; key < nv; blk++) {
        const int64_t count = key + bs < nv ? bs : nv - key;
        const int64_t off = table[blk] * bs * row_elems;
        const float *vb = cache_block(a->v_cache, dt, off, count * row_elems, kbuf);
        for (int64_t i = 0; i < q_len; i++) {
            const float *sc = scores + i * md->num_heads * n + key;
            float *o = a->out + (first + i) * a->out_stride;
            for (int64_t h = 0; h < md->num_heads; h++)
                accumulate_values(sc + h * n, vb + (h / group) * D, row_elems, count, o + h * D, D);
        }
        key += count;
    }
}

typedef struct {
    const attend_args *args;
    const int64_t *tiles; /* [num_tiles, 2]: sequence, first row */
    _Atomic int failed;
} attend_job;

static void attend_task(void *ctx, int64_t t) {
    attend_job *job = (attend_job *)ctx;
    const sg_model *md = job->args->md;
    const int64_t b = job->tiles[2 * t], n = job->args->st->seq_lens[b];
    float *scores = (float *)malloc(sizeof(float) * (size_t)(md->num_heads * ATTEND_ROWS * n) + 1);
    float *kbuf = (float *)malloc(sizeof(float) * (size_t)(md->block_size * md->kv_size) + 1);
    if (scores && kbuf) attend_tile(job->args, b, job->tiles[2 * t + 1], scores, kbuf);
    else job->failed = 1;
    free(scores);
    free(kbuf);
}

/* Attend the m rows of a step. q [m, q_stride] holds each row's rotated query heads first;
 * out [m, out_stride] gets each row's num_heads * head_dim outputs. scores and kbuf: as
 * attend_tile's. With a worker pool (a quantized model's), the tiles of every sequence
 * run in parallel, each with scratch of its own. */
static int attend(const sg_model *md, const void *k_cache, const void *v_cache,
                  const sg_step *st, const float *q, int64_t q_stride, float *out,
                  int64_t out_stride, float *scores, float *kbuf) {
    const attend_args args = {md, k_cache, v_cache, st, q, q_stride, out, out_stride};
    int64_t num_tiles = 0;
    for (int64_t b = 0; b < st->num_seqs; b++)
        num_tiles += (st->query_start[b + 1] - st->query_start[b] + ATTEND_ROWS - 1) / ATTEND_ROWS;
    sg_pool *pool = md->qctx ? md->qctx->pool : NULL;
    if (!pool || sg_pool_threads(pool) < 2 || num_tiles < 2 || num_tiles > SG_POOL_MAX_TASKS) {
        for (int64_t b = 0; b < st->num_seqs; b++)
            for (int64_t i0 = 0; i0 < st->query_start[b + 1] - st->query_start[b]; i0 += ATTEND_ROWS)
                attend_tile(&args, b, i0, scores, kbuf);
        return SG_OK;
    }
    int64_t *tiles = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * num_tiles));
    if (!tiles) return SG_ENOMEM;
    int64_t t = 0;
    for (int64_t b = 0; b < st->num_seqs; b++)
        for (int64_t i0 = 0; i0 < st->query_start[b + 1] - st->query_start[b]; i0 += ATTEND_ROWS)
            tiles[2 * t] = b, tiles[2 * t + 1] = i0, t++;
    attend_job job = {&args, tiles, 0};
    sg_pool_run(pool, attend_task, &job, num_tiles);
    free(tiles);
    return job.failed ? SG_ENOMEM : SG_OK;
}

/* Rotate q and k, write k and v into the cache slots, attend. qkv [m, q_size + 2 kv_size]
 * is rotated in place; out [m, q_size]. */
static int attention(const sg_model *md, const sg_layer *ly, const sg_step *st, float *qkv,
                     int64_t m, float *out, float *scores, float *kbuf) {
    const int64_t D = md->head_dim, half = D / 2, H = md->num_heads, KVH = md->num_kv_heads;
    const int64_t row = md->q_size + 2 * md->kv_size;
    for (int64_t r = 0; r < m; r++) {
        float *q = qkv + r * row, *k = q + md->q_size, *v = k + md->kv_size;
        const float *cb = st->cos_t + r * half, *sb = st->sin_t + r * half;
        for (int64_t h = 0; h < H; h++) rope_head(q + h * D, cb, sb, half);
        for (int64_t h = 0; h < KVH; h++) rope_head(k + h * D, cb, sb, half);
        const int64_t base = st->slots[r] * KVH * D;
        for (int64_t i = 0; i < KVH * D; i++) {
            store_elem(ly->k_cache, md->dtype, base + i, k[i]);
            store_elem(ly->v_cache, md->dtype, base + i, v[i]);
        }
    }
    return attend(md, ly->k_cache, ly->v_cache, st, qkv, row, out, md->q_size, scores, kbuf);
}

/* Checks a step's layout; *max_cells = the largest min(q_len, ATTEND_ROWS) * seq_len. */
static int check_step(const sg_model *md, int64_t m, int64_t num_seqs, const int64_t *query_start,
                      const int64_t *seq_lens, const uint8_t *tree_mask, int64_t tree_stride,
                      int64_t *max_cells) {
    if (md->num_kv_heads <= 0 || md->num_heads % md->num_kv_heads || md->head_dim % 2) return SG_EINVAL;
    if (num_seqs < 1 || query_start[0] != 0 || query_start[num_seqs] != m) return SG_EINVAL;
    *max_cells = 1;
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t q_len = query_start[b + 1] - query_start[b];
        if (q_len < 1 || seq_lens[b] < q_len || (tree_mask != NULL && q_len > tree_stride))
            return SG_EINVAL;
        const int64_t rows = q_len < ATTEND_ROWS ? q_len : ATTEND_ROWS;
        *max_cells = rows * seq_lens[b] > *max_cells ? rows * seq_lens[b] : *max_cells;
    }
    return SG_OK;
}

/* ----- entry points ---------------------------------------------------------------- */

/* y [m, out] float32 = x [m, in] float32 @ W^T (+ b), W [out, in]. */
int sg_linear_forward(const sg_linear *lin, const float *x, float *y, int64_t m) {
    if (lin->splits != 0) return SG_EINVAL;
    return linear_forward(lin, x, y, m);
}

/* out [m, n] = rms_norm(x) * w (tests; the step fuses it). */
int sg_rms_norm(const float *x, const void *w, int32_t dtype, float *out, int64_t m, int64_t n,
                float eps) {
    rms_norm(x, w, dtype, out, m, n, eps);
    return SG_OK;
}

/* The decoder layers over the m rows of a small step: decodes, prefill chunks and
 * draft trees of several sequences, rows in sequence order.
 *   x [m, hidden] float32      the embeddings in, the residual stream out
 *   cos_t, sin_t [m, head_dim / 2] float32, the rope angles of each row's position
 *   slots [m] int64            the cache slot each row's K/V goes to
 *   query_start [num_seqs + 1] int64, seq_lens [num_seqs] int64 (context after the step),
 *   block_tables [num_seqs, bt_stride] int64
 *   tree_mask [m, tree_stride] uint8 or NULL: row r sees the j-th token of its own chunk
 *       (NULL: causal); the chunk's tokens sit at cache positions seq_len - q_len + j
 *   final_norm: weight of the final norm; out [m, hidden] float32 = final_norm(x)
 * All weights in [out, in] layout (splits == 0).
 */
int sg_forward_layers(const sg_model *md, const sg_layer *layers, int64_t num_layers, float *x,
                      int64_t m, const float *cos_t, const float *sin_t, const int64_t *slots,
                      int64_t num_seqs, const int64_t *query_start, const int64_t *seq_lens,
                      const int64_t *block_tables, int64_t bt_stride, const uint8_t *tree_mask,
                      int64_t tree_stride, const void *final_norm, float *out) {
    int64_t max_cells;
    const int rc = check_step(md, m, num_seqs, query_start, seq_lens, tree_mask, tree_stride, &max_cells);
    if (rc != SG_OK) return rc;
    for (int64_t l = 0; l < num_layers; l++) {
        const sg_linear *lins[4] = {&layers[l].qkv, &layers[l].o, &layers[l].gate_up, &layers[l].down};
        for (int k = 0; k < 4; k++)
            if (lins[k]->splits != 0) return SG_EINVAL;
    }
    const sg_step st = {cos_t, sin_t, slots, query_start, seq_lens, block_tables,
                        num_seqs, bt_stride, tree_mask, tree_stride};
    const int64_t Hd = md->hidden, I = md->intermediate, row = md->q_size + 2 * md->kv_size;
    const size_t floats = (size_t)(m * Hd           /* normed */
                                   + m * row        /* qkv */
                                   + m * md->q_size /* attention out */
                                   + m * 2 * I      /* gate_up */
                                   + m * I          /* activation */
                                   + m * Hd         /* projection out */
                                   + md->num_heads * max_cells + md->block_size * md->kv_size);
    float *arena = (float *)malloc(floats * sizeof(float));
    if (arena == NULL) return SG_ENOMEM;
    float *normed = arena, *qkv = normed + m * Hd, *attn = qkv + m * row, *gu = attn + m * md->q_size;
    float *act = gu + m * 2 * I, *proj = act + m * I, *scores = proj + m * Hd;
    float *kbuf = scores + md->num_heads * max_cells;
    for (int64_t l = 0; l < num_layers; l++) {
        const sg_layer *ly = layers + l;
        int lrc = SG_OK;
        rms_norm(x, ly->input_norm, md->dtype, normed, m, Hd, md->eps);
        lrc |= linear_forward(&ly->qkv, normed, qkv, m);
        lrc |= attention(md, ly, &st, qkv, m, attn, scores, kbuf);
        lrc |= linear_forward(&ly->o, attn, proj, m);
        for (int64_t i = 0; i < m * Hd; i++) x[i] += proj[i];
        rms_norm(x, ly->post_norm, md->dtype, normed, m, Hd, md->eps);
        lrc |= linear_forward(&ly->gate_up, normed, gu, m);
        for (int64_t r = 0; r < m; r++) silu_mul(gu + r * 2 * I, gu + r * 2 * I + I, act + r * I, I);
        lrc |= linear_forward(&ly->down, act, proj, m);
        for (int64_t i = 0; i < m * Hd; i++) x[i] += proj[i];
        if (lrc != SG_OK) {
            free(arena);
            return SG_EINVAL;
        }
    }
    rms_norm(x, final_norm, md->dtype, out, m, Hd, md->eps);
    free(arena);
    return SG_OK;
}

/* Paged attention of a step whose queries are already rotated and whose K/V are already
 * in the cache (the torch path's attention for decodes, short chunks and draft trees):
 *   q [m, num_heads * head_dim] float32, out [m, num_heads * head_dim] float32,
 *   k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] (md->dtype),
 *   the rest as in sg_forward_layers. Reads md's heads, head_dim, block_size, window,
 *   scale and dtype only.
 */
int sg_paged_attention(const sg_model *md, const void *k_cache, const void *v_cache,
                       const float *q, int64_t m, int64_t num_seqs, const int64_t *query_start,
                       const int64_t *seq_lens, const int64_t *block_tables, int64_t bt_stride,
                       const uint8_t *tree_mask, int64_t tree_stride, float *out) {
    int64_t max_cells;
    const int rc = check_step(md, m, num_seqs, query_start, seq_lens, tree_mask, tree_stride, &max_cells);
    if (rc != SG_OK) return rc;
    const sg_step st = {NULL, NULL, NULL, query_start, seq_lens, block_tables,
                        num_seqs, bt_stride, tree_mask, tree_stride};
    const int64_t heads = md->num_heads, width = heads * md->head_dim;
    float *scores = (float *)malloc(
        (size_t)(heads * max_cells + md->block_size * md->num_kv_heads * md->head_dim) *
        sizeof(float));
    if (scores == NULL) return SG_ENOMEM;
    const int arc = attend(md, k_cache, v_cache, &st, q, width, out, width, scores,
                           scores + heads * max_cells);
    free(scores);
    return arc;
}

/* 1 when built with the AVX2 + FMA kernels, 0 for the scalar build. */
int sg_simd_level(void) { return SG_AVX2; }
