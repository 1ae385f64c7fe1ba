/*
 * The pool of thread_pool.h. One atomic word describes the current job:
 *
 *     bits 63..32 generation | bits 31..16 number of tasks | bits 15..0 next task
 *
 * A worker claims a task by compare-and-swap on that word, so a worker still holding
 * an old generation can never take (or skip) a task of a newer job; the job's function
 * is read only after a successful claim, while the caller is still waiting for it.
 */
#define _GNU_SOURCE
#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

enum { SPIN_NS = 200000, YIELD_NS = 3000000 };

struct sg_pool {
    int32_t threads;
    pthread_t *workers;
    _Atomic uint64_t job;
    _Atomic int64_t done;
    _Atomic int32_t stop;
    _Atomic int32_t sleepers;
    sg_task_fn fn;
    void *ctx;
    pthread_mutex_t mutex;
    pthread_cond_t wake;
};

static uint64_t generation(uint64_t job) { return job >> 32; }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claims and runs tasks of generation `gen` until none is left. */
static void run_tasks(sg_pool *pool, uint64_t gen) {
    uint64_t job = atomic_load(&pool->job);
    for (;;) {
        const uint64_t next = job & 0xffff, count = (job >> 16) & 0xffff;
        if (generation(job) != gen || next >= count) return;
        if (!atomic_compare_exchange_weak(&pool->job, &job, job + 1)) continue;
        pool->fn(pool->ctx, (int64_t)next);
        atomic_fetch_add(&pool->done, 1);
        job = atomic_load(&pool->job);
    }
}

/* Waits until the job's generation differs from `seen` (or the pool stops). */
static uint64_t wait_for_job(sg_pool *pool, uint64_t seen) {
    const int64_t start = now_ns();
    for (unsigned spins = 0;; spins++) {
        const uint64_t job = atomic_load(&pool->job);
        if (generation(job) != seen || atomic_load(&pool->stop)) return generation(job);
        if ((spins & 63) != 63) {
            CPU_RELAX();
            continue;
        }
        const int64_t waited = now_ns() - start;
        if (waited < SPIN_NS) continue;
        if (waited < YIELD_NS) {
            sched_yield();
            continue;
        }
        pthread_mutex_lock(&pool->mutex);
        atomic_fetch_add(&pool->sleepers, 1);
        while (generation(atomic_load(&pool->job)) == seen && !atomic_load(&pool->stop))
            pthread_cond_wait(&pool->wake, &pool->mutex);
        atomic_fetch_sub(&pool->sleepers, 1);
        pthread_mutex_unlock(&pool->mutex);
    }
}

static void *worker_main(void *arg) {
    sg_pool *pool = (sg_pool *)arg;
    uint64_t seen = generation(atomic_load(&pool->job));
    for (;;) {
        seen = wait_for_job(pool, seen);
        if (atomic_load(&pool->stop)) return NULL;
        run_tasks(pool, seen);
    }
}

sg_pool *sg_pool_create(int32_t threads) {
    if (threads < 1) return NULL;
    sg_pool *pool = (sg_pool *)calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->threads = threads;
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pool->workers = (pthread_t *)calloc((size_t)threads, sizeof(pthread_t));
    if (!pool->workers) {
        free(pool);
        return NULL;
    }
    for (int32_t i = 1; i < threads; i++) {
        if (pthread_create(&pool->workers[i], NULL, worker_main, pool) != 0) {
            pool->threads = i; /* the ones started are joined by destroy */
            sg_pool_destroy(pool);
            return NULL;
        }
    }
    return pool;
}

void sg_pool_destroy(sg_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mutex);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    for (int32_t i = 1; i < pool->threads; i++) pthread_join(pool->workers[i], NULL);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->mutex);
    free(pool->workers);
    free(pool);
}

int32_t sg_pool_threads(const sg_pool *pool) { return pool ? pool->threads : 1; }

void sg_pool_run(sg_pool *pool, sg_task_fn fn, void *ctx, int64_t ntasks) {
    if (ntasks <= 0) return;
    if (!pool || pool->threads == 1 || ntasks == 1) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->done, 0);
    const uint64_t gen = generation(atomic_load(&pool->job)) + 1;
    atomic_store(&pool->job, (gen << 32) | ((uint64_t)ntasks << 16));
    if (atomic_load(&pool->sleepers) > 0) {
        pthread_mutex_lock(&pool->mutex);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mutex);
    }
    run_tasks(pool, gen);
    for (unsigned spins = 0; atomic_load(&pool->done) < ntasks; spins++) {
        if ((spins & 1023) == 1023) sched_yield();
        else CPU_RELAX();
    }
}
