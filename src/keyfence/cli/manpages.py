"""Man pages made from the same source as ``--help``, so they cannot drift.

``keyfence(1)`` and one page per subcommand group come from
:func:`keyfence.cli.main.build_parser` (argparse); ``kfctl(1)`` from kfctl's
one command table (:data:`keyfence.cli.kfctl_tool.TABLE`, ``HELP_EXTRA``,
``FORMAT_TAIL``); the config-file pages from the facts below, which name
the modules that read those files.  The pages ship as package data
(``keyfence/data/man``)::

    python -m keyfence.cli.manpages --write src/keyfence/data/man

and tests/cli/test_manpages.py regenerates them and compares.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

SOURCE = "keyfence"
WIDE = 10_000
"""Usage lines are formatted unwrapped; man wraps them."""


def escape(text: str) -> str:
    """Text as roff reads it literally: backslashes and hyphens escaped,
    a line starting with a control character protected."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def header(name: str, section: int, summary: str) -> list[str]:
    manual = "System Administration" if section == 8 else "keyfence"
    if section == 1:
        manual = "User Commands"
    elif section == 5:
        manual = "File Formats"
    return [
        f'.TH "{name.upper()}" "{section}" "" "{SOURCE}" "{manual}"',
        ".nh",
        ".ad l",
        ".SH NAME",
        f"{escape(name)} \\- {escape(summary)}",
    ]


def paragraph(text: str) -> list[str]:
    return [".PP", escape(" ".join(text.split()))]


def preformatted(text: str) -> list[str]:
    return [".PP", ".nf", escape(text.strip("\n")), ".fi"]


# -- argparse ---------------------------------------------------------------


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=WIDE, max_help_position=WIDE)


def usage(parser: argparse.ArgumentParser) -> str:
    fmt = _formatter(parser.prog)
    fmt.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return fmt.format_help().strip()


def subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, hidden ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def options(parser: argparse.ArgumentParser) -> list[str]:
    """``.TP`` entries for every argument but -h and the subcommand choice."""
    fmt = _formatter(parser.prog)
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        invocation = fmt._format_action_invocation(action)
        text = fmt._expand_help(action) if action.help else ""
        if isinstance(action, argparse._VersionAction):
            text = "print the version and exit"
        out += [".TP", f"\\fB{escape(invocation)}\\fR"]
        out.append(escape(" ".join(text.split())) if text else "(no description)")
    return out


def command_section(parser: argparse.ArgumentParser, name: str, summary: str) -> list[str]:
    out = [".SS " + escape(name), ".nf", f"\\fB{escape(usage(parser))}\\fR", ".fi"]
    if summary:
        out += [".PP", escape(summary[0].upper() + summary[1:]) + "."]
    if parser.description and parser.description != summary:
        out += paragraph(parser.description)
    opts = options(parser)
    if opts:
        out += [".RS", *opts, ".RE"]
    return out


# -- the pages -----------------------------------------------------------------

GROUP_PAGES = {
    "e4crypt": (
        8,
        "e4crypt(8)'s commands on keyfence mounts",
        "The commands of e4crypt(8), acting on directories of a keyfence mount: "
        "add_key derives a key from a passphrase and salt and adds it to a keyring "
        "(the session keyring @s by default), set_policy encrypts empty directories "
        "with a key, get_policy prints a directory's key descriptor and new_session "
        "gives the shell a new session keyring.",
    ),
    "login": (
        1,
        "directories the login passphrase unlocks",
        "Manage the list of directories unlocked at login by keyfence-pam(8): a "
        "directory's key is wrapped under a key derived from the login passphrase "
        "(a login protector). The lists are described in keyfence-login.toml(5).",
    ),
    "pam": (
        8,
        "PAM hook for pam_exec",
        "Run by pam_exec(8) with expose_authtok: at auth and open_session it unlocks "
        "the directories of keyfence-login.toml(5) with the login passphrase, at "
        "close_session of the last session it flushes and locks them, at password "
        "it re-wraps their login protectors. It never fails the PAM stack unless "
        "--strict is given.",
    ),
}


