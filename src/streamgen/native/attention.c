/*
 * Paged attention over the KV cache, in place: decodes, prefill chunks and draft trees
 * of several sequences (bottom-right causal or a tree mask, either with a sliding window).
 *
 * sg_attend serves the dense and the quantized step (decode_kernels.c);
 * sg_paged_attention is the same attention on its own, for the torch path's larger steps
 * (attention/native.py): it reads the paged cache in place, where the torch reference
 * gathers every sequence's blocks, padded to the longest, in every layer.
 *
 * Work is split into tasks of (sequence, ATTEND_ROWS rows, KV head): a task reads its
 * KV head's keys and values once for all its rows and the query heads that share them
 * (attention_tiles.h), and tasks run on the worker pool of a quantized model, so even
 * one decode row uses every core. Each row is computed on its own (the tiling changes
 * no result).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_kernels.h"
#include "attention_tiles.h"
#include "dense_step.h"
#include "simd_f32.h"
#include "thread_pool.h"

/* Queries of one task: its pointer arrays live on the stack. */
enum { PART_QUERIES = 128, MIN_PART_QUERIES = 8 };

/* The depth of token j of a draft tree (the chunk's rows from chunk_row): its ancestors,
 * itself included, less one. */
static inline int64_t tree_depth(const sg_step *st, int64_t chunk_row, int64_t j, int64_t q_len) {
    const uint8_t *mask = st->tree_mask + (chunk_row + j) * st->tree_stride;
    int64_t seen = 0;
    for (int64_t t = 0; t < q_len; t++) seen += mask[t] != 0;
    return seen - 1;
}

/* Whether row i of a chunk of q_len tokens (prefix keys before it; row: its tree-mask
 * row), at position pos, sees the key at slot k. A causal row's position is its slot
 * (prefix + i); a tree row's is prefix + its depth, and so is its ancestors' (they sit at
 * later slots than their positions, siblings between them): a window counts back from
 * positions, as a decode of the row's token would see it. */
static inline int visible(int64_t window, const sg_step *st, int64_t row, int64_t i,
                          int64_t prefix, int64_t q_len, int64_t pos, int64_t k) {
    if (k < prefix) return window <= 0 || k > pos - window;
    const int64_t j = k - prefix; /* a token of the chunk itself */
    if (st->tree_mask == NULL) return j <= i && (window <= 0 || k > pos - window);
    if (!st->tree_mask[row * st->tree_stride + j]) return 0;
    if (window <= 0 || pos - window < prefix) return 1; /* the window reaches past the tree */
    return prefix + tree_depth(st, row - i, j, q_len) > pos - window;
}

/* One KV head's vectors of the count keys of a block (elements from off): the cache
 * itself with its row stride (float32), or their widened copy in buf, stride D (bf16,
 * f16). */
static inline const float *head_block(const void *cache, int32_t dt, int64_t off, int64_t count,
                                      int64_t row_elems, int64_t D, float *buf, int64_t *stride) {
    if (dt == SG_F32) {
        *stride = row_elems;
        return (const float *)cache + off;
    }
    for (int64_t k = 0; k < count; k++) load_row((const uint16_t *)cache + off + k * row_elems, dt, D, buf + k * D);
    *stride = D;
    return buf;
}

/* Prefetch keys [k0, k1) of one KV head's vectors in a block (elements from off, row
 * stride row_elems, esize-byte elements). Blocks are scattered pages a few KB long, too
 * short for the hardware prefetchers to ramp up on, so each PREFETCH_KEYS keys of a pass
 * over block b first ask for the same keys of block b + 1: a few lines at a time, spread
 * over the pass rather than a burst that stalls on the line-fill buffers. A prefetch
 * changes no result. */
enum { PREFETCH_KEYS = 8 };
#define PREFETCH_INLINE static inline __attribute__((always_inline)) /* else 9% slower */
PREFETCH_INLINE void prefetch_keys(const void *cache, int64_t esize, int64_t off, int64_t k0,
                                   int64_t k1, int64_t row_elems, int64_t D) {
    const char *p = (const char *)cache + off * esize;
    for (int64_t k = k0; k < k1; k++)
        for (int64_t byte = 0; byte < D * esize; byte += 64)
            __builtin_prefetch(p + k * row_elems * esize + byte, 0, 3);
}

