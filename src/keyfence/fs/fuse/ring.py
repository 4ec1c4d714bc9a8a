"""FUSE requests through io_uring: one queue per CPU, each served on a
thread pinned to its CPU (fs/fuse/_ring.c).

Why: the kernel puts a request on the queue of the CPU its caller runs on,
and the queue's thread answers it on that same CPU, so the caller is woken
where it slept.  Over ``/dev/fuse`` the one reader thread answers from
wherever it runs and the kernel wakes the caller on another, often idle
(halted) CPU: on a virtual machine that wake costs more than serving a small
request (docs/performance.md, parts 14, 26 and 27).  The kernel offers this
only with the fuse module's ``enable_uring`` (root's switch, off by
default); without it, or without io_uring, nothing here runs and the session
reads ``/dev/fuse`` alone.

Concurrency contract:

1. The handlers keep their one-thread contract (fs/ops.py) through one
   lock, the session's ``serving_lock``: a queue thread holds it while it
   steps a handler (in C, ``Ring.serve``), the trio thread during each of
   its task steps (:class:`LoopLock`, a trio instrument).  Handlers still
   interleave only where they ``await``.
2. ``Ring.serve`` waits for a request (the GIL and the lock let go), drives
   its handler as fs/fuse/_loop.c does (fs/fuse/_drive.c: the same tables
   and answers), and commits the answer in the same ``io_uring_enter`` that
   waits for the next request.  A handler about to call trio awaits
   :func:`~keyfence.fs.fuse.handoff.on_trio_thread`, which yields
   ``TO_TRIO``: ``serve`` returns it here and the coroutine is handed to
   the trio thread, which drives it to its end; the answer comes back
   through the queue's ``wake_fd`` and is committed by the queue thread (the
   ring's only submitter).  Trio is never called from a queue thread.
3. While requests come, a spinner at SCHED_IDLE keeps the queue's
   neighbouring CPU busy for up to ``spin_us`` after the last one
   (fs/fuse/_awake.c): the scheduler then finds no idle CPU to move the
   answered caller to, and it stays on its own, beside the queue's thread.
4. A blocking call (fs/fuse/blocking.py) is waited for on the queue thread
   with the lock let go (:meth:`_Queue.wait_directly`) while nothing else
   arrives for the queue, for at most ``direct_ms``; then as in 2.
5. ``/dev/fuse`` is still read on the trio thread: INIT, FORGET and
   INTERRUPT come there, and every request until all queues are registered.
6. Every answer zeroes what its entry held (fs/fuse/_ring.c).

Errors: a queue that cannot be made before INIT is answered means no
io_uring for this mount (:meth:`Queues.prepare` says False and INIT does not
ask for it).  After that the kernel waits for every queue; a registration
the kernel refuses turns io_uring off for the connection and the requests
come through ``/dev/fuse`` again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import threading
from collections.abc import Coroutine
from typing import Any, Protocol

import trio
from pyfuse3 import FUSEError

from keyfence.fs.fuse import protocol as p
from keyfence.fs.fuse.dir_attrs import DirectoryAttributes
from keyfence.fs.fuse.dispatch import Answer, Caller, error_code
from keyfence.fs.fuse.handoff import TO_TRIO, resume, set_queue

try:
    from keyfence.fs.fuse import _ring
except ImportError:  # built without it (setup.py: optional)
    _ring = None  # type: ignore[assignment]

__all__ = ["LoopLock", "QueuedSession", "Queues", "available", "possible_cpus"]

log = logging.getLogger("keyfence.fs.fuse")

_ONE = (1).to_bytes(8, "little")
_GONE = (-errno.ENOTCONN, -errno.ECONNABORTED, -errno.ECANCELED, -errno.ENODEV)
PAYLOAD_SIZE = p.MAX_WRITE
"""The kernel asks each entry for max(max_write, max_pages pages, 8 KiB)."""


def available() -> bool:
    """Whether this build has the io_uring queue (``_ring``)."""
    return _ring is not None


def possible_cpus(text: str | None = None) -> int:
    """How many queues the kernel makes: its possible CPUs."""
    if text is None:
        try:
            with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
                text = f.read()
        except OSError:
            return os.cpu_count() or 1
    highest = -1
    for part in text.strip().split(","):
        if part:
            highest = max(highest, int(part.rpartition("-")[2]))
    return highest + 1 if highest >= 0 else 1


class _Options(Protocol):
    spin_ns: int


class QueuedSession(Protocol):
    """What the queues use of their session (fs/fuse/session.py's
    ``Session``, which makes them: a protocol here, not an import back)."""

    fd: int
    handlers: dict[int, Any]
    by_opcode: list[int]
    serving_lock: threading.Lock
    dir_attributes: DirectoryAttributes | None
    no_capability: set[int] | None
    waiting: set[int]

    @property
    def options(self) -> _Options: ...


class LoopLock(trio.abc.Instrument):
    """Holds the serving lock during every trio task step (contract 1)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.held = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.lock.acquire()
        self.held = True

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.held:
            self.held = False
            self.lock.release()

    def hold_now(self) -> None:
        """In the task step that installs this instrument: hold it already."""
        self.lock.acquire()
        self.held = True


