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
 * Linear layers live in dense_linear.c (a quantized model's go on to the quantized core,
 * qgemm.c), attention in attention.c, the shared float32 helpers in simd_f32.h, the types
 * in dense_step.h.
 *
 * Semantics are those of streamgen/model/llama.py with the torch reference
 * attention backend (HF "rotate_half" rope, bottom-right causal attention,
 * optional sliding window); tests/native/ checks every kernel against torch.
 *
 * Reentrant (no globals); a quantized model's steps run on its worker pool. Built by streamgen/native/build.py
 * with -mavx2 -mfma where the CPU has them; a scalar path serves the rest.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dense_step.h"
#include "simd_f32.h"
#include "thread_pool.h"

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

/* HF rotate_half on one head's first 2 * half dims (the rest, if any, pass through):
 * x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin. */
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

/* out = gelu_tanh(gate) * up, gelu_tanh(g) = g / 2 * (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))
 * (torch's approximate="tanh"), tanh(t) = 1 - 2 / (exp(2 t) + 1). */
static void gelu_tanh_mul(const float *gate, const float *up, float *out, int64_t n) {
    const float c = 0.7978845608028654f, k = 0.044715f;
    int64_t i = 0;
#if SG_AVX2
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 t = _mm256_mul_ps(_mm256_set1_ps(c),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(k), g), _mm256_mul_ps(g, g), g));
        const __m256 th = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp256(_mm256_add_ps(t, t)), one)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, th)),
                                                _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) {
        const float g = gate[i], t = c * (g + k * g * g * g);
        out[i] = 0.5f * g * (1.0f + tanhf(t)) * up[i];
    }
}

/* out = act(gate) * up with the model's gate activation (SwiGLU or GeGLU). */
static void gate_mul(const sg_model *md, const float *gate, const float *up, float *out, int64_t n) {
    if (md->activation == SG_ACT_GELU_TANH) gelu_tanh_mul(gate, up, out, n);
    else silu_mul(gate, up, out, n);
}

/* ----- quantized layer inputs, quantized as they are made ---------------------------- */

/* A quantized layer's input is never written out in float: each 32-input block of the
 * input norm's output (x_r * inv_r * w) or of the gated MLP's (act(gate) * up) is made in a
 * stack buffer, with the arithmetic of rms_norm / gate_mul, and quantized there by the
 * context's quantizer. The values are those of quantizing the finished rows. */
enum { FUSE_NORM, FUSE_GATED };

typedef struct {
    int kind;
    const sg_model *md;
    const float *x;  /* [m, n] (norm) or the gate_up rows [m, 2n] (gated MLP) */
    const void *w;   /* the norm's weight */
    int64_t m, n, blocks_per_task; /* a task: that many of the m x n / 32 blocks, row-major */
    sg_qact *a;
    sg_quantize_fn quantize;
} fused_input_job;

static void fused_input_blocks(void *ctx, int64_t task) {
    const fused_input_job *job = (const fused_input_job *)ctx;
    const int64_t n = job->n, blocks = n / SG_QBLOCK, b0 = task * job->blocks_per_task;
    const int64_t b1 = b0 + job->blocks_per_task < job->m * blocks ? b0 + job->blocks_per_task
                                                                   : job->m * blocks;
    sg_qact *a = job->a;
    for (int64_t b = b0; b < b1;) {
        const int64_t r = b / blocks, end = (r + 1) * blocks < b1 ? (r + 1) * blocks : b1;
        const float *xr = job->kind == FUSE_NORM ? job->x + r * n : job->x + r * 2 * n;
        /* each task of a row computes its norm whole: the same value in every task */
        const float inv = job->kind == FUSE_NORM
                              ? 1.0f / sqrtf(dot_f32(xr, xr, n) / (float)n + job->md->eps)
                              : 0.0f;
        for (; b < end; b++) {
            const int64_t blk = b % blocks, i0 = blk * SG_QBLOCK;
            float v[SG_QBLOCK];
            if (job->kind == FUSE_NORM)
                for (int k = 0; k < SG_QBLOCK; k++) v[k] = xr[i0 + k] * inv * load_elem(job->w, job->md->dtype, i0 + k);
            else
                gate_mul(job->md, xr + i0, xr + n + i0, v, SG_QBLOCK);
            sg_qact block = {a->q + r * n + i0, a->d + r * blocks + blk, a->s16 + r * (n / 16) + 2 * blk,
                             a->ds + r * blocks + blk, 1, SG_QBLOCK, 0};
            job->quantize(v, 1, SG_QBLOCK, &block);
        }
    }
}

