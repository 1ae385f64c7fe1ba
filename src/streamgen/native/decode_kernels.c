/*
 * streamgen's native CPU decode path: the decoder layers of a Llama-family
 * model for a few decode tokens (one new token per sequence), in one call.
 *
 * Why: at batch 1 a decode step is ~120 matrix-vector products plus ~30
 * small tensor ops per layer. Through torch each small op costs a dispatch
 * (5-20 us), ~15 ms per step of SmolLM2, and a bf16 matrix-vector product
 * runs at half the memory bandwidth on CPUs without native bf16 units. Here a
 * step is one foreign call: the residual stream stays in float32, weights
 * and the KV cache stay in the model's dtype (float32 or bfloat16), and the
 * bf16 -> f32 widening happens in registers.
 *
 * Semantics are those of streamgen/model/llama.py with the torch reference
 * attention backend (HF "rotate_half" rope, bottom-right causal attention,
 * optional sliding window); tests/native/ checks every kernel against torch.
 *
 * Layouts (row-major, contiguous):
 *   linear weight   [out, in]                 (splits == 0)
 *                   [splits, in, out / splits] (splits >= 1: column slabs)
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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SG_AVX2 1
#else
#define SG_AVX2 0
#endif

enum { SG_F32 = 0, SG_BF16 = 1 };
enum { SG_OK = 0, SG_ENOMEM = -1, SG_EINVAL = -2 };

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

/* y[r, o] = sum_i w[o, i] x[r, i], w [out, in] bf16: four weight rows at a time, each
 * widened once per 8 columns and used for every input row while it sits in L1. */
static void gemv_rows_bf16(const uint16_t *w, const float *x, float *y, int64_t m, int64_t out,
                           int64_t in, int64_t y_stride) {
    int64_t o = 0;
#if SG_AVX2
    for (; o + 4 <= out; o += 4) {
        const uint16_t *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = x + r * in;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= in; i += 8) {
                __m256 xv = _mm256_loadu_ps(xr + i);
                a0 = _mm256_fmadd_ps(load8_bf16(w0 + i), xv, a0);
                a1 = _mm256_fmadd_ps(load8_bf16(w1 + i), xv, a1);
                a2 = _mm256_fmadd_ps(load8_bf16(w2 + i), xv, a2);
                a3 = _mm256_fmadd_ps(load8_bf16(w3 + i), xv, a3);
            }
            float s0 = hsum256(a0), s1 = hsum256(a1), s2 = hsum256(a2), s3 = hsum256(a3);
            for (; i < in; i++) {
                s0 += bf16_to_f32(w0[i]) * xr[i];
                s1 += bf16_to_f32(w1[i]) * xr[i];
                s2 += bf16_to_f32(w2[i]) * xr[i];
                s3 += bf16_to_f32(w3[i]) * xr[i];
            }
            float *yr = y + r * y_stride + o;
            yr[0] = s0, yr[1] = s1, yr[2] = s2, yr[3] = s3;
        }
    }
#endif
    for (; o < out; o++) {
        const uint16_t *wo = w + o * in;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = x + r * in;
            float s = 0.0f;
            for (int64_t i = 0; i < in; i++) s += bf16_to_f32(wo[i]) * xr[i];
            y[r * y_stride + o] = s;
        }
    }
}

static void gemv_rows_f32(const float *w, const float *x, float *y, int64_t m, int64_t out,
                          int64_t in, int64_t y_stride) {
    for (int64_t o = 0; o < out; o++)
        for (int64_t r = 0; r < m; r++) y[r * y_stride + o] = dot_f32(w + o * in, x + r * in, in);
}

/* y[r, 0..cols) = x[r] @ w, w [in, cols] (one column slab), by rows of w. */
static void gemv_cols(const void *w, int32_t dtype, const float *x, float *y, int64_t m,
                      int64_t cols, int64_t in, int64_t y_stride, float *row_buf) {
    for (int64_t r = 0; r < m; r++) memset(y + r * y_stride, 0, (size_t)cols * sizeof(float));
    for (int64_t i = 0; i < in; i++) {
        const float *wi;
        if (dtype == SG_F32) {
            wi = (const float *)w + i * cols;
        } else {
            load_row((const uint16_t *)w + i * cols, dtype, cols, row_buf);
            wi = row_buf;
        }
        for (int64_t r = 0; r < m; r++) axpy_f32(x[r * in + i], wi, y + r * y_stride, cols);
    }
}

