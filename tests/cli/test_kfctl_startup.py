"""kfctl's start-up: the installed launcher (keyfence.cli.launcher) and what a
command imports.

No timed assertion (the machine is shared): what is checked is what makes
start-up slow, the modules loaded, and that the launcher prints the same
bytes as ``python -m keyfence.cli.kfctl``.
"""

from __future__ import annotations

import ast
import marshal
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keyfence.cli import kfctl_bundle, launcher
from keyfence.testing.daemon import running_daemon

# each of these costs start-up time and no everyday command needs it
HEAVY = {
    "site",  # the launcher runs -S
    "signal",  # its enums: the _signal module does the same
    "enum",
    "typing",
    "argparse",
    "dataclasses",
    "functools",
    "collections",
    "socket",  # _socket is enough
    "selectors",
    "re",
    "threading",
    "subprocess",
    "msgspec",
    "os",  # posix is enough: os builds os.environ's ABCs (_collections_abc), 1.7 ms
    "_collections_abc",
    "posixpath",
    "struct",  # an extension module: int.from_bytes and memoryview.cast instead
    "_struct",
}


def write(tmp_path: Path) -> Path:
    """The Python launcher (the compiled command's fallback) at tmp/kfctl."""
    path = tmp_path / "kfctl"
    launcher.write_launcher(str(path))
    return path


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)


def test_launcher_is_an_isolated_interpreter_on_this_tree(tmp_path: Path) -> None:
    path = write(tmp_path)
    text = path.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert repr(launcher.package_parent()) in text
    assert os.stat(path).st_mode & 0o777 == 0o755
    assert (Path(launcher.package_parent()) / "keyfence" / "cli" / "kfctl.py").exists()


