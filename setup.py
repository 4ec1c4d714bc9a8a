"""The optional native parts: the sealer (keyfence.fs._sealer, C + OpenSSL
libcrypto), the names (keyfence.fs._names, C + libcrypto) and the FUSE
loop's common case (keyfence.fs.fuse._loop, which uses _names' capsule),
the worker's one-syscall stat (keyfence.fs._statx, fs/syscalls.py) and the
FUSE queues through io_uring (keyfence.fs.fuse._ring, fs/fuse/ring.py).

Everything else is in pyproject.toml.  ``optional=True``: without a compiler
or OpenSSL's headers the build warns and goes on, and keyfence seals on its
pure-Python path (keyfence/fs/sealer.py says which one it uses) and its
FUSE loop serves every request in Python.
"""

from setuptools import Extension, setup

# What both FUSE loops share (fs/fuse/_drive.c drives a request's handler;
# _answers.c answers from the handlers' tables, with _names' capsule)
FUSE_SHARED_SOURCES = ["src/keyfence/fs/fuse/_drive.c", "src/keyfence/fs/fuse/_answers.c"]
FUSE_SHARED_HEADERS = [
    "src/keyfence/fs/_names.h",
    "src/keyfence/fs/fuse/_answers.h",
    "src/keyfence/fs/fuse/_drive.h",
]

setup(
    ext_modules=[
        Extension(
            "keyfence.fs._sealer",
            ["src/keyfence/fs/_sealer.c", "src/keyfence/fs/_gcm_vaes.c"],
            depends=["src/keyfence/fs/_gcm_vaes.h"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            optional=True,
        ),
        Extension(
            "keyfence.fs._names",
            ["src/keyfence/fs/_names.c"],
            depends=["src/keyfence/fs/_names.h"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            optional=True,
        ),
        Extension(
            "keyfence.fs._statx",
            ["src/keyfence/fs/_statx.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
            optional=True,
        ),
        Extension(
            "keyfence.fs.fuse._loop",
            [
                "src/keyfence/fs/fuse/_loop.c",
                "src/keyfence/fs/fuse/_awake.c",
                *FUSE_SHARED_SOURCES,
            ],
            depends=[*FUSE_SHARED_HEADERS, "src/keyfence/fs/fuse/_awake.h"],
            include_dirs=["src/keyfence/fs"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        Extension(
            "keyfence.fs.fuse._ring",
            [
                "src/keyfence/fs/fuse/_ring.c",
                "src/keyfence/fs/fuse/_awake.c",
                *FUSE_SHARED_SOURCES,
            ],
            depends=[*FUSE_SHARED_HEADERS, "src/keyfence/fs/fuse/_awake.h"],
            include_dirs=["src/keyfence/fs"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
    ]
)
