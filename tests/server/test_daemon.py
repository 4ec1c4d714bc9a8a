"""The daemon as a real process, with clients as real processes."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from keyfence import protocol
from keyfence.client import Client
from keyfence.errors import KeyfenceError
from keyfence.testing.daemon import DaemonProcess

S = -3


def client_script(daemon: DaemonProcess, code: str, *, new_session: bool = False) -> str:
    """Run ``code`` in a separate Python process connected to ``daemon``."""
    prelude = "from keyfence.client import Client\nc = Client.connect()\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=new_session,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_round_trip_and_errors(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"payload", S)
        assert c.read(key) == b"payload"
        assert c.describe(key) == "user;0;0;3f010000;k"
        with pytest.raises(KeyfenceError) as info:
            c.read(key + 1 if key < 2**31 - 1 else key - 1)
        assert info.value.errno == errno.ENOKEY
        logon = c.add_key("logon", "svc:x", b"secret", S)
        with pytest.raises(KeyfenceError) as info:
            c.read(logon)
        assert info.value.errno == errno.EOPNOTSUPP


def test_session_keyring_is_shared_by_a_posix_session_only(daemon: DaemonProcess) -> None:
    # two processes of one new session share @s; another session does not
    out = client_script(
        daemon,
        """
        import os, subprocess, sys
        ring = c.get_keyring_id(-3, True)
        c.add_key("user", "shared", b"1", -3)
        child = subprocess.run([sys.executable, "-c",
            "from keyfence.client import Client; c = Client.connect();"
            "print(c.get_keyring_id(-3, False), c.search(-3, 'user', 'shared'))"],
            capture_output=True, text=True, check=True)
        print(ring, child.stdout.strip())
        """,
        new_session=True,
    )
    ring, child_ring, _found = out.split()
    assert ring == child_ring
    other = client_script(daemon, "print(c.get_keyring_id(-3, True))", new_session=True)
    assert other != ring


def test_session_keyring_goes_when_the_session_ends(daemon: DaemonProcess) -> None:
    out = client_script(
        daemon,
        "print(c.get_keyring_id(-3, True), c.add_key('user', 'gone', b'x', -3))",
        new_session=True,
    )
    ring, key = map(int, out.split())
    with Client.connect(daemon.socket, autostart=False) as c:
        deadline = time.monotonic() + 5
        while True:
            try:
                c.describe(ring)
            except KeyfenceError as err:
                assert err.errno in (errno.ENOKEY, errno.EACCES)
                break
            assert time.monotonic() < deadline, "session keyring outlived its session"
            time.sleep(0.05)
        with pytest.raises(KeyfenceError):
            c.describe(key)


def test_process_keyring_goes_when_the_process_exits(daemon: DaemonProcess) -> None:
    out = client_script(daemon, "print(c.get_keyring_id(-2, True))")
    ring = int(out)
    with Client.connect(daemon.socket, autostart=False) as c:
        deadline = time.monotonic() + 5
        while True:
            try:
                c.describe(ring)
            except KeyfenceError as err:
                assert err.errno == errno.ENOKEY
                break
            assert time.monotonic() < deadline, "process keyring outlived its process"
            time.sleep(0.05)


def test_remote_synchronous_watcher_fences_a_removal(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as owner:
        key = owner.add_key("user", "fenced", b"still-here", S)
        seen: list[str] = []

        def flush(note: object) -> None:
            if note.phase == "before":
                # the key is still valid and readable while we flush
                seen.append(owner.read(key).decode())
                time.sleep(0.3)

        owner.watch(key, flush, sync=True, name="test flusher")
        started = time.monotonic()
        owner.clear(S)
        assert time.monotonic() - started >= 0.3
        assert seen == ["still-here"]
        with pytest.raises(KeyfenceError):
            owner.read(key)


def test_remote_watcher_refusal_aborts(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"x", S)

        def refuse(note: object) -> None:
            if note.phase == "before":
                raise OSError(errno.ENOSPC, "No space left on device")

        c.watch(key, refuse, sync=True, name="full disk")
        with pytest.raises(KeyfenceError) as info:
            c.revoke(key)
        assert info.value.errno == errno.ENOSPC
        assert "full disk" in str(info.value)
        assert c.read(key) == b"x"


def test_a_remote_refusal_reaches_the_caller_printable(daemon: DaemonProcess) -> None:
    """A refusal's reason is the watcher's words: cut and made printable
    (keys/fence.py) before the remover's error shows them."""
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"x", S)

        def refuse(note: object) -> None:
            if note.phase == "before":  # type: ignore[attr-defined]
                raise OSError(errno.ENOSPC, "\x1b[2Jfull" + "x" * 5000)

        c.watch(key, refuse, sync=True, name="full disk")
        with pytest.raises(KeyfenceError) as info:
            c.revoke(key)
    assert info.value.errno == errno.ENOSPC
    assert "\x1b" not in str(info.value) and "?[2Jfull" in str(info.value)
    assert len(str(info.value)) < 400


