"""Random keyctl scripts through Debian's keyctl (the kernel) and through
kfctl (a keyfence daemon), side by side, as the golden scripts run
(tests/cli/test_kfctl.py): the same normalized output and exit codes.

    .venv/bin/python -m tests.cli.kfctl_random SEED COUNT [LENGTH]

prints each script that differs with the difference; as root (the golden
files' uid 0), one runner at a time: the kernel sides of two runners see
each other's keys in root's /proc/keys, which ``%type:desc`` reads.
tests/cli/test_kfctl_random.py runs a few fixed seeds.

A script makes two keys and two keyrings, then runs LENGTH commands drawn
from every keyctl command that acts on keys, with edge arguments: special
and malformed ids, ``%type:desc`` names, empty, long and odd descriptions
and payloads, bad numbers, too few and too many arguments.  What differs by
design (docs/cli.md, "Where kfctl differs") is left out: the order of a
listing (``show``, ``list`` and ``rlist`` are compared with their lines,
and rlist's serials, sorted on both sides: the kernel lists a keyring of
more than two keys in its hash order, keyfence in link order), ``chown`` to
ids the user namespace does not map, reading keyrings' raw contents
(serials), key types other than user, logon and keyring, invalidating the
session keyring, and the kernel's gc timing (a pause after every removal
lets the kernel's gc catch up).
"""

from __future__ import annotations

import difflib
import random
import re
import sys
import tempfile
from pathlib import Path

from tests.cli import test_kfctl as golden

KEYS = ["$k1", "$k2", "$r1", "$r2"]
IDS = [
    "@s", "@u", "@p", "@t", "@us", "@g", "@x", "@a", "0", "-1", "1", "abc", "12x", "",
    "0x10", "99999999999", "-3", "-4", "-7", "-8", "%user:d1", "%keyring:r1", "%:r1",
    "%user:", "%", "%logon:l1",
]  # fmt: skip
TYPES = ["user", "keyring", "logon"]
ODD_TYPES = ["", "nosuchtype", ".dead", "x" * 31, "x" * 32, "user ", "."]
DESCRIPTIONS = ["d1", "d2", "r1", "", "x" * 5000, "a b", "l1", "logon:x", "ns:x", "%", "@s", "d\\n"]
PAYLOADS = ["v1", "", "x" * 40000, "payload with space", "-", "0"]
PERMS = [
    "0x3f3f0000", "0", "0x3f010000", "3f3f0000", "0xffffffff", "-1", "abc", "0x3f000000",
    "0x01010101", "0x3f3f3f3f", "010", "0x",
]  # fmt: skip
OWNERS = ["0", "-1", "abc", "", "4294967295", "4294967296", "0x0", "1x", "00"]
REMOVALS = ("invalidate", "purge", "unlink", "clear", "move", "timeout", "revoke")

SETUP = """\
k1=$(keyctl add user d1 v1 @s); echo rc=$?
r1=$(keyctl newring r1 @s); echo rc=$?
k2=$(keyctl add logon l1:x secret "$r1"); echo rc=$?
r2=$(keyctl newring r2 "$r1"); echo rc=$?
"""


def _q(text: str) -> str:
    if text.startswith("$"):
        return f'"{text}"'
    return "'" + text.replace("'", "'\\''") + "'"


