"""Keys and their life cycle states.

A :class:`Key` is the model's ``struct key``: serial, type, description,
owner, mask, expiry, and a payload held in secret memory (or, for a keyring,
its contents).  Life-cycle *transitions* are made only by the removal path in
:mod:`keyfence.keys.removal` (run by keys/removal_path.py), except where
nothing is taken from anyone: an update revives an expired key
(``KeyService._update_locked``), a key made for a removal that did not
apply dies unborn (``KeyService._discard_pending_locked``), and a
construction ends (keys/upcall.py).  This module only describes states.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from enum import Enum
from typing import TYPE_CHECKING

from keyfence.keys.errors import fail
from keyfence.keys.key_type import KeyType

if TYPE_CHECKING:
    from keyfence.keys.secret import SecretBuffer

NO_EXPIRY = None


class KeyState(Enum):
    VALID = "valid"
    REVOKED = "revoked"
    INVALIDATED = "invalidated"
    EXPIRED = "expired"
    DEAD = "dead"
    """Destroyed: unlinked everywhere, payload wiped, serial released."""


class Key:
    """One key.  Mutated only with the service lock held."""

    __slots__ = (
        "__weakref__",
        "anchors",
        "contents",
        "description",
        "expiry",
        "fenced_by",
        "gate_closed",
        "gid",
        "in_quota",
        "index_key",
        "parents",
        "payload",
        "perm",
        "quotalen",
        "revoked_at",
        "serial",
        "state",
        "sync_watches",
        "type",
        "uid",
    )

    def __init__(
        self,
        serial: int,
        key_type: KeyType,
        description: str,
        *,
        uid: int,
        gid: int,
        perm: int,
        quotalen: int,
        in_quota: bool,
    ) -> None:
        self.serial = serial
        self.type = key_type
        self.description = description
        self.index_key = (key_type.name, description)
        """What identifies the key inside a keyring: (type, description)."""
        self.uid = uid
        self.gid = gid
        self.perm = perm
        self.quotalen = quotalen
        self.in_quota = in_quota
        self.state = KeyState.VALID
        self.expiry: int | None = NO_EXPIRY
        """Absolute wall-clock second at which the key expires (kernel: expiry)."""
        self.revoked_at: int | None = None
        self.payload: SecretBuffer | None = None
        self.contents: KeyringContents | None = None
        self.parents: set[Key] = set()
        """Keyrings that link this key (a key is in a keyring at most once)."""
        self.anchors = 0
        """References from outside any keyring: a process, session or user
        holding this as one of its special keyrings.  A key with no parents
        and no anchors is destroyed."""
        self.fenced_by = 0
        """The id of the removal whose watchers are flushing this key now (0: none)."""
        self.gate_closed = False
        """No new use-guards: a removal is about to apply."""
        self.sync_watches = 0
        """Synchronous watches on this key.  A watched key does not expire by
        the clock alone: expiry goes through the fenced removal path, so the
        key stays usable until its users have flushed (docs/notifications.md)."""

    @property
    def is_keyring(self) -> bool:
        return self.type.is_keyring

    def is_expired(self, now: float) -> bool:
        return self.state is KeyState.EXPIRED or (
            self.expiry is not None
            and self.state is KeyState.VALID
            and not self.sync_watches
            and now >= self.expiry
        )

    def is_live(self) -> bool:
        """Not yet destroyed (revoked and expired keys are still live)."""
        return self.state is not KeyState.DEAD

    def validate(self, now: float) -> None:
        """Raise what the kernel's key_validate() would for this key."""
        state = self.state
        if state is KeyState.INVALIDATED:
            raise fail(errno.ENOKEY)
        if state is KeyState.REVOKED or state is KeyState.DEAD:
            raise fail(errno.EKEYREVOKED)
        if self.is_expired(now):
            raise fail(errno.EKEYEXPIRED)

    def __repr__(self) -> str:
        # never the payload: only identity and state
        return (
            f"<Key {self.serial} {self.type.name}:{self.description!r} "
            f"uid={self.uid} perm={self.perm:08x} {self.state.value}>"
        )


class KeyringContents:
    """The links of one keyring, in link order."""

    __slots__ = ("by_index", "rings")

    def __init__(self) -> None:
        self.by_index: dict[tuple[str, str], Key] = {}
        self.rings: dict[int, Key] = {}
        """The nested keyrings among ``by_index``, by serial."""

    def __len__(self) -> int:
        return len(self.by_index)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self.by_index.values()))

    def find(self, index_key: tuple[str, str]) -> Key | None:
        return self.by_index.get(index_key)

    def __contains__(self, key: Key) -> bool:
        return self.by_index.get(key.index_key) is key
