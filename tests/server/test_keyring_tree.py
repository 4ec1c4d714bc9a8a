"""keyring_tree (keys/keyring_tree.py): keyctl show's walk in one request.

Every entry must be what the caller's own describe and read give for that
key, for the owner and for another uid that may see only part of the tree;
the arguments are hostile input.
"""

from __future__ import annotations

import errno
import inspect
import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from keyfence import protocol, wire
from keyfence.client import Client
from keyfence.errors import KeyfenceError
from keyfence.keys.keyring_tree import MAX_TREE_KEYS
from keyfence.testing import users
from keyfence.testing.daemon import DaemonProcess

OTHER = 61301  # this branch's uid range: 61300-61399
S = -3


def per_key_walk(describe, read, root: int, levels: int = 9) -> dict[int, list[object]]:  # type: ignore[no-untyped-def]
    """What kfctl did before: describe and read key by key, breadth first."""
    table: dict[int, list[object]] = {}
    level, seen = [root], {root}
    for depth in range(levels):
        below = []
        for serial in level:
            try:
                described: object = describe(serial)
            except OSError as err:
                table[serial] = [err.errno, None]
                continue
            members: object = None
            if str(described).startswith("keyring;"):
                try:
                    members = read(serial)
                except OSError as err:
                    members = err.errno
            table[serial] = [described, members]
            if isinstance(members, bytes) and depth + 1 < levels:
                for member in memoryview(members).cast("i").tolist():
                    if member not in seen:
                        seen.add(member)
                        below.append(member)
        level = below
    return table


def build_tree(c: Client) -> dict[str, int]:
    """@s -> a -> (k, b -> (k, hidden), deep1 -> ... -> deep5 -> bottom); b
    also in @s; hidden grants nothing; shared grants others view and read."""
    session = c.join_session_keyring(None)
    a = c.add_key("keyring", "a", None, S)
    b = c.add_key("keyring", "b", None, S)
    k = c.add_key("user", "k", b"v", a)
    c.link(k, b)
    c.link(b, a)
    hidden = c.add_key("user", "hidden", b"h", b)
    c.setperm(hidden, 0)
    # five levels below a (linking refuses nesting deeper than the kernel's
    # search depth, ELOOP), built from the bottom up while each is in @s
    below = c.add_key("user", "bottom", b"x", S)
    for i in range(5, 0, -1):
        ring = c.add_key("keyring", f"deep{i}", None, S)
        c.link(below, ring)
        c.unlink(below, S)
        below = ring
    c.link(below, a)
    c.unlink(below, S)
    for key in (session, a, b, k):
        c.setperm(key, 0x3F3F000B)  # others: view, read, search
    return {"session": session, "a": a, "b": b, "k": k, "hidden": hidden}


