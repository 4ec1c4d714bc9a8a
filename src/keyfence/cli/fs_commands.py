"""``keyfence mount/umount/status/lock/unlock/e4crypt``: the filesystem's commands.

They talk to the daemon (mounts, keys) and to the mount itself through
extended attributes on its directories: ``user.keyfence.policy`` (a
directory's key reference; set on an empty directory to encrypt it) and
``user.keyfence.status``.  ``e4crypt`` takes e4crypt(8)'s words, options
and output; ``lock`` and ``unlock`` are in the spirit of fscrypt(1).
"""

from __future__ import annotations

import argparse
import errno
import getpass
import os
import sys
from typing import Any

from keyfence.client import Client
from keyfence.errors import KeyfenceError

POLICY_XATTR = "user.keyfence.policy"
STATUS_XATTR = "user.keyfence.status"
S = -3


def read_passphrase(prompt: str = "Enter passphrase (echo disabled): ") -> bytes:
    """From the terminal without echo, else the first line of standard input."""
    from keyfence.fs.e4crypt_compat import passphrase_from_input

    if sys.stdin is None:  # started with standard input closed (<&-)
        raise KeyfenceError(errno.EBADF, "no passphrase: standard input is closed")
    if sys.stdin.isatty():
        return getpass.getpass(prompt).encode()
    print(prompt, file=sys.stderr, flush=True)
    try:
        data = _first_line(sys.stdin.fileno())
    except OSError as err:
        code = err.errno or errno.EIO
        text = f"reading the passphrase from standard input: {os.strerror(code)}"
        raise KeyfenceError(code, text) from None
    if not data:
        raise KeyfenceError(errno.ENODATA, "no passphrase: standard input is empty")
    return passphrase_from_input(data)


def _first_line(fd: int, limit: int = 4096) -> bytes:
    """Standard input up to and including its first newline, not a byte
    more: the next command of a script reading the same input (a second
    passphrase, ``printf 'pw\\npw\\n' | sh script``) finds the rest."""
    data = bytearray()
    while len(data) < limit:
        byte = os.read(fd, 1)
        if not byte:
            break
        data += byte
        if byte == b"\n":
            break
    return bytes(data)


def salt_of(text: str) -> bytes:
    """An ``-S`` argument's salt, e4crypt's way; SystemExit (status 1, as
    e4crypt) with e4crypt's "Invalid salt" or the filesystem's errno."""
    from keyfence.fs import e4crypt_compat as e4

    try:
        parsed = e4.parse_salt(text)
    except e4.SaltError as err:
        raise SystemExit(f"e4crypt: {err}") from None
    try:
        return e4.resolve_salt(parsed)
    except OSError as err:
        where = err.filename or text
        code = err.errno or errno.EIO
        raise SystemExit(
            f"e4crypt: cannot read the password salt of {where}: {os.strerror(code)}"
        ) from None


def keyring_id(client: Client | None, text: str) -> int:
    from keyfence.keys.process_keys import SPECIAL_NAMES

    if text in SPECIAL_NAMES:
        return SPECIAL_NAMES[text]
    try:
        serial = int(text)
    except ValueError:
        raise SystemExit(f"e4crypt: invalid keyring: {text}") from None
    if not -(2**31) <= serial < 2**31:  # a key_serial_t
        raise SystemExit(f"e4crypt: invalid keyring: {text} (out of range)")
    return serial


def default_keyring(client: Client) -> int:
    """e4crypt: the session keyring if it exists, else the user session keyring."""
    try:
        client.get_keyring_id(S, False)
        return S
    except KeyfenceError:
        return -5


FUSE_KEYFENCE = "fuse.keyfence"


