/*
 * keyfence.fs._sealer: the contents records of docs/format.md, a batch per
 * call, with the GIL released (optional; keyfence/fs/sealer.py picks it).
 *
 * A record is nonce(12) || AES-256-GCM(file key, nonce, block,
 * aad = file_id(16) || u64be(index)) || tag(16); records lie back to back,
 * 4124 bytes each, only the last may be shorter.  The format is fs/format.py's;
 * this file only does the same work without one Python call per block.
 *
 * The AES-GCM is OpenSSL's EVP, or, on CPUs with VAES and VPCLMULQDQ,
 * _gcm_vaes.c's (1.9x as fast here), used only once its self test against
 * OpenSSL passed at import (gcm_self_test; KEYFENCE_NO_VAES=1 keeps OpenSSL).
 *
 * Key material: the caller's key bytes object is read, never copied; the key
 * schedule lives in one EVP_CIPHER_CTX (or kf_gcm_ctx on the stack) made at
 * the start of a call and cleansed (EVP_CIPHER_CTX_free, OPENSSL_cleanse)
 * before the call returns, on every path.  Nothing here keeps a key between
 * calls (docs/security.md, "Key material in the native sealer").
 *
 * Threads: every buffer is exported (PyObject_GetBuffer) before the GIL is
 * released, so no other thread can resize or free it meanwhile; the
 * EVP_CIPHER object fetched at import is immutable and shared.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "_gcm_vaes.h"

#if defined(__x86_64__)
#include <emmintrin.h> /* SSE2: in every x86-64 */
#endif

#define BLOCK_SIZE 4096
#define NONCE_SIZE 12
#define TAG_SIZE 16
#define OVERHEAD (NONCE_SIZE + TAG_SIZE)
#define RECORD_SIZE (BLOCK_SIZE + OVERHEAD)
#define KEY_SIZE 32
#define FILE_ID_SIZE 16
#define AAD_SIZE (FILE_ID_SIZE + 8)

static EVP_CIPHER *aes_gcm; /* fetched once at import */

/* Which AES-GCM the loops use: _gcm_vaes.c where this CPU has VAES and its
 * self test against OpenSSL passed at import (gcm_vaes_ok), else OpenSSL.
 * Read once per call, with the GIL held, before the loop starts. */
static int gcm_vaes_ok, gcm_vaes_on;

static void pack_aad(unsigned char *aad, const unsigned char *file_id, uint64_t index)
{
    memcpy(aad, file_id, FILE_ID_SIZE);
    for (int i = 7; i >= 0; i--) {
        aad[FILE_ID_SIZE + i] = (unsigned char)(index & 0xff);
        index >>= 8;
    }
}

static int all_zero(const unsigned char *p, Py_ssize_t n)
{
    unsigned char acc = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

/* Index k of a batch: consecutive from `first` (indexes given as an int) or
 * indexes[k], into out (NULL: only check the range).  Returns 0, or -1 with
 * ValueError set for an index outside 0 .. 2**64-1 (GIL held). */
static int read_indexes(PyObject *spec, Py_ssize_t count, uint64_t *out)
{
    if (PyLong_Check(spec)) {
        unsigned long long first = PyLong_AsUnsignedLongLong(spec);
        if (first == (unsigned long long)-1 && PyErr_Occurred())
            goto range;
        if (count > 0 && first > UINT64_MAX - (uint64_t)(count - 1))
            goto range;
        for (Py_ssize_t k = 0; out != NULL && k < count; k++)
            out[k] = (uint64_t)first + (uint64_t)k;
        return 0;
    }
    PyObject *seq = PySequence_Fast(spec, "indexes: an int or a sequence of ints");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != count) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "one index per block");
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t k = 0; k < count; k++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(items[k]);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            goto range;
        }
        out[k] = (uint64_t)v;
    }
    Py_DECREF(seq);
    return 0;
range:
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_OverflowError)
        && !PyErr_ExceptionMatches(PyExc_ValueError))
        return -1; /* a TypeError stays a TypeError */
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "block index out of range");
    return -1;
}

