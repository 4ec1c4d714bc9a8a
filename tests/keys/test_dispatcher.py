"""AFTER notifications: one uid's watches delay that uid, not everyone.

Red-team pass (session 26, "watch fan-out"): 16,384 watches on one's own
key and a stream of ``setperm`` queued 16,384 notifications each on the
one shared dispatcher, in one FIFO: another user's event came seconds
late, and the queue grew by hundreds of MiB.  Now each uid (the watch
owner's) has a bounded queue and the uids are served in turn
(keys/notify.py Dispatcher).  Both tests failed before: the other uid's
event was delivered after the whole backlog (position 3,001 of 3,001),
and the backlog was queued whole (no ``notifications`` statistics, and no
``loss``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from keyfence.keys import Caller, KeyService
from keyfence.keys.notify import DELIVERIES_PER_TURN, Dispatcher, Fanout, Notification

from .conftest import FakeClock

S = -3


@pytest.fixture
def small_queue_svc(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyService]:
    """A service whose dispatcher queues at most 100 per uid."""
    monkeypatch.setattr(
        "keyfence.keys.keyctl.Dispatcher", lambda: Dispatcher(per_uid=100), raising=True
    )
    service = KeyService(clock=clock, gc_delay=300, run_gc_thread=False)
    yield service
    service.close()


class Gate:
    """A watch callback that holds the dispatcher on its first call until
    opened, recording what it is given."""

    def __init__(self, log: list[tuple[int, str]], uid: int) -> None:
        self.log, self.uid = log, uid
        self.entered, self.opened = threading.Event(), threading.Event()

    def __call__(self, note: Notification) -> None:
        self.entered.set()
        assert self.opened.wait(10)
        self.log.append((self.uid, note.event.label))


def held_by_alice(
    svc: KeyService, alice: Caller, bob: Caller, watches: int
) -> tuple[list[tuple[int, str]], Gate, int, int]:
    """Alice watches her key ``watches`` times through a Gate, bob his own
    once; one update of alice's holds the dispatcher in her first callback.
    (the log both write to, the gate, alice's key, bob's key)"""
    log: list[tuple[int, str]] = []
    gate = Gate(log, alice.uid)
    theirs = svc.add_key(alice, "user", "a", b"x", S)
    for _ in range(watches):
        svc.watch(alice, theirs, gate)
    mine = svc.add_key(bob, "user", "b", b"x", S)
    svc.watch(bob, mine, lambda n: log.append((bob.uid, n.event.label)))
    svc.update(alice, theirs, b"y")
    assert gate.entered.wait(10)
    return log, gate, theirs, mine


def test_another_uids_event_does_not_wait_for_a_backlog(
    svc: KeyService, alice: Caller, bob: Caller
) -> None:
    log, gate, theirs, mine = held_by_alice(svc, alice, bob, 100)
    for _ in range(29):
        svc.update(alice, theirs, b"y")  # 3,000 of alice's queued in all
    svc.update(bob, mine, b"z")
    gate.opened.set()
    assert svc.wait_for_notifications(30)
    assert len(log) == 3001
    where = log.index((bob.uid, "upd"))
    assert where <= DELIVERIES_PER_TURN, f"bob's event was delivered {where + 1}th"


def test_a_uids_queue_is_bounded_and_its_watches_told_of_the_loss(
    small_queue_svc: KeyService, alice: Caller, bob: Caller
) -> None:
    svc = small_queue_svc
    log, gate, theirs, mine = held_by_alice(svc, alice, bob, 10)
    for _ in range(150):
        svc.update(alice, theirs, b"y")  # 10 calls each: 9 more fit in 100
    stats = svc.statistics().notifications
    assert (stats.queued, stats.notifications, stats.dropped) == (9, 100, 141)
    svc.update(bob, mine, b"z")  # bob's own queue has room
    gate.opened.set()
    assert svc.wait_for_notifications(30)
    assert log.count((bob.uid, "upd")) == 1
    theirs_seen = [label for uid, label in log if uid == alice.uid]
    # the first (held) event, 9 queued, then "loss" for each watch
    assert theirs_seen == ["upd"] * 100 + ["loss"] * 10
    assert svc.statistics().notifications.queued == 0
    # room again: the next ones are delivered, no further loss
    svc.update(alice, theirs, b"y")
    assert svc.wait_for_notifications(30)
    assert [label for uid, label in log if uid == alice.uid][110:] == ["upd"] * 10


def test_an_event_is_queued_once_per_uid_not_once_per_watch(
    svc: KeyService, alice: Caller, bob: Caller
) -> None:
    """Red-team pass (session 27): with one queue entry per watch, each of
    a user's updates of a key they watch 16,384 times built and queued
    16,384 notifications under the key service's lock (36 ms a call), and
    their stream of them stalled everyone's key operations for seconds.
    Now an operation queues one event per uid watching; the watches are
    read when it is delivered.  Failed before: 16,384 (and 16,385) queued."""
    gate = Gate([], bob.uid)
    bobs = svc.add_key(bob, "user", "b", b"x", S)
    svc.watch(bob, bobs, gate)
    key = svc.add_key(alice, "user", "a", b"x", S)
    for _ in range(16384):
        svc.watch(alice, key, lambda n: None)
    svc.update(bob, bobs, b"y")
    assert gate.entered.wait(10)  # the dispatcher is held in bob's watch
    svc.update(alice, key, b"z")
    stats = svc.statistics().notifications
    assert (stats.queued, stats.notifications) == (1, 16384 + 1)  # alice's; bob's in delivery
    gate.opened.set()
    assert svc.wait_for_notifications(30)


def test_a_loss_comes_before_the_first_notification_after_the_gap(
    small_queue_svc: KeyService, alice: Caller
) -> None:
    """Room made while losses are pending: the loss is queued ahead of the
    next notification, where the gap is."""
    svc = small_queue_svc
    seen: list[str] = []
    permits, entered = threading.Semaphore(0), threading.Event()

    def one_at_a_time(note: Notification) -> None:
        entered.set()
        assert permits.acquire(timeout=10)
        seen.append(note.event.label)

    key = svc.add_key(alice, "user", "a", b"x", S)
    svc.watch(alice, key, one_at_a_time)
    svc.update(alice, key, b"y")
    assert entered.wait(10)
    for _ in range(120):
        svc.update(alice, key, b"y")  # one taken, 99 more queued, 21 dropped
    for _ in range(10):
        permits.release()
    deadline = time.monotonic() + 10
    while len(seen) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seen) == 10  # the 11th is taken and waits: 89 queued
    svc.setperm(alice, key, 0x3F3F0000)
    for _ in range(200):
        permits.release()
    assert svc.wait_for_notifications(30)
    assert seen == ["upd"] * 100 + ["loss", "attr"]


def test_the_watched_keys_own_end_is_never_dropped(
    small_queue_svc: KeyService, alice: Caller
) -> None:
    """``gc`` ends a watch (``kfctl watch`` exits on it) and, emergency, is a
    mount worker's order to wipe: queued past the bound (once per key)."""
    svc = small_queue_svc
    seen: list[tuple[str, bool]] = []
    gate = Gate([], alice.uid)
    ring = svc.add_key(alice, "keyring", "r", None, S)
    key = svc.add_key(alice, "user", "a", b"x", ring)
    svc.watch(alice, key, gate)
    svc.watch(alice, key, lambda n: seen.append((n.event.label, n.emergency)))
    svc.update(alice, key, b"y")
    assert gate.entered.wait(10)
    for _ in range(110):
        svc.update(alice, key, b"y")  # the queue is full from here
    assert svc.statistics().notifications.dropped > 0
    svc.revoke(alice, key, emergency=True)
    svc.unlink(alice, key, ring)
    gate.opened.set()
    assert svc.wait_for_notifications(30)
    # the loss is told where the gap is: before the first one queued after it
    assert seen[-3:] == [("loss", False), ("rev", True), ("gc", False)], seen[-4:]


