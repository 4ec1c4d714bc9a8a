"""Session keyrings across a process tree, checked against the kernel's own.

Each test runs one shell script twice: with Debian's ``keyctl`` against the
kernel keyring, and with ``keyctl`` on PATH being kfctl against a private
daemon; the outputs must agree (serials aside).  The kernel runs need no
user namespace: ``new_session`` replaces only the throwaway shell's session
keyring, never the test runner's.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.client import Client
from keyfence.errors import KeyfenceError
from keyfence.testing import users
from tests.daemon_fixture import DaemonProcess, running_daemon

KEYCTL = shutil.which("keyctl")
OTHER_UID = 4640


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon("--system") as d:
        yield d


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A scratch directory other uids can reach (pytest's is mode 0700)."""
    with tempfile.TemporaryDirectory(prefix="kfses-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


def _shim(tmp: Path) -> Path:
    """A directory whose ``keyctl`` is kfctl, runnable by any uid."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "keyctl"
    shim.write_text(f'#!/bin/sh\nexec {users.SYSTEM_PYTHON} -m keyfence.cli.kfctl "$@"\n')
    shim.chmod(0o755)
    os.chmod(tmp, 0o755)
    return bin_dir


def run_both(script: str, daemon: DaemonProcess, tmp: Path) -> tuple[str, str]:
    """(kernel output, keyfence output) of ``sh -c script``; stderr joins stdout."""
    if KEYCTL is None:
        pytest.skip("keyctl (keyutils) is not installed: no kernel to compare with")
    base = users.environment()
    kernel_env = dict(base, WORK=str(tmp / "kernel"))
    os.makedirs(kernel_env["WORK"], mode=0o777, exist_ok=True)
    os.chmod(kernel_env["WORK"], 0o777)
    ours_env = dict(
        base,
        PATH=f"{_shim(tmp)}:{base.get('PATH', '/usr/bin:/bin')}",
        KEYFENCE_SOCKET=daemon.socket,
        KEYFENCE_NO_AUTOSTART="1",
        WORK=str(tmp / "ours"),
    )
    os.makedirs(ours_env["WORK"], mode=0o777, exist_ok=True)
    os.chmod(ours_env["WORK"], 0o777)
    outputs = []
    for env in (kernel_env, ours_env):
        done = subprocess.run(
            ["sh", "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
            check=False,
        )
        outputs.append(re.sub(r"\b\d{6,10}\b", "<serial>", done.stdout))
    return outputs[0], outputs[1]


def test_new_session_gives_the_shell_a_keyring_its_later_children_share(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    script = """
        keyctl new_session >/dev/null
        keyctl add user a v @s >/dev/null
        keyctl rdescribe @s
        keyctl print %user:a
        sh -c 'keyctl print %user:a'
        setsid keyctl print %user:a
        nohup keyctl print %user:a 2>/dev/null </dev/null
        keyctl session - keyctl rdescribe @s
        keyctl new_session >/dev/null && keyctl rdescribe @s
        keyctl request user a >/dev/null 2>&1; echo rc=$?
    """
    kernel, ours = run_both(script, daemon, tmp_path)
    assert kernel.splitlines()[:5] == ["keyring;0;0;3f030000;_ses", "v", "v", "v", "v"], kernel
    assert ours == kernel


def test_another_uid_cannot_give_its_keyring_to_roots_shell(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """Issue 12, finding 4: a uid-65534 process run from root's shell
    replaced the keyring of root's whole session; the kernel refuses
    (EPERM) and root keeps its keys."""
    if (reason := users.why_no_other_uids()) is not None:
        pytest.skip(reason)
    other = " ".join(users.as_uid(OTHER_UID, []))
    script = f"""
        keyctl new_session >/dev/null
        keyctl add user mine s3cret @s >/dev/null
        {other} keyctl new_session; echo rc=$?
        keyctl print %user:mine
        keyctl rdescribe @s
    """
    kernel, ours = run_both(script, daemon, tmp_path)
    assert kernel.splitlines() == [
        "keyctl_session_to_parent: Operation not permitted",
        "rc=1",
        "s3cret",
        "keyring;0;0;3f030000;_ses",
    ], kernel
    assert ours == kernel


def wait_until_gone(client: Client, serial: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.describe(serial)
        except KeyfenceError as err:
            if err.errno in (errno.ENOKEY, errno.EACCES):
                return True
        time.sleep(0.05)
    return False
