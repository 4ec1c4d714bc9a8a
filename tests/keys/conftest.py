from __future__ import annotations

from collections.abc import Iterator

import pytest

from keyfence.keys import Caller, KeyService


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def svc(clock: FakeClock) -> Iterator[KeyService]:
    service = KeyService(clock=clock, gc_delay=300, run_gc_thread=False)
    yield service
    service.close()


@pytest.fixture
def root() -> Caller:
    return Caller(uid=0, gid=0, pid=100, session="root-session")


@pytest.fixture
def alice() -> Caller:
    return Caller(uid=1000, gid=1000, pid=200, session="alice-session")


@pytest.fixture
def bob() -> Caller:
    return Caller(uid=1001, gid=1001, groups=frozenset({1000}), pid=300, session="bob-session")