/* Inputs of fewer values than this are made on the calling thread (a decode's: a pool
 * call costs more than they do). */
enum { FUSED_POOL_VALUES = 4096 };

/* a = the quantized input of m rows of n: its blocks split over the pool for big steps
 * (a draft tree's 8 rows already), which changes no value. */
static void fused_input(int kind, const sg_model *md, const float *x, const void *w, int64_t m,
                        int64_t n, sg_qact *a) {
    sg_pool *pool = md->qctx->pool;
    const int64_t total = m * (n / SG_QBLOCK);
    const int64_t tasks = pool && m * n >= FUSED_POOL_VALUES ? sg_pool_threads(pool) * 2 : 1;
    fused_input_job job = {kind, md, x, w, m, n, (total + tasks - 1) / tasks, a,
                           sg_qctx_quantizer(md->qctx)};
    const int64_t count = (total + job.blocks_per_task - 1) / job.blocks_per_task;
    if (count > 1) sg_pool_run(pool, fused_input_blocks, &job, count);
    else fused_input_blocks(&job, 0);
    a->m = m, a->in = n, a->pairs = 0;
}

/* Whether lin takes its n inputs quantized as they are made, into a: a quantized layer
 * with one int8 rounding (two, residual, quantize the finished rows). */
static int fuses_input(const sg_linear *lin, const sg_qact *a, int64_t n) {
    if (lin->dtype != SG_QUANT || a->q == NULL) return 0;
    const sg_qparts *p = (const sg_qparts *)lin->weight;
    return !p->residual && p->count > 0 && p->parts[0].in_features == n;
}

/* y = lin(rms_norm(x) * w): fused for quantized layers (a: their activation buffer), else
 * through normed [m, n]. */
static int norm_linear(const sg_model *md, const sg_linear *lin, const float *x, const void *w,
                       int64_t m, float *normed, sg_qact *a, float *y) {
    if (fuses_input(lin, a, md->hidden) && md->dtype == SG_F32) {
        fused_input(FUSE_NORM, md, x, w, m, md->hidden, a);
        return sg_qgemm_parts((const sg_qparts *)lin->weight, a, y, lin->out_features);
    }
    rms_norm(x, w, md->dtype, normed, m, md->hidden, md->eps);
    return sg_linear_rows(lin, normed, y, m);
}

/* y = lin(act(gate) * up), gu [m, 2 I]: fused likewise, else through act [m, I]. */
static int gated_linear(const sg_model *md, const sg_linear *lin, const float *gu, int64_t m,
                         float *act, sg_qact *a, float *y) {
    const int64_t I = md->intermediate;
    if (fuses_input(lin, a, I)) {
        fused_input(FUSE_GATED, md, gu, NULL, m, I, a);
        return sg_qgemm_parts((const sg_qparts *)lin->weight, a, y, lin->out_features);
    }
    for (int64_t r = 0; r < m; r++) gate_mul(md, gu + r * 2 * I, gu + r * 2 * I + I, act + r * I, I);
    return sg_linear_rows(lin, act, y, m);
}

/* ----- attention (the rest is in attention.c) ------------------------------------- */

