/*
 * Driving one FUSE request's handler, shared by the loop over /dev/fuse
 * (_loop.c) and the io_uring queues (_ring.c): the handler's lookup, the
 * answers from the handlers' tables (_answers.c), the coroutine's first
 * step, and the answer when it finished without suspending.  How an answer
 * reaches the kernel is the caller's (`answer_fn`).  Every function here
 * runs with the GIL held.
 */
#ifndef KEYFENCE_DRIVE_H
#define KEYFENCE_DRIVE_H

#include "_answers.h"

#define DRIVE_MAX_PARTS 64

/* What the handlers are and what the loop answers without them.  dirs,
   no_capability and on_miss are Py_None when absent. */
struct drive_env {
    PyObject *handlers;    /* dict: opcode -> handler(nodeid, caller, body) */
    PyObject *caller_type; /* Caller(uid, gid, pid) */
    PyObject *fuse_error;  /* the exception type whose errno is the answer */
    PyObject *by_opcode;   /* list: requests counted by opcode */
    PyObject *dirs;
    PyObject *no_capability;
    PyObject *on_miss;
};

/* Check serve()'s arguments into env (borrowed references): 0, or -1 with
   TypeError set. */
int drive_env_check(struct drive_env *env);

/* Give the kernel one answer (parts: count buffers; error a negative errno
   or 0): 0, or the errno the answer was refused with. */
typedef int (*answer_fn)(void *sink, uint64_t unique, int32_t error, Py_buffer *parts,
                         int count);

enum {
    DRIVE_DONE,       /* answered (or no answer wanted): out->write_errno */
    DRIVE_NO_HANDLER, /* no handler for the opcode: nothing done or counted */
    DRIVE_SUSPENDED,  /* out->coro yielded out->value */
    DRIVE_FAILED,     /* out->value: an exception other than fuse_error */
    DRIVE_ANSWER,     /* out->value: an answer the caller gives itself
                         (more parts than DRIVE_MAX_PARTS, or not buffers) */
    DRIVE_ERROR,      /* a Python error is set */
};

struct drive_out {
    int write_errno;
    int tabled; /* answered from a table, without a handler */
    PyObject *coro, *value, *unique, *opcode; /* new references or NULL */
};

/* Serve the request at req (n bytes, header h already checked against n):
   body = view[offset + 40 : offset + n] is what the handler gets. */
int drive(const struct drive_env *env, const struct in_header *h, const unsigned char *req,
          size_t n, PyObject *view, Py_ssize_t offset, answer_fn answer, void *sink,
          struct drive_out *out);

/* Drop out's references. */
void drive_out_clear(struct drive_out *out);

#endif
