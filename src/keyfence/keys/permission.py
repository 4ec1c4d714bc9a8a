"""Key permissions: the 32-bit mask and the kernel's access decision.

The mask has four bytes, from the top: possessor, user (owner uid), group,
other; each holds view/read/write/search/link/setattr bits.  As in the
kernel (security/keys/permission.c) exactly one of user/group/other applies
-- user if the caller's uid owns the key, else group if the key grants any
group bit and the caller is in its group, else other -- and the possessor
byte is *added* when the caller possesses the key.
"""

from __future__ import annotations

import errno
from enum import IntFlag
from typing import TYPE_CHECKING

from keyfence.keys.errors import fail

if TYPE_CHECKING:
    from keyfence.keys.caller import Caller
    from keyfence.keys.key import Key


class Perm(IntFlag):
    """One class's permission bits (the low byte of each class).

    The hot path uses the plain ints below: IntFlag arithmetic costs about
    a microsecond per operation, which showed in add_key at 100k keys.
    """

    VIEW = 0x01
    READ = 0x02
    WRITE = 0x04
    SEARCH = 0x08
    LINK = 0x10
    SETATTR = 0x20
    ALL = 0x3F


VIEW, READ, WRITE, SEARCH, LINK, SETATTR, ALL = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x3F


POS_SHIFT, USR_SHIFT, GRP_SHIFT, OTH_SHIFT = 24, 16, 8, 0

POS_ALL = 0x3F000000
USR_ALL = 0x003F0000
GRP_ALL = 0x00003F00
OTH_ALL = 0x0000003F
VALID_MASK = POS_ALL | USR_ALL | GRP_ALL | OTH_ALL

POS_VIEW, POS_READ, POS_WRITE = 0x01000000, 0x02000000, 0x04000000
POS_SEARCH, POS_LINK, POS_SETATTR = 0x08000000, 0x10000000, 0x20000000
USR_VIEW, USR_READ, USR_WRITE = 0x00010000, 0x00020000, 0x00040000
USR_SEARCH, USR_LINK, USR_SETATTR = 0x00080000, 0x00100000, 0x00200000


def default_perm(*, readable: bool, writable: bool) -> int:
    """The mask add_key(2) gives a new key when none is specified.

    Possessor: view, search, link, setattr, plus read if the type can be
    read and write if it can be updated (keyrings always); user: view.
    """
    perm = POS_VIEW | POS_SEARCH | POS_LINK | POS_SETATTR | USR_VIEW
    if readable:
        perm |= POS_READ
    if writable:
        perm |= POS_WRITE
    return perm


# Masks of the keyrings the service creates itself, as the kernel makes them.
USER_KEYRING_PERM = (POS_ALL & ~POS_SETATTR) | USR_ALL  # _uid.N and _uid_ses.N
SESSION_KEYRING_PERM = POS_ALL | USR_VIEW | USR_READ  # anonymous _ses
NAMED_SESSION_KEYRING_PERM = POS_ALL | USR_VIEW | USR_READ | USR_LINK
PROCESS_KEYRING_PERM = POS_ALL | USR_VIEW  # _pid and _tid


def granted(key: Key, caller: Caller, *, possessed: bool) -> int:
    """The permission bits ``caller`` holds on ``key`` (a Perm value)."""
    perm = key.perm
    if key.uid == caller.uid:
        bits = perm >> USR_SHIFT
    elif key.gid != -1 and perm & GRP_ALL and (key.gid == caller.gid or key.gid in caller.groups):
        bits = perm >> GRP_SHIFT
    else:
        bits = perm
    if possessed:
        bits |= perm >> POS_SHIFT
    return bits & ALL


def check(key: Key, caller: Caller, need: int, *, possessed: bool) -> None:
    """Raise EACCES unless ``caller`` holds every bit of ``need`` on ``key``."""
    if granted(key, caller, possessed=possessed) & need != need:
        raise fail(errno.EACCES)


def allowed(key: Key, caller: Caller, need: int, *, possessed: bool) -> bool:
    return granted(key, caller, possessed=possessed) & need == need
