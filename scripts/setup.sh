#!/usr/bin/env bash
# Set up a fresh Debian machine for keyfence: system packages, then a venv
# with the project and its test tools.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(keyutils e2fsprogs util-linux acl python3-venv fuse3 libfuse3-dev pkg-config fio stress-ng pamtester man-db zsh tmux gcc libc6-dev perl openssl bash-completion libssl-dev python3-dev strace openssh-client libwrap0)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The kernel facilities the tests use, where a fresh machine has not mounted
# them yet (systemd does on most): the FUSE control filesystem (a test aborts
# a connection through it) and tracefs (bench/fuse_trace.py).
if [ "$(id -u)" -eq 0 ]; then
    modprobe fuse 2>/dev/null || true
    if [ -d /sys/fs/fuse/connections ] && ! mountpoint -q /sys/fs/fuse/connections; then
        mount -t fusectl fusectl /sys/fs/fuse/connections || echo "setup: could not mount fusectl" >&2
    fi
    if [ -d /sys/kernel/tracing ] && ! mountpoint -q /sys/kernel/tracing; then
        mount -t tracefs tracefs /sys/kernel/tracing || echo "setup: could not mount tracefs" >&2
    fi
fi

# Debian's own interpreter where it is new enough: it is built with PGO and
# LTO, and starts and serves requests ~10% faster than a plain source build
# (a pyenv one, say) of the same version (docs/performance.md, part 5).
# PYTHON=... chooses another.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PYTHON=/usr/bin/python3
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# kfctl starts as `python -IS` (no site: half its start-up), not pip's script
.venv/bin/python -m keyfence.cli.launcher .venv/bin/kfctl
# command-line tools start faster from cached bytecode, even where the
# environment says PYTHONDONTWRITEBYTECODE
.venv/bin/python -m compileall -q src

# sshd for the ssh login tests (keyfence.testing.sshd): Debian's package
# unpacked into the venv, not installed, so that no ssh service starts
if [ "$(id -u)" -eq 0 ] && [ ! -x .venv/openssh-server/usr/sbin/sshd ]; then
    download=$(mktemp -d)
    chmod 755 "$download"  # apt's download user writes there
    if (cd "$download" && { apt-get download -qq openssh-server 2>/dev/null ||
            { apt-get update -qq && apt-get download -qq openssh-server; }; }) &&
        dpkg-deb -x "$download"/openssh-server_*.deb .venv/openssh-server; then
        :
    else  # offline, say: everything else still works
        echo "setup: could not unpack openssh-server; the ssh login tests will skip" >&2
    fi
    rm -rf "$download"
fi
