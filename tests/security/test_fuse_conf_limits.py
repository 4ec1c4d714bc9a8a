"""The root daemon applies /etc/fuse.conf as fusermount3 would (issue 11).

The system daemon mounts users' FUSE filesystems itself (/dev/fuse is 0600
on these machines), so fusermount3's rules are its to apply: ``mount_max``
(a user may not mount while that many FUSE filesystems are mounted) and
``user_allow_other``, with fusermount3's parsing of the file.

The product reads /etc/fuse.conf and nothing else, so the daemon runs in a
private mount namespace (``unshare --mount``) with a file of the test
bind-mounted over /etc/fuse.conf; the limit is set from the number of FUSE
mounts that namespace holds (copies of the machine's, frozen at unshare:
other tests' mounts cannot change it).  Real uid (setpriv), real mounts.
``test_mount_max_is_applied_to_users`` failed before the limit existed (the
second mount was made); ``test_user_allow_other_is_read_as_fusermount3_reads_it``
failed before fuse.conf was parsed as fusermount3 parses it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyfence.server.fuse_conf import FuseConf, count_fuse_mounts, parse_fuse_conf
from keyfence.testing import users
from tests.security.mount_helpers import SHELL_PRELUDE, why_not

USER = 61200
"""The mounting user (this test's uids: 61200-61209)."""
OTHER = 61201
"""Another user on a mount USER opened to others (allow_other)."""

MESSAGE = "too many FUSE filesystems mounted; mount_max=N can be set in /etc/fuse.conf"


# ------------------------------------------------------- parsing, no daemon


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"", FuseConf()),
        (b"user_allow_other\n", FuseConf(user_allow_other=True)),
        (b"  user_allow_other\t # allowed\n", FuseConf(user_allow_other=True)),
        (b"#user_allow_other\n", FuseConf()),
        (b"user_allow_other", FuseConf()),  # no newline: fusermount3 skips the line
        (b"user_allow_other=1\n", FuseConf()),
        (b"mount_max = 3\n", FuseConf(mount_max=3)),
        (b"mount_max=3\n", FuseConf(mount_max=3)),
        (b"mount_max   =\t7 # seven\n", FuseConf(mount_max=7)),
        (b"mount_max = 010\n", FuseConf(mount_max=8)),
        (b"mount_max = 0x10\n", FuseConf(mount_max=16)),
        (b"mount_max = 12abc\n", FuseConf(mount_max=12)),
        (b"mount_max = -1\n", FuseConf(mount_max=-1)),
        (b"mount_max = many\n", FuseConf()),
        (b"#mount_max = 1\n", FuseConf()),
        (b"mount_max = 2\nmount_max = 5\n", FuseConf(mount_max=5)),
        (b"mount_max = " + b"0" * 300 + b"4\n", FuseConf()),  # too long a line
    ],
)
def test_fuse_conf_is_parsed_as_fusermount3_parses_it(text: bytes, expected: FuseConf) -> None:
    assert parse_fuse_conf(text) == expected


def test_fuse_mounts_are_counted_as_fusermount3_counts_them(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "a /x fuse.keyfence rw 0 0\n"
        "b /y fuse rw 0 0\n"
        "c /z fuseblk rw 0 0\n"
        "d /w fusectl rw 0 0\n"
        "e /v fuse.sshfs rw 0 0\n"
        "f /u ext4 rw 0 0\n"
    )
    assert count_fuse_mounts(str(mounts)) == 3


# ------------------------------------------- a real daemon, a real user


@dataclass
class Namespaced:
    socket: str
    process: subprocess.Popen[bytes]
    log: str
    conf: Path
    root: Path

    def fuse_mounts(self) -> int:
        return count_fuse_mounts(f"/proc/{self.process.pid}/mounts")

    def mounted(self, path: Path) -> set[str] | None:
        """The options of the mount on ``path`` in the daemon's namespace."""
        with open(f"/proc/{self.process.pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == str(path):
                    return set(f"{fields[5]},{line.split(' - ', 1)[1].split()[2]}".split(","))
        return None

    def directory(self, name: str, owner: int = USER) -> Path:
        path = self.root / name
        path.mkdir()
        os.chown(path, owner, owner)
        return path

    def sh(self, uid: int, script: str) -> subprocess.CompletedProcess[str]:
        """``script`` as ``uid`` inside the daemon's mount namespace (where
        its mounts are)."""
        argv = ["nsenter", f"--mount=/proc/{self.process.pid}/ns/mnt"]
        argv += users.as_uid(uid, ["sh", "-c", script])
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False, cwd="/"
        )

    def keyfence(self, uid: int, *args: str) -> subprocess.CompletedProcess[str]:
        base = dict(os.environ, KEYFENCE_SOCKET=self.socket, KEYFENCE_NO_AUTOSTART="1")
        python = users.SYSTEM_PYTHON if uid else sys.executable
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
        argv = ["setsid", "-w", "sh", "-ec", SHELL_PRELUDE + f"keyfence {quoted}"]
        env = dict(base, KF_PYTHON=python)
        if uid:
            argv, env = users.as_uid(uid, argv), users.environment(base, KF_PYTHON=python)
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=180, check=False, cwd="/"
        )


def _why_not() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing: cannot give the daemon its own fuse.conf"
    if not os.path.exists("/etc/fuse.conf"):
        return "/etc/fuse.conf is missing: nothing to bind a test file over"
    return why_not()


