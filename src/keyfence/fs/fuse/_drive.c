/*
 * One request's handler, driven as far as it goes without suspending
 * (_drive.h).  Moved here from _loop.c unchanged when the io_uring queues
 * (_ring.c) came to need the same steps.
 */
#include "_drive.h"

#include <errno.h>
#include <string.h>

#define OP_LOOKUP 1
#define OP_FORGET 2
#define OP_GETATTR 3
#define OP_GETXATTR 22
#define OP_BATCH_FORGET 42
#define ERRNO_MAX 511

int drive_env_check(struct drive_env *env)
{
    if (!PyDict_Check(env->handlers)) {
        PyErr_SetString(PyExc_TypeError, "handlers must be a dict");
        return -1;
    }
    if (!PyList_Check(env->by_opcode)) {
        PyErr_SetString(PyExc_TypeError, "by_opcode must be a list");
        return -1;
    }
    if (env->on_miss != Py_None && !PyCallable_Check(env->on_miss)) {
        PyErr_SetString(PyExc_TypeError, "on_miss must be callable or None");
        return -1;
    }
    if (env->dirs != Py_None && !PyDict_Check(env->dirs)) {
        PyErr_SetString(PyExc_TypeError, "dirs must be a dict or None");
        return -1;
    }
    if (env->no_capability != Py_None && !PyAnySet_Check(env->no_capability)) {
        PyErr_SetString(PyExc_TypeError, "no_capability must be a set or None");
        return -1;
    }
    if (!PyType_Check(env->fuse_error)) {
        PyErr_SetString(PyExc_TypeError, "fuse_error must be a type");
        return -1;
    }
    return 0;
}

void drive_out_clear(struct drive_out *out)
{
    Py_CLEAR(out->coro);
    Py_CLEAR(out->value);
    Py_CLEAR(out->unique);
    Py_CLEAR(out->opcode);
}

/* The errno a FUSEError carries (EIO if it is not one the kernel takes),
   or 0 if exc is not a FUSEError. */
