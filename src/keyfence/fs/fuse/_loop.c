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

#include "_answers.h"

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

#define OP_LOOKUP 1
#define OP_FORGET 2
#define OP_GETATTR 3
#define OP_GETXATTR 22
#define OP_INIT 26
#define OP_INTERRUPT 36
#define OP_BATCH_FORGET 42
#define ERRNO_MAX 511
#define MAX_PARTS 64

static PyObject *str_errno; /* "errno" */

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
    struct iovec iov[MAX_PARTS + 1];
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

/* The errno a FUSEError carries (EIO if it is not one the kernel takes),
   or 0 if exc is not a FUSEError. */
static int fuse_errno(PyObject *exc, PyObject *fuse_error)
{
    if (!PyObject_TypeCheck(exc, (PyTypeObject *)fuse_error))
        return 0;
    PyObject *v = PyObject_GetAttr(exc, str_errno);
    if (v == NULL) {
        PyErr_Clear();
        return EIO;
    }
    long code = PyLong_AsLong(v);
    Py_DECREF(v);
    if (code == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return EIO;
    }
    return code > 0 && code <= ERRNO_MAX ? (int)code : EIO;
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

static PyObject *serve(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    PyObject *bufobj, *view, *handlers, *caller_type, *fuse_error, *by_opcode;
    PyObject *dirs = Py_None, *no_capability = Py_None, *on_miss = Py_None;
    long long spin_ns;
    long budget;
    if (!PyArg_ParseTuple(args, "iOOO!OOO!Ll|OOO", &fd, &bufobj, &view, &PyDict_Type, &handlers,
                          &caller_type, &fuse_error, &PyList_Type, &by_opcode, &spin_ns, &budget,
                          &dirs, &no_capability, &on_miss))
        return NULL;
    if (on_miss != Py_None && !PyCallable_Check(on_miss)) {
        PyErr_SetString(PyExc_TypeError, "on_miss must be callable or None");
        return NULL;
    }
    if (dirs != Py_None && !PyDict_Check(dirs)) {
        PyErr_SetString(PyExc_TypeError, "dirs must be a dict or None");
        return NULL;
    }
    if (no_capability != Py_None && !PyAnySet_Check(no_capability)) {
        PyErr_SetString(PyExc_TypeError, "no_capability must be a set or None");
        return NULL;
    }
    if (!PyType_Check(fuse_error)) {
        PyErr_SetString(PyExc_TypeError, "fuse_error must be a type");
        return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(bufobj, &buf, PyBUF_WRITABLE) < 0)
        return NULL;
    unsigned char *mem = buf.buf;
    size_t size = (size_t)buf.len;
    long served = 0, caught = 0, missed = 0, abandoned = 0, tabled = 0;
    PyObject *out = NULL;

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
                out = result(ST_IDLE, served, caught, missed, abandoned, tabled, 0, 0, 0, 0, 0);
            } else {
                out = result(ST_READ_ERROR, served, caught, missed, abandoned, tabled, e, 0, 0, 0,
                             0);
            }
            break;
        }
        struct in_header h;
        if ((size_t)n < sizeof(h)) {
            out = result(ST_SPECIAL, served, caught, missed, abandoned, tabled, n, 0, 0, 0, 0);
            break;
        }
        memcpy(&h, mem, sizeof(h));
        unsigned op = h.opcode;
        if (h.len != (uint64_t)n || op == OP_INIT || op == OP_INTERRUPT) {
            out = result(ST_SPECIAL, served, caught, missed, abandoned, tabled, n, 0, 0, 0, 0);
            break;
        }
        PyObject *key = PyLong_FromUnsignedLong(op);
        if (key == NULL)
            goto error;
        PyObject *handler = PyDict_GetItemWithError(handlers, key); /* borrowed */
        Py_DECREF(key);
        if (handler == NULL) {
            if (PyErr_Occurred())
                goto error;
            out = result(ST_SPECIAL, served, caught, missed, abandoned, tabled, n, 0, 0, 0, 0);
            break;
        }
        served++;
        if (op < (unsigned)PyList_GET_SIZE(by_opcode)) {
            PyObject *old = PyList_GET_ITEM(by_opcode, op);
            long count = PyLong_AsLong(old);
            if (count == -1 && PyErr_Occurred())
                goto error;
            PyObject *one = PyLong_FromLong(count + 1);
            if (one == NULL)
                goto error;
            PyList_SetItem(by_opcode, op, one); /* steals; drops old */
        }
        int no_reply = op == OP_FORGET || op == OP_BATCH_FORGET;
        int e = 0; /* the errno of the answer's write */
        PyObject *unique = PyLong_FromUnsignedLongLong(h.unique);
        PyObject *opcode = PyLong_FromUnsignedLong(op);
        PyObject *coro = NULL, *value = NULL;
        if (unique == NULL || opcode == NULL)
            goto request_error;
        if (op == OP_GETATTR && dirs != Py_None) {
            struct attr_out answer;
            if (dir_attr(dirs, h.nodeid, &answer)) {
                Py_buffer part = {.buf = &answer, .len = sizeof(answer)};
                tabled++;
                e = write_answer(fd, h.unique, 0, &part, 1, &abandoned);
                goto answered;
            }
        } else if (op == OP_LOOKUP && dirs != Py_None && on_miss != Py_None) {
            struct entry_out answer;
            int got = missing_name(dirs, on_miss, mem, (size_t)n, h.nodeid, &answer);
            if (got) {
                Py_buffer part = {.buf = &answer, .len = sizeof(answer)};
                tabled++;
                e = got == MISSING_CACHED ? write_answer(fd, h.unique, 0, &part, 1, &abandoned)
                                          : write_answer(fd, h.unique, -ENOENT, NULL, 0, &abandoned);
                goto answered;
            }
        } else if (op == OP_GETXATTR && no_capability != Py_None &&
                   without_capability(no_capability, mem, (size_t)n, h.nodeid)) {
            tabled++;
            e = write_answer(fd, h.unique, -ENODATA, NULL, 0, &abandoned);
            goto answered;
        }
        {
            PyObject *cargs[3];
            cargs[0] = PyLong_FromUnsignedLong(h.uid);
            cargs[1] = PyLong_FromUnsignedLong(h.gid);
            cargs[2] = PyLong_FromUnsignedLong(h.pid);
            PyObject *caller = NULL;
            if (cargs[0] && cargs[1] && cargs[2])
                caller = PyObject_Vectorcall(caller_type, cargs, 3, NULL);
            Py_XDECREF(cargs[0]);
            Py_XDECREF(cargs[1]);
            Py_XDECREF(cargs[2]);
            PyObject *body = NULL;
            if (caller != NULL)
                body = PySequence_GetSlice(view, (Py_ssize_t)sizeof(h), n);
            PyObject *nodeid = PyLong_FromUnsignedLongLong(h.nodeid);
            if (caller != NULL && body != NULL && nodeid != NULL) {
                PyObject *hargs[3] = {nodeid, caller, body};
                coro = PyObject_Vectorcall(handler, hargs, 3, NULL);
            }
            Py_XDECREF(nodeid);
            Py_XDECREF(caller);
            Py_XDECREF(body);
        }
        if (coro == NULL)
            goto handler_raised;
        {
            PySendResult sent = PyIter_Send(coro, Py_None, &value);
            if (sent == PYGEN_NEXT) { /* suspended: the session drives it on */
                out = result(ST_SUSPENDED, served, caught, missed, abandoned, tabled, n, coro,
                             value, unique, opcode);
                Py_DECREF(coro);
                Py_DECREF(value);
                Py_DECREF(unique);
                Py_DECREF(opcode);
                break;
            }
            Py_CLEAR(coro);
            if (sent == PYGEN_ERROR)
                goto handler_raised;
        }
        /* PYGEN_RETURN: value is the answer */
        if (!no_reply) {
            Py_buffer parts[MAX_PARTS];
            int count = 0, too_many = 0, bad = 0;
            if (value != Py_None) {
                if (PyList_Check(value)) {
                    Py_ssize_t k = PyList_GET_SIZE(value);
                    if (k > MAX_PARTS) {
                        too_many = 1;
                    } else {
                        for (; count < k; count++) {
                            if (PyObject_GetBuffer(PyList_GET_ITEM(value, count), &parts[count],
                                                   PyBUF_SIMPLE) < 0) {
                                bad = 1;
                                break;
                            }
                        }
                    }
                } else if (PyObject_GetBuffer(value, &parts[0], PyBUF_SIMPLE) < 0) {
                    bad = 1;
                } else {
                    count = 1;
                }
            }
            if (too_many || bad) {
                for (int i = 0; i < count; i++)
                    PyBuffer_Release(&parts[i]);
                PyErr_Clear();
                out = result(ST_ANSWER, served, caught, missed, abandoned, tabled, n, value, unique,
                             opcode, NULL);
                Py_DECREF(value);
                Py_DECREF(unique);
                Py_DECREF(opcode);
                break;
            }
            e = write_answer(fd, h.unique, 0, parts, count, &abandoned);
            for (int i = 0; i < count; i++)
                PyBuffer_Release(&parts[i]);
        }
        Py_DECREF(value);
        value = NULL;
        goto answered;

    handler_raised: {
        /* FUSEError: its errno, answered here; anything else: the session */
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        if (exc != NULL && tb != NULL)
            PyException_SetTraceback(exc, tb);
        int code = exc != NULL ? fuse_errno(exc, fuse_error) : 0;
        if (code == 0) {
            out = result(ST_FAILED, served, caught, missed, abandoned, tabled, n, exc, unique,
                         opcode, NULL);
            Py_XDECREF(type);
            Py_XDECREF(exc);
            Py_XDECREF(tb);
            Py_DECREF(unique);
            Py_DECREF(opcode);
            break;
        }
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        e = no_reply ? 0 : write_answer(fd, h.unique, -code, NULL, 0, &abandoned);
        goto answered;
    }

    answered: /* the request is done: zero it; a refused answer ends the call */
        memset(mem, 0, (size_t)n);
        if (e == ENODEV || e == ECONNABORTED) {
            out = result(ST_GONE, served, caught, missed, abandoned, tabled, 0, 0, 0, 0, 0);
        } else if (e != 0) {
            PyObject *code = PyLong_FromLong(e);
            out = result(ST_WRITE_ERROR, served, caught, missed, abandoned, tabled, e, unique,
                         code, NULL, NULL);
            Py_XDECREF(code);
        }
        Py_DECREF(unique);
        Py_DECREF(opcode);
        if (e != 0)
            break;
        continue;
    request_error:
        Py_XDECREF(unique);
        Py_XDECREF(opcode);
        goto error;
    }
    if (out == NULL && !PyErr_Occurred())
        out = result(ST_BUDGET, served, caught, missed, abandoned, tabled, 0, 0, 0, 0, 0);
    PyBuffer_Release(&buf);
    return out;

error:
    PyBuffer_Release(&buf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS,
     "serve(fd, buf, view, handlers, caller_type, fuse_error, by_opcode, spin_ns, budget,\n"
     "      dirs=None, no_capability=None, on_miss=None)\n"
     "-> (status, served, caught, missed, abandoned, n, a, b, c, d, tabled)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef loop_module = {
    PyModuleDef_HEAD_INIT, "_loop", "The FUSE request loop's common case (fs/fuse/session.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__loop(void)
{
    str_errno = PyUnicode_InternFromString("errno");
    if (str_errno == NULL || answers_init() < 0)
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
