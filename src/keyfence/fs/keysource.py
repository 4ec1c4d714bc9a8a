"""How a mount worker gets its keys, and hears that one is going away.

The worker never reads the kernel or the daemon's tables itself: it asks a
:class:`KeySource` for the key a request needs, *in the keyrings of the
process making the request* (FUSE gives its pid), as ext4 did.  The real
source is :class:`DaemonKeySource`, which speaks to the daemon over the
private channel the daemon made when it spawned the worker -- the only
connection allowed to read a logon key's payload.

A found key comes with a synchronous watch: before that key goes away
(clear, revoke, unlink, expiry, session end ...), ``on_going`` is called and
the removal waits for it; the worker flushes everything written under the
key, evicts its plaintext and drops its copy of the key.  If ``on_going``
raises, the removal is aborted with that error.  In an emergency the key is
already gone when ``on_going`` runs (``going.emergency``): drop at once and
report what was lost with ``going.report_dropped``.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from keyfence.errors import KeyfenceError


@dataclass(frozen=True)
class FoundKey:
    serial: int
    description: str
    """``keyfence:<identifier>`` or ``ext4:<descriptor>``."""
    payload: bytes = field(repr=False)
    """The 64-byte master key.  The worker keeps it no longer than the key lives."""


@dataclass
class GoingAway:
    serial: int
    emergency: bool
    op: str
    """What is taking it away: clear, revoke, unlink, expire, session_end, ..."""
    _report: Callable[[int | None, str], None] | None = field(default=None, repr=False)
    dropped: dict[str, int] = field(default_factory=dict)
    """Emergency only: file path -> bytes discarded, filled by the worker."""

    def report_progress(self, remaining_bytes: int | None, note: str = "") -> None:
        if self._report is not None:
            self._report(remaining_bytes, note)


OnGoing = Callable[[GoingAway], None]


class KeySource(Protocol):
    def find(self, descriptions: list[str], pid: int) -> FoundKey | None:
        """The first of ``descriptions`` (logon/user keys) reachable from the
        keyrings of process ``pid``, or None.  Never raises for "not found"."""
        ...

    def watch(self, serial: int, on_going: OnGoing) -> None:
        """Call ``on_going`` synchronously before key ``serial`` goes away."""
        ...

    def report(self, event: str, detail: dict[str, Any]) -> None:
        """Tell the daemon something for its status output (busy files, drops)."""
        ...


class DaemonKeySource:
    """A KeySource over the worker's private channel to the daemon.

    The channel is a socketpair end passed at spawn (fd number in
    ``$KEYFENCE_WORKER_FD``); the daemon serves worker-only operations on it.
    """

    def __init__(self, sock: socket.socket) -> None:
        from keyfence.client import Client

        self._client = Client.over_socket(sock, name="mount worker")
        self._client.listen()
        self._lock = threading.Lock()
        self._closing = False

    @classmethod
    def from_environment(cls) -> DaemonKeySource:
        fd = os.environ.get("KEYFENCE_WORKER_FD")
        if not fd:
            raise KeyfenceError(errno.ENOTCONN, "no private channel to the daemon (run by it)")
        if not fd.isdigit():
            raise KeyfenceError(errno.EBADF, f"KEYFENCE_WORKER_FD is not a descriptor: {fd!r}")
        return cls(socket.socket(fileno=int(fd)))

    def find(self, descriptions: list[str], pid: int) -> FoundKey | None:
        found = self._client.worker_find_key(pid, descriptions)
        if found is None:
            return None
        # as given: an e4crypt payload is unwrapped by the binding (binding.py)
        serial, description, payload = found
        return FoundKey(serial, description, payload)

    def watch(self, serial: int, on_going: OnGoing) -> None:
        def callback(note: Any) -> None:
            if note.phase != "before" and not note.emergency:
                return
            going = GoingAway(
                serial=note.key,
                emergency=note.emergency,
                op=note.op,
                _report=note.report_progress,
            )
            on_going(going)
            if going.dropped:
                self.report("dropped", {"key": serial, "files": going.dropped})

        self._client.watch(serial, callback, sync=True, name="mount worker")

    def report(self, event: str, detail: dict[str, Any]) -> None:
        self._client.worker_report(event, detail)

    def ready(self) -> None:
        """The mount is live: the daemon's ``keyfence mount`` returns now."""
        self.report("ready", {})

    def failed(self, reason: str) -> None:
        self.report("error", {"reason": reason})

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on its own thread) when the channel closes
        without our asking: the daemon is gone, and with it every key
        lookup and every fence (docs/fs.md, "Faults")."""

        def wait() -> None:
            self._client.wait_disconnected()
            if not self._closing:
                callback()

        threading.Thread(target=wait, name="keyfence-channel", daemon=True).start()

    def close(self) -> None:
        self._closing = True
        self._client.close()
