"""The directories the POSIX suite (pjdfstest) runs in, one per system.

Each is a context manager yielding a :class:`Target`: the directory, and
the wrapper and environment prove must run under.  All live on the same
disk (``/var/tmp``):

* ``ext4``: a plain directory, the reference;
* ``keyfence-plain``: a plain directory on a keyfence mount made by a real
  daemon (``keyfence daemon --system`` on a private socket, ``keyfence
  mount``: the worker runs as root with ``allow_other,default_permissions``);
* ``keyfence-encrypted``: an encrypted directory on such a mount.  prove
  runs inside a new keyring session that added the directory's e4crypt key
  (``kfctl new_session``, ``keyfence e4crypt add_key``), so the key stays
  for the whole run; once bound it unlocks the directory for every uid
  pjdfstest switches to;
* ``gocryptfs``: a gocryptfs mount (``-allow_other``), when installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from keyfence.testing.daemon import DaemonProcess, running_daemon

PASSPHRASE = "pjdfstest passphrase\n"
SALT = "s:keyfence-pjdfstest"


@dataclass
class Target:
    directory: Path
    prefix: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None


def _client_env(daemon: DaemonProcess) -> dict[str, str]:
    return dict(daemon.env, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def _session_sh(daemon: DaemonProcess, script: str) -> None:
    done = subprocess.run(
        ["sh", "-ec", "kfctl new_session >/dev/null\n" + script],
        env=_client_env(daemon),
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script!r} failed: {done.stderr}")


@contextlib.contextmanager
def _scratch(name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"pjdfstest-{name}-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)  # pjdfstest runs parts as other uids
        yield Path(tmp)


@contextlib.contextmanager
def ext4() -> Iterator[Target]:
    with _scratch("ext4") as tmp:
        yield Target(tmp)


@contextlib.contextmanager
def _keyfence_mount(name: str) -> Iterator[tuple[DaemonProcess, Path]]:
    with _scratch(name) as tmp, running_daemon("--system") as daemon:
        backing, mountpoint = tmp / "backing", tmp / "mnt"
        backing.mkdir(mode=0o755)
        mountpoint.mkdir(mode=0o755)
        _session_sh(daemon, f"keyfence mount {backing} {mountpoint}")
        try:
            yield daemon, mountpoint
        finally:
            with contextlib.suppress(RuntimeError):
                _session_sh(daemon, f"keyfence umount {mountpoint}")
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


@contextlib.contextmanager
def keyfence_plain() -> Iterator[Target]:
    with _keyfence_mount("plain") as (daemon, mountpoint):
        directory = mountpoint / "plain"
        directory.mkdir(mode=0o755)
        yield Target(directory, env=_client_env(daemon))


def encrypted_prefix(directory: Path) -> list[str]:
    """A shell that starts a keyring session, adds the e4crypt key of
    ``directory`` (setting its policy if it is empty and has none), makes
    the mount bind it (a listing) and then runs its arguments."""
    script = (
        "kfctl new_session >/dev/null\n"
        f"printf '%s' '{PASSPHRASE}' | keyfence e4crypt add_key -S {SALT} {directory} >/dev/null\n"
        f"ls {directory} >/dev/null\n"
        'exec "$@"\n'
    )
    return ["sh", "-ec", script, "sh"]


@contextlib.contextmanager
def keyfence_encrypted() -> Iterator[Target]:
    with _keyfence_mount("encrypted") as (daemon, mountpoint):
        directory = mountpoint / "encrypted"
        directory.mkdir(mode=0o755)
        yield Target(directory, prefix=encrypted_prefix(directory), env=_client_env(daemon))


def why_no_gocryptfs() -> str | None:
    return None if shutil.which("gocryptfs") else "gocryptfs is not installed"


@contextlib.contextmanager
def gocryptfs() -> Iterator[Target]:
    with _scratch("gocryptfs") as tmp:
        cipher, plain = tmp / "cipher", tmp / "plain"
        cipher.mkdir()
        plain.mkdir()
        password = ["-extpass", "echo pjdfstest"]
        init = ["gocryptfs", "-init", "-q", *password, str(cipher)]
        subprocess.run(init, capture_output=True, check=True)
        mount = ["gocryptfs", "-q", "-allow_other", *password, str(cipher), str(plain)]
        subprocess.run(mount, capture_output=True, check=True)
        try:
            yield Target(plain)
        finally:
            subprocess.run(["fusermount3", "-uz", str(plain)], capture_output=True)


SYSTEMS: dict[str, Callable[[], contextlib.AbstractContextManager[Target]]] = {
    "ext4": ext4,
    "keyfence-plain": keyfence_plain,
    "keyfence-encrypted": keyfence_encrypted,
    "gocryptfs": gocryptfs,
}
