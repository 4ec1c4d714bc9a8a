"""The ``kfctl`` launcher: a console script that starts in the fewest milliseconds.

pip writes ``kfctl`` as ``#!<python>`` + ``from keyfence.cli.kfctl import
main``: the interpreter first runs ``site`` (site-packages, every ``.pth``
file, ``os``, ``sitecustomize``), which costs about as much again as the
bare interpreter, for a command that needs nothing outside the standard
library and keyfence itself.  The launcher written here starts the same
``main`` with ``-I -S`` (isolated: no ``PYTHON*`` variables, no user site,
no script directory on ``sys.path``; no ``site``) and puts the one directory
that holds the ``keyfence`` package on ``sys.path`` itself, and leaves
through :func:`keyfence.cli.kfctl.exit_now` (no interpreter teardown).
Beside it goes ``.kfctl.bundle``, the code of the modules every command
imports in one file (keyfence.cli.kfctl_bundle); the launcher loads them
from it while their sources are unchanged.

    python -m keyfence.cli.launcher PATH     # scripts/setup.sh: .venv/bin/kfctl

The interpreter is this one (``sys.executable``) and the package directory
is where this module was imported from, as pip would have resolved them.
``pip install`` writes its own script again: run this afterwards (setup.sh
does).  ``python -m keyfence.cli.kfctl`` and the ``PYTHONPATH`` others use
(keyfence.testing.users) are untouched: only the installed command changes.
"""

from __future__ import annotations

import os
import sys

FLAGS = "-IS"  # one word: Linux passes everything after the interpreter as one argument


_LOADER = """\
def _bundled(path):
    # kfctl's modules from one file (keyfence.cli.kfctl_bundle); any doubt: none
    import marshal
    import posix

    try:
        with open(path, "rb") as f:
            form, tag, entries = marshal.loads(f.read())
        if form != FORMAT or tag != sys.implementation.cache_tag:
            return
        codes = {}
        for name, package, origin, mtime, size, code in entries:
            st = posix.stat(origin)
            if st.st_mtime_ns != mtime or st.st_size != size:
                return
            codes[name] = (package, origin, code)
    except Exception:
        return
    spec_of = sys.modules["_frozen_importlib"].ModuleSpec

    class Bundle:
        @staticmethod
        def find_spec(name, path=None, target=None):
            entry = codes.get(name)
            if entry is None:
                return None
            spec = spec_of(name, Bundle, origin=entry[1], is_package=entry[0])
            spec.has_location = True
            if entry[0]:
                spec.submodule_search_locations = [entry[1].rpartition("/")[0]]
            return spec

        @staticmethod
        def create_module(spec):
            return None

        @staticmethod
        def exec_module(module):
            exec(codes[module.__name__][2], module.__dict__)

    sys.meta_path.insert(0, Bundle)


"""


_FROM_CLIENT = """\
# from kfctl_client.c: the name it was called by (keyctl, say), and where
# to start a warm server after this call (none answered); neither is left
# for the command's children
import posix

argv0 = posix.environ.pop(b"KEYFENCE_KFCTL_ARGV0", None)
warm = posix.environ.pop(b"KEYFENCE_KFCTL_WARM_START", None)
if argv0 is not None:
    posix.unsetenv(b"KEYFENCE_KFCTL_ARGV0")
    sys.argv[0] = argv0.decode(sys.getfilesystemencoding(), "surrogateescape")
if warm is not None:
    posix.unsetenv(b"KEYFENCE_KFCTL_WARM_START")
# a directory on stdin, which Python cannot start with: kfctl_client.c
# kept it at this descriptor
stdin = posix.environ.pop(b"KEYFENCE_KFCTL_STDIN", None)
if stdin is not None:
    posix.unsetenv(b"KEYFENCE_KFCTL_STDIN")
    if stdin.isdigit() and int(stdin) > 2:
        try:
            posix.dup2(int(stdin), 0)
            posix.close(int(stdin))
        except OSError:
            pass
"""


def _loader() -> str:
    """:data:`_LOADER` for the bundle format kfctl_bundle writes."""
    from keyfence.cli.kfctl_bundle import FORMAT

    return _LOADER.replace("form != FORMAT", f"form != {FORMAT}")


