"""The model's operations, one behaviour per test (the kernel comparison
lives in tests/oracle)."""

from __future__ import annotations

import ctypes
import errno
import threading
import time

import pytest

from keyfence.keys import KEYCTL_MOVE_EXCL, Caller, KeyService, KeyState
from keyfence.keys.errors import KeyfenceError
from keyfence.keys.notify import Notification, Phase

from .conftest import FakeClock

S, U, US, P, T = -3, -4, -5, -2, -1


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyfenceError) as info:
        fn(*args)
    assert info.value.errno is not None
    return info.value.errno


def payload_memory(svc: KeyService, serial: int) -> tuple[int, int]:
    key = svc.find_key(serial)
    assert key is not None and key.payload is not None
    return key.payload.address, len(key.payload)


def test_default_masks_and_describe(svc: KeyService, root: Caller) -> None:
    ses = svc.get_keyring_id(root, S, True)
    assert svc.describe(root, ses) == "keyring;0;0;3f030000;_ses"
    user = svc.add_key(root, "user", "u", b"x", S)
    logon = svc.add_key(root, "logon", "svc:l", b"x", S)
    ring = svc.add_key(root, "keyring", "r", None, S)
    assert svc.describe(root, user) == "user;0;0;3f010000;u"
    assert svc.describe(root, logon) == "logon;0;0;3d010000;svc:l"
    assert svc.describe(root, ring) == "keyring;0;0;3f010000;r"
    assert svc.describe(root, U).startswith("keyring;0;65534;1f3f0000;_uid.0")
    assert svc.describe(root, US).startswith("keyring;0;65534;1f3f0000;_uid_ses.0")


def test_describe_prints_ids_as_the_kernels_percent_d(svc: KeyService, root: Caller) -> None:
    """keyctl_describe_key() prints uid and gid with %d: 2**31 and up
    come out negative (KERNEL_FACTS.md section 1).  Before: unsigned."""
    key = svc.add_key(root, "user", "neguid", b"v", S)
    svc.chown(root, key, 4294967294, 4000000000)
    assert svc.describe(root, key) == "user;-2;-294967296;3f010000;neguid"
    svc.chown(root, key, 2147483648, -1)
    assert svc.describe(root, key) == "user;-2147483648;-294967296;3f010000;neguid"
    svc.chown(root, key, 2147483647, -1)
    assert svc.describe(root, key) == "user;2147483647;-294967296;3f010000;neguid"


def test_add_updates_in_place_but_replaces_keyrings(svc: KeyService, root: Caller) -> None:
    first = svc.add_key(root, "user", "d", b"one", S)
    assert svc.add_key(root, "user", "d", b"two", S) == first
    assert svc.read(root, first) == b"two"
    ring = svc.add_key(root, "keyring", "r", None, S)
    inner = svc.add_key(root, "user", "in", b"x", ring)
    ring2 = svc.add_key(root, "keyring", "r", None, S)
    assert ring2 != ring
    # the displaced keyring lost its only link: it and what only it held are gone
    assert errno_of(svc.describe, root, ring) == errno.ENOKEY
    assert errno_of(svc.describe, root, inner) == errno.ENOKEY


def test_bad_input_errnos(svc: KeyService, root: Caller) -> None:
    assert errno_of(svc.add_key, root, "nosuch", "d", b"x", S) == errno.ENODEV
    assert errno_of(svc.add_key, root, ".hidden", "d", b"x", S) == errno.EPERM
    assert errno_of(svc.add_key, root, "keyring", ".dot", None, S) == errno.EPERM
    assert errno_of(svc.add_key, root, "logon", "nocolon", b"x", S) == errno.EINVAL
    assert errno_of(svc.add_key, root, "logon", ":lead", b"x", S) == errno.EINVAL
    assert errno_of(svc.add_key, root, "user", "d", b"", S) == errno.EINVAL
    assert errno_of(svc.add_key, root, "user", "d", b"x" * 32768, S) == errno.EINVAL
    assert svc.add_key(root, "user", "max", b"x" * 32767, S) > 0
    assert errno_of(svc.add_key, root, "keyring", "k", b"data", S) == errno.EINVAL
    key = svc.add_key(root, "user", "leaf", b"x", S)
    assert errno_of(svc.add_key, root, "user", "d", b"x", key) == errno.ENOTDIR
    assert errno_of(svc.describe, root, 0) == errno.EINVAL
    assert errno_of(svc.describe, root, 12345) in (errno.ENOKEY,)
    assert errno_of(svc.setperm, root, key, 0x40000000) == errno.EINVAL


