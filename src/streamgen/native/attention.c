/*
 * Paged attention over the KV cache, in place: decodes, prefill chunks and draft trees
 * of several sequences (bottom-right causal, optional sliding window, or a tree mask).
 *
 * sg_attend serves the dense step (decode_kernels.c) and the quantized one;
 * sg_paged_attention is the same attention on its own, for the torch path's larger steps
 * (attention/native.py): it reads the paged cache in place, where the torch reference
 * gathers every sequence's blocks, padded to the longest, in every layer.
 *
 * Batch invariance: a row's result never depends on the other rows of its step or on how
 * full its blocks are (block_dots, exp_shifted), so a request gets the same tokens alone,
 * in a batch, or as a row of a draft tree. Tiles of ATTEND_ROWS rows run on the worker
 * pool of a quantized model.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dense_step.h"
#include "simd_f32.h"
#include "thread_pool.h"

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

/* With a worker pool (a quantized model's), the tiles of every sequence run in parallel,
 * each with scratch of its own. */
int sg_attend(const sg_model *md, const void *k_cache, const void *v_cache,
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

int sg_check_step(const sg_model *md, int64_t m, int64_t num_seqs, const int64_t *query_start,
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
    const int rc = sg_check_step(md, m, num_seqs, query_start, seq_lens, tree_mask, tree_stride, &max_cells);
    if (rc != SG_OK) return rc;
    const sg_step st = {NULL, NULL, NULL, query_start, seq_lens, block_tables,
                        num_seqs, bt_stride, tree_mask, tree_stride};
    const int64_t heads = md->num_heads, width = heads * md->head_dim;
    float *scores = (float *)malloc(
        (size_t)(heads * max_cells + md->block_size * md->num_kv_heads * md->head_dim) *
        sizeof(float));
    if (scores == NULL) return SG_ENOMEM;
    const int arc = sg_attend(md, k_cache, v_cache, &st, q, width, out, width, scores,
                           scores + heads * max_cells);
    free(scores);
    return arc;
}