def keyfence_page() -> str:
    from keyfence.cli.main import build_parser

    parser = build_parser()
    out = header("keyfence", 1, "key retention service and encrypted filesystem")
    out += [".SH SYNOPSIS", ".nf", f"\\fB{escape(usage(parser))}\\fR", ".fi"]
    out += [".SH DESCRIPTION"]
    out += paragraph(parser.description or "")
    out += paragraph(
        "keyfence is a key retention service modelled on the Linux keyrings "
        "(its keyctl(1) is kfctl(1)) and an encrypted FUSE filesystem that takes "
        "its keys from it. Removing a key never loses data written with it: every "
        "user of a key is called before the key goes."
    )
    out += [".SH OPTIONS", *options(parser)]
    out += [".SH COMMANDS"]
    for name, summary, sub in subcommands(parser):
        if name in GROUP_PAGES:
            section = GROUP_PAGES[name][0]
            out += [".SS " + escape(name), ".PP", escape(summary[0].upper() + summary[1:]) + ":"]
            out += [f"see \\fBkeyfence\\-{escape(name)}\\fR({section})."]
            continue
        out += command_section(sub, name, summary)
    out += [".SH ENVIRONMENT", ".TP", "\\fBKEYFENCE_SOCKET\\fR"]
    out += ["The daemon's socket (default: as keyfence.paths says)."]
    out += see_also("keyfence", 1)
    return "\n".join(out) + "\n"


def group_page(group: str) -> str:
    from keyfence.cli.main import build_parser

    section, summary, text = GROUP_PAGES[group]
    sub = dict((n, p) for n, _, p in subcommands(build_parser()))[group]
    name = f"keyfence-{group}"
    out = header(name, section, summary)
    out += [".SH SYNOPSIS", ".nf", f"\\fB{escape(usage(sub))}\\fR", ".fi"]
    out += [".SH DESCRIPTION", *paragraph(text)]
    if sub.description:
        out += paragraph(sub.description)
    children = list(subcommands(sub))
    opts = options(sub)
    if opts:
        out += [".SH OPTIONS", *opts]
    if children:
        out += [".SH COMMANDS"]
        for child, child_summary, child_parser in children:
            out += command_section(child_parser, child, child_summary)
    out += see_also(name, section)
    return "\n".join(out) + "\n"


def kfctl_page() -> str:
    from keyfence.cli import kfctl_tool

    out = header("kfctl", 1, "keyctl(1) for the keyfence key service")
    out += [".SH SYNOPSIS", ".nf", "\\fBkfctl\\fR \\fIcommand\\fR [\\fIarguments\\fR...]", ".fi"]
    out += [".SH DESCRIPTION"]
    out += paragraph(
        "kfctl is keyctl(1) for the keys of the keyfence daemon: the same commands, "
        "arguments, output and exit codes. A removal (clear, revoke, invalidate, "
        "unlink, move, timeout, purge) waits until every user of the key, such as a "
        "mounted filesystem flushing data written with it, has finished."
    )
    out += [".SH COMMANDS"]
    for command in kfctl_tool.TABLE:
        if not command.listed:
            continue
        for line in command.usage:
            synopsis = f"kfctl {command.name} {line}".rstrip()
            out += [".TP", f"\\fB{escape(synopsis)}\\fR"]
            out.append("Not provided by kfctl." if command.handler is None else "")
        while out[-1] == "":
            out.pop()
    out += [".SH KEYFENCE ADDITIONS"]
    for command in kfctl_tool.TABLE:
        if not command.listed:
            out += [
                ".TP",
                f"\\fBkfctl {escape(command.name)}\\fR",
                "Print the usage text on stdout.",
            ]
    out += preformatted(kfctl_tool.HELP_EXTRA)
    out += [".SH KEY IDENTIFIERS", *preformatted(kfctl_tool.FORMAT_TAIL)]
    out += [
        ".SH EXIT STATUS",
        ".PP",
        "0 on success, 1 on an error, 2 on a usage error (as keyctl(1)).",
    ]
    out += [".SH ENVIRONMENT", ".TP", "\\fBKEYFENCE_SOCKET\\fR", "The daemon's socket."]
    out += [
        ".TP",
        "\\fBKEYFENCE_NO_AUTOSTART\\fR",
        "Set to 1: do not start a daemon (nor a warm server).",
        ".TP",
        "\\fBKEYFENCE_KFCTL_WARM\\fR",
        "0: always start Python for the call, never the warm server; require:"
        " fail when no trusted warm server answers.",
        ".TP",
        "\\fBKEYFENCE_KFCTL_SOCKET\\fR",
        "The warm server's socket (default: kfctl.sock in the per-user keyfence directory).",
    ]
    out += see_also("kfctl", 1)
    return "\n".join(out) + "\n"


