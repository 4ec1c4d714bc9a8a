"""A real sshd for login tests: ``ssh user@host command`` through OpenSSH's
own PAM code, with the PAM lines of docs/login.md.

sshd takes its PAM service name from the name it was started by (OpenSSH's
``SSHD_PAM_SERVICE`` is ``__progname`` in Debian 12's 9.2), so a link
named as a :class:`~keyfence.cli.demo_login.LoginSetup`'s service makes it
use that service, and ``/etc/pam.d/sshd`` is never touched.  It runs in
inetd mode (``sshd -i``) as the client's ``ProxyCommand``: one connection,
no port, nothing listening.  The client answers the password prompts
through ``SSH_ASKPASS``.

sshd comes from setup.sh, which unpacks Debian's openssh-server package
into the venv (``.venv/openssh-server``) without installing it, so that no
service starts; an installed ``/usr/sbin/sshd`` serves as well.  Its
privilege separation needs the ``sshd`` account and ``/run/sshd``: made
here if missing (as the package makes them) and removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keyfence.cli.demo_login import LoginSetup

__all__ = ["Ssh", "find_sshd", "sshd_for", "why_no_sshd"]

PRIVSEP_USER = "sshd"
PRIVSEP_DIR = Path("/run/sshd")
METHODS = ("keyboard-interactive", "password")
"""sshd's two ways to a PAM ``auth``: its conversation, and the password
it was sent (both reach ``pam_exec expose_authtok``)."""


def find_sshd() -> Path | None:
    """setup.sh's unpacked sshd, else an installed one."""
    for candidate in (Path(sys.prefix) / "openssh-server/usr/sbin/sshd", Path("/usr/sbin/sshd")):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def why_no_sshd() -> str | None:
    """Why a real ssh login cannot run here, or None."""
    if find_sshd() is None:
        return "no sshd: scripts/setup.sh (as root) unpacks one into .venv/openssh-server"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (openssh-client)"
    return None


@dataclass
class Ssh:
    """Logins into a :class:`LoginSetup`'s account through a real sshd."""

    setup: LoginSetup
    sshd: Path
    """The link named as the PAM service."""
    config: Path
    askpass: Path
    password_file: Path

    def login(
        self,
        command: str,
        *,
        password: str | None = None,
        method: str = METHODS[0],
        tty: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """``ssh user@host command``: auth, account, open_session, the
        command in the user's shell, close_session (before ssh returns).

        ``tty``: an interactive login instead (``ssh -tt user@host``, a
        pty and the user's login shell) that is sent ``command`` as typed
        lines, then ``exit``; the result holds what the command printed
        (stdout and stderr, one stream on a pty) and its exit status."""
        self.password_file.write_text(self.setup.password if password is None else password)
        proxy = f"{self.sshd} -i -e -f {self.config}"
        options = {
            "ProxyCommand": proxy,
            "StrictHostKeyChecking": "no",
            "UserKnownHostsFile": "/dev/null",
            "PreferredAuthentications": method,
            "NumberOfPasswordPrompts": "1",
            "LogLevel": "ERROR",
        }
        argv = ["ssh", "-F", "/dev/null", "-tt" if tty else "-T"]
        for name, value in options.items():
            argv += ["-o", f"{name}={value}"]
        argv.append(f"{self.setup.user}@keyfence-test")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYFENCE_")}
        env.update(SSH_ASKPASS=str(self.askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY="none")
        done = subprocess.run(
            argv if tty else [*argv, command],
            env=env,
            input=_typed(command) if tty else None,
            stdin=None if tty else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            start_new_session=True,
        )
        return _from_terminal(done) if tty and done.returncode != 255 else done


_BEGIN, _END = "kf-output-begins", "kf-output-ends"


def _typed(command: str) -> str:
    """What a user types for ``command`` at a shell prompt, then ``exit``.

    The terminal echoes the lines as they arrive, before ``stty -echo``
    runs, so the markers are printed by ``printf`` from halves: the echo
    shows the halves apart, the output the marker."""
    begin = f"'{_BEGIN[:5]}' '{_BEGIN[5:]}'"
    end = f"'{_END[:5]}' '{_END[5:]}'"
    return (
        "stty -echo; PS1=; PS2=\n"
        f"printf '%s%s\\n' {begin}\n"
        f"{{\n{command}\n}}\n"
        f"rc=$?; printf '%s%s %s\\n' {end} $rc; exit $rc\n"
    )


def _from_terminal(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """The command's own output and status out of a terminal session's."""
    text = done.stdout.replace("\r\n", "\n")
    start = text.find(_BEGIN + "\n")
    end = text.rfind(_END)
    if start < 0 or end < start:
        return done  # the shell never got that far: the whole session shows why
    output = text[start + len(_BEGIN) + 1 : end]
    status = re.match(r" ([0-9]+)", text[end + len(_END) :])
    code = int(status.group(1)) if status else done.returncode
    return subprocess.CompletedProcess(done.args, code, output, done.stderr + text)


@contextlib.contextmanager
def _privilege_separation() -> Iterator[None]:
    """The ``sshd`` account and ``/run/sshd`` for the time of the tests."""
    made_user = made_dir = False
    try:
        try:
            pwd.getpwnam(PRIVSEP_USER)
        except KeyError:
            argv = ["useradd", "--system", "--no-create-home", "--home-dir", str(PRIVSEP_DIR)]
            argv += ["--shell", "/usr/sbin/nologin", PRIVSEP_USER]
            subprocess.run(argv, check=True, capture_output=True)
            made_user = True
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            made_dir = True
        yield
    finally:
        if made_dir:
            shutil.rmtree(PRIVSEP_DIR, ignore_errors=True)
        if made_user:
            subprocess.run(["userdel", PRIVSEP_USER], capture_output=True, check=False)


@contextlib.contextmanager
def sshd_for(setup: LoginSetup) -> Iterator[Ssh]:
    """A real sshd for ``setup``'s account and PAM service (root only)."""
    binary = find_sshd()
    assert binary is not None, why_no_sshd()
    directory = setup.root / "sshd"
    directory.mkdir(mode=0o700)
    host_key = directory / "host_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
        check=True,
        capture_output=True,
    )
    config = directory / "sshd_config"
    config.write_text(
        f"HostKey {host_key}\n"
        "UsePAM yes\n"
        "KbdInteractiveAuthentication yes\n"
        "PasswordAuthentication yes\n"
        "PubkeyAuthentication no\n"
        "PermitRootLogin no\n"
        "AuthorizedKeysFile none\n"
        "PidFile none\n"
        "LogLevel ERROR\n"
    )
    link = directory / setup.service
    link.symlink_to(binary)
    password_file = directory / "password"
    askpass = directory / "askpass"
    askpass.write_text(f"#!/bin/sh\ncat '{password_file}'\n")
    askpass.chmod(0o700)
    with _privilege_separation():
        yield Ssh(setup, link, config, askpass, password_file)
