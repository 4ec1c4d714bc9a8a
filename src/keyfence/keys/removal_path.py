"""The removal path: how a removal runs (plan, fence, apply, wipe, notify).

:mod:`keyfence.keys.removal` says *what* goes away; this unit runs it, for
every operation of :class:`~keyfence.keys.keyctl.KeyService` and for the
garbage collector alike, in the order docs/design.md gives ("The life of a
key removal"):

1. ``build()`` (under the lock) describes the removal; the removal plans
   the whole set of keys going away;
2. if another removal is fencing one of those keys, wait for it and build
   again (but if everything that removal still waits for is foreign to this
   one, only FOREIGN_WATCHER_SECONDS, then take its keys over: see
   :meth:`RemovalPath._outwaited_locked`); else mark the keys with this
   removal's id (:attr:`Key.fenced_by`) and call their synchronous watchers
   without the lock (:class:`~keyfence.keys.fence.FenceRound`), keys still
   valid;
3. close the keys' use-gates and wait for use-guards taken before;
4. apply atomically (state changes, unlinks, payload wipes, quota refunds)
   and schedule the reaping of revoked and expired keys;
5. post what happened to every watcher (the dispatcher, no lock held).

Lock rules: :meth:`run` and :meth:`run_for` are called without the lock;
methods ending in ``_locked`` expect it held (it is the service's lock,
shared: the path never takes another).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from keyfence.keys.caller import Caller
from keyfence.keys.errors import fail
from keyfence.keys.fence import (
    FOREIGN_WATCHER_SECONDS,
    FenceOutcome,
    FenceRound,
    RemovalProgress,
    current_fence,
)
from keyfence.keys.key import Key, KeyState
from keyfence.keys.notify import (
    Dispatcher,
    Fanout,
    KeyEvent,
    Notification,
    Phase,
    Watch,
    WatchTable,
    watcher_text,
)
from keyfence.keys.quota import QuotaTable
from keyfence.keys.removal import Removal, Why
from keyfence.keys.waits import check_interrupted

T = TypeVar("T")

_WHY_EVENT = {
    Why.REVOKED: KeyEvent.REVOKED,
    Why.INVALIDATED: KeyEvent.INVALIDATED,
    Why.EXPIRED: KeyEvent.EXPIRED,
    Why.UNLINKED: KeyEvent.GC,
    Why.ENDED: KeyEvent.GC,
}
_STATE_EVENT = {
    KeyState.REVOKED: KeyEvent.REVOKED,
    KeyState.INVALIDATED: KeyEvent.INVALIDATED,
    KeyState.EXPIRED: KeyEvent.EXPIRED,
}


class RemovalPath:
    """The one way keys go away, shared by the service and the collector.

    Built from the service's lock (and its condition ``changed``, signalled
    when a removal applies or ends, or a use-guard ends), the key table's
    release (``release_locked``: forget a destroyed key's serial, quota and
    name), the quota table, the watches and the dispatcher.  ``reap`` is
    how a revoked or expired key is handed to the collector.

    ``wait_for_users``: False applies every removal at once, as an
    emergency one (what the kernel does); only ``keyfence demo
    --without-fence`` builds such a service (docs/fs.md, "Turning the
    fence off").
    """

    def __init__(
        self,
        *,
        lock: threading.RLock,
        changed: threading.Condition,
        release_locked: Callable[[Key], None],
        quota: QuotaTable,
        watches: WatchTable,
        dispatcher: Dispatcher,
        guards: dict[Key, int],
        clock: Callable[[], float],
        wait_for_users: bool = True,
    ) -> None:
        self.lock = lock
        self._changed = changed
        self._release_locked = release_locked
        self._quota = quota
        self._watches = watches
        self._dispatcher = dispatcher
        self._guards = guards
        """Use-guards held per key (KeyService.use_key)."""
        self._clock = clock
        self.wait_for_users = wait_for_users
        self._reap: Callable[[Key, float], None] = lambda key, now: None
        """Set by the collector (:meth:`reap_with`)."""
        self._rounds: dict[int, FenceRound] = {}
        """Removals calling their synchronous watchers, by id (under the lock)."""

    def reap_with(self, reap: Callable[[Key, float], None]) -> None:
        """Hand revoked and expired keys to ``reap(key, now)`` once applied."""
        self._reap = reap

    def run(
        self,
        build: Callable[[], Removal | None],
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """:meth:`run_for` for an operation that answers nothing."""
        self.run_for(
            lambda: (build(), None), timeout=timeout, emergency=emergency, progress=progress
        )

    def run_for(
        self,
        build: Callable[[], tuple[Removal | None, T]],
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> T:
        """Run one removal: plan, fence, apply, wipe, notify; return the answer.

        ``build`` runs with the lock held and returns the removal (or None
        when it did the whole operation and nothing goes away) with the
        operation's answer; it is run again if, before any watcher was
        called, another removal was found fencing the same keys -- so the
        operation behaves as if it ran after that one, and the answer of the
        last run is returned.  Called without the lock; every key that goes
        away, goes away here.

        Errors: the watcher's own error (the removal is aborted, keys
        intact); ETIMEDOUT naming the watchers still working; EDEADLK when a
        watcher's callback starts a removal of the keys its fence holds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        emergency = emergency or not self.wait_for_users
        removal: Removal | None = None
        answer: T
        called: set[tuple[int, int]] = set()
        took_over = False  # another removal's keys are ours now: never build again
        foreign_until: float | None = None
        """Foreign watchers hold this removal up to here, over all its rounds
        (per round, a watcher that added a watch each time it was called
        started a new 5 s round each time, without end)."""
        held_since: dict[int, float] = {}  # another removal -> when it first held us
        fenced: list[Key] = []
        gated: list[Key] = []
        try:
            while True:
                with self.lock:
                    if removal is None or not (called or took_over):
                        removal, answer = build()
                        if removal is None:
                            return answer
                        removal.emergency = emergency
                    removal.plan_locked()
                    if not emergency:
                        blocker = self._blocking_fence_locked(removal)
                        if blocker:
                            if blocker == current_fence():
                                raise fail(
                                    errno.EDEADLK,
                                    f"a watcher of removal {blocker} tried to remove its keys",
                                )
                            since = held_since.setdefault(blocker, time.monotonic())
                            outwaited = self._outwaited_locked(removal, blocker, since)
                            if outwaited is None:
                                self._wait_changed_locked(deadline, f"removal {blocker}")
                                continue
                            for key in removal.going:
                                if key.fenced_by == blocker:
                                    key.fenced_by = removal.id
                                    fenced.append(key)
                            called.update(outwaited)  # counted as done, as in its round
                            took_over = True
                            continue
                        calls = self._sync_calls_locked(removal, called)
                        if calls:
                            if foreign_until is None:
                                foreign_until = time.monotonic() + FOREIGN_WATCHER_SECONDS
                            elif time.monotonic() >= foreign_until:
                                calls = self._past_foreign_bound_locked(removal, calls, called)
                        if calls:
                            for key in removal.going:
                                if not key.fenced_by:
                                    key.fenced_by = removal.id
                                    fenced.append(key)
                        elif self._guarded_locked(removal, gated):
                            self._wait_changed_locked(deadline, "a use of the key to end")
                            continue
                        else:
                            self._apply_locked(removal)
                            break
                    else:
                        self._apply_locked(removal)
                        break
                self._call_watchers(removal, calls, deadline, progress, foreign_until)
                called.update((w.id, n.key) for w, n in calls)
        finally:
            with self.lock:
                for key in fenced:
                    if removal is not None and key.fenced_by == removal.id:
                        key.fenced_by = 0
                for key in gated:
                    key.gate_closed = False
                self._changed.notify_all()
        return answer

    def _blocking_fence_locked(self, removal: Removal) -> int:
        for key in removal.going:
            if key.fenced_by and key.fenced_by != removal.id:
                return key.fenced_by
        return 0

    def _outwaited_locked(
        self, removal: Removal, blocker: int, since: float
    ) -> set[tuple[int, int]] | None:
        """Whether ``removal`` may take over the keys ``blocker`` fences.

        Yes (the calls ``blocker`` still waits for, as (watch, key) pairs,
        which ``removal`` then counts as done) once it has waited
        FOREIGN_WATCHER_SECONDS and every watcher ``blocker`` still waits
        for is foreign to ``removal``: its own round would have stopped
        waiting for them by then.  Otherwise None: wait on.  Without this a
        uid could plant a key in root's @s and hold it with a removal of its
        own that its own watcher never lets finish (docs/security.md).
        """
        fence_round = self._rounds.get(blocker)
        if fence_round is None or time.monotonic() - since < FOREIGN_WATCHER_SECONDS:
            return None  # not calling watchers: applying, or waiting for a use to end
        pending = fence_round.pending_calls()
        patient = self._patient_uids(removal)
        if not pending or any(watch.owner_uid in patient for watch, _key in pending):
            return None
        return {(watch.id, key) for watch, key in pending}

    def _wait_changed_locked(self, deadline: float | None, what: str) -> None:
        check_interrupted(what)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise fail(errno.ETIMEDOUT, f"still waiting for {what}; nothing was removed")
        self._changed.wait(0.1 if remaining is None else min(remaining, 0.1))

    def _sync_calls_locked(
        self, removal: Removal, called: set[tuple[int, int]]
    ) -> list[tuple[Watch, Notification]]:
        calls = []
        for key, why in removal.going.items():
            if not key.sync_watches:
                continue
            event = _WHY_EVENT[why]
            for watch in self._watches.sync_of(key):
                if (watch.id, key.serial) in called:
                    continue
                note = self._note(key, event, removal, phase=Phase.BEFORE)
                calls.append((watch, note))
        return calls

    def _guarded_locked(self, removal: Removal, gated: list[Key]) -> bool:
        """Close the gates of the keys going away; True while uses remain."""
        busy = False
        for key in removal.going:
            if not key.gate_closed:
                key.gate_closed = True
                gated.append(key)
            if self._guards.get(key):
                busy = True
        return busy

    def _past_foreign_bound_locked(
        self,
        removal: Removal,
        calls: list[tuple[Watch, Notification]],
        called: set[tuple[int, int]],
    ) -> list[tuple[Watch, Notification]]:
        """``calls`` without the foreign ones, once the removal's foreign
        bound has passed: those count as done uncalled (told afterwards, as
        in an emergency)."""
        patient = self._patient_uids(removal)
        kept = []
        for watch, note in calls:
            if watch.owner_uid in patient:
                kept.append((watch, note))
            else:
                called.add((watch.id, note.key))
        return kept

    def _call_watchers(
        self,
        removal: Removal,
        calls: list[tuple[Watch, Notification]],
        deadline: float | None,
        progress: Callable[[RemovalProgress], None] | None,
        foreign_until: float | None = None,
    ) -> None:
        """Call the synchronous watchers (no lock held) and wait for them;
        foreign ones until ``foreign_until`` at most."""
        patient = self._patient_uids(removal)
        foreign = frozenset(w.id for w, _note in calls if w.owner_uid not in patient)
        fence_round = FenceRound(
            removal.id, removal.op, len(removal.going), calls, foreign, foreign_until
        )
        with self.lock:
            self._rounds[removal.id] = fence_round
        try:
            fence_round.start()
            if progress is not None:
                progress(fence_round.snapshot())
            outcome = fence_round.wait(deadline, progress)
        finally:
            with self.lock:
                del self._rounds[removal.id]
        if outcome is FenceOutcome.FAILED:
            assert fence_round.failure is not None
            watch, err = fence_round.failure
            code = err.errno if isinstance(err, OSError) and err.errno else errno.ECANCELED
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            reason = watcher_text(reason)  # the watcher's words, shown to the caller
            raise fail(code, f"{watch.name} failed: {reason}; nothing was removed") from None
        if outcome is FenceOutcome.TIMEOUT:
            raise fail(
                errno.ETIMEDOUT,
                f"still flushing: {fence_round.describe_pending()}; nothing was removed",
            )
        if outcome is FenceOutcome.GONE:  # the caller gave up: not done behind its back
            raise fail(
                errno.EINTR,
                f"the caller went away while {fence_round.describe_pending()} flushed;"
                " nothing was removed",
            )

    @staticmethod
    def _patient_uids(removal: Removal) -> set[int]:
        """The uids whose watchers may hold ``removal`` up without bound.

        Patient are root's watchers (the service's own mount workers), the
        caller's own uid's, and -- for a removal by the service itself
        (process exit, session end, expiry: nobody waits but the service)
        -- those of the uid that owns what is removed: the keyring cut from
        or released, the key revoked or invalidated.  Everyone else is
        foreign (a bounded time, then the removal goes on): a key or keyring
        planted in root's @s cannot hold root's clear, unlink or purge, or
        root's logout, hostage.  Root's removal of what a user owns is not
        on that user's behalf (it was, until a hostile uid's own keyring in
        root's @s held root's ``unlink`` and ``purge`` without bound): the
        login hook clears a user's @s with the user's ids switched in, as
        pam_keyinit does (keyfence.cli.pam).
        """
        caller = removal.caller
        patient = {0}
        if caller is not None:
            patient.add(caller.uid)
        if caller is None:
            patient.update(ring.uid for ring, _key in removal.unlinks)
            patient.update(key.uid for key in removal.releases)
            patient.update(key.uid for key in removal.kills)
        return patient

    def _note(
        self,
        key: Key,
        event: KeyEvent,
        removal: Removal | None = None,
        *,
        aux: int | None = None,
        phase: Phase = Phase.AFTER,
        caller: Caller | None = None,
        op: str = "",
    ) -> Notification:
        who = removal.caller if removal is not None else caller
        return Notification(
            key=key.serial,
            event=event,
            aux=aux,
            op=removal.op if removal is not None else op,
            uid=who.uid if who is not None else None,
            pid=who.pid if who is not None else None,
            phase=phase,
            emergency=removal.emergency if removal is not None else False,
            removal=removal.id if removal is not None else 0,
            description=key.description,
        )

    def _after_notes_locked(self, removal: Removal) -> list[Fanout]:
        """What every watch is told once the removal is applied."""
        if not self._watches:
            return []
        events: list[tuple[Key, KeyEvent, int | None]] = []
        cleared: set[Key] = set()
        destroyed = set(removal.destroyed)
        displaced = removal.displaced()
        for ring, key in removal.cut:
            if removal.op == "clear" and (ring, key) in removal.unlinks_set:
                cleared.add(ring)
            elif ring in destroyed or (ring, key) in displaced:
                continue  # a destroyed keyring's contents, a displaced key: no word
            else:
                events.append((ring, KeyEvent.UNLINKED, key.serial))
        events.extend((ring, KeyEvent.CLEARED, None) for ring in cleared)
        events.extend((ring, KeyEvent.LINKED, key.serial) for ring, key in removal.links)
        for key, state in removal.killed.items():
            events.append((key, _STATE_EVENT[state], None))
        events.extend((key, KeyEvent.GC, None) for key in removal.destroyed)
        return self._notes_for_locked(events, removal)

    def _notes_for_locked(
        self,
        events: list[tuple[Key, KeyEvent, int | None]],
        removal: Removal | None = None,
        caller: Caller | None = None,
        op: str = "",
    ) -> list[Fanout]:
        """One Fanout per event and uid watching its key: what is done under
        the lock grows with the uids watching, never with their watches."""
        if not self._watches:
            return []
        last_id = self._watches.last_id
        fanouts: list[Fanout] = []
        for key, event, aux in events:
            groups = self._watches.groups(key)
            if not groups:
                continue
            note = self._note(key, event, removal, aux=aux, caller=caller, op=op)
            fanouts.extend(Fanout(note, uid, watches, last_id) for uid, watches in groups)
        return fanouts

    def notify_locked(
        self,
        events: list[tuple[Key, KeyEvent, int | None]],
        caller: Caller,
        op: str,
    ) -> None:
        """Post AFTER notifications of a non-removal operation."""
        if self._watches:
            self._dispatcher.post(self._notes_for_locked(events, caller=caller, op=op))

    def _apply_locked(self, removal: Removal) -> None:
        """Apply, and post what the watches are told while the lock is
        still held: events reach the dispatcher in the order they happened
        (a link made right after this unlink is told after its ``unlk``)."""
        removal.check_links_locked(self._quota)
        now = self._clock()
        removal.unlinks_set = set(removal.unlinks)
        notes = self._after_notes_locked(removal)
        for key in removal.killed:
            if key.payload is not None and key.in_quota:
                self._quota.resize_locked(key.uid, -len(key.payload))
                key.quotalen -= len(key.payload)
        for key in removal.apply_locked(now, self._quota):
            self._release_locked(key)
            self._watches.forget(key)
        for key, state in removal.killed.items():
            if state in (KeyState.REVOKED, KeyState.EXPIRED) and key.is_live():
                self._reap(key, now)
        self._changed.notify_all()
        self._dispatcher.post(notes)
