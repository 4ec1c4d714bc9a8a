"""``keyfence lock / unlock / status DIR``: one encrypted directory's key.

They speak to the mount through extended attributes of the directory
(``user.keyfence.policy``, ``.status``, ``.protectors``; see fs/ops.py) and
to the daemon for keys.  The wording of ``status`` and the exit codes of
``lock`` follow fscrypt(1):

* ``Unlocked: Yes``, ``No``, or ``Partially (incompletely locked)`` when the
  key went while files under it were still open;
* ``lock`` exits 1 when the directory is already locked and when it was
  only incompletely locked (fscrypt: "Directory was incompletely locked
  because some files are still open").

``lock`` finds the key through the mount's binding, not in the caller's
keyrings: a login's key is in that login's ``@s``, and a user locking from
another terminal (or root locking for everyone, fscrypt's ``--all-users``)
does not hold it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from keyfence.cli.progress import ProgressDisplay
from keyfence.cli.terminal import shown
from keyfence.client import Client
from keyfence.errors import KeyfenceError
from keyfence.fs import e4crypt_compat as e4
from keyfence.fs.format import FormatError, KeyKind, KeyRef
from keyfence.fs.protector import Protectors

POLICY_XATTR = "user.keyfence.policy"
STATUS_XATTR = "user.keyfence.status"
PROTECTORS_XATTR = "user.keyfence.protectors"
S = -3


def policy_of(path: str | int) -> str | None:
    """The directory's key reference (``keyfence:...`` / ``ext4:...``), or None.
    ``path`` may be a descriptor, as for the other functions here."""
    try:
        return os.getxattr(path, POLICY_XATTR).decode()
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


def status_of(path: str | int) -> dict[str, Any]:
    raw = os.getxattr(path, STATUS_XATTR)
    status = json.loads(raw)
    if not isinstance(status, dict):
        raise KeyfenceError(errno.EIO, f"{path}: malformed status from the mount")
    return status


def protectors_dir(path: str) -> str | None:
    """The directory holding the protectors for ``path``'s key: ``path`` or
    the nearest parent with the same policy that has them."""
    ref = policy_of(path)
    here = os.path.abspath(path)
    while ref is not None:
        try:
            os.getxattr(here, PROTECTORS_XATTR)
            return here
        except OSError as err:
            if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
        parent = os.path.dirname(here)
        if parent == here:
            return None
        try:
            if policy_of(parent) != ref:
                return None
        except OSError:
            return None
        here = parent
    return None


def protectors_fd(fd: int) -> int | None:
    """As :func:`protectors_dir` for directory descriptor ``fd``: a new
    descriptor (the caller closes it) of ``fd``'s own directory or of the
    nearest parent with the same policy that has protectors, reached by
    ``..`` from ``fd``, never by name."""
    ref = policy_of(fd)
    if ref is None:
        return None
    here = os.dup(fd)
    try:
        while True:
            try:
                os.getxattr(here, PROTECTORS_XATTR)
                found, here = here, -1
                return found
            except OSError as err:
                if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=here)
            st, pst = os.fstat(here), os.fstat(parent)
            os.close(here)
            here = parent
            if (st.st_dev, st.st_ino) == (pst.st_dev, pst.st_ino):
                return None  # the root
            try:
                if policy_of(here) != ref:
                    return None
            except OSError:
                return None
    finally:
        if here >= 0:
            os.close(here)


def read_protectors(path: str | int) -> Protectors:
    """``path``'s own protectors (empty if it has none)."""
    try:
        raw = os.getxattr(path, PROTECTORS_XATTR)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return Protectors()
        raise
    try:
        return Protectors.parse(raw)
    except FormatError as err:
        raise KeyfenceError(errno.EIO, f"{path}: {err}") from None


def write_protectors(path: str | int, protectors: Protectors) -> None:
    os.setxattr(path, PROTECTORS_XATTR, protectors.serialize())


