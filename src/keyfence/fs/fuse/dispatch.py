"""From FUSE requests to the filesystem's handlers and back.

:class:`Dispatcher` holds one coroutine function per opcode: it decodes the
request's body (``fuse.h`` structures, :mod:`.protocol`), awaits the
handler of a ``pyfuse3.Operations``-shaped object (keyfence's
:class:`~keyfence.fs.ops.KeyfenceOperations`, unchanged: the same
arguments, the same return values, ``FUSEError`` for an errno) and encodes
its answer.  It does no I/O of its own: the session (:mod:`.session`)
reads, drives the coroutines and writes.

An answer is ``bytes`` (or a list of buffers, written with one
``writev``); ``None`` means no answer (``FORGET``).  A malformed body
raises :class:`Malformed` and is answered EIO.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pyfuse3 import FUSEError

from keyfence.fs import wipe
from keyfence.fs.fuse import protocol as p

__all__ = ["Answer", "Caller", "DirBuffer", "Dispatcher", "Malformed", "error_code"]

Answer = bytes | list[Any] | None
Handler = Callable[[int, "Caller", memoryview], Awaitable[Answer]]

_NS = 1_000_000_000


class Malformed(Exception):
    """A request whose body does not hold what its opcode needs."""


def error_code(unique: int, opcode: int, err: BaseException, log: Any) -> int:
    """The errno a handler's exception answers with (logged unless it is a
    ``FUSEError``): its own, EIO for a malformed request or a bug.
    KeyboardInterrupt and SystemExit are raised again: not ours to swallow."""
    if isinstance(err, FUSEError):
        code = int(err.errno)
        return code if 0 < code <= p.ERRNO_MAX else errno.EIO
    if isinstance(err, (Malformed, ValueError, IndexError)) or (
        type(err).__name__ == "error" and type(err).__module__ == "struct"
    ):
        log.error("request %d (opcode %d) malformed: %s", unique, opcode, err)
        return errno.EIO
    if isinstance(err, Exception):
        log.error("request %d (opcode %d) failed", unique, opcode, exc_info=err)
        return errno.EIO
    raise err


class Caller:
    """Who asked (``pyfuse3.RequestContext``'s fields)."""

    __slots__ = ("acl_kill_sgid", "gid", "pid", "uid", "umask")

    def __init__(self, uid: int, gid: int, pid: int, umask: int = 0) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.umask = umask
        self.acl_kill_sgid: bool | None = None
        """SETXATTR with ``SETXATTR_EXT``: whether the caller is outside the
        file's group (drops set-group-ID with an access ACL, fs/acl.py);
        None: the kernel did not say."""


class SetattrFields:
    """Which attributes a SETATTR changes (``pyfuse3.SetattrFields``' fields)."""

    __slots__ = (
        "kill_suidgid",
        "update_atime",
        "update_ctime",
        "update_gid",
        "update_mode",
        "update_mtime",
        "update_size",
        "update_uid",
    )

    def __init__(self, valid: int) -> None:
        self.kill_suidgid = bool(valid & p.FATTR_KILL_SUIDGID)
        self.update_atime = bool(valid & (p.FATTR_ATIME | p.FATTR_ATIME_NOW))
        self.update_mtime = bool(valid & (p.FATTR_MTIME | p.FATTR_MTIME_NOW))
        self.update_ctime = bool(valid & p.FATTR_CTIME)
        self.update_mode = bool(valid & p.FATTR_MODE)
        self.update_uid = bool(valid & p.FATTR_UID)
        self.update_gid = bool(valid & p.FATTR_GID)
        self.update_size = bool(valid & p.FATTR_SIZE)


class NewAttributes:
    """The values a SETATTR asks for (the fields of ``EntryAttributes`` the
    handler reads)."""

    __slots__ = (
        "st_atime_ns",
        "st_ctime_ns",
        "st_gid",
        "st_mode",
        "st_mtime_ns",
        "st_size",
        "st_uid",
    )

    def __init__(self, body: memoryview) -> None:
        (
            valid, _pad, _fh, size, _owner, atime, mtime, ctime,
            atimensec, mtimensec, ctimensec, mode, _u4, uid, gid, _u5,
        ) = p.SETATTR_IN.unpack_from(body)  # fmt: skip
        now = time.time_ns() if valid & (p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW) else 0
        self.st_size = size
        self.st_mode = mode
        self.st_uid = uid
        self.st_gid = gid
        self.st_atime_ns = now if valid & p.FATTR_ATIME_NOW else atime * _NS + atimensec
        self.st_mtime_ns = now if valid & p.FATTR_MTIME_NOW else mtime * _NS + mtimensec
        self.st_ctime_ns = ctime * _NS + ctimensec


def _seconds(t: float) -> tuple[int, int]:
    whole = int(t)
    return whole, int((t - whole) * _NS)


def attr_bytes(a: Any) -> bytes:
    """fuse_attr of an ``EntryAttributes``."""
    at, mt, ct = a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns
    return p.ATTR.pack(
        a.st_ino, a.st_size, a.st_blocks, at // _NS, mt // _NS, ct // _NS,
        at % _NS, mt % _NS, ct % _NS, a.st_mode, a.st_nlink, a.st_uid, a.st_gid,
        a.st_rdev & 0xFFFFFFFF, a.st_blksize, 0,
    )  # fmt: skip


def entry_bytes(a: Any) -> bytes:
    """fuse_entry_out of an ``EntryAttributes``."""
    entry_s, entry_ns = _seconds(a.entry_timeout)
    attr_s, attr_ns = _seconds(a.attr_timeout)
    head = p.ENTRY_OUT.pack(a.st_ino, a.generation, entry_s, attr_s, entry_ns, attr_ns)
    return head + attr_bytes(a)


def attr_out_bytes(a: Any) -> bytes:
    attr_s, attr_ns = _seconds(a.attr_timeout)
    return p.ATTR_OUT.pack(attr_s, attr_ns, 0) + attr_bytes(a)


def open_out_bytes(fi: Any, noflush: bool = False) -> bytes:
    flags = p.FOPEN_DIRECT_IO if fi.direct_io else 0
    flags |= p.FOPEN_KEEP_CACHE if fi.keep_cache else 0
    flags |= p.FOPEN_NONSEEKABLE if fi.nonseekable else 0
    flags |= p.FOPEN_NOFLUSH if noflush else 0
    return p.OPEN_OUT.pack(fi.fh, flags, 0)


_PLUS_HEAD = struct.Struct(
    "=" + p.ENTRY_OUT.format.lstrip("=") + p.ATTR.format.lstrip("=") + p.DIRENT.format.lstrip("=")
)
"""fuse_direntplus without its name: fuse_entry_out (with fuse_attr) and fuse_dirent."""


class _ZeroedWhenFreed(bytearray):
    """A READDIR answer's buffer: zeroed when the last reference goes, after
    the answer was written (whichever way: fs/fuse/_loop.c, the session or
    an io_uring entry, which copy it), not freed with the names still in it
    (an encrypted directory's listing is its plaintext names)."""

    __slots__ = ()

    def __del__(self) -> None:
        wipe.zero(self)


class DirBuffer:
    """The ``token`` of a READDIR(PLUS): entries until ``size`` bytes.

    The entries are packed in place into one buffer of ``size`` bytes,
    made at the first entry (no intermediate ``bytes`` of a name is left
    behind), and zeroed once the answer is written (:class:`_ZeroedWhenFreed`).
    """

    __slots__ = ("buffer", "plus", "size", "used")

    def __init__(self, size: int, plus: bool) -> None:
        self.size = size
        self.plus = plus
        self.used = 0
        self.buffer: bytearray | None = None

    @property
    def parts(self) -> list[memoryview]:
        """The answer: the entries added, one buffer (none without an entry)."""
        if self.buffer is None:
            return []
        return [memoryview(self.buffer)[: self.used]]

    def add(self, name: bytes, attrs: Any, next_id: int) -> bool:
        """Add one entry; False (and nothing added) when it does not fit."""
        n = len(name)
        dirent = p.DIRENT.size + n
        total = (dirent + 7) & ~7
        if self.plus:
            total += _PLUS_HEAD.size - p.DIRENT.size
        at = self.used
        if at + total > self.size:
            return False
        buf = self.buffer
        if buf is None:
            buf = self.buffer = _ZeroedWhenFreed(self.size)  # zeros: the padding
        kind = stat.S_IFMT(attrs.st_mode) >> 12
        if self.plus:  # entry_out and the dirent in one pack: one per entry of a listing
            a = attrs
            entry_s, entry_ns = _seconds(a.entry_timeout)
            attr_s, attr_ns = _seconds(a.attr_timeout)
            at_, mt, ct = a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns
            _PLUS_HEAD.pack_into(
                buf, at,
                a.st_ino, a.generation, entry_s, attr_s, entry_ns, attr_ns,
                a.st_ino, a.st_size, a.st_blocks, at_ // _NS, mt // _NS, ct // _NS,
                at_ % _NS, mt % _NS, ct % _NS, a.st_mode, a.st_nlink, a.st_uid, a.st_gid,
                a.st_rdev & 0xFFFFFFFF, a.st_blksize, 0,
                a.st_ino, next_id, n, kind,
            )  # fmt: skip
            start = at + _PLUS_HEAD.size
        else:
            p.DIRENT.pack_into(buf, at, attrs.st_ino, next_id, n, kind)
            start = at + p.DIRENT.size
        buf[start : start + n] = name
        self.used = at + total
        return True


def _name(body: memoryview, start: int = 0) -> bytes:
    """The NUL-terminated name at ``start`` (the copy it is cut from zeroed:
    a name in an encrypted directory is plaintext)."""
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    name = raw[:end] if end > 0 else b""
    wipe.zero(raw)  # ours alone: made just above
    if not name:
        raise Malformed("no name")
    return name


def _two_names(body: memoryview, start: int) -> tuple[bytes, bytes]:
    raw = bytes(body[start:])
    parts = raw.split(b"\0")
    wipe.zero(raw)  # ours alone: made just above
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise Malformed("two names expected")
    return parts[0], parts[1]


def _xattr_answer(value: bytes, size: int) -> bytes:
    if size == 0:
        return p.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FUSEError(errno.ERANGE)
    return value


class Dispatcher:
    """One coroutine function per opcode over ``ops`` (see module doc)."""

    def __init__(self, ops: Any) -> None:
        self.ops = ops
        self.noflush_read_only = bool(getattr(ops, "read_only_opens_skip_flush", False))
        """``ops`` has nothing to do at the close of a read-only descriptor:
        such opens answer ``FOPEN_NOFLUSH`` and close(2) sends no FLUSH."""
        self.setxattr_ext = False
        """INIT granted ``SETXATTR_EXT``: SETXATTR's header is 16 bytes."""

    def table(self) -> dict[int, Handler]:
        """The handler of each opcode ``ops`` serves; the loop answers any
        other ENOSYS (and the kernel then stops asking)."""
        table = self._table()
        if not callable(getattr(self.ops, "fallocate", None)):
            del table[p.FALLOCATE]  # pyfuse3.Operations has no such method
        return table

    def _table(self) -> dict[int, Handler]:
        return {
            p.LOOKUP: self.lookup,
            p.FORGET: self.forget,
            p.BATCH_FORGET: self.batch_forget,
            p.GETATTR: self.getattr,
            p.SETATTR: self.setattr,
            p.READLINK: self.readlink,
            p.SYMLINK: self.symlink,
            p.MKNOD: self.mknod,
            p.MKDIR: self.mkdir,
            p.UNLINK: self.unlink,
            p.RMDIR: self.rmdir,
            p.RENAME: self.rename,
            p.RENAME2: self.rename2,
            p.LINK: self.link,
            p.OPEN: self.open,
            p.READ: self.read,
            p.WRITE: self.write,
            p.STATFS: self.statfs,
            p.RELEASE: self.release,
            p.FSYNC: self.fsync,
            p.FALLOCATE: self.fallocate,
            p.SETXATTR: self.setxattr,
            p.GETXATTR: self.getxattr,
            p.LISTXATTR: self.listxattr,
            p.REMOVEXATTR: self.removexattr,
            p.FLUSH: self.flush,
            p.OPENDIR: self.opendir,
            p.READDIR: self.readdir,
            p.READDIRPLUS: self.readdirplus,
            p.RELEASEDIR: self.releasedir,
            p.FSYNCDIR: self.fsyncdir,
            p.ACCESS: self.access,
            p.CREATE: self.create,
            p.DESTROY: self.destroy,
        }

    # -- names and attributes

    async def lookup(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        return entry_bytes(await self.ops.lookup(nodeid, _name(body), caller))

    async def forget(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        (nlookup,) = p.FORGET_IN.unpack_from(body)
        await self.ops.forget([(nodeid, nlookup)])
        return None

    async def batch_forget(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        (count, _) = p.BATCH_FORGET_IN.unpack_from(body)
        if p.BATCH_FORGET_IN.size + count * p.FORGET_ONE.size > len(body):
            raise Malformed("batch_forget: count beyond the request")
        items = list(p.FORGET_ONE.iter_unpack(body[p.BATCH_FORGET_IN.size :]))[:count]
        await self.ops.forget(items)
        return None

    async def getattr(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        return attr_out_bytes(await self.ops.getattr(nodeid, caller))

    async def setattr(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        valid, _, fh = struct.unpack_from("=IIQ", body)
        attrs = await self.ops.setattr(
            nodeid,
            NewAttributes(body),
            SetattrFields(valid),
            fh if valid & p.FATTR_FH else None,
            caller,
        )
        return attr_out_bytes(attrs)

    async def readlink(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        return bytes(await self.ops.readlink(nodeid, caller))

    async def symlink(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        name, target = _two_names(body, 0)
        return entry_bytes(await self.ops.symlink(nodeid, name, target, caller))

    async def mknod(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        mode, rdev, umask, _ = p.MKNOD_IN.unpack_from(body)
        caller.umask = umask
        name = _name(body, p.MKNOD_IN.size)
        return entry_bytes(await self.ops.mknod(nodeid, name, mode, rdev, caller))

    async def mkdir(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        mode, umask = p.MKDIR_IN.unpack_from(body)
        caller.umask = umask
        name = _name(body, p.MKDIR_IN.size)
        return entry_bytes(await self.ops.mkdir(nodeid, name, mode, caller))

    async def unlink(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        await self.ops.unlink(nodeid, _name(body), caller)
        return b""

    async def rmdir(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        await self.ops.rmdir(nodeid, _name(body), caller)
        return b""

    async def rename(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        (newdir,) = p.RENAME_IN.unpack_from(body)
        old, new = _two_names(body, p.RENAME_IN.size)
        await self.ops.rename(nodeid, old, newdir, new, 0, caller)
        return b""

    async def rename2(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        newdir, flags, _ = p.RENAME2_IN.unpack_from(body)
        old, new = _two_names(body, p.RENAME2_IN.size)
        await self.ops.rename(nodeid, old, newdir, new, flags, caller)
        return b""

    async def link(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        (old,) = p.LINK_IN.unpack_from(body)
        name = _name(body, p.LINK_IN.size)
        return entry_bytes(await self.ops.link(old, nodeid, name, caller))

    # -- files

    async def open(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        flags, open_flags = p.OPEN_IN.unpack_from(body)
        noflush = self.noflush_read_only and flags & os.O_ACCMODE == os.O_RDONLY
        if open_flags & p.OPEN_KILL_SUIDGID:  # only with HANDLE_KILLPRIV_V2
            return open_out_bytes(await self.ops.open(nodeid, flags, caller, True), noflush)
        return open_out_bytes(await self.ops.open(nodeid, flags, caller), noflush)

    async def create(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        flags, mode, umask, _ = p.CREATE_IN.unpack_from(body)
        caller.umask = umask
        name = _name(body, p.CREATE_IN.size)
        fi, attrs = await self.ops.create(nodeid, name, mode, flags, caller)
        return entry_bytes(attrs) + open_out_bytes(fi)

    async def read(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        return [await self.ops.read(fh, offset, size)]

    async def write(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        fh, offset, size, write_flags, *_ = p.WRITE_IN.unpack_from(body)
        data = body[p.WRITE_IN.size : p.WRITE_IN.size + size]
        if len(data) != size:
            raise Malformed("write: fewer bytes than announced")
        if write_flags & p.WRITE_KILL_SUIDGID:  # only with HANDLE_KILLPRIV_V2
            done = await self.ops.write(fh, offset, data, True)
        else:
            done = await self.ops.write(fh, offset, data)
        return p.WRITE_OUT.pack(done, 0)

    async def flush(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        (fh,) = p.FH_IN.unpack_from(body)
        await self.ops.flush(fh)
        return b""

    async def release(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        (fh,) = p.FH_IN.unpack_from(body)
        await self.ops.release(fh)
        return b""

    async def fsync(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        fh, flags, _ = p.FSYNC_IN.unpack_from(body)
        await self.ops.fsync(fh, bool(flags & p.FSYNC_FDATASYNC))
        return b""

    async def fallocate(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(body)
        await self.ops.fallocate(fh, offset, length, mode, caller)
        return b""

    async def statfs(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        s = await self.ops.statfs(caller)
        return p.KSTATFS.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
            s.f_bsize, s.f_namemax, s.f_frsize, 0,
        )  # fmt: skip

    # -- directories

    async def opendir(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        fh = await self.ops.opendir(nodeid, caller)
        return p.OPEN_OUT.pack(fh, 0, 0)

    async def _list(self, caller: Caller, body: memoryview, plus: bool) -> Answer:
        fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        token = DirBuffer(size, plus)
        await self.ops.readdir(fh, offset, token, caller.pid)
        return token.parts

    async def readdir(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        return await self._list(caller, body, plus=False)

    async def readdirplus(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        return await self._list(caller, body, plus=True)

    async def releasedir(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        (fh,) = p.FH_IN.unpack_from(body)
        await self.ops.releasedir(fh)
        return b""

    async def fsyncdir(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        fh, flags, _ = p.FSYNC_IN.unpack_from(body)
        await self.ops.fsyncdir(fh, bool(flags & p.FSYNC_FDATASYNC))
        return b""

    # -- extended attributes

    async def setxattr(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        if self.setxattr_ext:
            size, flags, setxattr_flags, _ = p.SETXATTR_EXT_IN.unpack_from(body)
            caller.acl_kill_sgid = bool(setxattr_flags & p.SETXATTR_ACL_KILL_SGID)
            header = p.SETXATTR_EXT_IN.size
        else:
            size, flags = p.SETXATTR_IN.unpack_from(body)
            header = p.SETXATTR_IN.size
        name = _name(body, header)
        start = header + len(name) + 1
        value = bytes(body[start : start + size])
        if len(value) != size:
            raise Malformed("setxattr: fewer bytes than announced")
        if flags & ~(p.XATTR_CREATE | p.XATTR_REPLACE):
            raise FUSEError(errno.EINVAL)
        if flags:  # CREATE: must not exist yet; REPLACE: must (both: ENODATA first, as ext4)
            try:
                await self.ops.getxattr(nodeid, name, caller)
            except FUSEError as err:
                if err.errno != errno.ENODATA or flags & p.XATTR_REPLACE:
                    raise
            else:
                if flags & p.XATTR_CREATE:
                    raise FUSEError(errno.EEXIST)
        await self.ops.setxattr(nodeid, name, value, caller)
        return b""

    async def getxattr(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        name = _name(body, p.GETXATTR_IN.size)
        value = await self.ops.getxattr(nodeid, name, caller)
        return _xattr_answer(bytes(value), size)

    async def listxattr(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        names = await self.ops.listxattr(nodeid, caller)
        return _xattr_answer(b"".join(bytes(n) + b"\0" for n in names), size)

    async def removexattr(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        await self.ops.removexattr(nodeid, _name(body), caller)
        return b""

    # -- the rest

    async def access(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        mask, _ = p.ACCESS_IN.unpack_from(body)
        if not await self.ops.access(nodeid, mask, caller):
            raise FUSEError(errno.EACCES)
        return b""

    async def destroy(self, nodeid: int, caller: Caller, body: memoryview) -> Answer:
        return b""
