/*
 * keyfence.fs.fuse._ring: one FUSE request queue served through io_uring
 * (Linux 6.14 and later, the fuse module's enable_uring; the kernel's
 * Documentation/filesystems/fuse-io-uring.rst).
 *
 * The kernel keeps one queue per possible CPU and puts a request on the
 * queue of the CPU its caller runs on.  A Ring is one such queue's io_uring
 * with `depth` entries registered on it; fs/fuse/ring.py serves it from a
 * thread pinned to that CPU, so a request is answered where its caller
 * waits: the caller is woken on the CPU it slept on, not on an idle one
 * (docs/performance.md, parts 14 and 27).
 *
 * serve() is that thread's loop, in C as _loop.c is for /dev/fuse: wait
 * for a request (the GIL let go), take the session's serving lock, drive
 * the handler (_drive.c: the same handlers, tables and answers), answer by
 * committing the entry (queued: the next wait sends it), let the lock go.
 * Everything else goes back to fs/fuse/ring.py with a status:
 *
 *   WOKEN       the wake-up eventfd was written (finished handlers to
 *               commit, or the loop is stopping)
 *   GONE        every entry came back with an error: the connection ended
 *               (n: the last error, negative)
 *   SUSPENDED   a handler yielded (entry, coro, value, unique, opcode):
 *               fs/fuse/ring.py moves it to the trio thread
 *   FAILED      a handler raised something other than FUSEError
 *               (entry, exception, unique, opcode)
 *   ANSWER      an answer that is not a list of buffers (entry, answer,
 *               unique, opcode)
 *
 * An entry is one mapping slot: a page whose start holds the kernel's
 * struct fuse_uring_req_header (fuse_in/out_header, the op's own header,
 * fuse_uring_ent_in_out) and, right after it, the payload buffer.  Before a
 * request is handed to a handler, its fuse_in_header and op header are
 * copied into the end of the first page, just before the payload, so that
 * the request reads as one run of bytes exactly as /dev/fuse gives it.
 *
 * Plaintext: a WRITE's data and a READ's answer pass through the payload.
 * Every commit first zeroes what the entry held (the request and the
 * previous answer); close() zeroes every entry; the mapping is excluded
 * from core dumps.  Memory safety: the Ring exports its mapping through the
 * buffer protocol and unmaps only when the last view of it is gone.
 *
 * Threads: a Ring is made, served and committed to by one thread
 * (IORING_SETUP_SINGLE_ISSUER); only wake_fd is written from others.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_awake.h"
#include "_drive.h"

/* include/uapi/linux/fuse.h (7.42), not in older userspace headers */
#define KF_URING_IN_OUT_SZ 128
#define KF_URING_OP_IN_SZ 128
#define KF_CMD_REGISTER 1
#define KF_CMD_COMMIT_AND_FETCH 2
#define KF_IN_HEADER 40  /* struct fuse_in_header */
#define KF_OUT_HEADER 16 /* struct fuse_out_header */

struct kf_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};

struct kf_req_header {
    unsigned char in_out[KF_URING_IN_OUT_SZ];
    unsigned char op_in[KF_URING_OP_IN_SZ];
    struct kf_ent_in_out ent;
};

struct kf_cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

#define KF_PAGE 4096
#define KF_WAKE UINT64_MAX /* user_data of the wake-up read */

_Static_assert(sizeof(struct kf_req_header) == 288, "fuse_uring_req_header");
_Static_assert(sizeof(struct kf_req_header) + KF_IN_HEADER + KF_URING_OP_IN_SZ <= KF_PAGE,
               "the request's headers fit between the header and the payload");

struct kf_entry {
    struct kf_req_header *hdr;
    unsigned char *payload;
    struct iovec iov[2];
    size_t dirty;     /* payload bytes that may hold a request or an answer */
    uint64_t unique;  /* of the request held, 0 when the kernel has the entry */
    uint32_t opcode;  /* of the request held */
    uint64_t wipe;    /* the unique of an answer to zero once the kernel took it, or 0 */
};

