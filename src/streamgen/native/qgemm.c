/*
 * Entry points of the quantized compute core: ISA choice, activation quantization,
 * the threaded matmul, and dequantization (prefill scratch, embedding rows, tests).
 *
 * The ISA is chosen by the caller (streamgen/native/qkernels.py) from the CPU's flags,
 * or forced by STREAMGEN_NATIVE_ISA, and travels in sg_qctx: no global state here.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qgemm_kernels.h"
#include "quant_access.h"
#include "thread_pool.h"

enum { SG_QOK = 0, SG_QENOMEM = -1, SG_QEINVAL = -2 };


/* One row of the table per ISA: its kernels and the CPU flags it needs. */
static void quantize_rows_scalar(const float *x, int64_t m, int64_t in, sg_qact *a);

static const struct {
    const sg_qgemm_fn *kernels;
    sg_quantize_fn quantize;
    const char *name;
} ISAS[SG_ISAS] = {
    [SG_ISA_SCALAR] = {sg_qgemm_scalar, quantize_rows_scalar, "scalar"},
    [SG_ISA_AVX2] = {sg_qgemm_avx2, sg_quantize_rows_avx2, "avx2"},
    [SG_ISA_AVXVNNI] = {sg_qgemm_avxvnni, sg_quantize_rows_avxvnni, "avxvnni"},
    /* AVX-512 CPUs have AVX2, not always AVX-VNNI: the AVX2 quantizer */
    [SG_ISA_AVX512VNNI] = {sg_qgemm_avx512vnni, sg_quantize_rows_avx2, "avx512vnni"},
};

int sg_isa_supported(int32_t isa) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    switch (isa) {
    case SG_ISA_SCALAR: return 1;
    case SG_ISA_AVX2: return avx2;
    case SG_ISA_AVXVNNI: return avx2 && __builtin_cpu_supports("avxvnni");
    case SG_ISA_AVX512VNNI:
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    default: return 0;
    }
}

const char *sg_isa_name(int32_t isa) { return isa >= 0 && isa < SG_ISAS ? ISAS[isa].name : NULL; }

/* ----- activations ----------------------------------------------------------------- */

/* x [m, in] f32 -> a: per 32 inputs d = max|x| / 127, q = round-half-even(x / d), and the
 * sums of q per 16 inputs. */
int sg_quantize_act(const float *x, int64_t m, int64_t in, sg_qact *a) {
    if (!x || !a || m < 0 || in % SG_QBLOCK) return SG_QEINVAL;
    a->m = m, a->in = in, a->pairs = 0;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t blk = 0; blk < in / SG_QBLOCK; blk++) {
            const float *xb = x + r * in + blk * SG_QBLOCK;
            float amax = 0.0f;
            for (int k = 0; k < SG_QBLOCK; k++) amax = fmaxf(amax, fabsf(xb[k]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            int8_t *qb = a->q + r * in + blk * SG_QBLOCK;
            int32_t s[2] = {0, 0};
            for (int k = 0; k < SG_QBLOCK; k++) {
                /* |x * id| <= 127: adding and taking away 1.5 * 2^23 rounds half to even
                 * (the default rounding mode), with no libm call. */
                const float shifted = xb[k] * id + 12582912.0f;
                const float v = fminf(fmaxf(shifted - 12582912.0f, -127.0f), 127.0f);
                qb[k] = (int8_t)v;
                s[k / 16] += qb[k];
            }
            a->d[r * (in / SG_QBLOCK) + blk] = d;
            a->s16[r * (in / 16) + blk * 2] = s[0];
            a->s16[r * (in / 16) + blk * 2 + 1] = s[1];
            a->ds[r * (in / SG_QBLOCK) + blk] = d * (float)(s[0] + s[1]);
        }
    }
    return SG_QOK;
}

static void quantize_rows_scalar(const float *x, int64_t m, int64_t in, sg_qact *a) {
    sg_quantize_act(x, m, in, a);
}

typedef struct {
    sg_quantize_fn quantize;
    const float *x;
    int64_t m, in, rows_per_task;
    sg_qact *a;
} quantize_job;

