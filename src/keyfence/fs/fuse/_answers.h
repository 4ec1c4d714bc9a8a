/*
 * keyfence.fs.fuse._loop: the kernel's structures it reads and writes, and
 * the answers it gives from the handlers' tables without a handler
 * (_answers.c).  Every function here runs with the GIL held.
 */
#ifndef KEYFENCE_ANSWERS_H
#define KEYFENCE_ANSWERS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

struct in_header {
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};

struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

struct attr {
    uint64_t ino, size, blocks, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};

struct attr_out {
    uint64_t attr_valid;
    uint32_t attr_valid_nsec, dummy;
    struct attr attr;
};

struct entry_out {
    uint64_t nodeid, generation, entry_valid, attr_valid;
    uint32_t entry_valid_nsec, attr_valid_nsec;
    struct attr attr;
};

_Static_assert(sizeof(struct in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct attr_out) == 104, "fuse_attr_out");
_Static_assert(sizeof(struct entry_out) == 128, "fuse_entry_out");

/* Load keyfence.fs._names' capsule, if it is built (0 either way; without
 * it no LOOKUP is answered here). */
int answers_init(void);

/* GETATTR of a directory in the table: 1 and *out filled, 0 when the
 * handler answers (errors cleared). */
int dir_attr(PyObject *table, uint64_t nodeid, struct attr_out *out);

/* GETXATTR "security.capability" of an inode known to have none: 1 (the
 * answer is ENODATA), else 0 (errors cleared). */
int without_capability(PyObject *no_capability, const unsigned char *mem, size_t n,
                       uint64_t nodeid);

/* LOOKUP of a name missing from a directory in the table (the request in
 * mem, n bytes): MISSING_CACHED (*out: a negative entry with the table's
 * timeout), MISSING (answer ENOENT), or 0 when the handler answers
 * (errors cleared). */
enum { MISSING_CACHED = 1, MISSING = 2 };
int missing_name(PyObject *table, PyObject *on_miss, const unsigned char *mem, size_t n,
                 uint64_t nodeid, struct entry_out *out);

#endif
