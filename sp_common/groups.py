"""Which sequence-parallel group a call uses: a torch process group or a JAX mesh axis name.

Resolution order for every op: the ``group=`` argument of the call, else the innermost
``sp_group(...)`` block of the current execution context, else the framework default (the default
process group in torch, the mesh axis ``"sp"`` in JAX).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from .shapes import is_axis_name

_ACTIVE: ContextVar[dict[str, Any] | None] = ContextVar("sp_common_active_groups", default=None)


class _ThreadMirror(threading.local):
    """A per-thread copy of the active groups. torch.compile can trace a thread-local read (and
    guards on it, recompiling when the block changes) but not ``ContextVar.get``."""

    groups: dict[str, Any] | None = None


_MIRROR = _ThreadMirror()


def framework_of_group(group: object) -> str:
    """``"jax"`` for a mesh axis name (a str or a tuple of str), else ``"torch"``."""
    return "jax" if is_axis_name(group) else "torch"


@contextlib.contextmanager
def sp_group(group: Any) -> Iterator[None]:
    """Use ``group`` as the SP group of every op in this block (of the current context only).

    ``group`` is a ``torch.distributed.ProcessGroup`` (for torch tensors) or a JAX mesh axis
    name, ``str`` or tuple of ``str`` (for JAX arrays). Blocks nest; a torch group and a JAX
    axis can be active at once::

        with sp_group(sp_pg), sp_group("seq"):
            y = sp_shard(x, dim=1)   # torch: shards over sp_pg; JAX: over mesh axis "seq"
    """
    if group is None:
        raise TypeError(
            "sp_group: group is None; pass a torch ProcessGroup or a JAX mesh axis name "
            "(to use the default group, leave out the sp_group block)."
        )
    framework = framework_of_group(group)
    current = _ACTIVE.get() or {}
    updated = {**current, framework: group}
    token, outer = _ACTIVE.set(updated), _MIRROR.groups
    _MIRROR.groups = updated
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _MIRROR.groups = outer


def active_group(framework: str) -> Any:
    """The group set by the innermost ``sp_group`` block for ``framework``, or None."""
    current = _ACTIVE.get()
    return None if current is None else current.get(framework)


def active_group_traceable(framework: str) -> Any:
    """As :func:`active_group`, read from the per-thread mirror (for ``torch.compile`` tracing).

    Equal to :func:`active_group` except in asyncio tasks of one thread that interleave their
    ``sp_group`` blocks across ``await``.
    """
    current = _MIRROR.groups
    return None if current is None else current.get(framework)