typedef struct {
    PyObject_HEAD
    int ring_fd;
    int fuse_fd;
    int wake_fd;
    unsigned qid;
    unsigned depth;
    size_t payload_size;
    size_t slot_size;
    unsigned char *mem;
    size_t mem_size;
    void *sq_map;
    size_t sq_map_size;
    void *cq_map;
    size_t cq_map_size;
    unsigned char *sqes;
    size_t sqes_size;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_entries, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned to_submit;
    unsigned *to_wipe; /* entries whose answers are zeroed after the next submission */
    unsigned n_wipe;
    uint64_t wake_buf;
    struct kf_entry *ents;
    Py_ssize_t exports;
    int closed;
    unsigned live;    /* entries the kernel still has or gives requests in */
    long served;      /* requests driven here */
    long tabled;      /* of those, answered from a table */
    struct kf_awake *awake; /* the CPU's spinner (_awake.c), or NULL */
} Ring;

static int sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned submit, unsigned wait, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, submit, wait, flags, NULL, 0);
}

static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--)
        *v++ = 0;
}

static void zero(void *p, size_t n)
{
    /* the buffers are handed to the kernel afterwards: memset cannot be
       left out by the compiler; wipe() is for memory about to be unmapped */
    memset(p, 0, n);
}

/* The next free SQE (NULL: the submission ring is full). */
static struct io_uring_sqe *next_sqe(Ring *r)
{
    unsigned tail = *r->sq_tail;
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (tail - head >= *r->sq_entries)
        return NULL;
    unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(r->sqes + ((size_t)idx << 7));
    memset(sqe, 0, 128);
    r->sq_array[idx] = idx;
    return sqe;
}

static void push_sqe(Ring *r)
{
    __atomic_store_n(r->sq_tail, *r->sq_tail + 1, __ATOMIC_RELEASE);
    r->to_submit++;
}

static int queue_cmd(Ring *r, unsigned i, unsigned op, uint64_t commit_id)
{
    struct io_uring_sqe *sqe = next_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = r->fuse_fd;
    sqe->cmd_op = op;
    sqe->addr = (uint64_t)(uintptr_t)r->ents[i].iov;
    sqe->len = 2;
    sqe->user_data = i;
    struct kf_cmd_req *req = (struct kf_cmd_req *)((unsigned char *)sqe + 48);
    req->commit_id = commit_id;
    req->qid = (uint16_t)r->qid;
    push_sqe(r);
    return 0;
}

static int queue_wake_read(Ring *r)
{
    struct io_uring_sqe *sqe = next_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    sqe->opcode = IORING_OP_READ;
    sqe->fd = r->wake_fd;
    sqe->addr = (uint64_t)(uintptr_t)&r->wake_buf;
    sqe->len = sizeof(r->wake_buf);
    sqe->user_data = KF_WAKE;
    push_sqe(r);
    return 0;
}

static void unmap_all(Ring *r)
{
    if (r->mem != NULL && r->mem != MAP_FAILED) {
        wipe(r->mem, r->mem_size);
        munmap(r->mem, r->mem_size);
    }
    r->mem = NULL;
    if (r->sqes != NULL && (void *)r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_size);
    r->sqes = NULL;
    if (r->cq_map != NULL && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_size);
    r->cq_map = NULL;
    if (r->sq_map != NULL && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_size);
    r->sq_map = NULL;
    PyMem_Free(r->ents);
    r->ents = NULL;
    PyMem_Free(r->to_wipe);
    r->to_wipe = NULL;
}

static void close_fds(Ring *r)
{
    if (r->ring_fd >= 0)
        close(r->ring_fd);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    r->ring_fd = r->wake_fd = -1;
}

