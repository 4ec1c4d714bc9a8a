"""The main job, run as a user runs it: a real ``keyfence demo`` process."""

from __future__ import annotations

import subprocess
import sys


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyfence.cli.main", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_on_a_real_mount_loses_nothing_at_logout() -> None:
    done = run_demo()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logout: kfctl clear @s returned" in done.stdout
    assert "my_file: No such file or directory" in done.stdout  # locked: names are ciphertext
    assert "my_file reads 'test': True; big_file intact: True" in done.stdout
    assert "no data lost" in done.stdout


def test_model_demo_data_survives_logout() -> None:
    done = run_demo("--model")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "key payload zeroed in memory: True" in done.stdout
    assert "my_file reads b'test\\n'; big_file intact: True" in done.stdout
    assert "no data lost" in done.stdout


def test_demo_emergency_reports_what_was_dropped() -> None:
    done = run_demo("--model", "--emergency")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dropped, never written: my_file: 5 bytes" in done.stdout
    assert "dropped, never written: big_file: 8,388,608 bytes" in done.stdout
