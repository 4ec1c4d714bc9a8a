"""Mount options: a fixed table, in mount(8) style, never raw FUSE strings.

``keyfence mount -o dirty_limit=256M,allow_other,nonempty BACKING MNT``.
Every option is a name in :data:`OPTIONS` with a parser for its value; the
result is a :class:`MountRequestOptions` from which the daemon writes the
worker's command line itself.  Nothing a client sends reaches libfuse's
option string, so ``-o=-o -o=suid,dev`` is a clear EINVAL, not a mount
without ``nosuid,nodev`` (issue 11, finding 3).

The older spelling ``-o --dirty-limit=256M`` (one worker flag per ``-o``)
is read through the same table: leading dashes dropped, dashes made
underscores.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keyfence.errors import KeyfenceError
from keyfence.option_values import (
    parse_dirty_limit,
    parse_max_tasks,
    parse_readahead_kb,
    parse_seconds,
    parse_size,
    parse_spin_us,
    parse_write_through,
)
from keyfence.server.fuse_conf import FUSE_CONF, read_fuse_conf

__all__ = ["OPTIONS", "MountRequestOptions", "parse_options", "parse_size", "user_allow_other"]


def _fuse_loop(text: str) -> str:
    if text not in FUSE_LOOPS:
        raise ValueError(f"one of {', '.join(FUSE_LOOPS)}: {text!r}")
    return text


FUSE_LOOPS = ("pyfuse3", "keyfence")
"""The worker's FUSE request loops (fs/worker.py ``--fuse-loop``)."""


@dataclass(frozen=True)
class _Option:
    field: str
    parse: Callable[[str], Any] | None
    """None: a flag (no value)."""
    worker_flag: str | None
    """The worker's command-line flag, or None for an option the daemon uses."""
    help: str


OPTIONS: dict[str, _Option] = {
    "dirty_limit": _Option(
        "dirty_limit",
        parse_dirty_limit,
        "--dirty-limit",
        "dirty plaintext the cache may hold (64M)",
    ),
    "dirty_expire": _Option(
        "dirty_expire",
        parse_seconds,
        "--dirty-expire",
        "seconds before dirty pages are written (5)",
    ),
    "attr_timeout": _Option(
        "attr_timeout", parse_seconds, "--attr-timeout", "seconds the kernel caches entries (10)"
    ),
    "write_through": _Option(
        "write_through",
        parse_write_through,
        "--write-through",
        "a new file's first write up to this size is stored at once (64K; 0: never)",
    ),
    "readahead_kb": _Option(
        "readahead_kb", parse_readahead_kb, "--readahead-kb", "readahead window in KiB (1024)"
    ),
    "max_tasks": _Option(
        "max_tasks", parse_max_tasks, "--max-tasks", "concurrent FUSE requests served (64)"
    ),
    "spin_us": _Option(
        "spin_us",
        parse_spin_us,
        "--spin-us",
        "most microseconds to wait for the next request before sleeping (200)",
    ),
    "writeback_cache": _Option(
        "writeback_cache", None, "--writeback-cache", "let the kernel cache writes too"
    ),
    "fuse_loop": _Option(
        "fuse_loop", _fuse_loop, "--fuse-loop", "FUSE request loop: keyfence or pyfuse3 (keyfence)"
    ),
    "no_uring": _Option(
        "no_uring",
        None,
        "--no-uring",
        "read every request from /dev/fuse even when the kernel offers io_uring",
    ),
    "debug": _Option("debug", None, "--debug", "log every request (root's mounts only)"),
    "allow_other": _Option(
        "allow_other", None, None, "other users may use the mount (fuse.conf user_allow_other)"
    ),
    "nonempty": _Option("nonempty", None, None, "mount over a directory that has files"),
}


@dataclass
class MountRequestOptions:
    dirty_limit: int | None = None
    dirty_expire: float | None = None
    attr_timeout: float | None = None
    write_through: int | None = None
    readahead_kb: int | None = None
    max_tasks: int | None = None
    spin_us: int | None = None
    fuse_loop: str | None = None
    writeback_cache: bool = False
    no_uring: bool = False
    debug: bool = False
    allow_other: bool = False
    nonempty: bool = False

    def worker_args(self) -> list[str]:
        """The worker's command-line flags for these options (made here, never
        copied from the request)."""
        args: list[str] = []
        for option in OPTIONS.values():
            value = getattr(self, option.field)
            if option.worker_flag is None or value is None or value is False:
                continue
            args.append(option.worker_flag if value is True else f"{option.worker_flag}={value}")
        return args


def _bad(item: str, why: str) -> KeyfenceError:
    known = ", ".join(sorted(OPTIONS))
    return KeyfenceError(errno.EINVAL, f"bad mount option {item!r}: {why} (known: {known})")


def parse_options(items: Sequence[str]) -> MountRequestOptions:
    """Each item is ``name[=value][,name[=value]...]``; the legacy worker-flag
    spelling (``--dirty-limit=64M``, or ``--dirty-expire`` followed by its
    value as the next item) is accepted too.  EINVAL with the reason."""
    result = MountRequestOptions()
    pending: list[str] = list(items)
    pending.reverse()
    while pending:
        item = pending.pop()
        if not isinstance(item, str):
            raise KeyfenceError(errno.EINVAL, "mount options must be strings")
        legacy = item.startswith("--")
        parts = [item] if legacy else item.split(",")
        for part in parts:
            if not part:
                continue
            name, has_value, value = part.lstrip("-").partition("=")
            name = name.replace("-", "_")
            option = OPTIONS.get(name)
            if option is None or (part.startswith("-") and not legacy):
                raise _bad(part, "not a keyfence mount option")
            if option.parse is None:
                if has_value:
                    raise _bad(part, "takes no value")
                setattr(result, option.field, True)
                continue
            if not has_value:
                if legacy and pending and not pending[-1].startswith("-"):
                    value = pending.pop()  # ``--dirty-expire 3``
                else:
                    raise _bad(part, "needs a value (name=value)")
            try:
                setattr(result, option.field, option.parse(value))
            except ValueError as err:
                raise _bad(part, str(err)) from None
    return result


def user_allow_other(conf: str = FUSE_CONF) -> bool:
    """Whether /etc/fuse.conf lets users ask for ``allow_other`` (a line
    ``user_allow_other`` by itself), as fusermount3 reads it (fuse_conf.py)."""
    return read_fuse_conf(conf).user_allow_other