def login_toml_page() -> str:
    from keyfence.cli import login

    out = header("keyfence-login.toml", 5, "directories keyfence unlocks at login")
    out += [".SH SYNOPSIS", ".nf"]
    out += [
        escape(f"{login.DEFAULT_SYSTEM_DIR}/USER.toml"),
        escape(f"~/{login.USER_CONFIG}"),
        ".fi",
    ]
    out += [".SH DESCRIPTION"]
    out += paragraph(
        "The directories whose keys keyfence-pam(8) unwraps with the login "
        "passphrase. The list lives outside them, since an encrypted home cannot "
        "hold the list that unlocks it. Both files are TOML with one key, "
        "directories, a list of absolute paths:"
    )
    out += preformatted('directories = ["/home/alice", "/srv/alice-notes"]')
    out += [".SH FILES", ".TP", f"\\fB{escape(login.DEFAULT_SYSTEM_DIR)}/\\fIUSER\\fB.toml\\fR"]
    out.append(
        escape(
            "The system list, written by root with keyfence login add --user NAME DIR. "
            "keyfence pam --config-dir or $KEYFENCE_LOGIN_DIR moves the directory."
        )
    )
    out += [".TP", f"\\fB~/{escape(login.USER_CONFIG)}\\fR"]
    out.append(
        escape(
            "The user's own list (keyfence login add DIR), read at login only if the "
            "home is readable then."
        )
    )
    out += [".SH RULES"]
    out += paragraph(
        "A file is read only if it is a regular file reached without a final "
        "symbolic link, owned by the user or root and not writable by group or "
        f"others, at most {login.MAX_CONFIG_SIZE} bytes of UTF-8 TOML. The system "
        "list comes first, then the user's; a directory listed twice is unlocked "
        "once. A file that breaks a rule is an error, with the kernel's errno "
        "(EINVAL, EPERM, EFBIG); a missing file is an empty list."
    )
    out += see_also("keyfence-login.toml", 5)
    return "\n".join(out) + "\n"


