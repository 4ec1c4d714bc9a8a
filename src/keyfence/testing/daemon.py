"""A real keyfence daemon process for tests, on a private socket."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass
class DaemonProcess:
    socket: str
    process: subprocess.Popen[bytes]
    log: str

    @property
    def env(self) -> dict[str, str]:
        """Environment for client processes: this daemon, no autostart."""
        return dict(os.environ, KEYFENCE_SOCKET=self.socket, KEYFENCE_NO_AUTOSTART="1")

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def running_daemon(*extra: str, prefix: Sequence[str] = ()) -> Iterator[DaemonProcess]:
    """A daemon on a private socket with ``extra`` arguments, started
    through ``prefix`` if given (``setpriv ...``)."""
    with tempfile.TemporaryDirectory(prefix="keyfence-test-") as tmp:
        os.chmod(tmp, 0o755)  # other uids (setpriv tests) must reach the socket
        sock = os.path.join(tmp, "sock")
        log = os.path.join(tmp, "daemon.log")
        with open(log, "wb") as out:
            argv = [*prefix, sys.executable, "-m", "keyfence.cli.main", "daemon"]
            proc = subprocess.Popen(
                [*argv, "--socket", sock, *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60  # a poll: a busy machine starts slowly
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log, errors="replace") as f:
                    raise RuntimeError(f"daemon did not start: {f.read()}")
            time.sleep(0.01)
        daemon = DaemonProcess(sock, proc, log)
        try:
            yield daemon
        finally:
            stop(proc, timeout=5)


def stop(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaped either way."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
