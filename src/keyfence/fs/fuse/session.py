"""keyfence's own FUSE request loop over an already-mounted ``/dev/fuse``.

Concurrency contract (why it is fast, and why the handlers need no change):

1. One *reader* task on the trio thread reads one request at a time into a
   buffer it owns (non-blocking ``readv``; ``wait_readable`` only when the
   queue is empty) and starts the request's handler coroutine right there,
   with ``coroutine.send(None)``: no task, no lock, no ``epoll`` per
   request.  A handler that finishes without suspending (most do: they make
   syscalls on the trio thread) is answered at once and the reader reads
   the next request into the same buffer.  When fs/fuse/_loop.c is built
   (and ``KEYFENCE_NO_NATIVE_LOOP`` is not set), that common case runs in
   C, many requests per call: reading, the header, driving the handler,
   answering, zeroing (``_loop.serve``).  It hands everything else back
   here with a status, and this module serves it as it always did: INIT,
   INTERRUPT, unknown opcodes, bad lengths, a suspended handler, any
   exception but ``FUSEError``.  The handlers are the same Python either way.
2. A handler that *does* suspend (``trio.to_thread``: a key lookup,
   write-back, fsync) suspended inside the reader's own task, so that task
   becomes the handler's: it starts a new reader (with another buffer),
   then goes on driving the handler through trio (:func:`_resume` passes
   trio's traps and answers up and down unchanged), answers it, and ends.
   At most ``max_tasks`` handlers wait at once; the reader waits for a free
   slot before reading more.
3. Every request buffer is zeroed once its request is answered (write
   requests carry plaintext).
4. Every ``checkpoint_every`` requests the reader yields to trio, so that
   signals, timers and ``trio.from_thread`` calls (key removals) run under
   a steady load too.
5. When the queue is empty the reader first busy-waits (``poll`` with no
   timeout, the GIL let go in each call, and a ``sched_yield`` every 10 µs
   so that any other task that wants this CPU gets it) for the next
   request, and only then sleeps in trio's ``epoll``.  A client that makes
   one syscall after another (a database, ``tar``, ``git``) sends its next
   request within microseconds; sleeping and being woken costs each one
   more than serving it (docs/performance.md "Spinning for the next
   request").  How long:
   :class:`~keyfence.fs.fuse.spin.SpinWindow`, 50 µs growing up to
   ``spin_us`` while the client keeps coming back just after the spin
   ended, and shrinking when all its pauses are longer.  Bounded: at
   most ``spin_us`` of one core per idle spell, and never on a one-CPU
   machine (the worker's default).
6. A handler's blocking call (fsync, a big write-back) goes through
   :attr:`Session.blocking` (fs/fuse/blocking.py): the reader waits for it
   directly, ``/dev/fuse`` watched at once, and falls back to suspending
   the handler (2.) when a request comes or the call takes longer.
7. When the kernel offers FUSE over io_uring (the fuse module's
   ``enable_uring``) and ``_ring`` is built, INIT asks for it: requests then
   come through one queue per CPU, each served on a thread pinned to its
   CPU (fs/fuse/ring.py, its own contract), and this reader serves only what
   still comes through ``/dev/fuse`` (FORGET, INTERRUPT), without spinning.
   Handlers then run on several threads, one at a time:
   :attr:`Session.serving_lock`.

Unsolicited messages (cache invalidations) are written from any thread: a
write to ``/dev/fuse`` is one message, and the kernel may wait for requests
while it invalidates, so they are never written by the reader itself
(:meth:`Session.invalidate_entry_async` hands them to a thread).

Errors: ``FUSEError`` is its errno, a malformed request EIO, any other
exception EIO and a logged traceback; the loop itself goes on.  ``ENODEV``
from ``/dev/fuse`` means unmounted (``ECONNABORTED`` too: a read that took
a request as the connection went down, at an unmount or an abort): the
loop ends once the handlers still running have finished.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Coroutine
from typing import Any, cast

import trio
from pyfuse3 import FUSEError

from keyfence.fs.fuse import protocol as p
from keyfence.fs.fuse import ring
from keyfence.fs.fuse.blocking import BlockingCalls
from keyfence.fs.fuse.dir_attrs import DirectoryAttributes
from keyfence.fs.fuse.dispatch import Answer, Caller, Dispatcher, error_code
from keyfence.fs.fuse.handoff import resume
from keyfence.fs.fuse.spin import SpinWindow

__all__ = ["Session", "SessionOptions"]

log = logging.getLogger("keyfence.fs.fuse")


class SessionOptions:
    """What INIT asks the kernel for, and the loop's limits."""

    def __init__(
        self,
        *,
        writeback_cache: bool = False,
        killpriv_v2: bool = False,
        max_tasks: int = 64,
        checkpoint_every: int = 32,
        spin_us: int = 0,
        native: bool = True,
        uring: bool = True,
    ) -> None:
        self.uring = uring
        """Take requests through io_uring, one queue per CPU, when the kernel
        offers it (fs/fuse/ring.py)."""
        self.native = native and _native is not None
        """Serve the common case in C (fs/fuse/_loop.c) when it was built."""
        self.spin_ns = spin_us * 1000
        """The longest the reader busy-waits for the next request before
        it sleeps in trio's epoll (0: never; fs/fuse/spin.py)."""
        self.writeback_cache = writeback_cache
        self.killpriv_v2 = killpriv_v2
        self.max_tasks = max_tasks
        self.checkpoint_every = checkpoint_every


