"""kfctl's pure parts: argument parsing and output formats of keyctl(1).

Everything here is a function of its arguments (no daemon, no I/O), so it
can be unit-tested on its own and imported in a couple of milliseconds.
The formats reproduce what Debian's keyutils 1.6.3 ``keyctl`` prints, byte
for byte; each function names the keyctl command whose output it makes.
"""

from __future__ import annotations

import sys

from keyfence.wire import ALL_EVENTS, EVENT_BITS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# -- special key ids (keyctl(1) "KEY IDENTIFIERS")

SPECIAL_IDS = {
    "@t": -1,
    "@p": -2,
    "@s": -3,
    "@u": -4,
    "@us": -5,
    "@g": -6,
    "@a": -7,
}
KEY_SPEC_SESSION_KEYRING = -3

ULONG_MAX = (1 << 64) - 1
_C_SPACE = " \t\n\v\f\r"


class UsageError(Exception):
    """Bad command-line input: keyctl prints ``message`` and exits ``code``.

    ``message`` None means "print the Format: text" (keyctl's format()).
    """

    def __init__(self, message: str | None = None, code: int = 2) -> None:
        super().__init__(message or "usage")
        self.message = message
        self.code = code


class Exit(Exception):
    """Leave with this status (output already written).  Here, not in kfctl,
    so that ``python -m keyfence.cli.kfctl`` (whose module is __main__) and
    the command modules raise and catch one class."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Record:
    """A small value type (typing.NamedTuple would cost kfctl milliseconds
    of start-up importing typing)."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Record)
            and type(other) is type(self)
            and self._values() == other._values()
        )

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class NameLookup(_Record):
    """A ``%type:description`` (or ``%:name``) key id, resolved later."""

    __slots__ = ("description", "type")

    def __init__(self, type: str, description: str) -> None:
        self.type = type
        self.description = description


def strtoul(text: str, base: int = 0) -> tuple[int, str]:
    """C's strtoul(): the value and the unparsed rest of ``text``.

    Leading white space and one sign are skipped; base 0 picks hex for
    ``0x``, octal for a leading ``0``, else decimal; a minus sign negates
    modulo 2**64; overflow gives ULONG_MAX; no digits at all leaves the
    whole string unparsed (as endptr == nptr).
    """
    i = 0
    n = len(text)
    while i < n and text[i] in _C_SPACE:
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    if base == 0:
        if text[i : i + 2] in ("0x", "0X") and i + 2 < n and _digit(text[i + 2], 16) is not None:
            base = 16
            i += 2
        elif text[i : i + 1] == "0":
            base = 8
        else:
            base = 10
    elif (
        base == 16
        and text[i : i + 2] in ("0x", "0X")
        and i + 2 < n
        and _digit(text[i + 2], 16) is not None
    ):
        i += 2
    start = i
    value = 0
    while i < n:
        digit = _digit(text[i], base)
        if digit is None:
            break
        value = value * base + digit
        i += 1
    if i == start:
        return 0, text
    if value > ULONG_MAX:
        value = ULONG_MAX
    elif negative:
        value = (-value) & ULONG_MAX
    return value, text[i:]


def _digit(char: str, base: int) -> int | None:
    if "0" <= char <= "9":
        value = ord(char) - 48
    elif "a" <= char <= "z":
        value = ord(char) - 87
    elif "A" <= char <= "Z":
        value = ord(char) - 55
    else:
        return None
    return value if value < base else None


