"""Zeroing the plaintext and key bytes the worker lets go of (issue 11).

Python frees an object's memory without clearing it, so a decrypted page,
name or derived key lingers in the heap until something else happens to
be put there.  The worker zeroes what it drops, but only what nothing else
still uses: an object is zeroed by :func:`release` only when the caller's
list holds the last reference to it (``sys.getrefcount``).  A buffer
pyfuse3 is still replying from, a name a suspended request still holds, a
cipher a write-back thread is still encrypting with, is left alone (and
freed unzeroed later): zeroing it would corrupt data, which is worse.

What can be zeroed: ``bytes`` of two bytes or more (CPython keeps the
contents inline; the empty and one-byte objects are shared by the whole
interpreter and never touched), ``bytearray`` (and its subclasses), and
objects with a ``wipe()`` method (the ciphers: their key bytes).  ``str``
is not (names turned into text for reports stay until Python reuses them), nor
anything in OpenSSL's or libfuse's own memory.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import MutableSequence
from typing import Any

from keyfence.fs import sealer

__all__ = ["release", "zero"]


_ZEROS = memoryview(bytes(1 << 20))

_STREAM_FROM = 1 << 16
"""Buffers this large are zeroed by the native sealer's ``zero`` (stores
that bypass the cache, the GIL let go) where it is built: a write-back lets
go of whole 1 MiB write buffers, which nothing reads again."""

_stream_zero = getattr(sealer.NATIVE, "zero", None)


def zero(obj: Any) -> None:
    """Overwrite ``obj``'s contents with zeros, now, whoever uses it."""
    if isinstance(obj, bytearray):
        n = len(obj)
        if n >= _STREAM_FROM and _stream_zero is not None:
            _stream_zero(obj)
            return
        obj[:] = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)  # same size: in place
    elif type(obj) is bytes:
        if len(obj) > 1:
            ctypes.memset(ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p), 0, len(obj))
    else:
        wipe = getattr(obj, "wipe", None)
        if wipe is not None:
            wipe()


def _references_of_a_sole_owner(objects: MutableSequence[Any]) -> int:
    obj = objects.pop()  # exactly as in release(): the local and the argument
    return sys.getrefcount(obj)


_UNSHARED = _references_of_a_sole_owner([bytearray(1)])
"""What ``sys.getrefcount`` says in :func:`release` for an object nothing
else refers to (measured, not assumed: it differs between Python versions)."""


def release(objects: MutableSequence[Any], *, keep_shared: bool = False) -> int:
    """Empty ``objects``, zeroing each one no one else refers to; how many.

    ``keep_shared``: the objects still in use elsewhere stay in the list (to
    be released again later) instead of being let go unzeroed."""
    wiped = 0
    shared = []
    while objects:
        obj = objects.pop()
        if sys.getrefcount(obj) == _UNSHARED:
            zero(obj)
            wiped += 1
        elif keep_shared:
            shared.append(obj)
    objects.extend(shared)
    return wiped
