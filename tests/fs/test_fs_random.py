"""Random call sequences on a mount against the backing filesystem itself
(tests/fs/fs_random.py: what is compared and what is not, and how to run
more seeds), as root and as another uid in directories it owns (the
mount's ``default_permissions`` against the host kernel's own checks).
Each defect this found has a test of its own in tests/fs/test_posix_fixes.py,
tests/fs/test_tools.py or tests/fs/test_killpriv.py; this keeps the seeds
that found them, and others, passing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from keyfence.testing.mounting import fuse_available
from keyfence.testing.users import as_uid, environment, python_argv, why_no_other_uids
from tests.fs import fs_random

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

SEQUENCES = 25
LENGTH = 200
OTHER_UID = 61102
"""A uid of this branch's range (no account needed: setpriv takes numbers)."""
REPOSITORY = Path(__file__).resolve().parents[2]

AS_OTHER = r"""
import json, sys
from pathlib import Path
from tests.fs import fs_random
mine, theirs, seed, length, plain = sys.argv[1:6]
outcome = fs_random.run_sequence(
    Path(mine), Path(theirs), int(seed), int(length), plain=plain == "plain"
)
print(json.dumps(outcome.difference))
"""


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


@pytest.mark.parametrize("plain", [False, True], ids=["encrypted", "plain"])
def test_random_sequences_as_another_uid(plain: bool) -> None:
    why = why_no_other_uids()
    if why is None and not os.stat(REPOSITORY).st_mode & 0o001:
        why = f"{REPOSITORY} is not reachable by other uids"
    if why is not None:
        pytest.skip(why)
    top = Path(tempfile.mkdtemp(prefix="kf-fs-random-"))  # pytest's tmp_path is 0700
    os.chmod(top, 0o755)
    differences = []
    try:
        with fs_random.playground(top) as ground:
            os.chmod(ground.mount.mnt, 0o755)
            os.chmod(ground.reference, 0o755)
            for i in range(SEQUENCES // 2):
                mine, theirs = ground.roots(f"u{i}", plain=plain)
                for d in (mine, theirs):
                    os.chown(d, OTHER_UID, OTHER_UID)
                    os.chmod(d, 0o755)
                argv = [str(mine), str(theirs), str(2026_12_07 + i), str(LENGTH)]
                env = environment()
                env["PYTHONPATH"] = f"{REPOSITORY}{os.pathsep}{env['PYTHONPATH']}"
                kind = "plain" if plain else "encrypted"
                done = subprocess.run(
                    as_uid(OTHER_UID, python_argv("-c", AS_OTHER, *argv, kind)),
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
                assert done.returncode == 0, done.stderr
                found = json.loads(done.stdout.strip().splitlines()[-1])
                if found is not None:
                    differences.append("\n".join([f"sequence {i}:", *found]))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert not differences, "\n\n".join(differences)
