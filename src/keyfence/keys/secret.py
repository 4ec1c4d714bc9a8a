"""Key payloads held in locked, non-dumpable, zeroizable memory.

Python ``bytes`` are immutable, may be copied by the allocator and end up in
swap or core dumps, so payloads live in chunks of anonymous ``mmap`` slabs
that are ``mlock``-ed (no swap), ``MADV_DONTDUMP``-ed (no core dumps) and
zeroed with ``memset`` when the payload is wiped.  Nothing here ever puts
payload bytes into a repr, str, log line or exception message.

Layout: power-of-two size classes from 32 bytes to 1 MiB, each carved from
slabs of 64 KiB .. 1 MiB; payloads above 1 MiB get a mapping of their own
that is unmapped when wiped.  At most one empty slab per class is cached
(:meth:`SecretArena.trim` drops those too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import NoReturn

__all__ = [
    "MAX_CLASS_SIZE",
    "MIN_CHUNK_SIZE",
    "ArenaStatistics",
    "SecretArena",
    "SecretBuffer",
    "default_arena",
    "disable_core_dumps",
    "store",
]

MIN_CHUNK_SIZE = 32
"""Smallest chunk; payloads are rounded up to a power of two at least this."""

MAX_CLASS_SIZE = 1 << 20
"""Largest size class (big keys); anything larger gets its own mapping."""

_MIN_CLASS_SHIFT = MIN_CHUNK_SIZE.bit_length() - 1
_SLAB_MIN = 64 * 1024
_SLAB_MAX = 1 << 20
_PAGE = mmap.PAGESIZE

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3

# Bound once so __del__ still works while the interpreter tears modules down.
_memset = ctypes.memset
_string_at = ctypes.string_at
_get_ident = threading.get_ident
_MADV_DONTDUMP: int | None = getattr(mmap, "MADV_DONTDUMP", None)


def _load_libc() -> ctypes.CDLL | None:
    """libc for mlock/prctl; None where it cannot be found (then nothing is locked)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    for name in ("mlock", "munlock"):
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int
    return libc


_libc = _load_libc()


def _mlock(address: int, size: int) -> bool:
    """Pin pages in RAM; failure (RLIMIT_MEMLOCK for non-root) is recorded, not fatal."""
    fn = getattr(_libc, "mlock", None)
    if fn is None:
        return False
    return bool(fn(address, size) == 0)


def disable_core_dumps() -> None:
    """Keep the whole process out of core dumps and ptrace by same-uid users.

    For the daemon to call at start-up; DONTDUMP only covers the slabs, while
    payloads transiently pass through ordinary heap memory (e.g. ``reveal``).
    """
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    prctl = getattr(_libc, "prctl", None)
    if prctl is None:
        raise OSError("prctl is not available on this platform")
    prctl.restype = ctypes.c_int
    if prctl(_PR_SET_DUMPABLE, ctypes.c_ulong(0), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True, slots=True)
class ArenaStatistics:
    """A consistent snapshot of an arena's accounting.

    ``bytes_in_use`` counts chunk capacity handed out (not payload length), so
    ``bytes_in_use / bytes_mapped`` is the utilisation of mapped memory.
    """

    slabs: int
    bytes_mapped: int
    bytes_in_use: int
    chunks_in_use: int
    locked_bytes: int
    unlocked_slabs: int