def keyfence_devices(mountinfo: str = "/proc/self/mountinfo") -> set[int]:
    """st_dev of every keyfence mount (``fuse.keyfence`` in mountinfo)."""
    devices: set[int] = set()
    try:
        with open(mountinfo, errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return devices
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if sep and len(fields) > 2 and tail.split()[:1] == [FUSE_KEYFENCE]:
            major, _, minor = fields[2].partition(":")
            if major.isdigit() and minor.isdigit():
                devices.add(os.makedev(int(major), int(minor)))
    return devices


def on_keyfence_mount(path: str) -> bool:
    """Whether directory ``path`` is on a keyfence mount (its device is one).

    The policy lives in an xattr the mount answers; on any other filesystem
    ``user.keyfence.policy`` would be a plain xattr that encrypts nothing,
    so we ask the kernel's mount table first, as e4crypt's ioctl would
    fail with ENOTTY there."""
    return os.stat(path).st_dev in keyfence_devices()


def _policy_error(path: str, desc: str, code: int) -> None:
    """e4crypt's words for a policy it could not set (on standard output)."""
    print(
        f"Error [{os.strerror(code)}] setting policy.\n"
        f"The key descriptor [{desc}] may not match the existing encryption "
        f"context for directory [{path}]."
    )


def validate_paths(paths: list[str]) -> bool:
    """e4crypt's checks before it adds a key: each path a writable directory
    (perror's words on standard error), and -- ours -- on a keyfence mount."""
    valid = True
    for path in paths:
        try:
            if not os.access(path, os.W_OK):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
            if not os.path.isdir(path):
                print(f"{path} is not a directory", file=sys.stderr)
                valid = False
                continue
        except OSError as err:
            code = err.errno if os.path.lexists(path) else errno.ENOENT
            print(f"{path}: {os.strerror(code or errno.EIO)}", file=sys.stderr)
            valid = False
    return valid


def set_policy(path: str, ref: str, pad: int | None = None) -> None:
    """Give an empty directory of a keyfence mount the policy ``ref`` with
    names padded to a multiple of ``pad`` (None: the mount's default, 16, for
    a new directory; any for one that already has ``ref``).

    ENOTTY (e4crypt's "Inappropriate ioctl for device") for a directory that
    is not on a keyfence mount: nothing is written there.  EEXIST for one
    with another key or padding, as the kernel's ioctl."""
    if not on_keyfence_mount(path):
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY), path)
    try:
        current = os.getxattr(path, POLICY_XATTR).decode()
    except OSError as err:
        if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        current = None
    if current is not None and current != ref:
        raise KeyfenceError(errno.EEXIST, f"{path} already has policy {current}")
    if current is not None and pad is None:
        return
    # the mount checks an existing directory's padding (EEXIST if it differs)
    value = ref if pad is None else f"{ref} pad={pad}"
    os.setxattr(path, POLICY_XATTR, value.encode())


def cmd_e4crypt(args: argparse.Namespace) -> int:
    from keyfence.fs import e4crypt_compat as e4

    if args.e4command == "add_key":
        from keyfence.cli import dir_keys

        if not validate_paths(args.paths):
            return 1
        for path in args.paths:
            if not on_keyfence_mount(path):  # before any key is added: change nothing
                _policy_error(path, "-", errno.ENOTTY)
                return 1
        if args.salt is None:
            # the salt stored with a keyfence directory's policy, a new one
            # for a new directory, else e4crypt's scan of ext4 filesystems
            salts = dir_keys.salt_for_paths(args.paths) or e4.default_salts()[:1]
            if not salts:
                print("e4crypt: No salt values available (give -S)", file=sys.stderr)
                return 1
            salt = salts[0]
        else:
            salt = salt_of(args.salt)
        given_ring = keyring_id(None, args.keyring) if args.keyring else None
        with Client.connect() as client:
            passphrase = read_passphrase()
            key = e4.derive_key(passphrase, salt)
            desc = e4.descriptor(key)
            ring = default_keyring(client) if given_ring is None else given_ring
            client.add_key("logon", e4.key_description(desc), e4.kernel_payload(key), ring)
            if not args.quiet:
                print(f"Added key with descriptor [{desc}]")
            status = 0
            for path in args.paths:
                try:
                    set_policy(path, e4.key_description(desc), args.pad)
                except OSError as err:
                    _policy_error(path, desc, err.errno or errno.EIO)
                    status = 1
                    continue
                dir_keys.store_salt(path, salt)
                if args.verbose:
                    print(f"Key with descriptor [{desc}] applied to {path}.")
        return status
    if args.e4command == "set_policy":
        desc = args.policy.lower()
        if len(desc) != 16 or any(c not in "0123456789abcdef" for c in desc):
            print(f"e4crypt: invalid policy: {args.policy}", file=sys.stderr)
            return 1
        if not validate_paths(args.paths):
            return 1
        status = 0
        for path in args.paths:
            try:
                set_policy(path, e4.key_description(desc), args.pad)
            except OSError as err:
                _policy_error(path, desc, err.errno or errno.EIO)
                status = 1
                continue
            print(f"Key with descriptor [{desc}] applied to {path}.")
        return status
    if args.e4command == "get_policy":
        status = 0
        for path in args.paths:
            # e4crypt's words: perror() when the path is not there, "Error
            # getting policy" (stdout) when the ioctl fails (ENODATA: none)
            try:
                os.stat(path)
            except OSError as err:
                print(f"{path}: {os.strerror(err.errno or errno.EIO)}", file=sys.stderr)
                status = 1
                continue
            try:
                if not on_keyfence_mount(path):
                    raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY), path)
                ref = os.getxattr(path, POLICY_XATTR).decode()
            except OSError as err:
                code = err.errno or errno.EIO
                print(f"Error getting policy for {path}: {os.strerror(code)}")
                status = 1
                continue
            print(f"{path}: {ref.split(':', 1)[-1]}")
        return status
    if args.e4command == "new_session":
        with Client.connect() as client:
            serial = client.join_session_keyring(None)
            client.session_to_parent()  # as e4crypt: the invoking shell gets it
        print(f"Switched invoking process to new session keyring {serial}")
        return 0
    return 2


