"""Key-user notifications: watches, events, and their delivery.

A *watch* names a key or keyring, an event mask and a callback.  Events are
the kernel's key notifications (instantiated, updated, linked, unlinked,
cleared, revoked, invalidated, setattr) plus ``expired`` and ``gc`` (the key
was destroyed and its payload wiped).  An event says what happened, to which
key, in which keyring (``aux``), by which operation and caller.

A *synchronous* watch also takes part in removals: before a watched key goes
away, its callback is called with a ``before`` notification and the removal
waits for it (keyfence.keys.fence).  Every watch, synchronous or not, is told
``after`` the fact through the dispatcher thread, in order.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntFlag
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keyfence.keys.key import Key

log = logging.getLogger(__name__)


class KeyEvent(IntFlag):
    INSTANTIATED = 0x001
    UPDATED = 0x002
    LINKED = 0x004
    UNLINKED = 0x008
    CLEARED = 0x010
    REVOKED = 0x020
    INVALIDATED = 0x040
    SETATTR = 0x080
    EXPIRED = 0x100
    GC = 0x200
    ALL = 0x3FF

    @property
    def label(self) -> str:
        """The word keyctl(1) prints for the event (``inst``, ``upd``, ...)."""
        return _LABELS.get(self, (self.name or "?").lower())


_LABELS = {
    KeyEvent.INSTANTIATED: "inst",
    KeyEvent.UPDATED: "upd",
    KeyEvent.LINKED: "link",
    KeyEvent.UNLINKED: "unlk",
    KeyEvent.CLEARED: "clr",
    KeyEvent.REVOKED: "rev",
    KeyEvent.INVALIDATED: "inv",
    KeyEvent.SETATTR: "attr",
    KeyEvent.EXPIRED: "exp",
    KeyEvent.GC: "gc",
}


class Phase(Enum):
    BEFORE = "before"
    """Synchronous: the key is about to go away; it is still valid and
    readable; flush now.  Raising aborts the removal."""
    AFTER = "after"
    """It happened."""


@dataclass(frozen=True, slots=True)
class Notification:
    """One event as a watcher sees it."""

    key: int
    """The watched key or keyring this is about."""
    event: KeyEvent
    aux: int | None = None
    """For linked/unlinked: the key linked into or unlinked from ``key``."""
    op: str = ""
    """The operation that caused it (keyctl(1)'s word: clear, revoke, ...)."""
    uid: int | None = None
    pid: int | None = None
    """Who asked; None when the service itself acted (expiry, gc, exit)."""
    phase: Phase = Phase.AFTER
    emergency: bool = False
    """The key was wiped without waiting: drop copies and plaintext now and
    account for what could not be written."""
    removal: int = 0
    """Identifies one removal across all its notifications."""
    description: str = ""
    _report: Callable[[int | None, str], None] | None = field(
        default=None, repr=False, compare=False
    )

    def report_progress(self, remaining_bytes: int | None = None, note: str = "") -> None:
        """Tell the waiting caller how much is left (BEFORE phase only)."""
        if self._report is not None:
            self._report(remaining_bytes, note)


WatchCallback = Callable[[Notification], None]

_watch_ids = itertools.count(1)

MAX_WATCH_NAME = 256
"""Characters in a watch's name (EINVAL past it): a name is shown to
whoever's removal the watcher holds up, in their progress line and errors."""
MAX_WATCHER_TEXT = 256
"""Characters kept of what a watcher says (a progress note, a refusal's
reason): the rest is cut, as it reaches other users' terminals and logs."""


def is_printable_text(text: str) -> bool:
    """No control or format characters (escape sequences, bidi overrides)."""
    return all(ch.isprintable() or ch == " " for ch in text)


def watcher_text(text: str, limit: int = MAX_WATCHER_TEXT) -> str:
    """What a watcher said, safe to show another user: control and format
    characters as ``?`` (no escape sequence reaches a terminal or a log
    line), at most ``limit`` characters."""
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    if is_printable_text(text):
        return text
    return "".join(ch if ch.isprintable() or ch == " " else "?" for ch in text)


class Watch:
    """A registered watch; ``remove()`` ends it (a pending fence call on a
    removed watch counts as done, as for a watcher whose process is gone)."""

    __slots__ = ("_table", "callback", "events", "id", "key", "name", "owner_uid", "sync")

    def __init__(
        self,
        table: WatchTable,
        key: Key,
        events: KeyEvent,
        callback: WatchCallback,
        *,
        sync: bool,
        name: str,
        owner_uid: int,
    ) -> None:
        self.id = next(_watch_ids)
        self._table = table
        self.key = key
        self.events = events
        self.callback = callback
        self.sync = sync
        self.name = name
        self.owner_uid = owner_uid

    @property
    def active(self) -> bool:
        return self._table.is_active(self)

    def remove(self) -> None:
        self._table.remove(self)

    def __repr__(self) -> str:
        kind = "sync" if self.sync else "async"
        return f"<Watch {self.id} {self.name!r} on {self.key.serial} {kind}>"


class WatchTable:
    """Watches by key.  Guarded by its own lock so removal never needs the
    service lock to drop a watch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Key, dict[int, Watch]] = {}
        self._removed = threading.Condition(self._lock)

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def add(self, watch: Watch) -> None:
        with self._lock:
            self._by_key.setdefault(watch.key, {})[watch.id] = watch
            if watch.sync:
                watch.key.sync_watches += 1

    def remove(self, watch: Watch) -> None:
        with self._lock:
            watches = self._by_key.get(watch.key)
            if watches is None or watches.pop(watch.id, None) is None:
                return
            if watch.sync:
                watch.key.sync_watches -= 1
            if not watches:
                del self._by_key[watch.key]
            self._removed.notify_all()

    def is_active(self, watch: Watch) -> bool:
        with self._lock:
            return watch.id in self._by_key.get(watch.key, {})

    def of(self, key: Key) -> list[Watch]:
        with self._lock:
            return list(self._by_key.get(key, {}).values())

    def sync_of(self, key: Key) -> list[Watch]:
        if not key.sync_watches:
            return []
        return [w for w in self.of(key) if w.sync]

    def forget(self, key: Key) -> None:
        """Drop every watch on a destroyed key."""
        with self._lock:
            watches = self._by_key.pop(key, None)
            if watches:
                key.sync_watches = 0
                self._removed.notify_all()


class Dispatcher:
    """Delivers AFTER notifications in order on one thread.

    A callback that raises is logged (without payloads: notifications hold
    none) and does not stop delivery to others.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Watch, Notification] | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="keyfence-notify", daemon=True)
        self._thread.start()

    def post(self, items: list[tuple[Watch, Notification]]) -> None:
        if not items:
            return
        with self._idle:
            self._pending += len(items)
        for item in items:
            self._queue.put(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            watch, note = item
            try:
                watch.callback(note)
            except Exception:
                log.exception("watch %r raised on %s", watch.name, note.event.label)
            finally:
                with self._idle:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every posted notification was delivered."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
