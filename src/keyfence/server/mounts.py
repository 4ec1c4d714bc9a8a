"""Mount workers: spawned, supervised and served by the daemon.

``keyfence mount BACKING MOUNTPOINT`` asks the daemon to start a worker
process (one FUSE session per process).  The daemon makes a socketpair at
spawn and keeps one end: that private channel is the only connection on
which a logon key's payload may be read (``worker_find_key``), and the
worker's synchronous watches on it fence every removal of a key the mount
uses.  A worker that dies is reported and its mount point lazily unmounted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyfence.errors import KeyfenceError
from keyfence.keys.process_keys import Caller
from keyfence.server import identity

if TYPE_CHECKING:
    from keyfence.server.daemon import Connection, Daemon

log = logging.getLogger("keyfence.mounts")

READY_TIMEOUT = 30.0


@dataclass
class Mount:
    backing: str
    mountpoint: str
    owner: int
    process: subprocess.Popen[bytes]
    state: str = "starting"
    """starting, mounted, unmounting, stopped, dead."""
    ready: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    busy: dict[str, Any] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    stderr_path: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "backing": self.backing,
            "mountpoint": self.mountpoint,
            "pid": self.process.pid,
            "owner": self.owner,
            "state": self.state,
            "busy": self.busy,
            "dropped": self.dropped,
            "error": self.error,
            "log": self.stderr_path if self.state == "dead" else "",
        }


def _fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        for directory in ("/usr/bin", "/bin", "/usr/local/bin"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    return "fusermount3"


def _owns(uid: int, path: str) -> bool:
    try:
        return uid == 0 or os.stat(path).st_uid == uid
    except OSError:
        return False


class MountSupervisor:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._lock = threading.Lock()
        self._mounts: dict[str, Mount] = {}
        self._handed_out: dict[int, set[str]] = {}
        """Key serial -> mount points whose worker was given it (keyfence
        lock's check; a worker may watch what it was given)."""

    # -- client operations

    def mount(self, caller: Caller, backing: str, mountpoint: str, options: list[str]) -> None:
        """Start a worker; return once the mount is live (or raise its error)."""
        backing = os.path.realpath(backing)
        mountpoint = os.path.realpath(mountpoint)
        for path in (backing, mountpoint):
            if not os.path.isdir(path):
                raise KeyfenceError(errno.ENOTDIR, f"{path} is not a directory")
            if not _owns(caller.uid, path):
                raise KeyfenceError(errno.EPERM, f"you do not own {path}")
        with self._lock:
            if mountpoint in self._mounts and self._mounts[mountpoint].state in (
                "starting",
                "mounted",
            ):
                raise KeyfenceError(errno.EBUSY, f"{mountpoint} is already a keyfence mount")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stderr_path = os.path.join("/tmp", f"keyfence-worker-{os.getpid()}-{time.time_ns()}.log")
        env = dict(os.environ, KEYFENCE_WORKER_FD=str(theirs.fileno()))
        with open(stderr_path, "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "keyfence.fs.worker", backing, mountpoint, *options],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        theirs.close()
        mount = Mount(backing, mountpoint, caller.uid, process, stderr_path=stderr_path)
        with self._lock:
            self._mounts[mountpoint] = mount
        worker = Caller(uid=0, gid=0, pid=process.pid, admin=True)
        self.daemon.adopt(ours, worker, mount)
        threading.Thread(
            target=self._supervise, args=(mount,), name="keyfence-mount", daemon=True
        ).start()
        if not mount.ready.wait(READY_TIMEOUT) or mount.state != "mounted":
            detail = mount.error or self._stderr_tail(mount) or "the worker did not start"
            if process.poll() is None:
                process.kill()
            raise KeyfenceError(errno.EIO, f"mount failed: {detail}")

    def umount(self, caller: Caller, mountpoint: str, *, timeout: float = 60.0) -> None:
        """Unmount after a full flush: the kernel pushes its cache to the
        worker, which writes back every dirty page before it exits."""
        mountpoint = os.path.realpath(mountpoint)
        with self._lock:
            mount = self._mounts.get(mountpoint)
        if mount is None or mount.state not in ("mounted", "starting"):
            raise KeyfenceError(errno.EINVAL, f"{mountpoint} is not a keyfence mount")
        if caller.uid not in (0, mount.owner):
            raise KeyfenceError(errno.EPERM, "only the mount's owner or root may unmount it")
        mount.state = "unmounting"
        done = subprocess.run(
            [_fusermount(), "-u", mountpoint], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            mount.state = "mounted"
            raise KeyfenceError(errno.EBUSY, done.stderr.strip() or "unmount failed")
        try:
            mount.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise KeyfenceError(errno.ETIMEDOUT, "the worker is still flushing") from None

    def used_by_a_mount(self, serial: int, mount: Mount | None = None) -> bool:
        """Whether ``serial`` was ever handed to a mount worker (``mount``'s, if given)."""
        with self._lock:
            given = self._handed_out.get(serial, set())
            return bool(given) if mount is None else mount.mountpoint in given

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m.describe() for m in self._mounts.values()]

    # -- worker operations (private channel only)

    def find_key(
        self, pid: int, descriptions: list[str], mount: Mount | None = None
    ) -> list[Any] | None:
        """The first of ``descriptions`` reachable from process ``pid``'s keyrings."""
        caller = identity.caller_of_pid(pid, self.daemon.sessions, self.daemon.service)
        if caller is None:
            return None
        svc = self.daemon.service
        for description in descriptions:
            for key_type in ("logon", "user"):
                try:
                    serial = svc.request_key(caller, key_type, description)
                    with svc.use_key(caller, serial) as payload:
                        with self._lock:
                            given = self._handed_out.setdefault(serial, set())
                            given.add(mount.mountpoint if mount is not None else "")
                        return [serial, description, payload.reveal()]
                except OSError:
                    continue
        return None

    def report(self, mount: Mount, event: str, detail: Any) -> None:
        if event in ("ready", "mounted"):
            mount.state = "mounted"
            mount.ready.set()
        elif event == "unmounted":
            if mount.state != "dead":
                mount.state = "stopped"
        elif event == "error":
            mount.error = str(detail.get("reason") if isinstance(detail, dict) else detail)
            mount.ready.set()
        elif event == "busy":
            mount.busy = detail if isinstance(detail, dict) else {"detail": detail}
        elif event == "dropped":
            mount.dropped.append(detail if isinstance(detail, dict) else {"detail": detail})
            log.warning("mount %s dropped data in an emergency: %s", mount.mountpoint, detail)

    # -- supervision

    def _supervise(self, mount: Mount) -> None:
        code = mount.process.wait()
        expected = mount.state in ("unmounting", "stopped")
        if not expected:
            mount.state = "dead"
            mount.error = mount.error or f"worker exited with status {code}"
            log.error("mount worker for %s died (%s)", mount.mountpoint, mount.error)
            subprocess.run(
                [_fusermount(), "-uz", mount.mountpoint], capture_output=True, check=False
            )
        else:
            mount.state = "stopped"
            if code == 0:  # kept only when there is something to read in it
                with contextlib.suppress(OSError):
                    os.unlink(mount.stderr_path)
        mount.ready.set()

    @staticmethod
    def _stderr_tail(mount: Mount) -> str:
        try:
            with open(mount.stderr_path, errors="replace") as f:
                return f.read()[-2000:].strip()
        except OSError:
            return ""

    def shutdown(self) -> None:
        with self._lock:
            mounts = [m for m in self._mounts.values() if m.state in ("mounted", "starting")]
        for mount in mounts:
            mount.state = "unmounting"
            subprocess.run(
                [_fusermount(), "-u", mount.mountpoint], capture_output=True, check=False
            )


def connection_mount(conn: Connection) -> Mount | None:
    mount = getattr(conn, "mount", None)
    return mount if isinstance(mount, Mount) else None