static int fuse_errno(PyObject *exc, PyObject *fuse_error)
{
    if (!PyObject_TypeCheck(exc, (PyTypeObject *)fuse_error))
        return 0;
    PyObject *v = PyObject_GetAttrString(exc, "errno");
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

static int count_opcode(PyObject *by_opcode, unsigned op)
{
    if (op >= (unsigned)PyList_GET_SIZE(by_opcode))
        return 0;
    long count = PyLong_AsLong(PyList_GET_ITEM(by_opcode, op));
    if (count == -1 && PyErr_Occurred())
        return -1;
    PyObject *one = PyLong_FromLong(count + 1);
    if (one == NULL)
        return -1;
    PyList_SetItem(by_opcode, op, one); /* steals; drops the old count */
    return 0;
}

/* From a table, without a handler: 1 when answered (out->write_errno). */
static int tabled(const struct drive_env *env, const struct in_header *h,
                  const unsigned char *req, size_t n, answer_fn answer, void *sink,
                  struct drive_out *out)
{
    unsigned op = h->opcode;
    if (op == OP_GETATTR && env->dirs != Py_None) {
        struct attr_out a;
        if (dir_attr(env->dirs, h->nodeid, &a)) {
            Py_buffer part = {.buf = &a, .len = sizeof(a)};
            out->write_errno = answer(sink, h->unique, 0, &part, 1);
            return 1;
        }
    } else if (op == OP_LOOKUP && env->dirs != Py_None && env->on_miss != Py_None) {
        struct entry_out e;
        int got = missing_name(env->dirs, env->on_miss, req, n, h->nodeid, &e);
        if (got) {
            Py_buffer part = {.buf = &e, .len = sizeof(e)};
            out->write_errno = got == MISSING_CACHED ? answer(sink, h->unique, 0, &part, 1)
                                                     : answer(sink, h->unique, -ENOENT, NULL, 0);
            return 1;
        }
    } else if (op == OP_GETXATTR && env->no_capability != Py_None &&
               without_capability(env->no_capability, req, n, h->nodeid)) {
        out->write_errno = answer(sink, h->unique, -ENODATA, NULL, 0);
        return 1;
    }
    return 0;
}

/* The handler's coroutine for the request, or NULL with an error set. */
static PyObject *start(const struct drive_env *env, PyObject *handler, const struct in_header *h,
                       size_t n, PyObject *view, Py_ssize_t offset)
{
    PyObject *cargs[3] = {PyLong_FromUnsignedLong(h->uid), PyLong_FromUnsignedLong(h->gid),
                          PyLong_FromUnsignedLong(h->pid)};
    PyObject *caller = NULL, *body = NULL, *nodeid = NULL, *coro = NULL;
    if (cargs[0] && cargs[1] && cargs[2])
        caller = PyObject_Vectorcall(env->caller_type, cargs, 3, NULL);
    for (int i = 0; i < 3; i++)
        Py_XDECREF(cargs[i]);
    if (caller != NULL)
        body = PySequence_GetSlice(view, offset + (Py_ssize_t)sizeof(*h), offset + (Py_ssize_t)n);
    if (body != NULL)
        nodeid = PyLong_FromUnsignedLongLong(h->nodeid);
    if (nodeid != NULL) {
        PyObject *hargs[3] = {nodeid, caller, body};
        coro = PyObject_Vectorcall(handler, hargs, 3, NULL);
    }
    Py_XDECREF(nodeid);
    Py_XDECREF(caller);
    Py_XDECREF(body);
    return coro;
}

/* value is a finished handler's answer: give it (DRIVE_DONE), or leave it
   to the caller (DRIVE_ANSWER, value kept in out). */
static int give(PyObject *value, const struct in_header *h, answer_fn answer, void *sink,
                struct drive_out *out)
{
    Py_buffer parts[DRIVE_MAX_PARTS];
    int count = 0, cannot = 0;
    if (value != Py_None) {
        if (PyList_Check(value)) {
            Py_ssize_t k = PyList_GET_SIZE(value);
            if (k > DRIVE_MAX_PARTS) {
                cannot = 1;
            } else {
                for (; count < k; count++) {
                    if (PyObject_GetBuffer(PyList_GET_ITEM(value, count), &parts[count],
                                           PyBUF_SIMPLE) < 0) {
                        cannot = 1;
                        break;
                    }
                }
            }
        } else if (PyObject_GetBuffer(value, &parts[0], PyBUF_SIMPLE) < 0) {
            cannot = 1;
        } else {
            count = 1;
        }
    }
    if (!cannot)
        out->write_errno = answer(sink, h->unique, 0, parts, count);
    for (int i = 0; i < count; i++)
        PyBuffer_Release(&parts[i]);
    if (cannot) {
        PyErr_Clear();
        out->value = value;
        return DRIVE_ANSWER;
    }
    Py_DECREF(value);
    return DRIVE_DONE;
}

/* The handler raised (the error is set): a FUSEError is answered here
   with its errno, anything else goes to the caller. */
static int raised(const struct drive_env *env, const struct in_header *h, int no_reply,
                  answer_fn answer, void *sink, struct drive_out *out)
{
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc != NULL && tb != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    int code = exc != NULL ? fuse_errno(exc, env->fuse_error) : 0;
    if (code == 0) {
        out->value = exc != NULL ? exc : Py_NewRef(Py_None);
        return DRIVE_FAILED;
    }
    Py_DECREF(exc);
    out->write_errno = no_reply ? 0 : answer(sink, h->unique, -code, NULL, 0);
    return DRIVE_DONE;
}

int drive(const struct drive_env *env, const struct in_header *h, const unsigned char *req,
          size_t n, PyObject *view, Py_ssize_t offset, answer_fn answer, void *sink,
          struct drive_out *out)
{
    memset(out, 0, sizeof(*out));
    unsigned op = h->opcode;
    PyObject *key = PyLong_FromUnsignedLong(op);
    if (key == NULL)
        return DRIVE_ERROR;
    PyObject *handler = PyDict_GetItemWithError(env->handlers, key); /* borrowed */
    Py_DECREF(key);
    if (handler == NULL)
        return PyErr_Occurred() ? DRIVE_ERROR : DRIVE_NO_HANDLER;
    if (count_opcode(env->by_opcode, op) < 0)
        return DRIVE_ERROR;
    out->unique = PyLong_FromUnsignedLongLong(h->unique);
    out->opcode = PyLong_FromUnsignedLong(op);
    if (out->unique == NULL || out->opcode == NULL) {
        drive_out_clear(out);
        return DRIVE_ERROR;
    }
    if (tabled(env, h, req, n, answer, sink, out)) {
        out->tabled = 1;
        return DRIVE_DONE;
    }
    int no_reply = op == OP_FORGET || op == OP_BATCH_FORGET;
    PyObject *coro = start(env, handler, h, n, view, offset);
    if (coro == NULL)
        return raised(env, h, no_reply, answer, sink, out);
    PyObject *value = NULL;
    PySendResult sent = PyIter_Send(coro, Py_None, &value);
    if (sent == PYGEN_NEXT) { /* suspended: the caller drives it on */
        out->coro = coro;
        out->value = value;
        return DRIVE_SUSPENDED;
    }
    Py_DECREF(coro);
    if (sent == PYGEN_ERROR)
        return raised(env, h, no_reply, answer, sink, out);
    if (no_reply) {
        Py_DECREF(value);
        return DRIVE_DONE;
    }
    return give(value, h, answer, sink, out);
}
