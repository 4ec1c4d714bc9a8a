"""A bound key going away: the mount's side of a fenced removal.

:class:`KeyGoing` is the half of :class:`~keyfence.fs.ops.KeyfenceOperations`
that the key source calls when a key the mount uses goes away
(:meth:`KeyGoing.key_going`, keyfence.fs.binding), as docs/fs.md says:

1. Not an emergency: syncfs (the kernel's dirty pages come to us), write
   back and fsync everything under the key (the kernel's cached pages of
   big files dropped beside it), fsync the directories changed under it,
   then evict (forget the binding, zero the key, drop names and ciphers),
   invalidate the kernel's dentries and pages, zero what was evicted, and
   report files still open ("incompletely locked").  A write-back error
   aborts the removal: the key stays.
2. Another login holds the same key: the mount moves to that copy and
   nothing locks.
3. Emergency: the key is already gone; drop the dirty pages at once and
   account for them, then evict as above.

Threads: ``key_going`` runs on a thread of the key source and holds
``key_lock`` (one removal of this mount at a time).  What touches the
inode table, the handles or the bindings' name caches runs on the trio
thread (:meth:`KeyGoing._in_loop`); the page cache has its own lock; the
kernel's invalidations run on the key source's thread, never a handler's
(they may wait for requests the trio thread is serving).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from keyfence.errors import KeyfenceError
from keyfence.fs import syscalls as sc
from keyfence.fs import wipe
from keyfence.fs.binding import Binding, KeyBindings
from keyfence.fs.fuse import kernel as fuse_kernel
from keyfence.fs.fuse.handoff import current_queue
from keyfence.fs.handles import DirHandle, FileHandle
from keyfence.fs.inodes import ROOT_INODE, InodeTable
from keyfence.fs.keysource import GoingAway
from keyfence.fs.negative import NegativeEntries
from keyfence.fs.pagecache import PageCache

__all__ = ["KeyGoing"]

log = logging.getLogger("keyfence.fs.key_going")

R = TypeVar("R")

_EARLY_DROP_BYTES = 16 << 20
"""Files from this size have the kernel's pages dropped beside their
write-back at a key removal (``KeyGoing._drop_kernel_pages_early``)."""
_EXPECTED_IO_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


@dataclass
class _Eviction:
    entries: list[tuple[int, bytes]] = field(default_factory=list)
    inodes: list[int] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    spent: list[object] = field(default_factory=list)
    """Names and ciphers dropped: zeroed after the kernel's invalidation."""


