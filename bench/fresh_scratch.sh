#!/bin/bash
# A fresh, journaled ext4 for the filesystem benchmarks' --scratch.
#
#   bench/fresh_scratch.sh [DIR [SIZE]]   make and mount one at DIR (default
#                                         /mnt/kfbench, 24G sparse image)
#   bench/fresh_scratch.sh --remove [DIR] unmount it and delete the image
#
# Why (docs/performance.md, "Everyday speed, part 6"): these VMs' root
# filesystem is an ext4 without a journal.  Without one, ext4 will not hand
# out an inode freed in the last minute or more (fs/ext4/ialloc.c,
# recently_deleted), and looks at each such inode in turn: after a
# benchmark or test removed thousands of files, every create in that block
# group costs up to ~0.5 ms, for whichever system lands there.  A new
# filesystem, made like Debian's mkfs.ext4 makes one (with a journal), on
# an image on the same disk, holds every peer's backing store alike.  The
# loop device does direct I/O, so the image's data is not cached twice.
# Root only.  Then, e.g.:
#   .venv/bin/python bench/fs_compare.py --scratch /mnt/kfbench ...
set -euo pipefail
if [ "${1:-}" = "--remove" ]; then
    dir=${2:-/mnt/kfbench}
    dev=$(findmnt -no SOURCE "$dir" || true)
    umount "$dir"
    if [ -n "$dev" ]; then
        image=$(losetup -nO BACK-FILE "$dev" || true)
        losetup -d "$dev" 2>/dev/null || true
        [ -n "$image" ] && rm -f "$image"
    fi
    exit 0
fi
dir=${1:-/mnt/kfbench}
size=${2:-24G}
if findmnt "$dir" >/dev/null; then
    echo "$dir is mounted already (bench/fresh_scratch.sh --remove $dir first)" >&2
    exit 1
fi
image=$(mktemp /var/tmp/kf-scratch-XXXXXX.img)
truncate -s "$size" "$image"
mkfs.ext4 -q -F "$image"
dev=$(losetup --direct-io=on -f --show "$image")
mkdir -p "$dir"
mount "$dev" "$dir"
echo "$dir: a fresh ext4 with a journal on $dev ($image)"
