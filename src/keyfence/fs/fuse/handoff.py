"""Which thread a handler runs on, and how it moves to the trio thread.

Under keyfence's own loop a handler runs either on the trio thread or, when
the kernel hands requests over io_uring (fs/fuse/ring.py), on the thread of
the CPU queue its request came on.  Trio may only be called on the trio
thread, so a handler that is about to (a key lookup, a wait through trio)
first awaits :func:`on_trio_thread`: on the trio thread that is nothing; on
a queue thread the coroutine yields :data:`TO_TRIO`, the queue thread hands
it over, and the trio thread goes on driving it from there.

Handlers keep their one-thread contract (fs/ops.py): whoever steps one
holds the session's serving lock, so they still interleave only where they
``await``.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Coroutine, Generator
from typing import Any, Protocol

__all__ = ["TO_TRIO", "QueueThread", "current_queue", "on_trio_thread", "resume", "set_queue"]


class _ToTrio:
    __slots__ = ()

    def __repr__(self) -> str:
        return "TO_TRIO"


TO_TRIO = _ToTrio()
"""What a handler's coroutine yields on a queue thread to be moved to trio."""


class QueueThread(Protocol):
    """What a handler may ask of the queue thread it runs on."""

    def wait_directly(self, fd: int, timeout_ms: int) -> bool:
        """Wait for ``fd`` (a blocking call's eventfd) with the serving lock
        let go, at most ``timeout_ms`` and only while no other request of
        this queue waits: True when ``fd`` became readable."""
        ...


_local = threading.local()


def set_queue(queue: QueueThread | None) -> None:
    """Mark the calling thread as serving ``queue`` (None: no longer)."""
    _local.queue = queue


def current_queue() -> QueueThread | None:
    """The queue this thread serves, or None (the trio thread, any other)."""
    return getattr(_local, "queue", None)


@types.coroutine
def on_trio_thread() -> Generator[Any, Any, None]:
    """``await`` it before calling trio: returns on the trio thread."""
    if getattr(_local, "queue", None) is not None:
        yield TO_TRIO


@types.coroutine
def resume(coro: Coroutine[Any, Any, Any], trap: Any) -> Generator[Any, Any, Any]:
    """Go on driving ``coro``, which yielded ``trap`` in the current task:
    what trio sends (or throws) goes down, what ``coro`` yields goes up."""
    value = trap
    while True:
        try:
            sent = yield value
        except BaseException as exc:
            try:
                value = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value
