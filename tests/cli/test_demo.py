"""The main job, run as a user runs it: a real ``keyfence demo`` process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
    assert "still open at logout (incompletely locked): home/alice/big_file" in done.stdout
    assert "my_file reads 'test': True; big_file intact: True" in done.stdout
    assert "(25,165,824 of 25,165,824 bytes)" in done.stdout
    assert "no data lost" in done.stdout
    assert "dropped" not in done.stdout and "WITHOUT" not in done.stdout


def test_demo_without_the_fence_shows_the_loss_it_prevents() -> None:
    done = run_demo("--without-fence")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "daemon started WITHOUT THE FENCE" in done.stdout
    # the key was wiped at once; the mount dropped the dirty pages and said so
    assert "the key was wiped at once" in done.stdout
    assert "dropped home/alice/big_file: 25,165,824 bytes" in done.stdout
    assert "my_file: No such file or directory" in done.stdout  # locked all the same
    # my_file was closed (a close writes back) and survives; big_file does not
    assert "my_file reads 'test': True; big_file intact: False" in done.stdout
    assert "DATA LOST without the fence: 25,165,824 bytes of big_file are missing" in done.stdout
    assert "the mount reported 25,165,824 bytes dropped" in done.stdout
    assert "no data lost" not in done.stdout


def test_the_fence_is_off_nowhere_else() -> None:
    """The switch is a KeyService keyword used by the demo's daemon alone:
    no daemon flag, no other caller in the package but the real-login
    set-up of keyfence.testing (bench/login_logout.py's comparison), which
    reaches it through the demo's start_daemon."""
    from keyfence.cli.main import main

    with pytest.raises(SystemExit):
        main(["daemon", "--without-fence"])
    package = REPO / "src" / "keyfence"
    users = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "fenced=False" in path.read_text() or "serve_without_fence" in path.read_text()
    )
    assert users == ["cli/demo_mount.py", "testing/login.py"]


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
