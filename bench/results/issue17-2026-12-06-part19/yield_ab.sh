#!/bin/bash
# Part 19's yield A/B: files_probe.py through a real mount, with the loop's
# extension built without the spin's sched_yield and with it, alternated.
#
#   SO_DIR=DIR bash yield_ab.sh ROUNDS HOGS SPIN_US    (root, from the repository root)
#
# DIR holds loop-noyield.so and loop-yield.so (fs/fuse/_loop.c built both
# ways); HOGS 'sh' busy loops run beside each probe.  Leaves loop-noyield.so
# in place: rebuild (setup.py build_ext --inplace) afterwards.
set -u
SO=src/keyfence/fs/fuse/_loop.cpython-311-x86_64-linux-gnu.so
PROBE=bench/results/issue17-2026-12-06-part19/files_probe.py
for _ in $(seq "$1"); do
  for v in noyield yield; do
    cp "$SO_DIR/loop-$v.so" "$SO"
    for _ in $(seq "$2"); do timeout 60 sh -c 'while :; do :; done' & done
    sleep 0.5
    echo "$v $(.venv/bin/python "$PROBE" /mnt/kfbench 1 "$3" | tail -1)"
    pkill -f "while :; do :; done"
    wait 2>/dev/null
  done
done
cp "$SO_DIR/loop-noyield.so" "$SO"
