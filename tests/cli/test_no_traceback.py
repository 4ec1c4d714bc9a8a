"""No command prints a traceback, whatever its arguments and standard input
(issue 12, finding 6).

Every ``kfctl`` command and each of its usage forms with their options
(enumerated from its command table) and every ``keyfence`` subcommand and
option (enumerated from its argument parser) runs as a real process against
a private daemon with a corpus of bad arguments -- too few, too many, an
option without its value, non-numbers, huge and negative numbers, empty
strings, bad key specs, bad salts, nonexistent and /proc paths, a regular
file where a directory or key is wanted and a directory where a file is,
bytes that are not UTF-8 -- with standard input closed (``<&-``), empty,
``/dev/null``, a directory (the interpreter itself refuses to start:
"Fatal Python error: init_sys_streams: <stdin> is a directory, cannot
continue", before any keyfence code runs; the installed ``kfctl`` gets
around it, test_kfctl_descriptors.py) and write-only (read: EBADF), and
with no daemon at all (``$KEYFENCE_SOCKET`` naming nothing, a regular
file, or a path too long for a socket address).  Issue 16 widened it to
the options, files, stdin and daemon cases.  Each run must end with no
"Traceback" anywhere, a message on stderr if it failed (never errno 0's
"Success"), and an exit status as keyctl(1) and e4crypt(8) use: 0, 1 for
a failed operation, 2 for bad usage (kfctl also 3, as keyctl's
``supports``).  A hang is a failure too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyfence.cli import kfctl
from keyfence.cli.main import build_parser
from keyfence.testing.daemon import DaemonProcess, running_daemon

BAD = [
    "",
    "zz",
    "-1",
    "1.5",
    "99999999999999999999",
    "-99999999999999999999",
    "0x",
    "@zz",
    "%:",
    "/proc/nope",
    "/proc/self/mem",
    "\udcff\udcfe",  # the bytes ff fe: not UTF-8
]
"""Each argument position gets each of these."""

FILE = "afile"
"""A regular file in the scratch directory (where a directory, key or socket is wanted)."""
SOME_BAD = ["", "zz", "99999999999999999999", "/proc/nope", "\udcff", FILE, "enc"]
"""One position at a time, the others plausible."""
STDINS = ("closed", "empty", "devnull", "directory", "writeonly")
NO_DAEMON = ("none", "file", "too-long")
"""$KEYFENCE_SOCKET naming a path where nothing is, a regular file, or a
path longer than a socket address holds (ENAMETOOLONG)."""

POLICY = "0123456789abcdef"
HANG = 30.0
"""Seconds before a run counts as hung (generous: the machine is shared)."""
WATCHES_FOREVER = {("watch", "@s"), ("watch", "-x", "@s")}
"""Runs that are right to keep running: keyctl's ``watch`` reports events
until the key is destroyed, and a caller without a session keyring watches
``@us``, which never is."""


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    stdin: str = "devnull"  # one of STDINS
    daemon: str = "running"  # running, or one of NO_DAEMON


@dataclass
class Outcome:
    run: Run
    code: int | None
    out: str
    err: str

    def problem(
        self, codes: tuple[int, ...], quiet: tuple[int, ...] = (), stdout_ok: bool = False
    ) -> str | None:
        shown = " ".join(repr(a) for a in self.run.argv) + f" <{self.run.stdin}"
        if self.run.daemon != "running":
            shown += f" (daemon: {self.run.daemon})"
        if self.code is None and self.run.argv not in WATCHES_FOREVER:
            return f"{shown}: hung (killed after {HANG:.0f} s)"
        if "Traceback" in self.out + self.err:
            return f"{shown}: traceback\n{self.err[-1500:]}"
        if "Fatal Python error" in self.err and not (
            # the interpreter itself stops before any of keyfence runs
            # (pylifecycle.c, init_sys_streams); its words are clear
            self.run.stdin == "directory" and "<stdin> is a directory" in self.err
        ):
            return f"{shown}: the interpreter died\n{self.err[-1500:]}"
        if self.code and ": Success" in self.err:  # errno 0's text for a failure
            return f"{shown}: failed saying 'Success'\n{self.err[-500:]}"
        if self.code is None:  # still watching, as it should, when killed
            return None
        if self.code not in codes:
            return f"{shown}: exit status {self.code}\n{self.err[-500:]}"
        said = self.err + self.out if stdout_ok else self.err
        if self.code != 0 and self.code not in quiet and not said.strip():
            return f"{shown}: exit status {self.code} with nothing on stderr"
        return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch cwd, with ``enc``: a directory carrying a keyfence policy."""
    path = tmp_path_factory.mktemp("no-traceback")
    (path / "enc").mkdir()
    (path / FILE).write_bytes(b"not a directory, a key or a socket\n")
    os.setxattr(path / "enc", "user.keyfence.policy", f"ext4:{POLICY}".encode())
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    # started in an empty directory: should a bad mount request ever reach
    # it as a relative or empty path, nothing that matters is mounted over
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("daemon-cwd"))
    try:
        with running_daemon() as d:
            os.chdir(here)
            yield d
    finally:
        os.chdir(here)


