"""request-key.conf(5) command lines, expanded as keyutils' request-key
does (server/request_key_runner.py); the handlers themselves run in
tests/cli/test_request_key.py."""

from __future__ import annotations

import errno

import pytest

from keyfence.server.request_key_runner import UpcallArgs, expand

REQUEST = UpcallArgs(
    op="create",
    key=42,
    type="user",
    description="a b",
    callout="c",
    uid=1000,
    gid=100,
    thread=0,
    process=0,
    session=7,
)


def test_only_a_word_of_one_letter_after_percent_is_a_macro() -> None:
    """request-key expands ``%k`` and the like as whole words; a longer
    word such as ``%kx`` or ``--key=%k`` is passed as it is.  On this
    machine's kernel (/sbin/request-key, keyutils 1.6.3) a line ending
    ``--k=%k %kx %%k %o`` ran its handler with ``--k=%k``, ``%kx``, ``%k``,
    ``create``.

    checked failing before: EINVAL (unsupported macro '%kx'), the key
    negated without running the handler."""
    argv, piped = expand("/bin/h %k %d %S --k=%k %kx %%k %o", REQUEST)
    assert argv == ["/bin/h", "42", "a b", "7", "--k=%k", "%kx", "%k", "create"]
    assert not piped


@pytest.mark.parametrize("word", ["%", "%x", "%{user:k}"])
def test_what_request_key_refuses_is_einval(word: str) -> None:
    """``Missing macro name``, ``Unsupported macro``, and the key
    substitution keyfence does not provide."""
    with pytest.raises(OSError) as info:
        expand(f"/bin/h {word}", REQUEST)
    assert info.value.errno == errno.EINVAL
