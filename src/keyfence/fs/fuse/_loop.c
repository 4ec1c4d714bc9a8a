/*
 * keyfence.fs.fuse._loop: the request loop's common case in C.
 *
 * fs/fuse/session.py reads a request from /dev/fuse, starts its handler
 * coroutine, and, when the handler finishes without suspending (most do),
 * answers it and zeroes the buffer.  serve() does exactly that, request
 * after request, in one call: the handlers stay Python (fs/fuse/dispatch.py
 * and fs/ops.py, unchanged), only the reading, the header, the driving of
 * the coroutine and the answer are here.  Everything else goes back to the
 * session with a status saying why (the session's own code handles it as
 * before):
 *
 *   IDLE        the queue is empty (after spinning up to spin_ns)
 *   BUDGET      `budget` requests served: the session lets trio run
 *   SUSPENDED   a handler yielded (n, coro, trap, unique, opcode)
 *   SPECIAL     a request the session serves itself (n): INIT, INTERRUPT,
 *               no handler, a length that does not add up
 *   FAILED      a handler raised something other than FUSEError
 *               (n, exception, unique, opcode): logged and answered there
 *   ANSWER      an answer of more parts than one writev here takes
 *               (n, answer, unique, opcode)
 *   READ_ERROR  read(2) failed (errno): ENOENT/EINTR go on, ENODEV ends
 *   WRITE_ERROR an answer was refused (errno, unique): logged there
 *   GONE        /dev/fuse said the connection is gone (while answering)
 *
 * The buffer: zeroed here after every request served here; for SUSPENDED,
 * SPECIAL, FAILED and ANSWER the request is still in it and the session
 * zeroes it when done, as before.  A handler's body is a slice of the
 * session's memoryview of the buffer (it holds the buffer alive).
 *
 * The GIL is let go for every read, write and spin, as os.read/os.writev
 * let it go.
 *
 * While requests come, serve() touches the session's spinner (a capsule
 * from start_awake(), _awake.c): a SCHED_IDLE thread keeps an idle CPU,
 * the waiting caller's, from halting for spin_ns after each request read.
 *
 * Three answers come from tables the handlers keep, without a handler
 * (counted as `tabled`; _answers.c says which and when): a directory's
 * GETATTR, the GETXATTR of security.capability of a file known to have
 * none, and a LOOKUP of a name missing from an encrypted directory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_awake.h"
#include "_drive.h"

enum {
    ST_IDLE = 0,
    ST_BUDGET = 1,
    ST_SUSPENDED = 2,
    ST_SPECIAL = 3,
    ST_FAILED = 4,
    ST_ANSWER = 5,
    ST_READ_ERROR = 6,
    ST_WRITE_ERROR = 7,
    ST_GONE = 8,
};

#define OP_INIT 26
#define OP_INTERRUPT 36

/* Busy-wait up to ns for fd to be readable (or in error): 1 if it is.
   Every YIELD_NS of it also yields the CPU: on a busy machine the spin
   then takes no time slice from the client it waits for or from anyone
   else (docs/performance.md, part 19); with nothing else runnable that
   costs one trip through the scheduler, which at every turn made a lone
   client's requests slower. */
#define YIELD_NS 10000LL

static int spin(int fd, long long ns)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    struct timespec t0, t;
    long long yielded = 0;
    int ready = 0;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (poll(&p, 1, 0) > 0) {
            ready = 1;
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        long long spent = (t.tv_sec - t0.tv_sec) * 1000000000LL + (t.tv_nsec - t0.tv_nsec);
        if (spent > ns)
            break;
        if (spent - yielded >= YIELD_NS) {
            sched_yield();
            yielded = spent;
        }
    }
    Py_END_ALLOW_THREADS
    return ready;
}

/* Write one answer: 0, or the errno of the refusal (ENOENT counted as
   abandoned and returned as 0). */
static int write_answer(int fd, uint64_t unique, int32_t error, Py_buffer *parts, int count,
                        long *abandoned)
{
    struct iovec iov[DRIVE_MAX_PARTS + 1];
    struct out_header h;
    size_t total = sizeof(h);
    for (int i = 0; i < count; i++) {
        iov[i + 1].iov_base = parts[i].buf;
        iov[i + 1].iov_len = (size_t)parts[i].len;
        total += (size_t)parts[i].len;
    }
    h.len = (uint32_t)total;
    h.error = error;
    h.unique = unique;
    iov[0].iov_base = &h;
    iov[0].iov_len = sizeof(h);
    ssize_t r;
    Py_BEGIN_ALLOW_THREADS
    r = writev(fd, iov, count + 1);
    Py_END_ALLOW_THREADS
    if (r >= 0)
        return 0;
    if (errno == ENOENT) { /* the caller is gone (killed) */
        (*abandoned)++;
        return 0;
    }
    return errno;
}