static int check_key(const Py_buffer *key, const Py_buffer *file_id)
{
    if (key->len != KEY_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a file key is 32 bytes");
        return -1;
    }
    if (file_id->len != FILE_ID_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a file id is 16 bytes");
        return -1;
    }
    return 0;
}

/* seal_loop on _gcm_vaes.c: the same records, no per-record set-up. */
static void seal_loop_vaes(const unsigned char *key, const unsigned char *file_id,
                           const unsigned char *nonces, const uint64_t *indexes,
                           const Py_buffer *blocks, Py_ssize_t count, unsigned char *out)
{
    kf_gcm_ctx ctx;
    unsigned char aad[AAD_SIZE];
    kf_gcm_init(&ctx, key);
    for (Py_ssize_t k = 0; k < count; k++) {
        unsigned char *record = out + k * RECORD_SIZE;
        size_t len = (size_t)blocks[k].len;
        pack_aad(aad, file_id, indexes[k]);
        memcpy(record, nonces + k * NONCE_SIZE, NONCE_SIZE);
        kf_gcm_seal(&ctx, record, aad, AAD_SIZE, blocks[k].buf, len, record + NONCE_SIZE,
                    record + NONCE_SIZE + len);
    }
    OPENSSL_cleanse(&ctx, sizeof ctx); /* round keys and hash key */
}

/* The sealing loop, without the GIL.  Returns 0, or -1 if OpenSSL failed. */
static int seal_loop(int vaes, const unsigned char *key, const unsigned char *file_id,
                     const unsigned char *nonces, const uint64_t *indexes,
                     const Py_buffer *blocks, Py_ssize_t count, unsigned char *out)
{
    if (vaes) {
        seal_loop_vaes(key, file_id, nonces, indexes, blocks, count, out);
        return 0;
    }
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int ok = ctx != NULL && EVP_EncryptInit_ex(ctx, aes_gcm, NULL, key, NULL) == 1;
    unsigned char aad[AAD_SIZE];
    for (Py_ssize_t k = 0; ok && k < count; k++) {
        unsigned char *record = out + k * RECORD_SIZE;
        const unsigned char *nonce = nonces + k * NONCE_SIZE;
        int len = (int)blocks[k].len, n = 0;
        pack_aad(aad, file_id, indexes[k]);
        memcpy(record, nonce, NONCE_SIZE);
        ok = EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) == 1
             && EVP_EncryptUpdate(ctx, NULL, &n, aad, AAD_SIZE) == 1
             && EVP_EncryptUpdate(ctx, record + NONCE_SIZE, &n, blocks[k].buf, len) == 1
             && EVP_EncryptFinal_ex(ctx, record + NONCE_SIZE + n, &n) == 1
             && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE,
                                    record + NONCE_SIZE + len) == 1;
    }
    EVP_CIPHER_CTX_free(ctx); /* cleanses the key schedule */
    return ok ? 0 : -1;
}

PyDoc_STRVAR(seal_doc,
"seal(key, file_id, nonces, indexes, blocks, out) -> int\n\n"
"Seal blocks[k] (4096 bytes each, the last 1..4096) as the record of block\n"
"indexes[k] (or first + k when indexes is an int) with nonce\n"
"nonces[12k:12k+12], into record slot k of the writable buffer out.\n"
"Returns the bytes of records written.  ValueError for a wrong key or file\n"
"id length, a block of the wrong size, too few nonces or too small a buffer.");

