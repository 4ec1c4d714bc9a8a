"""Mount workers: spawned, supervised and served by the daemon.

``keyfence mount BACKING MOUNTPOINT`` asks the daemon to start a worker
process (one FUSE session per process).  The daemon makes a socketpair at
spawn and keeps one end: that private channel is the only connection on
which a logon key's payload may be read (``worker_find_key``), and the
worker's synchronous watches on it fence every removal of a key the mount
uses.  A worker that dies is reported and its mount point lazily unmounted.

Least privilege (docs/security.md, "Filesystem"): the request is checked
by :mod:`keyfence.server.mount_request` (directories opened as the caller,
no name resolved twice) and the worker runs as the uid that asked for the
mount, with that user's gid and groups, started from an interpreter that
user can run.  A user's worker mounts through fusermount3 like sshfs and
gocryptfs do (``nosuid,nodev``, ``allow_other`` only where /etc/fuse.conf
says ``user_allow_other``); root's keep ``allow_other,default_permissions``.
A user's worker is only ever given keys reachable by that user's own
processes.  Worker logs are 0600 in a directory only the daemon can write.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import keyfence
from keyfence.errors import KeyfenceError
from keyfence.keys.caller import Caller
from keyfence.keys.fence import RemovalProgress, WatcherProgress
from keyfence.server import fuse_mount, identity, mount_status
from keyfence.server.mount_options import parse_options, user_allow_other
from keyfence.server.mount_request import CheckedRequest, check_request

if TYPE_CHECKING:
    from keyfence.server.internal import DaemonParts

log = logging.getLogger("keyfence.mounts")

READY_TIMEOUT = 30.0
MAX_FINDERS = 1024
"""Keys found but not yet watched, per mount (a watch follows at once)."""


@dataclass
class SupervisedMount:
    """One mount worker as the daemon keeps it: what it serves, its process
    and what it last reported (tests' own mounts are keyfence.testing's
    ``Mount``)."""

    backing: str
    mountpoint: str
    owner: int
    process: subprocess.Popen[bytes]
    state: str = "starting"
    """starting, mounted, unmounting, stopped, dead."""
    ready: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    busy: dict[str, list[str]] = field(default_factory=dict)
    """key description ("" for the whole list) -> files open when it went."""
    stats: dict[str, Any] = field(default_factory=dict)
    """The worker's last ``stats`` report (server/mount_status.py)."""
    dropped: list[dict[str, Any]] = field(default_factory=list)
    stderr_path: str = ""
    owner_gid: int = 0
    mountpoint_id: tuple[int, int] = (0, 0)
    pinned_fd: int | None = field(default=None, repr=False)
    """O_PATH descriptor of the mount point directory (root daemon): every
    unmount goes through it, never through the name."""
    finders: dict[int, Caller] = field(default_factory=dict, repr=False)
    """serial -> the process whose keyrings the key was found in (watches
    on that key are made with its rights, as the kernel's would)."""

    def describe(self) -> dict[str, Any]:
        """This mount as ``keyfence status --json`` shows it (the schema is
        in server/mount_status.py and docs/cli.md)."""
        dead = self.state == "dead"
        return {
            "mountpoint": self.mountpoint,
            "backing": self.backing,
            "owner": self.owner,
            "pid": self.process.pid,
            "state": self.state,
            "phase": "",
            "dirty_bytes": 0,
            "dirty_limit": 0,
            "keys": [],
            "encrypted_dirs": [],
            "encrypted_dir_count": 0,
            **self.stats,
            "busy_files": mount_status.busy_files(self.busy),
            "dropped": self.dropped,
            "error": self.error,
            "exit_status": self.process.returncode if dead else None,
            "log": self.stderr_path if dead else "",
        }


