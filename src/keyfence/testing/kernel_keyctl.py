"""Thin ctypes layer over the kernel key management syscalls.

This is the oracle side of the differential tests: each function makes exactly one
logical kernel request (two syscalls for the "ask the size, then fetch" reads) and
reports failure as ``OSError(errno, strerror)``, so that the model can be compared with
the kernel errno for errno.  Nothing here interprets results beyond decoding bytes.

``None`` and empty values are kept distinct on purpose: the kernel treats a NULL
description or payload differently from a zero-length one.  Operations whose only
success value is 0 return ``None``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from typing import TypeAlias

# the same numbers as <keyutils.h>, kept once (re-exported for the tests)
from keyfence.constants import (  # noqa: F401
    KEY_GRP_ALL,
    KEY_GRP_LINK,
    KEY_GRP_READ,
    KEY_GRP_SEARCH,
    KEY_GRP_SETATTR,
    KEY_GRP_VIEW,
    KEY_GRP_WRITE,
    KEY_OTH_ALL,
    KEY_OTH_LINK,
    KEY_OTH_READ,
    KEY_OTH_SEARCH,
    KEY_OTH_SETATTR,
    KEY_OTH_VIEW,
    KEY_OTH_WRITE,
    KEY_POS_ALL,
    KEY_POS_LINK,
    KEY_POS_READ,
    KEY_POS_SEARCH,
    KEY_POS_SETATTR,
    KEY_POS_VIEW,
    KEY_POS_WRITE,
    KEY_SPEC_GROUP_KEYRING,
    KEY_SPEC_PROCESS_KEYRING,
    KEY_SPEC_REQKEY_AUTH_KEY,
    KEY_SPEC_REQUESTOR_KEYRING,
    KEY_SPEC_SESSION_KEYRING,
    KEY_SPEC_THREAD_KEYRING,
    KEY_SPEC_USER_KEYRING,
    KEY_SPEC_USER_SESSION_KEYRING,
    KEY_USR_ALL,
    KEY_USR_LINK,
    KEY_USR_READ,
    KEY_USR_SEARCH,
    KEY_USR_SETATTR,
    KEY_USR_VIEW,
    KEY_USR_WRITE,
)

# Syscall numbers (asm-generic numbering on aarch64).
_SYSCALLS: dict[str, tuple[int, int, int]] = {
    "x86_64": (248, 249, 250),
    "aarch64": (217, 218, 219),
    "arm64": (217, 218, 219),
}

# Special keyring ids, as in <linux/keyctl.h>.

# Arguments for set_reqkey_keyring().
KEY_REQKEY_DEFL_NO_CHANGE = -1
KEY_REQKEY_DEFL_DEFAULT = 0
KEY_REQKEY_DEFL_THREAD_KEYRING = 1
KEY_REQKEY_DEFL_PROCESS_KEYRING = 2
KEY_REQKEY_DEFL_SESSION_KEYRING = 3
KEY_REQKEY_DEFL_USER_KEYRING = 4
KEY_REQKEY_DEFL_USER_SESSION_KEYRING = 5
KEY_REQKEY_DEFL_GROUP_KEYRING = 6
KEY_REQKEY_DEFL_REQUESTOR_KEYRING = 7


# keyctl() operation codes.
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_UPDATE = 2
KEYCTL_REVOKE = 3
KEYCTL_CHOWN = 4
KEYCTL_SETPERM = 5
KEYCTL_DESCRIBE = 6
KEYCTL_CLEAR = 7
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEYCTL_INSTANTIATE = 12
KEYCTL_NEGATE = 13
KEYCTL_SET_REQKEY_KEYRING = 14
KEYCTL_SET_TIMEOUT = 15
KEYCTL_ASSUME_AUTHORITY = 16
KEYCTL_GET_SECURITY = 17
KEYCTL_SESSION_TO_PARENT = 18
KEYCTL_REJECT = 19
KEYCTL_INVALIDATE = 21
KEYCTL_RESTRICT_KEYRING = 29
KEYCTL_MOVE = 30
KEYCTL_CAPABILITIES = 31

KEYCTL_MOVE_EXCL = 0x00000001

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_Arg: TypeAlias = "ctypes.c_long | ctypes.c_char_p | ctypes.c_void_p | ctypes.Array[ctypes.c_char]"


def _numbers() -> tuple[int, int, int]:
    machine = platform.machine()
    try:
        return _SYSCALLS[machine]
    except KeyError:
        raise OSError(f"keyring syscalls: unsupported architecture {machine!r}") from None


_NR_ADD_KEY, _NR_REQUEST_KEY, _NR_KEYCTL = _numbers()


def _call(nr: int, *args: _Arg) -> int:
    """Issue one syscall; every argument is already a ctypes value of register width."""
    ctypes.set_errno(0)
    ret = int(_syscall(ctypes.c_long(nr), *args))
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _str(value: str | None) -> ctypes.c_char_p:
    """NULL for None, else a NUL-terminated copy; "" stays a valid empty string."""
    return ctypes.c_char_p(None if value is None else os.fsencode(value))


def _int(value: int) -> ctypes.c_long:
    return ctypes.c_long(value)


def _keyctl(op: int, *args: _Arg) -> int:
    return _call(_NR_KEYCTL, _int(op), *args)


def _keyctl_buffer(op: int, key: int) -> bytes:
    """The size protocol: ask with a NULL buffer, then fetch; retry if it grew meanwhile."""
    size = _keyctl(op, _int(key), ctypes.c_void_p(None), _int(0))
    while True:
        buf = ctypes.create_string_buffer(max(size, 1))
        got = _keyctl(op, _int(key), buf, _int(size))
        if got <= size:
            return buf.raw[:got]
        size = got


def add_key(type: str, description: str | None, payload: bytes | None, keyring: int) -> int:
    """add_key(2); returns the serial of the new or updated key."""
    data = ctypes.c_char_p(payload)  # NULL for None; bytes may contain NULs
    plen = 0 if payload is None else len(payload)
    return _call(_NR_ADD_KEY, _str(type), _str(description), data, _int(plen), _int(keyring))


def request_key(
    type: str, description: str | None, callout_info: str | None, dest_keyring: int
) -> int:
    """request_key(2); a non-None callout_info may upcall /sbin/request-key."""
    return _call(
        _NR_REQUEST_KEY, _str(type), _str(description), _str(callout_info), _int(dest_keyring)
    )


def get_keyring_id(id: int, create: bool) -> int:
    return _keyctl(KEYCTL_GET_KEYRING_ID, _int(id), _int(int(create)))


def join_session_keyring(name: str | None) -> int:
    """None makes a fresh anonymous session keyring ("_ses"); a name joins or creates it."""
    return _keyctl(KEYCTL_JOIN_SESSION_KEYRING, _str(name))


def update(id: int, payload: bytes | None) -> None:
    plen = 0 if payload is None else len(payload)
    _keyctl(KEYCTL_UPDATE, _int(id), ctypes.c_char_p(payload), _int(plen))


def revoke(id: int) -> None:
    _keyctl(KEYCTL_REVOKE, _int(id))


def chown(id: int, uid: int, gid: int) -> None:
    """uid or gid -1 leaves that one unchanged."""
    _keyctl(KEYCTL_CHOWN, _int(id), _int(uid), _int(gid))


def setperm(id: int, perm: int) -> None:
    _keyctl(KEYCTL_SETPERM, _int(id), _int(perm))


def describe(id: int) -> str:
    """Returns 'type;uid;gid;perm;description', perm in lowercase hex, without the NUL."""
    return os.fsdecode(_keyctl_buffer(KEYCTL_DESCRIBE, id).rstrip(b"\0"))


def clear(id: int) -> None:
    _keyctl(KEYCTL_CLEAR, _int(id))


def link(id: int, ring: int) -> None:
    _keyctl(KEYCTL_LINK, _int(id), _int(ring))


def unlink(id: int, ring: int) -> None:
    _keyctl(KEYCTL_UNLINK, _int(id), _int(ring))


def search(ring: int, type: str, desc: str | None, dest: int) -> int:
    """dest 0 means "do not link the found key anywhere"."""
    return _keyctl(KEYCTL_SEARCH, _int(ring), _str(type), _str(desc), _int(dest))


def read(id: int) -> bytes:
    """The payload; for a keyring, the member serials as packed native int32."""
    return _keyctl_buffer(KEYCTL_READ, id)


def keyring_serials(data: bytes) -> list[int]:
    """Decode a keyring read() result into serials, in the kernel's order."""
    count = len(data) // 4
    return list(struct.unpack(f"={count}i", data[: count * 4]))


