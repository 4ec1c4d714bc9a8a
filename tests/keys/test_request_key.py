"""request_key's authority after the key is done (keys/request_key.py, step 5).

The kernel's answers, from a handler run by /sbin/request-key on this
machine's kernel (tests/oracle/KERNEL_FACTS.md, "a handler's second
instantiate"): a second instantiate, negate or reject by the handler is
EBUSY, or EACCES when it names the requester's keyring by serial (which
it no longer possesses); never EPERM, which is for a process holding no
authority over the key.  The handler side through a real daemon and kfctl
is tests/cli/test_request_key.py.
"""

from __future__ import annotations

import errno
import threading
import time

import pytest

from keyfence.keys import Caller, KeyService, waits
from keyfence.keys import upcall as _upcall
from keyfence.keys.notify import Notification, Phase

from .conftest import FakeClock
from .test_keyctl import S, errno_of

HANDLER = Caller(uid=0, gid=0, pid=500, start_time=7, session="handler")
"""The process request-key runs (it holds the authority it is granted)."""
FIRST = Caller(uid=0, gid=0, pid=501, start_time=8, session="handler")
SECOND = Caller(uid=0, gid=0, pid=502, start_time=9, session="handler")
"""Two children of the handler, one ``keyctl`` each, as a handler script runs."""
STRANGER = Caller(uid=0, gid=0, pid=600, start_time=10, session="stranger")


def _lineage(caller: Caller) -> list[tuple[int, int]]:
    if caller.pid in (FIRST.pid, SECOND.pid):
        return [caller.process, HANDLER.process]
    return [caller.process]


def _served(svc: KeyService, requester: Caller, handle) -> int:  # type: ignore[no-untyped-def]
    """request_key with callout info, ``handle(key serial, requester's
    session keyring serial)`` playing the handler; the key's serial."""
    session = svc.get_keyring_id(requester, S, True)

    def upcall(construction) -> None:  # type: ignore[no-untyped-def]
        _upcall.grant(svc, construction, HANDLER.process)
        try:
            handle(construction.key.serial, session)
        finally:
            _upcall.handler_ended(svc, construction)

    svc.process_lineage = _lineage
    svc.request_key_upcall = upcall
    return svc.request_key(requester, "user", "made", "callout")


def test_a_second_instantiate_is_ebusy_or_eacces_as_the_kernels(
    svc: KeyService, root: Caller
) -> None:
    """Before: EPERM for every second call (the authority was forgotten
    with the construction)."""
    key = _served(svc, root, lambda serial, ses: svc.instantiate(FIRST, serial, b"first", ses))
    assert svc.read(root, key) == b"first"
    session = svc.get_keyring_id(root, S, False)
    assert errno_of(svc.instantiate, SECOND, key, b"again", 0) == errno.EBUSY
    assert errno_of(svc.instantiate, SECOND, key, b"again", S) == errno.EBUSY
    # the requester's keyring by serial: written by the first call through
    # the authority, no longer possessed
    assert errno_of(svc.instantiate, SECOND, key, b"again", session) == errno.EACCES
    assert errno_of(svc.reject, SECOND, key, 30, errno.ENOKEY, 0) == errno.EBUSY
    assert errno_of(svc.reject, SECOND, key, 30, errno.EKEYREJECTED, session) == errno.EACCES
    # the handler's own call after it instantiated: the kernel clears its
    # authority (keyctl_change_reqkey_auth(NULL)), so it holds none
    assert errno_of(svc.instantiate, FIRST, key, b"again", 0) == errno.EPERM
    # a process that never held it, another key, a bad error: as before
    assert errno_of(svc.instantiate, STRANGER, key, b"again", 0) == errno.EPERM
    assert errno_of(svc.instantiate, SECOND, key + 1, b"again", 0) == errno.EPERM
    assert errno_of(svc.reject, SECOND, key, 30, 0, 0) == errno.EINVAL
    assert svc.read(root, key) == b"first"


