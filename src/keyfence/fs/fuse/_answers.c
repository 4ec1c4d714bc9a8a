/*
 * Answers keyfence.fs.fuse._loop gives from the handlers' tables, without
 * a handler (counted as `tabled`).  What each table holds and who keeps it
 * true: fs/fuse/dir_attrs.py (directories) and fs/privileges.py (inodes
 * without a capability).
 *
 * - GETATTR of a directory in the directory table: from an fstat of the
 *   table's own descriptor.
 * - GETXATTR "security.capability" of an inode in the set of those known
 *   to have none (fs/privileges.py): ENODATA, as the handler answers it.
 *   The kernel asks it before the first write to every file.
 * - LOOKUP of a name missing from an encrypted directory in the directory
 *   table whose entry carries its NameSealer (fs/_names.c): the name
 *   encoded as fs/crypto.py encodes it, a statx of that in the table's
 *   descriptor (no fields wanted, AT_STATX_DONT_SYNC: never a request to a
 *   filesystem mounted on the name, which a user's FUSE server could leave
 *   unanswered; fs/syscalls.py stat_at), and on ENOENT the table's `on_miss`
 *   (KeyfenceOperations.lookup_missed: the negative entry remembered for a
 *   key removal to invalidate) says whether the answer may carry a timeout.
 *   Anything else (found, another error, a long name, "." or "..", a
 *   sealer wiped, on_miss raising) goes to the handler.
 *
 * Descriptors: the table is read and its descriptor used without letting go
 * of the GIL: the Python side takes an entry out, under the GIL, before it
 * closes its descriptor, so the descriptor used here is never one closed
 * (or reused) meanwhile.  The same holds for the sealer: a key removal
 * clears the table (on the loop's own thread) before it wipes a sealer.
 */
#include "_answers.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>

#include "_names.h"

#define NAME_MAX_BYTES 255

static struct kf_names_api *names_api; /* NULL: _names not built */

int answers_init(void)
{
    /* PyCapsule_Import imports only "keyfence" and walks attributes from
     * there: the submodule must be imported first, or the capsule is found
     * only when something else happened to import it before this module */
    PyObject *module = PyImport_ImportModule("keyfence.fs._names");
    Py_XDECREF(module);
    names_api = module == NULL ? NULL : PyCapsule_Import("keyfence.fs._names._C_API", 0);
    if (names_api == NULL || names_api->version != KF_NAMES_API_VERSION) {
        names_api = NULL;
        PyErr_Clear();
    }
    return 0;
}

/* The directory table's entry of nodeid, (fd, st_ino, seconds,
 * nanoseconds[, NameSealer or None]), into the out parameters (*names:
 * borrowed, Py_None without one): 1, or 0 when there is none or it is not
 * such a tuple (errors cleared). */
