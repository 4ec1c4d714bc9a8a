from __future__ import annotations

from collections.abc import Iterator

import pytest

from keyfence.testing.daemon import DaemonProcess, running_daemon


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon("--system") as d:
        yield d