static void quantize_task(void *ctx, int64_t task) {
    const quantize_job *job = (const quantize_job *)ctx;
    const int64_t r0 = task * job->rows_per_task;
    const int64_t r1 = r0 + job->rows_per_task < job->m ? r0 + job->rows_per_task : job->m;
    const int64_t in = job->in, blocks = in / SG_QBLOCK;
    sg_qact rows = {job->a->q + r0 * in, job->a->d + r0 * blocks, job->a->s16 + r0 * (in / 16),
                    job->a->ds + r0 * blocks, r1 - r0, in, 0};
    job->quantize(job->x + r0 * in, r1 - r0, in, &rows);
}

/* sg_quantize_act with the context's ISA (the same values), on the pool by row ranges
 * for big steps (each row is quantized on its own: the result does not change). */
int sg_quantize_act_ctx(const sg_qctx *ctx, const float *x, int64_t m, int64_t in, sg_qact *a) {
    if (!ctx || ctx->isa < 0 || ctx->isa >= SG_ISAS || !x || !a || m < 0 || in % SG_QBLOCK)
        return SG_QEINVAL;
    const sg_quantize_fn quantize = ISAS[ctx->isa].quantize;
    sg_pool *pool = ctx->pool;
    if (!pool || m < 16 || sg_pool_threads(pool) < 2) {
        quantize(x, m, in, a);
    } else {
        const int64_t tasks = sg_pool_threads(pool) * 2;
        quantize_job job = {quantize, x, m, in, (m + tasks - 1) / tasks, a};
        sg_pool_run(pool, quantize_task, &job, (m + job.rows_per_task - 1) / job.rows_per_task);
    }
    a->m = m, a->in = in, a->pairs = 0;
    return SG_QOK;
}

/* ----- matmul ------------------------------------------------------------------------ */

typedef struct {
    sg_qgemm_fn kernel;
    const sg_qweight *w;
    const sg_qact *a;
    float *y;
    int64_t ldy, groups, tasks;
} gemm_job;

static void gemm_task(void *ctx, int64_t task) {
    const gemm_job *job = (const gemm_job *)ctx;
    const int64_t g0 = task * job->groups / job->tasks, g1 = (task + 1) * job->groups / job->tasks;
    job->kernel(job->w, job->a, job->y, job->ldy, g0, g1);
    const float *bias = job->w->bias;
    if (!bias) return;
    const int64_t rows = job->a->pairs ? job->a->m / 2 : job->a->m;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = g0 * SG_GROUP_ROWS; c < g1 * SG_GROUP_ROWS; c++) job->y[r * job->ldy + c] += bias[c];
}

static int check_weight(const sg_qweight *w) {
    if (!w || !w->data || w->type < 0 || w->type >= SG_QTYPES) return 0;
    const sg_qformat *f = &SG_QFORMATS[w->type];
    return w->out_features > 0 && w->out_features % SG_GROUP_ROWS == 0 && w->in_features > 0 &&
           w->in_features % (SG_QBLOCK * f->blocks_per_tile) == 0;
}

/* y [m, out] (row stride ldy >= out) = a [m, in] @ W^T + bias. */
static int qgemm_strided(const sg_qctx *ctx, const sg_qweight *w, const sg_qact *a, float *y,
                         int64_t ldy) {
    if (!ctx || ctx->isa < 0 || ctx->isa >= SG_ISAS || !check_weight(w) || !a || !y ||
        a->in != w->in_features || a->m < 0 || ldy < w->out_features || (a->pairs && a->m % 2))
        return SG_QEINVAL;
    if (a->m == 0) return SG_QOK;
    const int64_t groups = w->out_features / SG_GROUP_ROWS;
    /* A few tasks per thread balance uneven cores; each task is whole row groups. */
    int64_t tasks = (int64_t)sg_pool_threads(ctx->pool) * 4;
    if (tasks > groups) tasks = groups;
    if (tasks > SG_POOL_MAX_TASKS) tasks = SG_POOL_MAX_TASKS;
    gemm_job job = {ISAS[ctx->isa].kernels[w->type], w, a, y, ldy, groups, tasks};
    sg_pool_run(ctx->pool, gemm_task, &job, tasks);
    return SG_QOK;
}

int sg_qgemm(const sg_qctx *ctx, const sg_qweight *w, const sg_qact *a, float *y) {
    return w ? qgemm_strided(ctx, w, a, y, w->out_features) : SG_QEINVAL;
}

