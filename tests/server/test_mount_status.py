"""A worker's reports are its user's input: the daemon keeps only checked
fields of known types and bounded size (server/mount_status.py)."""

from __future__ import annotations

from typing import Any

import pytest

from keyfence.server.mount_status import MAX_ITEMS, busy_files, busy_update, clean_stats

EMPTY = {
    "phase": "",
    "dirty_bytes": 0,
    "dirty_limit": 0,
    "keys": [],
    "encrypted_dirs": [],
    "encrypted_dir_count": 0,
    "requests": "",
}


@pytest.mark.parametrize("hostile", [None, 7, "x", [1, 2], {"keys": "nope"}, {"dirty_bytes": -5}])
def test_garbage_gives_empty_figures(hostile: Any) -> None:
    assert clean_stats(hostile) in ({}, EMPTY)


def test_fields_are_typed_bounded_and_unknown_ones_dropped() -> None:
    report = {
        "dirty_bytes": True,  # a bool is not a count
        "dirty_limit": 1 << 70,
        "phase": "p" * 1000,
        "keys": [{"key": "k" * 10_000, "serial": "1", "dirty_bytes": 5, "open_files": [1]}] * 5000,
        "encrypted_dirs": [{"path": 1, "key": None, "unlocked": "yes"}, "not a dict"],
        "encrypted_dir_count": 3,
        "requests": "r" * 1000,
        "secret": "payload",
    }
    clean = clean_stats(report)
    assert set(clean) == set(EMPTY)
    assert clean["dirty_bytes"] == 0 and clean["dirty_limit"] == 0
    assert clean["phase"] == "p" * 32
    assert len(clean["keys"]) == MAX_ITEMS
    assert clean["keys"][0] == {"key": "k" * 256, "serial": 0, "dirty_bytes": 5, "open_files": 0}
    assert clean["encrypted_dirs"] == [{"path": "", "key": "", "unlocked": False}]
    assert clean["encrypted_dir_count"] == 3
    assert clean["requests"] == "r" * 64


def test_busy_reports_per_key_and_whole_list() -> None:
    busy = busy_update({}, {"mount": "/m", "key": "ext4:a", "serial": 1, "files": ["a/1", "a/2"]})
    busy = busy_update(busy, {"key": "ext4:b", "files": ["b/1"]})
    assert busy_files(busy) == ["a/1", "a/2", "b/1"]
    # a file closed: the worker sends the whole list that is left
    busy = busy_update(busy, {"mount": "/m", "files": ["a/2", "b/1"]})
    assert busy_files(busy) == ["a/2", "b/1"]
    busy = busy_update(busy, {"key": "ext4:c", "files": ["c/1"]})
    assert busy_files(busy) == ["a/2", "b/1", "c/1"]
    assert busy_files(busy_update(busy, {})) == []
    assert busy_update(busy, "garbage") == busy
    assert busy_files(busy_update({}, {"files": [1, None, "x" * 10_000]})) == ["x" * 4096]