def test_watcher_killed_mid_removal_counts_as_done(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"x", S)
        ring = c.get_keyring_id(S)
        watcher = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    f"""
                    import time, sys
                    from keyfence.client import Client
                    c = Client.connect()
                    def hang(note):
                        print("called", flush=True)
                        time.sleep(3600)
                    c.watch({key}, hang, sync=True)
                    print("ready", flush=True)
                    time.sleep(3600)
                    """
                ),
            ],
            env=daemon.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "ready"
        done = threading.Event()
        errors: list[BaseException] = []

        def remove() -> None:
            try:
                c.unlink(key, ring)
            except BaseException as err:
                errors.append(err)
            done.set()

        threading.Thread(target=remove, daemon=True).start()
        assert watcher.stdout.readline().strip() == "called"
        assert not done.wait(0.3)  # the removal waits for the watcher
        watcher.send_signal(signal.SIGKILL)
        watcher.wait()
        watcher.stdout.close()
        assert done.wait(5), "removal did not complete after its watcher died"
        assert not errors
        with pytest.raises(KeyfenceError):
            c.describe(key)


def test_timeout_and_emergency_over_the_wire(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"x", S)
        release = threading.Event()
        c.watch(key, lambda n: release.wait(30) if n.phase == "before" else None, sync=True)
        with pytest.raises(KeyfenceError) as info:
            c.revoke(key, timeout=0.2)
        assert info.value.errno == errno.ETIMEDOUT
        assert c.read(key) == b"x"
        started = time.monotonic()
        c.revoke(key, emergency=True)
        assert time.monotonic() - started < 1
        with pytest.raises(KeyfenceError) as info:
            c.read(key)
        assert info.value.errno == errno.EKEYREVOKED
        release.set()


def test_progress_reaches_the_caller(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"x", S)

        def flush(note: object) -> None:
            if note.phase == "before":
                for left in (300, 200, 100):
                    note.report_progress(left, "flushing")  # type: ignore[attr-defined]
                    time.sleep(0.1)

        c.watch(key, flush, sync=True, name="slow mount")
        statuses: list[protocol.Status] = []
        c.clear(S, progress=statuses.append)
        assert any(s.pending and s.pending[0].watcher == "slow mount" for s in statuses)
        assert any(s.remaining_bytes in (300, 200, 100) for s in statuses)


def raw(daemon: DaemonProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.socket)
    sock.settimeout(5)
    return sock


def greeted(daemon: DaemonProcess) -> socket.socket:
    """A raw connection past its hello (the Welcome read)."""
    sock = raw(daemon)
    sock.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION)))
    assert isinstance(protocol.read_message(sock), protocol.Welcome)
    return sock


def test_bad_frames_get_errors_and_the_daemon_keeps_serving(daemon: DaemonProcess) -> None:
    sock = raw(daemon)
    sock.sendall(b"\x00\x00\x00\x03abc")  # not a hello
    reply = protocol.read_message(sock)
    sock.close()
    assert isinstance(reply, protocol.Error) and reply.errno == errno.EPROTO
    sock = greeted(daemon)
    sock.sendall(b"\x00\x00\x00\x02\xc1\xc1")  # undecodable, but framed
    reply = protocol.read_message(sock)
    assert isinstance(reply, protocol.Error) and reply.errno == errno.EBADMSG
    sock.sendall(protocol.encode(protocol.Request(id=7, op="add_key", args=[1, 2])))
    reply = protocol.read_message(sock)
    assert isinstance(reply, protocol.Error) and reply.id == 7 and reply.errno == errno.EINVAL
    sock.sendall(protocol.encode(protocol.Request(id=8, op="no_such_op")))
    reply = protocol.read_message(sock)
    assert isinstance(reply, protocol.Error) and reply.errno == errno.EOPNOTSUPP
    sock.sendall(b"\xff\xff\xff\xff")  # oversized frame: error, then closed
    reply = protocol.read_message(sock)
    assert isinstance(reply, protocol.Error) and reply.errno == errno.EMSGSIZE
    assert protocol.read_frame(sock) is None
    sock.close()
    with Client.connect(daemon.socket, autostart=False) as c:
        assert c.ping() == "pong"


