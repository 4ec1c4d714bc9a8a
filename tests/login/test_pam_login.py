"""The seed scenario through a real login and logout (PAM, pam_exec).

A real account with a password; the PAM lines of docs/login.md in a test
service; two login programs: one on the real libpam (keyfence/cli/pam_login.py,
what su does, with our service name) and a real sshd (``ssh user@host
command``, keyfence.testing.sshd); pamtester for the single steps.  The
user writes in the encrypted home, leaves a file open and dirty in a
process that outlives the login (as a tmux server would), logs out; logout
returns once everything is encrypted on disk, the home is locked (names
are ciphertext) until the next login, which finds every byte.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from keyfence.client import Client
from keyfence.constants import KEY_SPEC_USER_KEYRING
from keyfence.errors import KeyfenceError
from keyfence.testing.login import LoginSetup
from keyfence.testing.sshd import sshd_for, why_no_sshd
from keyfence.testing.users import (
    as_uid,
    ensure_user,
    environment,
    keyfence_argv,
    temporary_user,
)
from tests.login.conftest import Login

pytestmark = pytest.mark.slow

DIRTY_MIB = 24


def test_login_unlocks_logout_locks_and_keeps_every_byte(
    login_setup: LoginSetup, login: Login
) -> None:
    s = login_setup
    data = os.urandom(DIRTY_MIB << 20)
    source = s.root / "source.bin"
    source.write_bytes(data)
    source.chmod(0o644)
    pidfile = s.user_tmp / "holder.pid"
    first = login.run(
        f"""
        set -e
        cd {s.home}
        echo "my notes" > notes.txt
        head -c 1048576 {source} > big.bin
        # a process that outlives the login with a file open and dirty (a
        # close(2), even of a dup, would flush it: write, never close)
        setsid python3 -c '
