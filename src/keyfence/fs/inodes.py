"""The mount's inode table: FUSE inode numbers, backing locations, policies.

FUSE inode numbers are the backing files' ``st_ino`` (the backing root is
swapped with inode 1, which FUSE reserves for the root), so hard links are
one inode and numbers survive a remount.  The table keeps, for every inode
the kernel knows (lookup count above zero), its links as (parent inode,
backing name) pairs.

No backing path is ever resolved (docs/security.md): a directory is held
by an ``O_PATH`` descriptor, opened one name at a time below its parent's
descriptor without following symlinks (:mod:`keyfence.fs.syscalls`), and
checked to be the inode the table expects.  Everything else is named as
(its directory's descriptor, its name).  A descriptor follows its
directory through renames, so nothing is re-resolved when a directory
moves, and depth is unlimited (no PATH_MAX).  Descriptors are kept while
the kernel knows the directory, up to a cap (least recently used closed
first); above it a directory is opened again from its nearest held
ancestor.  Rule for callers: a descriptor from :meth:`InodeTable.dir_fd`
is used before the next ``await`` (another request may close it then),
and at most a few are taken in one step (the cap is far above that).

Encryption is inherited as in fscrypt: a directory inside an encrypted
directory must have its own policy record.  One without (deleted offline:
a downgrade) gets a ``policy_error`` and every request on it fails with
EIO; it never passes through as plaintext.

Directories carry their policy (read from ``.keyfence-policy`` when the
directory is first seen) and, while their key is bound, their
:class:`~keyfence.fs.crypto.DirectoryCipher` and the names decrypted so
far in both directions.  Everything here is used from the trio thread; the
key-removal callback reads it (paths for reports) without changing it, and
changes it only through the trio loop (docs/fs.md).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator

from keyfence import fdtable
from keyfence.errors import KeyfenceError
from keyfence.fs import syscalls, wipe
from keyfence.fs.crypto import DirectoryCipher, EncryptedName
from keyfence.fs.format import (
    POLICY_FILE_NAME,
    POLICY_PADDED_SIZE,
    FormatError,
    Policy,
)

__all__ = ["ROOT_INODE", "Inode", "InodeTable", "read_policy"]

log = logging.getLogger("keyfence.fs.inodes")

ROOT_INODE = 1


def read_policy(dir_fd: int) -> Policy | None:
    """The policy of a backing directory (a descriptor of it), None if it
    is not encrypted.  A malformed record raises :class:`FormatError`, and
    so does one this mount cannot have written: the worker writes records
    as itself and never links them twice, so one owned by another uid than
    the worker's or root's, or with a second link, was put there through
    the backing store.  A key reference is no secret (anyone who may list
    the directory reads it), so on a shared mount a user who can write its
    own part of the backing store would otherwise copy another user's
    record into a directory of its own, and the mount, once that user's
    key is in, would decrypt whatever ciphertext of theirs it copied there
    (docs/security.md, actor 3)."""
    data = syscalls.read_small(
        dir_fd, POLICY_FILE_NAME, POLICY_PADDED_SIZE + 1, inspect=_written_by_this_mount
    )
    return None if data is None else Policy.parse(data)


def _written_by_this_mount(fd: int, st: os.stat_result) -> None:
    if st.st_uid not in (0, os.geteuid()) or st.st_nlink != 1:
        raise FormatError(
            f"{POLICY_FILE_NAME} of uid {st.st_uid} with {st.st_nlink} link(s):"
            " not written by this mount (planted in the backing store?)"
        )


def _dir_fd_cap() -> int:
    """How many directory descriptors the table keeps open: a quarter of
    the descriptor limit, raised to the hard limit first."""
    return max(64, fdtable.raise_limit() // 4)


class Inode:
    """One inode the kernel knows."""

    __slots__ = (
        "bad_names",
        "cipher",
        "contents",
        "disk_names",
        "fd",
        "group",
        "ino",
        "kind",
        "last_stat",
        "links",
        "lookups",
        "plain_names",
        "policy",
        "policy_error",
    )

    def __init__(self, ino: int, kind: int) -> None:
        self.ino = ino
        self.kind = kind
        """``stat.S_IFMT`` of the backing file."""
        self.fd = -1
        """Directories: an ``O_PATH`` descriptor while held (see the module)."""
        self.links: dict[tuple[int, str], None] = {}
        """(parent inode, backing name), in the order they were seen."""
        self.lookups = 0
        self.policy: Policy | None = None
        """Directories: their own policy (None: not encrypted)."""
        self.policy_error: str | None = None
        self.contents: Policy | None = None
        """Non-directories: the policy of the directory they were found in
        (kept after the last name goes: an open unlinked file stays
        encrypted)."""
        self.cipher: DirectoryCipher | None = None
        """Directories while their key is bound."""
        self.plain_names: dict[str, bytes] = {}
        """Backing name -> plaintext name (while the key is bound)."""
        self.disk_names: dict[bytes, EncryptedName] = {}
        """Plaintext name -> backing name (while the key is bound)."""
        self.bad_names: set[str] = set()
        """Short backing names that failed authentication under the bound
        key (planted: a name decrypts the same way every time), so a
        listing does not try them again (while the key is bound)."""
        self.last_stat: os.stat_result | None = None
        """Non-directories whose last name went (unlink, rename over): their
        attributes then, with no links.  A fifo, socket, device or symlink
        still open (or held by ``O_PATH``) has no backing descriptor to
        fstat, and its GETATTR is answered from these."""
        self.group: tuple[bool, int] | None = None
        """Directories: (set-group-ID, gid) of the backing directory as last
        stat'ed, which decide the group of new entries (POSIX), or None.
        Refreshed by every GETATTR: the kernel sends one before a create
        whenever the directory changed or its attributes timed out, so this
        is never older than the kernel's own view of the directory."""

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.kind == stat.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.kind == stat.S_IFLNK

    def forget_names(self) -> list[object]:
        """Drop the names and the cipher; what was dropped, for the caller
        to zero once nothing else uses it (fs/wipe.py)."""
        spent: list[object] = [*self.plain_names.values(), self.cipher]
        self.cipher = None
        self.plain_names.clear()
        self.disk_names.clear()
        self.bad_names.clear()
        return spent

    def remember_name(self, enc: EncryptedName, plain: bytes) -> None:
        if len(self.plain_names) > 100_000:  # a huge directory: keep memory bounded
            spent = list(self.plain_names.values())
            self.plain_names.clear()
            self.disk_names.clear()
            wipe.release(spent)
        self.plain_names[enc.disk_name] = plain
        self.disk_names[plain] = enc

    def forget_name(self, disk: str) -> None:
        """The entry ``disk`` went (unlink, rename): its plaintext name is
        zeroed unless something still uses it (a listing in progress, the
        request that renamed it)."""
        spent = []
        plain = self.plain_names.pop(disk, None)
        if plain is not None:
            self.disk_names.pop(plain, None)
            spent.append(plain)
        del plain
        wipe.release(spent)

    def __repr__(self) -> str:
        return f"Inode({self.ino}, kind={self.kind:o}, links={list(self.links)})"


