"""Extended attributes: the backing file's own, and keyfence's three.

:class:`Xattrs` is the half of :class:`~keyfence.fs.ops.KeyfenceOperations`
that answers ``getxattr``, ``setxattr``, ``listxattr`` and ``removexattr``
(docs/fs.md, "Overlay rules"):

* ``user.keyfence.policy``: read, the key reference a directory's contents
  are encrypted with; set on an empty directory (by its owner or root,
  with the key in the caller's keyrings), it encrypts it, as e4crypt's
  ``set_policy``.
* ``user.keyfence.status``: JSON, what ``keyfence status`` shows (locked,
  unlocked or incompletely locked; dirty bytes, open files).
* ``user.keyfence.protectors``: an encrypted directory's
  ``.keyfence-protectors`` record (keyfence.fs.protector), for its owner
  and root; replaced atomically.

None of them is listed (``listxattr``): they are asked for by name, as
``keyfence status`` and ``keyfence e4crypt get_policy`` do, and a tool that
copies every listed attribute (``cp -a``, ``tar --xattrs``) must not copy
them.  Any other ``user.keyfence.`` name is refused (EPERM) or missing; every
other name passes to the backing file, except that ``trusted.*`` names are
listed only to root (the kernel lists them to CAP_SYS_ADMIN alone, and the
worker's own listing, as root, has them all) and that the kernel's
``security.capability`` question before each write is answered from
memory once it is known to be missing (fs/privileges.py).

Threads: the handlers run on the trio thread, as every handler does; the
policy's key lookup and its fsync leave it (``keys.unlock``,
``run_blocking``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError, InodeT, RequestContext, XAttrNameT

from keyfence.errors import fail
from keyfence.fs import acl, wipe
from keyfence.fs import syscalls as sc
from keyfence.fs.binding import KeyBindings
from keyfence.fs.format import (
    DEFAULT_NAME_PADDING,
    DIR_NONCE_SIZE,
    NAME_PADDINGS,
    POLICY_FILE_NAME,
    PROTECTORS_FILE_NAME,
    TEMP_NAME_PREFIX,
    FormatError,
    IntegrityError,
    KeyRef,
    Policy,
)
from keyfence.fs.fuse.dir_attrs import DirectoryAttributes
from keyfence.fs.inodes import ROOT_INODE, Inode, InodeTable
from keyfence.fs.mount_stats import policy_options
from keyfence.fs.op_errors import fuse_op
from keyfence.fs.pagecache import PageCache
from keyfence.fs.privileges import Privileges, in_group
from keyfence.fs.protector import MAX_PROTECTORS_SIZE, Protectors

__all__ = [
    "CAPABILITY_XATTR",
    "POLICY_XATTR",
    "PROTECTORS_XATTR",
    "STATUS_XATTR",
    "XATTR_PREFIX",
    "Xattrs",
    "write_policy",
]

# the operations' own logger: the lines read as they always did
log = logging.getLogger("keyfence.fs.ops")

POLICY_XATTR = b"user.keyfence.policy"
STATUS_XATTR = b"user.keyfence.status"
PROTECTORS_XATTR = b"user.keyfence.protectors"
"""A directory's ``.keyfence-protectors`` (keyfence.fs.protector): owner and root."""
XATTR_PREFIX = b"user.keyfence."
TRUSTED_PREFIX = b"trusted."
"""Names listed only to root (as the kernel: to CAP_SYS_ADMIN)."""
CAPABILITY_XATTR = b"security.capability"
"""Asked by the kernel before every write (to drop file capabilities)."""
_ACL_XATTRS = (acl.ACCESS_XATTR, acl.DEFAULT_XATTR)
_NO_ACLS = (errno.EOPNOTSUPP, errno.ENOTSUP)


