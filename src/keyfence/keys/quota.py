"""Per-uid quotas on key count and bytes (the kernel's struct key_user).

Each key owned by a uid is charged one key and ``quotalen`` bytes: its
description plus one, plus its type's default data length, plus its payload.
Limits are the kernel's defaults (/proc/sys/kernel/keys/*): 200 keys and
20,000 bytes for users, 1,000,000 keys and 25,000,000 bytes for root.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from keyfence.keys.errors import fail


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    maxkeys: int = 200
    maxbytes: int = 20000
    root_maxkeys: int = 1_000_000
    root_maxbytes: int = 25_000_000

    def for_uid(self, uid: int) -> tuple[int, int]:
        if uid == 0:
            return self.root_maxkeys, self.root_maxbytes
        return self.maxkeys, self.maxbytes


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    """One uid's line of /proc/key-users."""

    uid: int
    nkeys: int
    """Keys owned, in quota or not."""
    qnkeys: int
    qnbytes: int
    maxkeys: int
    maxbytes: int


class KeyUser:
    """One uid's quota account: the kernel's ``struct key_user``, as
    /proc/key-users shows it (not a user of a key: see fs/binding.py)."""

    __slots__ = ("nkeys", "qnbytes", "qnkeys", "uid")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.nkeys = 0
        self.qnkeys = 0
        self.qnbytes = 0


class QuotaTable:
    """Charges and refunds; called with the service lock held."""

    def __init__(self, limits: QuotaLimits) -> None:
        self.limits = limits
        self._users: dict[int, KeyUser] = {}

    def _user(self, uid: int) -> KeyUser:
        user = self._users.get(uid)
        if user is None:
            user = self._users[uid] = KeyUser(uid)
        return user

    def charge_locked(
        self, uid: int, nbytes: int, *, in_quota: bool, overrun: bool = False
    ) -> None:
        """Charge a new key; EDQUOT if it does not fit (unless ``overrun``)."""
        user = self._user(uid)
        if in_quota:
            maxkeys, maxbytes = self.limits.for_uid(uid)
            if not overrun and (user.qnkeys + 1 > maxkeys or user.qnbytes + nbytes > maxbytes):
                raise fail(errno.EDQUOT)
            user.qnkeys += 1
            user.qnbytes += nbytes
        user.nkeys += 1

    def refund_locked(self, uid: int, nbytes: int, *, in_quota: bool) -> None:
        user = self._user(uid)
        user.nkeys -= 1
        if in_quota:
            user.qnkeys -= 1
            user.qnbytes -= nbytes

    def resize_locked(self, uid: int, delta: int) -> None:
        """Change a key's charged bytes by ``delta``; EDQUOT if it grows past the limit."""
        user = self._user(uid)
        if delta > 0 and user.qnbytes + delta > self.limits.for_uid(uid)[1]:
            raise fail(errno.EDQUOT)
        user.qnbytes += delta

    def transfer_locked(self, old_uid: int, new_uid: int, nbytes: int, *, in_quota: bool) -> None:
        """Move a key's charge to a new owner (chown); EDQUOT if it does not fit."""
        self.charge_locked(new_uid, nbytes, in_quota=in_quota)
        self.refund_locked(old_uid, nbytes, in_quota=in_quota)

    def usage(self, uid: int) -> QuotaUsage:
        user = self._user(uid)
        maxkeys, maxbytes = self.limits.for_uid(uid)
        return QuotaUsage(uid, user.nkeys, user.qnkeys, user.qnbytes, maxkeys, maxbytes)

    def all_usage(self) -> list[QuotaUsage]:
        return [self.usage(uid) for uid in sorted(self._users) if self._users[uid].nkeys]
