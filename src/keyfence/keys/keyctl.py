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

import errno
import secrets
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from enum import Enum

from keyfence.keys import keyring as _keyring
from keyfence.keys import permission
from keyfence.keys import secret as _secret
from keyfence.keys.errors import fail
from keyfence.keys.gc import GarbageCollector
from keyfence.keys.key import Key, KeyState
from keyfence.keys.key_type import (
    ADD_KEY_PAYLOAD_MAX,
    DESCRIPTION_MAX,
    KEYRING,
    UPDATE_PAYLOAD_MAX,
    KeyType,
    lookup_type,
)
from keyfence.keys.keyring import KeyringContents, SearchContext
from keyfence.keys.permission import Perm
from keyfence.keys.process_keys import (
    KEY_SPEC_GROUP_KEYRING,
    KEY_SPEC_PROCESS_KEYRING,
    KEY_SPEC_REQKEY_AUTH_KEY,
    KEY_SPEC_REQUESTOR_KEYRING,
    KEY_SPEC_SESSION_KEYRING,
    KEY_SPEC_THREAD_KEYRING,
    KEY_SPEC_USER_KEYRING,
    KEY_SPEC_USER_SESSION_KEYRING,
    Caller,
    SpecialKeyrings,
)
from keyfence.keys.quota import QuotaLimits, QuotaTable, QuotaUsage
from keyfence.keys.removal import Removal

KEYCTL_MOVE_EXCL = 0x01
SERIAL_BITS = 31


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


