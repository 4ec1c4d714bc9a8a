"""``@s`` along a real process tree: the kernel's keyring is the oracle.

One login shell joins a session keyring and adds a key; then programs are
started from it the ways users start them -- a subshell, ``setsid``,
``setsid -f`` (double fork, detached), ``nohup``, ``script`` (a pty), a
tmux pane, ``keyctl session`` -- and each reports what its ``@s`` holds.
The kernel side runs Debian's ``keyctl`` in a fresh user namespace (fresh
``@u``/``@us``; the runner's keyrings untouched); the keyfence side runs the
same script with ``keyctl`` on PATH being kfctl against a private daemon.
The reports must agree (KERNEL_FACTS.md, section 14).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyfence.testing.daemon import DaemonProcess, running_daemon

KEYCTL = shutil.which("keyctl")
UNSHARE = shutil.which("unshare")

# name -> how the login shell starts "$PROBE" (a script printing what @s holds)
LAUNCHERS = {
    "subshell": 'sh -c "$PROBE" > $WORK/subshell.out 2>&1',
    "setsid": 'setsid sh -c "$PROBE" > $WORK/setsid.out 2>&1',
    "setsid-f": 'setsid -f sh -c "sleep 0.3; $PROBE" > $WORK/setsid-f.out 2>&1 </dev/null',
    "nohup": 'nohup sh -c "$PROBE" > $WORK/nohup.out 2>&1 </dev/null',
    "script": "script -qc \"sh -c '$PROBE' > $WORK/script.out 2>&1\" /dev/null >/dev/null",
    "tmux": (
        "tmux -S $WORK/tmux -f /dev/null new-session -d"
        " \"sh -c '$PROBE' > $WORK/tmux.out 2>&1\" </dev/null >/dev/null 2>&1"
    ),
    "background": '(sleep 0.2; sh -c "$PROBE" > $WORK/background.out 2>&1) &',
    "keyctl-session": 'keyctl session - sh -c "$PROBE" > $WORK/keyctl-session.out 2>/dev/null',
    "new-session-in-child": (
        "sh -c 'keyctl new_session >/dev/null; sh -c \"$PROBE\"' > $WORK/new-session-in-child.out"
    ),
}

# (not ``print %user:login``: keyutils falls back to /proc/keys for %type:desc)
PROBE = "keyctl rdescribe @s; keyctl search @s user login >/dev/null 2>&1 && echo v || echo missing"

LOGIN = """
keyctl new_session >/dev/null
keyctl add user login v @s >/dev/null
{launch}
keyctl rdescribe @s > $WORK/after.out
keyctl search @s user login >/dev/null && echo v >> $WORK/after.out
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon("--system") as d:
        yield d


