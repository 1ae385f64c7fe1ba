/*
 * The packed layout of a quantized weight, one row per GGUF type.
 *
 * A weight [out, in] is stored as row groups of 16 output rows; each group is a
 * run of tiles along `in`, one tile per 32 inputs (legacy types) or per 256 (K types,
 * whose scales are shared by a superblock). Every weight value is
 *
 *     w = scale(sub-block) * (q - zp) + min(block)         q unsigned, 4..8 bits
 *
 * which holds each type's values exactly (checked against gguf.quants.dequantize):
 * the fp16 scales of the legacy types are kept as fp16; a K type's 6-bit sub-scale
 * times its fp16 superblock scale is exact in fp32, so the superblock scale is kept
 * as fp32 and the sub-scale as one byte.
 *
 * Quants are stored as "quad images": for quad j (inputs 4j..4j+3 of a block), the
 * 64 bytes [row r * 4 + t] hold q[r][4j + t]. A 512-bit register loaded from a quad
 * image times one broadcast int32 of activations (4 int8) is 16 rows' dot products
 * (VNNI vpdpbusd); a 256-bit half is 8 rows (AVX2 maddubs). Low nibbles hold quads
 * 0-3, high nibbles quads 4-7; a 5-bit type adds one byte plane (bit j: quad j's bit
 * 4), a 6-bit type two (plane p, bits 2(j-4p)..: quad j's bits 4-5).
 *
 * Tile of one group (TB = blocks per tile):
 *
 *     [qs: TB x qs_bytes][qh: TB x qh_bytes][sc: TB x sc_bytes][mn: TB x mn_bytes][d: 16 f32][dmin: 16 f32]
 *      quad images        high-bit planes    per block scales   per block mins     K types only
 *
 *  sc: fp16 x 16 (legacy), u8 x 16 (Q4_K / Q5_K, x d), i8 x 2 x 16 (Q6_K: two 16-input sub-blocks)
 *  mn: fp16 x 16 (Q4_1 / Q5_1: + m), u8 x 16 (Q4_K / Q5_K: x dmin, stored negated)
 */
#ifndef SG_QUANT_LAYOUT_H
#define SG_QUANT_LAYOUT_H

#include <stdint.h>

enum { SG_GROUP_ROWS = 16, SG_QBLOCK = 32 };

enum sg_qtype { SG_Q4_0, SG_Q4_1, SG_Q5_0, SG_Q5_1, SG_Q8_0, SG_Q4_K, SG_Q5_K, SG_Q6_K, SG_QTYPES };
enum sg_scale_kind { SG_SCALE_F16, SG_SCALE_K_U8, SG_SCALE_K_I8 };
enum sg_min_kind { SG_MIN_NONE, SG_MIN_F16, SG_MIN_K };

typedef struct {
    int bits;            /* 4, 5, 6 or 8 */
    int blocks_per_tile; /* 1, or 8 for K types (a 256-input superblock) */
    int sub;             /* inputs per scale: 32, or 16 (Q6_K) */
    int scale_kind;
    int min_kind;
    int zp;              /* integer zero point subtracted from q */
    int qs_bytes, qh_bytes, sc_bytes, mn_bytes; /* per block of one group */
    int sup_bytes;       /* per tile: fp32 d (and dmin) of the superblock */
} sg_qformat;

/* One row per type: adding a type is adding a row (and its repacking in Python). */
static const sg_qformat SG_QFORMATS[SG_QTYPES] = {
    /*          bits tb sub scale          min          zp   qs   qh  sc  mn  sup */
    [SG_Q4_0] = {4, 1, 32, SG_SCALE_F16,  SG_MIN_NONE, 8,   256, 0,   32, 0,  0},
    [SG_Q4_1] = {4, 1, 32, SG_SCALE_F16,  SG_MIN_F16,  0,   256, 0,   32, 32, 0},
    [SG_Q5_0] = {5, 1, 32, SG_SCALE_F16,  SG_MIN_NONE, 16,  256, 64,  32, 0,  0},
    [SG_Q5_1] = {5, 1, 32, SG_SCALE_F16,  SG_MIN_F16,  0,   256, 64,  32, 32, 0},
    [SG_Q8_0] = {8, 1, 32, SG_SCALE_F16,  SG_MIN_NONE, 128, 512, 0,   32, 0,  0},
    [SG_Q4_K] = {4, 8, 32, SG_SCALE_K_U8, SG_MIN_K,    0,   256, 0,   16, 16, 128},
    [SG_Q5_K] = {5, 8, 32, SG_SCALE_K_U8, SG_MIN_K,    0,   256, 64,  16, 16, 128},
    [SG_Q6_K] = {6, 8, 16, SG_SCALE_K_I8, SG_MIN_NONE, 32,  256, 128, 32, 0,  64},
};

