"""What the benchmark scripts in bench/ share, and what tests check of them.

* :mod:`.results`: the common result schema every script writes and
  bench/suite.py merges (rows, ratios, the machine, the source measured);
* :mod:`.peers`: the filesystems bench/fs_compare.py and bench/fs_everyday.py
  put beside keyfence (gocryptfs, ext4+fscrypt, the plain disk);
* :mod:`.process`: how such a benchmark runs (its own POSIX session, dying
  with its parent, a stop signal as an exception);
* :mod:`.charts`: the suite's PNG charts (the bench extra's matplotlib);
* :mod:`.everyday`: fs_everyday's tree steps, which bench/fuse_trace.py
  ``--day`` traces too;
* :mod:`.kernel_trace`: the kernel's FUSE trace events, read per opcode;
* :mod:`.rawloop`: the FUSE request loop of our own that bench/fuse_loops.py
  measures beside pyfuse3.

bench/ is a directory of scripts, each run by its path; they import nothing
from each other (docs/design.md, "Tests and benchmarks").
"""