def test_logon_payload_is_never_readable(svc: KeyService, root: Caller) -> None:
    key = svc.add_key(root, "logon", "svc:x", b"secret", S)
    assert errno_of(svc.read, root, key) == errno.EOPNOTSUPP


def test_link_refuses_cycles_and_depth(svc: KeyService, root: Caller) -> None:
    a = svc.add_key(root, "keyring", "a", None, S)
    b = svc.add_key(root, "keyring", "b", None, a)
    assert errno_of(svc.link, root, a, a) == errno.EDEADLK
    assert errno_of(svc.link, root, a, b) == errno.EDEADLK
    # Build a chain bottom-up: each link searches below the keyring being
    # linked, so the depth check fires once the chain is too deep.
    rings = [svc.add_key(root, "keyring", f"c{i}", None, S) for i in range(10)]
    depth_failed = None
    for i in range(9):
        try:
            svc.link(root, rings[i], rings[i + 1])
        except KeyfenceError as err:
            assert err.errno == errno.ELOOP
            depth_failed = i
            break
    assert depth_failed == 7


def test_clear_cascades_and_wipes(svc: KeyService, root: Caller) -> None:
    ring = svc.add_key(root, "keyring", "r", None, S)
    key = svc.add_key(root, "user", "k", b"\xaa" * 64, ring)
    shared = svc.add_key(root, "user", "s", b"\xbb" * 64, ring)
    svc.link(root, shared, U)
    address, size = payload_memory(svc, key)
    svc.clear(root, S)
    assert svc.find_key(ring) is None and svc.find_key(key) is None
    assert ctypes.string_at(address, size) == bytes(size)
    kept = svc.find_key(shared)  # still linked from @u
    assert kept is not None and kept.payload is not None
    assert kept.payload.reveal() == b"\xbb" * 64


def test_revoke_wipes_now_and_gc_reaps_later(
    svc: KeyService, root: Caller, clock: FakeClock
) -> None:
    key = svc.add_key(root, "user", "k", b"\xcc" * 32, S)
    address, size = payload_memory(svc, key)
    svc.revoke(root, key)
    assert ctypes.string_at(address, size) == bytes(size)
    assert errno_of(svc.read, root, key) == errno.EKEYREVOKED
    assert errno_of(svc.revoke, root, key) == errno.EKEYREVOKED
    assert key in svc.list_keyring(root, S)
    clock.advance(299)
    svc.gc.collect()
    assert key in svc.list_keyring(root, S)
    clock.advance(2)
    svc.gc.collect()
    assert key not in svc.list_keyring(root, S)
    assert svc.find_key(key) is None


def test_revoked_keyring_drops_its_links(svc: KeyService, root: Caller) -> None:
    ring = svc.add_key(root, "keyring", "r", None, S)
    key = svc.add_key(root, "user", "k", b"x", ring)
    svc.revoke(root, ring)
    assert svc.find_key(key) is None


def test_expiry(svc: KeyService, root: Caller, clock: FakeClock) -> None:
    key = svc.add_key(root, "user", "k", b"\xdd" * 16, S)
    address, size = payload_memory(svc, key)
    svc.set_timeout(root, key, 10)
    clock.advance(9)
    assert svc.read(root, key) == b"\xdd" * 16
    clock.advance(1)
    assert errno_of(svc.read, root, key) == errno.EKEYEXPIRED
    assert errno_of(svc.search, root, S, "user", "k") == errno.EKEYEXPIRED
    assert errno_of(svc.request_key, root, "user", "k") == errno.ENOKEY
    svc.gc.collect()
    found = svc.find_key(key)
    assert found is not None and found.state is KeyState.EXPIRED
    assert ctypes.string_at(address, size) == bytes(size)
    clock.advance(301)
    svc.gc.collect()
    assert svc.find_key(key) is None


