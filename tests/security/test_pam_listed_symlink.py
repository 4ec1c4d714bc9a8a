"""``keyfence pam auth --rewrap-on-auth`` must not write, as root, through a
path the user controls (found by a red-team pass; pam_dirs.py now opens
each listed directory once and reads and writes through that descriptor).

Before the fix:

do_auth (src/keyfence/cli/pam.py) reads a listed directory's protectors at
``where`` (a path string from the user's own login.toml, symlinks followed),
runs the KDF with the parameters stored in the user's own record (as slow
as the user likes), and on a wrong password with the key in the stash calls
_rewrap, which reads and *writes* ``user.keyfence.protectors`` at the same
path string again.  The user swaps a symlink on that path during the KDF:
root then rewrites another user's directory's protectors (or sets the
xattr on any file root can reach).

Set-up (docs/login.md's lines, real PAM through pamtester):
* rtuser2 (the attacker) has a plain home and an encrypted directory D2 of
  her own on the shared root mount, listed in her ~/.config/keyfence/login.toml
  through a symlink ``~/lnk -> D2``;
* rtuser3 (the victim) has an encrypted directory on the same mount;
* auth #1 puts D2's key in the stash; rtuser2 re-wraps D2 under another
  password with a slow KDF (``keyfence login passwd --kdf-cost 18``);
* auth #2 with the login password: while root runs the KDF, rtuser2 points
  ``~/lnk`` at the victim's directory.

The victim's protectors must be unchanged afterwards, and the attacker's
own record re-wrapped as the password change asks.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyfence.cli.dir_keys import PROTECTORS_XATTR
from keyfence.fs.protector import Protectors
from keyfence.testing.login import LoginSetup, login_setup, why_no_login
from keyfence.testing.users import as_uid, environment, keyfence_argv, python_argv, temporary_user

pytestmark = pytest.mark.slow

UNCHECKED_KEYFENCE = (
    "import sys; from keyfence.cli import main, pam_check; "
    "pam_check.check_login_password = lambda user, password: None; "
    "sys.exit(main.main(sys.argv[1:]))"
)
ATTACKER = "rtuser2"
VICTIM = "rtuser3"

RACER = r"""
import os, sys, time
link, target = sys.argv[1:3]
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            cmd = open(f"/proc/{e}/cmdline", "rb").read()
            if b"keyfence.cli.main\0pam" not in cmd:
                continue
            for line in open(f"/proc/{e}/status"):
                if line.startswith("VmHWM:") and int(line.split()[1]) > 150 * 1024:
                    tmp = link + ".new"
                    os.symlink(target, tmp)
                    os.replace(tmp, link)
                    print("swapped while pid", e, "ran its KDF", flush=True)
                    sys.exit(0)
        except (OSError, ValueError):
            continue
    time.sleep(0.01)