def test_a_watch_removed_before_its_call_is_not_called(svc: KeyService, alice: Caller) -> None:
    """Red-team pass on the Fanout (session 27): a group's watches were
    fixed at its first turn, so a watch removed meanwhile (between two
    turns of 64, or by an earlier callback) was still called.  Failed
    before: the removed watch was called with ``upd``."""
    key = svc.add_key(alice, "user", "a", b"x", S)
    called: list[int] = []
    watches = []

    def first(note: Notification) -> None:
        watches[149].remove()

    watches.append(svc.watch(alice, key, first))
    for i in range(1, 200):
        watches.append(svc.watch(alice, key, lambda n, i=i: called.append(i)))
    svc.update(alice, key, b"y")
    assert svc.wait_for_notifications(30)
    assert 149 not in called and len(called) == 198


def test_removal_events_are_posted_under_the_service_lock(
    svc: KeyService, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team pass (session 27): a removal posted its events after
    letting go of the service lock, where a link made meanwhile posted its
    own under it: a keyring's watcher could hear ``link`` before the
    ``unlk`` that came first.  Every post now happens under the lock.
    Failed before: the unlink's post was made without it."""
    ring = svc.add_key(alice, "keyring", "r", None, S)
    key = svc.add_key(alice, "user", "k", b"x", S)
    svc.link(alice, key, ring)
    svc.watch(alice, ring, lambda n: None)
    held: list[bool] = []
    dispatcher = svc._dispatcher
    post = dispatcher.post

    def checking_post(fanouts: list[Fanout]) -> None:
        held.append(svc._lock._is_owned())  # type: ignore[attr-defined]
        post(fanouts)

    monkeypatch.setattr(dispatcher, "post", checking_post)
    svc.unlink(alice, key, ring)
    svc.link(alice, key, ring)
    svc.revoke(alice, key)
    assert svc.wait_for_notifications(30)
    assert held and all(held), held
