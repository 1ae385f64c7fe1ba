/*
 * The quantized matmul kernels of every ISA, behind one signature.
 *
 * A kernel computes y[r, 16 g0 .. 16 g1) for every activation row r: output columns of
 * the row groups [g0, g1) of a packed weight (quant_layout.h), without bias. Each ISA
 * file compiles its kernels with its own `#pragma GCC target`, so one build serves every
 * CPU and the dispatcher (qgemm.c) picks the variant from the CPU's flags at run time.
 *
 * Arithmetic, the same in every variant (tests/native/test_qgemm.py checks each one
 * against numpy): per block of 32 inputs and sub-block h of `sub` inputs,
 *
 *     isum_h = sum q_w * q_a - zp * sum q_a         (int32, exact)
 *     y     += (float)isum_h * (scale_h * d_a)      (fp32)
 *     y     += min * (d_a * (float)sum q_a)         (types with a min)
 */
#ifndef SG_QGEMM_KERNELS_H
#define SG_QGEMM_KERNELS_H

#include "quant_layout.h"

typedef void (*sg_qgemm_fn)(const sg_qweight *w, const sg_qact *a, float *y, int64_t ldy,
                            int64_t g0, int64_t g1);

enum sg_isa { SG_ISA_SCALAR, SG_ISA_AVX2, SG_ISA_AVXVNNI, SG_ISA_AVX512VNNI, SG_ISAS };

/* One table per ISA, indexed by enum sg_qtype; a NULL table: not compiled in. */
extern const sg_qgemm_fn sg_qgemm_scalar[SG_QTYPES];
extern const sg_qgemm_fn sg_qgemm_avx2[SG_QTYPES];
extern const sg_qgemm_fn sg_qgemm_avxvnni[SG_QTYPES];
extern const sg_qgemm_fn sg_qgemm_avx512vnni[SG_QTYPES];

/* The entry points of a kernel file, one per type, over its generic
 * IMPL(const sg_qformat *, w, a, y, ldy, g0, g1) (inlined with a constant format, so each
 * type gets its own specialised loop), and their table in enum sg_qtype order. */
#define SG_TYPE_ENTRY(IMPL, T)                                                             \
    static void IMPL##_##T(const sg_qweight *w, const sg_qact *a, float *y, int64_t ldy,   \
                           int64_t g0, int64_t g1) {                                       \
        IMPL(&SG_QFORMATS[SG_##T], w, a, y, ldy, g0, g1);                                  \
    }
#define SG_DEFINE_KERNELS(IMPL)                                                            \
    SG_TYPE_ENTRY(IMPL, Q4_0) SG_TYPE_ENTRY(IMPL, Q4_1) SG_TYPE_ENTRY(IMPL, Q5_0)          \
    SG_TYPE_ENTRY(IMPL, Q5_1) SG_TYPE_ENTRY(IMPL, Q8_0) SG_TYPE_ENTRY(IMPL, Q4_K)          \
    SG_TYPE_ENTRY(IMPL, Q5_K) SG_TYPE_ENTRY(IMPL, Q6_K)
#define SG_KERNELS_OF(IMPL)                                                                \
    {IMPL##_Q4_0, IMPL##_Q4_1, IMPL##_Q5_0, IMPL##_Q5_1,                                   \
     IMPL##_Q8_0, IMPL##_Q4_K, IMPL##_Q5_K, IMPL##_Q6_K}

/* Activation quantization of rows (the values of sg_quantize_act, vectorized). */
void sg_quantize_rows_avx2(const float *x, int64_t m, int64_t in, sg_qact *a);
void sg_quantize_rows_avxvnni(const float *x, int64_t m, int64_t in, sg_qact *a);

/* Software prefetch of a row group's weight bytes SG_PREFETCH_BYTES ahead of block blk
 * (the group read as one stream of bytes_per_block per block): a step streams ~100
 * small weights, each too short for the hardware prefetchers to ramp up, and a kernel
 * has too few loads in flight to hide L3 / DRAM latency itself (decodes most: a row
 * tile's later passes over a group find it in L1 and prefetch lines already there). A
 * prefetch past the end is harmless (never faults). */
enum { SG_PREFETCH_BYTES = 2048 };
static inline __attribute__((always_inline)) void sg_prefetch_ahead(const uint8_t *group, int64_t blk,
                                                                    int64_t bytes_per_block) {
    const uint8_t *p = group + blk * bytes_per_block + SG_PREFETCH_BYTES;
    for (int64_t line = 0; line < bytes_per_block; line += 64) __builtin_prefetch(p + line, 0, 3);
}

/* Activation rows per register tile of the 256-bit kernels: each unpacked weight block
 * serves this many (the AVX-512 file sets its own). */
enum { SG_ROW_TILE = 4 };

#endif
