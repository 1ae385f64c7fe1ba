/*
 * The types of the native dense step (decode_kernels.c) and its attention (attention.c):
 * one model, its layers' weights and caches, and the rows of one step.
 *
 * Layouts (row-major, contiguous):
 *   linear weight   [out, in]   (the loader keeps this layout where the kernels are used)
 *   KV cache        [num_blocks, block_size, num_kv_heads, head_dim] (sg_model.kv_dtype)
 *   block_tables    [num_seqs, bt_stride] int64
 */
#ifndef SG_DENSE_STEP_H
#define SG_DENSE_STEP_H

#include <stdint.h>

#include "quant_layout.h"

/* Element types. SG_QUANT: a linear's weight is an sg_qparts; SG_F16: KV caches only. */
enum { SG_F32 = 0, SG_BF16 = 1, SG_QUANT = 2, SG_F16 = 3 };
enum { SG_OK = 0, SG_ENOMEM = -1, SG_EINVAL = -2 };
enum { ATTEND_ROWS = 32 };
/* Attention's inner loops (attention_kernels.h): the build's own (AVX2 or scalar), AVX-512. */
enum sg_attend_table { SG_ATTEND_BUILT = 0, SG_ATTEND_AVX512 = 1 }; /* rows of one sequence whose scores are held at once */

typedef struct {
    const void *weight;
    const void *bias; /* NULL: no bias; same dtype as weight */
    int32_t dtype;
    int32_t splits; /* 0: [out, in]; S >= 1: [S, in, out / S] */
    int64_t out_features;
    int64_t in_features;
} sg_linear;

/* A layer's norms by role (NULL: the layer has none there): on the attention branch's
 * input and output, on the MLP branch's input and output. Llama has the inputs', OLMo 2
 * the outputs', Gemma 3 all four. */
enum { SG_ATTN_IN, SG_ATTN_OUT, SG_MLP_IN, SG_MLP_OUT, SG_NORM_ROLES };
enum { SG_ACT_SILU = 0, SG_ACT_GELU_TANH = 1 }; /* the gate's activation: SwiGLU, GeGLU */

typedef struct {
    sg_linear qkv, o, gate_up, down;
    const void *norms[SG_NORM_ROLES];
    void *k_cache;
    void *v_cache;
    const void *q_norm; /* NULL: none; Qwen3: RMSNorm of each q head before rope */
    const void *k_norm; /* NULL: none; each k head likewise */
    int64_t window;     /* this layer's sliding window (0: none) */
    int32_t local_rope; /* 1: the step's local rope tables (Gemma 3's sliding layers) */
    int32_t _pad;
} sg_layer;

typedef struct {
    int64_t hidden, q_size, kv_size, intermediate;
    int64_t num_heads, num_kv_heads, head_dim, block_size;
    int64_t window; /* sg_paged_attention's sliding window (0: none); a step's layers
                     * carry their own (sg_layer.window) */
    float eps, scale;
    int32_t dtype; /* norm weights */
    float residual_scale; /* x += residual_scale * branch (Granite; 1 elsewhere) */
    const sg_qctx *qctx; /* a quantized model's kernel context (its pool); NULL: serial */
    int32_t activation;    /* SG_ACT_SILU or SG_ACT_GELU_TANH */
    int32_t qk_norm_whole; /* 1: q / k norms over the whole projection (OLMo 2), 0: per head */
    int64_t rotary_dim;    /* the rotated dims of each head (< head_dim: partial rotary) */
    int32_t fuse_inputs;   /* 1: quantized layers' inputs quantized as they are made (the
                            * same values as quantizing the finished rows, 0; tests compare) */
    int32_t attention_kernels; /* enum sg_attend_table: attention's inner loops */
    float attn_softcap;        /* > 0: scores soft-capped to cap * tanh(s / cap) (Gemma 2) */
    int32_t kv_dtype;          /* the KV cache's elements: SG_F32, SG_BF16 or SG_F16 */
} sg_model;

/* The rows of one step (see sg_forward_layers for the arguments). */
typedef struct {
    const float *cos_t, *sin_t;
    const int64_t *slots, *query_start, *seq_lens, *block_tables;
    int64_t num_seqs, bt_stride;
    const uint8_t *tree_mask; /* [m, tree_stride] or NULL (causal) */
    int64_t tree_stride;
    const float *local_cos, *local_sin; /* the local layers' rope tables, or NULL */
} sg_step;

#define SG_INTERNAL __attribute__((visibility("hidden")))

/* Checks a step's layout (heads, query ranges, lengths, tree width): SG_OK or SG_EINVAL. */
SG_INTERNAL int sg_check_step(const sg_model *md, int64_t m, int64_t num_seqs,
                              const int64_t *query_start, const int64_t *seq_lens,
                              const uint8_t *tree_mask, int64_t tree_stride);

/* y [m, out] float32 = x [m, in] float32 @ W^T + b (dense_linear.c; quantized weights:
 * the quantized core). SG_OK, or SG_EINVAL from the quantized core. */
SG_INTERNAL int sg_linear_rows(const sg_linear *lin, const float *x, float *y, int64_t m);

/* Attend the m rows of a step (attention.c) with a sliding window (0: none; a step's
 * layers pass their own). q [m, q_stride] holds each row's rotated query heads first;
 * out [m, out_stride] gets each row's num_heads * head_dim outputs.
 * Returns SG_OK or SG_ENOMEM (its scratch is its own). */
SG_INTERNAL int sg_attend(const sg_model *md, int64_t window, const void *k_cache,
                          const void *v_cache, const sg_step *st, const float *q,
                          int64_t q_stride, float *out, int64_t out_stride);

#endif
