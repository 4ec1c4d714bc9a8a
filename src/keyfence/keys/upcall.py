"""The request-key operations: request_key(2) with its upcall, and the
handler's side (KEYCTL_INSTANTIATE, KEYCTL_REJECT/NEGATE,
KEYCTL_ASSUME_AUTHORITY).  The concept is in :mod:`keyfence.keys.request_key`;
these are the entry points :class:`~keyfence.keys.keyctl.KeyService`
delegates to, one function per operation, each taking the service.

Errors, per operation, in the kernel's order:

* request_key: EINVAL (type name, description over 4,095 bytes, callout
  over 4,095 bytes), EPERM (type starting with '.'), the destination
  keyring's lookup errors, ENOKEY (unknown type; nothing found and no
  callout), a negative key's error, EINVAL (empty description when a key
  must be made), EACCES (no write on the default destination), EDQUOT,
  ENOENT (no handler could be run), ENOKEY (the handler gave no answer).
* instantiate: EINVAL (payload over 1 MiB), EPERM (no authority over this
  key), the destination's errors, the type's payload errors (EINVAL).
* reject/negate: EINVAL (not an errno), EPERM, the destination's errors.
* assume_authority: EINVAL (a special id), ENOKEY (no construction of that
  key this process may act for).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from keyfence.keys import keyring as _keyring
from keyfence.keys import permission
from keyfence.keys.caller import Caller
from keyfence.keys.errors import fail
from keyfence.keys.key import KeyState
from keyfence.keys.key_type import (
    ADD_KEY_PAYLOAD_MAX,
    CALLOUT_MAX,
    DESCRIPTION_MAX,
    KEYRING,
    check_type_name,
    lookup_type,
)
from keyfence.keys.keyring import SearchContext
from keyfence.keys.notify import KeyEvent
from keyfence.keys.process_keys import KEY_SPEC_REQKEY_AUTH_KEY, KEY_SPEC_REQUESTOR_KEYRING
from keyfence.keys.removal import Removal, wipe_payload
from keyfence.keys.request_key import (
    AUTH_KEY_PERM,
    AUTH_KEY_TYPE,
    KEY_NEGATIVE_TIMEOUT,
    Construction,
    Outcome,
    check_reject_error,
)
from keyfence.keys.text import as_bytes
from keyfence.keys.waits import check_interrupted, check_may_wait

if TYPE_CHECKING:
    from keyfence.keys.internal import ServiceInternals
    from keyfence.keys.key import Key


# -- hooks the service calls with its lock held


def authority_locked(svc: ServiceInternals, caller: Caller) -> Construction | None:
    """The construction ``caller`` may instantiate (cred->request_key_auth)."""
    table = svc._constructions
    if not table:
        return None
    return table.authority_locked(svc.process_lineage(caller))


def requester_keyrings_locked(svc: ServiceInternals, caller: Caller) -> list[Key]:
    """A handler also searches, and possesses, its requester's keyrings
    (search_process_keyrings_rcu); empty for everyone else."""
    held = authority_locked(svc, caller)
    if held is None or held.requester == caller:
        return []
    return svc._process_keyrings_locked(held.requester)


def special_locked(svc: ServiceInternals, caller: Caller, spec: int) -> Key:
    """@a (the authorisation key) and the requestor keyring: ENOKEY
    outside an upcall."""
    held = authority_locked(svc, caller)
    if held is None:
        raise fail(errno.ENOKEY, "no request_key authorisation")
    if spec == KEY_SPEC_REQKEY_AUTH_KEY:
        return held.auth
    if held.dest is None:
        raise fail(errno.ENOKEY, "the requester gave no keyring")
    return held.dest


def check_constructed_locked(svc: ServiceInternals, key: Key, *, partial: bool) -> None:
    """lookup_user_key()'s wait_for_key_construction(): a lookup that is
    not KEY_LOOKUP_PARTIAL waits while the key is under construction, then
    fails with a negative key's error.  The wait releases the service lock;
    a thread that must not wait (the daemon's loop) gets
    :class:`~keyfence.keys.waits.MustWait` instead."""
    construction = svc._constructions.of_locked(key)
    if construction is None:
        return
    if not key.is_live():
        svc._constructions.forget_key_locked(key)
        return
    if partial:
        return
    if construction.pending:
        # the daemon's loop does not wait (keys/waits.py): the request is
        # run again on a thread of the caller's, which may
        check_may_wait(f"the construction of key {key.serial}")
    _wait_constructed_locked(svc, construction)
    if construction.outcome is Outcome.NEGATIVE:
        raise fail(construction.error)


def _wait_constructed_locked(svc: ServiceInternals, construction: Construction) -> None:
    """Until ``construction`` ends, or EINTR when the caller has gone
    (keys/waits.py): the wait is interruptible, as the kernel's."""
    what = f"the construction of key {construction.key.serial}"
    while construction.pending:
        check_interrupted(what)
        svc._changed.wait()  # releases the service lock (every level of it)


def updated_locked(svc: ServiceInternals, key: Key) -> None:
    """add_key() updating a key found in a keyring instantiates it, even a
    negative or uninstantiated one (__key_update: mark_key_instantiated)."""
    construction = svc._constructions.of_locked(key)
    if construction is None:
        return
    if construction.pending:
        _finish_locked(svc, construction, 0, 0)
    else:
        svc._constructions.forget_key_locked(key)


def negative_error_locked(svc: ServiceInternals, key: Key) -> int:
    """A negative key's errno, else 0 (what a search or read reports)."""
    construction = svc._constructions.of_locked(key)
    if construction is None or construction.outcome is not Outcome.NEGATIVE:
        return 0
    return construction.error


# -- request_key(2)


def request_key(
    svc: ServiceInternals,
    caller: Caller,
    type_name: str,
    description: str,
    callout: str | None,
    dest_keyring: int,
) -> int:
    check_type_name(type_name)
    if len(as_bytes(description)) > DESCRIPTION_MAX:
        raise fail(errno.EINVAL, "description too long")
    if callout is not None and len(as_bytes(callout)) > CALLOUT_MAX:
        raise fail(errno.EINVAL, "callout info too long")
    result, made = _find_or_construct(svc, caller, type_name, description, callout, dest_keyring)
    if not isinstance(result, Construction):
        return result.serial
    construction = result
    if made:
        _call_out(svc, construction)
        # call_sbin_request_key() waits for the handler (UMH_WAIT_PROC, not
        # interruptible), not only for the key: what it does after
        # instantiating is done
        construction.handler_gone.wait()
        with svc._lock:
            try:
                # then a key the handler left revoked, invalidated or
                # expired (a reject with no timeout) is ENOKEY for us
                construction.key.validate(svc.now())
            except OSError:
                raise fail(errno.ENOKEY, "the handler left the key unusable") from None
    else:
        # found under construction (and linked into the destination
        # already): wait_for_key_construction(), interruptible
        with svc._lock:
            _wait_constructed_locked(svc, construction)
    if construction.outcome is Outcome.INSTANTIATED:
        return construction.key.serial
    raise fail(construction.error)


def _find_or_construct(
    svc: ServiceInternals,
    caller: Caller,
    type_name: str,
    description: str,
    callout: str | None,
    dest_keyring: int,
) -> tuple[Key | Construction, bool]:
    """request_key_and_link(): the key found (linked into the destination),
    a construction in progress to wait for, or a new one (True)."""
    made = object()  # this call's token for a key made to displace another

    def build() -> tuple[Removal | None, tuple[Key | Construction, bool]]:
        dest = None
        if dest_keyring:
            dest, _ = svc._lookup_locked(caller, dest_keyring, permission.WRITE, create=True)
        key_type = lookup_type(type_name, missing=errno.ENOKEY)
        now = svc.now()

        def ctx() -> SearchContext:
            return SearchContext(
                caller=caller,
                possessed=True,
                index_key=(key_type.name, description),
                match=lambda k: True,
                now=now,
                skip_expired=True,
            )

        key, error = svc._search_process_keyrings_locked(caller, ctx)
        if key is not None:
            construction = svc._constructions.of_locked(key)
            found: Key | Construction = key
            if construction is not None and construction.pending:
                found = construction  # linked now, waited for after (as the kernel)
            else:
                negative = negative_error_locked(svc, key)
                if negative:
                    raise fail(negative)
            if dest is None:
                return None, (found, False)
            permission.check(key, caller, permission.LINK, possessed=True)
            return svc._link_locked(dest, key, "request", caller), (found, False)
        if error != errno.EAGAIN:
            raise fail(error)
        if callout is None:
            raise fail(errno.ENOKEY)
        if key_type.is_keyring:
            raise fail(errno.EPERM, "keyrings are not constructed by request_key")
        ring = dest if dest is not None else _default_destination_locked(svc, caller)
        permission.check(ring, caller, permission.WRITE, possessed=True)
        # key_alloc() refuses the description before the link looks at the keyring
        if not description:
            raise fail(errno.EINVAL, "a key to construct needs a description")
        key_type.vet_description(description)
        if not ring.is_keyring:
            raise fail(errno.ENOTDIR)
        if ring.state is KeyState.REVOKED:
            raise fail(errno.EKEYREVOKED)
        removal, construction = _construct_locked(
            svc, caller, key_type.name, description, callout, ring, made
        )
        return removal, (construction, True)

    try:
        return svc.removals.run_for(build)
    finally:
        with svc._lock:
            svc._discard_pending_locked(made)


def _default_destination_locked(svc: ServiceInternals, caller: Caller) -> Key:
    """construct_get_dest_keyring(), KEY_REQKEY_DEFL_DEFAULT: a handler's
    requester's destination (while it lives), else @t, @p, @s, @us -- the
    first that exists."""
    held = authority_locked(svc, caller)
    if held is not None and held.dest is not None and held.dest.is_live():
        return held.dest
    tables = svc._special
    for ring in (
        tables.thread_keyring(caller),
        tables.process_keyring(caller),
        tables.session_keyring(caller),
    ):
        if ring is not None:
            return ring
    return svc._caller_user_keyrings_locked(caller)[1]


def _construct_locked(
    svc: ServiceInternals,
    caller: Caller,
    type_name: str,
    description: str,
    callout: str,
    ring: Key,
    made: object,
) -> tuple[Removal | None, Construction]:
    """construct_alloc_key() + request_key_auth_new(): the uninstantiated
    key, linked into ``ring``, and its authorisation key.

    A key of the same type and description in ``ring`` (one the search did
    not reach: ``ring`` named by serial, or @u outside the session) is
    displaced, as the kernel's link does; that goes through the removal
    path, so the displaced key's watchers are called first and may refuse.
    The construction then begins when the removal applies; until then the
    two keys are ``made``'s (discarded if it does not apply, or if build()
    runs again and makes others)."""
    table = svc._constructions
    for stale in [k for k in table.by_key if not k.is_live()]:
        table.forget_key_locked(stale)
    key_type = lookup_type(type_name, missing=errno.ENOKEY)
    perm = permission.default_perm(
        readable=key_type.readable, writable=key_type.updatable or key_type.is_keyring
    )
    key = svc._alloc_locked(key_type, description, uid=caller.uid, gid=caller.gid, perm=perm)
    try:
        auth = svc._alloc_locked(
            AUTH_KEY_TYPE,
            f"{key.serial:x}",
            uid=caller.uid,
            gid=caller.gid,
            perm=AUTH_KEY_PERM,
            payload=as_bytes(callout),
            in_quota=False,
        )
    except OSError:
        _destroy_locked(svc, key)
        raise
    construction = Construction(key, auth, callout, caller, ring)
    svc._pending_new.update({key: made, auth: made})  # until the link is made
    removal = svc._link_locked(ring, key, "request", caller)
    if removal is None:
        _begin_locked(svc, construction)
    else:
        removal.on_apply.append(lambda: _begin_locked(svc, construction))
    return removal, construction


def _begin_locked(svc: ServiceInternals, construction: Construction) -> None:
    """The construction holds its two keys until it ends, and is found."""
    for key in (construction.key, construction.auth):
        svc._pending_new.pop(key, None)
        key.anchors += 1
    svc._constructions.by_key[construction.key] = construction


def _call_out(svc: ServiceInternals, construction: Construction) -> None:
    """Start the handler (without the lock).  No hook, or a hook that cannot
    start one, is the kernel failing to run /sbin/request-key: the key is
    negated and the requester gets the reason."""
    hook = svc.request_key_upcall
    with svc._lock:
        unusable = _user_keyrings_error_locked(svc, construction.requester)
    if unusable:
        # call_sbin_request_key() looks up the user keyrings first
        handler_ended(svc, construction)
        raise fail(unusable)
    try:
        if hook is None:
            raise fail(errno.ENOENT, "no request-key handler")
        hook(construction)
    except OSError as err:
        handler_ended(svc, construction)
        raise fail(err.errno or errno.ENOKEY, str(err)) from None
    except Exception:
        # whatever stopped the handler starting, the key must not stay under
        # construction with nobody to finish it (its quota held, its
        # requesters waiting for ever)
        handler_ended(svc, construction)
        raise


def _user_keyrings_error_locked(svc: ServiceInternals, caller: Caller) -> int:
    """look_up_user_keyrings()'s own error for a requester whose @u or @us
    cannot be used (0: they can)."""
    try:
        svc._caller_user_keyrings_locked(caller)
    except OSError:
        pass
    else:
        return 0
    now = svc.now()
    for ring in svc._special.users[caller.user_keyrings_uid]:
        if ring.state is KeyState.REVOKED:
            return errno.EKEYREVOKED
        if ring.is_expired(now):
            return errno.EKEYEXPIRED
        if not permission.allowed(ring, caller, permission.SEARCH, possessed=True):
            return errno.EACCES
    return errno.ENOKEY


def handler_ended(svc: ServiceInternals, construction: Construction) -> None:
    """The handler is gone: a key it left uninstantiated is negated with
    ENOKEY for KEY_NEGATIVE_TIMEOUT seconds (complete_request_key), and
    the requester returns."""
    try:
        with svc._lock:
            if construction.pending:
                _finish_locked(svc, construction, errno.ENOKEY, KEY_NEGATIVE_TIMEOUT)
    finally:
        construction.handler_gone.set()


def _finish_locked(
    svc: ServiceInternals,
    construction: Construction,
    error: int,
    timeout: int,
    *,
    linking: bool = False,
) -> None:
    """Instantiated (error 0) or negative: record it, destroy the
    authorisation key, release the key's anchor, wake every waiter.
    ``linking``: the caller links the key next (instantiate or reject with
    a destination), so a key without links is left for it."""
    key = construction.key
    if error:
        key.expiry = int(svc.now()) + timeout
        svc._constructions.finish_locked(construction, Outcome.NEGATIVE, error)
    else:
        svc._constructions.finish_locked(construction, Outcome.INSTANTIATED)
    for ring in list(construction.auth.parents):  # the handler's _req keyring
        _keyring.unlink_locked(ring, construction.auth, svc._quota)
    _destroy_locked(svc, construction.auth, anchored=True)
    key.anchors -= 1
    if not linking:
        _destroy_if_unheld_locked(svc, key)
    svc.removals.notify_locked(
        [(key, KeyEvent.INSTANTIATED, None)], construction.requester, "instantiate"
    )
    svc._changed.notify_all()


def _destroy_if_unheld_locked(svc: ServiceInternals, key: Key) -> None:
    if not key.parents and not key.anchors and key.state is not KeyState.DEAD:
        _destroy_locked(svc, key)


def _destroy_locked(svc: ServiceInternals, key: Key, *, anchored: bool = False) -> None:
    if anchored:
        key.anchors -= 1
    key.state = KeyState.DEAD
    wipe_payload(key)
    svc._release_locked(key)


# -- the handler's side


def _instantiation_keyring_locked(
    svc: ServiceInternals, caller: Caller, construction: Construction, ringid: int
) -> Key | None:
    """get_instantiation_keyring(): none, a keyring by serial (write), or,
    for any special id, the requester's destination (none once destroyed)."""
    if ringid == 0:
        return None
    if ringid > 0:
        ring, _ = svc._lookup_locked(caller, ringid, permission.WRITE, create=True)
        if not ring.is_keyring:
            raise fail(errno.ENOTDIR)
        return ring
    if ringid == KEY_SPEC_REQKEY_AUTH_KEY:
        raise fail(errno.EINVAL, "@a is not a keyring")
    if ringid >= KEY_SPEC_REQUESTOR_KEYRING:
        # the kernel's construction holds its destination until it ends;
        # here a requester's session keyring ends with its last process:
        # none then (a link into a destroyed keyring would keep the key
        # for ever)
        dest = construction.dest
        return dest if dest is not None and dest.is_live() else None
    raise fail(errno.ENOKEY)


def check_view_authority_locked(svc: ServiceInternals, caller: Caller, key_id: int) -> None:
    """key_get_instantiation_authkey(): ``caller`` holds the authority over
    the construction of ``key_id``, so it may view that key whatever its
    permissions (describe, get_security).  ENOKEY if it does not, and
    EKEYREVOKED if its authorisation key was revoked."""
    held = authority_locked(svc, caller)
    if held is None or held.key.serial != key_id:
        raise fail(errno.ENOKEY, "no authorisation for that key")
    if held.auth.state is KeyState.REVOKED:
        raise fail(errno.EKEYREVOKED)


def _held_locked(
    svc: ServiceInternals, caller: Caller, key_id: int, ringid: int
) -> tuple[Construction, Key | None]:
    """keyctl_instantiate_key_common()'s and keyctl_reject_key()'s checks,
    in their order: the authority over ``key_id`` (EPERM), the destination
    (get_instantiation_keyring), then the key itself: one already done is
    EBUSY ("can't instantiate twice").  A spent authority (request_key.py,
    step 5) gets that far, its destination looked up without the
    requester's keyrings (EACCES for the requester's by serial)."""
    held = svc._constructions.held_locked(svc.process_lineage(caller))
    if held is None or held.key.serial != key_id:
        raise fail(errno.EPERM, "no authority to instantiate this key")
    dest = _instantiation_keyring_locked(svc, caller, held, ringid)
    if not held.pending:
        raise fail(errno.EBUSY, "the key is already instantiated or negated")
    return held, dest


def instantiate(
    svc: ServiceInternals, caller: Caller, key_id: int, payload: bytes | None, keyring: int
) -> None:
    data = payload or b""
    if len(data) > ADD_KEY_PAYLOAD_MAX:
        raise fail(errno.EINVAL, "payload too large")

    def build() -> Removal | None:
        held, dest = _held_locked(svc, caller, key_id, keyring)
        prepared = held.key.type.preparse(data)

        def finish() -> None:
            svc._update_locked(held.key, prepared, completes=False)
            _finish_locked(svc, held, 0, 0, linking=dest is not None)

        return _finish_and_link_locked(svc, caller, held, dest, "instantiate", finish)

    svc.removals.run(build)


def reject(
    svc: ServiceInternals, caller: Caller, key_id: int, timeout: int, error: int, keyring: int
) -> None:
    check_reject_error(error)

    def build() -> Removal | None:
        held, dest = _held_locked(svc, caller, key_id, keyring)
        return _finish_and_link_locked(
            svc,
            caller,
            held,
            dest,
            "reject",
            lambda: _finish_locked(svc, held, error, timeout, linking=dest is not None),
        )

    svc.removals.run(build)


def _finish_and_link_locked(
    svc: ServiceInternals,
    caller: Caller,
    held: Construction,
    dest: Key | None,
    op: str,
    finish: Callable[[], None],
) -> Removal | None:
    """key_instantiate_and_link() and key_reject_and_link(): ``finish`` the
    construction (with ``linking``), give up the authority, and link the key
    into ``dest``.

    A link that displaces a key of the same name goes through the removal
    path: the construction is finished when that removal applies, after the
    displaced key's watchers are done, and not at all if one refuses (the
    handler gets its reason, the key stays under construction).  A holder
    of the same authority that finishes the key meanwhile leaves only the
    link to make.  Otherwise the key is finished and linked at once; a key
    that cannot be linked is destroyed if nothing holds it.
    """
    key = held.key

    def finish_once() -> None:
        if held.pending:
            finish()
        svc._constructions.assume_locked(caller.process, None)

    if dest is not None and key.is_live():
        assert dest.contents is not None
        displaced = dest.contents.find(key.index_key)
        if displaced is not None and displaced is not key:
            removal = svc._link_locked(dest, key, op, caller)
            assert removal is not None  # a displacement: nothing changed yet
            removal.on_apply.append(finish_once)
            return removal
    finish_once()
    if dest is None or not key.is_live():
        return None
    try:
        return svc._link_locked(dest, key, op, caller)
    except OSError:
        _destroy_if_unheld_locked(svc, key)
        raise


def assume_authority(svc: ServiceInternals, caller: Caller, key_id: int) -> int:
    """KEYCTL_ASSUME_AUTHORITY: act for the construction of ``key_id`` (one
    this process or an ancestor was given), or, with 0, for none."""
    if key_id < 0:
        raise fail(errno.EINVAL, "a special id cannot be assumed")
    with svc._lock:
        table = svc._constructions
        if key_id == 0:
            table.assume_locked(caller.process, None)
            return 0
        lineage = list(svc.process_lineage(caller))
        for process in lineage:
            for held in (table.assumed.get(process), table.granted.get(process)):
                if held is not None and held.pending and held.key.serial == key_id:
                    table.assume_locked(caller.process, held)
                    return held.auth.serial
        raise fail(errno.ENOKEY, "no authorisation for that key")


def grant(svc: ServiceInternals, construction: Construction, process: tuple[int, int]) -> None:
    """Give a handler process the authority over ``construction`` and, as
    call_sbin_request_key() does, a session keyring of its own:
    ``_req.<key serial>``, the requester's, holding the authorisation key.
    It is ``@s`` to the handler and its children (keys they add there stay
    theirs) and ends with the handler, as any session keyring does."""
    with svc._lock:
        svc._constructions.grant_locked(construction, process)
        if not construction.pending or process in svc._special.sessions:
            return
        requester = construction.requester
        ring = svc._alloc_locked(
            KEYRING,
            f"_req.{construction.key.serial}",
            uid=requester.uid,
            gid=requester.gid,
            perm=permission.SESSION_KEYRING_PERM,
            overrun=True,
        )
        try:
            _keyring.link_locked(ring, construction.auth, svc._quota)
        except OSError:
            _destroy_locked(svc, ring)
            raise
        handler = Caller(
            uid=requester.uid,
            gid=requester.gid,
            groups=requester.groups,
            pid=process[0],
            start_time=process[1],
            session=process,
        )
        svc._bind_session_locked(handler, process, ring, "request_key")  # none to release


def requester_keyring_ids(
    svc: ServiceInternals, construction: Construction
) -> tuple[int, int, int]:
    """The requester's thread, process and session keyring serials, as the
    kernel passes them to /sbin/request-key (0: none; the session falls
    back to the user-session keyring)."""
    caller = construction.requester
    with svc._lock:
        tables = svc._special
        thread = tables.thread_keyring(caller)
        process = tables.process_keyring(caller)
        session = tables.session_keyring(caller)
        if session is None:
            session = svc._user_keyrings_locked(caller.user_keyrings_uid)[1]
        return (
            thread.serial if thread is not None else 0,
            process.serial if process is not None else 0,
            session.serial,
        )


def instantiate_from_handler(
    svc: ServiceInternals, construction: Construction, data: bytes
) -> None:
    """request-key's ``|program`` form: request-key (here, the daemon acting
    for the handler it ran) instantiates with what the program printed."""
    with svc._lock:
        if not construction.pending:
            return
        key = construction.key
        prepared = key.type.preparse(data)
        svc._update_locked(key, prepared, completes=False)
        _finish_locked(svc, construction, 0, 0)
