"""kfctl: keyctl(1) for keyfence -- same words, same output, same exit codes.

Every command of Debian's keyutils 1.6.3 ``keyctl`` is accepted with the
same syntax and prints what keyctl prints, byte for byte, with the daemon
in place of the kernel (docs/cli.md lists the few differences).  Exit
codes: 0 success, 1 an operation failed ("<function>: <strerror>", the
libkeyutils function keyctl names), 2 bad usage (the "Format:" text or an
"Unparsable ..." message), 3 as keyctl for ``supports`` and unparsable
descriptions.

keyfence's additions, on the removals (clear, revoke, invalidate, unlink,
move, timeout, purge): ``--timeout SECONDS`` aborts a removal whose key
users have not finished in time, keys intact; ``--emergency`` wipes at
once without waiting; on a terminal a progress line names the key users
still flushing.

Start-up time matters to shell scripts: this module imports only ``os``
and ``sys`` at start; the client library is imported when a command first
needs the daemon.
"""

from __future__ import annotations

import os
import sys

from keyfence.cli.kfctl_text import UsageError

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    from keyfence.cli.kfctl_progress import ProgressLine
    from keyfence.cli.kfctl_text import Description, NameLookup
    from keyfence.client import Client

KEY_SPEC_SESSION_KEYRING = -3
KEYCTL_MOVE_EXCL = 0x01
STDIN_MAX = 1024 * 1024
"""keyctl reads at most 1 MiB of payload from stdin."""
STDIO_BUFSIZ = 4096

# keyctl's command table, in its order: (name, format).  Commands keyfence
# does not provide are listed all the same (scripts may parse the text);
# they fail as the kernel fails when it lacks the feature.
FORMATS: tuple[tuple[str, str], ...] = (
    ("--version", ""),
    ("add", "[-x] <type> <desc> <data> <keyring>"),
    ("chgrp", "<key> <gid>"),
    ("chown", "<key> <uid>"),
    ("clear", "<keyring>"),
    ("describe", "<keyring>"),
    ("dh_compute", "<private> <prime> <base>"),
    ("dh_compute_kdf", "<private> <prime> <base> <len> <hash_name>"),
    ("dh_compute_kdf_oi", "[-x] <private> <prime> <base> <len> <hash_name>"),
    ("get_persistent", "<keyring> [<uid>]"),
    ("id", "<key>"),
    ("instantiate", "[-x] <key> <data> <keyring>"),
    ("invalidate", "<key>"),
    ("link", "<key> <keyring>"),
    ("list", "<keyring>"),
    ("move", "[-f] <key> <from_keyring> <to_keyring>"),
    ("negate", "<key> <timeout> <keyring>"),
    ("new_session", "[<name>]"),
    ("newring", "<name> <keyring>"),
    ("padd", "[-x] <type> <desc> <keyring>"),
    ("pinstantiate", "[-x] <key> <keyring>"),
    ("pipe", "<key>"),
    ("pkey_query", "<key> <pass> [k=v]*"),
    ("pkey_encrypt", "<key> <pass> <datafile> [k=v]*"),
    ("pkey_decrypt", "<key> <pass> <datafile> [k=v]*"),
    ("pkey_sign", "<key> <pass> <datafile> [k=v]*"),
    ("pkey_verify", "<key> <pass> <datafile> <sigfile> [k=v]*"),
    ("prequest2", "<type> <desc> [<dest_keyring>]"),
    ("print", "<key>"),
    ("pupdate", "[-x] <key>"),
    ("purge", "<type>"),
    ("purge", "[-p] [-i] <type> <desc>"),
    ("purge", "-s <type> <desc>"),
    ("rdescribe", "<keyring> [sep]"),
    ("read", "<key>"),
    ("reap", "[-v]"),
    ("reject", "<key> <timeout> <error> <keyring>"),
    ("request", "<type> <desc> [<dest_keyring>]"),
    ("request2", "<type> <desc> <info> [<dest_keyring>]"),
    ("restrict_keyring", "<keyring> [<type> [<restriction>]]"),
    ("revoke", "<key>"),
    ("rlist", "<keyring>"),
    ("search", "<keyring> <type> <desc> [<dest_keyring>]"),
    ("security", "<key>"),
    ("session", ""),
    ("session", "- [<prog> <arg1> <arg2> ...]"),
    ("session", "<name> [<prog> <arg1> <arg2> ...]"),
    ("setperm", "<key> <mask>"),
    ("show", "[-x] [<keyring>]"),
    ("supports", "[<cap> | --raw]"),
    ("timeout", "<key> <timeout>"),
    ("unlink", "<key> [<keyring>]"),
    ("update", "[-x] <key> <data>"),
    ("watch", "[-f<filters>] <key>"),
    ("watch_add", "<fd> <key>"),
    ("watch_rm", "<fd> <key>"),
    (
        "watch_session",
        "[-f<filters>] [-n <name>] <notifylog> <gclog> <fd> <prog> [<arg1> <arg2> ...]",
    ),
    ("watch_sync", "<fd>"),
    ("--test", "..."),
)

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
  On clear, revoke, invalidate, unlink, move, timeout and purge:
  --timeout <seconds>     abort the removal if the key users (a mounted
                          filesystem flushing with the key, ...) have not
                          finished in time; nothing is removed
  --emergency             wipe the key now, without waiting for its users;
                          they are told afterwards
  On a terminal, a removal that waits shows who is still flushing.
  The daemon's socket: $KEYFENCE_SOCKET (no autostart: KEYFENCE_NO_AUTOSTART=1).
