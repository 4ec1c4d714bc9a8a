/*
 * keyfence.fs._names: an encrypted directory's entry names, in C
 * (optional; keyfence/fs/crypto.py's DirectoryCipher uses it when built).
 *
 * A name's on-disk form is docs/format.md's: the name padded with NULs to
 * padded_name_length(len, padding), AES-256-SIV under the directory's
 * 64-byte names key with one associated-data component, the directory
 * nonce, written tag(16) || ciphertext, then base64url without '='.  This
 * file only does the same work as fs/crypto.py without a Python call per
 * step, so that the FUSE loop (fs/fuse/_loop.c) can answer a LOOKUP of a
 * missing name without a handler (docs/performance.md, part 17).
 *
 * NameSealer(key, dir_nonce, padding): one directory's.  Key material: the
 * key bytes are read once, into an EVP_CIPHER_CTX keyed at construction
 * (OpenSSL's memory, as cryptography's AESSIV keeps it); each name is
 * sealed in a copy of it, freed (cleansed by OpenSSL) before the call
 * returns.  wipe() (DirectoryCipher.wipe, fs/wipe.py) and the sealer's
 * end free the keyed context; a wiped sealer refuses to encode (the
 * caller falls back to what it did without it), never encodes wrong.
 *
 * The C interface for _loop.c is the capsule `_C_API`
 * (struct kf_names_api below): encode one name into a caller's buffer,
 * with the GIL held.  Nothing here releases the GIL: a name is a few
 * hundred nanoseconds of AES.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include <openssl/evp.h>

#include "_names.h"

#define NAMES_KEY_SIZE 64
#define DIR_NONCE_SIZE 16
#define TAG_SIZE 16
#define NAME_MAX_BYTES 255
#define PADDING_MIN 16

static EVP_CIPHER *aes_siv; /* fetched once at import */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *base; /* keyed at construction; NULL once wiped */
    unsigned char dir_nonce[DIR_NONCE_SIZE];
    int padding; /* 0 (format version 1) or 4, 8, 16, 32 */
} NameSealer;

static PyTypeObject NameSealer_Type;

static size_t padded_length(size_t n, int padding)
{
    if (padding == 0)
        return n;
    size_t at_least = n < PADDING_MIN ? PADDING_MIN : n;
    size_t rounded = (at_least + (size_t)padding - 1) / (size_t)padding * (size_t)padding;
    return rounded > NAME_MAX_BYTES ? NAME_MAX_BYTES : rounded;
}

static const char B64URL[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static size_t b64url(const unsigned char *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8 | in[i + 2];
        out[o++] = B64URL[v >> 18 & 63];
        out[o++] = B64URL[v >> 12 & 63];
        out[o++] = B64URL[v >> 6 & 63];
        out[o++] = B64URL[v & 63];
    }
    if (n - i == 1) {
        unsigned v = (unsigned)in[i] << 16;
        out[o++] = B64URL[v >> 18 & 63];
        out[o++] = B64URL[v >> 12 & 63];
    } else if (n - i == 2) {
        unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8;
        out[o++] = B64URL[v >> 18 & 63];
        out[o++] = B64URL[v >> 12 & 63];
        out[o++] = B64URL[v >> 6 & 63];
    }
    return o;
}

/* The encoded (full) name of `name` into out (KF_NAMES_ENCODED_MAX bytes),
 * its length in *out_len.  Returns KF_NAME_OK, KF_NAME_REFUSED (not a
 * single name of 1..255 bytes without '/' or NUL, "." or "..", or the key
 * was zeroed: the Python side decides), or -1 with an exception set. */
static int encode(PyObject *obj, const unsigned char *name, size_t n, char *out, size_t *out_len)
{
    if (!PyObject_TypeCheck(obj, &NameSealer_Type)) {
        PyErr_SetString(PyExc_TypeError, "not a NameSealer");
        return -1;
    }
    NameSealer *self = (NameSealer *)obj;
    if (n == 0 || n > NAME_MAX_BYTES || memchr(name, '/', n) || memchr(name, 0, n) ||
        (n == 1 && name[0] == '.') || (n == 2 && name[0] == '.' && name[1] == '.'))
        return KF_NAME_REFUSED;
    if (self->base == NULL)
        return KF_NAME_REFUSED; /* wiped */
    unsigned char padded[NAME_MAX_BYTES];
    size_t plen = padded_length(n, self->padding);
    memcpy(padded, name, n);
    memset(padded + n, 0, plen - n);
    unsigned char sealed[TAG_SIZE + NAME_MAX_BYTES];
    int ok = 0, len = 0, fin = 0;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx != NULL && EVP_CIPHER_CTX_copy(ctx, self->base) == 1 &&
        EVP_EncryptUpdate(ctx, NULL, &len, self->dir_nonce, DIR_NONCE_SIZE) == 1 &&
        EVP_EncryptUpdate(ctx, sealed + TAG_SIZE, &len, padded, (int)plen) == 1 &&
        EVP_EncryptFinal_ex(ctx, sealed + TAG_SIZE + len, &fin) == 1 &&
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, sealed) == 1)
        ok = (size_t)len + (size_t)fin == plen;
    EVP_CIPHER_CTX_free(ctx); /* cleanses the key schedule */
    OPENSSL_cleanse(padded, sizeof padded);
    if (!ok) {
        OPENSSL_cleanse(sealed, sizeof sealed);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-SIV failed");
        return -1;
    }
    *out_len = b64url(sealed, TAG_SIZE + plen, out);
    return KF_NAME_OK;
}