def execute(argv: list[str], runs: list[Run], daemon: DaemonProcess, cwd: Path) -> list[Outcome]:
    running = dict(daemon.env, SHELL="/bin/true", LC_ALL="C.UTF-8")
    sockets = {
        "none": str(cwd / "no-daemon" / "sock"),
        "file": str(cwd / FILE),
        "too-long": str(cwd / ("x" * 120) / "sock"),
    }

    def as_stdin(path: str, flags: int) -> Callable[[], None]:
        def preexec() -> None:
            fd = os.open(path, flags)
            os.dup2(fd, 0)
            os.close(fd)

        return preexec

    def one(run: Run) -> Outcome:
        env = running
        if run.daemon != "running":
            env = dict(running, KEYFENCE_SOCKET=sockets[run.daemon])
        stdin: int | None = subprocess.DEVNULL
        preexec = None
        data = None
        if run.stdin == "empty":
            stdin, data = None, b""
        elif run.stdin == "closed":
            stdin, preexec = None, lambda: os.close(0)
        elif run.stdin == "directory":  # read(2): EISDIR
            stdin, preexec = None, as_stdin(str(cwd / "enc"), os.O_RDONLY | os.O_DIRECTORY)
        elif run.stdin == "writeonly":  # read(2): EBADF
            stdin, preexec = None, as_stdin(os.devnull, os.O_WRONLY)
        args = [*argv, *(os.fsencode(a) for a in run.argv)]
        # output to files, not pipes: a hung run's children cannot hold us
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if data is not None else stdin,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                preexec_fn=preexec,
                start_new_session=True,
            )
            if process.stdin is not None:
                process.stdin.close()
            try:
                code: int | None = process.wait(HANG)
            except subprocess.TimeoutExpired:
                code = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # and anything it left behind
            process.wait()
            out.seek(0)
            err.seek(0)
            return Outcome(
                run, code, out.read().decode(errors="replace"), err.read().decode(errors="replace")
            )

    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(one, runs))


def check(
    outcomes: list[Outcome],
    codes: tuple[int, ...],
    quiet: tuple[int, ...] = (),
    stdout_ok: bool = False,
) -> None:
    problems = [p for o in outcomes if (p := o.problem(codes, quiet, stdout_ok)) is not None]
    assert not problems, f"{len(problems)} of {len(outcomes)} runs:\n" + "\n".join(problems)


# -------------------------------------------------------------------- kfctl

KFCTL = [sys.executable, "-m", "keyfence.cli.kfctl"]

PLAUSIBLE = {
    "key": "@s",
    "keyring": "@s",
    "from_keyring": "@s",
    "to_keyring": "@u",
    "dest_keyring": "@s",
    "type": "user",
    "desc": "kfct-desc",
    "data": "x",
    "name": "kfct-ring",
    "uid": "0",
    "gid": "0",
    "mask": "0x3f3f0000",
    "timeout": "100",
    "fd": "9",
    "prog": "/proc/nope",
}


def kfctl_formats(name: str) -> list[list[str]]:
    """Each keyctl usage form of a command as words: options (``-x``,
    ``-f``, ``-n``, ``-f<filters>``, ...) and ``<slot>``s, brackets gone."""
    formats = [u for c in kfctl.TABLE if c.name == name for u in c.usage] or [""]
    forms = []
    for text in formats:
        words = [w.strip("[]|*").rstrip("]") for w in text.split()]
        forms.append([w for w in words if w and w not in ("...", "k=v")])
    return forms


def kfctl_slots(name: str) -> list[str]:
    """The argument slots of a command's longest keyctl format."""
    words = max(kfctl_formats(name), key=len)
    return [w.strip("<>") for w in words if w.startswith("<")]


def plausible_word(word: str) -> str:
    if word.startswith("<"):
        return PLAUSIBLE.get(word.strip("<>"), "x")
    return "-fa" if word == "-f<filters>" else word  # an option as written


