/*
 * A CPU kept busy at SCHED_IDLE for a moment after a FUSE queue served a
 * request (_awake.c says why): fs/fuse/ring.py and _loop.c, docs/performance.md
 * parts 27 and 28.
 */
#ifndef KEYFENCE_AWAKE_H
#define KEYFENCE_AWAKE_H

struct kf_awake;

/* Start a spinner on `cpu` (-1: any CPU) that spins while a request was
   served less than spin_ns ago: NULL (errno set) when it cannot run at
   SCHED_IDLE there. */
struct kf_awake *awake_start(int cpu, long long spin_ns);

/* A request was served: keep the CPU awake spin_ns more (any thread). */
void awake_touch(struct kf_awake *a);

/* Stop the spinner, wait for it, free it (NULL: nothing). */
void awake_stop(struct kf_awake *a);

#endif
