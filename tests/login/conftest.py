"""The real login set-up of keyfence.testing.login as a fixture: the account
``kfpam1``, a daemon on a private socket, a mount with the user's encrypted
home, the PAM lines of docs/login.md in ``/etc/pam.d/kfpam-test-<random>``
(removed afterwards)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from keyfence.testing.login import LoginSetup, why_no_login
from keyfence.testing.login import login_setup as real_login

__all__ = ["LoginSetup"]


@pytest.fixture
def login_setup() -> Iterator[LoginSetup]:
    why = why_no_login()
    if why:
        pytest.skip(why)
    with real_login("kfpam1", "kfpam-" + secrets.token_hex(6)) as setup:
        yield setup
