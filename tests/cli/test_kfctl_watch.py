"""keyctl 1.6's watch queues: watch_session, watch_add, watch_rm, watch_sync.

This kernel has no watch queues (CONFIG_WATCH_QUEUE), so Debian's keyctl
cannot be the oracle here; the expected logs follow keyutils 1.6.3's
keyctl_watch.c formats: ``<key> inst|upd|clr|rev|inv|attr``, ``<key>
link|unlk <key>`` in the notification log, ``<key> gc`` in the gc log,
``Monitoring terminated`` in both when the program ends, the program's
exit status as watch_session's.  Scripts are written the way keyutils'
own test suite uses them (tests/prepare.inc.sh, toolbox.inc.sh
check_notify): watch_add, act, watch_sync, read the last log line.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_kfctl import Daemon, normalize


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    (tmp_path / "d").mkdir()
    running = Daemon(tmp_path / "d")
    yield running
    running.stop()


def watch_session(daemon: Daemon, tmp: Path, script: str, *options: str) -> tuple[str, str, str]:
    """(stderr+stdout with the status, notify log, gc log), normalized
    together so a serial has one name across the three."""
    notify, gc = tmp / "notify.log", tmp / "gc.log"
    notify.write_text("starting\n")
    gc.write_text("starting\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyfence.cli.kfctl",
            "watch_session",
            *options,
            str(notify),
            str(gc),
            "9",
            "sh",
            "-c",
            script,
        ],
        env=daemon.env(),
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    marker = "\n=====\n"
    text = normalize(
        done.stdout
        + f"exit={done.returncode}"
        + marker
        + notify.read_text()
        + marker
        + gc.read_text()
    )
    out, notes, gcs = text.split(marker)
    return out, notes, gcs


def test_session_watch_add_rm_and_sync(daemon: Daemon, tmp_path: Path) -> None:
    script = """
        echo "fd=$KEYCTL_WATCH_FD"
        k=$(keyctl add user a b @s)
        keyctl watch_add $KEYCTL_WATCH_FD $k
        keyctl update $k c
        keyctl watch_sync $KEYCTL_WATCH_FD
        keyctl setperm $k 0x3f3f0000
        keyctl watch_sync $KEYCTL_WATCH_FD
        r=$(keyctl newring ring @s)
        keyctl watch_add $KEYCTL_WATCH_FD $r
        keyctl link $k $r
        keyctl unlink $k $r
        keyctl watch_sync $KEYCTL_WATCH_FD
        keyctl watch_rm $KEYCTL_WATCH_FD $r
        keyctl link $k $r
        keyctl watch_sync $KEYCTL_WATCH_FD
        keyctl revoke $k
        keyctl watch_sync $KEYCTL_WATCH_FD
        exit 7
    """
    out, notes, gcs = watch_session(daemon, tmp_path, script, "-n", "watched")
    assert out == "Joined session keyring: <K1>\nfd=9\nexit=7"
    assert notes.splitlines() == [
        "starting",
        "<K1> link <K2>",
        "<K2> upd",
        "<K2> attr",
        "<K1> link <K3>",
        "<K3> link <K2>",
        "<K3> unlk <K2>",
        "<K2> rev",
        "Monitoring terminated",
    ]
    assert gcs == "starting\nMonitoring terminated\n"


def test_clear_invalidate_and_gc(daemon: Daemon, tmp_path: Path) -> None:
    script = """
        r=$(keyctl newring ring @s)
        k=$(keyctl add user a b $r)
        keyctl watch_add $KEYCTL_WATCH_FD $r
        keyctl watch_add $KEYCTL_WATCH_FD $k
        keyctl clear $r
        keyctl watch_sync $KEYCTL_WATCH_FD
        keyctl invalidate $r
        keyctl watch_sync $KEYCTL_WATCH_FD
    """
    out, notes, gcs = watch_session(daemon, tmp_path, script)
    assert out == "Joined session keyring: <K1>\nexit=0"
    lines = notes.splitlines()
    assert lines[:3] == ["starting", "<K1> link <K2>", "<K2> clr"], notes
    # keyfence unlinks an invalidated keyring at once; the kernel's gc later
    assert sorted(lines[3:5]) == ["<K1> unlk <K2>", "<K2> inv"], notes
    assert lines[5:] == ["Monitoring terminated"]
    # the key lost its last link (destroyed), then the keyring
    assert gcs.splitlines() == ["starting", "<K3> gc", "<K2> gc", "Monitoring terminated"]


def test_displacement_tells_only_the_link(daemon: Daemon, tmp_path: Path) -> None:
    """A move, link or add that displaces a key of the same type and
    description posts only ``link`` to the keyring (the kernel's
    ``__key_link`` replaces the slot and tells nothing of the key it put
    out), as keyutils' own keyctl/move/valid expects."""
    script = """
        r=$(keyctl newring wibble @s)
        keyctl watch_add $KEYCTL_WATCH_FD $r
        k=$(keyctl add user lizard gizzard $r)
        t=$(keyctl add user lizard gizzard @s)
        keyctl move -f $k $r @s
        keyctl watch_sync $KEYCTL_WATCH_FD
        k3=$(keyctl add user lizard other $r)
        keyctl link $k3 @s
        keyctl watch_sync $KEYCTL_WATCH_FD
        o=$(keyctl newring ring2 @s)
        n=$(keyctl newring ring2 @s)
        keyctl watch_sync $KEYCTL_WATCH_FD
    """
    out, notes, _gcs = watch_session(daemon, tmp_path, script)
    assert out == "Joined session keyring: <K1>\nexit=0"
    assert notes.splitlines() == [
        "starting",
        "<K1> link <K2>",  # newring wibble
        "<K2> link <K3>",  # add lizard to wibble
        "<K1> link <K4>",  # add lizard to @s
        "<K2> unlk <K3>",  # move -f: out of wibble ...
        "<K1> link <K3>",  # ... into @s, displacing K4 without a word
        "<K2> link <K5>",
        "<K1> link <K5>",  # link displacing K3
        "<K1> link <K6>",  # newring ring2
        "<K1> link <K7>",  # newring ring2 again, displacing K6
        "Monitoring terminated",
    ], notes


