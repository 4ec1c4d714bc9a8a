"""SIGTERM and SIGINT end the daemon cleanly, mounts and all (issue 12, finding 5).

In a loop, because the old failure was a race (1 run in 2 with mounts
active stayed in accept() for ever): a daemon with a live mount holding
unwritten data, an idle client connection and a client that never said
hello gets the signal; it must exit, having written back and unmounted
every mount (the data reads back through a fresh daemon and mount),
removed its socket, and left no worker behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from keyfence.testing.daemon import DaemonProcess, running_daemon
from keyfence.testing.mounting import fuse_available

BIN = Path(sys.executable).parent
PASSPHRASE = "correct horse battery staple\n"
SALT = "s:keyfence-shutdown-salt"
ROUNDS = 3
EXIT_BOUND = 60.0
"""Seconds the daemon may take to write back, unmount and exit (it takes ~1 s)."""

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


def session_sh(
    daemon: DaemonProcess, script: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """``script`` in a login-like shell: its own session keyring first."""
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


def mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def worker_pids(daemon: DaemonProcess) -> list[int]:
    """The daemon's children (any of its threads may have spawned one)."""
    pids = []
    tasks = f"/proc/{daemon.process.pid}/task"
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue  # the thread ended
    return pids


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_back_unmounts_and_exits(tmp_path: Path, signum: int) -> None:
    for round_ in range(ROUNDS):
        backing, mnt = tmp_path / f"backing{round_}", tmp_path / f"mnt{round_}"
        backing.mkdir()
        mnt.mkdir()
        text = f"round {round_}: written just before the signal\n"
        with running_daemon("--system") as daemon:
            done = session_sh(daemon, f"keyfence mount {backing} {mnt}")
            assert done.returncode == 0, done.stderr
            workers = worker_pids(daemon)
            assert workers, "no mount worker"
            done = session_sh(
                daemon,
                f"""
                mkdir {mnt}/d
                keyfence e4crypt add_key -S {SALT} {mnt}/d
                printf '%s' '{text}' > {mnt}/d/file
                """,
                PASSPHRASE,
            )
            assert done.returncode == 0, done.stderr
            idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.connect(daemon.socket)  # a client that never says hello
            try:
                daemon.process.send_signal(signum)
                try:
                    code = daemon.process.wait(EXIT_BOUND)
                except subprocess.TimeoutExpired:
                    stacks = subprocess.run(
                        ["cat", f"/proc/{daemon.process.pid}/stack"], capture_output=True, text=True
                    ).stdout
                    pytest.fail(f"round {round_}: the daemon did not exit: {stacks}")
            finally:
                idle.close()
            assert code == 0, daemon.log_text()
            assert not os.path.exists(daemon.socket), "the socket was left behind"
            assert not mounted(str(mnt)), "the mount was left behind"
            for pid in workers:
                assert not os.path.exists(f"/proc/{pid}"), f"mount worker {pid} was left behind"
            log = daemon.log_text()
            assert "Traceback" not in log, log
        # written back: a fresh daemon and mount read it with the passphrase
        with running_daemon("--system") as daemon:
            done = session_sh(
                daemon,
                f"""
                keyfence mount {backing} {mnt}
                keyfence e4crypt add_key -S {SALT} {mnt}/d >/dev/null
                cat {mnt}/d/file
                keyfence umount {mnt}
                """,
                PASSPHRASE,
            )
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
            assert done.returncode == 0, done.stderr
            assert done.stdout == text
