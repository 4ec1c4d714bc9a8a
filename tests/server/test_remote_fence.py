"""A remote synchronous watcher's callback that removes the keys its own
fence holds gets EDEADLK at once, as a watcher inside the daemon does
(docs/notifications.md) -- on its own connection or any other.

Before (a helper's attack run, 2026-12-07): only watchers running inside
the daemon were recognised (a thread-local), so a client's callback that
revoked its key waited for the fence that waited for the callback: for
ever without timeouts, ETIMEDOUT with them, and nothing removed.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator

import pytest

from keyfence.client import Client, RemoteNotification
from keyfence.constants import KEY_SPEC_USER_KEYRING
from keyfence.testing.daemon import DaemonProcess, running_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as d:
        yield d


@pytest.mark.parametrize("connection", ["its-own", "another"])
def test_a_callback_revoking_its_fenced_key_gets_edeadlk(
    daemon: DaemonProcess, connection: str
) -> None:
    with (
        Client.connect(daemon.socket, autostart=False) as caller,
        Client.connect(daemon.socket, autostart=False) as watcher,
        Client.connect(daemon.socket, autostart=False) as side,
    ):
        key = caller.add_key("user", f"fenced-{connection}", b"v", KEY_SPEC_USER_KEYRING)
        inner: list[object] = []

        def callback(note: RemoteNotification) -> None:
            if note.phase != "before":
                return
            conn = watcher if connection == "its-own" else side
            start = time.monotonic()
            try:
                conn.revoke(key, timeout=5)
                inner.append("removed")
            except OSError as err:
                inner.append(err.errno)
            inner.append(time.monotonic() - start)

        watcher.watch(key, callback, sync=True, name="calls back")
        caller.revoke(key, timeout=30)  # goes on once the callback returns
        assert inner[0] == errno.EDEADLK, inner
        assert isinstance(inner[1], float) and inner[1] < 2, inner
        with pytest.raises(OSError) as gone:
            caller.read(key)
        assert gone.value.errno in (errno.EKEYREVOKED, errno.ENOKEY)