class Xattrs:
    """The attribute handlers (a base of KeyfenceOperations).

    The attributes below are the mount's; they are declared here so that
    this half is checked on its own.
    """

    backing: str
    mountpoint: str
    table: InodeTable
    cache: PageCache
    keys: KeyBindings
    privileges: Privileges
    dir_attributes: DirectoryAttributes
    enable_writeback_cache: bool
    _busy_names: dict[int, str]
    label_of: Callable[[int], str]
    log_label: Callable[[int], str]
    nameless_fd: Callable[[Inode], int]
    run_blocking: Callable[..., Awaitable[Any]]

    @fuse_op
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        if name == CAPABILITY_XATTR and self.privileges.has_no_capability(inode):
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
            return json.dumps(
                self.status(node, names=self._owns(node, ctx)), sort_keys=True
            ).encode()
        if name == PROTECTORS_XATTR:
            # tiny file, on the trio thread: the directory descriptor is the table's
            return read_protectors(self._protectors_dir(node, ctx))
        if name.startswith(XATTR_PREFIX):
            raise FUSEError(pyfuse3.ENOATTR)
        try:
            cached = self.cache.get(node.ino) if node.is_reg else None
            if cached is not None and cached.fd >= 0:
                # open anyway: the kernel asks this before every write
                return sc.fgetxattr(cached.fd, bytes(name))
            if (fd := self.nameless_fd(node)) >= 0:
                return sc.fgetxattr(fd, bytes(name))
            return sc.getxattr_at(*self.table.entry(node.ino), bytes(name), node.kind)
        except OSError as err:
            if err.errno == errno.ENODATA and name == CAPABILITY_XATTR:
                self.privileges.found_no_capability(inode)
            if err.errno in _NO_ACLS and name in _ACL_XATTRS:
                # a backing store without ACLs: none, not an error that
                # would fail the kernel's permission check (fs/acl.py)
                raise FUSEError(pyfuse3.ENOATTR) from None
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
            write_protectors(self._protectors_dir(node, ctx), value)
            return
        if name.startswith(XATTR_PREFIX):
            raise fail(errno.EPERM)
        self.privileges.xattrs_changed(inode)
        if (fd := self.nameless_fd(node)) >= 0:
            os.setxattr(fd, bytes(name), bytes(value))
        else:
            sc.setxattr_at(*self.table.entry(node.ino), bytes(name), bytes(value), node.kind)
        if name == acl.ACCESS_XATTR and not node.is_symlink:
            node.group = None  # the mode may have changed with it: stat again
            self._drop_sgid(node, fd, ctx)

    def _drop_sgid(self, node: Inode, fd: int, ctx: RequestContext) -> None:
        """After an access ACL is set: drop the set-group-ID bit if the
        caller is outside the file's group, as ext4 does for such a caller
        (a root worker is none, so the backing store kept it).  Our loop
        has the kernel's word (``SETXATTR_EXT``'s ACL_KILL_SGID, which also
        knows CAP_FSETID); pyfuse3's gives none, and then root keeps it and
        anyone else keeps it only as a member of the group."""
        kill = getattr(ctx, "acl_kill_sgid", None)
        if kill is False:
            return
        entry = self.table.entry(node.ino) if fd < 0 else None
        st = os.fstat(fd) if entry is None else sc.stat_at(*entry)
        if not st.st_mode & stat.S_ISGID:
            return
        if kill is None and (ctx.uid == 0 or in_group(ctx.pid, ctx.gid, st.st_gid)):
            return
        mode = stat.S_IMODE(st.st_mode) & ~stat.S_ISGID
        if entry is None:
            os.fchmod(fd, mode)
        else:
            sc.chmod_at(*entry, mode)

    @fuse_op
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        node = self.table.get(inode)
        if (fd := self.nameless_fd(node)) >= 0:
            names = [XAttrNameT(os.fsencode(n)) for n in os.listxattr(fd)]
        else:
            names = [XAttrNameT(n) for n in sc.listxattr_at(*self.table.entry(node.ino), node.kind)]
        if ctx.uid != 0:
            # the kernel lists trusted.* only to a caller with CAP_SYS_ADMIN;
            # the worker (root, for a root mount) is one, the caller need not be
            names = [n for n in names if not n.startswith(TRUSTED_PREFIX)]
        # user.keyfence.* are answered by name only, never listed (as
        # fscrypt lists nothing): cp -a and tar --xattrs copied them, and a
        # restore into the mount failed to set them (EPERM, ENOTDIR)
        return names

    @fuse_op
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        node = self.table.get(inode)
        if name.startswith(XATTR_PREFIX):
            raise fail(errno.EPERM)
        self.privileges.xattrs_changed(inode)
        if (fd := self.nameless_fd(node)) >= 0:
            os.removexattr(fd, bytes(name))
            return
        sc.removexattr_at(*self.table.entry(node.ino), bytes(name), node.kind)

    async def _set_policy(self, node: Inode, value: bytes, ctx: RequestContext) -> None:
        """setxattr user.keyfence.policy: encrypt an empty directory."""
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        ref, padding = policy_request(value)
        if node.policy_error is not None:
            raise IntegrityError(f"bad encryption policy: {node.policy_error}")
        st = os.fstat(self.table.dir_fd(node.ino))
        if ctx.uid != 0 and ctx.uid != st.st_uid:
            raise fail(errno.EACCES)
        if node.policy is not None:
            # as the kernel: the same policy again is fine, another is EEXIST
            if node.policy.key == ref and padding in (None, node.policy.name_padding):
                return
            raise fail(errno.EEXIST, "the directory already has another policy")
        if sc.listdir_fd(self.table.dir_fd(node.ino)):
            raise fail(errno.ENOTEMPTY)
        master = await self.keys.unlock(ref, ctx.pid)
        if master is None:
            raise fail(errno.ENOKEY, str(ref))
        # bound for another user, the key is not the caller's to give a
        # directory (fscrypt v2's ENOKEY; root may, as CAP_FOWNER there):
        # else a user's own directory under another user's key would
        # decrypt a copy of that user's ciphertext placed in it
        if ctx.uid != 0 and not await self.run_blocking(self.keys.held_by, ref, ctx.pid):
            raise fail(errno.ENOKEY, f"{ref} is not in the caller's keyrings")
        policy = Policy(
            ref, os.urandom(DIR_NONCE_SIZE), name_padding=padding or DEFAULT_NAME_PADDING
        )
        d_fd = self.table.dir_fd(node.ino)
        if sc.listdir_fd(d_fd):  # filled while the key was looked up
            raise fail(errno.ENOTEMPTY)
        try:
            write_policy(d_fd, policy, sync=True)
            fd = sc.open_dir(d_fd, ".")
            try:
                # (nothing is made in the directory meanwhile: the kernel
                # holds its inode lock through the setxattr)
                await self.run_blocking(os.fsync, fd)
            finally:
                os.close(fd)
        except FileExistsError:  # put there behind the mount's back: not ours
            raise
        except BaseException:
            self._unwrite_policy(node)
            raise
        node.policy = policy
        node.policy_error = None
        self.dir_attributes.withdraw(node.ino)  # its names are encrypted from now on
        wipe.release(node.forget_names())
        log.info("%s: encrypted with %s", self.log_label(node.ino), ref)

    def _unwrite_policy(self, node: Inode) -> None:
        """A policy record the backing store did not take (ENOSPC, EIO) is
        removed: else the directory would be plaintext to this mount yet
        not empty (a retry: ENOTEMPTY) and, after a remount, encrypted with
        whatever was written in it meanwhile, or of a bad policy.  The
        directory's descriptor is taken again (the one before an await may
        be closed, its number another directory's)."""
        with contextlib.suppress(OSError):
            sc.unlink_at(self.table.dir_fd(node.ino), POLICY_FILE_NAME)

    def _protectors_dir(self, node: Inode, ctx: RequestContext) -> int:
        """The backing descriptor of an encrypted directory the caller owns (or root)."""
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        if node.policy is None:
            raise FUSEError(pyfuse3.ENOATTR)
        d_fd = self.table.dir_fd(node.ino)
        if ctx.uid != 0 and ctx.uid != os.fstat(d_fd).st_uid:
            raise fail(errno.EACCES)
        return d_fd

    def _owns(self, node: Inode, ctx: RequestContext) -> bool:
        """Whether the caller is root or owns ``node`` (its backing entry)."""
        if ctx.uid == 0:
            return True
        try:
            return ctx.uid == sc.stat_at(*self.table.entry(node.ino)).st_uid
        except OSError:
            return False

    def status(self, node: Inode, *, names: bool = True) -> dict[str, Any]:
        """What ``user.keyfence.status`` shows (JSON).

        ``names``: the caller is root or owns ``node``.  Anyone the kernel
        lets read the inode may ask, so for others it leaves out the
        plaintext paths of files still open after a lock (they may lie in
        directories the caller cannot list) and, at the mount's root, the
        list of keys the mount is bound to; the counts stay.
        """
        policy = self.table.contents_policy(node)
        out: dict[str, Any] = {"encrypted": policy is not None}
        if policy is not None:
            binding = self.keys.get(policy.key)
            out["key"] = policy.key.description
            out["options"] = policy_options(policy)
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
            if binding is None and still_open and names:
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
                "writeback_cache": self.enable_writeback_cache,
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
                ]
                if names
                else [],
            }
        return out


