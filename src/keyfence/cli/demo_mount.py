"""``keyfence demo``: the seed scenario on a real mount, with real processes.

A private daemon starts; a backing directory is mounted; a login session (a
new POSIX session, so a fresh ``@s``) adds an e4crypt key for
``home/<user>``, writes a small file and a large one that stays dirty, and
logs out with ``kfctl clear @s``, which returns only once the data is
encrypted on disk.  The directory is then locked.  A new session unlocks
it with the same passphrase and reads back exactly what was written.
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

PASSPHRASE = "correct horse battery staple\n"
SALT = "s:keyfence-demo"
BIG_MIB = 64


def run(*, user: str = "alice") -> int:
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
            )

        daemon = subprocess.Popen(
            [sys.executable, "-m", "keyfence.cli.main", "daemon", "--socket", str(sock)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while not sock.exists():
                if daemon.poll() is not None:
                    print("keyfence demo: the daemon did not start")
                    return 1
                time.sleep(0.01)
            step(f"daemon started (pid {daemon.pid})")
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
            # one login session from key to logout (its processes share @s)
            login = sh(
                f"""
                keyfence e4crypt add_key -S {SALT} {home}
                echo test > {home}/my_file
                cp {source} {home}/big_file
                t0=$(date +%s%N)
                kfctl clear @s
                t1=$(date +%s%N)
                echo "clear-ms $(( (t1 - t0) / 1000000 ))"
                """,
                stdin=PASSPHRASE,
            )
            if login.returncode:
                print(login.stderr)
                return 1
            lines = login.stdout.strip().splitlines()
            step(f"login session: {lines[0]} for {home}")
            step(f"wrote my_file and big_file ({BIG_MIB} MiB) through the mount")
            clear_ms = lines[-1].split()[-1]
            step(f"logout: kfctl clear @s returned after {clear_ms} ms, data encrypted on disk")
            names = sorted(os.listdir(home))
            step(f"locked: {home} now lists {names}")
            try:
                (home / "my_file").read_bytes()
                step("my_file is still readable: NOT LOCKED")
                return 1
            except OSError as err:
                step(f"my_file: {err.strerror}")
            again = sh(
                f"""
                keyfence unlock -S {SALT} {home}
                cat {home}/my_file
                sha256sum {home}/big_file
                """,
                stdin=PASSPHRASE,
            )
            ok = again.returncode == 0 and "test\n" in again.stdout and digest in again.stdout
            step("new session: unlocked with the same passphrase")
            small_ok, big_ok = "test" in again.stdout, digest in again.stdout
            step(f"my_file reads 'test': {small_ok}; big_file intact: {big_ok}")
            step("no data lost" if ok else "DATA LOST")
            return 0 if ok else 1
        finally:
            sh(f"keyfence umount {mnt} || fusermount3 -uz {mnt} || true")
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