static PyObject *seal(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "seal takes 6 arguments");
        return NULL;
    }
    Py_buffer key = {0}, file_id = {0}, nonces = {0}, out = {0};
    Py_buffer *blocks = NULL;
    uint64_t *indexes = NULL;
    PyObject *seq = NULL, *result = NULL;
    Py_ssize_t count = 0, got = 0;

    if (PyObject_GetBuffer(args[0], &key, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[1], &file_id, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[2], &nonces, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[5], &out, PyBUF_WRITABLE) < 0)
        goto done;
    if (check_key(&key, &file_id) < 0)
        goto done;
    seq = PySequence_Fast(args[4], "blocks: a sequence of buffers");
    if (seq == NULL)
        goto done;
    count = PySequence_Fast_GET_SIZE(seq);
    if (count == 0) {
        result = PyLong_FromLong(0);
        goto done;
    }
    if (count > PY_SSIZE_T_MAX / RECORD_SIZE) {
        PyErr_SetString(PyExc_ValueError, "too many blocks");
        goto done;
    }
    if (nonces.len != count * NONCE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "one 12-byte nonce per block");
        goto done;
    }
    blocks = PyMem_Calloc((size_t)count, sizeof(Py_buffer));
    indexes = PyMem_Calloc((size_t)count, sizeof(uint64_t));
    if (blocks == NULL || indexes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (read_indexes(args[3], count, indexes) < 0)
        goto done;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (; got < count; got++) {
        if (PyObject_GetBuffer(items[got], &blocks[got], PyBUF_SIMPLE) < 0)
            goto done;
        Py_ssize_t len = blocks[got].len;
        if (got < count - 1 ? len != BLOCK_SIZE : (len < 1 || len > BLOCK_SIZE)) {
            got++; /* release this one too */
            PyErr_SetString(PyExc_ValueError,
                            "a block holds 4096 bytes (only the last 1..4096)");
            goto done;
        }
    }
    Py_ssize_t last = blocks[count - 1].len;
    Py_ssize_t total = (count - 1) * RECORD_SIZE + last + OVERHEAD;
    if (out.len < total) {
        PyErr_SetString(PyExc_ValueError, "output buffer too small");
        goto done;
    }
    int rc, vaes = gcm_vaes_on;
    Py_BEGIN_ALLOW_THREADS
    rc = seal_loop(vaes, key.buf, file_id.buf, nonces.buf, indexes, blocks, count, out.buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-256-GCM failed");
        goto done;
    }
    result = PyLong_FromSsize_t(total);
done:
    for (Py_ssize_t k = 0; k < got; k++)
        PyBuffer_Release(&blocks[k]);
    PyMem_Free(blocks);
    PyMem_Free(indexes);
    Py_XDECREF(seq);
    if (key.obj)
        PyBuffer_Release(&key);
    if (file_id.obj)
        PyBuffer_Release(&file_id);
    if (nonces.obj)
        PyBuffer_Release(&nonces);
    if (out.obj)
        PyBuffer_Release(&out);
    return result;
}

/* open_loop on _gcm_vaes.c. */
static Py_ssize_t open_loop_vaes(const unsigned char *key, const unsigned char *file_id,
                                 uint64_t first, const unsigned char *records, Py_ssize_t total,
                                 unsigned char *out)
{
    kf_gcm_ctx ctx;
    Py_ssize_t failed = -1, k = 0;
    unsigned char aad[AAD_SIZE];
    kf_gcm_init(&ctx, key);
    for (Py_ssize_t pos = 0; pos < total; pos += RECORD_SIZE, k++) {
        const unsigned char *record = records + pos;
        Py_ssize_t rlen = total - pos < RECORD_SIZE ? total - pos : RECORD_SIZE;
        size_t len = (size_t)(rlen - OVERHEAD);
        pack_aad(aad, file_id, first + (uint64_t)k);
        /* a failure leaves the slot zeroed: unauthenticated, never handed out */
        if (kf_gcm_open(&ctx, record, aad, AAD_SIZE, record + NONCE_SIZE, len,
                        out + k * BLOCK_SIZE, record + NONCE_SIZE + len) != 0
            && !all_zero(record, rlen)) {
            failed = k;
            break;
        }
    }
    OPENSSL_cleanse(&ctx, sizeof ctx); /* round keys and hash key */
    return failed;
}

/* The opening loop, without the GIL: -1 when every record opened (or was a
 * hole), else the position k of the first that failed (its plaintext slot is
 * zeroed), or -2 if OpenSSL failed. */
