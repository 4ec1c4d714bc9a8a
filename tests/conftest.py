"""Every test: never the machine's own daemon, and no Hypothesis deadline.

A test that forgets ``KEYFENCE_SOCKET`` would otherwise reach (or, as root,
autostart) the system daemon at /run/keyfence/sock; this points the system
socket into a private temporary directory for the whole run, children and
other uids' processes included (they inherit the environment).  kfctl's
warm server socket goes there too (a call without KEYFENCE_NO_AUTOSTART
starts one), and any warm server started there is stopped at the end.

Hypothesis fails an example that takes longer than 200 ms by default: on a
busy CI machine a pure-Python codec's 70 KB example can, with no bug at
all.  Every property test here runs without that deadline (hangs are
caught by the tests' own timeouts and CI's).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("keyfence", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("keyfence")

_PRIVATE = tempfile.mkdtemp(prefix="keyfence-tests-system-")


def pytest_configure(config: pytest.Config) -> None:
    os.chmod(_PRIVATE, 0o755)  # other uids' clients look here too
    os.environ["KEYFENCE_SYSTEM_SOCKET"] = os.path.join(_PRIVATE, "sock")
    os.environ["KEYFENCE_KFCTL_SOCKET"] = os.path.join(_PRIVATE, "kfctl.sock")


def pytest_unconfigure(config: pytest.Config) -> None:
    from keyfence.testing.warm import stop_servers_at

    stop_servers_at(os.path.join(_PRIVATE, "kfctl.sock"))
    shutil.rmtree(_PRIVATE, ignore_errors=True)
