/*
 * The inner loops of attention (attention.c) as a table per ISA, chosen per model by
 * sg_model.attention_kernels: the build's own (AVX2 + FMA where the dense sources are
 * compiled for it, else scalar: attention_tiles.h) and AVX-512 (attention_avx512.c,
 * compiled with its own target attribute and used only where the CPU has it).
 *
 * Batch invariance: within a table, a query's scores and outputs come out with the same
 * bits whatever the other queries of the call are and wherever the key sits in its block,
 * so a row gets the same bits alone, among a batch, or in a draft tree. The AVX-512 table
 * gives the AVX2 table's bits (tests compare them); the scalar build rounds its own way.
 */
#ifndef SG_ATTENTION_KERNELS_H
#define SG_ATTENTION_KERNELS_H

#include <stdint.h>

#include "dense_step.h"

/* Keys of one block handled at once by a scores pass (a block of more is split). */
enum { SG_KEY_CHUNK = 16 };

typedef struct {
    /* s[j * s_stride + k] = scale * dot(q[j], key k) for j < nq, k < count <= SG_KEY_CHUNK,
     * key k at kb + k * stride. scratch: >= SG_KEY_CHUNK * D floats. */
    void (*scores)(const float *const *q, int64_t nq, const float *kb, int64_t stride,
                   int64_t count, int64_t D, float scale, float *s, int64_t s_stride,
                   float *scratch);
    /* o[j][0..D) += sum over k < count, in order, of p[j][k] * v[k * stride + 0..D),
     * for j < nj. */
    void (*values)(const float *const *p, float *const *o, int64_t nj, const float *vb,
                   int64_t stride, int64_t count, int64_t D);
    /* max(s[0..n)), -inf for none. */
    float (*max)(const float *s, int64_t n);
    /* s[k] = exp(s[k] - mx) in place; returns their sum, added by key position. */
    float (*exp_shifted)(float *s, int64_t n, float mx);
    /* scores and values over a float16 cache read in place (NULL: the table has none;
     * the caller widens blocks for scores / values), D a multiple of 16, with the bits
     * of scores / values over the widened floats. */
    void (*scores_f16)(const float *const *q, int64_t nq, const uint16_t *kb, int64_t stride,
                       int64_t count, int64_t D, float scale, float *s, int64_t s_stride,
                       float *scratch);
    void (*values_f16)(const float *const *p, float *const *o, int64_t nj, const uint16_t *vb,
                       int64_t stride, int64_t count, int64_t D);
    /* The most queries a call reads a float16 cache in place for: loops that pass over the
     * keys once per few queries widen each vector again every pass, and beyond this many a
     * widened copy is cheaper. */
    int64_t f16_max_queries;
} sg_attend_kernels;

SG_INTERNAL extern const sg_attend_kernels sg_attend_built;
SG_INTERNAL extern const sg_attend_kernels sg_attend_avx512;

#endif
