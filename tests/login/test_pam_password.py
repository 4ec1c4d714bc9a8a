"""Password changes and the login protector (docs/login.md, "Password changes").

What pam_exec gives the ``password`` step, checked on this machine's
Linux-PAM: up to 1.5.x (Debian 12: 1.5.2) ``expose_authtok`` works for
``auth`` only (pam_exec logs "expose_authtok not supported for type
password" and our standard input is empty); later releases (upstream
pull request 675, 1.6 on) pass the new password (PAM_AUTHTOK), never the
old one.  So a re-wrap at the change itself needs the key in the stash (a
session open during the change);
otherwise ``--rewrap-on-auth`` (test_pam_login.py) or ``keyfence login
passwd`` does it.
"""

from __future__ import annotations

import errno
import os
import pwd
import subprocess
import time

import pytest

from keyfence.cli import dir_keys
from keyfence.cli.dir_keys import PROTECTORS_XATTR
from keyfence.client import Client
from keyfence.constants import KEY_SPEC_USER_KEYRING
from keyfence.errors import KeyfenceError
from keyfence.testing.login import LoginSetup
from keyfence.testing.users import as_uid, environment, keyfence_argv

pytestmark = pytest.mark.slow


def pam_version() -> tuple[int, int]:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "libpam-modules"],
        capture_output=True,
        text=True,
        check=False,
    )
    major, minor = [*done.stdout.split(":")[-1].split("-")[0].split("."), "0", "0"][:2]
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else (0, 0)


def backing_files(s: LoginSetup) -> list[tuple[str, bytes]]:
    return sorted(
        (str(p.relative_to(s.backing)), p.read_bytes())
        for p in s.backing.rglob("*")
        if p.is_file() and p.name != ".keyfence-protectors"
    )