int sg_qact_alloc(sg_qact *a, int64_t m, int64_t in) {
    a->q = (int8_t *)malloc((size_t)(m * in) + 1);
    a->d = (float *)malloc(sizeof(float) * (size_t)(m * in / SG_QBLOCK) + 1);
    a->s16 = (int32_t *)malloc(sizeof(int32_t) * (size_t)(m * in / 16) + 1);
    a->ds = (float *)malloc(sizeof(float) * (size_t)(m * in / SG_QBLOCK) + 1);
    a->m = m, a->in = in, a->pairs = 0;
    return a->q && a->d && a->s16 && a->ds ? SG_QOK : SG_QENOMEM;
}

void sg_qact_free(sg_qact *a) {
    free(a->q), free(a->d), free(a->s16), free(a->ds);
    a->q = NULL, a->d = NULL, a->s16 = NULL, a->ds = NULL;
}

/* y [m, out] f32 = x [m, in] f32 @ W^T + bias, quantizing x on the way. */
int sg_qlinear(const sg_qctx *ctx, const sg_qweight *w, const float *x, int64_t m, float *y) {
    if (!check_weight(w)) return SG_QEINVAL;
    const sg_qparts parts = {w, 1, ctx, w->out_features, 0, 0};
    return sg_qlinear_parts(&parts, x, m, y, w->out_features);
}

/* x [m, in] -> a [2m rows, pairs]: row 2r is x_r's int8 rounding, row 2r + 1 that of
 * its residual x_r - d q (scratch: [in] floats). */
static int quantize_pairs(const float *x, int64_t m, int64_t in, sg_qact *a, float *scratch) {
    const int64_t blocks = in / SG_QBLOCK;
    for (int64_t r = 0; r < m; r++) {
        sg_qact first = {a->q + 2 * r * in, a->d + 2 * r * blocks, a->s16 + 2 * r * (in / 16),
                         a->ds + 2 * r * blocks, 1, in, 0};
        sg_qact second = {first.q + in, first.d + blocks, first.s16 + in / 16, first.ds + blocks, 1, in, 0};
        int rc = sg_quantize_act(x + r * in, 1, in, &first);
        for (int64_t k = 0; rc == SG_QOK && k < in; k++)
            scratch[k] = x[r * in + k] - first.d[k / SG_QBLOCK] * (float)first.q[k];
        if (rc == SG_QOK) rc = sg_quantize_act(scratch, 1, in, &second);
        if (rc != SG_QOK) return rc;
    }
    a->m = 2 * m, a->in = in, a->pairs = 1;
    return SG_QOK;
}

/* Whether p is a well-formed layer of in inputs per row (0: not). */
static int64_t parts_inputs(const sg_qparts *p) {
    if (!p || !p->parts || p->count < 1) return 0;
    const int64_t in = p->parts[0].in_features;
    int64_t before_last = 0;
    for (int64_t i = 0; i < p->count; i++) {
        if (!check_weight(&p->parts[i]) || p->parts[i].in_features != in) return 0;
        if (i + 1 < p->count) before_last += p->parts[i].out_features;
    }
    const int64_t last = p->parts[p->count - 1].out_features;
    return p->out_features <= before_last || p->out_features > before_last + last ? 0 : in;
}

/* y [rows, sum of the parts' out] (row stride ldy) = a @ [W_0; W_1; ...]^T over activations
 * already quantized (rows = a->m, or a->m / 2 pairs). A part with padded rows goes
 * through a scratch. */
int sg_qgemm_parts(const sg_qparts *p, const sg_qact *a, float *y, int64_t ldy) {
    const int64_t in = parts_inputs(p);
    if (!in || !a || !y || a->in != in || ldy < p->out_features) return SG_QEINVAL;
    const int64_t m = a->pairs ? a->m / 2 : a->m;
    int rc = SG_QOK;
    int64_t col = 0;
    for (int64_t i = 0; rc == SG_QOK && i < p->count; i++) {
        const sg_qweight *w = &p->parts[i];
        const int64_t width = i + 1 < p->count ? w->out_features : p->out_features - col;
        if (width == w->out_features) {
            rc = qgemm_strided(p->ctx, w, a, y + col, ldy);
        } else { /* the last part's padded rows do not fit in y */
            float *tmp = (float *)malloc(sizeof(float) * (size_t)(m * w->out_features) + 1);
            rc = tmp ? qgemm_strided(p->ctx, w, a, tmp, w->out_features) : SG_QENOMEM;
            for (int64_t r = 0; rc == SG_QOK && r < m; r++)
                memcpy(y + r * ldy + col, tmp + r * w->out_features, sizeof(float) * (size_t)width);
            free(tmp);
        }
        col += width;
    }
    return rc;
}

