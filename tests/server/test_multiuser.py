"""One root daemon serving real clients of other uids (setpriv), with the
kernel's permission, ownership and quota rules; a private daemon refusing
them.

The venv's interpreter lives under /root (mode 700), so clients of other
uids run /usr/bin/python3 (same version, same ABI) with the checkout's
``src`` and the venv's site-packages on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import pytest

import keyfence
from keyfence.client import Client
from keyfence.testing.daemon import DaemonProcess, running_daemon

PYTHON = "/usr/bin/python3"
A, B, C = 4501, 4502, 4503
"""Unprivileged uids (each with the same-numbered gid)."""

# masks: possessor, user, group, other bytes (view 01, read 02, search 08, setattr 20)
DEFAULT = 0x3F010000
OTHER_READ = 0x3F010003
GROUP_VIEW_OTHER_READ = 0x3F010103
POSSESSOR_ONLY_OTHER_READ = 0x0B000003
OTHER_SETATTR = 0x3F010023


def _why_not() -> str | None:
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing: cannot run clients under other uids"
    if not os.path.exists(PYTHON):
        return f"{PYTHON} is missing: other uids cannot run the venv's interpreter"
    if os.geteuid() != 0:
        return "not root: cannot run clients under other uids"
    version = subprocess.run(
        [PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if version != [str(v) for v in sys.version_info[:2]]:
        return f"{PYTHON} is Python {'.'.join(version)}, not this venv's (compiled extensions)"
    return None


_REASON = _why_not()
if _REASON:
    print(f"test_multiuser skipped: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _pythonpath() -> str:
    src = Path(keyfence.__file__).resolve().parents[1]
    paths = sysconfig.get_paths()
    return os.pathsep.join(dict.fromkeys([str(src), paths["purelib"], paths["platlib"]]))


PRELUDE = """
import errno, json, os, sys
from keyfence.client import Client
from keyfence.errors import KeyfenceError

def attempt(fn, *args, **kwargs):
    "The result, or the errno's name."
    try:
        return fn(*args, **kwargs)
    except KeyfenceError as err:
        return errno.errorcode[err.errno]

out = {}
"""
CONNECT = "c = Client.connect()\n"
EPILOGUE = """
print(json.dumps(out, default=lambda v: v.decode() if isinstance(v, bytes) else repr(v)))
"""


def command(
    uid: int, code: str, *, groups: tuple[int, ...] = (), connect: bool = True
) -> list[str]:
    group_option = "--groups=" + ",".join(map(str, groups)) if groups else "--clear-groups"
    script = PRELUDE + (CONNECT if connect else "") + textwrap.dedent(code) + EPILOGUE
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", group_option, PYTHON, "-c", script]


def environment(daemon: DaemonProcess) -> dict[str, str]:
    env = dict(daemon.env, PYTHONPATH=_pythonpath(), PYTHONDONTWRITEBYTECODE="1", HOME="/")
    env.pop("VIRTUAL_ENV", None)
    return env


def run_as(
    daemon: DaemonProcess,
    uid: int,
    code: str,
    *,
    groups: tuple[int, ...] = (),
    new_session: bool = True,
    connect: bool = True,
) -> dict[str, Any]:
    """Run ``code`` as ``uid`` (in a new POSIX session unless told not to);
    what it put in ``out``."""
    done = subprocess.run(
        command(uid, code, groups=groups, connect=connect),
        env=environment(daemon),
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=new_session,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def add_user_key(daemon: DaemonProcess, uid: int, description: str, payload: str) -> int:
    """A key in ``uid``'s user keyring (@u: it outlives the process)."""
    out = run_as(
        daemon, uid, f"out['key'] = c.add_key('user', {description!r}, {payload!r}.encode(), -4)"
    )
    key: int = out["key"]
    return key