/* Normalize q and k per head (where the layer has q/k norms), rotate them, write k and v
 * into the cache slots, attend. qkv [m, q_size + 2 kv_size] is changed in place; out
 * [m, q_size]. */
static int attention(const sg_model *md, const sg_layer *ly, const sg_step *st, float *qkv,
                     int64_t m, float *out) {
    const float *cos_t = ly->local_rope ? st->local_cos : st->cos_t;
    const float *sin_t = ly->local_rope ? st->local_sin : st->sin_t;
    const int64_t D = md->head_dim, half = md->rotary_dim / 2, H = md->num_heads;
    const int64_t KVH = md->num_kv_heads;
    const int64_t row = md->q_size + 2 * md->kv_size;
    for (int64_t r = 0; r < m; r++) {
        float *q = qkv + r * row, *k = q + md->q_size, *v = k + md->kv_size;
        const float *cb = cos_t + r * half, *sb = sin_t + r * half;
        /* in place: per head (Qwen3) or over the whole projection (OLMo 2) */
        const int64_t qn = md->qk_norm_whole ? 1 : H, kn = md->qk_norm_whole ? 1 : KVH;
        if (ly->q_norm) rms_norm(q, ly->q_norm, md->dtype, q, qn, H * D / qn, md->eps);
        if (ly->k_norm) rms_norm(k, ly->k_norm, md->dtype, k, kn, KVH * D / kn, md->eps);
        for (int64_t h = 0; h < H; h++) rope_head(q + h * D, cb, sb, half);
        for (int64_t h = 0; h < KVH; h++) rope_head(k + h * D, cb, sb, half);
        const int64_t base = st->slots[r] * KVH * D;
        for (int64_t i = 0; i < KVH * D; i++) {
            store_elem(ly->k_cache, md->kv_dtype, base + i, k[i]);
            store_elem(ly->v_cache, md->kv_dtype, base + i, v[i]);
        }
    }
    return sg_attend(md, ly->window, ly->k_cache, ly->v_cache, st, qkv, row, out, md->q_size);
}

/* ----- entry points ---------------------------------------------------------------- */

/* out [m, n] = rms_norm(x) * w (tests; the step fuses it). */
int sg_rms_norm(const float *x, const void *w, int32_t dtype, float *out, int64_t m, int64_t n,
                float eps) {
    rms_norm(x, w, dtype, out, m, n, eps);
    return SG_OK;
}

/* The decoder layers over the m rows of a small step: decodes, prefill chunks and
 * draft trees of several sequences, rows in sequence order.
 *   x [m, hidden] float32      the embeddings in, the residual stream out
 *   cos_t, sin_t [m, rotary_dim / 2] float32, the rope angles of each row's position
 *   local_cos, local_sin: the same for the layers with local_rope (Gemma 3's sliding
 *       layers: their own rope base), or NULL where no layer has it
 *   slots [m] int64            the cache slot each row's K/V goes to
 *   query_start [num_seqs + 1] int64, seq_lens [num_seqs] int64 (context after the step),
 *   block_tables [num_seqs, bt_stride] int64
 *   tree_mask [m, tree_stride] uint8 or NULL: row r sees the j-th token of its own chunk
 *       (NULL: causal); the chunk's tokens sit at cache positions seq_len - q_len + j, and
 *       a layer's window counts back from a tree row's depth (attention.c)
 *   final_norm: weight of the final norm; out [m, hidden] float32 = final_norm(x)
 * All weights in [out, in] layout (splits == 0).
 */