static int Ring_init(Ring *r, PyObject *args, PyObject *kw)
{
    static char *names[] = {"fuse_fd", "qid", "depth", "payload_size", NULL};
    int fuse_fd;
    unsigned qid, depth;
    Py_ssize_t payload;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iIIn", names, &fuse_fd, &qid, &depth, &payload))
        return -1;
    if (r->ents != NULL || r->ring_fd > 0) {
        PyErr_SetString(PyExc_RuntimeError, "a Ring is made once");
        return -1;
    }
    if (depth < 1 || depth > 256 || payload < KF_PAGE || payload > (64 << 20) || qid > 65535) {
        PyErr_SetString(PyExc_ValueError, "depth 1..256, payload_size 4 KiB..64 MiB, qid < 65536");
        return -1;
    }
    r->ring_fd = r->wake_fd = -1;
    r->fuse_fd = fuse_fd;
    r->qid = qid;
    r->depth = depth;
    r->payload_size = ((size_t)payload + KF_PAGE - 1) & ~(size_t)(KF_PAGE - 1);
    r->slot_size = KF_PAGE + r->payload_size;
    r->mem_size = r->slot_size * depth;

    struct io_uring_params p;
    unsigned entries = depth + 2; /* every entry's command and the wake-up read */
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    /* DEFER_TASKRUN (6.1+; FUSE over io_uring came in 6.14): the kernel then
       writes requests into the entries only inside this thread's own
       io_uring_enter calls, which submit_and_wipe() relies on */
    int fd = sys_setup(entries, &p);
    if (fd < 0)
        goto os_error;
    r->ring_fd = fd;

    r->sq_map_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_size > r->sq_map_size)
            r->sq_map_size = r->cq_map_size;
        r->cq_map_size = r->sq_map_size;
    }
    r->sq_map = mmap(NULL, r->sq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto os_error;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED)
            goto os_error;
    }
    r->sqes_size = (size_t)p.sq_entries * 128;
    r->sqes = mmap(NULL, r->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                   IORING_OFF_SQES);
    if ((void *)r->sqes == MAP_FAILED)
        goto os_error;
    unsigned char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_entries = (unsigned *)(sq + p.sq_off.ring_entries);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);

    r->wake_fd = eventfd(0, EFD_CLOEXEC);
    if (r->wake_fd < 0)
        goto os_error;
    r->mem = mmap(NULL, r->mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r->mem == MAP_FAILED)
        goto os_error;
    (void)madvise(r->mem, r->mem_size, MADV_DONTDUMP); /* plaintext passes here */
    r->ents = PyMem_Calloc(depth, sizeof(struct kf_entry));
    r->to_wipe = PyMem_Calloc(depth, sizeof(unsigned));
    if (r->ents == NULL || r->to_wipe == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (unsigned i = 0; i < depth; i++) {
        struct kf_entry *e = &r->ents[i];
        unsigned char *slot = r->mem + r->slot_size * i;
        e->hdr = (struct kf_req_header *)slot;
        e->payload = slot + KF_PAGE;
        e->iov[0].iov_base = e->hdr;
        e->iov[0].iov_len = sizeof(struct kf_req_header);
        e->iov[1].iov_base = e->payload;
        e->iov[1].iov_len = r->payload_size;
    }
    return 0;

os_error:
    PyErr_SetFromErrno(PyExc_OSError);
fail:
    unmap_all(r);
    close_fds(r);
    return -1;
}

static int check_open(Ring *r)
{
    if (r->closed || r->ents == NULL) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return -1;
    }
    return 0;
}

/* Send what is queued, without waiting (the GIL let go): 0 when all went,
   1 when the kernel took none now (completions to reap first), -1 with an
   error set. */
static int submit_all(Ring *r)
{
    while (r->to_submit > 0) {
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = sys_enter(r->ring_fd, r->to_submit, 0, 0);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EBUSY || errno == EAGAIN)
                return 1;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (n == 0)
            return 1;
        r->to_submit -= (unsigned)n < r->to_submit ? (unsigned)n : r->to_submit;
    }
    return 0;
}

