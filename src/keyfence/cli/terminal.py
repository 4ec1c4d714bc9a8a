"""Text from others, as it can be shown on a terminal.

A user's mount point, file names and their mount worker's reports reach
whoever runs ``keyfence status`` or ``keyfence lock`` -- root included --
so they never reach a terminal as escape sequences.
"""

from __future__ import annotations

__all__ = ["shown"]


def shown(text: str) -> str:
    """Text as it can be printed on a terminal: bytes that are not UTF-8
    and characters that are not printable (an escape sequence, a newline
    in a file name) escaped as ``\\xNN``."""
    text = text.encode(errors="surrogateescape").decode(errors="backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