def random_command(r: random.Random) -> str:
    def key() -> str:
        return _q(r.choice(KEYS) if r.random() < 0.65 else r.choice(IDS))

    def pick(pool: list[str]) -> str:
        return _q(r.choice(pool))

    c = r.randrange(40)
    if c < 3:
        kind = pick(TYPES if r.random() < 0.8 else ODD_TYPES)
        return f"keyctl add {kind} {pick(DESCRIPTIONS)} {pick(PAYLOADS)} {key()}"
    if c < 4:
        kind = pick(TYPES + ODD_TYPES)
        return f"printf %s {pick(PAYLOADS)} | keyctl padd {kind} {pick(DESCRIPTIONS)} {key()}"
    if c < 5:
        return f"keyctl update {key()} {pick(PAYLOADS)}"
    if c < 6:
        return f"printf %s {pick(PAYLOADS)} | keyctl pupdate {key()}"
    if c < 7:
        return f"keyctl newring {pick(DESCRIPTIONS)} {key()}"
    if c < 8:
        return f"keyctl revoke {key()}"
    if c < 9:
        return f"keyctl clear {key()}"
    if c < 11:
        return f"keyctl link {key()} {key()}"
    if c < 13:
        return f"keyctl unlink {key()}" + (f" {key()}" if r.random() < 0.7 else "")
    if c < 14:
        force = "-f " if r.random() < 0.3 else ""
        return f"keyctl move {force}{key()} {key()} {key()}"
    if c < 16:
        dest = f" {key()}" if r.random() < 0.3 else ""
        return f"keyctl search {key()} {pick(TYPES)} {pick(DESCRIPTIONS)}{dest}"
    if c < 18:
        # not a keyring's raw contents: its serials differ between the two
        what = _q(r.choice(["$k1", "$k2", "%user:d1", "@x", "0", "abc"]))
        return f"keyctl {r.choice(['read', 'pipe', 'print'])} {what}"
    if c < 19:
        separator = f" {_q(r.choice([':', '', 'ab']))}" if r.random() < 0.2 else ""
        return f"keyctl {r.choice(['describe', 'rdescribe'])} {key()}{separator}"
    if c < 20:
        return f"keyctl {r.choice(['chown', 'chgrp'])} {key()} {pick(OWNERS)}"
    if c < 22:
        return f"keyctl setperm {key()} {pick(PERMS)}"
    if c < 23:
        return (
            f"keyctl timeout {key()} {_q(r.choice(['0', '1000', 'abc', '-1', '', '99999999999']))}"
        )
    if c < 24:
        return f"keyctl security {key()}"
    if c < 25:
        # not @s: the kernel keeps an invalidated session keyring's links
        # until its gc frees it, keyfence unlinks them at once (docs/cli.md)
        return f"keyctl invalidate {_q(r.choice([*KEYS, '@x', '0', 'abc', '%user:d1']))}"
    if c < 26:
        return f"keyctl id {key()}"
    if c < 27:
        dest = f" {key()}" if r.random() < 0.5 else ""
        return f"keyctl request {pick(TYPES)} {pick(DESCRIPTIONS)}{dest}"
    if c < 28:
        return f"keyctl get_keyring_id {key()}"
    if c < 29:
        flags = r.choice(["", "-p ", "-i ", "-s ", "-p -i ", "-x "])
        description = f" {pick(DESCRIPTIONS)}" if r.random() < 0.6 else ""
        return f"keyctl purge {flags}{pick(TYPES)}{description}"
    if c < 30:
        command = r.choice(["instantiate", "negate", "reject"])
        return f"keyctl {command} {key()} {pick(OWNERS)} {key()}"
    if c < 31:
        return _listing(f"keyctl {r.choice(['show', 'show -x'])} {key()}")
    if c < 32:
        return _listing(f"keyctl {r.choice(['list', 'rlist'])} {key()}")
    if c < 33:
        return f"keyctl link {key()} @s; keyctl unlink {key()} @s"
    if c < 34:
        return f"keyctl add user d1 {pick(PAYLOADS)} {key()}"
    if c < 35:
        return f"keyctl {r.choice(['setperm', 'chown', 'timeout'])} {key()}"  # too few
    if c < 36:
        command = r.choice(["read", "describe", "revoke", "clear", "id"])
        return f"keyctl {command} {key()} {key()}"  # too many
    if c < 37:
        return f"keyctl search {key()} {pick(TYPES + ODD_TYPES)} {pick(DESCRIPTIONS)}"
    if c < 38:
        return f"keyctl add {pick(TYPES + ODD_TYPES)} {pick(DESCRIPTIONS)} {pick(PAYLOADS)} {key()}"
    return f"keyctl describe {key()}"