class Queues:
    """Every CPU's queue of one session."""

    def __init__(self, session: QueuedSession, *, depth: int = 8, direct_ms: int = 5) -> None:
        self.session = session
        self.depth = depth
        self.direct_ms = direct_ms
        self.stopping = False
        self.queues: list[_Queue] = []
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None

    def prepare(self, nursery: trio.Nursery, count: int | None = None) -> bool:
        """On the trio thread, before INIT is answered: make every queue's
        ring (each on its own thread, pinned to its CPU).  False when one
        could not be made: then none is used."""
        if _ring is None:
            return False
        self.token = trio.lowlevel.current_trio_token()
        self.nursery = nursery
        for qid in range(count if count is not None else possible_cpus()):
            q = _Queue(self, qid)
            self.queues.append(q)
            q.thread.start()
        for q in self.queues:
            if not q.made.wait(5) or q.ring is None:
                log.info("FUSE over io_uring not used: queue %d: %s", q.qid, q.error or "timed out")
                self.stop()
                return False
        return True

    def start(self) -> None:
        """After INIT was answered: register every queue with the kernel."""
        for q in self.queues:
            q.go.set()

    def stop(self) -> None:
        """Let the threads go (any thread); the session's end calls it."""
        self.stopping = True
        for q in self.queues:
            q.go.set()
            q.wake()
        for q in self.queues:
            if q.thread is not threading.current_thread():
                q.thread.join(2)

    def statistics(self) -> dict[str, list[int]]:
        """Requests served, answered from tables, moved to trio and waited
        for directly, per queue."""
        return {
            "served": [q.served for q in self.queues],
            "tabled": [q.tabled for q in self.queues],
            "to_trio": [q.to_trio for q in self.queues],
            "direct_waits": [q.direct_waits for q in self.queues],
        }