static PyObject *submit_now(Ring *r)
{
    int sent = submit_all(r);
    if (sent < 0)
        return NULL;
    if (sent > 0) {
        errno = EBUSY;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* register(): every entry to the kernel, and the wake-up read. */
static PyObject *Ring_register(Ring *r, PyObject *Py_UNUSED(ignored))
{
    if (check_open(r) < 0)
        return NULL;
    for (unsigned i = 0; i < r->depth; i++)
        if (queue_cmd(r, i, KF_CMD_REGISTER, 0) < 0)
            return PyErr_Format(PyExc_RuntimeError, "submission ring full");
    if (queue_wake_read(r) < 0)
        return PyErr_Format(PyExc_RuntimeError, "submission ring full");
    r->live = r->depth;
    return submit_now(r);
}

static struct kf_entry *entry_arg(Ring *r, PyObject *arg, unsigned *index)
{
    if (check_open(r) < 0)
        return NULL;
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || (unsigned long)i >= r->depth) {
        PyErr_SetString(PyExc_IndexError, "no such entry");
        return NULL;
    }
    *index = (unsigned)i;
    return &r->ents[i];
}

#define OP_READLINK 5
#define OP_READ 15
#define OP_GETXATTR 22
#define OP_LISTXATTR 23
#define OP_READDIR 28
#define OP_READDIRPLUS 44

/* Answers holding file contents, names or values: zeroed as soon as the
   kernel has them, not left in the entry until its next request. */
static int carries_plaintext(uint32_t opcode)
{
    return opcode == OP_READ || opcode == OP_READDIR || opcode == OP_READDIRPLUS ||
           opcode == OP_GETXATTR || opcode == OP_LISTXATTR || opcode == OP_READLINK;
}

/* Answer entry i's request (error: 0 or a negative errno; parts: the
   answer) and give the entry back for the next one: queued, the next wait
   sends it.  What the entry held is zeroed first.  An answer larger than
   the entry's payload is refused with EIO, not cut (the kernel checks it
   against what the request asked for).  0, or -EBUSY when the
   submission ring is full (it holds every entry's command: never). */
static int commit_entry(Ring *r, unsigned i, int32_t error, Py_buffer *parts, int count)
{
    struct kf_entry *e = &r->ents[i];
    zero(e->payload - (KF_PAGE - sizeof(struct kf_req_header)),
         KF_PAGE - sizeof(struct kf_req_header));
    zero(e->payload, e->dirty);
    zero(e->hdr->op_in, KF_URING_OP_IN_SZ);
    size_t total = 0;
    for (int k = 0; k < count && error == 0; k++) {
        if ((size_t)parts[k].len > r->payload_size - total) {
            zero(e->payload, total);
            total = 0;
            error = -EIO;
        } else {
            memcpy(e->payload + total, parts[k].buf, (size_t)parts[k].len);
            total += (size_t)parts[k].len;
        }
    }
    e->dirty = total;
    uint32_t out_len = (uint32_t)(KF_OUT_HEADER + total);
    zero(e->hdr->in_out, KF_URING_IN_OUT_SZ);
    memcpy(e->hdr->in_out, &out_len, 4);
    memcpy(e->hdr->in_out + 4, &error, 4);
    memcpy(e->hdr->in_out + 8, &e->unique, 8);
    e->hdr->ent.payload_sz = (uint32_t)total;
    uint64_t unique = e->unique;
    e->unique = 0;
    if (total > 0 && carries_plaintext(e->opcode) && e->wipe == 0 && r->n_wipe < r->depth) {
        e->wipe = unique;
        r->to_wipe[r->n_wipe++] = i;
    }
    return queue_cmd(r, i, KF_CMD_COMMIT_AND_FETCH, unique);
}

/* commit(entry, error, parts): commit_entry() from Python (a handler that
   finished on the trio thread, or failed). */
static PyObject *Ring_commit(Ring *r, PyObject *args)
{
    PyObject *index, *parts;
    int error;
    if (!PyArg_ParseTuple(args, "OiO", &index, &error, &parts))
        return NULL;
    unsigned i;
    struct kf_entry *e = entry_arg(r, index, &i);
    if (e == NULL)
        return NULL;
    if (e->unique == 0) {
        PyErr_SetString(PyExc_ValueError, "the entry holds no request");
        return NULL;
    }
    if (error > 0 || error < -4095) {
        PyErr_SetString(PyExc_ValueError, "error: 0 or a negative errno");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(parts, "parts must be a sequence of buffers");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > INT_MAX / 2) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many parts");
        return NULL;
    }
    /* a directory listing is one part per entry: as many as it takes */
    Py_buffer *views = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(Py_buffer));
    if (views == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    int count = 0;
    for (; count < n; count++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, count), &views[count],
                               PyBUF_SIMPLE) < 0)
            break;
    }
    int got = count < n ? -1 : commit_entry(r, i, error, views, count);
    for (int k = 0; k < count; k++)
        PyBuffer_Release(&views[k]);
    PyMem_Free(views);
    Py_DECREF(seq);
    if (got == -1)
        return NULL;
    if (got < 0)
        return PyErr_Format(PyExc_RuntimeError, "submission ring full");
    Py_RETURN_NONE;
}

