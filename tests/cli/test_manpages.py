"""The shipped man pages are what the generator makes from the parsers and
kfctl's table, render with man(1) without warnings, and name every
subcommand and option."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from collections.abc import Iterator
from importlib import resources

import pytest

from keyfence.cli import kfctl_tool, manpages
from keyfence.cli.main import build_parser

SHIPPED = resources.files("keyfence") / "data" / "man"


def test_shipped_pages_are_generated_ones() -> None:
    regenerated = manpages.pages()
    shipped = {p.name: p.read_text(encoding="utf-8") for p in SHIPPED.iterdir() if "." in p.name}
    shipped.pop("__init__.py", None)
    assert sorted(shipped) == sorted(regenerated)
    for name, text in regenerated.items():
        assert shipped[name] == text, (
            f"{name} drifted from --help: run python -m keyfence.cli.manpages"
            " --write src/keyfence/data/man"
        )


def rendered(name: str) -> str:
    if shutil.which("man") is None:
        print("man(1) is not installed (apt package man-db)")
        pytest.skip("man(1) is not installed (apt package man-db)")
    env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="200", MAN_KEEP_FORMATTING="")
    env.pop("MAN_KEEP_FORMATTING")
    page = SHIPPED / name
    with resources.as_file(page) as path:
        done = subprocess.run(
            ["man", "--warnings", "-l", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"{name}: {done.stderr}"
    assert "NAME" in done.stdout
    return done.stdout


@pytest.mark.parametrize("name", sorted(manpages.pages()))
def test_page_renders_without_warnings(name: str) -> None:
    rendered(name)


def words(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every option string and subcommand name below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue  # hidden from --help too
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name
                yield from words(sub)


def test_every_subcommand_and_option_appears() -> None:
    parser = build_parser()
    main_text = rendered("keyfence.1")
    for name, _summary, sub in manpages.subcommands(parser):
        assert name in main_text
        if name in manpages.GROUP_PAGES:
            section = manpages.GROUP_PAGES[name][0]
            text = rendered(f"keyfence-{name}.{section}")
        else:
            text = main_text
        for word in words(sub):
            assert word in text, f"{word!r} of keyfence {name} missing from its page"
    assert "--version" in main_text


def test_every_kfctl_command_appears() -> None:
    text = rendered("kfctl.1")
    for command in kfctl_tool.TABLE:
        assert f"kfctl {command.name}" in text
        for usage in command.usage:
            assert " ".join(f"kfctl {command.name} {usage}".split()) in " ".join(text.split())
    for keyring in ("@s", "@u", "@us", "@p", "@t", "@g", "@a"):
        assert keyring in text
