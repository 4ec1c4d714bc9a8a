"""kfctl's parts below its commands: the command table (one row per keyctl
command; the usage text is made from it), the invocation's state and output
(:class:`Kfctl`), and keyfence's removal options.

``kfctl`` (the entry point) runs a row's handler from ``kfctl_commands``,
which imports this module: neither imports the other back.
"""

from __future__ import annotations

import posix  # not os: its import costs kfctl 1.7 ms (its environ's ABCs)
import sys

from keyfence.cli.kfctl_text import Exit, UsageError

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    from keyfence.cli.kfctl_text import Description, NameLookup
    from keyfence.cli.progress import ProgressDisplay, Snapshot
    from keyfence.client import Client

KEY_SPEC_SESSION_KEYRING = -3
KEYCTL_MOVE_EXCL = 0x01
STDIN_MAX = 1024 * 1024
"""keyctl reads at most 1 MiB of payload from stdin."""
STDIO_BUFSIZ = 4096

FORMAT_TAIL = """
Key/keyring ID:
  <nnn>   numeric keyring ID
  @t      thread keyring
  @p      process keyring
  @s      session keyring
  @u      user keyring
  @us     user default session keyring
  @g      group keyring
  @a      assumed request_key authorisation key

<type> can be "user" for a user-defined keyring
If you do this, prefix the description with "<subtype>:"
"""

HELP_EXTRA = """
keyfence additions (kfctl only):
  --help                  this text, on stdout
  Before the command name, for clear, revoke, invalidate, unlink, move,
  timeout and purge (after it, every word is keyctl's argument):
  --timeout <seconds>     abort the removal if the key users (a mounted
                          filesystem flushing with the key, ...) have not
                          finished in time; nothing is removed
  --emergency             wipe the key now, without waiting for its users;
                          they are told afterwards
  e.g. kfctl --timeout 5 clear @s
  On a terminal, a removal that waits shows who is still flushing.
  The daemon's socket: $KEYFENCE_SOCKET (no autostart: KEYFENCE_NO_AUTOSTART=1).
"""


def usage_text(prog: str) -> str:
    lines = ["Format:\n"]
    lines.extend(f"  {prog} {c.name} {usage}\n" for c in TABLE if c.listed for usage in c.usage)
    return "".join(lines) + FORMAT_TAIL


def program_name(argv0: str) -> str:
    """What to call ourselves in the Format text: ``keyctl`` when installed
    under that name (a drop-in), else ``kfctl``."""
    base = argv0.rpartition("/")[2]
    if not base or base.endswith(".py") or base.startswith("python"):
        return "kfctl"
    return base


def _strerror(err: OSError) -> str:
    return posix.strerror(err.errno) if err.errno else str(err)


def _removal_detail(err: OSError) -> str | None:
    """The reason keyfence adds after keyctl's text: only for failures the
    kernel never has (a removal aborted by a key user or by --timeout, a
    lost daemon), so keyctl's own error lines stay byte-identical."""
    import errno as errno_codes

    detail = getattr(err, "detail", None)
    if not detail:
        return None
    if err.errno in (errno_codes.ENOTCONN, errno_codes.EPROTO, errno_codes.ETIMEDOUT):
        return str(detail)
    if "nothing was removed" in detail or "watcher" in detail:
        return str(detail)
    return None