def _fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        for directory in ("/usr/bin", "/bin", "/usr/local/bin"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    return "fusermount3"


SYSTEM_PYTHON = "/usr/bin/python3"


def _reachable_by_others(path: str) -> bool:
    """Every directory from / to ``path`` searchable by others."""
    current = os.path.realpath(path)
    while True:
        try:
            if not os.stat(current).st_mode & 0o001:
                return False
        except OSError:
            return False
        if current == "/":
            return True
        current = os.path.dirname(current)


_system_python_ok: bool | None = None


def _system_python_matches() -> bool:
    global _system_python_ok
    if _system_python_ok is None:
        done = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        _system_python_ok = done.stdout.split() == [str(v) for v in sys.version_info[:2]]
    return _system_python_ok


def worker_command(uid: int) -> tuple[list[str], dict[str, str]]:
    """The worker's interpreter and environment for a worker running as ``uid``.

    Our own interpreter when ``uid`` is ours or can reach it and its
    standard library; otherwise the system's Python of the same version
    with our package on PYTHONPATH (a venv under /root is out of reach).
    The environment is made here, not inherited: a user's worker gets
    nothing of the daemon's but the locale."""
    module = ["-m", "keyfence.fs.worker"]
    if uid == os.geteuid():
        return [sys.executable, *module], dict(os.environ)
    paths = sysconfig.get_paths()
    package_dirs = list(
        dict.fromkeys([os.path.dirname(os.path.dirname(keyfence.__file__)), paths["purelib"]])
    )
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": os.pathsep.join(dict.fromkeys([*package_dirs, paths["platlib"]])),
    }
    for name in ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "KEYFENCE_FUSE_LOOP"):
        if name in os.environ:  # KEYFENCE_FUSE_LOOP: only picks one of two loops
            env[name] = os.environ[name]
    for directory in package_dirs:
        if not _reachable_by_others(directory):
            raise KeyfenceError(
                errno.EACCES,
                f"uid {uid} cannot reach keyfence's code in {directory} "
                "(install keyfence where every user can read it)",
            )
    if _reachable_by_others(sys.executable) and _reachable_by_others(paths["stdlib"]):
        return [os.path.realpath(sys.executable), *module], env
    if os.path.exists(SYSTEM_PYTHON) and _system_python_matches():
        return [SYSTEM_PYTHON, *module], env
    raise KeyfenceError(
        errno.EACCES,
        f"no Python {sys.version_info[0]}.{sys.version_info[1]} that uid {uid} can run "
        f"(the daemon's, {sys.executable}, is out of its reach)",
    )


def _keyfence_devices_at(mountpoint: str) -> set[str]:
    """``major:minor`` of the keyfence mounts whose mount point is ``mountpoint``."""
    found: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", errors="replace") as f:
        for line in f:
            head, sep, tail = line.partition(" - ")
            fields = head.split()
            if sep and len(fields) > 4 and tail.split()[:1] == ["fuse.keyfence"]:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
                if point == mountpoint:
                    found.add(fields[2])
    return found


def _tell_unmount_progress(
    mount: SupervisedMount, progress: Callable[[RemovalProgress], None], done: threading.Event
) -> None:
    """Every 0.25 s until ``done``: what the worker still has to write."""
    start = time.monotonic()
    who = f"mount worker {mount.mountpoint}"
    while not done.wait(0.25):
        left = mount.stats.get("dirty_bytes")
        phase = mount.stats.get("phase")
        note = phase if phase and phase != "serving" else "unmounting"
        pending = (WatcherProgress(who, 0, left if type(left) is int else None, note),)
        with contextlib.suppress(Exception):  # a caller gone: nothing to tell
            progress(RemovalProgress("umount", 0, 0, pending, time.monotonic() - start))


UNMOUNT_WAIT_MAX = 3600.0
"""However well a worker says it is doing, an unmount waits no longer."""


WORKER_LOGS_KEPT = 256
"""Worker logs kept in ``worker-logs`` (the oldest of exited workers go)."""
USER_MOUNTS_MAX = 64
"""Live mounts a user (not root) may have at once: each is a worker
process, started by the daemon and so outside the user's own RLIMIT_NPROC
and cgroup (docs/security.md, "Known gaps (mount requests and workers)")."""


def _user_mounts_max() -> int:
    """:data:`USER_MOUNTS_MAX`, or ``$KEYFENCE_USER_MOUNTS_MAX`` (the
    daemon's own environment: root's to set)."""
    try:
        return max(1, int(os.environ.get("KEYFENCE_USER_MOUNTS_MAX", USER_MOUNTS_MAX)))
    except ValueError:
        return USER_MOUNTS_MAX