LISTING_START = "--- listing, compared sorted ---"
LISTING_END = "--- end of listing ---"
_LISTING = re.compile(f"^{re.escape(LISTING_START)}\n(.*?){re.escape(LISTING_END)}\n", re.M | re.S)
_NUMBER = re.compile(r"\b(0x[0-9a-f]+|[0-9]+)\b")


def _listing(command: str) -> str:
    """``command`` between markers that :func:`compared` finds; the
    command's exit code stays the line's."""
    return f"echo '{LISTING_START}'; {command}; rc=$?; echo '{LISTING_END}'; (exit $rc)"


def compared(output: str) -> str:
    """A script's output as compared: each marked listing's lines sorted by
    what they say besides numbers and padding, before the serials are normalized (so
    that a serial first seen in a listing gets the same ``<Kn>`` on both
    sides), then a line of serials alone (rlist) sorted within itself."""

    def by_text(match: re.Match[str]) -> str:
        lines = sorted(match.group(1).splitlines(), key=lambda line: _NUMBER.sub("#", line).split())
        return f"{LISTING_START}\n" + "".join(f"{line}\n" for line in lines) + f"{LISTING_END}\n"

    def serials_sorted(match: re.Match[str]) -> str:
        lines = []
        for line in match.group(1).splitlines():
            words = line.split(" ")
            if len(words) > 1 and all(re.fullmatch(r"<K\d+>", w) for w in words):
                line = " ".join(sorted(words))
            lines.append(line)
        return f"{LISTING_START}\n" + "".join(f"{line}\n" for line in lines) + f"{LISTING_END}\n"

    return _LISTING.sub(serials_sorted, golden.normalize(_LISTING.sub(by_text, output)))


def random_script(seed: int, length: int) -> str:
    r = random.Random(seed)
    lines = [SETUP]
    for _ in range(length):
        command = random_command(r)
        lines.append(f"{command}\necho rc=$?")
        if any(word in command for word in REMOVALS):
            lines.append("sleep 0.3")  # the kernel's gc unlinks dead keys after a moment
    return "\n".join(lines) + "\n"


def run_both(text: str, tmp: Path) -> tuple[str, str]:
    """(Debian's keyctl's, kfctl's) normalized output of the script ``text``."""
    script = tmp / "script.sh"
    script.write_text(text)
    real = golden.run_kernel_side(script, tmp)
    daemon_dir = tmp / "daemon"
    daemon_dir.mkdir()
    daemon = golden.Daemon(daemon_dir)
    try:
        session = [sys.executable, "-m", "keyfence.cli.kfctl", "session", "-", "sh"]
        ours = golden.run_script([*session, str(script)], tmp, daemon.env())
    finally:
        daemon.stop()
    return compared(real), compared(ours)


def shown(text: str) -> str:
    return re.sub(r"x{20,}", lambda m: f"<x * {len(m.group(0))}>", text)


def difference(seed: int, length: int) -> str | None:
    """The script of ``seed`` and how kfctl's output differs, or None."""
    text = random_script(seed, length)
    with tempfile.TemporaryDirectory(prefix="kfctl-random-") as tmp:
        real, ours = run_both(text, Path(tmp))
    if real == ours:
        return None
    diff = difflib.unified_diff(
        real.splitlines(), ours.splitlines(), "keyctl", "kfctl", lineterm="", n=2
    )
    return shown(text) + "\n" + "\n".join(diff)


def main() -> int:
    seed, count = int(sys.argv[1]), int(sys.argv[2])
    length = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    differ = 0
    for i in range(count):
        found = difference(seed * 100_000 + i, length)
        if found is not None:
            differ += 1
            print(f"=== seed {seed}, script {i}\n{found}", flush=True)
    print(f"{differ} of {count} scripts differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