static PyObject *NameSealer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "dir_nonce", "padding", NULL};
    Py_buffer key, nonce;
    int padding;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*i", kwlist, &key, &nonce, &padding))
        return NULL;
    NameSealer *self = NULL;
    if (key.len != NAMES_KEY_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a names key is 64 bytes");
    } else if (nonce.len != DIR_NONCE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a directory nonce is 16 bytes");
    } else if (padding != 0 && padding != 4 && padding != 8 && padding != 16 && padding != 32) {
        PyErr_SetString(PyExc_ValueError, "name padding is 0, 4, 8, 16 or 32");
    } else if ((self = (NameSealer *)type->tp_alloc(type, 0)) != NULL) {
        memcpy(self->dir_nonce, nonce.buf, DIR_NONCE_SIZE);
        self->padding = padding;
        self->base = EVP_CIPHER_CTX_new();
        if (self->base == NULL || EVP_EncryptInit_ex(self->base, aes_siv, NULL, key.buf, NULL) != 1) {
            Py_CLEAR(self); /* dealloc frees base */
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-SIV set-up failed");
        }
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&nonce);
    return (PyObject *)self;
}

static void NameSealer_dealloc(NameSealer *self)
{
    EVP_CIPHER_CTX_free(self->base); /* cleansed by OpenSSL */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(wipe_doc, "wipe()\n\n"
                       "Free the key schedule (OpenSSL cleanses it); encode_name answers\n"
                       "None from then on.");

static PyObject *NameSealer_wipe(NameSealer *self, PyObject *Py_UNUSED(unused))
{
    EVP_CIPHER_CTX_free(self->base);
    self->base = NULL;
    Py_RETURN_NONE;
}

static PyObject *NameSealer_repr(NameSealer *self)
{
    return PyUnicode_FromFormat("<NameSealer padding=%d>", self->padding); /* no key, no nonce */
}

PyDoc_STRVAR(encode_name_doc,
             "encode_name(name, /) -> str | None\n\n"
             "The full encoded (base64url) name of `name`, as fs/crypto.py's\n"
             "DirectoryCipher.encrypt_name computes it before any long-name\n"
             "shortening; None for what is not one name of 1..255 bytes without\n"
             "'/' or NUL ('.' and '..' too), or once the key was zeroed.");

static PyObject *NameSealer_encode_name(NameSealer *self, PyObject *arg)
{
    Py_buffer name;
    if (PyObject_GetBuffer(arg, &name, PyBUF_SIMPLE) < 0)
        return NULL;
    char out[KF_NAMES_ENCODED_MAX];
    size_t n = 0;
    int got = encode((PyObject *)self, name.buf, (size_t)name.len, out, &n);
    PyBuffer_Release(&name);
    if (got < 0)
        return NULL;
    if (got == KF_NAME_REFUSED)
        Py_RETURN_NONE;
    return PyUnicode_DecodeASCII(out, (Py_ssize_t)n, "strict");
}

static PyMethodDef NameSealer_methods[] = {
    {"encode_name", (PyCFunction)NameSealer_encode_name, METH_O, encode_name_doc},
    {"wipe", (PyCFunction)NameSealer_wipe, METH_NOARGS, wipe_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject NameSealer_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "keyfence.fs._names.NameSealer",
    .tp_basicsize = sizeof(NameSealer),
    .tp_dealloc = (destructor)NameSealer_dealloc,
    .tp_repr = (reprfunc)NameSealer_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One encrypted directory's name encoder (see the module's source).",
    .tp_methods = NameSealer_methods,
    .tp_new = NameSealer_new,
};

static struct kf_names_api api = {.version = KF_NAMES_API_VERSION, .encode = encode};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_names",
    "Encrypted entry names of keyfence directories (OpenSSL AES-256-SIV).",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__names(void)
{
    if (aes_siv == NULL) {
        aes_siv = EVP_CIPHER_fetch(NULL, "AES-256-SIV", NULL);
        if (aes_siv == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no AES-256-SIV");
            return NULL;
        }
    }
    if (PyType_Ready(&NameSealer_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *capsule = PyCapsule_New(&api, "keyfence.fs._names._C_API", NULL);
    if (capsule == NULL || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&NameSealer_Type);
    if (PyModule_AddObject(m, "NameSealer", (PyObject *)&NameSealer_Type) < 0) {
        Py_DECREF(&NameSealer_Type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
