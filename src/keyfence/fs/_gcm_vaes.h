/*
 * AES-256-GCM with VAES and VPCLMULQDQ on 256-bit registers (x86-64), for
 * the native sealer (_sealer.c).  One context per call of the sealer, on its
 * stack, cleansed before the call returns; nothing here keeps a key.
 *
 * Only the forms the contents records use: a 12-byte nonce, a 16-byte tag,
 * at most 2**32 - 2 blocks of text (a record holds 256).  kf_gcm_usable()
 * says whether this CPU (and the compiler that built this file) has the
 * instructions; _sealer.c falls back to OpenSSL otherwise, and also when the
 * known-answer check at import (kf_gcm_self_test) fails.
 */
#ifndef KEYFENCE_GCM_VAES_H
#define KEYFENCE_GCM_VAES_H

#include <stddef.h>

#define KF_GCM_CTX_SIZE 1024 /* round keys, H^1..H^16 and their 256-bit pairs, aligned */

typedef struct {
    _Alignas(32) unsigned char bytes[KF_GCM_CTX_SIZE];
} kf_gcm_ctx;

/* 1 if this build and CPU can run the functions below. */
int kf_gcm_usable(void);

/* Expand a 32-byte key into ctx (round keys and the hash key's powers). */
void kf_gcm_init(kf_gcm_ctx *ctx, const unsigned char *key);

/* Seal len bytes of in into out (in == out allowed) with the 12-byte nonce
 * and aad; the 16-byte tag into tag. */
void kf_gcm_seal(const kf_gcm_ctx *ctx, const unsigned char *nonce, const unsigned char *aad,
                 size_t aad_len, const unsigned char *in, size_t len, unsigned char *out,
                 unsigned char *tag);

/* Open: 0 and the plaintext in out when tag matches (compared in constant
 * time), else -1 and out zeroed. */
int kf_gcm_open(const kf_gcm_ctx *ctx, const unsigned char *nonce, const unsigned char *aad,
                size_t aad_len, const unsigned char *in, size_t len, unsigned char *out,
                const unsigned char *tag);

#endif