"""

REMOVAL_COMMANDS = frozenset(
    {"clear", "revoke", "invalidate", "unlink", "move", "timeout", "purge"}
)


class Exit(Exception):
    """Leave with this status (output already written)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def usage_text(prog: str) -> str:
    lines = ["Format:\n"]
    lines.extend(f"  {prog} {name} {fmt}\n" for name, fmt in FORMATS)
    return "".join(lines) + FORMAT_TAIL


def program_name(argv0: str) -> str:
    """What to call ourselves in the Format text: ``keyctl`` when installed
    under that name (a drop-in), else ``kfctl``."""
    base = os.path.basename(argv0)
    if not base or base.endswith(".py") or base.startswith("python"):
        return "kfctl"
    return base


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


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

    def __init__(self, prog: str, client: Client | None = None) -> None:
        self.prog = prog
        self._client = client
        self._buffer = bytearray()
        self._line_buffered = os.isatty(1)
        self.timeout: float | None = None
        self.emergency = False
        self.progress: ProgressLine | None = None
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
            _write_all(1, data)

    def err(self, text: str) -> None:
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
                self._client = Client.connect(name="kfctl")
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
        caller's keyrings, else any key the caller can view (the kernel
        scans /proc/keys; keyfence scans the keyrings reachable from @s,
        @u and @us, lowest serial first as /proc/keys is ordered)."""
        from keyfence.cli.kfctl_text import parse_description, unpack_serials

        client = self.client
        try:
            return client.request_key(lookup.type, lookup.description, None, 0)
        except OSError:
            pass
        found: list[int] = []
        seen: set[int] = set()
        todo: list[int] = []
        for special in (KEY_SPEC_SESSION_KEYRING, -4, -5):
            try:
                todo.append(client.get_keyring_id(special, False))
            except OSError:
                continue
        while todo:
            serial = todo.pop()
            if serial in seen:
                continue
            seen.add(serial)
            try:
                desc = parse_description(client.describe(serial))
            except OSError:
                continue
            if desc is None:
                continue
            if desc.type == lookup.type and desc.description == lookup.description:
                found.append(serial)
            if desc.type == "keyring":
                try:
                    todo.extend(unpack_serials(client.read(serial)))
                except OSError:
                    continue
        if not found:
            raise UsageError(f"Can't find '{lookup.type}:{lookup.description}'", code=1)
        return min(found)

    def removal(self, command: str) -> dict[str, Any]:
        """The keyword arguments of a removal: --timeout, --emergency, and a
        progress line when stderr is a terminal."""
        options: dict[str, Any] = {}
        if self.timeout is not None:
            options["timeout"] = self.timeout
        if self.emergency:
            options["emergency"] = True
        elif sys.stderr.isatty():
            if self.progress is None:
                from keyfence.cli.kfctl_progress import ProgressLine

                self.progress = ProgressLine(self.prog, command, sys.stderr)
            options["progress"] = self.progress
        return options

    def removal_done(self) -> None:
        if self.progress is not None:
            self.progress.clear()

    # -- small shared pieces

    def granted(self, desc: Description) -> str:
        from keyfence.cli.kfctl_text import granted_perms

        if self._groups is None:
            self._groups = frozenset(os.getgroups())
        groups = self._groups
        return granted_perms(desc.perm, desc.uid, desc.gid, os.geteuid(), os.getegid(), groups)

    def stdin_data(self) -> bytes:
        """keyctl's grab_stdin(): all of stdin, at most 1 MiB."""
        chunks = []
        size = 0
        if sys.stdin is None:  # started with fd 0 closed: keyctl's read(0) fails so
            import errno

            self.fail("stdin", OSError(errno.EBADF, os.strerror(errno.EBADF)))
        fd = sys.stdin.fileno()
        while size <= STDIN_MAX:
            try:
                chunk = os.read(fd, STDIN_MAX + 1 - size)
            except OSError as err:
                self.fail("stdin", err)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > STDIN_MAX:
            self.err("Too much data read on stdin\n")
            raise Exit(1)
        return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError:
            return
        view = view[written:]