def to_int32(value: int) -> int:
    """Truncate to a key_serial_t (a signed 32-bit int), as C assignment does."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def to_uint32(value: int) -> int:
    return value & 0xFFFFFFFF


def parse_key_id(arg: str) -> int | NameLookup:
    """keyctl's get_key_id(): @t/@p/@s/@u/@us/@g/@a, %type:desc, %:name or
    a number (any base strtoul() takes, truncated to 32 bits)."""
    if arg.startswith("@"):
        special = SPECIAL_IDS.get(arg)
        if special is None:
            raise UsageError(f"Unknown special key: '{arg}'")
        return special
    if arg.startswith("%"):
        rest = arg[1:]
        if not rest:
            raise UsageError("Incorrect key-by-name spec")
        if rest.startswith(":"):
            key_type, description = "keyring", rest[1:]
        else:
            key_type, colon, description = rest.partition(":")
            if not colon:
                raise UsageError("Incorrect key-by-name spec")
        if not description:
            raise UsageError("Incorrect key-by-name spec")
        return NameLookup(key_type, description)
    value, rest = strtoul(arg, 0)
    if rest:
        raise UsageError(f"Unparsable key: '{arg}'")
    return to_int32(value)


def parse_number(arg: str, what: str, base: int = 0) -> int:
    """A strtoul() argument (uid, gid, permissions, timeout): ``Unparsable
    <what>: '<arg>'`` and exit 2 when anything is left over."""
    value, rest = strtoul(arg, base)
    if rest:
        raise UsageError(f"Unparsable {what}: '{arg}'")
    return value


def fsencode(text: str) -> bytes:
    """os.fsencode() without os (whose import costs kfctl 1.7 ms): an
    argument's bytes as the kernel gave them to us."""
    return text.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def hex2bin(data: bytes) -> bytes:
    """keyctl's -x: hex pairs, white space anywhere between pairs ignored.

    Errors (exit 1, as keyctl): "Short hex doublet", "Bad hex doublet".
    """
    out = bytearray()
    i = 0
    n = len(data)
    space = b" \t\n\v\f\r"
    hexdigits = b"0123456789abcdefABCDEF"
    while i < n:
        if data[i] in space:
            i += 1
            continue
        if n - i < 2:
            raise UsageError("Short hex doublet", code=1)
        if data[i] not in hexdigits or data[i + 1] not in hexdigits:
            raise UsageError("Bad hex doublet", code=1)
        out.append(int(data[i : i + 2], 16))
        i += 2
    return bytes(out)


# -- descriptions ("type;uid;gid;perm;description")


class Description(_Record):
    """A parsed "type;uid;gid;perm;description"."""

    __slots__ = ("description", "gid", "perm", "type", "uid")

    def __init__(self, type: str, uid: int, gid: int, perm: int, description: str) -> None:
        self.type = type
        self.uid = uid
        self.gid = gid
        self.perm = perm
        self.description = description


def parse_description(raw: str) -> Description | None:
    """Split KEYCTL_DESCRIBE's answer; None if it does not parse (keyctl
    then says "Unparsable description obtained for key N" and exits 3)."""
    parts = raw.split(";", 4)
    if len(parts) != 5 or not parts[0]:
        return None
    try:
        uid = _c_int(parts[1])
        gid = _c_int(parts[2])
        perm = int(parts[3], 16) & 0xFFFFFFFF
    except ValueError:
        return None
    return Description(parts[0], uid, gid, perm, parts[4])


def _c_int(text: str) -> int:
    """sscanf %d into an int: wrap to 32 bits."""
    return to_int32(int(text, 10))


_PERM_LETTERS = "alswrv"


def _letters(bits: int) -> str:
    return "".join(
        letter if bits & mask else "-"
        for letter, mask in zip(_PERM_LETTERS, (0x20, 0x10, 0x08, 0x04, 0x02, 0x01), strict=True)
    )


def granted_perms(
    perm: int, uid: int, gid: int, my_uid: int, my_gid: int, my_groups: frozenset[int]
) -> str:
    """keyctl's calc_perms(): the 8-character mask ``list`` and ``show``
    print: possessor bits, plus the one class (user, group, other) that
    applies to the caller."""
    bits = (perm >> 24) & 0x3F
    if to_uint32(uid) == to_uint32(my_uid):
        bits |= (perm >> 16) & 0x3F
    elif to_uint32(gid) != 0xFFFFFFFF and (
        to_uint32(gid) == to_uint32(my_gid) or to_uint32(gid) in my_groups
    ):
        bits |= (perm >> 8) & 0x3F
    else:
        bits |= perm & 0x3F
    return "--" + _letters(bits)


def full_perms(perm: int) -> str:
    """``describe``'s 24 letters: possessor, user, group, other."""
    return "".join(_letters((perm >> shift) & 0x3F) for shift in (24, 16, 8, 0))


def describe_line(key: int, desc: Description) -> str:
    """``keyctl describe``: ``%9d: <24 letters> %5d %5d type: description``."""
    return (
        f"{key:9d}: {full_perms(desc.perm)} {desc.uid:5d} {desc.gid:5d} "
        f"{desc.type}: {desc.description}\n"
    )