def test_a_negated_key_is_ebusy_too(svc: KeyService, root: Caller) -> None:
    def negate(serial: int, ses: int) -> None:
        svc.reject(FIRST, serial, 30, errno.ENOKEY, ses)

    assert errno_of(_served, svc, root, negate) == errno.ENOKEY
    (key,) = (k.serial for k in svc.all_keys() if k.description == "made")
    assert errno_of(svc.instantiate, SECOND, key, b"late", 0) == errno.EBUSY
    assert errno_of(svc.reject, SECOND, key, 30, errno.ENOKEY, S) == errno.EBUSY


def test_the_spent_authority_goes_with_its_process(svc: KeyService, root: Caller) -> None:
    """Kept with the process, as a cred is, then forgotten: a daemon that
    ran handlers for a month holds nothing for them."""
    key = _served(svc, root, lambda serial, ses: svc.instantiate(FIRST, serial, b"first", 0))
    assert {HANDLER.process, FIRST.process} <= set(svc.anchored_processes())
    svc.process_exited(*HANDLER.process)
    svc.process_exited(*FIRST.process)
    assert errno_of(svc.instantiate, SECOND, key, b"again", 0) == errno.EPERM
    assert not svc._constructions.granted and not svc._constructions.assumed
    assert not set(svc.anchored_processes()) & {HANDLER.process, FIRST.process}


def test_giving_up_authority_is_forgotten_at_exit(svc: KeyService, root: Caller) -> None:
    """assume_authority(0) from process after process must not grow the
    daemon's tables for ever (it did: one entry per process, never dropped)."""
    for pid in range(1000, 1100):
        svc.assume_authority(Caller(uid=0, gid=0, pid=pid, start_time=1), 0)
    assert len(svc._constructions.assumed) == 100
    for pid in range(1000, 1100):
        svc.process_exited(pid, 1)
    assert not svc._constructions.assumed
    assert not svc._constructions


class _Running:
    """A handler that has started and not yet answered: the test answers
    for it (``answer``), then it exits."""

    def __init__(self, svc: KeyService, requester: Caller) -> None:
        self.svc = svc
        self.made: list[object] = []
        self.serial: int | None = None
        svc.process_lineage = _lineage
        svc.request_key_upcall = self._upcall
        self.thread, self.result = _in_thread(svc.request_key, requester, "user", "made", "callout")
        deadline = time.monotonic() + 30
        while self.serial is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.serial is not None

    def _upcall(self, construction) -> None:  # type: ignore[no-untyped-def]
        _upcall.grant(self.svc, construction, HANDLER.process)
        self.made.append(construction)
        self.serial = construction.key.serial

    def answer(self, payload: bytes) -> None:
        self.svc.instantiate(FIRST, self.serial, payload, 0)
        _upcall.handler_ended(self.svc, self.made[0])  # type: ignore[arg-type]
        self.thread.join(30)


def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    """Run ``fn`` on a thread of its own; (thread, results list)."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except OSError as err:
            out.append(err.errno)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_wait_for_a_construction_ends_when_its_caller_goes(svc: KeyService, root: Caller) -> None:
    """wait_for_key_construction() is interruptible: an update waiting for
    the key, whose caller is killed, is not done when the key is made.
    Before: it was, after the handler's instantiate (``late``)."""
    running = _Running(svc, root)
    gone = threading.Event()

    def update() -> None:
        with waits.interrupted_when(gone.is_set):
            svc.update(root, running.serial, b"late")

    thread, out = _in_thread(update)
    time.sleep(0.2)  # waiting (or about to: either way it must not update)
    assert thread.is_alive()
    gone.set()
    svc.interrupt_waits()
    thread.join(30)
    assert out == [errno.EINTR]
    running.answer(b"made")
    assert running.result == [running.serial]
    assert svc.read(root, running.serial) == b"made"