/* Before the run of keys [c, c + chunk) of a block of count keys: the same keys of the
 * next block (next_count keys at next_off), and after the last run the rest of them. */
PREFETCH_INLINE void prefetch_run(const void *cache, int64_t esize, int64_t next_off, int64_t c,
                                  int64_t chunk, int64_t count, int64_t next_count,
                                  int64_t row_elems, int64_t D) {
    const int64_t k1 = c + chunk < next_count ? c + chunk : next_count;
    prefetch_keys(cache, esize, next_off, c, k1, row_elems, D);
    if (c + chunk >= count) prefetch_keys(cache, esize, next_off, k1, next_count, row_elems, D);
}

/* The build's own table (AVX2 + FMA, or scalar): attention_tiles.h's loops. */
static void scores_built(const float *const *q, int64_t nq, const float *kb, int64_t stride,
                         int64_t count, int64_t D, float scale, float *s, int64_t s_stride,
                         float *scratch) {
    (void)scratch;
    for (int64_t j = 0; j < nq; j += QK_QUERIES)
        tile_dots(q + j, nq - j < QK_QUERIES ? nq - j : QK_QUERIES, kb, stride, count, D, scale,
                  s + j * s_stride, s_stride);
}

static void values_built(const float *const *p, float *const *o, int64_t nj, const float *vb,
                         int64_t stride, int64_t count, int64_t D) {
    for (int64_t j = 0; j < nj; j += PV_OUTPUTS)
        tile_values(p + j, o + j, nj - j < PV_OUTPUTS ? nj - j : PV_OUTPUTS, vb, stride, count, D);
}

#if SG_TILES_F16
static void scores_built_f16(const float *const *q, int64_t nq, const uint16_t *kb, int64_t stride,
                             int64_t count, int64_t D, float scale, float *s, int64_t s_stride,
                             float *scratch) {
    (void)scratch;
    for (int64_t j = 0; j < nq; j += QK_QUERIES)
        tile_dots_simd(q + j, nq - j < QK_QUERIES ? nq - j : QK_QUERIES, kb, stride, count, D,
                       scale, s + j * s_stride, s_stride, 1);
}

static void values_built_f16(const float *const *p, float *const *o, int64_t nj,
                             const uint16_t *vb, int64_t stride, int64_t count, int64_t D) {
    for (int64_t j = 0; j < nj; j += PV_OUTPUTS)
        tile_values_simd(p + j, o + j, nj - j < PV_OUTPUTS ? nj - j : PV_OUTPUTS, vb, stride,
                         count, D, 1);
}

/* In place for one pass of each loop (a decode's queries of a KV head): tile_dots takes
 * QK_QUERIES queries a pass, tile_values PV_OUTPUTS outputs. */
const sg_attend_kernels sg_attend_built = {scores_built, values_built, max_f32, exp_shifted,
                                           scores_built_f16, values_built_f16, QK_QUERIES};
#else /* the scalar build widens float16 blocks into a copy */
const sg_attend_kernels sg_attend_built = {scores_built, values_built, max_f32, exp_shifted,
                                           NULL, NULL, 0};
#endif

/* sg_model.attention_kernels -> its table, or NULL where this CPU lacks it. */
static const sg_attend_kernels *attend_kernels(int32_t which) {
    switch (which) {
    case SG_ATTEND_BUILT: return &sg_attend_built;
    case SG_ATTEND_AVX512: return __builtin_cpu_supports("avx512f") ? &sg_attend_avx512 : NULL;
    default: return NULL;
    }
}

/* exp_shifted of a draft-tree row's scores (sc[0, n): the prefix's keys, then the chunk's
 * in slot order, those the row may not see at -inf), adding its terms as a decode of the
 * row's token would: the softmax sum adds key k in lane k % 8, and a decode has the
 * row's ancestors at positions prefix, prefix + 1, ..., where the tree has them at their
 * slots (siblings between them). So the visible chunk keys (in slot order, which is
 * position order: parents come before children) move down to prefix + 0, 1, ... for the
 * sum, and their terms go back to their slots after it (the hidden ones' are 0). The
 * values' sum adds keys in order and its hidden terms are exact zeros, so with this a
 * draft's accepted rows get a plain decode's bits, and speculation the same tokens. */
