"""Bash and zsh completion for ``kfctl`` and ``keyfence``, generated from the
same sources as ``--help`` (kfctl's command table, ``build_parser()``).

The files ship as package data (``keyfence/data/completion``)::

    python -m keyfence.cli.completion --write src/keyfence/data/completion

and tests/cli/test_completion.py regenerates them and compares.  Only the
tables are generated; the shell logic below is fixed.  The zsh files run
the bash functions through ``bashcompinit`` (one logic, two shells).

What is completed: kfctl's commands, its special keyrings and, for key and
keyring arguments, the ids ``kfctl rlist @s`` and ``@u`` return (never
starting a daemon); keyfence's subcommands, options and option choices,
directories for paths, and mount points from the kernel's mount table
(``fuse.keyfence`` in /proc/self/mountinfo).
"""

from __future__ import annotations

import argparse
import sys

from keyfence.cli import manpages

SPECIAL_KEYRINGS = ("@s", "@u", "@us", "@p", "@t", "@g", "@a")
KEY_WORDS = {
    "key",
    "keyring",
    "from_keyring",
    "to_keyring",
    "dest_keyring",
    "private",
    "prime",
    "base",
}
FILE_WORDS = {"datafile", "sigfile", "notifylog", "gclog", "prog"}
MOUNT_DESTS = {"mountpoint"}
"""keyfence positionals completed with mount points (and directories)."""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# -- kfctl ------------------------------------------------------------------------


def _kinds(usage: str) -> list[str]:
    """The argument kinds of a usage line: ``[-x] <key> <keyring>`` ->
    ``key keyring`` (flags dropped, repeats and k=v as ``other``)."""
    kinds = []
    for token in usage.split():
        word = token.strip("[]<>*|")
        if not word or word.startswith("-") or word in ("...",):
            continue
        if word in KEY_WORDS:
            kinds.append("key")
        elif word in FILE_WORDS:
            kinds.append("file")
        else:
            kinds.append("other")
    return kinds


def kfctl_tables() -> str:
    from keyfence.cli import kfctl_tool

    names = [c.name for c in kfctl_tool.TABLE if c.handler is not None]
    removals = [c.name for c in kfctl_tool.TABLE if c.removal]
    lines = [
        f"_kfctl_commands={_quote(' '.join(names))}",
        f"_kfctl_removals={_quote(' '.join(removals))}",
        f"_kfctl_options={_quote(' '.join(kfctl_tool.REMOVAL_OPTIONS))}",
        "declare -gA _kfctl_args _kfctl_flags",
    ]
    for command in kfctl_tool.TABLE:
        if command.handler is None:
            continue
        kinds = _kinds(command.usage[-1] if command.name == "purge" else command.usage[0])
        lines.append(f"_kfctl_args[{command.name}]={_quote(' '.join(kinds))}")
        flags = [command.flag] if command.flag else []
        for usage in command.usage:
            flags += [t.strip("[]") for t in usage.split() if t.strip("[]").startswith("-")]
        flags = [f for f in dict.fromkeys(flags) if f not in ("-", "--raw")] + (
            ["--raw"] if "--raw" in command.usage[0] else []
        )
        if flags:
            lines.append(f"_kfctl_flags[{command.name}]={_quote(' '.join(flags))}")
    return "\n".join(lines)


KFCTL_LOGIC = r"""
_kfctl_ids() {
    local ring
    for ring in @s @u; do
        KEYFENCE_NO_AUTOSTART=1 command kfctl rlist "$ring" 2>/dev/null
        echo
    done
}

_kfctl() {
    [[ -n ${ZSH_VERSION-} ]] && setopt localoptions ksharrays
    local cur=${COMP_WORDS[COMP_CWORD]} c=1
    COMPREPLY=()
    # keyfence's --timeout S and --emergency come before the command name
    while (( c < COMP_CWORD )); do
        case ${COMP_WORDS[c]} in
            --timeout) (( c += 2 )) ;;
            --timeout=*|--emergency) (( c++ )) ;;
            *) break ;;
        esac
    done
    (( c > COMP_CWORD )) && return 0
    if (( COMP_CWORD == c )); then
        if (( c == 1 )); then
            COMPREPLY=($(compgen -W "$_kfctl_commands $_kfctl_options" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$_kfctl_removals" -- "$cur"))
        fi
        return 0
    fi
    local cmd=${COMP_WORDS[c]} i n=0
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_kfctl_flags[$cmd]-}" -- "$cur"))
        return 0
    fi
    for (( i = c + 1; i < COMP_CWORD; i++ )); do
        case ${COMP_WORDS[i]} in
            -*) ;;
            *) (( n++ )) ;;
        esac
    done
    local -a kinds=(${_kfctl_args[$cmd]-})
    local kind=${kinds[n]-}
    (( n >= ${#kinds[@]} )) && [[ $cmd == session || $cmd == watch_session ]] && kind=file
    case $kind in
        key) COMPREPLY=($(compgen -W "@s @u @us @p @t @g @a $(_kfctl_ids)" -- "$cur")) ;;
        file) COMPREPLY=($(compgen -f -- "$cur")) ;;
    esac
    return 0
}
complete -F _kfctl kfctl
"""


