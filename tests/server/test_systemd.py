"""The daemon under systemd's protocols, with a real daemon process:
readiness (sd_notify READY=1 once the socket accepts) and socket
activation (serving the listening socket passed as fd 3, leaving it in
place at exit)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from keyfence.client import Client

# as systemd does: the socket at fd 3, LISTEN_PID the daemon's own pid
_ACTIVATE = (
    "import os, sys; os.dup2(int(os.environ.pop('PASSED_FD')), 3); "
    "os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.executable, [sys.executable, '-m', 'keyfence.cli.main', *sys.argv[1:]])"
)


def _wait(process: subprocess.Popen[bytes], sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(256)
    except TimeoutError:
        process.kill()
        raise


def test_ready_is_notified_once_the_socket_accepts(tmp_path: Path) -> None:
    notify = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    path = tmp_path / "d" / "sock"
    path.parent.mkdir(mode=0o755)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify))
    argv = [sys.executable, "-m", "keyfence.cli.main", "daemon", "--socket", str(path)]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(process, listener) == b"READY=1"
        with Client.connect(str(path), autostart=False) as client:  # no retry needed
            assert client.ping() == "pong"
        process.send_signal(signal.SIGTERM)
        assert _wait(process, listener) == b"STOPPING=1"
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()


def test_socket_activation_serves_the_passed_socket_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "d" / "sock"
    path.parent.mkdir(mode=0o755)
    passed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    passed.bind(str(path))
    passed.listen(16)
    os.chmod(path, 0o666)
    env = dict(os.environ, LISTEN_FDS="1", PASSED_FD=str(passed.fileno()))
    env.pop("NOTIFY_SOCKET", None)
    # a client may connect before the daemon runs: the backlog holds it
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(str(path))
    early.close()
    with open(tmp_path / "daemon.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _ACTIVATE, "daemon", "--socket", str(path)],
            env=env,
            pass_fds=(passed.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client.connect(str(path), autostart=False) as client:
                    assert client.ping() == "pong"
                    break
            except OSError:
                assert process.poll() is None, (tmp_path / "daemon.log").read_text()
                assert time.monotonic() < deadline, "the activated daemon never answered"
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert path.exists(), "the daemon removed the socket the service manager owns"
    finally:
        if process.poll() is None:
            process.kill()
        passed.close()
