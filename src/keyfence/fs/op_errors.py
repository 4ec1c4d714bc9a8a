"""How an error in a FUSE handler becomes the errno the kernel gets.

:func:`fuse_op` wraps every handler of :class:`~keyfence.fs.ops.KeyfenceOperations`
(and of its halves, :mod:`keyfence.fs.xattrs`): ``FUSEError`` passes, an
``OSError`` is its errno, a format error or any other exception is EIO with
a log line that names the handler, never a file (logs outlive a lock).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from pyfuse3 import FUSEError

from keyfence.fs.format import FormatError, IntegrityError

__all__ = ["fuse_op"]

# the operations' own logger: the lines read as they always did
log = logging.getLogger("keyfence.fs.ops")

P = ParamSpec("P")
R = TypeVar("R")


def fuse_op(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn every error of a handler into the errno pyfuse3 replies with."""

    @functools.wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as err:
            code = err.errno or errno.EIO
            if code == errno.EIO and not isinstance(err, IntegrityError):
                log.error("%s: %s", fn.__name__, err.strerror or os.strerror(code))  # no name
            raise FUSEError(code) from None
        except FormatError as err:
            log.error("%s: %s", fn.__name__, err)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return handler