/* Entry i holds a request: lay it out as /dev/fuse gives it, just before
   the payload (*start, *len), and check its sizes: 0, or -1 when they do
   not add up (nothing copied then). */
static int lay_out(Ring *r, unsigned i, unsigned char **start, size_t *len)
{
    struct kf_entry *e = &r->ents[i];
    uint32_t n;
    memcpy(&n, e->hdr->in_out, sizeof(n));
    size_t payload = e->hdr->ent.payload_sz;
    size_t held = payload < r->payload_size ? payload : r->payload_size;
    if (e->dirty < held) /* what a longer answer left beyond it stays counted */
        e->dirty = held;
    e->wipe = 0; /* a request is in the entry: the answer before is overwritten or counted */
    memcpy(&e->opcode, e->hdr->in_out + 4, sizeof(e->opcode));
    if (n < KF_IN_HEADER || payload > r->payload_size || n - KF_IN_HEADER < payload ||
        n - KF_IN_HEADER - payload > KF_URING_OP_IN_SZ)
        return -1;
    size_t arg0 = n - KF_IN_HEADER - payload;
    *start = e->payload - arg0 - KF_IN_HEADER;
    memcpy(*start, e->hdr->in_out, KF_IN_HEADER);
    memcpy(*start + KF_IN_HEADER, e->hdr->op_in, arg0);
    *len = n;
    return 0;
}

struct ring_sink {
    Ring *r;
    unsigned entry;
};

static int answer_to_entry(void *sink, uint64_t Py_UNUSED(unique), int32_t error,
                           Py_buffer *parts, int count)
{
    struct ring_sink *s = sink;
    return commit_entry(s->r, s->entry, error, parts, count) < 0 ? EBUSY : 0;
}

enum { RS_WOKEN = 0, RS_GONE = 1, RS_SUSPENDED = 2, RS_FAILED = 3, RS_ANSWER = 4 };

#define OP_FORGET 2
#define OP_INIT 26
#define OP_BATCH_FORGET 42

/* Send what is queued without waiting, then zero the answers that carried
   plaintext (carries_plaintext()): the kernel copied each answer in the
   submission (a commit is taken inline), and it writes into an entry only
   within this thread's own io_uring_enter calls, so between two of them an
   entry whose header still holds the answer's unique has no new request:
   its payload is only the answer.  0, or -1 with an error set. */