def set_timeout(id: int, seconds: int) -> None:
    """0 cancels an expiry."""
    _keyctl(KEYCTL_SET_TIMEOUT, _int(id), _int(seconds))


def invalidate(id: int) -> None:
    _keyctl(KEYCTL_INVALIDATE, _int(id))


def move(id: int, from_ring: int, to_ring: int, flags: int) -> None:
    _keyctl(KEYCTL_MOVE, _int(id), _int(from_ring), _int(to_ring), _int(flags))


def instantiate(id: int, payload: bytes | None, ring: int) -> None:
    plen = 0 if payload is None else len(payload)
    _keyctl(KEYCTL_INSTANTIATE, _int(id), ctypes.c_char_p(payload), _int(plen), _int(ring))


def reject(id: int, timeout: int, error: int, ring: int) -> None:
    """KEYCTL_REJECT; ``error`` ENOKEY is KEYCTL_NEGATE's."""
    _keyctl(KEYCTL_REJECT, _int(id), _int(timeout), _int(error), _int(ring))


def assume_authority(id: int) -> int:
    return _keyctl(KEYCTL_ASSUME_AUTHORITY, _int(id))


def get_security(id: int) -> str:
    return os.fsdecode(_keyctl_buffer(KEYCTL_GET_SECURITY, id).rstrip(b"\0"))


def set_reqkey_keyring(n: int) -> int:
    """Returns the previous default (a KEY_REQKEY_DEFL_* value)."""
    return _keyctl(KEYCTL_SET_REQKEY_KEYRING, _int(n))


def session_to_parent() -> None:
    """Replaces the *parent* process's session keyring; see worker.py for who that is."""
    _keyctl(KEYCTL_SESSION_TO_PARENT)


def restrict_keyring(ring: int, type: str | None, restriction: str | None) -> None:
    _keyctl(KEYCTL_RESTRICT_KEYRING, _int(ring), _str(type), _str(restriction))


def capabilities() -> bytes:
    """All the capability bytes the kernel knows of (the kernel reports its full size)."""
    size = _keyctl(KEYCTL_CAPABILITIES, ctypes.c_void_p(None), _int(0))
    buf = ctypes.create_string_buffer(max(size, 1))
    got = _keyctl(KEYCTL_CAPABILITIES, buf, _int(size))
    return buf.raw[: min(got, size)]
