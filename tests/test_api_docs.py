"""The Python API as documented: keyutils' constants with the model's
values, a docstring on every public method, and docs/api.md's examples run
as written against a daemon of their own."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyfence import client, constants, wire
from keyfence.keys import permission, process_keys
from keyfence.testing.daemon import running_daemon

API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_key_spec_constants_are_the_models() -> None:
    names = [n for n in dir(process_keys) if n.startswith("KEY_SPEC_")]
    assert len(names) == 8
    for name in names:
        assert getattr(constants, name) == getattr(process_keys, name)
        assert getattr(client, name) == getattr(process_keys, name)  # re-exported


def test_permission_constants_are_the_models() -> None:
    for who in ("POS", "USR", "GRP", "OTH"):
        for what in ("VIEW", "READ", "WRITE", "SEARCH", "LINK", "SETATTR", "ALL"):
            ours = getattr(client, f"KEY_{who}_{what}")
            if what == "ALL":
                assert ours == getattr(permission, f"{who}_ALL")
            elif who in ("POS", "USR"):
                assert ours == getattr(permission, f"{who}_{what}")
            else:  # the model names only POS and USR bits; the rest are shifts
                shift = permission.GRP_SHIFT if who == "GRP" else permission.OTH_SHIFT
                assert ours == getattr(permission, f"USR_{what}") >> (permission.USR_SHIFT - shift)


def test_event_constants_are_the_wires() -> None:
    words = {
        "inst": "INSTANTIATED",
        "upd": "UPDATED",
        "link": "LINKED",
        "unlk": "UNLINKED",
        "clr": "CLEARED",
        "rev": "REVOKED",
        "inv": "INVALIDATED",
        "attr": "SETATTR",
        "exp": "EXPIRED",
        "gc": "GC",
    }
    assert set(words) == set(wire.EVENT_BITS)
    for word, name in words.items():
        assert getattr(client, f"KEY_EVENT_{name}") == wire.EVENT_BITS[word]
    assert client.KEY_EVENT_ALL == wire.ALL_EVENTS


@pytest.mark.parametrize(
    "cls", [client.Client, client.ClientWatch, client.RemoteNotification, client.RemovalStatus]
)
def test_every_public_method_has_a_docstring(cls: type) -> None:
    assert cls.__doc__
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__enter__":
            continue
        if isinstance(member, classmethod | staticmethod):
            member = member.__func__
        if isinstance(member, property):
            member = member.fget
        if inspect.isfunction(member):
            assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API_MD.read_text(), re.S)


def test_docs_have_examples() -> None:
    assert len(examples()) >= 4


@pytest.mark.parametrize("index", range(len(examples())))
def test_api_md_example_runs(index: int, tmp_path: Path) -> None:
    code = examples()[index]
    with running_daemon() as daemon:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=daemon.env,
            cwd=tmp_path,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, f"example {index} of docs/api.md:\n{code}\n{done.stderr}"
    assert "Traceback" not in done.stderr


def test_pdoc_builds_the_reference_without_warnings(tmp_path: Path) -> None:
    try:
        import pdoc
    except ImportError:
        print("pdoc is not installed (pip install -e '.[test]')")
        pytest.skip("pdoc is not installed (pip install -e '.[test]')")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(
            "keyfence.client", "keyfence.constants", "keyfence.errors", output_directory=tmp_path
        )
    # pdoc also evaluates private attributes' annotations, which it does not
    # show; threading.Lock (a function at run time) is one it cannot
    shown = [str(w.message) for w in caught if "keyfence.client.Client._" not in str(w.message)]
    assert shown == []
    page = (tmp_path / "keyfence" / "client.html").read_text()
    for text in ("KEYCTL_REVOKE", "add_key", "watch", "keyfence.constants"):
        assert text in page
    assert "KEY_SPEC_SESSION_KEYRING" in (tmp_path / "keyfence" / "constants.html").read_text()