class _Queue:
    """One CPU's queue: its ring and the thread that serves it."""

    def __init__(self, queues: Queues, qid: int) -> None:
        self.queues = queues
        self.session = queues.session
        self.qid = qid
        self.ring: Any = None
        self.error: BaseException | None = None
        self.made = threading.Event()
        self.go = threading.Event()
        self.finished: queue.SimpleQueue[tuple[int, int, Answer]] = queue.SimpleQueue()
        self._wake_lock = threading.Lock()
        self._closed = False
        self.to_trio = 0
        self.direct_waits = 0
        self.thread = threading.Thread(target=self._run, name=f"keyfence-fuse-q{qid}", daemon=True)

    @property
    def served(self) -> int:
        return int(self.ring.served) if self.ring is not None else 0

    @property
    def tabled(self) -> int:
        return int(self.ring.tabled) if self.ring is not None else 0

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # an offline CPU: unpinned
            os.sched_setaffinity(0, {self.qid})
        try:
            self.ring = _ring.Ring(self.session.fd, self.qid, self.queues.depth, PAYLOAD_SIZE)
        except (OSError, ValueError, RuntimeError) as err:
            self.error = err
            self.made.set()
            return
        self.made.set()
        self.go.wait()
        ring = self.ring
        view = memoryview(ring)
        set_queue(self)
        try:
            if not self.queues.stopping:
                self._serve(ring, view)
        except Exception:
            log.exception("FUSE queue %d failed", self.qid)
        finally:
            set_queue(None)
            with self._wake_lock:
                self._closed = True
                ring.close()
            with contextlib.suppress(BufferError):  # a handler on trio still holds its body
                view.release()

    def _serve(self, ring: Any, view: memoryview) -> None:
        try:
            ring.register()
        except OSError as err:
            log.warning("FUSE queue %d not registered: %s", self.qid, err)
            return
        s = self.session
        if s.options.spin_ns > 0 and len(self.queues.queues) > 1:  # contract 3
            neighbour = (self.qid + 1) % len(self.queues.queues)
            try:
                ring.keep_awake(neighbour, s.options.spin_ns)
            except OSError as err:
                log.info("FUSE queue %d: CPU %d not kept busy: %s", self.qid, neighbour, err)
        dirs = s.dir_attributes.table if s.dir_attributes is not None else None
        on_miss = s.dir_attributes.on_miss if s.dir_attributes is not None else None
        args = (
            view, s.handlers, Caller, FUSEError, s.by_opcode, s.serving_lock,
            dirs, s.no_capability, on_miss,
        )  # fmt: skip
        while not self.queues.stopping:
            try:
                status, entry, a, b, c, d = ring.serve(*args)
            except MemoryError:  # the request was answered EIO; the queue goes on
                log.exception("FUSE queue %d", self.qid)
                continue
            if status == _ring.WOKEN:
                self._commit_finished(ring)
            elif status == _ring.SUSPENDED:  # a: coro, b: what it yielded, c: unique, d: opcode
                self._suspended(ring, entry, a, b, c, d)
            elif status == _ring.FAILED:  # a: exception, b: unique, c: opcode
                ring.commit(entry, -_code(b, c, a), ())
            elif status == _ring.ANSWER:  # a: answer, b: unique
                try:
                    ring.commit(entry, 0, _parts(a))
                except (TypeError, ValueError, BufferError) as err:
                    log.error("request %d: answer not sent: %s", b, err)
                    ring.commit(entry, -errno.EIO, ())
            else:  # GONE, entry: the last entry's error
                if entry not in _GONE:
                    log.warning("FUSE queue %d ended: %s", self.qid, os.strerror(-entry))
                return

    def _suspended(
        self, ring: Any, entry: int, coro: Coroutine[Any, Any, Any], trap: Any,
        unique: int, opcode: int,
    ) -> None:  # fmt: skip
        if trap is not TO_TRIO:
            coro.close()
            log.error("request %d (opcode %d) called trio on a queue thread", unique, opcode)
            ring.commit(entry, -errno.EIO, ())
            return
        self.to_trio += 1
        self.session.waiting.add(unique)
        token = self.queues.token
        try:
            assert token is not None
            token.run_sync_soon(self._start_on_trio, entry, unique, opcode, coro)
        except (trio.RunFinishedError, AssertionError):
            self.session.waiting.discard(unique)
            coro.close()
            ring.commit(entry, -errno.EIO, ())

    # -------------------------------------------------- handlers moved to trio

    def _start_on_trio(
        self, entry: int, unique: int, opcode: int, coro: Coroutine[Any, Any, Any]
    ) -> None:
        nursery = self.queues.nursery
        if nursery is None:
            self.session.waiting.discard(unique)
            coro.close()
            self._finished(entry, -errno.EIO, None)
            return
        nursery.start_soon(self._finish_on_trio, entry, unique, opcode, coro)

    async def _finish_on_trio(
        self, entry: int, unique: int, opcode: int, coro: Coroutine[Any, Any, Any]
    ) -> None:
        error, answer = 0, None
        try:
            try:
                trap = coro.send(None)
            except StopIteration as stop:
                answer = stop.value
            else:
                answer = await resume(coro, trap)
        except trio.Cancelled:
            error = -errno.EINTR
            raise
        except BaseException as err:
            error = -_code(unique, opcode, err)
        finally:
            self.session.waiting.discard(unique)
            self._finished(entry, error, answer)

    def _finished(self, entry: int, error: int, answer: Answer) -> None:
        self.finished.put((entry, error, answer))
        self.wake()

    def _commit_finished(self, ring: Any) -> None:
        while True:
            try:
                entry, error, answer = self.finished.get_nowait()
            except queue.Empty:
                return
            try:
                ring.commit(entry, error, _parts(answer) if not error else ())
            except (TypeError, ValueError, BufferError) as err:
                log.error("FUSE queue %d: answer not sent: %s", self.qid, err)
                ring.commit(entry, -errno.EIO, ())

    def wake(self) -> None:
        """Any thread: end the queue thread's wait."""
        with self._wake_lock:
            if self.ring is not None and not self._closed:
                with contextlib.suppress(OSError):
                    os.write(self.ring.wake_fd, _ONE)

    # --------------------------------------------- handoff.QueueThread

    def wait_directly(self, fd: int, timeout_ms: int) -> bool:
        """Wait for ``fd`` with the serving lock let go, while no request
        or finished handler of this queue is waiting (contract 4)."""
        ring = self.ring
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(ring.fd, select.POLLIN)
        poller.register(ring.wake_fd, select.POLLIN)
        lock = self.session.serving_lock
        lock.release()
        try:
            ready = poller.poll(timeout_ms)
        except InterruptedError:
            ready = []
        finally:
            lock.acquire()
        self.direct_waits += 1
        return any(ready_fd == fd for ready_fd, _ in ready)


def _code(unique: int, opcode: int, err: BaseException) -> int:
    try:
        return error_code(unique, opcode, err, log)
    except BaseException:  # KeyboardInterrupt and the like: not on this thread
        return errno.EIO


def _parts(answer: Answer) -> list[Any] | tuple[Any, ...]:
    if answer is None:
        return ()
    if isinstance(answer, list):
        return answer
    return (answer,)