def test_a_waiting_request_links_the_key_at_once_and_returns_it(
    svc: KeyService, root: Caller
) -> None:
    """request_key_and_link() links a key it finds under construction into
    the destination before it waits, and returns that key (on this
    machine's kernel: a waiter killed meanwhile leaves the link).  Before:
    nothing was linked until the key was made, and a waiter that had gone
    linked it then."""
    running = _Running(svc, root)
    user_ring = svc.get_keyring_id(root, -4, True)
    gone = threading.Event()

    def request() -> int:
        with waits.interrupted_when(gone.is_set):
            return svc.request_key(root, "user", "made", None, user_ring)

    thread, out = _in_thread(request)
    deadline = time.monotonic() + 30
    while running.serial not in svc.list_keyring(root, user_ring) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.serial in svc.list_keyring(root, user_ring)
    assert thread.is_alive()  # linked, and waiting
    waiter, waiter_out = _in_thread(request)
    gone.set()
    svc.interrupt_waits()
    thread.join(30)
    waiter.join(30)
    assert out == [errno.EINTR] and waiter_out == [errno.EINTR]
    gone.clear()
    third, third_out = _in_thread(request)
    running.answer(b"made")
    third.join(30)
    assert third_out == [running.serial]
    assert svc.list_keyring(root, user_ring).count(running.serial) == 1


def test_a_key_its_handler_unlinked_is_linked_again_by_instantiate(
    svc: KeyService, root: Caller
) -> None:
    """key_instantiate_and_link() links the key it instantiates: on this
    machine's kernel a handler that unlinks the key from the requester's
    keyring and then instantiates it into that keyring leaves it there,
    usable.  Before: the key, with no link left when it was instantiated,
    was destroyed first (the requester got a serial that said ENOKEY)."""

    def unlink_then_instantiate(serial: int, ses: int) -> None:
        svc.unlink(FIRST, serial, ses)
        svc.instantiate(FIRST, serial, b"relinked", ses)

    key = _served(svc, root, unlink_then_instantiate)
    assert svc.read(root, key) == b"relinked"
    assert key in svc.list_keyring(root, S)


def test_a_construction_is_completed_once(svc: KeyService, root: Caller) -> None:
    """instantiate (and a ``|program`` handler's output) completed the
    construction twice: once through the payload update (as add_key over
    a key under construction does) and once itself, so the key's anchor
    count went to -1 (and its waiters were told twice)."""
    key = _served(svc, root, lambda serial, ses: svc.instantiate(FIRST, serial, b"x", ses))
    made = svc.find_key(key)
    assert made is not None and made.anchors == 0

    def piped(serial: int, ses: int) -> None:
        (construction,) = [c for k, c in svc._constructions.by_key.items() if k.serial == serial]
        _upcall.instantiate_from_handler(svc, construction, b"printed")

    other = Caller(uid=0, gid=0, pid=101, session="other-session")
    svc.process_lineage = _lineage
    second = _served(svc, other, piped)
    made = svc.find_key(second)
    assert made is not None and made.anchors == 0 and svc.read(other, second) == b"printed"


def test_a_rejected_key_its_handler_unlinked_is_linked_again(svc: KeyService, root: Caller) -> None:
    def unlink_then_reject(serial: int, ses: int) -> None:
        svc.unlink(FIRST, serial, ses)
        svc.reject(FIRST, serial, 30, errno.EKEYREJECTED, ses)

    assert errno_of(_served, svc, root, unlink_then_reject) == errno.EKEYREJECTED
    (key,) = (k.serial for k in svc.all_keys() if k.description == "made")
    assert key in svc.list_keyring(root, S)


# -- a link that displaces a key the construction did not find


class _Watcher:
    """A synchronous watcher of ``serial``: records what it was called for
    (and reads the key then, as a mount flushes with it), or refuses."""

    def __init__(self, svc: KeyService, owner: Caller, serial: int, *, refuse: bool = False):
        self.svc, self.owner, self.serial, self.refuse = svc, owner, serial, refuse
        self.before: list[bytes] = []
        svc.watch(owner, serial, self, sync=True, name="mount /mnt")

    def __call__(self, note: Notification) -> None:
        if note.phase is not Phase.BEFORE:
            return
        self.before.append(self.svc.read(self.owner, self.serial))
        if self.refuse:
            raise OSError(errno.ENOSPC, "No space left on device")


def _old_in_user_keyring(svc: KeyService, root: Caller) -> tuple[int, int]:
    """A session keyring without @u in it, and ``user:made`` in @u: a
    request for ``made`` does not find it (the search covers the session),
    and a destination of @u holds it, so the new key displaces it."""
    user_ring = svc.get_keyring_id(root, -4, True)
    old = svc.add_key(root, "user", "made", b"old", user_ring)
    # possessed (through @us) until the session begins: readable after
    svc.setperm(root, old, 0x3F3F0000)
    svc.get_keyring_id(root, S, True)
    return user_ring, old


