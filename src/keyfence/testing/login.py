"""A real login for tests and benchmarks: keyfence.cli.demo_login's set-up
(an account with a password whose home is an encrypted directory of a
mount, a daemon on a private socket, the PAM lines of docs/login.md in a
service of our own, a login program on the real libpam), plus the checks
the tests need before they start.

Accounts: give names and uids from your own range (PREAMBLE); an account
the set-up made is removed afterwards.
"""

from __future__ import annotations

from keyfence.cli import demo_login
from keyfence.cli.demo_login import (
    PAM_LOGIN,
    LoginSetup,
    close_session_seconds,
    editor_command,
    kill_editor,
    login_setup,
)
from keyfence.testing.users import why_no_other_uids

__all__ = [
    "PAM_LOGIN",
    "LoginSetup",
    "close_session_seconds",
    "editor_command",
    "kill_editor",
    "login_setup",
    "why_no_login",
]


def why_no_login() -> str | None:
    """Why a real login cannot be set up here (tests skip with it), or None."""
    return why_no_other_uids() or demo_login.why_no_login()