print("never saw the KDF", flush=True)
sys.exit(1)
"""


@dataclass
class Scene:
    s: LoginSetup
    attacker: int
    victim_uid: int
    password: str
    d2: Path
    link: Path
    theirs: Path
    before: bytes
    as_attacker: Callable[..., subprocess.CompletedProcess[str]]


@contextlib.contextmanager
def attacker_and_victim() -> Iterator[Scene]:
    """rtuser2 with a plain home, her own encrypted D2 listed in her
    login.toml through ``~/lnk -> D2``; rtuser3 with an encrypted directory
    on the same shared mount."""
    password = "rt-" + secrets.token_hex(8)
    with (
        login_setup(ATTACKER, password, service_prefix="rt-pam") as s,
        temporary_user(VICTIM, password="victim-password") as victim,
    ):
        attacker = os.stat(s.home).st_uid
        plain_home = s.user_tmp  # the attacker's plain (unencrypted) home
        subprocess.run(["usermod", "-d", str(plain_home), ATTACKER], check=True)

        def as_attacker(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                as_uid(attacker, ["setsid", "-w", *argv]),
                input=stdin,
                env={**environment(s.env), "HOME": str(plain_home)},
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
                cwd="/",
            )

        # the attacker's own encrypted directory D2, on the shared mount
        mine = s.mnt / "rt-attacker"
        mine.mkdir()
        os.chown(mine, attacker, attacker)
        d2 = mine / "d2"
        made = as_attacker(
            "sh",
            "-ec",
            f"mkdir {d2}; " + " ".join(keyfence_argv("login", "add", str(d2))),
            stdin=password + "\n",
        )
        assert made.returncode == 0, made.stderr
        link = plain_home / "lnk"
        wrote = as_attacker(
            "sh", "-ec",
            f"ln -s {d2} {link}; "
            f"printf 'directories = [\"{link}\"]\\n' > {plain_home}/.config/keyfence/login.toml",
        )  # fmt: skip
        assert wrote.returncode == 0, wrote.stderr

        # the victim's encrypted directory on the same mount
        theirs = s.mnt / "home" / VICTIM
        theirs.mkdir()
        os.chown(theirs, victim.pw_uid, victim.pw_gid)
        theirs.chmod(0o700)
        vconf = s.root / "victim-login"
        vconf.mkdir()
        added = s.keyfence(
            "login", "add", "--user", VICTIM, "--config-dir", str(vconf), str(theirs),
            stdin="victim-password\n",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        before = os.getxattr(theirs, PROTECTORS_XATTR)
        yield Scene(s, attacker, victim.pw_uid, password, d2, link, theirs, before, as_attacker)


@pytest.mark.skipif(why_no_login() is not None, reason=why_no_login() or "")
def test_rewrap_does_not_write_through_a_swapped_user_symlink() -> None:
    other = "rt-other-" + secrets.token_hex(4)
    with attacker_and_victim() as sc:
        s = sc.s
        # auth #1: D2's key (through ~/lnk) goes into the stash
        first = s.pamtester("authenticate", stdin=sc.password + "\n")
        assert first.returncode == 0, first.stderr
        assert "2 directories ready to unlock" in s.pam_log_text(), s.pam_log_text()

        # the attacker re-wraps D2 under another password, with a slow KDF
        # (`keyfence login passwd` takes only the login password: the
        # attacker runs the same code without that check)
        passwd = sc.as_attacker(
            *python_argv("-P", "-c", UNCHECKED_KEYFENCE, "login", "passwd", "--kdf-cost", "18"),
            str(sc.d2),
            stdin=f"{sc.password}\n{other}\n",
        )
        assert passwd.returncode == 0, passwd.stderr

        racer = subprocess.Popen(
            as_uid(sc.attacker, python_argv("-c", RACER, str(sc.link), str(sc.theirs))),
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(0.2)
        second = s.pamtester("authenticate", stdin=sc.password + "\n")
        racer_out = racer.communicate(timeout=150)[0]
        assert second.returncode == 0, second.stderr
        assert "swapped" in racer_out, racer_out

        assert f"{sc.link}: login protector re-wrapped" in s.pam_log_text(), s.pam_log_text()
        after = os.getxattr(sc.theirs, PROTECTORS_XATTR)
        uids = [p.uid for p in Protectors.parse(after).logins]
        assert after == sc.before, (
            f"root rewrote {VICTIM}'s protectors through {ATTACKER}'s symlink: login "
            f"protectors now for uids {uids} (attacker {sc.attacker}, victim {sc.victim_uid}); "
            f"racer: {racer_out.strip()}; pam log: "
            + " | ".join(x for x in s.pam_log_text().splitlines() if "keyfence pam" in x)[-600:]
        )


@pytest.mark.skipif(why_no_login() is not None, reason=why_no_login() or "")
def test_a_user_listed_directory_must_be_the_users_own() -> None:
    """The user's own list may name only the user's directories: root does
    not read (or re-wrap) the protectors of someone else's."""
    with attacker_and_victim() as sc:
        s = sc.s
        os.unlink(sc.link)
        os.symlink(sc.theirs, sc.link)
        done = s.pamtester("authenticate", stdin=sc.password + "\n")
        assert done.returncode == 0, done.stderr
        log = s.pam_log_text()
        assert f"{sc.link}: not {ATTACKER}'s own directory; left locked" in log, log
        assert "1 directory ready to unlock" in log, log  # the home in the system list
        assert os.getxattr(sc.theirs, PROTECTORS_XATTR) == sc.before
