"""keyfence: the key service's own commands (daemon, demo) and the filesystem's."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    """Every command and option (the tests enumerate it)."""
    from keyfence import __version__

    parser = argparse.ArgumentParser(prog="keyfence", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s from keyfence-{__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the seed scenario: write, log out, data survives")
    demo.add_argument(
        "--model", action="store_true", help="the key model only, with an in-process key user"
    )
    demo.add_argument(
        "--emergency",
        action="store_true",
        help="(with --model) wipe at once and report what was dropped",
    )
    demo.add_argument(
        "--without-fence",
        action="store_true",
        help="replay it with the fence off, to see the data loss it prevents",
    )
    demo.add_argument(
        "--login",
        action="store_true",
        help="(root) through a real login: an account, PAM (pam_exec + keyfence pam), "
        "logout with a file open; made for the demo and removed after it",
    )
    # tests name the demo's account and uid (their own range)
    demo.add_argument("--login-user", help=argparse.SUPPRESS)
    demo.add_argument("--login-uid", type=int, help=argparse.SUPPRESS)
    daemon = sub.add_parser("daemon", help="run the key service in the foreground")
    daemon.add_argument("--socket", help="socket path (default: as keyfence.paths says)")
    daemon.add_argument(
        "--detach", action="store_true", help="return once the socket is ready (background)"
    )
    scope = daemon.add_mutually_exclusive_group()
    scope.add_argument("--private", action="store_true", help="serve only this uid")
    scope.add_argument("--system", action="store_true", help="serve every user (root)")
    from keyfence.cli import fs_commands

    fs_commands.add_parsers(sub)
    from keyfence.cli import status

    status.add_parser(sub)
    from keyfence.cli import install_data, login, pam

    login.add_parser(sub)
    pam.add_parser(sub)
    install_data.add_parser(sub)
    return parser


def describe_error(err: OSError) -> str:
    """An OSError as a user reads it: the file it is about, then the
    kernel's text (a KeyfenceError's message already says both)."""
    if err.strerror is None and err.errno is None:
        text = str(err)  # an OSError without errno (Python's own): its words
    else:
        text = err.strerror or os.strerror(err.errno or 0)
    if err.filename is not None:
        return f"{err.filename}: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Every command, ending as a C tool does: ^C and a reader that went
    away end the process by their signal (after every ``finally`` has
    cleaned up: the demo's account, a mount), a failed write of the output
    (a full disk) is one line and status 1; never a traceback."""
    import signal

    try:
        code = _command(argv)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        die_of = signal.SIGINT
    except BrokenPipeError:
        die_of = signal.SIGPIPE
    except OSError as err:  # the output's last flush (a full disk)
        print(f"keyfence: write error: {describe_error(err)}", file=sys.stderr)
        _drop_stdout()
        return 1
    _drop_stdout()
    signal.signal(die_of, signal.SIG_DFL)
    os.kill(os.getpid(), die_of)
    return 128 + die_of  # not reached


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a reader that
    has gone cannot fail again at the interpreter's exit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def _command(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        try:
            return int(args.run(args))
        except OSError as err:  # KeyfenceError too: errno and a message, never a traceback
            print(f"keyfence {args.command}: {describe_error(err)}", file=sys.stderr)
            return 1
    if args.command == "daemon":
        return run_daemon_command(parser, args)
    if args.command == "demo":
        if (args.without_fence or args.login) and (args.model or args.emergency):
            parser.error("--without-fence and --login replay the mount demo; not with --model")
        if args.login:
            from keyfence.cli import demo_login

            return demo_login.run(
                fenced=not args.without_fence, user=args.login_user, uid=args.login_uid
            )
        if args.model or args.emergency:
            from keyfence.cli import demo as demo_module

            return demo_module.run(emergency=args.emergency)
        from keyfence.cli import demo_mount

        return demo_mount.run(fenced=not args.without_fence)
    parser.error(f"unknown command {args.command}")
    return 2


def run_daemon_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import logging

    from keyfence import paths
    from keyfence.server.daemon import run_daemon

    if args.socket == "":
        parser.error("daemon: --socket: an empty path")
    private = True if args.private else False if args.system else None
    try:
        if args.socket:
            path = args.socket
        else:
            place = paths.locate()
            path = place.path
            if place.private_dir is not None:
                # the per-user directory as every client checks it (0700,
                # ours): a daemon never serves where its clients would refuse
                from keyfence import socket_trust

                socket_trust.make_private_dir(place.private_dir)
        logging.basicConfig(level=logging.INFO, format="keyfence daemon: %(message)s")
        return run_daemon(path, private=private, detach=args.detach)
    except OSError as err:  # the socket's directory: missing, not ours, not a directory
        where = args.socket or os.environ.get("KEYFENCE_SOCKET") or "the default socket"
        print(f"keyfence daemon: cannot serve {where}: {describe_error(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
