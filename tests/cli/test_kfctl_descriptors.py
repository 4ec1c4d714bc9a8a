"""kfctl started with a standard descriptor closed, or with a directory on
stdin, answers as Debian's keyctl does, and writes nothing anywhere else.

Before: a closed stdout or stderr was the number the next socket got --
the daemon connection -- so kfctl wrote its answer into it: ``kfctl pipe
KEY >&-`` sent the key's payload to the daemon as a request of the piping
process (a key holding a ``revoke`` frame revoked a key), where keyctl
fails ``write: Bad file descriptor``.  And a directory on stdin stopped
the interpreter before any of kfctl ran ("Fatal Python error:
init_sys_streams: <stdin> is a directory"), where keyctl reads it and
fails EISDIR only if it reads at all.  kfctl_client.c now opens /dev/null
on a closed one the way that keeps using it failing (EBADF), and parks a
directory on stdin for the Python launcher to put back; the client library
keeps its connection off 0-2 whatever its caller did.

The installed command is the one tested (compiled here, as
keyfence.testing.warm does): with ``KEYFENCE_KFCTL_WARM=0`` every call
runs in Python, with a warm server the calls it can serve run there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence import wire
from keyfence.constants import KEY_SPEC_USER_KEYRING
from keyfence.testing.daemon import DaemonProcess, running_daemon
from keyfence.testing.warm import WarmServer, running_warm_server
from tests.cli.test_kfctl import run_script

KEYCTL = shutil.which("keyctl")
UNSHARE = shutil.which("unshare")

SCRIPT = """
K=$(keyctl add user fd v @s)
keyctl pipe $K >&-; echo "pipe rc=$?" >&2
keyctl print $K >&-; echo "print rc=$?" >&2
keyctl describe 0 2>&-; echo "describe rc=$?"
keyctl rdescribe $K 2>&- >&-; echo "rdescribe closed rc=$?"
keyctl id @s </; echo "id rc=$?"
keyctl padd user x @s </; echo "padd rc=$?"
keyctl --version </ >/dev/null; echo "version rc=$?"
keyctl padd user y @s <&-; echo "padd closed rc=$?"
keyctl session - sh -c 'readlink /proc/self/fd/0' </ 2>/dev/null; echo "session rc=$?"
keyctl print $K
"""


def _normalize(text: str) -> str:
    return re.sub(r"\b\d{6,10}\b", "<serial>", text)


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    return _normalize(run_script(argv, cwd, env))


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as d:
        yield d


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmServer]:
    with running_warm_server(tmp_path_factory.mktemp("warm")) as server:
        yield server


def _as_keyctl(command: str, directory: Path) -> str:
    """A PATH directory whose ``keyctl`` is ``command``."""
    directory.mkdir(exist_ok=True)
    link = directory / "keyctl"
    if not link.exists():
        link.symlink_to(command)
    return str(directory)


@pytest.mark.parametrize("path", ["python", "warm"])
def test_closed_descriptors_and_a_directory_on_stdin_as_keyctl(
    path: str, daemon: DaemonProcess, warm: WarmServer, tmp_path: Path
) -> None:
    if KEYCTL is None or UNSHARE is None:
        pytest.skip("Debian's keyctl or unshare(1) is missing: no oracle")
    plain = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    kernel = _run(
        [UNSHARE, "--user", "--map-root-user", KEYCTL, "session", "-", "sh", "-c", SCRIPT],
        plain,
        tmp_path,
    )
    env = dict(daemon.env, LC_ALL="C")
    if path == "python":
        env["KEYFENCE_KFCTL_WARM"] = "0"
    else:
        env.update(warm.env, KEYFENCE_KFCTL_WARM="1")
    env["PATH"] = f"{_as_keyctl(warm.command, tmp_path / 'bin')}:/usr/bin:/bin"
    ours = _run([warm.command, "session", "-", "sh", "-c", SCRIPT], env, tmp_path)
    assert "Fatal Python error" not in ours
    assert ours == kernel


def test_a_payload_piped_to_a_closed_stdout_reaches_no_daemon(
    daemon: DaemonProcess, warm: WarmServer, tmp_path: Path
) -> None:
    """A key whose payload is a request frame (``revoke`` of another key),
    piped with stdout closed: keyctl's answer (EBADF), and the other key
    untouched.  Before: the frame went down the daemon connection and the
    daemon revoked the key as the piping process asked."""
    from keyfence.client import Client

    env = dict(daemon.env, KEYFENCE_KFCTL_WARM="0")
    with Client.connect(daemon.socket, autostart=False) as client:
        victim = client.add_key("user", "victim", b"secret", KEY_SPEC_USER_KEYRING)
        request = {
            "type": "req",
            "id": 2,
            "op": "revoke",
            "args": [victim],
            "timeout": None,
            "emergency": False,
            "progress": False,
        }
        evil = client.add_key("user", "evil", wire.frame(request), KEY_SPEC_USER_KEYRING)
        client.setperm(evil, 0x3F3F3F3F)

        def close_stdout() -> None:
            os.close(1)

        done = subprocess.run(
            [warm.command, "pipe", str(evil)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=subprocess.PIPE,
            preexec_fn=close_stdout,
            timeout=60,
            check=False,
        )
        assert (done.returncode, done.stderr) == (1, b"write: Bad file descriptor\n")
        assert client.read(victim) == b"secret"  # not revoked


def test_the_client_library_keeps_its_connection_off_the_standard_descriptors(
    daemon: DaemonProcess,
) -> None:
    """A Python program started with 0-2 closed: its connection is not
    what it prints to (the same defect, for any user of keyfence.client)."""
    program = (
        "import os, sys\n"
        "from keyfence.client import Client\n"
        "c = Client.connect(sys.argv[1], autostart=False)\n"
        "c.ping()\n"
        "os.write(os.open(sys.argv[2], os.O_WRONLY), b'%d' % c._sock.fileno())\n"
    )
    report = Path(daemon.socket).with_name("fileno")
    report.write_bytes(b"")

    def close_standard() -> None:
        for fd in (0, 1, 2):
            os.close(fd)

    subprocess.run(
        [sys.executable, "-c", program, daemon.socket, str(report)],
        preexec_fn=close_standard,
        timeout=60,
        check=True,
    )
    assert int(report.read_text()) > 2


def test_a_daemon_started_with_the_standard_descriptors_closed_fills_them() -> None:
    """Its listener and connections take no standard descriptor's number
    (what it logs would go to a client): /dev/null is there instead."""
    closing = ["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh"]
    with running_daemon(prefix=closing) as d:
        from keyfence.client import Client

        with Client.connect(d.socket, autostart=False) as client:
            client.ping()
            fds = [os.readlink(f"/proc/{d.process.pid}/fd/{fd}") for fd in (0, 1, 2)]
    assert fds == ["/dev/null"] * 3