_ZEROS = memoryview(bytes(p.BUFFER_SIZE))
"""What request buffers are zeroed from: a copy that keeps the GIL.
(``ctypes.memset`` lets go of the GIL and must take it back: with another
thread busy in Python, that costs up to the 5 ms switch interval, per
request.)"""


NATIVE_DISABLE_ENV = "KEYFENCE_NO_NATIVE_LOOP"
"""Set to a non-empty value other than ``0``: every request served in Python."""

if os.environ.get(NATIVE_DISABLE_ENV, "") in ("", "0"):
    try:
        from keyfence.fs.fuse import _loop as _native
    except ImportError:  # built without it (setup.py: optional)
        _native = None  # type: ignore[assignment]
else:
    _native = None  # type: ignore[assignment]


class _Next(enum.Enum):
    """What the reader does after the native loop returned."""

    READ = enum.auto()
    WAIT = enum.auto()
    CHECKPOINT = enum.auto()
    SUSPENDED = enum.auto()
    SPECIAL = enum.auto()
    STOP = enum.auto()


_YIELD_NS = 10_000
"""A spinning reader yields the CPU this often (fs/fuse/_loop.c's YIELD_NS)."""

FORGET_GATHER_S = 0.002
"""With io_uring queues, how long the reader waits after /dev/fuse became
readable before it reads (forgets gather meanwhile; an INTERRUPT waits as
long, its handler is not cancelled anyway)."""

_GONE = (errno.ENODEV, errno.ECONNABORTED)
"""What ``/dev/fuse`` says once the connection is gone (unmounted, aborted)."""


