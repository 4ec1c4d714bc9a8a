/*
 * The C interface of keyfence.fs._names (its capsule "_C_API"), for
 * keyfence.fs.fuse._loop: see _names.c.
 */
#ifndef KEYFENCE_NAMES_H
#define KEYFENCE_NAMES_H

#include <Python.h>

#define KF_NAMES_API_VERSION 1
#define KF_NAME_OK 0
#define KF_NAME_REFUSED 1
/* base64url of a 16-byte tag and a name padded to at most 255 bytes */
#define KF_NAMES_ENCODED_MAX 368

struct kf_names_api {
    int version;
    /* sealer: a NameSealer; with the GIL held.  KF_NAME_OK (out, *out_len
     * set), KF_NAME_REFUSED, or -1 with an exception set. */
    int (*encode)(PyObject *sealer, const unsigned char *name, size_t len, char *out,
                  size_t *out_len);
};

#endif