static int submit_and_wipe(Ring *r)
{
    int sent = submit_all(r);
    if (sent != 0)
        return sent < 0 ? -1 : 0; /* not all sent: wiped after a later one */
    for (unsigned k = 0; k < r->n_wipe; k++) {
        struct kf_entry *e = &r->ents[r->to_wipe[k]];
        uint64_t now;
        memcpy(&now, e->hdr->in_out + 8, sizeof(now));
        if (e->wipe != 0 && e->unique == 0 && now == e->wipe) {
            zero(e->payload, e->dirty);
            e->dirty = 0;
        }
        e->wipe = 0;
    }
    r->n_wipe = 0;
    return 0;
}

/* Wait (the GIL let go) until the completion ring holds something, sending
   what is queued on the way: 0, or -1 with an error set. */
static int wait_for_completion(Ring *r)
{
    if (r->n_wipe > 0 && r->to_submit > 0 && submit_and_wipe(r) < 0)
        return -1;
    for (;;) {
        unsigned head = *r->cq_head;
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        if (head != tail && r->to_submit == 0)
            return 0;
        unsigned want = head != tail ? 0 : 1;
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = sys_enter(r->ring_fd, r->to_submit, want, IORING_ENTER_GETEVENTS);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return -1;
                continue;
            }
            if (errno == EBUSY || errno == EAGAIN) /* completions to reap first */
                return 0;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        r->to_submit -= (unsigned)n < r->to_submit ? (unsigned)n : r->to_submit;
        if (want == 0 || __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) != *r->cq_head)
            return 0;
    }
}

static PyObject *call_lock(PyObject *lock, const char *method)
{
    PyObject *name = PyUnicode_FromString(method);
    if (name == NULL)
        return NULL;
    PyObject *got = PyObject_CallMethodNoArgs(lock, name);
    Py_DECREF(name);
    return got;
}

/* One request in entry i, driven under the serving lock: NULL when done
   here (or with an error set), else the status tuple for Python. */
static PyObject *serve_entry(Ring *r, unsigned i, const struct drive_env *env, PyObject *view,
                             PyObject *lock)
{
    unsigned char *start;
    size_t n;
    struct in_header h;
    struct ring_sink sink = {.r = r, .entry = i};
    if (lay_out(r, i, &start, &n) < 0) {
        /* malformed by the kernel's own measure: refused, never guessed at */
        if (commit_entry(r, i, -EIO, NULL, 0) < 0)
            PyErr_SetString(PyExc_RuntimeError, "submission ring full");
        return NULL;
    }
    memcpy(&h, start, sizeof(h));
    if (h.len != n || h.opcode == OP_INIT || h.opcode == OP_FORGET ||
        h.opcode == OP_BATCH_FORGET) {
        /* these come through /dev/fuse; an answer the kernel expects none
           for would be refused */
        if (commit_entry(r, i, -ENOSYS, NULL, 0) < 0)
            PyErr_SetString(PyExc_RuntimeError, "submission ring full");
        return NULL;
    }
    PyObject *held = call_lock(lock, "acquire");
    if (held == NULL)
        return NULL;
    Py_DECREF(held);
    struct drive_out d;
    Py_ssize_t offset = (Py_ssize_t)(start - r->mem);
    int got = drive(env, &h, start, n, view, offset, answer_to_entry, &sink, &d);
    PyObject *out = NULL;
    if (got == DRIVE_NO_HANDLER || got == DRIVE_ERROR) {
        /* no handler: ENOSYS; a Python error before the handler ran (out of
           memory): EIO, and the error goes up (ring.py logs it) */
        if (commit_entry(r, i, got == DRIVE_ERROR ? -EIO : -ENOSYS, NULL, 0) < 0 &&
            !PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "submission ring full");
    } else {
        r->served++;
        r->tabled += d.tabled;
        if (got == DRIVE_SUSPENDED)
            out = Py_BuildValue("(iIOOOO)", RS_SUSPENDED, i, d.coro, d.value, d.unique,
                                d.opcode);
        else if (got == DRIVE_FAILED)
            out = Py_BuildValue("(iIOOOO)", RS_FAILED, i, d.value, d.unique, d.opcode, Py_None);
        else if (got == DRIVE_ANSWER)
            out = Py_BuildValue("(iIOOOO)", RS_ANSWER, i, d.value, d.unique, d.opcode, Py_None);
        else if (d.write_errno != 0)
            PyErr_SetString(PyExc_RuntimeError, "submission ring full");
        drive_out_clear(&d);
    }
    /* the lock goes whatever happened; an error set stays the one raised */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *released = call_lock(lock, "release");
    if (released == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return NULL;
    }
    Py_DECREF(released);
    PyErr_Restore(type, value, tb);
    return out;
}

