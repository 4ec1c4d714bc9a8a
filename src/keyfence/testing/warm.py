"""kfctl's warm path for tests and benchmarks: the compiled client and a
warm server on a private socket (keyfence.cli.kfctl_warm).

    with running_warm_server(directory) as warm:
        env = {**daemon.env, **warm.env}   # KEYFENCE_KFCTL_WARM=require
        subprocess.run([warm.command, "show", "@s"], env=env)

The server runs this checkout's keyfence (``python -m``, not ``-IS``); the
command's Python fallback is written beside it (keyfence.cli.launcher).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from keyfence.cli import launcher
from keyfence.testing.daemon import stop


@dataclass
class WarmServer:
    command: str
    """The compiled ``kfctl``."""
    socket: str
    process: subprocess.Popen[bytes]

    @property
    def env(self) -> dict[str, str]:
        """What a call needs to use this server and nothing else."""
        return {"KEYFENCE_KFCTL_SOCKET": self.socket, "KEYFENCE_KFCTL_WARM": "require"}

    def workers(self) -> list[int]:
        """The server's children: its spare, and a worker per running call."""
        return children(self.process.pid)


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(word) for word in f.read().split()]
    return found


def compile_command(directory: Path) -> str:
    """The compiled client as ``directory``/kfctl, its fallback beside it."""
    path = directory / "kfctl"
    launcher.write_command(str(path))
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise RuntimeError("no C compiler: kfctl was written as the Python launcher")
    return str(path)


def wait_for_socket(
    path: str, process: subprocess.Popen[bytes] | None, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout  # a poll: a busy machine starts slowly
    while not os.path.exists(path):
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"the warm server did not start at {path}")
        time.sleep(0.01)


@contextlib.contextmanager
def running_warm_server(
    directory: Path,
    *,
    command: str | None = None,
    prefix: Sequence[str] = (),
    python: Sequence[str] = (sys.executable,),
    env: dict[str, str] | None = None,
    idle: float = 600,
) -> Iterator[WarmServer]:
    """A warm server at ``directory``/kfctl.sock (run as ``prefix`` + ``python``:
    setpriv for another uid), and the compiled client (``command``, or one
    compiled into ``directory``)."""
    command = command or compile_command(directory)
    sock = str(directory / "kfctl.sock")
    argv = [
        *prefix,
        *python,
        "-m",
        "keyfence.cli.kfctl_warm",
        "--socket",
        sock,
        "--idle",
        str(idle),
    ]
    if env is None:  # as an autostarted one: an environment of its own
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_socket(sock, process)
        server = WarmServer(command, sock, process)
        deadline = time.monotonic() + 60
        while not server.workers():  # its spare, forked once it listens
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm server at {sock} forked no worker")
            time.sleep(0.01)
        yield server
    finally:
        stop(process, timeout=10)


def servers_at(sock: str) -> list[int]:
    """Warm servers (by their command line) listening at ``sock``: those
    a call started on its own (autostart), for a test to stop."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
        except OSError:
            continue
        if (
            b"--socket" in words
            and os.fsencode(sock) in words
            and any(b"kfctl_warm" in w for w in words)
        ):
            found.append(int(name))
    return found


def stop_servers_at(sock: str) -> None:
    """SIGTERM every warm server :func:`servers_at` finds; one gone
    meanwhile (a spare its server took down with it) is no error."""
    for pid in servers_at(sock):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
