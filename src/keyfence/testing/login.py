"""A real login set-up: a user with a password, a daemon on a private socket,
a mount with the user's encrypted home, the PAM lines of docs/login.md in a
service file of our own, and a login program on the real libpam.

Shared by tests/login/ (the seed scenario through PAM) and
bench/login_logout.py (what the fence saves at logout).  Everything is the
caller's own: the account (named by the caller, in its uid range), the
socket, the mount, ``/etc/pam.d/<prefix>-<random>`` (removed afterwards),
the login list and the session counts (a temporary directory).

``su``, ``runuser``, ``login`` and ``sshd`` hard-code their PAM service
names and nobody's test may edit theirs, so logins go through
:data:`PAM_LOGIN` (what ``su -l`` does, with our service name).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keyfence.cli import demo_mount
from keyfence.testing.daemon import DaemonProcess
from keyfence.testing.users import SYSTEM_PYTHON, ensure_user, pythonpath, why_no_other_uids

PAM_EXEC = "/lib/x86_64-linux-gnu/security/pam_exec.so"
PAM_LOGIN = Path(__file__).with_name("pam_login.py")
"""The login program (run by path with the system interpreter, as root)."""
KEYFENCE = [sys.executable, "-m", "keyfence.cli.main"]

PAM_LINES = """\
# keyfence test service (removed after the test)
auth     requisite pam_unix.so
auth     optional  pam_exec.so expose_authtok log={log} {wrapper} --rewrap-on-auth
account  required  pam_unix.so
password required  pam_unix.so
password optional  pam_exec.so expose_authtok log={log} {wrapper}
session  optional  pam_exec.so log={log} {wrapper}
"""
"""docs/login.md's lines (``auth`` runs only after pam_unix accepted)."""


def why_no_login() -> str | None:
    """Why a real login cannot be set up here, or None."""
    why = why_no_other_uids()
    if why:
        return why
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "FUSE is not available here (/dev/fuse, fusermount3)"
    if not os.path.exists(PAM_EXEC):
        return f"{PAM_EXEC} is missing (libpam-modules)"
    if not os.path.isdir("/etc/pam.d") or not os.access("/etc/pam.d", os.W_OK):
        return "/etc/pam.d is not writable: cannot install a test PAM service"
    return None


