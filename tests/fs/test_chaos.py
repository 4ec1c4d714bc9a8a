"""No removal path loses data: writers append verifiable records under
several keys in several sessions while a chaos loop runs every removal path
(clear, unlink, move, revoke, invalidate, expiry, session end, process
keyring owners exiting, ``keyfence lock``) and re-adds the keys; then every
record whose write() returned success must read back intact after a fresh
mount.  The logic is in keyfence.testing.chaos (bench/soak.py runs it longer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyfence.testing.chaos import ALL_PATHS, ChaosConfig, ChaosResult, run_chaos
from keyfence.testing.mounting import fuse_available

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


def show(result: ChaosResult) -> str:
    return json.dumps(result.to_json(), indent=1)


def test_no_removal_path_loses_an_acknowledged_record(tmp_path: Path) -> None:
    result = run_chaos(ChaosConfig(duration=35.0), tmp_path)
    report = show(result)
    # the run did what it claims: many records, every path, writers locked out
    assert result.records_written > 2000, report
    assert set(result.removals) == set(ALL_PATHS), report
    assert result.readds >= len(ALL_PATHS), report
    assert result.failed_writes > 0, report  # writers did meet locked directories
    assert not result.action_failures, report
    # and nothing acknowledged was lost or damaged
    assert result.records_lost == 0, report
    assert result.records_verified == result.records_written, report
    assert result.garbled_bytes == 0, report
    assert not result.read_errors, report
    # a writer in a locked directory gets a clear error, never silence
    assert not result.unclear_errors, report
    assert result.dropped_reports == 0, report


def test_the_chaos_test_fails_without_the_fence(tmp_path: Path) -> None:
    """Mutation check: the same run with the fence off (the demo's switch,
    keyfence.cli.demo_mount.serve_without_fence) loses acknowledged records,
    and the mounts report what they dropped."""
    result = run_chaos(ChaosConfig(duration=10.0, fenced=False), tmp_path)
    report = show(result)
    assert result.records_lost > 0, report
    assert result.records_verified < result.records_written, report
    assert result.dropped_reports > 0, report
