"""Shared pieces of the mount security tests: a system daemon on a private
socket, directories owned by test uids, commands run as those uids in a
fresh session, and a cleanup that never leaves a hung FUSE mount behind."""

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

import pytest

from keyfence.testing import users
from keyfence.testing.daemon import DaemonProcess, running_daemon
from keyfence.testing.mounting import fuse_available

USER = 4620
"""The mounting user (issue 11's tests use uids 4620-4629)."""
OTHER = 4621
"""Another local user."""

PASSPHRASE = "correct horse battery staple\n"
SALT = "s:kfmnt-salt"

SHELL_PRELUDE = (
    'keyfence() { "$KF_PYTHON" -m keyfence.cli.main "$@"; }\n'
    'kfctl() { "$KF_PYTHON" -m keyfence.cli.kfctl "$@"; }\n'
)


def why_not() -> str | None:
    return fuse_available() or users.why_no_other_uids()


def skip_without_facilities() -> pytest.MarkDecorator:
    reason = why_not()
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@dataclass
class Scene:
    daemon: DaemonProcess
    root: Path
    """A directory every test uid can reach (mode 0755)."""

    def directory(self, name: str, owner: int = USER, mode: int = 0o755) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, owner, owner)
        os.chmod(path, mode)
        return path

    def run(
        self,
        uid: int,
        script: str,
        *,
        stdin: str = "",
        timeout: float = 180,
    ) -> subprocess.CompletedProcess[str]:
        """``script`` (sh -e) as ``uid`` in a new session (a fresh @s)."""
        python = users.SYSTEM_PYTHON if uid != 0 else sys.executable
        env = users.environment(self.daemon.env, KF_PYTHON=python)
        if uid == 0:
            env = dict(self.daemon.env, KF_PYTHON=python)
        argv = ["setsid", "-w", "sh", "-ec", SHELL_PRELUDE + script]
        if uid != 0:
            argv = users.as_uid(uid, argv)
        return subprocess.run(
            argv,
            input=stdin,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )

    def keyfence(
        self, uid: int, *args: str, stdin: str = "", timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        quoted = " ".join(_quote(a) for a in args)
        return self.run(uid, f"keyfence {quoted}", stdin=stdin, timeout=timeout)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def fuse_mounts_under(root: Path) -> list[tuple[str, str, str]]:
    """(mount point, device, mount and superblock options) of every mount
    under ``root``."""
    found = []
    prefix = str(root)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                superblock = line.split(" - ", 1)[1].split()[2]
                found.append((point, fields[2], f"{fields[5]},{superblock}"))
    return found


def mount_options_of(path: Path) -> set[str]:
    for point, _dev, options in fuse_mounts_under(path):
        if point == str(path):
            return set(options.split(","))
    return set()


def is_mounted(path: Path) -> bool:
    """Whether something is mounted on ``path`` (mountinfo: a stat by root
    of a user's FUSE mount is refused, so os.path.ismount cannot tell)."""
    return any(point == str(path) for point, _d, _o in fuse_mounts_under(path))


def abort_and_unmount(root: Path) -> None:
    """Abort every FUSE connection mounted under ``root`` (a deadlocked
    worker cannot hang the cleanup) and detach the mounts.  Aborting needs
    fusectl at /sys/fs/fuse/connections (mounted here if it is not: without
    it a worker stuck on its own mount stays stuck after a lazy unmount)."""
    mounts = fuse_mounts_under(root)
    connections = Path("/sys/fs/fuse/connections")
    if mounts and connections.is_dir() and not any(connections.iterdir()):
        subprocess.run(
            ["mount", "-t", "fusectl", "none", str(connections)], capture_output=True, check=False
        )
    for point, dev, _options in reversed(mounts):
        minor = dev.split(":")[1]
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@contextlib.contextmanager
def scene() -> Iterator[Scene]:
    root = Path(tempfile.mkdtemp(prefix="kfmnt-"))
    os.chmod(root, 0o755)
    try:
        with running_daemon("--system") as daemon:
            try:
                yield Scene(daemon, root)
            finally:
                abort_and_unmount(root)
    finally:
        abort_and_unmount(root)
        shutil.rmtree(root, ignore_errors=True)