def _flag(args: list[str], flag: str) -> tuple[bool, list[str]]:
    """keyctl's leading ``-x`` / ``-v``: only as the first argument."""
    if args and args[0] == flag:
        return True, args[1:]
    return False, args


def _removal_options(tool: Kfctl, args: list[str]) -> list[str]:
    """Take keyfence's --timeout/--emergency out of a removal's arguments
    (anywhere before a ``--``, which is dropped)."""
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i + 1 :])
            break
        if arg == "--emergency":
            tool.emergency = True
        elif arg == "--timeout" or arg.startswith("--timeout="):
            if arg == "--timeout":
                if i + 1 >= len(args):
                    tool.usage()
                i += 1
                value = args[i]
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
            rest.append(arg)
        i += 1
    if tool.emergency and tool.timeout is not None:
        raise UsageError("--timeout and --emergency cannot be combined")
    return rest


# ---------------------------------------------------------------- commands
# Each takes the arguments after the command name; argument counts, the
# order of checks (and so which error wins) follow keyctl.


def cmd_version(tool: Kfctl, args: list[str]) -> None:
    from keyfence import __version__

    tool.out(f"{tool.prog} from keyfence-{__version__} (keyctl of keyutils-1.6.3)\n")


def cmd_help(tool: Kfctl, args: list[str]) -> None:
    tool.out(usage_text(tool.prog) + HELP_EXTRA)


