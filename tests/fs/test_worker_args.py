"""The mount worker's command line (``python -m keyfence.fs.worker``): bad
values are usage errors, a worker started by hand says why it cannot run;
never a traceback.  (The daemon checks mount options with the same parsers,
keyfence/option_values.py: tests/security/test_mount_requests.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_worker(
    tmp_path: Path, *args: str, fd: str | None = None
) -> subprocess.CompletedProcess[str]:
    # a backing directory that does not exist: nothing is ever mounted here
    env = {k: v for k, v in os.environ.items() if k != "KEYFENCE_WORKER_FD"}
    if fd is not None:
        env["KEYFENCE_WORKER_FD"] = fd
    return subprocess.run(
        [sys.executable, "-m", "keyfence.fs.worker", str(tmp_path / "none"), str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        # each of these but "lots", "0" and "2M" was a traceback or taken before
        ("--dirty-limit", "1e999", "not a size: '1e999'"),
        ("--dirty-limit", "lots", "not a size: 'lots'"),
        ("--dirty-limit", "0", "not a positive size: '0'"),
        ("--dirty-limit", "4095", "below one page (4096 bytes): '4095'"),
        ("--write-through", "inf", "not a size: 'inf'"),
        ("--write-through", "2M", "at most 1M: '2M'"),
        ("--dirty-expire", "nan", "out of range (0 to one year): 'nan'"),
        ("--dirty-expire", "-1", "out of range (0 to one year): '-1'"),
        ("--attr-timeout", "inf", "out of range (0 to one year): 'inf'"),
        ("--readahead-kb", "-5", "out of range (0 to 1048576): '-5'"),
        ("--max-tasks", "0", "out of range (1 to 1024): '0'"),
        ("--spin-us", "5000", "out of range (0 to 1000): '5000'"),
        ("--spin-us", "x", "not a number of microseconds: 'x'"),
    ],
)
def test_a_bad_value_is_a_usage_error(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    done = run_worker(tmp_path, option, value)
    assert done.returncode == 2, done.stderr
    assert f"argument {option}: {message}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("fd", "message"),
    [
        (None, "no private channel to the daemon (run by it)"),
        ("abc", "KEYFENCE_WORKER_FD is not a descriptor: 'abc'"),
        ("987", "Bad file descriptor"),
    ],
)
def test_a_worker_started_by_hand_says_why_it_cannot_run(
    tmp_path: Path, fd: str | None, message: str
) -> None:
    done = run_worker(tmp_path, fd=fd)
    assert done.returncode == 1, done.stderr
    assert "python -m keyfence.fs.worker: " in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr
