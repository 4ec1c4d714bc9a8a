"""Fences: running the synchronous watchers of a removal, and use-guards.

Before a removal changes anything, :class:`FenceRound` calls every
synchronous watcher of every key going away -- concurrently, one thread per
watcher callback (calls for the same callback run in order on its thread, so
one watcher of 10,000 keys costs one thread), without the service lock -- and
waits until all returned, one raised (abort), or the caller's deadline
passed (abort, naming who is still working).  A watch removed while its call
is pending counts as done, like a watcher whose process is gone.

The caller can watch progress: each watcher may report how many bytes it has
left; :class:`RemovalProgress` is a frozen snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from typing import NamedTuple

from keyfence.keys import waits
from keyfence.keys.notify import Notification, Watch, watcher_text

_local = threading.local()
log = logging.getLogger(__name__)

IDLE_WORKER_SECONDS = 30.0
MAX_QUEUED_REPORTS = 64
"""Progress reports held for a caller that has not looked yet."""
WATCH_CHECK_SECONDS = 0.1
"""How often a waiting fence looks for watches removed while pending."""
FOREIGN_WATCHER_SECONDS = 5.0
"""How long a *foreign* synchronous watcher -- one whose uid is not the
removal's (docs/security.md, "Daemon: caller identity and session keyrings
across users") -- may hold a removal up.  Past it, the call counts as done;
a foreign watcher's error does not abort the removal either."""


class PoolStatistics(NamedTuple):
    """The fence's worker threads."""

    workers: int
    """Threads alive."""
    idle: int
    """Of which idle, waiting for a call (kept IDLE_WORKER_SECONDS for reuse)."""


class _ElasticPool:
    """Threads for watcher calls: an idle one is reused, else a new one starts.

    Never bounded: a watcher that blocks forever must not keep another
    removal's watchers from being called concurrently.  Reuse saves the
    thread start (about half the cost of fencing one key).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0
        self._workers = 0
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[object, ...]]] = (
            queue.SimpleQueue()
        )

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put((fn, args))
                return
            self._workers += 1
        threading.Thread(
            target=self._work, args=((fn, args),), name="keyfence-fence", daemon=True
        ).start()

    def _work(self, job: tuple[Callable[..., None], tuple[object, ...]]) -> None:
        while True:
            fn, args = job
            try:
                fn(*args)
            except BaseException:
                log.exception("fence worker failed")
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=IDLE_WORKER_SECONDS)
            except queue.Empty:
                with self._lock:
                    try:
                        job = self._jobs.get_nowait()  # submitted as we timed out
                    except queue.Empty:
                        self._idle -= 1
                        self._workers -= 1
                        return

    def statistics(self) -> PoolStatistics:
        with self._lock:
            return PoolStatistics(workers=self._workers, idle=self._idle)


_pool = _ElasticPool()


def worker_statistics() -> PoolStatistics:
    """Fence worker threads alive, and how many of them are idle."""
    return _pool.statistics()


def current_fence() -> int:
    """The removal whose watcher this thread is running (0: none).

    A removal started from inside a watcher must not wait for the fence
    that is waiting for that very watcher: the service refuses it (EDEADLK).
    """
    return getattr(_local, "removal", 0)


@contextlib.contextmanager
def inside_fence(removal: int) -> Iterator[None]:
    """Run as if inside a watcher of ``removal`` (0: as we are): a remote
    watcher's callback calling back, as its request says (protocol
    ``Request.fence``), so that :func:`current_fence` sees it."""
    if not removal:
        yield
        return
    previous = getattr(_local, "removal", 0)
    _local.removal = removal
    try:
        yield
    finally:
        _local.removal = previous


@dataclass(frozen=True, slots=True)
class WatcherProgress:
    watcher: str
    key: int
    remaining_bytes: int | None = None
    note: str = ""
    done: bool = False


@dataclass(frozen=True, slots=True)
class RemovalProgress:
    """What a waiting caller can show: who is still flushing, how much is left."""

    op: str
    removal: int
    keys: int
    """How many keys go away."""
    pending: tuple[WatcherProgress, ...]
    elapsed: float

    @property
    def remaining_bytes(self) -> int:
        return sum(p.remaining_bytes or 0 for p in self.pending)


@dataclass(slots=True)
class _Call:
    watch: Watch
    note: Notification
    progress: WatcherProgress
    done: bool = False
    until: float | None = None
    """For a foreign watcher: when it stops holding the removal up."""


class FenceOutcome(Enum):
    """How a fence round ended."""

    OK = "ok"
    FAILED = "failed"
    """A watcher raised: the removal is aborted."""
    TIMEOUT = "timeout"
    """The caller's deadline passed with watchers still working."""
    GONE = "gone"
    """The caller went away (a kfctl stopped with Ctrl-C) with watchers
    still working: as a timeout, nothing is removed."""