PINNED_GRACE = 1.0
"""Seconds an unmounted worker has to see the kernel's DESTROY before it is
told to stop (SIGTERM): another mount namespace holding a copy of the mount
(any user's ``unshare -Urm``) keeps the superblock, so none comes."""


def _wait_for_write_back(mount: SupervisedMount, timeout: float) -> None:
    """Until the worker exits; ETIMEDOUT after ``timeout`` s in which what
    it reports (bytes left, phase) did not change -- a slow disk that keeps
    writing is waited for -- and after :data:`UNMOUNT_WAIT_MAX` in any case
    (a worker is its user's: its reports cannot hold root's unmount).

    The unmount here was not lazy, so nothing has a file of the mount open
    in this namespace and the kernel holds no dirty page of it (a close
    flushes them); if the worker has not stopped after
    :data:`PINNED_GRACE`, a copy of the mount in another namespace keeps
    its connection: SIGTERM makes it write back and exit, which ends the
    copy too (ENOTCONN there).  A worker already writing back ignores it."""
    figures = ("dirty_bytes", "phase")
    last = [mount.stats.get(name) for name in figures]
    start = quiet_since = time.monotonic()
    told = False
    while True:
        try:
            mount.process.wait(0.25)
            return
        except subprocess.TimeoutExpired:
            pass
        if not told and time.monotonic() - start > PINNED_GRACE:
            told = True
            with contextlib.suppress(OSError):
                mount.process.send_signal(signal.SIGTERM)
        now = [mount.stats.get(name) for name in figures]
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since > timeout:
            raise KeyfenceError(errno.ETIMEDOUT, "the worker is still flushing")
        if time.monotonic() - start > UNMOUNT_WAIT_MAX:
            raise KeyfenceError(errno.ETIMEDOUT, "the worker is still flushing after an hour")


