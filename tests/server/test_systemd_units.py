"""The shipped systemd units are valid (`systemd-analyze verify`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import keyfence

UNITS = Path(keyfence.__file__).parent / "data" / "systemd"
_VERIFY = shutil.which("systemd-analyze")


def _installed(tmp: Path, directory: Path) -> list[str]:
    """The units of ``directory`` copied to ``tmp`` with ExecStart pointing
    at this venv's keyfence (verify checks the binary exists)."""
    keyfence_bin = shutil.which("keyfence") or str(Path(sys.executable).parent / "keyfence")
    paths = []
    for unit in sorted(directory.glob("keyfence.*")):
        target = tmp / unit.name
        target.write_text(unit.read_text().replace("/usr/bin/keyfence", keyfence_bin))
        paths.append(str(target))
    return paths


@pytest.mark.skipif(_VERIFY is None, reason="systemd-analyze is missing (apt-get install systemd)")
@pytest.mark.parametrize("scope", ["system", "user"])
def test_units_verify(tmp_path: Path, scope: str) -> None:
    directory = UNITS if scope == "system" else UNITS / "user"
    units = _installed(tmp_path, directory)
    assert len(units) == 2
    argv = [str(_VERIFY), "verify", "--man=no", *(["--user"] if scope == "user" else []), *units]
    # %t (the user's runtime directory) must resolve for a user unit
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_units_are_package_data() -> None:
    names = {p.name for p in UNITS.rglob("keyfence.*")}
    assert names == {"keyfence.service", "keyfence.socket"}
    assert (UNITS / "user" / "keyfence.service").exists()


_FAMILY = re.compile(r"socket(?:pair)?\(\s*(?:_?socket\.)?(AF_[A-Z0-9]+)")


@pytest.mark.parametrize("scope", ["system", "user"])
def test_units_let_the_daemon_open_every_socket_family_it_uses(scope: str) -> None:
    """RestrictAddressFamilies makes socket(2) of any other family fail
    (EAFNOSUPPORT), and the daemon then quietly does without: the process
    events connector (AF_NETLINK, server/sessions.py) was shut out by the
    system unit's ``AF_UNIX`` alone, so under systemd no fork event was
    read and @s fell back to the walk of /proc (docs/keys.md)."""
    used = set()
    for path in (UNITS.parent.parent).rglob("*.py"):
        if "testing" in path.parts:
            continue
        used.update(_FAMILY.findall(path.read_text()))
    assert {"AF_UNIX", "AF_NETLINK"} <= used  # the scan still finds them
    unit = (UNITS if scope == "system" else UNITS / "user") / "keyfence.service"
    lines = [x for x in unit.read_text().splitlines() if x.startswith("RestrictAddressFamilies=")]
    allowed = {f for x in lines for f in x.split("=", 1)[1].split()}
    assert not lines or used <= allowed, (unit, used - allowed)