/* y [m, sum of the parts' out] (row stride ldy) = x @ [W_0; W_1; ...]^T: x quantized once
 * for every part (q/k/v, gate/up), twice with p->residual. */
int sg_qlinear_parts(const sg_qparts *p, const float *x, int64_t m, float *y, int64_t ldy) {
    const int64_t in = parts_inputs(p);
    if (!in || !x || !y || m < 0) return SG_QEINVAL;
    sg_qact a;
    int rc = sg_qact_alloc(&a, p->residual ? 2 * m : m, in);
    if (rc == SG_QOK && p->residual) {
        float *scratch = (float *)malloc(sizeof(float) * (size_t)in);
        rc = scratch ? quantize_pairs(x, m, in, &a, scratch) : SG_QENOMEM;
        free(scratch);
    } else if (rc == SG_QOK) {
        rc = sg_quantize_act_ctx(p->ctx, x, m, in, &a);
    }
    if (rc == SG_QOK) rc = sg_qgemm_parts(p, &a, y, ldy);
    sg_qact_free(&a);
    return rc;
}

sg_quantize_fn sg_qctx_quantizer(const sg_qctx *ctx) {
    return ctx && ctx->isa >= 0 && ctx->isa < SG_ISAS ? ISAS[ctx->isa].quantize : quantize_rows_scalar;
}

/* ----- dequantization ---------------------------------------------------------------- */

typedef struct {
    const sg_qweight *w;
    const int64_t *rows;
    float *out;
    int64_t n;
} dequant_job;

static void dequant_row(const sg_qweight *w, int64_t row, float *out) {
    const sg_qformat *f = &SG_QFORMATS[w->type];
    const int64_t in = w->in_features, blocks = in / SG_QBLOCK, tb = f->blocks_per_tile;
    const int64_t tile_bytes = sg_tile_bytes(f);
    const uint8_t *group = w->data + (row / SG_GROUP_ROWS) * (blocks / tb) * tile_bytes;
    const int r = (int)(row % SG_GROUP_ROWS);
    for (int64_t blk = 0; blk < blocks; blk++) {
        const uint8_t *tile = group + (blk / tb) * tile_bytes;
        const int b = (int)(blk % tb);
        const float mn = min_at(f, tile, b, r);
        for (int h = 0; h < SG_QBLOCK / f->sub; h++) {
            const float sc = scale_at(f, tile, b, r, h);
            for (int k = h * f->sub; k < (h + 1) * f->sub; k++) {
                const float v = sc * (float)(quant_at(f, tile, b, r, k) - f->zp);
                out[blk * SG_QBLOCK + k] = f->min_kind == SG_MIN_NONE ? v : v + mn;
            }
        }
    }
}

static void dequant_task(void *ctx, int64_t task) {
    const dequant_job *job = (const dequant_job *)ctx;
    const int64_t in = job->w->in_features;
    for (int64_t i = task * 64; i < job->n && i < (task + 1) * 64; i++)
        dequant_row(job->w, job->rows ? job->rows[i] : i, job->out + i * in);
}

/* out [n, in] f32 = rows rows[0 .. n) of W (rows NULL: rows 0 .. n), the values
 * w = scale * (q - zp) + min exactly as gguf.quants.dequantize gives them. */
int sg_qdequantize_rows(const sg_qctx *ctx, const sg_qweight *w, const int64_t *rows, int64_t n,
                        float *out) {
    if (!check_weight(w) || !out || n < 0 || (!rows && n > w->out_features)) return SG_QEINVAL;
    if (rows)
        for (int64_t i = 0; i < n; i++)
            if (rows[i] < 0 || rows[i] >= w->out_features) return SG_QEINVAL;
    dequant_job job = {w, rows, out, n};
    int64_t tasks = (n + 63) / 64;
    if (tasks > SG_POOL_MAX_TASKS) return SG_QEINVAL;
    sg_pool_run(ctx ? ctx->pool : NULL, dequant_task, &job, tasks);
    return SG_QOK;
}

sg_pool *sg_qpool_create(int32_t threads) { return sg_pool_create(threads); }
void sg_qpool_destroy(sg_pool *pool) { sg_pool_destroy(pool); }
