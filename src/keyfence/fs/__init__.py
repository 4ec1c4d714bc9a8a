"""The encrypted overlay filesystem: on-disk format, crypto and the mount.

:mod:`keyfence.fs.format` holds the byte layouts (policy record, file header,
block records, name encodings) and their size arithmetic;
:mod:`keyfence.fs.crypto` the keys derived from a master key and the ciphers
the mount worker calls per block, name and symlink;
:mod:`keyfence.fs.e4crypt_compat` makes master keys from passphrases exactly
as ``e4crypt add_key`` does.  ``docs/format.md`` is the specification.
The mount itself is :mod:`keyfence.fs.worker` (the process the daemon
starts), serving :mod:`keyfence.fs.ops` (the FUSE operations) over
:mod:`keyfence.fs.pagecache` (write-back) and :mod:`keyfence.fs.syscalls`
(the backing store); docs/design.md says where each part lives.
"""
