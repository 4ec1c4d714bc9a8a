"""keyctl's own argument checks for the commands keyfence does not model
(``pkey_*``, ``dh_compute_kdf``, ``dh_compute_kdf_oi``), in keyctl 1.6.3's
order, before the kernel's "Operation not supported".

keyctl checks these itself, so a script sees its messages and exit codes
whatever the kernel supports: the ``k=v`` options (``Option not in key=val
form``, ``Too many info options``: exit 2), the password (only ``0``:
``Password passing is not yet supported``, exit 2), the data files
(``<file>: <strerror>``, exit 1), the length of a KDF's output
(``dh_compute: cannot convert generated length value: ...``, ``dh_compute:
cannot allocate memory: ...``, exit 1).
"""

from __future__ import annotations

import errno
import posix

from keyfence.cli.kfctl_text import Exit, UsageError, fsencode, parse_key_id, strtoul
from keyfence.cli.kfctl_tool import Kfctl

INFO_MAX = 4096
"""keyctl's ``char info[4096]`` for the k=v options, NUL included."""
ULONG_MAX = (1 << 64) - 1


def _fail(tool: Kfctl, function: str, code: int) -> None:
    tool.fail(function, OSError(code, posix.strerror(code)))


def parse_info(options: list[str]) -> None:
    """keyctl's pkey_parse_info(): every option ``k=v``, all of them joined
    by spaces within 4095 bytes."""
    used = 0
    for option in options:
        size = len(fsencode(option))
        if "=" not in option:
            raise UsageError("Option not in key=val form")
        if size + 1 > INFO_MAX - 1 - used:
            raise UsageError("Too many info options")
        used += size + (1 if used else 0)


def read_file(tool: Kfctl, name: str) -> None:
    """keyctl's read_file(): open, fstat, read the file's size; an error is
    ``<name>: <strerror>``, exit 1 (a directory: EISDIR on the read)."""
    try:
        fd = posix.open(fsencode(name), posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError as err:
        tool.fail(name, err)
    try:
        size = posix.fstat(fd).st_size
        got = 0
        while got < size:  # read(2) of st_size bytes, as keyctl's one read
            chunk = posix.read(fd, min(size - got, 1 << 20))
            if not chunk:
                break
            got += len(chunk)
    except OSError as err:
        tool.fail(name, err)
    finally:
        posix.close(fd)
    if got != size:
        tool.err(f"{name}: Short read\n")
        raise Exit(1)


def pkey(tool: Kfctl, args: list[str], files: int, function: str) -> None:
    """pkey_query (no file), pkey_encrypt/decrypt/sign (one), pkey_verify
    (data and signature): ``<key> <pass> [files] [k=v]*``."""
    parse_info(args[2 + files :])
    parse_key_id(args[0])
    if args[1] != "0":
        raise UsageError("Password passing is not yet supported")
    for name in args[2 : 2 + files]:
        read_file(tool, name)
    _fail(tool, function, errno.EOPNOTSUPP)


def _memory_limit() -> int:
    """What malloc() can get under the kernel's heuristic overcommit: about
    the RAM and swap there are."""
    total = 0
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith((b"MemTotal:", b"SwapTotal:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return ULONG_MAX
    return total or ULONG_MAX


def kdf_length(tool: Kfctl, text: str) -> None:
    """keyctl's ``strtoul(len, NULL, 10)`` then ``malloc(len)``."""
    value, rest = strtoul(text, 10)
    if value == ULONG_MAX:
        digits = text[: len(text) - len(rest)].strip().lstrip("+-")
        code = errno.ERANGE if digits and int(digits) > ULONG_MAX else 0
        message = posix.strerror(code) if code else "Success"
        tool.err(f"dh_compute: cannot convert generated length value: {message}\n")
        raise Exit(1)
    if value > _memory_limit():
        _fail(tool, "dh_compute: cannot allocate memory", errno.ENOMEM)


def dh_compute_kdf(tool: Kfctl, args: list[str], hex_info: bool, other_info: bool) -> None:
    """dh_compute_kdf / dh_compute_kdf_oi ``<private> <prime> <base> <len>
    <hash_name>``: the key ids, the length, (``_oi``: stdin, as hex with
    ``-x``), then the kernel's answer."""
    for arg in args[:3]:
        parse_key_id(arg)
    kdf_length(tool, args[3])
    if other_info:
        from keyfence.cli.kfctl_text import hex2bin

        data = tool.stdin_data()
        if hex_info:
            hex2bin(data)
    _fail(tool, "keyctl_dh_compute_kdf", errno.EOPNOTSUPP)
