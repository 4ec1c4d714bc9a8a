"""Support for keyfence's own tests and benchmarks (as trio has trio.testing).

Nothing here is used by keyfence itself; it lives in the package so that
``tests/`` and ``bench/`` can share it without ``sys.path`` edits.
"""
