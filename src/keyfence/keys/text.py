"""Descriptions, names and callout info: bytes to the kernel, text here.

The kernel takes a key's description, a keyring's name, a type name and
request_key's callout info as C strings: any bytes but NUL, UTF-8 or not
(``keyctl add user $'caf\\xe9' x @s`` works).  keyfence keeps them as
``str``; bytes that are not UTF-8 are held as lone surrogates, the way
Python decodes ``argv`` and file names (``surrogateescape``), and travel
the wire as msgpack's "text that is not UTF-8" extension
(docs/protocol.md).  Every limit counts the caller's bytes, as the
kernel's does.
"""

from __future__ import annotations

__all__ = ["as_bytes"]


def as_bytes(text: str) -> bytes:
    """The bytes the caller gave for ``text``."""
    return text.encode("utf-8", "surrogateescape")
