"""A hypothesis state machine over the model with watchers attached.

After every step it checks the two promises of the fence:

* no usable key stopped being usable without each of its synchronous
  watchers having been called first, with the key still valid and its
  payload readable -- except in an emergency;
* a removal that a watcher aborted changed nothing at all.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule

from keyfence.keys import Caller, KeyService, KeyState
from keyfence.keys.errors import KeyfenceError
from keyfence.keys.notify import Notification, Phase

from .conftest import FakeClock

S, P = -3, -2
ROOT = Caller(uid=0, gid=0, pid=10, session="login")


@dataclass
class Watcher:
    svc: KeyService
    serial: int
    fail: bool = False
    calls: list[tuple[int, KeyState, bytes | None]] = field(default_factory=list)
    emergency_told: list[int] = field(default_factory=list)

    def __call__(self, note: Notification) -> None:
        if note.phase is Phase.AFTER:
            if note.emergency:
                self.emergency_told.append(note.key)
            return
        key = self.svc.find_key(note.key)
        assert key is not None
        payload = None
        if key.payload is not None:
            with self.svc.use_key(ROOT, note.key) as buf:
                payload = buf.reveal()
        self.calls.append((note.key, key.state, payload))
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")


def snapshot(svc: KeyService) -> dict[int, tuple[object, ...]]:
    world = {}
    for key in svc.all_keys():
        payload = key.payload.reveal() if key.payload is not None else None
        parents = frozenset(p.serial for p in key.parents)
        world[key.serial] = (key.state, parents, payload, key.perm, key.expiry)
    return world


class FenceMachine(RuleBasedStateMachine):
    keys = Bundle("keys")
    rings = Bundle("rings")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.svc = KeyService(clock=self.clock, run_gc_thread=False)
        self.svc.join_session_keyring(ROOT)
        self.watchers: list[tuple[Watcher, object]] = []

    def teardown(self) -> None:
        self.svc.close()

    # -- the checked step

    def step(self, op: Callable[[], object], *, emergency: bool = False) -> None:
        before = snapshot(self.svc)
        watched = {}
        for watcher, watch in self.watchers:
            if getattr(watch, "active", False):
                watched.setdefault(watcher.serial, []).append(watcher)
                watcher.calls.clear()
        try:
            op()
        except KeyfenceError as err:
            if err.errno == errno.ENOSPC:
                assert snapshot(self.svc) == before, "an aborted removal changed something"
            return
        after = snapshot(self.svc)
        for serial, (state, *_rest) in before.items():
            if state is not KeyState.VALID:
                continue
            now = after.get(serial)
            still_usable = now is not None and now[0] is KeyState.VALID
            if still_usable or emergency:
                continue
            for watcher in watched.get(serial, []):
                seen = [c for c in watcher.calls if c[0] == serial]
                assert seen, f"key {serial} went away without calling its watcher"
                assert not watcher.fail, f"key {serial} went away although its watcher refused"
                _, state_seen, payload_seen = seen[0]
                assert state_seen is KeyState.VALID
                assert payload_seen == before[serial][2]

    # -- rules

    @rule(target=keys, desc=st.sampled_from("abcde"), data=st.binary(min_size=1, max_size=8))
    def add_to_session(self, desc: str, data: bytes) -> int:
        return self.svc.add_key(ROOT, "user", desc, data, S)

    @rule(target=rings, desc=st.sampled_from(["r1", "r2", "r3"]))
    def add_ring(self, desc: str) -> object:
        # a new keyring displaces one of the same name, a removal like any other
        before = snapshot(self.svc)
        try:
            return self.svc.add_key(ROOT, "keyring", desc, None, S)
        except KeyfenceError as err:
            assert err.errno == errno.ENOSPC
            assert snapshot(self.svc) == before, "an aborted removal changed something"
            return multiple()

    @rule(target=keys, ring=rings, desc=st.sampled_from("abc"))
    def add_to_ring(self, ring: int, desc: str) -> int:
        try:
            return self.svc.add_key(ROOT, "user", desc, b"in-ring", ring)
        except KeyfenceError:
            return self.svc.add_key(ROOT, "user", desc, b"fallback", S)

    @rule(target=keys)
    def add_to_process(self) -> int:
        return self.svc.add_key(ROOT, "user", "proc", b"p", P)

    @rule(key=keys, fail=st.booleans())
    def watch(self, key: int, fail: bool) -> None:
        try:
            watcher = Watcher(self.svc, key, fail=fail)
            watch = self.svc.watch(ROOT, key, watcher, sync=True, name=f"w{key}")
        except KeyfenceError:
            return
        self.watchers.append((watcher, watch))

    @rule(index=st.integers(min_value=0, max_value=20))
    def unwatch(self, index: int) -> None:
        if self.watchers:
            _, watch = self.watchers[index % len(self.watchers)]
            watch.remove()  # type: ignore[attr-defined]

    @rule(key=keys, ring=rings)
    def link(self, key: int, ring: int) -> None:
        self.step(lambda: self.svc.link(ROOT, key, ring))

    @rule(key=keys, ring=st.one_of(rings, st.just(S)), emergency=st.booleans())
    def unlink(self, key: int, ring: int, emergency: bool) -> None:
        self.step(
            lambda: self.svc.unlink(ROOT, key, ring, emergency=emergency), emergency=emergency
        )

    @rule(ring=st.one_of(rings, st.just(S)), emergency=st.booleans())
    def clear(self, ring: int, emergency: bool) -> None:
        self.step(lambda: self.svc.clear(ROOT, ring, emergency=emergency), emergency=emergency)

    @rule(key=st.one_of(keys, rings), emergency=st.booleans())
    def revoke(self, key: int, emergency: bool) -> None:
        self.step(lambda: self.svc.revoke(ROOT, key, emergency=emergency), emergency=emergency)

    @rule(key=st.one_of(keys, rings))
    def invalidate(self, key: int) -> None:
        self.step(lambda: self.svc.invalidate(ROOT, key))

    @rule(key=keys, src=st.one_of(rings, st.just(S)), dst=st.one_of(rings, st.just(S)))
    def move(self, key: int, src: int, dst: int) -> None:
        self.step(lambda: self.svc.move(ROOT, key, src, dst))

    @rule(key=keys, seconds=st.integers(min_value=1, max_value=3))
    def expire(self, key: int, seconds: int) -> None:
        def run() -> None:
            try:
                self.svc.set_timeout(ROOT, key, seconds)
            except KeyfenceError:
                return
            self.clock.advance(seconds)
            self.svc.gc.collect()

        self.step(run)

    @rule()
    def reap(self) -> None:
        def run() -> None:
            self.clock.advance(301)
            self.svc.gc.collect()

        self.step(run)

    @rule()
    def process_exit(self) -> None:
        self.step(lambda: self.svc.process_exited(ROOT.pid, ROOT.start_time))

    @rule()
    def session_end(self) -> None:
        def run() -> None:
            self.svc.session_ended(ROOT.session)
            self.svc.join_session_keyring(ROOT)

        self.step(run)

    @invariant()
    def links_are_consistent(self) -> None:
        for key in self.svc.all_keys():
            for parent in key.parents:
                assert parent.contents is not None and key in parent.contents
            if key.contents is not None:
                for child in key.contents:
                    assert key in child.parents


FenceMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestFenceMachine = FenceMachine.TestCase
