/*
 * Quantize-at-load to GGUF's Q4_K: rows of float32 -> block_q4_K bytes (d, dmin as
 * fp16, 12 bytes of 6-bit sub-scales and sub-mins, 128 bytes of nibbles per 256 values).
 *
 * The arithmetic is llama.cpp's reference quantizer without an importance matrix
 * (quantize_row_q4_K_ref with make_qkx2_quants: a weighted least-squares search over
 * 21 candidate scales per 32 values), step for step in float32, so a checkpoint
 * quantized here holds the values llama-quantize gives it. Rows are independent and
 * split across the worker pool. Compiled with no ISA flags (plain C, any x86-64).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "thread_pool.h"

enum { QK_K = 256, SUB = 32, Q4_K_BYTES = 144 };

/* Round to nearest, ties to even, as ggml's nearest_int (|v| < 2^22). */
static int nearest_int(float v) {
    float shifted = v + 12582912.f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    return (bits & 0x007fffff) - 0x00400000;
}

static int clamp_int(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

static uint16_t to_half(float f) {
    _Float16 h = (_Float16)f;
    uint16_t bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}

static float from_half(uint16_t bits) {
    _Float16 h;
    memcpy(&h, &bits, sizeof h);
    return (float)h;
}

/* Scale and -min of one 32-value sub-block (levels 0..nmax in L): the best of the
 * plain min/max fit and `nstep + 1` weighted least-squares refits around it. */
static float fit_sub_block(const float *x, const float *w, int nmax, uint8_t *L, float *neg_min) {
    enum { NSTEP = 20 };
    const float rmin = -1.f, rdelta = 0.1f;
    float min = x[0], max = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < SUB; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, SUB);
        *neg_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < SUB; ++i) {
        L[i] = (uint8_t)clamp_int(nearest_int(iscale * (x[i] - min)), 0, nmax);
        float diff = scale * L[i] + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    uint8_t trial[SUB];
    for (int step = 0; step <= NSTEP; ++step) {
        iscale = (rmin + rdelta * step + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < SUB; ++i) {
            int l = clamp_int(nearest_int(iscale * (x[i] - min)), 0, nmax);
            trial[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        if (!(det > 0)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0) {
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        float error = 0;
        for (int i = 0; i < SUB; ++i) {
            float diff = this_scale * trial[i] + this_min - x[i];
            error += w[i] * (diff * diff);
        }
        if (error < best_error) {
            memcpy(L, trial, SUB);
            best_error = error;
            scale = this_scale;
            min = this_min;
        }
    }
    *neg_min = -min;
    return scale;
}

/* The 6-bit (scale, min) of sub-block j from the packed 12 bytes. */
static void k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void quantize_super_block(const float *x, uint8_t *out) {
    uint8_t L[QK_K];
    float weights[SUB], scales[QK_K / SUB], mins[QK_K / SUB];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / SUB; ++j) {
        const float *xs = x + SUB * j;
        float sum_x2 = 0;
        for (int i = 0; i < SUB; ++i) sum_x2 += xs[i] * xs[i];
        float av_x = sqrtf(sum_x2 / SUB);
        for (int i = 0; i < SUB; ++i) weights[i] = av_x + fabsf(xs[i]);
        scales[j] = fit_sub_block(xs, weights, 15, L + SUB * j, &mins[j]);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint8_t *packed = out + 4;
    memset(packed, 0, 12);
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / SUB; ++j) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = ls < 63 ? ls : 63;
        lm = lm < 63 ? lm : 63;
        if (j < 4) {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            packed[j - 4] |= (uint8_t)((ls >> 4) << 6);
            packed[j] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    uint16_t d = to_half(max_scale / 63.f), dmin = to_half(max_min / 63.f);
    memcpy(out, &d, 2);
    memcpy(out + 2, &dmin, 2);
    for (int j = 0; j < QK_K / SUB; ++j) {
        uint8_t sc, mn;
        k_scale_min(j, packed, &sc, &mn);
        const float dj = from_half(d) * sc;
        if (!dj) continue;
        const float dm = from_half(dmin) * mn;
        for (int i = 0; i < SUB; ++i)
            L[SUB * j + i] = (uint8_t)clamp_int(nearest_int((x[SUB * j + i] + dm) / dj), 0, 15);
    }
    uint8_t *qs = out + 16;
    for (int j = 0; j < QK_K; j += 64, qs += 32)
        for (int i = 0; i < 32; ++i) qs[i] = (uint8_t)(L[j + i] | (L[j + i + 32] << 4));
}

typedef struct {
    const float *x;
    uint8_t *out;
    int64_t rows, cols, rows_per_task;
} q4k_job;

static void q4k_task(void *ctx, int64_t task) {
    const q4k_job *job = ctx;
    int64_t end = (task + 1) * job->rows_per_task;
    if (end > job->rows) end = job->rows;
    const int64_t blocks = job->cols / QK_K;
    for (int64_t r = task * job->rows_per_task; r < end; ++r)
        for (int64_t b = 0; b < blocks; ++b)
            quantize_super_block(job->x + r * job->cols + b * QK_K,
                                 job->out + (r * blocks + b) * Q4_K_BYTES);
}

/* x [rows, cols] f32 (cols a multiple of 256) -> out [rows, cols / 256 * 144] bytes.
 * Returns 0, or -2 for invalid arguments. */
int sg_quantize_q4_k(sg_pool *pool, const float *x, int64_t rows, int64_t cols, uint8_t *out) {
    if (!x || !out || rows < 0 || cols <= 0 || cols % QK_K) return -2;
    if (rows == 0) return 0;
    q4k_job job = {x, out, rows, cols, 1};
    const int64_t tasks_wanted = (int64_t)sg_pool_threads(pool) * 8;
    job.rows_per_task = (rows + tasks_wanted - 1) / tasks_wanted;
    sg_pool_run(pool, q4k_task, &job, (rows + job.rows_per_task - 1) / job.rows_per_task);
    return 0;
}
