"""The live progress line kfctl draws on a terminal while a removal waits.

A removal (clear, revoke, invalidate, unlink, move, purge) waits for the
synchronous key users of the keys going away -- a mounted filesystem
flushing what it wrote with the key, say.  While it waits the daemon sends
status snapshots; on a terminal kfctl redraws one line on stderr naming
the users still working and how much they report left, and erases it when
the operation returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, TextIO


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
    """One line: who is still flushing which key and how much is left."""
    pending = list(snapshot.pending)
    total = sum(p.remaining_bytes or 0 for p in pending)
    users = len(pending)
    head = f"{prog} {command}: waiting {snapshot.elapsed:.1f}s for "
    if not users:
        return head + "key users"
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


class ProgressLine:
    """A callable for the client's ``progress=``: redraws the line."""

    def __init__(self, prog: str, command: str, stream: TextIO) -> None:
        self.prog = prog
        self.command = command
        self.stream = stream
        self.drawn = False

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return max(20, columns) if columns > 0 else 80

    def __call__(self, snapshot: Snapshot) -> None:
        text = progress_text(self.prog, self.command, snapshot)
        width = self._width() - 1
        if len(text) > width:
            text = text[: width - 3] + "..."
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False