class Session:
    """Serve ``ops`` on the mounted ``/dev/fuse`` descriptor ``fd`` (not closed here)."""

    def __init__(
        self,
        ops: Any,
        fd: int,
        options: SessionOptions | None = None,
        *,
        dir_attributes: DirectoryAttributes | None = None,
        no_capability: set[int] | None = None,
    ) -> None:
        """What the C loop answers without a handler, from tables ``ops``
        keeps: ``dir_attributes``, the directories whose GETATTR (and, for
        encrypted ones, LOOKUP of a missing name) it answers
        (fs/fuse/dir_attrs.py); ``no_capability``, the inodes whose
        ``getxattr security.capability`` is ENODATA (fs/privileges.py)."""
        self.ops = ops
        self.fd = fd
        self.options = options or SessionOptions()
        self.dir_attributes = dir_attributes
        self.no_capability = no_capability
        self.dispatcher = Dispatcher(ops)
        self.handlers = self.dispatcher.table()
        self.initialized = False
        self.proto_minor = 0
        self.stopping = False
        self.unmounted = False
        """The kernel said ENODEV: the mount is gone."""
        self.read_here = 0
        """Requests read from /dev/fuse (:attr:`requests` adds the queues')."""
        self.native_here = 0
        """Of those, served by fs/fuse/_loop.c."""
        self.tabled_here = 0
        """Of those, answered from :attr:`dir_attributes` or
        :attr:`no_capability`, without a handler."""
        self.by_opcode = [0] * 64
        """Requests read, by opcode (below 64; tests count writes and getxattrs)."""
        self.interrupts = 0
        self.spins_caught = 0
        """Idle spells in which the next request came while the reader spun."""
        self.spins_missed = 0
        """Idle spells that outlasted the spin (the reader then slept)."""
        self.spin = SpinWindow(most_ns=self.options.spin_ns)
        """How long the reader spins, adapted at each sleep."""
        self._awake: Any = None
        """On ``/dev/fuse``, a spinner at SCHED_IDLE on any CPU while
        requests come (:meth:`_keep_awake`)."""
        self.abandoned = 0
        """Answers the kernel no longer wanted (the caller was killed)."""
        self.waiting: set[int] = set()
        """``unique`` of the requests whose handlers are suspended."""
        self._buffers: list[bytearray] = []
        self.buffers: list[bytearray] = []
        """Every request buffer made (at most ``max_tasks`` + 1): what tests scan."""
        self._slots = trio.Semaphore(self.options.max_tasks)
        self._nursery: trio.Nursery | None = None
        self._notices: queue.SimpleQueue[tuple[int, bytes, bool] | None] = queue.SimpleQueue()
        self._notifier: threading.Thread | None = None
        self.blocking = BlockingCalls(fd)
        """Blocking calls of the handlers (fs/fuse/blocking.py), waited for
        directly while no other request comes."""
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.serving_lock = threading.Lock()
        """Held by whoever steps a handler once requests also come through
        io_uring (fs/fuse/ring.py); not taken otherwise."""
        self.queues: ring.Queues | None = None
        """The io_uring queues, when the kernel takes answers through them."""

    # ------------------------------------------------------------ figures

    def _queued(self, name: str) -> int:
        return sum(self.queues.statistics()[name]) if self.queues is not None else 0

    @property
    def transport(self) -> str:
        """How requests come, as ``keyfence status`` says it: ``io_uring,
        N queues`` or ``/dev/fuse`` (before INIT too)."""
        if self.queues is not None:
            return f"io_uring, {len(self.queues.queues)} queues"
        return "/dev/fuse"

    @property
    def requests(self) -> int:
        """Requests served, through /dev/fuse and the io_uring queues (a
        figure for tests and benchmarks)."""
        return self.read_here + self._queued("served")

    @property
    def served_natively(self) -> int:
        """Of those, served in C (fs/fuse/_loop.c, fs/fuse/_ring.c)."""
        return self.native_here + self._queued("served")

    @property
    def served_from_tables(self) -> int:
        """Of those, answered from :attr:`dir_attributes` or
        :attr:`no_capability`, without a handler."""
        return self.tabled_here + self._queued("tabled")

    # ------------------------------------------------------------ the loop

    async def serve(self) -> None:
        """Answer requests until unmounted or :meth:`terminate` d."""
        os.set_blocking(self.fd, False)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader)
        finally:
            self._nursery = None
            if self.queues is not None:
                self.queues.stop()
                log.info("io_uring queues: %s", self.queues.statistics())
            self.blocking.close()
            if self._awake is not None:
                _native.stop_awake(self._awake)
            if self._notifier is not None:
                self._notices.put(None)

    def terminate(self) -> None:
        """On the trio thread: read no more requests (those being served finish)."""
        self.stopping = True
        # wakes the reader waiting for the next request (ClosedResourceError)
        # without a cancel scope per wait: one per request cost a lone
        # client's request ~4 us of the loop's Python
        trio.lowlevel.notify_closing(self.fd)

    async def _reader(self) -> None:
        if self._buffers:
            buf = self._buffers.pop()
        else:
            buf = bytearray(p.BUFFER_SIZE)
            self.buffers.append(buf)
        view = memoryview(buf)
        every = self.options.checkpoint_every
        max_tasks = self.options.max_tasks
        waiting = self.waiting  # one entry per slot taken: cheaper than Semaphore.value
        fd = self.fd
        spin = self.spin
        native = _native if self.options.native else None
        dirs = self.dir_attributes.table if self.dir_attributes is not None else None
        on_miss = self.dir_attributes.on_miss if self.dir_attributes is not None else None
        no_capability = self.no_capability
        try:
            while not self.stopping:
                if len(waiting) >= max_tasks:  # max_tasks handlers waiting
                    await self._slots.acquire()
                    self._slots.release()
                    if self.stopping:
                        break
                if native is not None and self.initialized:
                    outcome = native.serve(
                        fd, buf, view, self.handlers, Caller, FUSEError,
                        self.by_opcode, spin.ns, every, dirs, no_capability, on_miss,
                        self._awake,
                    )  # fmt: skip
                    action = self._after_native(outcome, view)
                    if action is _Next.READ:
                        continue
                    if action is _Next.WAIT:
                        if not await self._sleep_for_request():
                            break
                        continue
                    if action is _Next.CHECKPOINT:
                        await trio.lowlevel.checkpoint()
                        continue
                    if action is _Next.STOP:
                        return
                    if action is _Next.SUSPENDED:
                        _, _, _, _, _, n, coro, trap, unique, opcode, _ = outcome
                        await self._suspended(unique, opcode, coro, trap, buf, n)
                        return  # this task served a suspended handler; another reads
                    n = outcome[5]  # _Next.SPECIAL: served below, as without native
                else:
                    try:
                        n = os.readv(fd, [buf])
                    except BlockingIOError:
                        if self.stopping:
                            break
                        if spin.ns and self._spin(spin.ns):
                            continue  # one is queued: read it without trio's epoll round
                        if not await self._sleep_for_request():
                            break
                        continue
                    except OSError as err:
                        if self._read_failed(err.errno or errno.EIO):
                            return
                        continue
                self.read_here += 1
                handed_off = False
                try:
                    handed_off = await self._request(buf, view, n)
                finally:
                    if not handed_off:
                        view[:n] = _ZEROS[:n]
                if handed_off:
                    return  # this task served a suspended handler; another reads
                if self.read_here % every == 0:
                    await trio.lowlevel.checkpoint()
        finally:
            self._buffers.append(buf)

    async def _sleep_for_request(self) -> bool:
        """:meth:`_wait_for_request` after a spin of :attr:`spin` that
        caught nothing, telling the window how long the queue was empty."""
        spun = self.spin.ns
        asleep = time.perf_counter_ns()
        woken = await self._wait_for_request()
        if woken and spun:
            self.spin.slept(time.perf_counter_ns() - asleep + spun)
        return woken

    async def _wait_for_request(self) -> bool:
        """Sleep in trio's epoll until /dev/fuse is readable: False when the
        loop is stopping (or :meth:`terminate` woke it)."""
        if self.stopping:
            return False
        try:
            await trio.lowlevel.wait_readable(self.fd)
            if self.queues is not None:
                # only FORGET and INTERRUPT come here now: let the kernel
                # gather forgets into one BATCH_FORGET rather than wake this
                # thread (and take the serving lock) for each
                await trio.sleep(FORGET_GATHER_S)
        except trio.ClosedResourceError:  # terminate()
            return False
        return True

    def _read_failed(self, code: int) -> bool:
        """A read of /dev/fuse failed with ``code``: True when the loop ends."""
        if code in (errno.ENOENT, errno.EINTR):
            return False  # interrupted before we read it; a signal
        if code in _GONE:
            self.stopping = self.unmounted = True
            return True
        raise OSError(code, os.strerror(code))

    def _after_native(self, outcome: tuple[Any, ...], view: memoryview) -> _Next:
        """What the reader does after ``_loop.serve`` (fs/fuse/_loop.c)."""
        status, served, caught, missed, abandoned, n, a, b, c, _, tabled = outcome
        self.read_here += served
        self.native_here += served
        self.tabled_here += tabled
        self.spins_caught += caught
        self.spins_missed += missed
        if caught:
            self.spin.caught()
        self.abandoned += abandoned
        if status == _native.IDLE:
            return _Next.WAIT
        if status == _native.BUDGET:
            return _Next.CHECKPOINT
        if status == _native.SUSPENDED:
            return _Next.SUSPENDED
        if status == _native.SPECIAL:
            return _Next.SPECIAL
        if status == _native.FAILED:  # a, b, c: exception, unique, opcode
            try:
                self._failed(b, c, a)
            finally:
                view[:n] = _ZEROS[:n]
            return _Next.READ
        if status == _native.ANSWER:  # a, b: answer, unique
            try:
                self._answer(b, a)
            finally:
                view[:n] = _ZEROS[:n]
            return _Next.READ
        if status == _native.WRITE_ERROR:  # n: errno, a: unique
            log.error("answer to request %d refused: %s", a, os.strerror(n))
            return _Next.READ
        if status == _native.GONE:
            self.stopping = self.unmounted = True
            return _Next.STOP
        # READ_ERROR, n: errno
        return _Next.STOP if self._read_failed(n) else _Next.READ

    def _spin(self, spin_ns: int) -> bool:
        """Busy-wait up to ``spin_ns`` for the next request: True when one
        (or an error, such as ENODEV) is waiting to be read."""
        ready = self._poll.poll
        clock = time.perf_counter_ns
        now = clock()
        deadline = now + spin_ns
        give_way = now + _YIELD_NS  # as fs/fuse/_loop.c's spin: others run first
        while not ready(0):
            now = clock()
            if now > deadline:
                self.spins_missed += 1
                return False
            if now >= give_way:
                os.sched_yield()
                give_way = now + _YIELD_NS
        self.spins_caught += 1
        self.spin.caught()
        return True

    async def _request(self, buf: bytearray, view: memoryview, n: int) -> bool:
        """Serve one request; True when its handler suspended and this
        task served it to the end (the buffer was then zeroed here)."""
        if n < p.IN_HEADER.size:
            log.error("a request of %d bytes, shorter than its header", n)
            return False
        length, opcode, unique, nodeid, uid, gid, pid, _, _ = p.IN_HEADER.unpack_from(buf)
        if opcode < 64:
            self.by_opcode[opcode] += 1
        if length != n:
            log.error("request %d: %d bytes announced, %d read", unique, length, n)
            if opcode not in p.NO_REPLY:
                self._answer_error(unique, errno.EIO)
            return False
        body = view[p.IN_HEADER.size : n]
        if opcode == p.INIT:
            try:
                self._init(unique, body)
            except Exception as err:
                self._failed(unique, opcode, err)
            return False
        if opcode == p.INTERRUPT:
            self.interrupts += 1  # handlers are not cancelled: they finish
            return False
        handler = self.handlers.get(opcode)
        if handler is None or not self.initialized:
            if opcode not in p.NO_REPLY:
                self._answer_error(unique, errno.ENOSYS if self.initialized else errno.EIO)
            return False
        coro = cast(Coroutine[Any, Any, Answer], handler(nodeid, Caller(uid, gid, pid), body))
        try:
            trap = coro.send(None)
        except StopIteration as stop:
            if opcode not in p.NO_REPLY:
                self._answer(unique, stop.value)
            return False
        except BaseException as err:
            self._failed(unique, opcode, err)
            return False
        await self._suspended(unique, opcode, coro, trap, buf, n)
        return True

    async def _suspended(
        self,
        unique: int,
        opcode: int,
        coro: Coroutine[Any, Any, Answer],
        trap: Any,
        buf: bytearray,
        n: int,
    ) -> None:
        """The handler yielded ``trap`` in this task: serve it to the end here."""
        assert self._nursery is not None
        self._slots.acquire_nowait()  # the reader made sure one is free
        self.waiting.add(unique)
        self._nursery.start_soon(self._reader)
        try:
            try:
                answer = await resume(coro, trap)
            except BaseException as err:
                if isinstance(err, trio.Cancelled):
                    self._answer_error(unique, errno.EINTR)
                    raise
                self._failed(unique, opcode, err)
            else:
                if opcode not in p.NO_REPLY:
                    self._answer(unique, answer)
        finally:
            self.waiting.discard(unique)
            self._slots.release()
            memoryview(buf)[:n] = _ZEROS[:n]

    def _failed(self, unique: int, opcode: int, err: BaseException) -> None:
        code = error_code(unique, opcode, err, log)
        if opcode not in p.NO_REPLY:
            self._answer_error(unique, code)

    # ---------------------------------------------------------------- INIT

    def _init(self, unique: int, body: memoryview) -> None:
        major, minor, max_readahead, offered = p.INIT_IN.unpack_from(body)
        if major != p.KERNEL_MAJOR or minor < p.OLDEST_MINOR:
            log.error("the kernel speaks FUSE %d.%d: too old for this loop", major, minor)
            self._answer_error(unique, errno.EPROTO)
            self.stopping = True
            return
        offered2 = 0
        if offered & p.INIT_EXT and len(body) >= p.INIT_IN_EXT.size:
            offered2 = p.INIT_IN_EXT.unpack_from(body)[4]
        want2 = 0
        want = (
            p.ASYNC_READ
            | p.ATOMIC_O_TRUNC
            | p.BIG_WRITES
            | p.AUTO_INVAL_DATA
            | p.DO_READDIRPLUS
            | p.ASYNC_DIO
            | p.PARALLEL_DIROPS
            | p.MAX_PAGES
        )  # not HANDLE_KILLPRIV (v1): it gives no per-write word on CAP_FSETID
        if getattr(self.ops, "supports_dot_lookup", False):
            want |= p.EXPORT_SUPPORT
        if self.options.writeback_cache:
            want |= p.WRITEBACK_CACHE
        if self.options.killpriv_v2:
            # the handlers clear set-id bits and capabilities on write,
            # truncate and chown (fs/privileges.py); the kernel then stops
            # asking getxattr security.capability before every write
            want |= p.HANDLE_KILLPRIV_V2
        if getattr(self.ops, "enable_acl", False):
            # the kernel checks ACLs; creation modes and the set-group-ID
            # bit on an ACL change are ours (fs/acl.py)
            want |= p.POSIX_ACL | p.DONT_MASK | p.SETXATTR_EXT
        queues = None
        if self.options.uring and offered2 & p.OVER_IO_URING_2 and ring.available():
            assert self._nursery is not None
            queues = ring.Queues(self)
            if queues.prepare(self._nursery):
                want |= p.INIT_EXT
                want2 |= p.OVER_IO_URING_2
            else:
                queues = None
        self.proto_minor = min(minor, p.OUR_MINOR)
        self.dispatcher.setxattr_ext = bool(want & offered & p.SETXATTR_EXT)
        payload = p.INIT_OUT.pack(
            p.KERNEL_MAJOR, self.proto_minor, max_readahead, want & offered,
            12, 9, p.MAX_WRITE, 1, p.MAX_PAGES_PER_REQUEST, 0, want2 & offered2,
        )  # fmt: skip
        init = getattr(self.ops, "init", None)
        if callable(init):
            init()
        if queues is not None:
            # from here on handlers also run on the queues' threads: this
            # task step and every later one holds the serving lock
            instrument = ring.LoopLock(self.serving_lock)
            trio.lowlevel.add_instrument(instrument)
            instrument.hold_now()
            self.blocking.direct_on_loop = False
            self.spin.stop()  # /dev/fuse is quiet from here on
            self.queues = queues
        elif self.options.native and self.options.spin_ns > 0:
            self._keep_awake()
        self._answer(unique, payload)
        self.initialized = True
        if queues is not None:
            queues.start()
            log.info("FUSE requests through io_uring, %d queues", len(queues.queues))

    def _keep_awake(self) -> None:
        """Start a spinner at SCHED_IDLE, on no CPU in particular, busy for
        ``spin_ns`` after each request the C loop reads (fs/fuse/_awake.c).
        The loop answers from the CPU it spins on; the caller waits on
        another, which halts meanwhile on a VM like this one and costs each
        answer its wake (docs/performance.md, part 28).  The spinner runs
        only where nothing else would, so that CPU stays awake; anything
        else preempts it.  Not on one CPU (nothing to keep awake)."""
        if len(os.sched_getaffinity(0)) < 2:
            return
        try:
            self._awake = _native.start_awake(self.options.spin_ns)
        except OSError as err:
            log.info("no CPU kept awake while requests come: %s", err)

    # ------------------------------------------------------------- answers

    def _write(self, parts: list[Any], unique: int) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as err:
            if err.errno == errno.ENOENT:  # the caller is gone (killed)
                self.abandoned += 1
            elif err.errno in _GONE:
                self.stopping = self.unmounted = True
            else:
                log.error("answer to request %d refused: %s", unique, err)

    def _answer(self, unique: int, answer: Answer) -> None:
        if answer is None:
            answer = b""
        if isinstance(answer, list):
            size = sum(len(part) for part in answer)
            header = p.OUT_HEADER.pack(p.OUT_HEADER.size + size, 0, unique)
            self._write([header, *answer], unique)
        else:
            header = p.OUT_HEADER.pack(p.OUT_HEADER.size + len(answer), 0, unique)
            self._write([header, answer], unique)

    def _answer_error(self, unique: int, code: int) -> None:
        self._write([p.OUT_HEADER.pack(p.OUT_HEADER.size, -code, unique)], unique)

    # ---------------------------------------------- unsolicited (any thread)

    def invalidate_inode(self, ino: int) -> None:
        """Drop the kernel's attributes and pages of ``ino`` (OSError ENOENT:
        the kernel does not know it)."""
        body = p.NOTIFY_INVAL_INODE_OUT.pack(ino, 0, 0)
        header = p.OUT_HEADER.pack(p.OUT_HEADER.size + len(body), p.NOTIFY_INVAL_INODE, 0)
        os.writev(self.fd, [header, body])

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Drop the kernel's dentry ``name`` in ``parent``."""
        body = p.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0)
        size = p.OUT_HEADER.size + len(body) + len(name) + 1
        header = p.OUT_HEADER.pack(size, p.NOTIFY_INVAL_ENTRY, 0)
        os.writev(self.fd, [header, body, name, b"\0"])

    def invalidate_entry_async(self, parent: int, name: bytes, ignore_enoent: bool) -> None:
        """:meth:`invalidate_entry` on a thread of its own: safe from a handler
        (the kernel may hold the directory's lock until we answer)."""
        if self._notifier is None:
            self._notifier = threading.Thread(
                target=self._notify_loop, name="keyfence-fuse-notify", daemon=True
            )
            self._notifier.start()
        self._notices.put((parent, bytes(name), ignore_enoent))

    def _notify_loop(self) -> None:
        while (notice := self._notices.get()) is not None:
            parent, name, ignore_enoent = notice
            try:
                self.invalidate_entry(parent, name)
            except OSError as err:
                if not (ignore_enoent and err.errno == errno.ENOENT):
                    log.warning("invalidate entry %d/%r: %s", parent, name, err)