static int table_entry(PyObject *table, uint64_t nodeid, int *fd, unsigned long long *st_ino,
                       unsigned long long *valid, unsigned int *valid_nsec, PyObject **names)
{
    PyObject *key = PyLong_FromUnsignedLongLong(nodeid);
    if (key == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *entry = PyDict_GetItemWithError(table, key); /* borrowed */
    Py_DECREF(key);
    *names = Py_None;
    if (entry == NULL || !PyTuple_Check(entry) ||
        !PyArg_ParseTuple(entry, "iKKI|O", fd, st_ino, valid, valid_nsec, names)) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

int dir_attr(PyObject *table, uint64_t nodeid, struct attr_out *out)
{
    int fd;
    unsigned long long st_ino, valid;
    unsigned int valid_nsec;
    PyObject *names;
    if (!table_entry(table, nodeid, &fd, &st_ino, &valid, &valid_nsec, &names))
        return 0;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_ino != st_ino || st.st_nlink == 0)
        return 0; /* the handler says what it is now */
    /* as fs/ops.py's _attrs gives a directory (dispatch.attr_out_bytes) */
    memset(out, 0, sizeof(*out));
    out->attr_valid = valid;
    out->attr_valid_nsec = valid_nsec;
    out->attr.ino = nodeid;
    out->attr.size = (uint64_t)st.st_size;
    out->attr.blocks = (uint64_t)st.st_blocks;
    out->attr.atime = (uint64_t)st.st_atim.tv_sec;
    out->attr.mtime = (uint64_t)st.st_mtim.tv_sec;
    out->attr.ctime = (uint64_t)st.st_ctim.tv_sec;
    out->attr.atimensec = (uint32_t)st.st_atim.tv_nsec;
    out->attr.mtimensec = (uint32_t)st.st_mtim.tv_nsec;
    out->attr.ctimensec = (uint32_t)st.st_ctim.tv_nsec;
    out->attr.mode = st.st_mode;
    out->attr.nlink = (uint32_t)st.st_nlink;
    out->attr.uid = st.st_uid;
    out->attr.gid = st.st_gid;
    out->attr.rdev = (uint32_t)st.st_rdev;
    out->attr.blksize = 4096;
    return 1;
}

static const char CAPABILITY[] = "security.capability"; /* with its NUL */

int without_capability(PyObject *no_capability, const unsigned char *mem, size_t n,
                       uint64_t nodeid)
{
    const size_t at = sizeof(struct in_header) + 8; /* fuse_getxattr_in: size, padding */
    if (n < at + sizeof(CAPABILITY) || memcmp(mem + at, CAPABILITY, sizeof(CAPABILITY)) != 0)
        return 0;
    PyObject *key = PyLong_FromUnsignedLongLong(nodeid);
    if (key == NULL) {
        PyErr_Clear();
        return 0;
    }
    int known = PySet_Contains(no_capability, key);
    Py_DECREF(key);
    if (known < 0) {
        PyErr_Clear();
        return 0;
    }
    return known;
}

int missing_name(PyObject *table, PyObject *on_miss, const unsigned char *mem, size_t n,
                 uint64_t nodeid, struct entry_out *out)
{
    if (names_api == NULL)
        return 0;
    int fd;
    unsigned long long st_ino, valid;
    unsigned int valid_nsec;
    PyObject *sealer;
    if (!table_entry(table, nodeid, &fd, &st_ino, &valid, &valid_nsec, &sealer) ||
        sealer == Py_None)
        return 0; /* not in the table, or not encrypted (or no sealer built): the handler */
    /* the name: NUL-terminated, the rest of the request */
    const unsigned char *name = mem + sizeof(struct in_header);
    size_t room = n - sizeof(struct in_header);
    const unsigned char *nul = memchr(name, 0, room);
    if (nul == NULL)
        return 0;
    size_t len = (size_t)(nul - name);
    char disk[KF_NAMES_ENCODED_MAX + 1];
    size_t disk_len = 0;
    int got = names_api->encode(sealer, name, len, disk, &disk_len);
    if (got != KF_NAME_OK || disk_len > NAME_MAX_BYTES) { /* refused, failed, a long name */
        PyErr_Clear();
        return 0;
    }
    disk[disk_len] = '\0';
    struct statx stx;
    /* the descriptor is the directory's own (a duplicate: it cannot come to
     * stand for another); removed, it has no entries, as the handler's
     * stat_at would find too.  Whether the name exists, nothing more: no
     * field asked for, nothing synced, so a mount point is not asked */
    if (statx(fd, disk, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | AT_STATX_DONT_SYNC, 0, &stx) == 0 ||
        errno != ENOENT)
        return 0; /* there (or unknown): the handler */
    PyObject *answer = PyObject_CallFunction(on_miss, "Ky#s#", (unsigned long long)nodeid, name,
                                             (Py_ssize_t)len, disk, (Py_ssize_t)disk_len);
    if (answer == NULL) {
        PyErr_Clear();
        return 0;
    }
    int cached = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    if (cached < 0) {
        PyErr_Clear();
        return 0;
    }
    if (!cached)
        return MISSING;
    /* as fs/ops.py's _missing gives it (dispatch.entry_bytes of a new
     * EntryAttributes): inode 0, pyfuse3's defaults, the timeouts */
    memset(out, 0, sizeof(*out));
    out->entry_valid = out->attr_valid = valid;
    out->entry_valid_nsec = out->attr_valid_nsec = valid_nsec;
    out->attr.mode = S_IFREG;
    out->attr.nlink = 1;
    out->attr.blksize = 4096;
    return MISSING_CACHED;
}
