"""A mount worker for tests, with its keys in an in-process KeyService.

``python -m keyfence.testing.mount_worker --control SOCK BACKING MOUNTPOINT [worker options]``

Until the daemon's ``mount`` operation exists, the tests start the worker
themselves: this launcher runs the real worker (:func:`keyfence.fs.worker.main`)
with :class:`ServiceKeySource`, a key source over a real
:class:`~keyfence.keys.KeyService` living in the same process -- real keys,
real session keyrings looked up by the requesting process's session id,
real synchronous watches and fenced removals.  A small control socket lets
the test add and remove keys (one JSON request per connection, one JSON
answer).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from typing import Any

from keyfence.fs.keysource import FoundKey, GoingAway, OnGoing
from keyfence.keys import KEY_SPEC_SESSION_KEYRING, Caller, KeyService
from keyfence.keys.fence import RemovalProgress
from keyfence.keys.notify import Notification, Phase, Watch


def _ids(pid: int) -> tuple[int, int]:
    uid = gid = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


class ServiceKeySource:
    """KeySource over an in-process KeyService (see module doc)."""

    def __init__(self, service: KeyService) -> None:
        self.service = service
        self.admin = Caller(uid=0, gid=0, pid=os.getpid())
        self.reports: list[dict[str, Any]] = []
        self.finds: list[tuple[str, int, int | None]] = []
        self._watches: list[Watch] = []
        self._lock = threading.Lock()

    def caller_for(self, pid: int) -> Caller:
        uid, gid = _ids(pid)
        return Caller(uid=uid, gid=gid, pid=pid, session=os.getsid(pid))

    def find(self, descriptions: list[str], pid: int) -> FoundKey | None:
        try:
            caller = self.caller_for(pid)
        except OSError:
            return None
        for desc in descriptions:
            for type_name in ("logon", "user"):
                try:
                    serial = self.service.request_key(caller, type_name, desc)
                    with self.service.use_key(caller, serial) as payload, payload.view() as view:
                        data = bytes(view)
                except OSError:
                    continue
                with self._lock:
                    self.finds.append((desc, pid, serial))
                return FoundKey(serial, desc, data)
        with self._lock:
            self.finds.append((descriptions[0] if descriptions else "", pid, None))
        return None

    def watch(self, serial: int, on_going: OnGoing) -> None:
        def callback(note: Notification) -> None:
            if note.phase is not Phase.BEFORE and not note.emergency:
                return
            going = GoingAway(
                serial=note.key, emergency=note.emergency, op=note.op, _report=note._report
            )
            on_going(going)
            if going.dropped:
                self.report("dropped", {"key": serial, "files": dict(going.dropped)})

        watch = self.service.watch(self.admin, serial, callback, sync=True, name="test mount")
        with self._lock:
            self._watches.append(watch)

    def report(self, event: str, detail: dict[str, Any]) -> None:
        with self._lock:
            self.reports.append({"event": event, **detail})

    def close(self) -> None:
        for watch in self._watches:
            watch.remove()


class Control:
    """The test's handle on the KeyService, over a Unix socket."""

    def __init__(self, service: KeyService, source: ServiceKeySource, path: str) -> None:
        self.service = service
        self.source = source
        self.progress: list[list[int | None]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        threading.Thread(target=self._serve, name="test-control", daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            request = json.loads(f.readline())
            try:
                answer = {"ok": True, "result": self.handle(request)}
            except OSError as err:
                answer = {"ok": False, "errno": err.errno, "message": str(err)}
            except Exception as err:  # a test bug: say so
                answer = {"ok": False, "errno": 0, "message": repr(err)}
            f.write(json.dumps(answer).encode() + b"\n")
            f.flush()

    def _caller(self, request: dict[str, Any]) -> Caller:
        uid = int(request.get("uid", 0))
        return Caller(uid=uid, gid=uid, pid=os.getpid(), session=int(request["sid"]))

    def _progress(self) -> Any:
        record: list[int | None] = []
        self.progress.append(record)

        def callback(p: RemovalProgress) -> None:
            record.append(p.remaining_bytes)

        return callback

    def handle(self, r: dict[str, Any]) -> Any:
        op = r["op"]
        kw: dict[str, Any] = {}
        if op in ("unlink", "clear", "revoke", "invalidate"):
            kw = {"emergency": bool(r.get("emergency")), "progress": self._progress()}
            if r.get("timeout") is not None:
                kw["timeout"] = float(r["timeout"])
        if op == "add":
            return self.service.add_key(
                self._caller(r),
                r.get("type", "logon"),
                r["description"],
                bytes.fromhex(r["payload"]),
                KEY_SPEC_SESSION_KEYRING,
            )
        if op == "unlink":
            self.service.unlink(self._caller(r), int(r["serial"]), KEY_SPEC_SESSION_KEYRING, **kw)
            return None
        if op == "clear":
            self.service.clear(self._caller(r), KEY_SPEC_SESSION_KEYRING, **kw)
            return None
        if op == "revoke":
            self.service.revoke(self._caller(r), int(r["serial"]), **kw)
            return None
        if op == "invalidate":
            self.service.invalidate(self._caller(r), int(r["serial"]), **kw)
            return None
        if op == "reports":
            with self.source._lock:
                return list(self.source.reports)
        if op == "finds":
            with self.source._lock:
                return list(self.source.finds)
        if op == "progress":
            return self.progress
        if op == "requests":  # FUSE requests by opcode (keyfence's own loop)
            from keyfence.fs.fuse import kernel as fuse_kernel

            session = fuse_kernel.active()
            return None if session is None else list(session.by_opcode)
        if op == "dir_attributes":  # directories whose GETATTR (and missing names) C answers
            from keyfence.fs.fuse import kernel as fuse_kernel

            session = fuse_kernel.active()
            if session is None:
                return None
            table = session.ops.dir_attributes
            return {
                "entries": sorted(table.table),
                "names": sorted(ino for ino, entry in table.table.items() if entry[4] is not None),
                "served": session.served_from_tables,
            }
        if op == "negatives":  # negative entries the mount remembers handing out
            from keyfence.fs.fuse import kernel as fuse_kernel

            session = fuse_kernel.active()
            return None if session is None else len(session.ops.negatives)
        if op == "idle":  # files closed clean, kept open for the next open
            from keyfence.fs.fuse import kernel as fuse_kernel

            session = fuse_kernel.active()
            if session is None:
                return None
            cache = session.ops.cache
            return {"inodes": cache.idle_inodes(), "reopens": cache.stats["idle_reopens"]}
        if op == "blocking":  # blocking calls waited for directly, through trio
            from keyfence.fs.fuse import kernel as fuse_kernel

            session = fuse_kernel.active()
            if session is None:
                return None
            return [session.blocking.direct, session.blocking.through_trio]
        if op == "queues":  # the io_uring queues' figures (fs/fuse/ring.py), None without
            from keyfence.fs.fuse import kernel as fuse_kernel

            session = fuse_kernel.active()
            if session is None or session.queues is None:
                return None
            return session.queues.statistics()
        raise ValueError(f"unknown op {op}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--control", required=True)
    args, rest = parser.parse_known_args()
    service = KeyService()
    source = ServiceKeySource(service)
    Control(service, source, args.control)
    from keyfence.fs.worker import main as worker_main

    try:
        return worker_main(rest, key_source=source)
    finally:
        service.close()


if __name__ == "__main__":
    sys.exit(main())
