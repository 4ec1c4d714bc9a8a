"""What keys/ modules beyond keyctl.py may use of the service (``internal.h``).

:mod:`keyfence.keys.upcall` (request_key's construction) works inside the
service's lock on the service's tables, as the kernel's request_key.c does
through security/keys/internal.h.  It sees the service through this
Protocol, so that it need not import :mod:`keyfence.keys.keyctl` (which
imports it): the contract is written down once, here.  Every member keeps
the service's lock rules: ``_locked`` ones expect the lock held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from keyfence.keys.caller import Caller
    from keyfence.keys.key import Key
    from keyfence.keys.key_type import KeyType
    from keyfence.keys.keyring import SearchContext
    from keyfence.keys.process_keys import SpecialKeyrings
    from keyfence.keys.quota import QuotaTable
    from keyfence.keys.removal import Removal
    from keyfence.keys.removal_path import RemovalPath
    from keyfence.keys.request_key import Constructions, UpcallHook


class ServiceInternals(Protocol):
    """The parts of :class:`~keyfence.keys.keyctl.KeyService` its own units use."""

    _lock: threading.RLock
    _changed: threading.Condition
    _constructions: Constructions
    _quota: QuotaTable
    _special: SpecialKeyrings
    removals: RemovalPath
    request_key_upcall: UpcallHook | None
    process_lineage: Callable[[Caller], Iterable[tuple[int, int]]]
    _pending_new: dict[Key, object]
    """Keys an operation made for a removal that has not applied yet, by the
    operation's token: destroyed by :meth:`_discard_pending_locked` unless
    the removal's ``on_apply`` took them out."""

    def now(self) -> float: ...

    def _alloc_locked(
        self,
        key_type: KeyType,
        description: str,
        *,
        uid: int,
        gid: int,
        perm: int,
        payload: bytes = b"",
        in_quota: bool = True,
        overrun: bool = False,
    ) -> Key: ...

    def _release_locked(self, key: Key) -> None: ...

    def _discard_pending_locked(self, made: object) -> None: ...

    def _update_locked(self, key: Key, data: bytes, *, completes: bool = True) -> None: ...

    def _user_keyrings_locked(self, uid: int) -> tuple[Key, Key]: ...

    def _caller_user_keyrings_locked(self, caller: Caller) -> tuple[Key, Key]: ...

    def _process_keyrings_locked(self, caller: Caller) -> list[Key]: ...

    def _lookup_locked(
        self, caller: Caller, key_id: int, need: int, *, create: bool = False
    ) -> tuple[Key, bool]: ...

    def _search_process_keyrings_locked(
        self, caller: Caller, make_ctx: Callable[[], SearchContext]
    ) -> tuple[Key | None, int]: ...

    def _link_locked(self, ring: Key, key: Key, op: str, caller: Caller) -> Removal | None: ...

    def _bind_session_locked(
        self, caller: Caller, session: Hashable, ring: Key, op: str
    ) -> Removal | None: ...
