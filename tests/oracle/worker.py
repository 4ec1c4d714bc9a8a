"""A long-lived process that performs kernel key operations for a parent.

Run as ``python tests/oracle/worker.py [flags]`` (or ``python -m tests.oracle.worker``).
Keyring state belongs to processes and credentials, so the oracle must act from a process
whose uid, groups and session keyring the test chooses; this is that process.

Protocol, one JSON object per line on stdin/stdout:

* first the worker writes ``{"ready": {"pid": P, "uid": U, "gid": G}}``;
* request ``{"op": "add_key", "args": ["user", "d", {"hex": "6869"}, -3]}``;
* reply ``{"ok": value}`` or ``{"errno": N}``; bytes travel as ``{"hex": "..."}``.

Ops are the functions of kernel.py plus ``getuid``, ``getgid``, ``getgroups``,
``key_users`` (text of /proc/key-users) and ``exit``.

Flags:

``--session anon|none|NAME``
    anon (default) joins a fresh anonymous session keyring, so the caller's session
    keyring is never touched; none keeps whatever was inherited; NAME joins that named one.
``--as UID:GID[:G1,G2,...]``
    re-exec under ``setpriv`` with those credentials (after the user namespace, if any).
``--userns``
    unshare a user namespace, write ``{"userns": pid}`` and wait for the parent to write
    uid_map/gid_map and send one line; see harness.KernelBackend for why.

The worker forks once at start: the op-serving child's parent is then the worker's own
stub, so KEYCTL_SESSION_TO_PARENT never reaches the test runner's session keyring.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from keyfence.testing import kernel_keyctl as kernel  # PYTHONPATH: harness.py

CLONE_NEWUSER = 0x10000000

OPS: frozenset[str] = frozenset(
    {
        "instantiate",
        "reject",
        "assume_authority",
        "add_key",
        "request_key",
        "get_keyring_id",
        "join_session_keyring",
        "update",
        "revoke",
        "chown",
        "setperm",
        "describe",
        "clear",
        "link",
        "unlink",
        "search",
        "read",
        "set_timeout",
        "invalidate",
        "move",
        "get_security",
        "set_reqkey_keyring",
        "session_to_parent",
        "restrict_keyring",
        "capabilities",
    }
)


def encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"hex": bytes(value).hex()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def _key_users() -> str:
    with open("/proc/key-users") as f:
        return f.read()


EXTRA: dict[str, Callable[..., Any]] = {
    "getuid": os.getuid,
    "getgid": os.getgid,
    "getgroups": os.getgroups,
    "key_users": _key_users,
}


def handle(request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    args = decode(request.get("args", []))
    if op in OPS:
        func: Callable[..., Any] = getattr(kernel, op)
    elif op in EXTRA:
        func = EXTRA[op]
    else:
        return {"error": f"unknown op {op!r}"}
    try:
        return {"ok": encode(func(*args))}
    except OSError as e:
        return {"errno": e.errno}


def send(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "exit":
            send({"ok": None})
            return
        send(handle(request))


def _read_line_unbuffered() -> bytes:
    """Read one line from fd 0 without read-ahead: the fd survives an exec."""
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            raise SystemExit("worker: parent closed stdin during setup")
        out += chunk
    return bytes(out)


def enter_userns() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
    send({"userns": os.getpid()})
    _read_line_unbuffered()  # the parent has written our uid_map and gid_map


def exec_as(spec: str, rest: list[str]) -> None:
    """Replace this process with the same worker under setpriv's credentials."""
    parts = spec.split(":")
    uid = parts[0]
    gid = parts[1] if len(parts) > 1 and parts[1] else uid
    groups = parts[2] if len(parts) > 2 else ""
    groups_arg = [f"--groups={groups}"] if groups else ["--clear-groups"]
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", *groups_arg, "--"]
    argv += [sys.executable, os.path.abspath(__file__), *rest]
    sys.stdout.flush()
    os.execvp("setpriv", argv)


def fork_stub() -> None:
    """Fork; the parent waits as a stub and the child goes on to serve."""
    pid = os.fork()
    if pid == 0:
        return
    os.close(0)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--session", default="anon")
    parser.add_argument("--as", dest="as_", default=None)
    parser.add_argument("--userns", action="store_true")
    args = parser.parse_args(argv)

    if args.userns:
        enter_userns()
    if args.as_ is not None:
        exec_as(args.as_, ["--session", args.session])

    fork_stub()
    if args.session == "anon":
        kernel.join_session_keyring(None)
    elif args.session != "none":
        kernel.join_session_keyring(args.session)
    send({"ready": {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}})
    serve()


if __name__ == "__main__":
    main()
