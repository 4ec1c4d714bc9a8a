"""Fixtures shared by the fs unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmp_dir_fd(tmp_path: Path) -> Iterator[int]:
    """An ``O_PATH`` descriptor of ``tmp_path``, closed after the test."""
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)