class KeyService:
    """An in-process key retention service (the model's kernel).

    ``clock`` gives wall-clock seconds (the kernel keeps expiry in whole
    seconds of real time); ``gc_delay`` is how long revoked and expired keys
    stay linked before the collector reaps them (/proc/sys/kernel/keys/gc_delay).
    """

    def __init__(
        self,
        *,
        quota: QuotaLimits | None = None,
        gc_delay: float = 300.0,
        clock: Callable[[], float] = time.time,
        run_gc_thread: bool = True,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._keys: dict[int, Key] = {}
        self._names: dict[str, dict[Key, None]] = {}
        """Published keyring names, oldest first (find_keyring_by_name)."""
        self._quota = QuotaTable(quota or QuotaLimits())
        self._special = SpecialKeyrings()
        self.gc = GarbageCollector(self, delay=gc_delay, clock=clock, threaded=run_gc_thread)

    # ------------------------------------------------------------------ helpers

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
        quotalen = len(description.encode()) + 1 + key_type.def_datalen + len(payload)
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
            _keyring.link_locked(user_session, user)
            user.anchors += 1
            user_session.anchors += 1
            pair = self._special.users[uid] = (user, user_session)
        return pair

    def _new_private_keyring_locked(self, caller: Caller, description: str, perm: int) -> Key:
        key = self._alloc_locked(
            KEYRING, description, uid=caller.uid, gid=caller.gid, perm=perm, overrun=True
        )
        key.anchors += 1
        return key

    def _install_session_keyring_locked(self, session: Hashable, ring: Key) -> Removal | None:
        """Make ``ring`` the keyring of ``session``; the old one is released."""
        old = self._special.sessions.get(session)
        if old is ring:
            return None
        ring.anchors += 1
        self._special.sessions[session] = ring
        if old is None:
            return None
        return Removal("join_session_keyring", None, releases=[old])

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
            return key
        if spec == KEY_SPEC_PROCESS_KEYRING:
            key = tables.process_keyring(caller)
            if key is None:
                if not create:
                    raise fail(errno.ENOKEY)
                perm = permission.PROCESS_KEYRING_PERM
                key = self._new_private_keyring_locked(caller, "_pid", perm)
                tables.processes[caller.process] = key
            return key
        if spec == KEY_SPEC_SESSION_KEYRING:
            key = tables.session_keyring(caller)
            if key is None:
                if not create or caller.session is None:
                    return self._user_keyrings_locked(caller.uid)[1]
                key = self._alloc_locked(
                    KEYRING,
                    "_ses",
                    uid=caller.uid,
                    gid=caller.gid,
                    perm=permission.SESSION_KEYRING_PERM,
                    overrun=True,
                )
                self._install_session_keyring_locked(caller.session, key)
            return key
        if spec == KEY_SPEC_USER_KEYRING:
            return self._user_keyrings_locked(caller.uid)[0]
        if spec == KEY_SPEC_USER_SESSION_KEYRING:
            return self._user_keyrings_locked(caller.uid)[1]
        if spec in (KEY_SPEC_REQKEY_AUTH_KEY, KEY_SPEC_REQUESTOR_KEYRING):
            raise fail(errno.ENOKEY, "no request_key authorisation")
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
            session = self._user_keyrings_locked(caller.uid)[1]
        rings.append(session)
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
            ring, ctx.caller, Perm.SEARCH, possessed=possessed
        ):
            ctx.error = errno.EACCES
            return None
        return _keyring.search_tree_locked(ring, ctx)

    def _possessed_locked(self, caller: Caller, key: Key) -> bool:
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
        need: Perm | _Need,
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
            if found is None or not found.is_live():
                raise fail(errno.ENOKEY)
            key = found
            possessed = self._possessed_locked(caller, key)
        if isinstance(need, Perm):
            key.validate(self.now())
            permission.check(key, caller, need, possessed=possessed)
        return key, possessed

    def _keyring_locked(
        self, caller: Caller, key_id: int, need: Perm, *, create: bool = False
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
            return None
        if old is None:
            _keyring.link_locked(ring, key)
            return None
        return Removal(op, caller, unlinks=[(ring, old)], links=[(ring, key)])

    # -- the removal path

    def _remove(self, removal: Removal) -> None:
        """Run a removal: plan, fence, apply, wipe.  Called without the lock.

        Everything that makes a key go away ends here.
        """
        with self._lock:
            removal.plan_locked()
            self._apply_locked(removal)

    def _apply_locked(self, removal: Removal) -> None:
        now = self.now()
        for key in removal.kills:
            if key.payload is not None and key.in_quota:
                self._quota.resize_locked(key.uid, -len(key.payload))
                key.quotalen -= len(key.payload)
        for key in removal.apply_locked(now):
            self._release_locked(key)
        for key, state in removal.kills.items():
            if state in (KeyState.REVOKED, KeyState.EXPIRED):
                self.gc.schedule_reap(key, now)

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
        and the keyring lookup's errors.
        """
        data = payload or b""
        if type_name.startswith("."):
            raise fail(errno.EPERM, "types starting with '.' are internal")
        if description is not None and len(description.encode()) > DESCRIPTION_MAX:
            raise fail(errno.EINVAL, "description too long")
        if description == "":
            description = None
        if description is not None and type_name == "keyring" and description.startswith("."):
            raise fail(errno.EPERM, "keyring names starting with '.' are reserved")
        if len(data) > ADD_KEY_PAYLOAD_MAX:
            raise fail(errno.EINVAL, "payload too large")
        displaced: Removal | None
        with self._lock:
            ring, _ = self._lookup_locked(caller, keyring, Perm.WRITE, create=True)
            key_type = lookup_type(type_name)
            data = key_type.preparse(data)
            if description is None:
                raise fail(errno.EINVAL, "a description is required")
            if not ring.is_keyring:
                raise fail(errno.ENOTDIR)
            key_type.vet_description(description)
            assert ring.contents is not None
            if key_type.updatable:
                existing = ring.contents.find((type_name, description))
                if existing is not None and existing.state is KeyState.VALID:
                    possessed = self._possessed_locked(caller, existing)
                    permission.check(existing, caller, Perm.WRITE, possessed=possessed)
                    self._update_locked(existing, data)
                    return existing.serial
            perm = permission.default_perm(
                readable=key_type.readable, writable=key_type.updatable or key_type.is_keyring
            )
            key = self._alloc_locked(
                key_type, description, uid=caller.uid, gid=caller.gid, perm=perm, payload=data
            )
            displaced = self._link_locked(ring, key, "add", caller)
        if displaced is not None:
            self._remove(displaced)
        return key.serial

    def _update_locked(self, key: Key, data: bytes) -> None:
        old = key.payload
        delta = len(data) - (len(old) if old is not None else 0)
        if key.in_quota:
            self._quota.resize_locked(key.uid, delta)
        key.quotalen += delta
        key.payload = _secret.store(data)
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
            key, _ = self._lookup_locked(caller, key_id, Perm.WRITE)
            if not key.type.updatable:
                raise fail(errno.EOPNOTSUPP)
            data = key.type.preparse(data)
            self._update_locked(key, data)

    def request_key(
        self,
        caller: Caller,
        type_name: str,
        description: str,
        callout: str | None = None,
        dest_keyring: int = 0,
    ) -> int:
        """request_key(2): find a key from the caller's keyrings.

        A found key is linked into ``dest_keyring`` when one is given (link
        permission).  keyfence has no upcall: with or without ``callout``, a
        key that is not found is ENOKEY (docs/keys.md).
        """
        if type_name.startswith("."):
            raise fail(errno.EPERM, "types starting with '.' are internal")
        if not description:
            raise fail(errno.EINVAL, "a description is required")
        displaced = None
        with self._lock:
            dest = None
            if dest_keyring:
                dest, _ = self._lookup_locked(caller, dest_keyring, Perm.WRITE, create=True)
            key_type = lookup_type(type_name, missing=errno.ENOKEY)
            now = self.now()

            def ctx() -> SearchContext:
                return SearchContext(
                    caller=caller,
                    possessed=True,
                    index_key=(key_type.name, description),
                    match=lambda k: True,
                    now=now,
                    skip_expired=True,
                )

            found, error = self._search_process_keyrings_locked(caller, ctx)
            if found is None:
                raise fail(errno.ENOKEY if error == errno.EAGAIN else error)
            if dest is not None:
                permission.check(found, caller, Perm.LINK, possessed=True)
                displaced = self._link_locked(dest, found, "request", caller)
        if displaced is not None:
            self._remove(displaced)
        return found.serial

    def get_keyring_id(self, caller: Caller, key_id: int, create: bool = False) -> int:
        """KEYCTL_GET_KEYRING_ID: resolve an id, creating special keyrings if asked."""
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, _Need.DEFER, create=create)
            return key.serial

    def join_session_keyring(self, caller: Caller, name: str | None = None) -> int:
        """KEYCTL_JOIN_SESSION_KEYRING: a new anonymous session keyring, or
        join (creating if need be) the keyring called ``name``.

        The caller's whole POSIX session switches keyring; the one it had is
        released (and goes away if nothing else holds it).
        """
        if caller.session is None:
            raise fail(errno.EINVAL, "the caller has no session to join a keyring for")
        with self._lock:
            ring: Key | None = None
            if name:
                ring = self._find_keyring_by_name_locked(caller, name)
                if ring is None:
                    ring = self._alloc_locked(
                        KEYRING,
                        name,
                        uid=caller.uid,
                        gid=caller.gid,
                        perm=permission.NAMED_SESSION_KEYRING_PERM,
                    )
            else:
                ring = self._alloc_locked(
                    KEYRING,
                    "_ses",
                    uid=caller.uid,
                    gid=caller.gid,
                    perm=permission.SESSION_KEYRING_PERM,
                    overrun=True,
                )
            released = self._install_session_keyring_locked(caller.session, ring)
            serial = ring.serial
        if released is not None:
            self._remove(released)
        return serial

    def _find_keyring_by_name_locked(self, caller: Caller, name: str) -> Key | None:
        for ring in self._names.get(name, ()):
            if ring.state is KeyState.REVOKED or not ring.is_live():
                continue
            if permission.allowed(ring, caller, Perm.SEARCH, possessed=False):
                return ring
        return None

    def revoke(self, caller: Caller, key_id: int) -> None:
        """KEYCTL_REVOKE: the key (write or setattr permission) becomes unusable.

        Its payload is wiped at once; a revoked keyring loses its links.  It
        stays listed until the collector reaps it after ``gc_delay``.
        """
        with self._lock:
            try:
                key, _ = self._lookup_locked(caller, key_id, Perm.WRITE)
            except OSError as err:
                if err.errno != errno.EACCES:
                    raise
                key, _ = self._lookup_locked(caller, key_id, Perm.SETATTR)
            removal = Removal("revoke", caller, kills={key: KeyState.REVOKED})
        self._remove(removal)

    def invalidate(self, caller: Caller, key_id: int) -> None:
        """KEYCTL_INVALIDATE: the key (search permission) is unlinked
        everywhere and destroyed now."""
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, Perm.SEARCH)
            removal = Removal("invalidate", caller, kills={key: KeyState.INVALIDATED})
        self._remove(removal)

    def clear(self, caller: Caller, keyring: int) -> None:
        """KEYCTL_CLEAR: unlink everything from a keyring (write permission)."""
        with self._lock:
            ring, _ = self._keyring_locked(caller, keyring, Perm.WRITE, create=True)
            assert ring.contents is not None
            removal = Removal("clear", caller, unlinks=[(ring, k) for k in ring.contents])
        self._remove(removal)

    def link(self, caller: Caller, key_id: int, keyring: int) -> None:
        """KEYCTL_LINK: link a key (link permission) into a keyring (write).

        Errors: EDEADLK (would make a cycle), ELOOP (nesting too deep),
        ENOTDIR, EACCES, EKEYREVOKED, EKEYEXPIRED, ENOKEY.
        """
        with self._lock:
            ring, _ = self._lookup_locked(caller, keyring, Perm.WRITE, create=True)
            key, _ = self._lookup_locked(caller, key_id, Perm.LINK, create=True)
            displaced = self._link_locked(ring, key, "link", caller)
        if displaced is not None:
            self._remove(displaced)

    def unlink(self, caller: Caller, key_id: int, keyring: int) -> None:
        """KEYCTL_UNLINK: remove a link (write permission on the keyring only).

        Errors: ENOENT (not linked there), ENOTDIR, EACCES, ENOKEY.
        """
        with self._lock:
            ring, _ = self._lookup_locked(caller, keyring, Perm.WRITE)
            key, _ = self._lookup_locked(caller, key_id, _Need.UNLINK)
            if not ring.is_keyring:
                raise fail(errno.ENOTDIR)
            assert ring.contents is not None
            if key not in ring.contents:
                raise fail(errno.ENOENT)
            removal = Removal("unlink", caller, unlinks=[(ring, key)])
        self._remove(removal)

    def move(
        self, caller: Caller, key_id: int, from_keyring: int, to_keyring: int, flags: int = 0
    ) -> None:
        """KEYCTL_MOVE: unlink from one keyring and link into another atomically.

        Errors: EINVAL (flags), EEXIST (KEYCTL_MOVE_EXCL and the target holds
        a key of that type and description), ENOENT, EDEADLK, ELOOP, ENOTDIR,
        EACCES.
        """
        if flags & ~KEYCTL_MOVE_EXCL:
            raise fail(errno.EINVAL, "unknown move flags")
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, Perm.LINK, create=True)
            src, _ = self._lookup_locked(caller, from_keyring, Perm.WRITE)
            dst, _ = self._lookup_locked(caller, to_keyring, Perm.WRITE, create=True)
            if src is dst:
                return
            if not src.is_keyring or not dst.is_keyring:
                raise fail(errno.ENOTDIR)
            assert src.contents is not None and dst.contents is not None
            if key not in src.contents:
                raise fail(errno.ENOENT)
            old = dst.contents.find(key.index_key)
            if old is not None and old is not key and flags & KEYCTL_MOVE_EXCL:
                raise fail(errno.EEXIST)
            if key.is_keyring:
                loop = _keyring.detect_cycle_locked(dst, key, self.now())
                if loop:
                    raise fail(loop)
            unlinks = [(src, key)]
            if old is not None and old is not key:
                unlinks.append((dst, old))
            removal = Removal("move", caller, unlinks=unlinks, links=[(dst, key)])
        self._remove(removal)

    def search(
        self, caller: Caller, keyring: int, type_name: str, description: str, dest_keyring: int = 0
    ) -> int:
        """KEYCTL_SEARCH: find a key in a keyring tree (search permission).

        The found key is linked into ``dest_keyring`` if one is given.
        Errors: ENOKEY (no such key), EKEYREVOKED / EKEYEXPIRED / EACCES (the
        only matches were unusable), ENOTDIR.
        """
        if type_name.startswith("."):
            raise fail(errno.EPERM, "types starting with '.' are internal")
        displaced = None
        with self._lock:
            ring, possessed = self._lookup_locked(caller, keyring, Perm.SEARCH)
            dest = None
            if dest_keyring:
                dest, _ = self._lookup_locked(caller, dest_keyring, Perm.WRITE, create=True)
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
            if dest is not None:
                permission.check(found, caller, Perm.LINK, possessed=possessed)
                displaced = self._link_locked(dest, found, "search", caller)
        if displaced is not None:
            self._remove(displaced)
        return found.serial

    def read(self, caller: Caller, key_id: int) -> bytes:
        """KEYCTL_READ: a key's payload, or a keyring's serials (native int32s).

        Needs read permission, or possession.  Errors: EOPNOTSUPP (logon),
        EACCES, EKEYREVOKED, EKEYEXPIRED, ENOKEY.
        """
        with self._lock:
            key, possessed = self._lookup_locked(caller, key_id, _Need.DEFER)
            if not possessed and not permission.allowed(key, caller, Perm.READ, possessed=False):
                raise fail(errno.EACCES)
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

    def describe(self, caller: Caller, key_id: int) -> str:
        """KEYCTL_DESCRIBE: "type;uid;gid;perm;description" (view permission)."""
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, Perm.VIEW)
            gid = key.gid if key.gid != -1 else 65534
            uid = key.uid if key.uid != -1 else 65534
            return f"{key.type.name};{uid};{gid};{key.perm:08x};{key.description}"

    def chown(self, caller: Caller, key_id: int, uid: int, gid: int) -> None:
        """KEYCTL_CHOWN: change owner (admin only) and group (a group the
        caller is in, or admin); -1 leaves a field alone.  The quota charge
        moves with the key (EDQUOT if the new owner has no room)."""
        if uid == -1 and gid == -1:
            return
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, Perm.SETATTR, create=True)
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

    def setperm(self, caller: Caller, key_id: int, perm: int) -> None:
        """KEYCTL_SETPERM: set the mask (owner or admin, setattr permission).

        Errors: EINVAL (bits outside the mask), EACCES.
        """
        if perm & ~permission.VALID_MASK:
            raise fail(errno.EINVAL, "permission bits outside the valid mask")
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, Perm.SETATTR, create=True)
            if key.uid != caller.uid and not caller.is_admin:
                raise fail(errno.EACCES)
            key.perm = perm

    def set_timeout(self, caller: Caller, key_id: int, timeout: int) -> None:
        """KEYCTL_SET_TIMEOUT: expire the key ``timeout`` seconds from now
        (0: never).  Needs setattr permission."""
        if timeout < 0:
            raise fail(errno.EINVAL, "negative timeout")
        with self._lock:
            key, _ = self._lookup_locked(caller, key_id, Perm.SETATTR, create=True)
            key.expiry = int(self.now()) + timeout if timeout else None
            if key.expiry is not None:
                self.gc.schedule_expiry(key)

    def get_security(self, caller: Caller, key_id: int) -> str:
        """KEYCTL_GET_SECURITY: no LSM here, so the label is always empty."""
        with self._lock:
            self._lookup_locked(caller, key_id, Perm.VIEW)
            return ""

    # ------------------------------------------------- process and session end

    def process_exited(self, pid: int, start_time: int = 0) -> None:
        """A process is gone: its process and thread keyrings go away."""
        with self._lock:
            released = []
            ring = self._special.processes.pop((pid, start_time), None)
            if ring is not None:
                released.append(ring)
            for thread in self._special.threads_of(pid, start_time):
                released.append(self._special.threads.pop(thread))
        if released:
            self._remove(Removal("exit", None, releases=released))

    def thread_exited(self, pid: int, tid: int, start_time: int = 0) -> None:
        with self._lock:
            ring = self._special.threads.pop((pid, start_time, tid), None)
        if ring is not None:
            self._remove(Removal("exit", None, releases=[ring]))

    def session_ended(self, session: Hashable) -> None:
        """A POSIX session has no process left: its session keyring goes away."""
        with self._lock:
            ring = self._special.sessions.pop(session, None)
        if ring is not None:
            self._remove(Removal("session_end", None, releases=[ring]))

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
            )

    def find_key(self, serial: int) -> Key | None:
        """The key object for tests and the service's own subsystems."""
        with self._lock:
            return self._keys.get(serial)

    def all_keys(self) -> Iterable[Key]:
        with self._lock:
            return list(self._keys.values())

    def close(self) -> None:
        """Stop the collector thread."""
        self.gc.stop()

    def __enter__(self) -> KeyService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