class FenceRound:
    """One round of synchronous calls for one removal."""

    def __init__(
        self,
        removal: int,
        op: str,
        nkeys: int,
        calls: list[tuple[Watch, Notification]],
        foreign: frozenset[int] = frozenset(),
        foreign_until: float | None = None,
    ) -> None:
        """``foreign``: ids of the watches that may hold the removal up
        until ``foreign_until`` (a monotonic time; default
        FOREIGN_WATCHER_SECONDS from now) at most, and cannot abort it."""
        self.removal = removal
        self.op = op
        self.nkeys = nkeys
        self._cond = threading.Condition()
        self._calls: list[_Call] = []
        self._left = len(calls)
        self._changed = False
        self._reports: list[RemovalProgress] = []
        self.failure: tuple[Watch, BaseException] | None = None
        self._start = time.monotonic()
        until = (
            foreign_until if foreign_until is not None else self._start + FOREIGN_WATCHER_SECONDS
        )
        for watch, note in calls:
            call = _Call(watch, note, WatcherProgress(watch.name, note.key))
            call.note = replace(note, _report=self._reporter(call))
            if watch.id in foreign:
                call.until = until
            self._calls.append(call)

    def _reporter(self, call: _Call) -> Callable[[int | None, str], None]:
        def report(remaining: int | None, note: str) -> None:
            with self._cond:
                note = watcher_text(note)  # shown to the removal's caller
                call.progress = replace(call.progress, remaining_bytes=remaining, note=note)
                # every report reaches the caller, in order; under a flood
                # only the newest of the tail is kept
                snap = self._snapshot_locked()
                if len(self._reports) >= MAX_QUEUED_REPORTS:
                    self._reports[-1] = snap
                else:
                    self._reports.append(snap)
                self._changed = True
                self._cond.notify_all()

        return report

    def start(self) -> None:
        groups: dict[object, list[_Call]] = {}
        for call in self._calls:
            # one thread per watcher: a callback may name the group it belongs
            # to (a client connection owning many watches)
            group = getattr(call.watch.callback, "fence_group", None) or id(call.watch.callback)
            groups.setdefault(group, []).append(call)
        for group in groups.values():
            _pool.submit(self._run, group)

    def _run(self, group: list[_Call]) -> None:
        _local.removal = self.removal
        try:
            for call in group:
                with self._cond:
                    if self.failure is not None:
                        return
                if call.watch.active:
                    try:
                        call.watch.callback(call.note)
                    except BaseException as err:
                        with self._cond:
                            if call.until is not None:
                                name = call.watch.name
                                why = watcher_text(str(err))
                                log.warning("%s refused a foreign removal: %s", name, why)
                                self._finish(call)
                                continue
                            if self.failure is None:
                                self.failure = (call.watch, err)
                            self._cond.notify_all()
                        return
                with self._cond:
                    self._finish(call)
        finally:
            _local.removal = 0

    def _finish(self, call: _Call) -> None:
        """Mark one call done (the condition held)."""
        if not call.done:
            call.done = True
            self._left -= 1
            self._changed = True
            self._cond.notify_all()

    def pending(self) -> list[_Call]:
        return [c for c in self._calls if not c.done]

    def pending_calls(self) -> list[tuple[Watch, int]]:
        """The calls not done yet, as (watch, key serial); safe from any thread."""
        with self._cond:
            return [(c.watch, c.note.key) for c in self._calls if not c.done]

    def snapshot(self) -> RemovalProgress:
        with self._cond:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> RemovalProgress:
        pending = tuple(c.progress for c in self._calls if not c.done)
        return RemovalProgress(
            self.op, self.removal, self.nkeys, pending, time.monotonic() - self._start
        )

    def wait(
        self,
        deadline: float | None,
        progress: Callable[[RemovalProgress], None] | None,
    ) -> FenceOutcome:
        """Wait for every call; FenceOutcome.OK, FAILED or TIMEOUT."""
        next_check = time.monotonic() + WATCH_CHECK_SECONDS
        while True:
            with self._cond:
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + WATCH_CHECK_SECONDS
                    if waits.caller_gone():
                        return FenceOutcome.GONE
                    for call in self._calls:
                        if not call.done and not call.watch.active:
                            self._finish(call)  # the watcher went away: counts as done
                        elif not call.done and call.until is not None and now >= call.until:
                            log.warning("%s held a foreign removal too long", call.watch.name)
                            self._finish(call)  # failed open
                if self.failure is not None:
                    return FenceOutcome.FAILED
                if not self._left:
                    return FenceOutcome.OK
                if deadline is not None and now >= deadline:
                    return FenceOutcome.TIMEOUT
                wait = max(0.0, next_check - now)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if not self._changed:
                    self._cond.wait(wait)
                changed, self._changed = self._changed, False
                reports, self._reports = self._reports, []
            if progress is not None and changed:
                for snap in reports or [self.snapshot()]:
                    progress(snap)

    def describe_pending(self, most: int = 8) -> str:
        """Who is still working, for an error message: ``most`` of them named."""
        with self._cond:
            names = sorted({f"{c.watch.name} (key {c.note.key})" for c in self.pending()})
        shown = ", ".join(names[:most])
        return shown + (f" and {len(names) - most} more" if len(names) > most else "")
