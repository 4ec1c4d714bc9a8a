"""``kfctl session``: run a program in a new session with its own keyring.

keyctl(1) replaces the calling process's session keyring and execs the
program.  In keyfence the POSIX session *is* the session: a session
keyring belongs to every process of one POSIX session (the daemon reads
the caller's session id from /proc).  So kfctl starts a new POSIX session
(setsid), joins the anonymous or named keyring for it through the daemon,
prints "Joined session keyring: N" on stderr as keyctl does, and execs the
program (default $SHELL, else /bin/sh).

setsid() needs a process that is not a process-group leader.  From a
script (no job control) kfctl usually is not one and execs in place, so
the program keeps kfctl's pid as it would keyctl's; from an interactive
shell it is one, and kfctl forks: the child makes the session and execs,
the parent forwards termination signals and exits as the child did.  A
new session has no controlling terminal: an interactive shell started
this way runs without job control.
"""

from __future__ import annotations

import contextlib
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
    if not argv:
        shell = os.environ.get("SHELL")
        if shell is None:
            shell = "/bin/sh"
        target = shell
        try:
            os.execl(shell, shell)
        except OSError as err:
            report(f"{target}: {os.strerror(err.errno or 0)}\n")
    else:
        target = argv[0]
        try:
            os.execvp(argv[0], argv)
        except OSError as err:
            report(f"{target}: {os.strerror(err.errno or 0)}\n")
    os._exit(1)
