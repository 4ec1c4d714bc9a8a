"""A real login set-up: a user with a password, a daemon on a private socket,
a mount with the user's encrypted home, PAM lines in a test service file.

Everything is the test's own: the account (``kfpam*``), the socket, the
mount, ``/etc/pam.d/kfpam-test-<random>`` (removed afterwards), the login
list and the session counts (temporary directories).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyfence.testing.daemon import DaemonProcess, running_daemon
from keyfence.testing.users import SYSTEM_PYTHON, ensure_user, pythonpath, why_no_other_uids

PAM_EXEC = "/lib/x86_64-linux-gnu/security/pam_exec.so"
PAM_LOGIN = Path(__file__).with_name("pam_login.py")
KEYFENCE = [sys.executable, "-m", "keyfence.cli.main"]


def why_no_login() -> str | None:
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

    def login(
        self, command: str, *, password: str | None = None, new_password: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """A whole login through libpam with the test service: auth,
        account, open_session, ``command`` in the user's shell, (passwd,)
        close_session."""
        env = dict(
            os.environ,
            PAM_LOGIN_PASSWORD=self.password if password is None else password,
            PAM_LOGIN_NEW_PASSWORD=new_password,
            PYTHONPATH=pythonpath(),
        )
        return subprocess.run(
            [SYSTEM_PYTHON, str(PAM_LOGIN), self.service, self.user, command],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            start_new_session=True,
        )

    def login_process(self, command: str) -> subprocess.Popen[str]:
        """:meth:`login` left running (the caller waits for it)."""
        env = dict(os.environ, PAM_LOGIN_PASSWORD=self.password, PYTHONPATH=pythonpath())
        return subprocess.Popen(
            [SYSTEM_PYTHON, str(PAM_LOGIN), self.service, self.user, command],
            env=env,
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


PAM_LINES = """\
# keyfence test service (removed after the test)
auth     requisite pam_unix.so
auth     optional  pam_exec.so expose_authtok log={log} {wrapper} --rewrap-on-auth
account  required  pam_unix.so
password required  pam_unix.so
password optional  pam_exec.so expose_authtok log={log} {wrapper}
session  optional  pam_exec.so log={log} {wrapper}
"""


@pytest.fixture
def login_setup() -> Iterator[LoginSetup]:
    why = why_no_login()
    if why:
        pytest.skip(why)
    name, password = "kfpam1", "kfpam-" + secrets.token_hex(6)
    entry = ensure_user(name, password=password)
    root = Path(tempfile.mkdtemp(prefix="kfpam-", dir="/tmp"))
    root.chmod(0o755)  # the user reaches the mount through it
    service = f"kfpam-test-{secrets.token_hex(4)}"
    pam_file = Path("/etc/pam.d") / service
    backing, mnt, config_dir = root / "backing", root / "mnt", root / "login"
    for d in (backing, mnt, config_dir):
        d.mkdir()
    try:
        with running_daemon("--system") as daemon:
            done = subprocess.run(
                [*KEYFENCE, "mount", str(backing), str(mnt)],
                env=daemon.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            try:
                home = mnt / "home" / name
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
                    name,
                    password,
                    service,
                    pam_log,
                    config_dir,
                    user_tmp,
                )
                added = setup.keyfence(
                    "login",
                    "add",
                    "--user",
                    name,
                    "--config-dir",
                    str(config_dir),
                    str(home),
                    stdin=password + "\n",
                )
                assert added.returncode == 0, added.stderr
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