def _payload(svc: KeyService, serial: int) -> bytes:
    """A key's payload seen from inside (a key in @u is not possessed)."""
    key = svc.find_key(serial)
    assert key is not None and key.payload is not None
    return key.payload.reveal()


def _request_into(svc: KeyService, root: Caller, dest: int, handle) -> int:  # type: ignore[no-untyped-def]
    def upcall(construction) -> None:  # type: ignore[no-untyped-def]
        _upcall.grant(svc, construction, HANDLER.process)
        try:
            handle(construction.key.serial)
        finally:
            _upcall.handler_ended(svc, construction)

    svc.process_lineage = _lineage
    svc.request_key_upcall = upcall
    return svc.request_key(root, "user", "made", "callout", dest)


def test_a_construction_displacing_a_watched_key_fences_it(svc: KeyService, root: Caller) -> None:
    """construct_alloc_key() links the new key into the destination, which
    displaces a key of the same name the search did not reach.  Before:
    the displaced key was destroyed there and then, its synchronous
    watcher never called (a mount using it would lose its dirty data)."""
    user_ring, old = _old_in_user_keyring(svc, root)
    watcher = _Watcher(svc, root, old)
    key = _request_into(svc, root, user_ring, lambda k: svc.instantiate(FIRST, k, b"new", 0))
    assert watcher.before == [b"old"]
    assert svc.find_key(old) is None
    assert _payload(svc, key) == b"new" and svc.list_keyring(root, user_ring) == [key]


def test_a_refused_displacement_makes_no_key(svc: KeyService, root: Caller) -> None:
    """A watcher that cannot let the displaced key go fails the request
    with its reason, the old key intact and linked, nothing constructed
    and no handler run."""
    user_ring, old = _old_in_user_keyring(svc, root)
    watcher = _Watcher(svc, root, old, refuse=True)
    ran: list[int] = []
    assert errno_of(_request_into, svc, root, user_ring, ran.append) == errno.ENOSPC
    assert watcher.before == [b"old"] and not ran
    assert svc.read(root, old) == b"old" and svc.list_keyring(root, user_ring) == [old]
    assert [k.serial for k in svc.all_keys() if k.description == "made"] == [old]
    assert not svc._constructions.by_key


@pytest.mark.parametrize("how", ["instantiate", "reject"])
def test_a_handler_link_displacing_a_watched_key_is_fenced(
    svc: KeyService, root: Caller, how: str
) -> None:
    """A handler's instantiate (or reject) into a keyring holding a key of
    the same name: the displaced key's watcher is called before it goes,
    and a refusal fails the handler's call with the key still under
    construction (the handler's exit then negates it).  Before: a refusal
    left the key instantiated; if the handler had unlinked it, linked
    nowhere and never collected."""
    user_ring, old = _old_in_user_keyring(svc, root)

    def finish(serial: int) -> None:
        if how == "instantiate":
            svc.instantiate(FIRST, serial, b"new", user_ring)
        else:
            svc.reject(FIRST, serial, 30, errno.EKEYREJECTED, user_ring)

    answers: list[int] = []

    def unlink_then_finish(serial: int) -> None:
        svc.unlink(FIRST, serial, svc.get_keyring_id(root, S, False))
        answers.append(errno_of(finish, serial))

    refuser = _Watcher(svc, root, old, refuse=True)
    assert errno_of(_request_into, svc, root, 0, unlink_then_finish) == errno.ENOKEY
    assert answers == [errno.ENOSPC] and refuser.before == [b"old"]
    assert svc.read(root, old) == b"old" and svc.list_keyring(root, user_ring) == [old]
    assert [k.serial for k in svc.all_keys() if k.description == "made"] == [old]
    refuser.refuse = False
    key = _request_into(svc, root, 0, finish) if how == "instantiate" else 0
    if how == "reject":
        assert errno_of(_request_into, svc, root, 0, finish) == errno.EKEYREJECTED
        (key,) = (k.serial for k in svc.all_keys() if k.description == "made")
    assert refuser.before == [b"old", b"old"] and svc.find_key(old) is None
    assert svc.list_keyring(root, user_ring) == [key]
    if how == "instantiate":
        assert _payload(svc, key) == b"new"


