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

A wait is also *interruptible*, as the kernel's wait_for_key_construction()
is: a thread serving a client runs its request inside
:func:`interrupted_when`, and a wait calls :func:`check_interrupted` each
time it wakes; once the client has gone (killed, or its connection closed
by a ``timeout 1 keyctl update ...``) the wait ends with EINTR and the
operation does nothing -- a request its caller gave up on is not done
later, when the key is made.  Whoever makes a client go wakes the waiters
(``KeyService.interrupt_waits``).
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Iterator

from keyfence.keys.errors import fail


class MustWait(Exception):
    """The call would have waited; nothing was done (not an ``OSError``: no
    operation may take it for a failure and carry on)."""


_thread = threading.local()


@contextlib.contextmanager
def _for_this_block(name: str, value: object) -> Iterator[None]:
    """This thread's ``name`` is ``value`` inside the block, as before after."""
    previous = getattr(_thread, name, None)
    setattr(_thread, name, value)
    try:
        yield
    finally:
        setattr(_thread, name, previous)


def refusing_waits() -> contextlib.AbstractContextManager[None]:
    """Calls into the service in this block raise :class:`MustWait` where
    they would wait (this thread only)."""
    return _for_this_block("refusing", True)


def check_may_wait(what: str) -> None:
    """About to wait for ``what``: :class:`MustWait` in a
    :func:`refusing_waits` block, else nothing."""
    if getattr(_thread, "refusing", False):
        raise MustWait(what)


def interrupted_when(gone: Callable[[], bool]) -> contextlib.AbstractContextManager[None]:
    """Waits in this block (this thread only) end with EINTR once ``gone()``
    is true: the caller they wait for has gone."""
    return _for_this_block("gone", gone)


def caller_gone() -> bool:
    """Whether this thread's caller has gone (see :func:`interrupted_when`)."""
    gone = getattr(_thread, "gone", None)
    return gone is not None and bool(gone())


def check_interrupted(what: str) -> None:
    """Waiting for ``what`` (again): EINTR if this thread's caller has gone,
    else nothing."""
    gone = getattr(_thread, "gone", None)
    if gone is not None and gone():
        raise fail(errno.EINTR, f"the caller went away while waiting for {what}")