def test_filters(daemon: Daemon, tmp_path: Path) -> None:
    script = """
        k=$(keyctl add user a b @s)
        keyctl watch_add $KEYCTL_WATCH_FD $k
        keyctl update $k c
        keyctl revoke $k
        keyctl watch_sync $KEYCTL_WATCH_FD
    """
    _, notes, _ = watch_session(daemon, tmp_path, script, "-fr")
    assert notes.splitlines() == ["starting", "<K2> rev", "Monitoring terminated"]


def test_errors(daemon: Daemon, tmp_path: Path) -> None:
    script = """
        keyctl watch_add 2 @s; echo rc=$?
        keyctl watch_add 8 @s; echo rc=$?
        keyctl watch_add $KEYCTL_WATCH_FD 12345; echo rc=$?
        keyctl watch_rm $KEYCTL_WATCH_FD @u; echo rc=$?
        keyctl watch_sync 8; echo rc=$?
    """
    out, _, _ = watch_session(daemon, tmp_path, script)
    assert out.splitlines() == [
        "Joined session keyring: <K1>",
        "keyctl_watch_key: Bad file descriptor",
        "rc=1",
        "keyctl_watch_key: Bad file descriptor",
        "rc=1",
        "keyctl_watch_key: Required key not available",
        "rc=1",
        "keyctl_watch_key: Invalid slot",
        "rc=1",
        "ioctl(PIPE_IOC_SYNC): Bad file descriptor",
        "rc=1",
        "exit=0",
    ]
    bad_fd = subprocess.run(
        [sys.executable, "-m", "keyfence.cli.kfctl", "watch_session", "a", "b", "10", "true"],
        env=daemon.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (bad_fd.returncode, bad_fd.stderr) == (2, "The target fd must be between 3 and 9\n")