def kfctl_runs(name: str) -> list[Run]:
    slots = kfctl_slots(name)
    runs = {Run((name,))}
    for value in BAD:
        runs.add(Run((name, value)))
        runs.add(Run((name, *[value] * (len(slots) + 1))))
    plausible = [PLAUSIBLE.get(slot, "x") for slot in slots]
    for i in range(len(slots)):
        for value in SOME_BAD:
            argv = list(plausible)
            argv[i] = value
            runs.add(Run((name, *argv)))
    # every usage form with its options: as written, each slot bad in turn,
    # and each option given last, without what follows it
    for form in kfctl_formats(name):
        words = [plausible_word(w) for w in form]
        runs.add(Run((name, *words)))
        for i, word in enumerate(form):
            if word.startswith("-") and not word.startswith("-f<"):
                runs.add(Run((name, *words[: i + 1])))
            if word.startswith("<"):
                for value in SOME_BAD:
                    runs.add(Run((name, *words[:i], value, *words[i + 1 :])))
    if any(c.removal for c in kfctl.TABLE if c.name == name):
        # keyfence's options, before the command name; after it, keyctl's words
        for value in ("-1", "nan", "inf", "zz", ""):
            runs.add(Run(("--timeout", value, name, *plausible)))
        runs.add(Run(("--timeout", name, *plausible)))
        runs.add(Run(("--emergency", "--timeout", "1", name, *plausible)))
        runs.add(Run(("--emergency", name, *plausible)))
        runs.add(Run((name, *plausible, "--timeout")))
        runs.add(Run((name, "--emergency", *plausible)))
    for stdin in STDINS:
        runs.add(Run((name, *plausible), stdin))
        runs.add(Run((name, "-x", *plausible), stdin))
    for where in NO_DAEMON:
        runs.add(Run((name, *plausible), daemon=where))
    return sorted(runs, key=repr)


@pytest.mark.parametrize("name", sorted({c.name for c in kfctl.TABLE if c.handler}))
def test_kfctl_command(name: str, daemon: DaemonProcess, workdir: Path) -> None:
    # 3 with nothing said: keyctl's "supports" answering "no"
    quiet = (3,) if name == "supports" else ()
    check(execute(KFCTL, kfctl_runs(name), daemon, workdir), (0, 1, 2, 3), quiet)


def test_kfctl_without_a_command_or_with_an_unknown_one(
    daemon: DaemonProcess, workdir: Path
) -> None:
    runs = [Run(()), Run(("nope",)), Run(("",)), Run(("\udcff",)), Run(("--nope",))]
    check(execute(KFCTL, runs, daemon, workdir), (2,))


# ----------------------------------------------------------------- keyfence

KEYFENCE = [sys.executable, "-m", "keyfence.cli.main"]


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) of every subcommand that does something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for sub in subs:
        for word, child in sub.choices.items():
            yield from leaves(child, (*path, word))


LEAVES = dict(leaves(build_parser()))


def plausible_positional(words: tuple[str, ...], dest: str) -> str:
    if words in (("mount",), ("umount",)):
        return "/proc/nope"  # never a real mount from this test
    if dest == "policy":
        return POLICY
    return "enc"


def keyfence_runs(words: tuple[str, ...]) -> list[Run]:
    parser = LEAVES[words]
    positionals = [a for a in parser._actions if not a.option_strings]
    options = [
        a
        for a in parser._actions
        if a.option_strings and a.nargs != 0 and not isinstance(a, argparse._HelpAction)
    ]
    plausible = [plausible_positional(words, a.dest) for a in positionals]
    runs = {Run(words)}
    for value in BAD:
        runs.add(Run((*words, *[value] * max(1, len(positionals)))))
        runs.add(Run((*words, *[value] * (len(positionals) + 2))))
        for option in options:
            runs.add(Run((*words, option.option_strings[0], value, *plausible)))
            runs.add(Run((*words, option.option_strings[0], value)))
    for i in range(len(positionals)):
        for value in SOME_BAD:
            argv = list(plausible)
            argv[i] = value
            runs.add(Run((*words, *argv)))
    runs.add(Run((*words, "--nope", *plausible)))
    for option in options:  # its value missing
        runs.add(Run((*words, *plausible, option.option_strings[0])))
    flags = [
        a
        for a in parser._actions
        if a.option_strings and a.nargs == 0 and not isinstance(a, argparse._HelpAction)
    ]
    for flag in flags:
        runs.add(Run((*words, flag.option_strings[0], *plausible)))
    salts = [["-S", "s:kfct"]] if any(o.dest == "salt" for o in options) else [[]]
    for stdin in STDINS:
        for salt in salts:
            runs.add(Run((*words, *salt, *plausible), stdin))
    for where in NO_DAEMON:
        runs.add(Run((*words, *plausible), daemon=where))
    if words == ("daemon",):
        # the daemon runs until stopped: only arguments it must refuse
        bound = "/proc/nope/sock", "/proc/self/mem", "", "/dev/null/sock", "x" * 200 + "/s"
        return [Run((*words, "--socket", s)) for s in bound] + [
            Run((*words, "zz")),
            Run((*words, "--private", "--system", "--socket", "/proc/nope/sock")),
        ]
    if words == ("demo",):
        # the demo runs a whole scenario: only the usage errors
        return [
            Run((*words, "zz")),
            Run((*words, "--model", "--without-fence")),
            Run((*words, "--emergency", "--without-fence")),
        ]
    return sorted(runs, key=repr)


