"""Blocking calls (fsync, a big write-back) from a handler of keyfence's own loop.

``trio.to_thread.run_sync`` costs a lone client about 160 us a call on the
reference machine (a thread woken through trio's thread cache, then the
trio thread woken through its wake-up socket and run loop); the fsync of a
SQLite page costs 200-500 us, and a SQLite transaction makes three.  Here:

1. The call goes to a small pool of threads of its own (started on first
   use, at most ``threads``) through a queue, with an eventfd to say it is
   done.
2. The trio thread then waits for that eventfd and ``/dev/fuse`` together in
   one blocking ``poll`` (the GIL let go) for at most ``direct_ms``: while no
   other request comes, the answer goes out as soon as the call returns,
   with no trio round in between.
3. A request arriving, or the call outlasting ``direct_ms``: the handler
   waits through trio instead (``wait_readable`` on the eventfd, shielded:
   a call that started is waited for, as ``trio.to_thread`` does), and the
   loop serves the request meanwhile.

Waiting directly holds up the trio thread's other work (timers, signals,
key removals arriving through ``trio.from_thread``) for at most
``direct_ms``.  A call that itself needed the trio thread (none does) would
be held up as long, never deadlocked.

Under io_uring (fs/fuse/ring.py) a handler may run on a CPU queue's
thread: there 2. waits on that thread, the serving lock let go, for as long
as no other request comes on that queue, and 3. first moves the handler to
the trio thread.  The trio thread then waits through trio only
(:attr:`BlockingCalls.direct_on_loop` is False): requests no longer come
through the ``/dev/fuse`` it would watch, and it holds the serving lock.

The eventfd: the waiter closes it once it has seen it readable; a waiter
that gives up before (an exception) leaves it to the thread, which then
closes it instead of writing: a number already closed, maybe reused for a
backing file, is never written.
"""

from __future__ import annotations

import os
import queue
import select
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from keyfence.fs.fuse.handoff import current_queue, on_trio_thread

__all__ = ["BlockingCalls"]

T = TypeVar("T")

_ONE = (1).to_bytes(8, "little")


class _Call:
    __slots__ = ("abandoned", "args", "done", "error", "fd", "fn", "lock", "value")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.lock = threading.Lock()
        self.done = False
        self.abandoned = False
        self.value: Any = None
        self.error: BaseException | None = None


class BlockingCalls:
    """``await calls.run(fn, *args)``: ``fn(*args)`` on a thread of the pool
    (see the module doc); its value, or its exception raised here."""

    def __init__(self, fuse_fd: int, *, threads: int = 4, direct_ms: int = 5) -> None:
        self._waiter = select.poll()
        """``/dev/fuse`` and, while a call is waited for directly, its
        eventfd (the trio thread's only: one call waited for at a time)."""
        self._waiter.register(fuse_fd, select.POLLIN)
        self._max_threads = threads
        self._direct_ms = direct_ms
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self.direct = 0
        """Calls answered from the direct wait (a figure for tests)."""
        self.through_trio = 0
        """Calls that waited through trio."""
        self.direct_on_loop = True
        """Whether the trio thread waits directly (2.): not once requests
        come through io_uring."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        call = _Call(fn, args)
        self._submit(call)
        seen = False
        try:
            queue_thread = current_queue()
            if queue_thread is not None:
                direct = queue_thread.wait_directly(call.fd, self._direct_ms)
            else:
                direct = self.direct_on_loop and self._wait_directly(call)
            if direct:
                self.direct += 1
            else:
                self.through_trio += 1
                await on_trio_thread()
                with trio.CancelScope(shield=True):
                    await trio.lowlevel.wait_readable(call.fd)
            seen = True
        finally:
            with call.lock:
                if seen or call.done:
                    os.close(call.fd)
                else:
                    call.abandoned = True  # the thread closes it
        # nothing of the call outlives it here (its arguments and value may
        # hold key material: an emergency wipe looks for copies)
        error, value = call.error, call.value
        call.error = call.value = None
        if error is not None:
            try:
                raise error
            finally:
                del error
        return value  # type: ignore[no-any-return]

    def close(self) -> None:
        """Let the threads go once the queued calls are done."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)

    def _submit(self, call: _Call) -> None:
        with self._lock:
            # a thread more when the calls already waiting would take every
            # idle one
            start = self._idle <= self._queue.qsize() and len(self._threads) < self._max_threads
            if start:
                thread = threading.Thread(target=self._serve, name="keyfence-blocking", daemon=True)
                self._threads.append(thread)
        self._queue.put(call)
        if start:
            thread.start()

    def _wait_directly(self, call: _Call) -> bool:
        waiter = self._waiter
        waiter.register(call.fd, select.POLLIN)
        try:
            ready = waiter.poll(self._direct_ms)
        except InterruptedError:
            return False
        finally:
            waiter.unregister(call.fd)
        return any(fd == call.fd for fd, _ in ready)

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            call = self._queue.get()
            with self._lock:
                self._idle -= 1
            if call is None:
                return
            try:
                call.value = call.fn(*call.args)
            except BaseException as err:  # raised again in the waiting handler
                call.error = err
            with call.lock:
                call.done = True
                if call.abandoned:
                    os.close(call.fd)
                else:
                    os.write(call.fd, _ONE)
            call.fn = call.args = None  # type: ignore[assignment]
            del call  # nor in this thread's frame while it waits for the next
