/*
 * keyfence.fs._statx: the worker's stat of one entry in one syscall
 * (optional; keyfence/fs/syscalls.py's stat_at uses it when built).
 *
 * The rule it keeps is stat_at's: never ask a filesystem mounted inside the
 * backing tree.  A user may mount a FUSE filesystem on a directory of
 * theirs there, and a stat answered by its server could be refused or never
 * answered (docs/security.md).  The careful path opens the entry O_PATH with
 * RESOLVE_NO_XDEV and fstats it: three syscalls.  Here one statx does it:
 *
 * - AT_STATX_DONT_SYNC: a filesystem that would ask a server for fresh
 *   attributes gives its cached ones instead (FUSE sends no GETATTR);
 * - AT_SYMLINK_NOFOLLOW: a symlink is stat'ed itself; AT_NO_AUTOMOUNT: an
 *   automount point is not mounted;
 * - STATX_ATTR_MOUNT_ROOT in the answer: the name is a mount point; the
 *   walk went into the mount without asking its filesystem anything (FUSE
 *   has no d_weak_revalidate; a network filesystem mounted by root inside
 *   the backing tree, NFS, may revalidate its root: root's own choice), and
 *   the attributes are the cached ones.  EXDEV, as RESOLVE_NO_XDEV gives.
 *   "." is the directory itself, which may be the backing root and so a
 *   mount root of its own: never refused.
 *
 * stat_at(dir_fd, name) returns an os.stat_result, raises FileNotFoundError
 * or OSError(EXDEV), or returns None where only the careful path can answer
 * for certain: any other error (EACCES from a FUSE mount its owner did not
 * open to others, a kernel without statx), a kernel that does not report
 * STATX_ATTR_MOUNT_ROOT (before 5.8), an answer missing a basic field, or a
 * time too far out for this file's arithmetic.  The GIL is released around
 * the syscall, as os.stat does.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#ifndef STATX_ATTR_MOUNT_ROOT
#define STATX_ATTR_MOUNT_ROOT 0x00002000
#endif

/* what os.stat_result holds; a filesystem leaving one out goes the careful
 * way, where fstat fills it as the filesystem does */
#define WANTED (STATX_TYPE | STATX_MODE | STATX_NLINK | STATX_UID | STATX_GID | STATX_ATIME | \
                STATX_MTIME | STATX_CTIME | STATX_INO | STATX_SIZE | STATX_BLOCKS)

/* seconds whose nanoseconds fit a long long (years 1685 to 2255) */
#define SECONDS_LIMIT 9000000000LL
#define BILLION 1000000000LL

static PyObject *stat_result_type; /* os.stat_result */

/* One time as os.stat_result holds it: the integer seconds (item 7-9), the
 * float (10-12) and the nanoseconds (13-15). */
static int put_time(PyObject *items, Py_ssize_t at, const struct statx_timestamp *t)
{
    long long sec = t->tv_sec, nsec = t->tv_nsec;
    PyObject *whole = PyLong_FromLongLong(sec);
    PyObject *fraction = PyFloat_FromDouble((double)sec + (double)nsec * 1e-9);
    PyObject *ns = PyLong_FromLongLong(sec * BILLION + nsec);
    if (whole == NULL || fraction == NULL || ns == NULL) {
        Py_XDECREF(whole);
        Py_XDECREF(fraction);
        Py_XDECREF(ns);
        return -1;
    }
    PyTuple_SET_ITEM(items, 7 + at, whole);
    PyTuple_SET_ITEM(items, 10 + at, fraction);
    PyTuple_SET_ITEM(items, 13 + at, ns);
    return 0;
}

static int far_out(const struct statx_timestamp *t)
{
    return t->tv_sec > SECONDS_LIMIT || t->tv_sec < -SECONDS_LIMIT;
}