class MountSupervisor:
    def __init__(self, daemon: DaemonParts) -> None:
        self.daemon = daemon
        self._lock = threading.Lock()
        self._mounts: dict[str, SupervisedMount] = {}
        self._claims: dict[tuple[str, Any], int] = {}
        """(mount point, its id) -> uid, for requests between check and spawn."""
        self.user_mounts_max = _user_mounts_max()

    # -- client operations

    def mount(self, caller: Caller, backing: str, mountpoint: str, options: list[str]) -> None:
        """Check the request, start a worker as the caller; return once the
        mount is live (or raise its error)."""
        opts = parse_options(options)
        if opts.allow_other and caller.uid != 0 and not user_allow_other():
            raise KeyfenceError(
                errno.EPERM,
                "allow_other: only allowed if 'user_allow_other' is set in /etc/fuse.conf",
            )
        if opts.debug and caller.uid != 0:
            raise KeyfenceError(errno.EPERM, "debug: root's mounts only (it logs names)")
        most = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        if caller.uid != 0 and (opts.dirty_limit or 0) > most:
            # the worker's memory is charged to the daemon, not to the user
            raise KeyfenceError(
                errno.EINVAL,
                f"dirty_limit: at most a quarter of the machine's memory ({most >> 20}M)",
            )
        request = check_request(caller, backing, mountpoint, nonempty=opts.nonempty)
        claim = (request.mountpoint, request.mountpoint_id)
        try:
            with self._lock:
                # checked and claimed in one hold: two requests for one
                # directory at once stacked two mounts, one of them untracked
                owned = sum(1 for c in self._claims.values() if c == caller.uid)
                for other in self._mounts.values():
                    live = other.state in ("starting", "mounted") or other.pinned_fd is not None
                    if live and (
                        other.mountpoint == request.mountpoint
                        or other.mountpoint_id == request.mountpoint_id
                    ):
                        raise KeyfenceError(
                            errno.EBUSY, f"{request.mountpoint} is already a keyfence mount"
                        )
                    owned += live and other.owner == caller.uid
                if any(c[0] == claim[0] or c[1] == claim[1] for c in self._claims):
                    raise KeyfenceError(
                        errno.EBUSY, f"{request.mountpoint} is already being mounted"
                    )
                if caller.uid != 0 and owned >= self.user_mounts_max:
                    raise KeyfenceError(
                        errno.EPERM,
                        f"too many keyfence mounts: a user may have {self.user_mounts_max}",
                    )
                self._claims[claim] = caller.uid
            try:
                mount = self._spawn(caller, request, opts.worker_args(), opts.allow_other)
            finally:
                with self._lock:
                    del self._claims[claim]
        finally:
            request.close()
        self._wait_ready(mount)

    def _spawn(
        self, caller: Caller, request: CheckedRequest, worker_args: list[str], allow_other: bool
    ) -> SupervisedMount:
        uid, gid = caller.uid, caller.gid
        root = os.geteuid() == 0
        allow_other = allow_other or uid == 0
        command, env = worker_command(uid if root else os.geteuid())
        fuse_fd = pinned = None
        if root:  # mount on the checked directory ourselves, as fusermount3 would
            fuse_fd = fuse_mount.mount_fuse(
                request.mountpoint_fd,
                f"keyfence:{request.backing}",
                uid=uid,
                gid=gid,
                allow_other=allow_other,
                what=request.mountpoint,
            )
            pinned = os.dup(request.mountpoint_fd)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env["KEYFENCE_WORKER_FD"] = str(theirs.fileno())
        fds = [theirs.fileno(), request.backing_fd]
        argv = [*command, "--backing-fd", str(request.backing_fd)]
        if fuse_fd is not None:
            fds += [fuse_fd, request.mountpoint_fd]
            argv += ["--fuse-fd", str(fuse_fd), "--mountpoint-fd", str(request.mountpoint_fd)]
        argv += [
            *worker_args,
            "--allow-other" if allow_other else "--no-allow-other",
            "--",
            request.backing,
            request.mountpoint,
        ]
        if root and uid != 0:
            # the worker starts as root and takes these ids once it is
            # non-dumpable, so the owner never gets a handle on it
            # (fs/worker_identity.py, which reads this variable)
            groups = ",".join(str(g) for g in sorted(caller.groups))
            env["KEYFENCE_WORKER_CREDENTIALS"] = f"{uid}:{gid}:{groups}"
        err_fd = -1
        try:
            stderr_path, err_fd = self._open_log()
            process = subprocess.Popen(
                argv,
                pass_fds=fds,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=err_fd,
                stderr=err_fd,
                start_new_session=True,
                cwd="/",
            )
        except (OSError, KeyfenceError) as err:
            ours.close()
            if pinned is not None:
                with contextlib.suppress(KeyfenceError):
                    fuse_mount.umount(pinned, fuse_mount.MNT_DETACH)
                os.close(pinned)
            if isinstance(err, KeyfenceError):
                raise
            raise KeyfenceError(err.errno or errno.EIO, f"cannot start the worker: {err}") from None
        finally:
            if err_fd >= 0:
                os.close(err_fd)
            if fuse_fd is not None:
                os.close(fuse_fd)
            theirs.close()
        mount = SupervisedMount(
            request.backing,
            request.mountpoint,
            uid,
            process,
            stderr_path=stderr_path,
            owner_gid=gid,
            mountpoint_id=request.mountpoint_id,
            pinned_fd=pinned,
        )
        with self._lock:
            self._mounts[request.mountpoint] = mount
        # the channel speaks with the owner's rights, not root's
        worker = Caller(uid=uid, gid=gid, groups=caller.groups, pid=process.pid, admin=uid == 0)
        self.daemon.adopt(ours, worker, mount)
        return mount

    def _log_dir(self) -> str:
        """``worker-logs`` next to the socket: ours, mode 0700, not a link."""
        directory = os.path.join(os.path.dirname(self.daemon.path) or ".", "worker-logs")
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise KeyfenceError(errno.EPERM, f"{directory} is not the daemon's own directory")
        if st.st_mode & 0o077:
            os.chmod(directory, 0o700)
        return directory

    def _open_log(self) -> tuple[str, int]:
        directory = self._log_dir()
        self._prune_logs(directory)
        path = os.path.join(directory, f"worker-{os.getpid()}-{time.time_ns()}.log")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return path, os.open(path, flags, 0o600)

    def _prune_logs(self, directory: str) -> None:
        """Keep the newest :data:`WORKER_LOGS_KEPT` logs of workers that have
        exited (each worker's own log is on a budget: fs/log_budget.py)."""
        with self._lock:
            live = {m.stderr_path for m in self._mounts.values() if m.process.poll() is None}
        try:
            names = [n for n in os.listdir(directory) if n.startswith("worker-")]
        except OSError:
            return
        if len(names) < WORKER_LOGS_KEPT:
            return
        old = []
        for name in names:
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if path not in live:
                    old.append((os.lstat(path).st_mtime_ns, path))
        old.sort()
        for _mtime, path in old[: max(0, len(names) - WORKER_LOGS_KEPT + 1)]:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _wait_ready(self, mount: SupervisedMount) -> None:
        process = mount.process
        threading.Thread(
            target=self._supervise, args=(mount,), name="keyfence-mount", daemon=True
        ).start()
        if not mount.ready.wait(READY_TIMEOUT) or mount.state != "mounted":
            detail = mount.error or "the worker did not start"
            # the worker's last words say why (fusermount3's "failed to open
            # /dev/fuse"); its log is the daemon's, out of the caller's reach
            last = self._stderr_tail(mount).splitlines()[-1:]
            if last and last[0] not in detail:
                detail = f"{detail}: {last[0]}"
            if process.poll() is None:
                process.kill()
            raise KeyfenceError(errno.EIO, f"mount failed: {detail}")

    def umount(
        self,
        caller: Caller,
        mountpoint: str,
        *,
        timeout: float = 60.0,
        progress: Callable[[RemovalProgress], None] | None = None,
    ) -> None:
        """Unmount after a full flush: the kernel pushes its cache to the
        worker, which writes back every dirty page before it exits.

        ``progress`` hears, every 0.25 s until then, how much the worker
        still has to write (its last report); ETIMEDOUT once the worker has
        written nothing for ``timeout`` seconds (it goes on: the mount is
        already gone)."""
        mountpoint = os.path.normpath(mountpoint)
        with self._lock:
            mount = self._mounts.get(mountpoint)
        if mount is None or mount.state not in ("mounted", "starting"):
            raise KeyfenceError(errno.EINVAL, f"{mountpoint} is not a keyfence mount")
        if caller.uid not in (0, mount.owner):
            raise KeyfenceError(errno.EPERM, "only the mount's owner or root may unmount it")
        mount.state = "unmounting"
        ticking = threading.Event()
        if progress is not None:
            threading.Thread(
                target=_tell_unmount_progress,
                args=(mount, progress, ticking),
                name="keyfence-umount-progress",
                daemon=True,
            ).start()
        try:
            done, why = self._unmount(mount)
            if not done:
                mount.state = "mounted"
                raise KeyfenceError(errno.EBUSY, f"{mountpoint}: {why}")
            _wait_for_write_back(mount, timeout)
        finally:
            ticking.set()

    def describe(self, caller: Caller | None = None) -> list[dict[str, Any]]:
        """The mounts ``caller`` may know of: its own; root sees all.

        A stopped mount is gone; a dead one is shown once (with why) to
        whoever may see it, then forgotten -- once its supervisor has let go
        of the mount point, so that a new mount there is not refused."""
        with self._lock:
            mounts = list(self._mounts.values())
        if caller is not None and not caller.is_admin and caller.uid != 0:
            mounts = [m for m in mounts if m.owner == caller.uid]
        shown = [m.describe() for m in mounts if m.state != "stopped"]
        with self._lock:
            for m in mounts:
                over = m.state in ("stopped", "dead") and m.process.poll() is not None
                gone = over and m.pinned_fd is None and m.ready.is_set()
                if gone and self._mounts.get(m.mountpoint) is m:
                    del self._mounts[m.mountpoint]
        return shown

    def _unmount(self, mount: SupervisedMount, lazy: bool = False) -> tuple[bool, str]:
        """Unmount through the pinned descriptor (root daemon), else with
        ``fusermount3 -u`` (a per-user daemon: its own mounts).  (done, why not)."""
        if mount.pinned_fd is not None:
            try:
                fuse_mount.umount(mount.pinned_fd, fuse_mount.MNT_DETACH if lazy else 0)
            except KeyfenceError as err:
                return err.errno == errno.EINVAL, err.strerror or str(err)
            return True, ""
        done = subprocess.run(
            [_fusermount(), "-uz" if lazy else "-u", mount.mountpoint],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        return done.returncode == 0, done.stderr.strip() or "unmount failed"

    # -- worker operations (private channel only)

    def find_key(
        self, mount: SupervisedMount, pid: int, descriptions: list[str]
    ) -> list[Any] | None:
        """The first of ``descriptions`` reachable from process ``pid``'s
        keyrings, with that process's rights (owner, possessor), as the
        kernel does for a request.  A user's mount is given only keys found
        for that user's own processes (no one else can use it without
        allow_other, and its worker must never hold another user's key)."""
        caller = identity.caller_of_pid(
            pid,
            self.daemon.sessions,
            self.daemon.service,
            admin_uid=0 if self.daemon.private_uid is None else None,
        )
        if caller is None:
            return None
        if mount.owner != 0 and caller.uid != mount.owner:
            return None
        svc = self.daemon.service
        for description in descriptions:
            for key_type in ("logon", "user"):
                try:
                    serial = svc.request_key(caller, key_type, description)
                    with svc.use_key(caller, serial) as payload:
                        if len(mount.finders) >= MAX_FINDERS:  # oldest first
                            mount.finders.pop(next(iter(mount.finders)))
                        mount.finders[serial] = caller
                        return [serial, description, payload.reveal()]
                except OSError:
                    continue
        return None

    @staticmethod
    def watcher(mount: SupervisedMount, serial: int) -> Caller | None:
        """Who watches key ``serial`` for ``mount``: the process it was found
        for (possessor, or owner), so the watch needs no right the
        request did not have."""
        return mount.finders.pop(serial, None)

    def report(self, mount: SupervisedMount, event: str, detail: Any) -> None:
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
            mount.busy = mount_status.busy_update(mount.busy, detail)
        elif event == "stats":
            mount.stats = mount_status.clean_stats(detail)
        elif event == "readahead" and isinstance(detail, dict):
            self._set_readahead(mount, detail.get("device"), detail.get("kb"))
        elif event == "dropped":
            mount.dropped.append(detail if isinstance(detail, dict) else {"detail": detail})
            files = detail.get("files") if isinstance(detail, dict) else None
            count = len(files) if isinstance(files, dict) else "some"
            log.warning("a mount of uid %d dropped %s files in an emergency", mount.owner, count)

    @staticmethod
    def _set_readahead(mount: SupervisedMount, device: Any, kb: Any) -> None:
        """A user's worker cannot write its mount's bdi ``read_ahead_kb``
        (root's only): we do, for the device mountinfo shows at that mount's
        mount point as a keyfence mount, and nothing else."""
        if os.geteuid() != 0 or type(kb) is not int or not 0 < kb <= 1 << 20:
            return
        if not isinstance(device, str) or device not in _keyfence_devices_at(mount.mountpoint):
            return
        with contextlib.suppress(OSError), open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kb))

    # -- supervision

    def _supervise(self, mount: SupervisedMount) -> None:
        code = mount.process.wait()
        expected = mount.state in ("unmounting", "stopped")
        if not expected:
            mount.state = "dead"
            mount.error = mount.error or f"worker exited with status {code}"
            log.error("mount worker for uid %d died (%s)", mount.owner, mount.error)
            self._unmount(mount, lazy=True)
        else:
            mount.state = "stopped"
            if code == 0:  # kept only when there is something to read in it
                with contextlib.suppress(OSError):
                    os.unlink(mount.stderr_path)
        if mount.pinned_fd is not None:
            if expected:  # gone already, unless the worker stopped on a signal
                self._unmount(mount, lazy=True)
            with contextlib.suppress(OSError):
                os.close(mount.pinned_fd)
            mount.pinned_fd = None
        mount.ready.set()

    @staticmethod
    def _stderr_tail(mount: SupervisedMount) -> str:
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
            self._unmount(mount)