@dataclass
class LoginSetup:
    daemon: DaemonProcess
    root: Path
    backing: Path
    mnt: Path
    home: Path
    user: str
    password: str
    service: str
    pam_log: Path
    config_dir: Path
    user_tmp: Path
    """A plain directory the user may write (outside the encrypted home)."""

    def keyfence(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """keyfence as root, in its own POSIX session (as an admin's shell)."""
        return subprocess.run(
            [*KEYFENCE, *args],
            input=stdin,
            env=self.daemon.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def _login_env(self, password: str | None, new_password: str) -> dict[str, str]:
        return dict(
            os.environ,
            PAM_LOGIN_PASSWORD=self.password if password is None else password,
            PAM_LOGIN_NEW_PASSWORD=new_password,
            PYTHONPATH=pythonpath(),
        )

    def login(
        self, command: str, *, password: str | None = None, new_password: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """A whole login through libpam with our service: auth, account,
        open_session, ``command`` in the user's shell, (passwd,)
        close_session."""
        return subprocess.run(
            [SYSTEM_PYTHON, str(PAM_LOGIN), self.service, self.user, command],
            env=self._login_env(password, new_password),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            start_new_session=True,
        )

    def login_process(self, command: str) -> subprocess.Popen[str]:
        """:meth:`login` left running (the caller waits for it)."""
        return subprocess.Popen(
            [SYSTEM_PYTHON, str(PAM_LOGIN), self.service, self.user, command],
            env=self._login_env(None, ""),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def pamtester(self, *ops: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pamtester", "-v", self.service, self.user, *ops],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            start_new_session=True,
        )

    def pam_log_text(self) -> str:
        try:
            return self.pam_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def close_session_seconds(stderr: str) -> float | None:
    """The logout's length from :data:`PAM_LOGIN`'s last line, if there."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("pam_login: close_session took "):
            return float(line.split()[3])
    return None


def _wrapper(root: Path, daemon: DaemonProcess, config_dir: Path) -> Path:
    """What pam_exec runs: keyfence from this checkout, as root."""
    path = root / "keyfence-pam"
    path.write_text(
        "#!/bin/sh\n"
        f"export PYTHONPATH='{pythonpath()}' PYTHONDONTWRITEBYTECODE=1\n"
        f"exec {SYSTEM_PYTHON} -m keyfence.cli.main pam --socket '{daemon.socket}' "
        f"--config-dir '{config_dir}' --state-dir '{root / 'state'}' --timeout 120 --debug "
        '"$@"\n'
    )
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def _daemon(root: Path, *, fenced: bool) -> Iterator[DaemonProcess]:
    """A system daemon (root) on ``root/sock``; ``fenced=False``: the demo's
    daemon without the fence (keyfence.cli.demo_mount, the only switch)."""
    sock, log = root / "sock", root / "daemon.log"
    env = dict(os.environ, KEYFENCE_SOCKET=str(sock), KEYFENCE_NO_AUTOSTART="1")
    with open(log, "wb") as out:
        process = demo_mount.start_daemon(sock, fenced=fenced, env=env, log=out)
    try:
        if not demo_mount.wait_for_socket(process, sock, timeout=30):
            raise RuntimeError(f"daemon did not start: {log.read_text(errors='replace')}")
        yield DaemonProcess(str(sock), process, str(log))
    finally:
        demo_mount.stop_daemon(process)


@contextlib.contextmanager
def login_setup(
    user: str,
    password: str,
    *,
    uid: int | None = None,
    fenced: bool = True,
    service_prefix: str = "kfpam-test",
) -> Iterator[LoginSetup]:
    """Everything a real login needs (root only: see :func:`why_no_login`).

    The user's home is ``<mnt>/home/<user>``, encrypted, with a login
    protector for ``password`` and listed for the login (``keyfence login
    add``): locked until a login through :attr:`LoginSetup.service`.
    """
    entry = ensure_user(user, password=password, uid=uid)
    root = Path(tempfile.mkdtemp(prefix=f"{service_prefix}-", dir="/tmp"))
    root.chmod(0o755)  # the user reaches the mount through it
    service = f"{service_prefix}-{os.urandom(4).hex()}"
    pam_file = Path("/etc/pam.d") / service
    backing, mnt, config_dir = root / "backing", root / "mnt", root / "login"
    for d in (backing, mnt, config_dir):
        d.mkdir()
    try:
        with _daemon(root, fenced=fenced) as daemon:
            done = subprocess.run(
                [*KEYFENCE, "mount", str(backing), str(mnt)],
                env=daemon.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode:
                raise RuntimeError(f"keyfence mount failed: {done.stderr}")
            try:
                home = mnt / "home" / user
                home.mkdir(parents=True)
                os.chown(home, entry.pw_uid, entry.pw_gid)
                home.chmod(0o700)
                wrapper = _wrapper(root, daemon, config_dir)
                pam_log = root / "pam.log"
                pam_file.write_text(PAM_LINES.format(log=pam_log, wrapper=wrapper))
                user_tmp = root / "user-tmp"
                user_tmp.mkdir()
                os.chown(user_tmp, entry.pw_uid, entry.pw_gid)
                setup = LoginSetup(
                    daemon,
                    root,
                    backing,
                    mnt,
                    home,
                    user,
                    password,
                    service,
                    pam_log,
                    config_dir,
                    user_tmp,
                )
                added = setup.keyfence(
                    "login", "add", "--user", user, "--config-dir", str(config_dir), str(home),
                    stdin=password + "\n",
                )  # fmt: skip
                if added.returncode:
                    raise RuntimeError(f"keyfence login add failed: {added.stderr}")
                yield setup
            finally:
                subprocess.run(
                    [*KEYFENCE, "umount", str(mnt)],
                    env=daemon.env,
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
    finally:
        pam_file.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
