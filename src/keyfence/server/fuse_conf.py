"""/etc/fuse.conf, read as fusermount3 reads it, and its mount limit.

The root daemon mounts users' FUSE filesystems itself (fuse_mount.py), so
it must refuse what fusermount3 would refuse (libfuse util/fuser_conf.c):

* ``user_allow_other``: a line by itself lets users ask for allow_other;
* ``mount_max = N`` (default 1000; -1: no limit): a user (not root) may
  not mount while the system already has N or more FUSE filesystems.

The file is parsed line by line the way fusermount3 does it: a ``#``
starts a comment, blanks around a line are ignored, a line of 255 bytes or
more is skipped, and so is a last line without its newline;
``mount_max = %i`` is ``sscanf``'s (any blanks around ``=``, decimal, octal
with a leading 0, hex with 0x; digits after a number are ignored).  The
count is fusermount3's too: every mount in ``/proc/self/mounts`` whose type
is ``fuse`` or ``fuse.*`` (``fuseblk`` is not counted), whoever made it.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

__all__ = ["DEFAULT_MOUNT_MAX", "FUSE_CONF", "FuseConf", "count_fuse_mounts", "read_fuse_conf"]

FUSE_CONF = "/etc/fuse.conf"
DEFAULT_MOUNT_MAX = 1000
_LINE_MAX = 255
"""fusermount3 reads with ``fgets(line, 256)``: a longer line is skipped."""
_MOUNT_MAX = re.compile(rb"mount_max\s*=\s*([+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*))")


@dataclass(frozen=True)
class FuseConf:
    user_allow_other: bool = False
    mount_max: int = DEFAULT_MOUNT_MAX
    """-1: no limit."""


def _strip(line: bytes) -> bytes:
    return line.split(b"#", 1)[0].strip(b" \t\n\v\f\r")


def _c_int(text: bytes) -> int | None:
    value = int(text, 0) if not re.fullmatch(rb"[+-]?0[0-7]+", text) else int(text, 8)
    if not -(1 << 31) <= value < 1 << 31:
        return None  # sscanf's overflow: not a value fusermount3 would keep
    return value


def parse_fuse_conf(data: bytes) -> FuseConf:
    """The settings of fuse.conf contents ``data`` (see the module)."""
    allow_other, mount_max = False, DEFAULT_MOUNT_MAX
    lines = data.split(b"\n")
    for raw in lines[:-1]:  # the last piece has no newline: fusermount3 ignores it
        if len(raw) + 1 > _LINE_MAX:
            continue
        line = _strip(raw)
        if line == b"user_allow_other":
            allow_other = True
            continue
        match = _MOUNT_MAX.match(line)
        if match is not None:
            value = _c_int(match[1])
            if value is not None:
                mount_max = value
    return FuseConf(allow_other, mount_max)


def read_fuse_conf(path: str = FUSE_CONF) -> FuseConf:
    """fuse.conf's settings; the defaults when it cannot be read (as
    fusermount3, which goes on without it)."""
    try:
        with open(path, "rb") as f:
            return parse_fuse_conf(f.read(1 << 20))
    except OSError:
        return FuseConf()


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def count_fuse_mounts(mounts: str = "/proc/self/mounts") -> int:
    """How many FUSE filesystems are mounted (type ``fuse`` or ``fuse.*``)."""
    count = 0
    with contextlib.suppress(OSError), open(mounts, errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2:
                kind = _unescape(fields[2])
                if kind == "fuse" or kind.startswith("fuse."):
                    count += 1
    return count
