"""A mount worker's log, on a budget.

A worker's standard error is a file in the daemon's ``worker-logs``
directory (the system daemon's is on ``/run``: memory), and what a user
does to its own mount -- a loop reading a block it corrupted, each read an
error line -- must not fill it for everyone.  Lines pass at a sustained
rate with a burst; the rest are counted and the count is said on the next
line that passes; past a total the log stops with one line saying so.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["LogBudget"]


class LogBudget(logging.Filter):
    """A filter for the worker's handler (thread-safe)."""

    def __init__(
        self, *, burst: int = 1000, per_second: float = 20.0, total_bytes: int = 16 << 20
    ) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._burst = burst
        self._rate = per_second
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._total = total_bytes
        self._spent = 0
        self._left_out = 0
        self._closed = False

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            if self._closed:
                return False
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._spent >= self._total:
                self._closed = True
                record.msg = "log budget of %d MiB spent: nothing more is logged (%d left out)"
                record.args = (self._total >> 20, self._left_out + 1)
                record.levelno, record.levelname = logging.ERROR, "ERROR"
                return True
            if self._tokens < 1:
                self._left_out += 1
                return False
            self._tokens -= 1
            if self._left_out:
                record.msg = f"({self._left_out} lines left out) {record.msg}"
                self._left_out = 0
            self._spent += 120 + len(str(record.msg))
            return True
