"""Threads that must not wait: the key service's calls from the daemon's loop.

The key service is synchronous: a lookup of a key under construction waits
for the construction to end (lookup_user_key's wait_for_key_construction),
as the kernel's caller does in its own process.  The daemon runs most
requests on its one event loop thread (keyfence.server.loop); a wait there
stops every client, the handler the wait is for among them (it could not
even instantiate the key: a request-key handler's background ``keyctl
update KEY`` stopped the daemon until the handler was killed).

So such a thread calls the service inside :func:`refusing_waits`: where the
service would wait, it calls :func:`check_may_wait`, which raises
:class:`MustWait` instead -- before the operation has changed anything --
and the caller runs the request again on a thread that may wait.

Rule for the service: call :func:`check_may_wait` before a wait, and only
where failing with an error would leave nothing done (a lookup at the start
of an operation, before any key is changed).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class MustWait(Exception):
    """The call would have waited; nothing was done (not an ``OSError``: no
    operation may take it for a failure and carry on)."""


_thread = threading.local()


@contextlib.contextmanager
def refusing_waits() -> Iterator[None]:
    """Calls into the service in this block raise :class:`MustWait` where
    they would wait (this thread only)."""
    previous = getattr(_thread, "refusing", False)
    _thread.refusing = True
    try:
        yield
    finally:
        _thread.refusing = previous


def check_may_wait(what: str) -> None:
    """About to wait for ``what``: :class:`MustWait` in a
    :func:`refusing_waits` block, else nothing."""
    if getattr(_thread, "refusing", False):
        raise MustWait(what)
