"""The key retention service: one method per keyctl(2) operation.

:class:`KeyService` is the model's kernel.  Every public method takes the
:class:`~keyfence.keys.process_keys.Caller` first, checks permissions as the
kernel does, and raises :class:`~keyfence.keys.errors.KeyfenceError` with the
kernel's errno on failure.  Methods are thread-safe: they take the service
lock; helpers whose name ends in ``_locked`` expect it held.

Lookups follow the kernel's lookup_user_key(): special ids resolve through
the caller's tables (creating keyrings where the kernel would); a positive
serial is *possessed* if it can be found from the caller's thread, process
and session keyrings; then the key's state is validated and the permission
checked, in that order.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from keyfence.keys import keyring as _keyring
from keyfence.keys import permission
from keyfence.keys import secret as _secret
from keyfence.keys import upcall as _upcall
from keyfence.keys.caller import Caller
from keyfence.keys.errors import KeyfenceError, fail
from keyfence.keys.fence import RemovalProgress
from keyfence.keys.gc import GarbageCollector
from keyfence.keys.key import Key, KeyringContents, KeyState
from keyfence.keys.key_type import (
    ADD_KEY_PAYLOAD_MAX,
    DESCRIPTION_MAX,
    KEYRING,
    UPDATE_PAYLOAD_MAX,
    KeyType,
    check_type_name,
    lookup_type,
)
from keyfence.keys.keyring import SearchContext
from keyfence.keys.notify import (
    MAX_WATCH_NAME,
    Dispatcher,
    DispatcherStatistics,
    KeyEvent,
    Watch,
    WatchCallback,
    WatchTable,
    is_printable_text,
)
from keyfence.keys.process_keys import (
    KEY_SPEC_GROUP_KEYRING,
    KEY_SPEC_PROCESS_KEYRING,
    KEY_SPEC_REQKEY_AUTH_KEY,
    KEY_SPEC_REQUESTOR_KEYRING,
    KEY_SPEC_SESSION_KEYRING,
    KEY_SPEC_THREAD_KEYRING,
    KEY_SPEC_USER_KEYRING,
    KEY_SPEC_USER_SESSION_KEYRING,
    SpecialKeyrings,
    boot_clock,
)
from keyfence.keys.quota import QuotaLimits, QuotaTable, QuotaUsage
from keyfence.keys.removal import Removal, wipe_payload
from keyfence.keys.removal_path import RemovalPath
from keyfence.keys.request_key import Constructions, UpcallHook
from keyfence.keys.secret import SecretBuffer
from keyfence.keys.text import as_bytes

KEYCTL_MOVE_EXCL = 0x01

SERIAL_BITS = 31


def _own_process(caller: Caller) -> tuple[tuple[int, int], ...]:
    return (caller.process,)


class _Need(Enum):
    """Checks a lookup skips: KEY_NEED_UNLINK and KEY_DEFER_PERM_CHECK."""

    UNLINK = "unlink"
    DEFER = "defer"


@dataclass(frozen=True, slots=True)
class ServiceStatistics:
    keys: int
    keyrings: int
    sessions: int
    processes: int
    users: int
    notifications: DispatcherStatistics
    """The AFTER notifications' queues (keys/notify.py Dispatcher)."""