static float tree_exp_shifted(const sg_attend_kernels *kn, const sg_step *st, int64_t row, float *sc,
                              int64_t prefix, int64_t n, float mx) {
    const uint8_t *mask = st->tree_mask + row * st->tree_stride;
    int64_t seen = 0;
    for (int64_t k = prefix; k < n; k++)
        if (mask[k - prefix]) sc[prefix + seen++] = sc[k]; /* prefix + seen <= k */
    const float sum = kn->exp_shifted(sc, prefix + seen, mx);
    /* Back to the slots, from the last: slot k >= prefix + seen of the terms not yet moved. */
    for (int64_t k = n - 1; k >= prefix; k--) sc[k] = mask[k - prefix] ? sc[prefix + --seen] : 0.0f;
    return sum;
}

/* The arguments of one attention call, shared by its tasks. */
typedef struct {
    const sg_model *md;
    const sg_attend_kernels *kernels;
    const void *k_cache, *v_cache;
    const sg_step *st;
    const float *q;
    int64_t q_stride;
    float *out;
    int64_t out_stride;
    int64_t window; /* the layer's sliding window (0: none) */
    int64_t parts;  /* each tile's queries go to this many tasks */
} attend_args;

/* The queries [j_lo, j_hi) of rows [i0, i0 + ATTEND_ROWS) of sequence b and KV head kvh
 * (query j: row i0 + j / group, head kvh * group + j % group; j_hi - j_lo <= PART_QUERIES).
 * scores: >= (j_hi - j_lo) * seq_len floats; buf: >= (block_size + SG_KEY_CHUNK) * D. */
