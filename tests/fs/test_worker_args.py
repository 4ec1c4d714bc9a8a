"""The mount worker's command line (``python -m keyfence.fs.worker``):
bad values are usage errors, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--dirty-limit", "1e999", "not a size: '1e999'"),  # a traceback before sizes.py
        ("--dirty-limit", "lots", "not a size: 'lots'"),
        ("--dirty-limit", "0", "not a positive size: '0'"),
        ("--write-through", "inf", "not a size: 'inf'"),
        ("--write-through", "2M", "at most 1M: '2M'"),
    ],
)
def test_a_bad_size_is_a_usage_error(tmp_path: Path, option: str, value: str, message: str) -> None:
    (tmp_path / "backing").mkdir()
    (tmp_path / "mnt").mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyfence.fs.worker",
            str(tmp_path / "backing"),
            str(tmp_path / "mnt"),
            option,
            value,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"argument {option}: {message}" in done.stderr
    assert "Traceback" not in done.stderr
