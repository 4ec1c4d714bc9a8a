"""The seed scenario through real processes: daemon, mount worker, sessions.

`keyfence mount` asks the daemon to spawn the worker; a login session (a new
POSIX session) adds an e4crypt key and writes; `kfctl clear @s` returns only
once the data is encrypted on disk; the directory is then locked; a new
session unlocks with the same passphrase and reads everything back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.fs.worker import WORKER_DESCRIPTORS
from keyfence.server.daemon import DAEMON_DESCRIPTORS
from keyfence.testing.daemon import DaemonProcess, running_daemon

BIN = Path(sys.executable).parent
PASSPHRASE = "correct horse battery staple\n"
SALT = "s:keyfence-test-salt"

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="FUSE is not available here (/dev/fuse, fusermount3)",
)


def session_sh(
    daemon: DaemonProcess, script: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new POSIX session with a fresh @s (``kfctl
    new_session``, as pam_keyinit gives a login), as a login would."""
    env = dict(daemon.env, PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run(
        ["sh", "-ec", "kfctl new_session >/dev/null\n" + script],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
        check=False,
    )


def add_key_elsewhere(daemon: DaemonProcess, home: Path) -> subprocess.CompletedProcess[str]:
    """Give ``home`` a passphrase policy in a session of its own, and take
    that session's copy of the key away again before returning: while the
    session's end was still on its way, the mount kept that copy bound, the
    holder's writes went under it, and its removal then wrote them back
    (dirty 0, no key) -- CI run 21's flaky failures."""
    return session_sh(
        daemon,
        f"keyfence e4crypt add_key {shlex.quote(str(home))} >/dev/null && kfctl clear @s",
        stdin=PASSPHRASE,
    )


def unlock_script(home: Path) -> str:
    """A new login's first steps: its own @s, the directory unlocked in it."""
    password = PASSPHRASE.strip()
    return f"kfctl new_session >/dev/null; echo '{password}' | keyfence unlock {home} >/dev/null"


def start_login(daemon: DaemonProcess, home: Path, script: str) -> subprocess.Popen[str]:
    """A login of its own that unlocks ``home``, then runs ``script``
    (stdin, stdout and stderr piped)."""
    return subprocess.Popen(
        ["sh", "-ec", f"{unlock_script(home)}; {script}"],
        env=dict(daemon.env, PATH=f"{BIN}:{os.environ['PATH']}"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Path, Path]]:
    backing, mountpoint = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mountpoint.mkdir()
    with running_daemon("--system") as daemon:
        done = session_sh(daemon, f"keyfence mount {backing} {mountpoint}")
        assert done.returncode == 0, done.stderr
        try:
            yield daemon, backing, mountpoint
        finally:
            session_sh(daemon, f"keyfence umount {mountpoint} || true")
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def test_logout_keeps_the_data_and_locks(mounted: tuple[DaemonProcess, Path, Path]) -> None:
    daemon, backing, mnt = mounted
    home = mnt / "home" / "alice"
    home.mkdir(parents=True)
    big = os.urandom(8 << 20)
    (backing.parent / "big.bin").write_bytes(big)
    login = session_sh(
        daemon,
        f"""
        keyfence e4crypt add_key -S {SALT} {home}
        echo test > {home}/my_file
        cp {backing.parent}/big.bin {home}/big_file
        kfctl clear @s
        ls {home}
        cat {home}/my_file 2>/dev/null && echo READABLE || echo locked
        """,
        stdin=PASSPHRASE,
    )
    assert login.returncode == 0, login.stderr
    assert "Added key with descriptor [" in login.stdout
    listing = login.stdout.split("\n")
    assert "my_file" not in listing and "big_file" not in listing
    assert login.stdout.strip().endswith("locked")
    # the backing store never holds a plaintext name or block
    for path in backing.rglob("*"):
        assert "my_file" not in path.name and "big_file" not in path.name
        if path.is_file():
            data = path.read_bytes()
            assert b"test\n" not in data and big[:4096] not in data
    again = session_sh(
        daemon,
        f"""
        keyfence unlock -S {SALT} {home} >/dev/null
        cat {home}/my_file
        sha256sum {home}/big_file
        """,
        stdin=PASSPHRASE,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("test\n")
    assert hashlib.sha256(big).hexdigest() in again.stdout


def test_a_directory_is_listed_with_the_readers_keys(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    """As ext4's readdir: the reading process's keyrings count, not those of
    the process that opened the directory (which may have exited and its
    pid gone to another user's process).  Here the opener has no key and
    hands its descriptor to a child whose @s holds it."""
    daemon, _, mnt = mounted
    home = mnt / "home"
    home.mkdir()
    made = session_sh(
        daemon,
        f"keyfence e4crypt add_key -S {SALT} {home} >/dev/null; touch {home}/plain-name; "
        "kfctl clear @s",
        stdin=PASSPHRASE,
    )
    assert made.returncode == 0, made.stderr
    password = PASSPHRASE.strip()
    listed = session_sh(
        daemon,
        f"""
        exec 3<{home}
        sh -ec 'kfctl new_session >/dev/null
            echo "{password}" | keyfence e4crypt add_key -S {SALT} >/dev/null
            python3 -c "import os; print(sorted(os.listdir(3)))"'
        """,
    )
    assert listed.returncode == 0, listed.stderr
    assert "plain-name" in listed.stdout, listed.stdout


def test_wrong_passphrase_is_a_clear_error(mounted: tuple[DaemonProcess, Path, Path]) -> None:
    daemon, _backing, mnt = mounted
    home = mnt / "secret"
    home.mkdir()
    made = session_sh(daemon, f"keyfence e4crypt add_key -S {SALT} {home}", stdin=PASSPHRASE)
    assert made.returncode == 0, made.stderr
    wrong = session_sh(daemon, f"keyfence unlock -S {SALT} {home}", stdin="not it\n")
    assert wrong.returncode == 1
    assert "wrong passphrase" in wrong.stderr


def _table_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("FDSize:")).split()[1])


def test_the_worker_and_the_daemon_make_their_descriptor_tables_at_start(
    mounted: tuple[DaemonProcess, Path, Path],
) -> None:
    """Room for thousands of descriptors from the start (keyfence/fdtable.py):
    a table doubled later waits for an RCU grace period inside a request
    (7-22 ms here; a process starts with 64 or 256)."""
    daemon, _backing, _mnt = mounted
    status = session_sh(daemon, "keyfence status --json")
    worker = json.loads(status.stdout)["mounts"][0]["pid"]
    assert _table_size(worker) >= WORKER_DESCRIPTORS
    assert _table_size(daemon.process.pid) >= DAEMON_DESCRIPTORS


def test_a_dead_worker_is_reported(mounted: tuple[DaemonProcess, Path, Path]) -> None:
    daemon, _backing, mnt = mounted
    status = session_sh(daemon, "keyfence status --json")
    pid = json.loads(status.stdout)["mounts"][0]["pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while True:
        status = session_sh(daemon, "keyfence status")
        if ": dead" in status.stdout:
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.1)
    assert not os.path.ismount(mnt)