static void attend_part(const attend_args *a, int64_t b, int64_t i0, int64_t kvh, int64_t j_lo,
                        int64_t j_hi, float *scores, float *buf) {
    const sg_model *md = a->md;
    const sg_attend_kernels *kn = a->kernels;
    const sg_step *st = a->st;
    const int64_t D = md->head_dim, KVH = md->num_kv_heads, group = md->num_heads / KVH;
    const int64_t bs = md->block_size, row_elems = KVH * D, head_off = kvh * D;
    const int32_t dt = md->kv_dtype;
    const int64_t seq_first = st->query_start[b], seq_q_len = st->query_start[b + 1] - seq_first;
    const int64_t n = st->seq_lens[b], prefix = n - seq_q_len;
    const int64_t *table = st->block_tables + b * st->bt_stride;
    const int64_t first = seq_first + i0;
    const int64_t nq = j_hi - j_lo;
    /* Causal: keys past the last row's position are invisible to all its rows. Skipping
     * them changes no bit (they would add exact zeros), and halves a prefill's attention. */
    const int64_t last_row = i0 + (j_hi - 1) / group;
    const int64_t last_key = prefix + last_row + 1;
    const int64_t nv = st->tree_mask == NULL && last_key < n ? last_key : n;
    /* Keys a row may not see: with a tree mask, the chunk's own keys (from prefix on);
     * causal, the keys past the first row (position prefix + i0 + j_lo / group); with a
     * window, the keys below win_end (out of the last row's window). Blocks with none of
     * them skip the mask. */
    const int64_t hidden_from = st->tree_mask != NULL ? prefix : prefix + i0 + j_lo / group + 1;
    const int64_t win_end = a->window > 0 ? last_key - a->window : 0;
    const float cap = md->attn_softcap;
    const float *qs[PART_QUERIES];
    float *os[PART_QUERIES];
    const float *ps[PART_QUERIES];
    int64_t pos[PART_QUERIES]; /* each query's position: its slot, or prefix + its tree depth */
    for (int64_t j = 0; j < nq; j++) {
        const int64_t row = first + (j_lo + j) / group, head = kvh * group + (j_lo + j) % group;
        const int64_t i = i0 + (j_lo + j) / group;
        qs[j] = a->q + row * a->q_stride + head * D;
        os[j] = a->out + row * a->out_stride + head * D;
        pos[j] = prefix + (st->tree_mask != NULL && a->window > 0 ? tree_depth(st, seq_first, i, seq_q_len) : i);
    }
    float *widened = buf, *scratch = buf + bs * D;
    /* A float16 cache is read in place where the table can (no widened copy). */
    const int in_place = dt == SG_F16 && kn->scores_f16 != NULL && D % 16 == 0 &&
                         nq <= kn->f16_max_queries;
    /* scores[j * n + key] */
    const int64_t esize = dt == SG_F32 ? 4 : 2;
    for (int64_t blk = 0, key = 0; key < nv; blk++) {
        const int64_t count = key + bs < nv ? bs : nv - key;
        const int64_t off = table[blk] * bs * row_elems + head_off;
        /* what the pass reads next: the next block's keys, or the first block's values */
        const int last = key + count >= nv;
        const void *next_cache = last ? a->v_cache : a->k_cache;
        const int64_t next_off = table[last ? 0 : blk + 1] * bs * row_elems + head_off;
        const int64_t next_count = last ? (nv < bs ? nv : bs) : (nv - key - count < bs ? nv - key - count : bs);
        int64_t stride = row_elems;
        const float *kb = in_place ? NULL : head_block(a->k_cache, dt, off, count, row_elems, D,
                                                       widened, &stride);
        for (int64_t c = 0; c < count; c += PREFETCH_KEYS) {
            const int64_t chunk = count - c < PREFETCH_KEYS ? count - c : PREFETCH_KEYS;
            prefetch_run(next_cache, esize, next_off, c, chunk, count, next_count, row_elems, D);
            if (in_place)
                kn->scores_f16(qs, nq, (const uint16_t *)a->k_cache + off + c * stride, stride,
                               chunk, D, md->scale, scores + key + c, n, scratch);
            else
                kn->scores(qs, nq, kb + c * stride, stride, chunk, D, md->scale, scores + key + c,
                           n, scratch);
        }
        if (cap > 0.0f) /* soft-capped scores (Gemma 2): cap * tanh(s / cap) */
            for (int64_t j = 0; j < nq; j++)
                for (int64_t k = 0; k < count; k++) {
                    float *sc = scores + j * n + key + k;
                    *sc = cap * tanhf(*sc / cap);
                }
        const int masked = key + count > hidden_from || key < win_end;
        for (int64_t j = 0; masked && j < nq; j++) {
            const int64_t i = i0 + (j_lo + j) / group, row = first + (j_lo + j) / group;
            for (int64_t k = 0; k < count; k++)
                if (!visible(a->window, st, row, i, prefix, seq_q_len, pos[j], key + k))
                    scores[j * n + key + k] = -INFINITY;
        }
        key += count;
    }
    for (int64_t j = 0; j < nq; j++) {
        float *sc = scores + j * n;
        const float mx = kn->max(sc, nv);
        const float inv = 1.0f / (st->tree_mask != NULL
                                      ? tree_exp_shifted(kn, st, first + (j_lo + j) / group, sc, prefix, nv, mx)
                                      : kn->exp_shifted(sc, nv, mx));
        for (int64_t key = 0; key < nv; key++) sc[key] *= inv;
        memset(os[j], 0, (size_t)D * sizeof(float));
    }
    for (int64_t blk = 0, key = 0; key < nv; blk++) {
        const int64_t count = key + bs < nv ? bs : nv - key;
        const int64_t off = table[blk] * bs * row_elems + head_off;
        const int64_t next_count = nv - key - count < bs ? nv - key - count : bs;
        const int64_t next_off = next_count > 0 ? table[blk + 1] * bs * row_elems + head_off : 0;
        if (in_place) { /* keys in runs of PREFETCH_KEYS: each output adds its terms in key
                         * order, so the runs give the bits of one call */
            for (int64_t c = 0; c < count; c += PREFETCH_KEYS) {
                const int64_t chunk = count - c < PREFETCH_KEYS ? count - c : PREFETCH_KEYS;
                prefetch_run(a->v_cache, esize, next_off, c, chunk, count, next_count, row_elems, D);
                for (int64_t j = 0; j < nq; j++) ps[j] = scores + j * n + key + c;
                kn->values_f16(ps, os, nq, (const uint16_t *)a->v_cache + off + c * row_elems,
                               row_elems, chunk, D);
            }
        } else {
            prefetch_keys(a->v_cache, esize, next_off, 0, next_count, row_elems, D);
            for (int64_t j = 0; j < nq; j++) ps[j] = scores + j * n + key;
            int64_t stride;
            const float *vb = head_block(a->v_cache, dt, off, count, row_elems, D, widened, &stride);
            kn->values(ps, os, nq, vb, stride, count, D);
        }
        key += count;
    }
}

