"""How long the request loop busy-waits for the next request: a window
that follows the client, as KVM's halt polling does (virt/kvm/kvm_main.c,
``grow_halt_poll_ns``/``shrink_halt_poll_ns``).

Why: on a machine whose idle CPUs halt, a request that finds the loop
asleep waits 15-40 µs for it to wake; one that comes while it spins is read
at once (docs/performance.md, "Spinning for the next request" and part 19).
A client that thinks a little between its calls (``git`` compressing an
object, ``tar`` reading the next member) sends its next request 60-150 µs
after the last answer: past a short spin, long before a sleep pays.  A
long spin for every client would burn a core beside one that calls once a
millisecond.  So the window starts short and follows what the loop finds
when it has slept:

1. The loop spun :attr:`SpinWindow.ns`, found nothing and slept; the next
   request came ``idle_ns`` after the queue was found empty.
2. ``idle_ns`` within :attr:`SpinWindow.most_ns`: a longer spin would have
   caught it.  The window doubles, up to ``most_ns``.
3. ``idle_ns`` past ``most_ns``: no spin we allow would have caught it.
   After :data:`LATE_SPELLS` such spells in a row, with no request caught
   by a spin in between, the window halves, down to where it started.
   One late spell alone says little: ``git`` thinks 60-90 µs before the
   first write of each object and much longer between files, and halving
   at each long pause would lose the short ones (docs/performance.md,
   part 19).

A client that keeps coming back within ``most_ns`` is caught every time;
one whose every pause is longer costs the short window per idle spell, as
a fixed short spin did, after a few longer ones.  At most ``most_ns`` of
one core per idle spell.

Concurrency: the loop's thread only (no lock).
"""

from __future__ import annotations

__all__ = ["LATE_SPELLS", "START_NS", "SpinWindow"]

START_NS = 50_000
"""Where the window starts and what it shrinks back to (50 µs: a client
making one syscall after another comes back well within it)."""

LATE_SPELLS = 4
"""Idle spells in a row that no allowed spin would have caught, with no
request caught in between, before the window halves."""


class SpinWindow:
    """The current spin, between :data:`START_NS` and ``most_ns``.

    ``most_ns`` 0 never spins; ``most_ns`` at or below :data:`START_NS`
    is a fixed window of ``most_ns``."""

    __slots__ = ("_late", "grown", "most_ns", "ns", "shrunk", "start_ns")

    def __init__(self, *, most_ns: int) -> None:
        if most_ns < 0:
            raise ValueError(f"most_ns must be 0 or more, not {most_ns}")
        self.most_ns = most_ns
        self.start_ns = min(START_NS, most_ns)
        self.ns = self.start_ns
        """The window: how long the next idle spell spins."""
        self.grown = 0
        """Times the window doubled (a figure for tests and benchmarks)."""
        self.shrunk = 0
        """Times the window halved."""
        self._late = 0
        """Late spells (3.) in a row: reset by a catch, by a pause within
        ``most_ns`` (2.) and by a halving."""

    def stop(self) -> None:
        """Never spin again (requests come another way: fs/fuse/ring.py)."""
        self.most_ns = self.start_ns = self.ns = 0

    def caught(self) -> None:
        """A spin caught a request: the client still comes back in time."""
        self._late = 0

    def slept(self, idle_ns: int) -> None:
        """The loop spun :attr:`ns` for nothing and slept; the next request
        came ``idle_ns`` after the queue was found empty (spin included)."""
        if idle_ns <= self.most_ns:
            self._late = 0
            if self.ns < self.most_ns:
                self.ns = min(self.most_ns, self.ns * 2)
                self.grown += 1
            return
        self._late += 1
        if self._late >= LATE_SPELLS and self.ns > self.start_ns:
            self._late = 0
            self.ns = max(self.start_ns, self.ns // 2)
            self.shrunk += 1