class KeyGoing:
    """The mount's removal callbacks (a base of KeyfenceOperations).

    The attributes below are the mount's; they are declared here so that
    this half is checked on its own.
    """

    mountpoint: str
    mounted: bool
    closed: bool
    enable_writeback_cache: bool
    trio_token: trio.lowlevel.TrioToken | None
    _trio_thread: int | None
    key_lock: threading.Lock
    """One removal of this mount at a time."""
    cache: PageCache
    keys: KeyBindings
    table: InodeTable
    handles: dict[int, FileHandle]
    dir_handles: dict[int, DirHandle]
    negatives: NegativeEntries
    _modified_dirs: set[int]
    _busy_names: dict[int, str]

    def label_of(self, ino: int) -> str:
        """The mount-relative plaintext path of an inode, for logs and reports.

        Names the mount cannot decrypt (any more) show as stored.
        """
        parts: list[str] = []
        for _ in range(4096):
            if ino == ROOT_INODE:
                break
            inode = self.table.find(ino)
            if inode is None or not inode.links:
                parts.append(f"<inode {ino}>")
                break
            parent, disk = next(iter(inode.links))
            p = self.table.find(parent)
            plain = p.plain_names.get(disk) if p is not None else None
            parts.append(os.fsdecode(plain) if plain is not None else disk)
            ino = parent
        return "/".join(reversed(parts))

    def _in_loop(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the trio thread (or here, if the loop has ended, or
        on a queue thread stepping a handler: it holds the serving lock)."""
        token = self.trio_token
        if (
            token is None
            or threading.get_ident() == self._trio_thread
            or current_queue() is not None
        ):
            return fn()
        try:
            return trio.from_thread.run_sync(fn, trio_token=token)
        except trio.RunFinishedError:
            return fn()

    def key_going(self, binding: Binding, going: GoingAway) -> None:
        """A bound key is going away (called on a thread of the key source).

        Not an emergency: push the kernel's dirty pages to us (syncfs),
        write back and fsync everything under the key, refuse new writes,
        evict names and ciphers, invalidate the kernel's caches, report
        busy files.  A write-back error aborts the removal (the key stays).
        Emergency: the key is already gone; drop at once and account.
        """
        while not self.key_lock.acquire(timeout=0.25):
            # behind an earlier removal's write-back (one aborted by its
            # caller's timeout goes on): this caller sees it progress too
            left = self.cache.dirty_bytes_of(binding.description)
            going.report_progress(left, f"{self.mountpoint}: an earlier write-back")
        with contextlib.ExitStack() as held:
            held.callback(self.key_lock.release)
            if not self.keys.is_current(binding):
                return  # a second callback for a removal already handled
            if going.emergency:
                try:
                    self._key_dropped(binding, going)
                except Exception:  # after the fact: nothing to abort, keep going
                    log.exception("emergency drop of %s", binding.description)
            elif self.keys.move_to_copy(binding, self._in_loop(lambda: self._openers(binding))):
                return  # another login holds the same key: nothing locks
            else:
                self._key_flushed(binding, going)

    def _openers(self, binding: Binding) -> list[int]:
        """On the trio thread: the processes with a file or directory open
        under ``binding``'s key, latest first."""
        desc = binding.description
        pids = [
            h.pid
            for h in self.handles.values()
            if h.pid > 0 and h.cached is not None and h.cached.key == desc
        ]
        for dh in self.dir_handles.values():
            node = self.table.find(dh.ino)
            policy = node.policy if node is not None else None
            if dh.pid > 0 and policy is not None and policy.key.description == desc:
                pids.append(dh.pid)
        pids.reverse()
        return pids

    def _key_flushed(self, binding: Binding, going: GoingAway) -> None:
        desc = binding.description
        if self.mounted and not self.closed:
            try:
                sc.syncfs_path(self.mountpoint)
            except OSError as err:
                log.warning("syncfs %s: %s", self.mountpoint, err)
        total = self.cache.dirty_bytes_of(desc)
        going.report_progress(total, f"{self.mountpoint}: writing back")
        step = [0]

        def progress(done: int) -> None:
            if done - step[0] >= 4 << 20:
                step[0] = done
                going.report_progress(max(0, total - done), f"{self.mountpoint}: writing back")

        early = self._drop_kernel_pages_early(desc)
        try:
            self.cache.flush_key(desc, progress)
            self.cache.close_key(desc)
            self.cache.flush_key(desc)
            for fd in self._in_loop(lambda: self._modified_dir_fds(desc)):
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as err:
            self.cache.reopen_key(desc)
            log.error(
                "write-back under %s failed, removal refused: %s",
                desc,
                err,
                exc_info=err.errno not in _EXPECTED_IO_ERRORS,  # a bug: show where
            )
            raise KeyfenceError(
                err.errno or errno.EIO,
                f"mount {self.mountpoint} could not write back: {err.strerror or err}",
            ) from None
        finally:
            if early is not None:
                early.join()
        going.report_progress(0, f"{self.mountpoint}: evicting")
        eviction = self._in_loop(lambda: self._evict(binding))
        if eviction.busy:
            log.warning("%s: incompletely locked, %d files still open", desc, len(eviction.busy))
            log.debug("%s: still open: %s", desc, eviction.busy)
        self._finish(binding, eviction)

    def _drop_kernel_pages_early(self, key: str) -> threading.Thread | None:
        """Start dropping the kernel's cached pages of big files under
        ``key`` on a thread of its own, while they are written back.

        The eviction drops them anyway, but after the write-back: for 1 GiB
        that is ~0.15 s of page-by-page work the removal waited for, which
        runs beside the write-back's sealing and storing instead.  Safe at
        any time: the pages are clean (no writeback cache) or written back
        by the kernel first, and a read meanwhile only fetches them again.
        """
        if not self.mounted or self.closed or self.enable_writeback_cache:
            return None
        inodes = [f.ino for f in self.cache.files(key) if f.size >= _EARLY_DROP_BYTES]
        if not inodes:
            return None

        thread = threading.Thread(
            target=self._invalidate_inodes, args=(inodes,), name="keyfence-drop-pages", daemon=True
        )
        thread.start()
        return thread

    def _key_dropped(self, binding: Binding, going: GoingAway) -> None:
        desc = binding.description
        self.keys.unbind(binding)
        busy, dropped = self.cache.drop_key(desc)
        # labelled while the names are still known (the eviction forgets
        # them), and only the files the owner is told about: a label is a
        # plaintext path (text, not zeroed), one per cached file would
        # leave every name of the directory behind
        labels = {ino: self.label_of(ino) for ino in (*dropped, *busy)}
        for ino, lost in dropped.items():
            label = labels[ino]
            going.dropped[label] = going.dropped.get(label, 0) + lost
        if dropped:
            log.warning("%s: emergency removal dropped data of %d files", desc, len(dropped))
            log.debug("%s: dropped: %s", desc, going.dropped)
        eviction = self._in_loop(lambda: self._evict(binding))
        eviction.busy = [labels[ino] for ino in busy]
        self._finish(binding, eviction, emergency=True)

    def _finish(self, binding: Binding, eviction: _Eviction, **report: object) -> None:
        """After an eviction: drop the kernel's caches, zero what was
        evicted, report the files still open (``report``: more fields)."""
        self._invalidate(eviction)
        self._wipe(eviction)
        if eviction.busy:
            detail = {
                "mount": self.mountpoint,
                "key": binding.description,
                "serial": binding.serial,
                "files": eviction.busy,
            }
            self.keys.report("busy", detail | report)

    def _modified_dir_fds(self, desc: str) -> list[int]:
        """On the trio thread: descriptors (to fsync, then close) of the
        directories changed under ``desc`` since its last removal."""
        out = []
        for ino in list(self._modified_dirs):
            d = self.table.find(ino)
            if d is None or d.policy is None or d.policy.key.description != desc:
                continue
            self._modified_dirs.discard(ino)
            with contextlib.suppress(OSError):  # gone, or no longer that directory
                out.append(sc.open_dir(self.table.dir_fd(ino), "."))
        return out

    def _evict(self, binding: Binding) -> _Eviction:
        """On the trio thread: forget the key, its names and ciphers."""
        desc = binding.description
        out = _Eviction()
        busy_labels = {f.ino: self.label_of(f.ino) for f in self.cache.files(desc) if f.users}
        self.keys.unbind(binding)
        busy, _dropped = self.cache.evict_key(desc)
        out.busy = [busy_labels.get(ino) or self.label_of(ino) for ino in busy]
        self._busy_names.update(zip(busy, out.busy, strict=True))
        for inode in self.table:
            if not inode.is_dir or inode.policy is None or inode.policy.key.description != desc:
                continue
            out.inodes.append(inode.ino)
            for disk, child in self.table.children_of(inode.ino):
                out.inodes.append(child.ino)
                plain = inode.plain_names.get(disk)
                if plain is not None:
                    out.entries.append((inode.ino, plain))
            for plain in inode.plain_names.values():
                out.entries.append((inode.ino, plain))
            out.entries.extend((inode.ino, name) for name in self.negatives.take(inode.ino))
            out.spent += inode.forget_names()
        for dh in self.dir_handles.values():
            d = self.table.find(dh.ino)
            if d is not None and d.policy is not None and d.policy.key.description == desc:
                dh.entries = None
        out.entries = list(dict.fromkeys(out.entries))
        out.inodes = list(dict.fromkeys(out.inodes))
        return out

    @staticmethod
    def _wipe(eviction: _Eviction) -> None:
        """Zero the evicted names (the caches' and the negative entries')
        and directory keys nothing uses any more (a name a suspended
        request still holds is left alone)."""
        # each object once: a second reference from this list would look
        # like a user elsewhere to wipe.release
        spent = list(
            {id(o): o for o in [*(n for _, n in eviction.entries), *eviction.spent]}.values()
        )
        eviction.entries.clear()
        eviction.spent.clear()
        wipe.release(spent)

    def _invalidate(self, eviction: _Eviction) -> None:
        """Drop the kernel's dentries and pages under an evicted key.

        Runs on the key source's thread: these calls may wait for requests
        the trio thread is serving.
        """
        if not self.mounted or self.closed:
            return
        for parent, name in eviction.entries:
            try:
                fuse_kernel.invalidate_entry(parent, name)
            except OSError as err:
                if err.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.debug("invalidate entry %d/%r: %s", parent, name, err)
        self._invalidate_inodes(eviction.inodes)

    @staticmethod
    def _invalidate_inodes(inodes: list[int]) -> None:
        """Drop the kernel's attributes and pages of each inode (one it no
        longer knows is skipped).  May wait for requests: never a handler."""
        for ino in inodes:
            try:
                fuse_kernel.invalidate_inode(ino)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    log.debug("invalidate inode %d: %s", ino, err)