def launcher_text(python: str, package_parent: str, bundle: str | None = None) -> str:
    """The script: ``python`` with FLAGS, keyfence imported from
    ``package_parent`` (through the bundle at ``bundle`` when it is valid)."""
    if any(c in python for c in " \t\n") or "\n" in package_parent:
        # a shebang line splits at the first blank: such a path cannot be one
        raise ValueError(f"cannot write a launcher for the interpreter {python!r}")
    return (
        f"#!{python} {FLAGS}\n"
        "# keyfence's kfctl launcher (python -m keyfence.cli.launcher): no site, no\n"
        "# PYTHON* variables, no teardown; keyfence from the directory below\n"
        "import sys\n"
        f"sys.path.insert(0, {package_parent!r})\n"
        + ("" if bundle is None else f"\n\n{_loader()}_bundled({bundle!r})\n")
        + _FROM_CLIENT
        + "from keyfence.cli.kfctl import exit_now, main\n"
        "code = main()\n"
        "if warm is not None:\n"
        "    from keyfence.cli.launcher import start_warm_server\n"
        "    start_warm_server(warm.decode(sys.getfilesystemencoding(), 'surrogateescape'))\n"
        "exit_now(code)\n"
    )


def package_parent() -> str:
    """The directory that holds the ``keyfence`` package this module belongs to."""
    here = os.path.dirname(os.path.abspath(__file__))  # .../keyfence/cli
    return os.path.dirname(os.path.dirname(here))


def write_launcher(path: str, python: str | None = None) -> None:
    """Replace ``path`` (atomically, mode 0755) with the launcher, and write
    its bundle beside it (keyfence.cli.kfctl_bundle)."""
    from keyfence.cli import kfctl_bundle

    bundle = kfctl_bundle.bundle_path(path)
    kfctl_bundle.build(bundle)
    text = launcher_text(python or sys.executable, package_parent(), bundle)
    temporary = f"{path}.kf-new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o755)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def start_warm_server(path: str) -> None:
    """Start a detached warm server (keyfence.cli.kfctl_warm) at ``path``,
    as -IS as kfctl; the Python launcher does, after a call that found none.
    Any failure: silently none (the next call runs in Python again)."""
    code = (
        f"import sys; sys.path.insert(0, {package_parent()!r}); "
        "from keyfence.cli.kfctl_warm import main; sys.exit(main())"
    )
    # the default place is in our private keyfence directory: the server
    # makes or checks it (a chosen one, $KEYFENCE_KFCTL_SOCKET, is as given)
    chosen = os.environ.get("KEYFENCE_KFCTL_SOCKET")
    where = ["--socket", path] if chosen else ["--socket", path, "--private-dir"]
    try:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.posix_spawn(
                sys.executable,
                [sys.executable, FLAGS, "-c", code, *where],
                {"PATH": "/usr/bin:/bin"},
                file_actions=[(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)],
                setsid=True,
            )
        finally:
            os.close(devnull)
    except OSError:
        pass


PYTHON_NAME = ".kfctl-python"
"""The Python launcher's name beside the compiled command."""


def python_launcher_path(command: str) -> str:
    """Where :func:`write_command` puts the Python launcher for ``command``."""
    return os.path.join(os.path.dirname(os.path.abspath(command)), PYTHON_NAME)


def _c_string(text: str) -> str:
    """``text`` as a C string literal (octal escapes for anything unusual)."""
    out = []
    for byte in os.fsencode(text):
        char = chr(byte)
        if (char.isascii() and char.isalnum()) or char in "/._-+=:@, ":
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def compile_client(path: str, fallback: str) -> str | None:
    """Compile kfctl_client.c to ``path`` (atomically, 0755), running
    ``fallback`` when no warm server serves; None, or why it could not."""
    import subprocess

    source_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kfctl_client.c")
    with open(source_path, encoding="utf-8") as f:
        source = f.read()
    text = f'#define KFCTL_FALLBACK {_c_string(fallback)}\n#line 1 "kfctl_client.c"\n{source}'
    temporary = f"{path}.kf-new"
    compiler = os.environ.get("CC") or "cc"
    argv = [compiler, "-O2", "-Wall", "-o", temporary, "-x", "c", "-"]
    try:
        done = subprocess.run(
            argv, input=text.encode(), capture_output=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{compiler}: {err}"
    if done.returncode != 0:
        return f"{compiler}: {done.stderr.decode(errors='replace').strip()}"
    os.chmod(temporary, 0o755)
    os.replace(temporary, path)
    return None


def write_command(path: str) -> None:
    """The installed ``kfctl`` at ``path``: the compiled client (a call to
    the caller's warm server, keyfence.cli.kfctl_warm) with the Python
    launcher beside it (:data:`PYTHON_NAME`) for everything else; with no
    C compiler, the Python launcher itself."""
    fallback = python_launcher_path(path)
    write_launcher(fallback)
    problem = compile_client(path, fallback)
    if problem is not None:
        print(f"launcher: kfctl without its warm client ({problem})", file=sys.stderr)
        write_launcher(path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m keyfence.cli.launcher PATH", file=sys.stderr)
        return 2
    try:
        write_command(args[0])
    except (OSError, ValueError) as err:
        print(f"launcher: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