import os, sys, time
fd = os.open("open.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.write(fd, b"still open\\n")
with open(sys.argv[1], "rb") as src:
    while chunk := src.read(1 << 20):
        os.write(fd, chunk)
open(sys.argv[2], "w").write(str(os.getpid()))
time.sleep(600)
' {source} {pidfile} </dev/null >/dev/null 2>&1 &
        for _ in $(seq 600); do [ -s {pidfile} ] && break; sleep 0.05; done
        """
    )
    log = s.pam_log_text()
    assert first.returncode == 0, first.stderr + log
    assert "1 directory ready to unlock" in log, log
    assert f"{s.home} unlocked (key" in log, log
    dirty = re.search(r"logout: ([0-9,]+) bytes to write back", log)
    cleared = re.search(r"session keyring cleared \(1 keys\) in ([0-9.]+) s", log)
    assert dirty is not None and cleared is not None, log
    print(
        f"\nlogout, {DIRTY_MIB} MiB written in an open file, {dirty.group(1)} bytes dirty:"
        f" close_session cleared @s in {cleared.group(1)} s"
    )
    # fscrypt's "incompletely locked": the holder's file is named at logout
    assert "incompletely locked, still open:" in log and "open.log" in log, log
    holder = int(pidfile.read_text())
    try:
        # between the logins: locked, names are ciphertext, nothing plaintext on disk
        status = s.keyfence("status", str(s.home))
        assert "Unlocked: Partially (incompletely locked)" in status.stdout, status.stdout
        os.kill(holder, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "Unlocked: No" not in (status := s.keyfence("status", str(s.home))).stdout:
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.1)
        names = os.listdir(s.home)
        assert len(names) == 3
        assert not {"big.bin", "notes.txt", "open.log"} & set(names), names
        with pytest.raises(OSError):
            (s.home / names[0]).read_bytes()
        for path in s.backing.rglob("*"):
            assert path.name not in ("big.bin", "notes.txt", "open.log")
            if path.is_file():
                blob = path.read_bytes()
                assert b"my notes" not in blob and data[:4096] not in blob
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder, signal.SIGKILL)
    second = login.run(
        f"cd {s.home} && sha256sum big.bin open.log && cat notes.txt && head -n1 open.log && ls -1"
    )
    assert second.returncode == 0, second.stderr + s.pam_log_text()
    lines = second.stdout.splitlines()
    assert lines[0].split()[0] == hashlib.sha256(data[: 1 << 20]).hexdigest()
    assert lines[1].split()[0] == hashlib.sha256(b"still open\n" + data).hexdigest()
    assert lines[2:] == ["my notes", "still open", "big.bin", "notes.txt", "open.log"]
    assert "Unlocked: No" in s.keyfence("status", str(s.home)).stdout


def test_wrong_password_unlocks_nothing_and_errors_never_block(
    login_setup: LoginSetup, login: Login
) -> None:
    s = login_setup
    wrong = login.run("echo never", password="not-the-password")
    assert wrong.returncode == login.refused, wrong  # pam_unix refused: keyfence never ran
    assert "ready to unlock" not in s.pam_log_text()
    # the daemon gone: the login still works, the home stays locked
    s.daemon.kill()
    s.daemon.wait(60)
    # (stderr to /dev/null: on a terminal it is the same stream)
    gone = login.run(f"{{ ls {s.home}; echo hello > {s.home}/x; }} >/dev/null 2>&1 || echo locked")
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.strip() == "locked"
    assert "open_session:" in s.pam_log_text()  # logged, not fatal
    assert s.password not in s.pam_log_text()


def test_pamtester_steps(login_setup: LoginSetup) -> None:
    s = login_setup
    done = s.pamtester("authenticate", "open_session", "close_session", stdin=s.password + "\n")
    assert done.returncode == 0, done.stderr
    log = s.pam_log_text()
    assert "ready to unlock" in log and "unlocked (key" in log and "cleared (1 keys)" in log
    # close_session without our open_session (su from an admin's shell whose
    # open_session failed): the application's @s is not ours to clear
    alone = s.pamtester("close_session", stdin="")
    assert alone.returncode == 0, alone.stderr
    assert "not the one open_session made; left alone" in s.pam_log_text()


def test_an_authentication_no_session_followed_unlocks_no_later_session(
    login_setup: LoginSetup,
) -> None:
    """A helper's attack run (2026-12-07): ``authenticate`` alone (an ssh
    login aborted after the password, an auth-only ``sudo``) stashed the
    key, and a later session that gave no password (an ssh key login) found
    it and unlocked the home; the key stayed in root's keyring.  Now a
    stash is this application's (or, with no session open, dropped), and
    an auth-only one expires (AUTH_STASH_SECONDS)."""
    s = login_setup
    alone = s.pamtester("authenticate", stdin=s.password + "\n")
    assert alone.returncode == 0, alone.stderr
    later = s.pamtester("open_session", "close_session", stdin="")
    assert later.returncode == 0, later.stderr
    log = s.pam_log_text()
    assert "ready to unlock" in log
    assert "unlocked (key" not in log, log
    assert "a stash no session used was dropped" in log


def test_an_auth_only_stash_is_wiped_when_it_expires(login_setup: LoginSetup) -> None:
    """A helper's secrets run (2026-12-07): the auth-only stash's timeout
    was set on its keyring alone; an expired keyring keeps its keys until
    the collector reaps it, so the master key stayed readable by root for
    another five minutes.  The keys themselves expire now."""
    s = login_setup
    service = Path("/etc/pam.d") / s.service
    lines = service.read_text()
    service.write_text(lines.replace("--rewrap-on-auth", "--rewrap-on-auth --stash-seconds 2"))
    alone = s.pamtester("authenticate", stdin=s.password + "\n")
    assert alone.returncode == 0, alone.stderr
    assert "ready to unlock" in s.pam_log_text()
    with Client.connect(s.daemon_socket, autostart=False) as root:
        ring = int(root.search(KEY_SPEC_USER_KEYRING, "keyring", f"keyfence-login:{s.user}"))
        (key,) = root.list_keyring(ring)
        assert len(root.read(key)) > 0
        deadline = time.monotonic() + 30
        while True:
            try:
                root.read(key)
            except KeyfenceError as err:
                assert err.errno in (errno.EKEYEXPIRED, errno.ENOKEY), err
                break
            assert time.monotonic() < deadline, "the stashed master key outlived its stash"
            time.sleep(0.2)


def test_a_killed_login_program_leaves_no_stash_for_a_login_without_password(
    login_setup: LoginSetup,
) -> None:
    """A helper's pam_fscrypt comparison (2026-12-08): a login program
    killed before its close_session (SIGKILL, a crash) left the session
    count at 1 for ever, so the stash (the home's master key, no expiry)
    was never dropped and every later login that gave no password (an ssh
    key, root's su) unlocked the home, while ``keyfence status`` said
    locked.  A session counts while the PAM application that opened it
    runs."""
    s = login_setup
    up = s.user_tmp / "up"
    login = s.login_process(f"echo up > {up}; sleep 600")
    try:
        deadline = time.monotonic() + 120
        while not up.exists():
            assert login.poll() is None and time.monotonic() < deadline, s.pam_log_text()
            time.sleep(0.1)
        assert "unlocked (key" in s.pam_log_text()
    finally:
        os.killpg(login.pid, signal.SIGKILL)  # the login program and the user's shell
        login.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while "Unlocked: No" not in s.keyfence("status", str(s.home)).stdout:
        assert time.monotonic() < deadline, "the killed login's @s outlived its processes"
        time.sleep(0.2)
    before = len(s.pam_log_text())
    later = s.pamtester("open_session", "close_session", stdin="")
    assert later.returncode == 0, later.stderr
    log = s.pam_log_text()[before:]
    assert "unlocked (key" not in log, log
    assert "a stash no session used was dropped" in log, log


def test_login_add_refuses_a_directory_outside_a_mount(login_setup: LoginSetup) -> None:
    s = login_setup
    plain = s.root / "plain"
    plain.mkdir()
    done = s.keyfence("login", "add", "--config-dir", str(s.config_dir), str(plain), stdin="x\n")
    assert done.returncode == 1
    assert "not a directory of a keyfence mount" in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(plain.iterdir())


def test_password_change_rewraps_without_reencrypting(login_setup: LoginSetup) -> None:
    """passwd while a session is open; the next login with the new password
    re-wraps the key (Debian 12's pam_exec gives chauthtok no password, so
    the re-wrap happens at that login's auth, from the stash)."""
    s = login_setup
    made = s.login(f"echo before > {s.home}/before")
    assert made.returncode == 0, made.stderr + s.pam_log_text()
    backing_before = sorted(p.name for p in s.backing.rglob("*"))
    go = s.user_tmp / "go"
    first = s.login_process(f"echo up > {s.user_tmp}/up; until [ -e {go} ]; do sleep 0.1; done")
    try:
        deadline = time.monotonic() + 120
        while not (s.user_tmp / "up").exists():
            assert first.poll() is None and time.monotonic() < deadline, s.pam_log_text()
            time.sleep(0.1)
        new = s.password + "-new"
        # passwd through PAM (pam_unix changes it; pam_exec's chauthtok runs too)
        changed = s.login("true", new_password=new)
        assert changed.returncode == 0, changed.stderr + s.pam_log_text()
        second = s.login(f"cat {s.home}/before", password=new)
        assert second.returncode == 0, second.stderr + s.pam_log_text()
        assert second.stdout == "before\n"
        assert "login protector re-wrapped for the new password" in s.pam_log_text()
    finally:
        go.touch()
        first.communicate(timeout=300)
    s.pam_log.write_text("")
    third = s.login(f"cat {s.home}/before", password=new)
    assert third.returncode == 0, third.stderr + s.pam_log_text()
    assert third.stdout == "before\n"
    assert "does not open it" not in s.pam_log_text()
    # the data was not re-encrypted: the same backing files
    assert sorted(p.name for p in s.backing.rglob("*")) == backing_before


def test_lock_across_sessions_the_user_their_own_not_others(login_setup: LoginSetup) -> None:
    """fscrypt's lock: the key is found through the mount, whoever's @s holds
    it; the user may lock their own home from outside the login, another
    user may not."""
    s = login_setup
    go = s.user_tmp / "go"
    login = s.login_process(
        f"echo data > {s.home}/f; echo up > {s.user_tmp}/up; "
        f"until [ -e {go} ]; do sleep 0.1; done; cat {s.home}/f 2>&1 || true"
    )
    try:
        deadline = time.monotonic() + 120
        while not (s.user_tmp / "up").exists():
            assert login.poll() is None and time.monotonic() < deadline, s.pam_log_text()
            time.sleep(0.1)
        assert "Unlocked: Yes" in s.keyfence("status", str(s.home)).stdout
        env = environment(KEYFENCE_SOCKET=s.daemon_socket, KEYFENCE_NO_AUTOSTART="1")

        def lock_as(uid: int, *, new_session: bool) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                as_uid(uid, keyfence_argv("lock", str(s.home))),
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                start_new_session=new_session,
            )

        with temporary_user("kfpam2") as other:
            refused = lock_as(other.pw_uid, new_session=False)
        assert refused.returncode == 1, refused.stdout
        assert "Traceback" not in refused.stderr
        assert "Unlocked: Yes" in s.keyfence("status", str(s.home)).stdout
        # the user, from a process outside the login (no @s of its own)
        mine = lock_as(ensure_user(s.user).pw_uid, new_session=True)
        assert mine.returncode == 0, mine.stderr
        assert f"{s.home}: locked" in mine.stdout
        assert "Unlocked: No" in s.keyfence("status", str(s.home)).stdout
    finally:
        go.touch()
        out, _err = login.communicate(timeout=300)
    assert "data" not in out  # locked under the login's feet: the name is ciphertext now
    again = s.login(f"cat {s.home}/f")
    assert again.stdout == "data\n", again.stderr


def test_ssh_password_authentication_unlocks_too(login_setup: LoginSetup) -> None:
    """sshd's ``password`` method gives PAM the password the client sent
    (no prompt in between): ``pam_exec expose_authtok`` reads it all the same."""
    why = why_no_sshd()
    if why:
        pytest.skip(why)
    s = login_setup
    with sshd_for(s) as ssh:
        done = ssh.login(f"echo via-password > {s.home}/p && cat {s.home}/p", method="password")
        assert done.returncode == 0, done.stderr + s.pam_log_text()
        assert done.stdout == "via-password\n"
        assert f"{s.home} unlocked (key" in s.pam_log_text()
        assert "session keyring cleared (1 keys)" in s.pam_log_text()
        refused = ssh.login("true", password="not-the-password", method="password")
        assert refused.returncode == 255
    assert "Unlocked: No" in s.keyfence("status", str(s.home)).stdout
    assert s.password not in s.pam_log_text()


def test_an_interactive_ssh_login_is_a_terminal_session(login_setup: LoginSetup) -> None:
    """``login`` fixture's ``sshd-tty``: a pty and an interactive login
    shell (the commands typed at its prompt), unlocked and locked as the
    others."""
    why = why_no_sshd()
    if why:
        pytest.skip(why)
    s = login_setup
    with sshd_for(s) as ssh:
        done = ssh.login(f"tty; echo flags=$-; echo typed > {s.home}/t", tty=True)
    assert done.returncode == 0, done.stderr + s.pam_log_text()
    terminal, flags = done.stdout.splitlines()
    assert terminal.startswith("/dev/pts/") and "i" in flags.removeprefix("flags="), done.stdout
    assert "session keyring cleared (1 keys)" in s.pam_log_text()
    assert "Unlocked: No" in s.keyfence("status", str(s.home)).stdout
    assert s.login(f"cat {s.home}/t").stdout == "typed\n"