/* serve(view, handlers, caller_type, fuse_error, by_opcode, lock, dirs,
   no_capability, on_miss) -> (status, entry, a, b, c, d): serve requests
   until something needs Python (the statuses at the top of this file). */
static PyObject *Ring_serve(Ring *r, PyObject *args)
{
    PyObject *view, *lock;
    struct drive_env env = {.dirs = Py_None, .no_capability = Py_None, .on_miss = Py_None};
    if (!PyArg_ParseTuple(args, "OOOOOO|OOO", &view, &env.handlers, &env.caller_type,
                          &env.fuse_error, &env.by_opcode, &lock, &env.dirs, &env.no_capability,
                          &env.on_miss))
        return NULL;
    if (drive_env_check(&env) < 0 || check_open(r) < 0)
        return NULL;
    for (;;) {
        if (wait_for_completion(r) < 0)
            return NULL;
        unsigned head = *r->cq_head;
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
            uint64_t user_data = c->user_data;
            int res = c->res;
            __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
            if (user_data == KF_WAKE) {
                if (queue_wake_read(r) < 0)
                    return PyErr_Format(PyExc_RuntimeError, "submission ring full");
                return Py_BuildValue("(iiOOOO)", RS_WOKEN, -1, Py_None, Py_None, Py_None,
                                     Py_None);
            }
            if (user_data >= r->depth)
                continue;
            unsigned i = (unsigned)user_data;
            if (res < 0) { /* the entry is the kernel's no more */
                if (r->live > 0)
                    r->live--;
                if (r->live == 0)
                    return Py_BuildValue("(iiOOOO)", RS_GONE, res, Py_None, Py_None, Py_None,
                                         Py_None);
                continue;
            }
            struct kf_entry *e = &r->ents[i];
            memcpy(&e->unique, e->hdr->in_out + 8, sizeof(e->unique));
            if (e->unique == 0)
                e->unique = 1; /* malformed: lay_out() refuses it */
            if (r->awake != NULL)
                awake_touch(r->awake);
            PyObject *out = serve_entry(r, i, &env, view, lock);
            if (out != NULL || PyErr_Occurred())
                return out;
        }
    }
}

/* close(): zero every entry and let the kernel go (the fds are closed; the
   mapping goes with the last view of it). */
static void stop_awake(Ring *r)
{
    struct kf_awake *a = r->awake;
    r->awake = NULL;
    if (a != NULL) {
        Py_BEGIN_ALLOW_THREADS
        awake_stop(a);
        Py_END_ALLOW_THREADS
    }
}

/* keep_awake(cpu, spin_ns): start the CPU's spinner (_awake.c); OSError
   when it cannot run at SCHED_IDLE there. */
static PyObject *Ring_keep_awake(Ring *r, PyObject *args)
{
    int cpu;
    long long spin_ns;
    if (!PyArg_ParseTuple(args, "iL", &cpu, &spin_ns))
        return NULL;
    if (check_open(r) < 0)
        return NULL;
    stop_awake(r);
    struct kf_awake *a;
    Py_BEGIN_ALLOW_THREADS
    a = awake_start(cpu, spin_ns);
    Py_END_ALLOW_THREADS
    if (a == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    r->awake = a;
    Py_RETURN_NONE;
}

static PyObject *Ring_close(Ring *r, PyObject *Py_UNUSED(ignored))
{
    stop_awake(r);
    if (!r->closed) {
        r->closed = 1;
        close_fds(r);
        if (r->mem != NULL)
            wipe(r->mem, r->mem_size);
        if (r->exports == 0)
            unmap_all(r);
    }
    Py_RETURN_NONE;
}

static int Ring_getbuffer(Ring *r, Py_buffer *view, int flags)
{
    if (r->mem == NULL) {
        PyErr_SetString(PyExc_BufferError, "the ring is closed");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)r, r->mem, (Py_ssize_t)r->mem_size, 1, flags) < 0)
        return -1;
    r->exports++;
    return 0;
}