def test_timeout_zero_cancels(svc: KeyService, root: Caller, clock: FakeClock) -> None:
    key = svc.add_key(root, "user", "k", b"x", S)
    svc.set_timeout(root, key, 5)
    svc.set_timeout(root, key, 0)
    clock.advance(100)
    svc.gc.collect()
    assert svc.read(root, key) == b"x"


def test_invalidate_destroys_now(svc: KeyService, root: Caller) -> None:
    key = svc.add_key(root, "user", "k", b"x", S)
    svc.link(root, key, U)
    svc.invalidate(root, key)
    assert svc.find_key(key) is None
    assert key not in svc.list_keyring(root, U)


def test_move(svc: KeyService, root: Caller) -> None:
    a = svc.add_key(root, "keyring", "a", None, S)
    b = svc.add_key(root, "keyring", "b", None, S)
    key = svc.add_key(root, "user", "k", b"1", a)
    other = svc.add_key(root, "user", "k", b"2", b)
    assert errno_of(svc.move, root, key, a, b, KEYCTL_MOVE_EXCL) == errno.EEXIST
    svc.move(root, key, a, b)
    assert svc.list_keyring(root, b) == [key]
    assert svc.find_key(other) is None  # displaced, lost its last link
    assert errno_of(svc.move, root, key, a, b) == errno.ENOENT
    assert errno_of(svc.move, root, key, a, b, 2) == errno.EINVAL


def test_move_into_a_keyring_whose_owner_is_at_quota(
    svc: KeyService, root: Caller, alice: Caller
) -> None:
    """EDQUOT, and the key stays where it was, as the kernel's key_move()
    (before: cut from the source, then the link failed: linked nowhere,
    alive, its quota never refunded)."""
    full = svc.add_key(alice, "keyring", "full", None, S)
    svc.setperm(alice, full, 0x3F3F3F3F)
    left = svc.quota_usage(1000).maxbytes - svc.quota_usage(1000).qnbytes
    svc.add_key(alice, "user", "pad", b"x" * (left - len("pad") - 1 - 4 - 2), full)
    source = svc.add_key(root, "keyring", "source", None, S)
    key = svc.add_key(root, "user", "k", b"secret", source)
    charged = svc.quota_usage(0)
    assert errno_of(svc.move, root, key, source, full) == errno.EDQUOT
    assert svc.list_keyring(root, source) == [key]
    assert svc.quota_usage(0) == charged
    svc.unlink(root, key, source)
    assert svc.find_key(key) is None
    assert svc.quota_usage(0).qnkeys == charged.qnkeys - 1


def test_unlink_errors(svc: KeyService, root: Caller) -> None:
    key = svc.add_key(root, "user", "k", b"x", S)
    ring = svc.add_key(root, "keyring", "r", None, S)
    assert errno_of(svc.unlink, root, key, ring) == errno.ENOENT
    assert errno_of(svc.unlink, root, ring, key) == errno.ENOTDIR
    svc.unlink(root, key, S)
    assert svc.find_key(key) is None


def test_search_nested_and_permissions(svc: KeyService, root: Caller, alice: Caller) -> None:
    ring = svc.add_key(root, "keyring", "r", None, S)
    key = svc.add_key(root, "user", "deep", b"x", ring)
    assert svc.search(root, S, "user", "deep") == key
    svc.setperm(root, ring, 0x3F000000 & ~0x08000000)  # possessor: no search
    assert errno_of(svc.search, root, S, "user", "deep") == errno.ENOKEY
    # another uid cannot search root's session keyring by serial
    ses = svc.get_keyring_id(root, S)
    assert errno_of(svc.search, alice, ses, "user", "deep") == errno.EACCES


