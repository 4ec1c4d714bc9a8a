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
import threading
import time
from collections import deque
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
    LOSS = 0x400
    """Not a key event: notifications to this watch were dropped, its
    uid's queue being full (Dispatcher); never in a mask, always told."""

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
    KeyEvent.LOSS: "loss",
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
    """Watches by key, and for each key by the uid that owns them.  Guarded
    by its own lock so removal never needs the service lock to drop a
    watch.

    A key's watches of one uid are one dict (id -> Watch), the *group* a
    :class:`Fanout` names: an event is queued once per uid watching, not
    once per watch, and the group is read when it is delivered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Key, dict[int, dict[int, Watch]]] = {}
        self._removed = threading.Condition(self._lock)
        self.last_id = 0
        """The largest id of a watch added: an event made now is for the
        watches up to it (one added later did not see it happen)."""

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def add(self, watch: Watch) -> None:
        with self._lock:
            groups = self._by_key.setdefault(watch.key, {})
            groups.setdefault(watch.owner_uid, {})[watch.id] = watch
            self.last_id = max(self.last_id, watch.id)
            if watch.sync:
                watch.key.sync_watches += 1

    def remove(self, watch: Watch) -> None:
        with self._lock:
            groups = self._by_key.get(watch.key, {})
            group = groups.get(watch.owner_uid)
            if group is None or group.pop(watch.id, None) is None:
                return
            if watch.sync:
                watch.key.sync_watches -= 1
            if not group:
                del groups[watch.owner_uid]
                if not groups:
                    del self._by_key[watch.key]
            self._removed.notify_all()

    def is_active(self, watch: Watch) -> bool:
        with self._lock:
            return watch.id in self._by_key.get(watch.key, {}).get(watch.owner_uid, {})

    def of(self, key: Key) -> list[Watch]:
        with self._lock:
            return [w for group in self._by_key.get(key, {}).values() for w in group.values()]

    def groups(self, key: Key) -> list[tuple[int, dict[int, Watch]]]:
        """(uid, that uid's watches of ``key``, live): as many as uids."""
        with self._lock:
            return list(self._by_key.get(key, {}).items())

    def sync_of(self, key: Key) -> list[Watch]:
        if not key.sync_watches:
            return []
        return [w for w in self.of(key) if w.sync]

    def forget(self, key: Key) -> None:
        """Drop every watch on a destroyed key.  The groups are left whole:
        what is queued for them (the key's ``gc``) is still delivered."""
        with self._lock:
            groups = self._by_key.pop(key, None)
            if groups:
                key.sync_watches = 0
                self._removed.notify_all()


MAX_QUEUED_PER_UID = 16384
"""Notifications (watch calls) queued for one uid's watches.  An event
for a uid's watches of one key (a :class:`Fanout`) weighs as many as they
are; past the bound that uid's new events are dropped (one is always
taken into an empty queue), and each watch that lost some is told
``loss`` (keyctl watch's "-- LOSS --") before its next one, as the
kernel's watch queue marks a full queue.  The watched key's own end (rev,
inv, exp, gc of the key itself) is queued all the same.  So a uid's
backlog is at most this many calls plus its keys' ends, and its own
``gc`` waits for no more than that."""

DELIVERIES_PER_TURN = 64
"""Watches one uid's turn calls before the next uid's turn: a uid with
16,384 watches of one key delays others by 64 calls, not 16,384."""

LOSS_WARNING_SECONDS = 60.0
"""The daemon logs a uid's full queue at most this often."""

_KEY_ENDS = KeyEvent.REVOKED | KeyEvent.INVALIDATED | KeyEvent.EXPIRED | KeyEvent.GC


@dataclass(frozen=True, slots=True)
class Fanout:
    """One event for one uid's watches of one key."""

    note: Notification
    uid: int
    watches: dict[int, Watch]
    """The group (WatchTable.groups), live: a watch removed before its
    call is not called."""
    last_id: int
    """Watches with a larger id were added after the event: not told."""

    def targets(self) -> list[Watch]:
        event = self.note.event
        return [
            w
            for w in list(self.watches.values())
            if w.id <= self.last_id and (event is KeyEvent.LOSS or w.events & event)
        ]

    @property
    def ends_the_key(self) -> bool:
        """Never dropped: the watched key's own end.  ``gc`` ends a watch
        (``kfctl watch`` exits on it) and, with ``emergency``, tells a
        mount worker to wipe what it holds of the key.  Each comes at most
        once per key, so they are bounded by the keys, not by what anyone
        does."""
        return bool(self.note.event & _KEY_ENDS)


@dataclass(frozen=True, slots=True)
class DispatcherStatistics:
    queued: int
    """Events waiting (a Fanout each), over every uid."""
    notifications: int
    """The watch calls they stand for (as weighed when queued)."""
    uids: int
    """Uids with events waiting."""
    dropped: int
    """Events dropped since start, a uid's queue being full."""


class _Turn:
    """A Fanout being delivered: its watches, fixed at its first turn."""

    __slots__ = ("fanout", "next", "targets", "weight")

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout
        self.weight = max(len(fanout.watches), 1)
        self.targets: list[Watch] | None = None
        self.next = 0


class Dispatcher:
    """Delivers AFTER notifications on one thread: in order for each watch,
    and the uids that own the watches in turn.

    One uid's many watches (or many events for them) delay that uid's
    notifications, not everyone's: each uid has its own queue of events,
    bounded by ``per_uid`` (:data:`MAX_QUEUED_PER_UID`), and the thread
    calls at most :data:`DELIVERIES_PER_TURN` of one uid's watches before
    the next uid with any waiting.  What an operation does under the key
    service's lock is one Fanout per uid watching a key it changes, never
    one per watch (the red team's 16,384 watches made each of their
    ``setperm``s hold that lock for 36 ms).  Callbacks must not block (the
    daemon's send without waiting for the client to read).  A callback
    that raises is logged (without payloads: notifications hold none) and
    does not stop delivery to others.

    Locks: ``post`` may be called with the key service's lock held; the
    dispatcher's own lock is taken inside it and nothing is called under
    it but logging, so it is a leaf.  Callbacks run without it.
    """

    def __init__(self, *, per_uid: int = MAX_QUEUED_PER_UID) -> None:
        self._per_uid = per_uid
        self._cond = threading.Condition()
        self._queues: dict[int, deque[_Turn]] = {}
        self._weights: dict[int, int] = {}
        """By uid: the weight of its queue and of its turn in delivery."""
        self._turns: deque[int] = deque()
        """The uids with a queue, in the order they are served."""
        self._lost: dict[int, dict[int, Fanout]] = {}
        """By uid: for each group (by its id()) that lost events, the latest
        lost, whose watches are told ``loss``."""
        self._warned: dict[int, float] = {}
        self._pending = 0
        """Queued plus the one being delivered."""
        self._dropped = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="keyfence-notify", daemon=True)
        self._thread.start()

    def post(self, fanouts: list[Fanout]) -> None:
        if not fanouts:
            return
        full: list[int] = []
        with self._cond:
            for fanout in fanouts:
                uid = fanout.uid
                queue_ = self._queues.get(uid)
                if queue_ is None:
                    queue_ = self._queues[uid] = deque()
                    self._turns.append(uid)
                weight = self._weights.get(uid, 0)
                if (
                    weight
                    and weight + len(fanout.watches) > self._per_uid
                    and not fanout.ends_the_key
                ):
                    lost = self._lost.setdefault(uid, {})
                    if not lost:
                        full.append(uid)
                    lost[id(fanout.watches)] = fanout
                    self._dropped += 1
                    continue
                if uid in self._lost:
                    self._tell_losses_locked(uid, queue_)
                self._queue_locked(uid, queue_, _Turn(fanout))
            self._cond.notify()
            now = time.monotonic()
            full = [
                u
                for u in full
                if now - self._warned.get(u, -LOSS_WARNING_SECONDS) >= LOSS_WARNING_SECONDS
            ]
            for uid in full:
                self._warned[uid] = now
        for uid in full:
            log.warning(
                "uid %d's watches do not keep up (%d notifications queued): dropping theirs",
                uid,
                self._per_uid,
            )

    def _tell_losses_locked(self, uid: int, queue_: deque[_Turn]) -> None:
        """Queue ``loss`` for the watches of each group that lost events:
        one per group, past the bound (it stands for the ones dropped)."""
        for lost in self._lost.pop(uid).values():
            note = Notification(key=lost.note.key, event=KeyEvent.LOSS)
            self._queue_locked(uid, queue_, _Turn(Fanout(note, uid, lost.watches, lost.last_id)))

    def _queue_locked(self, uid: int, queue_: deque[_Turn], turn: _Turn) -> None:
        queue_.append(turn)
        self._weights[uid] = self._weights.get(uid, 0) + turn.weight
        self._pending += 1

    def _next_locked(self) -> tuple[int, _Turn] | None:
        """The next uid's turn (None: stopping), waiting for one."""
        while not self._turns:
            if self._stopping:
                return None
            self._cond.wait()
        uid = self._turns.popleft()
        return uid, self._queues[uid].popleft()

    def _done_locked(self, uid: int, turn: _Turn, finished: bool) -> None:
        queue_ = self._queues[uid]
        if not finished:
            queue_.appendleft(turn)  # the rest of its watches at the uid's next turn
        else:
            self._pending -= 1
            left = self._weights[uid] - turn.weight
            if left:
                self._weights[uid] = left
            else:
                del self._weights[uid]
            if not queue_ and uid in self._lost:
                self._tell_losses_locked(uid, queue_)
        if queue_:
            self._turns.append(uid)
        else:
            del self._queues[uid]
        if not self._pending:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                got = self._next_locked()
            if got is None:
                return
            uid, turn = got
            if turn.targets is None:
                turn.targets = turn.fanout.targets()
            note = turn.fanout.note
            end = min(turn.next + DELIVERIES_PER_TURN, len(turn.targets))
            watches = turn.fanout.watches
            for watch in turn.targets[turn.next : end]:
                if watch.id not in watches:
                    continue  # removed since: not called (a closed client's)
                try:
                    watch.callback(note)
                except Exception:
                    log.exception("watch %r raised on %s", watch.name, note.event.label)
            turn.next = end
            with self._cond:
                self._done_locked(uid, turn, end >= len(turn.targets))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every posted notification was delivered."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout)

    def statistics(self) -> DispatcherStatistics:
        with self._cond:
            return DispatcherStatistics(
                queued=sum(len(q) for q in self._queues.values()),
                notifications=sum(self._weights.values()),
                uids=len(self._queues),
                dropped=self._dropped,
            )

    def stop(self) -> None:
        """Stop once what is queued was delivered."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
