"""Is this the user's login password?  Asked of PAM, as fscrypt asks it.

``keyfence login add`` and ``login passwd`` wrap a directory's key under
a password that the login's ``auth`` step will later hand to ``keyfence
pam``.  A password that is not the login password (a typo typed once, or
root guessing for someone else) would make a protector no login ever
opens, so the password is checked first with ``pam_authenticate`` (as
``fscrypt encrypt --source=pam_passphrase`` does through its ``fscrypt``
service).

The PAM service is ``keyfence``: ``/etc/pam.d/keyfence`` when the admin
wrote one (an LDAP or SSSD site names its modules there), else a private
configuration holding only ``auth required pam_unix.so`` (fscrypt's
default), read through ``pam_start_confdir`` (Linux-PAM 1.4+) so that the
system's ``other`` service, whose ``common-auth`` runs ``keyfence pam``
itself, is never used.  ``keyfence pam`` also does nothing for the
service ``keyfence``, should an admin's file include ``common-auth``.

As root any account can be checked; as a user, pam_unix's setgid helper
(``unix_chkpwd``) checks only the user's own password, which is the only
one a user's ``login add`` needs.  A wrong password costs PAM's fail delay
(2 s with pam_unix), as at a login prompt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile

from keyfence.errors import KeyfenceError

SERVICE = "keyfence"
SYSTEM_CONFIG = f"/etc/pam.d/{SERVICE}"
PRIVATE_CONFIG = "auth required pam_unix.so\n"

_PAM_SUCCESS = 0
_PAM_AUTH_ERR = 7
_PAM_USER_UNKNOWN = 10
_PAM_CONV_ERR = 19
_PAM_SILENT = 0x8000
_PAM_DISALLOW_NULL_AUTHTOK = 0x1
_PAM_PROMPT_ECHO_OFF = 1


# libpam's conversation ABI, as pam_login.py (the demo's login program)
# declares it too: that one runs by path under the system interpreter and
# imports nothing of keyfence, so the two cannot share one declaration.
class _Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


_CONV = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(_Message)),
    ctypes.POINTER(ctypes.POINTER(_Response)),
    ctypes.c_void_p,
)


class _Conv(ctypes.Structure):
    _fields_ = [("conv", _CONV), ("appdata_ptr", ctypes.c_void_p)]


def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    name = ctypes.util.find_library("pam") or "libpam.so.0"
    try:
        pam = ctypes.CDLL(name)
    except OSError:
        raise KeyfenceError(
            errno.ENOPKG,
            "cannot check the login password: libpam is not installed (apt-get install libpam0g)",
        ) from None
    return pam, ctypes.CDLL(None)


def check_login_password(user: str, password: bytes) -> None:
    """Return if PAM's ``auth`` accepts ``password`` for ``user``; else
    raise EKEYREJECTED (wrong password), ENOENT (unknown to PAM) or EACCES
    (PAM could not say, with PAM's own words)."""
    pam, libc = _libraries()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.calloc.restype = ctypes.c_void_p
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pam.pam_strerror.restype = ctypes.c_char_p
    pam.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]

    def conversation(count, messages, answers, _data):  # type: ignore[no-untyped-def]
        # PAM frees the answers (overwriting each one first): they come from
        # libc's allocator, never from Python's
        if count <= 0 or count > 32:
            return _PAM_CONV_ERR
        table = libc.calloc(count, ctypes.sizeof(_Response))
        if not table:
            return _PAM_CONV_ERR
        replies = ctypes.cast(table, ctypes.POINTER(_Response))
        for i in range(count):
            if messages[i].contents.msg_style != _PAM_PROMPT_ECHO_OFF:
                continue  # text and errors: nothing to answer; a login name: given
            copy = libc.malloc(len(password) + 1)
            if not copy:
                continue
            ctypes.memmove(copy, password, len(password))
            ctypes.memset(copy + len(password), 0, 1)
            replies[i].resp = copy
        answers[0] = replies
        return _PAM_SUCCESS

    conv = _Conv(_CONV(conversation), None)
    handle = ctypes.c_void_p()
    private = None
    try:
        if os.path.exists(SYSTEM_CONFIG):
            status = pam.pam_start(
                SERVICE.encode(), user.encode(), ctypes.byref(conv), ctypes.byref(handle)
            )
        else:
            if not hasattr(pam, "pam_start_confdir"):
                raise KeyfenceError(
                    errno.ENOPKG,
                    f"cannot check the login password: this Linux-PAM is older than 1.4; "
                    f"write {SYSTEM_CONFIG} ({PRIVATE_CONFIG.strip()!r}, as for fscrypt)",
                )
            private = tempfile.mkdtemp(prefix="keyfence-pam-")
            with open(os.path.join(private, SERVICE), "w") as config:
                config.write(PRIVATE_CONFIG)
            status = pam.pam_start_confdir(
                SERVICE.encode(),
                user.encode(),
                ctypes.byref(conv),
                private.encode(),
                ctypes.byref(handle),
            )
        if status != _PAM_SUCCESS:
            raise KeyfenceError(errno.EACCES, f"cannot check the login password: PAM {status}")
        try:
            status = pam.pam_authenticate(handle, _PAM_SILENT | _PAM_DISALLOW_NULL_AUTHTOK)
            words = (pam.pam_strerror(handle, status) or b"").decode(errors="replace")
        finally:
            pam.pam_end(handle, status)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    if status == _PAM_SUCCESS:
        return
    if status == _PAM_AUTH_ERR:
        raise KeyfenceError(errno.EKEYREJECTED, f"that is not {user}'s login password")
    if status == _PAM_USER_UNKNOWN:
        raise KeyfenceError(errno.ENOENT, f"{user} is not known to PAM")
    raise KeyfenceError(
        errno.EACCES,
        f"cannot check {user}'s login password: {words} (PAM service {SERVICE!r}: "
        f"{SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else 'pam_unix only'})",
    )