def policy_request(value: bytes) -> tuple[KeyRef, int | None]:
    """A ``user.keyfence.policy`` value being set: ``REF`` or ``REF pad=N``
    (e4crypt's ``-p``; without it a new directory gets the default and an
    encrypted one keeps its own)."""
    words = value.decode("ascii", errors="replace").split()
    try:
        ref = KeyRef.from_description(words[0] if words else "")
    except FormatError:
        raise fail(errno.EINVAL, "a key reference is keyfence:<32 hex> or ext4:<16 hex>") from None
    if len(words) == 1:
        return ref, None
    pad = words[1].removeprefix("pad=")
    if len(words) > 2 or not words[1].startswith("pad=") or pad not in map(str, NAME_PADDINGS):
        raise fail(errno.EINVAL, "a policy is REF or REF pad=4|8|16|32")
    return ref, int(pad)


def write_policy(dir_fd: int, policy: Policy, *, sync: bool = False) -> None:
    sc.write_new(dir_fd, POLICY_FILE_NAME, policy.serialize(), replace=False, sync=sync)


def read_protectors(d_fd: int) -> bytes:
    """The directory's protectors record.  It is the owner's and root's
    only (a login protector costs one scrypt per guess: docs/format.md
    3.1), on the backing store too: one written readable to others (0644,
    before 2026-12-07) is made 0600 as it is read."""
    data = sc.read_small(d_fd, PROTECTORS_FILE_NAME, MAX_PROTECTORS_SIZE + 1, inspect=_owner_only)
    if data is None:
        raise FUSEError(pyfuse3.ENOATTR)
    try:
        Protectors.parse(data)
    except FormatError as err:
        raise fail(errno.EIO, f"{PROTECTORS_FILE_NAME}: {err}") from None
    return data


def _owner_only(fd: int, st: os.stat_result) -> None:
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.fchmod(fd, 0o600)


def write_protectors(d_fd: int, value: bytes) -> None:
    """Replace the file atomically (write, fsync, rename, fsync the directory)."""
    try:
        Protectors.parse(value)
    except FormatError as err:
        raise fail(errno.EINVAL, f"not a protectors record: {err}") from None
    tmp = f"{TEMP_NAME_PREFIX}{secrets.token_hex(8)}"
    sc.write_new(d_fd, tmp, value, replace=False, sync=True, mode=0o600)
    try:
        sc.rename_at(d_fd, tmp, d_fd, PROTECTORS_FILE_NAME)
    except OSError:
        with contextlib.suppress(OSError):
            sc.unlink_at(d_fd, tmp)
        raise
    sc.fsync_dir(d_fd)
