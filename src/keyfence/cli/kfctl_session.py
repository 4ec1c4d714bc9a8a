"""``kfctl session``: run a program with a new session keyring.

As keyctl(1): join the anonymous or named keyring (the daemon binds it to
this process, which keeps its pid and start time across exec, so the
program and its children have it), print "Joined session keyring: N" on
stderr, and exec the program (default $SHELL, else /bin/sh).  No new
POSIX session: a session keyring follows the process tree, not setsid(2)
(docs/keys.md, "Session keyrings").

``enter_new_session`` is kept for callers that want a POSIX session of
their own: setsid() needs a process that is not a process-group leader,
so it forks when it must and relays the child's status.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def enter_new_session() -> None:
    """Make this process the leader of a new POSIX session.

    Forks when it must; only the child returns (the parent waits and
    exits with the child's status).
    """
    try:
        os.setsid()
        return
    except PermissionError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        return
    _relay(pid)


def _relay(pid: int) -> NoReturn:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            os._exit(1)
        if os.WIFEXITED(status):
            os._exit(os.WEXITSTATUS(status))
        if os.WIFSIGNALED(status):
            died = os.WTERMSIG(status)
            # die the way the program died, as a shell would see it
            signal.signal(died, signal.SIG_DFL)
            os.kill(os.getpid(), died)
            os._exit(128 + died)


def exec_program(argv: list[str], report: Callable[[str], None]) -> NoReturn:
    """keyctl's tail: exec $SHELL (or /bin/sh) with no arguments, else
    ``argv`` through $PATH.  On failure: "<program>: <error>", exit 1."""
    try:
        if not argv:
            shell = os.environ.get("SHELL")
            if shell is None:
                shell = "/bin/sh"
            target = shell
            os.execl(shell, shell)
        else:
            target = argv[0]
            os.execvp(argv[0], argv)
    except OSError as err:
        _perror(report, target, err.errno or 0)
    except ValueError:  # an empty name (SHELL=) or a NUL in it: no such program
        _perror(report, target, errno.ENOENT)
    os._exit(1)


def _perror(report: Callable[[str], None], target: str, code: int) -> None:
    """perror(target): without the ": " when target is empty."""
    text = os.strerror(code)
    report(f"{target}: {text}\n" if target else f"{text}\n")
