/*
 * A persistent pool of worker threads for the kernels: the caller runs `ntasks` tasks
 * together with `threads - 1` workers and returns when every task is done.
 *
 * Waiting workers spin briefly (a step's matmuls come microseconds apart), then yield
 * the core, then sleep on a condition variable, so a pool on a busy machine gives its
 * cores back instead of fighting the other processes for them.
 */
#ifndef SG_THREAD_POOL_H
#define SG_THREAD_POOL_H

#include <stdint.h>

typedef struct sg_pool sg_pool;
typedef void (*sg_task_fn)(void *ctx, int64_t task);

enum { SG_POOL_MAX_TASKS = 65535 };

/* A pool of `threads` (the caller included; >= 1), or NULL when threads cannot start. */
sg_pool *sg_pool_create(int32_t threads);
void sg_pool_destroy(sg_pool *pool);
int32_t sg_pool_threads(const sg_pool *pool);

/* Runs fn(ctx, 0 .. ntasks - 1) across the pool (a NULL pool: on the caller alone).
 * ntasks <= SG_POOL_MAX_TASKS. Not reentrant: one run at a time per pool. */
void sg_pool_run(sg_pool *pool, sg_task_fn fn, void *ctx, int64_t ntasks);

#endif
