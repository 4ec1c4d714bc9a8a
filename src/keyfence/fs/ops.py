"""The FUSE operations of the encrypted overlay (pyfuse3 + trio).

The backing directory holds ciphertext, the mount shows plaintext.
Directories without a ``.keyfence-policy`` pass through unchanged; a
directory with one is encrypted (names, file contents, symlink targets) and
so is everything made inside it (docs/fs.md has the rules, docs/format.md
the bytes).

Threads: every request handler runs on the trio thread.  Blocking work
leaves it: key lookups (the key source may be a socket) through
``trio.to_thread``, write-back and fsync through :attr:`run_blocking`.
Encrypted reads and writes copy and decrypt on the trio thread (the cipher
holds the GIL anyway).  Key removal arrives on a thread of the key source
and runs :meth:`KeyfenceOperations.key_going` there: write-back through
the page cache's lock, table changes through ``trio.from_thread``, kernel
cache invalidation on that thread (never from a request handler: it may
wait for requests).

Two halves live apart, as base classes: the mount's side of a key going
away (fs/key_going.py) and the extended attributes (fs/xattrs.py); how a
handler's error becomes an errno is fs/op_errors.py.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, cast

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
)

from keyfence.errors import KeyfenceError, fail
from keyfence.fs import acl
from keyfence.fs import syscalls as sc
from keyfence.fs.binding import KeyBindings
from keyfence.fs.crypto import DirectoryCipher, EncryptedName, MasterKey
from keyfence.fs.format import (
    BLOCK_SIZE,
    DIR_NONCE_SIZE,
    POLICY_FILE_NAME,
    PROTECTORS_FILE_NAME,
    TEMP_NAME_PREFIX,
    FormatError,
    IntegrityError,
    Policy,
    is_hidden_name,
    is_long_name,
    is_sidecar_name,
    record_offset,
    sidecar_name,
)
from keyfence.fs.fuse import kernel as fuse_kernel
from keyfence.fs.fuse.dir_attrs import DirectoryAttributes
from keyfence.fs.fuse.handoff import on_trio_thread
from keyfence.fs.handles import DirHandle, FileHandle
from keyfence.fs.inodes import ROOT_INODE, Inode, InodeTable, read_policy
from keyfence.fs.key_going import KeyGoing
from keyfence.fs.keysource import KeySource
from keyfence.fs.limits import backing_max_size, encrypted_max_size
from keyfence.fs.negative import NegativeEntries
from keyfence.fs.op_errors import fuse_op
from keyfence.fs.pagecache import (
    DEFAULT_CHUNK_PAGES,
    DEFAULT_DIRTY_LIMIT,
    DEFAULT_EXPIRE,
    WRITE_THROUGH_BYTES,
    CachedFile,
    Flusher,
    PageCache,
    idle_files_allowed,
    lenient_plaintext_size,
)
from keyfence.fs.privileges import Privileges, chown_drops, in_group, suidgid_to_drop
from keyfence.fs.xattrs import Xattrs, write_policy

__all__ = ["KeyfenceOperations", "MountOptions"]

log = logging.getLogger("keyfence.fs.ops")

_PLAIN_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | os.O_TRUNC | os.O_NOFOLLOW
)
_SET_ID = stat.S_ISUID | stat.S_ISGID
_PAGE_MASK = mmap.PAGESIZE - 1
"""The kernel's page: what one write must cover for the kernel to keep it."""
# How long the kernel may keep names (negative ones too) and attributes
# answered unlocked.  The backing store is the mount's own and a key removal
# invalidates what it cached, so this only bounds how late changes made
# behind the mount's back show (docs/fs.md); 1 s cost a lookup per file to
# every `git status` or `make` more than a second after the last one.
DEFAULT_ATTR_TIMEOUT = 10.0
LIST_CHUNK = 1024
"""Names a listing decodes between two checkpoints of the request loop: a
directory of 100,000 names or more (real, or planted by a user on a
shared mount, past :data:`BAD_NAMES_KEPT`) took 1-2 s to decode, and
every other request of every user waited for it (a helper's attack run,
session 37).  Between chunks other requests are served."""
BAD_NAMES_KEPT = 100_000
"""Names that failed authentication remembered per directory, at most
(as many as ``Inode.plain_names`` keeps valid ones)."""
_NO_SIDECAR_HERE = frozenset(
    (errno.EIO, errno.ELOOP, errno.ENXIO, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EAGAIN)
)
"""Errors of a long name's sidecar that say what is there is none (a fifo,
socket, directory or symlink, a mount point, a file the worker may not
read): that name is left out.  Any other (EMFILE, ENOMEM) fails the listing."""
_STAT_EXTRA = (
    "st_atime",
    "st_mtime",
    "st_ctime",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
    "st_blksize",
    "st_blocks",
    "st_rdev",
)
"""The fields of an ``os.stat_result`` beyond its first ten."""


def _truncate_opened(fd: int, flags: int, open_for_writing: Callable[[], int]) -> None:
    """Cut a plain file just opened with ``O_TRUNC`` (``flags``) to nothing.

    Linux truncates on ``O_RDONLY | O_TRUNC`` too (the kernel checked write
    permission for it), but ``ftruncate`` of a read-only descriptor is
    EINVAL: that open truncates through a descriptor of its own."""
    if flags & os.O_ACCMODE != os.O_RDONLY:
        os.ftruncate(fd, 0)
        return
    writable = open_for_writing()
    try:
        os.ftruncate(writable, 0)
    finally:
        os.close(writable)


@dataclass
class MountOptions:
    """Tunables of one mount (worker command-line options)."""

    dirty_limit: int = DEFAULT_DIRTY_LIMIT
    dirty_expire: float = DEFAULT_EXPIRE
    attr_timeout: float = DEFAULT_ATTR_TIMEOUT
    writeback_cache: bool = False
    chunk_pages: int = DEFAULT_CHUNK_PAGES
    write_through: int = WRITE_THROUGH_BYTES


