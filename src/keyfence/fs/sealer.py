"""Which code seals and opens contents records: the native batch sealer or Python.

``keyfence.fs._sealer`` (C, OpenSSL's libcrypto, built by setup.py when a
compiler and OpenSSL's headers are there) seals or opens a whole batch of
records in one call with the GIL released, so the mount worker encrypts on
one core while another thread writes or reads on the other.  Without it
(not built, or ``KEYFENCE_NO_NATIVE=1`` in the environment) the same
records are made one ``cryptography`` call per block.  Both paths make
byte-identical records from the same nonces (tests/fs/test_sealer.py);
:class:`~keyfence.fs.crypto.FileCipher` picks :data:`NATIVE` when it is made.

``keyfence.fs._names`` (C, libcrypto) likewise encodes an encrypted
directory's entry names (:data:`NAMES`), under the same switch.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["DISABLE_ENV", "NAMES", "NATIVE", "describe", "load_native"]

DISABLE_ENV = "KEYFENCE_NO_NATIVE"
"""Set to a non-empty value other than ``0``: always the Python path."""


def load_native(name: str) -> ModuleType | None:
    """``keyfence.fs.<name>``, one of the optional C extensions, or None when
    it is not built or ``KEYFENCE_NO_NATIVE`` asks for the Python paths."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(f"keyfence.fs.{name}")
    except ImportError:  # not built (no compiler or no OpenSSL headers)
        return None


def _load() -> ModuleType | None:
    native = load_native("_sealer")
    if native is not None and not hasattr(native, "gcm"):  # built from an older _sealer.c
        return None
    return native


NATIVE: ModuleType | None = _load()
"""The native sealer module, or None for the Python path."""


NAMES: ModuleType | None = load_native("_names")
"""The native entry names (fs/_names.c: crypto.DirectoryCipher.names_sealer),
or None: names are encrypted through cryptography's AESSIV only."""


def describe() -> str:
    """The path in use, for logs and ``keyfence status``."""
    if NATIVE is not None:
        return f"native ({NATIVE.OPENSSL_VERSION}; AES-GCM: {NATIVE.gcm()})"
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"python ({DISABLE_ENV} set)"
    return "python (native sealer not built)"