@pytest.mark.parametrize("words", sorted(LEAVES), ids=" ".join)
def test_keyfence_command(words: tuple[str, ...], daemon: DaemonProcess, workdir: Path) -> None:
    # e4crypt(8) prints its policy errors on stdout ("Error [...] setting policy.")
    stdout_ok = words[0] == "e4crypt"
    check(execute(KEYFENCE, keyfence_runs(words), daemon, workdir), (0, 1, 2), stdout_ok=stdout_ok)


def test_keyfence_without_a_command_or_with_an_unknown_one(
    daemon: DaemonProcess, workdir: Path
) -> None:
    runs = [Run(()), Run(("nope",)), Run(("",)), Run(("--nope",)), Run(("e4crypt", "nope"))]
    check(execute(KEYFENCE, runs, daemon, workdir), (2,))


def test_version() -> None:
    from keyfence import __version__

    # keyctl's shape: "keyctl from keyutils-1.6.3 (Built 2022-12-18)"; kfctl says
    # keyctl's own words (scripts read the keyutils version from them), with
    # keyfence's version where keyctl has its build date
    wanted = {
        "kfctl": f"keyctl from keyutils-1.6.3 (Built keyfence-{__version__})\n",
        "keyfence": f"keyfence from keyfence-{__version__}",
    }
    for argv, name in ((KFCTL, "kfctl"), (KEYFENCE, "keyfence")):
        done = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=True)
        assert done.stdout.startswith(wanted[name]), done.stdout


@pytest.mark.parametrize("words", [("e4crypt", "add_key"), ("unlock",)], ids=" ".join)
def test_every_option_of_add_key_and_unlock_is_described(words: tuple[str, ...]) -> None:
    for action in LEAVES[words]._actions:
        assert action.help and len(action.help) > 15, (words, action.option_strings)
    done = subprocess.run([*KEYFENCE, *words, "--help"], capture_output=True, text=True, check=True)
    assert "s:TEXT" in done.stdout and "0xHEX" in done.stdout


def test_keyfence_ends_as_a_c_tool_on_interrupt_closed_pipe_and_full_disk(
    daemon: DaemonProcess,
) -> None:
    """^C while a command waits, a reader that went away, a full disk: the
    command dies of SIGINT or SIGPIPE, or says "write error" and exits 1;
    never a traceback (kfctl already did; keyfence printed Python's
    KeyboardInterrupt and BrokenPipeError tracebacks, exit 130 and 120)."""
    waiting = subprocess.Popen(
        [*KEYFENCE, "e4crypt", "add_key", "-S", "s:kfnt-salt"],
        env=daemon.env,
        stdin=subprocess.PIPE,  # the passphrase never comes
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert waiting.stderr is not None
    assert b"passphrase" in waiting.stderr.read(32)  # it waits for one now
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == -signal.SIGINT
    assert b"Traceback" not in err
    for args in (["--help"], ["--version"]):
        read, write = os.pipe()
        os.close(read)
        done = subprocess.run(
            [*KEYFENCE, *args],
            stdout=write,
            capture_output=False,
            stderr=subprocess.PIPE,
            restore_signals=True,
            check=False,
        )
        os.close(write)
        assert (done.returncode, done.stderr) == (-signal.SIGPIPE, b""), args
        with open("/dev/full", "wb") as full:
            done = subprocess.run([*KEYFENCE, *args], stdout=full, stderr=subprocess.PIPE)
        assert done.returncode == 1, args
        assert done.stderr == b"keyfence: write error: No space left on device\n", args