def list_line(key: int, desc: Description, granted: str) -> str:
    """One key of ``keyctl list``."""
    return f"{key:9d}: {granted} {desc.uid:5d} {desc.gid:5d} {desc.type}: {desc.description}\n"


def list_header(count: int) -> str:
    if count == 0:
        return "keyring is empty\n"
    if count == 1:
        return "1 key in keyring:\n"
    return f"{count} keys in keyring:\n"


def unpack_serials(data: bytes) -> list[int]:
    """A keyring's payload: native 32-bit serials (a ragged tail is ignored)."""
    count = len(data) // 4
    # memoryview, not struct: an extension module kfctl need not load
    return memoryview(data[: count * 4]).cast("i").tolist()


def rlist_line(serials: list[int]) -> str:
    """``keyctl rlist``: the serials separated by spaces (an empty line if none)."""
    return " ".join(str(s) for s in serials) + "\n"


def hexdump(data: bytes) -> str:
    """``keyctl read``: the byte count, then hex in groups of 4 bytes, 32 per line."""
    if not data:
        return "No data in key\n"
    out = [f"{len(data)} bytes of data in key:\n"]
    for i, byte in enumerate(data):
        if i:
            out.append("\n" if i % 32 == 0 else " " if i % 4 == 0 else "")
        out.append(f"{byte:02x}")
    out.append("\n")
    return "".join(out)


def printable(data: bytes) -> bytes:
    """``keyctl print``: the payload if every byte is printable ASCII (the C
    locale's isprint), else ``:hex:`` and the bytes in hex."""
    if all(0x20 <= b < 0x7F for b in data):
        return data + b"\n"
    return b":hex:" + data.hex().encode() + b"\n"


def rdescribe(raw: str, separator: str | None) -> str:
    """``keyctl rdescribe``: the raw description, ';' replaced by the first
    byte of ``separator`` (keyctl's ``argv[2][0]``, half of a multi-byte
    character; written out as that byte)."""
    if separator:
        raw = raw.replace(";", fsencode(separator)[:1].decode("utf-8", "surrogateescape"))
    return raw + "\n"


def inaccessible(key: int, strerror: str, *, width: int = 0) -> str:
    """The line keyctl prints for a key it cannot describe."""
    return f"{key:{width}d}: key inaccessible ({strerror})\n"


# -- show: the keyring tree

MAX_SHOW_DEPTH = 8 * 4
"""keyctl stops descending once the indent passes 32 characters (9 levels)."""


class TreeError(Exception):
    """Reading a keyring for ``show`` failed: keyctl exits 1 mid-tree."""

    def __init__(self, function: str, error: OSError) -> None:
        super().__init__(function)
        self.function = function
        self.error = error


def show_tree(
    root: int,
    describe: Callable[[int], str],
    read: Callable[[int], bytes],
    granted: Callable[[Description], str],
    strerror: Callable[[OSError], str],
    *,
    hex_ids: bool = False,
) -> Iterator[str]:
    """The lines of ``keyctl show`` below the title, as keyctl's
    dump_key_tree_aux() draws them.

    ``describe`` and ``read`` raise OSError on failure: a key that cannot
    be described is shown as "N: key inaccessible (reason)"; a keyring
    that cannot be read raises :class:`TreeError` (keyctl exits there).
    """
    indent: list[str] = []
    yield from _show_aux(root, 0, False, indent, describe, read, granted, strerror, hex_ids)


def _show_aux(
    key: int,
    depth: int,
    more: bool,
    indent: list[str],
    describe: Callable[[int], str],
    read: Callable[[int], bytes],
    granted: Callable[[Description], str],
    strerror: Callable[[OSError], str],
    hex_ids: bool,
) -> Iterator[str]:
    if depth > MAX_SHOW_DEPTH:
        return
    try:
        raw = describe(key)
    except OSError as err:
        yield inaccessible(key, strerror(err))
        return
    desc = parse_description(raw)
    if desc is None:
        raise UsageError(f"Unparsable description obtained for key {key}", code=3)
    ident = f"0x{to_uint32(key):08x}" if hex_ids else f"{key:10d}"
    prefix = "".join(indent[:depth])
    branch = "\\_ " if depth > 0 else ""
    yield (
        f"{ident} {granted(desc)}  {desc.uid:5d} {desc.gid:5d}  "
        f"{prefix}{branch}{desc.type}: {desc.description}\n"
    )
    if desc.type != "keyring":
        return
    try:
        payload = read(key)
    except OSError as err:
        raise TreeError("keyctl_read_alloc", err) from None
    members = unpack_serials(payload)
    for position, member in enumerate(members):
        # keyctl keeps one indent buffer: this level's columns are rewritten
        # for each member; '|' marks that this keyring has siblings below it
        child_depth = depth + 1 if depth == 0 else depth + 4
        del indent[depth:]
        indent.extend(" " * (child_depth - depth))
        if more:
            indent[depth] = "|"
        last = position == len(members) - 1
        yield from _show_aux(
            member, child_depth, not last, indent, describe, read, granted, strerror, hex_ids
        )


