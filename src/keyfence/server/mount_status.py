"""What the daemon keeps of a mount worker's reports, and shows of a mount.

A worker runs as the mount's owner, so everything it reports is that
user's input: it is checked field by field here, bounded in size, and kept
only in the shapes below before the daemon stores it (and shows it to root).

The ``mounts`` operation's answer, one dict per mount, is the schema of
``keyfence status --json`` (docs/cli.md, "keyfence status"):

=================  =========================================================
``mountpoint``     str: where it is mounted
``backing``        str: the ciphertext directory
``owner``          int: the uid that mounted it
``pid``            int: the worker's process id
``state``          str: ``starting``, ``mounted``, ``unmounting``, ``dead``
``phase``          str: ``serving``; ``writing back`` (unmounting: the last
                   write-back and sync of the backing store); ``written back``
``dirty_bytes``    int: plaintext not yet written back (worker's last report)
``dirty_limit``    int: the mount's ``dirty_limit`` (0 until it reports)
``keys``           list of {``key``: description, ``serial``: int,
                   ``dirty_bytes``: int, ``open_files``: int}
``encrypted_dirs`` list of {``path``: mount-relative, ``key``: description,
                   ``unlocked``: bool}: the directories a policy was set on
                   that the mount has looked up since it started
``encrypted_dir_count``  int: how many (the list stops at 256)
``busy_files``     list of str: files open when their key went
                   (incompletely locked); empties as they close
``dropped``        list of {``key``: int, ``files``: {path: bytes lost}}
``error``          str: why it is dead ("" otherwise)
``exit_status``    int or null: the dead worker's exit status (-N: signal N)
``log``            str: the dead worker's log file ("" otherwise)
=================  =========================================================
"""

from __future__ import annotations

from typing import Any

MAX_ITEMS = 256
MAX_TEXT = 4096


def _count(value: Any) -> int:
    """A non-negative int (bool is not one), else 0."""
    return value if type(value) is int and 0 <= value < 1 << 63 else 0


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _items(value: Any) -> list[Any]:
    return list(value[:MAX_ITEMS]) if isinstance(value, list) else []


def clean_stats(detail: Any) -> dict[str, Any]:
    """A worker's ``stats`` report, kept to known fields and types."""
    if not isinstance(detail, dict):
        return {}
    keys = [
        {
            "key": _text(k.get("key"), 256),
            "serial": k["serial"] if type(k.get("serial")) is int else 0,
            "dirty_bytes": _count(k.get("dirty_bytes")),
            "open_files": _count(k.get("open_files")),
        }
        for k in _items(detail.get("keys"))
        if isinstance(k, dict)
    ]
    dirs = [
        {
            "path": _text(d.get("path")),
            "key": _text(d.get("key"), 256),
            "unlocked": d.get("unlocked") is True,
        }
        for d in _items(detail.get("encrypted_dirs"))
        if isinstance(d, dict)
    ]
    return {
        "phase": _text(detail.get("phase"), 32),
        "dirty_bytes": _count(detail.get("dirty_bytes")),
        "dirty_limit": _count(detail.get("dirty_limit")),
        "keys": keys,
        "encrypted_dirs": dirs,
        "encrypted_dir_count": max(_count(detail.get("encrypted_dir_count")), len(dirs)),
        "requests": _text(detail.get("requests"), 64),
    }


def busy_update(busy: dict[str, list[str]], detail: Any) -> dict[str, list[str]]:
    """The files still open under each key after a worker's ``busy`` report.

    A report names the key that went (its files then), or none: the mount's
    whole list after a file closed.  An empty report clears everything."""
    if not isinstance(detail, dict):
        return busy
    files = sorted({_text(f) for f in _items(detail.get("files")) if isinstance(f, str)})
    key = detail.get("key")
    if not isinstance(key, str):
        return {"": files} if files else {}
    out = dict(busy)
    if "" in out:  # a whole list from before: these files are now the key's
        out[""] = [f for f in out[""] if f not in files]
    out[_text(key, 256)] = files
    return {k: v for k, v in out.items() if v}


def busy_files(busy: dict[str, list[str]]) -> list[str]:
    return sorted({f for files in busy.values() for f in files})