static void Ring_releasebuffer(Ring *r, Py_buffer *Py_UNUSED(view))
{
    if (--r->exports == 0 && r->closed)
        unmap_all(r);
}

static void Ring_dealloc(Ring *r)
{
    awake_stop(r->awake);
    r->awake = NULL;
    close_fds(r);
    unmap_all(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Ring_new(PyTypeObject *type, PyObject *Py_UNUSED(a), PyObject *Py_UNUSED(k))
{
    Ring *r = (Ring *)type->tp_alloc(type, 0);
    if (r != NULL)
        r->ring_fd = r->wake_fd = r->fuse_fd = -1;
    return (PyObject *)r;
}

static PyObject *Ring_get_fd(Ring *r, void *Py_UNUSED(c)) { return PyLong_FromLong(r->ring_fd); }
static PyObject *Ring_get_wake_fd(Ring *r, void *Py_UNUSED(c)) { return PyLong_FromLong(r->wake_fd); }
static PyObject *Ring_get_served(Ring *r, void *Py_UNUSED(c)) { return PyLong_FromLong(r->served); }
static PyObject *Ring_get_tabled(Ring *r, void *Py_UNUSED(c)) { return PyLong_FromLong(r->tabled); }

static PyGetSetDef Ring_getset[] = {
    {"fd", (getter)Ring_get_fd, NULL, "the io_uring descriptor (-1 once closed)", NULL},
    {"wake_fd", (getter)Ring_get_wake_fd, NULL,
     "an eventfd: writing 1 to it from any thread ends serve() with WOKEN", NULL},
    {"served", (getter)Ring_get_served, NULL, "requests driven by serve()", NULL},
    {"tabled", (getter)Ring_get_tabled, NULL, "of those, answered from a table", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Ring_methods[] = {
    {"register", (PyCFunction)Ring_register, METH_NOARGS, "Give every entry to the kernel."},
    {"serve", (PyCFunction)Ring_serve, METH_VARARGS, "Serve requests until Python is needed."},
    {"commit", (PyCFunction)Ring_commit, METH_VARARGS, "Answer an entry's request."},
    {"keep_awake", (PyCFunction)Ring_keep_awake, METH_VARARGS, "Start the CPU's spinner."},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "Zero the entries, close the ring."},
    {NULL, NULL, 0, NULL},
};

static PyBufferProcs Ring_as_buffer = {
    (getbufferproc)Ring_getbuffer,
    (releasebufferproc)Ring_releasebuffer,
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keyfence.fs.fuse._ring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(fuse_fd, qid, depth, payload_size): one FUSE queue through io_uring.",
    .tp_new = Ring_new,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
    .tp_as_buffer = &Ring_as_buffer,
};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT, "_ring", "FUSE requests through io_uring (fs/fuse/ring.py serves them).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ring(void)
{
    if (answers_init() < 0 || PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ring_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddIntConstant(m, "WOKEN", RS_WOKEN) < 0 ||
        PyModule_AddIntConstant(m, "GONE", RS_GONE) < 0 ||
        PyModule_AddIntConstant(m, "SUSPENDED", RS_SUSPENDED) < 0 ||
        PyModule_AddIntConstant(m, "FAILED", RS_FAILED) < 0 ||
        PyModule_AddIntConstant(m, "ANSWER", RS_ANSWER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
