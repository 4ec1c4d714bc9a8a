"""Making and re-wrapping login protectors (``keyfence login add/passwd``).

Passphrases come from the terminal without echo, or else one per line of
standard input (so a script can feed them); they are never printed.
"""

from __future__ import annotations

import errno
import getpass
import os
import sys
from dataclasses import dataclass

from keyfence.cli import dir_keys, pam_check
from keyfence.client import Client
from keyfence.errors import KeyfenceError
from keyfence.fs import e4crypt_compat as e4
from keyfence.fs.crypto import MasterKey
from keyfence.fs.format import KeyKind, KeyRef
from keyfence.fs.protector import LoginProtector, ScryptParams, WrongPassphrase

S = -3


@dataclass(frozen=True, slots=True)
class LoginUser:
    name: str
    uid: int
    gid: int
    home: str


_lines: list[bytes] | None = None


def ask(prompt: str) -> bytes:
    """One passphrase: the terminal, else the next line of standard input."""
    global _lines
    if sys.stdin.isatty():
        return getpass.getpass(prompt).encode()
    if _lines is None:
        data = sys.stdin.buffer.read(65536)
        _lines = [line.split(b"\x00", 1)[0] for line in data.split(b"\n")]
        if data.endswith(b"\n"):
            _lines.pop()
    if not _lines:
        raise KeyfenceError(errno.EINVAL, f"{prompt.strip()} no more input")
    print(prompt, file=sys.stderr, flush=True)
    return _lines.pop(0)


def _login_password(user: LoginUser, prompt: str) -> bytes:
    """The login password, asked and checked with PAM (pam_check.py): a
    protector under any other password would never open at login."""
    password = ask(prompt)
    pam_check.check_login_password(user.name, password)
    return password


def _encrypt_new(path: str) -> tuple[KeyRef, bytes]:
    """Encrypt the empty directory ``path`` with a new random key.

    The key goes into the caller's ``@s`` (the mount looks for it there
    when the policy is set) and is removed again by the caller if it is
    not the directory's user.
    """
    master = os.urandom(64)
    ref = MasterKey(master).key_ref(KeyKind.IDENTIFIER)
    with Client.connect() as client:
        client.add_key("logon", ref.description, master, S)
    os.setxattr(path, dir_keys.POLICY_XATTR, ref.description.encode())
    return ref, master


def _existing_key(path: str, ref: KeyRef, user: LoginUser) -> bytes:
    """The master key of an encrypted directory, from what the user knows."""
    where = dir_keys.protectors_dir(path)
    prot = dir_keys.read_protectors(where) if where else None
    if prot is not None and prot.login_for(user.uid) is not None:
        try:
            return prot.login_for(user.uid).unwrap(  # type: ignore[union-attr]
                ask(f"Enter current login passphrase for {user.name}: "), ref
            )
        except WrongPassphrase:
            raise KeyfenceError(errno.EKEYREJECTED, "wrong passphrase") from None
    if ref.kind is KeyKind.E4CRYPT_DESCRIPTOR:
        salt = dir_keys.stored_salt(path)
        if salt is None:
            raise KeyfenceError(errno.ENOKEY, f"{path}: no salt stored with its policy")
        key = e4.derive_key(ask(f"Enter the passphrase of {path}: "), salt)
        if e4.key_description(e4.descriptor(key)) != ref.description:
            raise KeyfenceError(errno.EKEYREJECTED, "wrong passphrase for the directory")
        return key
    raise KeyfenceError(
        errno.ENOKEY,
        f"{path} is encrypted with a raw key ({ref.description}) and no protector this "
        "user can open; only an empty directory or an e4crypt-passphrase one can be set up",
    )


def add_login_protector(path: str, user: LoginUser, *, kdf_log2_n: int = 15) -> None:
    try:
        dir_keys.status_of(path)
    except OSError as err:
        raise KeyfenceError(
            errno.EINVAL, f"{path}: not a directory of a keyfence mount ({err.strerror})"
        ) from None
    ref_text = dir_keys.policy_of(path)
    created = False
    prompt = f"Enter login passphrase for {user.name}: "
    if ref_text is None:
        if os.listdir(path):
            raise KeyfenceError(errno.ENOTEMPTY, f"{path}: not encrypted and not empty")
        passphrase = _login_password(user, prompt)  # before the directory changes
        ref, master = _encrypt_new(path)
        created = True
    else:
        ref = KeyRef.from_description(ref_text)
        master = _existing_key(path, ref, user)
        passphrase = _login_password(user, prompt)
    protector = LoginProtector.wrap(
        user.uid, passphrase, master, ref, params=ScryptParams(log2_n=kdf_log2_n)
    )
    where = dir_keys.protectors_dir(path) or path
    dir_keys.write_protectors(where, dir_keys.read_protectors(where).with_login(protector))
    if created and user.uid != os.getuid():
        # root set it up for someone else: the key is theirs, unlocked at their login
        status = dir_keys.status_of(path)
        with Client.connect() as client:
            if isinstance(status.get("serial"), int):
                client.lock_filesystem_key(status["serial"])


def change_passphrase(path: str, user: LoginUser, *, kdf_log2_n: int = 15) -> None:
    ref_text = dir_keys.policy_of(path)
    where = dir_keys.protectors_dir(path)
    if ref_text is None or where is None:
        raise KeyfenceError(errno.ENOKEY, f"{path}: no login protector")
    ref = KeyRef.from_description(ref_text)
    prot = dir_keys.read_protectors(where)
    old = prot.login_for(user.uid)
    if old is None:
        raise KeyfenceError(errno.ENOKEY, f"{path}: no login protector for {user.name}")
    try:
        # the old record may cost more than a login allows: this command
        # (the user's own, or root's choice) pays, and writes one that does not
        prompt = f"Enter current login passphrase for {user.name}: "
        master = old.unwrap(ask(prompt), ref, budget=False)
    except WrongPassphrase:
        raise KeyfenceError(errno.EKEYREJECTED, "wrong passphrase") from None
    new = LoginProtector.wrap(
        user.uid,
        _login_password(user, f"Enter new login passphrase for {user.name}: "),
        master,
        ref,
        params=ScryptParams(log2_n=kdf_log2_n),
    )
    dir_keys.write_protectors(where, prot.with_login(new))
