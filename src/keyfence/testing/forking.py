"""What a child made by ``os.fork`` computes, handed back to its parent.

For tests of state a process must not share with its forked children
(the block nonces' batch, new files' spare keys: fs/crypto.py).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

__all__ = ["from_a_forked_child"]


def from_a_forked_child(make: Callable[[], bytes]) -> bytes:
    """Fork; the child runs ``make`` and writes its bytes to a pipe, then
    exits at once (``os._exit``: none of the parent's clean-up runs twice).
    Returns what the child wrote (nothing if ``make`` raised)."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # 3.12+ warns about fork() when other tests left threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_fd)
            os.write(write_fd, make())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    return out
