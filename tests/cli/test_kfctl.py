"""kfctl against Debian's keyctl(1), and its own parts.

Golden scripts (``kfctl_golden/*.sh``) are shell scripts that call
``keyctl``.  Each runs twice:

* through Debian's ``/usr/bin/keyctl`` as ``unshare --user --map-root-user
  keyctl session - sh SCRIPT`` -- a throwaway user namespace (fresh @u and
  @us) and an anonymous session keyring, so nothing of the machine's own
  keyrings is touched -- and must print ``SCRIPT.out``;
* through kfctl, as ``kfctl session - sh SCRIPT`` with ``keyctl`` on PATH
  running kfctl, against a real daemon process started for the script on a
  private socket, and must print ``SCRIPT.kfctl.out`` if there is one (a
  documented difference), else ``SCRIPT.out``.

stdout and stderr are one stream (so the order of errors and output is
compared too) and the script's exit status is appended.  Serial numbers
are normalized to ``<K1>``, ``<K2>``, ... in order of appearance (a serial
is a decimal number of 6 to 10 digits not starting with 0, or ``0x`` and 8
hex digits as ``show -x`` prints them, which becomes ``<Kn:hex>``; its
padding at the start of a line is dropped), and the program name ``kfctl``
reads ``keyctl``.

``KFCTL_GOLDEN_REGEN=1`` rewrites the ``.out`` files from Debian's keyctl.
"""

from __future__ import annotations

import errno
import os
import pty
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyfence.cli import kfctl, kfctl_text, kfctl_tool
from keyfence.cli.kfctl_text import NameLookup, UsageError
from keyfence.cli.progress import human_bytes, progress_text
from keyfence.testing import users
from keyfence.testing.warm import WarmServer, running_warm_server

GOLDEN = Path(__file__).parent / "kfctl_golden"
SCRIPTS = sorted(p.stem for p in GOLDEN.glob("*.sh"))
KEYCTL = shutil.which("keyctl", path="/usr/bin:/bin:/usr/sbin:/sbin")
UNSHARE = shutil.which("unshare")
REGEN = os.environ.get("KFCTL_GOLDEN_REGEN") == "1"

# ------------------------------------------------------------- normalizing

_SERIAL = re.compile(r"(?m)(^ +)?(?<![\w.-])(0x[0-9a-f]{8}|[1-9][0-9]{0,9})(?![\w.])")
# A serial is random in [3, 2**31): nearly always 6 digits or more, but one in
# ~20,000 is shorter (CI once drew 81953). A shorter number is a serial only
# if it also stands where only a serial can: a show line's id before its
# permissions, "N: key inaccessible", "Joined session keyring: N", or in hex
# as 0x and eight digits. Elsewhere ("rc=1", "2 keys in keyring:", a gid
# 65534) a short number is itself.
_SHORT_SERIAL_PLACES = re.compile(
    r"(?m)^ *([1-9][0-9]{0,4})(?: [-a-z]{6,} |: key inaccessible)"
    r"|keyring: ([1-9][0-9]{0,4})$"
    r"|(?<![\w.-])0x([0-9a-f]{8})(?![\w.])"
)


def normalize(text: str) -> str:
    """Serials to <K1>, <K2>, ... by first appearance; kfctl to keyctl."""
    sure = {
        int(m[1] or m[2]) if m[3] is None else int(m[3], 16)
        for m in _SHORT_SERIAL_PLACES.finditer(text)
    }
    names: dict[int, str] = {}

    def name(match: re.Match[str]) -> str:
        token = match.group(2)
        hexed = token.startswith("0x")
        value = int(token, 16) if hexed else int(token)
        if not hexed and len(token) < 6 and value not in sure:
            return match.group(0)
        if value not in names:
            names[value] = f"K{len(names) + 1}"
        return f"<{names[value]}:hex>" if hexed else f"<{names[value]}>"

    text = _SERIAL.sub(name, text)
    return re.sub(r"\bkfctl\b", "keyctl", text)


def test_normalize_maps_serials_in_order_and_drops_padding() -> None:
    text = (
        "Joined session keyring: 123456789\n"
        " 123456789 --alswrv      0     0  keyring: _ses\n"
        "0x075bcd15 --alswrv      0     0   \\_ user: k\n"
        "987654321: key inaccessible (Key has been revoked)\n"
        "       -3: alswrv\n"
        "3 bytes of data in key:\n"
        "kfctl: x\n"
        "     81953 --alswrv      0 65534   \\_ keyring: b\n"
        "81953: key inaccessible (Permission denied)\n"
        "2 keys in keyring:\n"
        "81953 123456789\n"
        "k=81953\n"
        "36 bytes of data in key:\n"
    )
    assert normalize(text) == (
        "Joined session keyring: <K1>\n"
        "<K1> --alswrv      0     0  keyring: _ses\n"
        "<K1:hex> --alswrv      0     0   \\_ user: k\n"
        "<K2>: key inaccessible (Key has been revoked)\n"
        "       -3: alswrv\n"
        "3 bytes of data in key:\n"
        "keyctl: x\n"
        "<K3> --alswrv      0 65534   \\_ keyring: b\n"
        "<K3>: key inaccessible (Permission denied)\n"
        "2 keys in keyring:\n"
        "<K3> <K1>\n"
        "k=<K3>\n"
        "36 bytes of data in key:\n"
    )


