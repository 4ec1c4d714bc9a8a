"""Values drawn in other threads or in a forked child, handed back.

For tests of what must never be handed out twice (the block nonces'
batch, new files' spare keys: fs/crypto.py): across threads of one
process, and between a process and the children it forks.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

__all__ = ["drawn_in_threads", "from_a_forked_child"]


def drawn_in_threads(draw: Callable[[], bytes], *, threads: int, each: int) -> list[bytes]:
    """``each`` values from ``draw`` in each of ``threads`` threads run at
    once, all of them in one list."""
    seen: list[list[bytes]] = []

    def run() -> None:
        seen.append([draw() for _ in range(each)])

    started = [threading.Thread(target=run) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return [value for batch in seen for value in batch]


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
