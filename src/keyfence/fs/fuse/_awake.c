/*
 * Keeping a CPU busy, harmlessly, while a FUSE queue serves requests.
 *
 * Why: FUSE wakes the caller waiting for an answer with an ordinary wake-up.
 * The queue's thread answers on the caller's CPU, which is then busy (with
 * that thread), so the scheduler looks for an idle CPU and puts the caller
 * there; on a virtual machine whose idle vCPUs halt, that wake costs more
 * than the request.  Part 27 (docs/performance.md), 20,000 statfs calls on
 * 2 vCPUs: 7,032 moved CPU, 49 us a call; with the caller pinned, 18 us.
 * A spinner on the queue's neighbouring CPU (fs/fuse/ring.py picks it)
 * while requests come makes the scheduler find no idle CPU (its search is
 * bounded by how busy the CPUs are: SIS_UTIL), so the caller stays where
 * it slept: ~20 moves, 23 us a call.  A spinner on the queue's own CPU does
 * not do it (the caller still moved: 2,629 moves, 69 us).
 *
 * The spinner never takes time from anyone: it runs at SCHED_IDLE (any
 * other task on the CPU preempts it at once), holds no lock and no GIL,
 * touches nothing but its own counters, and spins only for spin_ns after
 * the last request (then sleeps on a futex until the next one).  If it
 * cannot be SCHED_IDLE it does not run at all.  What it costs is the
 * CPU's power and, on a VM, the host's time for it: as the /dev/fuse
 * loop's own spin (fs/fuse/spin.py) did, at normal priority.
 *
 * The /dev/fuse loop (fs/fuse/_loop.c) has one spinner on no CPU in
 * particular (cpu -1): it answers from whichever CPU it spins on, and an
 * idle CPU's wake costs the caller there (part 28): the spinner runs where
 * nothing else does, which on 2 CPUs is the waiting caller's.
 *
 * Memory order: the queue thread stores last_ns, then reads sleeping; the
 * spinner stores sleeping, then reads last_ns again before it sleeps (all
 * sequentially consistent), so a request is never missed by a sleeping
 * spinner: one of the two sees the other's store.
 */
#define _GNU_SOURCE
#include "_awake.h"

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct kf_awake {
    pthread_t thread;
    int cpu;
    long long spin_ns;
    long long last_ns;  /* atomic: when the queue last served a request */
    int sleeping;       /* atomic: the spinner waits on seq */
    int stop;           /* atomic */
    uint32_t seq;       /* atomic: the futex word */
    int started;        /* atomic: 1 running, -1 could not be SCHED_IDLE */
};

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *spin(void *arg)
{
    struct kf_awake *a = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (a->cpu >= 0)
        CPU_SET(a->cpu, &set);
    struct sched_param none = {0};
    if ((a->cpu >= 0 && sched_setaffinity(0, sizeof(set), &set) != 0) ||
        sched_setscheduler(0, SCHED_IDLE, &none) != 0) {
        __atomic_store_n(&a->started, -1, __ATOMIC_SEQ_CST);
        return NULL;
    }
    __atomic_store_n(&a->started, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&a->stop, __ATOMIC_SEQ_CST)) {
        uint32_t seq = __atomic_load_n(&a->seq, __ATOMIC_SEQ_CST);
        if (now_ns() - __atomic_load_n(&a->last_ns, __ATOMIC_SEQ_CST) < a->spin_ns) {
            relax();
            continue;
        }
        __atomic_store_n(&a->sleeping, 1, __ATOMIC_SEQ_CST);
        if (now_ns() - __atomic_load_n(&a->last_ns, __ATOMIC_SEQ_CST) >= a->spin_ns &&
            !__atomic_load_n(&a->stop, __ATOMIC_SEQ_CST))
            syscall(SYS_futex, &a->seq, FUTEX_WAIT_PRIVATE, seq, NULL, NULL, 0);
        __atomic_store_n(&a->sleeping, 0, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static void poke(struct kf_awake *a)
{
    __atomic_add_fetch(&a->seq, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &a->seq, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

struct kf_awake *awake_start(int cpu, long long spin_ns)
{
    if (cpu < -1 || cpu >= CPU_SETSIZE || spin_ns <= 0) {
        errno = EINVAL;
        return NULL;
    }
    struct kf_awake *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return NULL;
    a->cpu = cpu;
    a->spin_ns = spin_ns;
    a->last_ns = now_ns() - spin_ns; /* asleep until the first request */
    int err = pthread_create(&a->thread, NULL, spin, a);
    if (err != 0) {
        free(a);
        errno = err;
        return NULL;
    }
    while (__atomic_load_n(&a->started, __ATOMIC_SEQ_CST) == 0)
        sched_yield();
    if (__atomic_load_n(&a->started, __ATOMIC_SEQ_CST) < 0) {
        pthread_join(a->thread, NULL);
        free(a);
        errno = EPERM;
        return NULL;
    }
    return a;
}

void awake_touch(struct kf_awake *a)
{
    __atomic_store_n(&a->last_ns, now_ns(), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&a->sleeping, __ATOMIC_SEQ_CST))
        poke(a);
}

void awake_stop(struct kf_awake *a)
{
    if (a == NULL)
        return;
    __atomic_store_n(&a->stop, 1, __ATOMIC_SEQ_CST);
    poke(a);
    pthread_join(a->thread, NULL);
    free(a);
}