# -- keyfence ---------------------------------------------------------------------


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Table lines for ``parser`` at ``path`` (subcommand words joined by _)."""
    subs = list(manpages.subcommands(parser))
    opts: list[str] = []
    valued: list[str] = []
    positionals: list[str] = []
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            opts += action.option_strings
            if action.nargs != 0:
                valued += action.option_strings
                kind = "choices:" + " ".join(map(str, action.choices)) if action.choices else "file"
                if action.dest in ("config_dir", "state_dir"):
                    kind = "dir"
                if action.dest in ("timeout", "option", "salt", "kdf_cost"):
                    kind = "none"
                for option in action.option_strings:
                    lines.append(f"_keyfence_value[{path}:{option}]={_quote(kind)}")
        elif action.choices:
            positionals.append("choices:" + ",".join(map(str, action.choices)))
        elif action.dest in MOUNT_DESTS or (action.dest == "path" and path != "unlock"):
            positionals.append("mount")
        else:
            positionals.append("dir")
    lines.append(f"_keyfence_subs[{path}]={_quote(' '.join(n for n, _, _ in subs))}")
    lines.append(f"_keyfence_opts[{path}]={_quote(' '.join(opts))}")
    lines.append(f"_keyfence_valued[{path}]={_quote(' '.join(valued))}")
    lines.append(f"_keyfence_pos[{path}]={_quote(' '.join(positionals))}")
    for name, _summary, sub in subs:
        lines += _walk(sub, f"{path}_{name}" if path != "top" else name)
    return lines


def keyfence_tables() -> str:
    from keyfence.cli.main import build_parser

    head = (
        "declare -gA _keyfence_subs _keyfence_opts _keyfence_valued _keyfence_pos _keyfence_value"
    )
    return "\n".join([head, *_walk(build_parser(), "top")])


KEYFENCE_LOGIC = r"""
_keyfence_mounts() {
    # the kernel's mount table, not keyfence status: no daemon is asked (or
    # started), and a dead mount's one-time report is left for its owner
    local _id _parent _dev _root point _rest
    while read -r _id _parent _dev _root point _rest; do
        [[ $_rest == *" - fuse.keyfence "* ]] && echo "$point"
    done < /proc/self/mountinfo
}

_keyfence() {
    [[ -n ${ZSH_VERSION-} ]] && setopt localoptions ksharrays
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local where=top i n=0 word
    COMPREPLY=()
    for (( i = 1; i < COMP_CWORD; i++ )); do
        word=${COMP_WORDS[i]}
        if [[ " ${_keyfence_valued[$where]-} " == *" $word "* ]]; then
            (( i++ ))
        elif [[ $word == -* ]]; then
            :
        elif [[ " ${_keyfence_subs[$where]-} " == *" $word "* ]]; then
            if [[ $where == top ]]; then where=$word; else where=${where}_$word; fi
            n=0
        else
            (( n++ ))
        fi
    done
    local value=${_keyfence_value[$where:$prev]-}
    if [[ -n $value ]]; then
        case $value in
            choices:*) COMPREPLY=($(compgen -W "${value#choices:}" -- "$cur")) ;;
            dir) COMPREPLY=($(compgen -d -- "$cur")) ;;
            file) COMPREPLY=($(compgen -f -- "$cur")) ;;
        esac
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_keyfence_opts[$where]-} --help" -- "$cur"))
        return 0
    fi
    if [[ -n ${_keyfence_subs[$where]-} ]]; then
        COMPREPLY=($(compgen -W "${_keyfence_subs[$where]}" -- "$cur"))
        return 0
    fi
    local -a kinds=(${_keyfence_pos[$where]-})
    local kind=${kinds[n]-}
    (( n >= ${#kinds[@]} )) && [[ -n ${kinds[*]-} ]] && kind=${kinds[${#kinds[@]}-1]}
    case $kind in
        choices:*) kind=${kind#choices:}; COMPREPLY=($(compgen -W "${kind//,/ }" -- "$cur")) ;;
        mount) COMPREPLY=($(compgen -W "$(_keyfence_mounts)" -- "$cur") $(compgen -d -- "$cur")) ;;
        dir) COMPREPLY=($(compgen -d -- "$cur")) ;;
    esac
    return 0
}
complete -F _keyfence keyfence
"""

BANNER = "# Generated by python -m keyfence.cli.completion from keyfence's own tables.\n"


def bash_script(program: str) -> str:
    if program == "kfctl":
        body = kfctl_tables() + "\n" + KFCTL_LOGIC
    else:
        body = keyfence_tables() + "\n" + KEYFENCE_LOGIC
    body = body.replace("\n\n\n", "\n\n")
    return f"# bash completion for {program}\n{BANNER}{body}"


def zsh_script(program: str) -> str:
    """The bash logic through zsh's bashcompinit, autoloaded as ``_program``."""
    bash = bash_script(program).replace("complete -F", "# complete -F")
    return (
        f"#compdef {program}\n{BANNER}"
        f"if ! (( $+functions[_{program}_bash] )); then\n"
        "    autoload -U +X bashcompinit && bashcompinit\n"
        f"{bash.replace(f'_{program}() {{', f'_{program}_bash() {{')}"
        "fi\n"
        f"_bash_complete -F _{program}_bash\n"
    )


def files() -> dict[str, str]:
    """Relative path to text, for every completion file."""
    out = {}
    for program in ("kfctl", "keyfence"):
        out[f"bash/{program}"] = bash_script(program)
        out[f"zsh/_{program}"] = zsh_script(program)
    return out


def write(directory: str) -> list[str]:
    return manpages.write_files(directory, files())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyfence.cli.completion", description=__doc__)
    parser.add_argument("--write", metavar="DIR", required=True, help="write the files into DIR")
    args = parser.parse_args(argv)
    for path in write(args.write):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
