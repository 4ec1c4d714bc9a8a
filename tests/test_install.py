"""A fresh ``pip install`` of this checkout gives a working tool (issue 16).

As a Debian user would: ``/usr/bin/python3 -m venv V && V/bin/pip install
CHECKOUT`` (build isolation on, so pip fetches setuptools from PyPI; pip's
cache is allowed), then:

* ``keyfence --version`` and ``kfctl --version`` answer;
* the man pages are in ``V/share/man``, ``man -w kfctl`` finds them with
  ``V/bin`` on PATH (man-db derives the man path from PATH) and ``man -l``
  renders one;
* the completion scripts are where bash-completion (given ``V/share`` in
  ``XDG_DATA_DIRS``) and zsh (``V/share/zsh/site-functions`` in ``fpath``)
  load them, and they do load;
* the native sealer (setup.py's optional extension) was built;
* ``keyfence install-data --prefix P`` lays the same files and the systemd
  units under P, the units starting ``V/bin/keyfence``, and removes them.

The checkout is copied first (tracked and new files, as git sees them), so
the build never writes into the working tree.  Skips only when PyPI cannot
be reached (pip could not fetch setuptools or the dependencies).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import keyfence

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
PIP_TIMEOUT = 900.0

pytestmark = pytest.mark.slow


def pypi_unreachable() -> str | None:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/setuptools/", timeout=30) as answer:
            answer.read(1)
    except OSError as err:
        return f"PyPI cannot be reached ({err}): pip could not fetch setuptools"
    return None


def copy_checkout(to: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = to / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return to


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON}: not a Debian system Python")
    reason = pypi_unreachable()
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("install")
    checkout = copy_checkout(base / "checkout")
    where = base / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(where)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run(
        [str(where / "bin" / "pip"), "install", "-q", str(checkout)],
        capture_output=True,
        text=True,
        env=env,
        timeout=PIP_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield where


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def test_version(venv: Path) -> None:
    version = keyfence.__version__
    done = run([str(venv / "bin" / "keyfence"), "--version"])
    assert done.returncode == 0 and done.stdout == f"keyfence from keyfence-{version}\n"
    done = run([str(venv / "bin" / "kfctl"), "--version"])
    assert done.returncode == 0
    assert done.stdout.startswith(f"keyctl from keyutils-1.6.3 (Built keyfence-{version})")


def test_native_sealer_built(venv: Path, tmp_path: Path) -> None:
    """setup.py's optional extension is built where it can be (gcc and
    libssl-dev, scripts/setup.sh); without them the install still works."""
    if shutil.which("gcc") is None or not Path("/usr/include/openssl/evp.h").exists():
        reason = "no gcc or no OpenSSL headers (apt-get install gcc libssl-dev)"
        print(reason)
        pytest.skip(reason)
    code = "from keyfence.fs import sealer; print(sealer.describe(), sealer.NATIVE.__file__)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KEYFENCE"))}
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("native (OpenSSL "), done.stdout
    assert str(venv) in done.stdout  # the installed copy, not the checkout's


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
def test_man_pages(venv: Path) -> None:
    pages = {p.name for p in (venv / "share" / "man").glob("man?/*")}
    packaged = {p.name for p in (Path(keyfence.__file__).parent / "data" / "man").iterdir()}
    assert pages == packaged and {"kfctl.1", "keyfence.1", "keyfence-e4crypt.8"} <= pages
    env = dict(os.environ, PATH=f"{venv / 'bin'}:/usr/bin:/bin", MANPAGER="cat")
    env.pop("MANPATH", None)
    found = run(["man", "-w", "kfctl"], env=env)
    assert found.stdout.strip() == str(venv / "share" / "man" / "man1" / "kfctl.1"), found
    shown = run(["man", "-l", str(venv / "share" / "man" / "man1" / "kfctl.1")], env=env)
    assert shown.returncode == 0 and "keyctl(1) for the keyfence key service" in shown.stdout
    assert "warning" not in shown.stderr.lower(), shown.stderr
    section8 = run(["man", "-w", "8", "keyfence-e4crypt"], env=env)
    assert section8.stdout.strip().endswith("share/man/man8/keyfence-e4crypt.8")


BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


@pytest.mark.skipif(
    not BASH_COMPLETION.exists(), reason="bash-completion is not installed (apt-get install)"
)
def test_bash_completion_loads(venv: Path) -> None:
    for command in ("kfctl", "keyfence"):
        assert (venv / "share" / "bash-completion" / "completions" / command).is_file()
    env = dict(os.environ, XDG_DATA_DIRS=f"{venv / 'share'}:/usr/local/share:/usr/share")
    script = (
        f"source {BASH_COMPLETION}; for c in kfctl keyfence; do"
        " __load_completion $c && complete -p $c; done"
    )
    done = run(["bash", "--norc", "-c", script], env=env)
    assert "complete -F _kfctl kfctl" in done.stdout, done.stdout + done.stderr
    assert "keyfence" in done.stdout.splitlines()[-1], done.stdout


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_loads(venv: Path, tmp_path: Path) -> None:
    functions = venv / "share" / "zsh" / "site-functions"
    assert {p.name for p in functions.iterdir()} == {"_kfctl", "_keyfence"}
    script = (
        f"fpath=({functions} $fpath); autoload -Uz compinit;"
        f" compinit -u -d {tmp_path}/zcompdump; print $_comps[kfctl] $_comps[keyfence]"
    )
    done = run(["zsh", "-f", "-c", script])
    assert done.stdout.split() == ["_kfctl", "_keyfence"], done.stdout + done.stderr


def test_install_data_into_a_prefix(venv: Path, tmp_path: Path) -> None:
    keyfence_bin = venv / "bin" / "keyfence"
    done = run([str(keyfence_bin), "install-data", "--prefix", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    listed = {Path(line) for line in done.stdout.splitlines()}
    present = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert listed == present and len(present) == 15
    for scope in ("system", "user"):
        unit = (tmp_path / "lib" / "systemd" / scope / "keyfence.service").read_text()
        assert f"ExecStart={keyfence_bin} daemon" in unit and "/usr/bin/keyfence" not in unit
    assert (tmp_path / "share" / "man" / "man1" / "kfctl.1").is_file()
    gone = run([str(keyfence_bin), "install-data", "--prefix", str(tmp_path), "--uninstall"])
    assert gone.returncode == 0 and {Path(line) for line in gone.stdout.splitlines()} == listed
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