def test_old_protocol_version_is_refused(daemon: DaemonProcess) -> None:
    sock = raw(daemon)
    sock.sendall(protocol.encode(protocol.Hello(99)))
    reply = protocol.read_message(sock)
    sock.close()
    assert isinstance(reply, protocol.Error) and reply.errno == errno.EPROTONOSUPPORT


def test_second_daemon_refuses_and_stale_socket_is_replaced(daemon: DaemonProcess) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "keyfence.cli.main", "daemon", "--socket", daemon.socket],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1
    assert "already serves" in second.stdout
    # a stale socket file (its daemon killed) does not stop a new daemon
    daemon.process.kill()
    daemon.process.wait()
    assert os.path.exists(daemon.socket)
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfence.cli.main", "daemon", "--socket", daemon.socket],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with Client.connect(daemon.socket, autostart=False) as c:
                    assert c.ping() == "pong"
                break
            except KeyfenceError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(5)


def test_the_socket_appears_only_once_it_listens(tmp_path: object) -> None:
    """Bound at a temporary name, made to listen, then renamed into place:
    a client that finds the path never gets ECONNREFUSED from a daemon
    still starting (which would make an autostarting client start a second
    one).  The kernel's order of calls, by strace: deterministic."""
    directory = os.path.join(str(tmp_path), "run")
    path = os.path.join(directory, "sock")
    trace = os.path.join(str(tmp_path), "trace")
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=bind,listen,rename,renameat,renameat2",
         "-o", trace, sys.executable, "-m", "keyfence.cli.main", "daemon", "--socket", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client.connect(path, autostart=False) as c:
                    assert c.ping() == "pong"
                break
            except KeyfenceError as err:
                assert err.errno != errno.ECONNREFUSED, err
                assert time.monotonic() < deadline
                time.sleep(0.02)
    finally:
        with contextlib.suppress(OSError, ValueError), open(path + ".lock") as lock:
            os.kill(int(lock.read().strip()), signal.SIGTERM)  # the daemon, not strace
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with open(trace) as f:
        calls = [line for line in f.read().splitlines() if directory in line or "listen(" in line]
    bound = [i for i, line in enumerate(calls) if "bind(" in line]
    listened = [i for i, line in enumerate(calls) if "listen(" in line]
    renamed = [i for i, line in enumerate(calls) if "rename" in line and f'"{path}"' in line]
    assert bound and listened and renamed, calls
    assert f'"{path}"' not in calls[bound[0]], calls  # not bound at the path itself
    assert listened[0] < renamed[0], calls
    assert sorted(os.listdir(directory)) == ["sock.lock"]  # no temporary left


def test_client_autostarts_a_daemon(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "auto", "sock")
    try:
        with Client.connect(path, autostart=True) as c:
            assert c.ping() == "pong"
            c.add_key("user", "k", b"x", S)
        with Client.connect(path, autostart=False) as c:
            assert c.ping() == "pong"  # the same daemon, still running
    finally:
        with open(path + ".lock") as lock:
            pid = int(lock.read().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)


def test_inflight_limit(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"x", S)
        release = threading.Event()
        c.watch(key, lambda n: release.wait(30) if n.phase == "before" else None, sync=True)
        sock = raw(daemon)
        sock.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION)))
        protocol.read_message(sock)
        # 33 removals that all wait on the watcher: the 33rd is refused
        for i in range(33):
            sock.sendall(protocol.encode(protocol.Request(id=i + 1, op="revoke", args=[key])))
        reply = protocol.read_message(sock)
        assert isinstance(reply, protocol.Error) and reply.errno == errno.EBUSY
        release.set()
        sock.close()


