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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from keyfence.keys.notify import Notification, Phase, Watch

_local = threading.local()


def current_fence() -> int:
    """The removal whose watcher this thread is running (0: none).

    A removal started from inside a watcher must not wait for the fence
    that is waiting for that very watcher: the service refuses it (EDEADLK).
    """
    return getattr(_local, "removal", 0)


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


class FenceOutcome:
    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"


class FenceRound:
    """One round of synchronous calls for one removal."""

    def __init__(
        self,
        removal: int,
        op: str,
        nkeys: int,
        calls: list[tuple[Watch, Notification]],
    ) -> None:
        self.removal = removal
        self.op = op
        self.nkeys = nkeys
        self._cond = threading.Condition()
        self._calls: list[_Call] = []
        self._changed = False
        self.failure: tuple[Watch, BaseException] | None = None
        self._start = time.monotonic()
        for watch, note in calls:
            call = _Call(watch, note, WatcherProgress(watch.name, note.key))
            call.note = replace(note, _report=self._reporter(call))
            self._calls.append(call)

    def _reporter(self, call: _Call) -> Callable[[int | None, str], None]:
        def report(remaining: int | None, note: str) -> None:
            with self._cond:
                call.progress = replace(call.progress, remaining_bytes=remaining, note=note)
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
            name = f"keyfence-fence-{self.removal}-{group[0].watch.name}"
            threading.Thread(target=self._run, args=(group,), name=name, daemon=True).start()

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
                            if self.failure is None:
                                self.failure = (call.watch, err)
                            self._cond.notify_all()
                        return
                with self._cond:
                    call.done = True
                    call.progress = replace(call.progress, done=True)
                    self._changed = True
                    self._cond.notify_all()
        finally:
            _local.removal = 0

    def pending(self) -> list[_Call]:
        return [c for c in self._calls if not c.done]

    def snapshot(self) -> RemovalProgress:
        with self._cond:
            pending = tuple(c.progress for c in self._calls if not c.done)
        return RemovalProgress(
            self.op, self.removal, self.nkeys, pending, time.monotonic() - self._start
        )

    def wait(
        self,
        deadline: float | None,
        progress: Callable[[RemovalProgress], None] | None,
    ) -> str:
        """Wait for every call; FenceOutcome.OK, FAILED or TIMEOUT."""
        while True:
            with self._cond:
                for call in self._calls:
                    if not call.done and not call.watch.active:
                        call.done = True  # the watcher went away: counts as done
                if self.failure is not None:
                    return FenceOutcome.FAILED
                if all(c.done for c in self._calls):
                    return FenceOutcome.OK
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return FenceOutcome.TIMEOUT
                wait = 0.05 if deadline is None else min(0.05, deadline - now)
                if not self._changed:
                    self._cond.wait(wait)
                changed, self._changed = self._changed, False
            if progress is not None and changed:
                progress(self.snapshot())

    def describe_pending(self) -> str:
        with self._cond:
            names = sorted({f"{c.watch.name} (key {c.note.key})" for c in self.pending()})
        return ", ".join(names)


def before_notification(note: Notification) -> Notification:
    return replace(note, phase=Phase.BEFORE)