def cmd_supports(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import KEYFENCE_CAPS, has_capability, supports_lines

    if len(args) > 1:
        tool.usage()
    if not args:
        tool.out(supports_lines(KEYFENCE_CAPS))
        return
    if args[0] == "--raw":
        tool.out(KEYFENCE_CAPS.hex() + "\n")
    have = has_capability(KEYFENCE_CAPS, args[0])
    raise Exit(3 if have is None else 0 if have else 1)


def cmd_id(tool: Kfctl, args: list[str]) -> None:
    if len(args) != 1:
        tool.usage()
    key = tool.key(args[0])
    try:
        serial = tool.client.get_keyring_id(key, False)
    except OSError as err:
        tool.fail("keyctl_get_keyring_ID", err)
    tool.out(f"{serial}\n")


def cmd_show(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import TreeError, show_tree

    hex_ids, args = _flag(args, "-x")
    if len(args) > 1:
        tool.usage()
    keyring = tool.key(args[0]) if args else KEY_SPEC_SESSION_KEYRING
    tool.out("Keyring\n" if args else "Session Keyring\n")
    client = tool.client
    try:
        root = client.get_keyring_id(keyring, False)
    except OSError as err:
        tool.fail("Unable to dump key", err)
    try:
        for line in show_tree(
            root, client.describe, client.read, tool.granted, _strerror, hex_ids=hex_ids
        ):
            tool.out(line)
    except TreeError as err:
        tool.fail(err.function, err.error)


def _add(tool: Kfctl, key_type: str, description: str, data: bytes | None, dest: int) -> None:
    try:
        serial = tool.client.add_key(key_type, description, data, dest)
    except OSError as err:
        tool.fail("add_key", err)
    tool.out(f"{serial}\n")


def cmd_add(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import hex2bin

    as_hex, args = _flag(args, "-x")
    if len(args) != 4:
        tool.usage()
    data = os.fsencode(args[2])
    if as_hex and data:
        data = hex2bin(data)
    dest = tool.key(args[3])
    _add(tool, args[0], args[1], data, dest)


def cmd_padd(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import hex2bin

    as_hex, args = _flag(args, "-x")
    if len(args) != 3:
        tool.usage()
    data = tool.stdin_data()
    if as_hex and data:
        data = hex2bin(data)
    dest = tool.key(args[2])
    _add(tool, args[0], args[1], data, dest)


def _request(tool: Kfctl, args: list[str], callout: str | None) -> None:
    dest = tool.key(args[2]) if len(args) == 3 else 0
    try:
        serial = tool.client.request_key(args[0], args[1], callout, dest)
    except OSError as err:
        tool.fail("request_key", err)
    tool.out(f"{serial}\n")


def cmd_request(tool: Kfctl, args: list[str]) -> None:
    if len(args) not in (2, 3):
        tool.usage()
    _request(tool, args, None)


def cmd_request2(tool: Kfctl, args: list[str]) -> None:
    if len(args) not in (3, 4):
        tool.usage()
    _request(tool, [args[0], args[1], *args[3:]], args[2])


def cmd_prequest2(tool: Kfctl, args: list[str]) -> None:
    if len(args) not in (2, 3):
        tool.usage()
    info = tool.stdin_data().split(b"\0", 1)[0].decode("utf-8", "replace")
    _request(tool, args, info)


def _update(tool: Kfctl, key: int, data: bytes) -> None:
    try:
        tool.client.update(key, data)
    except OSError as err:
        tool.fail("keyctl_update", err)


def cmd_update(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import hex2bin

    as_hex, args = _flag(args, "-x")
    if len(args) != 2:
        tool.usage()
    data = os.fsencode(args[1])
    if as_hex and data:
        data = hex2bin(data)
    _update(tool, tool.key(args[0]), data)


def cmd_pupdate(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import hex2bin

    as_hex, args = _flag(args, "-x")
    if len(args) != 1:
        tool.usage()
    key = tool.key(args[0])
    data = tool.stdin_data()
    if as_hex and data:
        data = hex2bin(data)
    _update(tool, key, data)


def cmd_newring(tool: Kfctl, args: list[str]) -> None:
    if len(args) != 2:
        tool.usage()
    dest = tool.key(args[1])
    _add(tool, "keyring", args[0], None, dest)


def _single_key_removal(tool: Kfctl, args: list[str], command: str, function: str) -> None:
    if len(args) != 1:
        tool.usage()
    key = tool.key(args[0])
    op: Callable[..., None] = getattr(tool.client, command)
    try:
        op(key, **tool.removal(command))
    except OSError as err:
        tool.removal_done()
        tool.fail(function, err)
    tool.removal_done()


def cmd_revoke(tool: Kfctl, args: list[str]) -> None:
    _single_key_removal(tool, args, "revoke", "keyctl_revoke")


def cmd_clear(tool: Kfctl, args: list[str]) -> None:
    _single_key_removal(tool, args, "clear", "keyctl_clear")


def cmd_invalidate(tool: Kfctl, args: list[str]) -> None:
    _single_key_removal(tool, args, "invalidate", "keyctl_invalidate")


def cmd_link(tool: Kfctl, args: list[str]) -> None:
    if len(args) != 2:
        tool.usage()
    key = tool.key(args[0])
    keyring = tool.key(args[1])
    try:
        tool.client.link(key, keyring)
    except OSError as err:
        tool.fail("keyctl_link", err)


def cmd_unlink(tool: Kfctl, args: list[str]) -> None:
    if len(args) not in (1, 2):
        tool.usage()
    key = tool.key(args[0])
    client = tool.client
    if len(args) == 2:
        keyring = tool.key(args[1])
        try:
            client.unlink(key, keyring, **tool.removal("unlink"))
        except OSError as err:
            tool.removal_done()
            tool.fail("keyctl_unlink", err)
        tool.removal_done()
        return

    def unlink_match(parent: int, member: int, raw: str | None, error: OSError | None) -> int:
        if member != key:
            return 0
        return _try_unlink(tool, member, parent, "unlink")

    count = _session_scan(tool, unlink_match)
    tool.out(f"{count} links removed\n")


def _try_unlink(tool: Kfctl, key: int, keyring: int, command: str) -> int:
    try:
        tool.client.unlink(key, keyring, **tool.removal(command))
    except OSError:
        return 0
    finally:
        tool.removal_done()
    return 1


if TYPE_CHECKING:
    Scanner = Callable[[int, int, str | None, OSError | None], int]


def _session_scan(tool: Kfctl, func: Scanner) -> int:
    """libkeyutils' recursive_session_key_scan(): depth first through the
    session keyring tree, members before their keyring, calling
    ``func(parent, key, raw_description | None, describe_error)``."""
    client = tool.client
    try:
        session = client.get_keyring_id(KEY_SPEC_SESSION_KEYRING, False)
    except OSError:
        return 0
    if session <= 0:
        return 0
    return _scan(tool, 0, session, func)


def _scan(tool: Kfctl, parent: int, key: int, func: Scanner) -> int:
    import errno as errno_codes

    from keyfence.cli.kfctl_text import parse_description, unpack_serials

    client = tool.client
    count = 0
    raw: str | None
    error: OSError | None = None
    try:
        raw = client.describe(key)
    except OSError as err:
        raw, error = None, err
    if raw is not None:
        desc = parse_description(raw)
        if desc is None:
            raw, error = None, OSError(errno_codes.EINVAL, os.strerror(errno_codes.EINVAL))
        elif desc.type == "keyring":
            try:
                members = unpack_serials(client.read(key))
            except OSError:
                members = []
            for member in members:
                count += _scan(tool, key, member, func)
    return count + func(parent, key, raw, error)


def cmd_move(tool: Kfctl, args: list[str]) -> None:
    flags = KEYCTL_MOVE_EXCL
    if len(args) > 3 and args[0] == "-f":
        flags = 0
        args = args[1:]
    if len(args) != 3:
        tool.usage()
    key = tool.key(args[0])
    from_ring = tool.key(args[1])
    to_ring = tool.key(args[2])
    try:
        tool.client.move(key, from_ring, to_ring, flags, **tool.removal("move"))
    except OSError as err:
        tool.removal_done()
        tool.fail("keyctl_move", err)
    tool.removal_done()


def cmd_search(tool: Kfctl, args: list[str]) -> None:
    if len(args) not in (3, 4):
        tool.usage()
    keyring = tool.key(args[0])
    dest = tool.key(args[3]) if len(args) == 4 else 0
    try:
        serial = tool.client.search(keyring, args[1], args[2], dest)
    except OSError as err:
        tool.fail("keyctl_search", err)
    tool.out(f"{serial}\n")


def _read(tool: Kfctl, args: list[str]) -> bytes:
    if len(args) != 1:
        tool.usage()
    key = tool.key(args[0])
    try:
        return tool.client.read(key)
    except OSError as err:
        tool.fail("keyctl_read_alloc", err)


def cmd_read(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import hexdump

    tool.out(hexdump(_read(tool, args)))


def cmd_pipe(tool: Kfctl, args: list[str]) -> None:
    data = _read(tool, args)
    if data:
        tool.out_bytes(data)


def cmd_print(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import printable

    tool.out_bytes(printable(_read(tool, args)))


def cmd_list(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import (
        inaccessible,
        list_header,
        list_line,
        parse_description,
        unpack_serials,
    )

    serials = unpack_serials(_read(tool, args))
    tool.out(list_header(len(serials)))
    client = tool.client
    for serial in serials:
        try:
            raw = client.describe(serial)
        except OSError as err:
            tool.out(inaccessible(serial, _strerror(err), width=9))
            continue
        desc = parse_description(raw)
        if desc is None:
            raise UsageError(f"Unparsable description obtained for key {serial}", code=3)
        tool.out(list_line(serial, desc, tool.granted(desc)))


def cmd_rlist(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import rlist_line, unpack_serials

    tool.out(rlist_line(unpack_serials(_read(tool, args))))


def cmd_describe(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import describe_line, parse_description

    if len(args) != 1:
        tool.usage()
    key = tool.key(args[0])
    try:
        raw = tool.client.describe(key)
    except OSError as err:
        tool.fail("keyctl_describe_alloc", err)
    desc = parse_description(raw)
    if desc is None:
        raise UsageError(f"Unparsable description obtained for key {key}", code=3)
    tool.out(describe_line(key, desc))


def cmd_rdescribe(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import rdescribe

    if len(args) not in (1, 2) or (len(args) == 2 and not args[1]):
        tool.usage()
    key = tool.key(args[0])
    try:
        raw = tool.client.describe(key)
    except OSError as err:
        tool.fail("keyctl_describe", err)
    tool.out(rdescribe(raw, args[1] if len(args) == 2 else None))


def _owner(value: int) -> int:
    """A uid_t/gid_t argument: 32 bits, (uid_t)-1 meaning "leave alone"."""
    value &= 0xFFFFFFFF
    return -1 if value == 0xFFFFFFFF else value


def cmd_chown(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import parse_number

    if len(args) != 2:
        tool.usage()
    key = tool.key(args[0])
    uid = _owner(parse_number(args[1], "uid"))
    try:
        tool.client.chown(key, uid, -1)
    except OSError as err:
        tool.fail("keyctl_chown", err)


def cmd_chgrp(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import parse_number

    if len(args) != 2:
        tool.usage()
    key = tool.key(args[0])
    gid = _owner(parse_number(args[1], "gid"))
    try:
        tool.client.chown(key, -1, gid)
    except OSError as err:
        tool.fail("keyctl_chown", err)


def cmd_setperm(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import parse_number

    if len(args) != 2:
        tool.usage()
    key = tool.key(args[0])
    perm = parse_number(args[1], "permissions") & 0xFFFFFFFF
    try:
        tool.client.setperm(key, perm)
    except OSError as err:
        tool.fail("keyctl_setperm", err)


def cmd_session(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_session import exec_program

    name = None
    if args:
        name = None if args[0] == "-" else args[0]
        args = args[1:]
    try:
        serial = tool.client.join_session_keyring(name)
    except OSError as err:
        tool.fail("keyctl_join_session_keyring", err)
    tool.err(f"Joined session keyring: {serial}\n")
    tool.client.close()
    tool.flush()
    exec_program(args, tool.err)


def cmd_new_session(tool: Kfctl, args: list[str]) -> None:
    if len(args) > 1:
        tool.usage()
    client = tool.client
    try:
        client.join_session_keyring(args[0] if args else None)
    except OSError as err:
        tool.fail("keyctl_join_session_keyring", err)
    # as keyctl: the new keyring goes to our parent (the shell)
    try:
        client.session_to_parent()
    except OSError as err:
        tool.fail("keyctl_session_to_parent", err)
    try:
        serial = client.get_keyring_id(KEY_SPEC_SESSION_KEYRING, False)
    except OSError as err:
        tool.fail("keyctl_get_keyring_ID", err)
    tool.out(f"{serial}\n")


def cmd_timeout(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import parse_number

    if len(args) != 2:
        tool.usage()
    key = tool.key(args[0])
    seconds = parse_number(args[1], "timeout", 10) & 0xFFFFFFFF
    options = tool.removal("timeout")
    options.pop("progress", None)
    try:
        if options:
            tool.client.set_timeout(key, seconds, **options)
        else:
            tool.client.set_timeout(key, seconds)
    except TypeError:
        tool.err(f"{tool.prog}: timeout: this keyfence client takes no --timeout/--emergency\n")
        raise Exit(2) from None
    except OSError as err:
        tool.fail("keyctl_set_timeout", err)


def cmd_security(tool: Kfctl, args: list[str]) -> None:
    if len(args) != 1:
        tool.usage()
    key = tool.key(args[0])
    try:
        label = tool.client.get_security(key)
    except OSError as err:
        tool.fail("keyctl_getsecurity", err)
    tool.out(f"{label}\n")


def cmd_reap(tool: Kfctl, args: list[str]) -> None:
    import errno as errno_codes

    verbose, args = _flag(args, "-v")
    if args:
        tool.usage()

    def reap(parent: int, key: int, raw: str | None, error: OSError | None) -> int:
        if raw is not None or (error is not None and error.errno == errno_codes.EACCES):
            return 0
        if verbose:
            tool.out(f"Reap {key}")
        try:
            tool.client.unlink(key, parent)
        except OSError as err:
            if verbose:
                tool.out(f"... failed {_strerror(err)}\n")
            return 0
        if verbose:
            tool.out("\n")
        return 1

    count = _session_scan(tool, reap)
    tool.out(f"{count} keys reaped\n")


def cmd_purge(tool: Kfctl, args: list[str]) -> None:
    from keyfence.cli.kfctl_text import purge_match

    search_mode = prefix = fold = False
    while args and args[0].startswith("-"):
        letter = args[0][1:2]
        if letter == "s":
            search_mode = True
        elif letter == "p":
            prefix = True
        elif letter == "i":
            fold = True
        else:
            tool.usage()
        args = args[1:]
    if not args:
        tool.usage()
    key_type = args[0]
    description = args[1] if len(args) > 1 else ""
    func: Scanner
    if search_mode:
        if len(args) != 2 or prefix or fold:
            tool.usage()

        def by_search(parent: int, keyring: int, raw: str | None, error: OSError | None) -> int:
            if raw is None or not raw.startswith("keyring;"):
                return 0
            count = 0
            while True:
                try:
                    found = tool.client.search(keyring, key_type, description, 0)
                except OSError:
                    return count
                if not _try_unlink(tool, found, keyring, "purge"):
                    return count
                count += 1

        func = by_search
    elif len(args) == 1:
        if prefix or fold:
            tool.usage()

        def by_type(parent: int, key: int, raw: str | None, error: OSError | None) -> int:
            if parent == 0 or raw is None or raw.partition(";")[0] != key_type:
                return 0
            return _try_unlink(tool, key, parent, "purge")

        func = by_type
    elif len(args) == 2:

        def literal(parent: int, key: int, raw: str | None, error: OSError | None) -> int:
            if parent == 0 or raw is None:
                return 0
            if not purge_match(raw, key_type, description, prefix=prefix, fold=fold):
                return 0
            tool.out(f"{key_type} '{raw.rpartition(';')[2]}'\n")
            return _try_unlink(tool, key, parent, "purge")

        func = literal
    else:
        tool.usage()
    count = _session_scan(tool, func)
    tool.out(f"purged {count} keys\n")


def cmd_watch(tool: Kfctl, args: list[str]) -> None:
    import threading

    from keyfence.cli.kfctl_text import watch_line, watch_mask

    filters: str | None = None
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            positional.extend(args[i + 1 :])
            break
        if arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                letter = arg[j]
                if letter != "f":
                    tool.err(f"watch: invalid option -- '{letter}'\n")
                    raise UsageError("Unknown option")
                value = arg[j + 1 :]
                if not value:
                    if i + 1 >= len(args):
                        tool.err("watch: option requires an argument -- 'f'\n")
                        raise UsageError("Unknown option")
                    i += 1
                    value = args[i]
                watch_mask(value)  # an unknown letter fails here, as in getopt's loop
                filters = (filters or "") + value
                break
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 1:
        tool.usage()
    key = tool.key(positional[0])
    mask = watch_mask(filters)
    done = threading.Event()

    def on_event(note: Any) -> None:
        tool.out(watch_line(note.key, note.event, note.aux))
        tool.flush()
        if note.event == "gc":
            done.set()

    client = tool.client
    try:
        client.watch(key, on_event, mask)
    except OSError as err:
        tool.fail("keyctl_watch_key", err)
    while not done.wait(0.5):
        if getattr(client, "_closed", False) or getattr(client, "closed", False):
            tool.flush()
            tool.err("watch: the keyfence daemon closed the connection\n")
            raise Exit(1)


_EPERM = 1
_EOPNOTSUPP = 95


def _unsupported(
    function: str,
    code: int,
    counts: tuple[int, ...] | int,
    keys: tuple[int, ...] = (),
    numbers: tuple[tuple[int, str, int], ...] = (),
    *,
    hex_flag: bool = False,
) -> Callable[[Kfctl, list[str]], None]:
    """A keyctl command keyfence has no counterpart for.  keyctl's own
    checks run first (argument count, key syntax, numbers), then it fails
    as the kernel fails when it lacks the feature: ``counts`` is the
    allowed numbers of arguments (an int: at least that many), ``keys``
    the positions of key ids, ``numbers`` (position, what, base) of
    strtoul() arguments."""

    def run(tool: Kfctl, args: list[str]) -> None:
        from keyfence.cli.kfctl_text import parse_key_id, parse_number

        if hex_flag:
            _, args = _flag(args, "-x")
        if len(args) < counts if isinstance(counts, int) else len(args) not in counts:
            tool.usage()
        for index in sorted({*keys, *(n[0] for n in numbers)}):
            if index >= len(args):
                continue
            if index in keys:
                parse_key_id(args[index])
            else:
                _, what, base = next(n for n in numbers if n[0] == index)
                parse_number(args[index], what, base)
        tool.fail(function, OSError(code, os.strerror(code)))

    return run


COMMANDS: dict[str, Callable[[Kfctl, list[str]], None]] = {
    "--version": cmd_version,
    "--help": cmd_help,
    "add": cmd_add,
    "chgrp": cmd_chgrp,
    "chown": cmd_chown,
    "clear": cmd_clear,
    "describe": cmd_describe,
    "dh_compute": _unsupported("keyctl_dh_compute_alloc", _EOPNOTSUPP, (3,), (0, 1, 2)),
    "dh_compute_kdf": _unsupported("keyctl_dh_compute_kdf", _EOPNOTSUPP, (5,), (0, 1, 2)),
    "dh_compute_kdf_oi": _unsupported(
        "keyctl_dh_compute_kdf", _EOPNOTSUPP, (5,), (0, 1, 2), hex_flag=True
    ),
    "get_persistent": _unsupported(
        "keyctl_get_persistent", _EOPNOTSUPP, (1, 2), (0,), ((1, "uid", 0),)
    ),
    "id": cmd_id,
    "instantiate": _unsupported("keyctl_instantiate", _EPERM, (3,), (0, 2), hex_flag=True),
    "invalidate": cmd_invalidate,
    "link": cmd_link,
    "list": cmd_list,
    "move": cmd_move,
    "negate": _unsupported("keyctl_negate", _EPERM, (3,), (0, 2), ((1, "timeout", 10),)),
    "new_session": cmd_new_session,
    "newring": cmd_newring,
    "padd": cmd_padd,
    "pinstantiate": _unsupported("keyctl_instantiate", _EPERM, (2,), (0, 1), hex_flag=True),
    "pipe": cmd_pipe,
    "pkey_query": _unsupported("keyctl_pkey_query", _EOPNOTSUPP, 2, (0,)),
    "pkey_encrypt": _unsupported("keyctl_pkey_query", _EOPNOTSUPP, 3, (0,)),
    "pkey_decrypt": _unsupported("keyctl_pkey_query", _EOPNOTSUPP, 3, (0,)),
    "pkey_sign": _unsupported("keyctl_pkey_query", _EOPNOTSUPP, 3, (0,)),
    "pkey_verify": _unsupported("keyctl_pkey_verify", _EOPNOTSUPP, 4, (0,)),
    "prequest2": cmd_prequest2,
    "print": cmd_print,
    "pupdate": cmd_pupdate,
    "purge": cmd_purge,
    "rdescribe": cmd_rdescribe,
    "read": cmd_read,
    "reap": cmd_reap,
    "reject": _unsupported("keyctl_negate", _EPERM, (4,), (0, 3), ((1, "timeout", 10),)),
    "request": cmd_request,
    "request2": cmd_request2,
    "restrict_keyring": _unsupported("keyctl_restrict_keyring", _EOPNOTSUPP, (1, 2, 3), (0,)),
    "revoke": cmd_revoke,
    "rlist": cmd_rlist,
    "search": cmd_search,
    "security": cmd_security,
    "session": cmd_session,
    "setperm": cmd_setperm,
    "show": cmd_show,
    "supports": cmd_supports,
    "timeout": cmd_timeout,
    "unlink": cmd_unlink,
    "update": cmd_update,
    "watch": cmd_watch,
    "watch_add": _unsupported("keyctl_watch_key", _EOPNOTSUPP, (2,), (1,)),
    "watch_rm": _unsupported("keyctl_watch_key", _EOPNOTSUPP, (2,), (1,)),
    "watch_session": _unsupported("keyctl_watch_key/session", _EOPNOTSUPP, 4),
    "watch_sync": _unsupported("keyctl_watch_sync", _EOPNOTSUPP, (1,)),
}


def run(argv: list[str], tool: Kfctl) -> int:
    """Run one command line (without the program name); the exit status."""
    try:
        if not argv:
            tool.usage()
        # keyctl 1.6.3 accepts exact command names only (its prefix
        # matching never matches a shorter word)
        command = COMMANDS.get(argv[0])
        if command is None:
            tool.err("Unknown command\n")
            return 2
        args = argv[1:]
        if argv[0] in REMOVAL_COMMANDS:
            args = _removal_options(tool, args)
        command(tool, args)
        return 0
    except Exit as done:
        return done.code
    except UsageError as err:
        tool.err(usage_text(tool.prog) if err.message is None else err.message + "\n")
        return err.code


def main(argv: list[str] | None = None) -> int:
    import signal

    # die of SIGPIPE and SIGINT as a C program does, silently
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if argv is None:
        argv = sys.argv[1:]
    tool = Kfctl(program_name(sys.argv[0] if sys.argv else "kfctl"))
    try:
        return run(argv, tool)
    finally:
        tool.flush()


if __name__ == "__main__":
    sys.exit(main())