static PyObject *stat_result_of(const struct statx *stx)
{
    PyObject *items = PyTuple_New(19);
    if (items == NULL)
        return NULL;
    PyObject *plain[7] = {
        PyLong_FromUnsignedLong(stx->stx_mode),
        PyLong_FromUnsignedLongLong(stx->stx_ino),
        PyLong_FromUnsignedLongLong(makedev(stx->stx_dev_major, stx->stx_dev_minor)),
        PyLong_FromUnsignedLong(stx->stx_nlink),
        PyLong_FromUnsignedLong(stx->stx_uid),
        PyLong_FromUnsignedLong(stx->stx_gid),
        PyLong_FromLongLong((long long)stx->stx_size),
    };
    int failed = 0;
    for (Py_ssize_t i = 0; i < 7; i++) {
        if (plain[i] == NULL)
            failed = 1;
        else
            PyTuple_SET_ITEM(items, i, plain[i]);
    }
    /* tuple items left NULL on failure are fine to Py_DECREF the tuple */
    if (failed || put_time(items, 0, &stx->stx_atime) < 0 ||
        put_time(items, 1, &stx->stx_mtime) < 0 || put_time(items, 2, &stx->stx_ctime) < 0)
        goto fail;
    PyObject *tail[3] = {
        PyLong_FromUnsignedLong(stx->stx_blksize),
        PyLong_FromUnsignedLongLong(stx->stx_blocks),
        PyLong_FromUnsignedLongLong(makedev(stx->stx_rdev_major, stx->stx_rdev_minor)),
    };
    for (Py_ssize_t i = 0; i < 3; i++) {
        if (tail[i] == NULL)
            failed = 1;
        else
            PyTuple_SET_ITEM(items, 16 + i, tail[i]);
    }
    if (failed)
        goto fail;
    PyObject *result = PyObject_CallOneArg(stat_result_type, items);
    Py_DECREF(items);
    return result;
fail:
    Py_DECREF(items);
    return NULL;
}

static PyObject *statx_stat_at(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stat_at(dir_fd, name)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < INT_MIN || fd > INT_MAX) { /* AT_FDCWD is negative */
        PyErr_SetString(PyExc_OverflowError, "dir_fd out of range");
        return NULL;
    }
    int dir_fd = (int)fd;
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "name must be bytes");
        return NULL;
    }
    const char *name = PyBytes_AS_STRING(args[1]);
    if (strlen(name) != (size_t)PyBytes_GET_SIZE(args[1])) {
        errno = EINVAL;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct statx stx;
    int got, err;
    Py_BEGIN_ALLOW_THREADS
    got = statx(dir_fd, name, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | AT_STATX_DONT_SYNC,
                STATX_BASIC_STATS, &stx);
    err = errno;
    Py_END_ALLOW_THREADS
    if (got != 0) {
        if (err == ENOENT) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        Py_RETURN_NONE;
    }
    if (!(stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT))
        Py_RETURN_NONE;
    if ((stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) && strcmp(name, ".") != 0) {
        errno = EXDEV;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if ((stx.stx_mask & WANTED) != WANTED || far_out(&stx.stx_atime) ||
        far_out(&stx.stx_mtime) || far_out(&stx.stx_ctime))
        Py_RETURN_NONE;
    return stat_result_of(&stx);
}

static PyMethodDef statx_methods[] = {
    {"stat_at", (PyCFunction)(void (*)(void))statx_stat_at, METH_FASTCALL,
     "stat_at(dir_fd, name, /): os.stat_result, or None for the careful path"},
    {NULL, NULL, 0, NULL},
};

static int statx_exec(PyObject *module)
{
    (void)module;
    PyObject *os = PyImport_ImportModule("os");
    if (os == NULL)
        return -1;
    stat_result_type = PyObject_GetAttrString(os, "stat_result");
    Py_DECREF(os);
    if (stat_result_type == NULL)
        return -1;
    /* the layout built above: 10 items, then the float and nanosecond
     * times and st_blksize, st_blocks, st_rdev (Linux's os module) */
    PyObject *fields = PyObject_GetAttrString(stat_result_type, "n_fields");
    long n = fields == NULL ? -1 : PyLong_AsLong(fields);
    Py_XDECREF(fields);
    if (n != 19) {
        PyErr_Format(PyExc_ImportError, "os.stat_result has %ld fields, not 19", n);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot statx_slots[] = {
    {Py_mod_exec, statx_exec},
    {0, NULL},
};

static struct PyModuleDef statx_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "keyfence.fs._statx",
    .m_doc = "The worker's stat of one entry in one statx (fs/syscalls.py stat_at).",
    .m_size = 0,
    .m_methods = statx_methods,
    .m_slots = statx_slots,
};

PyMODINIT_FUNC PyInit__statx(void)
{
    return PyModuleDef_Init(&statx_module);
}
