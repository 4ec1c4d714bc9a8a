"""keyfence's own FUSE request loop (the default; ``-o fuse_loop=pyfuse3`` keeps libfuse's).

:mod:`.protocol` the kernel's structures; :mod:`.dispatch` requests to the
handlers of :class:`~keyfence.fs.ops.KeyfenceOperations` and back;
:mod:`.session` the loop on the trio thread; :mod:`.kernel` what the
handlers ask of whichever loop serves them; :mod:`.mount` mounting by
name.  docs/performance.md ("Adopted") has the figures.
"""
