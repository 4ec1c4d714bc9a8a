"""Random keyctl scripts: kfctl prints what Debian's keyctl prints
(tests/cli/kfctl_random.py says what the scripts hold and leave out, and
how to run more seeds).  A run of such scripts found add_key's error
order; tests/oracle/test_kernel_errors.py keeps that case."""

from __future__ import annotations

import os

import pytest

from tests.cli import kfctl_random
from tests.cli.test_kfctl import _real_keyctl_usable

SCRIPTS = 6
LENGTH = 16


@pytest.mark.slow
@pytest.mark.parametrize("number", range(SCRIPTS))
def test_random_script_prints_what_keyctl_prints(number: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("the golden files were recorded as (namespace) root: uid 0 in listings")
    why = _real_keyctl_usable()
    if why:
        pytest.skip(why)
    found = kfctl_random.difference(2026_12_06 * 100 + number, LENGTH)
    assert found is None, found


def test_listings_are_compared_sorted_and_nothing_else() -> None:
    start, end = kfctl_random.LISTING_START, kfctl_random.LISTING_END
    # one side lists r1's keys in another order than the other, and prints
    # their serials there first: both must give the same K numbers
    one, other = (
        "b\na\n"
        f"{start}\n3 keys in keyring:\n"
        f"{first}: --alswrv 0 0 user: x\n{second}: --alswrv 0 0 user: y\n{end}\nrc=0\n"
        f"{start}\n{rlist}\n{end}\n"
        "d\nc\n"
        for first, second, rlist in (
            ("111111111", "222222222", "222222222 111111111"),
            ("  444444444", "333333333", "333333333 444444444"),
        )
    )
    expected = (
        "b\na\n"
        f"{start}\n3 keys in keyring:\n<K1>: --alswrv 0 0 user: x\n<K2>: --alswrv 0 0 user: y\n"
        f"{end}\nrc=0\n"
        f"{start}\n<K1> <K2>\n{end}\n"
        "d\nc\n"
    )
    assert kfctl_random.compared(one) == kfctl_random.compared(other) == expected