class Kfctl:
    """One invocation: output streams, the (lazily connected) client, options."""

    def __init__(
        self,
        prog: str,
        client: Client | None = None,
        *,
        connect: Callable[[], Client] | None = None,
    ) -> None:
        self.prog = prog
        self._client = client
        # how to reach the daemon when a command first needs it (default:
        # Client.connect); keyfence.cli.kfctl_warm's worker asks its caller
        self._connect = connect
        self.wrote = False
        """Something went to stdout or stderr (a warm worker may no longer
        hand the call back)."""
        self._buffer = bytearray()
        self._line_buffered = posix.isatty(1)
        self.timeout: float | None = None
        self.emergency = False
        self.progress: LazyProgress | None = None
        self._groups: frozenset[int] | None = None

    # -- output, buffered as C's stdio does (whatever PYTHONUNBUFFERED says):
    # stdout by line on a terminal, else in blocks and at exit; stderr not at
    # all -- so an error line comes before the output of the same command
    # when both go to one pipe, exactly as with keyctl

    def out(self, text: str) -> None:
        self.out_bytes(text.encode("utf-8", "surrogateescape"))

    def out_bytes(self, data: bytes) -> None:
        self._buffer += data
        if (self._line_buffered and b"\n" in data) or len(self._buffer) >= STDIO_BUFSIZ:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self.wrote = True
            _write_all(1, data)

    def discard(self) -> None:
        """Forget the output not yet written (a warm worker handing its call
        back to Python, which will print it all)."""
        self._buffer.clear()

    def err(self, text: str) -> None:
        self.wrote = True
        _write_all(2, text.encode("utf-8", "surrogateescape"))

    def usage(self) -> NoReturn:
        """keyctl's format(): the command list on stderr, exit 2."""
        self.err(usage_text(self.prog))
        raise Exit(2)

    def fail(self, function: str, err: OSError) -> NoReturn:
        """keyctl's error(): perror(function), exit 1."""
        message = f"{function}: {_strerror(err)}"
        detail = _removal_detail(err)
        if detail:
            message += f" ({detail})"
        self.err(message + "\n")
        raise Exit(1)

    # -- the daemon

    @property
    def client(self) -> Client:
        if self._client is None:
            from keyfence.client import Client

            try:
                self._client = self._connect() if self._connect else Client.connect(name="kfctl")
            except OSError as err:
                text = err.strerror or str(err)
                self.err(f"{self.prog}: {text}\n")
                raise Exit(1) from None
        return self._client

    def key(self, arg: str) -> int:
        """keyctl's get_key_id(), resolving %type:desc through the daemon."""
        from keyfence.cli.kfctl_text import NameLookup, parse_key_id

        parsed = parse_key_id(arg)
        if isinstance(parsed, NameLookup):
            return self._find_key(parsed)
        return parsed

    def _find_key(self, lookup: NameLookup) -> int:
        """libkeyutils' find_key_by_type_and_desc(): request_key() from the
        caller's keyrings, else the first key of /proc/keys (lowest serial
        first) of that type and description that the caller can describe,
        wherever it is linked (the daemon's ``viewable_keys``)."""
        from keyfence.cli.kfctl_text import parse_description

        client = self.client
        try:
            return client.request_key(lookup.type, lookup.description, None, 0)
        except OSError:
            pass
        try:
            serials = client.viewable_keys(lookup.type, lookup.description)
        except OSError:  # a name the wire cannot carry (not UTF-8): none found
            serials = []
        for serial in serials:
            try:
                desc = parse_description(client.describe(serial))
            except OSError:
                continue  # revoked, expired: libkeyutils' describe skips it too
            if desc is not None and desc.description == lookup.description:
                return serial
        raise UsageError(f"Can't find '{lookup.type}:{lookup.description}'", code=1)

    def removal(self, command: str) -> dict[str, Any]:
        """The keyword arguments of a removal: --timeout, --emergency, and the
        progress display on stderr (cli/progress.py: a live line on a
        terminal, else a plain line a second while the removal waits)."""
        options: dict[str, Any] = {}
        if self.timeout is not None:
            options["timeout"] = self.timeout
        if self.emergency:
            options["emergency"] = True
        else:
            if self.progress is None:
                self.progress = LazyProgress(self.prog, command)
            options["progress"] = self.progress
        return options

    def removal_done(self) -> None:
        if self.progress is not None:
            self.progress.close()

    # -- small shared pieces

    def granted(self, desc: Description) -> str:
        from keyfence.cli.kfctl_text import granted_perms

        if self._groups is None:
            self._groups = frozenset(posix.getgroups())
        groups = self._groups
        return granted_perms(
            desc.perm, desc.uid, desc.gid, posix.geteuid(), posix.getegid(), groups
        )

    def stdin_data(self) -> bytes:
        """keyctl's grab_stdin(): stdin, cut at 1 MiB.  keyctl 1.6.3 reads
        at most 1 MiB into its buffer, so its "Too much data read on stdin"
        never fires: more is cut silently and the kernel then refuses the
        payload (too big for any key type)."""
        chunks = []
        size = 0
        if sys.stdin is None:  # started with fd 0 closed: keyctl's read(0) fails so
            import errno

            self.fail("stdin", OSError(errno.EBADF, posix.strerror(errno.EBADF)))
        fd = sys.stdin.fileno()
        while size < STDIN_MAX:
            try:
                chunk = posix.read(fd, STDIN_MAX - size)
            except OSError as err:
                self.fail("stdin", err)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` as keyctl's stdio does: a failed write (a full disk,
    a closed descriptor, EPIPE with SIGPIPE ignored) is dropped silently
    and the exit status stays the command's."""
    try:  # noqa: SIM105 - contextlib costs start-up time
        write_or_raise(fd, data)
    except OSError:
        pass


def write_or_raise(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``; OSError on failure."""
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view) :]


REMOVAL_OPTIONS = ("--timeout", "--emergency")


def removal_options(tool: Kfctl, argv: list[str]) -> list[str]:
    """Take keyfence's --timeout/--emergency from before the command name;
    the command line from the command name on.

    Only there: keyctl reads its first word as a command, and a word
    starting ``--timeout``/``--emergency`` is none (``Unknown command``), so
    no keyctl command line changes meaning.  Among a command's arguments
    every word is keyctl's (``purge user --emergency`` purges the key
    described ``--emergency``, as keyctl does)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--emergency":
            tool.emergency = True
        elif arg == "--timeout" or arg.startswith("--timeout="):
            if arg == "--timeout":
                if i + 1 >= len(argv):
                    tool.usage()
                i += 1
                value = argv[i]
            else:
                value = arg.partition("=")[2]
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds < float("inf"):
                raise UsageError(f"Unparsable --timeout: '{value}'")
            tool.timeout = seconds
        else:
            break
        i += 1
    if tool.emergency and tool.timeout is not None:
        raise UsageError("--timeout and --emergency cannot be combined")
    return argv[i:]


# ------------------------------------------------------------ the table
# One row per keyctl command, in keyctl's order (its usage text is made
# from this table): the name, its usage line(s), the handler (a function
# name in kfctl_commands, imported when first needed so that start-up stays
# cheap), and the argument rules checked before the handler runs, in
# keyctl's order: a leading flag (``-x``, ``-v``) is taken only as the
# first argument, then the number of the remaining arguments must be one of
# ``nargs`` (or at least ``at_least``); anything else prints the usage text
# and exits 2.  ``nargs`` None: the handler parses its own options
# (getopt-style commands).  ``removal``: keyfence's --timeout/--emergency
# (given before the command name) apply to it.


class Command:
    """One command: name, usage lines, handler and argument rules."""

    __slots__ = ("at_least", "flag", "handler", "listed", "name", "nargs", "removal", "usage")

    def __init__(
        self,
        name: str,
        usage: str | tuple[str, ...],
        handler: str | None,
        *,
        nargs: tuple[int, ...] | None = None,
        at_least: int | None = None,
        flag: str | None = None,
        removal: bool = False,
        listed: bool = True,
    ) -> None:
        self.name = name
        self.usage = (usage,) if isinstance(usage, str) else usage
        self.handler = handler
        self.nargs = nargs
        self.at_least = at_least
        self.flag = flag
        self.removal = removal
        self.listed = listed

    def check(self, tool: Kfctl, args: list[str]) -> tuple[list[str], bool]:
        """keyctl's argument rules: (the arguments, whether the flag was given)."""
        flagged = False
        if self.flag is not None and args and args[0] == self.flag:
            flagged = True
            args = args[1:]
        if self.nargs is not None and len(args) not in self.nargs:
            tool.usage()
        if self.at_least is not None and len(args) < self.at_least:
            tool.usage()
        return args, flagged


_ONE = (1,)
_TWO = (2,)

TABLE: tuple[Command, ...] = (
    Command("--version", "", "cmd_version"),
    Command("add", "[-x] <type> <desc> <data> <keyring>", "cmd_add", nargs=(4,), flag="-x"),
    Command("chgrp", "<key> <gid>", "cmd_chgrp", nargs=_TWO),
    Command("chown", "<key> <uid>", "cmd_chown", nargs=_TWO),
    Command("clear", "<keyring>", "cmd_clear", nargs=_ONE, removal=True),
    Command("describe", "<keyring>", "cmd_describe", nargs=_ONE),
    Command("dh_compute", "<private> <prime> <base>", "cmd_dh_compute", nargs=(3,)),
    Command(
        "dh_compute_kdf",
        "<private> <prime> <base> <len> <hash_name>",
        "cmd_dh_compute_kdf",
        nargs=(5,),
    ),
    Command(
        "dh_compute_kdf_oi",
        "[-x] <private> <prime> <base> <len> <hash_name>",
        "cmd_dh_compute_kdf_oi",
        nargs=(5,),
        flag="-x",
    ),
    Command("get_persistent", "<keyring> [<uid>]", "cmd_get_persistent", nargs=(1, 2)),
    Command("id", "<key>", "cmd_id", nargs=_ONE),
    Command("instantiate", "[-x] <key> <data> <keyring>", "cmd_instantiate", nargs=(3,), flag="-x"),
    Command("invalidate", "<key>", "cmd_invalidate", nargs=_ONE, removal=True),
    Command("link", "<key> <keyring>", "cmd_link", nargs=_TWO),
    Command("list", "<keyring>", "cmd_list", nargs=_ONE),
    Command("move", "[-f] <key> <from_keyring> <to_keyring>", "cmd_move", removal=True),
    Command("negate", "<key> <timeout> <keyring>", "cmd_negate", nargs=(3,)),
    Command("new_session", "[<name>]", "cmd_new_session", nargs=(0, 1)),
    Command("newring", "<name> <keyring>", "cmd_newring", nargs=_TWO),
    Command("padd", "[-x] <type> <desc> <keyring>", "cmd_padd", nargs=(3,), flag="-x"),
    Command("pinstantiate", "[-x] <key> <keyring>", "cmd_pinstantiate", nargs=_TWO, flag="-x"),
    Command("pipe", "<key>", "cmd_pipe", nargs=_ONE),
    Command("pkey_query", "<key> <pass> [k=v]*", "cmd_pkey_query", at_least=2),
    Command("pkey_encrypt", "<key> <pass> <datafile> [k=v]*", "cmd_pkey_data", at_least=3),
    Command("pkey_decrypt", "<key> <pass> <datafile> [k=v]*", "cmd_pkey_data", at_least=3),
    Command("pkey_sign", "<key> <pass> <datafile> [k=v]*", "cmd_pkey_data", at_least=3),
    Command(
        "pkey_verify", "<key> <pass> <datafile> <sigfile> [k=v]*", "cmd_pkey_verify", at_least=4
    ),
    Command("prequest2", "<type> <desc> [<dest_keyring>]", "cmd_prequest2", nargs=(2, 3)),
    Command("print", "<key>", "cmd_print", nargs=_ONE),
    Command("pupdate", "[-x] <key>", "cmd_pupdate", nargs=_ONE, flag="-x"),
    Command(
        "purge",
        ("<type>", "[-p] [-i] <type> <desc>", "-s <type> <desc>"),
        "cmd_purge",
        removal=True,
    ),
    Command("rdescribe", "<keyring> [sep]", "cmd_rdescribe", nargs=(1, 2)),
    Command("read", "<key>", "cmd_read", nargs=_ONE),
    Command("reap", "[-v]", "cmd_reap", nargs=(0,), flag="-v"),
    Command("reject", "<key> <timeout> <error> <keyring>", "cmd_reject", nargs=(4,)),
    Command("request", "<type> <desc> [<dest_keyring>]", "cmd_request", nargs=(2, 3)),
    Command("request2", "<type> <desc> <info> [<dest_keyring>]", "cmd_request2", nargs=(3, 4)),
    Command(
        "restrict_keyring",
        "<keyring> [<type> [<restriction>]]",
        "cmd_restrict_keyring",
        nargs=(1, 2, 3),
    ),
    Command("revoke", "<key>", "cmd_revoke", nargs=_ONE, removal=True),
    Command("rlist", "<keyring>", "cmd_rlist", nargs=_ONE),
    Command("search", "<keyring> <type> <desc> [<dest_keyring>]", "cmd_search", nargs=(3, 4)),
    Command("security", "<key>", "cmd_security", nargs=_ONE),
    Command(
        "session",
        ("", "- [<prog> <arg1> <arg2> ...]", "<name> [<prog> <arg1> <arg2> ...]"),
        "cmd_session",
    ),
    Command("setperm", "<key> <mask>", "cmd_setperm", nargs=_TWO),
    Command("show", "[-x] [<keyring>]", "cmd_show", nargs=(0, 1), flag="-x"),
    Command("supports", "[<cap> | --raw]", "cmd_supports", nargs=(0, 1)),
    Command("timeout", "<key> <timeout>", "cmd_timeout", nargs=_TWO, removal=True),
    Command("unlink", "<key> [<keyring>]", "cmd_unlink", nargs=(1, 2), removal=True),
    Command("update", "[-x] <key> <data>", "cmd_update", nargs=_TWO, flag="-x"),
    Command("watch", "[-f<filters>] <key>", "cmd_watch"),
    Command("watch_add", "<fd> <key>", "cmd_watch_add", nargs=_TWO),
    Command("watch_rm", "<fd> <key>", "cmd_watch_rm", nargs=_TWO),
    Command(
        "watch_session",
        "[-f<filters>] [-n <name>] <notifylog> <gclog> <fd> <prog> [<arg1> <arg2> ...]",
        "cmd_watch_session",
    ),
    Command("watch_sync", "<fd>", "cmd_watch_sync", nargs=_ONE),
    # keyutils' self-test: listed in the usage text, not provided
    Command("--test", "...", None),
    # kfctl's own
    Command("--help", "", "cmd_help", listed=False),
)

BY_NAME = {c.name: c for c in TABLE if c.handler is not None}
"""The commands kfctl runs, by name."""


class LazyProgress:
    """A removal's ``progress=``: cli/progress.py's display, made at the
    first snapshot.  Most removals get none (no key user has to write
    anything back), and importing the display (os, shutil, threading,
    typing) cost every ``kfctl clear`` and ``unlink`` about 5 ms of start-up.
    The clock starts here, as the display's would have."""

    __slots__ = ("command", "display", "prog", "started")

    def __init__(self, prog: str, command: str) -> None:
        import time  # built in: no file to load

        self.prog = prog
        self.command = command
        self.started = time.monotonic()
        self.display: ProgressDisplay | None = None

    def __call__(self, snapshot: Snapshot) -> None:
        if self.display is None:
            from keyfence.cli.progress import ProgressDisplay

            self.display = ProgressDisplay(
                self.prog, self.command, sys.stderr, started=self.started
            )
        self.display(snapshot)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