class InodeTable:
    """Inode number -> :class:`Inode`, and the backing location of each."""

    def __init__(self, root: str, *, root_fd: int | None = None) -> None:
        """``root``: the backing directory, given by the daemon as an absolute
        path (its last component must not be a symlink) or already opened
        (``root_fd``, an ``O_PATH`` or read descriptor; the table dups it)."""
        self.root = os.path.abspath(root)
        if root_fd is None:
            fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        else:
            fd = os.dup(root_fd)
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise KeyfenceError(errno.ENOTDIR, f"backing {self.root} is not a directory")
        self.root_fd = fd
        self.root_st_ino = st.st_ino
        self.root_dev = st.st_dev
        self._inodes: dict[int, Inode] = {}
        self._children: dict[int, dict[str, int]] = {}
        """parent inode -> {backing name: inode} for every known link."""
        self._held: OrderedDict[int, None] = OrderedDict()
        """Directories holding a descriptor, least recently used first."""
        self.fd_cap = _dir_fd_cap()
        root_inode = Inode(ROOT_INODE, stat.S_IFDIR)
        root_inode.lookups = 1
        root_inode.fd = fd
        self._inodes[ROOT_INODE] = root_inode
        self._load_policy(root_inode, None)

    def close(self) -> None:
        """Close every descriptor (the mount is over)."""
        for ino in list(self._held):
            self._release_fd(self._inodes[ino])
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # ----------------------------------------------------------- numbering

    def fuse_ino(self, st_ino: int) -> int:
        """The FUSE inode number of a backing inode number."""
        if st_ino == self.root_st_ino:
            return ROOT_INODE
        if st_ino == ROOT_INODE:
            return self.root_st_ino
        return st_ino

    # ------------------------------------------------------------- lookups

    def get(self, ino: int) -> Inode:
        try:
            return self._inodes[ino]
        except KeyError:
            raise KeyfenceError(errno.ESTALE, f"inode {ino} is not known") from None

    def find(self, ino: int) -> Inode | None:
        return self._inodes.get(ino)

    def __iter__(self) -> Iterator[Inode]:
        return iter(list(self._inodes.values()))

    def __len__(self) -> int:
        return len(self._inodes)

    def name_of(self, ino: int) -> tuple[int, str]:
        """(parent inode, backing name) of an inode's first link."""
        inode = self._inodes.get(ino)
        if inode is None or not inode.links:
            raise KeyfenceError(errno.ESTALE, f"inode {ino} has no name")
        return next(iter(inode.links))

    def dir_fd(self, ino: int) -> int:
        """An ``O_PATH`` descriptor of a known directory (see the module for
        how long it may be used).  ESTALE if the backing entry is gone or is
        no longer that directory."""
        inode = self._inodes.get(ino)
        if inode is None:
            raise KeyfenceError(errno.ESTALE, f"inode {ino} is not known")
        if inode.fd >= 0:
            if ino != ROOT_INODE:
                self._held.move_to_end(ino)
            return inode.fd
        if not inode.is_dir:
            raise KeyfenceError(errno.ENOTDIR)
        # walk up to the nearest held ancestor, then open down one name at a
        # time; the directories in between are opened and closed again
        chain: list[str] = []
        at = inode
        while at.fd < 0:
            parent, name = self.name_of(at.ino)
            chain.append(name)
            up = self._inodes.get(parent)
            if up is None or len(chain) > len(self._inodes):
                raise KeyfenceError(errno.ESTALE, f"inode {ino} has no path to the root")
            at = up
        fd = at.fd
        for depth, name in enumerate(reversed(chain)):
            try:
                child = syscalls.open_dir(fd, name, os.O_PATH)
            finally:
                if depth > 0:
                    os.close(fd)
            fd = child
        st = os.fstat(fd)
        if self.fuse_ino(st.st_ino) != ino or not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            log.warning("directory inode %d: its backing entry was replaced", ino)
            raise KeyfenceError(errno.ESTALE, f"inode {ino} was replaced")
        self._hold_fd(inode, fd)
        return fd

    def entry(self, ino: int) -> tuple[int, str]:
        """(directory descriptor, name) naming an inode for the ``*at`` calls:
        a directory is (its own descriptor, ``"."``), exactly the directory
        held; anything else is (its parent's descriptor, its first name)."""
        inode = self._inodes.get(ino)
        if inode is None:
            raise KeyfenceError(errno.ESTALE, f"inode {ino} is not known")
        if inode.is_dir:
            return self.dir_fd(ino), "."
        parent, name = self.name_of(ino)
        return self.dir_fd(parent), name

    def _hold_fd(self, inode: Inode, fd: int) -> None:
        inode.fd = fd
        self._held[inode.ino] = None
        while len(self._held) > self.fd_cap:
            oldest = next(iter(self._held))
            self._release_fd(self._inodes[oldest])

    def _release_fd(self, inode: Inode) -> None:
        if inode.fd >= 0 and inode.ino != ROOT_INODE:
            self._held.pop(inode.ino, None)
            os.close(inode.fd)
            inode.fd = -1

    def parent_of(self, ino: int) -> int:
        inode = self._inodes.get(ino)
        if inode is None or not inode.links:
            return ROOT_INODE
        return next(iter(inode.links))[0]

    def parents(self, ino: int) -> list[int]:
        inode = self._inodes.get(ino)
        return [] if inode is None else list(dict.fromkeys(p for p, _ in inode.links))

    def contents_policy(self, inode: Inode) -> Policy | None:
        """The policy that encrypts this inode's contents or target.

        A directory's own; for anything else its parent directory's.
        """
        if inode.is_dir:
            return inode.policy
        for parent, _ in inode.links:
            p = self._inodes.get(parent)
            if p is not None:
                return p.policy
        return inode.contents

    # ------------------------------------------------------------- changes

    def _load_policy(self, inode: Inode, parent: Inode | None) -> None:
        """Read a directory's policy; an error if it should have one and
        has none (its parent is encrypted: fscrypt's inheritance)."""
        inode.policy = None
        inode.policy_error = None
        try:
            inode.policy = read_policy(self.dir_fd(inode.ino))
        except FormatError as err:
            inode.policy_error = str(err)
            log.error("directory inode %d: bad encryption policy: %s", inode.ino, err)
        except OSError as err:
            inode.policy_error = os.strerror(err.errno or errno.EIO)
            log.error("directory inode %d: cannot read encryption policy: %s", inode.ino, err)
        if (
            inode.policy is None
            and inode.policy_error is None
            and parent is not None
            and (parent.policy is not None or parent.policy_error is not None)
        ):
            inode.policy_error = "no policy record inside an encrypted directory"
            log.error(
                "directory inode %d in encrypted directory inode %d has no %s:"
                " refused (deleted offline? it is not served as plaintext)",
                inode.ino,
                parent.ino,
                POLICY_FILE_NAME,
            )

    def remember(
        self,
        parent: int,
        name: str,
        st: os.stat_result,
        *,
        count: bool = True,
        made_dir: tuple[int, Policy | None] | None = None,
    ) -> Inode:
        """Record that ``name`` in ``parent`` is ``st`` (a lookup, if ``count``).

        ``made_dir``: ``name`` is a directory the worker has just made, as
        (an ``O_PATH`` descriptor of it, which the table now owns, the
        policy written into it or None): nothing to open or read back.
        EXDEV for a mount point of another filesystem: inode numbers are
        the backing filesystem's, and so is the lock's syncfs."""
        if st.st_dev != self.root_dev:
            if made_dir is not None:
                os.close(made_dir[0])
            raise KeyfenceError(errno.EXDEV, "another filesystem is mounted here")
        ino = self.fuse_ino(st.st_ino)
        kind = stat.S_IFMT(st.st_mode)
        inode = self._inodes.get(ino)
        if inode is None or inode.kind != kind:
            if inode is not None:
                log.debug("inode %d was reused for another kind of file", ino)
                self._drop_links(inode)
                self._release_fd(inode)
            inode = Inode(ino, kind)
            self._inodes[ino] = inode
            if inode.is_dir:
                self._add_link(inode, parent, name)
                if made_dir is None:
                    self._load_policy(inode, self._inodes.get(parent))
        if made_dir is not None:
            fd, inode.policy = made_dir
            inode.policy_error = None
            if inode.fd >= 0 or not inode.is_dir:  # cannot be: a held number is not reused
                os.close(fd)
            else:
                self._hold_fd(inode, fd)
        if (parent, name) not in inode.links:
            if inode.is_dir:  # a directory has one name: a new one means it moved
                self._drop_links(inode)
            self._add_link(inode, parent, name)
        if not inode.is_dir:
            p = self._inodes.get(parent)
            inode.contents = p.policy if p is not None else None
        if count:
            inode.lookups += 1
        return inode

    def _add_link(self, inode: Inode, parent: int, name: str) -> None:
        entries = self._children.setdefault(parent, {})
        other = entries.get(name)
        if other is not None and other != inode.ino:
            old = self._inodes.get(other)
            if old is not None:
                old.links.pop((parent, name), None)
        entries[name] = inode.ino
        inode.links[(parent, name)] = None
        if not inode.is_dir:
            p = self._inodes.get(parent)
            if p is not None:
                inode.contents = p.policy

    def _remove_link(self, inode: Inode, parent: int, name: str) -> None:
        inode.links.pop((parent, name), None)
        entries = self._children.get(parent)
        if entries is not None and entries.get(name) == inode.ino:
            del entries[name]
            if not entries:
                del self._children[parent]

    def _drop_links(self, inode: Inode) -> None:
        for parent, name in list(inode.links):
            self._remove_link(inode, parent, name)

    def reload_policy(self, inode: Inode) -> None:
        parent = None if inode.ino == ROOT_INODE else self._inodes.get(self.parent_of(inode.ino))
        self._load_policy(inode, parent)
        wipe.release(inode.forget_names())

    def link_of(self, parent: int, name: str) -> Inode | None:
        ino = self._children.get(parent, {}).get(name)
        return None if ino is None else self._inodes.get(ino)

    def unlink(self, parent: int, name: str) -> Inode | None:
        """Forget the link ``name`` in ``parent``; the inode it named, if known."""
        inode = self.link_of(parent, name)
        if inode is not None:
            self._remove_link(inode, parent, name)
        return inode

    def move(self, old_parent: int, old_name: str, new_parent: int, new_name: str) -> None:
        """A rename: the inode at the old link now has the new one."""
        moved = self.link_of(old_parent, old_name)
        replaced = self.link_of(new_parent, new_name)
        if replaced is not None and replaced is not moved:
            self._remove_link(replaced, new_parent, new_name)
        if moved is not None:
            self._remove_link(moved, old_parent, old_name)
            self._add_link(moved, new_parent, new_name)

    def exchange(self, parent_a: int, name_a: str, parent_b: int, name_b: str) -> None:
        a = self.link_of(parent_a, name_a)
        b = self.link_of(parent_b, name_b)
        if a is not None:
            self._remove_link(a, parent_a, name_a)
        if b is not None:
            self._remove_link(b, parent_b, name_b)
        if a is not None:
            self._add_link(a, parent_b, name_b)
        if b is not None:
            self._add_link(b, parent_a, name_a)

    def forget(self, ino: int, nlookup: int) -> Inode | None:
        """Lower the lookup count; the inode if it left the table."""
        inode = self._inodes.get(ino)
        if inode is None or ino == ROOT_INODE:
            return None
        inode.lookups -= nlookup
        if inode.lookups > 0:
            return None
        inode.lookups = 0
        if self._children.get(ino):
            return None  # children still known (the kernel forgets them first)
        self._drop_links(inode)
        self._release_fd(inode)
        del self._inodes[ino]
        wipe.release(inode.forget_names())  # a directory's names and cipher
        return inode

    def children_of(self, ino: int) -> list[tuple[str, Inode]]:
        """Known entries of a directory: (backing name, inode)."""
        out: list[tuple[str, Inode]] = []
        for name, child in list(self._children.get(ino, {}).items()):
            inode = self._inodes.get(child)
            if inode is not None:
                out.append((name, inode))
        return out
