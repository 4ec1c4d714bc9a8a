"""The FUSE operations of the encrypted overlay (pyfuse3 + trio).

The backing directory holds ciphertext, the mount shows plaintext.
Directories without a ``.keyfence-policy`` pass through unchanged; a
directory with one is encrypted (names, file contents, symlink targets) and
so is everything made inside it (docs/fs.md has the rules, docs/format.md
the bytes).

Threads: every request handler runs on the trio thread.  Blocking work
leaves it through ``trio.to_thread``: key lookups (the key source may be a
socket), write-back and fsync.  Encrypted reads and writes copy and decrypt
on the trio thread (the cipher holds the GIL anyway).  Key removal arrives
on a thread of the key source and runs :meth:`KeyfenceOperations.key_going`
there: write-back through the page cache's lock, table changes through
``trio.from_thread``, kernel cache invalidation on that thread (never from
a request handler: it may wait for requests).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    FUSEError,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from keyfence.errors import KeyfenceError
from keyfence.fs.binding import Binding, KeyBindings
from keyfence.fs.crypto import DirectoryCipher, EncryptedName, MasterKey
from keyfence.fs.format import (
    DIR_NONCE_SIZE,
    POLICY_FILE_NAME,
    PROTECTORS_FILE_NAME,
    FormatError,
    IntegrityError,
    KeyRef,
    Policy,
    is_hidden_name,
    is_long_name,
    is_sidecar_name,
    sidecar_name,
)
from keyfence.fs.inodes import ROOT_INODE, Inode, InodeTable, read_policy
from keyfence.fs.keysource import GoingAway, KeySource
from keyfence.fs.pagecache import (
    DEFAULT_CHUNK_PAGES,
    DEFAULT_DIRTY_LIMIT,
    DEFAULT_EXPIRE,
    CachedFile,
    Flusher,
    PageCache,
    lenient_plaintext_size,
)
from keyfence.fs.protector import MAX_PROTECTORS_SIZE, Protectors

__all__ = ["POLICY_XATTR", "STATUS_XATTR", "KeyfenceOperations", "MountOptions"]

log = logging.getLogger("keyfence.fs.ops")

POLICY_XATTR = b"user.keyfence.policy"
STATUS_XATTR = b"user.keyfence.status"
PROTECTORS_XATTR = b"user.keyfence.protectors"
"""A directory's ``.keyfence-protectors`` (keyfence.fs.protector): owner and root."""
_OUR_XATTRS = (POLICY_XATTR, STATUS_XATTR, PROTECTORS_XATTR)
_XATTR_PREFIX = b"user.keyfence."
_CAPABILITY_XATTR = b"security.capability"
"""Asked by the kernel before every write (to drop file capabilities)."""

_PLAIN_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | os.O_TRUNC | os.O_NOFOLLOW
)
_TEMP_PREFIX = "kf.tmp."
_EXPECTED_IO_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
_AT_FDCWD = -100

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class MountOptions:
    """Tunables of one mount (worker command-line options)."""

    dirty_limit: int = DEFAULT_DIRTY_LIMIT
    dirty_expire: float = DEFAULT_EXPIRE
    attr_timeout: float = 1.0
    writeback_cache: bool = False
    chunk_pages: int = DEFAULT_CHUNK_PAGES


def fuse_op(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn every error of a handler into the errno pyfuse3 replies with."""

    @functools.wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as err:
            code = err.errno or errno.EIO
            if code == errno.EIO and not isinstance(err, IntegrityError):
                log.error("%s: %s", fn.__name__, err)
            raise FUSEError(code) from None
        except FormatError as err:
            log.error("%s: %s", fn.__name__, err)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return handler


def _err(code: int, detail: str | None = None) -> KeyfenceError:
    return KeyfenceError(code, detail)


_libc: ctypes.CDLL | None = None


def _libc_call(name: str, *args: Any) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    ret = int(getattr(_libc, name)(*args))
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ret


def rename2(old: str, new: str, flags: int) -> None:
    """renameat2(2) (RENAME_NOREPLACE / RENAME_EXCHANGE)."""
    if not flags:
        os.rename(old, new)
        return
    _libc_call("renameat2", _AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags)


def syncfs(path: str) -> None:
    """syncfs(2) on the filesystem of ``path`` (without holding the GIL)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _libc_call("syncfs", fd)
    finally:
        os.close(fd)


class FileHandle:
    __slots__ = ("cached", "fd", "flags", "ino")

    def __init__(self, ino: int, flags: int, fd: int = -1, cached: CachedFile | None = None):
        self.ino = ino
        self.flags = flags
        self.fd = fd
        self.cached = cached


class DirHandle:
    __slots__ = ("entries", "ino", "locked", "pid")

    def __init__(self, ino: int, pid: int) -> None:
        self.ino = ino
        self.pid = pid
        """The process that opened it: its keyrings count for readdir."""
        self.entries: list[tuple[bytes, str]] | None = None
        self.locked = False


@dataclass
class _Eviction:
    entries: list[tuple[int, bytes]] = field(default_factory=list)
    inodes: list[int] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)


