"""kfctl's commands: one function per keyctl command, named in kfctl.TABLE.

Each takes the tool, the arguments after the command name (the table has
already taken the leading flag and checked how many there are) and
whether the flag was given.  The order of the remaining checks (and so
which error wins) follows keyctl.
"""

from __future__ import annotations

import errno
import posix  # not os: kfctl's start-up

from keyfence.cli.kfctl_text import Exit, UsageError, fsencode
from keyfence.cli.kfctl_tool import (
    HELP_EXTRA,
    KEY_SPEC_SESSION_KEYRING,
    KEYCTL_MOVE_EXCL,
    Kfctl,
    _strerror,
    usage_text,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# ---------------------------------------------------------------- commands
# Each takes the arguments after the command name; argument counts, the
# order of checks (and so which error wins) follow keyctl.


def cmd_version(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence import __version__

    # keyctl's line byte for byte ("keyctl from", whatever its name), so that
    # scripts reading the keyutils version from it work; keyfence's own
    # version stands where keyctl's build date does
    tool.out(f"keyctl from keyutils-1.6.3 (Built keyfence-{__version__})\n")


def cmd_help(tool: Kfctl, args: list[str], flag: bool) -> None:
    tool.out(usage_text(tool.prog) + HELP_EXTRA)


def cmd_supports(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import KEYFENCE_CAPS, has_capability, supports_lines

    if not args:
        tool.out(supports_lines(KEYFENCE_CAPS))
        return
    if args[0] == "--raw":
        tool.out(KEYFENCE_CAPS.hex() + "\n")
    have = has_capability(KEYFENCE_CAPS, args[0])
    raise Exit(3 if have is None else 0 if have else 1)


def cmd_id(tool: Kfctl, args: list[str], flag: bool) -> None:
    key = tool.key(args[0])
    try:
        serial = tool.client.get_keyring_id(key, False)
    except OSError as err:
        tool.fail("keyctl_get_keyring_ID", err)
    tool.out(f"{serial}\n")


def cmd_show(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import TreeError, show_tree

    hex_ids = flag
    if len(args) > 1:
        tool.usage()
    keyring = tool.key(args[0]) if args else KEY_SPEC_SESSION_KEYRING
    tool.out("Keyring\n" if args else "Session Keyring\n")
    client = tool.client
    describe: Callable[[int], str] = client.describe
    read: Callable[[int], bytes] = client.read
    try:
        # one request for the whole tree; a daemon without it (EOPNOTSUPP)
        # or a tree too big for one answer (E2BIG): key by key, as keyctl
        root, table = client.keyring_tree(keyring)
        describe, read = _tree_lookups(table, describe, read)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.E2BIG):
            tool.fail("Unable to dump key", err)
        try:
            root = client.get_keyring_id(keyring, False)
        except OSError as err:
            tool.fail("Unable to dump key", err)
    try:
        for line in show_tree(root, describe, read, tool.granted, _strerror, hex_ids=hex_ids):
            tool.out(line)
    except TreeError as err:
        tool.fail(err.function, err.error)


def _tree_lookups(
    table: dict[int, tuple[str | int, bytes | int | None]],
    describe: Callable[[int], str],
    read: Callable[[int], bytes],
) -> tuple[Callable[[int], str], Callable[[int], bytes]]:
    """describe and read answered from a keyring_tree table (each entry is
    what the daemon's describe and read gave: a value or an errno); a key
    the table lacks is asked for."""

    def described(key: int) -> str:
        entry = table.get(key)
        if entry is None:
            return describe(key)
        value = entry[0]
        if isinstance(value, int):
            raise OSError(value, posix.strerror(value))
        return value

    def members(key: int) -> bytes:
        entry = table.get(key)
        if entry is None or entry[1] is None:
            return read(key)
        value = entry[1]
        if isinstance(value, int):
            raise OSError(value, posix.strerror(value))
        return value

    return described, members


def _add(tool: Kfctl, key_type: str, description: str, data: bytes | None, dest: int) -> None:
    try:
        serial = tool.client.add_key(key_type, description, data, dest)
    except OSError as err:
        tool.fail("add_key", err)
    tool.out(f"{serial}\n")


def cmd_add(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import hex2bin

    as_hex = flag
    data = fsencode(args[2])
    if as_hex and data:
        data = hex2bin(data)
    dest = tool.key(args[3])
    _add(tool, args[0], args[1], data, dest)


def cmd_padd(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import hex2bin

    as_hex = flag
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


def cmd_request(tool: Kfctl, args: list[str], flag: bool) -> None:
    _request(tool, args, None)


def cmd_request2(tool: Kfctl, args: list[str], flag: bool) -> None:
    _request(tool, [args[0], args[1], *args[3:]], args[2])


def cmd_prequest2(tool: Kfctl, args: list[str], flag: bool) -> None:
    info = tool.stdin_data().split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    _request(tool, args, info)


def _update(tool: Kfctl, key: int, data: bytes) -> None:
    try:
        tool.client.update(key, data)
    except OSError as err:
        tool.fail("keyctl_update", err)


def cmd_update(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import hex2bin

    as_hex = flag
    data = fsencode(args[1])
    if as_hex and data:
        data = hex2bin(data)
    _update(tool, tool.key(args[0]), data)


def cmd_pupdate(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import hex2bin

    as_hex = flag
    key = tool.key(args[0])
    data = tool.stdin_data()
    if as_hex and data:
        data = hex2bin(data)
    _update(tool, key, data)


def cmd_newring(tool: Kfctl, args: list[str], flag: bool) -> None:
    dest = tool.key(args[1])
    _add(tool, "keyring", args[0], None, dest)


def _single_key_removal(tool: Kfctl, args: list[str], command: str, function: str) -> None:
    key = tool.key(args[0])
    op: Callable[..., None] = getattr(tool.client, command)
    try:
        op(key, **tool.removal(command))
    except OSError as err:
        tool.removal_done()
        tool.fail(function, err)
    tool.removal_done()


def cmd_revoke(tool: Kfctl, args: list[str], flag: bool) -> None:
    _single_key_removal(tool, args, "revoke", "keyctl_revoke")


def cmd_clear(tool: Kfctl, args: list[str], flag: bool) -> None:
    _single_key_removal(tool, args, "clear", "keyctl_clear")


def cmd_invalidate(tool: Kfctl, args: list[str], flag: bool) -> None:
    _single_key_removal(tool, args, "invalidate", "keyctl_invalidate")


def cmd_link(tool: Kfctl, args: list[str], flag: bool) -> None:
    key = tool.key(args[0])
    keyring = tool.key(args[1])
    try:
        tool.client.link(key, keyring)
    except OSError as err:
        tool.fail("keyctl_link", err)


def cmd_unlink(tool: Kfctl, args: list[str], flag: bool) -> None:
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
            raw, error = None, OSError(errno.EINVAL, posix.strerror(errno.EINVAL))
        elif desc.type == "keyring":
            try:
                members = unpack_serials(client.read(key))
            except OSError:
                members = []
            for member in members:
                count += _scan(tool, key, member, func)
    return count + func(parent, key, raw, error)


def cmd_move(tool: Kfctl, args: list[str], flag: bool) -> None:
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


def cmd_search(tool: Kfctl, args: list[str], flag: bool) -> None:
    keyring = tool.key(args[0])
    dest = tool.key(args[3]) if len(args) == 4 else 0
    try:
        serial = tool.client.search(keyring, args[1], args[2], dest)
    except OSError as err:
        tool.fail("keyctl_search", err)
    tool.out(f"{serial}\n")


def _read(tool: Kfctl, args: list[str]) -> bytes:
    key = tool.key(args[0])
    try:
        return tool.client.read(key)
    except OSError as err:
        tool.fail("keyctl_read_alloc", err)


def cmd_read(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import hexdump

    tool.out(hexdump(_read(tool, args)))


def cmd_pipe(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_tool import write_or_raise

    data = _read(tool, args)
    if data:
        # keyctl's pipe write(2)s the payload and, alone of its commands,
        # reports a failed write
        tool.flush()
        try:
            write_or_raise(1, data)
        except OSError as err:
            tool.fail("write", err)


def cmd_print(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import printable

    tool.out_bytes(printable(_read(tool, args)))


def cmd_list(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import (
        inaccessible,
        list_header,
        list_line,
        parse_description,
    )

    key = tool.key(args[0])
    members = _members(tool, key)
    tool.out(list_header(len(members)))
    for serial, raw in members:
        if isinstance(raw, int):
            tool.out(inaccessible(serial, posix.strerror(raw), width=9))
            continue
        desc = parse_description(raw)
        if desc is None:
            raise UsageError(f"Unparsable description obtained for key {serial}", code=3)
        tool.out(list_line(serial, desc, tool.granted(desc)))


def _members(tool: Kfctl, key: int) -> list[tuple[int, str | int]]:
    """keyctl list's read of ``key`` and describe of each serial in it, as
    (serial, description or errno): one request; key by key for what that
    request refuses (a key that is not a keyring, whose payload keyctl
    lists as serials all the same; more than one answer holds; an older
    daemon)."""
    from keyfence.cli.kfctl_text import unpack_serials

    client = tool.client
    try:
        return client.keyring_members(key)
    except OSError as err:
        if err.errno not in (errno.ENOTDIR, errno.E2BIG, errno.EOPNOTSUPP):
            tool.fail("keyctl_read_alloc", err)
    try:
        data = client.read(key)
    except OSError as err:
        tool.fail("keyctl_read_alloc", err)
    members: list[tuple[int, str | int]] = []
    for serial in unpack_serials(data):
        try:
            members.append((serial, client.describe(serial)))
        except OSError as err:
            members.append((serial, err.errno or errno.EIO))
    return members


def cmd_rlist(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import rlist_line, unpack_serials

    tool.out(rlist_line(unpack_serials(_read(tool, args))))


def cmd_describe(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import describe_line, parse_description

    key = tool.key(args[0])
    try:
        raw = tool.client.describe(key)
    except OSError as err:
        tool.fail("keyctl_describe_alloc", err)
    desc = parse_description(raw)
    if desc is None:
        raise UsageError(f"Unparsable description obtained for key {key}", code=3)
    tool.out(describe_line(key, desc))


def cmd_rdescribe(tool: Kfctl, args: list[str], flag: bool) -> None:
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


def cmd_chown(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import parse_number

    key = tool.key(args[0])
    uid = _owner(parse_number(args[1], "uid"))
    try:
        tool.client.chown(key, uid, -1)
    except OSError as err:
        tool.fail("keyctl_chown", err)


def cmd_chgrp(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import parse_number

    key = tool.key(args[0])
    gid = _owner(parse_number(args[1], "gid"))
    try:
        tool.client.chown(key, -1, gid)
    except OSError as err:
        tool.fail("keyctl_chown", err)


def cmd_setperm(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import parse_number

    key = tool.key(args[0])
    perm = parse_number(args[1], "permissions") & 0xFFFFFFFF
    try:
        tool.client.setperm(key, perm)
    except OSError as err:
        tool.fail("keyctl_setperm", err)


def cmd_session(tool: Kfctl, args: list[str], flag: bool) -> None:
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


def cmd_new_session(tool: Kfctl, args: list[str], flag: bool) -> None:
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


def cmd_timeout(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_text import parse_number

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


def cmd_security(tool: Kfctl, args: list[str], flag: bool) -> None:
    key = tool.key(args[0])
    try:
        label = tool.client.get_security(key)
    except OSError as err:
        tool.fail("keyctl_getsecurity", err)
    tool.out(f"{label}\n")


def cmd_reap(tool: Kfctl, args: list[str], flag: bool) -> None:

    verbose = flag
    if args:
        tool.usage()

    def reap(parent: int, key: int, raw: str | None, error: OSError | None) -> int:
        if raw is not None or (error is not None and error.errno == errno.EACCES):
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


def cmd_purge(tool: Kfctl, args: list[str], flag: bool) -> None:
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


def cmd_watch(tool: Kfctl, args: list[str], flag: bool) -> None:
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
        # keyctl's consumer prints a full watch queue's loss this way
        tool.out(
            "-- LOSS --\n" if note.event == "loss" else watch_line(note.key, note.event, note.aux)
        )
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


# -- what keyfence does not model: keyctl's own checks first (key syntax,
# numbers), then the error the kernel gives when it lacks the feature


def _unsupported(
    tool: Kfctl,
    args: list[str],
    function: str,
    keys: tuple[int, ...],
    numbers: tuple[tuple[int, str, int], ...] = (),
) -> None:
    from keyfence.cli.kfctl_text import parse_key_id, parse_number

    for index in sorted({*keys, *(n[0] for n in numbers)}):
        if index >= len(args):
            continue
        if index in keys:
            parse_key_id(args[index])
        else:
            _, what, base = next(n for n in numbers if n[0] == index)
            parse_number(args[index], what, base)
    tool.fail(function, OSError(errno.EOPNOTSUPP, posix.strerror(errno.EOPNOTSUPP)))


def cmd_dh_compute(tool: Kfctl, args: list[str], flag: bool) -> None:
    function = "keyctl_dh_compute_alloc" if len(args) == 3 else "keyctl_dh_compute_kdf"
    _unsupported(tool, args, function, (0, 1, 2))


def cmd_dh_compute_kdf(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_pkey import dh_compute_kdf

    dh_compute_kdf(tool, args, flag, other_info=False)


def cmd_dh_compute_kdf_oi(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_pkey import dh_compute_kdf

    dh_compute_kdf(tool, args, flag, other_info=True)


def cmd_get_persistent(tool: Kfctl, args: list[str], flag: bool) -> None:
    _unsupported(tool, args, "keyctl_get_persistent", (0,), ((1, "uid", 0),))


def cmd_pkey_query(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_pkey import pkey

    pkey(tool, args, 0, "keyctl_pkey_query")


def cmd_pkey_data(tool: Kfctl, args: list[str], flag: bool) -> None:
    """pkey_encrypt, pkey_decrypt, pkey_sign: keyctl queries the key first."""
    from keyfence.cli.kfctl_pkey import pkey

    pkey(tool, args, 1, "keyctl_pkey_query")


def cmd_pkey_verify(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli.kfctl_pkey import pkey

    pkey(tool, args, 2, "keyctl_pkey_verify")


def cmd_restrict_keyring(tool: Kfctl, args: list[str], flag: bool) -> None:
    _unsupported(tool, args, "keyctl_restrict_keyring", (0,))


# -- the request-key upcall's side: only a handler holding the authority
# over a key under construction may use these (else EPERM, as the kernel).
# keyctl resolves both key ids before it reads or decodes the data.


def _instantiate(tool: Kfctl, key: int, data: bytes, dest: int, as_hex: bool) -> None:
    if as_hex and data:
        from keyfence.cli.kfctl_text import hex2bin

        data = hex2bin(data)
    try:
        tool.client.instantiate(key, data, dest)
    except OSError as err:
        tool.fail("keyctl_instantiate", err)


def cmd_instantiate(tool: Kfctl, args: list[str], flag: bool) -> None:
    key = tool.key(args[0])
    dest = tool.key(args[2])
    _instantiate(tool, key, fsencode(args[1]), dest, flag)


def cmd_pinstantiate(tool: Kfctl, args: list[str], flag: bool) -> None:
    key = tool.key(args[0])
    dest = tool.key(args[1])
    _instantiate(tool, key, tool.stdin_data(), dest, flag)


REJECT_ERRORS = {
    "rejected": errno.EKEYREJECTED,
    "revoked": errno.EKEYREVOKED,
    "expired": errno.EKEYEXPIRED,
}


def _negate(tool: Kfctl, args: list[str], error_arg: str | None) -> None:
    from keyfence.cli.kfctl_text import parse_number

    key = tool.key(args[0])
    timeout = parse_number(args[1], "timeout", 10)
    error = errno.ENOKEY
    if error_arg is not None:
        named = REJECT_ERRORS.get(error_arg)
        error = named if named is not None else parse_number(error_arg, "error", 10)
    dest = tool.key(args[-1])
    try:
        tool.client.reject(key, timeout & 0xFFFFFFFF, error & 0xFFFFFFFF, dest)
    except OSError as err:
        tool.fail("keyctl_negate", err)


def cmd_negate(tool: Kfctl, args: list[str], flag: bool) -> None:
    _negate(tool, args, None)


def cmd_reject(tool: Kfctl, args: list[str], flag: bool) -> None:
    _negate(tool, args, args[2])


def cmd_watch_add(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli import kfctl_watch

    kfctl_watch.cmd_watch_add(tool, args, flag)


def cmd_watch_rm(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli import kfctl_watch

    kfctl_watch.cmd_watch_rm(tool, args, flag)


def cmd_watch_session(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli import kfctl_watch

    kfctl_watch.cmd_watch_session(tool, args, flag)


def cmd_watch_sync(tool: Kfctl, args: list[str], flag: bool) -> None:
    from keyfence.cli import kfctl_watch

    kfctl_watch.cmd_watch_sync(tool, args, flag)
