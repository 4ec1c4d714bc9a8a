"""Every test: never the machine's own daemon.

A test that forgets ``KEYFENCE_SOCKET`` would otherwise reach (or, as root,
autostart) the system daemon at /run/keyfence/sock; this points the system
socket into a private temporary directory for the whole run, children and
other uids' processes included (they inherit the environment).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_PRIVATE = tempfile.mkdtemp(prefix="keyfence-tests-system-")


def pytest_configure(config: pytest.Config) -> None:
    os.chmod(_PRIVATE, 0o755)  # other uids' clients look here too
    os.environ["KEYFENCE_SYSTEM_SOCKET"] = os.path.join(_PRIVATE, "sock")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_PRIVATE, ignore_errors=True)