int sg_forward_layers(const sg_model *md, const sg_layer *layers, int64_t num_layers, float *x,
                      int64_t m, const float *cos_t, const float *sin_t, const float *local_cos,
                      const float *local_sin, const int64_t *slots,
                      int64_t num_seqs, const int64_t *query_start, const int64_t *seq_lens,
                      const int64_t *block_tables, int64_t bt_stride, const uint8_t *tree_mask,
                      int64_t tree_stride, const void *final_norm, float *out) {
    const int rc = sg_check_step(md, m, num_seqs, query_start, seq_lens, tree_mask, tree_stride);
    if (rc != SG_OK) return rc;
    for (int64_t l = 0; l < num_layers; l++) {
        const sg_linear *lins[4] = {&layers[l].qkv, &layers[l].o, &layers[l].gate_up, &layers[l].down};
        for (int k = 0; k < 4; k++)
            if (lins[k]->splits != 0) return SG_EINVAL;
    }
    for (int64_t l = 0; l < num_layers; l++)
        if (layers[l].local_rope && (local_cos == NULL || local_sin == NULL)) return SG_EINVAL;
    const sg_step st = {cos_t, sin_t, slots, query_start, seq_lens, block_tables,
                        num_seqs, bt_stride, tree_mask, tree_stride, local_cos, local_sin};
    const int64_t Hd = md->hidden, I = md->intermediate, row = md->q_size + 2 * md->kv_size;
    const size_t floats = (size_t)(m * Hd           /* normed */
                                   + m * row        /* qkv */
                                   + m * md->q_size /* attention out */
                                   + m * 2 * I      /* gate_up */
                                   + m * I          /* activation */
                                   + m * Hd);       /* projection out */
    float *arena = (float *)malloc(floats * sizeof(float));
    /* the quantized layers' activations, reused by every layer (none for dense models) */
    sg_qact aq = {0};
    const int quantized = md->qctx != NULL && md->fuse_inputs;
    if (arena == NULL || (quantized && sg_qact_alloc(&aq, m, Hd > I ? Hd : I) != SG_OK)) {
        free(arena);
        sg_qact_free(&aq);
        return SG_ENOMEM;
    }
    float *normed = arena, *qkv = normed + m * Hd, *attn = qkv + m * row, *gu = attn + m * md->q_size;
    float *act = gu + m * 2 * I, *proj = act + m * I;
    for (int64_t l = 0; l < num_layers; l++) {
        const sg_layer *ly = layers + l;
        int lrc = SG_OK;
        const void *const *norms = ly->norms; /* by role; NULL: none there */
        if (norms[SG_ATTN_IN]) lrc |= norm_linear(md, &ly->qkv, x, norms[SG_ATTN_IN], m, normed, &aq, qkv);
        else lrc |= sg_linear_rows(&ly->qkv, x, qkv, m);
        lrc |= attention(md, ly, &st, qkv, m, attn);
        lrc |= sg_linear_rows(&ly->o, attn, proj, m);
        if (norms[SG_ATTN_OUT]) rms_norm(proj, norms[SG_ATTN_OUT], md->dtype, proj, m, Hd, md->eps);
        for (int64_t i = 0; i < m * Hd; i++) x[i] += md->residual_scale * proj[i];
        if (norms[SG_MLP_IN]) lrc |= norm_linear(md, &ly->gate_up, x, norms[SG_MLP_IN], m, normed, &aq, gu);
        else lrc |= sg_linear_rows(&ly->gate_up, x, gu, m);
        lrc |= gated_linear(md, &ly->down, gu, m, act, &aq, proj);
        if (norms[SG_MLP_OUT]) rms_norm(proj, norms[SG_MLP_OUT], md->dtype, proj, m, Hd, md->eps);
        for (int64_t i = 0; i < m * Hd; i++) x[i] += md->residual_scale * proj[i];
        if (lrc != SG_OK) {
            free(arena);
            sg_qact_free(&aq);
            return SG_EINVAL;
        }
    }
    rms_norm(x, final_norm, md->dtype, out, m, Hd, md->eps);
    free(arena);
    sg_qact_free(&aq);
    return SG_OK;
}

/* 1 when built with the AVX2 + FMA kernels, 0 for the scalar build. */
int sg_simd_level(void) { return SG_AVX2; }
