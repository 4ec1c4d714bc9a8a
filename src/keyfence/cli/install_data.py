"""``keyfence install-data``: man pages, completion scripts and systemd units
from the installed package into a prefix, where man(1), bash-completion,
zsh and systemd look for them.

A system ``pip install`` already puts the man pages and completion scripts
under ``/usr/local/share`` (wheel data files, pyproject.toml); this command
is for the other cases: keyfence installed in a venv (``/opt/keyfence``),
whose ``share/`` no completion loader searches, and the systemd units, which
must name the ``keyfence`` they start.  It writes, under ``PREFIX``:

* ``share/man/man{1,5,8}/``: every page;
* ``share/bash-completion/completions/``, ``share/zsh/site-functions/``;
* ``lib/systemd/system/keyfence.{service,socket}`` and
  ``lib/systemd/user/keyfence.{service,socket}`` (``/usr/local/lib/systemd``
  is on systemd's unit path), with ``ExecStart`` naming this keyfence.

Nothing is enabled or started: it prints the ``systemctl`` lines to run.
``--uninstall`` removes exactly those files.  docs/install.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from keyfence.errors import KeyfenceError

PACKAGED_BINARY = "/usr/bin/keyfence"
"""What the shipped units say; replaced by this installation's keyfence."""


def data_dir() -> Path:
    import keyfence.data

    return Path(keyfence.data.__file__).parent


def this_keyfence() -> str:
    """The absolute path of the ``keyfence`` script of this installation:
    beside the interpreter (a venv, /usr/local/bin), else on PATH."""
    beside = Path(sys.executable).parent / "keyfence"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("keyfence")
    return os.path.abspath(found) if found else PACKAGED_BINARY


def planned_files(prefix: Path, systemd: bool) -> list[tuple[Path, Path]]:
    """(source, destination) of every file this command installs."""
    data = data_dir()
    plan: list[tuple[Path, Path]] = []
    for page in sorted((data / "man").iterdir()):
        section = page.suffix.lstrip(".")
        if section.isdigit():
            plan.append((page, prefix / "share" / "man" / f"man{section}" / page.name))
    for script in sorted((data / "completion" / "bash").iterdir()):
        plan.append((script, prefix / "share" / "bash-completion" / "completions" / script.name))
    for script in sorted((data / "completion" / "zsh").glob("_*")):
        plan.append((script, prefix / "share" / "zsh" / "site-functions" / script.name))
    if systemd:
        for scope, source in (("system", data / "systemd"), ("user", data / "systemd" / "user")):
            for unit in sorted(source.glob("keyfence.*")):
                plan.append((unit, prefix / "lib" / "systemd" / scope / unit.name))
    return plan


def _check_prefix(text: str) -> Path:
    if not text:
        raise KeyfenceError(errno.ENOENT, "--prefix: an empty path")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise KeyfenceError(errno.EINVAL, "--prefix: not UTF-8") from None
    prefix = Path(os.path.abspath(text))
    # the prefix itself must exist (a typo should not grow a new tree)
    try:
        os.stat(prefix)
    except OSError as err:
        code = err.errno or errno.EIO
        raise OSError(code, os.strerror(code), text) from None
    if not prefix.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), text)
    return prefix


def install(prefix: Path, systemd: bool, dry_run: bool) -> list[Path]:
    binary = this_keyfence()
    done = []
    for source, target in planned_files(prefix, systemd):
        done.append(target)
        if dry_run:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        if source.name.startswith("keyfence.") and source.parent.name in ("systemd", "user"):
            data = data.replace(PACKAGED_BINARY.encode(), binary.encode())
        # never through a link someone planted in the prefix: a fresh file,
        # renamed over the target (rename replaces a link, never follows it)
        temporary = target.with_name(f".{target.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o644)
        try:
            os.write(fd, data)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        temporary.replace(target)
    return done


def uninstall(prefix: Path, dry_run: bool) -> list[Path]:
    removed = []
    for _source, target in planned_files(prefix, systemd=True):
        if target.is_file():
            removed.append(target)
            if not dry_run:
                target.unlink()
    return removed


def cmd_install_data(args: argparse.Namespace) -> int:
    prefix = _check_prefix(args.prefix)
    try:
        if args.uninstall:
            files = uninstall(prefix, args.dry_run)
        else:
            files = install(prefix, not args.no_systemd, args.dry_run)
    except OSError as err:  # a read-only or unwritable prefix
        code = err.errno or errno.EIO
        raise OSError(code, os.strerror(code), err.filename) from None
    for path in files:
        print(path)
    if not args.uninstall and not args.no_systemd and not args.dry_run:
        print(
            "systemd: run `systemctl daemon-reload`, then `systemctl enable --now"
            " keyfence.socket` (system daemon) or, as a user, `systemctl --user"
            " enable --now keyfence.socket` (docs/install.md)",
            file=sys.stderr,
        )
    return 0


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "install-data",
        help="install man pages, shell completion and systemd units under a prefix",
        description="Copy the man pages, the bash and zsh completion scripts and the"
        " systemd units shipped in the package to PREFIX/share/man,"
        " PREFIX/share/bash-completion/completions, PREFIX/share/zsh/site-functions"
        " and PREFIX/lib/systemd/{system,user}, the units starting this keyfence;"
        " print each file's path.  For keyfence installed in a venv (a system pip"
        " install already places the pages and scripts under /usr/local/share).",
    )
    parser.add_argument(
        "--prefix",
        required=True,
        metavar="PREFIX",
        help="an existing directory to install under, usually /usr/local",
    )
    parser.add_argument("--no-systemd", action="store_true", help="leave out the systemd units")
    parser.add_argument(
        "--uninstall",
        action="store_true",
        help="remove the files this command installs under PREFIX instead",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="only print the paths, change nothing"
    )
    parser.set_defaults(run=cmd_install_data)