def test_a_client_that_does_not_read_its_events_is_dropped(daemon: DaemonProcess) -> None:
    """Events pile up for a watcher that never reads; past the output bound
    (keyfence.server.limits.OUTPUT_LIMIT_BYTES) it is disconnected, and
    the daemon, and whoever makes the events, never wait for it."""
    from keyfence.server.limits import OUTPUT_LIMIT_BYTES

    with Client.connect(daemon.socket, autostart=False) as c:
        description = "d" * 4000  # each event carries it: ~4 KB an event
        key = c.add_key("user", description, b"0", S)
        sock = greeted(daemon)
        sock.sendall(protocol.encode(protocol.Request(1, "watch", [key, 0, False, None])))
        assert isinstance(protocol.read_message(sock), protocol.Reply)
        updates = 3 * OUTPUT_LIMIT_BYTES // 4000
        for i in range(updates):  # each returns at once: nobody waits for the watcher
            c.update(key, str(i).encode())
        assert c.ping() == "pong"
    received = 0
    sock.settimeout(30)
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break  # dropped
        received += len(chunk)
        assert received < 2 * OUTPUT_LIMIT_BYTES, "the daemon kept queueing for a non-reader"
    sock.close()
    assert received < updates * 4000


def test_small_events_count_what_queueing_them_costs(daemon: DaemonProcess) -> None:
    """Red-team pass (session 27): only a queued frame's bytes counted
    against the output bounds, and each small event frame (~200 bytes)
    costs ~400 more in objects; one uid's non-reading watchers held ~200 MB
    where the bounds say 32 MiB.  Each queued frame now also counts
    ``QUEUED_FRAME_BYTES``.  Failed before: 20,000 events were all queued
    and the non-reader was not dropped."""
    from keyfence.server.limits import OUTPUT_LIMIT_BYTES, QUEUED_FRAME_BYTES

    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "e", b"0", S)
        sock = greeted(daemon)
        sock.sendall(protocol.encode(protocol.Request(1, "watch", [key, 0, False, None])))
        assert isinstance(protocol.read_message(sock), protocol.Reply)
        for i in range(20000):
            c.update(key, str(i % 10).encode())
        assert c.ping() == "pong"
    events, dropped = 0, False
    sock.settimeout(5)
    try:
        while protocol.read_message(sock) is not None:
            events += 1
        dropped = True
    except (TimeoutError, OSError):
        pass
    finally:
        sock.close()
    assert dropped, f"a non-reader of {events} small events was kept"
    assert events < OUTPUT_LIMIT_BYTES // QUEUED_FRAME_BYTES


def test_an_empty_frame_is_a_bad_message_not_an_end(daemon: DaemonProcess) -> None:
    """protocol.md: a frame that is not a valid message gets EBADMSG and the
    connection stays (EPROTO, closed, before hello).  An empty frame used to
    close the connection without a word: the loop took it for its own
    marker of a framing error (session 26's red-team pass, finding 4;
    checked failing before: EOF instead of the error)."""
    sock = raw(daemon)
    sock.sendall(b"\x00\x00\x00\x00")
    reply = protocol.read_message(sock)
    sock.close()
    assert isinstance(reply, protocol.Error) and reply.errno == errno.EPROTO
    sock = greeted(daemon)
    sock.sendall(b"\x00\x00\x00\x00")
    reply = protocol.read_message(sock)
    assert isinstance(reply, protocol.Error) and reply.errno == errno.EBADMSG
    sock.sendall(protocol.encode(protocol.Request(id=9, op="ping")))
    reply = protocol.read_message(sock)
    assert isinstance(reply, protocol.Reply) and reply.id == 9
    sock.close()


