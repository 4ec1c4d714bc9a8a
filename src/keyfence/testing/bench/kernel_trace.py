"""The kernel's FUSE trace events, for bench/fuse_trace.py.

``fuse:fuse_request_send`` and ``fuse:fuse_request_end`` (Linux 6.x,
tracefs) mark a request queued for the server and its answer; the time
between is the server's time for it, queueing behind earlier requests
included.  :class:`StepTracer` records them around each step of
:func:`keyfence.testing.bench.everyday.day`; :func:`fuse_requests` reads a
trace into requests and mean time per opcode.
"""

from __future__ import annotations

import collections
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TRACING",
    "StepTracer",
    "fuse_requests",
    "recorded",
    "request_times",
    "tracing_problem",
    "write",
]

TRACING = Path("/sys/kernel/tracing")

_SEND = " fuse_request_send: "
_END = " fuse_request_end: "


def write(name: str, value: str) -> None:
    """Write ``value`` to the tracefs file ``name``."""
    (TRACING / name).write_text(value)


def tracing_problem() -> str | None:
    """Why this machine cannot record the events, or None."""
    if os.geteuid() != 0:
        return "needs root (tracefs)"
    if not (TRACING / "events" / "fuse" / "fuse_request_send").is_dir():
        return f"no fuse trace events under {TRACING} (Linux 6.x, tracefs mounted)"
    return None


def request_times(lines: list[str]) -> dict[str, list[float]]:
    """Per opcode (``LOOKUP``, ...), each answered request's time from sent
    to answered in microseconds, in the trace's order."""
    sent: dict[str, tuple[float, str]] = {}
    spent: dict[str, list[float]] = collections.defaultdict(list)
    for line in lines:
        for marker in (_SEND, _END):
            at = line.find(marker)
            if at < 0:
                continue
            ts = float(line[:at].rsplit(" ", 1)[-1].rstrip(":"))
            words = line[at + len(marker) :].split()
            if "req" not in words:
                break
            req = words[words.index("req") + 1]
            if marker == _SEND and "opcode" in words:
                name = words[words.index("opcode") + 2].strip("()").removeprefix("FUSE_")
                sent[req] = (ts, name)
            elif marker == _END and req in sent:
                start, name = sent.pop(req)
                spent[name].append((ts - start) * 1e6)
            break
    return dict(spent)


def fuse_requests(lines: list[str]) -> dict[str, dict[str, float]]:
    """Per opcode (``LOOKUP``, ...): the requests answered and their mean
    time from sent to answered in microseconds, the dearest opcode first."""
    spent = request_times(lines)
    return {
        op: {"count": len(v), "mean_us": round(statistics.fmean(v), 1)}
        for op, v in sorted(spent.items(), key=lambda kv: -sum(kv[1]))
    }


@contextlib.contextmanager
def recorded() -> Iterator[list[str]]:
    """Record the FUSE events meanwhile; the trace's lines are in the
    yielded list afterwards (the kernel's buffer is emptied)."""
    lines: list[str] = []
    write("tracing_on", "0")
    write("trace", "")
    write("buffer_size_kb", "131072")
    write("events/fuse/enable", "1")
    write("tracing_on", "1")
    try:
        yield lines
    finally:
        write("tracing_on", "0")
        write("events/fuse/enable", "0")
        lines.extend((TRACING / "trace").read_text().splitlines())
        write("trace", "")


class StepTracer:
    """Records the FUSE events around each step it is called for (the
    ``around`` of :func:`keyfence.testing.bench.everyday.day`): per step its
    wall time, the server's total time and :func:`fuse_requests`."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        with recorded() as lines:
            start = time.perf_counter()
            try:
                yield
            finally:
                wall = time.perf_counter() - start
        ops = fuse_requests(lines)
        server_us = sum(row["count"] * row["mean_us"] for row in ops.values())
        self.steps[step] = {
            "wall_s": round(wall, 4),
            "server_ms": round(server_us / 1000, 1),
            "ops": ops,
        }