class KeyfenceOperations(KeyGoing, Xattrs, pyfuse3.Operations):
    """The overlay: one instance per mount worker."""

    supports_dot_lookup = True
    read_only_opens_skip_flush = True
    """Our own loop answers a read-only open with FOPEN_NOFLUSH: ``flush``
    writes back what this file's writers left dirty, which their own
    close does; a read-only descriptor's close has no error to report and
    no POSIX lock of ours to drop (the kernel keeps locks itself)."""
    enable_writeback_cache = False
    enable_acl = True
    """The kernel enforces POSIX ACLs (fs/acl.py): with a root worker on a
    shared mount, mode bits alone would let a user an ACL denies read."""

    def __init__(
        self,
        backing: str,
        mountpoint: str,
        source: KeySource,
        options: MountOptions | None = None,
        *,
        backing_fd: int | None = None,
    ) -> None:
        """``backing_fd``: the backing directory already opened and checked
        (by the daemon, as the caller): served as it is, never looked up by
        name again (``backing`` is then only its name for messages)."""
        super().__init__()
        self.options = options or MountOptions()
        self.enable_writeback_cache = self.options.writeback_cache
        self.backing = os.path.abspath(backing)
        self.mountpoint = os.path.abspath(mountpoint)
        self.table = InodeTable(self.backing, root_fd=backing_fd)
        self.cache = PageCache(
            dirty_limit=self.options.dirty_limit,
            expire=self.options.dirty_expire,
            chunk_pages=self.options.chunk_pages,
            label_of=self.log_label,
            write_through=self.options.write_through,
            idle_files=idle_files_allowed(),  # after InodeTable raised the limit
            max_size=encrypted_max_size(backing_max_size(self.table.root_fd)),
        )
        self.cache.backing_sync = functools.partial(sc.syncfs_dir, self.table.root_fd)
        self.flusher = Flusher(self.cache)
        self.keys = KeyBindings(source)
        self.keys.user = self
        self.dir_attributes = DirectoryAttributes(enabled=False)
        """Directories whose GETATTR and missing names the loop answers in C
        (fs/fuse/dir_attrs.py; enabled by fs/worker.py when its loop has the
        C part)."""
        self.dir_attributes.on_miss = self.lookup_missed
        self.keys.unbound = self.dir_attributes.clear  # a lock changes their timeouts
        self.handles: dict[int, FileHandle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._modified_dirs: set[int] = set()
        self.privileges = Privileges()
        """What writes drop (set-id bits, capabilities): FUSE_HANDLE_KILLPRIV_V2;
        also the inodes known to have no security.capability (see getxattr)."""
        self.run_blocking: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync
        """How a handler makes a blocking call (fsync, a big write-back):
        trio's threads, or, injected by fs/worker.py under keyfence's own
        loop, fs/fuse/blocking.py's (the loop waits for it directly while
        no other request comes).  Key lookups stay on trio's threads: the
        daemon they ask may call back into the trio thread."""
        self.negatives = NegativeEntries()
        self._busy_names: dict[int, str] = {}
        """Plaintext paths of files open when their key went (status shows
        them; the names themselves are evicted)."""
        self._partial_pages: set[int] = set()
        """Inodes the kernel may hold partly written pages of (see ``open``)."""
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self.mounted = False
        self.closed = False
        self.key_lock = threading.Lock()
        """Serializes key removals (flush, evict, invalidate) of this mount."""

    # ------------------------------------------------------------ life cycle

    def init(self) -> None:
        self.mounted = True

    def started(self) -> None:
        """Called on the trio thread once the FUSE loop runs."""
        self.trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self.flusher.start()

    def close(self) -> None:
        """After the FUSE loop: write everything back, fsync, let go of keys."""
        self.mounted = False
        self.trio_token = None
        self.flusher.stop()
        self.cache.readahead.stop()
        try:
            self.cache.flush_all(sync=True)
        except OSError as err:
            log.error("final write-back failed: %s", err)
        self.cache.write_behind.stop()  # after the write-back that hands it work
        for handle in self.handles.values():
            if handle.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(handle.fd)
            if handle.cached is not None:
                self.cache.release(handle.cached)
        self.handles.clear()
        for binding in self.keys.bindings():
            self.cache.evict_key(binding.description)
            self.keys.unbind(binding)
        self.dir_attributes.clear()
        self.closed = True
        self.table.close()

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # --------------------------------------------------------------- helpers

    def log_label(self, ino: int) -> str:
        """How a log line names a file: by inode number, never by name
        (logs outlive a lock); the plaintext path only at debug level
        (``-o debug``, root's mounts only).  Reports to the mount's owner
        (busy, dropped files) name files with :meth:`label_of`."""
        if log.isEnabledFor(logging.DEBUG):
            return f"inode {ino} ({self.label_of(ino)})"
        return f"inode {ino}"

    def _dir(self, ino: int) -> Inode:
        inode = self.table.get(ino)
        if not inode.is_dir:
            raise fail(errno.ENOTDIR)
        if inode.policy_error is not None:
            raise IntegrityError(f"bad encryption policy: {inode.policy_error}")
        return inode

    async def _unlock(self, policy: Policy | None, pid: int | None) -> MasterKey | None:
        """The key of ``policy``: bound, or looked up in ``pid``'s keyrings."""
        if policy is None:
            return None
        master = self.keys.master(policy.key)
        if master is not None or pid is None:
            return master
        return await self.keys.unlock(policy.key, pid)

    async def _need_key(self, policy: Policy, ctx: RequestContext) -> MasterKey:
        master = await self._unlock(policy, ctx.pid)
        if master is None:
            raise fail(errno.ENOKEY, f"{policy.key}")
        return master

    def _cipher(self, d: Inode, master: MasterKey) -> DirectoryCipher:
        if d.cipher is None:
            assert d.policy is not None
            d.cipher = DirectoryCipher.for_policy(master, d.policy)
        return d.cipher

    def _encode(self, d: Inode, master: MasterKey, name: bytes) -> EncryptedName:
        known = d.disk_names.get(name)
        if known is not None:
            return known
        enc = self._cipher(d, master).encrypt_name(name)
        d.remember_name(enc, name)
        return enc

    def _decode(
        self,
        d: Inode,
        master: MasterKey,
        d_fd: int,
        disk: str,
        failed: list[str],
        listed: AbstractSet[str],
    ) -> bytes | None:
        """The plaintext of a listed backing name; None for a name that is
        not an entry's, or that fails authentication (appended to
        ``failed``, for one log line per listing: a directory of planted
        names must cost neither a line each nor, listed again, the work:
        a long name without a sidecar that matches is remembered as a
        short one is).  ``listed``: the listing's names (a long name whose
        sidecar is not among them costs no syscall)."""
        plain = d.plain_names.get(disk)
        if plain is not None:
            return plain
        if is_hidden_name(disk) or disk.startswith(TEMP_NAME_PREFIX) or disk in d.bad_names:
            return None
        sidecar: bytes | None = None
        if is_long_name(disk):
            side = sidecar_name(disk)
            try:
                sidecar = sc.read_small(d_fd, side, 8192) if side in listed else None
            except OSError as err:  # a fifo, symlink, directory... planted
                if err.errno not in _NO_SIDECAR_HERE:
                    raise
                failed.append(f"{disk} (sidecar: {err.strerror})")
                self._bad_name(d, disk)
                return None
            if sidecar is None:
                failed.append(f"{disk} (no sidecar)")
                self._bad_name(d, disk)
                return None
        try:
            plain = self._cipher(d, master).decrypt_name(disk, sidecar)
        except FormatError:
            return None
        except IntegrityError:
            failed.append(disk)  # ciphertext, not a name
            self._bad_name(d, disk)
            return None
        full = sidecar.decode("ascii") if sidecar is not None else disk
        d.remember_name(EncryptedName(disk, full), plain)
        return plain

    @staticmethod
    def _bad_name(d: Inode, disk: str) -> None:
        if len(d.bad_names) < BAD_NAMES_KEPT:
            d.bad_names.add(disk)

    @staticmethod
    def _listed_disk_name(disk: str) -> bool:
        """A backing name shown as is in a locked directory."""
        if is_hidden_name(disk) or disk.startswith(TEMP_NAME_PREFIX):
            return False
        return "." not in disk or is_long_name(disk)

    async def _resolve(
        self, d: Inode, name: bytes, ctx: RequestContext | None
    ) -> tuple[str, MasterKey | None, bool]:
        """The backing name of ``name`` in ``d``: (disk name, key, locked)."""
        if d.policy is None:
            return os.fsdecode(name), None, False
        master = await self._unlock(d.policy, ctx.pid if ctx is not None else None)
        if master is None:
            try:
                disk = name.decode("ascii")
            except UnicodeDecodeError:
                raise fail(errno.ENOENT) from None
            if not self._listed_disk_name(disk):
                raise fail(errno.ENOENT)
            return disk, None, True
        return self._encode(d, master, name).disk_name, master, False

    async def _new_name(
        self, d: Inode, name: bytes, ctx: RequestContext
    ) -> tuple[EncryptedName, MasterKey | None]:
        """The backing name a new entry gets (ENOKEY in a locked directory)."""
        if d.policy is None:
            disk = os.fsdecode(name)
            if disk == POLICY_FILE_NAME:
                raise fail(errno.EPERM, f"{POLICY_FILE_NAME} is reserved")
            return EncryptedName(disk, disk), None
        master = await self._need_key(d.policy, ctx)
        return self._encode(d, master, name), master

    @staticmethod
    def _write_sidecar(d_fd: int, enc: EncryptedName) -> None:
        if enc.sidecar_name is None or enc.sidecar_content is None:
            return
        # rare (names of 176+ bytes); the entry depends on it: fdatasync
        sc.write_new(d_fd, enc.sidecar_name, enc.sidecar_content, replace=True, sync=True)

    @contextlib.contextmanager
    def _new_entry(self, d_fd: int, enc: EncryptedName) -> Iterator[str]:
        """Write a long name's sidecar, then let the block make the entry
        named as yielded; if that fails, remove the sidecar unless an entry
        of that name exists (it is that entry's)."""
        self._write_sidecar(d_fd, enc)
        try:
            yield enc.disk_name
        except BaseException:
            if enc.is_long and not sc.exists_at(d_fd, enc.disk_name):
                self._remove_sidecar(d_fd, enc.disk_name)
            raise

    @staticmethod
    def _remove_sidecar(d_fd: int, disk: str) -> None:
        if is_long_name(disk):
            with contextlib.suppress(FileNotFoundError):
                sc.unlink_at(d_fd, sidecar_name(disk))

    @staticmethod
    def _owner(d: Inode, d_fd: int, ctx: RequestContext) -> tuple[int, int, bool]:
        """(uid, gid, setgid dir) of a new entry, as POSIX says, from the
        directory's last stat (``Inode.group``: no fstat per create)."""
        group = d.group
        if group is None:
            st = os.fstat(d_fd)
            group = d.group = (bool(st.st_mode & stat.S_ISGID), st.st_gid)
        setgid, gid = group
        if setgid:
            return ctx.uid, gid, True
        return ctx.uid, ctx.gid, False

    def _open_new(self, d_fd: int, disk: str, kind: int) -> tuple[int, os.stat_result]:
        """An ``O_PATH`` descriptor of the entry just made as ``disk``, and
        its stat, checked to be it: of that kind and owned by the worker.  A
        user who can write the directory may have put an entry of their own
        under the name in between: that one is left alone (ESTALE)."""
        fd = sc.open_at(d_fd, disk, os.O_PATH)
        st = os.fstat(fd)
        if stat.S_IFMT(st.st_mode) != kind or st.st_uid != os.geteuid():
            os.close(fd)
            log.warning("a new backing entry was replaced before it was set up")
            raise fail(errno.ESTALE)
        return fd, st

    def _give_new(self, d_fd: int, disk: str, kind: int, uid: int, gid: int) -> os.stat_result:
        """Give the entry just made to its owner, through a descriptor."""
        fd, st = self._open_new(d_fd, disk, kind)
        try:
            sc.chown_fd(fd, uid, gid)
            return os.fstat(fd)
        except BaseException:
            self._take_back(d_fd, disk, st)
            raise
        finally:
            os.close(fd)

    def _take_back(self, d_fd: int, disk: str, made: os.stat_result) -> None:
        """Remove an entry just made that could not be given to its owner
        (a user's worker may not chown to another uid: EPERM), with its
        long name's sidecar, if the name still holds it.  Left, it would be
        the mount owner's, under a name, mode and link target another user
        chose: a link or file planted for the owner to follow."""
        with contextlib.suppress(OSError):
            st = sc.stat_at(d_fd, disk)
            if (st.st_dev, st.st_ino) != (made.st_dev, made.st_ino):
                return
            if stat.S_ISDIR(st.st_mode):
                sc.rmdir_at(d_fd, disk)
            else:
                sc.unlink_at(d_fd, disk)
            self._remove_sidecar(d_fd, disk)

    @staticmethod
    def _set_up_new_dir(fd: int, st: os.stat_result, uid: int, gid: int, perm: int) -> bool:
        """Give a directory just made (``fd``, ``st``) its owner and mode;
        True if that changed it (its ctime too: stat it again).  A worker
        serving its own uid (or root serving root) skips both calls."""
        changed = False
        if st.st_uid != uid or st.st_gid != gid:
            sc.chown_at(fd, ".", uid, gid)
            changed = True
        if changed or stat.S_IMODE(st.st_mode) != perm:
            sc.chmod_at(fd, ".", perm)  # after chown, which may drop set-group-ID
            changed = True
        return changed

    def _open_file(self, node: Inode, flags: int) -> tuple[int, os.stat_result]:
        """Open a regular file's backing inode by its name, no-follow; ESTALE
        if the name now holds another inode (swapped in the backing store)."""
        d_fd, name = self.table.entry(node.ino)
        fd, st = sc.open_regular(d_fd, name, flags)
        if self.table.fuse_ino(st.st_ino) != node.ino:
            os.close(fd)
            log.warning("%s: backing entry was replaced", self.log_label(node.ino))
            raise fail(errno.ESTALE)
        return fd, st

    def _open_rw(self, node: Inode) -> int:
        return self._open_rw_stat(node)[0]

    def _open_rw_stat(self, node: Inode) -> tuple[int, os.stat_result]:
        try:
            return self._open_file(node, os.O_RDWR)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise
            return self._open_file(node, os.O_RDONLY)

    def _timeout(self, locked: bool) -> float:
        return 0.0 if locked else self.options.attr_timeout

    def _attrs(
        self,
        st: os.stat_result,
        parent_policy: Policy | None,
        *,
        locked: bool = False,
        dir_inode: Inode | None = None,
        link: tuple[int, str] | None = None,
    ) -> EntryAttributes:
        """``link``: (directory descriptor, name) of a symlink, to read its
        target for the plaintext size."""
        a = EntryAttributes()
        ino = self.table.fuse_ino(st.st_ino)
        a.st_ino = InodeT(ino)
        a.generation = 0
        timeout = self._timeout(locked)
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        a.st_mode = ModeT(st.st_mode)
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        size = st.st_size
        blocks = st.st_blocks
        mtime, ctime = st.st_mtime_ns, st.st_ctime_ns
        if parent_policy is not None:
            if stat.S_ISREG(st.st_mode):
                cached = self.cache.attributes(ino)
                if cached is not None:
                    size, pending, changed = cached
                    if pending is not None:
                        mtime = pending
                    ctime = max(ctime, changed)  # a write not yet written back
                    # what is not on disk yet takes blocks too (ext4's delalloc)
                    blocks += self.cache.unwritten_sectors(ino, st.st_blksize)
                else:
                    size = lenient_plaintext_size(size)
            elif stat.S_ISLNK(st.st_mode) and not locked and dir_inode is not None and link:
                master = self.keys.master(parent_policy.key)
                if master is not None and dir_inode.policy is not None:
                    with contextlib.suppress(OSError, FormatError):
                        size = len(
                            self._cipher(dir_inode, master).decrypt_symlink(sc.readlink_at(*link))
                        )
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = mtime
        a.st_ctime_ns = ctime
        return a

    def _stat_inode(self, inode: Inode) -> os.stat_result:
        """lstat of an inode's backing file, also once it has no name left."""
        try:
            if inode.is_dir:
                st = os.fstat(self.table.dir_fd(inode.ino))
                inode.group = (bool(st.st_mode & stat.S_ISGID), st.st_gid)
                return st
            st = sc.stat_at(*self.table.entry(inode.ino))
            if self.table.fuse_ino(st.st_ino) != inode.ino:
                # the name holds another file now (swapped in the backing
                # store): never report its attributes as this inode's
                raise fail(errno.ESTALE)
            return st
        except (FileNotFoundError, KeyfenceError):
            cached = self.cache.get(inode.ino)
            if cached is not None and cached.fd >= 0:
                return os.fstat(cached.fd)
            for handle in self.handles.values():
                if handle.ino == inode.ino and handle.fd >= 0:
                    return os.fstat(handle.fd)
            if inode.last_stat is not None and not inode.links:
                return inode.last_stat
            raise

    def nameless_fd(self, inode: Inode) -> int:
        """The backing descriptor of a regular file that lost its last name
        while open (the worker's: its cached file's, or a handle's), or -1.
        Only a descriptor reaches it (there is no name for the ``*at``
        calls), and the kernel still sends requests for it: fchmod, fchown,
        futimens and the f*xattr calls, which ext4 serves."""
        if inode.links or not inode.is_reg:
            return -1
        cached = self.cache.get(inode.ino)
        if cached is not None and cached.fd >= 0:
            return cached.fd
        for handle in self.handles.values():
            if handle.ino == inode.ino and handle.fd >= 0:
                return handle.fd
        return -1

    def _symlink_size(self, d: Inode, d_fd: int, disk: str, st: os.stat_result) -> int | None:
        """The plaintext size of the encrypted symlink ``disk`` about to lose
        its last name (read while it has one), else None."""
        if not stat.S_ISLNK(st.st_mode) or d.policy is None or st.st_nlink > 1:
            return None
        return int(self._attrs(st, d.policy, dir_inode=d, link=(d_fd, disk)).st_size)

    def _last_name_gone(self, st: os.stat_result, size: int | None = None) -> None:
        """The backing file ``st`` (stat'ed just before) lost its last name:
        what its inode answers from now on (Inode.last_stat); ``size``: an
        encrypted symlink's plaintext size (:meth:`_symlink_size`)."""
        inode = self.table.find(self.table.fuse_ino(st.st_ino))
        if inode is None or inode.is_dir or inode.links:
            return
        now = time.time_ns()  # the unlink changed its ctime, as on ext4
        fields = list(st[:10])
        fields[stat.ST_NLINK] = 0
        if size is not None:
            fields[stat.ST_SIZE] = size
        fields[stat.ST_CTIME] = now // 1_000_000_000
        extra = {name: getattr(st, name) for name in _STAT_EXTRA}
        extra.update(st_ctime=now / 1e9, st_ctime_ns=now)
        inode.last_stat = os.stat_result(fields, extra)

    def _inode_attrs(self, inode: Inode) -> EntryAttributes:
        st = self._stat_inode(inode)
        parent = self.table.find(self.table.parent_of(inode.ino))
        if inode.ino == ROOT_INODE:
            policy = None
        elif inode.is_dir:
            policy = parent.policy if parent is not None else None
        else:
            policy = self.table.contents_policy(inode)
        locked = policy is not None and self.keys.master(policy.key) is None
        link = None
        if inode.is_symlink and not locked:
            with contextlib.suppress(KeyfenceError):
                link = self.table.entry(inode.ino)
        return self._attrs(st, policy, locked=locked, dir_inode=parent, link=link)

    def _modified(self, d: Inode) -> None:
        if d.policy is not None:
            self._modified_dirs.add(d.ino)

    # ---------------------------------------------------------------- lookup

    @fuse_op
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        d = self._dir(parent_inode)
        if name == b".":
            d.lookups += 1
            return self._inode_attrs(d)
        if name == b"..":
            up = self.table.get(self.table.parent_of(d.ino))
            up.lookups += 1
            return self._inode_attrs(up)
        generation = self.dir_attributes.generation  # before we look: a lock refuses the offer
        disk, master, locked = await self._resolve(d, name, ctx)
        try:
            st = sc.stat_at(self.table.dir_fd(d.ino), disk)
        except FileNotFoundError:
            missing = self._missing(d, name, locked)
            if master is not None and d.cipher is not None and d.cipher.names_sealer is not None:
                # the next missing names of d are answered in C
                self._offer(d, missing.entry_timeout, generation, d.cipher.names_sealer)
            return missing
        self.table.remember(d.ino, disk, st)
        link = (self.table.dir_fd(d.ino), disk)
        return self._attrs(st, d.policy, locked=locked, dir_inode=d, link=link)

    def _offer(self, d: Inode, timeout: float, generation: int, names: Any = None) -> None:
        """Let the C loop answer ``d``'s GETATTR, and with ``names`` (its
        NameSealer) its missing names (fs/fuse/dir_attrs.py); ``generation``
        read before the handler looked."""
        self.dir_attributes.offer(
            d.ino,
            self.table.dir_fd(d.ino),
            self.table.fuse_ino(d.ino),  # its own inverse: the backing inode
            timeout,
            generation=generation,
            names=names,
        )

    def lookup_missed(self, dir_ino: int, name: bytes, disk: str) -> bool:
        """The C loop answers a LOOKUP of ``name`` (stored as ``disk``)
        missing from ``dir_ino`` (fs/fuse/dir_attrs.py): remember it as
        ``lookup`` would; whether the answer may carry a timeout."""
        d = self.table.find(dir_ino)
        if d is None or not d.is_dir or d.policy is None:
            return False
        d.remember_name(EncryptedName(disk, disk), name)  # create() needs it next
        return self.negatives.remember(dir_ino, name)

    def _missing(self, d: Inode, name: bytes, locked: bool) -> EntryAttributes:
        """A negative entry (inode 0) the kernel may keep for the timeout,
        remembered for a key removal to invalidate (keyfence.fs.negative);
        none at all in a locked directory."""
        timeout = self._timeout(locked)
        if not timeout or not self.negatives.remember(d.ino, name):
            raise fail(errno.ENOENT)
        a = EntryAttributes()
        a.st_ino = InodeT(0)
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        return a

    @fuse_op
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, nlookup in inode_list:
            self.dir_attributes.withdraw(ino)  # a number the backing store may give again
            gone = self.table.forget(ino, nlookup)
            if gone is not None:
                self._partial_pages.discard(ino)  # its pages went with it
                self.privileges.xattrs_changed(ino)
                if gone.is_dir:
                    self.negatives.forget_dir(ino)
            if gone is not None and gone.is_reg:
                cached = self.cache.get(ino)
                if cached is not None and cached.users == 0 and cached.fd >= 0:
                    with contextlib.suppress(OSError):
                        if os.fstat(cached.fd).st_nlink == 0:
                            self.cache.forget_unlinked(cached)

    @fuse_op
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        node = self.table.get(inode)
        generation = self.dir_attributes.generation  # before we look: a lock refuses the offer
        attrs = self._inode_attrs(node)
        if node.is_dir:  # from now on answered in C while it holds
            self._offer(node, attrs.attr_timeout, generation)
        return attrs

    @fuse_op
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        node = self.table.get(inode)
        node.group = None  # a chmod or chown may change it: stat again
        handle = self.handles.get(fh) if fh is not None else None
        policy = self.table.contents_policy(node) if not node.is_dir else None
        # FATTR_KILL_SUIDGID (our loop, HANDLE_KILLPRIV_V2): the caller has
        # no CAP_FSETID (truncate) or changes the owner (chown)
        kill_suidgid = getattr(fields, "kill_suidgid", False)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            self.privileges.mode_changed(node.ino)
        if fields.update_size:
            await self._truncate(node, handle, policy, attr.st_size, ctx, kill_suidgid)
        # by descriptor when the file is open, else by (directory, name)
        # with AT_SYMLINK_NOFOLLOW: never through a symlink swapped in
        fd = -1
        if handle is not None and handle.fd >= 0:
            fd = handle.fd
        elif handle is not None and handle.cached is not None and handle.cached.fd >= 0:
            fd = handle.cached.fd
        else:  # fchmod, fchown, futimens of an open file whose last name went
            fd = self.nameless_fd(node)
        if not _changes_anything(fields):
            self._chown_to_nobody_new(node, fd, ctx)
        if fields.update_mode and not node.is_symlink:
            mode = stat.S_IMODE(attr.st_mode)
            if fd >= 0:
                os.fchmod(fd, mode)
            else:
                sc.chmod_at(*self.table.entry(node.ino), mode)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if fd >= 0:
                os.fchown(fd, uid, gid)
            else:
                sc.chown_at(*self.table.entry(node.ino), uid, gid)
            if kill_suidgid and node.is_reg:
                # the backing store's own chown dropped them already (and the
                # capability): this only makes sure, as fuse.h asks
                st = self._stat_inode(node)
                if kill := suidgid_to_drop(st.st_mode):
                    mode = stat.S_IMODE(st.st_mode) & ~kill
                    if fd >= 0:
                        os.fchmod(fd, mode)
                    else:
                        sc.chmod_at(*self.table.entry(node.ino), mode)
        if fields.update_atime or fields.update_mtime:
            atime, mtime = attr.st_atime_ns, attr.st_mtime_ns
            if not (fields.update_atime and fields.update_mtime):  # tar, touch set both: no stat
                st = self._stat_inode(node)
                atime = atime if fields.update_atime else st.st_atime_ns
                mtime = mtime if fields.update_mtime else st.st_mtime_ns
            cached = self.cache.get(node.ino)
            if cached is not None and fields.update_mtime:
                self.cache.set_mtime(cached, mtime)
            elif cached is not None and not fields.update_mtime:
                pending = self.cache.attributes(node.ino)
                if pending is not None and pending[1] is not None:
                    mtime = pending[1]
            if fd >= 0:
                sc.utime_fd(fd, atime, mtime)
            else:
                sc.utime_at(*self.table.entry(node.ino), atime, mtime)
        return self._inode_attrs(node)

    def _chown_to_nobody_new(self, node: Inode, fd: int, ctx: RequestContext) -> None:
        """A SETATTR that names nothing.  The kernel's FUSE client sends one
        for ``chown(f, -1, -1)``, which is still a chown: ext4 drops set-id
        bits (``privileges.chown_drops``) and updates ctime, and leaves both
        to the server (HANDLE_KILLPRIV_V2).  It sends the same for
        ``file_remove_privs`` before a write by a caller without
        CAP_FSETID, which may not own the file but may write it.  So: the
        owner (or root) loses what a chown drops; another caller who may
        write the file what a write drops; anyone else gets EPERM if
        anything would be dropped (as ext4's chown), else only ctime."""
        self.privileges.mode_changed(node.ino)
        st = self._stat_inode(node)
        mode = st.st_mode
        member = ctx.uid == 0 or in_group(ctx.pid, ctx.gid, st.st_gid)
        if ctx.uid in (0, st.st_uid):
            kill = chown_drops(mode, member)
        elif mode & (stat.S_IWGRP if member else stat.S_IWOTH):
            kill = suidgid_to_drop(mode)
        elif chown_drops(mode, member):
            raise fail(errno.EPERM)
        else:
            kill = 0
        # the backing chown: ctime, and the capability the root worker drops
        if fd >= 0:
            os.fchown(fd, -1, -1)
        else:
            sc.chown_at(*self.table.entry(node.ino), -1, -1)
        if kill and not node.is_symlink:
            new_mode = stat.S_IMODE(mode) & ~kill
            if fd >= 0:
                os.fchmod(fd, new_mode)
            else:
                sc.chmod_at(*self.table.entry(node.ino), new_mode)

    async def _truncate(
        self,
        node: Inode,
        handle: FileHandle | None,
        policy: Policy | None,
        size: int,
        ctx: RequestContext,
        kill_suidgid: bool = False,
    ) -> None:
        if node.is_dir:
            raise fail(errno.EISDIR)
        drop = self.privileges.drop
        if policy is None:
            if handle is not None and handle.fd >= 0:
                drop(node.ino, handle.fd, kill_suidgid=kill_suidgid)
                os.ftruncate(handle.fd, size)
                return
            fd, _st = self._open_file(node, os.O_WRONLY)
            try:
                drop(node.ino, fd, kill_suidgid=kill_suidgid)
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            return
        if handle is not None and handle.cached is not None:
            if handle.cached.fd >= 0:
                drop(node.ino, handle.cached.fd, kill_suidgid=kill_suidgid)
            self.cache.truncate(handle.cached, size)
            return
        master = await self._need_key(policy, ctx)
        self.cache.drop_idle(node.ino, only_read_only=True)
        cached = self.cache.open(
            node.ino, policy.key.description, master, lambda: self._open_rw(node)
        )
        try:
            if cached.fd >= 0:
                drop(node.ino, cached.fd, kill_suidgid=kill_suidgid)
            self.cache.truncate(cached, size)
            await self.run_blocking(self.cache.flush, cached)
        finally:
            self.cache.release(cached)

    # ------------------------------------------------------------- symlinks

    @fuse_op
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        node = self.table.get(inode)
        raw = sc.readlink_at(*self.table.entry(node.ino))
        parent = self.table.get(self.table.parent_of(node.ino))
        if parent.policy is None:
            return FileNameT(os.fsencode(raw))
        master = await self._unlock(parent.policy, ctx.pid)
        if master is None:
            return FileNameT(os.fsencode(raw))
        try:
            return FileNameT(self._cipher(parent, master).decrypt_symlink(raw))
        except IntegrityError as err:
            log.error("%s: %s", self.log_label(node.ino), err.strerror)
            raise

    @fuse_op
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        d = self._dir(parent_inode)
        enc, master = await self._new_name(d, name, ctx)
        if master is not None:
            disk_target = self._cipher(d, master).encrypt_symlink(bytes(target))
        else:
            disk_target = os.fsdecode(target)
        d_fd = self.table.dir_fd(d.ino)
        uid, gid, _ = self._owner(d, d_fd, ctx)
        with self._new_entry(d_fd, enc) as disk:
            sc.symlink_at(disk_target, d_fd, disk)
        st = self._give_new(d_fd, disk, stat.S_IFLNK, uid, gid)
        self.table.remember(d.ino, disk, st)
        self._modified(d)
        self.negatives.discard(d.ino, name)
        return self._attrs(st, d.policy, dir_inode=d, link=(self.table.dir_fd(d.ino), disk))

    # ---------------------------------------------------- creating and removing

    @fuse_op
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        d = self._dir(parent_inode)
        enc, _master = await self._new_name(d, name, ctx)
        d_fd = self.table.dir_fd(d.ino)
        uid, gid, _ = self._owner(d, d_fd, ctx)
        mode = acl.creation_mode(d_fd, mode, ctx.umask)
        with self._new_entry(d_fd, enc) as disk:
            sc.mknod_at(d_fd, disk, mode, rdev)
        st = self._give_new(d_fd, disk, stat.S_IFMT(mode) or stat.S_IFREG, uid, gid)
        self.table.remember(d.ino, disk, st)
        self._modified(d)
        self.negatives.discard(d.ino, name)
        return self._attrs(st, d.policy)

    @fuse_op
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        d = self._dir(parent_inode)
        enc, master = await self._new_name(d, name, ctx)
        d_fd = self.table.dir_fd(d.ino)
        disk = enc.disk_name
        uid, gid, sgid = self._owner(d, d_fd, ctx)
        # the mode it keeps, as ext4 gives it: every chmod below sets this
        # one, so the default ACL it inherits stays as ext4 would leave it
        perm = stat.S_IMODE(acl.creation_mode(d_fd, mode, ctx.umask)) | (
            stat.S_ISGID if sgid else 0
        )
        # the new directory's O_PATH descriptor and policy go to the inode
        # table as they are: nothing opened or read back (remember's made_dir)
        if master is None:
            # only in a directory that is not encrypted (_new_name: ENOKEY
            # in a locked one); inside an encrypted one every directory is
            # made with its policy, below
            sc.mkdir_at(d_fd, disk, perm)
            new_fd, st = self._open_new(d_fd, disk, stat.S_IFDIR)
            try:
                if self._set_up_new_dir(new_fd, st, uid, gid, perm):
                    st = os.fstat(new_fd)
            except BaseException:
                os.close(new_fd)
                self._take_back(d_fd, disk, st)
                raise
            made: tuple[int, Policy | None] = (new_fd, None)
        else:
            assert d.policy is not None
            # made under a temporary name, with its policy, then renamed:
            # no encrypted directory is ever without its policy.  An entry
            # of that name (made behind the kernel's back: for a name it
            # knows, it answers EEXIST itself) fails the rename: EEXIST.
            tmp = TEMP_NAME_PREFIX + secrets.token_hex(8)
            # writable by its owner alone until renamed; made with the mode
            # it keeps where that is one (0755, 0700): no chmod afterwards
            sc.mkdir_at(d_fd, tmp, (perm | 0o700) & 0o755)
            tmp_fd = -1
            try:
                tmp_fd, st = self._open_new(d_fd, tmp, stat.S_IFDIR)
                policy = d.policy.with_nonce(os.urandom(DIR_NONCE_SIZE))
                write_policy(tmp_fd, policy)
                self._set_up_new_dir(tmp_fd, st, uid, gid, perm)
                with self._new_entry(d_fd, enc):
                    sc.rename_at(d_fd, tmp, d_fd, disk, RENAME_NOREPLACE)
            except BaseException:
                with contextlib.suppress(OSError):
                    if tmp_fd >= 0:
                        sc.unlink_at(tmp_fd, POLICY_FILE_NAME)
                    sc.rmdir_at(d_fd, tmp)
                if tmp_fd >= 0:
                    os.close(tmp_fd)
                raise
            try:
                st = os.fstat(tmp_fd)  # after the rename: its ctime
            except BaseException:
                os.close(tmp_fd)
                raise
            made = (tmp_fd, policy)
        self.table.remember(d.ino, disk, st, made_dir=made)
        self._modified(d)
        self.negatives.discard(d.ino, name)
        return self._attrs(st, d.policy)

    @fuse_op
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> tuple[FileInfo, EntryAttributes]:
        d = self._dir(parent_inode)
        enc, master = await self._new_name(d, name, ctx)
        d_fd = self.table.dir_fd(d.ino)
        uid, gid, _ = self._owner(d, d_fd, ctx)
        open_flags = os.O_CREAT
        if master is None:
            open_flags |= flags & _PLAIN_OPEN_FLAGS & ~os.O_TRUNC  # a new file is empty
        else:
            open_flags |= os.O_RDWR
        disk = enc.disk_name
        self._write_sidecar(d_fd, enc)  # what _new_entry does, without a generator per file
        try:
            # the kernel sends CREATE only for a name its lookup did not
            # find: almost always a new file, which needs no O_NONBLOCK
            # and has no security.capability to look up before writes
            # set-id bits only once the file is the caller's (below):
            # never a moment as the worker's, and fchown would clear them
            mode = acl.creation_mode(d_fd, mode, ctx.umask)
            fd, st = sc.create_regular(d_fd, disk, open_flags, stat.S_IMODE(mode) & ~_SET_ID)
        except FileExistsError:
            # put there behind the kernel's back while it held the name as
            # missing.  Never opened here: the kernel takes what CREATE
            # opens as made by the caller and checks no permission on it,
            # and the worker (root on a shared mount) could open anyone's
            # file.  O_EXCL: EEXIST, as open(2).  Else ESTALE: the kernel
            # looks the name up again (LOOKUP_REVAL) and opens what it finds
            # as any open, its modes checked for the caller.
            if not flags & os.O_EXCL:
                raise fail(errno.ESTALE) from None
            raise
        except BaseException:
            if enc.is_long and not sc.exists_at(d_fd, disk):
                self._remove_sidecar(d_fd, disk)
            raise
        try:
            if st.st_uid != uid or st.st_gid != gid:
                os.fchown(fd, uid, gid)
                st = os.fstat(fd)
            if mode & _SET_ID:
                os.fchmod(fd, stat.S_IMODE(mode))  # as asked (the kernel stripped what it must)
                st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            self._take_back(d_fd, disk, st)
            raise
        self.table.remember(d.ino, disk, st)
        self._modified(d)
        self.negatives.discard(d.ino, name)
        ino = self.table.fuse_ino(st.st_ino)
        self.privileges.made(ino, st.st_mode)
        fh = self._new_fh()
        if master is None:
            self.handles[fh] = FileHandle(ino, flags, fd=fd)
        else:
            assert d.policy is not None
            cached = self.cache.open(
                ino, d.policy.key.description, master, lambda: fd, disk_size=st.st_size
            )
            if cached.fd != fd:
                os.close(fd)
            if flags & os.O_TRUNC and (cached.size or cached.disk_size):
                # a new file is empty: an ftruncate would only cost (on ext4
                # it also makes close(2) start write-back: auto_da_alloc)
                self.cache.truncate(cached, 0)
            self.handles[fh] = FileHandle(ino, flags, cached=cached, pid=ctx.pid)
        return FileInfo(fh=FileHandleT(fh)), self._attrs(st, d.policy)

    @fuse_op
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        d = self._dir(parent_inode)
        disk, _master, _locked = await self._resolve(d, name, ctx)
        d_fd = self.table.dir_fd(d.ino)
        st = sc.stat_at(d_fd, disk)
        if stat.S_ISDIR(st.st_mode):
            raise fail(errno.EISDIR)
        if st.st_nlink <= 1:
            self.cache.drop_idle(self.table.fuse_ino(st.st_ino))
        size = self._symlink_size(d, d_fd, disk, st)
        sc.unlink_at(d_fd, disk)
        self._remove_sidecar(d_fd, disk)
        self.table.unlink(d.ino, disk)
        d.forget_name(disk)
        self._modified(d)
        if st.st_nlink <= 1:
            self._last_name_gone(st, size)
            cached = self.cache.get(self.table.fuse_ino(st.st_ino))
            if cached is not None and cached.users == 0:
                self.cache.forget_unlinked(cached)

    @fuse_op
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        d = self._dir(parent_inode)
        disk, _master, _locked = await self._resolve(d, name, ctx)
        d_fd = self.table.dir_fd(d.ino)
        st = sc.stat_at(d_fd, disk)
        if not stat.S_ISDIR(st.st_mode):
            raise fail(errno.ENOTDIR)
        _remove_encrypted_dir(d_fd, disk)
        self._remove_sidecar(d_fd, disk)
        self.table.unlink(d.ino, disk)
        d.forget_name(disk)
        self._modified(d)

    @fuse_op
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        node = self.table.get(inode)
        d = self._dir(new_parent_inode)
        src_policy = self.table.contents_policy(node)
        if (src_policy is None) != (d.policy is None) or (
            src_policy is not None
            and d.policy is not None
            and not src_policy.same_key_and_modes(d.policy)
        ):
            raise fail(errno.EXDEV)
        if node.is_symlink and d.policy is not None and d.ino not in self.table.parents(node.ino):
            raise fail(errno.EXDEV, "an encrypted symlink is bound to its directory")
        enc, _master = await self._new_name(d, new_name, ctx)
        src_fd, src = self.table.entry(node.ino)
        d_fd = self.table.dir_fd(d.ino)
        with self._new_entry(d_fd, enc) as disk:
            sc.link_at(src_fd, src, d_fd, disk)
        st = sc.stat_at(d_fd, disk)
        if self.table.fuse_ino(st.st_ino) != node.ino:
            # the source name was swapped meanwhile: undo, never link another file
            sc.unlink_at(d_fd, disk)
            self._remove_sidecar(d_fd, disk)
            raise fail(errno.ESTALE)
        self.table.remember(d.ino, disk, st)
        self._modified(d)
        self.negatives.discard(d.ino, new_name)
        return self._attrs(st, d.policy, dir_inode=d, link=(self.table.dir_fd(d.ino), disk))

    @fuse_op
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        od = self._dir(parent_inode_old)
        nd = self._dir(parent_inode_new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise fail(errno.EINVAL)
        od_master = nd_master = None
        if od.policy is not None:
            od_master = await self._need_key(od.policy, ctx)
        if nd.policy is not None:
            nd_master = await self._need_key(nd.policy, ctx)
        old_disk, _, _ = await self._resolve(od, name_old, ctx)
        # no await below: the directory descriptors are used at once
        od_fd = self.table.dir_fd(od.ino)
        nd_fd = self.table.dir_fd(nd.ino)
        st = sc.stat_at(od_fd, old_disk)
        exchange = bool(flags & RENAME_EXCHANGE)
        self._check_move(od, nd, od_fd, old_disk, st)
        if nd_master is not None:
            new_enc = self._encode(nd, nd_master, name_new)
        else:
            new_enc = EncryptedName(os.fsdecode(name_new), os.fsdecode(name_new))
            if new_enc.disk_name == POLICY_FILE_NAME:
                raise fail(errno.EPERM)
        new_disk = new_enc.disk_name
        if exchange:
            st_new = sc.stat_at(nd_fd, new_disk)
            self._check_move(nd, od, nd_fd, new_disk, st_new)
            if (
                od.ino != nd.ino
                and (od.policy or nd.policy)
                and (stat.S_ISLNK(st.st_mode) or stat.S_ISLNK(st_new.st_mode))
            ):
                raise fail(errno.EXDEV, "encrypted symlinks are bound to their directory")
        if (od.ino, old_disk) == (nd.ino, new_disk):
            return
        replaced: os.stat_result | None = None
        with contextlib.suppress(FileNotFoundError):
            replaced = sc.stat_at(nd_fd, new_disk)
        replaced_size = None
        if replaced is not None and not exchange:
            replaced_size = self._symlink_size(nd, nd_fd, new_disk, replaced)
        if (
            stat.S_ISLNK(st.st_mode)
            and od.ino != nd.ino
            and (od.policy is not None or nd.policy is not None)
            and not exchange
        ):
            self._move_symlink(od, nd, od_master, nd_master, old_disk, new_enc, flags)
        else:
            # an empty encrypted directory still holds its policy: set it
            # aside, or the backing rename over it is ENOTEMPTY
            aside = None
            if replaced is not None and not flags and stat.S_ISDIR(st.st_mode):
                aside = _set_aside_empty_dir(nd_fd, new_disk, replaced)
            if replaced is not None and not exchange and replaced.st_nlink <= 1:
                self.cache.drop_idle(self.table.fuse_ino(replaced.st_ino))
            try:
                self._write_sidecar(nd_fd, new_enc)
                sc.rename_at(od_fd, old_disk, nd_fd, new_disk, flags)
            except BaseException:
                if aside is not None:
                    sc.rename_at(nd_fd, aside, nd_fd, new_disk, RENAME_NOREPLACE)
                raise
            if aside is not None:
                _remove_encrypted_dir(nd_fd, aside)
            if not exchange and (od.ino, old_disk) != (nd.ino, new_disk):
                self._remove_sidecar(od_fd, old_disk)
        if exchange:
            self.table.exchange(od.ino, old_disk, nd.ino, new_disk)
            od.forget_name(old_disk)
            nd.forget_name(new_disk)
        else:
            self.table.move(od.ino, old_disk, nd.ino, new_disk)
            od.forget_name(old_disk)
            if replaced is not None and replaced.st_nlink <= 1:
                self._last_name_gone(replaced, replaced_size)
            if replaced is not None and stat.S_ISREG(replaced.st_mode) and replaced.st_nlink <= 1:
                cached = self.cache.get(self.table.fuse_ino(replaced.st_ino))
                if cached is not None and cached.users == 0:
                    self.cache.forget_unlinked(cached)
        for moved in (st, st_new) if exchange else (st,):
            if stat.S_ISDIR(moved.st_mode):  # its new parent's key decides its timeout
                self.dir_attributes.withdraw(self.table.fuse_ino(moved.st_ino))
        self._modified(od)
        self._modified(nd)
        self.negatives.discard(nd.ino, name_new)

    def _check_move(self, od: Inode, nd: Inode, od_fd: int, disk: str, st: os.stat_result) -> None:
        """EXDEV unless the entry may live in ``nd`` (docs/fs.md, as fscrypt)."""
        if stat.S_ISDIR(st.st_mode):
            moved = self.table.find(self.table.fuse_ino(st.st_ino))
            own = moved.policy if moved is not None else None
            if moved is None:
                fd = sc.open_dir(od_fd, disk, os.O_PATH)
                try:
                    own = read_policy(fd)
                finally:
                    os.close(fd)
        else:
            own = od.policy
        if nd.policy is not None:
            if own is None or not own.same_key_and_modes(nd.policy):
                raise fail(errno.EXDEV)
        elif not stat.S_ISDIR(st.st_mode) and od.policy is not None:
            raise fail(errno.EXDEV)

    def _move_symlink(
        self,
        od: Inode,
        nd: Inode,
        od_master: MasterKey | None,
        nd_master: MasterKey | None,
        old_disk: str,
        new_enc: EncryptedName,
        flags: int,
    ) -> None:
        """Rename a symlink into another directory: its target is re-encrypted."""
        od_fd = self.table.dir_fd(od.ino)
        nd_fd = self.table.dir_fd(nd.ino)
        raw = sc.readlink_at(od_fd, old_disk)
        if od_master is not None:
            target = self._cipher(od, od_master).decrypt_symlink(raw)
        else:
            target = os.fsencode(raw)
        if nd_master is not None:
            disk_target = self._cipher(nd, nd_master).encrypt_symlink(target)
        else:
            disk_target = os.fsdecode(target)
        st = sc.stat_at(od_fd, old_disk)
        tmp = TEMP_NAME_PREFIX + secrets.token_hex(8)
        sc.symlink_at(disk_target, nd_fd, tmp)
        try:
            sc.chown_at(nd_fd, tmp, st.st_uid, st.st_gid)
            self._write_sidecar(nd_fd, new_enc)
            sc.rename_at(nd_fd, tmp, nd_fd, new_enc.disk_name, flags & RENAME_NOREPLACE)
        except BaseException:
            with contextlib.suppress(OSError):
                sc.unlink_at(nd_fd, tmp)
            raise
        sc.unlink_at(od_fd, old_disk)
        self._remove_sidecar(od_fd, old_disk)
        # the kernel still has the old inode number under the new name
        fuse_kernel.invalidate_entry_async(
            InodeT(nd.ino), FileNameT(self._plain_of(nd, new_enc.disk_name)), ignore_enoent=True
        )

    def _plain_of(self, d: Inode, disk: str) -> bytes:
        return d.plain_names.get(disk) or os.fsencode(disk)

    # ------------------------------------------------------------- file I/O

    @fuse_op
    async def open(
        self, inode: InodeT, flags: FlagT, ctx: RequestContext, kill_suidgid: bool = False
    ) -> FileInfo:
        """``kill_suidgid``: FUSE_OPEN_KILL_SUIDGID (our loop): an O_TRUNC
        open by a caller without CAP_FSETID drops set-id bits."""
        node = self.table.get(inode)
        if node.is_dir:
            raise fail(errno.EISDIR)
        policy = self.table.contents_policy(node)
        fh = self._new_fh()
        if policy is None:
            fd, _st = self._open_file(node, flags & _PLAIN_OPEN_FLAGS)
            if flags & os.O_TRUNC:
                try:
                    self.privileges.drop(node.ino, fd, kill_suidgid=kill_suidgid)
                    # also when empty: ext4 sets mtime and ctime then too
                    _truncate_opened(fd, flags, lambda: self._open_file(node, os.O_WRONLY)[0])
                except BaseException:
                    os.close(fd)
                    raise
            self.handles[fh] = FileHandle(node.ino, flags, fd=fd)
        else:
            master = await self._need_key(policy, ctx)
            if flags & (os.O_ACCMODE | os.O_TRUNC) != os.O_RDONLY:
                self.cache.drop_idle(node.ino, only_read_only=True)
            if self.cache.get(node.ino) is None:
                # opened here, with the stat open_regular makes anyway: the
                # cache needs no fstat of its own for the size (should the
                # file have been cached meanwhile, the cache closes fd)
                fd, st = self._open_rw_stat(node)
                try:
                    cached = self.cache.open(
                        node.ino, policy.key.description, master, lambda: fd,
                        disk_size=st.st_size,
                    )  # fmt: skip
                except BaseException:
                    os.close(fd)  # the cache keeps a descriptor only on success
                    raise
            else:
                cached = self.cache.open(
                    node.ino, policy.key.description, master, lambda: self._open_rw(node)
                )
            if flags & os.O_TRUNC:
                try:
                    if cached.fd >= 0:
                        self.privileges.drop(node.ino, cached.fd, kill_suidgid=kill_suidgid)
                    self.cache.truncate(cached, 0)
                except BaseException:
                    self.cache.release(cached)
                    raise
            self.handles[fh] = FileHandle(node.ino, flags, cached=cached, pid=ctx.pid)
        if node.ino in self._partial_pages:
            # The kernel keeps a file's pages from one open to the next, but
            # marks a page readable only if one write covered it whole: after
            # tar's 10 KiB writes, every other page is a hole, and a reader
            # then fetches each hole with a READ of its own.  Dropped here,
            # the file is read in one go and cached whole from then on.
            self._partial_pages.discard(node.ino)
            return FileInfo(fh=FileHandleT(fh), keep_cache=False)
        return FileInfo(fh=FileHandleT(fh))

    def _rekeyed(self, f: CachedFile) -> CachedFile:
        """An open file whose key went away (ENOKEY through it, as docs/fs.md
        says) works again once its key is bound again, by any request that
        found it in its caller's keyrings: no need to reopen.  (Reads and
        writes carry no caller context in pyfuse3: they cannot look the key
        up themselves.)"""
        if f.master is None:
            node = self.table.find(f.ino)
            policy = self.table.contents_policy(node) if node is not None else None
            master = self.keys.master(policy.key) if policy is not None else None
            if policy is not None and master is not None:
                self.cache.rekey(f, policy.key.description, master)
        return f

    def _handle(self, fh: int) -> FileHandle:
        try:
            return self.handles[fh]
        except KeyError:
            raise fail(errno.EBADF) from None

    @fuse_op
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.cached is not None:
            # any contiguous buffer will do for pyfuse3: no copy to bytes
            return cast(bytes, self.cache.read(self._rekeyed(h.cached), off, size))
        return os.pread(h.fd, size, off)

    @fuse_op
    async def write(self, fh: FileHandleT, off: int, buf: bytes, kill_suidgid: bool = False) -> int:
        """``kill_suidgid``: FUSE_WRITE_KILL_SUIDGID (our loop): the writer
        has no CAP_FSETID, so set-id bits go (fs/privileges.py)."""
        h = self._handle(fh)
        if (off | len(buf)) & _PAGE_MASK:  # a page this write does not cover whole
            self._partial_pages.add(h.ino)
        fd = h.fd if h.cached is None else h.cached.fd
        if fd >= 0:
            self.privileges.drop(h.ino, fd, kill_suidgid=kill_suidgid)
        if h.cached is None:
            view = memoryview(buf)
            done = 0
            while done < len(view):
                done += os.pwrite(h.fd, view[done:], off + done)
            return done
        try:
            n = self.cache.write(self._rekeyed(h.cached), off, buf)
        finally:
            sc.wipe_request_buffer(buf)  # copied: nothing refers to it any more
        if h.flags & (os.O_SYNC | os.O_DSYNC):
            datasync = (h.flags & os.O_SYNC) != os.O_SYNC
            await self.run_blocking(self.cache.fsync, h.cached, datasync)
        elif self.cache.over_limit():
            await self.run_blocking(self.cache.flush_until, self.cache.dirty_limit // 2)
        return n

    async def _write_back(self, f: CachedFile) -> None:
        """Write a file back: small ones inline (a thread hop costs more than
        encrypting a few pages), big ones on a worker thread."""
        if not self.cache.has_write_back(f):
            return  # e.g. a small file stored at its write (PageCache._write_through)
        if not self.cache.try_flush(f):
            await self.run_blocking(self.cache.flush, f)

    @fuse_op
    async def flush(self, fh: FileHandleT) -> None:
        h = self._handle(fh)
        if h.cached is not None:
            await self._write_back(self._rekeyed(h.cached))

    @fuse_op
    async def release(self, fh: FileHandleT) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.cached is None:
            os.close(h.fd)
            return
        try:
            if h.cached.master is not None:
                await self._write_back(h.cached)
        except OSError as err:
            log.error("write-back of %s on close failed: %s", self.log_label(h.ino), err)
        finally:
            self.cache.release(h.cached)
        if h.ino in self._busy_names and h.cached.users <= 0:
            # an incompletely locked file closed: the busy report shrinks
            self._busy_names.pop(h.ino, None)
            still = sorted(self._busy_names.values())
            report = {"mount": self.mountpoint, "files": still} if still else {}
            with contextlib.suppress(Exception):  # a report must not fail a close
                await on_trio_thread()
                await trio.to_thread.run_sync(self.keys.report, "busy", report)

    @fuse_op
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        h = self._handle(fh)
        if h.cached is not None:
            f = self._rekeyed(h.cached)
            try:
                await self.run_blocking(self.cache.fsync, f, datasync)
            finally:
                # a failed fsync of the backing file (another process's, a
                # key removal's) is reported once through every open of the
                # file, as ext4 reports a write-back error (errseq_t)
                missed = h.sync_seen != f.sync_errors
                h.sync_seen = f.sync_errors
            if missed:
                raise fail(f.sync_errno, "an earlier write-back of this file failed")
        else:
            await self.run_blocking(os.fdatasync if datasync else os.fsync, h.fd)

    @fuse_op
    async def fallocate(
        self, fh: FileHandleT, offset: int, length: int, mode: int, ctx: RequestContext
    ) -> None:
        """fallocate(2) of an open file.  The kernel lets through only mode
        0, ``FALLOC_FL_KEEP_SIZE``, ``PUNCH_HOLE`` and ``ZERO_RANGE``, on a
        descriptor open for writing, with ``offset >= 0`` and ``length > 0``.

        A plain file: the backing file's, whatever the mode.  An encrypted
        file: mode 0 and ``KEEP_SIZE`` reserve the backing records of the
        range (so that its write-back cannot meet ENOSPC later), and mode 0
        then grows the size as ``ftruncate`` would; a hole punched or zeroed
        in ciphertext is not zeros in plaintext: EOPNOTSUPP, as gocryptfs.
        """
        h = self._handle(fh)
        # as ext4's fallocate: set-id bits go unless the caller has
        # CAP_FSETID, which FUSE does not say here: only root is taken to
        kill_suidgid = ctx.uid != 0
        if h.cached is None:
            self.privileges.drop(h.ino, h.fd, kill_suidgid=kill_suidgid)
            await self.run_blocking(sc.fallocate, h.fd, mode, offset, length)
            return
        if mode & ~sc.FALLOC_FL_KEEP_SIZE:
            raise fail(errno.EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise fail(errno.EINVAL)
        cached = self._rekeyed(h.cached)
        end = offset + length
        if cached.fd >= 0:
            self.privileges.drop(h.ino, cached.fd, kill_suidgid=kill_suidgid)
            start = record_offset(offset // BLOCK_SIZE)
            stop = record_offset((end - 1) // BLOCK_SIZE + 1)
            await self.run_blocking(
                sc.fallocate, cached.fd, sc.FALLOC_FL_KEEP_SIZE, start, stop - start
            )
        if not mode & sc.FALLOC_FL_KEEP_SIZE and end > cached.size:
            self.cache.truncate(cached, end)

    # ----------------------------------------------------------- directories

    @fuse_op
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        d = self._dir(inode)
        # as ext4's open of an encrypted directory: the opener's keyrings
        # count now, while it is held in the kernel; readdir asks the reader's
        await self._unlock(d.policy, ctx.pid or None)
        fh = self._new_fh()
        self.dir_handles[fh] = DirHandle(inode, ctx.pid)
        return FileHandleT(fh)

    async def _list(self, d: Inode, pid: int | None) -> tuple[list[tuple[bytes, str]], bool]:
        if d.policy is None:
            names = sc.listdir_fd(self.table.dir_fd(d.ino))
            return [(os.fsencode(n), n) for n in names], False
        master = await self._unlock(d.policy, pid)
        names = sc.listdir_fd(self.table.dir_fd(d.ino))
        if master is None:
            # a name that is not ASCII is no encrypted name (planted): left
            # out, as the unlocked listing leaves it out
            listed = [n for n in names if n.isascii() and self._listed_disk_name(n)]
            return [(n.encode("ascii"), n) for n in listed], True
        out: list[tuple[bytes, str]] = []
        d_fd = self.table.dir_fd(d.ino)
        failed: list[str] = []
        present = frozenset(names)
        for i, n in enumerate(names):
            if i and not i % LIST_CHUNK:
                await trio.lowlevel.checkpoint()
                if self.keys.master(d.policy.key) is not master:
                    # the key went (or moved to a copy) at the checkpoint:
                    # its cipher is gone; list again under what is bound now
                    return await self._list(d, pid)
                d_fd = self.table.dir_fd(d.ino)
            plain = self._decode(d, master, d_fd, n, failed, present)
            if plain is not None:
                out.append((plain, n))
        if failed:
            log.error(
                "%s: %d backing name(s) failed authentication, left out (first: %s)",
                self.log_label(d.ino),
                len(failed),
                failed[0],
            )
        return out, False

    @fuse_op
    async def readdir(
        self, fh: FileHandleT, start_id: int, token: ReaddirToken, pid: int = 0
    ) -> None:
        """``pid``: the process reading (the request's).  Its keyrings count,
        not the opener's: the reader is held in the kernel while we look, so
        its pid cannot be reused meanwhile, where the opener's may have
        exited long ago and its pid gone to another user's process."""
        dh = self.dir_handles.get(fh)
        if dh is None:
            raise fail(errno.EBADF)
        d = self._dir(dh.ino)
        if start_id == 0 or dh.entries is None:
            listed, dh.locked = await self._list(d, pid or None)
            dh.entries = [*_DOT_ENTRIES, *listed]
        for i in range(start_id, len(dh.entries)):
            name, disk = dh.entries[i]
            if not disk:  # "." or "..": no lookup counted (the kernel links neither)
                if not fuse_kernel.readdir_reply(token, FileNameT(name), self._dot(d, name), i + 1):
                    break
                continue
            # asked again each time: remembering a directory below may
            # open descriptors and close the least recently used
            d_fd = self.table.dir_fd(d.ino)
            try:
                st = sc.stat_at(d_fd, disk)
            except FileNotFoundError:
                continue
            except OSError as err:
                # a mount point (EXDEV: not crossed, lookup says so too), or
                # an entry that cannot be looked at: left out of the listing,
                # which must not fail for every reader because of one entry
                if err.errno != errno.EXDEV:
                    log.warning("%s: an entry left out: %s", self.log_label(d.ino), err.strerror)
                continue
            attrs = self._attrs(st, d.policy, locked=dh.locked, dir_inode=d, link=(d_fd, disk))
            if not fuse_kernel.readdir_reply(token, FileNameT(name), attrs, i + 1):
                break
            self.table.remember(d.ino, disk, st)

    def _dot(self, d: Inode, name: bytes) -> EntryAttributes:
        """``.`` or ``..`` of ``d`` as a listing shows them: a directory and
        its inode number (the mount's root is its own parent, as ext4's
        root).  READDIRPLUS's attributes of these two the kernel ignores."""
        a = EntryAttributes()
        a.st_ino = InodeT(d.ino if name == b"." else self.table.parent_of(d.ino))
        a.st_mode = ModeT(stat.S_IFDIR)
        return a

    @fuse_op
    async def releasedir(self, fh: FileHandleT) -> None:
        self.dir_handles.pop(fh, None)

    @fuse_op
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        dh = self.dir_handles.get(fh)
        if dh is None:
            raise fail(errno.EBADF)
        fd = sc.open_dir(self.table.dir_fd(dh.ino), ".")
        try:
            await self.run_blocking(os.fsync, fd)
        finally:
            os.close(fd)

    @fuse_op
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        s = os.statvfs(self.table.root_fd)  # fstatvfs
        out = StatvfsData()
        out.f_bsize = s.f_bsize
        out.f_frsize = s.f_frsize
        out.f_blocks = s.f_blocks
        out.f_bfree = s.f_bfree
        out.f_bavail = s.f_bavail
        out.f_files = s.f_files
        out.f_ffree = s.f_ffree
        out.f_favail = s.f_favail
        out.f_namemax = s.f_namemax
        return out


_DOT_ENTRIES = ((b".", ""), (b"..", ""))
"""The first two entries of every listing, as ext4 lists them (no backing name)."""
RENAME_NOREPLACE = int(pyfuse3.RENAME_NOREPLACE)
RENAME_EXCHANGE = int(pyfuse3.RENAME_EXCHANGE)


def _changes_anything(fields: SetattrFields) -> bool:
    """Whether a SETATTR names any attribute but ctime (``chown(f, -1, -1)``
    names none, or only ctime where the kernel keeps times itself)."""
    return any(
        getattr(fields, name, False)
        for name in (
            "update_size",
            "update_mode",
            "update_uid",
            "update_gid",
            "update_atime",
            "update_mtime",
            "kill_suidgid",
        )
    )


def _set_aside_empty_dir(d_fd: int, disk: str, st: os.stat_result) -> str | None:
    """A rename is about to replace the directory ``disk``: if it is an
    empty encrypted one (only its policy and records left), rename it to a
    temporary name (never listed) and return that; None if it has no
    policy (the backing rename decides); ENOTEMPTY if it holds entries."""
    if not stat.S_ISDIR(st.st_mode):
        return None
    fd = sc.open_dir(d_fd, disk, os.O_PATH)
    try:
        if os.fstat(fd).st_ino != st.st_ino:
            raise fail(errno.ESTALE)
        names = sc.listdir_fd(fd)
    finally:
        os.close(fd)
    if POLICY_FILE_NAME not in names:
        return None
    if not all(_is_record_name(n) for n in names):
        raise fail(errno.ENOTEMPTY)
    aside = TEMP_NAME_PREFIX + secrets.token_hex(8)
    sc.rename_at(d_fd, disk, d_fd, aside, RENAME_NOREPLACE)
    return aside


def _is_record_name(name: str) -> bool:
    """A backing name an empty encrypted directory may hold."""
    return (
        name in (POLICY_FILE_NAME, PROTECTORS_FILE_NAME)
        or is_sidecar_name(name)
        or name.startswith(TEMP_NAME_PREFIX)
    )


def _remove_encrypted_dir(d_fd: int, disk: str) -> None:
    """rmdir, where an encrypted directory may hold only its policy and
    stale long-name sidecars (ENOTEMPTY otherwise)."""
    fd = sc.open_dir(d_fd, disk, os.O_PATH)
    try:
        try:
            names = sc.listdir_fd(fd)
        except PermissionError:
            # a user's worker on its own unreadable directory (chmod 000):
            # rmdir needs only the parent's permission, as on ext4 (an
            # encrypted one still holds its policy: ENOTEMPTY)
            sc.rmdir_at(d_fd, disk)
            return
        if POLICY_FILE_NAME not in names:
            sc.rmdir_at(d_fd, disk)
            return
        if not all(_is_record_name(n) for n in names):
            raise fail(errno.ENOTEMPTY)
        for n in names:
            if n != POLICY_FILE_NAME:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    sc.unlink_at(fd, n)
        record = sc.read_small(fd, POLICY_FILE_NAME, 1 << 16) or b""
        sc.unlink_at(fd, POLICY_FILE_NAME)
        try:
            sc.rmdir_at(d_fd, disk)
        except OSError:
            with contextlib.suppress(OSError):
                sc.write_new(fd, POLICY_FILE_NAME, record, replace=False, sync=False)
            raise
    finally:
        os.close(fd)
