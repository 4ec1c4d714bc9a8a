"""One progress display for every long operation.

``kfctl`` removals (clear, revoke, invalidate, unlink, move, purge),
``keyfence lock`` and ``keyfence umount`` wait for someone to write data
back: the key users of a removal (a mount flushing what it wrote with the
key), or a mount's own worker.  The daemon sends status snapshots while
they work (:class:`keyfence.client.RemovalStatus`); a :class:`ProgressDisplay` is
the callable the client calls with them, and shows them on standard error:

* on a terminal, one live line, redrawn at most 10 times a second: a bar
  (how much of the most there was to write is written) and who is still
  working; erased when the operation returns;
* otherwise (a pipe, a log file) a plain line at most once a second, the
  first after a second of waiting -- an operation that returns at once
  prints nothing::

      keyfence lock: waiting 2.0s for 1 key user, 59.8 MiB left: ...

``rich`` is not a dependency of keyfence, so the line is drawn here: ``\\r``
and ``ESC [ K`` (erase to the end of the line), which every terminal
emulator understands.  The text is cut to the terminal's width so that a
redraw never wraps.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

ERASE = "\r\x1b[K"
BAR_WIDTH = 10
REDRAW_EVERY = 0.1
"""Seconds between two redraws of the live line."""
PLAIN_EVERY = 1.0
"""Seconds between two plain lines (and before the first one)."""


class PendingUser(Protocol):
    @property
    def watcher(self) -> str: ...
    @property
    def key(self) -> int: ...
    @property
    def remaining_bytes(self) -> int | None: ...
    @property
    def note(self) -> str: ...


class Snapshot(Protocol):
    @property
    def pending(self) -> Sequence[PendingUser]: ...
    @property
    def elapsed(self) -> float: ...


def human_bytes(count: int) -> str:
    """1023 B, 1.5 KiB, 12.0 MiB, ..."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def progress_text(prog: str, command: str, snapshot: Snapshot) -> str:
    """One line: who is still writing (for which key) and how much is left.

    Key users of a removal are counted and listed with their keys; a
    mount's own write-back (``umount``: key 0) is named.  Names and notes
    come from other processes (other users' watchers): control characters
    show as ``?``, so no escape sequence of theirs reaches the terminal."""
    pending = [_Shown(p) for p in snapshot.pending]
    total = sum(p.remaining_bytes or 0 for p in pending)
    head = f"{prog} {command}: waiting {snapshot.elapsed:.1f}s for "
    users = len(pending)
    if not users:
        return head + "key users"
    if all(p.key == 0 for p in pending):
        head += ", ".join(p.watcher for p in pending)
        if total:
            head += f": {human_bytes(total)} left"
        notes = sorted({p.note for p in pending if p.note})
        return head + (f" ({', '.join(notes)})" if notes else "")
    head += f"{users} key user{'s' if users != 1 else ''}"
    if total:
        head += f", {human_bytes(total)} left"
    items = []
    for user in pending:
        item = f"{user.watcher} (key {user.key}"
        if user.remaining_bytes is not None:
            item += f", {human_bytes(user.remaining_bytes)} left"
        if user.note:
            item += f", {user.note}"
        items.append(item + ")")
    return head + ": " + "; ".join(items)


class _Shown:
    """A pending user as shown: its name and note printable."""

    def __init__(self, user: PendingUser) -> None:
        self.watcher = _printable(user.watcher)
        self.key = user.key
        self.remaining_bytes = user.remaining_bytes
        self.note = _printable(user.note)


def _printable(text: str) -> str:
    # keys.notify.watcher_text's rule, not imported: kfctl loads nothing of
    # the key model (its start-up time, docs/performance.md part 21)
    return "".join(ch if ch.isprintable() or ch == " " else "?" for ch in text)


def bar(done: float) -> str:
    """``[####------]  40%`` for ``done`` = 0.4 (short: an 80-column line
    still shows who is waiting and how much is left after it)."""
    done = min(1.0, max(0.0, done))
    filled = int(done * BAR_WIDTH)
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {int(done * 100):3d}%"


class _Aged:
    """A snapshot shown again later: the same users, more time waited."""

    def __init__(self, pending: Sequence[PendingUser], elapsed: float) -> None:
        self.pending = pending
        self.elapsed = elapsed


class ProgressDisplay:
    """The client's ``progress=`` callable for one command; also a context
    manager that erases (terminal) what it drew when the command is done.

    Thread-safe: snapshots arrive on the client's reader thread."""

    def __init__(
        self,
        prog: str,
        command: str,
        stream: TextIO | None = None,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        started: float | None = None,
    ) -> None:
        """``started``: when the command began, on ``clock`` (default: now)."""
        self.prog = prog
        self.command = command
        self.stream = sys.stderr if stream is None else stream
        if live is None:
            try:
                live = self.stream.isatty()
            except (AttributeError, ValueError):
                live = False
        self.live = live
        self.clock = clock
        self.started = clock() if started is None else started
        self._lock = threading.Lock()
        self._drawn = False
        self._last_draw = float("-inf")
        self._most = 0
        """The most bytes left seen: the bar's 100%."""
        self._latest: tuple[Snapshot, float] | None = None
        """The last snapshot and when it came: redrawn, older, until the next."""
        self._ticker: threading.Thread | None = None
        self._closing = threading.Event()

    # -- the client calls this with each snapshot

    def __call__(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._latest = (snapshot, self.clock())
            if self._ticker is None:
                # the daemon sends a snapshot when something changes; while
                # nothing does (a long fsync) the display still moves on
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
        self._show(snapshot)

    def _tick(self) -> None:
        while not self._closing.wait(REDRAW_EVERY * 5 if self.live else PLAIN_EVERY / 4):
            with self._lock:
                if self._latest is None:
                    continue
                snapshot, at = self._latest
            self._show(_Aged(snapshot.pending, snapshot.elapsed + self.clock() - at))

    def _show(self, snapshot: Snapshot) -> None:
        left = sum(p.remaining_bytes or 0 for p in snapshot.pending)
        text = progress_text(self.prog, self.command, snapshot)
        with self._lock:
            self._most = max(self._most, left)
            now = self.clock()
            if self.live:
                if now - self._last_draw < REDRAW_EVERY:
                    return
                line = text
                if self._most:
                    line = f"{bar(1 - left / self._most)} {text}"
                self._write(ERASE + self._fit(line))
                self._drawn = True
            else:
                if now - max(self._last_draw, self.started) < PLAIN_EVERY:
                    return
                self._write(text + "\n")
            self._last_draw = now

    def _fit(self, text: str) -> str:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = shutil.get_terminal_size().columns  # $COLUMNS, else 80
        width = (max(20, columns) if columns > 0 else 80) - 1
        return text if len(text) <= width else text[: width - 3] + "..."

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: progress is optional
            pass

    # -- the end of the operation

    def close(self) -> None:
        """Erase the live line (nothing is left on the terminal).  The
        display can be used again (kfctl purge: one removal after another)."""
        self._closing.set()
        ticker, self._ticker = self._ticker, None
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join()
        self._closing.clear()
        with self._lock:
            self._latest = None
            if self._drawn:
                self._write(ERASE)
                self._drawn = False

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
