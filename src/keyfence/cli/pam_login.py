"""A minimal login program on the real libpam, for a PAM service we name.

``su``, ``runuser``, ``login`` and ``sshd`` hard-code their PAM service
names, and a test must not edit their files in /etc/pam.d; this does what
they do with a service of the test's own:

    pam_start(SERVICE, USER) -> pam_authenticate -> pam_acct_mgmt
    -> pam_setcred(ESTABLISH) -> pam_open_session -> fork: the user's
    shell runs COMMAND (initgroups, setgid, setuid, cd home) -> wait
    -> pam_close_session -> pam_setcred(DELETE) -> pam_end

Run as root: ``python3 pam_login.py SERVICE USER COMMAND`` with the
password in ``$PAM_LOGIN_PASSWORD`` (removed from ``os.environ`` before
anything else runs, so the shell does not get it; the process's initial
environment block, ``/proc/PID/environ``, keeps it for the login, readable
by root alone: a test and demo program, not a login program to deploy);
with ``$PAM_LOGIN_NEW_PASSWORD`` the password is changed (pam_chauthtok)
after the command, before the session closes.
Exit status: the command's, or 90 + the PAM step that failed.  The last
line on standard error is ``pam_login: close_session took S s`` (the
logout as a user waits for it, keyfence pam's start included).
Single-threaded, as session_to_parent wants its target.

Imports nothing of keyfence: it runs under the system interpreter, by path
(:data:`keyfence.cli.demo_login.PAM_LOGIN`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
import sys
import time
from collections.abc import Callable
from typing import Any

PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 2, 3, 4
PAM_ESTABLISH_CRED, PAM_DELETE_CRED = 0x2, 0x4


class PamMessage(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class PamResponse(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


CONV = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(PamMessage)),
    ctypes.POINTER(ctypes.POINTER(PamResponse)),
    ctypes.c_void_p,
)


class PamConv(ctypes.Structure):
    _fields_ = [("conv", CONV), ("appdata_ptr", ctypes.c_void_p)]


def main() -> int:
    service, user, command = sys.argv[1], sys.argv[2], sys.argv[3]
    password = os.environ.pop("PAM_LOGIN_PASSWORD", "").encode()
    new_password = os.environ.pop("PAM_LOGIN_NEW_PASSWORD", "").encode()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.calloc.restype = ctypes.c_void_p
    libc.strdup.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]
    libpam = ctypes.CDLL(ctypes.util.find_library("pam"))
    handle = ctypes.c_void_p()

    def conversation(n: int, messages: Any, responses: Any, _data: Any) -> int:
        array = libc.calloc(n, ctypes.sizeof(PamResponse))
        responses[0] = ctypes.cast(array, ctypes.POINTER(PamResponse))
        for i in range(n):
            m = messages[i].contents
            text = (m.msg or b"").decode(errors="replace")
            if m.msg_style == PAM_PROMPT_ECHO_OFF:
                new = new_password and "new" in text.lower()
                responses[0][i].resp = libc.strdup(new_password if new else password)
            elif m.msg_style == PAM_PROMPT_ECHO_ON:
                responses[0][i].resp = libc.strdup(user.encode())
            else:
                print(f"pam_login: {text}", file=sys.stderr, flush=True)
        return 0

    conv = CONV(conversation)
    pamconv = PamConv(conv, None)
    if libpam.pam_start(
        service.encode(), user.encode(), ctypes.byref(pamconv), ctypes.byref(handle)
    ):
        return 90
    steps: list[tuple[str, Callable[[], int]]] = [
        ("authenticate", lambda: libpam.pam_authenticate(handle, 0)),
        ("acct_mgmt", lambda: libpam.pam_acct_mgmt(handle, 0)),
        ("setcred", lambda: libpam.pam_setcred(handle, PAM_ESTABLISH_CRED)),
        ("open_session", lambda: libpam.pam_open_session(handle, 0)),
    ]
    for number, (name, step) in enumerate(steps, start=91):
        code = step()
        if code:
            libpam.pam_strerror.restype = ctypes.c_char_p
            why = libpam.pam_strerror(handle, code).decode()
            print(f"pam_login: pam_{name}: {why}", file=sys.stderr, flush=True)
            libpam.pam_end(handle, code)
            return number
    entry = pwd.getpwnam(user)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.initgroups(user, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            home = entry.pw_dir
            try:
                os.chdir(home)
            except OSError:  # as login(1): "No directory, logging in with HOME=/"
                print("pam_login: no directory, logging in with HOME=/", file=sys.stderr)
                home = "/"
                os.chdir(home)
            env = dict(os.environ, HOME=home, USER=user, LOGNAME=user, SHELL="/bin/sh")
            os.execve("/bin/sh", ["-sh", "-c", command], env)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    if new_password:  # passwd in the session, as root changes it (no old one asked)
        code = libpam.pam_chauthtok(handle, 0)
        if code:
            print(f"pam_login: pam_chauthtok failed ({code})", file=sys.stderr, flush=True)
            return 95
    start = time.monotonic()
    code = libpam.pam_close_session(handle, 0)
    took = time.monotonic() - start
    if code:
        print(f"pam_login: pam_close_session failed ({code})", file=sys.stderr, flush=True)
    libpam.pam_setcred(handle, PAM_DELETE_CRED)
    libpam.pam_end(handle, 0)
    print(f"pam_login: close_session took {took:.3f} s", file=sys.stderr, flush=True)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
