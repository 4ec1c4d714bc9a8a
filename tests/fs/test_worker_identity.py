"""fs/worker_identity.py: the ids a root-started worker takes, checked in
real processes (root only for the change itself)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from keyfence.fs.worker_identity import CREDENTIALS_ENV, parse_credentials

TAKE = """
import os
from keyfence.fs.worker_identity import become_owner_from_environment, harden, _capabilities
try:
    took = become_owner_from_environment()
except (OSError, ValueError) as err:
    print("error", type(err).__name__, getattr(err, "errno", None))
    raise SystemExit
harden()  # as the worker's main does after it
import ctypes
dumpable = ctypes.CDLL("libc.so.6").prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
print(took, os.getresuid(), os.getresgid(), sorted(os.getgroups()), _capabilities(),
      os.environ.get("KEYFENCE_WORKER_CREDENTIALS"), dumpable)
"""


def _take(spec: str | None, *, prefix: list[str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != CREDENTIALS_ENV}
    if spec is not None:
        env[CREDENTIALS_ENV] = spec
    done = subprocess.run(
        [*(prefix or []), sys.executable, "-c", TAKE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("4620:4620:", (4620, 4620, [])),
        ("4620:100:4620,27,100", (4620, 100, [4620, 27, 100])),
        ("1:0:0", (1, 0, [0])),
    ],
)
def test_credentials_parse(spec: str, parsed: tuple[int, int, list[int]]) -> None:
    assert parse_credentials(spec) == parsed


@pytest.mark.parametrize(
    "spec",
    [
        "", "4620", "4620:4620", "4620:4620:1:2", "0:0:", "-1:4620:", "4620:-1:", "a:1:",
        "4620:4620:,", "4620:4620:1,,2", " 4620:4620:", "4620:4620:1 ", "4294967295:1:",
        "4620:4294967295:", "١٢:1:",
    ],
)  # fmt: skip
def test_anything_else_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_credentials(spec)


def test_no_variable_no_change() -> None:
    out = _take(None)
    assert out.startswith(f"False ({os.getuid()}, {os.getuid()}, {os.getuid()})"), out


@pytest.mark.skipif(os.geteuid() != 0, reason="taking other ids needs root")
def test_root_takes_every_id_and_keeps_no_capability() -> None:
    out = _take("4620:4621:4622,4621")
    assert out == ("True (4620, 4620, 4620) (4621, 4621, 4621) [4621, 4622] (0, 0) None 0"), out


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to another uid needs root")
def test_a_user_cannot_take_another_identity() -> None:
    prefix = ["setpriv", "--reuid", "4620", "--regid", "4620", "--clear-groups"]
    assert _take("4623:4623:", prefix=prefix) == "error PermissionError 1"
