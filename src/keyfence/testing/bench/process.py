"""How a filesystem benchmark process runs: as the leader of a POSIX session
of its own, dying with its parent, with a stop signal raised as an exception
so that its ``finally`` blocks unmount and detach what it set up.

Used by bench/fs_compare.py and bench/fs_everyday.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

LEADER_ENV = "KEYFENCE_BENCH_SESSION_LEADER"
"""Set in the re-run child, so that it does not re-run itself again."""


def lead_own_session(script: str, argv: list[str]) -> int | None:
    """Re-run ``script`` with ``argv`` as the leader of a new POSIX session (the
    removals a benchmark times must clear its own keyrings, nobody else's).
    Returns the child's exit status, or None when we already are that child."""
    if os.environ.get(LEADER_ENV) == "1" or os.getsid(0) == os.getpid():
        return None
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(script), *argv],
        env=dict(os.environ, **{LEADER_ENV: "1"}),
        start_new_session=True,
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            return child.wait()
        except InterruptedError:
            continue


def die_with_parent() -> None:
    """If whoever started us dies, get SIGTERM (and clean up) too."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Interrupted(BaseException):
    """A stop signal arrived (its name is the message); not an Exception, so
    that no ``except Exception`` in a workload swallows it."""


def raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    """A signal handler: raise :class:`Interrupted`."""
    raise Interrupted(signal.Signals(signum).name)