# -- supports

CAPABILITIES: tuple[tuple[str, int, int], ...] = (
    ("capabilities", 0, 0x01),
    ("persistent_keyrings", 0, 0x02),
    ("dh_compute", 0, 0x04),
    ("public_key", 0, 0x08),
    ("big_key_type", 0, 0x10),
    ("key_invalidate", 0, 0x20),
    ("restrict_keyring", 0, 0x40),
    ("move_key", 0, 0x80),
    ("ns_keyring_name", 1, 0x01),
    ("ns_key_tag", 1, 0x02),
    ("notify", 1, 0x04),
)
"""keyctl's capability names: (name, byte, bit) of KEYCTL_CAPABILITIES."""

KEYFENCE_CAPS = bytes([0x01 | 0x20 | 0x80, 0x04])
"""What keyfence offers: capabilities query, invalidate, move, and
notifications: ``watch`` and keyctl's watch queues (watch_session,
watch_add, watch_rm, watch_sync; kfctl_watch.py) -- scripts that see
``have_notify=1`` go on to use all of them."""


def supports_lines(caps: bytes) -> str:
    return "".join(
        f"have_{name}={'1' if caps[index] & mask else '0'}\n" for name, index, mask in CAPABILITIES
    )


def has_capability(caps: bytes, name: str) -> bool | None:
    for cap, index, mask in CAPABILITIES:
        if cap == name:
            return bool(caps[index] & mask)
    return None


# -- watch

WATCH_FILTERS = {
    "i": "inst",
    "p": "upd",
    "l": "link",
    "n": "unlk",
    "c": "clr",
    "r": "rev",
    "v": "inv",
    "s": "attr",
    "e": "exp",
}
"""keyctl watch -f letters (and keyfence's ``e`` for expiry) -> event words."""


def watch_mask(filters: str | None) -> int:
    """The event mask for ``-f<filters>`` (None: every event).  ``gc`` is
    always delivered: it ends the watch, as the kernel's removal
    notification does."""
    if filters is None:
        return ALL_EVENTS
    mask = EVENT_BITS["gc"]
    for letter in filters:
        word = WATCH_FILTERS.get(letter)
        if word is None:
            raise UsageError(f"Unknown filter character '{letter}'")
        mask |= EVENT_BITS[word]
    return mask


def watch_line(key: int, event: str, aux: int | None) -> str:
    """``<keyid> <event> [<aux>]``; aux only for link and unlk, as keyctl."""
    if event in ("link", "unlk"):
        return f"{to_uint32(key)} {event} {to_uint32(aux or 0)}\n"
    return f"{to_uint32(key)} {event}\n"


# -- purge and reap matching


def purge_match(raw: str, key_type: str, description: str, *, prefix: bool, fold: bool) -> bool:
    """keyctl purge's literal match on a raw description: the type exactly,
    the description (everything after the last ';') exactly, as a prefix
    (-p) and/or ignoring ASCII case (-i, strncasecmp in the C locale)."""
    head, sep, _ = raw.partition(";")
    if not sep or head != key_type:
        return False
    # the raw bytes of both (an argument need not be UTF-8: keyctl compares bytes)
    candidate = fsencode(raw.rpartition(";")[2])
    wanted = fsencode(description)
    if prefix:
        if len(candidate) < len(wanted):
            return False
        candidate = candidate[: len(wanted)]
    elif len(candidate) != len(wanted):
        return False
    if fold:
        return candidate.lower() == wanted.lower()
    return candidate == wanted
