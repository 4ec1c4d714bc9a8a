"""keyutils.h's numbers, for callers of :mod:`keyfence.client`.

The same values as the kernel's and python-keyutils': special keyring ids
(``KEY_SPEC_*``), permission bits (``KEY_POS_*``, ``KEY_USR_*``,
``KEY_GRP_*``, ``KEY_OTH_*``), ``KEYCTL_MOVE_EXCL`` and the watch event
bits (``KEY_EVENT_*``, keyfence's: one bit per keyctl watch word).  This
module imports nothing, so the client stays quick to import; the tests
check it against the key model (keyfence.keys) and the wire.
"""

from __future__ import annotations

# special keyring ids (keyctl's @t @p @s @u @us @g, @a and the requestor's)
KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5
KEY_SPEC_GROUP_KEYRING = -6
KEY_SPEC_REQKEY_AUTH_KEY = -7
KEY_SPEC_REQUESTOR_KEYRING = -8

# permissions: possessor, user (owner), group, other; six bits each
KEY_POS_VIEW = 0x01000000
KEY_POS_READ = 0x02000000
KEY_POS_WRITE = 0x04000000
KEY_POS_SEARCH = 0x08000000
KEY_POS_LINK = 0x10000000
KEY_POS_SETATTR = 0x20000000
KEY_POS_ALL = 0x3F000000

KEY_USR_VIEW = 0x00010000
KEY_USR_READ = 0x00020000
KEY_USR_WRITE = 0x00040000
KEY_USR_SEARCH = 0x00080000
KEY_USR_LINK = 0x00100000
KEY_USR_SETATTR = 0x00200000
KEY_USR_ALL = 0x003F0000

KEY_GRP_VIEW = 0x00000100
KEY_GRP_READ = 0x00000200
KEY_GRP_WRITE = 0x00000400
KEY_GRP_SEARCH = 0x00000800
KEY_GRP_LINK = 0x00001000
KEY_GRP_SETATTR = 0x00002000
KEY_GRP_ALL = 0x00003F00

KEY_OTH_VIEW = 0x00000001
KEY_OTH_READ = 0x00000002
KEY_OTH_WRITE = 0x00000004
KEY_OTH_SEARCH = 0x00000008
KEY_OTH_LINK = 0x00000010
KEY_OTH_SETATTR = 0x00000020
KEY_OTH_ALL = 0x0000003F

KEYCTL_MOVE_EXCL = 0x01
"""move(): fail with EEXIST rather than displace a key of the same type
and description in the destination keyring."""

# watch event bits for Client.watch(events=...) (keyctl watch's words)
KEY_EVENT_INSTANTIATED = 0x001  # inst
KEY_EVENT_UPDATED = 0x002  # upd
KEY_EVENT_LINKED = 0x004  # link
KEY_EVENT_UNLINKED = 0x008  # unlk
KEY_EVENT_CLEARED = 0x010  # clr
KEY_EVENT_REVOKED = 0x020  # rev
KEY_EVENT_INVALIDATED = 0x040  # inv
KEY_EVENT_SETATTR = 0x080  # attr
KEY_EVENT_EXPIRED = 0x100  # exp
KEY_EVENT_GC = 0x200  # gc
KEY_EVENT_ALL = 0x3FF

__all__ = [name for name in dir() if name.startswith("KEY")]
