"""Files closed clean stay open in the mount for the next open
(fs/pagecache.py, "idle" files), and go like open ones when their key goes,
without being reported as open, and at once when they are unlinked."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyfence.testing.mounting import Mount, fuse_available

from .test_mount import Enc

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    m = Mount(tmp_path)
    try:
        yield m
    finally:
        m.unmount_checked()


def backing_files_open(mount: Mount, directory: Path) -> set[str]:
    """Backing files inside ``directory`` the worker holds a descriptor of."""
    assert mount.proc is not None
    fds = Path(f"/proc/{mount.proc.pid}/fd")
    out = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            target = os.readlink(fds / fd)
            if os.path.dirname(target) == str(directory):
                out.add(os.path.basename(target))
    return out


def wait_idle(mount: Mount, count: int) -> dict[str, Any]:
    """The worker's idle files, once ``count`` of them are idle (or after
    30 s): close(2) sends FUSE's RELEASE in the background, so the worker
    may see it after close returns, and after a later request."""
    deadline = time.monotonic() + 30
    while True:
        idle: dict[str, Any] = mount.control("idle")
        if len(idle["inodes"]) == count or time.monotonic() > deadline:
            return idle
        time.sleep(0.01)


def test_a_file_opened_again_is_not_opened_on_the_backing_store(mount: Mount) -> None:
    enc = Enc(mount)
    (enc.dir / "notes").write_bytes(b"first")
    idle = wait_idle(mount, 1)
    assert len(idle["inodes"]) == 1
    assert len(backing_files_open(mount, enc.backing)) == 1
    for _ in range(3):
        assert (enc.dir / "notes").read_bytes() == b"first"
        wait_idle(mount, 1)
    (enc.dir / "notes").write_bytes(b"second")  # O_TRUNC through the idle file
    wait_idle(mount, 1)
    assert (enc.dir / "notes").read_bytes() == b"second"
    assert wait_idle(mount, 1)["reopens"] - idle["reopens"] == 5


def test_idle_files_go_with_their_key_and_are_not_reported_open(mount: Mount) -> None:
    enc = Enc(mount)
    for name in ("a", "b", "c"):
        (enc.dir / name).write_bytes(name.encode() * 5000)
    wait_idle(mount, 3)  # every RELEASE in: b and c closed before the lock
    held = open(enc.dir / "a", "rb")  # noqa: SIM115
    try:
        assert len(backing_files_open(mount, enc.backing)) == 3
        enc.lock()
        busy = mount.reports("busy")
        assert busy and busy[-1]["files"] == ["enc/a"]  # b and c were closed
        assert mount.control("idle")["inodes"] == []
        assert len(backing_files_open(mount, enc.backing)) == 1  # a's, open
    finally:
        held.close()
    enc.unlock()
    for name in ("a", "b", "c"):
        assert (enc.dir / name).read_bytes() == name.encode() * 5000


def test_an_unlinked_idle_file_is_closed_at_once(mount: Mount) -> None:
    enc = Enc(mount)
    (enc.dir / "gone").write_bytes(b"x" * 10000)
    (enc.dir / "kept").write_bytes(b"y")
    os.link(enc.dir / "kept", enc.dir / "kept2")
    wait_idle(mount, 2)
    assert len(backing_files_open(mount, enc.backing)) == 2
    os.unlink(enc.dir / "gone")
    os.unlink(enc.dir / "kept")  # another name is left: stays idle
    assert len(backing_files_open(mount, enc.backing)) == 1
    assert len(mount.control("idle")["inodes"]) == 1
    os.rename(enc.dir / "kept2", enc.dir / "renamed")
    assert (enc.dir / "renamed").read_bytes() == b"y"


def test_a_file_idle_with_a_read_only_descriptor_is_opened_afresh_to_write(
    mount: Mount,
) -> None:
    """The worker opens a backing file read-only where it cannot open it
    read-write (here: immutable, which holds for root too); once that
    file is idle and writable again, an open for writing must not write
    through the read-only descriptor."""
    enc = Enc(mount)
    (enc.dir / "f").write_bytes(b"one")
    enc.lock()  # closes the idle file
    enc.unlock()
    (name,) = backing_names(enc)
    backing = enc.backing / name
    subprocess.run(["chattr", "+i", str(backing)], check=True)
    try:
        assert (enc.dir / "f").read_bytes() == b"one"  # idle now, read-only
    finally:
        subprocess.run(["chattr", "-i", str(backing)], check=True)
    with open(enc.dir / "f", "ab") as f:
        f.write(b" two")
    assert (enc.dir / "f").read_bytes() == b"one two"
    (enc.dir / "f").write_bytes(b"three")  # O_TRUNC
    assert (enc.dir / "f").read_bytes() == b"three"


def backing_names(enc: Enc) -> list[str]:
    return [p.name for p in enc.backing.iterdir() if not p.name.startswith(".")]