def test_a_handler_that_cannot_start_for_any_reason_negates_the_key(
    svc: KeyService, root: Caller
) -> None:
    """Only OSError from the upcall was handled: any other exception (a
    NUL in argv: ValueError) left the key under construction with nobody
    to finish it, its requesters waiting and its quota held for ever
    (failed before: the second request waited)."""

    def upcall(construction) -> None:  # type: ignore[no-untyped-def]
        raise ValueError("embedded null byte")

    svc.request_key_upcall = upcall
    with pytest.raises(ValueError):
        svc.request_key(root, "user", "made", "callout")
    answer: list[int] = []
    again = threading.Thread(
        target=lambda: answer.append(errno_of(svc.request_key, root, "user", "made", None)),
        daemon=True,
    )
    again.start()
    again.join(5)
    assert answer == [errno.ENOKEY]  # the negative key the failed start left


def test_a_handler_outliving_its_requesters_keyring_leaves_no_key_behind(
    svc: KeyService,
) -> None:
    """The requester was killed and its session keyring, the key's
    destination, ended with it; the handler then instantiated with ``@s``
    (the requester's destination) and asked for another key.  On the
    kernel the construction holds the destination (rka->dest_keyring)
    until it ends, and then the keyring and the keys in it are freed.
    Here the keys were linked into the destroyed keyring: never reachable
    again, never destroyed, their secret kept and the requester's quota
    charged until the daemon restarts (a user who did that 200 times could
    make no key at all).

    checked failing before: both keys left, linked into the dead keyring
    (``made`` still there, ``nested``'s only keyring dead)."""
    requester = Caller(uid=1000, gid=1000, pid=700, start_time=11, session=(700, 11))
    svc.join_session_keyring(requester, None)
    svc.process_lineage = _lineage

    def upcall(construction) -> None:  # type: ignore[no-untyped-def]
        if construction.key.description == "nested":
            _upcall.handler_ended(svc, construction)
            return
        _upcall.grant(svc, construction, HANDLER.process)
        try:
            svc.process_exited(requester.pid, requester.start_time)
            assert errno_of(svc.request_key, FIRST, "user", "nested", "x") == errno.ENOKEY
            svc.instantiate(FIRST, construction.key.serial, b"late", S)
        finally:
            _upcall.handler_ended(svc, construction)

    svc.request_key_upcall = upcall
    # ENOKEY: the key went with no link to hold it (its requester, gone,
    # never sees the answer)
    assert errno_of(svc.request_key, requester, "user", "made", "callout") == errno.ENOKEY
    assert [k for k in svc.all_keys() if k.description == "made"] == []
    # the other key went to the handler's own keyrings, as with no authority
    (nested,) = [k for k in svc.all_keys() if k.description == "nested"]
    assert nested.parents and all(ring.is_live() for ring in nested.parents)


@pytest.mark.parametrize("spoil", ["revoke", "invalidate", "expire", "reject"])
def test_a_key_its_handler_left_unusable_is_enokey_for_its_requester(
    svc: KeyService, root: Caller, clock: FakeClock, spoil: str
) -> None:
    """call_sbin_request_key(): once request-key has exited, a key that
    fails key_validate() is ENOKEY for the request that started it.  On
    this machine's kernel a handler that gave itself setattr, instantiated
    the key and then revoked, invalidated or let it expire, or rejected
    it with a timeout of 0: ``request_key: Required key not available``.

    checked failing before: the serial of the spoilt key (and ENONET for
    the reject)."""

    def handle(serial: int, ses: int) -> None:
        if spoil == "reject":
            svc.reject(FIRST, serial, 0, errno.ENONET, ses)
            return
        svc.setperm(FIRST, serial, 0x3F3F0000)
        svc.instantiate(FIRST, serial, b"v", ses)
        if spoil == "revoke":
            svc.revoke(FIRST, serial)
        elif spoil == "invalidate":
            svc.invalidate(FIRST, serial)
        else:
            svc.set_timeout(FIRST, serial, 1)
            clock.advance(2)

    assert errno_of(_served, svc, root, handle) == errno.ENOKEY
