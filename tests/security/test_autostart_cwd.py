"""A daemon a client starts on demand runs keyfence's code, not the code of
the directory the client was run from.

``python -m``/``-c`` put the working directory first on ``sys.path``: a
``keyfence/`` package another user left in a shared directory (``/tmp``)
ran as whoever ran kfctl there with no daemon up -- root too, whose kfctl
starts one as well.  And a daemon that kept that directory as its own kept
a USB stick or NFS mount busy for ever (gpg-agent goes to ``/``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.testing import users

VICTIM = 4656
ATTACKER = 4657

pytestmark = pytest.mark.skipif(
    users.why_no_other_uids() is not None, reason=str(users.why_no_other_uids())
)

PLANTED_MAIN = """
import os, sys
open({marker!r}, "w").write("ran as uid %d" % os.getuid())
sys.exit(1)
"""


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kfac-"))
    path.chmod(0o755)
    yield path
    lock = path / "runtime" / "keyfence" / "sock.lock"
    if lock.exists():
        pid = int(lock.read_text().strip() or 0)
        if pid > 0:
            os.kill(pid, 15)
            time.sleep(0.5)
    shutil.rmtree(path, ignore_errors=True)


def test_a_daemon_started_on_demand_ignores_the_callers_directory(scratch: Path) -> None:
    shared = scratch / "shared"  # the attacker's directory, readable by all
    package = shared / "keyfence" / "cli"
    package.mkdir(parents=True)
    out = scratch / "out"
    out.mkdir()
    out.chmod(0o777)
    marker = out / "marker"
    (shared / "keyfence" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(PLANTED_MAIN.format(marker=str(marker)))
    for path in (shared, shared / "keyfence", package):
        os.chown(path, ATTACKER, ATTACKER)
        path.chmod(0o755)
    runtime = scratch / "runtime"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, VICTIM, VICTIM)
    env = users.environment(XDG_RUNTIME_DIR=str(runtime), KEYFENCE_SYSTEM_SOCKET="/nonexistent")
    for name in ("KEYFENCE_SOCKET", "KEYFENCE_NO_AUTOSTART"):
        env.pop(name, None)
    # kfctl itself as its installed launcher runs it: not from the directory
    argv = users.python_argv("-P", "-m", "keyfence.cli.kfctl", "add", "user", "k", "v", "@u")
    done = subprocess.run(
        users.as_uid(VICTIM, argv), env=env, cwd=shared, capture_output=True, timeout=120
    )
    assert not marker.exists(), marker.read_text()
    assert done.returncode == 0, done.stderr
    pid = int((runtime / "keyfence" / "sock.lock").read_text().strip())
    assert os.readlink(f"/proc/{pid}/cwd") == "/"  # not kept busy either


def test_roots_autostarted_daemon_at_the_system_socket_serves_every_user(scratch: Path) -> None:
    """Root's client finds no system daemon and starts one: a system daemon
    other users reach.  Before: it made the socket's directory 0700, and
    every other user's client, sent to that socket because it exists, got
    "cannot reach a keyfence daemon"."""
    system = scratch / "run-keyfence" / "sock"
    env = users.environment(KEYFENCE_SYSTEM_SOCKET=str(system))
    for name in ("KEYFENCE_SOCKET", "KEYFENCE_NO_AUTOSTART", "XDG_RUNTIME_DIR"):
        env.pop(name, None)
    kfctl = users.python_argv("-P", "-m", "keyfence.cli.kfctl")
    try:
        done = subprocess.run([*kfctl, "id", "@us"], env=env, cwd="/", capture_output=True)
        assert done.returncode == 0, done.stderr
        assert (system.parent.stat().st_mode & 0o777) == 0o755
        as_user = subprocess.run(
            users.as_uid(VICTIM, [*kfctl, "add", "user", "k", "v", "@u"]),
            env=env,
            cwd="/",
            capture_output=True,
        )
        assert as_user.returncode == 0, as_user.stderr
    finally:
        lock = Path(str(system) + ".lock")
        if lock.exists():
            os.kill(int(lock.read_text().strip()), 15)
            time.sleep(0.5)
