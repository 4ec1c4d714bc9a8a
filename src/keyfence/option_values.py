"""Values of mount options as people write them: sizes (``64M``), seconds,
whole numbers in a range.

The parsers of the daemon's mount options (server/mount_options.py) and of
the mount worker's command line (fs/worker.py), which may not import each
other (pyproject.toml's layers), so that both accept and refuse the same
values.  Errors are ``ValueError`` with the text quoted; the worker turns
them into argparse's usage errors.  This module imports nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "MAX_SPIN_US",
    "MAX_WRITE_THROUGH",
    "count_in",
    "parse_dirty_limit",
    "parse_max_tasks",
    "parse_readahead_kb",
    "parse_seconds",
    "parse_size",
    "parse_spin_us",
    "parse_write_through",
]

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

MAX_WRITE_THROUGH = 1 << 20
"""The largest FUSE write (max_pages 256): a first write stored at once is
one request."""


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64M``, ``1G`` (also with ``iB``/``B``): bytes > 0."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SUFFIXES else ""
    number = t[: len(t) - len(unit)]
    try:
        value = int(float(number) * _SUFFIXES[unit])
    except (ValueError, OverflowError):  # "x", "nan"; "inf", "1e999"
        raise ValueError(f"not a size: {text!r}") from None
    if value <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return value


MIN_DIRTY_LIMIT = 4096
"""One page of the worker's cache (fs/cachedfile.py ``PAGE_SIZE``): its
page cache refuses a smaller dirty limit."""


def parse_dirty_limit(text: str) -> int:
    """A size of at least one page (``dirty_limit=100`` used to start a
    worker that died of it: EIO instead of EINVAL)."""
    value = parse_size(text)
    if value < MIN_DIRTY_LIMIT:
        raise ValueError(f"below one page ({MIN_DIRTY_LIMIT} bytes): {text!r}")
    return value


def parse_write_through(text: str) -> int:
    """``0`` (never) or a size up to 1M (the largest FUSE write)."""
    if text.strip() == "0":
        return 0
    value = parse_size(text)
    if value > MAX_WRITE_THROUGH:
        raise ValueError(f"at most 1M: {text!r}")
    return value


def parse_seconds(text: str) -> float:
    """Seconds from 0 to one year (``10``, ``0.5``); not ``nan`` or ``inf``."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number of seconds: {text!r}") from None
    if math.isnan(value) or not 0 <= value <= 86400 * 365:
        raise ValueError(f"out of range (0 to one year): {text!r}")
    return value


def count_in(low: int, high: int, what: str = "whole number") -> Callable[[str], int]:
    """A parser of whole numbers from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"not a {what}: {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"out of range ({low} to {high}): {text!r}")
        return value

    parse.__name__ = f"count_in_{low}_{high}"
    return parse


MAX_SPIN_US = 1000
"""The longest busy-wait of keyfence's loop for the next request
(fs/fuse/session.py), in microseconds."""

parse_readahead_kb = count_in(0, 1 << 20)
parse_max_tasks = count_in(1, 1024)
parse_spin_us = count_in(0, MAX_SPIN_US, "number of microseconds")
