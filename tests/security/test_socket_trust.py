"""Which socket a client trusts (issue 12, finding 1; docs/security.md).

Another uid plants a fake daemon where a victim's client looks for one; the
fake records every byte it receives and answers like a daemon would (so a
client that trusts it goes on to send its request, password included).
The victim's client must refuse before sending a single byte, with a clear
message, and never start a daemon in a directory it did not check.

Real uids through setpriv: the victim 4650, the attacker 4651 (this
branch's range).  Each test failed on the code before the fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.testing import users

VICTIM = 4650
ATTACKER = 4651

pytestmark = pytest.mark.skipif(
    users.why_no_other_uids() is not None, reason=str(users.why_no_other_uids())
)

FAKE_DAEMON = r"""
import os, socket, sys
from keyfence import wire

path, record = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)

def note(line):
    with open(record, "a") as f:
        f.write(line + "\n")

note("listening")
while True:
    conn, _ = server.accept()
    note("connect")
    conn.settimeout(5)
    replies = 0
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            note("data " + data.hex())
            # answer as a daemon does, so a trusting client sends its request
            if replies == 0:
                answer = {"type": "welcome", "version": 1, "server": "keyfence",
                          "pid": os.getpid(), "uid": 0, "gid": 0, "session": 1}
            else:
                answer = {"type": "reply", "id": replies, "value": 12345}
            replies += 1
            conn.sendall(wire.frame(answer))
    except OSError:
        pass
    conn.close()
"""


class FakeDaemon:
    def __init__(self, process: subprocess.Popen[bytes], record: Path) -> None:
        self.process = process
        self.record = record

    def lines(self) -> list[str]:
        try:
            return self.record.read_text().splitlines()
        except FileNotFoundError:
            return []

    @property
    def connections(self) -> int:
        return sum(1 for line in self.lines() if line == "connect")

    @property
    def received(self) -> bytes:
        return b"".join(
            bytes.fromhex(line.split(" ", 1)[1]) for line in self.lines() if line.startswith("data")
        )


@contextlib.contextmanager
def fake_daemon(sock: Path, uid: int = ATTACKER) -> Iterator[FakeDaemon]:
    """A fake daemon of ``uid`` (the attacker's) listening at ``sock`` (its
    directory already made by the test)."""
    record_dir = Path(tempfile.mkdtemp(prefix="kfct-record-"))
    os.chown(record_dir, uid, uid)
    record = record_dir / "received"
    argv = users.as_uid(uid, users.python_argv("-c", FAKE_DAEMON, str(sock), str(record)))
    process = subprocess.Popen(argv, env=users.environment(), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "listening" not in (record.read_text() if record.exists() else ""):
            assert process.poll() is None, "the fake daemon did not start"
            assert time.monotonic() < deadline, "the fake daemon did not start in 30 s"
            time.sleep(0.02)
        yield FakeDaemon(process, record)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(record_dir, ignore_errors=True)


NO_SYSTEM_DAEMON = "/nonexistent/kfct/system-sock"
"""The victims' system socket: the machine may run a system daemon."""


def victim_env(**extra: str) -> dict[str, str]:
    env = users.environment(**extra)
    env.setdefault("KEYFENCE_SYSTEM_SOCKET", NO_SYSTEM_DAEMON)
    for name in ("KEYFENCE_SOCKET", "KEYFENCE_NO_AUTOSTART", "XDG_RUNTIME_DIR"):
        if name not in extra:
            env.pop(name, None)
    return env