static Py_ssize_t open_loop(int vaes, const unsigned char *key, const unsigned char *file_id,
                            uint64_t first, const unsigned char *records, Py_ssize_t total,
                            unsigned char *out)
{
    if (vaes)
        return open_loop_vaes(key, file_id, first, records, total, out);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    Py_ssize_t failed = -1;
    int ok = ctx != NULL && EVP_DecryptInit_ex(ctx, aes_gcm, NULL, key, NULL) == 1;
    unsigned char aad[AAD_SIZE], tag[TAG_SIZE];
    Py_ssize_t k = 0;
    for (Py_ssize_t pos = 0; ok && pos < total; pos += RECORD_SIZE, k++) {
        const unsigned char *record = records + pos;
        Py_ssize_t rlen = total - pos < RECORD_SIZE ? total - pos : RECORD_SIZE;
        int len = (int)(rlen - OVERHEAD), n = 0;
        unsigned char *plain = out + k * BLOCK_SIZE;
        pack_aad(aad, file_id, first + (uint64_t)k);
        memcpy(tag, record + NONCE_SIZE + len, TAG_SIZE);
        ok = EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, record) == 1
             && EVP_DecryptUpdate(ctx, NULL, &n, aad, AAD_SIZE) == 1
             && EVP_DecryptUpdate(ctx, plain, &n, record + NONCE_SIZE, len) == 1
             && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, tag) == 1;
        if (!ok)
            break;
        if (EVP_DecryptFinal_ex(ctx, plain + n, &n) != 1) {
            memset(plain, 0, (size_t)len); /* unauthenticated: never handed out */
            if (!all_zero(record, rlen)) {
                failed = k;
                break;
            }
        }
    }
    EVP_CIPHER_CTX_free(ctx); /* cleanses the key schedule */
    return ok ? failed : -2;
}

PyDoc_STRVAR(open_doc,
"open(key, file_id, first, records, out) -> int\n\n"
"Open the records lying back to back in records (4124 bytes each, the last\n"
"29..4124) as blocks first, first+1, ..., into out (4096 bytes per block,\n"
"the last as long as its plaintext).  An all-zero record is a hole and reads\n"
"as zeros.  Returns -1, or the position of the first record that failed\n"
"authentication.  ValueError for bad lengths or too small a buffer.");

/* The checks open and open_new share (GIL held): key and file id, the
 * records' length, the first index.  Sets *count and *plain_len (bytes of
 * plaintext the records hold); -1 with an exception set on bad input. */
static int check_open_args(const Py_buffer *key, const Py_buffer *file_id, PyObject *first_obj,
                           const Py_buffer *records, uint64_t *first, Py_ssize_t *count,
                           Py_ssize_t *plain_len)
{
    if (check_key(key, file_id) < 0)
        return -1;
    Py_ssize_t total = records->len;
    Py_ssize_t n = total / RECORD_SIZE, rest = total % RECORD_SIZE;
    if (rest) {
        if (rest <= OVERHEAD) {
            PyErr_SetString(PyExc_ValueError, "the last record is truncated");
            return -1;
        }
        n++;
    }
    if (!PyLong_Check(first_obj)) {
        PyErr_SetString(PyExc_TypeError, "first: an int");
        return -1;
    }
    if (read_indexes(first_obj, n, NULL) < 0)
        return -1;
    *first = PyLong_AsUnsignedLongLong(first_obj);
    *count = n;
    *plain_len = total - n * OVERHEAD;
    return 0;
}

/* open (into the caller's buffer out_arg) and open_new (out_arg NULL: into
 * a new bytearray, not zeroed first, every byte of it written; all of it
 * zeroed when a record or OpenSSL fails, so what the heap held there, such
 * as another read's freed plaintext, never comes out). */
static PyObject *open_impl(PyObject *const *args, PyObject *out_arg)
{
    Py_buffer key = {0}, file_id = {0}, records = {0}, out = {0};
    PyObject *made = NULL, *result = NULL;
    uint64_t first = 0;
    Py_ssize_t count = 0, plain_len = 0;
    unsigned char *plain;

    if (PyObject_GetBuffer(args[0], &key, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[1], &file_id, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[3], &records, PyBUF_SIMPLE) < 0)
        goto done;
    if (out_arg != NULL && PyObject_GetBuffer(out_arg, &out, PyBUF_WRITABLE) < 0)
        goto done;
    if (check_open_args(&key, &file_id, args[2], &records, &first, &count, &plain_len) < 0)
        goto done;
    if (out_arg != NULL) {
        if (out.len < plain_len) {
            PyErr_SetString(PyExc_ValueError, "output buffer too small");
            goto done;
        }
        plain = out.buf;
    } else {
        made = PyByteArray_FromStringAndSize(NULL, plain_len);
        if (made == NULL)
            goto done;
        plain = (unsigned char *)PyByteArray_AS_STRING(made);
    }
    Py_ssize_t failed = -1;
    int vaes = gcm_vaes_on;
    if (count > 0) {
        Py_BEGIN_ALLOW_THREADS
        failed = open_loop(vaes, key.buf, file_id.buf, first, records.buf, records.len, plain);
        if (failed != -1 && made != NULL)
            memset(plain, 0, (size_t)plain_len); /* the slots after a failure were never written */
        Py_END_ALLOW_THREADS
    }
    if (failed == -2) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-256-GCM failed");
        goto done;
    }
    result = made != NULL ? Py_BuildValue("(nO)", failed, made) : PyLong_FromSsize_t(failed);
