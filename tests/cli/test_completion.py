"""The shipped bash and zsh completion files are the generated ones, and
the bash functions complete kfctl's commands, special keyrings and key ids
(from a real daemon) and keyfence's subcommands, options and paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from keyfence.cli import completion
from keyfence.testing.daemon import running_daemon

SHIPPED = resources.files("keyfence") / "data" / "completion"
BIN = os.path.dirname(sys.executable)


def test_shipped_files_are_generated_ones() -> None:
    for name, text in completion.files().items():
        assert (SHIPPED / name).read_text(encoding="utf-8") == text, (
            f"{name} drifted: run python -m keyfence.cli.completion"
            " --write src/keyfence/data/completion"
        )


def complete(
    program: str, words: list[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> list[str]:
    """COMPREPLY of the shipped bash function for the command line ``words``
    (the last word is the one being completed)."""
    script = SHIPPED / "bash" / program
    line = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    with resources.as_file(script) as path:
        code = (
            f"source {path} || exit 9\n"
            f"complete -p {program} || exit 8\n"
            f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
            f"_{program}\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        env = dict(env or os.environ)
        env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
        done = subprocess.run(
            ["bash", "--norc", "--noprofile", "-c", code],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert f"complete -F _{program} {program}" in done.stdout
    return [w for w in done.stdout.splitlines()[1:] if w]


def test_kfctl_commands() -> None:
    assert complete("kfctl", ["kfctl", "cl"]) == ["clear"]
    assert set(complete("kfctl", ["kfctl", "watch"])) == {
        "watch",
        "watch_add",
        "watch_rm",
        "watch_session",
        "watch_sync",
    }
    assert "--version" in complete("kfctl", ["kfctl", "--"])


def test_kfctl_removal_options() -> None:
    """kfctl's --timeout/--emergency come before the command name (after it
    every word is keyctl's argument)."""
    assert {"--timeout", "--emergency"} <= set(complete("kfctl", ["kfctl", "--"]))
    assert complete("kfctl", ["kfctl", "clear", "--"]) == []
    assert complete("kfctl", ["kfctl", "--emergency", "cl"]) == ["clear"]
    assert complete("kfctl", ["kfctl", "--timeout", "5", "a"]) == []
    assert complete("kfctl", ["kfctl", "--timeout", "5", "purge", "-"]) == ["-p", "-i", "-s"]
    assert complete("kfctl", ["kfctl", "add", "-"]) == ["-x"]


def test_kfctl_special_keyrings_and_key_ids(tmp_path: Path) -> None:
    with running_daemon() as daemon:
        env = daemon.env
        added = subprocess.run(
            [os.path.join(BIN, "kfctl"), "add", "user", "tool-completion", "x", "@u"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        key = added.stdout.strip()
        assert key.isdigit()
        got = complete("kfctl", ["kfctl", "describe", ""], env)
        assert {"@s", "@u", "@us", "@p", "@t", "@g", "@a", key} <= set(got)
        assert complete("kfctl", ["kfctl", "link", key, "@u"], env) == ["@u", "@us"]
        # the type argument of add is not a key
        assert complete("kfctl", ["kfctl", "add", ""], env) == []
        assert key in complete("kfctl", ["kfctl", "add", "user", "d", "data", ""], env)


def test_kfctl_without_daemon_still_completes_keyrings(tmp_path: Path) -> None:
    env = dict(os.environ, KEYFENCE_SOCKET=str(tmp_path / "none"))
    got = complete("kfctl", ["kfctl", "read", "@"], env)
    assert got == ["@s", "@u", "@us", "@p", "@t", "@g", "@a"]


def test_keyfence_subcommands_and_options(tmp_path: Path) -> None:
    assert complete("keyfence", ["keyfence", "um"]) == ["umount"]
    assert complete("keyfence", ["keyfence", "e4crypt", "add"]) == ["add_key"]
    assert complete("keyfence", ["keyfence", "login", ""]) == ["add", "remove", "passwd", "list"]
    assert "--rewrap-on-auth" in complete("keyfence", ["keyfence", "pam", "--re"])
    assert complete("keyfence", ["keyfence", "pam", "op"]) == ["open_session"]
    assert complete("keyfence", ["keyfence", "--ver"]) == ["--version"]
    assert complete("keyfence", ["keyfence", "daemon", "--sys"]) == ["--system"]


def test_keyfence_paths_are_directories(tmp_path: Path) -> None:
    (tmp_path / "backing").mkdir()
    (tmp_path / "bfile").write_text("")
    env = dict(os.environ, KEYFENCE_SOCKET=str(tmp_path / "none"))
    got = complete("keyfence", ["keyfence", "mount", "b"], env, cwd=str(tmp_path))
    assert got == ["backing"]
    got = complete(
        "keyfence", ["keyfence", "mount", "-o", "debug", "backing", "b"], env, str(tmp_path)
    )
    assert got == ["backing"]
    # a mount point with no daemon: the directories
    assert complete("keyfence", ["keyfence", "umount", "b"], env, str(tmp_path)) == ["backing"]


def test_zsh_files_define_the_functions(tmp_path: Path) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        print("zsh is not installed (apt package zsh)")
        pytest.skip("zsh is not installed (apt package zsh)")
    for program in ("kfctl", "keyfence"):
        with resources.as_file(SHIPPED / "zsh" / f"_{program}") as path:
            code = (
                "autoload -U +X compinit && compinit -u -d $TMPDIR/zcd\n"
                f"source {path} 2>/dev/null\n"
                f"COMP_WORDS=({program} {'cl' if program == 'kfctl' else 'um'}); COMP_CWORD=1\n"
                f"_{program}_bash\n"
                "print -l -r -- $COMPREPLY\n"
            )
            done = subprocess.run(
                [zsh, "-f", "-c", code],
                capture_output=True,
                text=True,
                env=dict(os.environ, TMPDIR=str(tmp_path)),
                timeout=120,
                check=False,
            )
        assert done.returncode == 0, done.stderr
        # bashcompinit's compgen leaves filtering by the prefix to zsh's compadd
        got = set(done.stdout.split())
        assert ({"clear", "rlist"} if program == "kfctl" else {"umount", "e4crypt"}) <= got
        assert "@s" not in got