def test_a_keyring_reached_by_many_paths_is_searched_once_per_depth(
    svc: KeyService, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's DAG of keyrings (each level's W keyrings linked into every
    keyring of the level above, six levels: W + W**2 + ... + W**6 paths)
    within its quota.  Before: the search entered a keyring once per path,
    under the service lock: 16 wide (97 keyrings) held every client of the
    daemon for 8 s per search, found by a helper's attack run; here 10 wide,
    1.1 million entries.  Now each keyring is entered once per depth."""
    from keyfence.keys import permission

    width = 10
    top = svc.add_key(alice, "keyring", "bomb", None, S)
    above = [top]
    for depth in range(6):
        level = [
            svc.add_key(alice, "keyring", f"l{depth}_{i}", None, above[0]) for i in range(width)
        ]
        for parent in above:
            for ring in level:
                svc.link(alice, ring, parent)
        above = level
    entered = 0
    allowed = permission.allowed

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal entered
        entered += 1
        return allowed(*args, **kwargs)

    monkeypatch.setattr(permission, "allowed", counting)
    assert errno_of(svc.search, alice, top, "user", "absent") == errno.ENOKEY
    assert entered < 7 * 6 * width * width  # at most once per keyring, depth and link


def test_a_search_not_repeated_still_gives_its_reason(svc: KeyService, alice: Caller) -> None:
    """A keyring met again at a depth it was searched at gives the reason
    that search left (the last skipped match's), as searching it again did:
    x holds a revoked match and is reached through a and b, c (between them)
    an unsearchable one: the last reason is x's, met through b."""
    top = svc.add_key(alice, "keyring", "t", None, S)
    a = svc.add_key(alice, "keyring", "a", None, top)
    c = svc.add_key(alice, "keyring", "c", None, top)
    b = svc.add_key(alice, "keyring", "b", None, top)
    x = svc.add_key(alice, "keyring", "x", None, a)
    svc.link(alice, x, b)
    svc.revoke(alice, svc.add_key(alice, "user", "k", b"v", x))
    hidden = svc.add_key(alice, "user", "k", b"v", c)
    svc.setperm(alice, hidden, 0x3F000000 & ~0x08000000)  # possessor: no search
    assert errno_of(svc.search, alice, top, "user", "k") == errno.EKEYREVOKED
    svc.unlink(alice, b, top)
    assert errno_of(svc.search, alice, top, "user", "k") == errno.EACCES


def test_read_needs_permission_or_possession(
    svc: KeyService, root: Caller, alice: Caller, bob: Caller
) -> None:
    key = svc.add_key(alice, "user", "mine", b"data", S)
    assert svc.read(alice, key) == b"data"  # possessed
    assert errno_of(svc.read, bob, key) == errno.EACCES
    assert errno_of(svc.describe, bob, key) == errno.EACCES
    svc.setperm(alice, key, 0x3F010000 | 0x0300)  # group view+read
    svc.chown(alice, key, -1, 1000)
    assert svc.read(bob, key) == b"data"  # bob is in group 1000
    # group bits are only consulted when the key grants some
    svc.setperm(alice, key, 0x3F010000 | 0x03)
    assert svc.read(bob, key) == b"data"  # via "other"


def test_owner_only_setperm_and_admin_chown(svc: KeyService, root: Caller, alice: Caller) -> None:
    key = svc.add_key(alice, "user", "mine", b"data", S)
    assert errno_of(svc.chown, alice, key, 0, -1) == errno.EACCES
    assert errno_of(svc.chown, alice, key, -1, 4242) == errno.EACCES
    svc.chown(alice, key, -1, 1000)
    svc.setperm(alice, key, 0x3F3F0000)


def test_quota(svc: KeyService, alice: Caller) -> None:
    ring = svc.add_key(alice, "keyring", "r", None, S)
    base = svc.quota_usage(1000)
    made = []
    with pytest.raises(KeyfenceError) as info:
        for i in range(300):
            made.append(svc.add_key(alice, "user", f"k{i}", b"x", ring))
    assert info.value.errno == errno.EDQUOT
    assert base.qnkeys + len(made) == 200
    svc.clear(alice, ring)
    assert svc.quota_usage(1000).qnkeys == base.qnkeys
    big = svc.add_key(alice, "user", "big", b"x" * 19000, ring)
    assert errno_of(svc.add_key, alice, "user", "big2", b"x" * 2000, ring) == errno.EDQUOT
    assert errno_of(svc.update, alice, big, b"x" * 4096 + b"y") == errno.EINVAL
    before = svc.quota_usage(1000).qnbytes
    svc.update(alice, big, b"tiny")
    assert svc.quota_usage(1000).qnbytes == before - 19000 + 4


def test_chown_moves_quota(svc: KeyService, root: Caller) -> None:
    key = svc.add_key(root, "user", "k", b"12345", S)
    before = svc.quota_usage(4242).qnbytes
    svc.chown(root, key, 4242, -1)
    assert svc.quota_usage(4242).qnbytes == before + len("k") + 1 + 5


def test_process_and_session_end(svc: KeyService, root: Caller) -> None:
    pring = svc.get_keyring_id(root, P, True)
    tring = svc.get_keyring_id(root, T, True)
    key = svc.add_key(root, "user", "pk", b"x", P)
    assert errno_of(svc.get_keyring_id, Caller(uid=0, gid=0, pid=101), P) == errno.ENOKEY
    svc.process_exited(root.pid, root.start_time)
    for serial in (pring, tring, key):
        assert svc.find_key(serial) is None
    ses = svc.get_keyring_id(root, S, True)
    skey = svc.add_key(root, "user", "sk", b"x", S)
    svc.session_ended(root.session)
    assert svc.find_key(ses) is None and svc.find_key(skey) is None


def test_an_exec_drops_the_process_and_thread_keyrings(svc: KeyService) -> None:
    """As the kernel's exec (prepare_exec_creds): the new program has no @p
    or @t, its @s and its user keyrings are the same, and the old keyrings
    end through the fence.  Before: they were the new program's (the
    process is the same pid and start time)."""
    from keyfence.keys.notify import Phase

    before = Caller(uid=0, gid=0, pid=100, session="login", image=b"image-1")
    after = Caller(uid=0, gid=0, pid=100, session="login", image=b"image-2")
    session = svc.get_keyring_id(before, S, True)
    pring = svc.get_keyring_id(before, P, True)
    tring = svc.get_keyring_id(before, T, True)
    key = svc.add_key(before, "user", "pk", b"secret", P)
    called: list[bytes] = []

    def flush(note) -> None:  # type: ignore[no-untyped-def]
        if note.phase is Phase.BEFORE:
            payload = svc.find_key(key).payload  # type: ignore[union-attr]
            called.append(payload.reveal())

    svc.watch(before, key, flush, sync=True, name="mount /mnt")
    assert not svc.exec_seen(before)  # the same program: nothing to do
    assert svc.exec_seen(after)
    assert errno_of(svc.get_keyring_id, after, P) == errno.ENOKEY
    assert errno_of(svc.get_keyring_id, after, T) == errno.ENOKEY
    assert errno_of(svc.search, after, S, "user", "pk", 0) == errno.ENOKEY
    assert svc.get_keyring_id(after, S, False) == session
    assert svc.find_key(pring) is not None and not called  # held until released
    (token,) = svc.retired()
    svc.release_retired(token)
    assert called == [b"secret"] and not svc.retired()
    for serial in (pring, tring, key):
        assert svc.find_key(serial) is None
    # the new program makes its own, which the next exec drops in turn
    fresh = svc.get_keyring_id(after, P, True)
    assert fresh != pring and not svc.exec_seen(after)
    assert svc.exec_seen(Caller(uid=0, gid=0, pid=100, session="login", image=b"image-3"))
    # an image not known (an in-process caller, /proc unreadable) is not compared
    assert not svc.exec_seen(Caller(uid=0, gid=0, pid=100, session="login"))


def test_session_keyring_shared_within_session(svc: KeyService) -> None:
    one = Caller(uid=0, gid=0, pid=1, session=("sid", 1))
    two = Caller(uid=0, gid=0, pid=2, session=("sid", 1))
    other = Caller(uid=0, gid=0, pid=3, session=("sid", 2))
    assert svc.get_keyring_id(one, S, True) == svc.get_keyring_id(two, S, True)
    assert svc.get_keyring_id(other, S, True) != svc.get_keyring_id(one, S, True)


def test_no_session_keyring_falls_back_to_user_session(svc: KeyService, root: Caller) -> None:
    assert svc.get_keyring_id(root, S, False) == svc.get_keyring_id(root, US, False)
    assert svc.get_keyring_id(root, S, True) != svc.get_keyring_id(root, US, False)


def test_join_named_session_keyring(svc: KeyService, root: Caller) -> None:
    old = svc.get_keyring_id(root, S, True)
    named = svc.join_session_keyring(root, "shared")
    assert svc.find_key(old) is None  # the anonymous one lost its only holder
    assert svc.describe(root, named) == "keyring;0;0;3f130000;shared"
    other = Caller(uid=0, gid=0, pid=9, session="another")
    # as the kernel: a name is found only if its keyring grants search to a
    # non-possessor, which the default mask does not
    assert svc.join_session_keyring(other, "shared") != named
    svc.setperm(root, named, 0x3F1B0000)
    third = Caller(uid=0, gid=0, pid=10, session="third")
    assert svc.join_session_keyring(third, "shared") == named
    fresh = svc.join_session_keyring(root)
    assert fresh != named
    assert svc.find_key(named) is not None  # still the third session's


def test_request_key_links_into_destination(svc: KeyService, root: Caller) -> None:
    key = svc.add_key(root, "user", "k", b"x", S)
    assert svc.request_key(root, "user", "k") == key
    assert svc.request_key(root, "user", "k", None, U) == key
    assert key in svc.list_keyring(root, U)
    assert errno_of(svc.request_key, root, "user", "missing") == errno.ENOKEY
    # with callout info and no request-key handler to run (as on a kernel
    # that cannot exec /sbin/request-key): ENOENT, and a negative key stays
    assert errno_of(svc.request_key, root, "user", "missing", "callout") == errno.ENOENT
    assert errno_of(svc.request_key, root, "user", "missing", "callout") == errno.ENOKEY
    assert errno_of(svc.request_key, root, "user", "missing") == errno.ENOKEY


def test_hundred_thousand_keys_in_one_keyring(svc: KeyService, root: Caller) -> None:
    ring = svc.add_key(root, "keyring", "big", None, S)
    serials = [svc.add_key(root, "user", f"k{i:06d}", b"12345678", ring) for i in range(100_000)]
    assert svc.search(root, ring, "user", "k099999") == serials[-1]
    assert svc.read(root, serials[50_000]) == b"12345678"
    assert len(svc.list_keyring(root, ring)) == 100_000
    svc.clear(root, ring)
    assert svc.statistics().keys < 10


def test_concurrent_operations_keep_invariants(svc: KeyService, root: Caller) -> None:
    ring = svc.add_key(root, "keyring", "r", None, S)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                k = svc.add_key(root, "user", f"t{n}-{i}", b"x", ring)
                if i % 3 == 0:
                    svc.unlink(root, k, ring)
                elif i % 3 == 1:
                    svc.revoke(root, k)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    listed = svc.list_keyring(root, ring)
    assert len(listed) == 4 * 200
    for key in svc.all_keys():
        for parent in key.parents:
            assert parent.contents is not None and key in parent.contents


def test_an_operation_can_wait_for_the_gc_work_it_caused(clock: FakeClock, root: Caller) -> None:
    with KeyService(clock=clock, gc_delay=2, run_gc_thread=True) as svc:
        key = svc.add_key(root, "user", "k", b"x", S)
        svc.set_timeout(root, key, 5)
        clock.advance(6)
        assert svc.gc.wait_idle(timeout=5)
        found = svc.find_key(key)
        assert found is not None and found.state is KeyState.EXPIRED
        clock.advance(3)  # past gc_delay: the collector reaps it
        deadline = time.monotonic() + 5
        while svc.find_key(key) is not None and time.monotonic() < deadline:
            svc.gc.wait_idle(timeout=1)
        assert svc.find_key(key) is None


def test_a_users_silent_watcher_holds_up_only_their_own_expiries(
    clock: FakeClock, alice: Caller, bob: Caller
) -> None:
    """An expiry waits for the owner's own watchers without bound.  Before:
    one thread ran every expiry and reap, so alice's key with a watcher of
    hers that never answers stopped bob's key from expiring (still
    readable, bob's mount never told, 12 s after its 3 s timeout in a
    helper's attack run on the daemon) and anyone's from being reaped.
    Now each owner's collection runs apart."""
    release = threading.Event()
    told = threading.Event()

    def silent(note: Notification) -> None:
        if note.phase is Phase.BEFORE:
            release.wait()

    def flush(note: Notification) -> None:
        if note.phase is Phase.BEFORE:
            told.set()

    with KeyService(clock=clock, gc_delay=2, run_gc_thread=True) as svc:
        try:
            stall = svc.add_key(alice, "user", "stall", b"x", S)
            svc.watch(alice, stall, silent, sync=True, name="silent")
            svc.set_timeout(alice, stall, 5)
            key = svc.add_key(bob, "user", "mine", b"secret", S)
            svc.watch(bob, key, flush, sync=True, name="bob's mount")
            svc.set_timeout(bob, key, 6)
            clock.advance(7)
            assert told.wait(timeout=5)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and svc.find_key(key).state is KeyState.VALID:  # type: ignore[union-attr]
                time.sleep(0.01)  # told before the expiry is applied
            assert errno_of(svc.read, bob, key) == errno.EKEYEXPIRED
            assert svc.read(alice, stall) == b"x"  # still waiting for its owner's watcher
        finally:
            release.set()


def test_a_lane_without_a_thread_waits_its_turn(
    clock: FakeClock, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no thread can be started for an owner's collection (the
    system's thread limit: one lane per uid, and a user with subordinate
    uids has many), the work is retried later; before, the collector's own
    thread died of the RuntimeError and no key expired again."""
    real_start = threading.Thread.start
    refusals = [1]

    def start(thread: threading.Thread) -> None:  # fault injection: the limit
        if thread.name.startswith("keyfence-gc-") and refusals:
            refusals.pop()
            raise RuntimeError("can't start new thread")
        real_start(thread)

    told = threading.Event()

    def flush(note: Notification) -> None:
        if note.phase is Phase.BEFORE:
            told.set()

    monkeypatch.setattr(threading.Thread, "start", start)
    with KeyService(clock=clock, gc_delay=2, run_gc_thread=True) as svc:
        key = svc.add_key(alice, "user", "k", b"x", S)
        svc.watch(alice, key, flush, sync=True, name="alice's mount")
        svc.set_timeout(alice, key, 1)
        clock.advance(2)
        deadline = time.monotonic() + 5
        while refusals and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not refusals  # the first lane had no thread
        assert not told.wait(timeout=0.5)  # postponed
        clock.advance(10)
        assert told.wait(timeout=10)


def test_viewable_keys_are_what_proc_keys_shows_the_caller(
    svc: KeyService, alice: Caller, bob: Caller
) -> None:
    """keyctl's %type:desc fallback: every key of that type and description
    the caller may view, wherever linked, lowest serial first; possession
    only for a key whose possessor may view it (proc_keys_show)."""
    mine = svc.add_key(alice, "user", "d", b"x", S)
    ring = svc.add_key(alice, "keyring", "r", None, S)
    nested = svc.add_key(alice, "user", "d", b"y", ring)
    hidden = svc.add_key(alice, "user", "d", b"z", svc.add_key(alice, "keyring", "r2", None, S))
    svc.setperm(alice, hidden, 0x3F000000)  # possessor only
    others = svc.add_key(bob, "user", "d", b"b", S)
    assert svc.viewable_keys(alice, "user", "d") == sorted([mine, nested, hidden])
    assert svc.viewable_keys(alice, "user", "e") == []
    assert svc.viewable_keys(alice, "logon", "d") == []
    # bob's key, viewable by others; alice's keys viewable by her group (bob's)
    svc.setperm(bob, others, 0x3F010001)
    svc.setperm(alice, mine, 0x3F010100)
    assert svc.viewable_keys(alice, "user", "d") == sorted([mine, nested, hidden, others])
    assert svc.viewable_keys(bob, "user", "d") == sorted([mine, others])
    # @s not searchable: nothing is possessed through it, so the key only its
    # possessor may view is gone from the list; a revoked key stays
    svc.revoke(alice, nested)
    svc.setperm(alice, S, 0x01010101)
    assert svc.viewable_keys(alice, "user", "d") == sorted([mine, nested, others])
    svc.invalidate(bob, others)
    assert svc.viewable_keys(alice, "user", "d") == sorted([mine, nested])
