"""The one removal path: how keys go away, worked out before anything changes.

Every operation that can make a key unusable -- unlink, clear, move, link
displacing a key, revoke, invalidate, expiry, gc reaping, process exit,
session end -- describes what it takes away as a :class:`Removal` and hands
it to the removal path (keys/removal_path.py), which

1. computes the whole set of keys that will go away (:meth:`Removal.plan_locked`),
   following cascades: a key that loses its last link and anchor is
   destroyed, a destroyed or revoked keyring drops its own links, and so on;
2. lets the key users fence the removal (notifications, keyfence.keys.notify);
3. applies it atomically (:meth:`Removal.apply_locked`): unlinks, state
   changes, payload wipes, quota refunds.

Life-cycle rules live here; the few transitions that take nothing from
anyone (an update, a key dying unborn, a construction ending) are listed in
keys/key.py.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from keyfence.keys import keyring
from keyfence.keys.errors import fail
from keyfence.keys.key import Key, KeyState

if TYPE_CHECKING:
    from keyfence.keys.caller import Caller
    from keyfence.keys.quota import QuotaTable


_removal_ids = itertools.count(1)


class Why(Enum):
    """Why a key goes away for its users."""

    REVOKED = "revoked"
    INVALIDATED = "invalidated"
    EXPIRED = "expired"
    UNLINKED = "unlinked"
    """Lost its last link (unlink, clear, move, displacement, a dying keyring)."""
    ENDED = "ended"
    """A process or session keyring whose owner went away."""


@dataclass
class Removal:
    """What one operation takes away.  Built and planned with the lock held."""

    op: str
    """The operation, as keyctl(1) names it: "unlink", "clear", "revoke", ..."""
    caller: Caller | None
    """Who asked; None for the service itself (expiry, gc, process exit)."""
    unlinks: list[tuple[Key, Key]] = field(default_factory=list)
    """Links to cut, as (keyring, key)."""
    kills: dict[Key, KeyState] = field(default_factory=dict)
    """Keys whose state changes: REVOKED, INVALIDATED or EXPIRED."""
    releases: list[Key] = field(default_factory=list)
    """Anchors to drop (a process's or session's keyring)."""
    links: list[tuple[Key, Key]] = field(default_factory=list)
    """Links to make in the same atomic step (move, displacement by link)."""
    emergency: bool = False
    on_apply: list[Callable[[], object]] = field(default_factory=list)
    """Bookkeeping done in the same atomic step (a session table entry)."""
    id: int = field(default_factory=lambda: next(_removal_ids))

    unlinks_set: set[tuple[Key, Key]] = field(default_factory=set)

    # -- the plan, filled by plan_locked()
    cut: dict[tuple[Key, Key], None] = field(default_factory=dict)
    """Every link cut, in the order planned (the order watchers are told)."""
    destroyed: list[Key] = field(default_factory=list)
    killed: dict[Key, KeyState] = field(default_factory=dict)
    going: dict[Key, Why] = field(default_factory=dict)
    """Every usable key that stops being usable, and why: what the
    synchronous watchers are called for."""

    def plan_locked(self) -> None:
        """Work out every link cut and every key that goes away."""
        cut: dict[tuple[Key, Key], None] = {}
        lost: dict[Key, int] = {}
        released: dict[Key, int] = {}
        destroyed: dict[Key, None] = {}
        going: dict[Key, Why] = {}
        todo: list[Key] = []

        def cut_link(ring: Key, key: Key) -> None:
            if (ring, key) not in cut:
                cut[ring, key] = None
                lost[key] = lost.get(key, 0) + 1
                todo.append(key)

        def drop_contents(ring: Key) -> None:
            if ring.contents is not None:
                for child in ring.contents.by_index.values():
                    cut_link(ring, child)

        for ring, key in self.unlinks:
            if ring.contents is not None and key in ring.contents:
                cut_link(ring, key)
        for key in self.releases:
            released[key] = released.get(key, 0) + 1
            todo.append(key)
        killed: dict[Key, KeyState] = {}
        for key, state in self.kills.items():
            if not key.is_live() or key.state is state:
                continue
            killed[key] = state
            if key.state is KeyState.VALID:
                going[key] = Why(state.value)
            if state is KeyState.INVALIDATED:
                for parent in key.parents:
                    cut_link(parent, key)
            if key.is_keyring and state in (KeyState.REVOKED, KeyState.INVALIDATED):
                drop_contents(key)  # the kernel clears a revoked keyring
        gained = {key for _ring, key in self.links}
        while todo:
            key = todo.pop()
            if key in destroyed or key in gained:
                continue
            if len(key.parents) - lost.get(key, 0) > 0:
                continue
            if key.anchors - released.get(key, 0) > 0:
                continue
            destroyed[key] = None
            if key not in going and key.state is KeyState.VALID:
                going[key] = Why.ENDED if key in released else Why.UNLINKED
            if key.is_keyring:
                drop_contents(key)
        self.cut = cut
        self.killed = killed
        self.destroyed = list(destroyed)
        self.going = going

    def displaced(self) -> set[tuple[Key, Key]]:
        """The cut links that a link of this removal replaces: a key of the
        same type and description put out of the keyring the new one goes
        into (move, link, add).  The kernel replaces the slot in place and
        tells the keyring's watchers only of the link."""
        into = {(ring, key.index_key) for ring, key in self.links}
        return {(ring, key) for ring, key in self.cut if (ring, key.index_key) in into}

    def check_links_locked(self, quota: QuotaTable) -> None:
        """Before anything is applied: the links, planned before the
        watchers were called while others ran, can still be made.  A key or
        keyring destroyed since is ENOKEY, a link its keyring's owner can no
        longer be charged for EDQUOT; then nothing changes."""
        for ring, key in self.links:
            if not ring.is_live() or not key.is_live():
                raise fail(errno.ENOKEY)
            assert ring.contents is not None
            if ring.contents.find(key.index_key) is None:
                keyring.check_link_quota_locked(ring, quota)

    def apply_locked(self, now: float, quota: QuotaTable) -> list[Key]:
        """Make the planned change; return the keys destroyed (already wiped).

        The caller (the service) releases serials, quota and names of the
        destroyed keys.
        """
        for ring, key in self.cut:
            if ring.contents is not None and key in ring.contents:
                keyring.unlink_locked(ring, key, quota)
        for ring, key in self.links:
            keyring.link_locked(ring, key, quota)
        for key in self.releases:
            key.anchors -= 1
        for action in self.on_apply:
            action()
        for key, state in self.killed.items():
            key.state = state
            if state is KeyState.REVOKED and key.revoked_at is None:
                key.revoked_at = int(now)
            wipe_payload(key)
        for key in self.destroyed:
            for ring in list(key.parents):
                keyring.unlink_locked(ring, key, quota)
            key.state = KeyState.DEAD
            wipe_payload(key)
        return self.destroyed


def wipe_payload(key: Key) -> None:
    """Zero a key's payload now; a dead key keeps no secret."""
    payload = key.payload
    if payload is not None:
        key.payload = None
        payload.wipe()
