"""The main job, run as a user runs it: a real ``keyfence demo`` process."""

from __future__ import annotations

import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from keyfence.testing.login import why_no_login

REPO = Path(__file__).resolve().parents[2]


def run_demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyfence.cli.main", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def login_demo(*args: str, user: str, uid: int) -> subprocess.CompletedProcess[str]:
    """``keyfence demo --login`` with an account of this test's own range."""
    why = why_no_login()
    if why:
        pytest.skip(why)
    done = run_demo("--login", *args, "--login-user", user, "--login-uid", str(uid), timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    with pytest.raises(KeyError):
        pwd.getpwnam(user)  # the demo's account is gone afterwards
    return done


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
    no daemon flag, no other caller in the package but the login demo's
    set-up (also bench/login_logout.py's comparison), which reaches it
    through the mount demo's start_daemon."""
    from keyfence.cli.main import main

    with pytest.raises(SystemExit):
        main(["daemon", "--without-fence"])
    package = REPO / "src" / "keyfence"
    users = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "fenced=False" in path.read_text() or "serve_without_fence" in path.read_text()
    )
    assert users == ["cli/demo_login.py", "cli/demo_mount.py"]


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


@pytest.mark.slow
def test_login_demo_through_pam_loses_nothing_at_logout() -> None:
    done = login_demo(user="login3", uid=61303)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "auth + open_session: login3: " in out and "unlocked (key" in out
    assert "logout: close_session cleared @s in" in out and "(25,165,824 bytes were dirty)" in out
    assert "incompletely locked, still open: home/login3/big_file" in out
    assert "between the logins: Unlocked: Partially (incompletely locked)" in out
    assert "'my_file'" not in out and "'big_file'" not in out  # names were ciphertext
    assert "my_file reads 'test': True; big_file intact: True (25,165,824 of" in out
    assert "no data lost" in out and "dropped" not in out
    assert not [p for p in Path("/etc/pam.d").iterdir() if p.name.startswith("keyfence-demo-")]


@pytest.mark.slow
def test_login_demo_without_the_fence_shows_the_loss() -> None:
    done = login_demo("--without-fence", user="login4", uid=61304)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "WITHOUT THE FENCE" in out and "the key was wiped at once" in out
    assert "dropped home/login4/big_file: 25,165,824 bytes" in out
    assert "my_file reads 'test': True; big_file intact: False" in out
    assert "DATA LOST without the fence" in out and "no data lost" not in out