def test_the_installed_command_is_the_compiled_client_with_python_beside(tmp_path: Path) -> None:
    path = tmp_path / "kfctl"
    assert launcher.main([str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x7fELF"
    fallback = Path(launcher.python_launcher_path(str(path)))
    assert fallback == tmp_path / ".kfctl-python"
    assert fallback.read_text().startswith(f"#!{sys.executable} -IS\n")
    assert kfctl_bundle.is_current(kfctl_bundle.bundle_path(str(fallback)))
    # called by another name, through the fallback: that name in its usage;
    # what the client told the launcher is not left to the command's children
    (tmp_path / "keyctl").symlink_to(path)
    env = {"PATH": "/usr/bin:/bin", "KEYFENCE_KFCTL_WARM": "0", "KEYFENCE_SOCKET": "/nonexistent"}
    usage = run([str(tmp_path / "keyctl")], env)
    assert usage.returncode == 2
    assert usage.stderr.startswith(b"Format:\n  keyctl --version \n"), usage.stderr
    inner = run([str(path), "session", "-", "sh", "-c", "env"], env)
    assert b"KEYFENCE_KFCTL_ARGV0" not in inner.stdout
    assert b"KEYFENCE_KFCTL_WARM_START" not in inner.stdout


def test_the_fallback_path_is_compiled_in_byte_for_byte() -> None:
    """A path's bytes as octal escapes: a UTF-8 (or any) byte above 127
    stays that byte, not the UTF-8 of its Latin-1 reading."""
    assert launcher._c_string("/opt/é x/.kfctl-python") == '"/opt/\\303\\251 x/.kfctl-python"'
    assert launcher._c_string('/a"b\\c\n') == '"/a\\042b\\134c\\012"'


def test_without_a_c_compiler_the_command_is_the_python_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "false")
    path = tmp_path / "kfctl"
    assert launcher.main([str(path)]) == 0
    assert path.read_text().startswith(f"#!{sys.executable} -IS\n")


def test_launcher_refuses_an_interpreter_path_a_shebang_cannot_hold() -> None:
    with pytest.raises(ValueError):
        launcher.launcher_text("/opt/my python/bin/python3", "/src")


def test_launcher_prints_what_the_module_prints(tmp_path: Path) -> None:
    path = write(tmp_path)
    with running_daemon() as daemon:
        env = daemon.env
        module = [sys.executable, "-m", "keyfence.cli.kfctl"]
        added = run([*module, "add", "user", "speed.startup", "payload", "@u"], env)
        assert added.returncode == 0, added.stderr
        key = added.stdout.decode().strip()
        for args in (
            ["show", "@u"],
            ["print", key],
            ["describe", key],
            ["print", "1"],  # exit 1 with keyctl's error line (exit_now keeps the status)
            ["nosuchcommand"],
        ):
            ours = run([str(path), *args], env)
            theirs = run([*module, *args], env)
            assert (ours.returncode, ours.stdout, ours.stderr) == (
                theirs.returncode,
                theirs.stdout,
                theirs.stderr,
            ), args


def test_common_commands_import_nothing_heavy(tmp_path: Path) -> None:
    path = write(tmp_path)
    with running_daemon() as daemon:
        added = run([str(path), "add", "user", "speed.heavy", "payload", "@u"], daemon.env)
        assert added.returncode == 0, added.stderr
        key = added.stdout.decode().strip()
        for args in (
            ["show", "@u"],
            ["add", "user", "speed.heavy2", "payload", "@u"],
            ["print", key],
            ["search", "@u", "user", "speed.heavy"],
            ["describe", key],
            ["list", "@u"],
            # removals with no key user to wait for: no progress display
            ["unlink", key, "@u"],
            ["clear", "@u"],
        ):
            argv = [sys.executable, "-X", "importtime", "-IS", str(path), *args]
            done = run(argv, daemon.env)
            assert done.returncode == 0, (args, done.stderr)
            loaded = {
                line.split("|")[-1].strip()
                for line in done.stderr.decode().splitlines()
                if line.startswith("import time:")
            }
            assert "keyfence.client" in loaded, args  # the command did reach the daemon
            assert not loaded & HEAVY, (args, sorted(loaded & HEAVY))


# -- the bundle (keyfence.cli.kfctl_bundle)

LOADERS = (
    "import sys\n"
    "def named(loader):\n"
    "    return getattr(loader, '__name__', type(loader).__name__)\n"
    "loaders = {name: named(module.__spec__.loader)\n"
    "           for name, module in list(sys.modules.items())\n"
    "           if name.startswith('keyfence') and module.__spec__ is not None}\n"
    "sys.stdout.write(repr(sorted(loaders.items())) + '\\n')\n"
    "sys.stdout.flush()\n"
)


def _loaders(path: Path, args: list[str], env: dict[str, str]) -> dict[str, str]:
    """Run the launcher at ``path`` with ``args``; which loader brought in
    each keyfence module."""
    text = path.read_text().replace("exit_now(code)\n", LOADERS)
    script = path.parent / "kfctl-loaders"
    script.write_text(text)
    done = run([sys.executable, "-IS", str(script), *args], env)
    assert done.returncode == 0, done.stderr
    return dict(ast.literal_eval(done.stdout.decode().splitlines()[-1]))


def test_launcher_loads_every_common_module_from_its_bundle(tmp_path: Path) -> None:
    path = write(tmp_path)
    bundle = Path(kfctl_bundle.bundle_path(str(path)))
    assert bundle.name == ".kfctl.bundle"
    assert os.stat(bundle).st_mode & 0o777 == 0o644
    assert kfctl_bundle.is_current(str(bundle))
    with running_daemon() as daemon:
        for args in (["show", "@u"], ["add", "user", "speed.bundle", "x", "@u"], ["clear", "@u"]):
            loaders = _loaders(path, args, daemon.env)
            assert "keyfence.client" in loaders, args
            assert set(loaders.values()) == {"Bundle"}, (args, loaders)


def test_a_stale_or_broken_bundle_is_not_used(tmp_path: Path) -> None:
    path = write(tmp_path)
    bundle = Path(kfctl_bundle.bundle_path(str(path)))
    form, tag, entries = marshal.loads(bundle.read_bytes())
    # a source edited since: its recorded mtime no longer matches
    name, package, origin, mtime, size, code = entries[-1]
    entries[-1] = (name, package, origin, mtime - 1, size, code)
    stale = marshal.dumps([form, tag, entries])
    with running_daemon() as daemon:
        for content in (stale, b"not a bundle", marshal.dumps([form, "cpython-00", []]), b""):
            bundle.write_bytes(content)
            assert not kfctl_bundle.is_current(str(bundle))  # as benchmarks check
            loaders = _loaders(path, ["show", "@u"], daemon.env)
            assert "Bundle" not in loaders.values(), loaders
            assert loaders["keyfence.client"] == "SourceFileLoader"
        bundle.unlink()
        assert not kfctl_bundle.is_current(str(bundle))
        assert "Bundle" not in _loaders(path, ["show", "@u"], daemon.env).values()
