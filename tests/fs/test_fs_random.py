"""Random call sequences on a mount against the backing filesystem itself
(tests/fs/fs_random.py: what is compared and what is not, and how to run
more seeds).  Each defect this found has a test of its own in
tests/fs/test_posix_fixes.py or tests/fs/test_tools.py; this keeps the
seeds that found them, and others, passing."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyfence.testing.mounting import fuse_available
from tests.fs import fs_random

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

SEQUENCES = 25
LENGTH = 200


@pytest.mark.parametrize("plain", [False, True], ids=["encrypted", "plain"])
def test_random_sequences_match_the_backing_filesystem(tmp_path: Path, plain: bool) -> None:
    differences = []
    with fs_random.playground(tmp_path) as ground:
        for i in range(SEQUENCES):
            mine, theirs = ground.roots(f"t{i}", plain=plain)
            outcome = fs_random.run_sequence(mine, theirs, 2026_12_06 + i, LENGTH, plain=plain)
            if outcome.difference is not None:
                differences.append("\n".join([f"sequence {i}:", *outcome.difference]))
    assert not differences, "\n\n".join(differences)