def nonempty_utf8(path: str, what: str) -> str:
    """A path argument the daemon can be sent: not empty (realpath("") is
    the working directory: ``mount '' ''`` mounted over it) and UTF-8."""
    if not path:
        raise KeyfenceError(errno.ENOENT, f"{what}: an empty path")
    return utf8(path, what)


def utf8(text: str, what: str) -> str:
    """``text`` if it is UTF-8: mount paths are kept to UTF-8 names (the wire
    carries other text since keys/text.py, but the daemon's mount checks and
    mountinfo matching are tested with UTF-8 paths only)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        shown = text.encode(errors="surrogateescape").decode(errors="backslashreplace")
        raise KeyfenceError(errno.EINVAL, f"{what} {shown}: not UTF-8") from None
    return text


def resolve_directory(path: str, what: str) -> str:
    """The client resolves a request's paths (symlinks, ``..``) once; the
    daemon then opens exactly these names without following anything."""
    resolved = os.path.realpath(nonempty_utf8(path, what))
    try:
        os.stat(resolved)
    except OSError as err:  # "keyfence mount: PATH: No such file or directory"
        code = err.errno or errno.EIO
        raise OSError(code, os.strerror(code), path) from None
    if not os.path.isdir(resolved):
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return resolved


def cmd_mount(args: argparse.Namespace) -> int:
    backing = resolve_directory(args.backing, "backing directory")
    mountpoint = resolve_directory(args.mountpoint, "mount point")
    options = [utf8(option, "option") for option in args.option or ()]
    with Client.connect() as client:
        client.mount(backing, mountpoint, options)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    # not stat(): that would ask the mount itself, which may be the stuck one
    mountpoint = os.path.realpath(nonempty_utf8(args.mountpoint, "mount point"))
    from keyfence.cli.progress import ProgressDisplay

    with Client.connect() as client, ProgressDisplay("keyfence", "umount") as progress:
        client.umount(mountpoint, progress=progress)
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from keyfence.cli import dir_keys

    return dir_keys.cmd_lock(args)


def cmd_unlock(args: argparse.Namespace) -> int:
    from keyfence.cli import dir_keys

    return dir_keys.cmd_unlock(args, read_passphrase, salt_of)


SALT_HELP = (
    "the salt the passphrase is stretched with, as e4crypt(8) reads it: s:TEXT"
    " (the bytes of TEXT), 0xHEX (lower-case hex bytes), a UUID (its 16 bytes),"
    " or f:PATH or /PATH (the password salt of the ext4 filesystem holding PATH)."
    " The same passphrase and salt always give the same key descriptor"
)
KEYRING_HELP = (
    "the keyring to add the key to: @s, @u, @us, @p, @t, @g or a key serial"
    " number (default: the session keyring @s if there is one, else the user"
    " session keyring @us, as e4crypt does)"
)
PAD_HELP = (
    "pad file names with NULs to a multiple of PAD bytes (and to at least 16)"
    " before they are encrypted, so that the ciphertext shows only the padded"
    " length: 4, 8, 16 or 32, recorded in the directory's policy (default 16;"
    " e4crypt(8)'s own default is 4)"
)


def padding(text: str) -> int:
    """A ``-p`` value; e4crypt's words for any other ("Invalid padding 5")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid padding {text}") from None
    if value not in (4, 8, 16, 32):
        raise argparse.ArgumentTypeError(f"Invalid padding {value}")
    return value


