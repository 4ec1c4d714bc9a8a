"""The real login set-up of keyfence.testing.login as a fixture: the account
``kfpam1``, a daemon on a private socket, a mount with the user's encrypted
home, the PAM lines of docs/login.md in ``/etc/pam.d/kfpam-test-<random>``
(removed afterwards); and ``login``, the login programs over it: the
libpam one (``su``'s steps), a real sshd (keyfence.testing.sshd) running a
command, and the same sshd as an interactive login on a pty."""

from __future__ import annotations

import functools
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from keyfence.testing.login import LoginSetup, why_no_login
from keyfence.testing.login import login_setup as real_login
from keyfence.testing.sshd import sshd_for, why_no_sshd

__all__ = ["Login", "LoginSetup"]


@pytest.fixture
def login_setup() -> Iterator[LoginSetup]:
    why = why_no_login()
    if why:
        pytest.skip(why)
    with real_login("kfpam1", "kfpam-" + secrets.token_hex(6)) as setup:
        yield setup


@dataclass
class Login:
    """One login program: ``run(command, password=None)`` logs in, runs
    ``command`` in the user's shell and logs out."""

    run: Callable[..., subprocess.CompletedProcess[str]]
    refused: int
    """Its exit status when pam_unix refuses the password."""


@pytest.fixture(params=["libpam", "sshd", "sshd-tty"])
def login(request: pytest.FixtureRequest, login_setup: LoginSetup) -> Iterator[Login]:
    """``sshd-tty``: an interactive ssh login on a pty, the command typed
    at the login shell's prompt."""
    if request.param == "libpam":
        yield Login(login_setup.login, refused=91)
        return
    why = why_no_sshd()
    if why:
        pytest.skip(why)
    with sshd_for(login_setup) as ssh:
        tty = request.param == "sshd-tty"
        yield Login(functools.partial(ssh.login, tty=tty), refused=255)