def _collect(work: Path, names: list[str], seconds: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + seconds
    out: dict[str, str] = {}
    for name in names:
        path = work / f"{name}.out"
        while time.monotonic() < deadline:
            text = path.read_text() if path.exists() else ""
            if text.count("\n") >= 2:
                break
            time.sleep(0.05)
        out[name] = re.sub(r"\b\d{6,10}\b", "<serial>", path.read_text() if path.exists() else "")
    return out


def _run(argv: list[str], env: dict[str, str], work: Path) -> dict[str, str]:
    work.mkdir()
    env = dict(env, WORK=str(work), PROBE=PROBE)
    launch = "\n".join(LAUNCHERS.values())
    done = subprocess.run(
        [*argv, "sh", "-c", LOGIN.format(launch=launch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    reports = _collect(work, [*LAUNCHERS, "after"])
    subprocess.run(
        ["tmux", "-S", str(work / "tmux"), "kill-server"], capture_output=True, check=False
    )
    return reports


def test_every_way_of_starting_a_program_sees_the_kernels_session_keyring(
    daemon: DaemonProcess,
) -> None:
    if KEYCTL is None or UNSHARE is None:
        pytest.skip("keyctl (keyutils) or unshare (util-linux) is missing: no kernel oracle")
    for tool in ("tmux", "script", "setsid", "nohup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with tempfile.TemporaryDirectory(prefix="kfses-") as tmp:
        root = Path(tmp)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "keyctl"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m keyfence.cli.kfctl "$@"\n')
        shim.chmod(0o755)
        kernel = _run([UNSHARE, "--user", "--map-root-user"], dict(os.environ), root / "kernel")
        ours_env = dict(daemon.env, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        ours = _run([], ours_env, root / "ours")
    login = "keyring;0;0;3f030000;_ses\nv\n"
    fresh = "keyring;0;0;3f030000;_ses\nmissing\n"
    assert kernel == {
        "subshell": login,
        "setsid": login,
        "setsid-f": login,
        "nohup": login,
        "script": login,
        "tmux": login,
        "background": login,
        "keyctl-session": fresh,
        "new-session-in-child": fresh,
        "after": login,
    }, kernel
    assert ours == kernel


def test_session_to_parent_against_the_kernel_worker() -> None:
    """The harness's worker serves from a child of its own stub: giving the
    stub the worker's keyring succeeds and leaves the worker's own @s as it
    was (the model's ModelBackend mirrors that stub)."""
    from tests.oracle.harness import KernelBackend, Normalizer, run_ops
    from tests.oracle.model_backend import ModelBackend, ModelWorld

    if KEYCTL is None:
        pytest.skip("keyutils is missing")
    ops = [
        ("get_keyring_id", "@s", False),
        ("add_key", "user", "a", b"v", "@s"),
        ("session_to_parent",),
        ("session_to_parent",),
        ("get_keyring_id", "@s", False),
        ("search", "@s", "user", "a", 0),
    ]
    with KernelBackend(userns=True) as kb:
        kernel_results = run_ops(kb, ops, Normalizer())
    world = ModelWorld()
    try:
        model_results = run_ops(ModelBackend(world), ops, Normalizer())
    finally:
        world.close()
    assert kernel_results[2:4] == [("ok", None), ("ok", None)], kernel_results
    assert model_results == kernel_results


# The keyring calls of the exec probes.  ``kernel``: the syscalls
# themselves; ``ours``: keyfence's client, one connection per call, as
# kfctl makes.  Each returns the result or -errno.
CALLS = r"""
import ctypes, os, sys
mode = sys.argv[1]
if mode == "kernel":
    libc = ctypes.CDLL(None, use_errno=True)
    def call(*args):
        r = libc.syscall(*args)
        return r if r >= 0 else -ctypes.get_errno()
    def keyring(spec, create):
        return call(250, 0, spec, int(create))  # KEYCTL_GET_KEYRING_ID
    def join():
        return call(250, 1, None)  # KEYCTL_JOIN_SESSION_KEYRING
    def add_to_p():
        return call(248, b"user", b"pk", b"v", 1, -2)
    def request():
        return call(249, b"user", b"pk", None, 0)
    def describe(serial):
        return call(250, 6, serial, ctypes.create_string_buffer(256), 256)
else:
    from keyfence.client import Client
    def op(fn):
        try:
            with Client.connect(autostart=False) as c:
                return fn(c)
        except OSError as err:
            return -err.errno
    def keyring(spec, create):
        return op(lambda c: c.get_keyring_id(spec, create))
    def join():
        return op(lambda c: c.join_session_keyring(None))
    def add_to_p():
        return op(lambda c: c.add_key("user", "pk", b"v", -2))
    def request():
        return op(lambda c: c.request_key("user", "pk"))
    def describe(serial):
        return op(lambda c: (c.describe(serial), 0)[1])
"""

# A program that makes @p (and a key in it) in its own session, then execs
# itself: what the new program finds.
EXEC_PROBE = (
    CALLS
    + r"""
stage = sys.argv[2]
if stage == "before":
    session = join()
    process = keyring(-2, True)
    key = add_to_p()
    print("before:", session > 0, process > 0, request() == key, flush=True)
    print(process, file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[3], mode, str(session), sys.argv[3]])
session = int(stage)
print("after:", keyring(-2, False), keyring(-1, False), keyring(-3, False) == session, request())
"""
)


_ENOKEY = -errno.ENOKEY
EXEC_EXPECTED = f"before: True True True\nafter: {_ENOKEY} {_ENOKEY} True {_ENOKEY}\n"
"""What the new program finds: no @p, no @t, the same @s, not the key."""


def _exec_probe(
    prefix: list[str], mode: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    argv = [*prefix, sys.executable, "-c", EXEC_PROBE, mode, "before", EXEC_PROBE]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_an_exec_drops_the_process_keyring_as_the_kernels_does(daemon: DaemonProcess) -> None:
    """prepare_exec_creds(): the new program has no @p or @t (ENOKEY), the
    same @s, and the key that was in @p is not found.  Before: keyfence
    gave the new program the old @p (the same pid and start time), key and
    all; and the old keyring ends (fenced) soon after."""
    if UNSHARE is None:
        pytest.skip("unshare (util-linux) is missing: no kernel oracle")
    kernel = _exec_probe([UNSHARE, "--user", "--map-root-user"], "kernel", dict(os.environ))
    ours = _exec_probe([], "ours", daemon.env)
    assert (kernel.stdout, kernel.returncode) == (EXEC_EXPECTED, 0), kernel.stderr
    assert (ours.stdout, ours.returncode) == (EXEC_EXPECTED, 0), ours.stderr
    from keyfence.client import Client

    old = int(ours.stderr.split()[0])
    deadline = time.monotonic() + 30
    with Client.connect(daemon.socket, autostart=False) as client:
        while time.monotonic() < deadline:
            try:
                client.describe(old)
            except OSError as err:
                assert err.errno == errno.ENOKEY
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the exec'd program's old @p is still there after 30 s")


# A child makes @p and a key in it, then execs ``sleep``, which never
# calls the keyring again; the parent watches the key while ``sleep`` runs
# and after it is gone.
EXEC_SLEEP_PROBE = (
    CALLS
    + r"""
import signal, time
read, write = os.pipe()
child = os.fork()
if child == 0:
    join()
    keyring(-2, True)
    os.write(write, b"%d" % add_to_p())
    os.execvp("sleep", ["sleep", "60"])
key = int(os.read(read, 32))
time.sleep(1)
print("sleep running:", describe(key) >= 0, os.waitpid(child, os.WNOHANG) == (0, 0))
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
deadline = time.monotonic() + 10
while describe(key) >= 0 and time.monotonic() < deadline:
    time.sleep(0.05)
print("sleep gone:", describe(key))
"""
)


def test_the_old_process_keyring_lives_while_the_execd_program_runs(
    daemon: DaemonProcess,
) -> None:
    """The kernel's exec takes @p from the process, but the old keyring
    (and its key) lives until the new program ends: the executable's open
    file holds the credentials it was opened with, @p and all
    (KERNEL_FACTS.md section 14).  keyfence sees the exec at the process's
    next call; ``sleep`` makes none, so its old @p ends with it, as the
    kernel's does -- not at the exec (an exec event would be early)."""
    if UNSHARE is None:
        pytest.skip("unshare (util-linux) is missing: no kernel oracle")
    expected = f"sleep running: True True\nsleep gone: {_ENOKEY}\n"
    _probe_prints_on_both(EXEC_SLEEP_PROBE, daemon, expected)


def _probe_prints_on_both(probe: str, daemon: DaemonProcess, expected: str) -> None:
    """``probe`` (on :data:`CALLS`) prints ``expected`` on the kernel, in a
    fresh user namespace, and on keyfence."""
    argv = [sys.executable, "-c", probe]
    kernel = subprocess.run(
        [UNSHARE or "unshare", "--user", "--map-root-user", *argv, "kernel"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (kernel.stdout, kernel.returncode) == (expected, 0), kernel.stderr
    ours = subprocess.run(
        [*argv, "ours"], env=daemon.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert (ours.stdout, ours.returncode) == (expected, 0), ours.stderr


def _unit_capabilities() -> str:
    """keyfence.service's CapabilityBoundingSet as setpriv's --bounding-set."""
    from importlib import resources

    unit = resources.files("keyfence.data").joinpath("systemd/keyfence.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("CapabilityBoundingSet=")]
    caps = line.split("=", 1)[1].split()
    return ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])


def test_an_exec_is_seen_for_another_uid_under_the_units_capabilities() -> None:
    """The system daemon as its unit runs it (only the capabilities of
    keyfence.service) sees another uid's exec: reading that uid's
    /proc/PID/auxv takes ptrace read access (CAP_DAC_OVERRIDE to open it,
    then CAP_SYS_PTRACE, which the unit lists for this; this kernel also
    takes CAP_SYS_ADMIN).  An unreadable image would leave the new program
    @p and its key."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    prefix = ["setpriv", f"--bounding-set={_unit_capabilities()}"]
    with running_daemon("--system", prefix=prefix) as daemon:
        as_user = ["setpriv", "--reuid=4652", "--regid=4652", "--clear-groups"]
        done = _exec_probe(as_user, "ours", dict(daemon.env, HOME="/"))
    assert (done.stdout, done.returncode) == (EXEC_EXPECTED, 0), done.stderr


# Run in a session of its own (``keyctl session -``), the main thread adds
# a key and leaves by pthread_exit(); another thread looks for it later.
LEADER_EXIT_PROGRAM = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
static void *later(void *arg) {
    (void)arg;
    usleep(1500000); /* several lifetime checks with the leader a zombie */
    system("keyctl search @s user marker >/dev/null 2>&1 && echo found || echo missing");
    exit(0);
}
int main(void) {
    pthread_t t;
    if (system("keyctl add user marker v @s >/dev/null") != 0)
        return 1;
    pthread_create(&t, NULL, later, NULL);
    pthread_exit(NULL);
}
"""


def test_a_process_whose_main_thread_exited_keeps_its_session_keyring(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """/proc shows a leader that left by pthread_exit() as a zombie while
    its other threads run; the kernel keeps the process's keyrings (the
    threads' credentials hold them).  Before: keyfence counted the zombie
    leader as gone and ended its session keyring, key and all."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if KEYCTL is None or UNSHARE is None or compiler is None:
        pytest.skip("keyctl, unshare or a C compiler is missing")
    program = tmp_path / "leader_exit"
    source = tmp_path / "leader_exit.c"
    source.write_text(LEADER_EXIT_PROGRAM)
    subprocess.run([compiler, "-pthread", "-o", str(program), str(source)], check=True)
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    shim = shim_dir / "keyctl"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m keyfence.cli.kfctl "$@"\n')
    shim.chmod(0o755)
    path = f"{shim_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    kernel = subprocess.run(
        [UNSHARE, "--user", "--map-root-user", KEYCTL, "session", "-", str(program)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = subprocess.run(
        [str(shim), "session", "-", str(program)],
        env=dict(daemon.env, PATH=path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (kernel.stdout, kernel.returncode) == ("found\n", 0), kernel.stderr
    assert (ours.stdout, ours.returncode) == ("found\n", 0), ours.stderr


SETUID_WRAPPER = r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    (void)argc;
    execv(argv[1], argv + 1); /* set-user-ID root: real uid the user's, effective 0 */
    perror("execv");
    return 127;
}
"""


def test_a_set_user_id_program_has_its_real_users_keyrings(daemon: DaemonProcess) -> None:
    """The kernel finds @u and @us by the real uid (cred->user): a user's
    set-user-ID-root program has the user's, not root's.  Before: keyfence
    took the effective uid from SO_PEERCRED and gave it root's @u, where
    root's keys are."""
    from keyfence.testing import users

    compiler = shutil.which("cc") or shutil.which("gcc")
    if KEYCTL is None or compiler is None or users.why_no_other_uids() is not None:
        pytest.skip("keyctl, a C compiler or other uids are missing")
    uid = 4663
    with tempfile.TemporaryDirectory(prefix="kfsuid-") as tmp:
        os.chmod(tmp, 0o755)
        wrapper = Path(tmp) / "wrapper"
        source = Path(tmp) / "wrapper.c"
        source.write_text(SETUID_WRAPPER)
        subprocess.run([compiler, "-o", str(wrapper), str(source)], check=True)
        wrapper.chmod(0o4755)
        ours = [*users.python_argv("-m", "keyfence.cli.kfctl")]
        reports = []
        for keyctl, env in ((["/usr/bin/keyctl"], users.environment()), (ours, daemon.env)):
            env = dict(env, PYTHONPATH=users.pythonpath(), HOME="/")
            lines = []
            for spec in ("@u", "@us"):
                done = subprocess.run(
                    users.as_uid(uid, [str(wrapper), *keyctl, "rdescribe", spec]),
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                lines.append((done.stdout, done.stderr))
            reports.append(lines)
    kernel, keyfence = reports
    assert [out.split(";")[-1] for out, _ in kernel] == [f"_uid.{uid}\n", f"_uid_ses.{uid}\n"]
    assert keyfence == kernel


# Each of five threads makes its @t and puts a key in it; the main thread
# makes its own; then the threads are gone.
THREADS_PROBE = (
    CALLS
    + r"""
import errno, threading, time
made = {}
def worker(n):
    made[n] = keyring(-1, True)
threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
for t in threads:
    t.start()
for t in threads:
    t.join()
mine = keyring(-1, True)
rings = sorted(made.values())
print("distinct:", len(set(rings)), all(r > 0 for r in rings), mine not in rings)
deadline = time.monotonic() + 15
while any(describe(r) >= 0 for r in rings) and time.monotonic() < deadline:
    time.sleep(0.1)
gone = [describe(r) for r in rings] == [-errno.ENOKEY] * 5
print("after the threads:", gone, describe(mine) >= 0)
"""
)


def test_each_thread_has_its_own_thread_keyring(daemon: DaemonProcess) -> None:
    """@t is per thread (the kernel's credentials are) and ends with its
    thread.  Before: the daemon knew only the process, and every thread of
    it shared one @t, which lived until the process exited."""
    if UNSHARE is None:
        pytest.skip("unshare (util-linux) is missing: no kernel oracle")
    expected = "distinct: 5 True True\nafter the threads: True True\n"
    _probe_prints_on_both(THREADS_PROBE, daemon, expected)
