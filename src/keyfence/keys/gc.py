"""The garbage collector: expiry, and reaping of revoked and expired keys.

Everything else that kills a key does so inside the operation that caused
it, so the collector has only the work that time causes:

* at a key's expiry time, the key expires through the removal path (its
  users are told, its payload wiped);
* ``delay`` seconds after a key was revoked or expired, its links are cut
  and it is destroyed, as the kernel's gc does after gc_delay.

Work is a heap of (when, serial); each entry is re-checked when it comes
due, so a key whose timeout changed or that is already gone costs nothing.

An expiry or reap is on behalf of the key's owner, whose own watchers it
waits for without bound (docs/security.md, "Who a synchronous watcher may
hold up").  So the collector's thread only hands due work to a thread per
owner uid (at most one per uid at once, its work in order): a user whose
own watcher never answers the expiry of their own key holds up their own
collection, not everyone's.  Before, one thread ran every removal, and a
key with a silent watcher of its owner's stopped every other user's keys
from expiring (still readable, their mounts never told) and being reaped.
:meth:`GarbageCollector.wait_idle` lets an operation wait for the work it
caused to finish.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from keyfence.keys.key import Key, KeyState
from keyfence.keys.removal import Removal

if TYPE_CHECKING:
    from keyfence.keys.removal_path import RemovalPath

_EXPIRE, _REAP = 0, 1
RETRY_DELAY = 5.0
"""Seconds before an expiry or reap that a watcher refused is tried again."""

log = logging.getLogger(__name__)


def _given(removal: Removal) -> Callable[[], Removal]:
    """A ``build()`` for a removal already worked out."""
    return lambda: removal


class GarbageCollector:
    def __init__(
        self,
        removals: RemovalPath,
        *,
        delay: float,
        clock: Callable[[], float],
        threaded: bool = True,
    ) -> None:
        self.delay = delay
        self._removals = removals
        removals.reap_with(self.schedule_reap)
        self._clock = clock
        self._heap: list[tuple[float, int, int, Key]] = []
        self._seq = 0
        self._cond = threading.Condition()
        self._busy = False
        self._stopped = False
        self._lanes: dict[int, deque[tuple[int, Key]]] = {}
        """Due work per owner uid, each run by a thread of its own (threaded)."""
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="keyfence-gc", daemon=True)
            self._thread.start()

    # -- scheduling (called with the service lock held; never blocks long)

    def _push(self, when: float, kind: int, key: Key) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, kind, key))
            self._cond.notify_all()

    def schedule_expiry(self, key: Key) -> None:
        if key.expiry is not None:
            self._push(key.expiry, _EXPIRE, key)

    def schedule_reap(self, key: Key, now: float) -> None:
        self._push(now + self.delay, _REAP, key)

    # -- running

    def _due(self, now: float) -> list[tuple[int, Key]]:
        due = []
        with self._cond:
            while self._heap and self._heap[0][0] <= now:
                _when, _seq, kind, key = heapq.heappop(self._heap)
                due.append((kind, key))
        return due

    def collect(self, now: float | None = None) -> int:
        """Do all work due by ``now``; return how many keys it touched."""
        if now is None:
            now = self._clock()
        with self._cond:
            self._busy = True
        try:
            return sum(self._do(kind, key, now) for kind, key in self._due(now))
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _do(self, kind: int, key: Key, now: float) -> int:
        """One due expiry or reap; 1 if it touched the key."""
        removal = self._work_for(kind, key, now)
        if removal is None:
            return 0
        try:
            self._removals.run(_given(removal))
        except OSError as err:
            # a watcher refused: the key stays valid; try again later
            log.warning("%s of key %d postponed: %s", removal.op, key.serial, err)
            self._push(now + RETRY_DELAY, kind, key)
            return 0
        return 1

    def _hand_out(self) -> None:
        """Give the work due now to its owners' lanes (the thread's turn)."""
        starts = []
        with self._cond:  # (an RLock) taken from the heap and given out at once:
            due = self._due(self._clock())  # wait_idle never sees it in neither
            for kind, key in due:
                lane = self._lanes.get(key.uid)
                if lane is None:
                    lane = self._lanes[key.uid] = deque()
                    starts.append(key.uid)
                lane.append((kind, key))
        for uid in starts:
            try:
                threading.Thread(
                    target=self._run_lane, args=(uid,), name=f"keyfence-gc-{uid}", daemon=True
                ).start()
            except RuntimeError:
                # no thread to be had (the system's limit, many uids' lanes
                # held at once): the work waits its turn rather than the
                # collector's thread dying of it
                log.warning("gc: no thread for uid %d's expiries; retried later", uid)
                with self._cond:
                    lane = self._lanes.pop(uid)
                    self._cond.notify_all()
                for kind, key in lane:
                    self._push(self._clock() + RETRY_DELAY, kind, key)

    def _run_lane(self, uid: int) -> None:
        while True:
            with self._cond:
                lane = self._lanes[uid]
                if not lane or self._stopped:
                    del self._lanes[uid]
                    self._cond.notify_all()
                    return
                kind, key = lane.popleft()
            try:
                self._do(kind, key, self._clock())
            except Exception:
                log.exception("gc of key %d failed", key.serial)

    def _work_for(self, kind: int, key: Key, now: float) -> Removal | None:
        with self._removals.lock:
            if not key.is_live():
                return None
            if kind == _EXPIRE:
                if key.state is not KeyState.VALID or key.expiry is None or key.expiry > now:
                    return None
                return Removal("expire", None, kills={key: KeyState.EXPIRED})
            since = key.revoked_at if key.state is KeyState.REVOKED else key.expiry
            if key.state not in (KeyState.REVOKED, KeyState.EXPIRED) or since is None:
                return None
            if since + self.delay > now:
                self._push(since + self.delay, _REAP, key)
                return None
            return Removal("gc", None, unlinks=[(ring, key) for ring in key.parents])

    def _next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    when = self._next_due()
                    now = self._clock()
                    if when is not None and when <= now:
                        break
                    self._cond.wait(None if when is None else min(when - now, 1.0))
                if self._stopped:
                    return
            self._hand_out()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no work is due now or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    not self._busy
                    and not self._lanes
                    and (not self._heap or self._heap[0][0] > self._clock() or self._thread is None)
                ),
                timeout,
            )

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
