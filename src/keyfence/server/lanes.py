"""Threads for requests that may wait, at most a few per uid.

A request that may wait for a removal's watchers (a removal, or an add or
link that may displace a key) runs on a thread of its own: the key service
waits synchronously.  What keeps one uid from holding every thread is the
lane: each uid runs at most :data:`THREADS_PER_UID` such requests at once;
the rest of its requests queue as state (a deque entry, not a thread) and
start, in order, as its own requests finish.  Another uid's requests never
queue behind them, so the number of threads is bounded by uids in use times
the per-uid bound, and a uid that parks all of its threads only slows
itself.

A request-key handler runs as the uid whose request it serves, and that
uid's other requests may all be waiting for the key it makes (ten
``keyctl request2`` of one key at once): the handler's requests that may
wait get a lane of their own, :func:`handler_lane`, or its ``instantiate``
would queue behind them until the handler was killed.

Threads outlive their request for :data:`IDLE_SECONDS` and are reused by
any uid (a thread start costs about as much as the request).

Lock rule: ``_lock`` guards the counters and queues; no job runs under it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("keyfence.lanes")

THREADS_PER_UID = 8
"""Requests of one uid that may be waiting on threads at once."""
IDLE_SECONDS = 10.0
"""How long an idle thread waits for another job before it ends."""


def handler_lane(uid: int) -> int:
    """The lane of ``uid``'s request-key handlers (a negative number: no
    uid's own)."""
    return -1 - uid


Job = Callable[[], object]
"""A request to run; what it returns is ignored."""


class Lanes:
    def __init__(
        self, *, threads_per_uid: int = THREADS_PER_UID, idle_seconds: float = IDLE_SECONDS
    ) -> None:
        self.threads_per_uid = threads_per_uid
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._running: dict[int, int] = {}
        self._queued: dict[int, deque[Job]] = {}
        self._idle = 0
        self._threads = 0
        self._jobs: queue.SimpleQueue[tuple[int, Job]] = queue.SimpleQueue()

    def submit(self, uid: int, job: Job) -> None:
        """Run ``job`` on a thread, now if ``uid`` has a free lane, else
        after its earlier requests.  Never blocks."""
        with self._lock:
            if self._running.get(uid, 0) >= self.threads_per_uid:
                self._queued.setdefault(uid, deque()).append(job)
                return
            self._running[uid] = self._running.get(uid, 0) + 1
            # through the queue, never a Thread's args (which it keeps while
            # it lives): a request's arguments may be a key's payload
            self._jobs.put((uid, job))
            if self._idle:
                self._idle -= 1
                return
            self._threads += 1
        threading.Thread(target=self._work, name="keyfence-lane", daemon=True).start()

    def _work(self) -> None:
        job: Job | None
        uid, job = self._jobs.get()
        while job is not None:
            try:
                job()
            except BaseException:
                log.exception("a request thread failed")
            # drop the request now, not when the next one comes: its
            # arguments may be a key's payload
            job = None
            with self._lock:
                waiting = self._queued.get(uid)
                if waiting:
                    job = waiting.popleft()  # the uid keeps its lane
                    if not waiting:
                        del self._queued[uid]
                    continue
                left = self._running[uid] - 1
                if left:
                    self._running[uid] = left
                else:
                    del self._running[uid]
                self._idle += 1
            try:
                uid, job = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    try:
                        uid, job = self._jobs.get_nowait()  # given to us as we timed out
                    except queue.Empty:
                        self._idle -= 1
                        self._threads -= 1
                        return

    def statistics(self) -> dict[str, int]:
        """Threads alive, idle, and requests queued behind busy lanes."""
        with self._lock:
            queued = sum(len(q) for q in self._queued.values())
            return {"threads": self._threads, "idle": self._idle, "queued": queued}