def test_each_uid_has_its_own_user_keyring(daemon: DaemonProcess) -> None:
    code = """
        out['u'] = c.get_keyring_id(-4)
        out['describe'] = c.describe(-4)
        out['uid'] = c.welcome.uid
    """
    a, b = run_as(daemon, A, code), run_as(daemon, B, code)
    assert a["uid"] == A and b["uid"] == B  # identity from SO_PEERCRED
    assert a["u"] != b["u"]
    assert a["describe"] == f"keyring;{A};65534;1f3f0000;_uid.{A}"
    assert b["describe"] == f"keyring;{B};65534;1f3f0000;_uid.{B}"
    # the same uid again, from another process: the same @u
    assert run_as(daemon, A, code)["u"] == a["u"]
    with Client.connect(daemon.socket, autostart=False) as root:
        assert root.get_keyring_id(-4) not in (a["u"], b["u"])
    # another uid's @u is not even visible (other: no bits)
    out = run_as(daemon, B, f"out['r'] = attempt(c.describe, {a['u']})")
    assert out["r"] == "EACCES"


def test_session_keyring_of_a_new_session_is_separate_from_roots(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as root:
        root_session = root.get_keyring_id(-3, True)
        code = f"""
            out['s'] = c.join_session_keyring(None)  # a child inherits root's until it joins
            out['describe'] = c.describe(-3)
            out['session'] = c.welcome.session
            out['root'] = attempt(c.describe, {root_session})
        """
        out = run_as(daemon, A, code, new_session=True)
        assert out["s"] != root_session
        assert out["session"] != root.welcome.session
        assert out["describe"] == f"keyring;{A};{A};3f030000;_ses"
        assert out["root"] == "EACCES"  # root's session keyring grants others nothing
        assert root.describe(-3) == "keyring;0;0;3f030000;_ses"


def test_permission_classes_are_exclusive_and_possession_adds(daemon: DaemonProcess) -> None:
    key = add_user_key(daemon, A, "secret", "s3")
    probe = f"""
        out['describe'] = attempt(c.describe, {key})
        out['read'] = attempt(c.read, {key})
    """

    def setperm(mask: int) -> None:
        # from a process that possesses the key: no session keyring, so its
        # @s is @us, which links @u, which holds the key
        out = run_as(daemon, A, f"out['r'] = attempt(c.setperm, {key}, {mask})")
        assert out["r"] is None

    # the default mask: the owner may view; nobody else anything
    assert run_as(daemon, B, probe) == {"describe": "EACCES", "read": "EACCES"}

    # other: view + read
    setperm(OTHER_READ)
    described = f"user;{A};{A};{OTHER_READ:08x};secret"
    assert run_as(daemon, B, probe) == {"describe": described, "read": "s3"}

    # a member of the key's group gets the group byte (view only) and not
    # the other byte, although that grants more; a non-member gets other
    setperm(GROUP_VIEW_OTHER_READ)
    described = f"user;{A};{A};{GROUP_VIEW_OTHER_READ:08x};secret"
    assert run_as(daemon, B, probe, groups=(A,)) == {"describe": described, "read": "EACCES"}
    assert run_as(daemon, C, probe) == {"describe": described, "read": "s3"}

    # the owner gets the user byte (nothing here) and not the other byte;
    # the possessor byte is added when the owner possesses the key
    setperm(POSSESSOR_ONLY_OTHER_READ)
    described = f"user;{A};{A};{POSSESSOR_ONLY_OTHER_READ:08x};secret"
    assert run_as(daemon, A, probe) == {"describe": described, "read": "s3"}
    # a session keyring of its own: @u is no longer reachable
    not_possessing = "c.get_keyring_id(-3, True)\n" + textwrap.dedent(probe)
    assert run_as(daemon, A, not_possessing) == {"describe": "EACCES", "read": "EACCES"}
    assert run_as(daemon, B, probe) == {"describe": described, "read": "s3"}


def test_setperm_and_chown_by_others(daemon: DaemonProcess) -> None:
    key = add_user_key(daemon, A, "owned", "x")
    out = run_as(daemon, A, f"out['r'] = attempt(c.setperm, {key}, {OTHER_SETATTR})")
    assert out["r"] is None
    described = f"user;{A};{A};{OTHER_SETATTR:08x};owned"

    # uid B holds setattr through the other byte, but only the owner (or
    # root) may change the mask
    out = run_as(daemon, B, f"out['r'] = attempt(c.setperm, {key}, 0x3f3f3f3f)")
    assert out["r"] == "EACCES"
    # nor may anyone but root give a key away, not even its owner
    out = run_as(daemon, B, f"out['r'] = attempt(c.chown, {key}, {B}, -1)")
    assert out["r"] == "EACCES"
    out = run_as(daemon, A, f"out['r'] = attempt(c.chown, {key}, {B}, -1)")
    assert out["r"] == "EACCES"
    # the owner may set a group it is in, not another
    out = run_as(daemon, A, f"out['r'] = attempt(c.chown, {key}, -1, {B})")
    assert out["r"] == "EACCES"
    out = run_as(daemon, A, f"out['r'] = attempt(c.chown, {key}, -1, {C})", groups=(C,))
    assert out["r"] is None
    described = f"user;{A};{C};{OTHER_SETATTR:08x};owned"
    out = run_as(daemon, B, f"out['d'] = c.describe({key})")
    assert out["d"] == described

    with Client.connect(daemon.socket, autostart=False) as root:
        root.chown(key, B, -1)  # root may
        assert root.describe(key) == f"user;{B};{C};{OTHER_SETATTR:08x};owned"
    # A still possesses the key (with setattr), but no longer owns it
    out = run_as(daemon, A, f"out['r'] = attempt(c.setperm, {key}, {OTHER_READ})")
    assert out["r"] == "EACCES"


def test_quota_for_bytes_and_links(daemon: DaemonProcess) -> None:
    out = run_as(
        daemon,
        A,
        """
        def usage():
            row = [r for r in c.key_users() if r[0] == os.getuid()][0]
            return {'nkeys': row[1], 'qnkeys': row[2], 'qnbytes': row[3],
                    'maxkeys': row[4], 'maxbytes': row[5]}
        ring = c.add_key('keyring', 'q', None, -4)
        small = c.add_key('user', 'small', b'x', ring)
        before = usage()['qnbytes']
        c.link(small, -4)                      # a link costs its keyring's owner 4 bytes
        out['link_cost'] = usage()['qnbytes'] - before
        out['limits'] = [usage()['maxkeys'], usage()['maxbytes']]
        # fill the byte quota exactly: the key charges len('big') + 1 + payload,
        # its link into ring 4 more
        room = usage()['maxbytes'] - usage()['qnbytes'] - len('big') - 1 - 4
        out['one_too_many'] = attempt(c.add_key, 'user', 'big', b'b' * (room + 1), ring)
        out['exact'] = isinstance(attempt(c.add_key, 'user', 'big', b'b' * room, ring), int)
        out['full'] = usage()['qnbytes']
        out['link_when_full'] = attempt(c.link, small, -5)  # into @us, also A's
        out['key_when_full'] = attempt(c.add_key, 'user', 'z', b'z', -4)
        c.unlink(small, -4)                    # refunds the link's 4 bytes
        out['after_unlink'] = usage()['qnbytes']
        out['relink'] = attempt(c.link, small, -4)
        """,
    )
    assert out["link_cost"] == 4
    assert out["limits"] == [200, 20000]
    assert out["one_too_many"] == "EDQUOT"
    assert out["exact"] is True
    assert out["full"] == 20000
    assert out["link_when_full"] == "EDQUOT"
    assert out["key_when_full"] == "EDQUOT"
    assert out["after_unlink"] == 20000 - 4
    assert out["relink"] is None
    # the quota is per uid: another user is unaffected
    out = run_as(
        daemon, B, "out['r'] = isinstance(c.add_key('user', 'big', b'b' * 10000, -4), int)"
    )
    assert out["r"] is True


def test_quota_for_keys(daemon: DaemonProcess) -> None:
    out = run_as(
        daemon,
        A,
        """
        def qnkeys():
            return [r for r in c.key_users() if r[0] == os.getuid()][0][2]
        ring = c.add_key('keyring', 'many', None, -4)
        made = 0
        while qnkeys() < 200:
            c.add_key('user', f'k{made}', b'x', ring)
            made += 1
        out['made'] = made
        out['qnkeys'] = qnkeys()
        out['one_more'] = attempt(c.add_key, 'user', 'one-more', b'x', ring)
        out['keyring_too'] = attempt(c.add_key, 'keyring', 'r', None, ring)
        """,
    )
    assert out["qnkeys"] == 200 and out["made"] > 190
    assert out["one_more"] == "EDQUOT"
    assert out["keyring_too"] == "EDQUOT"
    with Client.connect(daemon.socket, autostart=False) as root:
        usage = {row[0]: row for row in root.key_users()}
        assert usage[A][2] == 200
        root.add_key("user", "root-is-not-limited-by-A", b"x", -4)


def test_watches_of_another_users_key(daemon: DaemonProcess) -> None:
    key = add_user_key(daemon, A, "watched", "v1")
    out = run_as(daemon, A, f"out['r'] = attempt(c.setperm, {key}, {OTHER_READ})")
    assert out["r"] is None
    watcher = subprocess.Popen(
        command(
            B,
            f"""
            import queue
            events = queue.Queue()
            out['sync'] = attempt(c.watch, {key}, events.put, sync=True)
            out['async'] = type(attempt(c.watch, {key}, events.put)).__name__
            print('ready', flush=True)
            note = events.get(timeout=20)
            out['event'] = [note.key, note.event, note.phase, note.uid]
            """,
        ),
        env=environment(daemon),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert watcher.stdout is not None and watcher.stderr is not None
        line = watcher.stdout.readline().strip()
        assert line == "ready", watcher.stderr.read()
        out = run_as(daemon, A, f"out['r'] = attempt(c.update, {key}, b'v2')")
        assert out["r"] is None
        stdout, stderr = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, stderr
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["sync"] == "EACCES"  # only the owner (or root) may hold a removal up
    assert result["async"] == "ClientWatch"
    # who acted is not told to another uid's watcher (the kernel's notification
    # names nobody; before 2026-12-07 B learned A's uid and pid)
    assert result["event"] == [key, "upd", "after", None]


def test_a_private_daemon_refuses_other_uids() -> None:
    with running_daemon("--private") as daemon:  # run by root: serves uid 0 only
        assert (os.stat(daemon.socket).st_mode & 0o777) == 0o600
        code = """
            import socket
            from keyfence import protocol
            try:
                Client.connect()
                out['client'] = 'connected'
            except KeyfenceError as err:
                out['client'] = errno.errorcode[err.errno]
            except OSError as err:
                out['client'] = errno.errorcode[err.errno]
            # what the daemon says, read before sending anything
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(os.environ['KEYFENCE_SOCKET'])
                answer = protocol.read_message(sock)
                out['raw'] = [type(answer).__name__, errno.errorcode[answer.errno], answer.id]
                out['message'] = answer.message
                out['then'] = protocol.read_frame(sock)  # closed
            except OSError as err:
                out['raw'] = errno.errorcode[err.errno]
            finally:
                sock.close()
        """
        # the socket file's mode stops it first
        out = run_as(daemon, A, code, connect=False)
        assert out["client"] == "EACCES" and out["raw"] == "EACCES"
        # and the daemon itself, if the socket is opened up
        os.chmod(daemon.socket, 0o666)
        out = run_as(daemon, A, code, connect=False)
        assert out["raw"] == ["Error", "EACCES", 0]
        assert out["message"] == "this is uid 0's private keyfence daemon"
        assert out["then"] is None
        # Client.connect sends its hello before reading: when the daemon has
        # already closed, that send fails (EPIPE) and the client reports
        # EPROTO instead of the daemon's EACCES (about 2% of attempts)
        assert out["client"] in ("EACCES", "EPROTO")
        with Client.connect(daemon.socket, autostart=False) as root:
            assert root.ping() == "pong"