/* A step's tasks and the scratch slots they share: at most one task per thread runs at
 * once, so `slots` = threads slots always leave one free to claim. */
typedef struct {
    const attend_args *args;
    const int64_t *tiles; /* [num_tiles, 2]: sequence, first row */
    float *scratch;       /* slots x slot_floats */
    int64_t slot_floats, score_floats, slots;
    _Atomic int *busy;
} attend_job;

/* Task t: tile t / (KVH * parts), KV head (t / parts) % KVH, part t % parts. */
static void attend_task(void *ctx, int64_t t) {
    attend_job *job = (attend_job *)ctx;
    const attend_args *a = job->args;
    const sg_step *st = a->st;
    const int64_t kvh_count = a->md->num_kv_heads, group = a->md->num_heads / kvh_count;
    const int64_t part = t % a->parts, kvh = (t / a->parts) % kvh_count;
    const int64_t tile = t / (a->parts * kvh_count), b = job->tiles[2 * tile];
    const int64_t i0 = job->tiles[2 * tile + 1];
    const int64_t q_len = st->query_start[b + 1] - st->query_start[b] - i0;
    const int64_t nq = (q_len < ATTEND_ROWS ? q_len : ATTEND_ROWS) * group;
    const int64_t share = (nq + a->parts - 1) / a->parts;
    const int64_t j_lo = part * share, j_hi = j_lo + share < nq ? j_lo + share : nq;
    if (j_lo >= j_hi) return;
    int64_t slot = 0;
    while (atomic_exchange(&job->busy[slot], 1)) slot = (slot + 1) % job->slots;
    float *scores = job->scratch + slot * job->slot_floats;
    attend_part(a, b, i0, kvh, j_lo, j_hi, scores, scores + job->score_floats);
    atomic_store(&job->busy[slot], 0);
}

/* Tasks per tile and KV head: enough for two per thread where the step has fewer tiles
 * (a decode, a draft tree), each at least MIN_PART_QUERIES queries (a part re-reads its
 * keys); and at most PART_QUERIES queries each. The split changes no bit. */
static int64_t attend_parts(int64_t tasks, int64_t threads, int64_t max_queries) {
    const int64_t fewest = (max_queries + PART_QUERIES - 1) / PART_QUERIES;
    int64_t parts = (2 * threads + tasks - 1) / tasks;
    if (parts > max_queries / MIN_PART_QUERIES) parts = max_queries / MIN_PART_QUERIES;
    return parts > fewest ? parts : fewest;
}