done:
    Py_XDECREF(made);
    if (key.obj)
        PyBuffer_Release(&key);
    if (file_id.obj)
        PyBuffer_Release(&file_id);
    if (records.obj)
        PyBuffer_Release(&records);
    if (out.obj)
        PyBuffer_Release(&out);
    return result;
}

static PyObject *open_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "open takes 5 arguments");
        return NULL;
    }
    return open_impl(args, args[4]);
}

PyDoc_STRVAR(open_new_doc,
"open_new(key, file_id, first, records) -> (int, bytearray)\n\n"
"open() into a new bytearray of exactly the records' plaintext, which is\n"
"not zeroed first: every byte of it is written (a hole as zeros).  Returns\n"
"(-1, plaintext), or (k, zeros) when record k failed authentication.");

static PyObject *open_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "open_new takes 4 arguments");
        return NULL;
    }
    return open_impl(args, NULL);
}

/* _gcm_vaes.c against OpenSSL, at import: records of every length class
 * (partial blocks, one and several registers, a whole block) byte for byte,
 * opened back, and a changed bit refused with the slot zeroed.  1 if all
 * agree. */
static int gcm_self_test(void)
{
    static const Py_ssize_t lens[] = {1, 15, 16, 17, 31, 32, 33, 127, 128, 129, 255, 256, 257, 1000, 4095, 4096};
    unsigned char key[KEY_SIZE], file_id[FILE_ID_SIZE], nonce[NONCE_SIZE];
    unsigned char data[BLOCK_SIZE], plain[BLOCK_SIZE], a[RECORD_SIZE], b[RECORD_SIZE];
    for (int i = 0; i < KEY_SIZE; i++)
        key[i] = (unsigned char)(0xa5 ^ (i * 29));
    for (int i = 0; i < FILE_ID_SIZE; i++)
        file_id[i] = (unsigned char)(i * 7 + 3);
    for (int i = 0; i < BLOCK_SIZE; i++)
        data[i] = (unsigned char)(i * 37 + (i >> 8) + 11);
    for (size_t t = 0; t < sizeof lens / sizeof lens[0]; t++) {
        Py_ssize_t len = lens[t];
        Py_buffer block = {0};
        block.buf = data;
        block.len = len;
        uint64_t index = UINT64_C(0x0102030405060708) * (uint64_t)(t + 1);
        for (int i = 0; i < NONCE_SIZE; i++)
            nonce[i] = (unsigned char)(t * 13 + i);
        if (seal_loop(0, key, file_id, nonce, &index, &block, 1, a) != 0)
            return 0;
        seal_loop_vaes(key, file_id, nonce, &index, &block, 1, b);
        if (memcmp(a, b, (size_t)(len + OVERHEAD)) != 0)
            return 0;
        if (open_loop_vaes(key, file_id, index, a, len + OVERHEAD, plain) != -1
            || memcmp(plain, data, (size_t)len) != 0)
            return 0;
        a[NONCE_SIZE + len / 2] ^= 1;
        if (open_loop_vaes(key, file_id, index, a, len + OVERHEAD, plain) != 0
            || !all_zero(plain, len))
            return 0;
    }
    return 1;
}

/* Zero n bytes at p with stores that bypass the cache where the CPU has
 * them: a 1 MiB buffer of pages written back is not read again, and a
 * plain memset first reads every line it writes (4x the time here,
 * docs/performance.md part 13).  The fence makes the zeros visible to
 * every CPU before the call returns. */
