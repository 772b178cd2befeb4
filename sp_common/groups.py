"""Which sequence-parallel group a call uses: a torch process group or a JAX mesh axis name.

Resolution order for every op: the ``group=`` argument of the call, else the innermost
``sp_group(...)`` block of the current execution context, else the framework default (the default
process group in torch, the mesh axis ``"sp"`` in JAX).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from .shapes import is_axis_name

_ACTIVE: ContextVar[dict[str, Any] | None] = ContextVar("sp_common_active_groups", default=None)


class _ThreadMirror(threading.local):
    """A per-thread copy of the active groups, as int keys into ``_BY_KEY``. torch.compile can
    trace a thread-local read but not ``ContextVar.get``; and it guards on an int it reads (so a
    compiled function recompiles when the block changes) but not on a ProcessGroup object."""

    keys: dict[str, int] | None = None


_MIRROR = _ThreadMirror()
# id(group) -> group for every group named in an sp_group block (groups are long-lived).
_BY_KEY: dict[int, Any] = {}


def framework_of_group(func: str, group: object) -> str:
    """``"jax"`` for a mesh axis name (a str or a tuple of str), ``"torch"`` for a
    ``ProcessGroup``; TypeError naming ``func`` for anything else."""
    if is_axis_name(group):
        return "jax"
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and isinstance(group, dist.ProcessGroup):
            return "torch"
    raise TypeError(
        f"{func}: group must be a torch.distributed.ProcessGroup or a JAX mesh axis name (a str "
        f"or a tuple of str), got {group!r} of type {type(group).__name__}; pass e.g. "
        "dist.new_group(ranks) or 'sp' / ('dp', 'sp')."
    )


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
    framework = framework_of_group("sp_group", group)
    current = _ACTIVE.get() or {}
    _BY_KEY.setdefault(id(group), group)
    token, outer = _ACTIVE.set({**current, framework: group}), _MIRROR.keys
    _MIRROR.keys = {**(outer or {}), framework: id(group)}
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _MIRROR.keys = outer


def active_group(framework: str) -> Any:
    """The group set by the innermost ``sp_group`` block for ``framework``, or None."""
    current = _ACTIVE.get()
    return None if current is None else current.get(framework)


def guard_identity(group: Any) -> Any:
    """``group`` itself, looked up by ``id(group)`` so that torch.compile guards on its
    identity: dynamo guards ``id()`` of an argument but not a ProcessGroup object, and would
    otherwise reuse a graph traced for another group."""
    return _BY_KEY.get(id(group), group)


def active_group_traceable(framework: str) -> Any:
    """As :func:`active_group`, read from the per-thread mirror (for ``torch.compile`` tracing).

    Equal to :func:`active_group` except in asyncio tasks of one thread that interleave their
    ``sp_group`` blocks across ``await``.
    """
    keys = _MIRROR.keys
    key = None if keys is None else keys.get(framework)
    return None if key is None else _BY_KEY[key]