int sg_attend(const sg_model *md, int64_t window, const void *k_cache, const void *v_cache,
              const sg_step *st, const float *q, int64_t q_stride, float *out, int64_t out_stride) {
    const sg_attend_kernels *kernels = attend_kernels(md->attention_kernels);
    if (kernels == NULL) return SG_EINVAL;
    const int64_t group = md->num_heads / md->num_kv_heads;
    int64_t num_tiles = 0, max_n = 1, max_rows = 1;
    for (int64_t b = 0; b < st->num_seqs; b++) {
        const int64_t q_len = st->query_start[b + 1] - st->query_start[b];
        const int64_t rows = q_len < ATTEND_ROWS ? q_len : ATTEND_ROWS;
        num_tiles += (q_len + ATTEND_ROWS - 1) / ATTEND_ROWS;
        max_n = st->seq_lens[b] > max_n ? st->seq_lens[b] : max_n;
        max_rows = rows > max_rows ? rows : max_rows;
    }
    sg_pool *pool = md->qctx ? md->qctx->pool : NULL;
    const int64_t threads = pool ? sg_pool_threads(pool) : 1;
    const int64_t parts = attend_parts(num_tiles * md->num_kv_heads, threads, max_rows * group);
    const attend_args args = {md, kernels, k_cache, v_cache, st, q, q_stride,
                              out, out_stride, window, parts};
    const int64_t num_tasks = num_tiles * md->num_kv_heads * parts;
    const int parallel = threads > 1 && num_tasks > 1 && num_tasks <= SG_POOL_MAX_TASKS;
    const int64_t slots = parallel ? threads : 1;
    const int64_t part_queries = (max_rows * group + parts - 1) / parts;
    attend_job job = {&args, NULL, NULL, 0, part_queries * max_n, slots, NULL};
    job.slot_floats = job.score_floats + (md->block_size + SG_KEY_CHUNK) * md->head_dim;
    int64_t *tiles = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * num_tiles));
    job.scratch = (float *)malloc(sizeof(float) * (size_t)(slots * job.slot_floats));
    _Atomic int *busy = (_Atomic int *)calloc((size_t)slots, sizeof(_Atomic int));
    int rc = SG_OK;
    if (!tiles || !job.scratch || !busy) {
        rc = SG_ENOMEM;
    } else {
        int64_t t = 0;
        for (int64_t b = 0; b < st->num_seqs; b++)
            for (int64_t i0 = 0; i0 < st->query_start[b + 1] - st->query_start[b]; i0 += ATTEND_ROWS)
                tiles[2 * t] = b, tiles[2 * t + 1] = i0, t++;
        job.tiles = tiles;
        job.busy = busy;
        if (parallel)
            sg_pool_run(pool, attend_task, &job, num_tasks);
        else
            for (int64_t task = 0; task < num_tasks; task++) attend_task(&job, task);
    }
    free(tiles);
    free(job.scratch);
    free((void *)busy);
    return rc;
}

int sg_check_step(const sg_model *md, int64_t m, int64_t num_seqs, const int64_t *query_start,
                  const int64_t *seq_lens, const uint8_t *tree_mask, int64_t tree_stride) {
    if (md->num_kv_heads <= 0 || md->num_heads % md->num_kv_heads || md->head_dim % 2) return SG_EINVAL;
    if (num_seqs < 1 || query_start[0] != 0 || query_start[num_seqs] != m) return SG_EINVAL;
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t q_len = query_start[b + 1] - query_start[b];
        if (q_len < 1 || seq_lens[b] < q_len || (tree_mask != NULL && q_len > tree_stride))
            return SG_EINVAL;
    }
    return SG_OK;
}

/* Paged attention of a step whose queries are already rotated and whose K/V are already
 * in the cache (the torch path's attention for decodes, short chunks and draft trees):
 *   q [m, num_heads * head_dim] float32, out [m, num_heads * head_dim] float32,
 *   k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] (md->kv_dtype),
 *   the rest as in sg_forward_layers. Reads md's heads, head_dim, block_size, window,
 *   scale, softcap, attention table, kv_dtype and qctx only.
 */
int sg_paged_attention(const sg_model *md, const void *k_cache, const void *v_cache,
                       const float *q, int64_t m, int64_t num_seqs, const int64_t *query_start,
                       const int64_t *seq_lens, const int64_t *block_tables, int64_t bt_stride,
                       const uint8_t *tree_mask, int64_t tree_stride, float *out) {
    const int rc = sg_check_step(md, m, num_seqs, query_start, seq_lens, tree_mask, tree_stride);
    if (rc != SG_OK) return rc;
    const sg_step st = {NULL, NULL, NULL, query_start, seq_lens, block_tables,
                        num_seqs, bt_stride, tree_mask, tree_stride, NULL, NULL};
    const int64_t width = md->num_heads * md->head_dim;
    return sg_attend(md, md->window, k_cache, v_cache, &st, q, width, out, width);
}
