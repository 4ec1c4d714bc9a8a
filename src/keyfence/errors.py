"""Errors of the key retention model, each carrying the kernel's errno.

Every failing operation raises :class:`KeyfenceError` (an :class:`OSError`),
so a caller sees the same ``errno`` the kernel's keyctl(2) would return and
the same message (``ENOKEY`` -> "Required key not available").  Messages
never contain payloads; they may name a key by serial or description.
"""

from __future__ import annotations

import errno as _errno
import posix  # not os: kfctl's start-up (os costs it 1.7 ms)


class KeyfenceError(OSError):
    """A keyring operation failed with the kernel's errno.

    ``detail`` is an optional explanation added after the kernel's text,
    e.g. the watcher that aborted a removal.
    """

    def __init__(self, code: int, detail: str | None = None) -> None:
        message = posix.strerror(code)
        if detail:
            message = f"{message}: {detail}"
        super().__init__(code, message)
        self.detail = detail

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno or 0, str(self.errno))


def fail(code: int, detail: str | None = None) -> KeyfenceError:
    """Build the error to raise: ``raise fail(errno.ENOKEY)``."""
    return KeyfenceError(code, detail)
