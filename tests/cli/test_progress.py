"""One progress display (cli/progress.py) for kfctl removals, ``keyfence
lock`` and ``keyfence umount``: a live line on a terminal (captured through
a real pty: the command's stderr is its slave end), erased when done; plain
lines at most once a second in a pipe.  The operations are made long for
real: a synchronous key user holding a removal (kfctl), writes to the
backing device throttled by the block layer (lock, umount)."""

from __future__ import annotations

import fcntl
import io
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from keyfence.cli.progress import ERASE, ProgressDisplay, bar, progress_text
from keyfence.client import RemovalStatus
from tests.cli.test_kfctl import BlockingWatcher, Daemon, _client
from tests.cli.test_kfctl import daemon as daemon  # the fixture
from tests.fs.test_faults import (
    Daemon as FaultsDaemon,
)
from tests.fs.test_faults import (
    Terminal,
    add_key,
    loop_ext4,
    mount,
    session,
    start_writer,
    throttled,
    unlock,
    unmount_quietly,
)
from tests.fs.test_faults import daemon as faults_daemon  # noqa: F401 (fixture)
from tests.fs.test_faults import pytestmark as needs_fuse

PLAIN = re.compile(r"^(\S+ \S+): waiting (\d+\.\d)s for (.*)$")


def snapshot(left: int | None, elapsed: float, key: int = 7) -> RemovalStatus:
    pending = [{"watcher": "fs /m", "key": key, "remaining_bytes": left, "note": "flushing"}]
    return RemovalStatus({"op": "clear", "elapsed": elapsed, "pending": pending})


def test_plain_lines_once_a_second_and_none_for_a_quick_operation() -> None:
    now = [100.0]
    out = io.StringIO()
    progress = ProgressDisplay("kfctl", "clear", out, live=False, clock=lambda: now[0])
    for step in range(25):  # 2.5 s of snapshots every 0.1 s
        now[0] = 100.0 + step / 10
        progress(snapshot((25 - step) << 20, step / 10))
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # at 1.0 s and 2.0 s; nothing erased, no CR
    assert lines[0].startswith("kfctl clear: waiting 1.0s for 1 key user, 15.0 MiB left")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    quick = io.StringIO()
    with ProgressDisplay("kfctl", "clear", quick, live=False, clock=lambda: 0.0) as p:
        p(snapshot(1 << 20, 0.01))
    assert quick.getvalue() == ""


def test_names_and_notes_from_other_processes_reach_the_terminal_printable() -> None:
    """A watcher's name and note come from another process, maybe another
    user's: an escape sequence in them is shown as ``?``, never sent to the
    terminal (session 26's red-team pass, finding 3b; checked failing
    before: the ESC reached the line)."""
    pending = [{"watcher": "\x1b[2Jmount", "key": 7, "remaining_bytes": 1, "note": "\x1b]0;x\x07"}]
    text = progress_text("kfctl", "clear", RemovalStatus({"elapsed": 1.0, "pending": pending}))
    assert "\x1b" not in text and "\x07" not in text
    assert "?[2Jmount (key 7" in text and "?]0;x?" in text


def test_a_live_line_with_a_bar_erased_when_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # StringIO has no size: shutil's fallback
    now = [0.0]
    out = io.StringIO()
    with ProgressDisplay("keyfence", "lock", out, live=True, clock=lambda: now[0]) as progress:
        progress(snapshot(4 << 20, 0.0))
        now[0] = 0.05
        progress(snapshot(3 << 20, 0.05))  # within 0.1 s of the last draw: skipped
        now[0] = 0.5
        progress(snapshot(1 << 20, 0.5))
    drawn = out.getvalue().split(ERASE)
    assert drawn[0] == "" and drawn[-1] == ""  # every draw starts by erasing; erased at the end
    assert drawn[1:-1] == [
        f"{bar(0.0)} keyfence lock: waiting 0.0s for 1 key user, 4.0 MiB left: "
        "fs /m (key 7, 4.0 MiB left, flushing)",
        f"{bar(0.75)} keyfence lock: waiting 0.5s for 1 key user, 1.0 MiB left: "
        "fs /m (key 7, 1.0 MiB left, flushing)",
    ]
    assert bar(0.75) == "[" + "#" * 7 + "-" * 3 + "]  75%"


def test_a_mounts_own_write_back_is_named_not_counted() -> None:
    text = progress_text("keyfence", "umount", snapshot(60 << 20, 2.0, key=0))
    assert text == "keyfence umount: waiting 2.0s for fs /m: 60.0 MiB left (flushing)"


