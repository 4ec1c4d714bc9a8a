"""Keyrings: contents, recursive search and cycle detection.

A keyring's contents are indexed by (type, description), as the kernel's
assoc_array is, so linking, unlinking and lookup are O(1) whatever the
size; nested keyrings are also kept in their own dict, so a recursive search
visits keyrings, never every key.

Search follows security/keys/keyring.c: the keyring itself may match; a
revoked keyring is not looked into; its own keys are checked before its
nested keyrings; a nested keyring is entered only with search permission;
at most :data:`SEARCH_MAX_DEPTH` levels are entered.  All functions here run
with the service lock held.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyfence.keys import permission
from keyfence.keys.key import Key, KeyState

if TYPE_CHECKING:
    from keyfence.keys.caller import Caller
    from keyfence.keys.quota import QuotaTable

LINK_QUOTA_BYTES = 4
"""What each link costs the keyring's owner (the kernel's KEYQUOTA_LINK_BYTES)."""

SEARCH_MAX_DEPTH = 6
"""KEYRING_SEARCH_MAX_DEPTH: nested keyrings entered below the top one."""


def link_locked(ring: Key, key: Key, quota: QuotaTable) -> Key | None:
    """Put ``key`` in ``ring``; return the key it displaced, if any.

    A keyring holds one key per (type, description): linking a second one
    replaces the first, as the kernel's key_link() does.  Each link costs
    the keyring's owner :data:`LINK_QUOTA_BYTES` (EDQUOT, nothing changed).
    """
    assert ring.contents is not None
    contents = ring.contents
    old = contents.by_index.get(key.index_key)
    if old is key:
        return None
    if old is not None:
        unlink_locked(ring, old, quota)
    try:
        _charge_link(ring, quota, LINK_QUOTA_BYTES)
    except OSError:
        if old is not None:
            link_locked(ring, old, quota)
        raise
    contents.by_index[key.index_key] = key
    if key.is_keyring:
        contents.rings[key.serial] = key
    key.parents.add(ring)
    return old


def unlink_locked(ring: Key, key: Key, quota: QuotaTable) -> None:
    assert ring.contents is not None
    contents = ring.contents
    del contents.by_index[key.index_key]
    _charge_link(ring, quota, -LINK_QUOTA_BYTES)
    if key.is_keyring:
        del contents.rings[key.serial]
    key.parents.discard(ring)


def check_link_quota_locked(ring: Key, quota: QuotaTable) -> None:
    """EDQUOT if one more link would take ``ring``'s owner past the quota
    (__key_link_begin()'s reservation); nothing changes."""
    _charge_link(ring, quota, LINK_QUOTA_BYTES)
    _charge_link(ring, quota, -LINK_QUOTA_BYTES)


def _charge_link(ring: Key, quota: QuotaTable, delta: int) -> None:
    if ring.in_quota and ring.is_live():
        quota.resize_locked(ring.uid, delta)
    ring.quotalen += delta


@dataclass(slots=True)
class SearchContext:
    """One search through a tree of keyrings (keyring_search_context)."""

    caller: Caller | None
    """Whose permissions apply; None means no permission checks."""
    possessed: bool
    """Whether the top keyring is possessed; everything found inherits it."""
    index_key: tuple[str, str] | None
    """Look only at this (type, description) in each keyring, or None to
    call ``match`` on every key."""
    match: Callable[[Key], bool]
    now: float
    state_check: bool = True
    """Skip revoked, invalidated and expired keys, reporting why."""
    skip_expired: bool = False
    """Pass over expired keys without reporting them (request_key)."""
    detect_too_deep: bool = False
    """Fail with ELOOP instead of quietly not entering a keyring too deep."""
    found: Key | None = None
    error: int = errno.EAGAIN
    """Why nothing was found: EAGAIN (nothing matched) or the last skipped
    match's reason (EACCES, EKEYREVOKED, EKEYEXPIRED)."""
    reasons: int = 0
    """How many times ``error`` was set (a subtree's search replayed from
    memory must know whether it set one)."""

    def consider(self, key: Key) -> bool:
        """The kernel's keyring_search_iterator: True if ``key`` is the answer."""
        if not self.match(key):
            return False
        if self.state_check:
            if key.state in (KeyState.INVALIDATED, KeyState.REVOKED, KeyState.DEAD):
                self.note_reason(errno.EKEYREVOKED)
                return False
            if key.is_expired(self.now):
                if not self.skip_expired:
                    self.note_reason(errno.EKEYEXPIRED)
                return False
        if self.caller is not None and not permission.allowed(
            key, self.caller, permission.SEARCH, possessed=self.possessed
        ):
            self.note_reason(errno.EACCES)
            return False
        self.found = key
        return True

    def note_reason(self, error: int) -> None:
        self.error = error
        self.reasons += 1


def search_tree_locked(top: Key, ctx: SearchContext) -> Key | None:
    """Search ``top`` and the keyrings nested in it; None if nothing matched.

    On None, ``ctx.error`` says why (EAGAIN: no match at all; ELOOP: nesting
    deeper than allowed and ``detect_too_deep``).

    The kernel enters a keyring once per path to it, so a keyring linked
    into several others is searched again for each: W keyrings per level,
    each linked into all W above, six levels deep, are W**6 entries (16**6
    is 16.8 million, from 97 keyrings within a user's quota).  The kernel
    spends that in the searcher's own syscall; here it would hold the
    service lock and the loop.  Entering a keyring again at a depth it was
    entered at before searches exactly what was searched then, which found
    nothing, so it is not entered again: the reason that search left (if
    it left one) is set again instead.  The result and ``ctx.error`` are
    the kernel's, at most one entry per keyring and depth.
    """
    if (ctx.index_key is None or top.index_key == ctx.index_key) and ctx.consider(top):
        return top
    # Depth-first, own keys before nested keyrings, like search_nested_keyrings().
    stack: list[Iterator[Key]] = []
    # per stack level: (where, ctx.reasons on entry); where = serial * 8 + depth
    # (depth <= SEARCH_MAX_DEPTH + 1 < 8: one int, cheaper to hash than a pair)
    entered: list[tuple[int, int]] = []
    searched: dict[int, int] = {}  # where -> the reason its search left, 0 for none
    ring: Key | None = top

    while True:
        if ring is not None and ring.state is not KeyState.REVOKED and ring.contents is not None:
            contents = ring.contents
            reasons = ctx.reasons
            if ctx.index_key is not None:
                candidate = contents.by_index.get(ctx.index_key)
                if candidate is not None and ctx.consider(candidate):
                    return candidate
            else:
                for candidate in contents.by_index.values():
                    if ctx.consider(candidate):
                        return candidate
            if contents.rings:  # a keyring with none nested costs no level (nor memory)
                entered.append((ring.serial * 8 + len(stack), reasons))
                stack.append(iter(list(contents.rings.values())))
        ring = None
        if not stack:
            return None
        for nested in stack[-1]:
            if len(stack) > SEARCH_MAX_DEPTH:
                if ctx.detect_too_deep:
                    ctx.error = errno.ELOOP
                    return None
                break
            if ctx.caller is not None and not permission.allowed(
                nested, ctx.caller, permission.SEARCH, possessed=ctx.possessed
            ):
                continue
            reason = searched.get(nested.serial * 8 + len(stack), -1)
            if reason >= 0:  # searched at this depth before: found nothing
                if reason:
                    ctx.note_reason(reason)
                continue
            ring = nested
            break
        if ring is None:  # this level is done: remember what it left
            stack.pop()
            where, reasons = entered.pop()
            searched[where] = ctx.error if ctx.reasons != reasons else 0


def detect_cycle_locked(ring: Key, key: Key, now: float) -> int:
    """0 if linking keyring ``key`` into ``ring`` is safe, else the errno.

    EDEADLK if ``ring`` is reachable from ``key`` (or is ``key``); ELOOP if
    the nesting below ``key`` is already too deep to search.
    """
    ctx = SearchContext(
        caller=None,
        possessed=False,
        index_key=ring.index_key,
        match=lambda k: k is ring,
        now=now,
        state_check=False,
        detect_too_deep=True,
    )
    if search_tree_locked(key, ctx) is not None:
        return errno.EDEADLK
    return ctx.error if ctx.error == errno.ELOOP else 0