/* y [m, out] = x [m, in] @ W^T + b. row_buf: >= out floats of scratch. */
static void linear_forward(const sg_linear *lin, const float *x, float *y, int64_t m, float *row_buf) {
    const int64_t out = lin->out_features, in = lin->in_features;
    if (lin->splits == 0) {
        if (lin->dtype == SG_BF16)
            gemv_rows_bf16((const uint16_t *)lin->weight, x, y, m, out, in, out);
        else
            gemv_rows_f32((const float *)lin->weight, x, y, m, out, in, out);
    } else {
        const int64_t cols = out / lin->splits;
        const size_t elem = lin->dtype == SG_BF16 ? 2 : 4;
        for (int64_t s = 0; s < lin->splits; s++) {
            const char *slab = (const char *)lin->weight + (size_t)(s * in * cols) * elem;
            gemv_cols(slab, lin->dtype, x, y + s * cols, m, cols, in, out, row_buf);
        }
    }
    if (lin->bias != NULL)
        for (int64_t r = 0; r < m; r++)
            for (int64_t o = 0; o < out; o++) y[r * out + o] += load_elem(lin->bias, lin->dtype, o);
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

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* ----- attention -------------------------------------------------------------------- */

/* The float32 row of KV head g at sequence position pos: the cache itself (float32)
 * or its widened copy in buf (bf16). */
static inline const float *cache_row(const void *cache, int32_t dt, const int64_t *table,
                                     int64_t pos, int64_t bs, int64_t kv_heads, int64_t g,
                                     int64_t D, float *buf) {
    const int64_t off = ((table[pos / bs] * bs + pos % bs) * kv_heads + g) * D;
    if (dt == SG_F32) return (const float *)cache + off;
    load_row((const uint16_t *)cache + off, dt, D, buf);
    return buf;
}

/* One decode token per sequence: rotate q and k, write k and v into the cache slot,
 * attend over the sequence's keys [start, seq_len). qkv [m, q_size + 2 kv_size] is
 * rotated in place; out [m, q_size]. scores: >= group * max_seq_len floats;
 * kbuf: >= head_dim floats. */
static void decode_attention(const sg_model *md, const sg_layer *ly, float *qkv, const float *cos_t,
                             const float *sin_t, const int64_t *slots, const int64_t *block_tables,
                             int64_t bt_stride, const int64_t *seq_lens, int64_t m, float *out,
                             float *scores, float *kbuf) {
    const int64_t D = md->head_dim, half = D / 2, H = md->num_heads, KVH = md->num_kv_heads;
    const int64_t group = H / KVH, bs = md->block_size, row = md->q_size + 2 * md->kv_size;
    const int32_t dt = md->dtype;
    for (int64_t b = 0; b < m; b++) {
        float *q = qkv + b * row, *k = q + md->q_size, *v = k + md->kv_size;
        const float *cb = cos_t + b * half, *sb = sin_t + b * half;
        for (int64_t h = 0; h < H; h++) rope_head(q + h * D, cb, sb, half);
        for (int64_t h = 0; h < KVH; h++) rope_head(k + h * D, cb, sb, half);
        const int64_t slot_base = slots[b] * KVH * D;
        for (int64_t i = 0; i < KVH * D; i++) {
            store_elem(ly->k_cache, dt, slot_base + i, k[i]);
            store_elem(ly->v_cache, dt, slot_base + i, v[i]);
        }
        const int64_t len = seq_lens[b];
        const int64_t start = (md->window > 0 && len > md->window) ? len - md->window : 0;
        const int64_t n = len - start;
        const int64_t *table = block_tables + b * bt_stride;
        for (int64_t g = 0; g < KVH; g++) {
            /* scores[j][h] for the group's heads, each key read once */
            for (int64_t j = 0; j < n; j++) {
                const float *kj = cache_row(ly->k_cache, dt, table, start + j, bs, KVH, g, D, kbuf);
                for (int64_t h = 0; h < group; h++)
                    scores[h * n + j] = dot_f32(q + (g * group + h) * D, kj, D) * md->scale;
            }
            for (int64_t h = 0; h < group; h++) {
                float *s = scores + h * n, mx = -INFINITY, sum = 0.0f;
                for (int64_t j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
                for (int64_t j = 0; j < n; j++) sum += (s[j] = expf(s[j] - mx));
                const float inv = 1.0f / sum;
                for (int64_t j = 0; j < n; j++) s[j] *= inv;
                memset(out + b * md->q_size + (g * group + h) * D, 0, (size_t)D * sizeof(float));
            }
            for (int64_t j = 0; j < n; j++) {
                const float *vj = cache_row(ly->v_cache, dt, table, start + j, bs, KVH, g, D, kbuf);
                for (int64_t h = 0; h < group; h++)
                    axpy_f32(scores[h * n + j], vj, out + b * md->q_size + (g * group + h) * D, D);
            }
        }
    }
}

/* ----- entry points ---------------------------------------------------------------- */

/* y [m, out] float32 = x [m, in] float32 @ W^T (+ b). */
int sg_linear_forward(const sg_linear *lin, const float *x, float *y, int64_t m) {
    if (lin->splits < 0 || (lin->splits > 0 && lin->out_features % lin->splits)) return SG_EINVAL;
    float *row_buf = (float *)malloc((size_t)lin->out_features * sizeof(float));
    if (row_buf == NULL) return SG_ENOMEM;
    linear_forward(lin, x, y, m, row_buf);
    free(row_buf);
    return SG_OK;
}

/* out [m, n] = rms_norm(x) * w (tests; the step fuses it). */
int sg_rms_norm(const float *x, const void *w, int32_t dtype, float *out, int64_t m, int64_t n,
                float eps) {
    rms_norm(x, w, dtype, out, m, n, eps);
    return SG_OK;
}

/* The decoder layers for m decode tokens (one per sequence):
 *   x [m, hidden] float32   the embeddings in, the residual stream out (before the final norm)
 *   cos_t, sin_t [m, head_dim / 2] float32, the rope angles of each token's position
 *   slots [m], block_tables [m, bt_stride], seq_lens [m] int64 (context after the token)
 *   final_norm: weight of the final norm; out [m, hidden] float32 = final_norm(x)
 */
int sg_decode_layers(const sg_model *md, const sg_layer *layers, int64_t num_layers, float *x,
                     int64_t m, const float *cos_t, const float *sin_t, const int64_t *slots,
                     const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens,
                     const void *final_norm, float *out) {
    if (md->num_kv_heads <= 0 || md->num_heads % md->num_kv_heads || md->head_dim % 2) return SG_EINVAL;
    int64_t max_len = 1;
    for (int64_t b = 0; b < m; b++) {
        if (seq_lens[b] < 1) return SG_EINVAL;
        max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    }
    const int64_t Hd = md->hidden, I = md->intermediate, row = md->q_size + 2 * md->kv_size;
    const int64_t group = md->num_heads / md->num_kv_heads;
    int64_t widest = 2 * I > row ? 2 * I : row;
    widest = widest > Hd ? widest : Hd;
    const size_t floats = (size_t)(m * Hd        /* normed */
                                   + m * row     /* qkv */
                                   + m * md->q_size /* attention out */
                                   + m * 2 * I   /* gate_up */
                                   + m * I       /* activation */
                                   + m * Hd      /* projection out */
                                   + group * max_len + md->head_dim + widest);
    float *arena = (float *)malloc(floats * sizeof(float));
    if (arena == NULL) return SG_ENOMEM;
    float *normed = arena, *qkv = normed + m * Hd, *attn = qkv + m * row, *gu = attn + m * md->q_size;
    float *act = gu + m * 2 * I, *proj = act + m * I, *scores = proj + m * Hd;
    float *kbuf = scores + group * max_len, *row_buf = kbuf + md->head_dim;
    for (int64_t l = 0; l < num_layers; l++) {
        const sg_layer *ly = layers + l;
        rms_norm(x, ly->input_norm, md->dtype, normed, m, Hd, md->eps);
        linear_forward(&ly->qkv, normed, qkv, m, row_buf);
        decode_attention(md, ly, qkv, cos_t, sin_t, slots, block_tables, bt_stride, seq_lens, m,
                         attn, scores, kbuf);
        linear_forward(&ly->o, attn, proj, m, row_buf);
        for (int64_t i = 0; i < m * Hd; i++) x[i] += proj[i];
        rms_norm(x, ly->post_norm, md->dtype, normed, m, Hd, md->eps);
        linear_forward(&ly->gate_up, normed, gu, m, row_buf);
        for (int64_t r = 0; r < m; r++)
            for (int64_t i = 0; i < I; i++) act[r * I + i] = silu(gu[r * 2 * I + i]) * gu[r * 2 * I + I + i];
        linear_forward(&ly->down, act, proj, m, row_buf);
        for (int64_t i = 0; i < m * Hd; i++) x[i] += proj[i];
    }
    rms_norm(x, final_norm, md->dtype, out, m, Hd, md->eps);
    free(arena);
    return SG_OK;
}

/* 1 when built with the AVX2 + FMA kernels, 0 for the scalar build. */
int sg_simd_level(void) { return SG_AVX2; }
