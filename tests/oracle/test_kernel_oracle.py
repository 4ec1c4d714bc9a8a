"""The kernel side of the differential harness works, and a few facts it relies on hold.

Tests marked ``kernel`` need the real keyring syscalls (we run as root); they are skipped
only when add_key(2) itself is missing (ENOSYS, a kernel without CONFIG_KEYS).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

from keyfence.testing import kernel_keyctl as kernel
from tests.oracle.harness import KernelBackend, Normalizer, Op, Result, run_ops

OTHER_UID = 4242


@pytest.fixture(autouse=True)
def _skip_without_keyrings(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kernel") is None:
        return
    try:
        kernel.add_key("user", None, None, 0)  # always invalid: fails without side effects
    except OSError as e:
        if e.errno == errno.ENOSYS:
            pytest.skip("add_key(2) returns ENOSYS: kernel has no key retention service")


@pytest.fixture
def kb() -> Iterator[KernelBackend]:
    with KernelBackend(userns=True) as backend:
        yield backend


def errname(exc: pytest.ExceptionInfo[OSError]) -> str:
    return errno.errorcode[exc.value.errno or 0]


# --- the raw layer and the worker ----------------------------------------------------


@pytest.mark.kernel
def test_kernel_errors_are_oserror_with_errno(kb: KernelBackend) -> None:
    with pytest.raises(OSError) as exc:
        kb.add_key("user", "", b"x", kernel.KEY_SPEC_SESSION_KEYRING)
    assert errname(exc) == "EINVAL"
    with pytest.raises(OSError) as exc:
        kb.get_keyring_id(kernel.KEY_SPEC_PROCESS_KEYRING, False)
    assert errname(exc) == "ENOKEY"


@pytest.mark.kernel
def test_bytes_round_trip_and_none_is_not_empty(kb: KernelBackend) -> None:
    key = kb.add_key("user", "bin", b"\x00\xffa\x00", kernel.KEY_SPEC_SESSION_KEYRING)
    assert kb.read(key) == b"\x00\xffa\x00"
    kb.update(key, b"\x01" * 4096)
    assert kb.read(key) == b"\x01" * 4096
    # A keyring takes an empty payload but not a NULL-less non-empty one.
    assert kb.add_key("keyring", "r", b"", kernel.KEY_SPEC_SESSION_KEYRING) > 0
    with pytest.raises(OSError) as exc:
        kb.add_key("keyring", "r2", b"x", kernel.KEY_SPEC_SESSION_KEYRING)
    assert errname(exc) == "EINVAL"


@pytest.mark.kernel
def test_describe_and_keyring_read_formats(kb: KernelBackend) -> None:
    ring = kb.add_key("keyring", "ring", None, kernel.KEY_SPEC_SESSION_KEYRING)
    keys = [kb.add_key("user", f"u{i}", b"v", ring) for i in range(3)]
    assert sorted(kernel.keyring_serials(kb.read(ring))) == sorted(keys)
    assert kb.describe(keys[0]) == "user;0;0;3f010000;u0"
    assert kb.describe(kernel.KEY_SPEC_SESSION_KEYRING) == "keyring;0;0;3f030000;_ses"
    assert kb.capabilities()[:1] != b""


@pytest.mark.kernel
def test_worker_does_not_share_the_callers_session_keyring() -> None:
    ours = kernel.get_keyring_id(kernel.KEY_SPEC_SESSION_KEYRING, False)
    with KernelBackend() as kb:
        assert kb.get_keyring_id(kernel.KEY_SPEC_SESSION_KEYRING, False) != ours
        kb.session_to_parent()  # reaches the worker's stub, not this process
    assert kernel.get_keyring_id(kernel.KEY_SPEC_SESSION_KEYRING, False) == ours


@pytest.mark.kernel
def test_two_uids_see_different_user_keyrings() -> None:
    with KernelBackend(uid=0) as root, KernelBackend(uid=OTHER_UID) as other:
        assert root.getuid() == 0
        assert other.getuid() == OTHER_UID
        at_u = kernel.KEY_SPEC_USER_KEYRING
        assert root.get_keyring_id(at_u, False) != other.get_keyring_id(at_u, False)
        assert root.describe(at_u).endswith(";_uid.0")
        assert other.describe(at_u) == f"keyring;{OTHER_UID};65534;1f3f0000;_uid.{OTHER_UID}"


@pytest.mark.kernel
def test_user_namespace_gives_fresh_user_keyrings() -> None:
    at_u, at_us = kernel.KEY_SPEC_USER_KEYRING, kernel.KEY_SPEC_USER_SESSION_KEYRING
    with KernelBackend() as host:
        host_u = host.get_keyring_id(at_u, False)
    with KernelBackend(userns=True) as a, KernelBackend(userns=True) as b:
        a_u, b_u = a.get_keyring_id(at_u, False), b.get_keyring_id(at_u, False)
        assert len({host_u, a_u, b_u}) == 3
        a.add_key("user", "only-in-a", b"x", at_u)
        assert b.read(at_u) == b""
        assert kernel.keyring_serials(a.read(at_us)) == [a_u]


@pytest.mark.kernel
def test_user_namespace_allows_other_credentials() -> None:
    with KernelBackend(uid=OTHER_UID, gid=4243, groups=[4244], userns=True) as kb:
        assert kb.getuid() == OTHER_UID
        assert kb.call("getgid") == 4243
        assert kb.call("getgroups") == [4244]
        assert kb.describe(kernel.KEY_SPEC_USER_KEYRING).endswith(f";_uid.{OTHER_UID}")


# --- run_ops and the Normalizer ------------------------------------------------------


def test_normalizer_names_in_order_of_first_appearance() -> None:
    norm = Normalizer()
    assert [norm.name(s) for s in (900, 5, 900, -3, 0)] == ["k1", "k2", "k1", -3, 0]
    assert norm.serial("k2") == 5
    assert norm.serial("@us") == kernel.KEY_SPEC_USER_SESSION_KEYRING
    for serial in range(10, 20):
        norm.name(serial)
    packed = b"".join(s.to_bytes(4, "little", signed=True) for s in (19, 5, 77, 900))
    assert norm.keyring_names(packed) == ["k1", "k2", "k12", "?"]


@pytest.mark.kernel
def test_run_ops_normalizes_kernel_results(kb: KernelBackend) -> None:
    ops: list[Op] = [
        ("add_key", "keyring", "r", None, "@s"),
        ("add_key", "user", "a", b"x", "k1"),
        ("add_key", "user", "b", b"y", "k1"),
        ("read", "k1"),
        ("read", "k2"),
        ("revoke", "k2"),
        ("describe", "k2"),
        ("get_keyring_id", "@p", False),
        ("add_key", "user", "b", b"z", "k1"),
    ]
    assert run_ops(kb, ops, Normalizer()) == [
        ("ok", "k1"),
        ("ok", "k2"),
        ("ok", "k3"),
        ("ok", ["k2", "k3"]),
        ("ok", b"x"),
        ("ok", None),
        ("err", "EKEYREVOKED"),
        ("err", "ENOKEY"),
        ("ok", "k3"),
    ]


# Facts from KERNEL_FACTS.md that the model is written against; each runs in a fresh
# user namespace as root.
FACTS: dict[str, tuple[list[Op], list[Result]]] = {
    "user add twice updates in place": (
        [
            ("add_key", "user", "d", b"1", "@s"),
            ("add_key", "user", "d", b"2", "@s"),
            ("read", "k1"),
        ],
        [("ok", "k1"), ("ok", "k1"), ("ok", b"2")],
    ),
    "keyring add twice replaces the link": (
        [
            ("add_key", "keyring", "d", None, "@s"),
            ("add_key", "keyring", "d", None, "@s"),
            ("read", "@s"),
        ],
        [("ok", "k1"), ("ok", "k2"), ("ok", ["k2"])],
    ),
    "cycles are EDEADLK": (
        [
            ("add_key", "keyring", "a", None, "@s"),
            ("add_key", "keyring", "b", None, "k1"),
            ("link", "k1", "k1"),
            ("link", "k1", "k2"),
        ],
        [("ok", "k1"), ("ok", "k2"), ("err", "EDEADLOCK"), ("err", "EDEADLOCK")],
    ),
    "unlink of a non-member": (
        [
            ("add_key", "keyring", "a", None, "@s"),
            ("add_key", "user", "u", b"x", "@s"),
            ("unlink", "k2", "k1"),
            ("link", "k2", "@s"),
        ],
        [("ok", "k1"), ("ok", "k2"), ("err", "ENOENT"), ("ok", None)],
    ),
    "move onto a same-named key": (
        [
            ("add_key", "keyring", "f", None, "@s"),
            ("add_key", "keyring", "t", None, "@s"),
            ("add_key", "user", "x", b"1", "k1"),
            ("add_key", "user", "x", b"2", "k2"),
            ("move", "k3", "k1", "k2", kernel.KEYCTL_MOVE_EXCL),
            ("move", "k3", "k1", "k2", 0),
            ("read", "k2"),
            ("read", "k1"),
        ],
        [
            ("ok", "k1"),
            ("ok", "k2"),
            ("ok", "k3"),
            ("ok", "k4"),
            ("err", "EEXIST"),
            ("ok", None),
            ("ok", ["k3"]),
            ("ok", []),
        ],
    ),
    "revoked key": (
        [
            ("add_key", "user", "r", b"x", "@s"),
            ("revoke", "k1"),
            ("read", "k1"),
            ("setperm", "k1", 0x3F010000),
            ("chown", "k1", -1, -1),
            ("unlink", "k1", "@s"),
        ],
        [
            ("ok", "k1"),
            ("ok", None),
            ("err", "EKEYREVOKED"),
            ("err", "EKEYREVOKED"),
            ("ok", None),
            ("ok", None),
        ],
    ),
    "logon keys": (
        [
            ("add_key", "logon", "nocolon", b"x", "@s"),
            ("add_key", "logon", ":x", b"x", "@s"),
            ("add_key", "logon", "a:", b"x", "@s"),
            ("read", "k1"),
            ("describe", "k1"),
        ],
        [
            ("err", "EINVAL"),
            ("err", "EINVAL"),
            ("ok", "k1"),
            ("err", "ENOTSUP"),
            ("ok", "logon;0;0;3d010000;a:"),
        ],
    ),
    "search misses and special ids": (
        [
            ("search", "@s", "user", "nope", 0),
            ("search", "@s", "nosuchtype", "x", 0),
            ("add_key", "nosuchtype", "x", b"x", "@s"),
            ("get_keyring_id", "@g", True),
        ],
        [("err", "ENOKEY"), ("err", "ENOKEY"), ("err", "ENODEV"), ("err", "EINVAL")],
    ),
}


@pytest.mark.kernel
@pytest.mark.parametrize("name", list(FACTS))
def test_documented_fact(name: str) -> None:
    ops, expected = FACTS[name]
    with KernelBackend(userns=True) as kb:
        got: list[Any] = run_ops(kb, ops, Normalizer())
    assert got == expected