static void stream_zero(unsigned char *p, size_t n)
{
#if defined(__x86_64__)
    size_t head = (16 - ((uintptr_t)p & 15)) & 15;
    if (head > n)
        head = n;
    memset(p, 0, head);
    p += head;
    n -= head;
    size_t body = n & ~(size_t)63;
    const __m128i z = _mm_setzero_si128();
    for (size_t i = 0; i < body; i += 64) {
        _mm_stream_si128((__m128i *)(void *)(p + i), z);
        _mm_stream_si128((__m128i *)(void *)(p + i + 16), z);
        _mm_stream_si128((__m128i *)(void *)(p + i + 32), z);
        _mm_stream_si128((__m128i *)(void *)(p + i + 48), z);
    }
    _mm_sfence();
    memset(p + body, 0, n - body);
#else
    memset(p, 0, n);
#endif
}

PyDoc_STRVAR(zero_doc,
"zero(buffer) -> None\n\n"
"Overwrite a writable buffer with zeros, bypassing the CPU cache where it\n"
"can (fs/wipe.py uses it for large buffers); the GIL is released for 64 KiB\n"
"and more.");

static PyObject *zero(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (b.len >= (1 << 16)) {
        Py_BEGIN_ALLOW_THREADS
        stream_zero(b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    } else {
        stream_zero(b.buf, (size_t)b.len);
    }
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_gcm_doc,
"set_gcm(name) -> str\n\n"
"Use 'vaes' (this file's AES-GCM, where the CPU has it and its self test\n"
"passed) or 'openssl' for the calls that follow; returns the name used\n"
"before.  ValueError for 'vaes' where it is not available.  For tests and\n"
"benchmarks: both make the same records.");

static PyObject *gcm_name(void)
{
    return PyUnicode_FromString(gcm_vaes_on ? "vaes" : "openssl");
}

static PyObject *set_gcm(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (name == NULL) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "set_gcm takes 'vaes' or 'openssl'");
        return NULL;
    }
    PyObject *before = gcm_name();
    if (before == NULL)
        return NULL;
    if (strcmp(name, "openssl") == 0) {
        gcm_vaes_on = 0;
    } else if (strcmp(name, "vaes") == 0 && gcm_vaes_ok) {
        gcm_vaes_on = 1;
    } else {
        Py_DECREF(before);
        PyErr_SetString(PyExc_ValueError, strcmp(name, "vaes") == 0
                                              ? "no VAES AES-GCM on this CPU or build"
                                              : "set_gcm takes 'vaes' or 'openssl'");
        return NULL;
    }
    return before;
}

PyDoc_STRVAR(gcm_doc, "gcm() -> str\n\nThe AES-GCM in use: 'vaes' or 'openssl'.");

static PyObject *gcm(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return gcm_name();
}

static PyMethodDef methods[] = {
    {"gcm", gcm, METH_NOARGS, gcm_doc},
    {"set_gcm", set_gcm, METH_O, set_gcm_doc},
    {"zero", zero, METH_O, zero_doc},
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL, seal_doc},
    {"open", (PyCFunction)(void (*)(void))open_records, METH_FASTCALL, open_doc},
    {"open_new", (PyCFunction)(void (*)(void))open_new, METH_FASTCALL, open_new_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sealer",
    "Batch AES-256-GCM sealing of keyfence contents records (OpenSSL, GIL released).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sealer(void)
{
    if (aes_gcm == NULL) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        aes_gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL); /* no implicit fetch per call */
#else
        aes_gcm = (EVP_CIPHER *)EVP_aes_256_gcm();
#endif
        if (aes_gcm == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no AES-256-GCM");
            return NULL;
        }
    }
    const char *no_vaes = getenv("KEYFENCE_NO_VAES"); /* set, not "" or "0": OpenSSL only */
    int vaes_wanted = no_vaes == NULL || no_vaes[0] == '\0' || strcmp(no_vaes, "0") == 0;
    if (!gcm_vaes_ok && vaes_wanted && kf_gcm_usable())
        gcm_vaes_on = gcm_vaes_ok = gcm_self_test();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
