"""Sizes as people write them: ``65536``, ``64K``, ``64M``, ``1G``.

One parser for the daemon's mount options (server/mount_options.py) and
the mount worker's command line (fs/worker.py), which may not import each
other (pyproject.toml's layers).  Errors are ``ValueError`` with the text
quoted; the worker turns them into argparse's usage errors.  This module
imports nothing.
"""

from __future__ import annotations

__all__ = ["MAX_WRITE_THROUGH", "parse_size", "parse_write_through"]

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


def parse_write_through(text: str) -> int:
    """``0`` (never) or a size up to 1M (the largest FUSE write)."""
    if text.strip() == "0":
        return 0
    value = parse_size(text)
    if value > MAX_WRITE_THROUGH:
        raise ValueError(f"at most 1M: {text!r}")
    return value
