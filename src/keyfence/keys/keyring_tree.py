"""A keyring's tree in one call: what ``keyctl show`` asks of the kernel, key by key.

keyctl show describes the keyring, reads it, and describes and reads each
key below it, down to nine levels: two system calls per key.  Over a socket
that is two round trips per key, so the daemon offers the same walk as one
operation.  The answer is a table, not a tree: one entry per distinct key
reached (a key linked twice is described once), so its size is bounded by
the keys that exist, not by the paths to them; the caller draws the tree.

Each entry is exactly what the caller's own ``describe`` and ``read`` would
have returned at that moment, because it is made by calling them, as the
caller: a key the caller may not view is an errno here as it is there (and
shows as "key inaccessible"), a keyring it may not read is the read's errno.
No payload other than a keyring's list of serials is ever read.

Steps:

1. Resolve the root as ``get_keyring_id(key, create=False)`` (its errors are
   the operation's: keyctl prints "Unable to dump key").
2. Breadth first from the root, level 0, to level ``levels - 1``: describe
   each key not seen yet; a keyring described is read too (keyctl reads a
   keyring on its deepest level before it finds its members too deep).
3. Stop with E2BIG past :data:`MAX_TREE_KEYS` keys: the caller falls back
   to describing key by key.

``keyctl list`` is the same walk one level deep, except that it reads the
keyring by the id it was given (a special id is possessed) and never
describes it: :func:`keyring_members`.

Locking: none held across the walk (each describe and read takes the
service lock itself), so the walk is not a snapshot -- neither is keyctl's.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from keyfence.keys.errors import fail

if TYPE_CHECKING:
    from keyfence.keys.caller import Caller
    from keyfence.keys.keyctl import KeyService

SHOW_LEVELS = 9
"""keyctl show's depth: the root and eight levels below it."""

MAX_TREE_KEYS = 512
"""The most keys one walk describes (a bound on the daemon's work and the
reply's size; the fallback is one call per key, as before)."""

TreeEntry = list[object]
"""``[serial, description str | errno int, keyring serials bytes | errno int | None]``."""


def keyring_tree(
    service: KeyService, caller: Caller, key_id: int, levels: int
) -> tuple[int, list[TreeEntry]]:
    """The root's serial and one entry per key reached within ``levels``.

    Errors: EINVAL (``levels`` not 1..SHOW_LEVELS); the root's lookup errors
    (ENOKEY, EACCES, EKEYREVOKED, EKEYEXPIRED, EINVAL); E2BIG (more than
    MAX_TREE_KEYS keys).
    """
    if not 1 <= levels <= SHOW_LEVELS:
        raise fail(errno.EINVAL, f"levels must be 1 to {SHOW_LEVELS}")
    root = service.get_keyring_id(caller, key_id, False)
    entries: list[TreeEntry] = []
    seen = {root}
    level = [root]
    for depth in range(levels):
        below: list[int] = []
        for serial in level:
            if len(entries) >= MAX_TREE_KEYS:
                raise fail(errno.E2BIG, f"more than {MAX_TREE_KEYS} keys below {root}")
            entry = _describe_and_read(service, caller, serial)
            entries.append(entry)
            members = entry[2]
            if isinstance(members, bytes) and depth + 1 < levels:
                for member in memoryview(members).cast("i").tolist():
                    if member not in seen:
                        seen.add(member)
                        below.append(member)
        level = below
    return root, entries


def keyring_members(service: KeyService, caller: Caller, key_id: int) -> list[list[int | str]]:
    """``keyctl list``'s calls: the keyring read as ``key_id`` names it
    (``list_keyring``: read, then ENOTDIR for a key that is not a keyring),
    then ``[serial, description str | errno int]`` for each member.

    Errors: the read's (ENOKEY, EACCES, EKEYREVOKED, EKEYEXPIRED), ENOTDIR,
    E2BIG (more than MAX_TREE_KEYS members).
    """
    serials = service.list_keyring(caller, key_id)
    if len(serials) > MAX_TREE_KEYS:
        raise fail(errno.E2BIG, f"more than {MAX_TREE_KEYS} keys in {key_id}")
    members: list[list[int | str]] = []
    for serial in serials:
        try:
            members.append([serial, service.describe(caller, serial)])
        except OSError as err:
            members.append([serial, err.errno or errno.EIO])
    return members


def _describe_and_read(service: KeyService, caller: Caller, serial: int) -> TreeEntry:
    try:
        description = service.describe(caller, serial)
    except OSError as err:
        return [serial, err.errno or errno.EIO, None]
    if not description.startswith("keyring;"):
        return [serial, description, None]
    try:
        members: bytes | int = service.read(caller, serial)
    except OSError as err:
        members = err.errno or errno.EIO
    return [serial, description, members]
