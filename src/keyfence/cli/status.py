"""``keyfence status [--json] [MOUNT | DIR]``, in fscrypt(1)'s words.

* no argument: a table of the caller's mounts (root: everyone's; the
  daemon decides, server/mounts.py) -- mount point, backing directory,
  state, dirty bytes, keys held, encrypted directories -- and, under it,
  why a dead mount died (shown once: the daemon then forgets it), files
  left open when their key went, what an emergency dropped;
* a mount point: that mount in detail (fscrypt's ``status MOUNTPOINT``);
* a directory: fscrypt's ``status DIR``: the policy, its options,
  ``Unlocked: Yes | No | Partially (incompletely locked)``, the files
  still open (the list empties as they close), the protectors.

``--json`` prints the same as one JSON object (schema: docs/cli.md,
"keyfence status --json"; version 1).  Exit status as fscrypt's: 0, or 1
when the path is not encrypted, not on a keyfence mount or unreadable.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from typing import Any

from keyfence.cli.progress import human_bytes
from keyfence.cli.terminal import shown
from keyfence.client import Client
from keyfence.errors import KeyfenceError

SCHEMA_VERSION = 1
UNLOCKED = {
    "unlocked": "Yes",
    "locked": "No",
    "incompletely locked": "Partially (incompletely locked)",
}


def cmd_status(args: argparse.Namespace) -> int:
    if args.path == "" or (args.path and _inside_a_mount(args.path)):
        return print_dir_status(args.path, args.json)  # the mount answers, not the daemon
    with Client.connect() as client:
        mounts = client.mounts()
    if args.path is None:
        return _print_mounts(mounts, args.json)
    real = os.path.realpath(args.path)
    for mount in mounts:
        if mount.get("mountpoint") == real:
            return _print_mount(mount, args.json)
    return print_dir_status(args.path, args.json)


def _inside_a_mount(path: str) -> bool:
    """A directory on a keyfence mount other than its root."""
    from keyfence.cli.fs_commands import keyfence_devices

    try:
        here = os.stat(path).st_dev
        parent = os.stat(os.path.join(path, "..")).st_dev
    except OSError:
        return False
    return here == parent and here in keyfence_devices()


def _emit_json(value: dict[str, Any]) -> None:
    print(json.dumps({"version": SCHEMA_VERSION, **value}, indent=2, sort_keys=True))


# ------------------------------------------------------------------ mounts


def _state(mount: dict[str, Any]) -> str:
    state = str(mount.get("state", "?"))
    if mount.get("busy_files"):
        state += ", incompletely locked"
    return state


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """fscrypt's tables: columns left-aligned, two spaces apart."""
    rows = [[shown(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _notes(mount: dict[str, Any]) -> list[str]:
    """What a user must know beyond the table: why dead, what is open, lost."""
    out = []
    if mount.get("state") == "dead":
        why = str(mount.get("error") or "the worker is gone")
        if mount.get("log"):
            why += f" (log: {mount['log']})"
        out.append(f"dead: {why}")
    for name in mount.get("busy_files") or ():
        out.append(f"incompletely locked, still open: {name}")
    for drop in mount.get("dropped") or ():
        files = drop.get("files") if isinstance(drop, dict) else None
        for name, lost in sorted(files.items()) if isinstance(files, dict) else ():
            out.append(f"dropped in an emergency: {name} ({int(lost):,} bytes)")
    return out


def _print_mounts(mounts: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        _emit_json({"mounts": mounts})
        return 0
    if not mounts:
        print("No keyfence mounts.")
        return 0
    print(f"{len(mounts)} keyfence mount{'s' if len(mounts) != 1 else ''}")
    print()
    rows = [
        [
            str(m.get("mountpoint", "")),
            str(m.get("backing", "")),
            _state(m),
            human_bytes(int(m.get("dirty_bytes") or 0)),
            str(len(m.get("keys") or ())),
            str(int(m.get("encrypted_dir_count") or 0)),
        ]
        for m in mounts
    ]
    header = ["MOUNTPOINT", "BACKING", "STATE", "DIRTY", "KEYS", "ENCRYPTED DIRS"]
    for line in _table(header, rows):
        print(line)
    notes = [(m, _notes(m)) for m in mounts]
    if any(n for _, n in notes):
        print()
    for m, lines in notes:
        for line in lines:
            _say(f"{m.get('mountpoint')}: {line}")
    return 0


def _print_mount(mount: dict[str, Any], as_json: bool) -> int:
    if as_json:
        _emit_json({"mount": mount})
        return 0
    _say(f'keyfence mount "{mount.get("mountpoint")}": {_state(mount)}')
    print()
    dirty = int(mount.get("dirty_bytes") or 0)
    limit = int(mount.get("dirty_limit") or 0)
    _say(f"Backing:  {mount.get('backing')}")
    print(f"Owner:    uid {mount.get('owner')}")
    print(f"Worker:   pid {mount.get('pid')}")
    if mount.get("requests"):
        _say(f"Requests: through {mount['requests']}")
    print(
        f"Dirty:    {human_bytes(dirty)} ({dirty:,} bytes)"
        + (f", limit {human_bytes(limit)}" if limit else "")
    )
    keys = mount.get("keys") or []
    print(f"Keys:     {len(keys)}")
    for line in _notes(mount):
        _say(line[0].upper() + line[1:])
    if keys:
        print()
        rows = [
            [
                str(k.get("key")),
                str(k.get("serial")),
                human_bytes(int(k.get("dirty_bytes") or 0)),
                str(k.get("open_files")),
            ]
            for k in keys
        ]
        for line in _table(["KEY", "SERIAL", "DIRTY", "OPEN FILES"], rows):
            print(line)
    dirs = mount.get("encrypted_dirs") or []
    if dirs:
        print()
        rows = [
            [str(d.get("path")), str(d.get("key")), "Yes" if d.get("unlocked") else "No"]
            for d in dirs
        ]
        for line in _table(["ENCRYPTED DIRECTORY", "POLICY", "UNLOCKED"], rows):
            print(line)
        count = int(mount.get("encrypted_dir_count") or 0)
        if count > len(dirs):
            print(f"... and {count - len(dirs)} more")
    return 0


# -------------------------------------------------------------- directory


def _fail(path: str, text: str, as_json: bool, **fields: Any) -> int:
    if as_json:
        _emit_json({"path": path, "error": text, **fields})
    print(f"keyfence status: {shown(text)}", file=sys.stderr)
    return 1


def dir_status(path: str) -> dict[str, Any]:
    """``status DIR --json``'s object (without ``version``); OSError if the
    directory is not on a keyfence mount or cannot be read."""
    from keyfence.cli import dir_keys
    from keyfence.cli.fs_commands import on_keyfence_mount
    from keyfence.fs.protector import Protectors

    if not on_keyfence_mount(path):
        raise OSError(errno.ENOTTY, "not on a keyfence mount")
    ref = dir_keys.policy_of(path)
    status = dir_keys.status_of(path)
    out: dict[str, Any] = {"path": path, "encrypted": ref is not None}
    if ref is None:
        return out
    state = str(status.get("state", "locked"))
    out.update(
        policy=ref,
        options=status.get("options") if isinstance(status.get("options"), dict) else {},
        state=state,
        unlocked=UNLOCKED.get(state, "Partially (incompletely locked)"),
        serial=status.get("serial") if isinstance(status.get("serial"), int) else None,
        dirty_bytes=int(status.get("dirty_bytes") or 0),
        open_files=int(status.get("open_files") or 0),
        busy_files=[shown(str(n)) for n in status.get("busy_files") or ()],
    )
    protectors: list[dict[str, Any]] = []
    where = None
    with contextlib.suppress(OSError):
        where = dir_keys.protectors_dir(path)
    if where is not None:
        try:
            prot = dir_keys.read_protectors(where)
        except (OSError, KeyfenceError):
            prot = Protectors()
        protectors += [{"kind": "e4crypt passphrase", "salt": s.hex()} for s in prot.salts]
        protectors += [{"kind": "login passphrase", "uid": p.uid} for p in prot.logins]
    out["protectors"] = protectors
    return out


def _options_line(options: dict[str, Any]) -> str:
    """fscrypt's ``Options:`` words: ``padding:16 contents:... filenames:...``."""
    order = ("padding", "contents", "filenames", "policy_version")
    return " ".join(f"{name}:{options[name]}" for name in order if name in options)


def _say(line: str) -> None:
    print(shown(line))


def print_dir_status(given: str, as_json: bool) -> int:
    """fscrypt status DIR, keyfence's way."""
    path = shown(given)
    try:
        info = dir_status(given)
        info["path"] = path
    except OSError as err:
        code = err.errno or errno.EIO
        if code == errno.ENOTTY:
            return _fail(path, f'"{path}" is not on a keyfence mount', as_json)
        return _fail(path, f"{path}: {err.strerror or os.strerror(code)}", as_json)
    except (ValueError, TypeError, KeyfenceError) as err:  # a status the mount garbled
        return _fail(path, f"{path}: {err}", as_json)
    if not info["encrypted"]:
        # fscrypt: 'file or directory "X" is not encrypted', exit 1
        return _fail(path, f'file or directory "{path}" is not encrypted', as_json, encrypted=False)
    if as_json:
        _emit_json(info)
        return 0
    print(f'"{path}" is encrypted with keyfence.')
    print()
    _say(f"Policy:   {info['policy']}")
    if info["options"]:
        _say(f"Options:  {_options_line(info['options'])}")
    print(f"Unlocked: {info['unlocked']}")
    if info["serial"] is not None:
        print(f"Key:      {info['serial']}")
    print(f"Dirty:    {info['dirty_bytes']:,} bytes")
    opened = info["open_files"]
    print(f"Open:     {opened} file{'s' if opened != 1 else ''}")
    if info["busy_files"]:
        print()
        print("Still open (incompletely locked):")
        for name in info["busy_files"]:
            print(f"  {name}")
    names = [
        f"passphrase (e4crypt salt 0x{p['salt']})"
        if "salt" in p
        else f"login passphrase of uid {p['uid']}"
        for p in info["protectors"]
    ]
    if names:
        print()
        print(f"Protected with {len(names)} protector{'s' if len(names) > 1 else ''}:")
        for n in names:
            print(f"  {n}")
    return 0


def add_parser(sub: Any) -> None:
    status = sub.add_parser(
        "status",
        help="mounts, one mount, or a directory's lock state (fscrypt status)",
        description="Without PATH: the table of your keyfence mounts (root: all of"
        " them) with their state, dirty bytes, keys and encrypted directories; a dead"
        " mount is shown once, with why. With a mount point: that mount in detail."
        " With a directory: its policy, whether it is unlocked (Yes, No, or Partially"
        " (incompletely locked) while files opened before the lock stay open), those"
        " files, and its protectors. Exit status 1 if PATH is not encrypted or not"
        " on a keyfence mount.",
    )
    status.add_argument(
        "path", nargs="?", metavar="PATH", help="a keyfence mount point or a directory on one"
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (schema in docs/cli.md, version 1) instead of text",
    )
    status.set_defaults(run=cmd_status)