# ------------------------------------------------------------- running


def _real_keyctl_usable() -> str | None:
    """Why Debian's keyctl cannot be the oracle here, or None."""
    if KEYCTL is None or UNSHARE is None:
        return "Debian's keyctl or unshare(1) is not installed"
    probe = subprocess.run(
        [UNSHARE, "--user", "--map-root-user", KEYCTL, "session", "-", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"keyctl in a user namespace failed: {probe.stderr.strip()}"
    return None


def run_script(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=120,
        check=False,
    )
    return done.stdout.decode("utf-8", "replace") + f"exit={done.returncode}\n"


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYFENCE_", "PYTHON"))}
    # the daemon and kfctl run this checkout's keyfence, not the venv's
    env["PYTHONPATH"] = users.pythonpath()
    env["LC_ALL"] = "C"
    env.pop("SHELL", None)
    return env


def run_real(script: str, tmp: Path) -> str:
    return run_kernel_side(GOLDEN / f"{script}.sh", tmp)


def run_kernel_side(script: Path, tmp: Path) -> str:
    """``script`` through Debian's keyctl in a throwaway user namespace,
    then a wait until the keys it made are gone from /proc/keys."""
    assert KEYCTL is not None and UNSHARE is not None
    env = _base_env()
    env["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin"
    argv = [UNSHARE, "--user", "--map-root-user", KEYCTL, "session", "-", "sh"]
    before = _kernel_keys()
    try:
        return run_script([*argv, str(script)], tmp, env)
    finally:
        _wait_for_the_kernels_gc(before)


def _kernel_keys() -> set[str]:
    """The serials in this machine's /proc/keys (root's view: every key of
    uid 0, which each script's user namespace maps its root to)."""
    with open("/proc/keys", errors="surrogateescape") as keys:
        return {line.split(None, 1)[0] for line in keys if line.strip()}


def _wait_for_the_kernels_gc(before: set[str], timeout: float = 20.0) -> None:
    """Wait until the keys a kernel-side script made are gone from
    /proc/keys.  They go with its session keyring and its user namespace's
    @u, freed by the kernel after the script exits, at the gc's pace; till
    then keyctl's ``%type:desc`` (which reads /proc/keys) in the next script
    would find them.  Past ``timeout``, go on (the next script may then
    differ, and says so)."""
    deadline = time.monotonic() + timeout
    while _kernel_keys() - before and time.monotonic() < deadline:
        time.sleep(0.05)


class Daemon:
    """A keyfence daemon process on a private socket."""

    def __init__(self, directory: Path, extra_env: dict[str, str] | None = None) -> None:
        self.socket = str(directory / "sock")
        self.log = directory / "daemon.log"
        self.bin = directory / "bin"
        self.bin.mkdir()
        wrapper = self.bin / "keyctl"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m keyfence.cli.kfctl "$@"\n')
        wrapper.chmod(0o755)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "keyfence.cli.main", "daemon", "--socket", self.socket],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_base_env(), "PYTHONUNBUFFERED": "1", **(extra_env or {})},
            )
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket)
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def env(self) -> dict[str, str]:
        env = _base_env()
        env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}"
        env["KEYFENCE_SOCKET"] = self.socket
        env["KEYFENCE_NO_AUTOSTART"] = "1"
        return env

    def kfctl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        options: dict[str, Any] = {
            "capture_output": True,
            "text": True,
            "timeout": 60,
            "check": False,
            "env": self.env(),
        }
        options.update(kwargs)
        return subprocess.run([sys.executable, "-m", "keyfence.cli.kfctl", *args], **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(tmp_path)
    yield running
    running.stop()


def run_kfctl(script: str, daemon: Daemon, tmp: Path) -> str:
    argv = [sys.executable, "-m", "keyfence.cli.kfctl", "session", "-", "sh"]
    return run_script([*argv, str(GOLDEN / f"{script}.sh")], tmp, daemon.env())


def expected(script: str, *, tool: str) -> str:
    own = GOLDEN / f"{script}.kfctl.out"
    if tool == "kfctl" and own.exists():
        return own.read_text()
    return (GOLDEN / f"{script}.out").read_text()


# ------------------------------------------------------------- golden tests


@pytest.mark.parametrize("script", SCRIPTS)
def test_golden_file_is_what_keyctl_prints(script: str, tmp_path: Path) -> None:
    """The recorded output is Debian's keyctl's on this kernel (the oracle)."""
    why = _real_keyctl_usable()
    if why:
        pytest.skip(why)
    got = normalize(run_real(script, tmp_path))
    if REGEN:
        (GOLDEN / f"{script}.out").write_text(got)
    want = expected(script, tool="keyctl")
    assert got == want, _diff(want, got)


@pytest.mark.parametrize("script", SCRIPTS)
def test_golden_kfctl_prints_what_keyctl_prints(
    script: str, daemon: Daemon, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the golden files were recorded as (namespace) root: uid 0 in listings")
    got = normalize(run_kfctl(script, daemon, tmp_path))
    want = expected(script, tool="kfctl")
    assert got == want, _diff(want, got)


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmServer]:
    with running_warm_server(tmp_path_factory.mktemp("warm")) as server:
        yield server


@pytest.mark.parametrize("script", SCRIPTS)
def test_golden_warm_kfctl_prints_what_keyctl_prints(
    script: str, daemon: Daemon, warm: WarmServer, tmp_path: Path
) -> None:
    """The same scripts with ``keyctl`` the installed command on its warm
    path (keyfence.cli.kfctl_warm): every call that can is served warm
    (``require``), ``session`` runs in Python as the client decides."""
    if os.geteuid() != 0:
        pytest.skip("the golden files were recorded as (namespace) root: uid 0 in listings")
    bin_dir = tmp_path / "warm-bin"
    bin_dir.mkdir()
    (bin_dir / "keyctl").symlink_to(warm.command)
    env = daemon.env()
    env.update(warm.env, PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}")
    argv = [warm.command, "session", "-", "sh", str(GOLDEN / f"{script}.sh")]
    got = normalize(run_script(argv, tmp_path, env))
    want = expected(script, tool="kfctl")
    assert got == want, _diff(want, got)


def _diff(want: str, got: str) -> str:
    import difflib

    lines = difflib.unified_diff(
        want.splitlines(), got.splitlines(), "expected", "kfctl", lineterm="", n=4
    )
    return "\n" + "\n".join(lines)


# ------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("text", "base", "value", "rest"),
    [
        ("42", 0, 42, ""),
        ("0x1f", 0, 31, ""),
        ("0X1F", 0, 31, ""),
        ("017", 0, 15, ""),
        ("08", 0, 0, "8"),
        ("0x", 0, 0, "x"),
        ("0xg", 0, 0, "xg"),
        ("  7", 0, 7, ""),
        ("+7", 0, 7, ""),
        ("-1", 0, (1 << 64) - 1, ""),
        ("-3", 0, (1 << 64) - 3, ""),
        ("", 0, 0, ""),
        (" ", 0, 0, " "),
        ("-", 0, 0, "-"),
        ("abc", 0, 0, "abc"),
        ("12x", 0, 12, "x"),
        ("99999999999999999999999", 0, (1 << 64) - 1, ""),
        ("0x10", 10, 0, "x10"),
        ("010", 10, 10, ""),
    ],
)
def test_strtoul_is_c_strtoul(text: str, base: int, value: int, rest: str) -> None:
    assert kfctl_text.strtoul(text, base) == (value, rest)


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [
        ("@t", -1),
        ("@p", -2),
        ("@s", -3),
        ("@u", -4),
        ("@us", -5),
        ("@g", -6),
        ("@a", -7),
        ("123", 123),
        ("-3", -3),
        ("4294967293", -3),
        ("0xfffffffd", -3),
        ("0", 0),
        ("", 0),
        ("%user:name", NameLookup("user", "name")),
        ("%user:a:b", NameLookup("user", "a:b")),
        ("%:ring", NameLookup("keyring", "ring")),
        ("%logon:svc:x", NameLookup("logon", "svc:x")),
    ],
)
def test_parse_key_id(arg: str, parsed: int | NameLookup) -> None:
    assert kfctl_text.parse_key_id(arg) == parsed


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("@x", "Unknown special key: '@x'"),
        ("@", "Unknown special key: '@'"),
        ("12x", "Unparsable key: '12x'"),
        ("08", "Unparsable key: '08'"),
        ("-x", "Unparsable key: '-x'"),
        ("%", "Incorrect key-by-name spec"),
        ("%user", "Incorrect key-by-name spec"),
        ("%user:", "Incorrect key-by-name spec"),
        ("%:", "Incorrect key-by-name spec"),
    ],
)
def test_bad_key_ids_exit_2_with_keyctl_text(arg: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        kfctl_text.parse_key_id(arg)
    assert (caught.value.message, caught.value.code) == (message, 2)


def test_hex2bin() -> None:
    assert kfctl_text.hex2bin(b"61 62\t63\n") == b"abc"
    assert kfctl_text.hex2bin(b"  ") == b""
    assert kfctl_text.hex2bin(b"DEADbeef") == b"\xde\xad\xbe\xef"
    for bad, message in ((b"616", "Short hex doublet"), (b"6 1", "Bad hex doublet")):
        with pytest.raises(UsageError) as caught:
            kfctl_text.hex2bin(bad)
        assert (caught.value.message, caught.value.code) == (message, 1)


def test_description_parsing_and_lines() -> None:
    desc = kfctl_text.parse_description("user;0;65534;3f010000;a;b")
    assert desc == kfctl_text.Description("user", 0, 65534, 0x3F010000, "a;b")
    assert kfctl_text.parse_description("garbage") is None
    assert kfctl_text.parse_description("user;x;0;3f;d") is None
    assert desc is not None
    assert kfctl_text.describe_line(-3, desc) == (
        "       -3: alswrv-----v------------     0 65534 user: a;b\n"
    )
    assert kfctl_text.list_line(123456789, desc, "--alswrv") == (
        "123456789: --alswrv     0 65534 user: a;b\n"
    )
    assert kfctl_text.rdescribe("user;0;0;3f010000;d", ":") == "user:0:0:3f010000:d\n"


def test_granted_perms_picks_one_class() -> None:
    perm = 0x01020408  # possessor view, user read, group write, other search
    mine, other = 1000, 2000
    groups = frozenset({50})
    assert kfctl_text.granted_perms(perm, mine, 7, mine, 7, groups) == "------rv"
    assert kfctl_text.granted_perms(perm, other, 7, mine, 7, groups) == "-----w-v"
    assert kfctl_text.granted_perms(perm, other, 50, mine, 7, groups) == "-----w-v"
    assert kfctl_text.granted_perms(perm, other, 9, mine, 7, groups) == "----s--v"
    assert kfctl_text.granted_perms(perm, other, -1, mine, -1, groups) == "----s--v"


def test_hexdump_and_print() -> None:
    assert kfctl_text.hexdump(b"") == "No data in key\n"
    assert kfctl_text.hexdump(b"bar") == "3 bytes of data in key:\n626172\n"
    dump = kfctl_text.hexdump(bytes(range(36)))
    assert dump.splitlines()[1] == " ".join(bytes(range(i, i + 4)).hex() for i in range(0, 32, 4))
    assert dump.splitlines()[2] == "20212223"
    assert kfctl_text.printable(b"hello world") == b"hello world\n"
    assert kfctl_text.printable(b"") == b"\n"
    assert kfctl_text.printable(b"a\nb") == b":hex:610a62\n"
    assert kfctl_text.printable("é".encode()) == b":hex:c3a9\n"
    assert kfctl_text.unpack_serials(b"\x01\x00\x00\x00\xff\xff\xff\xffxx") == [1, -1]
    assert kfctl_text.rlist_line([]) == "\n"
    assert kfctl_text.list_header(1) == "1 key in keyring:\n"


class FakeTree:
    """describe/read over a dict: serial -> (raw description, members)."""

    def __init__(self, keys: dict[int, tuple[str, list[int]]], unreadable: int = 0) -> None:
        self.keys = keys
        self.unreadable = unreadable

    def describe(self, serial: int) -> str:
        if serial not in self.keys:
            raise OSError(errno.ENOKEY, os.strerror(errno.ENOKEY))
        return self.keys[serial][0]

    def read(self, serial: int) -> bytes:
        if serial == self.unreadable:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        import struct

        members = self.keys[serial][1]
        return struct.pack(f"={len(members)}i", *members)

    def lines(self, root: int, hex_ids: bool = False) -> str:
        return "".join(
            kfctl_text.show_tree(
                root,
                self.describe,
                self.read,
                lambda d: "--alswrv",
                lambda e: os.strerror(e.errno or 0),
                hex_ids=hex_ids,
            )
        )


def ring(name: str, *members: int) -> tuple[str, list[int]]:
    return (f"keyring;0;0;3f010000;{name}", list(members))


def user(name: str) -> tuple[str, list[int]]:
    return (f"user;0;0;3f010000;{name}", [])


def test_show_tree_draws_keyctls_branches() -> None:
    tree = FakeTree(
        {
            100: ring("_ses", 101, 105, 106),
            101: ring("a", 102, 104),
            102: ring("b", 103),
            103: user("k3"),
            104: user("k1"),
            105: user("k5"),
            106: ring("d", 107, 999),
            107: user("k4"),
        }
    )
    assert tree.lines(100) == (
        "       100 --alswrv      0     0  keyring: _ses\n"
        "       101 --alswrv      0     0   \\_ keyring: a\n"
        "       102 --alswrv      0     0   |   \\_ keyring: b\n"
        "       103 --alswrv      0     0   |   |   \\_ user: k3\n"
        "       104 --alswrv      0     0   |   \\_ user: k1\n"
        "       105 --alswrv      0     0   \\_ user: k5\n"
        "       106 --alswrv      0     0   \\_ keyring: d\n"
        "       107 --alswrv      0     0       \\_ user: k4\n"
        "999: key inaccessible (Required key not available)\n"
    )
    assert tree.lines(102, hex_ids=True) == (
        "0x00000066 --alswrv      0     0  keyring: b\n"
        "0x00000067 --alswrv      0     0   \\_ user: k3\n"
    )


def test_show_tree_stops_nine_levels_down_and_fails_on_unreadable_rings() -> None:
    chain = {n: ring(f"r{n}", n + 1) for n in range(1, 12)}
    chain[12] = user("deep")
    lines = FakeTree(chain).lines(1).splitlines()
    assert len(lines) == 9 and lines[-1].endswith("keyring: r9")
    with pytest.raises(kfctl_text.TreeError) as caught:
        FakeTree({1: ring("top", 2), 2: ring("locked", 3)}, unreadable=2).lines(1)
    assert caught.value.function == "keyctl_read_alloc"
    assert caught.value.error.errno == errno.EACCES


def test_purge_match() -> None:
    raw = "user;0;0;3f010000;Prefix:Two"
    assert kfctl_text.purge_match(raw, "user", "Prefix:Two", prefix=False, fold=False)
    assert not kfctl_text.purge_match(raw, "user", "prefix:two", prefix=False, fold=False)
    assert kfctl_text.purge_match(raw, "user", "prefix:two", prefix=False, fold=True)
    assert kfctl_text.purge_match(raw, "user", "Prefix:", prefix=True, fold=False)
    assert kfctl_text.purge_match(raw, "user", "prefix:", prefix=True, fold=True)
    assert not kfctl_text.purge_match(raw, "user", "Prefix:TwoX", prefix=True, fold=False)
    assert not kfctl_text.purge_match(raw, "logon", "Prefix:Two", prefix=False, fold=False)


def test_watch_filters_and_lines() -> None:
    assert kfctl_text.watch_mask(None) == kfctl_text.ALL_EVENTS
    assert kfctl_text.watch_mask("lr") == 0x004 | 0x020 | 0x200
    with pytest.raises(UsageError) as caught:
        kfctl_text.watch_mask("lz")
    assert caught.value.message == "Unknown filter character 'z'"
    assert kfctl_text.watch_line(5, "link", 7) == "5 link 7\n"
    assert kfctl_text.watch_line(5, "upd", 7) == "5 upd\n"
    assert kfctl_text.watch_line(5, "gc", None) == "5 gc\n"


def test_progress_text() -> None:
    class User:
        def __init__(self, watcher: str, key: int, left: int | None, note: str) -> None:
            self.watcher, self.key, self.remaining_bytes, self.note = watcher, key, left, note

    class Snap:
        def __init__(self, *pending: User) -> None:
            self.pending = list(pending)
            self.elapsed = 1.25

    assert human_bytes(1023) == "1023 B"
    assert human_bytes(3 << 20) == "3.0 MiB"
    text = progress_text(
        "kfctl",
        "clear",
        Snap(User("fs /mnt/a", 7, 3 << 20, "flushing"), User("pid 9", 8, None, "")),
    )
    assert text == (
        "kfctl clear: waiting 1.2s for 2 key users, 3.0 MiB left: "
        "fs /mnt/a (key 7, 3.0 MiB left, flushing); pid 9 (key 8)"
    )
    assert progress_text("kfctl", "clear", Snap()) == "kfctl clear: waiting 1.2s for key users"


# ------------------------------------------------------------- argument errors, no daemon


def kfctl_run(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run kfctl in this process with a client that must never be needed."""

    class NoClient:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"kfctl contacted the daemon ({name}) for {argv}")

    tool = kfctl.Kfctl("kfctl", client=NoClient())  # type: ignore[arg-type]
    try:
        code = kfctl.run(argv, tool)
    finally:
        tool.flush()
    out, err = capfd.readouterr()
    return code, out, err


USAGE_ERRORS = [
    [],
    ["add", "user", "onlytwo"],
    ["add", "-x", "user", "a", "b"],
    ["padd", "user", "a"],
    ["request"],
    ["request2", "user", "a"],
    ["prequest2", "user"],
    ["update", "k"],
    ["pupdate"],
    ["newring", "x"],
    ["revoke"],
    ["clear", "a", "b"],
    ["link", "1"],
    ["unlink"],
    ["unlink", "1", "2", "3"],
    ["move", "1", "2"],
    ["move", "-x", "1", "2", "3"],
    ["search", "@s", "user"],
    ["read"],
    ["pipe", "1", "2"],
    ["print"],
    ["list"],
    ["rlist"],
    ["describe"],
    ["rdescribe"],
    ["rdescribe", "@s", ""],
    ["chown", "1"],
    ["chgrp", "1"],
    ["setperm", "1"],
    ["new_session", "a", "b"],
    ["timeout", "1"],
    ["security"],
    ["invalidate"],
    ["reap", "-x"],
    ["purge"],
    ["purge", "-x", "user"],
    ["purge", "-p", "user"],
    ["purge", "-s", "user"],
    ["purge", "user", "a", "b"],
    ["show", "@s", "@s"],
    ["id"],
    ["supports", "a", "b"],
    ["watch"],
    ["watch", "@s", "@s"],
    ["--timeout"],
    ["--emergency"],
    ["--timeout", "5"],
    ["dh_compute", "1"],
    ["instantiate", "1", "2"],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "(nothing)")
def test_missing_or_extra_arguments_print_the_format_and_exit_2(
    argv: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, err = kfctl_run(argv, capfd)
    assert (code, out) == (2, "")
    assert err == kfctl.usage_text("kfctl")
    assert err.startswith("Format:\n  kfctl --version \n  kfctl add [-x] <type>")


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["nosuch"], 2, "Unknown command\n"),
        (["sho"], 2, "Unknown command\n"),
        ([""], 2, "Unknown command\n"),
        (["--test"], 2, "Unknown command\n"),
        (["show", "@x"], 2, "Unknown special key: '@x'\n"),
        (["show", "-x", "-x"], 2, "Unparsable key: '-x'\n"),
        (["read", "12x"], 2, "Unparsable key: '12x'\n"),
        (["describe", "%user"], 2, "Incorrect key-by-name spec\n"),
        (["add", "-x", "user", "d", "zz", "@s"], 1, "Bad hex doublet\n"),
        (["add", "-x", "user", "d", "abc", "@bad"], 1, "Short hex doublet\n"),
        (["add", "user", "d", "v", "@bad"], 2, "Unknown special key: '@bad'\n"),
        (["update", "-x", "1", "6"], 1, "Short hex doublet\n"),
        (["timeout", "1", "0x10"], 2, "Unparsable timeout: '0x10'\n"),
        (["timeout", "1", "abc"], 2, "Unparsable timeout: 'abc'\n"),
        (["setperm", "1", "zz"], 2, "Unparsable permissions: 'zz'\n"),
        (["chown", "1", "abc"], 2, "Unparsable uid: 'abc'\n"),
        (["chgrp", "1", "0x"], 2, "Unparsable gid: '0x'\n"),
        (["move", "-f", "1", "@s"], 2, "Unparsable key: '-f'\n"),
        (["watch", "-z", "@s"], 2, "watch: invalid option -- 'z'\nUnknown option\n"),
        (["watch", "-f"], 2, "watch: option requires an argument -- 'f'\nUnknown option\n"),
        (["watch", "@s", "-fq"], 2, "Unknown filter character 'q'\n"),
        (["negate", "1", "x", "@s"], 2, "Unparsable timeout: 'x'\n"),
        (["reject", "1", "5", "nonsense", "@s"], 2, "Unparsable error: 'nonsense'\n"),
        (["reject", "1", "x", "rejected", "@s"], 2, "Unparsable timeout: 'x'\n"),
        (["dh_compute", "1", "2", "3"], 1, "keyctl_dh_compute_alloc: Operation not supported\n"),
        (["get_persistent", "@s"], 1, "keyctl_get_persistent: Operation not supported\n"),
        (["pkey_query", "1", "0"], 1, "keyctl_pkey_query: Operation not supported\n"),
        (["restrict_keyring", "@s"], 1, "keyctl_restrict_keyring: Operation not supported\n"),
        (["watch_session", "a", "b", "2", "true"], 2, "The target fd must be between 3 and 9\n"),
        (
            ["watch_session", "-z", "a", "b", "5", "true"],
            2,
            "watch_session: invalid option -- 'z'\nUnknown option\n",
        ),
        (["--timeout", "soon", "clear", "@s"], 2, "Unparsable --timeout: 'soon'\n"),
        (["--timeout=-1", "clear", "@s"], 2, "Unparsable --timeout: '-1'\n"),
        (
            ["--timeout", "1", "--emergency", "clear", "@s"],
            2,
            "--timeout and --emergency cannot be combined\n",
        ),
        (
            ["--emergency", "add", "user", "d", "v", "@s"],
            2,
            "--timeout/--emergency: add is not a removal\n",
        ),
        (["--emergency", "nosuch"], 2, "Unknown command\n"),
        # after the command name they are keyctl's arguments
        (["clear", "--timeout", "1"], 2, None),
        (["clear", "--emergency"], 2, "Unparsable key: '--emergency'\n"),
        (["unlink", "1", "--"], 2, "Unparsable key: '--'\n"),
        (["purge", "--emergency", "user"], 2, None),
    ],
)
def test_error_paths_before_the_daemon(
    argv: list[str], code: int, message: str | None, capfd: pytest.CaptureFixture[str]
) -> None:
    if message is None:
        message = kfctl.usage_text("kfctl")
    assert kfctl_run(argv, capfd) == (code, "", message)


def test_supports_without_a_daemon(capfd: pytest.CaptureFixture[str]) -> None:
    code, out, _ = kfctl_run(["supports"], capfd)
    assert code == 0 and "have_key_invalidate=1\n" in out and "have_notify=1\n" in out
    assert kfctl_run(["supports", "--raw"], capfd) == (3, "a104\n", "")
    assert kfctl_run(["supports", "move_key"], capfd) == (0, "", "")
    assert kfctl_run(["supports", "dh_compute"], capfd) == (1, "", "")
    assert kfctl_run(["supports", "nosuch"], capfd) == (3, "", "")


def test_help_and_version(capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = kfctl_run(["--help"], capfd)
    assert code == 0 and err == "" and out.startswith("Format:\n") and "--emergency" in out
    code, out, err = kfctl_run(["--version"], capfd)
    assert code == 0 and out.startswith("keyctl from keyutils-1.6.3 (Built keyfence-")


def test_removal_options_come_before_the_command_name() -> None:
    """kfctl took --timeout/--emergency/-- out of a removal's arguments
    anywhere, so ``purge user --emergency`` purged every user key where
    keyctl purges the key described "--emergency".  Checked failing before:
    removal_options(["1", "--emergency", "2"]) returned ["1", "2"]."""
    tool = kfctl.Kfctl("kfctl")
    assert kfctl_tool.removal_options(tool, ["--timeout", "2.5", "clear", "@s"]) == ["clear", "@s"]
    assert tool.timeout == 2.5
    tool = kfctl.Kfctl("kfctl")
    argv = ["--emergency", "purge", "user", "--emergency"]
    assert kfctl_tool.removal_options(tool, argv) == ["purge", "user", "--emergency"]
    assert tool.emergency and tool.timeout is None
    tool = kfctl.Kfctl("kfctl")
    argv = ["--timeout=3", "unlink", "--", "--emergency"]
    assert kfctl_tool.removal_options(tool, argv) == ["unlink", "--", "--emergency"]
    assert tool.timeout == 3.0 and not tool.emergency
    tool = kfctl.Kfctl("kfctl")
    assert kfctl_tool.removal_options(tool, ["clear", "--emergency", "@s"]) == [
        "clear",
        "--emergency",
        "@s",
    ]
    assert not tool.emergency


def test_program_name() -> None:
    assert kfctl.program_name("/usr/bin/kfctl") == "kfctl"
    assert kfctl.program_name("/usr/local/bin/keyctl") == "keyctl"
    assert kfctl.program_name("/src/keyfence/cli/kfctl.py") == "kfctl"


def test_the_usage_text_is_keyctls(capfd: pytest.CaptureFixture[str]) -> None:
    if KEYCTL is None:
        pytest.skip("Debian's keyctl is not installed")
    real = subprocess.run([KEYCTL], capture_output=True, text=True, check=False)
    assert real.returncode == 2
    assert kfctl.usage_text("keyctl") == real.stderr


# ------------------------------------------------------------- against a daemon


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    env = {**_base_env(), "KEYFENCE_SOCKET": str(tmp_path / "none"), "KEYFENCE_NO_AUTOSTART": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "keyfence.cli.kfctl", "show"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == "Session Keyring\n"
    assert done.stderr.startswith("kfctl: No such file or directory: no keyfence daemon answers")


def test_kfctl_imports_neither_the_model_nor_heavy_packages(daemon: Daemon) -> None:
    probe = (
        "import sys\n"
        "from keyfence.cli import kfctl\n"
        "code = kfctl.main(['show', '@s'])\n"
        "heavy = sorted(m for m in sys.modules if m.startswith("
        "('keyfence.keys', 'keyfence.server', 'cryptography', 'hypothesis', 'trio', 'rich')))\n"
        "print(code, heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=daemon.env(),
        timeout=60,
        check=False,
    )
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr


def _client(daemon: Daemon) -> Any:
    from keyfence.client import Client

    return Client.connect(daemon.socket, autostart=False)


class WatchProcess:
    """``kfctl watch`` in the background, its lines read as they come."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        import queue

        self.process = subprocess.Popen(
            [sys.executable, "-m", "keyfence.cli.kfctl", "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=daemon.env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def registered(self, probe: Any) -> list[str]:
        """Call ``probe()`` (which makes an event) until the watch reports
        one: the watch is in place from then on.  The probe lines seen."""
        import queue

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe()
            try:
                return [self.lines.get(timeout=0.3)]
            except queue.Empty:
                continue
        raise AssertionError("kfctl watch never reported an event")

    def finish(self) -> tuple[int, list[str], str]:
        try:
            code = self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        time.sleep(0.1)
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get())
        assert self.process.stderr is not None
        err = self.process.stderr.read()
        self.process.stdout.close()  # type: ignore[union-attr]
        self.process.stderr.close()
        return code, lines, err


def test_watch_prints_events_until_the_key_is_gone(daemon: Daemon) -> None:
    client = _client(daemon)
    ring_id = client.add_key("keyring", "watched", None, -4)
    key = client.add_key("user", "w", b"v", ring_id)
    watch = WatchProcess(daemon, str(key))
    try:
        watch.registered(lambda: client.setperm(key, 0x3F010000))
        client.update(key, b"v2")
        client.setperm(key, 0x3F3F0000)
        client.revoke(key)
        client.unlink(key, ring_id)
    finally:
        code, lines, err = watch.finish()
        client.close()
    assert code == 0, err
    while lines and lines[0] == f"{key} attr":
        lines.pop(0)  # probes
    assert lines == [f"{key} upd", f"{key} attr", f"{key} rev", f"{key} gc"]


def test_watch_a_keyring_with_a_filter(daemon: Daemon) -> None:
    client = _client(daemon)
    ring_id = client.add_key("keyring", "watched", None, -4)
    probes: list[int] = []
    watch = WatchProcess(daemon, "-fln", str(ring_id))
    try:
        watch.registered(
            lambda: probes.append(client.add_key("user", f"p{len(probes)}", b"p", ring_id))
        )
        key = client.add_key("user", "x", b"y", ring_id)
        client.update(key, b"z")  # not selected by -fln
        client.setperm(ring_id, 0x3F3F0000)  # nor this
        client.unlink(key, ring_id)
        client.unlink(ring_id, -4)
    finally:
        code, lines, err = watch.finish()
        client.close()
    assert code == 0, err
    probe_lines = {f"{ring_id} {event} {p}" for p in probes for event in ("link", "unlk")}
    lines = [line for line in lines if line not in probe_lines]
    assert lines == [f"{ring_id} link {key}", f"{ring_id} unlk {key}", f"{ring_id} gc"]


class BlockingWatcher:
    """A synchronous key user in this process: reports progress, then waits."""

    def __init__(self, client: Any, key: int, name: str = "testfs /mnt/x") -> None:
        self.release = threading.Event()
        self.called = threading.Event()
        self.watch = client.watch(key, self._callback, sync=True, name=name)

    def _callback(self, note: Any) -> None:
        if note.phase != "before":
            return
        self.called.set()
        # (a report in the first 50 ms of a removal may be coalesced away by
        # the daemon's rate limit; a real user reports as it goes)
        while not self.release.wait(0.2):
            note.report_progress(3 << 20, "flushing")


def test_timeout_aborts_a_removal_and_leaves_the_keys(daemon: Daemon) -> None:
    client = _client(daemon)
    ring_id = client.add_key("keyring", "fenced", None, -4)
    key = client.add_key("user", "secret", b"x", ring_id)
    watcher = BlockingWatcher(client, key)
    try:
        start = time.monotonic()
        done = daemon.kfctl("--timeout", "0.5", "clear", str(ring_id))
        took = time.monotonic() - start
    finally:
        watcher.release.set()
    assert done.returncode == 1
    assert done.stderr.startswith("keyctl_clear: Connection timed out (")
    assert "testfs /mnt/x" in done.stderr and "nothing was removed" in done.stderr
    assert took < 10
    assert client.list_keyring(ring_id) == [key]
    client.close()


def test_emergency_does_not_wait_for_key_users(daemon: Daemon) -> None:
    client = _client(daemon)
    ring_id = client.add_key("keyring", "fenced", None, -4)
    key = client.add_key("user", "secret", b"x", ring_id)
    watcher = BlockingWatcher(client, key)
    try:
        done = daemon.kfctl("--emergency", "unlink", str(key), str(ring_id), timeout=10)
    finally:
        watcher.release.set()
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not watcher.called.is_set()
    assert client.list_keyring(ring_id) == []
    client.close()


def test_a_terminal_shows_who_is_still_flushing(daemon: Daemon) -> None:
    client = _client(daemon)
    ring_id = client.add_key("keyring", "fenced", None, -4)
    key = client.add_key("user", "secret", b"x", ring_id)
    watcher = BlockingWatcher(client, key)
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "keyfence.cli.kfctl", "revoke", str(key)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=daemon.env(),
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"MiB left" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 4096)
    finally:
        watcher.release.set()
    process.wait(30)
    try:
        while chunk := os.read(master, 4096):
            seen += chunk
    except OSError:
        pass
    os.close(master)
    text = seen.decode()
    assert process.returncode == 0
    assert "kfctl revoke: waiting" in text and "testfs /mnt/x (key" in text
    assert "3.0 MiB left" in text
    assert text.endswith("\r\x1b[K")  # the line is erased when the removal is done
    client.close()


def test_session_from_a_process_group_leader_forks_and_relays_the_status(
    daemon: Daemon,
) -> None:
    script = "keyctl rdescribe @s; keyctl id @s >&2; exit 7"
    done = subprocess.run(
        [sys.executable, "-m", "keyfence.cli.kfctl", "session", "team", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=daemon.env(),
        timeout=60,
        check=False,
        process_group=0,
    )
    assert done.returncode == 7
    assert done.stdout == "keyring;0;0;3f130000;team\n"
    joined, serial = done.stderr.splitlines()
    assert joined == f"Joined session keyring: {serial}"


def test_session_keyring_is_shared_by_the_posix_session_only(daemon: Daemon) -> None:
    script = (
        "keyctl add user shared v @s >/dev/null; "
        "keyctl print %user:shared; "
        "sh -c 'keyctl print %user:shared'; "
        "keyctl session - keyctl request user shared; echo rc=$?"
    )
    done = subprocess.run(
        [sys.executable, "-m", "keyfence.cli.kfctl", "session", "-", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=daemon.env(),
        timeout=60,
        check=False,
    )
    assert done.stdout == "v\nv\nrc=1\n", done.stderr
    assert done.stderr.count("Joined session keyring:") == 2
    assert "request_key: Required key not available" in done.stderr


def test_removal_failures_keep_keyctls_text_and_add_keyfences_reason() -> None:
    from keyfence.errors import KeyfenceError

    plain = KeyfenceError(errno.EINVAL, "key id 0")
    assert kfctl_tool._removal_detail(plain) is None  # keyctl's own line, unchanged
    aborted = KeyfenceError(errno.ENOSPC, "fs /mnt failed: disk full; nothing was removed")
    assert kfctl_tool._removal_detail(aborted) == "fs /mnt failed: disk full; nothing was removed"
    lost = KeyfenceError(errno.ENOTCONN, "the daemon closed the connection")
    assert kfctl_tool._removal_detail(lost) == "the daemon closed the connection"


def test_a_name_lookup_falls_back_to_keys_the_caller_can_view() -> None:
    """%type:desc: request_key() first, then (as libkeyutils reads
    /proc/keys) the first viewable key, lowest serial first, that the
    caller can describe (the real thing: kfctl_golden/proc_keys.sh)."""

    class Client:
        keys = {
            11: "keyring;0;0;3f010000;hidden",
            15: "user;0;0;3f010000;target",
            20: "user;0;0;3f010000;target",
        }

        def request_key(self, *args: Any) -> int:
            raise OSError(errno.EACCES, "no")

        def viewable_keys(self, key_type: str, description: str) -> list[int]:
            found = [k for k, d in self.keys.items() if d.endswith(f";{description}")]
            return [9, *found] if description == "target" else found

        def describe(self, key: int) -> str:
            if key == 9:  # revoked since it was listed: passed over
                raise OSError(errno.EKEYREVOKED, "revoked")
            return self.keys[key]

    tool = kfctl.Kfctl("kfctl", client=Client())  # type: ignore[arg-type]
    assert tool.key("%user:target") == 15
    assert tool.key("%:hidden") == 11
    with pytest.raises(UsageError) as caught:
        tool.key("%user:absent")
    assert (caught.value.message, caught.value.code) == ("Can't find 'user:absent'", 1)


def test_key_by_name_that_is_not_utf8_is_not_found_without_a_traceback(daemon: Daemon) -> None:
    """``kfctl id "%user:x<0xff>y"`` printed a Python traceback (the wire
    carries names as text, and the lookup of viewable keys let the client's
    error through).  keyfence cannot hold such a name (docs/cli.md), so the
    lookup finds nothing, as keyctl says it.  Checked failing before: a
    KeyfenceError traceback, exit 1."""
    done = daemon.kfctl("id", "%user:x\udcffy", text=False)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr == b"Can't find 'user:x\xffy'\n"
