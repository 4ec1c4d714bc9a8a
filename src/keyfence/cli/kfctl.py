"""kfctl: keyctl(1) for keyfence -- same words, same output, same exit codes.

Every command of Debian's keyutils 1.6.3 ``keyctl`` is accepted with the
same syntax and prints what keyctl prints, byte for byte, with the daemon
in place of the kernel (docs/cli.md lists the few differences).  Exit
codes: 0 success, 1 an operation failed ("<function>: <strerror>", the
libkeyutils function keyctl names), 2 bad usage (the "Format:" text or an
"Unparsable ..." message), 3 as keyctl for ``supports`` and unparsable
descriptions.

keyfence's additions, before the command name of a removal (clear,
revoke, invalidate, unlink, move, timeout, purge), where keyctl has only
"Unknown command": ``--timeout SECONDS`` aborts a removal whose key users
have not finished in time, keys intact; ``--emergency`` wipes at once
without waiting.  On a terminal a progress line names the key users still
flushing.

Start-up time matters to shell scripts: this module imports only ``os``
and ``sys`` at start (not ``signal``: its enums); the client library is
imported when a command first needs the daemon.  The installed ``kfctl``
is keyfence.cli.launcher's script (``python -I -S``: no ``site``).
"""

from __future__ import annotations

import sys

from keyfence.cli.kfctl_text import Exit, UsageError
from keyfence.cli.kfctl_tool import (
    BY_NAME,
    TABLE,
    Kfctl,
    program_name,
    removal_options,
    usage_text,
)

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

__all__ = ["TABLE", "Kfctl", "exit_now", "main", "program_name", "run", "usage_text"]


def run(argv: list[str], tool: Kfctl) -> int:
    """Run one command line (without the program name); the exit status."""
    try:
        if not argv:
            tool.usage()
        argv = removal_options(tool, argv)
        if not argv:
            tool.usage()
        # keyctl 1.6.3 accepts exact command names only (its prefix
        # matching never matches a shorter word)
        command = BY_NAME.get(argv[0])
        if command is None or command.handler is None:
            tool.err("Unknown command\n")
            return 2
        if (tool.emergency or tool.timeout is not None) and not command.removal:
            raise UsageError(f"--timeout/--emergency: {argv[0]} is not a removal")
        args = argv[1:]
        args, flagged = command.check(tool, args)
        from keyfence.cli import kfctl_commands

        handler: Callable[[Kfctl, list[str], bool], None] = getattr(kfctl_commands, command.handler)
        handler(tool, args, flagged)
        return 0
    except Exit as done:
        return done.code
    except UsageError as err:
        tool.err(usage_text(tool.prog) if err.message is None else err.message + "\n")
        return err.code


def main(argv: list[str] | None = None, *, tool: Kfctl | None = None) -> int:
    """kfctl with ``argv`` (default: ``sys.argv[1:]``); ``tool``: the
    invocation's state (keyfence.cli.kfctl_warm's worker passes its own)."""
    # not signal: it imports enum (and functools, collections...), about as
    # long as the rest of kfctl's imports together
    import _signal  # type: ignore[import-not-found,unused-ignore]

    # die of SIGPIPE and SIGINT as a C program does, silently
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    if argv is None:
        argv = sys.argv[1:]
    if tool is None:
        tool = Kfctl(program_name(sys.argv[0] if sys.argv else "kfctl"))
    try:
        return run(argv, tool)
    finally:
        tool.flush()


def exit_now(code: int) -> NoReturn:
    """Leave with ``code`` without the interpreter's teardown (freeing every
    module and object: about 1 ms, a tenth of a bare interpreter's start).
    kfctl writes its output with plain write(2)s, already done; Python's own
    streams are flushed here, and nothing registers atexit handlers."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:  # noqa: SIM105 - contextlib costs start-up time
                stream.flush()
            except (OSError, ValueError):
                pass
    import posix

    posix._exit(code)


if __name__ == "__main__":
    exit_now(main())
