"""Strict mode: a world size of 1 that comes from nothing being bound is an error.

By default an op on a torch tensor with no initialized process group, or on a JAX array where no
mesh axis is bound (outside ``shard_map``), sees world size 1 and is the identity, so model code
runs unchanged on one device. A framework that never binds the axis (Keras on JAX, GSPMD) or a
forgotten ``init_process_group`` then looks the same as one device. Strict mode turns that case
into a ValueError naming the function.

On when the environment variable ``SP_SHARDING_STRICT`` is ``1``/``true``/``yes``/``on`` at import
time, or inside a ``sp_strict()`` block (which wins over the environment variable).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextvars import ContextVar

ENV_VAR = "SP_SHARDING_STRICT"
_FROM_ENV = os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
_STRICT: ContextVar[bool | None] = ContextVar("sp_common_strict", default=None)


class _ThreadMirror(threading.local):
    """A per-thread copy of the ``sp_strict`` flag: torch.compile traces a thread-local read
    (and guards on the value) but not ``ContextVar.get``."""

    flag: bool | None = None


_MIRROR = _ThreadMirror()


def strict_enabled() -> bool:
    """Whether world size 1 from nothing being bound raises in the current context."""
    flag = _STRICT.get()
    return _FROM_ENV if flag is None else flag


def strict_enabled_traceable() -> bool:
    """As :func:`strict_enabled`, read from the per-thread mirror (for ``torch.compile``)."""
    flag = _MIRROR.flag
    return _FROM_ENV if flag is None else flag


@contextlib.contextmanager
def sp_strict(enabled: bool = True) -> Iterator[None]:
    """Turn strict mode on (or off) for this block in the current context.

    With strict mode on, every op, ``sp_world_size`` and ``sp_rank`` raise ValueError where the
    SP world size would be 1 only because nothing is bound: torch with no initialized process
    group (and no ``group=`` / ``sp_group``), JAX with no mesh axis bound (outside
    ``shard_map``). A group that exists, even of size 1, is never an error::

        with sp_strict():
            sp_world_size("jax")   # ValueError outside shard_map; the axis size inside it
    """
    if not isinstance(enabled, bool):
        raise TypeError(
            f"sp_strict: enabled must be a bool, got {enabled!r} of type "
            f"{type(enabled).__name__}; pass True or False."
        )
    token, outer = _STRICT.set(enabled), _MIRROR.flag
    _MIRROR.flag = enabled
    try:
        yield
    finally:
        _STRICT.reset(token)
        _MIRROR.flag = outer


def strict_error(func: str, nothing_bound: str, instead: str) -> ValueError:
    """The strict-mode error of ``func``: ``nothing_bound`` says what is missing, ``instead``
    what to do."""
    return ValueError(
        f"{func}: strict mode is on ({ENV_VAR} or sp_strict()) and {nothing_bound}, so the SP "
        f"world size would silently be 1; {instead}, or turn strict mode off with "
        "sp_strict(False)."
    )
