"""``keyfence demo``: the seed scenario on a real mount, with real processes.

A private daemon starts; a backing directory is mounted; a login session (a
new POSIX session, so a fresh ``@s``) adds an e4crypt key for
``home/<user>``, writes a small file and a large one that it keeps open (its
pages stay dirty in the mount), and logs out with ``kfctl clear @s``, which
returns only once the data is encrypted on disk.  The directory is then
locked.  A new session unlocks it with the same passphrase and reads back
exactly what was written.

``keyfence demo --without-fence`` replays it with a daemon whose key service
has the fence turned off (:func:`serve_without_fence`, the only place that
does so): the clear wipes the key at once, as the kernel does, the mount can
no longer encrypt the dirty pages and drops them, and the demo shows what
was lost next to the mount's own report of what it dropped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

PASSPHRASE = "correct horse battery staple\n"
SALT = "s:keyfence-demo"
BIG_MIB = 24
"""Below half the mount's dirty limit (64 MiB), so none of it is written
back before the logout: all of it is at stake."""
DROP_REPORT_SECONDS = 10.0


def serve_without_fence(path: str) -> int:
    """Run a daemon whose key service never waits for its keys' users.

    The one way to turn the fence off: a keyword of ``KeyService`` that no
    command line, protocol message or environment variable reaches, used
    only here, for ``keyfence demo --without-fence`` (and the test that
    proves the stress test can fail).  Reached by Python code alone
    (:func:`start_daemon`); serves until SIGTERM.
    """
    from keyfence.keys import KeyService
    from keyfence.server.daemon import run_daemon

    return run_daemon(path, service=KeyService(fenced=False))


def start_daemon(
    sock: Path,
    *,
    fenced: bool = True,
    env: dict[str, str] | None = None,
    log: IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """A daemon process serving ``sock`` in a session of its own.

    ``fenced=False`` runs :func:`serve_without_fence` instead of
    ``keyfence daemon``.  The caller waits for the socket and stops it
    (:func:`stop_daemon`).
    """
    if fenced:
        argv = [sys.executable, "-P", "-m", "keyfence.cli.main", "daemon", "--socket", str(sock)]
    else:
        code = (
            "import sys; from keyfence.cli.demo_mount import serve_without_fence; "
            "serve_without_fence(sys.argv[1])"
        )
        argv = [sys.executable, "-P", "-c", code, str(sock)]
    out: IO[bytes] | int = log if log is not None else subprocess.DEVNULL
    return subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
    )


def wait_for_socket(daemon: subprocess.Popen[bytes], sock: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(10)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def _mount_reports(sock: Path) -> list[dict[str, Any]]:
    from keyfence.client import Client

    with Client.connect(str(sock), autostart=False) as client:
        mounts: list[dict[str, Any]] = client.mounts()
    return mounts


def run(*, user: str = "alice", fenced: bool = True) -> int:
    """The scenario; 0 when it showed what it should (no loss with the
    fence; without it, a loss that the mount reported)."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        print("keyfence demo: FUSE is not available here; try keyfence demo --model")
        return 1
    start = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{(time.perf_counter() - start) * 1000:8.1f} ms] {text}", flush=True)

    bindir = str(Path(sys.executable).parent)
    with tempfile.TemporaryDirectory(prefix="keyfence-demo-") as tmp:
        root = Path(tmp)
        sock, backing, mnt = root / "sock", root / "backing", root / "mnt"
        backing.mkdir()
        mnt.mkdir()
        env = dict(
            os.environ,
            KEYFENCE_SOCKET=str(sock),
            KEYFENCE_NO_AUTOSTART="1",
            PATH=f"{bindir}:{os.environ.get('PATH', '')}",
        )

        def sh(script: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            """A command in a new POSIX session: a login of its own."""
            return subprocess.run(
                ["sh", "-ec", script],
                input=stdin,
                env=env,
                capture_output=True,
                text=True,
                start_new_session=True,
                check=False,
                timeout=120,
            )

        daemon = start_daemon(sock, fenced=fenced, env=env)
        try:
            if not wait_for_socket(daemon, sock):
                print("keyfence demo: the daemon did not start")
                return 1
            if fenced:
                step(f"daemon started (pid {daemon.pid})")
            else:
                step(
                    f"daemon started WITHOUT THE FENCE (pid {daemon.pid}): "
                    "a removal wipes the key at once, as the kernel does"
                )
            done = sh(f"keyfence mount {backing} {mnt}")
            if done.returncode:
                print(done.stderr)
                return 1
            step(f"mounted {backing} (ciphertext) at {mnt}")
            home = mnt / "home" / user
            home.mkdir(parents=True)
            big = os.urandom(BIG_MIB << 20)
            source = root / "big.src"
            source.write_bytes(big)
            digest = hashlib.sha256(big).hexdigest()
            logout, written = root / "logout", root / "written"
            # one login session from key to logout (its processes share @s);
            # an editor of the session keeps big_file open until the logout
            # ends, so its pages are still dirty in the mount when @s is
            # cleared (every close(2) writes a file back)
            login = subprocess.Popen(
                [
                    "sh",
                    "-ec",
                    f"""
                    kfctl new_session >/dev/null  # the login's @s, as pam_keyinit makes it
                    keyfence e4crypt add_key -S {SALT} {home}
                    echo test > {home}/my_file
                    {sys.executable} -c "$EDITOR" {source} {home}/big_file {written} {logout} &
                    while [ ! -e {written} ]; do kill -0 $! || exit 1; sleep 0.01; done
                    echo written
                    t0=$(date +%s%N)
                    kfctl clear @s
                    t1=$(date +%s%N)
                    echo "clear-ms $(( (t1 - t0) / 1000000 ))"
                    wait
                    """,
                ],
                env=dict(env, EDITOR=_EDITOR),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                assert login.stdin is not None and login.stdout is not None
                login.stdin.write(PASSPHRASE)
                login.stdin.close()
                added = login.stdout.readline().strip()
                if not added.startswith("Added key"):
                    login.wait(30)
                    print(added, login.stderr.read() if login.stderr else "")
                    return 1
                step(f"login session: {added} for {home}")
                if login.stdout.readline().strip() != "written":
                    login.wait(30)
                    print(login.stderr.read() if login.stderr else "")
                    return 1
                step(
                    f"wrote my_file (closed) and big_file ({BIG_MIB} MiB, still open: "
                    "its pages are dirty in the mount)"
                )
                cleared = login.stdout.readline().split()
                if not cleared or cleared[0] != "clear-ms":
                    login.wait(30)
                    print(login.stderr.read() if login.stderr else "")
                    return 1
                if fenced:
                    step(
                        f"logout: kfctl clear @s returned after {cleared[-1]} ms, "
                        "data encrypted on disk"
                    )
                else:
                    step(
                        f"logout: kfctl clear @s returned after {cleared[-1]} ms: "
                        "the key was wiped at once"
                    )
                dropped = wait_for_drops(sock) if not fenced else []
                for drop in dropped:
                    for name, nbytes in sorted(drop.get("files", {}).items()):
                        step(f"the mount could not encrypt it and dropped {name}: {nbytes:,} bytes")
                for m in _mount_reports(sock):
                    for name in m.get("busy_files") or ():  # keyfence status --json's
                        step(f"still open at logout (incompletely locked): {name}")
                names = sorted(os.listdir(home))
                step(f"locked: {home} now lists {names}")
                try:
                    (home / "my_file").read_bytes()
                    step("my_file is still readable: NOT LOCKED")
                    return 1
                except OSError as err:
                    step(f"my_file: {err.strerror}")
            finally:
                logout.touch()
                try:
                    login.wait(60)
                except subprocess.TimeoutExpired:
                    login.kill()
                    login.wait()
                for stream in (login.stdin, login.stdout, login.stderr):
                    if stream is not None:
                        stream.close()
            step("logout finished (big_file closed)")
            again = sh(
                f"""
                kfctl new_session >/dev/null
                keyfence unlock -S {SALT} {home}
                cat {home}/my_file
                stat -c 'size %s' {home}/big_file
                sha256sum {home}/big_file
                """,
                stdin=PASSPHRASE,
            )
            step("new session: unlocked with the same passphrase")
            small_ok, big_ok = "test" in again.stdout, digest in again.stdout
            size = next(
                (int(w.split()[1]) for w in again.stdout.splitlines() if w.startswith("size ")), 0
            )
            step(
                f"my_file reads 'test': {small_ok}; big_file intact: {big_ok} "
                f"({size:,} of {len(big):,} bytes{'' if big_ok else ', sha256 differs'})"
            )
            ok = again.returncode == 0 and small_ok and big_ok
            if ok:
                step("no data lost")
                return 0 if fenced else 1
            if fenced:
                step("DATA LOST")
                return 1
            reported = sum(sum(d.get("files", {}).values()) for d in dropped)
            step(
                f"DATA LOST without the fence: {len(big) - size:,} bytes of big_file are "
                f"missing; the mount reported {reported:,} bytes dropped"
            )
            return 0 if reported else 1
        finally:
            sh(f"keyfence umount {mnt} || fusermount3 -uz {mnt} || true")
            stop_daemon(daemon)


_EDITOR = """
import os, sys, time
source, target, written, logout = sys.argv[1:]
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
with open(source, "rb") as f:
    data = f.read()
view = memoryview(data)
while view:
    view = view[os.write(fd, view[: 1 << 20]) :]
open(written, "w").close()
for _ in range(1200):
    if os.path.exists(logout):
        break
    time.sleep(0.05)
try:
    os.close(fd)
except OSError as err:
    print(f"closing big_file: {err.strerror}", file=sys.stderr)
"""
"""The session's editor: writes big_file, keeps it open until the logout."""


def wait_for_drops(sock: Path) -> list[dict[str, Any]]:
    """The mount's reports of what it dropped (they follow the removal)."""
    deadline = time.monotonic() + DROP_REPORT_SECONDS
    while True:
        drops = [d for m in _mount_reports(sock) for d in m.get("dropped") or ()]
        if drops or time.monotonic() > deadline:
            return drops
        time.sleep(0.02)