def test_the_tree_is_what_describe_and_read_say_key_by_key(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        keys = build_tree(c)
        root, table = c.keyring_tree(S)
        assert root == keys["session"]
        expected = per_key_walk(c.describe, c.read, root)
        assert {s: list(v) for s, v in table.items()} == expected
        assert table[keys["hidden"]] == (errno.EACCES, None)
        assert len(table) == 11  # @s, a, b, k, hidden, deep1..deep5, bottom
        # fewer levels: the walk stops there, as per key
        root, table = c.keyring_tree(S, 3)
        assert {s: list(v) for s, v in table.items()} == per_key_walk(c.describe, c.read, root, 3)
        assert len(table) == 6  # @s, a, b, k, hidden, deep1
        # fewer levels: the root alone, still read
        root, table = c.keyring_tree(keys["a"], 1)
        assert list(table) == [keys["a"]] and isinstance(table[keys["a"]][1], bytes)


def test_another_uid_sees_what_its_own_describe_and_read_show(daemon: DaemonProcess) -> None:
    reason = users.why_no_other_uids()
    if reason:
        pytest.skip(reason)
    with Client.connect(daemon.socket, autostart=False) as c:
        keys = build_tree(c)
        walk = inspect.getsource(per_key_walk).replace("  # type: ignore[no-untyped-def]", "")
        code = (
            textwrap.dedent("""
            import json
            from keyfence.client import Client
            c = Client.connect()
            c.join_session_keyring(None)  # not root's @s: possesses nothing of it
            def plain(table):
                return {str(s): [v[0], v[1].hex() if isinstance(v[1], bytes) else v[1]]
                        for s, v in table.items()}
        """)
            + textwrap.dedent(walk)
            + textwrap.dedent(f"""
            root, table = c.keyring_tree({keys["a"]})
            print(json.dumps([plain(table), plain(per_key_walk(c.describe, c.read, root))]))
        """)
        )
        done = subprocess.run(
            users.as_uid(OTHER, users.python_argv("-c", code)),
            env=users.environment(daemon.env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        got, per_key = json.loads(done.stdout)
        assert got == per_key
        # not possessed: a, b and k by the "other" bits; hidden not viewable
        assert got[str(keys["a"])][0] == "keyring;0;0;3f3f000b;a"
        assert got[str(keys["b"])][0] == "keyring;0;0;3f3f000b;b"
        assert got[str(keys["k"])] == ["user;0;0;3f3f000b;k", None]
        assert got[str(keys["hidden"])] == [errno.EACCES, None]
        with Client.connect(daemon.socket, autostart=False) as c:
            assert got != {
                str(s): [v[0], v[1].hex() if isinstance(v[1], bytes) else v[1]]
                for s, v in c.keyring_tree(keys["a"])[1].items()
            }


def test_members_are_what_read_and_describe_say(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        keys = build_tree(c)
        for ring in (S, keys["a"], keys["b"], -4):
            expected = []
            for serial in c.list_keyring(ring):
                try:
                    expected.append((serial, c.describe(serial)))
                except OSError as err:
                    expected.append((serial, err.errno))
            assert c.keyring_members(ring) == expected
        assert (keys["hidden"], errno.EACCES) in c.keyring_members(keys["b"])
        for key, code in ((keys["k"], errno.ENOTDIR), (2**31 - 1, errno.ENOKEY), (0, errno.ENOKEY)):
            with pytest.raises(KeyfenceError) as caught:
                c.keyring_members(key)
            assert caught.value.errno == code, key


def raw_request(
    daemon: DaemonProcess, args: list[object], op: str = "keyring_tree"
) -> protocol.Message:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        # running_daemon returns once the socket file exists, which bind()
        # makes before listen(): on a loaded machine a connect may come first
        deadline = time.monotonic() + 30
        while True:
            try:
                sock.connect(daemon.socket)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.sendall(wire.frame({"type": "hello", "version": wire.PROTOCOL_VERSION}))
        assert wire.read(sock)["type"] == "welcome"  # type: ignore[index]
        sock.sendall(wire.frame({"type": "req", "id": 7, "op": op, "args": args}))
        reply = wire.read(sock)
    finally:
        sock.close()
    assert reply is not None
    return reply  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ([], errno.EINVAL),
        ([-3], errno.EINVAL),
        ([-3, 9, 1], errno.EINVAL),
        ([-3, True], errno.EINVAL),
        ([True, 9], errno.EINVAL),
        (["@s", 9], errno.EINVAL),
        ([-3, 0], errno.EINVAL),
        ([-3, 10], errno.EINVAL),
        ([-3, -1], errno.EINVAL),
        ([-3, 2**63 - 1], errno.EINVAL),
        ([-3, None], errno.EINVAL),
        ([0, 9], errno.EINVAL),
        ([-6, 9], errno.EINVAL),
        ([2**31 - 1, 9], errno.ENOKEY),
        ([-(2**63), 9], errno.EINVAL),
    ],
)
def test_bad_arguments_get_the_kernels_errno(
    daemon: DaemonProcess, args: list[object], code: int
) -> None:
    reply = raw_request(daemon, args)
    assert reply["type"] == "error", reply  # type: ignore[index]
    assert reply["id"] == 7 and reply["errno"] == code, reply  # type: ignore[index]


@pytest.mark.parametrize(
    "args", [[], [-3, 9], [True], ["@s"], [None], [1.0], [b"\x01\x00\x00\x00"]]
)
def test_members_bad_arguments_are_einval(daemon: DaemonProcess, args: list[object]) -> None:
    reply = raw_request(daemon, args, "keyring_members")
    assert reply["type"] == "error", reply  # type: ignore[index]
    assert reply["id"] == 7 and reply["errno"] == errno.EINVAL, reply  # type: ignore[index]


def kfctl_lines(daemon: DaemonProcess, *args: str) -> list[str]:
    """The lines ``kfctl ARGS`` prints against ``daemon`` (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "keyfence.cli.kfctl", *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_tree_too_big_for_one_answer_is_e2big_and_kfctl_falls_back(
    daemon: DaemonProcess,
) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        c.join_session_keyring(None)
        ring = c.add_key("keyring", "wide", None, S)
        for i in range(MAX_TREE_KEYS + 1):
            c.add_key("user", f"k{i}", b"x", ring)
        with pytest.raises(KeyfenceError) as caught:
            c.keyring_tree(ring)
        assert caught.value.errno == errno.E2BIG
        with pytest.raises(KeyfenceError) as caught:
            c.keyring_members(ring)
        assert caught.value.errno == errno.E2BIG
        # the same keyring one level deep fits
        root, table = c.keyring_tree(ring, 1)
        assert root == ring and len(table) == 1
    lines = kfctl_lines(daemon, "show", str(ring))
    assert lines[0] == "Keyring" and len(lines) == 2 + MAX_TREE_KEYS + 1
    assert lines[-1].endswith(f"\\_ user: k{MAX_TREE_KEYS}")
    lines = kfctl_lines(daemon, "list", str(ring))
    assert lines[0] == f"{MAX_TREE_KEYS + 1} keys in keyring:" and len(lines) == MAX_TREE_KEYS + 2
