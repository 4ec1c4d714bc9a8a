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
