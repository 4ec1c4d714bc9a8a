"""What one connection and one uid may hold in the daemon.

The kernel bounds what a user may hold with per-uid key quotas
(/proc/sys/kernel/keys/maxkeys); the daemon adds the same kind of bound on
what it spends serving a user: connections, requests in flight, watches,
and bytes queued for a client that does not read.  A uid at its bound gets
an error with an errno (EMFILE for connections and watches, EBUSY for
requests); it never makes anyone else wait.  Root (uid 0: the admin, the
daemon's own mount channels) has no per-uid bound.

Lock rule: every method takes ``_lock`` briefly and calls nothing.
"""

from __future__ import annotations

import threading

MAX_INFLIGHT = 32
"""Requests one connection may have running at once (EBUSY beyond)."""
MAX_WATCHES = 4096
"""Watches one connection may hold (EMFILE beyond)."""
MAX_BAD_FRAMES = 16
"""Malformed messages tolerated on one connection before it is closed."""

CONNECTIONS_PER_UID = 128
"""Connections one uid may have open (EMFILE beyond, then closed)."""
INFLIGHT_PER_UID = 256
"""Requests one uid may have running or queued (EBUSY beyond)."""
WATCHES_PER_UID = 16384
"""Watches one uid may hold over all its connections (EMFILE beyond)."""

HANDSHAKE_SECONDS = 3.0
"""A connection that has not sent its Hello by then is closed."""
OUTPUT_PAUSE_BYTES = 256 * 1024
"""Queued reply bytes past which the daemon stops reading a connection's
requests until it reads its replies (a pipelining client slows itself)."""
OUTPUT_LIMIT_BYTES = 8 * 1024 * 1024
"""Queued bytes past which a client that does not read is disconnected
(room for a few maximum-size frames: a reply of a 1 MiB key and events)."""
INPUT_BYTES_PER_UID = 32 * 1024 * 1024
"""Bytes of partial messages one uid's connections may have buffered together
(each up to MAX_FRAME): the connection that would pass it is closed."""
OUTPUT_BYTES_PER_UID = 32 * 1024 * 1024
"""Queued bytes one uid's connections may hold together; the connection
that would pass it is disconnected (so 128 non-readers cost 32 MiB, not 1 GiB)."""
QUEUED_FRAME_BYTES = 512
"""What a queued frame costs besides its bytes (its bytearray, memoryview
and deque slot), counted against both output bounds: a stream of 200-byte
events held 3x the bound's memory when only their bytes counted."""

UNLIMITED_UIDS = frozenset({0})


class UidLimits:
    """Counts of what each uid holds: ``try_take`` takes units or refuses."""

    def __init__(
        self,
        *,
        connections: int = CONNECTIONS_PER_UID,
        inflight: int = INFLIGHT_PER_UID,
        watches: int = WATCHES_PER_UID,
        output: int = OUTPUT_BYTES_PER_UID,
        input: int = INPUT_BYTES_PER_UID,
    ) -> None:
        self._lock = threading.Lock()
        self._bounds = {
            "connections": connections,
            "inflight": inflight,
            "watches": watches,
            "output": output,
            "input": input,
        }
        self._held: dict[tuple[str, int], int] = {}

    def bound(self, what: str) -> int:
        return self._bounds[what]

    def try_take(self, what: str, uid: int, amount: int = 1) -> bool:
        key = (what, uid)
        with self._lock:
            held = self._held.get(key, 0)
            if held + amount > self._bounds[what] and uid not in UNLIMITED_UIDS:
                return False
            self._held[key] = held + amount
            return True

    def give_back(self, what: str, uid: int, count: int = 1) -> None:
        key = (what, uid)
        with self._lock:
            left = self._held.get(key, 0) - count
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)

    def held(self, what: str, uid: int) -> int:
        with self._lock:
            return self._held.get((what, uid), 0)