def test_what_a_watcher_says_reaches_the_caller_bounded_and_printable(
    daemon: DaemonProcess,
) -> None:
    """Session 26's red-team pass, findings 2 and 3: a watch name had no
    bound (2 MiB each, 16,384 per uid: the daemon's memory), and a
    watcher's name and progress note went unchecked into the removal's
    caller's status frames (a status too large for a frame came back as an
    E2BIG *answer* to the removal, which went on) and raw onto its terminal
    (escape sequences).  Now a name is at most 256 printable characters
    (EINVAL), notes and refusals are cut to 256 with control characters as
    ``?`` (checked failing before: the 300-character name and the escape
    were accepted, the note arrived whole)."""
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"x", S)
        for name in ("n" * 300, "\x1b[2Jowned", "a\nb", "\u202eevil"):
            with pytest.raises(KeyfenceError) as info:
                c.watch(key, lambda note: None, sync=True, name=name)
            assert info.value.errno == errno.EINVAL
        c.watch(key, lambda note: None, sync=True, name="n" * 256)

        def flush(note: object) -> None:
            if note.phase == "before":  # type: ignore[attr-defined]
                note.report_progress(1, "\x1b]0;owned\x07" + "x" * (1 << 20))  # type: ignore[attr-defined]
                time.sleep(0.3)

        c.watch(key, flush, sync=True, name="noisy")
        statuses: list[protocol.Status] = []
        c.clear(S, progress=statuses.append)
    notes = [p.note for s in statuses for p in s.pending if p.note]
    assert notes, statuses
    assert all(len(n) <= 256 and "\x1b" not in n and "\x07" not in n for n in notes)
    assert notes[0].startswith("?]0;owned?x")