def run_victim(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[int, str]:
    done = subprocess.run(
        users.as_uid(VICTIM, argv), env=env, input=stdin, capture_output=True, timeout=120
    )
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    return done.returncode, output


VICTIM_COMMANDS = [
    (users.kfctl_argv("add", "user", "bank-password", "hunter2", "@s"), b""),
    (users.keyfence_argv("e4crypt", "add_key", "-S", "s:kfct-salt"), b"correct horse\n"),
]


def assert_refused(fake: FakeDaemon, code: int, output: str, *words: str) -> None:
    assert fake.received == b"", "the victim talked to the fake daemon"
    assert code == 1, output
    assert "Traceback" not in output, output
    for word in words:
        assert word in output, output


def kill_daemon_of(sock: Path) -> None:
    """A daemon the code before the fix started at ``sock`` (cleanup)."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(Path(str(sock) + ".lock").read_text().strip()), signal.SIGTERM)


@pytest.fixture
def fallback_dir() -> Iterator[Path]:
    """The victim's fallback directory, as the attacker can guess it."""
    if os.path.exists(f"/run/user/{VICTIM}"):
        pytest.skip(f"/run/user/{VICTIM} exists: the fallback would not be /tmp")
    path = Path(f"/tmp/keyfence-{VICTIM}")
    shutil.rmtree(path, ignore_errors=True)
    yield path
    kill_daemon_of(path / "sock")
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kfct-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(("argv", "stdin"), VICTIM_COMMANDS, ids=["kfctl-add", "e4crypt-add_key"])
def test_fake_daemon_at_the_fallback_path_is_refused(
    fallback_dir: Path, argv: list[str], stdin: bytes
) -> None:
    # the attacker made the victim's guessable directory first
    fallback_dir.mkdir(mode=0o777)
    fallback_dir.chmod(0o777)
    os.chown(fallback_dir, ATTACKER, ATTACKER)
    with fake_daemon(fallback_dir / "sock") as fake:
        code, output = run_victim(argv, victim_env(), stdin)
        assert_refused(fake, code, output, str(fallback_dir), f"uid {ATTACKER}")
    assert not (fallback_dir / "sock.log").exists()


def test_autostart_never_writes_into_a_directory_someone_else_made(fallback_dir: Path) -> None:
    fallback_dir.mkdir(mode=0o777)
    fallback_dir.chmod(0o777)
    os.chown(fallback_dir, ATTACKER, ATTACKER)
    code, output = run_victim(users.kfctl_argv("show", "@s"), victim_env())
    assert code == 1, output
    assert "Traceback" not in output, output
    assert str(fallback_dir) in output and f"uid {ATTACKER}" in output, output
    assert sorted(os.listdir(fallback_dir)) == []  # no log, no socket, no lock


def test_own_directory_left_open_is_refused(fallback_dir: Path) -> None:
    # the victim's own directory, but mode 0777: the attacker put a socket in it
    fallback_dir.mkdir(mode=0o777)
    fallback_dir.chmod(0o777)
    os.chown(fallback_dir, VICTIM, VICTIM)
    with fake_daemon(fallback_dir / "sock") as fake:
        argv, stdin = VICTIM_COMMANDS[0]
        code, output = run_victim(argv, victim_env(), stdin)
        assert_refused(fake, code, output, str(fallback_dir), "0777")


def attackers_socket(scratch: Path) -> Path:
    """Where the attacker's fake daemon listens: a directory of its own."""
    attacker_dir = scratch / "attacker"
    attacker_dir.mkdir(mode=0o755)
    os.chown(attacker_dir, ATTACKER, ATTACKER)
    return attacker_dir / "sock"


def test_wrong_owner_socket_at_keyfence_socket_is_refused_before_a_byte(scratch: Path) -> None:
    sock = attackers_socket(scratch)
    with fake_daemon(sock) as fake:
        for argv, stdin in VICTIM_COMMANDS:
            code, output = run_victim(argv, victim_env(KEYFENCE_SOCKET=str(sock)), stdin)
            assert_refused(fake, code, output, str(sock), f"uid {ATTACKER}")
        # the client did connect: it was the peer check that refused
        assert fake.connections == len(VICTIM_COMMANDS)


def test_symlinked_runtime_dir_is_refused(scratch: Path) -> None:
    attacker_dir = scratch / "attacker"
    (attacker_dir / "keyfence").mkdir(parents=True)
    for path in (attacker_dir, attacker_dir / "keyfence"):
        path.chmod(0o755)
        os.chown(path, ATTACKER, ATTACKER)
    link = scratch / "run"
    link.symlink_to(attacker_dir)
    os.lchown(link, ATTACKER, ATTACKER)
    with fake_daemon(attacker_dir / "keyfence" / "sock") as fake:
        argv, stdin = VICTIM_COMMANDS[0]
        code, output = run_victim(argv, victim_env(XDG_RUNTIME_DIR=str(link)), stdin)
        assert_refused(fake, code, output, str(link), "symlink")


def test_runtime_dir_of_the_victim_but_a_symlink_is_refused(scratch: Path) -> None:
    # a symlink to a directory that is the victim's own and 0700: following
    # it would pass every check, but whoever owns the link can retarget it
    real = scratch / "real"
    real.mkdir(mode=0o700)
    os.chown(real, VICTIM, VICTIM)
    link = scratch / "run"
    link.symlink_to(real)
    try:
        code, output = run_victim(
            users.kfctl_argv("show", "@s"), victim_env(XDG_RUNTIME_DIR=str(link))
        )
        assert code == 1 and "symlink" in output and "Traceback" not in output, output
        assert os.listdir(real) == []
    finally:
        kill_daemon_of(real / "keyfence" / "sock")


def test_mistyped_keyfence_socket_does_not_autostart(scratch: Path) -> None:
    home = scratch / "victim"
    home.mkdir(mode=0o700)
    os.chown(home, VICTIM, VICTIM)
    mistyped = home / "sokc"
    try:
        code, output = run_victim(
            users.kfctl_argv("show", "@s"), victim_env(KEYFENCE_SOCKET=str(mistyped))
        )
        assert code == 1, output
        assert "Traceback" not in output, output
        assert str(mistyped) in output and "KEYFENCE_SOCKET" in output, output
        assert os.listdir(home) == []  # no daemon, no log, no lock
    finally:
        kill_daemon_of(mistyped)


def test_own_daemon_in_a_checked_directory_is_still_trusted(fallback_dir: Path) -> None:
    """The fix must not refuse the good case: autostart at the fallback
    path, then the same daemon again."""
    try:
        for _ in range(2):
            code, output = run_victim(
                users.kfctl_argv("add", "user", "kfct-good", "ok", "@u"), victim_env()
            )
            assert code == 0, output
        st = os.lstat(fallback_dir)
        assert st.st_uid == VICTIM and (st.st_mode & 0o777) == 0o700
    finally:
        kill_daemon_of(fallback_dir / "sock")


def test_system_socket_is_trusted_only_from_root(scratch: Path) -> None:
    """The system daemon's socket served by a non-root uid -- even the
    victim's own -- is not the system daemon."""
    run = scratch / "run"
    run.mkdir(mode=0o755)
    os.chown(run, VICTIM, VICTIM)
    sock = run / "sock"
    with fake_daemon(sock, uid=VICTIM) as fake:
        argv, stdin = VICTIM_COMMANDS[0]
        code, output = run_victim(argv, victim_env(KEYFENCE_SYSTEM_SOCKET=str(sock)), stdin)
        assert_refused(fake, code, output, str(sock), f"uid {VICTIM}", "not as root")
        assert fake.connections == 1


def _in_unmapped_namespace(argv: list[str], *options: str) -> list[str]:
    """``argv`` in a user namespace of its own that maps no uid (``unshare
    -U``): every outside uid, the victim's own included, shows as 65534
    (``options``: ``--map-current-user`` maps the victim's, not root)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is missing")
    probe = subprocess.run(
        users.as_uid(VICTIM, [unshare, "--user", "true"]), capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"this kernel refuses user namespaces to uid {VICTIM}")
    return [unshare, "--user", *options, *argv]


def test_another_users_socket_is_refused_in_an_unmapped_user_namespace(scratch: Path) -> None:
    """Inside ``unshare -U`` the attacker's server and the victim both show
    as uid 65534.  Before: the client took that for "the server is me" and
    sent the attacker its request, payload and all."""
    sock = attackers_socket(scratch)
    with fake_daemon(sock) as fake:
        for argv, stdin in VICTIM_COMMANDS:
            code, output = run_victim(
                _in_unmapped_namespace(argv), victim_env(KEYFENCE_SOCKET=str(sock)), stdin
            )
            assert_refused(fake, code, output, str(sock), "does not map your uid")


def test_the_system_daemon_is_refused_for_its_reason_in_a_users_namespace(
    scratch: Path,
) -> None:
    """In ``unshare -U --map-current-user`` root is not mapped: the system
    daemon shows as uid 65534, as any unmapped user does, and is refused.
    The refusal said "someone else may have put it there" (the s37
    sessions helper); it says why now."""
    run = scratch / "run"
    run.mkdir(mode=0o755)
    sock = run / "sock"
    with fake_daemon(sock, uid=0) as fake:
        argv, stdin = VICTIM_COMMANDS[0]
        code, output = run_victim(
            _in_unmapped_namespace(argv, "--map-current-user"),
            victim_env(KEYFENCE_SYSTEM_SOCKET=str(sock)),
            stdin,
        )
        assert_refused(fake, code, output, str(sock), "not mapped in this user namespace")
        assert "someone else may have put it there" not in output


def test_a_planted_fallback_directory_is_refused_in_an_unmapped_user_namespace() -> None:
    """Inside ``unshare -U`` the victim's fallback directory is the overflow
    uid's, ``/tmp/keyfence-65534``; the attacker's 0700 directory there
    shows as the victim's own (uid 65534 both)."""
    argv, stdin = VICTIM_COMMANDS[0]
    argv = _in_unmapped_namespace(argv)
    planted = Path("/tmp/keyfence-65534")
    if planted.exists():
        pytest.skip(f"{planted} exists (uid 65534's own?): not ours to replace")
    planted.mkdir(mode=0o700)
    try:
        os.chown(planted, ATTACKER, ATTACKER)
        with fake_daemon(planted / "sock") as fake:
            code, output = run_victim(argv, victim_env(), stdin)
            assert_refused(fake, code, output, str(planted), "does not map your uid")
    finally:
        kill_daemon_of(planted / "sock")
        shutil.rmtree(planted, ignore_errors=True)


def test_a_relative_runtime_dir_is_ignored(scratch: Path, fallback_dir: Path) -> None:
    """The XDG specification makes a relative $XDG_RUNTIME_DIR invalid;
    it was taken relative to the working directory: a daemon (and a
    socket directory) per directory the user ran kfctl from."""
    cwd = scratch / "cwd"
    (cwd / "rel").mkdir(parents=True)
    for path in (cwd, cwd / "rel"):
        os.chown(path, VICTIM, VICTIM)
    (cwd / "rel").chmod(0o700)
    try:
        done = subprocess.run(
            users.as_uid(VICTIM, users.kfctl_argv("id", "@us")),
            env=victim_env(XDG_RUNTIME_DIR="rel"),
            cwd=cwd,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert not (cwd / "rel" / "keyfence").exists()
        assert (fallback_dir / "sock").exists()
    finally:
        kill_daemon_of(cwd / "rel" / "keyfence" / "sock")


def test_a_daemon_does_not_serve_where_its_clients_refuse(scratch: Path) -> None:
    """`keyfence daemon` served in a per-user directory of mode 0755, which
    every client then refused; it refuses it now, with the clients' hint."""
    runtime = scratch / "runtime"
    (runtime / "keyfence").mkdir(parents=True)
    for path in (runtime, runtime / "keyfence"):
        os.chown(path, VICTIM, VICTIM)
    runtime.chmod(0o700)
    (runtime / "keyfence").chmod(0o755)
    try:
        code, output = run_victim(
            users.keyfence_argv("daemon", "--detach"), victim_env(XDG_RUNTIME_DIR=str(runtime))
        )
        assert code == 1, output
        assert "chmod 700" in output and "Traceback" not in output, output
        assert not (runtime / "keyfence" / "sock").exists()
    finally:
        kill_daemon_of(runtime / "keyfence" / "sock")