class _Slab:
    """One anonymous mapping cut into equal chunks (or one dedicated chunk)."""

    __slots__ = (
        "base",
        "bump",
        "chunk",
        "dedicated",
        "free",
        "locked",
        "mm",
        "nchunks",
        "size",
        "used",
    )

    def __init__(self, size: int, chunk: int, dedicated: bool) -> None:
        # MAP_PRIVATE: the default MAP_SHARED would let a forked child write
        # (or keep seeing) the parent's secrets through shared pages.
        mm = mmap.mmap(
            -1,
            size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        if _MADV_DONTDUMP is not None:
            mm.madvise(_MADV_DONTDUMP)
        # The temporary ctypes object exports the buffer only until it dies here.
        self.base: int = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        self.mm = mm
        self.size = size
        self.chunk = chunk
        self.dedicated = dedicated
        self.nchunks = size // chunk
        self.bump = 0  # offset of the first never-used chunk
        self.free: list[int] = []  # offsets of wiped chunks, already zero
        self.used = 0
        self.locked = _mlock(self.base, size)

    def unmap(self) -> None:
        # BufferError: a memoryview leaked out of a view() block; the bytes are
        # already zero and the mapping goes away with the last such view.
        with suppress(BufferError):
            self.mm.close()


class _SizeClass:
    __slots__ = ("chunk", "partial", "slab_size")

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.slab_size = max(_SLAB_MIN, min(chunk * 16, _SLAB_MAX))
        # Slabs with at least one free chunk; a dict used as an ordered set.
        self.partial: dict[_Slab, None] = {}


class SecretArena:
    """Allocator of locked, non-dumpable chunks for :class:`SecretBuffer`.

    One ``threading.Lock`` guards all bookkeeping.  A buffer finalised by the
    garbage collector while this thread is already inside the arena (or while
    another thread holds the lock, for ``__del__``) is zeroed at once and its
    chunk queued, so finalisers never deadlock or corrupt the free lists.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = 0  # thread ident holding _lock, to detect re-entry from GC
        self._pending: list[tuple[_Slab, int]] = []  # chunks to free when lock is free
        self._classes = [
            _SizeClass(1 << shift) for shift in range(_MIN_CLASS_SHIFT, MAX_CLASS_SIZE.bit_length())
        ]
        self._slabs = 0
        self._bytes_mapped = 0
        self._bytes_in_use = 0
        self._chunks_in_use = 0
        self._locked_bytes = 0
        self._unlocked_slabs = 0

    def __repr__(self) -> str:
        return f"<SecretArena {self._chunks_in_use} chunks in {self._slabs} slabs>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretArena cannot be pickled")

    # -- locking -----------------------------------------------------------

    def _enter(self, blocking: bool = True) -> bool:
        """Take the lock; False if this thread already holds it (GC re-entry) or busy."""
        me = _get_ident()
        if self._owner == me:
            return False
        if not self._lock.acquire(blocking):
            return False
        self._owner = me
        try:
            self._drain()
        except BaseException:
            self._owner = 0
            self._lock.release()
            raise
        return True

    def _exit(self) -> None:
        try:
            self._drain()
        finally:
            self._owner = 0
            self._lock.release()

    def _drain(self) -> None:
        while self._pending:
            slab, off = self._pending.pop()
            self._free_chunk(slab, off)

    # -- public API --------------------------------------------------------

    def store(self, data: bytes | bytearray | memoryview) -> SecretBuffer:
        """Copy ``data`` into a fresh locked chunk.

        The caller still owns ``data``: wipe it if it is a bytearray.
        """
        src = memoryview(data)
        if src.ndim != 1 or src.format not in ("B", "b", "c"):
            src = src.cast("B")  # raises for non-contiguous input
        length = src.nbytes
        buf = SecretBuffer.__new__(SecretBuffer)
        buf._len = -1  # so a failed store finalises harmlessly
        buf._pins = 0
        if not self._enter():
            raise RuntimeError("SecretArena.store re-entered from a finalizer")
        try:
            slab, off = self._alloc(length)
            try:
                slab.mm[off : off + length] = src
            except BaseException:
                self._free_chunk(slab, off)
                raise
        finally:
            self._exit()
        src.release()
        # Re-zero the tail cheaply: the payload is always followed by zeros.
        if slab.chunk > length:
            _memset(slab.base + off + length, 0, slab.chunk - length)
        buf._arena = self
        buf._slab = slab
        buf._off = off
        buf._len = length
        return buf

    def statistics(self) -> ArenaStatistics:
        """Snapshot of the counters, after freeing any chunks queued by finalisers."""
        entered = self._enter()
        try:
            return ArenaStatistics(
                slabs=self._slabs,
                bytes_mapped=self._bytes_mapped,
                bytes_in_use=self._bytes_in_use,
                chunks_in_use=self._chunks_in_use,
                locked_bytes=self._locked_bytes,
                unlocked_slabs=self._unlocked_slabs,
            )
        finally:
            if entered:
                self._exit()

    def trim(self) -> int:
        """Unmap cached empty slabs (to give back locked memory); returns how many."""
        if not self._enter():
            return 0
        dropped = 0
        try:
            for cls in self._classes:
                for slab in [s for s in cls.partial if s.used == 0]:
                    del cls.partial[slab]
                    self._unmap(slab)
                    dropped += 1
        finally:
            self._exit()
        return dropped

    # -- internals (lock held) ---------------------------------------------

    def _map(self, size: int, chunk: int, dedicated: bool) -> _Slab:
        slab = _Slab(size, chunk, dedicated)
        self._slabs += 1
        self._bytes_mapped += size
        if slab.locked:
            self._locked_bytes += size
        else:
            self._unlocked_slabs += 1
        return slab

    def _unmap(self, slab: _Slab) -> None:
        self._slabs -= 1
        self._bytes_mapped -= slab.size
        if slab.locked:
            self._locked_bytes -= slab.size
        else:
            self._unlocked_slabs -= 1
        slab.unmap()

    def _alloc(self, length: int) -> tuple[_Slab, int]:
        if length > MAX_CLASS_SIZE:
            size = -(-length // _PAGE) * _PAGE
            slab = self._map(size, size, dedicated=True)
            off = 0
        else:
            n = max(length, MIN_CHUNK_SIZE)
            cls = self._classes[(n - 1).bit_length() - _MIN_CLASS_SHIFT]
            if cls.partial:
                slab = next(reversed(cls.partial))
            else:
                slab = self._map(cls.slab_size, cls.chunk, dedicated=False)
                cls.partial[slab] = None
            if slab.free:
                off = slab.free.pop()
            else:
                off = slab.bump
                slab.bump = off + slab.chunk
            if slab.used + 1 == slab.nchunks:
                del cls.partial[slab]
        slab.used += 1
        self._chunks_in_use += 1
        self._bytes_in_use += slab.chunk
        return slab, off

    def _free_chunk(self, slab: _Slab, off: int) -> None:
        slab.used -= 1
        self._chunks_in_use -= 1
        self._bytes_in_use -= slab.chunk
        if slab.dedicated:
            self._unmap(slab)
            return
        slab.free.append(off)
        cls = self._classes[slab.chunk.bit_length() - 1 - _MIN_CLASS_SHIFT]
        if slab.used + 1 == slab.nchunks:
            cls.partial[slab] = None  # was full
        if slab.used == 0 and len(cls.partial) > 1:
            del cls.partial[slab]  # keep at most one empty slab per class
            self._unmap(slab)

    def _retire(self, buf: SecretBuffer, blocking: bool) -> None:
        """Zero ``buf`` and give its chunk back (now, or queued if we cannot lock)."""
        entered = self._enter(blocking)
        try:
            if buf._len < 0:
                return
            buf._len = -1
            slab = buf._slab
            _memset(slab.base + buf._off, 0, slab.chunk)
            if buf._pins:
                return  # the last view() to close frees the chunk
            if entered:
                self._free_chunk(slab, buf._off)
            else:
                self._pending.append((slab, buf._off))
        finally:
            if entered:
                self._exit()


class SecretBuffer:
    """One key payload in arena memory; wiped on :meth:`wipe` or when collected.

    Compares and hashes by identity, refuses pickling and copying, and its
    repr shows only the length, so a payload cannot leak by accident.
    """

    __slots__ = ("_arena", "_len", "_off", "_pins", "_slab")

    _arena: SecretArena
    _slab: _Slab
    _off: int
    _len: int  # -1 once wiped
    _pins: int  # open view() blocks; the chunk is freed only when this is 0

    def __init__(self) -> None:
        raise TypeError("use SecretArena.store() or keyfence.keys.secret.store()")

    def __len__(self) -> int:
        """Payload length in bytes; 0 once wiped."""
        return max(self._len, 0)

    @property
    def wiped(self) -> bool:
        return self._len < 0

    @property
    def capacity(self) -> int:
        """Size of the chunk holding the payload (size class or page-rounded)."""
        return self._slab.chunk

    @property
    def address(self) -> int:
        """Address of the chunk; for tests that inspect memory directly."""
        return self._slab.base + self._off

    def __repr__(self) -> str:
        if self._len < 0:
            return "<SecretBuffer wiped>"
        return f"<SecretBuffer {self._len} bytes>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBuffer cannot be pickled or copied")

    def _wiped_error(self) -> ValueError:
        return ValueError("secret was wiped")

    def reveal(self) -> bytes:
        """Copy the payload into ordinary (unlocked, unwipeable) memory.

        Prefer :meth:`view`; the returned bytes can linger in the heap.
        """
        arena = self._arena
        entered = arena._enter()
        try:
            if self._len < 0:
                raise self._wiped_error()
            return _string_at(self._slab.base + self._off, self._len)
        finally:
            if entered:
                arena._exit()

    @contextmanager
    def view(self) -> Iterator[memoryview]:
        """Yield a read-only memoryview of the live bytes, released on exit.

        Do not let the view (or slices of it) escape the block: once the chunk
        is reused they would show another key's payload.  A concurrent
        :meth:`wipe` zeroes the bytes at once but keeps the chunk until exit.
        """
        arena = self._arena
        entered = arena._enter()
        try:
            if self._len < 0:
                raise self._wiped_error()
            self._pins += 1
        finally:
            if entered:
                arena._exit()
        try:
            ro = memoryview(self._slab.mm)[self._off : self._off + self._len].toreadonly()
            try:
                yield ro
            finally:
                ro.release()
        finally:
            entered = arena._enter()
            try:
                self._pins -= 1
                if self._pins == 0 and self._len < 0:
                    if entered:
                        arena._free_chunk(self._slab, self._off)
                    else:
                        arena._pending.append((self._slab, self._off))
            finally:
                if entered:
                    arena._exit()

    def compare(self, other: bytes | bytearray | memoryview) -> bool:
        """Constant-time equality with ``other``, reading the chunk in place (no copy).

        Only the lengths may leak through timing.
        """
        with self.view() as mine:
            return hmac.compare_digest(mine, other)

    def wipe(self) -> None:
        """Zero the payload in place and return the chunk; idempotent."""
        if self._len >= 0:
            self._arena._retire(self, blocking=True)

    def __del__(self) -> None:
        # Never block or raise in a finaliser; at shutdown globals may be gone.
        try:
            if self._len >= 0:
                self._arena._retire(self, blocking=False)
        except Exception:
            pass


_default_arena = SecretArena()


def default_arena() -> SecretArena:
    """The process-wide arena used by :func:`store`."""
    return _default_arena


def store(data: bytes | bytearray | memoryview) -> SecretBuffer:
    """Store ``data`` in the process-wide default arena."""
    return _default_arena.store(data)


def wipe_bytes(data: object) -> None:
    """Overwrite an (immutable) ``bytes`` object's contents with zeros.

    For the copies of a payload that leave the arena as ``bytes`` (a wire
    message's decoded field, a ``read``'s answer, a mount worker's key).
    CPython only: its bytes keep their contents inline after a fixed
    header.  The object must not be shared with anything that still needs
    it.  Anything but a ``bytes`` of two bytes or more is left alone (the
    empty and one-byte objects are the interpreter's shared ones).
    """
    if type(data) is bytes and len(data) > 1:
        offset = sys.getsizeof(b"") - 1  # the header; the rest is contents + NUL
        ctypes.memset(id(data) + offset, 0, len(data))
