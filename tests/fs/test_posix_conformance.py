"""pjdfstest on an encrypted keyfence directory, against a checked-in list
of expected differences from ext4 (``pjdfstest-expected.txt``, each with
its reason; docs/fs.md, "POSIX conformance (pjdfstest)").

The mount is made by a real daemon (``keyfence.testing.posix_targets``);
prove runs as root in a keyring session holding the directory's key.  The
test fails on any failure not in the list, and on any listed difference
that now passes (so the list stays true).  CI runs the subset below (the
whole suite takes about 9 minutes; ``bench/pjdfstest.py`` runs it all).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keyfence.testing import pjdfstest, posix_targets
from keyfence.testing.mounting import fuse_available

EXPECTED_FILE = Path(__file__).with_name("pjdfstest-expected.txt")

SUBSET = [
    # what an encrypted overlay can get wrong: names and their length
    # limits, links, renames (sticky directories, replacing, ctime, ".."),
    # truncation, times, modes; rename/09.t and 10.t (4,452 tests, about
    # 4 of the 5 minutes) hold every known difference
    *(f"rename/{n:02}.t" for n in (0, 1, 9, 10, 12, 13, 14, 18, 19, 20, 21, 22, 23, 24)),
    *("link/00.t", "unlink/00.t", "unlink/11.t", "rmdir/00.t", "rmdir/06.t"),
    *("mkdir/00.t", "mkdir/02.t", "open/00.t", "open/02.t", "mkfifo/00.t"),
    *("symlink/00.t", "symlink/02.t", "symlink/03.t", "ftruncate/00.t", "truncate/00.t"),
    *("chmod/00.t", "chmod/12.t", "utimensat"),
]
VARIES = "varies:"


def load_expected(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(reason of each class, class of each expected failure)."""
    reasons: dict[str, str] = {}
    expected: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.fullmatch(r"\[([a-z0-9-]+)\]\s+(.+)", line):
            reasons[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"(\S+\.t:\d+)\s+([a-z0-9-]+)", line):
            expected[m.group(1)] = m.group(2)
        else:
            raise ValueError(f"{EXPECTED_FILE.name}:{number}: cannot read {raw!r}")
    return reasons, expected


def test_the_expected_list_is_well_formed() -> None:
    reasons, expected = load_expected(EXPECTED_FILE.read_text())
    assert reasons and expected
    assert set(expected.values()) <= set(reasons), "every entry's class has a reason"
    assert set(reasons) <= set(expected.values()), "no reason without an entry"
    tests = pjdfstest.vendored_dir() / "tests"
    for key in expected:
        assert (tests / key.split(":")[0]).is_file(), key


def test_parse_counts_failures_todos_and_tests_that_never_ran() -> None:
    tap = "\n".join(
        [
            "[10:00:00] /tmp/x/tests/chmod/00.t .. ",
            "1..4",
            "ok 1",
            "not ok 2 - tried 'chmod a 0644', expected 0, got EPERM",
            "not ok 3 # TODO known on this system",
            "Failed 2/4 subtests",
            "[10:00:01] /tmp/x/tests/link/00.t .... ",
            "1..1",
            "ok 1",
            "ok",
        ]
    )
    result = pjdfstest.parse(tap)
    assert result.files == 2
    assert [o.key for o in result.failed] == ["chmod/00.t:2", "chmod/00.t:4"]
    assert result.passed == 3
    assert result.failed_files == {"chmod/00.t"}


@pytest.mark.skipif(
    (pjdfstest.why_not_runnable() or fuse_available()) is not None,
    reason=str(pjdfstest.why_not_runnable() or fuse_available()),
)
def test_pjdfstest_on_an_encrypted_directory_differs_from_ext4_only_as_listed() -> None:
    reasons, expected = load_expected(EXPECTED_FILE.read_text())
    with posix_targets.keyfence_encrypted() as target:
        result = pjdfstest.run(
            target.directory, SUBSET, prefix=target.prefix, env=target.env, timeout=1800
        )
    ran = {o.key for o in result.outcomes}
    failed = {o.key: o.line for o in result.failed}
    print(result.figure(), f"in {result.seconds:.0f} s")
    unexpected = sorted(set(failed) - set(expected))
    stable = {k for k, c in expected.items() if not reasons[c].startswith(VARIES)}
    now_passing = sorted(k for k in stable if k in ran and k not in failed)
    # a class that varies must still show somewhere, or the list is stale
    gone = sorted(
        c
        for c, reason in reasons.items()
        if reason.startswith(VARIES)
        and not any(expected[k] == c for k in failed)
        and any(expected[k] == c for k in ran)
    )
    message = "\n".join(
        [f"unexpected failure {k}: {failed[k][:300]}" for k in unexpected]
        + [f"listed as {expected[k]} but passes now: {k}" for k in now_passing]
        + [f"no test of class {c} fails any more" for c in gone]
    )
    assert not unexpected and not now_passing and not gone, message
    assert len(result.outcomes) > 4000, result.figure()  # the subset really ran
    assert set(expected) <= ran, "the subset runs every listed difference"
