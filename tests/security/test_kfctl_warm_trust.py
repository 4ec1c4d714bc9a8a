"""Who may call whom on kfctl's warm path (keyfence.cli.kfctl_warm,
kfctl_client.c; docs/security.md, "kfctl's warm server").

A warm worker gets its caller's descriptors and a daemon connection that
*is* the caller (its @s, its keys); a caller gets whatever its worker does
with them.  So each side refuses any other that is not exactly as
privileged as itself: another uid, or our uid with no_new_privs or a
smaller capability bounding set.  The sockets here are opened to everyone
(mode 0666, directory 0755) so that only those checks stand in the way.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyfence.testing import users
from keyfence.testing.daemon import DaemonProcess, running_daemon
from keyfence.testing.warm import WarmServer, compile_command, running_warm_server

OTHER_UID = 4643

pytestmark = pytest.mark.skipif(
    users.why_no_other_uids() is not None, reason=str(users.why_no_other_uids())
)

# A call as the client makes it, from Python: prints the server's first reply.
RAW_CALL = textwrap.dedent(
    r"""
    import array, os, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(20)
    s.connect(sys.argv[1])
    argv = [b"kfctl", b"show", b"@u"]
    env = [b"KEYFENCE_SOCKET=" + sys.argv[2].encode()]
    head = b"KFW1" + array.array("I", [len(argv), len(env), 0o22]).tobytes()
    data = head + b"".join(w + b"\0" for w in argv + env)
    fds = array.array("i", [0, 1, 2, os.open(".", os.O_PATH)]).tobytes()
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    try:
        reply = s.recv(4096)
    except OSError as err:
        reply = repr(err).encode()
    sys.stdout.buffer.write(b"reply:" + reply[:1] + b"\n")
    """
)


@pytest.fixture
def place() -> Iterator[Path]:
    with users.reachable_directory("keyfence-warm-trust-") as path:
        yield path


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as running:
        yield running


def _open_to_all(warm: WarmServer) -> None:
    os.chmod(warm.socket, 0o666)


def _raw_call(prefix: list[str], warm: WarmServer, daemon: DaemonProcess) -> str:
    argv = [*prefix, *users.python_argv("-c", RAW_CALL, warm.socket, daemon.socket)]
    done = subprocess.run(
        argv, env=users.environment(), capture_output=True, timeout=60, check=False, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def _client(
    prefix: list[str], warm: WarmServer, daemon: DaemonProcess
) -> subprocess.CompletedProcess[bytes]:
    env = {**daemon.env, **warm.env}
    return subprocess.run(
        [*prefix, warm.command, "show", "@u"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def _eventually(check: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_a_caller_of_another_uid_gets_no_worker(place: Path, daemon: DaemonProcess) -> None:
    with running_warm_server(place) as warm:
        _open_to_all(warm)
        before = warm.workers()
        prefix = users.as_uid(OTHER_UID, [])
        assert _raw_call(prefix, warm, daemon) == "reply:F"
        refused = _client(prefix, warm, daemon)
        assert refused.returncode == 1
        assert refused.stderr == b"kfctl: no warm server: the server is not ours\n"
        # the spare that refused is replaced
        assert _eventually(lambda: len(warm.workers()) == len(before))
        done = _client([], warm, daemon)  # and ours still works
        assert done.returncode == 0, done.stderr


def test_a_server_of_another_uid_is_never_called(place: Path, daemon: DaemonProcess) -> None:
    """A socket someone else put where our kfctl looks: it gets not a byte
    nor a descriptor from us, and kfctl runs in Python instead."""
    command = compile_command(place)
    os.chmod(place, 0o777)  # the other uid binds its socket here
    sock = str(place / "kfctl.sock")
    with _planted(users.as_uid(OTHER_UID, []), sock) as listener:
        env = {**daemon.env, "KEYFENCE_KFCTL_SOCKET": sock, "KEYFENCE_KFCTL_WARM": "require"}
        refused = _run([command, "show", "@u"], env)
        assert refused.returncode == 1
        assert refused.stderr == b"kfctl: no warm server: the server is not ours\n"
        del env["KEYFENCE_KFCTL_WARM"]
        done = _run([command, "show", "@u"], env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(b"Keyring\n")
        assert listener() == ["got 0 bytes 0 fds", "got 0 bytes 0 fds"]


# Bind a socket open to all, accept two connections, say what each sent.
PLANTED = textwrap.dedent(
    r"""
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(sys.argv[1])
    os.chmod(sys.argv[1], 0o666)
    s.listen(8)
    print("listening", flush=True)
    for _ in range(2):
        c, _ = s.accept()
        c.settimeout(20)
        data, anc, _, _ = c.recvmsg(65536, socket.CMSG_SPACE(64))
        print(f"got {len(data)} bytes {sum(len(a[2]) // 4 for a in anc)} fds", flush=True)
        c.close()
    """
)


@contextlib.contextmanager
def _planted(prefix: list[str], sock: str) -> Iterator[Callable[[], list[str]]]:
    argv = [*prefix, *users.python_argv("-c", PLANTED, sock)]
    proc = subprocess.Popen(argv, env=users.environment(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "listening\n"

        def report() -> list[str]:
            out, _ = proc.communicate(timeout=30)
            return out.splitlines()

        yield report
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False, cwd="/")


@pytest.mark.parametrize(
    "confinement",
    [["--no-new-privs"], ["--bounding-set=-all", "--inh-caps=-all"]],
    ids=["no_new_privs", "no-capabilities"],
)
def test_a_less_privileged_caller_of_our_uid_is_refused(
    place: Path, daemon: DaemonProcess, confinement: list[str]
) -> None:
    with running_warm_server(place) as warm:
        prefix = ["setpriv", *confinement]
        before = warm.workers()
        assert _raw_call(prefix, warm, daemon) == "reply:F"
        refused = _client(prefix, warm, daemon)
        assert refused.returncode == 1
        assert refused.stderr == b"kfctl: no warm server: the server is not ours\n"
        assert _eventually(lambda: len(warm.workers()) == len(before))


def test_a_less_privileged_server_of_our_uid_is_never_called(
    place: Path, daemon: DaemonProcess
) -> None:
    """Our uid, confined (no_new_privs): it must not get an unconfined
    caller's descriptors or daemon connection."""
    command = compile_command(place)
    sock = str(place / "kfctl.sock")
    with _planted(["setpriv", "--no-new-privs"], sock) as listener:
        env = {**daemon.env, "KEYFENCE_KFCTL_SOCKET": sock, "KEYFENCE_KFCTL_WARM": "require"}
        for _ in range(2):
            refused = _run([command, "show", "@u"], env)
            assert refused.returncode == 1
            assert refused.stderr == b"kfctl: no warm server: the server is not ours\n"
        assert listener() == ["got 0 bytes 0 fds", "got 0 bytes 0 fds"]
    # a server confined as its caller is serves it
    with running_warm_server(place, command=command, prefix=["setpriv", "--no-new-privs"]) as warm:
        done = _client(["setpriv", "--no-new-privs"], warm, daemon)
        assert done.returncode == 0, done.stderr