def seconds(text: str) -> float:
    """A --timeout: a finite number of seconds, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < 1e9:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def add_parsers(sub: Any) -> None:
    mount = sub.add_parser("mount", help="mount BACKING (ciphertext) at MOUNTPOINT")
    mount.add_argument("backing")
    mount.add_argument("mountpoint")
    mount.add_argument(
        "-o",
        "--option",
        action="append",
        metavar="OPT[,OPT...]",
        help="mount options: dirty_limit=SIZE, dirty_expire=SEC, attr_timeout=SEC, "
        "write_through=SIZE, "
        "readahead_kb=KB, max_tasks=N, spin_us=US, fuse_loop=keyfence|pyfuse3, no_uring, "
        "writeback_cache, allow_other, "
        "nonempty, debug",
    )
    mount.set_defaults(run=cmd_mount)
    umount = sub.add_parser("umount", help="flush everything and unmount")
    umount.add_argument("mountpoint")
    umount.set_defaults(run=cmd_umount)
    lock = sub.add_parser("lock", help="flush and remove a directory's key")
    lock.add_argument("path")
    lock.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="give up after SECONDS, key intact",
    )
    lock.add_argument("--emergency", action="store_true", help="wipe now, report what is lost")
    lock.set_defaults(run=cmd_lock)
    unlock = sub.add_parser(
        "unlock",
        help="add a directory's key from its passphrase",
        description="Derive the key of an e4crypt-style directory from its passphrase"
        " (read from the terminal, else the first line of standard input) and add it"
        " to the session keyring @s; the directory's files become readable.",
    )
    unlock.add_argument("path", help="an encrypted directory of a keyfence mount")
    unlock.add_argument(
        "-S",
        dest="salt",
        metavar="SALT",
        help=SALT_HELP + " (default: the salt stored with the directory's policy)",
    )
    unlock.set_defaults(run=cmd_unlock)
    e4 = sub.add_parser("e4crypt", help="e4crypt(8)'s commands")
    e4sub = e4.add_subparsers(dest="e4command", required=True)
    add_key = e4sub.add_parser(
        "add_key",
        help="derive a key from a passphrase and add it to a keyring",
        description="Prompt for a passphrase (or read the first line of standard input),"
        " derive an e4crypt key from it and the salt, add it as logon key"
        " ext4:DESCRIPTOR and print its descriptor; with PATHs, give those empty"
        " directories a policy naming it.",
    )
    add_key.add_argument(
        "-S",
        dest="salt",
        metavar="SALT",
        help=SALT_HELP + " (default: the salt of the first mounted ext4 filesystem)",
    )
    add_key.add_argument("-k", dest="keyring", metavar="KEYRING", help=KEYRING_HELP)
    add_key.add_argument(
        "-v", dest="verbose", action="store_true", help="say which directories got the policy"
    )
    add_key.add_argument(
        "-q", dest="quiet", action="store_true", help="do not print the key's descriptor"
    )
    add_key.add_argument(
        "-p",
        dest="pad",
        type=padding,
        metavar="PAD",
        help=PAD_HELP,
    )
    add_key.add_argument(
        "paths", nargs="*", metavar="PATH", help="empty directories to encrypt with the key"
    )
    set_p = e4sub.add_parser("set_policy", help="encrypt empty directories with a key")
    set_p.add_argument(
        "-p",
        dest="pad",
        type=padding,
        metavar="PAD",
        help=PAD_HELP,
    )
    set_p.add_argument("policy")
    set_p.add_argument("paths", nargs="+")
    get_p = e4sub.add_parser("get_policy")
    get_p.add_argument("paths", nargs="+")
    e4sub.add_parser("new_session")
    e4.set_defaults(run=cmd_e4crypt)