def test_kfctl_in_a_pipe_prints_a_plain_line_a_second(daemon: Daemon) -> None:
    client = _client(daemon)
    ring_id = client.add_key("keyring", "fenced", None, -4)
    key = client.add_key("user", "secret", b"x", ring_id)
    watcher = BlockingWatcher(client, key)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "keyfence.cli.kfctl", "clear", str(ring_id)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=daemon.env(),
            text=True,
        )
        assert watcher.called.wait(30)
        # the watcher holds the clear until two lines have come (a line a
        # second: a fixed 2.6 s left a busy machine little to spare)
        stderr = process.stderr
        assert stderr is not None
        read: list[str] = []
        reader = threading.Thread(target=lambda: read.extend(stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while len(read) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.release.set()
    assert process.stdout is not None
    out = process.stdout.read()  # stderr is the reader's: not communicate()
    process.wait(30)
    reader.join(30)
    process.stdout.close()
    stderr.close()
    client.close()
    err = "".join(read)
    assert process.returncode == 0 and out == ""
    lines = err.splitlines()
    assert len(lines) >= 2, err
    for line in lines:
        assert PLAIN.match(line), line
        assert "1 key user, 3.0 MiB left: testfs /mnt/x (key" in line
    assert "\r" not in err and "\x1b" not in err


# ------------------------------------------- lock and umount, a slow disk


def lines_in(text: str) -> list[str]:
    return [line for line in text.replace(ERASE, "\n").splitlines() if "waiting" in line]


def test_lock_and_umount_draw_progress_on_a_terminal_and_print_it_in_a_pipe(
    faults_daemon: FaultsDaemon,  # noqa: F811
    tmp_path: Path,
) -> None:
    """16 MiB dirty in the worker, the backing device written at 4 MiB/s:
    ``keyfence lock`` waits seconds for the write-back, ``keyfence umount``
    for the backing store's sync; each shows it, through a pty and a pipe."""
    assert needs_fuse is not None
    fs = tmp_path / "fs"
    with loop_ext4(tmp_path / "fs.img", 256 << 20, fs) as device:
        backing, mnt = fs / "backing", tmp_path / "mnt"
        backing.mkdir()
        mnt.mkdir()
        mount(faults_daemon, backing, mnt, "--dirty-limit=1G", "--dirty-expire=600")
        tty = Terminal()
        # a pty starts 0x0 (the display then assumes 80 columns): make it wide
        fcntl.ioctl(tty.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
        try:
            with session(faults_daemon) as s, throttled(device, 4 << 20):
                home = mnt / "home"
                home.mkdir()
                add_key(s, home)
                shown = {}
                for where, target in (("tty", tty.name), ("pipe", str(tmp_path / "lock.err"))):
                    unlock(s, home)
                    start_writer(s, home, tmp_path, where, {f"dirty-{where}": 16 << 20})
                    # the writer keeps its file open: the lock is incomplete (exit 1)
                    code, out = s.do(f"keyfence lock {home} 2>{target}")
                    assert code == 1, out
                    shown[where] = tty.drain() if where == "tty" else Path(target).read_text()
                    s.ok("kill $!; wait $! || true")  # the writer: its file closes
                # a closed file is written back (to the backing page cache) on
                # close; the umount then waits for the throttled sync
                unlock(s, home)
                s.ok(f"head -c {16 << 20} /dev/urandom > {home}/closed")
                tty.seen = ""
                s.ok(f"keyfence umount {mnt} 2>{tty.name}")
                shown["umount tty"] = tty.drain()
            for where, text in shown.items():
                print(f"--- {where}\n{text!r}")
            live = lines_in(shown["tty"])
            assert len(live) >= 2, shown["tty"]
            assert all("keyfence lock: waiting" in line for line in live)
            # where the wait is spent (the worker's write-back, whose bytes
            # left draw the bar, or the backing store's throttled sync, at
            # "0 B left") depends on the machine's load: any line that
            # counts bytes down carries the bar
            counting = [line for line in live if "MiB left" in line]
            assert all(line.startswith("[") for line in counting), live
            # erased before the error (files still open) is printed
            assert shown["tty"].split("Error: Directory")[0].endswith(ERASE), shown["tty"]
            plain = shown["pipe"].splitlines()
            waits = [line for line in plain if line.startswith("keyfence lock: waiting")]
            assert len(waits) >= 2 and "\r" not in shown["pipe"], shown["pipe"]
            assert "incompletely locked" in plain[-3], plain
            # the kernel may have written the closed file back before the
            # umount asks (load-dependent): lines only when it waited
            umount = lines_in(shown["umount tty"])
            if umount:
                assert "keyfence umount: waiting" in umount[-1], shown["umount tty"]
                assert f"mount worker {mnt}" in umount[-1]
                assert shown["umount tty"].endswith(ERASE)
        finally:
            unmount_quietly(mnt)
            tty.close()