def test_passwd_with_nobody_logged_in_then_login_passwd(login_setup: LoginSetup) -> None:
    """``passwd alice`` by root while she is away, through PAM (pamtester
    chauthtok with our service: pam_unix changes it, pam_exec runs
    ``keyfence pam``): no old password anywhere, no key in the stash, so
    the protector keeps the old password; the next login is not refused
    but the home stays locked; ``keyfence login passwd`` (old and new)
    fixes it without re-encrypting anything."""
    s = login_setup
    made = s.login(f"echo before > {s.home}/before")
    assert made.returncode == 0, made.stderr + s.pam_log_text()
    before = backing_files(s)
    new = s.password + "-new"
    changed = s.pamtester("chauthtok", stdin=f"{new}\n{new}\n")
    assert changed.returncode == 0, changed.stderr
    log = s.pam_log_text()
    if pam_version() < (1, 6):
        # the fact docs/login.md documents: the password step gets nothing
        assert "chauthtok got no password from pam_exec" in log, log
    else:  # the new password may come, the key is not in the stash all the same
        assert "chauthtok got no password" in log or "not re-wrapped" in log, log
    assert new not in log and s.password not in log
    s.pam_log.write_text("")
    locked = s.login(f"cat {s.home}/before 2>/dev/null || echo locked", password=new)
    assert locked.returncode == 0, locked.stderr  # keyfence never refuses a login
    assert locked.stdout == "locked\n"
    assert "the login password does not open it" in s.pam_log_text()
    fixed = s.keyfence(
        "login", "passwd", "--user", s.user, "--config-dir", str(s.config_dir), str(s.home),
        stdin=f"{s.password}\n{new}\n",
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    again = s.login(f"cat {s.home}/before", password=new)
    assert again.returncode == 0, again.stderr + s.pam_log_text()
    assert again.stdout == "before\n"
    assert backing_files(s) == before  # re-wrapped, not re-encrypted
    # a cost above what root runs at a login is refused before anything is written
    costly = s.keyfence(
        "login", "passwd", "--kdf-cost", "19", "--user", s.user,
        "--config-dir", str(s.config_dir), str(s.home), stdin=f"{new}\n{s.password}\n",
    )  # fmt: skip
    assert costly.returncode == 2, costly.stderr
    assert "--kdf-cost: out of range (10 to 18)" in costly.stderr


def test_password_step_with_the_token_rewraps_from_the_stash(login_setup: LoginSetup) -> None:
    """What a later Linux-PAM's pam_exec does for ``password`` with
    ``expose_authtok`` (the new password, NUL-terminated, on standard
    input; PAM_TYPE=password), replayed on the PAM line's own command
    since this machine's pam_exec may not: with a session open, the key is
    in the stash and the protector is re-wrapped at the change, so the
    next login's auth opens it directly."""
    s = login_setup
    go = s.user_tmp / "go"
    session = s.login_process(
        f"echo kept > {s.home}/kept; echo up > {s.user_tmp}/up; "
        f"until [ -e {go} ]; do sleep 0.1; done"
    )
    try:
        deadline = time.monotonic() + 120
        while not (s.user_tmp / "up").exists():
            assert session.poll() is None and time.monotonic() < deadline, s.pam_log_text()
            time.sleep(0.1)
        before = backing_files(s)
        new = s.password + "-changed"
        # pam_unix's part of the change, then pam_exec's
        subprocess.run(
            ["chpasswd"], input=f"{s.user}:{new}\n", text=True, check=True, capture_output=True
        )
        step = subprocess.run(
            [str(s.root / "keyfence-pam")],
            input=new.encode() + b"\x00",
            env=dict(os.environ, PAM_TYPE="password", PAM_USER=s.user, PAM_SERVICE=s.service),
            capture_output=True,
            timeout=120,
            check=False,
            start_new_session=True,
        )
        assert step.returncode == 0, step.stderr
        assert b"login protector re-wrapped for the new password" in step.stderr
        assert new.encode() not in step.stdout + step.stderr
    finally:
        go.touch()
        session.communicate(timeout=300)
    s.pam_log.write_text("")
    again = s.login(f"cat {s.home}/kept", password=new)
    assert again.returncode == 0, again.stderr + s.pam_log_text()
    assert again.stdout == "kept\n"
    log = s.pam_log_text()
    assert "re-wrapped" not in log and "does not open it" not in log, log
    after = dict(backing_files(s))
    assert all(after.get(name) == blob for name, blob in before)  # nothing re-encrypted


def _user_ids(s: LoginSetup) -> tuple[int, int]:
    entry = pwd.getpwnam(s.user)
    return entry.pw_uid, entry.pw_gid


def _as_user(s: LoginSetup, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    uid, gid = _user_ids(s)
    return subprocess.run(
        as_uid(uid, keyfence_argv(*args), gid=gid),
        input=stdin,
        env={**environment(s.env), "HOME": str(s.user_tmp)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd="/",
    )


def test_login_add_takes_only_the_login_password(login_setup: LoginSetup) -> None:
    """A protector under a password that is not the login password would
    never open at login: ``login add`` asks PAM first (as fscrypt does),
    and a wrong password leaves the directory as it was (not encrypted,
    not listed).  Before the check, both adds succeeded."""
    s = login_setup
    uid, gid = _user_ids(s)
    mine = s.mnt / "pw-check"
    mine.mkdir()
    os.chown(mine, uid, gid)
    mine.chmod(0o700)
    config = s.config_dir / f"{s.user}.toml"
    listed = config.read_text() if config.exists() else ""

    wrong = s.keyfence(
        "login", "add", "--user", s.user, "--config-dir", str(s.config_dir), str(mine),
        stdin="not-" + s.password + "\n",
    )  # fmt: skip
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert f"that is not {s.user}'s login password" in wrong.stderr
    assert "Traceback" not in wrong.stderr and s.password not in wrong.stderr
    assert dir_keys.policy_of(str(mine)) is None and not any(mine.iterdir())
    assert (config.read_text() if config.exists() else "") == listed

    # the user's own add: pam_unix's helper checks the user's own password
    # (the user's list goes in a plain home: the encrypted one is locked)
    subprocess.run(["usermod", "-d", str(s.user_tmp), s.user], check=True)
    theirs = _as_user(s, "login", "add", str(mine), stdin="not-" + s.password + "\n")
    assert theirs.returncode == 1, theirs.stdout + theirs.stderr
    assert f"that is not {s.user}'s login password" in theirs.stderr
    assert dir_keys.policy_of(str(mine)) is None
    right = _as_user(s, "login", "add", str(mine), stdin=s.password + "\n")
    assert right.returncode == 0, right.stderr
    assert dir_keys.policy_of(str(mine)) is not None


def test_login_passwd_takes_only_the_new_login_password(login_setup: LoginSetup) -> None:
    """``login passwd``'s new password must be the login password now (root
    re-wraps after ``passwd alice``); another leaves the protector as it was."""
    s = login_setup
    before = os.getxattr(s.home, PROTECTORS_XATTR)
    refused = s.keyfence(
        "login", "passwd", "--user", s.user, "--config-dir", str(s.config_dir), str(s.home),
        stdin=f"{s.password}\nnot-{s.password}\n",
    )  # fmt: skip
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"that is not {s.user}'s login password" in refused.stderr
    assert os.getxattr(s.home, PROTECTORS_XATTR) == before


def test_the_password_check_runs_no_login_hook(login_setup: LoginSetup) -> None:
    """An admin's ``/etc/pam.d/keyfence`` that includes ``common-auth``
    would run ``keyfence pam`` for the check itself: for the service
    ``keyfence`` it does nothing (no stash of the user's keys).  The same
    call for the login's own service does stash them."""
    s = login_setup
    ring = f"keyfence-login:{s.user}"

    def stashed() -> bool:
        with Client.connect(s.daemon_socket, autostart=False) as root:
            try:
                root.search(KEY_SPEC_USER_KEYRING, "keyring", ring)
            except KeyfenceError as err:
                assert err.errno == errno.ENOKEY, err
                return False
            return True

    argv = keyfence_argv(
        "pam", "--config-dir", str(s.config_dir), "--state-dir", str(s.root / "state"),
        "--socket", s.daemon_socket,
    )  # fmt: skip

    def hook(service: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            input=s.password,
            env=environment(s.env, PAM_TYPE="auth", PAM_USER=s.user, PAM_SERVICE=service),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd="/",
        )

    checked = hook("keyfence")
    assert checked.returncode == 0, checked.stderr
    assert not stashed()
    logged_in = hook(s.service)
    assert logged_in.returncode == 0, logged_in.stderr
    assert stashed()