class KeyService:
    """An in-process key retention service (the model's kernel).

    ``clock`` gives wall-clock seconds (the kernel keeps expiry in whole
    seconds of real time); ``gc_delay`` is how long revoked and expired keys
    stay linked before the collector reaps them (/proc/sys/kernel/keys/gc_delay).

    ``fenced``: False turns the fence off: every removal is applied at once,
    as an emergency one (the key is wiped and its users are told only
    afterwards), which is what the kernel does.  It exists only so that
    ``keyfence demo --without-fence`` can show the data loss the fence
    prevents; no command, option, protocol message or environment variable
    reaches it (docs/fs.md, "Turning the fence off").
    """

    def __init__(
        self,
        *,
        quota: QuotaLimits | None = None,
        gc_delay: float = 300.0,
        clock: Callable[[], float] = time.time,
        run_gc_thread: bool = True,
        fenced: bool = True,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._keys: dict[int, Key] = {}
        self._names: dict[str, dict[Key, None]] = {}
        """Published keyring names, oldest first (find_keyring_by_name)."""
        self._quota = QuotaTable(quota or QuotaLimits())
        self._special = SpecialKeyrings()
        self._changed = threading.Condition(self._lock)
        """Signalled when a removal applies or ends, or a use-guard ends."""
        self._watches = WatchTable()
        self._dispatcher = Dispatcher()
        self._guards: dict[Key, int] = {}
        self._pending_new: dict[Key, object] = {}
        """Keys made for a removal still being fenced (add displacing a key,
        joining a session keyring), with the token of the operation that
        made them; destroyed if it does not apply."""
        self.removals = RemovalPath(
            lock=self._lock,
            changed=self._changed,
            release_locked=self._release_locked,
            quota=self._quota,
            watches=self._watches,
            dispatcher=self._dispatcher,
            guards=self._guards,
            clock=clock,
            wait_for_users=fenced,
        )
        """Runs every removal (keys/removal_path.py); the collector holds it too."""
        self.gc = GarbageCollector(
            self.removals, delay=gc_delay, clock=clock, threaded=run_gc_thread
        )
        self._constructions = Constructions()
        """Keys request_key() is constructing (keys/request_key.py)."""
        self.request_key_upcall: UpcallHook | None = None
        """Runs the handler of a construction (the daemon's); None: no
        handler can be run, as when /sbin/request-key is missing."""
        self.process_lineage: Callable[[Caller], Iterable[tuple[int, int]]] = _own_process
        """The caller's process, then its ancestors, as (pid, start time):
        who may act for a construction (the daemon reads /proc)."""

    # ------------------------------------------------------------------ helpers

    @property
    def waits_for_users(self) -> bool:
        """Whether removals wait for their keys' users (always, but in the demo)."""
        return self.removals.wait_for_users

    def now(self) -> float:
        return self._clock()

    def _new_serial_locked(self) -> int:
        while True:
            serial = secrets.randbits(SERIAL_BITS)
            if serial >= 3 and serial not in self._keys:
                return serial

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
    ) -> Key:
        """Create a key (charged to ``uid``'s quota), not yet linked anywhere."""
        quotalen = len(as_bytes(description)) + 1 + key_type.def_datalen + len(payload)
        self._quota.charge_locked(uid, quotalen, in_quota=in_quota, overrun=overrun)
        key = Key(
            self._new_serial_locked(),
            key_type,
            description,
            uid=uid,
            gid=gid,
            perm=perm,
            quotalen=quotalen,
            in_quota=in_quota,
        )
        if key_type.is_keyring:
            key.contents = KeyringContents()
            if description and not description.startswith("."):
                self._names.setdefault(description, {})[key] = None
        else:
            key.payload = _secret.store(payload)
        self._keys[key.serial] = key
        return key

    def _release_locked(self, key: Key) -> None:
        """Forget a destroyed key: serial, quota, published name."""
        self._keys.pop(key.serial, None)
        self._quota.refund_locked(key.uid, key.quotalen, in_quota=key.in_quota)
        names = self._names.get(key.description)
        if names is not None:
            names.pop(key, None)
            if not names:
                del self._names[key.description]

    # -- special keyrings (process_keys.c)

    def _user_keyrings_locked(self, uid: int) -> tuple[Key, Key]:
        """@u and @us of ``uid``, created on first use (look_up_user_keyrings)."""
        pair = self._special.users.get(uid)
        if pair is None:
            perm = permission.USER_KEYRING_PERM
            user = self._alloc_locked(
                KEYRING, f"_uid.{uid}", uid=uid, gid=-1, perm=perm, overrun=True
            )
            user_session = self._alloc_locked(
                KEYRING, f"_uid_ses.{uid}", uid=uid, gid=-1, perm=perm, overrun=True
            )
            _keyring.link_locked(user_session, user, self._quota)
            user.anchors += 1
            user_session.anchors += 1
            pair = self._special.users[uid] = (user, user_session)
        return pair

    def _caller_user_keyrings_locked(self, caller: Caller) -> tuple[Key, Key]:
        """look_up_user_keyrings() for a caller's @u, @us (and @s fallback).

        The kernel finds both keyrings by searching its per-namespace
        register, as their possessor: one that was invalidated is gone from
        the register and made anew (a new @us links the old @u); one found
        but revoked, expired or not searchable makes *both* lookups fail
        with ENOKEY (observed: KERNEL_FACTS.md, "User keyrings").
        """
        owner = caller.user_keyrings_uid
        pair = self._special.users.get(owner)
        if pair is None:
            return self._user_keyrings_locked(owner)
        user, user_session = pair
        gone = (KeyState.INVALIDATED, KeyState.DEAD)
        if user.state in gone or user_session.state in gone:
            perm = permission.USER_KEYRING_PERM
            if user.state in gone:
                self._drop_user_keyring_locked(user)
                user = self._alloc_locked(
                    KEYRING, f"_uid.{owner}", uid=owner, gid=-1, perm=perm, overrun=True
                )
                user.anchors += 1
            if user_session.state in gone:
                self._drop_user_keyring_locked(user_session)
                user_session = self._alloc_locked(
                    KEYRING,
                    f"_uid_ses.{owner}",
                    uid=owner,
                    gid=-1,
                    perm=perm,
                    overrun=True,
                )
                user_session.anchors += 1
                _keyring.link_locked(user_session, user, self._quota)
            pair = self._special.users[owner] = (user, user_session)
        now = self.now()
        for ring in pair:
            if (
                ring.state is not KeyState.VALID
                or ring.is_expired(now)
                or not permission.allowed(ring, caller, permission.SEARCH, possessed=True)
            ):
                raise fail(errno.ENOKEY, "the user keyrings cannot be found")
        return pair

    def _drop_user_keyring_locked(self, ring: Key) -> None:
        """Let go of a user keyring that was invalidated; destroy it if
        nothing else holds it (the removal left it for its anchor)."""
        ring.anchors -= 1
        if ring.state is not KeyState.DEAD and not ring.parents and not ring.anchors:
            ring.state = KeyState.DEAD
            wipe_payload(ring)
            self._release_locked(ring)

    def _new_private_keyring_locked(self, caller: Caller, description: str, perm: int) -> Key:
        key = self._alloc_locked(
            KEYRING, description, uid=caller.uid, gid=caller.gid, perm=perm, overrun=True
        )
        key.anchors += 1
        return key

    def _special_locked(self, caller: Caller, spec: int, create: bool) -> Key:
        tables = self._special
        if spec == KEY_SPEC_THREAD_KEYRING:
            key = tables.thread_keyring(caller)
            if key is None:
                if not create:
                    raise fail(errno.ENOKEY)
                perm = permission.PROCESS_KEYRING_PERM
                key = self._new_private_keyring_locked(caller, "_tid", perm)
                tables.threads[caller.thread] = key
                tables.made_in_locked(caller)
            return key
        if spec == KEY_SPEC_PROCESS_KEYRING:
            key = tables.process_keyring(caller)
            if key is None:
                if not create:
                    raise fail(errno.ENOKEY)
                perm = permission.PROCESS_KEYRING_PERM
                key = self._new_private_keyring_locked(caller, "_pid", perm)
                tables.processes[caller.process] = key
                tables.made_in_locked(caller)
            return key
        if spec == KEY_SPEC_SESSION_KEYRING:
            key = tables.session_keyring(caller)
            if key is None:
                if not create or caller.session is None:
                    return self._caller_user_keyrings_locked(caller)[1]
                perm = permission.SESSION_KEYRING_PERM
                key = self._new_private_keyring_locked(caller, "_ses", perm)
                tables.sessions[caller.session] = key
                tables.bound_at[caller.session] = boot_clock()
            return key
        if spec == KEY_SPEC_USER_KEYRING:
            return self._caller_user_keyrings_locked(caller)[0]
        if spec == KEY_SPEC_USER_SESSION_KEYRING:
            return self._caller_user_keyrings_locked(caller)[1]
        if spec in (KEY_SPEC_REQKEY_AUTH_KEY, KEY_SPEC_REQUESTOR_KEYRING):
            return _upcall.special_locked(self, caller, spec)
        if spec == KEY_SPEC_GROUP_KEYRING:
            raise fail(errno.EINVAL, "group keyrings are not supported")
        raise fail(errno.EINVAL, f"bad key id {spec}")

    def _process_keyrings_locked(self, caller: Caller) -> list[Key]:
        """What search_process_keyrings() looks through, in order."""
        rings = []
        thread = self._special.thread_keyring(caller)
        if thread is not None:
            rings.append(thread)
        process = self._special.process_keyring(caller)
        if process is not None:
            rings.append(process)
        session = self._special.session_keyring(caller)
        if session is None:
            session = self._user_keyrings_locked(caller.user_keyrings_uid)[1]
        rings.append(session)
        if self._constructions:
            rings.extend(
                r for r in _upcall.requester_keyrings_locked(self, caller) if r not in rings
            )
        return rings

    def _search_process_keyrings_locked(
        self,
        caller: Caller,
        make_ctx: Callable[[], SearchContext],
    ) -> tuple[Key | None, int]:
        """Search the caller's keyrings; (key, 0) or (None, errno).

        As the kernel decides: the first match wins; failing that, "nothing
        matched" anywhere beats the reasons other keyrings gave.
        """
        nothing = False
        error = errno.EAGAIN
        for ring in self._process_keyrings_locked(caller):
            ctx = make_ctx()
            found = self._search_one_locked(ring, ctx, possessed=True)
            if found is not None:
                return found, 0
            if ctx.error == errno.EAGAIN:
                nothing = True
            else:
                error = ctx.error
        return None, errno.EAGAIN if nothing else error

    def _search_one_locked(self, ring: Key, ctx: SearchContext, *, possessed: bool) -> Key | None:
        """keyring_search_rcu(): the top keyring must be searchable."""
        if not ring.is_keyring:
            ctx.error = errno.ENOTDIR
            return None
        ctx.possessed = possessed
        if ctx.caller is not None and not permission.allowed(
            ring, ctx.caller, permission.SEARCH, possessed=possessed
        ):
            ctx.error = errno.EACCES
            return None
        return _keyring.search_tree_locked(ring, ctx)

    def _possessed_locked(self, caller: Caller, key: Key) -> bool:
        # Fast path: the key is one of the caller's keyrings or directly in
        # one.  Possession is "found anywhere", so order does not matter.
        rings = self._process_keyrings_locked(caller)
        search = permission.SEARCH
        if permission.allowed(key, caller, search, possessed=True):
            for ring in rings:
                if ring is key:
                    return True
                contents = ring.contents
                if (
                    contents is not None
                    and ring.state is not KeyState.REVOKED
                    and contents.by_index.get(key.index_key) is key
                    and permission.allowed(ring, caller, search, possessed=True)
                ):
                    return True
        else:
            return False
        now = self.now()

        def ctx() -> SearchContext:
            return SearchContext(
                caller=caller,
                possessed=True,
                index_key=key.index_key,
                match=lambda k: k is key,
                now=now,
                state_check=False,
            )

        found, _ = self._search_process_keyrings_locked(caller, ctx)
        return found is not None

    def _lookup_locked(
        self,
        caller: Caller,
        key_id: int,
        need: int | _Need,
        *,
        create: bool = False,
    ) -> tuple[Key, bool]:
        """lookup_user_key(): the key and whether the caller possesses it."""
        if key_id < 0:
            key = self._special_locked(caller, key_id, create)
            possessed = True
        elif key_id == 0:
            raise fail(errno.EINVAL, "key id 0")
        else:
            found = self._keys.get(key_id)
            # an invalidated key the removal path kept for its anchor (a
            # user or session keyring) is as gone as the kernel's gc makes it
            if found is None or not found.is_live() or found.state is KeyState.INVALIDATED:
                raise fail(errno.ENOKEY)
            key = found
            # possession first, as lookup_user_key finds it: a handler's
            # child that waits below possesses the key through the
            # requester's keyrings, though the authority ends as it wakes
            possessed = self._possessed_locked(caller, key)
            if self._constructions.by_key:
                # KEY_LOOKUP_PARTIAL: describe, chown, setperm, timeout, unlink
                partial = need in (permission.VIEW, permission.SETATTR, _Need.UNLINK, _Need.DEFER)
                _upcall.check_constructed_locked(self, key, partial=partial)
        if isinstance(need, int):
            key.validate(self.now())
            permission.check(key, caller, need, possessed=possessed)
        return key, possessed

    def _keyring_locked(
        self, caller: Caller, key_id: int, need: int, *, create: bool = False
    ) -> tuple[Key, bool]:
        ring, possessed = self._lookup_locked(caller, key_id, need, create=create)
        if not ring.is_keyring:
            raise fail(errno.ENOTDIR)
        return ring, possessed

    def _link_locked(self, ring: Key, key: Key, op: str, caller: Caller) -> Removal | None:
        """key_link(): link ``key`` into ``ring`` now if that takes nothing away.

        If it displaces another key, the displacement is returned as a
        removal for the caller to run, with the link made in the same step.
        """
        if not ring.is_keyring:
            raise fail(errno.ENOTDIR)
        if not key.is_live():
            raise fail(errno.ENOKEY)
        if key.is_keyring:
            loop = _keyring.detect_cycle_locked(ring, key, self.now())
            if loop:
                raise fail(loop)
        assert ring.contents is not None
        old = ring.contents.find(key.index_key)
        if old is key:
            # linked again: the kernel tells the keyring's watchers all the same
            self.removals.notify_locked([(ring, KeyEvent.LINKED, key.serial)], caller, op)
            return None
        if old is None:
            _keyring.link_locked(ring, key, self._quota)
            self.removals.notify_locked([(ring, KeyEvent.LINKED, key.serial)], caller, op)
            return None
        return Removal(op, caller, unlinks=[(ring, old)], links=[(ring, key)])

    # ------------------------------------------------------------- operations

    def add_key(
        self,
        caller: Caller,
        type_name: str,
        description: str | None,
        payload: bytes | None,
        keyring: int,
    ) -> int:
        """add_key(2): create a key in ``keyring``, or update the one there.

        Errors: EPERM (type or keyring description starting with '.'),
        EINVAL (bad description or payload), ENODEV (unknown type), ENOTDIR,
        EACCES (no write on the keyring or on the key to update), EDQUOT,
        and the keyring lookup's errors.  A new keyring displacing one of the
        same name goes through the removal path (the old one's watchers are
        fenced) and may fail as removals do.
        """
        # the kernel's order: the syscall's checks (payload size first),
        # the keyring lookup, then key_create_or_update's: the type, "not a
        # keyring", the type's preparse, the description
        data = payload or b""
        if len(data) > ADD_KEY_PAYLOAD_MAX:
            raise fail(errno.EINVAL, "payload too large")
        check_type_name(type_name)
        if description is not None and len(as_bytes(description)) > DESCRIPTION_MAX:
            raise fail(errno.EINVAL, "description too long")
        if description == "":
            description = None
        if description is not None and type_name == "keyring" and description.startswith("."):
            raise fail(errno.EPERM, "keyring names starting with '.' are reserved")
        made = object()  # this call's token for the keys it makes

        def build() -> tuple[Removal | None, int]:
            ring, ring_possessed = self._lookup_locked(
                caller, keyring, permission.WRITE, create=True
            )
            key_type = lookup_type(type_name)
            if not ring.is_keyring:
                raise fail(errno.ENOTDIR)
            prepared = key_type.preparse(data)
            if description is None:
                raise fail(errno.EINVAL, "a description is required")
            key_type.vet_description(description)
            assert ring.contents is not None
            existing = ring.contents.find((type_name, description))
            # as the kernel: an expired key is updated in place, and lives again
            if (
                key_type.updatable
                and existing is not None
                and existing.state in (KeyState.VALID, KeyState.EXPIRED)
            ):
                # found through the keyring: possessed if the keyring is
                permission.check(existing, caller, permission.WRITE, possessed=ring_possessed)
                self._update_locked(existing, prepared)
                self.removals.notify_locked([(existing, KeyEvent.UPDATED, None)], caller, "add")
                return None, existing.serial
            perm = permission.default_perm(
                readable=key_type.readable, writable=key_type.updatable or key_type.is_keyring
            )
            key = self._alloc_locked(
                key_type, description, uid=caller.uid, gid=caller.gid, perm=perm, payload=prepared
            )
            if existing is None:
                try:
                    _keyring.link_locked(ring, key, self._quota)
                except OSError:
                    self._pending_new[key] = made
                    raise
                self.removals.notify_locked([(ring, KeyEvent.LINKED, key.serial)], caller, "add")
                return None, key.serial
            # displacing a key: keep the new one anchored until the removal
            # links it, so a re-run of build() cannot leak it
            self._pending_new[key] = made
            removal = Removal("add", caller, unlinks=[(ring, existing)], links=[(ring, key)])
            removal.on_apply.append(lambda: self._pending_new.pop(key, None))
            return removal, key.serial

        try:
            return self.removals.run_for(build)
        finally:
            with self._lock:
                self._discard_pending_locked(made)

    def _discard_pending_locked(self, made: object) -> None:
        """Destroy keys an operation (``made``: its token) made for a removal
        that did not apply (it failed, or build() ran again and made another)."""
        for key in [k for k, token in self._pending_new.items() if token is made]:
            del self._pending_new[key]
            unlinked = not key.parents and not key.anchors
            if unlinked and self._keys.get(key.serial) is key:
                key.state = KeyState.DEAD
                wipe_payload(key)
                self._release_locked(key)

    def _update_locked(self, key: Key, data: bytes, *, completes: bool = True) -> None:
        """Replace ``key``'s payload.  ``completes``: a key under construction
        is thereby instantiated (add_key, update); False for the upcall's own
        instantiate, which completes the construction itself."""
        old = key.payload
        delta = len(data) - (len(old) if old is not None else 0)
        if key.in_quota:
            self._quota.resize_locked(key.uid, delta)
        key.quotalen += delta
        key.payload = _secret.store(data)
        key.expiry = None  # an update clears the timeout, as user_update() does
        key.state = KeyState.VALID
        if completes and self._constructions.by_key:
            _upcall.updated_locked(self, key)
        if old is not None:
            old.wipe()

    def update(self, caller: Caller, key_id: int, payload: bytes | None) -> None:
        """KEYCTL_UPDATE: replace a key's payload (write permission).

        Errors: EINVAL (payload), EOPNOTSUPP (keyrings), EACCES, EDQUOT,
        EKEYREVOKED, EKEYEXPIRED, ENOKEY.
        """
        data = payload or b""
        if len(data) > UPDATE_PAYLOAD_MAX:
            raise fail(errno.EINVAL, "payload too large")
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, permission.WRITE)
            if not key.type.updatable:
                raise fail(errno.EOPNOTSUPP)
            data = key.type.preparse(data)
            self._update_locked(key, data)
            self.removals.notify_locked([(key, KeyEvent.UPDATED, None)], caller, "update")

    def request_key(
        self,
        caller: Caller,
        type_name: str,
        description: str,
        callout: str | None = None,
        dest_keyring: int = 0,
    ) -> int:
        """request_key(2): find a key from the caller's keyrings, or, given
        ``callout``, have a handler construct it (keys/upcall.py)."""
        return _upcall.request_key(self, caller, type_name, description, callout, dest_keyring)

    def instantiate(self, caller: Caller, key_id: int, payload: bytes | None, keyring: int) -> None:
        """KEYCTL_INSTANTIATE, by a handler holding the key's authority."""
        _upcall.instantiate(self, caller, key_id, payload, keyring)

    def reject(self, caller: Caller, key_id: int, timeout: int, error: int, keyring: int) -> None:
        """KEYCTL_REJECT (KEYCTL_NEGATE: ``error`` ENOKEY), by a handler."""
        _upcall.reject(self, caller, key_id, timeout, error, keyring)

    def assume_authority(self, caller: Caller, key_id: int) -> int:
        """KEYCTL_ASSUME_AUTHORITY."""
        return _upcall.assume_authority(self, caller, key_id)

    def acts_for_construction(self, caller: Caller) -> bool:
        """Whether ``caller`` holds the authority over a key under
        construction (a request-key handler, or a child of one).  Asked by
        the daemon's loop for each request bound for a lane: with nothing
        under construction (nearly always) it takes no lock, since a
        handler runs only once its construction is in the table."""
        if not self._constructions:
            return False
        with self._lock:
            return _upcall.authority_locked(self, caller) is not None

    def get_keyring_id(self, caller: Caller, key_id: int, create: bool = False) -> int:
        """KEYCTL_GET_KEYRING_ID: resolve an id, creating special keyrings if
        asked; the key must be valid and grant search."""
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, permission.SEARCH, create=create)
            return key.serial

    def join_session_keyring(self, caller: Caller, name: str | None = None) -> int:
        """KEYCTL_JOIN_SESSION_KEYRING: a new anonymous session keyring, or
        join (creating if need be) the keyring called ``name``.

        Only the caller's own binding changes (its children forked later
        inherit it); the keyring it had is released, through the removal
        path if nothing else holds it.  Returns the keyring's serial, or 0
        when the caller already has that keyring (as the kernel answers).
        Errors: EINVAL (empty name, no binding), EPERM (a name starting
        with '.'), EDQUOT, and the fence's.
        """
        session = caller.session
        if name is not None and (not name or len(as_bytes(name)) > DESCRIPTION_MAX):
            raise fail(errno.EINVAL, "a session keyring name is 1 to 4095 bytes")
        if name is not None and name.startswith("."):
            raise fail(errno.EPERM, "keyring names starting with '.' are reserved")
        if session is None:
            raise fail(errno.EINVAL, "the caller has no session to join a keyring for")
        made = object()  # this call's token for the keyring it makes

        def build() -> tuple[Removal | None, int]:
            ring = self._find_keyring_by_name_locked(caller, name) if name else None
            if ring is None:
                named = bool(name)
                ring = self._alloc_locked(
                    KEYRING,
                    name or "_ses",
                    uid=caller.uid,
                    gid=caller.gid,
                    perm=permission.NAMED_SESSION_KEYRING_PERM
                    if named
                    else permission.SESSION_KEYRING_PERM,
                    overrun=not named,
                )
                self._pending_new[ring] = made
            if self._special.sessions.get(session) is ring:
                return None, 0  # the kernel answers 0 when already joined
            return (
                self._bind_session_locked(caller, session, ring, "join_session_keyring"),
                ring.serial,
            )

        try:
            return self.removals.run_for(build)
        finally:
            with self._lock:
                self._discard_pending_locked(made)

    def session_to_parent(
        self,
        caller: Caller,
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """KEYCTL_SESSION_TO_PARENT: give the caller's session keyring (its
        user-session keyring if it has none) to its parent, replacing the
        parent's, as keyctl's ``new_session`` does after joining.

        The kernel's rules (keyctl_session_to_parent()): the caller needs
        link permission on its session keyring; the parent is not init and
        is single-threaded; its real, effective and saved uid equal the
        caller's (effective) uid and likewise its gids; both the parent's
        current session keyring and the caller's are owned by the caller's
        uid.  Root has no bypass.  Nothing happens when the parent already
        has that keyring.  The parent's old keyring is released through the
        removal path.
        Errors: EPERM (any rule above, or no parent known), EACCES, and the
        fence's.
        """
        parent = caller.parent

        def build() -> Removal | None:
            ring, _ = self._lookup_locked(caller, KEY_SPEC_SESSION_KEYRING, permission.LINK)
            if parent is None or parent.pid <= 1:
                raise fail(errno.EPERM, "the caller's parent cannot take a session keyring")
            if parent.threads != 1:
                raise fail(errno.EPERM, "the parent is not single-threaded")
            old = self._special.sessions.get(parent.session)
            if old is ring or (
                old is None and ring is self._user_keyrings_locked(caller.user_keyrings_uid)[1]
            ):
                return None
            uid, gid = caller.uid, caller.gid
            if any(u != uid for u in parent.uids) or any(g != gid for g in parent.gids):
                raise fail(errno.EPERM, "the parent runs with other credentials")
            if (old is not None and old.uid != uid) or ring.uid != uid:
                raise fail(errno.EPERM, "the session keyring belongs to another user")
            return self._bind_session_locked(caller, parent.session, ring, "session_to_parent")

        self.removals.run(build, timeout=timeout, emergency=emergency, progress=progress)

    def _bind_session_locked(
        self, caller: Caller, session: Hashable, ring: Key, op: str
    ) -> Removal | None:
        """Point ``session`` at ``ring``: now if it had no keyring, else as
        a removal releasing the old one (which stays the binding's keyring
        until the removal applies)."""
        tables = self._special
        old = tables.sessions.get(session)

        def switch() -> None:
            self._pending_new.pop(ring, None)
            if not ring.is_live():  # ended while the old keyring's users flushed
                tables.sessions.pop(session, None)
                tables.bound_at.pop(session, None)
                return
            ring.anchors += 1
            tables.sessions[session] = ring
            tables.bound_at[session] = boot_clock()

        if old is None:
            switch()
            return None
        removal = Removal(op, caller, releases=[old])
        removal.on_apply.append(switch)
        return removal

    def inherit_session(
        self, child: Hashable, parent: Hashable, child_started: float | None = None
    ) -> bool:
        """Bind ``child`` to ``parent``'s session keyring, as fork does.

        ``child_started`` (boot_clock() seconds, rounded up): a child that
        started before the parent got its keyring did not inherit it, and
        is left alone.  Nothing goes away, so no fence.  True if ``child``
        has a binding afterwards.
        """
        with self._lock:
            tables = self._special
            if child in tables.sessions:
                return True
            ring = tables.sessions.get(parent)
            if ring is None or not ring.is_live():
                return False
            since = tables.bound_at.get(parent, 0.0)
            if child_started is not None and child_started < since:
                return False
            ring.anchors += 1
            tables.sessions[child] = ring
            tables.bound_at[child] = since if child_started is None else child_started
            return True

    def drop_shared_session(self, pid: int, start_time: int) -> bool:
        """Forget a gone process's session binding at once if that takes
        nothing away: it has no process or thread keyring and other
        bindings hold its keyring.  False: process_exited() is needed."""
        me = (pid, start_time)
        with self._lock:
            tables = self._special
            ring = tables.sessions.get(me)
            if ring is None or ring.anchors < 2 or me in tables.processes:
                return False
            if tables.threads_of(pid, start_time):
                return False
            del tables.sessions[me]
            tables.bound_at.pop(me, None)
            ring.anchors -= 1
            return True

    def session_binding(self, session: Hashable) -> int:
        """Serial of the keyring bound to ``session``; 0 if none."""
        with self._lock:
            ring = self._special.sessions.get(session)
            return ring.serial if ring is not None else 0

    def _find_keyring_by_name_locked(self, caller: Caller, name: str) -> Key | None:
        for ring in self._names.get(name, ()):
            if ring.state is not KeyState.VALID:
                continue
            if permission.allowed(ring, caller, permission.SEARCH, possessed=False):
                return ring
        return None

    def revoke(
        self,
        caller: Caller,
        key_id: int,
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """KEYCTL_REVOKE: the key (write or setattr permission) becomes unusable.

        Its payload is wiped at once; a revoked keyring loses its links.  It
        stays listed until the collector reaps it after ``gc_delay``.
        ``timeout``/``emergency``/``progress`` as for every removal
        (docs/notifications.md).
        """

        def build() -> Removal:
            try:
                key, _ = self._lookup_locked(caller, key_id, permission.WRITE)
            except OSError as err:
                if err.errno != errno.EACCES:
                    raise
                key, _ = self._lookup_locked(caller, key_id, permission.SETATTR)
            return Removal("revoke", caller, kills={key: KeyState.REVOKED})

        self.removals.run(build, timeout=timeout, emergency=emergency, progress=progress)

    def invalidate(
        self,
        caller: Caller,
        key_id: int,
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """KEYCTL_INVALIDATE: the key (search permission) is unlinked
        everywhere and destroyed now."""

        def build() -> Removal:
            key, _ = self._lookup_locked(caller, key_id, permission.SEARCH)
            return Removal("invalidate", caller, kills={key: KeyState.INVALIDATED})

        self.removals.run(build, timeout=timeout, emergency=emergency, progress=progress)

    def invalidate_filesystem_key(
        self,
        caller: Caller,
        key_id: int,
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """fscrypt's FS_IOC_REMOVE_ENCRYPTION_KEY(_ALL_USERS) for a
        filesystem key (a ``logon`` or ``user`` key described
        ``keyfence:...`` or ``ext4:...``, what a mount looks up):
        invalidated through the fence whatever the caller's keyrings hold,
        by the key's owner or an admin.  Errors: ENOKEY, EKEYREVOKED,
        EACCES (not the caller's, or not a filesystem key)."""

        def build() -> Removal:
            key, _ = self._lookup_locked(caller, key_id, _Need.DEFER)
            key.validate(self.now())
            filesystem_key = key.type.name in ("logon", "user") and (
                key.description.startswith(("keyfence:", "ext4:"))
            )
            if not filesystem_key or (key.uid != caller.uid and not caller.is_admin):
                raise fail(errno.EACCES)
            return Removal("invalidate", caller, kills={key: KeyState.INVALIDATED})

        self.removals.run(build, timeout=timeout, emergency=emergency, progress=progress)

    def clear(
        self,
        caller: Caller,
        keyring: int,
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """KEYCTL_CLEAR: unlink everything from a keyring (write permission).

        What goes is what the keyring held when the call was made; a key
        linked while the watchers flush stays.
        """

        def build() -> Removal | None:
            ring, _ = self._keyring_locked(caller, keyring, permission.WRITE, create=True)
            assert ring.contents is not None
            if not len(ring.contents):
                # the kernel tells a keyring's watchers it was cleared, even empty
                self.removals.notify_locked([(ring, KeyEvent.CLEARED, None)], caller, "clear")
                return None
            return Removal("clear", caller, unlinks=[(ring, k) for k in ring.contents])

        self.removals.run(build, timeout=timeout, emergency=emergency, progress=progress)

    def link(self, caller: Caller, key_id: int, keyring: int) -> None:
        """KEYCTL_LINK: link a key (link permission) into a keyring (write).

        Errors: EDEADLK (would make a cycle), ELOOP (nesting too deep),
        ENOTDIR, EACCES, EKEYREVOKED, EKEYEXPIRED, ENOKEY.
        """

        def build() -> Removal | None:
            ring, _ = self._lookup_locked(caller, keyring, permission.WRITE, create=True)
            key, _ = self._lookup_locked(caller, key_id, permission.LINK, create=True)
            return self._link_locked(ring, key, "link", caller)

        self.removals.run(build)

    def unlink(
        self,
        caller: Caller,
        key_id: int,
        keyring: int,
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """KEYCTL_UNLINK: remove a link (write permission on the keyring only).

        Errors: ENOENT (not linked there), ENOTDIR, EACCES, ENOKEY.
        """

        def build() -> Removal:
            ring, _ = self._lookup_locked(caller, keyring, permission.WRITE)
            key, _ = self._lookup_locked(caller, key_id, _Need.UNLINK)
            if not ring.is_keyring:
                raise fail(errno.ENOTDIR)
            assert ring.contents is not None
            # as the kernel: what goes is the keyring's entry for the key's
            # type and description, which may be another key of that name
            linked = ring.contents.find(key.index_key)
            if linked is None:
                raise fail(errno.ENOENT)
            return Removal("unlink", caller, unlinks=[(ring, linked)])

        self.removals.run(build, timeout=timeout, emergency=emergency, progress=progress)

    def move(
        self,
        caller: Caller,
        key_id: int,
        from_keyring: int,
        to_keyring: int,
        flags: int = 0,
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """KEYCTL_MOVE: unlink from one keyring and link into another atomically.

        Errors: EINVAL (flags), EEXIST (KEYCTL_MOVE_EXCL and the target holds
        a key of that type and description), ENOENT, EDEADLK, ELOOP, ENOTDIR,
        EACCES.
        """
        if flags & ~KEYCTL_MOVE_EXCL:
            raise fail(errno.EINVAL, "unknown move flags")

        def build() -> Removal | None:
            key, _ = self._lookup_locked(caller, key_id, permission.LINK, create=True)
            src, _ = self._lookup_locked(caller, from_keyring, permission.WRITE)
            dst, _ = self._lookup_locked(caller, to_keyring, permission.WRITE, create=True)
            if src is dst:
                return None
            if not src.is_keyring or not dst.is_keyring:
                raise fail(errno.ENOTDIR)
            assert src.contents is not None and dst.contents is not None
            # unlinked from src by type and description, as unlink() does
            leaving = src.contents.find(key.index_key)
            if leaving is None:
                raise fail(errno.ENOENT)
            old = dst.contents.find(key.index_key)
            if old is None:
                # the link is charged before anything is cut: a move that
                # fails here leaves the key where it was (key_move())
                _keyring.check_link_quota_locked(dst, self._quota)
            if old is not None and flags & KEYCTL_MOVE_EXCL:
                raise fail(errno.EEXIST)
            if key.is_keyring:
                loop = _keyring.detect_cycle_locked(dst, key, self.now())
                if loop:
                    raise fail(loop)
            unlinks = [(src, leaving)]
            if old is not None and old is not key:
                unlinks.append((dst, old))
            return Removal("move", caller, unlinks=unlinks, links=[(dst, key)])

        self.removals.run(build, timeout=timeout, emergency=emergency, progress=progress)

    def search(
        self, caller: Caller, keyring: int, type_name: str, description: str, dest_keyring: int = 0
    ) -> int:
        """KEYCTL_SEARCH: find a key in a keyring tree (search permission).

        The found key is linked into ``dest_keyring`` if one is given.
        Errors: ENOKEY (no such key), EKEYREVOKED / EKEYEXPIRED / EACCES (the
        only matches were unusable), ENOTDIR.
        """
        check_type_name(type_name)
        if len(as_bytes(description)) > DESCRIPTION_MAX:
            raise fail(errno.EINVAL, "description too long")

        def build() -> tuple[Removal | None, int]:
            ring, possessed = self._lookup_locked(caller, keyring, permission.SEARCH)
            dest = None
            if dest_keyring:
                dest, _ = self._lookup_locked(caller, dest_keyring, permission.WRITE, create=True)
            key_type = lookup_type(type_name, missing=errno.ENOKEY)
            ctx = SearchContext(
                caller=caller,
                possessed=possessed,
                index_key=(key_type.name, description),
                match=lambda k: True,
                now=self.now(),
            )
            found = self._search_one_locked(ring, ctx, possessed=possessed)
            if found is None:
                raise fail(errno.ENOKEY if ctx.error == errno.EAGAIN else ctx.error)
            negative = _upcall.negative_error_locked(self, found)
            if negative:
                raise fail(negative)
            if dest is None:
                return None, found.serial
            permission.check(found, caller, permission.LINK, possessed=possessed)
            return self._link_locked(dest, found, "search", caller), found.serial

        return self.removals.run_for(build)

    def read(self, caller: Caller, key_id: int) -> bytes:
        """KEYCTL_READ: a key's payload, or a keyring's serials (native int32s).

        Needs read permission, or possession.  Errors: EOPNOTSUPP (logon),
        EACCES, EKEYREVOKED, EKEYEXPIRED, ENOKEY.
        """
        with self._lock:
            try:
                key, possessed = self._lookup_locked(caller, key_id, _Need.DEFER)
            except OSError as err:
                # keyctl_read_key() answers ENOKEY for any failed lookup
                raise fail(errno.ENOKEY) from err
            if self._constructions.by_key:
                # its lookup is not KEY_LOOKUP_PARTIAL: a key under
                # construction is waited for, not read empty
                _upcall.check_constructed_locked(self, key, partial=False)
            readable = permission.allowed(key, caller, permission.READ, possessed=False)
            if not possessed and not readable:
                raise fail(errno.EACCES)
            negative = _upcall.negative_error_locked(self, key)
            if negative:
                raise fail(negative)
            if not key.type.readable:
                raise fail(errno.EOPNOTSUPP)
            key.validate(self.now())
            if key.contents is not None:
                serials = [k.serial for k in key.contents]
                return struct.pack(f"={len(serials)}i", *serials)
            assert key.payload is not None
            return key.payload.reveal()

    def list_keyring(self, caller: Caller, keyring: int) -> list[int]:
        """The serials a keyring links, in link order (read() decoded)."""
        data = self.read(caller, keyring)
        with self._lock:
            key, _ = self._lookup_locked(caller, keyring, _Need.DEFER)
            if not key.is_keyring:
                raise fail(errno.ENOTDIR)
        return list(struct.unpack(f"={len(data) // 4}i", data))

    def _viewed_locked(self, caller: Caller, key_id: int, *, authority_errors: bool) -> Key:
        """The key describe and get_security show: one the caller may view,
        or one whose construction it holds the authority over (a handler
        views the key it instantiates whatever its permissions).  Without
        that authority the lookup's EACCES stands (describe), or the
        authority's own error (ENOKEY, EKEYREVOKED) replaces it
        (get_security), as in the kernel's keyctl.c."""
        try:
            return self._lookup_locked(caller, key_id, permission.VIEW)[0]
        except KeyfenceError as denied:
            if denied.errno != errno.EACCES:
                raise
            try:
                _upcall.check_view_authority_locked(self, caller, key_id)
            except KeyfenceError:
                if authority_errors:
                    raise
                raise denied from None
        return self._lookup_locked(caller, key_id, _Need.DEFER)[0]

    def describe(self, caller: Caller, key_id: int) -> str:
        """KEYCTL_DESCRIBE: "type;uid;gid;perm;description".

        Errors: ENOKEY, EKEYREVOKED, EKEYEXPIRED, EACCES (no view
        permission and no authority over the key's construction)."""
        with self._lock:
            key = self._viewed_locked(caller, key_id, authority_errors=False)
            gid = key.gid if key.gid != -1 else 65534
            uid = key.uid if key.uid != -1 else 65534
            # the kernel prints them with %d: 4294967294 is -2
            uid, gid = (n - (1 << 32) if n >= 1 << 31 else n for n in (uid, gid))
            return f"{key.type.name};{uid};{gid};{key.perm:08x};{key.description}"

    def chown(self, caller: Caller, key_id: int, uid: int, gid: int) -> None:
        """KEYCTL_CHOWN: change owner (admin only) and group (a group the
        caller is in, or admin); -1 leaves a field alone.  The quota charge
        moves with the key (EDQUOT if the new owner has no room)."""
        if uid == -1 and gid == -1:
            return
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, permission.SETATTR, create=True)
            if not caller.is_admin:
                if uid != -1 and uid != key.uid:
                    raise fail(errno.EACCES)
                if gid != -1 and gid != key.gid and not caller.in_group(gid):
                    raise fail(errno.EACCES)
            if uid != -1 and uid != key.uid:
                self._quota.transfer_locked(key.uid, uid, key.quotalen, in_quota=key.in_quota)
                key.uid = uid
            if gid != -1:
                key.gid = gid
            self.removals.notify_locked([(key, KeyEvent.SETATTR, None)], caller, "chown")

    def setperm(self, caller: Caller, key_id: int, perm: int) -> None:
        """KEYCTL_SETPERM: set the mask (owner or admin, setattr permission).

        Errors: EINVAL (bits outside the mask), EACCES.
        """
        if perm & ~permission.VALID_MASK:
            raise fail(errno.EINVAL, "permission bits outside the valid mask")
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, permission.SETATTR, create=True)
            if key.uid != caller.uid and not caller.is_admin:
                raise fail(errno.EACCES)
            key.perm = perm
            self.removals.notify_locked([(key, KeyEvent.SETATTR, None)], caller, "setperm")

    def set_timeout(self, caller: Caller, key_id: int, timeout: int) -> None:
        """KEYCTL_SET_TIMEOUT: expire the key ``timeout`` seconds from now
        (0: never).  Needs setattr permission."""
        timeout &= 0xFFFFFFFF  # an unsigned int, as keyctl(2) takes it
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, permission.SETATTR, create=True)
            key.expiry = int(self.now()) + timeout if timeout else None
            if key.expiry is not None:
                self.gc.schedule_expiry(key)
            self.removals.notify_locked([(key, KeyEvent.SETATTR, None)], caller, "timeout")

    def viewable_keys(self, caller: Caller, type_name: str, description: str) -> list[int]:
        """The lines of /proc/keys that libkeyutils'
        find_key_by_type_and_desc() considers when request_key() finds
        nothing (keyctl's ``%type:desc``): the serials, lowest first, of the
        keys of that type and description the caller may view, wherever
        they are linked.  As in proc_keys_show(), possession counts only
        for a key whose possessor may view it; revoked, expired and negative
        keys are listed until the collector takes them (the caller's
        describe then skips them, as libkeyutils' does).  One pass over
        every key, under the lock; never an error."""
        wanted = (type_name, description)
        found = []
        with self._lock:
            for serial, key in self._keys.items():
                if key.index_key != wanted:
                    continue
                if not key.is_live() or key.state is KeyState.INVALIDATED:
                    continue
                possessed = bool(key.perm & permission.POS_VIEW) and self._possessed_locked(
                    caller, key
                )
                if permission.allowed(key, caller, permission.VIEW, possessed=possessed):
                    found.append(serial)
        return sorted(found)

    def get_security(self, caller: Caller, key_id: int) -> str:
        """KEYCTL_GET_SECURITY: no LSM here, so the label is always empty.

        Errors: as describe, except that a key the caller may not view
        gives ENOKEY (EKEYREVOKED if its authorisation key was revoked)
        where describe gives EACCES."""
        with self._lock:
            self._viewed_locked(caller, key_id, authority_errors=True)
            return ""

    # ------------------------------------------------- process and session end

    def process_exited(
        self,
        pid: int,
        start_time: int = 0,
        *,
        timeout: float | None = None,
        emergency: bool = False,
    ) -> None:
        """A process is gone: its process and thread keyrings go away, and
        its session binding (named (pid, start_time)) is released; the
        session keyring ends with the last process that held it.  A
        request_key authority it held is forgotten.

        If a watcher aborts the removal, the keyrings stay registered and
        the call raises; the caller (the daemon) retries.
        """
        me = (pid, start_time)

        def build() -> Removal | None:
            self._constructions.forget_process_locked(me)
            tables = self._special
            threads = tables.threads_of(pid, start_time)
            rings = [tables.threads[t] for t in threads]
            process = tables.processes.get(me)
            if process is not None:
                rings.append(process)
            session = tables.sessions.get(me)
            if session is not None:
                rings.append(session)
            if not rings:
                return None
            removal = Removal("exit", None, releases=rings)

            def forget() -> None:
                tables.processes.pop(me, None)
                tables.images.pop(me, None)
                tables.sessions.pop(me, None)
                tables.bound_at.pop(me, None)
                for thread in threads:
                    tables.threads.pop(thread, None)

            removal.on_apply.append(forget)
            return removal

        self.removals.run(build, timeout=timeout, emergency=emergency)

    def exec_seen(self, caller: Caller) -> bool:
        """Whether the caller's process runs another program than the one
        its process and thread keyrings were made in (``Caller.image``): it
        has exec'd, and the kernel's exec dropped them (prepare_exec_creds).

        If so they leave the process at once, without waiting (none is
        found for it any more; a new one is made on demand), and wait for
        :meth:`release_retired` to end them through the fenced removal
        path.  The session binding and a request_key authority stay, as
        across the kernel's exec.  Unknown images (None) are not compared.
        """
        if caller.image is None:
            return False
        with self._lock:
            tables = self._special
            made_in = tables.images.get(caller.process)
            if made_in is None or made_in == caller.image:
                return False
            return tables.retire_locked(caller.pid, caller.start_time) is not None

    def retired(self) -> list[int]:
        """Tokens of the keyrings an exec took (:meth:`exec_seen`) that are
        not released yet."""
        with self._lock:
            return list(self._special.retired)

    def release_retired(self, token: int, *, timeout: float | None = None) -> None:
        """End the keyrings an exec took, through the fenced removal path.
        If a watcher aborts, they stay held and the call raises; the caller
        (the daemon) retries."""

        def build() -> Removal | None:
            rings = self._special.retired.get(token)
            if rings is None:
                return None
            removal = Removal("exec", None, releases=list(rings))
            removal.on_apply.append(lambda: self._special.retired.pop(token, None))
            return removal

        self.removals.run(build, timeout=timeout)

    def thread_exited(self, pid: int, tid: int, start_time: int = 0) -> None:
        """A thread is gone: its thread keyring goes away."""

        def build() -> Removal | None:
            ring = self._special.threads.get((pid, start_time, tid))
            if ring is None:
                return None
            removal = Removal("exit", None, releases=[ring])
            removal.on_apply.append(lambda: self._special.threads.pop((pid, start_time, tid)))
            return removal

        self.removals.run(build)

    def session_ended(
        self,
        session: Hashable,
        *,
        timeout: float | None = None,
        emergency: bool = False,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """A session binding is gone: its keyring is released (and ends if
        that was the last binding or link holding it)."""

        def build() -> Removal | None:
            ring = self._special.sessions.get(session)
            if ring is None:
                return None
            removal = Removal("session_end", None, releases=[ring])

            def forget() -> None:
                self._special.sessions.pop(session, None)
                self._special.bound_at.pop(session, None)

            removal.on_apply.append(forget)
            return removal

        self.removals.run(build, timeout=timeout, emergency=emergency, progress=progress)

    # ------------------------------------------------------ watches and guards

    def watch(
        self,
        caller: Caller,
        key_id: int,
        callback: WatchCallback,
        events: KeyEvent = KeyEvent.ALL,
        *,
        sync: bool = False,
        name: str | None = None,
    ) -> Watch:
        """Watch a key or keyring (KEYCTL_WATCH_KEY, plus synchronous watches).

        Needs view permission.  A synchronous watch -- the key's owner or an
        admin only, so nobody else can hold a removal hostage -- is called
        before the key goes away and the removal waits for it.
        Errors: EACCES; EINVAL for a ``name`` longer than MAX_WATCH_NAME or
        with control characters (it is shown to other users); the lookup's.
        """
        if name is not None and (len(name) > MAX_WATCH_NAME or not is_printable_text(name)):
            raise fail(
                errno.EINVAL,
                f"a watch name is at most {MAX_WATCH_NAME} printable characters",
            )
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, permission.VIEW)
            if sync and key.uid != caller.uid and not caller.is_admin:
                raise fail(errno.EACCES, "only the key's owner may watch it synchronously")
            watch = Watch(
                self._watches,
                key,
                events,
                callback,
                sync=sync,
                name=name or f"uid {caller.uid} pid {caller.pid}",
                owner_uid=caller.uid,
            )
            self._watches.add(watch)
            return watch

    @contextlib.contextmanager
    def use_key(self, caller: Caller, key_id: int) -> Iterator[SecretBuffer]:
        """Hold a use-guard on a key's payload for a short use (an encryption).

        A removal waits for guards to end before it applies, and refuses new
        ones from then on.  Trusted in-process users only: the payload of a
        logon key is reachable here although read() refuses it.  Needs
        search permission, as the kernel's own key users do.
        Errors: EKEYREVOKED (the key is being removed), and the lookup's.
        """
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, permission.SEARCH)
            if key.gate_closed or key.payload is None:
                raise fail(errno.EKEYREVOKED, "the key is being removed")
            self._guards[key] = self._guards.get(key, 0) + 1
            payload = key.payload
        try:
            yield payload
        finally:
            with self._lock:
                left = self._guards[key] - 1
                if left:
                    self._guards[key] = left
                else:
                    del self._guards[key]
                    self._changed.notify_all()

    def wait_for_notifications(self, timeout: float | None = None) -> bool:
        """Wait until every AFTER notification posted so far was delivered."""
        return self._dispatcher.wait_idle(timeout)

    # ------------------------------------------------------------ inspection

    def quota_usage(self, uid: int) -> QuotaUsage:
        with self._lock:
            return self._quota.usage(uid)

    def key_users(self) -> list[QuotaUsage]:
        """What /proc/key-users shows."""
        with self._lock:
            return self._quota.all_usage()

    def statistics(self) -> ServiceStatistics:
        with self._lock:
            keyrings = sum(1 for k in self._keys.values() if k.is_keyring)
            return ServiceStatistics(
                keys=len(self._keys),
                keyrings=keyrings,
                sessions=len(self._special.sessions),
                processes=len(self._special.processes),
                users=len(self._special.users),
                notifications=self._dispatcher.statistics(),
            )

    def anchored_processes(self) -> list[tuple[int, int]]:
        """(pid, start time) of every process holding a process or thread
        keyring, a session binding named by its process, or a request_key
        authority (keys/request_key.py, step 5)."""
        with self._lock:
            found = set(self._special.processes)
            found.update(self._constructions.processes_locked())
            found.update((pid, start) for pid, start, _tid in self._special.threads)
            found.update(
                s
                for s in self._special.sessions
                if type(s) is tuple and len(s) == 2 and all(type(n) is int for n in s)
            )
            return sorted(found)

    def anchored_threads(self) -> list[tuple[int, int, int]]:
        """(pid, start time, tid) of every thread other than a process's
        main one that holds a thread keyring (they end with the thread)."""
        with self._lock:
            return [t for t in self._special.threads if t[2] != t[0]]

    def anchored_sessions(self) -> list[Hashable]:
        """Every session that has a session keyring."""
        with self._lock:
            return list(self._special.sessions)

    def find_key(self, serial: int) -> Key | None:
        """The key object for tests and the service's own subsystems."""
        with self._lock:
            return self._keys.get(serial)

    def all_keys(self) -> Iterable[Key]:
        with self._lock:
            return list(self._keys.values())

    def interrupt_waits(self) -> None:
        """Wake every call waiting in the service (for a key under
        construction), so that one whose caller has gone ends (keys/waits.py)."""
        with self._lock:
            self._changed.notify_all()

    def close(self) -> None:
        """Stop the collector and notification threads."""
        self.gc.stop()
        self._dispatcher.stop()

    def __enter__(self) -> KeyService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
