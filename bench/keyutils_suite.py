#!/usr/bin/env python3
"""keyutils' own test suite on keyctl (the kernel) and on kfctl (keyfence).

Usage (root, from the repository root)::

    .venv/bin/python bench/keyutils_suite.py --keyutils DIR [--sides kernel,kfctl]
        [--keep DIR] [TESTS...]

``DIR`` is a keyutils source checkout (not vendored: keyutils is GPL), of
the version Debian's keyctl is (1.6.3: the kernel.org repository
``dhowells/keyutils.git``, tag ``v1.6.3``, or ``apt-get source keyutils``).
Its ``tests`` are copied once per side, with the toolbox's ``set_gc_delay``
and padd/useradd's ``root_maxbytes`` writes made harmless
(:data:`PATCHES`: exact text, so another keyutils version stops here), and
run as its ``tests/runtest.sh`` runs them with ``AUTOMATED=1`` (each test's
``runtest.sh`` in its directory, 600 s at most; PASS, FAIL or SKIP from the
exit status and the last FINISHED or SKIP line of its ``test.out``):

* **kernel**: Debian's ``/usr/bin/keyctl session -`` in a throwaway user
  namespace (``unshare --user --map-root-user``), so the machine's keyrings
  and its request-key are left alone;
* **kfctl**: ``keyctl session -`` with ``keyctl`` a symlink to the
  installed ``.venv/bin/kfctl`` first on ``PATH``, against a private daemon
  (``keyfence.testing.daemon``) whose request-key.conf is Debian's with its
  ``keyctl`` (and request-key-debug.sh's) being that symlink.

``TESTS``: ``keyctl/move/valid`` ... (default: all, a few minutes a side).
Prints one line per test per side, a table, the tests passing on one side
only and the tests skipped on one side only, each with its :data:`KNOWN`
reason (docs/cli.md, "Where kfctl differs").  ``--keep`` keeps each side's
logs (``test.out``, ``console.log`` ...).  Exit status 1 when a test fails
on kfctl that :data:`KNOWN` does not explain.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from keyfence.server.request_key_runner import CONF_ENV
from keyfence.testing.daemon import running_daemon

SIDES = ("kernel", "kfctl")
KNOWN = {
    "features/limits": "kfctl: `--test limits` is not provided (Unknown command)",
    "features/builtin_trusted": "kernel: no .secondary_trusted_keys here; kfctl: no pkeys (skip)",
    "keyctl/requesting/*": "kernel: no request-key upcall from a user namespace",
    "keyctl/permitting/valid": "kernel: chown to an unmapped uid fails in a user namespace",
    "keyctl/restrict/*": "kfctl: restrict_keyring is not modelled (skip)",
    "keyctl/dh_compute/*": "neither side has Diffie-Hellman here (skip)",
    "keyctl/watch/bad-args": "kernel: no CONFIG_KEY_NOTIFICATIONS here (skip)",
}
"""Known differences, by test name pattern: why."""

PATCHES = {
    "toolbox.inc.sh": (
        "        echo $delay > $key_gc_delay_file\n",
        '        echo "(keyutils_suite: not writing $delay to $key_gc_delay_file)"\n',
    ),
    "keyctl/padd/useradd/runtest.sh": (">/proc/sys/kernel/keys/root_maxbytes", ">/dev/null"),
}
"""Harness changes that keep the suite from changing the machine: file: (old, new)."""

_DRIVER = """\
# keyutils' tests/runtest.sh with AUTOMATED=1, and one result line per test
cd "$1" || exit 2
shift
export AUTOMATED=1
for i in "$@"; do
    export TEST=$i
    pushd "$i" >/dev/null || continue
    start=$(date +%s)
    timeout -k 10 600 bash ./runtest.sh >console.log 2>&1
    rc=$?
    last=$(grep -a '++++ FINISHED TEST\\|SKIP' test.out 2>/dev/null | tail -1)
    echo "RESULT $i $rc $(($(date +%s) - start)) $last"
    popd >/dev/null
done
"""


def known(test: str) -> str | None:
    return next((why for pattern, why in KNOWN.items() if fnmatch.fnmatch(test, pattern)), None)


def replace(path: Path, old: str, new: str) -> None:
    """Replace every ``old`` in ``path``; stop if there is none."""
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"{path}: {old.strip()!r} not found (another keyutils version?)")
    path.write_text(text.replace(old, new))


def copy_tests(source: Path, into: Path) -> Path:
    tests = into / "tests"
    shutil.copytree(source, tests)
    for name, (old, new) in PATCHES.items():
        replace(tests / name, old, new)
    return tests


def request_key_conf(into: Path, keyctl: Path) -> Path:
    """Debian's request-key.conf and debug handler, calling ``keyctl``."""
    debug = into / "request-key-debug.sh"
    shutil.copy("/usr/share/keyutils/request-key-debug.sh", debug)
    replace(debug, "\n    keyctl ", f"\n    {keyctl} ")
    conf = into / "request-key.conf"
    text = Path("/etc/request-key.conf").read_text()
    if "/usr/share/keyutils/request-key-debug.sh" not in text:
        raise SystemExit("/etc/request-key.conf: no request-key-debug.sh line")
    text = text.replace("/usr/share/keyutils/request-key-debug.sh", str(debug))
    conf.write_text(re.sub(r"(?<!\S)(/usr)?/bin/keyctl(?!\S)", str(keyctl), text))
    return conf