def test_a_flood_of_watches_is_bounded_and_its_watchers_told_of_the_loss(
    daemon: DaemonProcess,
) -> None:
    """Red-team pass (session 26, "watch fan-out"): 16,384 watches on one's
    own key and a stream of ``setperm``s queued 16,384 notifications per
    call on the daemon's one dispatcher; the queue grew by hundreds of MiB
    and other users' events came seconds late.  Now a uid's queue is
    bounded (keys/notify.py MAX_QUEUED_PER_UID events): past it that uid's
    are dropped and ``kfctl watch`` prints keyctl's ``-- LOSS --``.
    Failed before: no loss line, every notification was queued."""
    from keyfence.server.limits import MAX_INFLIGHT, MAX_WATCHES

    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "flood", b"0", S)
        watcher = subprocess.Popen(
            [sys.executable, "-m", "keyfence.cli.kfctl", "watch", str(key)],
            env=daemon.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stdout is not None
            deadline = time.monotonic() + 30
            while not select.select([watcher.stdout], [], [], 0.2)[0]:
                assert time.monotonic() < deadline, "kfctl watch printed nothing"
                c.update(key, b"1")  # its watch is there once it prints this
            assert watcher.stdout.readline().split()[1:] == ["upd"]
            flooders, drained = [], [0]
            for _ in range(4):  # 4 x 4,096 = the uid's 16,384 watches
                sock = greeted(daemon)
                flooders.append(sock)
                for start in range(0, MAX_WATCHES, MAX_INFLIGHT):
                    batch = [
                        protocol.encode(protocol.Request(n, "watch", [key, 0, False, None]))
                        for n in range(start + 1, start + MAX_INFLIGHT + 1)
                    ]
                    sock.sendall(b"".join(batch))
                    for _n in range(MAX_INFLIGHT):
                        assert isinstance(protocol.read_message(sock), protocol.Reply)

            def drain(sock: socket.socket) -> None:
                sock.settimeout(None)
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(1 << 20):
                        drained[0] += len(chunk)

            readers = [threading.Thread(target=drain, args=(s,), daemon=True) for s in flooders]
            for reader in readers:
                reader.start()
            for i in range(20):  # each for 16,385 watches: past the uid's bound at once
                c.setperm(key, 0x3F3F0000 | i)
            assert c.ping() == "pong"
            c.revoke(key)
            c.unlink(key, S)
            out, err = watcher.communicate(timeout=60)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
            for sock in flooders:
                sock.close()
    lines = out.splitlines()
    assert "-- LOSS --" in lines, (out, err)
    assert lines[-1].split()[1:] == ["gc"], out
    assert "dropping theirs" in daemon.log_text()


def test_a_daemon_that_never_answers_hello_is_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A helper's install run (2026-12-07): a daemon that accepts but never
    answers (stopped, wedged) held every client for ever, silently."""
    from keyfence import client as client_module
    from keyfence.testing.daemon import running_daemon

    monkeypatch.setattr(client_module, "HELLO_SECONDS", 1.0)
    outcome: list[BaseException | None] = []

    def connect(path: str) -> None:
        try:
            Client.connect(path, autostart=False).close()
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    with running_daemon("--system") as d:
        os.kill(d.process.pid, signal.SIGSTOP)
        try:
            waiting = threading.Thread(target=connect, args=(str(d.socket),), daemon=True)
            waiting.start()
            waiting.join(15)
            assert not waiting.is_alive(), "the client still waits for the stopped daemon"
        finally:
            os.kill(d.process.pid, signal.SIGCONT)
    (err,) = outcome
    assert isinstance(err, KeyfenceError) and err.errno == errno.ETIMEDOUT, err
    assert "did not answer in 1 s" in str(err)


def test_a_removal_whose_caller_went_away_is_not_done_later(daemon: DaemonProcess) -> None:
    """A helper's install run (2026-12-07): Ctrl-C on a kfctl removal that
    waited for a key user ended kfctl, and the daemon revoked the key
    anyway once the user was done.  A caller that goes away now aborts
    its removal, as its timeout would: nothing is removed."""
    with Client.connect(daemon.socket, autostart=False) as c:
        key = c.add_key("user", "k", b"x", S)
        release = threading.Event()
        c.watch(key, lambda n: release.wait(30) if n.phase == "before" else None, sync=True)
        env = dict(daemon.env, KEYFENCE_KFCTL_WARM="0")
        revoking = subprocess.Popen(
            [sys.executable, "-m", "keyfence.cli.kfctl", "revoke", str(key)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)  # it waits for the watcher now
        assert revoking.poll() is None
        revoking.send_signal(signal.SIGINT)
        assert revoking.wait(10) == -signal.SIGINT
        time.sleep(0.5)  # the daemon sees the connection close
        release.set()
        time.sleep(1)
        assert c.read(key) == b"x"


def test_a_detached_daemon_delivers_notifications_and_expires_keys(tmp_path: Path) -> None:
    """A helper's permissions run (2026-12-07): `keyfence daemon --detach`
    (how every client autostarts one) forked after the key service had
    started its collector and notifier threads, and the child had neither:
    no watcher was told anything, no key expired, and an emergency removal
    never reached a mount, which went on serving plaintext."""
    sock = tmp_path / "sock"
    tmp_path.chmod(0o700)
    started = subprocess.run(
        [sys.executable, "-m", "keyfence.cli.main", "daemon", "--detach", "--socket", str(sock)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    pid = int((tmp_path / "sock.lock").read_text().strip())
    try:
        with Client.connect(str(sock), autostart=False) as c:
            key = c.add_key("user", "k", b"x", S)
            told = threading.Event()
            c.watch(key, lambda note: told.set(), sync=False)
            c.update(key, b"y")
            assert told.wait(10), "no notification from a detached daemon"
            c.set_timeout(key, 1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    c.read(key)
                except KeyfenceError as err:
                    assert err.errno == errno.EKEYEXPIRED
                    break
                assert time.monotonic() < deadline, "the key never expired"
                time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGTERM)


def test_a_detached_daemon_that_cannot_serve_fails_its_starter(tmp_path: Path) -> None:
    """The starter leaves with the child's outcome: a second daemon for the
    same socket says why and exits 1."""
    sock = tmp_path / "sock"
    tmp_path.chmod(0o700)
    argv = [sys.executable, "-m", "keyfence.cli.main", "daemon", "--detach", "--socket", str(sock)]
    first = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    pid = int((tmp_path / "sock.lock").read_text().strip())
    try:
        second = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1
        assert f"already serves {sock}" in second.stdout + second.stderr
        assert int((tmp_path / "sock.lock").read_text().strip()) == pid
    finally:
        os.kill(pid, signal.SIGTERM)


def test_a_thread_id_counts_only_for_a_thread_of_the_caller(
    daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request names its thread (for that thread's @t); a tid that is no
    thread of the connected process (init's, here) is refused, ESRCH: a
    client cannot take another process's thread keyring."""
    from keyfence import client as client_module

    with Client.connect(daemon.socket, autostart=False) as c:
        monkeypatch.setattr(client_module._thread, "get_native_id", lambda: 1)
        with pytest.raises(KeyfenceError) as info:
            c.get_keyring_id(-1, True)
        assert info.value.errno == errno.ESRCH
        monkeypatch.undo()
        assert c.get_keyring_id(-1, True) > 0
