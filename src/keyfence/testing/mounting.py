"""Real mounts for the tests: a worker process, a backing dir, a mount point.

:class:`Mount` starts ``keyfence.testing.mount_worker`` (the real worker with an
in-process KeyService) and talks to its control socket to add and remove
keys in the test process's session keyring.  ``unmount`` uses
``fusermount3 -u`` and kills a stuck worker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keyfence.fs.crypto import MasterKey


def fuse_available() -> str | None:
    """Why FUSE mounts cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        # fusermount3 opens it as the caller: a machine whose /dev/fuse is
        # 0600 (these VMs) lets only root mount
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        return f"/dev/fuse is mode {mode:04o} here: uid {os.getuid()} cannot mount FUSE"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (apt-get install fuse3)"
    return None


URING_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
"""The kernel's switch for FUSE over io_uring (6.14+; root's; global)."""


def fuse_uring_available() -> str | None:
    """Why mounts cannot be served through io_uring here, or None."""
    if fuse_available() is not None:
        return fuse_available()
    if not os.path.exists(URING_PARAMETER):
        return "this kernel has no FUSE over io_uring (Linux 6.14+)"
    if not os.access(URING_PARAMETER, os.W_OK):
        return f"{URING_PARAMETER} is root's to set"
    from keyfence.fs.fuse import ring

    if not ring.available():
        return "keyfence was built without its io_uring queue (keyfence.fs.fuse._ring)"
    return None


@contextlib.contextmanager
def fuse_uring(enabled: bool = True) -> Iterator[None]:
    """The kernel's ``fuse.enable_uring`` set to ``enabled`` for the
    block's mounts (what a mount saw at its INIT stays), then put back."""
    with open(URING_PARAMETER, encoding="ascii") as f:
        before = f.read().strip()
    with open(URING_PARAMETER, "w", encoding="ascii") as f:
        f.write("Y" if enabled else "N")
    try:
        yield
    finally:
        with open(URING_PARAMETER, "w", encoding="ascii") as f:
            f.write(before)


def is_mounted(path: Path) -> bool:
    """Whether a mount sits at ``path`` (also a dead FUSE mount, which
    ``os.path.ismount`` misses: its stat fails with ENOTCONN)."""
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace(b"\\040", b" ") == target:
                return True
    return False


class Mount:
    def __init__(self, tmp: Path, *worker_args: str, name: str = "m") -> None:
        self.tmp = tmp
        self.backing = tmp / f"{name}-backing"
        self.mnt = tmp / f"{name}-mnt"
        self.backing.mkdir(exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        self.control_path = str(tmp / f"{name}-control.sock")
        self.log_path = tmp / f"{name}-worker.log"
        self.worker_args = worker_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "keyfence.testing.mount_worker",
                    "--control",
                    self.control_path,
                    str(self.backing),
                    str(self.mnt),
                    *self.worker_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60  # a poll: a busy machine starts slowly
        while not (os.path.ismount(self.mnt) and os.path.exists(self.control_path)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not mount:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------ control

    def control(self, op: str, **kw: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(120)
            s.connect(self.control_path)
            f = s.makefile("rwb")
            f.write(json.dumps({"op": op, **kw}).encode() + b"\n")
            f.flush()
            answer = json.loads(f.readline())
        if not answer["ok"]:
            code = answer["errno"] or errno.EIO
            raise OSError(code, answer["message"])
        return answer["result"]

    def add_key(
        self,
        master: MasterKey,
        *,
        sid: int | None = None,
        description: str | None = None,
        payload: bytes | None = None,
        type: str = "logon",
    ) -> int:
        return int(
            self.control(
                "add",
                type=type,
                description=description or f"keyfence:{master.identifier}",
                payload=(payload if payload is not None else master.raw).hex(),
                sid=os.getsid(0) if sid is None else sid,
            )
        )

    def encrypted_dir(self, name: str = "enc") -> tuple[Path, MasterKey]:
        """A new directory ``name`` at the mount's root with a policy of a
        fresh key, added to this session first: (its path, the key)."""
        master = MasterKey(os.urandom(64))
        self.add_key(master)
        path = self.mnt / name
        path.mkdir()
        os.setxattr(path, "user.keyfence.policy", f"keyfence:{master.identifier}".encode())
        return path, master

    def unlink_key(self, serial: int, *, emergency: bool = False) -> None:
        self.control("unlink", serial=serial, sid=os.getsid(0), emergency=emergency)

    def clear(self, *, emergency: bool = False, sid: int | None = None) -> None:
        self.control("clear", sid=os.getsid(0) if sid is None else sid, emergency=emergency)

    def revoke(self, serial: int, *, emergency: bool = False) -> None:
        self.control("revoke", serial=serial, sid=os.getsid(0), emergency=emergency)

    def reports(self, event: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.control("reports")
        return [r for r in out if event is None or r["event"] == event]

    # ------------------------------------------------------------ teardown

    def unmount(self) -> int | None:
        """fusermount3 -u; kill the worker if it does not go."""
        proc = self.proc
        if proc is None:
            return None
        lazy = False
        if os.path.ismount(self.mnt):
            # EBUSY for up to 10 s: a process of the test that just ended may
            # not have closed its files yet on a busy machine
            for _ in range(100):
                r = subprocess.run(
                    ["fusermount3", "-u", str(self.mnt)], capture_output=True, check=False
                )
                if r.returncode == 0 or not os.path.ismount(self.mnt):
                    break
                time.sleep(0.1)
            else:  # busy (a failed test left a file open): detach
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False)
                lazy = True
        try:
            code = proc.wait(3 if lazy else 30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            code = proc.wait(10)
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False)
        self.proc = None
        return code

    def unmount_checked(self) -> str:
        """:meth:`unmount`, then fail unless the worker exited 0 with no
        traceback in its log; the log, for the caller's own checks."""
        code = self.unmount()
        log = self.log()
        assert "Traceback" not in log, log
        assert code == 0, log
        return log


SCHED_IDLE = 5


def idle_class_threads(pid: int) -> dict[int, tuple[int, set[int]]]:
    """The threads of ``pid`` at SCHED_IDLE (fs/fuse/_awake.c's spinners):
    tid -> (CPU ticks so far, CPUs allowed)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        # fields[0] is field 3 (state): utime 14, stime 15, policy 41
        if int(fields[41 - 3]) == SCHED_IDLE:
            ticks = int(fields[14 - 3]) + int(fields[15 - 3])
            try:
                out[int(tid)] = (ticks, os.sched_getaffinity(int(tid)))
            except ProcessLookupError:
                continue
    return out