/* tabled: requests answered from the handlers' tables (last in the tuple) */
static PyObject *result(int status, long served, long caught, long missed, long abandoned,
                        long tabled, Py_ssize_t n, PyObject *a, PyObject *b, PyObject *c,
                        PyObject *d)
{
    return Py_BuildValue("(illllnOOOOl)", status, served, caught, missed, abandoned, n,
                         a ? a : Py_None, b ? b : Py_None, c ? c : Py_None, d ? d : Py_None,
                         tabled);
}

struct fd_sink {
    int fd;
    long abandoned;
};

static int answer_to_fd(void *sink, uint64_t unique, int32_t error, Py_buffer *parts, int count)
{
    struct fd_sink *s = sink;
    return write_answer(s->fd, unique, error, parts, count, &s->abandoned);
}

/* The spinner that keeps an idle CPU awake while requests come (_awake.c):
   a capsule around this, so that stop_awake can end it before the capsule
   goes. */
struct awake_box {
    struct kf_awake *a;
};

static const char AWAKE_CAPSULE[] = "keyfence.fs.fuse._loop.awake";

static void awake_capsule_free(PyObject *capsule)
{
    struct awake_box *box = PyCapsule_GetPointer(capsule, AWAKE_CAPSULE);
    if (box == NULL)
        return;
    awake_stop(box->a);
    PyMem_Free(box);
}

/* start_awake(spin_ns) -> capsule: a SCHED_IDLE spinner on any CPU, busy
   for spin_ns after each request serve() reads; OSError if it cannot run. */
