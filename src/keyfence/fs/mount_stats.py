"""What a mount worker tells the daemon for ``keyfence status``.

The daemon cannot ask a worker anything (the private channel carries the
worker's requests), and root cannot read a user's mount (FUSE without
``allow_other`` refuses even root), so the worker pushes a small snapshot
over the channel -- ``report("stats", ...)`` -- whenever it changes, at
most every :data:`INTERVAL` seconds, and once more after its final
write-back.  ``keyfence status`` and ``keyfence umount``'s progress read it
from the daemon; it is at most :data:`INTERVAL` seconds old.

Concurrency: the snapshot's figures come from the page cache and the key
bindings, which are read under their own locks from any thread; the
encrypted directories come from the inode table, which belongs to the trio
thread, so they are gathered there (``trio.from_thread``) and kept from the
last scan once the FUSE loop has ended.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from keyfence.fs.binding import KeyBindings
from keyfence.fs.format import KeyRef, Policy
from keyfence.fs.inodes import ROOT_INODE, InodeTable
from keyfence.fs.pagecache import PageCache

log = logging.getLogger("keyfence.fs.stats")


class MountView(Protocol):
    """What of a mount (fs/ops.py's ``KeyfenceOperations``) the figures need."""

    table: InodeTable
    keys: KeyBindings
    cache: PageCache
    trio_token: trio.lowlevel.TrioToken | None
    mounted: bool
    closed: bool

    def label_of(self, ino: int) -> str: ...


INTERVAL = 0.5
"""Seconds between two looks at the figures (a report only if they changed)."""
DIRS_EVERY = 5.0
"""Seconds between two scans of the inode table when its size is unchanged."""
DIRS_SHARE = 50
"""After a scan that took T seconds, the next waits at least this many T
(and a second): the scan runs on the FUSE loop's thread, and a table of a
million inodes must not cost a busy mount more than 2% of it."""
MAX_LISTED = 256
"""Keys and encrypted directories listed at most (the counts stay exact)."""


def policy_options(policy: Policy) -> dict[str, Any]:
    """A policy's modes as ``keyfence status DIR`` shows them (fscrypt's
    ``Options:`` line); ``padding`` only when the policy records one."""
    out: dict[str, Any] = {
        "contents": policy.contents_mode.label,
        "filenames": policy.names_mode.label,
        "policy_version": policy.version,
    }
    if policy.name_padding:
        out["padding"] = policy.name_padding
    return out


def encrypted_dirs(ops: MountView) -> tuple[int, list[tuple[str, KeyRef]]]:
    """On the trio thread: the encrypted directories the mount knows (has
    looked up since it started) whose parent is not encrypted with the same
    key -- where a policy was set, fscrypt's "encrypted directories".
    Whether each is unlocked is not part of the scan (scans are rare, keys
    bind at any time): :func:`dir_figures` asks at each report."""
    roots: list[tuple[str, KeyRef]] = []
    for inode in ops.table:
        policy = inode.policy
        if not inode.is_dir or policy is None:
            continue
        if inode.ino != ROOT_INODE:
            parent = ops.table.find(ops.table.parent_of(inode.ino))
            if parent is not None and parent.policy is not None and parent.policy.key == policy.key:
                continue
        roots.append(("/" + ops.label_of(inode.ino), policy.key))
    roots.sort(key=lambda d: d[0])
    return len(roots), roots[:MAX_LISTED]


def dir_figures(ops: MountView, dirs: list[tuple[str, KeyRef]]) -> list[dict[str, Any]]:
    """Any thread: the scanned directories with whether each is unlocked now."""
    return [
        {"path": path, "key": key.description, "unlocked": ops.keys.get(key) is not None}
        for path, key in dirs
    ]


def key_figures(ops: MountView) -> list[dict[str, Any]]:
    """Any thread: the keys the mount holds, with what is dirty and open under each."""
    out = []
    for binding in ops.keys.bindings()[:MAX_LISTED]:
        desc = binding.description
        out.append(
            {
                "key": desc,
                "serial": binding.serial,
                "dirty_bytes": ops.cache.dirty_bytes_of(desc),
                "open_files": sum(1 for f in ops.cache.files(desc) if f.users > 0),
            }
        )
    return out


class StatsReporter:
    """A thread that reports the mount's figures to the daemon as they change."""

    def __init__(
        self,
        ops: MountView,
        report: Callable[[str, dict[str, Any]], None],
        *,
        transport: Callable[[], str],
    ) -> None:
        self.ops = ops
        self.report = report
        self.transport = transport
        """How requests come (``/dev/fuse``, ``io_uring, 2 queues``)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, Any] | None = None
        self._dirs: tuple[int, list[tuple[str, KeyRef]]] = (0, [])
        self._dirs_at = -DIRS_EVERY
        self._dirs_next = 0.0
        self._table_size = -1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="keyfence-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop, after one last report (the final write-back is done)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.send()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.send()

    def snapshot(self) -> dict[str, Any]:
        ops = self.ops
        token = ops.trio_token
        now = time.monotonic()
        size = len(ops.table) if not ops.closed else self._table_size
        due = now >= self._dirs_next and size != self._table_size
        if token is not None and (due or now - self._dirs_at >= DIRS_EVERY):
            with contextlib.suppress(trio.RunFinishedError, RuntimeError):
                self._dirs = trio.from_thread.run_sync(encrypted_dirs, ops, trio_token=token)
                took = time.monotonic() - now
                self._dirs_at, self._table_size = now, size
                self._dirs_next = now + max(1.0, DIRS_SHARE * took)
        count, dirs = self._dirs
        return {
            "phase": "serving" if ops.mounted else "written back" if ops.closed else "writing back",
            "dirty_bytes": ops.cache.dirty_bytes_of(),
            "dirty_limit": ops.cache.dirty_limit,
            "keys": key_figures(ops),
            "encrypted_dirs": dir_figures(ops, dirs),
            "encrypted_dir_count": count,
            "requests": self.transport(),
        }

    def send(self) -> None:
        try:
            snap = self.snapshot()
            if snap != self._last:
                self.report("stats", snap)
                self._last = snap
        except Exception as err:  # a status figure must never stop the mount
            log.debug("stats report: %s", err)