def request_key_conf_page() -> str:
    from keyfence.server import request_key_runner as rk

    out = header(
        "keyfence-request-key.conf", 5, "request-key.conf(5) as the keyfence daemon reads it"
    )
    out += [
        ".SH SYNOPSIS",
        ".nf",
        escape(rk.DEFAULT_CONF),
        escape(os.path.splitext(rk.DEFAULT_CONF)[0] + ".d/*.conf"),
        ".fi",
    ]
    out += [".SH DESCRIPTION"]
    out += paragraph(
        "When request_key() with callout information finds no key, the keyfence "
        "daemon makes the key and runs a handler chosen from these files, as the "
        "kernel and /sbin/request-key(8) do for kernel keys. The format is "
        "request-key.conf(5)'s: one line per rule, blank lines, lines starting with "
        "# or with white space ignored:"
    )
    out += preformatted("OP  TYPE  DESCRIPTION  CALLOUT-INFO  PROGRAM ARG...")
    out += paragraph(
        "OP is create. Each of the first four fields is matched literally or with "
        "one * standing for any text. The least wild matching line wins, the first "
        "of equals. The .d directory's *.conf files are read in sorted order, then "
        "the file. A line with fewer than five fields is logged as a syntax error. "
        "No matching line negates the key at once."
    )
    out += [".SH MACROS"]
    macros = [
        ("%k", "the key's id"),
        ("%t", "its type"),
        ("%d", "its description"),
        ("%c", "the callout information"),
        ("%u", "the requester's uid"),
        ("%g", "the requester's gid"),
        ("%T", "the requester's thread keyring"),
        ("%P", "its process keyring"),
        ("%S", "its session keyring"),
        ("%o", "the operation (create)"),
        ("%%", "a literal %"),
    ]
    for macro, meaning in macros:
        out += [".TP", f"\\fB{escape(macro)}\\fR", escape(meaning)]
    out += paragraph("%{type:desc} key substitution is not provided; it is an error (EINVAL).")
    out += [".SH HANDLERS"]
    out += paragraph(
        "The handler runs as the requesting user (uid, gid and groups) in a new "
        "session, with standard input, output and error on /dev/null, PATH set to "
        f"{rk.HANDLER_PATH}, KEYFENCE_SOCKET naming the daemon, and the authority "
        "to instantiate the key. A |PROGRAM line gets the callout information on "
        "standard input and, if it exits 0, the key is instantiated with what it "
        f"printed. A handler still running after {rk.HANDLER_TIMEOUT} seconds "
        "is killed with its process group. A key still uninstantiated when its "
        "handler ends is negated (ENOKEY for 60 seconds)."
    )
    out += [".SH ENVIRONMENT", ".TP", f"\\fB{rk.CONF_ENV}\\fR"]
    out.append(
        escape("In the daemon's environment: another file (and the .d directory beside it).")
    )
    out += [".TP", "\\fBKEYFENCE_REQUEST_KEY_TIMEOUT\\fR", "Seconds a handler may run."]
    out += see_also("keyfence-request-key.conf", 5)
    return "\n".join(out) + "\n"


ALL = (
    ("keyfence", 1),
    ("keyfence-e4crypt", 8),
    ("keyfence-login", 1),
    ("keyfence-pam", 8),
    ("kfctl", 1),
    ("keyfence-login.toml", 5),
    ("keyfence-request-key.conf", 5),
)

EXTERNAL = (("keyctl", 1), ("keyrings", 7), ("request-key", 8), ("pam_exec", 8), ("e4crypt", 8))


def see_also(name: str, section: int) -> list[str]:
    refs = [(n, s) for n, s in ALL if (n, s) != (name, section)] + list(EXTERNAL)
    return [".SH SEE ALSO", ",\n".join(f"\\fB{escape(n)}\\fR({s})" for n, s in refs)]


def render(name: str) -> str:
    if name == "keyfence":
        return keyfence_page()
    if name == "kfctl":
        return kfctl_page()
    if name == "keyfence-login.toml":
        return login_toml_page()
    if name == "keyfence-request-key.conf":
        return request_key_conf_page()
    return group_page(name.removeprefix("keyfence-"))


def pages() -> dict[str, str]:
    """File name (``kfctl.1``) to roff text, for every page."""
    return {f"{name}.{section}": render(name) for name, section in ALL}


def write_files(directory: str, files: dict[str, str]) -> list[str]:
    """Write generated ``files`` (relative name -> text) under ``directory``;
    the paths written."""
    written = []
    for name, text in files.items():
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


def write(directory: str) -> list[str]:
    return write_files(directory, pages())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyfence.cli.manpages", description=__doc__)
    parser.add_argument("--write", metavar="DIR", required=True, help="write every page into DIR")
    args = parser.parse_args(argv)
    for path in write(args.write):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