def verdict(rc: int, last: str) -> str:
    if "SKIP" in last:
        return "SKIP"
    return "PASS" if rc == 0 and "FINISHED TEST: PASS" in last else "FAIL"


def run_side(
    side: str, argv: list[str], env: dict[str, str], tests: Path, names: list[str]
) -> dict[str, str]:
    """Run ``names`` in ``tests`` through ``argv`` (a session): {test: verdict}."""
    driver = tests.parent / "driver.sh"
    driver.write_text(_DRIVER)
    out: dict[str, str] = {}
    with subprocess.Popen(
        [*argv, "bash", str(driver), str(tests), *names],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("RESULT "):
                print(f"{side}| {line}", end="", flush=True)
                continue
            _, test, rc, seconds, last = [*line.split(maxsplit=4), ""][:5]
            out[test] = verdict(int(rc), last.strip())
            detail = last.strip() if out[test] == "SKIP" else f"exit {rc}"
            print(f"{side:6} {test:32} {out[test]:4} {seconds:>3} s  {detail}", flush=True)
    for test in names:
        out.setdefault(test, "FAIL")  # the session ended before it ran
    return out


def kernel(tests: Path, names: list[str]) -> dict[str, str]:
    argv = ["unshare", "--user", "--map-root-user", "/usr/bin/keyctl", "session", "-"]
    return run_side("kernel", argv, {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, tests, names)


def kfctl(tests: Path, names: list[str]) -> dict[str, str]:
    launcher = Path(sys.executable).parent / "kfctl"
    if not launcher.exists():
        raise SystemExit(f"{launcher}: not installed (pip install -e .)")
    bin_dir = tests.parent / "bin"
    bin_dir.mkdir()
    keyctl = bin_dir / "keyctl"
    keyctl.symlink_to(launcher)  # named keyctl: the usage text says keyctl (docs/cli.md)
    os.environ[CONF_ENV] = str(request_key_conf(tests.parent, keyctl))  # the daemon's env
    with running_daemon() as daemon:
        env = {k: daemon.env[k] for k in ("KEYFENCE_SOCKET", "KEYFENCE_NO_AUTOSTART")}
        env |= {"PATH": f"{bin_dir}:/usr/bin:/bin", "LC_ALL": "C"}
        return run_side("kfctl", [str(keyctl), "session", "-"], env, tests, names)


def keep_logs(tests: Path, source: Path, into: Path) -> None:
    """Copy what the run made in ``tests`` (not in ``source``) to ``into``."""
    for path in sorted(tests.rglob("*")):
        rel = path.relative_to(tests)
        if path.is_file() and not (source / rel).exists():
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, into / rel)


def report(table: dict[str, dict[str, str]], names: list[str], tmp: Path) -> int:
    sides = list(table)
    print(f"\n{'test':32} " + " ".join(f"{s:6}" for s in sides))
    for test in names:
        print(f"{test:32} " + " ".join(f"{table[s][test]:6}" for s in sides))
    got = {test: tuple(table.get(s, {}).get(test, "-") for s in SIDES) for test in names}
    for title, pair in (
        ("pass on the kernel, fail on kfctl", ("PASS", "FAIL")),
        ("fail on the kernel, pass on kfctl", ("FAIL", "PASS")),
    ):
        print(
            f"\n{title}:",
            *(f"{t}  [{known(t) or 'NOT KNOWN'}]" for t, g in got.items() if g == pair),
            sep="\n  ",
        )
    skips = [t for t, g in got.items() if "-" not in g and g.count("SKIP") == 1]
    print(
        "\nskipped on one side only:",
        *(f"{t} {got[t]}  [{known(t) or 'NOT KNOWN'}]" for t in skips),
        sep="\n  ",
    )
    bad = [t for t in names if table.get("kfctl", {}).get(t) == "FAIL" and not known(t)]
    print(f"\nfailing on kfctl, not known: {len(bad)}", *bad, sep="\n  ")
    for test in bad:
        out = tmp / "kfctl" / "tests" / test / "test.out"
        tail = out.read_text(errors="replace").splitlines()[-8:] if out.exists() else []
        print(f"--- {test}/test.out (tail)", *tail, sep="\n")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*")
    parser.add_argument("--keyutils", type=Path, required=True, help="a keyutils checkout")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--keep", type=Path, help="keep each side's test logs here")
    args = parser.parse_args()
    source = args.keyutils / "tests"
    if not (source / "toolbox.inc.sh").is_file():
        print(
            f"{source}/toolbox.inc.sh: not found (--keyutils takes a keyutils checkout)",
            file=sys.stderr,
        )
        return 2
    found = sorted(str(p.parent.relative_to(source)) for p in source.glob("*/**/runtest.sh"))
    names = args.tests or found
    sides = args.sides.split(",")
    if wrong := [t for t in names if t not in found] + [s for s in sides if s not in SIDES]:
        print(f"no such test or side: {' '.join(wrong)}", file=sys.stderr)
        return 2
    table: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="kf-keyutils-") as tmp:
        for side in sides:
            tests = copy_tests(source, Path(tmp) / side)
            table[side] = (kernel if side == "kernel" else kfctl)(tests, names)
            if args.keep:
                keep_logs(tests, source, args.keep / side)
        return report(table, names, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
