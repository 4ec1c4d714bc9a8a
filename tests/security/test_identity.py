"""Caller identity is pinned to the process (issue 12, finding 3).

A process connects and exits; its pid goes to a process in root's login
before the daemon looks at /proc.  The daemon must not take the newcomer's
session (or anything else of it) for the connection's.  The pid reuse is
forced with /proc/sys/kernel/ns_last_pid inside a fresh pid namespace
(``unshare --pid --fork --mount-proc``) in which the daemon, root's login
and the attacker all run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from keyfence.testing import users

ATTACKER_UID = 4642

DRIVER = textwrap.dedent(
    r"""
    import os, signal, subprocess, sys, time
    tmp, attacker_argv = sys.argv[1], sys.argv[2:]
    sock = os.path.join(tmp, "sock")
    env = dict(os.environ, KEYFENCE_SOCKET=sock, KEYFENCE_NO_AUTOSTART="1")
    env["PATH"] = tmp + "/bin:" + env["PATH"]
    daemon = subprocess.Popen(
        [sys.executable, "-m", "keyfence.cli.main", "daemon", "--system", "--socket", sock],
        stdout=open(os.path.join(tmp, "daemon.log"), "wb"), stderr=subprocess.STDOUT, env=env)
    while not os.path.exists(sock):
        time.sleep(0.02)
    victim = subprocess.Popen(
        ["sh", "-c", "keyctl new_session >/dev/null; keyctl add user secret s3cret @s >/dev/null;"
         " echo ready; read go; sleep 60 & echo $!; read done"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    assert victim.stdout.readline() == "ready\n"
    os.kill(daemon.pid, signal.SIGSTOP)
    # not a session or group leader: a pid still naming a session is never reused
    attacker = subprocess.Popen(attacker_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
    pid = int(attacker.stdout.readline())
    assert attacker.wait() == 0
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    victim.stdin.write("go\n"); victim.stdin.flush()
    reused = int(victim.stdout.readline())
    print("reused" if reused == pid else f"not reused: {pid} -> {reused}", flush=True)
    os.kill(daemon.pid, signal.SIGCONT)
    # the attacker's child still holds the connection: let it talk
    with open(os.path.join(tmp, "go"), "w") as f:
        f.write("go")
    print(attacker.stdout.readline().strip(), flush=True)
    victim.stdin.write("done\n"); victim.stdin.flush()
    victim.wait()
    daemon.terminate(); daemon.wait()
    """
)

ATTACKER = textwrap.dedent(
    r"""
    import os, socket, sys, time
    from keyfence.client import Client
    tmp = sys.argv[1]
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(tmp, "sock"))
    if os.fork():
        print(os.getpid(), flush=True)
        os._exit(0)
    while not os.path.exists(os.path.join(tmp, "go")):
        time.sleep(0.02)
    try:
        c = Client.over_socket(s)
        key = c.search(-3, "user", "secret", 0)
        print("STOLEN", c.read(key).decode(), flush=True)
    except Exception as err:
        print("REFUSED", err, flush=True)
    """
)


def test_a_reused_pid_does_not_lend_its_session_to_a_connection() -> None:
    if (reason := users.why_no_other_uids()) is not None:
        pytest.skip(reason)
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing: cannot make a pid namespace")
    with tempfile.TemporaryDirectory(prefix="kfses-") as tmp:
        os.chmod(tmp, 0o755)
        os.makedirs(os.path.join(tmp, "bin"))
        shim = os.path.join(tmp, "bin", "keyctl")
        with open(shim, "w") as f:
            f.write(f'#!/bin/sh\nexec {users.SYSTEM_PYTHON} -m keyfence.cli.kfctl "$@"\n')
        os.chmod(shim, 0o755)
        attacker = users.as_uid(ATTACKER_UID, users.python_argv("-c", ATTACKER, tmp))
        argv = ["unshare", "--pid", "--fork", "--mount-proc"]
        argv += users.python_argv("-c", DRIVER, tmp, *attacker)
        done = subprocess.run(
            argv,
            env=users.environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        with open(os.path.join(tmp, "daemon.log"), errors="replace") as f:
            log = f.read()
    assert done.returncode == 0, done.stderr + log
    reused, outcome = done.stdout.splitlines()
    if reused != "reused":
        pytest.skip(f"could not force the pid reuse ({reused})")
    assert outcome.startswith("REFUSED"), outcome
    assert "s3cret" not in outcome


PLANTER_UID = 4643

PLANTER = textwrap.dedent(
    r"""
    import os, sys, threading, time
    from keyfence.client import Client
    work = sys.argv[1]
    c = Client.connect()
    key = c.add_key("user", "planted", b"x", -3)  # into root's @s, inherited
    c.watch(key, lambda note: threading.Event().wait(), sync=True, name="never acks")
    c.join_session_keyring(None)  # leave root's session, keep the watch
    open(os.path.join(work, "planted"), "w").write(str(key))
    time.sleep(600)
    """
)


def test_a_planted_key_with_a_silent_watcher_holds_neither_roots_clear_nor_its_logout() -> None:
    """Issue 12, finding 4: uid 4643, started in root's login, plants its own
    key in root's @s with a synchronous watcher that never acks and leaves
    the session.  Root's ``kfctl clear @s`` returns (the foreign watcher
    holds it up FOREIGN_WATCHER_SECONDS at most), and when root's login
    ends its keyring and keys go (checked failing before: clear hung)."""
    _planted_key_holds_neither_roots_clear_nor_its_logout(PLANTER)


REVOKING_PLANTER = PLANTER.replace(
    "c.join_session_keyring(None)",
    "c.setperm(key, 0x3F3F0000)  # its owner may revoke it out of the session too\n"
    "mine = Client.connect()\n"
    "threading.Thread(target=mine.revoke, args=(key,), daemon=True).start()\n"
    "time.sleep(0.5)  # its own removal now fences the key, held by its own watcher\n"
    "c.join_session_keyring(None)",
)


def test_a_planted_key_fenced_by_its_owners_own_removal_holds_neither_roots_clear_nor_logout() -> (
    None
):
    """Red-team pass of session 26, finding 1: the planter also starts its
    own removal of the planted key (``revoke``), which its own silent
    watcher holds without bound (it is patient for its own uid).  Root's
    clear found the key fenced by that removal and waited for it without
    bound, and so did the end of root's login.  Now a removal waits for
    another removal's fence at most FOREIGN_WATCHER_SECONDS when every
    watcher that fence still waits for is foreign to it, then takes the
    keys over (checked failing before: the clear hung past the test's 90 s)."""
    _planted_key_holds_neither_roots_clear_nor_its_logout(REVOKING_PLANTER)


RING_PLANTER = PLANTER.replace(
    """key = c.add_key("user", "planted", b"x", -3)  # into root's @s, inherited""",
    """ring = c.add_key("keyring", "theirs", None, -3)  # its own, in root's @s\n"""
    "c.setperm(ring, 0x3F3F0000)\n"
    'key = c.add_key("user", "planted", b"x", ring)',
)


@pytest.mark.parametrize("command", ["keyctl purge user", "keyctl unlink $(cat {work}/planted)"])
def test_a_planted_keyring_with_a_silent_watcher_holds_neither_roots_purge_nor_unlink(
    command: str,
) -> None:
    """A helper's attack run (2026-12-07): the planter's key sits in a
    keyring of its own inside root's @s.  Root's ``purge`` or ``unlink``
    cuts it from that keyring, which the planter owns: a removal by root
    counted the owner of the keyring cut from as patient, so the silent
    watcher held root's command without bound (59.8 s, until the planter
    exited; the kernel answers at once).  Now root's removal waits for
    a user's watcher FOREIGN_WATCHER_SECONDS at most (the login hook clears
    a user's @s as that user instead).  Failed before: past the test's 90 s."""
    _planted_key_holds_neither_roots_clear_nor_its_logout(RING_PLANTER, command)


def _planted_key_holds_neither_roots_clear_nor_its_logout(
    planter_code: str, command: str = "keyctl clear @s"
) -> None:
    if (reason := users.why_no_other_uids()) is not None:
        pytest.skip(reason)
    from keyfence.client import Client
    from keyfence.errors import KeyfenceError
    from keyfence.testing.daemon import running_daemon

    with running_daemon("--system") as daemon, tempfile.TemporaryDirectory(prefix="kfses-") as work:
        os.chmod(work, 0o777)
        os.makedirs(os.path.join(work, "bin"))
        shim = os.path.join(work, "bin", "keyctl")
        with open(shim, "w") as f:
            f.write(f'#!/bin/sh\nexec {users.SYSTEM_PYTHON} -m keyfence.cli.kfctl "$@"\n')
        os.chmod(shim, 0o755)
        os.chmod(os.path.dirname(daemon.socket), 0o755)
        planter = " ".join(users.as_uid(PLANTER_UID, users.python_argv("-c", "$PLANTER", work)))
        script = f"""
            keyctl new_session >/dev/null
            keyctl add user mine v @s > {work}/mine
            {planter.replace("$PLANTER", '"$PLANTER"')} </dev/null >{work}/planter.log 2>&1 &
            echo $! > {work}/planter
            while [ ! -s {work}/planted ]; do sleep 0.05; done
            {command.format(work=work)} >/dev/null && echo cleared
            keyctl add user again v @s > {work}/again
        """
        env = users.environment(
            KEYFENCE_SOCKET=daemon.socket,
            KEYFENCE_NO_AUTOSTART="1",
            PLANTER=planter_code,
        )
        env["PATH"] = f"{work}/bin:{env['PATH']}"
        try:
            done = subprocess.run(
                ["sh", "-c", script],
                env=env,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert done.stdout == "cleared\n", done.stderr
            again, planted = (int(Path(work, name).read_text()) for name in ("again", "planted"))
            # root's login is over: its keyring and every key in it go,
            # the planted key's silent watcher notwithstanding
            with Client.connect(daemon.socket, autostart=False) as c:
                for serial in (again, planted):
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            c.describe(serial)
                        except KeyfenceError:
                            break
                        assert time.monotonic() < deadline, f"key {serial} outlived the login"
                        time.sleep(0.1)
        finally:
            with open(os.path.join(work, "planter")) as f:
                pid = int(f.read() or 0)
            if pid:
                subprocess.run(["kill", str(pid)], check=False)


LOGOUT_UID = 4644

LOGOUT_HOOK = textwrap.dedent(
    r"""
    import os, subprocess, sys, time
    from keyfence.cli import pam
    from keyfence.cli.login_setup import LoginUser
    from keyfence.client import Client
    work, uid, watcher = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    c = Client.connect()
    ring = c.join_session_keyring(None)  # as open_session: a new @s, the user's
    c.chown(ring, uid, uid)
    key = c.add_key("user", "home", b"v", -3)
    c.chown(key, uid, uid)
    child = subprocess.Popen(watcher)  # the user's mount worker, as it were
    while not os.path.exists(os.path.join(work, "watching")):
        time.sleep(0.05)
    start = time.monotonic()
    pam._clear_as(LoginUser("kf-nobody", uid, uid, "/"), 60)
    took = time.monotonic() - start
    print(f"{took:.1f}", os.path.exists(os.path.join(work, "flushed")), c.list_keyring(ring))
    child.kill()
    """
)

SLOW_WATCHER = textwrap.dedent(
    r"""
    import os, sys, time
    from keyfence.client import Client
    work = sys.argv[1]
    c = Client.connect()
    key = c.search(-3, "user", "home")

    def flush(note):
        time.sleep(7)  # longer than a foreign watcher's bound
        open(os.path.join(work, "flushed"), "w").close()

    c.watch(key, flush, sync=True, name="flushing a user's mount")
    open(os.path.join(work, "watching"), "w").close()
    time.sleep(600)
    """
)


def test_logout_waits_for_the_users_own_watcher_past_the_foreign_bound() -> None:
    """The login hook's close_session clears the user's @s with the user's
    ids switched in (as pam_keyinit revokes it), so the user's own watcher
    -- a mount of theirs, writing back -- is waited for without bound:
    root's own removal would give it FOREIGN_WATCHER_SECONDS (5 s) and go
    on without it.  Here it takes 7 s, and the clear returns after it."""
    if (reason := users.why_no_other_uids()) is not None:
        pytest.skip(reason)
    from keyfence.testing.daemon import running_daemon

    with running_daemon("--system") as daemon, tempfile.TemporaryDirectory(prefix="kfout-") as work:
        os.chmod(work, 0o777)
        os.chmod(os.path.dirname(daemon.socket), 0o755)
        watcher = users.as_uid(LOGOUT_UID, users.python_argv("-c", SLOW_WATCHER, work))
        env = users.environment(KEYFENCE_SOCKET=daemon.socket, KEYFENCE_NO_AUTOSTART="1")
        done = subprocess.run(
            [*users.python_argv("-c", LOGOUT_HOOK, work, str(LOGOUT_UID)), *watcher],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        took, flushed, left = done.stdout.split(maxsplit=2)
        assert (flushed, left) == ("True", "[]\n"), done.stderr
        assert float(took) >= 6.5, done.stdout
