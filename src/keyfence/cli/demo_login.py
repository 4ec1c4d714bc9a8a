"""``keyfence demo --login``: the seed scenario through a real login (PAM).

What docs/login.md sets up, made for the demo and removed afterwards: a
daemon on a private socket, a mount, an account with a password whose home
is an encrypted directory of the mount, protected by the login password
(``keyfence login add``), and the PAM lines of docs/login.md in a service of
our own, ``/etc/pam.d/<prefix>-<random>``.  Then, on the real libpam:

1. log in (``pam_authenticate`` unlocks the home with the password,
   ``pam_open_session`` gives the login its ``@s``); the user writes
   ``my_file`` and an editor that outlives the shell (as a tmux server
   would) keeps ``big_file`` open with 24 MiB dirty;
2. log out: ``pam_close_session`` clears ``@s`` through the fence and
   returns once everything is encrypted on disk;
3. between the logins the home is locked: names are ciphertext;
4. log in again: every byte is there.

``--without-fence`` replays it with the daemon whose fence is off
(:func:`keyfence.cli.demo_mount.serve_without_fence`): logout wipes the key
at once and ``big_file``'s dirty pages are lost.

``su``, ``runuser``, ``login`` and ``sshd`` hard-code their PAM service
names, and a demo must not edit theirs: logins go through
:data:`PAM_LOGIN`, which does what ``su -l`` does with our service name.
The same set-up serves tests/login/ and bench/login_logout.py
(keyfence.testing.login).  Root only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keyfence.cli import demo_mount

PAM_EXEC = "/lib/x86_64-linux-gnu/security/pam_exec.so"
PAM_LOGIN = Path(__file__).with_name("pam_login.py")
"""The login program (run by path, as root)."""
KEYFENCE = [sys.executable, "-P", "-m", "keyfence.cli.main"]
"""-P: never the working directory's code on sys.path."""
USER_PYTHON = "/usr/bin/python3"
"""What the user's own processes run (the editor): any uid may."""
BIG_MIB = demo_mount.BIG_MIB