@contextlib.contextmanager
def namespaced_daemon() -> Iterator[Namespaced]:
    """``keyfence daemon --system`` in its own mount namespace, where
    /etc/fuse.conf is a file of ours."""
    root = Path(tempfile.mkdtemp(prefix="kfconf-"))
    os.chmod(root, 0o755)
    conf, sock, log = root / "fuse.conf", str(root / "sock"), str(root / "daemon.log")
    conf.write_text("# keyfence test\n")
    wrapper = 'mount --bind "$0" /etc/fuse.conf && exec "$@"'
    argv = [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", wrapper, str(conf),
        sys.executable, "-m", "keyfence.cli.main", "daemon", "--system", "--socket", sock,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {Path(log).read_text()}")
            time.sleep(0.02)
        yield Namespaced(sock, proc, log, conf, root)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # it unmounts its mounts, in its namespace
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ns() -> Iterator[Namespaced]:
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    with namespaced_daemon() as made:
        yield made


def test_mount_max_is_applied_to_users(ns: Namespaced) -> None:
    already = ns.fuse_mounts()
    ns.conf.write_text(f"# the machine's FUSE mounts, and one more\nmount_max = {already + 1}\n")
    first, second = ns.directory("m1"), ns.directory("m2")
    done = ns.keyfence(USER, "mount", str(ns.directory("b1")), str(first))
    assert done.returncode == 0, done.stdout + done.stderr
    assert ns.mounted(first) is not None
    assert ns.fuse_mounts() == already + 1

    # the limit is reached: fusermount3's words, EPERM, nothing mounted
    done = ns.keyfence(USER, "mount", str(ns.directory("b2")), str(second))
    assert done.returncode == 1, done.stdout + done.stderr
    assert MESSAGE in done.stderr, done.stderr
    assert f"{os.strerror(errno.EPERM)}: {MESSAGE}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert ns.mounted(second) is None
    assert ns.fuse_mounts() == already + 1

    # root is not limited, as with fusermount3
    third = ns.directory("m3", owner=0)
    done = ns.keyfence(0, "mount", str(ns.directory("b3", owner=0)), str(third))
    assert done.returncode == 0, done.stdout + done.stderr
    assert ns.keyfence(0, "umount", str(third)).returncode == 0

    # a commented-out limit is the default (1000); -1 is no limit
    for text in ("#mount_max = 1\n", "mount_max = -1\n"):
        ns.conf.write_text(text)
        done = ns.keyfence(USER, "mount", str(ns.root / "b2"), str(second))
        assert done.returncode == 0, text + done.stdout + done.stderr
        assert ns.keyfence(USER, "umount", str(second)).returncode == 0
    assert ns.keyfence(USER, "umount", str(first)).returncode == 0


def test_user_allow_other_is_read_as_fusermount3_reads_it(ns: Namespaced) -> None:
    backing, mnt = ns.directory("b"), ns.directory("m")
    ns.conf.write_text("#user_allow_other\n")
    done = ns.keyfence(USER, "mount", "-o", "allow_other", str(backing), str(mnt))
    assert done.returncode == 1 and "user_allow_other" in done.stderr, done.stderr
    assert ns.mounted(mnt) is None
    # blanks and a trailing comment do not hide it from fusermount3
    ns.conf.write_text("   user_allow_other\t# for the test\n")
    done = ns.keyfence(USER, "mount", "-o", "allow_other", str(backing), str(mnt))
    assert done.returncode == 0, done.stdout + done.stderr
    options = ns.mounted(mnt)
    assert options is not None and "allow_other" in options, options
    assert ns.keyfence(USER, "umount", str(mnt)).returncode == 0
    # without the option a user's mount is the user's only
    ns.conf.write_text("user_allow_other\n")
    done = ns.keyfence(USER, "mount", str(backing), str(mnt))
    assert done.returncode == 0, done.stdout + done.stderr
    options = ns.mounted(mnt)
    assert options is not None and "allow_other" not in options, options
    assert ns.keyfence(USER, "umount", str(mnt)).returncode == 0


def test_another_users_create_a_worker_cannot_give_leaves_nothing(ns: Namespaced) -> None:
    # A user's worker runs as that user and cannot chown a new entry to
    # another: OTHER's create in USER's 1777 directory fails (EPERM).
    # Before, the entry stayed, USER's, with OTHER's name, mode and link
    # target: links and files planted for USER to follow (red-team pass,
    # session 28, F1); now nothing is left.
    backing, mnt = ns.directory("b"), ns.directory("m")
    ns.conf.write_text("user_allow_other\n")
    done = ns.keyfence(USER, "mount", "-o", "allow_other", str(backing), str(mnt))
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        made = ns.sh(USER, f"mkdir {mnt}/tmpd && chmod 1777 {mnt}/tmpd && echo x > {mnt}/secret")
        assert made.returncode == 0, made.stderr
        for script in (
            f"ln -s {mnt}/secret {mnt}/tmpd/link",
            f"umask 0; : > {mnt}/tmpd/reg",
            f"mkfifo {mnt}/tmpd/fifo",
            f"mkdir {mnt}/tmpd/dir",
        ):
            tried = ns.sh(OTHER, script)
            assert tried.returncode != 0, script
            assert "Operation not permitted" in tried.stderr, tried.stderr
        assert os.listdir(backing / "tmpd") == []
    finally:
        assert ns.keyfence(USER, "umount", str(mnt)).returncode == 0
