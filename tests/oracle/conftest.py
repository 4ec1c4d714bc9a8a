"""Fixtures for comparing the model with the kernel.

Tests here need the real kernel keyring; they skip with the reason printed
only when the add_key(2) syscall is absent (ENOSYS) or not permitted.
"""

from __future__ import annotations

import errno

import pytest

from keyfence.testing import kernel_keyctl as kernel


def _kernel_keyring_reason() -> str | None:
    try:
        kernel.get_keyring_id(kernel.KEY_SPEC_USER_KEYRING, False)
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.EPERM):
            return f"kernel keyring unavailable: {err}"
    return None


KERNEL_REASON = _kernel_keyring_reason()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if KERNEL_REASON is None:
        return
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=KERNEL_REASON))