def stored_salt(path: str) -> bytes | None:
    """The e4crypt salt stored with ``path``'s policy, if any."""
    where = protectors_dir(path)
    if where is None:
        return None
    salts = read_protectors(where).salts
    return salts[0] if salts else None


def keyring_payload(ref: KeyRef, master: bytes) -> bytes:
    """What the mount expects in the key: e4crypt's struct or the raw key."""
    return e4.kernel_payload(master) if ref.kind is KeyKind.E4CRYPT_DESCRIPTOR else bytes(master)


def _mount_of(client: Client, path: str) -> dict[str, Any] | None:
    real = os.path.realpath(path)
    best = None
    for m in client.mounts():
        mp = str(m.get("mountpoint", ""))
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) > len(best["mountpoint"])
        ):
            best = m
    return best


def cmd_lock(args: argparse.Namespace) -> int:
    """Remove the directory's key through the fenced path.

    The key is the one the mount is bound to (its serial in the status),
    whoever's keyrings hold it; the mount may move to another key with the
    same description (another login's), so repeat until the directory is
    locked.
    """
    path = args.path
    ref = policy_of(path)
    if ref is None:
        print(f"{path}: no keyfence policy", file=sys.stderr)
        return 1
    status = status_of(path)
    if status.get("state") != "unlocked":
        # the mount binds a key on first use: one added since but not yet
        # used leaves the directory locked while the key waits in our
        # keyrings, and would unlock it at the next access; remove it too
        # (also when files are still open from an earlier lock)
        removed = _remove_own_key(ref, args)
        status = status_of(path) if removed else status
        if status.get("busy_files"):
            return _incompletely_locked(path, status)
        if not removed:
            print(f"Error: directory {path} is already locked.", file=sys.stderr)
            return 1
        print(f"{path}: locked")
        return 0

    with Client.connect() as client, ProgressDisplay("keyfence", "lock") as progress:
        for _ in range(64):
            serial = status.get("serial")
            if status.get("state") != "unlocked" or not isinstance(serial, int):
                break
            try:
                client.lock_filesystem_key(
                    serial,
                    timeout=args.timeout,
                    emergency=args.emergency,
                    progress=None if args.emergency else progress,
                )
            except KeyfenceError as err:
                if err.errno not in (errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED):
                    raise
            status = status_of(path)
        progress.close()
        mount = _mount_of(client, path)
    for drop in (mount or {}).get("dropped") or ():
        print(f"dropped: {drop}")
    if status.get("state") == "unlocked":
        print(f"Error: {path} is still unlocked (a key came back)", file=sys.stderr)
        return 1
    if status.get("busy_files"):
        return _incompletely_locked(path, status)
    print(f"{path}: locked")
    return 0


def _remove_own_key(ref: str, args: argparse.Namespace) -> bool:
    """Remove the key ``ref`` names from the caller's keyrings, through the
    fence, if they hold one; whether they did."""
    with Client.connect() as client:
        for key_type in ("logon", "user"):
            try:
                serial = client.request_key(key_type, ref, None, 0)
            except KeyfenceError as err:
                if err.errno in (errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED):
                    continue
                raise
            with ProgressDisplay("keyfence", "lock") as progress:
                client.lock_filesystem_key(
                    serial,
                    timeout=args.timeout,
                    emergency=args.emergency,
                    progress=None if args.emergency else progress,
                )
            return True
    return False


def _incompletely_locked(path: str, status: dict[str, Any]) -> int:
    path = shown(path)  # names a user chose: escaped for the terminal
    print(
        f"Error: Directory {path} was incompletely locked because some files are still open:",
        file=sys.stderr,
    )
    for name in status.get("busy_files") or ():
        print(f"  {shown(str(name))}", file=sys.stderr)
    print(
        f"Close them (fuser -vm {path} shows who has them) and run keyfence lock again.",
        file=sys.stderr,
    )
    return 1


