/*
 * One value of a packed weight at a time (quant_layout.h): the scalar kernel's and the
 * dequantizer's view of a tile. Slow and obvious on purpose.
 */
#ifndef SG_QUANT_ACCESS_H
#define SG_QUANT_ACCESS_H

#include <string.h>

#include "quant_layout.h"

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while ((m & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The unsigned quant of row r, input k (0..31) of block b of a tile. */
static inline int quant_at(const sg_qformat *f, const uint8_t *tile, int b, int r, int k) {
    const int quad = k / 4, t = k % 4, lane = r * 4 + t;
    if (f->bits == 8) return tile[(int64_t)b * 512 + quad * 64 + lane];
    const uint8_t packed = tile[(int64_t)b * 256 + (quad % 4) * 64 + lane];
    int q = quad < 4 ? packed & 0x0f : packed >> 4;
    const uint8_t *qh = tile + sg_qh_offset(f) + (int64_t)b * f->qh_bytes;
    if (f->bits == 5) q |= ((qh[lane] >> quad) & 1) << 4;
    if (f->bits == 6) q |= ((qh[(quad / 4) * 64 + lane] >> (2 * (quad % 4))) & 3) << 4;
    return q;
}

/* Scale of row r, sub-block h of block b. */
static inline float scale_at(const sg_qformat *f, const uint8_t *tile, int b, int r, int h) {
    const uint8_t *sc = tile + sg_sc_offset(f) + (int64_t)b * f->sc_bytes;
    float d;
    if (f->scale_kind == SG_SCALE_F16) {
        uint16_t h16;
        memcpy(&h16, sc + 2 * r, 2);
        return half_to_float(h16);
    }
    memcpy(&d, tile + sg_sup_offset(f) + 4 * r, 4);
    if (f->scale_kind == SG_SCALE_K_U8) return d * (float)sc[r];
    return d * (float)(int8_t)sc[h * 16 + r];
}

/* Min of row r, block b (0 for types without one). */
static inline float min_at(const sg_qformat *f, const uint8_t *tile, int b, int r) {
    const uint8_t *mn = tile + sg_mn_offset(f) + (int64_t)b * f->mn_bytes;
    if (f->min_kind == SG_MIN_F16) {
        uint16_t h16;
        memcpy(&h16, mn + 2 * r, 2);
        return half_to_float(h16);
    }
    if (f->min_kind == SG_MIN_K) {
        float dmin_neg;
        memcpy(&dmin_neg, tile + sg_sup_offset(f) + 64 + 4 * r, 4);
        return dmin_neg * (float)mn[r];
    }
    return 0.0f;
}

#endif
