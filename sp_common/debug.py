"""Debug mode: cross-rank agreement checks before collectives (torch).

On when the environment variable ``SP_SHARDING_DEBUG`` is ``1``/``true``/``yes`` at import time,
or inside a ``sp_debug()`` block (which wins over the environment variable). Off by default: then
the only cost is one context-variable read per op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

_ENV_VAR = "SP_SHARDING_DEBUG"
_FROM_ENV = os.environ.get(_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
_DEBUG: ContextVar[bool | None] = ContextVar("sp_common_debug", default=None)


def debug_enabled() -> bool:
    """Whether cross-rank checks run in the current context."""
    flag = _DEBUG.get()
    return _FROM_ENV if flag is None else flag


@contextlib.contextmanager
def sp_debug(enabled: bool = True) -> Iterator[None]:
    """Turn cross-rank checks on (or off) for this block in the current context.

    With checks on, every torch op whose ``validate`` is True first runs one small collective in
    which all ranks compare shape and dtype; a disagreement raises ValueError on every rank that
    lists each rank's shape, instead of hanging or returning data of the wrong length.
    """
    if not isinstance(enabled, bool):
        raise TypeError(
            f"sp_debug: enabled must be a bool, got {enabled!r} of type "
            f"{type(enabled).__name__}; pass True or False."
        )
    token = _DEBUG.set(enabled)
    try:
        yield
    finally:
        _DEBUG.reset(token)