Passphrase = Callable[..., bytes]


def cmd_unlock(
    args: argparse.Namespace, read_passphrase: Passphrase, salt_of: Callable[[str], bytes]
) -> int:
    """``read_passphrase`` and ``salt_of`` are fs_commands' (e4crypt's rules)."""
    path = args.path
    ref_text = policy_of(path)
    if ref_text is None:
        print(f"{path}: no keyfence policy", file=sys.stderr)
        return 1
    ref = KeyRef.from_description(ref_text)
    if args.salt is not None:
        salt = salt_of(args.salt)
    elif ref.kind is KeyKind.E4CRYPT_DESCRIPTOR:
        stored = stored_salt(path)
        if stored is None:
            print(
                f"{path}: no salt stored with the policy; give the one the key was made with (-S)",
                file=sys.stderr,
            )
            return 2
        salt = stored
    else:
        return _unlock_with_login_protector(path, ref, read_passphrase)
    key = e4.derive_key(read_passphrase(), salt)
    if e4.key_description(e4.descriptor(key)) != ref_text:
        print(f"{path}: wrong passphrase (or salt): the key does not match", file=sys.stderr)
        return 1
    with Client.connect() as client:
        client.add_key("logon", ref_text, e4.kernel_payload(key), S)
    return _report_unlocked(path)


def _unlock_with_login_protector(path: str, ref: KeyRef, read_passphrase: Passphrase) -> int:
    from keyfence.fs.protector import WrongPassphrase

    where = protectors_dir(path)
    protector = read_protectors(where).login_for(os.getuid()) if where else None
    if protector is None:
        print(
            f"{path}: policy {ref.description} has no protector for you "
            f"(its raw key: kfctl padd logon {ref.description} @s)",
            file=sys.stderr,
        )
        return 1
    try:
        master = protector.unwrap(read_passphrase("Enter login passphrase: "), ref)
    except WrongPassphrase:
        print(f"{path}: wrong passphrase", file=sys.stderr)
        return 1
    with Client.connect() as client:
        client.add_key("logon", ref.description, keyring_payload(ref, master), S)
    return _report_unlocked(path)


def _report_unlocked(path: str) -> int:
    """Say "unlocked" only once the mount has used the key: it looks for it
    in our keyrings when we use the directory (it said so while locked)."""
    try:
        os.listdir(path)
        state = status_of(path).get("state")
    except (OSError, ValueError, KeyfenceError):
        state = None
    if state != "unlocked":
        print(
            f"{path}: the key was added but the directory is still {state or 'locked'}: "
            "the mount could not use it (is the key in this session's keyring, "
            "and the mount yours?)",
            file=sys.stderr,
        )
        return 1
    print(f"{path}: unlocked")
    return 0


def salt_for_paths(paths: list[str]) -> list[bytes]:
    """``e4crypt add_key`` without ``-S`` on keyfence directories.

    The salt stored with the first path's policy; for a directory of a
    keyfence mount that has no policy yet, a new random 16-byte salt (what
    ext4 keeps per filesystem), stored with the policy by :func:`store_salt`
    so nobody has to type it again.  Empty if no path is in a mount (then
    e4crypt's own scan of ext4 filesystems applies).
    """
    fresh = False
    for path in paths:
        try:
            status_of(path)
        except (OSError, ValueError):
            continue
        salt = stored_salt(path)
        if salt is not None:
            return [salt]
        fresh = fresh or policy_of(path) is None
    return [os.urandom(16)] if fresh else []


def store_salt(path: str, salt: bytes) -> None:
    """Keep ``salt`` with ``path``'s policy (a keyfence mount's directory only)."""
    try:
        status_of(path)
    except (OSError, ValueError):
        return
    if policy_of(path) is None or stored_salt(path) == salt:
        return
    write_protectors(path, read_protectors(path).with_salt(salt))