# Both pid-reuse tests run a driver as pid 1 of a fresh pid namespace, so
# that it can choose the next pid (ns_last_pid).  PID_REUSE comes first in
# each driver: a confined process (no_new_privs) does its part, prints its
# pid and exits, leaving a child of its own to go on; an unconfined process
# then gets that pid; the driver prints "reused" (or why not) and, later,
# what the child wrote to its report.
PID_REUSE = textwrap.dedent(
    r"""
    import os, subprocess, sys, time

    def reuse_pid_of(code, *args):
        made = subprocess.run(["setpriv", "--no-new-privs", sys.executable, "-c", code, *args],
                              capture_output=True, text=True, check=True)
        pid = int(made.stdout)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        unconfined = subprocess.Popen(["sleep", "60"])
        got = unconfined.pid
        print("reused" if got == pid else f"not reused: {pid} -> {got}", flush=True)
        return unconfined

    def print_report(path):
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(open(path).read() if os.path.exists(path) else "nothing", flush=True)
    """
)


def _after_pid_reuse(tmp: str, driver: str, *args: str) -> list[str]:
    """Run PID_REUSE + ``driver`` (argv: ``tmp``, ``args``) in a new pid
    namespace; the lines it printed after "reused" (a skip if the pid could
    not be had)."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing: cannot make a pid namespace")
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"]
    argv += [PID_REUSE + driver, tmp, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    reused, *rest = done.stdout.splitlines()
    if reused != "reused":
        pytest.skip(f"could not force the pid reuse ({reused})")
    return rest


# A warm server whose spare is stopped; the confined caller connects, sends
# a call, hands its end of the connection to a child and exits; the spare
# goes on once the pid is an unconfined process's.  /proc by pid now shows
# an unconfined caller.
REUSE_DRIVER = textwrap.dedent(
    r"""
    import signal
    tmp = sys.argv[1]
    sock = os.path.join(tmp, "kfctl.sock")
    server = subprocess.Popen([sys.executable, "-m", "keyfence.cli.kfctl_warm", "--socket", sock])
    def children():
        try:
            with open(f"/proc/{server.pid}/task/{server.pid}/children") as f:
                return [int(w) for w in f.read().split()]
        except OSError:
            return []
    while not (os.path.exists(sock) and children()):
        time.sleep(0.02)
    (spare,) = children()
    os.kill(spare, signal.SIGSTOP)
    unconfined = reuse_pid_of(sys.argv[2], sock, tmp)
    os.kill(spare, signal.SIGCONT)
    print_report(os.path.join(tmp, "reply"))
    unconfined.kill(); server.terminate(); server.wait()
    """
)

REUSE_CALLER = textwrap.dedent(
    r"""
    import array, os, socket, sys
    sock, tmp = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sock)
    argv, env = [b"kfctl", b"--version"], [b"PATH=/usr/bin:/bin"]
    data = b"KFW1" + array.array("I", [len(argv), len(env), 0o22]).tobytes()
    data += b"".join(w + b"\0" for w in argv + env)
    null = os.open(os.devnull, os.O_RDWR)  # not our stdout: the driver waits for its end
    fds = array.array("i", [null, null, null, os.open("/", os.O_PATH)]).tobytes()
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if os.fork():
        print(os.getpid(), flush=True)
        os._exit(0)
    os.setsid()
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    s.settimeout(40)
    try:
        reply = s.recv(4096)[:1].decode() or "EOF"
    except OSError as err:
        reply = repr(err)
    with open(os.path.join(tmp, "reply.new"), "w") as f:
        f.write(reply)
    os.rename(os.path.join(tmp, "reply.new"), os.path.join(tmp, "reply"))  # whole, for the driver
    """
)


def test_a_reused_pid_does_not_pass_for_its_caller() -> None:
    """The worker checks the process that connected, by its pidfd: a pid
    now another's, of an unconfined process, gets "F" and no worker."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kfwarm-") as tmp:
        (reply,) = _after_pid_reuse(tmp, REUSE_DRIVER, REUSE_CALLER)
    assert reply == "F", reply  # "P": a worker ran for it


