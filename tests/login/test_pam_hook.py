"""The PAM hook's own process: its log, its wrapper, its bounded logout
(a helper's attack run, 2026-12-07; each failed before)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from keyfence.cli import demo_login, pam
from keyfence.testing import users


def test_the_log_keeps_a_users_path_on_one_line_without_escapes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A listed directory named with a newline and an escape sequence
    forged a line ("kfatk1: logout: ...") and reached root's terminal raw."""
    pam._Log("test")("/tmp/x\nkeyfence pam: victim: logout\x1b[2K\rFORGED: not on a mount")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\r" not in err
    assert "\\x0a" in err and "\\x1b" in err


def test_the_demo_wrapper_runs_no_code_from_the_working_directory(tmp_path: Path) -> None:
    """``python -m`` puts the working directory first on sys.path, and
    pam_exec keeps the PAM application's (su from a user's directory): a
    keyfence/ package there ran as root."""
    planted = tmp_path / "cwd" / "keyfence"
    planted.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    wrapper = demo_login._wrapper(tmp_path, str(tmp_path / "no-daemon"), tmp_path / "conf")
    subprocess.run(
        [str(wrapper), "account"],
        cwd=planted.parent,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert not marker.exists()


STOPPED = textwrap.dedent(
    r"""
    import sys
    from keyfence.cli import pam
    from keyfence.cli.login_setup import LoginUser
    from keyfence.errors import KeyfenceError
    pam.CLEAR_MARGIN = 1.0
    try:
        pam._clear_as(LoginUser("kf-nobody", int(sys.argv[1]), int(sys.argv[1]), "/"), 1.0)
    except KeyfenceError as err:
        print(err.errno)
    """
)


def test_a_logout_whose_clearing_child_the_user_stops_is_bounded() -> None:
    """The child that clears @s has the user's uid, so the user may
    SIGSTOP it: the root hook waited for it for ever (past --timeout, the
    stash kept).  Now --timeout plus a margin, then root kills it."""
    if (reason := users.why_no_other_uids()) is not None:
        pytest.skip(reason)
    uid = 4645
    # a daemon that accepts and never answers: the child waits there too
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    where = tempfile.mkdtemp(prefix="kfsilent-")
    os.chmod(where, 0o755)
    silent.bind(os.path.join(where, "sock"))
    os.chmod(os.path.join(where, "sock"), 0o666)
    silent.listen()
    hook = subprocess.Popen(
        [*users.python_argv("-c", STOPPED, str(uid))],
        env=users.environment(
            KEYFENCE_SOCKET=os.path.join(where, "sock"), KEYFENCE_NO_AUTOSTART="1"
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    stopped: list[int] = []

    def stop_the_child() -> None:  # as the user would: any process of its uid
        deadline = time.monotonic() + 20
        while not stopped and time.monotonic() < deadline:
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) != hook.pid:
                    try:
                        st = os.stat(f"/proc/{name}")
                        with open(f"/proc/{name}/stat") as f:
                            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    except (OSError, ValueError, IndexError):
                        continue
                    if st.st_uid == uid and ppid == hook.pid:
                        os.kill(int(name), signal.SIGSTOP)
                        stopped.append(int(name))
                        return

    watcher = threading.Thread(target=stop_the_child)
    watcher.start()
    try:
        out, _ = hook.communicate(timeout=60)
    finally:
        hook.kill()
        watcher.join()
        silent.close()
        shutil.rmtree(where)
    assert stopped  # the user stopped it (else it waited on the silent daemon: the same)
    assert out.split() == [str(errno.ETIMEDOUT)]
