"""bench/fs_compare.py still works: a quick run through every peer that is
here, results in the common schema, no peer error, every mount cleaned up.

Not a timed test: figures are only checked to exist and be positive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "fs_compare.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, loop devices)"),
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
        reason="FUSE is not available here (/dev/fuse, fusermount3)",
    ),
]


def _mounts_under(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def test_quick_run_measures_every_peer_and_cleans_up(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "fs.json"
    systems = ["keyfence", "fscrypt", "disk"]
    if shutil.which("gocryptfs"):
        systems.insert(1, "gocryptfs")
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--quick", "--json", str(out),
            "--scratch", str(scratch), "--systems", ",".join(systems),
            "--seq-mib", "2", "--files", "50", "--lock-mib", "2", "--emergency-mib", "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    assert doc["bench"] == "fs-compare" and doc["quick"] is True
    assert doc["errors"] == [], doc["errors"]
    rows = {(r["group"], r["system"]): r for r in doc["results"]}
    for group in ("seq-write-2MiB", "seq-read-2MiB", "small-files-50", "lock-2MiB"):
        for system in systems:
            row = rows[(group, system)]
            assert row["median"] > 0 and row["min"] <= row["median"] <= row["max"]
        assert set(rows[(group, "keyfence")]["ratios"]) == set(systems) - {"keyfence"}
    assert rows[("lock-2MiB", "disk")]["vs_sync"] == 1.0
    # the lock as a user mounts it, beside the worst case: keyfence and the disk only
    for group in ("lock-open-defaults-2MiB", "lock-open-2MiB"):
        assert rows[(group, "keyfence")]["vs_sync"] > 0
        assert rows[(group, "disk")]["vs_sync"] == 1.0
        assert (group, "gocryptfs") not in rows
    for key in (
        ("emergency-clear-4MiB", "keyfence"),
        ("emergency-clear-4MiB", "kfctl"),
        ("emergency-drop-report-4MiB", "keyfence"),
    ):
        assert rows[key]["p99"] > 0
    assert rows[("aes-256-gcm-4KiB-encrypt", "aes")]["median"] > 0
    # nothing left behind: no mount, no loop device, no scratch directory
    assert _mounts_under(str(scratch)) == []
    assert os.listdir(scratch) == []
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    assert str(scratch) not in loops.stdout