static PyObject *start_awake(PyObject *Py_UNUSED(module), PyObject *args)
{
    long long spin_ns;
    if (!PyArg_ParseTuple(args, "L", &spin_ns))
        return NULL;
    struct awake_box *box = PyMem_Malloc(sizeof(*box));
    if (box == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    box->a = awake_start(-1, spin_ns);
    Py_END_ALLOW_THREADS
    if (box->a == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        PyMem_Free(box);
        return NULL;
    }
    PyObject *capsule = PyCapsule_New(box, AWAKE_CAPSULE, awake_capsule_free);
    if (capsule == NULL) {
        awake_stop(box->a);
        PyMem_Free(box);
    }
    return capsule;
}

/* stop_awake(capsule): end its spinner now (later serve() calls touch nothing). */
static PyObject *stop_awake(PyObject *Py_UNUSED(module), PyObject *capsule)
{
    struct awake_box *box = PyCapsule_GetPointer(capsule, AWAKE_CAPSULE);
    if (box == NULL)
        return NULL;
    struct kf_awake *a = box->a;
    box->a = NULL;
    Py_BEGIN_ALLOW_THREADS
    awake_stop(a);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *serve(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    PyObject *bufobj, *view, *awake_obj = Py_None;
    struct drive_env env = {.dirs = Py_None, .no_capability = Py_None, .on_miss = Py_None};
    long long spin_ns;
    long budget;
    if (!PyArg_ParseTuple(args, "iOOOOOOLl|OOOO", &fd, &bufobj, &view, &env.handlers,
                          &env.caller_type, &env.fuse_error, &env.by_opcode, &spin_ns, &budget,
                          &env.dirs, &env.no_capability, &env.on_miss, &awake_obj))
        return NULL;
    if (drive_env_check(&env) < 0)
        return NULL;
    struct kf_awake *awake = NULL;
    if (awake_obj != Py_None) {
        struct awake_box *box = PyCapsule_GetPointer(awake_obj, AWAKE_CAPSULE);
        if (box == NULL)
            return NULL;
        awake = box->a;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(bufobj, &buf, PyBUF_WRITABLE) < 0)
        return NULL;
    unsigned char *mem = buf.buf;
    size_t size = (size_t)buf.len;
    long served = 0, caught = 0, missed = 0, tabled = 0;
    struct fd_sink sink = {.fd = fd, .abandoned = 0};
    PyObject *out = NULL;
#define RESULT(status, n, a, b, c, d)                                                            \
    result(status, served, caught, missed, sink.abandoned, tabled, n, a, b, c, d)

    while (served < budget) {
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = read(fd, mem, size);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            int e = errno;
            if (e == EAGAIN) {
                if (spin_ns > 0) {
                    if (spin(fd, spin_ns)) {
                        caught++;
                        continue;
                    }
                    missed++;
                }
                out = RESULT(ST_IDLE, 0, 0, 0, 0, 0);
            } else {
                out = RESULT(ST_READ_ERROR, e, 0, 0, 0, 0);
            }
            break;
        }
        if (awake != NULL)
            awake_touch(awake);
        struct in_header h;
        if ((size_t)n < sizeof(h)) {
            out = RESULT(ST_SPECIAL, n, 0, 0, 0, 0);
            break;
        }
        memcpy(&h, mem, sizeof(h));
        if (h.len != (uint64_t)n || h.opcode == OP_INIT || h.opcode == OP_INTERRUPT) {
            out = RESULT(ST_SPECIAL, n, 0, 0, 0, 0);
            break;
        }
        struct drive_out d;
        int got = drive(&env, &h, mem, (size_t)n, view, 0, answer_to_fd, &sink, &d);
        if (got == DRIVE_ERROR)
            goto error;
        if (got == DRIVE_NO_HANDLER) {
            out = RESULT(ST_SPECIAL, n, 0, 0, 0, 0);
            break;
        }
        served++;
        tabled += d.tabled;
        if (got == DRIVE_SUSPENDED) { /* the session drives it on */
            out = RESULT(ST_SUSPENDED, n, d.coro, d.value, d.unique, d.opcode);
        } else if (got == DRIVE_FAILED) { /* logged and answered there */
            out = RESULT(ST_FAILED, n, d.value, d.unique, d.opcode, NULL);
        } else if (got == DRIVE_ANSWER) {
            out = RESULT(ST_ANSWER, n, d.value, d.unique, d.opcode, NULL);
        } else { /* DRIVE_DONE: zero the request; a refused answer ends the call */
            memset(mem, 0, (size_t)n);
            int e = d.write_errno;
            if (e == ENODEV || e == ECONNABORTED) {
                out = RESULT(ST_GONE, 0, 0, 0, 0, 0);
            } else if (e != 0) {
                PyObject *code = PyLong_FromLong(e);
                out = RESULT(ST_WRITE_ERROR, e, d.unique, code, NULL, NULL);
                Py_XDECREF(code);
            }
        }
        drive_out_clear(&d);
        if (got != DRIVE_DONE || d.write_errno != 0)
            break;
    }
#undef RESULT
    if (out == NULL && !PyErr_Occurred())
        out = result(ST_BUDGET, served, caught, missed, sink.abandoned, tabled, 0, 0, 0, 0, 0);
    PyBuffer_Release(&buf);
    return out;

error:
    PyBuffer_Release(&buf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS,
     "serve(fd, buf, view, handlers, caller_type, fuse_error, by_opcode, spin_ns, budget,\n"
     "      dirs=None, no_capability=None, on_miss=None, awake=None)\n"
     "-> (status, served, caught, missed, abandoned, n, a, b, c, d, tabled)"},
    {"start_awake", start_awake, METH_VARARGS,
     "start_awake(spin_ns) -> capsule: a SCHED_IDLE spinner on any CPU (_awake.c)"},
    {"stop_awake", stop_awake, METH_O, "stop_awake(capsule): end its spinner"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef loop_module = {
    PyModuleDef_HEAD_INIT, "_loop", "The FUSE request loop's common case (fs/fuse/session.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__loop(void)
{
    if (answers_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&loop_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "IDLE", ST_IDLE) < 0 ||
        PyModule_AddIntConstant(m, "BUDGET", ST_BUDGET) < 0 ||
        PyModule_AddIntConstant(m, "SUSPENDED", ST_SUSPENDED) < 0 ||
        PyModule_AddIntConstant(m, "SPECIAL", ST_SPECIAL) < 0 ||
        PyModule_AddIntConstant(m, "FAILED", ST_FAILED) < 0 ||
        PyModule_AddIntConstant(m, "ANSWER", ST_ANSWER) < 0 ||
        PyModule_AddIntConstant(m, "READ_ERROR", ST_READ_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "WRITE_ERROR", ST_WRITE_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "GONE", ST_GONE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