static inline int64_t sg_tile_bytes(const sg_qformat *f) {
    return (int64_t)f->blocks_per_tile * (f->qs_bytes + f->qh_bytes + f->sc_bytes + f->mn_bytes) +
           f->sup_bytes;
}

/* Offsets of a tile's parts. */
static inline int64_t sg_qh_offset(const sg_qformat *f) { return (int64_t)f->blocks_per_tile * f->qs_bytes; }
static inline int64_t sg_sc_offset(const sg_qformat *f) {
    return (int64_t)f->blocks_per_tile * (f->qs_bytes + f->qh_bytes);
}
static inline int64_t sg_mn_offset(const sg_qformat *f) {
    return sg_sc_offset(f) + (int64_t)f->blocks_per_tile * f->sc_bytes;
}
static inline int64_t sg_sup_offset(const sg_qformat *f) {
    return sg_mn_offset(f) + (int64_t)f->blocks_per_tile * f->mn_bytes;
}

/* A packed weight: [out / 16 groups][in / (32 TB) tiles][tile bytes]. */
typedef struct {
    const uint8_t *data;
    const float *bias; /* [out] or NULL */
    int32_t type;      /* enum sg_qtype */
    int32_t _pad;
    int64_t out_features; /* a multiple of 16 (the loader pads with zero rows) */
    int64_t in_features;  /* a multiple of 32 x blocks_per_tile */
} sg_qweight;

/* Activations quantized per 32 inputs: x ~= d * q, with the sums of q per 16 inputs
 * (the zero points need them) and d times each block's sum (the mins' term). Rows are m, inputs in (a multiple of 32).
 * pairs: rows 2r and 2r + 1 are one input row's int8 rounding and the int8 rounding of
 * its residual (~16-bit activations); the kernels write y_r = y_2r + y_2r+1 (m / 2 rows). */
typedef struct {
    int8_t *q;    /* [m, in] */
    float *d;     /* [m, in / 32] */
    int32_t *s16; /* [m, in / 16] */
    float *ds;    /* [m, in / 32]: d * (float)(sum of the block's q) */
    int64_t m, in;
    int64_t pairs;
} sg_qact;

/* The quantized kernels' context: the ISA (enum sg_isa) and the worker pool (NULL: the
 * caller's thread alone). */
typedef struct sg_pool sg_pool;
typedef struct {
    sg_pool *pool;
    int32_t isa;
    int32_t _pad;
} sg_qctx;

/* A linear layer made of row blocks [W_0; W_1; ...] of one input (fused q/k/v or
 * gate/up, whose GGUF types may differ): out_features is the layer's true width (the
 * last part may hold padded rows beyond it).
 *
 * residual: quantize each input row twice, x ~= d1 q1 + d2 q2 with q2 the int8 of the
 * first rounding's residual, and run both as rows of one tile (the weight is unpacked
 * once for the pair): ~16-bit activations for the layers that need them (the LM head,
 * whose rows feed sampling: a hidden state with one large outlier costs its block's
 * other entries most of their 8 bits). At batch 1 the extra integer work hides under
 * the weight stream. */
typedef struct {
    const sg_qweight *parts;
    int64_t count;
    const sg_qctx *ctx;
    int64_t out_features;
    int32_t residual;
    int32_t _pad;
} sg_qparts;

int sg_qlinear_parts(const sg_qparts *p, const float *x, int64_t m, float *y, int64_t ldy);

/* The same layer over activations already quantized (a->m rows, or a->m / 2 pairs): for
 * steps that quantize a layer's input as they produce it (decode_kernels.c). */
int sg_qgemm_parts(const sg_qparts *p, const sg_qact *a, float *y, int64_t ldy);

/* Activation buffers of m rows of in inputs (SG_QOK or SG_QENOMEM), and their release. */
int sg_qact_alloc(sg_qact *a, int64_t m, int64_t in);
void sg_qact_free(sg_qact *a);

/* A row quantizer (x [m, in] f32 -> a, sg_quantize_act's values): the context's ISA's. */
typedef void (*sg_quantize_fn)(const float *x, int64_t m, int64_t in, sg_qact *a);
sg_quantize_fn sg_qctx_quantizer(const sg_qctx *ctx);

#endif
