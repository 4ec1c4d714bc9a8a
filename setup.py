"""The optional native sealer (keyfence.fs._sealer, C + OpenSSL libcrypto).

Everything else is in pyproject.toml.  ``optional=True``: without a compiler
or OpenSSL's headers the build warns and goes on, and keyfence seals on its
pure-Python path (keyfence/fs/sealer.py says which one it uses).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "keyfence.fs._sealer",
            ["src/keyfence/fs/_sealer.c", "src/keyfence/fs/_gcm_vaes.c"],
            depends=["src/keyfence/fs/_gcm_vaes.h"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