# The other way round: the confined process makes the socket where our
# kfctl looks and hands the listener to its child.  The socket's
# SO_PEERCRED still names the reused pid.
PLANT_DRIVER = textwrap.dedent(
    r"""
    tmp, command, planter = sys.argv[1], sys.argv[2], sys.argv[3]
    sock = os.path.join(tmp, "kfctl.sock")
    unconfined = reuse_pid_of(planter, sock, tmp)
    env = {"PATH": "/usr/bin:/bin", "KEYFENCE_KFCTL_SOCKET": sock,
           "KEYFENCE_KFCTL_WARM": "require", "KEYFENCE_SOCKET": os.path.join(tmp, "none")}
    call = subprocess.run([command, "--version"], env=env, capture_output=True, text=True)
    print(call.returncode, call.stderr.strip(), flush=True)
    print_report(os.path.join(tmp, "got"))
    unconfined.kill()
    """
)

PLANTER_EXITS = textwrap.dedent(
    r"""
    import os, socket, sys
    sock, tmp = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(sock)
    s.listen(8)
    if os.fork():
        print(os.getpid(), flush=True)
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    s.settimeout(40)
    c, _ = s.accept()
    c.settimeout(5)
    try:
        data, anc, _, _ = c.recvmsg(65536, socket.CMSG_SPACE(64))
        text = f"got {len(data)} bytes {sum(len(a[2]) // 4 for a in anc)} fds"
    except OSError as err:
        text = f"got nothing: {err!r}"
    with open(os.path.join(tmp, "got.new"), "w") as f:
        f.write(text)
    os.rename(os.path.join(tmp, "got.new"), os.path.join(tmp, "got"))  # whole, for the driver
    """
)


def test_a_socket_whose_maker_is_gone_is_not_trusted_for_its_pid() -> None:
    """The client checks the process that made the socket, by its pidfd: a
    pid now another's, of an unconfined process, is no pass, and the
    socket gets not a byte."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kfwarm-") as tmp:
        command = compile_command(Path(tmp))
        called, got = _after_pid_reuse(tmp, PLANT_DRIVER, command, PLANTER_EXITS)
    assert called == "1 kfctl: no warm server: the server is not ours"
    assert got == "got 0 bytes 0 fds", got