PAM_LINES = """\
# keyfence demo/test service (removed afterwards)
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
    if os.geteuid() != 0:
        return "a real login needs root (an account, a PAM service, a system daemon)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "FUSE is not available here (/dev/fuse, fusermount3)"
    if not os.path.exists(PAM_EXEC):
        return f"{PAM_EXEC} is missing (libpam-modules)"
    if not os.path.isdir("/etc/pam.d") or not os.access("/etc/pam.d", os.W_OK):
        return "/etc/pam.d is not writable: cannot install a PAM service"
    for tool in ("useradd", "userdel", "chpasswd"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (passwd)"
    return None


@dataclass
class LoginSetup:
    daemon_socket: str
    daemon: subprocess.Popen[bytes]
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

    @property
    def env(self) -> dict[str, str]:
        """Environment for keyfence processes: this daemon, no autostart."""
        return dict(os.environ, KEYFENCE_SOCKET=self.daemon_socket, KEYFENCE_NO_AUTOSTART="1")

    def keyfence(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """keyfence as root, in its own POSIX session (as an admin's shell)."""
        return subprocess.run(
            [*KEYFENCE, *args],
            input=stdin,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def _login_argv(self, command: str) -> list[str]:
        return [sys.executable, str(PAM_LOGIN), self.service, self.user, command]

    def _login_env(self, password: str | None, new_password: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYFENCE_")}
        env["PAM_LOGIN_PASSWORD"] = self.password if password is None else password
        env["PAM_LOGIN_NEW_PASSWORD"] = new_password
        return env

    def login(
        self, command: str, *, password: str | None = None, new_password: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """A whole login through libpam with our service: auth, account,
        open_session, ``command`` in the user's shell, (passwd,)
        close_session."""
        return subprocess.run(
            self._login_argv(command),
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
            self._login_argv(command),
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


def _wrapper(root: Path, socket: str, config_dir: Path) -> Path:
    """What pam_exec runs (it needs one absolute path): keyfence pam, as root.

    From ``/`` and with ``-P``: ``python -m`` puts the working directory
    first on ``sys.path``, and pam_exec keeps the PAM application's (``su``
    run from a user's directory), so a ``keyfence/`` package there ran as
    root (a helper's attack run, 2026-12-07)."""
    path = root / "keyfence-pam"
    path.write_text(
        "#!/bin/sh\n"
        "export PYTHONDONTWRITEBYTECODE=1\n"
        # this checkout's keyfence, not whichever the venv installed (pam_exec
        # passes only PAM's environment: a worktree's tests ran main's hook)
        f"export PYTHONPATH='{Path(__file__).resolve().parents[2]}'\n"
        "cd / || exit 1\n"
        f"exec {sys.executable} -P -m keyfence.cli.main pam --socket '{socket}' "
        f"--config-dir '{config_dir}' --state-dir '{root / 'state'}' --timeout 120 --debug "
        '"$@"\n'
    )
    path.chmod(0o755)
    return path


def _ensure_account(name: str, password: str, home: Path, uid: int | None) -> bool:
    """The account ``name`` with ``password`` (made, with ``home``, if
    missing); whether we made it."""
    try:
        pwd.getpwnam(name)
        created = False
    except KeyError:
        argv = ["useradd", "--user-group", "--shell", "/bin/sh", "--no-create-home"]
        argv += ["--home-dir", str(home)] + (["--uid", str(uid)] if uid is not None else [])
        subprocess.run([*argv, name], check=True, capture_output=True)
        created = True
    subprocess.run(
        ["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True
    )
    return created


@contextlib.contextmanager
def _daemon(root: Path, *, fenced: bool) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A system daemon (root) on ``root/sock``; ``fenced=False``: the demo's
    daemon without the fence (demo_mount.start_daemon, the only switch)."""
    sock, log = root / "sock", root / "daemon.log"
    env = dict(os.environ, KEYFENCE_SOCKET=str(sock), KEYFENCE_NO_AUTOSTART="1")
    with open(log, "wb") as out:
        process = demo_mount.start_daemon(sock, fenced=fenced, env=env, log=out)
    try:
        if not demo_mount.wait_for_socket(process, sock, timeout=30):
            raise RuntimeError(f"daemon did not start: {log.read_text(errors='replace')}")
        yield str(sock), process
    finally:
        demo_mount.stop_daemon(process)


@contextlib.contextmanager
def login_setup(
    user: str,
    password: str,
    *,
    uid: int | None = None,
    fenced: bool = True,
    service_prefix: str = "keyfence-demo",
) -> Iterator[LoginSetup]:
    """Everything a real login needs (root only: :func:`why_no_login`).

    The user's encrypted home is ``<mnt>/home/<user>`` (an account made
    here gets it as its home, and is removed afterwards), with a login
    protector for ``password``, listed for the login: locked until a login
    through :attr:`LoginSetup.service`.
    """
    root = Path(tempfile.mkdtemp(prefix=f"{service_prefix}-", dir="/tmp"))
    root.chmod(0o755)  # the user reaches the mount through it
    service = f"{service_prefix}-{os.urandom(4).hex()}"
    pam_file = Path("/etc/pam.d") / service
    backing, mnt, config_dir = root / "backing", root / "mnt", root / "login"
    for d in (backing, mnt, config_dir):
        d.mkdir()
    home = mnt / "home" / user
    created = False
    try:
        created = _ensure_account(user, password, home, uid)
        entry = pwd.getpwnam(user)
        with _daemon(root, fenced=fenced) as (sock, daemon):
            env = dict(os.environ, KEYFENCE_SOCKET=sock, KEYFENCE_NO_AUTOSTART="1")
            done = subprocess.run(
                [*KEYFENCE, "mount", str(backing), str(mnt)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode:
                raise RuntimeError(f"keyfence mount failed: {done.stderr}")
            try:
                home.mkdir(parents=True)
                os.chown(home, entry.pw_uid, entry.pw_gid)
                home.chmod(0o700)
                pam_log = root / "pam.log"
                wrapper = _wrapper(root, sock, config_dir)
                pam_file.write_text(PAM_LINES.format(log=pam_log, wrapper=wrapper))
                user_tmp = root / "user-tmp"
                user_tmp.mkdir()
                os.chown(user_tmp, entry.pw_uid, entry.pw_gid)
                setup = LoginSetup(
                    sock,
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
                    env=env,
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
    finally:
        pam_file.unlink(missing_ok=True)
        if created:
            subprocess.run(["userdel", "--force", user], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


# -- the demo

EDITOR = """
import os, sys, time
source, target, pidfile = sys.argv[1:4]
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with open(source, "rb") as f:
    while chunk := f.read(1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
with open(pidfile + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(pidfile + ".tmp", pidfile)
time.sleep(3600)
"""
"""Writes the file and keeps it open (dirty) until killed: never close(2),
which would write it back."""


def editor_command(source: Path, target: Path, pidfile: Path) -> str:
    """Shell lines that start :data:`EDITOR` outside the login's shell (it
    outlives it, as a tmux server would) and wait until it has written."""
    return (
        f"setsid {USER_PYTHON} -c '{EDITOR}' {source} {target} {pidfile} "
        "</dev/null >/dev/null 2>&1 &\n"
        f"for _ in $(seq 2400); do [ -s {pidfile} ] && exit 0; sleep 0.05; done; exit 1"
    )


def kill_editor(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:  # gone, or a zombie of init's
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                return
        except (OSError, IndexError):
            return
        time.sleep(0.05)


def run(*, fenced: bool = True, user: str | None = None, uid: int | None = None) -> int:
    """The scenario; 0 when it showed what it should (no loss with the
    fence; without it, the loss)."""
    why = why_no_login()
    if why:
        print(f"keyfence demo --login: {why}; try keyfence demo")
        return 1
    start = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{(time.perf_counter() - start) * 1000:8.1f} ms] {text}", flush=True)

    name = user or f"kfdemo-{os.urandom(3).hex()}"
    password = "demo-" + os.urandom(9).hex()
    step(f"setting up: a daemon, a mount, the account {name} and a PAM service")
    with login_setup(name, password, uid=uid, fenced=fenced) as s:
        step(
            f"daemon (pid {s.daemon.pid}{'' if fenced else ', WITHOUT THE FENCE'}), "
            f"{s.backing} mounted at {s.mnt}"
        )
        step(
            f"account {name} with a password; home {s.home} encrypted with a new key "
            "wrapped under the login password (keyfence login add)"
        )
        step(f"PAM service /etc/pam.d/{s.service}: the lines of docs/login.md")
        big = os.urandom(BIG_MIB << 20)
        source = s.root / "big.src"
        source.write_bytes(big)
        source.chmod(0o644)
        pidfile = s.user_tmp / "editor.pid"
        step(f"login 1 as {name} with the password, through libpam ({PAM_LOGIN.name})")
        first = s.login(
            f"cd {s.home}\necho test > my_file\n"
            + editor_command(source, s.home / "big_file", pidfile)
        )
        try:
            log = s.pam_log_text()
            if first.returncode:
                step(f"login failed ({first.returncode}): {first.stderr.strip()} {log}")
                return 1
            for line in log.splitlines():
                if line.startswith("keyfence pam: ") and "unlocked (key" in line:
                    step(f"auth + open_session: {line.removeprefix('keyfence pam: ')}")
            step(
                f"the user wrote my_file (closed) and an editor keeps big_file open "
                f"({BIG_MIB} MiB, its pages dirty in the mount); the shell exits"
            )
            cleared = re.search(r"session keyring cleared \(\d+ keys\) in ([0-9.]+) s", log)
            dirty = re.search(r"logout: ([0-9,]+) bytes to write back", log)
            took = close_session_seconds(first.stderr)
            step(
                f"logout: close_session cleared @s in {cleared.group(1) if cleared else '?'} s "
                f"({dirty.group(1) if dirty else '?'} bytes were dirty); the whole "
                f"close_session took {took if took is not None else '?'} s"
                + ("" if fenced else ": the key was wiped at once")
            )
            for line in log.splitlines():
                if "incompletely locked" in line:
                    step(line.removeprefix("keyfence pam: "))
            if not fenced:
                for drop in demo_mount.wait_for_drops(Path(s.daemon_socket)):
                    for file, nbytes in sorted(drop.get("files", {}).items()):
                        step(f"the mount could not encrypt it and dropped {file}: {nbytes:,} bytes")
            status = s.keyfence("status", str(s.home)).stdout
            state = next((x for x in status.splitlines() if x.startswith("Unlocked:")), "?")
            names = sorted(os.listdir(s.home))
            step(f"between the logins: {state.strip()}; {s.home} lists {names}")
        finally:
            kill_editor(pidfile)
        step("the editor is gone (killed)")
        second = s.login(
            f"cd {s.home} && cat my_file && stat -c 'size %s' big_file && sha256sum big_file"
        )
        out = second.stdout
        small_ok = out.startswith("test\n")
        big_ok = hashlib.sha256(big).hexdigest() in out
        size = next((int(w.split()[1]) for w in out.splitlines() if w.startswith("size ")), 0)
        step(
            f"login 2 (the same password): my_file reads 'test': {small_ok}; big_file intact: "
            f"{big_ok} ({size:,} of {len(big):,} bytes{'' if big_ok else ', sha256 differs'})"
        )
        if small_ok and big_ok:
            step("no data lost")
            return 0 if fenced else 1
        step("DATA LOST" + ("" if fenced else " without the fence"))
        return 1 if fenced else 0
