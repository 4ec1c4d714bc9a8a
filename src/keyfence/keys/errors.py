"""The model's errors: see :mod:`keyfence.errors` (kept import-light for clients)."""

from keyfence.errors import KeyfenceError, fail

__all__ = ["KeyfenceError", "fail"]
