"""kfctl's code in one file, for the launcher (keyfence.cli.launcher).

Every kfctl command imports the same thirteen Python modules.  Python finds
each one by a search of its package directory, a ``stat`` of the source and
a read of its ``.pyc``: about 110 us a module on the reference machine,
more than unmarshalling all of their code.  The bundle is those modules'
code objects, compiled and marshalled into one file that the launcher reads
once; a finder it puts first on ``sys.meta_path`` then answers for them.

    bundle = [FORMAT, cache_tag, [(name, is_package, source path,
                                    source mtime_ns, source size, code), ...]]

Trust and staleness, as for a ``.pyc``:

* The file lives beside the launcher (``.kfctl.bundle`` in its directory),
  written by whoever writes the launcher, with the same owner and mode 0644:
  someone who can change it can change the launcher too.
* The launcher uses it only when it was made by this interpreter's bytecode
  version (``sys.implementation.cache_tag``) and every module's source still
  has the size and modification time it was compiled from; else kfctl
  imports as usual (an edited checkout, an upgrade without the launcher
  step).  The loader in the launcher treats any error the same way.
* Modules not in the bundle (those of rarer commands) are found as usual:
  the bundled packages keep their directory as ``__path__``.
"""

from __future__ import annotations

import importlib.util
import marshal
import os
import sys

__all__ = ["BUNDLED", "FORMAT", "build", "bundle_path", "is_current"]

FORMAT = 1

BUNDLED = (
    "__future__",
    "keyfence",
    "keyfence.errors",
    "keyfence.constants",
    "keyfence.wire",
    "keyfence.paths",
    "keyfence.socket_trust",
    "keyfence.client",
    "keyfence.cli",
    "keyfence.cli.kfctl_text",
    "keyfence.cli.kfctl_tool",
    "keyfence.cli.kfctl",
    "keyfence.cli.kfctl_commands",
)
"""What ``kfctl show``, ``add``, ``print``, ``clear``... import from files
(tests/cli/test_kfctl_startup.py checks that nothing else is).  A
standard-library module this interpreter has frozen is left out (``stat``
is, in 3.11)."""


def bundle_path(launcher: str) -> str:
    """Where the bundle of the launcher at ``launcher`` lives."""
    directory, name = os.path.split(os.path.abspath(launcher))
    return os.path.join(directory, f".{name.lstrip('.')}.bundle")


def _entry(name: str) -> tuple[str, bool, str, int, int, object] | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.has_location or spec.origin is None:
        if not name.startswith("keyfence"):
            return None  # frozen into this interpreter: already cheap
        raise ValueError(f"{name}: not a module with a source file")
    origin = spec.origin
    if not origin.endswith(".py"):
        raise ValueError(f"{name}: {origin} is not Python source")
    fd = os.open(origin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        with os.fdopen(fd, "rb", closefd=False) as f:
            source = f.read()
    finally:
        os.close(fd)
    code = compile(source, origin, "exec", dont_inherit=True)
    package = spec.submodule_search_locations is not None
    return (name, package, origin, st.st_mtime_ns, st.st_size, code)


def build(path: str) -> None:
    """Write the bundle to ``path`` (atomically, mode 0644)."""
    entries = [entry for entry in map(_entry, BUNDLED) if entry is not None]
    data = marshal.dumps([FORMAT, sys.implementation.cache_tag, entries])
    temporary = f"{path}.kf-new"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o644)
    try:
        os.fchmod(fd, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(temporary, path)


def is_current(path: str) -> bool:
    """Whether the launcher would use the bundle at ``path``: made by this
    interpreter's bytecode version, every source unchanged since (the
    launcher's own test, for benchmarks and ``keyfence doctor``-style
    checks: a stale bundle makes kfctl import as usual, slower)."""
    try:
        with open(path, "rb") as f:
            form, tag, entries = marshal.loads(f.read())
        if form != FORMAT or tag != sys.implementation.cache_tag:
            return False
        for _name, _package, origin, mtime, size, _code in entries:
            st = os.stat(origin)
            if st.st_mtime_ns != mtime or st.st_size != size:
                return False
    except (OSError, ValueError, TypeError, EOFError):
        return False
    return True
