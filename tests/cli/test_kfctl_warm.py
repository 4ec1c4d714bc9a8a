"""kfctl's warm path: the compiled client, a real warm server and a real
daemon (keyfence.cli.kfctl_warm, kfctl_client.c).

Every call here runs with ``KEYFENCE_KFCTL_WARM=require``: a call that does
not reach the warm server fails instead of quietly running in Python.  The
golden scripts also run through it (tests/cli/test_kfctl.py); who may call
whom is tests/security/test_kfctl_warm_trust.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.cli import launcher
from keyfence.testing.daemon import DaemonProcess, running_daemon
from keyfence.testing.warm import WarmServer, running_warm_server, servers_at, stop_servers_at

PYTHON_KFCTL = [sys.executable, "-m", "keyfence.cli.kfctl"]


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmServer]:
    with running_warm_server(tmp_path_factory.mktemp("warm")) as server:
        yield server


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as running:
        yield running


def env_of(daemon: DaemonProcess, warm: WarmServer) -> dict[str, str]:
    return {**daemon.env, **warm.env, "LC_ALL": "C"}


def run(
    argv: list[str], env: dict[str, str], **kwargs: object
) -> subprocess.CompletedProcess[bytes]:
    options: dict[str, object] = {"capture_output": True, "timeout": 60, "check": False, "env": env}
    options.update(kwargs)
    return subprocess.run(argv, **options)  # type: ignore[call-overload,no-any-return]


def same(a: subprocess.CompletedProcess[bytes], b: subprocess.CompletedProcess[bytes]) -> bool:
    return (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)


def test_warm_calls_print_what_python_kfctl_prints(daemon: DaemonProcess, warm: WarmServer) -> None:
    env = env_of(daemon, warm)
    added = run([warm.command, "add", "user", "warm.same", "payload", "@u"], env)
    assert added.returncode == 0, added.stderr
    key = added.stdout.decode().strip()
    assert key.isdigit()
    for args in (
        ["show", "@u"],
        ["print", key],
        ["pipe", key],
        ["describe", key],
        ["rdescribe", key, "@"],
        ["list", "@u"],
        ["search", "@u", "user", "warm.same"],
        ["print", "%user:warm.same"],
        ["print", "1"],  # exit 1, keyctl's error line
        ["nosuchcommand"],  # exit 2
        ["add"],  # usage: exit 2
        ["--version"],
        [],
    ):
        ours = run([warm.command, *args], env)
        theirs = run([*PYTHON_KFCTL, *args], env)
        assert same(ours, theirs), (args, ours, theirs)
    # stdin is the caller's: padd reads it
    for argv in ([warm.command], PYTHON_KFCTL):
        done = run([*argv, "padd", "user", "warm.stdin", "@u"], env, input=b"from stdin")
        assert done.returncode == 0, done.stderr
    shown = run([warm.command, "print", "%user:warm.stdin"], env)
    assert shown.stdout == b"from stdin\n"


def test_a_warm_call_is_the_callers_process(daemon: DaemonProcess, warm: WarmServer) -> None:
    """@s is the session of the shell that ran kfctl (the client connected),
    and new_session replaces that shell's session, as keyctl's does."""
    env = env_of(daemon, warm)
    k = warm.command
    script = (
        f"{k} add user warm.mine v @s >/dev/null && {k} show @s && "
        f"{k} new_session && {k} show @s && {k} print %user:warm.mine; echo rc=$?"
    )
    done = run([*PYTHON_KFCTL, "session", "-", "sh", "-c", script], env)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0, done.stderr
    assert len(lines) == 7, lines
    first, joined = lines[1].split()[0], lines[3]  # new_session prints the new keyring
    assert lines[1].endswith("keyring: _ses") and lines[2].endswith("user: warm.mine")
    assert lines[5].split()[0] == joined != first and lines[5].endswith("keyring: _ses")
    assert lines[6] == "rc=1"  # warm.mine stayed in the old session: no longer possessed
    # the first line is the outer session's (python kfctl's)
    assert done.stderr.decode().splitlines()[1:] == ["keyctl_read_alloc: Permission denied"]


def test_commands_that_exec_run_in_python_even_when_required(
    daemon: DaemonProcess, warm: WarmServer
) -> None:
    env = env_of(daemon, warm)
    done = run([warm.command, "session", "-", "sh", "-c", "echo in:$$"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"in:")


def test_exit_status_and_a_forwarded_signal(daemon: DaemonProcess, warm: WarmServer) -> None:
    """Ctrl-C reaches the worker (blocked reading stdin) through the client;
    both die of it, as Python kfctl would, and no worker is left."""
    env = env_of(daemon, warm)
    spare_only = len(warm.workers())
    for argv in ([warm.command], PYTHON_KFCTL):
        proc = subprocess.Popen(
            [*argv, "padd", "user", "warm.sig", "@u"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        time.sleep(0.5 if argv == PYTHON_KFCTL else 0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGINT, err
    assert _eventually(lambda: len(warm.workers()) == spare_only)
    assert run([warm.command, "print", "%user:warm.sig"], env).returncode == 1


def test_a_killed_caller_takes_its_worker_with_it(daemon: DaemonProcess, warm: WarmServer) -> None:
    env = env_of(daemon, warm)
    spare_only = len(warm.workers())
    proc = subprocess.Popen(
        [warm.command, "padd", "user", "warm.kill", "@u"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert _eventually(lambda: len(warm.workers()) == spare_only + 1)
    proc.kill()
    proc.wait(10)
    assert _eventually(lambda: len(warm.workers()) == spare_only)
    assert proc.stdin is not None
    proc.stdin.close()


def test_malformed_calls_are_declined_and_the_server_serves_on(
    daemon: DaemonProcess, warm: WarmServer
) -> None:
    """Calls of our own uid that are not what the client sends: each gets
    "F" (nothing done) or nothing, and the next real call works."""
    devnull = os.open(os.devnull, os.O_RDWR)
    cwd = os.open(".", os.O_PATH)
    try:
        for data, fds in (
            (b"", [devnull] * 3 + [cwd]),
            (b"garbage", [devnull] * 3 + [cwd]),
            (b"KFW1" + (1).to_bytes(4, "little") * 3 + b"kfctl\0", [devnull]),  # one fd
            (b"KFW1" + (9).to_bytes(4, "little") * 3 + b"kfctl\0", [devnull] * 3 + [cwd]),
            (b"KFW1" + (0).to_bytes(4, "little") * 3, [devnull] * 3 + [cwd]),  # no argv
            (b"KFW2" + (1).to_bytes(4, "little") * 3 + b"kfctl\0", [devnull] * 3 + [cwd]),
        ):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(10)
                s.connect(warm.socket)
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(_ints(fds))))]
                s.sendmsg([data], ancillary)
                reply = s.recv(4096)
                assert reply.startswith(b"F") or reply.startswith(b"X"), (data, reply)
                assert not reply.startswith(b"P"), data  # no worker ran
    finally:
        os.close(devnull)
        os.close(cwd)
    done = run([warm.command, "--version"], env_of(daemon, warm))
    assert done.returncode == 0, done.stderr


def test_a_caller_that_says_nothing_does_not_hold_up_the_next(
    daemon: DaemonProcess, warm: WarmServer
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as silent:
        silent.connect(warm.socket)
        started = time.monotonic()
        done = run([warm.command, "--version"], env_of(daemon, warm))
        assert done.returncode == 0, done.stderr
        # the spare that took the silent call waits for it, its successor does not
        assert time.monotonic() - started < 30


def test_no_server_runs_in_python_and_starts_one(daemon: DaemonProcess, tmp_path: Path) -> None:
    """As installed: no server answers, the call runs in Python, which starts
    one for the next (unless KEYFENCE_NO_AUTOSTART=1)."""
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    command = str(tmp_path / "kfctl")
    launcher.write_command(command)
    sock = str(private / "kfctl.sock")
    env = {**daemon.env, "KEYFENCE_KFCTL_SOCKET": sock}
    try:
        quiet = run([command, "show", "@u"], env)  # KEYFENCE_NO_AUTOSTART=1: none started
        assert quiet.returncode == 0, quiet.stderr
        time.sleep(0.5)
        assert not os.path.exists(sock)
        del env["KEYFENCE_NO_AUTOSTART"]  # $KEYFENCE_SOCKET is explicit: no daemon started
        first = run([command, "show", "@u"], env)
        assert first.returncode == 0, first.stderr
        assert _eventually(lambda: os.path.exists(sock))
        warm = run([command, "show", "@u"], {**env, "KEYFENCE_KFCTL_WARM": "require"})
        assert same(warm, first)
        assert oct(os.stat(sock).st_mode & 0o777) == oct(0o600)
    finally:
        stop_servers_at(sock)
    assert _eventually(lambda: not servers_at(sock))


def test_kfctl_warm_0_never_uses_a_server(daemon: DaemonProcess, warm: WarmServer) -> None:
    env = {**env_of(daemon, warm), "KEYFENCE_KFCTL_WARM": "0"}
    before = warm.workers()
    done = run([warm.command, "padd", "user", "warm.cold", "@u"], env, input=b"x")
    assert done.returncode == 0, done.stderr
    assert warm.workers() == before  # the same spare: no call was taken


def _ints(fds: list[int]) -> bytes:
    import array

    return array.array("i", fds).tobytes()


def _eventually(check: object, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("env", "warm_ok"),
    [
        ({}, True),
        ({"LANG": "C"}, True),
        ({"LANG": "en_US.UTF-8"}, True),
        ({"LC_ALL": "de_DE.utf8", "LANG": "de_DE.ISO-8859-1"}, True),
        ({"LANG": "en_US.ISO-8859-1"}, False),
        ({"LC_CTYPE": "ja_JP.eucJP", "LANG": "en_US.UTF-8"}, False),
    ],
)
def test_only_a_utf8_or_c_locale_is_served_warm(
    env: dict[str, str], warm_ok: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python started in a latin-1 locale decodes argv by it; a worker would
    by UTF-8: such calls run in Python."""
    from keyfence.cli import kfctl_warm_call

    for name in ("LC_ALL", "LC_CTYPE", "LANG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert kfctl_warm_call.utf8_locale() is warm_ok


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_a_warm_call_starts_a_daemon_as_python_kfctl_would(
    warm: WarmServer, tmp_path: Path, terminal: bool
) -> None:
    """No daemon at the default place: the call starts one.  Declined to
    Python while nothing is written; on a terminal, whose first line went
    out before the connection, the worker starts it."""
    import pty

    place = tmp_path / "system"
    place.mkdir(mode=0o700)  # as the daemon binds it
    sock = str(place / "sock")
    env = {
        k: v for k, v in os.environ.items() if k not in ("KEYFENCE_SOCKET", "KEYFENCE_NO_AUTOSTART")
    }
    env.update(warm.env, KEYFENCE_SYSTEM_SOCKET=sock)
    if os.geteuid() != 0:
        pytest.skip("the default place of a non-root caller is its runtime directory")
    primary, secondary = pty.openpty() if terminal else os.pipe()
    try:
        done = subprocess.run(
            [warm.command, "show", "@u"],
            env=env,
            stdout=secondary,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        os.close(secondary)
        output = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the pty's EIO once the writer has gone
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(primary)
        lock = Path(sock + ".lock")
        if lock.exists():
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(lock.read_text().split()[0]), signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    assert output.replace(b"\r\n", b"\n").startswith(b"Keyring\n"), output
    assert b"_uid.0" in output and output.count(b"Keyring") == 1  # not run twice


def test_a_spare_leaves_with_its_server(tmp_path: Path) -> None:
    """A server killed outright (no cleanup): its spare sees the end of its
    channel and goes, holding neither the socket nor anyone's connection."""
    with running_warm_server(tmp_path) as warm:
        (spare,) = warm.workers()
        warm.process.kill()
        warm.process.wait()
        try:
            assert _eventually(lambda: _gone(spare))
        finally:
            with contextlib.suppress(OSError):
                os.kill(spare, signal.SIGKILL)


def _gone(pid: int) -> bool:
    """Exited (a zombie, or reaped already)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        return "\nState:\tZ" in f.read()
    return True