class KeyfenceOperations(pyfuse3.Operations):
    """The overlay: one instance per mount worker."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        backing: str,
        mountpoint: str,
        source: KeySource,
        options: MountOptions | None = None,
    ) -> None:
        super().__init__()
        self.options = options or MountOptions()
        self.enable_writeback_cache = self.options.writeback_cache
        self.backing = os.path.abspath(backing)
        self.mountpoint = os.path.abspath(mountpoint)
        self.table = InodeTable(self.backing)
        self.cache = PageCache(
            dirty_limit=self.options.dirty_limit,
            expire=self.options.dirty_expire,
            chunk_pages=self.options.chunk_pages,
            label_of=self.label_of,
        )
        self.cache.backing_sync = functools.partial(syncfs, self.backing)
        self.flusher = Flusher(self.cache)
        self.keys = KeyBindings(source)
        self.keys.user = self
        self.handles: dict[int, FileHandle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._modified_dirs: set[int] = set()
        self._no_capability: set[int] = set()
        self._busy_names: dict[int, str] = {}
        """Plaintext paths of files open when their key went (status shows
        them; the names themselves are evicted)."""
        """Inodes known to have no security.capability (see getxattr)."""
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
        try:
            self.cache.flush_all(sync=True)
        except OSError as err:
            log.error("final write-back failed: %s", err)
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
        self.closed = True

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # --------------------------------------------------------------- helpers

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

    def _dir(self, ino: int) -> Inode:
        inode = self.table.get(ino)
        if not inode.is_dir:
            raise _err(errno.ENOTDIR)
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
            raise _err(errno.ENOKEY, f"{policy.key}")
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

    def _decode(self, d: Inode, master: MasterKey, dir_path: str, disk: str) -> bytes | None:
        plain = d.plain_names.get(disk)
        if plain is not None:
            return plain
        if is_hidden_name(disk) or disk.startswith(_TEMP_PREFIX):
            return None
        sidecar: bytes | None = None
        if is_long_name(disk):
            try:
                with open(os.path.join(dir_path, sidecar_name(disk)), "rb") as f:
                    sidecar = f.read(8192)
            except FileNotFoundError:
                log.error("%s: long name without its sidecar", os.path.join(dir_path, disk))
                return None
        try:
            plain = self._cipher(d, master).decrypt_name(disk, sidecar)
        except FormatError:
            return None
        except IntegrityError as err:
            log.error("%s: %s", os.path.join(dir_path, disk), err.strerror)
            return None
        full = sidecar.decode("ascii") if sidecar is not None else disk
        d.remember_name(EncryptedName(disk, full), plain)
        return plain

    @staticmethod
    def _listed_disk_name(disk: str) -> bool:
        """A backing name shown as is in a locked directory."""
        if is_hidden_name(disk) or disk.startswith(_TEMP_PREFIX):
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
                raise _err(errno.ENOENT) from None
            if not self._listed_disk_name(disk):
                raise _err(errno.ENOENT)
            return disk, None, True
        return self._encode(d, master, name).disk_name, master, False

    async def _new_name(
        self, d: Inode, name: bytes, ctx: RequestContext
    ) -> tuple[EncryptedName, MasterKey | None]:
        """The backing name a new entry gets (ENOKEY in a locked directory)."""
        if d.policy is None:
            disk = os.fsdecode(name)
            if disk == POLICY_FILE_NAME:
                raise _err(errno.EPERM, f"{POLICY_FILE_NAME} is reserved")
            return EncryptedName(disk, disk), None
        master = await self._need_key(d.policy, ctx)
        return self._encode(d, master, name), master

    def _write_sidecar(self, dir_path: str, enc: EncryptedName) -> None:
        if enc.sidecar_name is None or enc.sidecar_content is None:
            return
        path = os.path.join(dir_path, enc.sidecar_name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, enc.sidecar_content)
            os.fdatasync(fd)  # rare (names of 176+ bytes); the entry depends on it
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _new_entry(self, dir_path: str, enc: EncryptedName) -> Iterator[str]:
        """Write a long name's sidecar, then let the block make the entry at
        the path yielded; if that fails, remove the sidecar unless an entry
        of that name exists (it is that entry's)."""
        path = os.path.join(dir_path, enc.disk_name)
        self._write_sidecar(dir_path, enc)
        try:
            yield path
        except BaseException:
            if enc.is_long and not os.path.lexists(path):
                self._remove_sidecar(dir_path, enc.disk_name)
            raise

    @staticmethod
    def _remove_sidecar(dir_path: str, disk: str) -> None:
        if is_long_name(disk):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dir_path, sidecar_name(disk)))

    def _owner(self, d_path: str, ctx: RequestContext) -> tuple[int, int, bool]:
        """(uid, gid, setgid dir) of a new entry, as POSIX says."""
        st = os.stat(d_path)
        if st.st_mode & stat.S_ISGID:
            return ctx.uid, st.st_gid, True
        return ctx.uid, ctx.gid, False

    def _timeout(self, locked: bool) -> float:
        return 0.0 if locked else self.options.attr_timeout

    def _attrs(
        self,
        st: os.stat_result,
        parent_policy: Policy | None,
        *,
        locked: bool = False,
        dir_inode: Inode | None = None,
        path: str | None = None,
    ) -> EntryAttributes:
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
        mtime = st.st_mtime_ns
        if parent_policy is not None:
            if stat.S_ISREG(st.st_mode):
                cached = self.cache.attributes(ino)
                if cached is not None:
                    size, pending = cached
                    if pending is not None:
                        mtime = pending
                else:
                    size = lenient_plaintext_size(size)
            elif stat.S_ISLNK(st.st_mode) and not locked and dir_inode is not None and path:
                master = self.keys.master(parent_policy.key)
                if master is not None and dir_inode.policy is not None:
                    with contextlib.suppress(OSError, FormatError):
                        size = len(
                            self._cipher(dir_inode, master).decrypt_symlink(os.readlink(path))
                        )
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = mtime
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _stat_inode(self, inode: Inode) -> os.stat_result:
        """lstat of an inode's backing file, also once it has no name left."""
        try:
            return os.lstat(self.table.path(inode.ino))
        except (FileNotFoundError, KeyfenceError):
            cached = self.cache.get(inode.ino)
            if cached is not None and cached.fd >= 0:
                return os.fstat(cached.fd)
            for handle in self.handles.values():
                if handle.ino == inode.ino and handle.fd >= 0:
                    return os.fstat(handle.fd)
            raise

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
        path = None
        if inode.is_symlink and not locked:
            with contextlib.suppress(KeyfenceError):
                path = self.table.path(inode.ino)
        return self._attrs(st, policy, locked=locked, dir_inode=parent, path=path)

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
        disk, _master, locked = await self._resolve(d, name, ctx)
        path = self.table.child_path(d.ino, disk)
        st = os.lstat(path)
        self.table.remember(d.ino, disk, st)
        return self._attrs(st, d.policy, locked=locked, dir_inode=d, path=path)

    @fuse_op
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, nlookup in inode_list:
            gone = self.table.forget(ino, nlookup)
            if gone is not None:
                self._no_capability.discard(ino)
            if gone is not None and gone.is_reg:
                cached = self.cache.get(ino)
                if cached is not None and cached.users == 0 and cached.fd >= 0:
                    with contextlib.suppress(OSError):
                        if os.fstat(cached.fd).st_nlink == 0:
                            self.cache.forget_unlinked(cached)

    @fuse_op
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self._inode_attrs(self.table.get(inode))

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
        handle = self.handles.get(fh) if fh is not None else None
        policy = self.table.contents_policy(node) if not node.is_dir else None
        path: str | None
        try:
            path = self.table.path(node.ino)
        except KeyfenceError:
            path = None
        if fields.update_size:
            await self._truncate(node, handle, path, policy, attr.st_size, ctx)
        target: int | str
        if handle is not None and handle.fd >= 0:
            target = handle.fd
        elif handle is not None and handle.cached is not None and handle.cached.fd >= 0:
            target = handle.cached.fd
        elif path is not None:
            target = path
        else:
            raise _err(errno.ESTALE)
        follow = not isinstance(target, str)
        if fields.update_mode and not node.is_symlink:
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid, follow_symlinks=follow)
        if fields.update_atime or fields.update_mtime:
            st = self._stat_inode(node)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            cached = self.cache.get(node.ino)
            if cached is not None and fields.update_mtime:
                self.cache.set_mtime(cached, mtime)
            elif cached is not None and not fields.update_mtime:
                pending = self.cache.attributes(node.ino)
                if pending is not None and pending[1] is not None:
                    mtime = pending[1]
            os.utime(target, ns=(atime, mtime), follow_symlinks=follow)
        return self._inode_attrs(node)

    async def _truncate(
        self,
        node: Inode,
        handle: FileHandle | None,
        path: str | None,
        policy: Policy | None,
        size: int,
        ctx: RequestContext,
    ) -> None:
        if node.is_dir:
            raise _err(errno.EISDIR)
        if policy is None:
            if handle is not None and handle.fd >= 0:
                os.ftruncate(handle.fd, size)
            elif path is not None:
                os.truncate(path, size)
            else:
                raise _err(errno.ESTALE)
            return
        if handle is not None and handle.cached is not None:
            self.cache.truncate(handle.cached, size)
            return
        if path is None:
            raise _err(errno.ESTALE)
        master = await self._need_key(policy, ctx)
        cached = self.cache.open(node.ino, policy.key.description, master, lambda: _open_rw(path))
        try:
            self.cache.truncate(cached, size)
            await trio.to_thread.run_sync(self.cache.flush, cached)
        finally:
            self.cache.release(cached)

    # ------------------------------------------------------------- symlinks

    @fuse_op
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        node = self.table.get(inode)
        path = self.table.path(node.ino)
        raw = os.readlink(path)
        parent = self.table.get(self.table.parent_of(node.ino))
        if parent.policy is None:
            return FileNameT(os.fsencode(raw))
        master = await self._unlock(parent.policy, ctx.pid)
        if master is None:
            return FileNameT(os.fsencode(raw))
        try:
            return FileNameT(self._cipher(parent, master).decrypt_symlink(raw))
        except IntegrityError as err:
            log.error("%s: %s", self.label_of(node.ino), err.strerror)
            raise

    @fuse_op
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        d = self._dir(parent_inode)
        enc, master = await self._new_name(d, name, ctx)
        d_path = self.table.path(d.ino)
        if master is not None:
            disk_target = self._cipher(d, master).encrypt_symlink(bytes(target))
        else:
            disk_target = os.fsdecode(target)
        uid, gid, _ = self._owner(d_path, ctx)
        with self._new_entry(d_path, enc) as path:
            os.symlink(disk_target, path)
        os.chown(path, uid, gid, follow_symlinks=False)
        st = os.lstat(path)
        self.table.remember(d.ino, enc.disk_name, st)
        self._modified(d)
        return self._attrs(st, d.policy, dir_inode=d, path=path)

    # ---------------------------------------------------- creating and removing

    @fuse_op
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        d = self._dir(parent_inode)
        enc, _master = await self._new_name(d, name, ctx)
        d_path = self.table.path(d.ino)
        uid, gid, _ = self._owner(d_path, ctx)
        with self._new_entry(d_path, enc) as path:
            os.mknod(path, mode, rdev)
        os.chown(path, uid, gid, follow_symlinks=False)
        st = os.lstat(path)
        self.table.remember(d.ino, enc.disk_name, st)
        self._modified(d)
        return self._attrs(st, d.policy)

    @fuse_op
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        d = self._dir(parent_inode)
        enc, master = await self._new_name(d, name, ctx)
        d_path = self.table.path(d.ino)
        path = os.path.join(d_path, enc.disk_name)
        uid, gid, sgid = self._owner(d_path, ctx)
        perm = stat.S_IMODE(mode) | (stat.S_ISGID if sgid else 0)
        if master is None:
            os.mkdir(path, perm)
            os.chown(path, uid, gid)
            os.chmod(path, perm)
        else:
            assert d.policy is not None
            if os.path.lexists(path):
                raise _err(errno.EEXIST)
            # made under a temporary name, with its policy, then renamed:
            # no encrypted directory is ever without its policy
            tmp = os.path.join(d_path, _TEMP_PREFIX + secrets.token_hex(8))
            os.mkdir(tmp, 0o700)
            try:
                policy = d.policy.with_nonce(os.urandom(DIR_NONCE_SIZE))
                _write_policy(tmp, policy)
                os.chown(tmp, uid, gid)
                os.chmod(tmp, perm)
                with self._new_entry(d_path, enc):
                    rename2(tmp, path, RENAME_NOREPLACE)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(tmp, POLICY_FILE_NAME))
                    os.rmdir(tmp)
                raise
        st = os.lstat(path)
        self.table.remember(d.ino, enc.disk_name, st)
        self._modified(d)
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
        d_path = self.table.path(d.ino)
        uid, gid, _ = self._owner(d_path, ctx)
        open_flags = os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | (flags & os.O_EXCL)
        if master is None:
            open_flags |= flags & _PLAIN_OPEN_FLAGS
        else:
            open_flags |= os.O_RDWR
        with self._new_entry(d_path, enc) as path:
            fd = os.open(path, open_flags, stat.S_IMODE(mode))
        try:
            st = os.fstat(fd)
            if st.st_uid != uid or st.st_gid != gid:
                os.fchown(fd, uid, gid)
                st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.table.remember(d.ino, enc.disk_name, st)
        self._modified(d)
        fh = self._new_fh()
        if master is None:
            self.handles[fh] = FileHandle(self.table.fuse_ino(st.st_ino), flags, fd=fd)
        else:
            assert d.policy is not None
            ino = self.table.fuse_ino(st.st_ino)
            cached = self.cache.open(
                ino, d.policy.key.description, master, lambda: fd, disk_size=st.st_size
            )
            if cached.fd != fd:
                os.close(fd)
            if flags & os.O_TRUNC and (cached.size or cached.disk_size):
                # a new file is empty: an ftruncate would only cost (on ext4
                # it also makes close(2) start write-back: auto_da_alloc)
                self.cache.truncate(cached, 0)
            self.handles[fh] = FileHandle(ino, flags, cached=cached)
        return FileInfo(fh=FileHandleT(fh)), self._attrs(st, d.policy)

    @fuse_op
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        d = self._dir(parent_inode)
        disk, _master, _locked = await self._resolve(d, name, ctx)
        d_path = self.table.path(d.ino)
        path = os.path.join(d_path, disk)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise _err(errno.EISDIR)
        os.unlink(path)
        self._remove_sidecar(d_path, disk)
        self.table.unlink(d.ino, disk)
        d.forget_name(disk)
        self._modified(d)
        if st.st_nlink <= 1:
            cached = self.cache.get(self.table.fuse_ino(st.st_ino))
            if cached is not None and cached.users == 0:
                self.cache.forget_unlinked(cached)

    @fuse_op
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        d = self._dir(parent_inode)
        disk, _master, _locked = await self._resolve(d, name, ctx)
        d_path = self.table.path(d.ino)
        path = os.path.join(d_path, disk)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise _err(errno.ENOTDIR)
        _remove_encrypted_dir(path)
        self._remove_sidecar(d_path, disk)
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
            raise _err(errno.EXDEV)
        if node.is_symlink and d.policy is not None and d.ino not in self.table.parents(node.ino):
            raise _err(errno.EXDEV, "an encrypted symlink is bound to its directory")
        enc, _master = await self._new_name(d, new_name, ctx)
        d_path = self.table.path(d.ino)
        with self._new_entry(d_path, enc) as path:
            os.link(self.table.path(node.ino), path, follow_symlinks=False)
        st = os.lstat(path)
        self.table.remember(d.ino, enc.disk_name, st)
        self._modified(d)
        return self._attrs(st, d.policy, dir_inode=d, path=path)

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
            raise _err(errno.EINVAL)
        if od.policy is not None:
            await self._need_key(od.policy, ctx)
        if nd.policy is not None:
            await self._need_key(nd.policy, ctx)
        old_disk, _, _ = await self._resolve(od, name_old, ctx)
        od_path = self.table.path(od.ino)
        nd_path = self.table.path(nd.ino)
        old_path = os.path.join(od_path, old_disk)
        st = os.lstat(old_path)
        exchange = bool(flags & RENAME_EXCHANGE)
        self._check_move(od, nd, old_path, st)
        if nd.policy is not None:
            master = await self._need_key(nd.policy, ctx)
            new_enc = self._encode(nd, master, name_new)
        else:
            new_enc = EncryptedName(os.fsdecode(name_new), os.fsdecode(name_new))
            if new_enc.disk_name == POLICY_FILE_NAME:
                raise _err(errno.EPERM)
        new_path = os.path.join(nd_path, new_enc.disk_name)
        if exchange:
            st_new = os.lstat(new_path)
            self._check_move(nd, od, new_path, st_new)
            if (
                od.ino != nd.ino
                and (od.policy or nd.policy)
                and (stat.S_ISLNK(st.st_mode) or stat.S_ISLNK(st_new.st_mode))
            ):
                raise _err(errno.EXDEV, "encrypted symlinks are bound to their directory")
        if old_path == new_path:
            return
        replaced: os.stat_result | None = None
        with contextlib.suppress(FileNotFoundError):
            replaced = os.lstat(new_path)
        if (
            stat.S_ISLNK(st.st_mode)
            and od.ino != nd.ino
            and (od.policy is not None or nd.policy is not None)
            and not exchange
        ):
            await self._move_symlink(od, nd, old_disk, new_enc, flags, ctx)
        else:
            self._write_sidecar(nd_path, new_enc)
            rename2(old_path, new_path, flags)
            if not exchange and (od.ino, old_disk) != (nd.ino, new_enc.disk_name):
                self._remove_sidecar(od_path, old_disk)
        if exchange:
            self.table.exchange(od.ino, old_disk, nd.ino, new_enc.disk_name)
            od.forget_name(old_disk)
            nd.forget_name(new_enc.disk_name)
        else:
            self.table.move(od.ino, old_disk, nd.ino, new_enc.disk_name)
            od.forget_name(old_disk)
            if replaced is not None and stat.S_ISREG(replaced.st_mode) and replaced.st_nlink <= 1:
                cached = self.cache.get(self.table.fuse_ino(replaced.st_ino))
                if cached is not None and cached.users == 0:
                    self.cache.forget_unlinked(cached)
        self._modified(od)
        self._modified(nd)

    def _check_move(self, od: Inode, nd: Inode, path: str, st: os.stat_result) -> None:
        """EXDEV unless the entry may live in ``nd`` (docs/fs.md, as fscrypt)."""
        if stat.S_ISDIR(st.st_mode):
            moved = self.table.find(self.table.fuse_ino(st.st_ino))
            own = moved.policy if moved is not None else None
            if moved is None:
                own = read_policy(path)
        else:
            own = od.policy
        if nd.policy is not None:
            if own is None or not own.same_key_and_modes(nd.policy):
                raise _err(errno.EXDEV)
        elif not stat.S_ISDIR(st.st_mode) and od.policy is not None:
            raise _err(errno.EXDEV)

    async def _move_symlink(
        self,
        od: Inode,
        nd: Inode,
        old_disk: str,
        new_enc: EncryptedName,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        """Rename a symlink into another directory: its target is re-encrypted."""
        od_path = self.table.path(od.ino)
        nd_path = self.table.path(nd.ino)
        old_path = os.path.join(od_path, old_disk)
        new_path = os.path.join(nd_path, new_enc.disk_name)
        raw = os.readlink(old_path)
        if od.policy is not None:
            target = self._cipher(od, await self._need_key(od.policy, ctx)).decrypt_symlink(raw)
        else:
            target = os.fsencode(raw)
        if nd.policy is not None:
            disk_target = self._cipher(nd, await self._need_key(nd.policy, ctx)).encrypt_symlink(
                target
            )
        else:
            disk_target = os.fsdecode(target)
        st = os.lstat(old_path)
        tmp = os.path.join(nd_path, _TEMP_PREFIX + secrets.token_hex(8))
        os.symlink(disk_target, tmp)
        try:
            os.chown(tmp, st.st_uid, st.st_gid, follow_symlinks=False)
            self._write_sidecar(nd_path, new_enc)
            rename2(tmp, new_path, flags & RENAME_NOREPLACE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.unlink(old_path)
        self._remove_sidecar(od_path, old_disk)
        # the kernel still has the old inode number under the new name
        pyfuse3.invalidate_entry_async(
            InodeT(nd.ino), FileNameT(self._plain_of(nd, new_enc.disk_name)), ignore_enoent=True
        )

    def _plain_of(self, d: Inode, disk: str) -> bytes:
        return d.plain_names.get(disk) or os.fsencode(disk)

    # ------------------------------------------------------------- file I/O

    @fuse_op
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        node = self.table.get(inode)
        if node.is_dir:
            raise _err(errno.EISDIR)
        policy = self.table.contents_policy(node)
        path = self.table.path(node.ino)
        fh = self._new_fh()
        if policy is None:
            fd = os.open(path, (flags & _PLAIN_OPEN_FLAGS) | os.O_CLOEXEC)
            self.handles[fh] = FileHandle(node.ino, flags, fd=fd)
        else:
            master = await self._need_key(policy, ctx)
            cached = self.cache.open(
                node.ino, policy.key.description, master, lambda: _open_rw(path)
            )
            if flags & os.O_TRUNC:
                try:
                    self.cache.truncate(cached, 0)
                except BaseException:
                    self.cache.release(cached)
                    raise
            self.handles[fh] = FileHandle(node.ino, flags, cached=cached)
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
            raise _err(errno.EBADF) from None

    @fuse_op
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.cached is not None:
            # any contiguous buffer will do for pyfuse3: no copy to bytes
            return cast(bytes, self.cache.read(self._rekeyed(h.cached), off, size))
        return os.pread(h.fd, size, off)

    @fuse_op
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if h.cached is None:
            view = memoryview(buf)
            done = 0
            while done < len(view):
                done += os.pwrite(h.fd, view[done:], off + done)
            return done
        n = self.cache.write(self._rekeyed(h.cached), off, buf)
        if h.flags & (os.O_SYNC | os.O_DSYNC):
            datasync = (h.flags & os.O_SYNC) != os.O_SYNC
            await trio.to_thread.run_sync(self.cache.fsync, h.cached, datasync)
        elif self.cache.over_limit():
            await trio.to_thread.run_sync(self.cache.flush_until, self.cache.dirty_limit // 2)
        return n

    async def _write_back(self, f: CachedFile) -> None:
        """Write a file back: small ones inline (a thread hop costs more than
        encrypting a few pages), big ones on a worker thread."""
        if not f.pages and (f.size == 0 or f.master is None):
            return
        if not self.cache.try_flush(f):
            await trio.to_thread.run_sync(self.cache.flush, f)

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
            log.error("write-back of %s on close failed: %s", self.label_of(h.ino), err)
        finally:
            self.cache.release(h.cached)
        if h.ino in self._busy_names and h.cached.users <= 0:
            # an incompletely locked file closed: the busy report shrinks
            self._busy_names.pop(h.ino, None)
            still = sorted(self._busy_names.values())
            report = {"mount": self.mountpoint, "files": still} if still else {}
            with contextlib.suppress(Exception):  # a report must not fail a close
                await trio.to_thread.run_sync(self.keys.report, "busy", report)

    @fuse_op
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        h = self._handle(fh)
        if h.cached is not None:
            await trio.to_thread.run_sync(self.cache.fsync, self._rekeyed(h.cached), datasync)
        else:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, h.fd)

    # ----------------------------------------------------------- directories

    @fuse_op
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        self._dir(inode)
        fh = self._new_fh()
        self.dir_handles[fh] = DirHandle(inode, ctx.pid)
        return FileHandleT(fh)

    async def _list(self, d: Inode, pid: int) -> tuple[list[tuple[bytes, str]], bool]:
        d_path = self.table.path(d.ino)
        names = os.listdir(d_path)
        if d.policy is None:
            return [(os.fsencode(n), n) for n in names], False
        master = await self._unlock(d.policy, pid)
        if master is None:
            return [(n.encode("ascii"), n) for n in names if self._listed_disk_name(n)], True
        out: list[tuple[bytes, str]] = []
        for n in names:
            plain = self._decode(d, master, d_path, n)
            if plain is not None:
                out.append((plain, n))
        return out, False

    @fuse_op
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        dh = self.dir_handles.get(fh)
        if dh is None:
            raise _err(errno.EBADF)
        d = self._dir(dh.ino)
        if start_id == 0 or dh.entries is None:
            dh.entries, dh.locked = await self._list(d, dh.pid)
        d_path = self.table.path(d.ino)
        for i in range(start_id, len(dh.entries)):
            name, disk = dh.entries[i]
            path = os.path.join(d_path, disk)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            attrs = self._attrs(st, d.policy, locked=dh.locked, dir_inode=d, path=path)
            if not pyfuse3.readdir_reply(token, FileNameT(name), attrs, i + 1):
                break
            self.table.remember(d.ino, disk, st)

    @fuse_op
    async def releasedir(self, fh: FileHandleT) -> None:
        self.dir_handles.pop(fh, None)

    @fuse_op
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        dh = self.dir_handles.get(fh)
        if dh is None:
            raise _err(errno.EBADF)
        await trio.to_thread.run_sync(_fsync_dir, self.table.path(dh.ino))

    @fuse_op
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        s = os.statvfs(self.backing)
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

    # --------------------------------------------------------------- xattrs

    @fuse_op
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        if name == _CAPABILITY_XATTR and inode in self._no_capability:
            # the kernel asks this before every write(2) on FUSE: remember
            # the answer instead of a path walk and syscall per write (our
            # setxattr, removexattr and forget drop it)
            raise FUSEError(pyfuse3.ENOATTR)
        node = self.table.get(inode)
        if name == POLICY_XATTR:
            policy = self.table.contents_policy(node)
            if policy is None:
                raise FUSEError(pyfuse3.ENOATTR)
            return policy.key.description.encode()
        if name == STATUS_XATTR:
            return json.dumps(self.status(node), sort_keys=True).encode()
        if name == PROTECTORS_XATTR:
            path = self._protectors_path(node, ctx)  # the inode table: trio thread only
            return await trio.to_thread.run_sync(_read_protectors, path)
        if name.startswith(_XATTR_PREFIX):
            raise FUSEError(pyfuse3.ENOATTR)
        try:
            return os.getxattr(self.table.path(node.ino), name, follow_symlinks=False)
        except OSError as err:
            if err.errno == errno.ENODATA and name == _CAPABILITY_XATTR:
                self._no_capability.add(inode)
            raise

    @fuse_op
    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        node = self.table.get(inode)
        if name == POLICY_XATTR:
            await self._set_policy(node, value, ctx)
            return
        if name == PROTECTORS_XATTR:
            path = self._protectors_path(node, ctx)
            await trio.to_thread.run_sync(_write_protectors, path, value)
            return
        if name.startswith(_XATTR_PREFIX):
            raise _err(errno.EPERM)
        self._no_capability.discard(inode)
        os.setxattr(self.table.path(node.ino), name, value, follow_symlinks=False)

    @fuse_op
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        node = self.table.get(inode)
        names = [
            XAttrNameT(os.fsencode(n))
            for n in os.listxattr(self.table.path(node.ino), follow_symlinks=False)
        ]
        if self.table.contents_policy(node) is not None:
            names.append(XAttrNameT(POLICY_XATTR))
        names.append(XAttrNameT(STATUS_XATTR))
        return names

    @fuse_op
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        node = self.table.get(inode)
        if name.startswith(_XATTR_PREFIX):
            raise _err(errno.EPERM)
        self._no_capability.discard(inode)
        os.removexattr(self.table.path(node.ino), name, follow_symlinks=False)

    async def _set_policy(self, node: Inode, value: bytes, ctx: RequestContext) -> None:
        """setxattr user.keyfence.policy: encrypt an empty directory."""
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        try:
            ref = KeyRef.from_description(value.decode("ascii").strip())
        except (UnicodeDecodeError, FormatError):
            raise _err(
                errno.EINVAL, "a key reference is keyfence:<32 hex> or ext4:<16 hex>"
            ) from None
        path = self.table.path(node.ino)
        st = os.lstat(path)
        if ctx.uid != 0 and ctx.uid != st.st_uid:
            raise _err(errno.EACCES)
        if node.policy is not None:
            if node.policy.key == ref:
                return
            raise _err(errno.EEXIST, "the directory already has another policy")
        if os.listdir(path):
            raise _err(errno.ENOTEMPTY)
        master = await self.keys.unlock(ref, ctx.pid)
        if master is None:
            raise _err(errno.ENOKEY, str(ref))
        policy = Policy(ref, os.urandom(DIR_NONCE_SIZE))
        _write_policy(path, policy, sync=True)
        await trio.to_thread.run_sync(_fsync_dir, path)
        node.policy = policy
        node.policy_error = None
        node.forget_names()
        log.info("%s: encrypted with %s", self.label_of(node.ino) or "/", ref)

    def _protectors_path(self, node: Inode, ctx: RequestContext) -> str:
        """The protectors file of an encrypted directory the caller owns (or root)."""
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if node.policy is None:
            raise FUSEError(pyfuse3.ENOATTR)
        path = self.table.path(node.ino)
        if ctx.uid != 0 and ctx.uid != os.lstat(path).st_uid:
            raise _err(errno.EACCES)
        return os.path.join(path, PROTECTORS_FILE_NAME)

    def status(self, node: Inode) -> dict[str, Any]:
        """What ``user.keyfence.status`` shows (JSON)."""
        policy = self.table.contents_policy(node)
        out: dict[str, Any] = {"encrypted": policy is not None}
        if policy is not None:
            binding = self.keys.get(policy.key)
            out["key"] = policy.key.description
            out["state"] = "unlocked" if binding is not None else "locked"
            if binding is not None:
                out["serial"] = binding.serial
            out["dirty_bytes"] = self.cache.dirty_bytes_of(policy.key.description)
            still_open = [f.ino for f in self.cache.files(policy.key.description) if f.users > 0]
            out["open_files"] = len(still_open)
            if binding is None and still_open:
                # fscrypt's "incompletely locked": the key went while these
                # were open; the list empties as they close
                out["state"] = "incompletely locked"
                out["busy_files"] = sorted(
                    self._busy_names.get(ino) or self.label_of(ino) for ino in still_open
                )
        if node.ino == ROOT_INODE:
            out["mount"] = {
                "backing": self.backing,
                "mountpoint": self.mountpoint,
                "dirty_bytes": self.cache.dirty_bytes_of(),
                "dirty_limit": self.cache.dirty_limit,
                "dirty_expire": self.cache.expire,
                "writeback_cache": self.options.writeback_cache,
                "keys": [
                    {
                        "key": b.description,
                        "serial": b.serial,
                        "dirty_bytes": self.cache.dirty_bytes_of(b.description),
                        "open_files": sum(
                            1 for f in self.cache.files(b.description) if f.users > 0
                        ),
                    }
                    for b in self.keys.bindings()
                ],
            }
        return out

    # ------------------------------------------------------ key going away

    def _in_loop(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the trio thread (or here, if the loop has ended)."""
        token = self.trio_token
        if token is None or threading.get_ident() == self._trio_thread:
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
            else:
                self._key_flushed(binding, going)

    def _key_flushed(self, binding: Binding, going: GoingAway) -> None:
        desc = binding.description
        if self.mounted and not self.closed:
            try:
                syncfs(self.mountpoint)
            except OSError as err:
                log.warning("syncfs %s: %s", self.mountpoint, err)
        total = self.cache.dirty_bytes_of(desc)
        going.report_progress(total, f"{self.mountpoint}: writing back")
        step = [0]

        def progress(done: int) -> None:
            if done - step[0] >= 4 << 20:
                step[0] = done
                going.report_progress(max(0, total - done), f"{self.mountpoint}: writing back")

        try:
            self.cache.flush_key(desc, progress)
            self.cache.close_key(desc)
            self.cache.flush_key(desc)
            for path in self._in_loop(lambda: self._modified_dir_paths(desc)):
                with contextlib.suppress(FileNotFoundError):
                    _fsync_dir(path)
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
        going.report_progress(0, f"{self.mountpoint}: evicting")
        eviction = self._in_loop(lambda: self._evict(binding))
        self._invalidate(eviction)
        if eviction.busy:
            log.warning("%s: incompletely locked, files still open: %s", desc, eviction.busy)
            self.keys.report(
                "busy",
                {
                    "mount": self.mountpoint,
                    "key": desc,
                    "serial": binding.serial,
                    "files": eviction.busy,
                },
            )

    def _key_dropped(self, binding: Binding, going: GoingAway) -> None:
        desc = binding.description
        self.keys.unbind(binding)
        labels = {f.ino: self.label_of(f.ino) for f in self.cache.files(desc)}
        busy, dropped = self.cache.drop_key(desc)
        for ino, lost in dropped.items():
            label = labels.get(ino) or self.label_of(ino)
            going.dropped[label] = going.dropped.get(label, 0) + lost
        if dropped:
            log.warning("%s: emergency removal dropped %s", desc, going.dropped)
        eviction = self._in_loop(lambda: self._evict(binding))
        eviction.busy = [labels.get(ino) or self.label_of(ino) for ino in busy]
        self._invalidate(eviction)
        if eviction.busy:
            self.keys.report(
                "busy",
                {
                    "mount": self.mountpoint,
                    "key": desc,
                    "serial": binding.serial,
                    "files": eviction.busy,
                    "emergency": True,
                },
            )

    def _modified_dir_paths(self, desc: str) -> list[str]:
        out = []
        for ino in list(self._modified_dirs):
            d = self.table.find(ino)
            if d is None or d.policy is None or d.policy.key.description != desc:
                continue
            self._modified_dirs.discard(ino)
            with contextlib.suppress(KeyfenceError):
                out.append(self.table.path(ino))
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
            inode.forget_names()
        for dh in self.dir_handles.values():
            d = self.table.find(dh.ino)
            if d is not None and d.policy is not None and d.policy.key.description == desc:
                dh.entries = None
        out.entries = list(dict.fromkeys(out.entries))
        out.inodes = list(dict.fromkeys(out.inodes))
        return out

    def _invalidate(self, eviction: _Eviction) -> None:
        """Drop the kernel's dentries and pages under an evicted key.

        Runs on the key source's thread: these calls may wait for requests
        the trio thread is serving.
        """
        if not self.mounted or self.closed:
            return
        for parent, name in eviction.entries:
            try:
                pyfuse3.invalidate_entry(InodeT(parent), FileNameT(name))
            except OSError as err:
                if err.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.debug("invalidate entry %d/%r: %s", parent, name, err)
        for ino in eviction.inodes:
            try:
                pyfuse3.invalidate_inode(InodeT(ino))
            except OSError as err:
                if err.errno != errno.ENOENT:
                    log.debug("invalidate inode %d: %s", ino, err)


RENAME_NOREPLACE = int(pyfuse3.RENAME_NOREPLACE)
RENAME_EXCHANGE = int(pyfuse3.RENAME_EXCHANGE)


def _open_rw(path: str) -> int:
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, os.O_RDWR | flags)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        return os.open(path, os.O_RDONLY | flags)


def _write_policy(dir_path: str, policy: Policy, *, sync: bool = False) -> None:
    path = os.path.join(dir_path, POLICY_FILE_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, policy.serialize())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_protectors(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FUSEError(pyfuse3.ENOATTR) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _err(errno.EIO, f"{PROTECTORS_FILE_NAME} is not a regular file")
        data = os.read(fd, MAX_PROTECTORS_SIZE + 1)
    finally:
        os.close(fd)
    try:
        Protectors.parse(data)
    except FormatError as err:
        raise _err(errno.EIO, f"{PROTECTORS_FILE_NAME}: {err}") from None
    return data


def _write_protectors(path: str, value: bytes) -> None:
    """Replace the file atomically (write, fsync, rename, fsync the directory)."""
    try:
        Protectors.parse(value)
    except FormatError as err:
        raise _err(errno.EINVAL, f"not a protectors record: {err}") from None
    tmp = os.path.join(os.path.dirname(path), f"{_TEMP_PREFIX}{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, value)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_encrypted_dir(path: str) -> None:
    """rmdir, where an encrypted directory may hold only its policy and
    stale long-name sidecars (ENOTEMPTY otherwise)."""
    names = os.listdir(path)
    if POLICY_FILE_NAME not in names:
        os.rmdir(path)
        return
    if any(
        not (
            n in (POLICY_FILE_NAME, PROTECTORS_FILE_NAME)
            or is_sidecar_name(n)
            or n.startswith(_TEMP_PREFIX)
        )
        for n in names
    ):
        raise _err(errno.ENOTEMPTY)
    for n in names:
        if n != POLICY_FILE_NAME:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(os.path.join(path, n))
    with open(os.path.join(path, POLICY_FILE_NAME), "rb") as f:
        record = f.read()
    os.unlink(os.path.join(path, POLICY_FILE_NAME))
    try:
        os.rmdir(path)
    except OSError:
        _restore_policy(path, record)
        raise


def _restore_policy(path: str, record: bytes) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(
            os.path.join(path, POLICY_FILE_NAME), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
        )
        try:
            os.write(fd, record)
        finally:
            os.close(fd)
