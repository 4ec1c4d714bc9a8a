"""The request loop's spin window (fs/fuse/spin.py), on its own; the loop
adapting it under a real client is in test_fuse_loop.py."""

from __future__ import annotations

import pytest

from keyfence.fs.fuse.spin import LATE_SPELLS, START_NS, SpinWindow

US = 1000


def test_starts_short_and_doubles_while_the_client_comes_back_within_the_most() -> None:
    w = SpinWindow(most_ns=200 * US)
    assert w.ns == START_NS == 50 * US
    w.slept(120 * US)  # a longer spin would have caught it
    assert w.ns == 100 * US
    w.slept(150 * US)
    assert w.ns == 200 * US
    w.slept(190 * US)
    assert w.ns == 200 * US  # never past the most
    assert (w.grown, w.shrunk) == (2, 0)


def test_halves_back_to_the_start_after_late_spells_in_a_row() -> None:
    w = SpinWindow(most_ns=400 * US)
    for _ in range(3):
        w.slept(300 * US)
    assert w.ns == 400 * US
    for _ in range(LATE_SPELLS - 1):
        w.slept(5_000 * US)  # no allowed spin would have caught these
    assert w.ns == 400 * US  # not yet: one client's long pauses among short ones
    w.slept(5_000 * US)
    assert w.ns == 200 * US
    for _ in range(5 * LATE_SPELLS):
        w.slept(1_000_000 * US)
    assert w.ns == START_NS  # never below where it started
    assert w.shrunk == 3


def test_a_catch_or_a_short_pause_keeps_the_window() -> None:
    """git's pattern: a pause the window catches (or that a longer one
    would have) between long ones; the window stays where it is."""
    w = SpinWindow(most_ns=200 * US)
    w.slept(120 * US)
    w.slept(150 * US)
    assert w.ns == 200 * US
    for _ in range(10):
        for _ in range(LATE_SPELLS - 1):
            w.slept(2_000 * US)
        w.caught()
    for _ in range(10):
        for _ in range(LATE_SPELLS - 1):
            w.slept(2_000 * US)
        w.slept(190 * US)
    assert (w.ns, w.shrunk) == (200 * US, 0)


def test_a_client_that_comes_back_late_costs_the_short_window() -> None:
    w = SpinWindow(most_ns=1000 * US)
    for _ in range(100):
        w.slept(1001 * US)
    assert (w.ns, w.grown, w.shrunk) == (START_NS, 0, 0)


@pytest.mark.parametrize("most_us", [10, 50])
def test_a_most_at_or_below_the_start_is_a_fixed_window(most_us: int) -> None:
    w = SpinWindow(most_ns=most_us * US)
    for idle in (1 * US, most_us * US, 10_000 * US, 1 * US):
        w.slept(idle)
        assert w.ns == most_us * US
    assert w.grown == w.shrunk == 0


def test_zero_never_spins() -> None:
    w = SpinWindow(most_ns=0)
    w.slept(0)
    w.slept(10 * US)
    assert w.ns == 0


def test_a_negative_most_is_refused() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        SpinWindow(most_ns=-1)
