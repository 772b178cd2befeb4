"""Which sequence-parallel group a call uses: a torch process group or a JAX mesh axis name.

Resolution order for every op: the ``group=`` argument of the call, else the innermost
``sp_group(...)`` block of the current execution context, else the framework default (the default
process group in torch, the mesh axis ``"sp"`` in JAX).

A group named explicitly (``group=`` or ``sp_group``) must exist: a torch group this rank is not a
member of, or a JAX axis that is not bound where the op runs, is a ValueError. Only the default
(no process group initialized; JAX: axis ``"sp"`` with no axis bound at all) means world size 1,
and strict mode (``sp_common.strict``) makes that an error too.
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


def _is_torch_group(group: object) -> bool:
    """True for what a torch op accepts as a group (without checking it further): a
    ``ProcessGroup``, a ``DeviceMesh``, or the ``GroupMember.NON_GROUP_MEMBER`` that
    ``dist.new_group`` returns on ranks outside the group (an error, but a torch one)."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(group, (dist.ProcessGroup, DeviceMesh)) or (
        type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER
    )


def framework_of_group(func: str, group: object) -> str:
    """``"jax"`` for a mesh axis name (a str or a tuple of str), ``"torch"`` for a
    ``ProcessGroup`` or ``DeviceMesh``; TypeError naming ``func`` for anything else."""
    if is_axis_name(group):
        return "jax"
    if _is_torch_group(group):
        return "torch"
    raise TypeError(
        f"{func}: group must be a torch.distributed.ProcessGroup, a 1-D DeviceMesh or a JAX mesh "
        f"axis name (a str or a tuple of str), got {group!r} of type {type(group).__name__}; "
        "pass e.g. dist.new_group(ranks), mesh['sp'] or 'sp' / ('dp', 'sp')."
    )


@contextlib.contextmanager
def sp_group(group: Any) -> Iterator[None]:
    """Use ``group`` as the SP group of every op in this block (of the current context only).

    ``group`` is a ``torch.distributed.ProcessGroup`` or a 1-D ``DeviceMesh`` such as
    ``mesh["sp"]`` (for torch tensors), or a JAX mesh axis name, ``str`` or tuple of ``str``
    (for JAX arrays). Blocks nest; a torch group and a JAX axis can be active at once::

        with sp_group(sp_pg), sp_group("seq"):
            y = sp_shard(x, dim=1)   # torch: shards over sp_pg; JAX: over mesh axis "seq"

    A torch group is checked on entry (a DeviceMesh with more than one dim is a TypeError, a
    group this rank is not a member of a ValueError). A JAX axis is checked by each op, where it
    must be bound (inside ``shard_map`` over a mesh with that axis): a ValueError otherwise.
    """
    if group is None:
        raise TypeError(
            "sp_group: group is None; pass a torch ProcessGroup, a 1-D DeviceMesh or a JAX mesh "
            "axis name (to use the default group, leave out the sp_group block)."
        )
    framework = framework_of_group("sp_group", group)
    if framework == "torch":
        from .backend import backend_named

        # A DeviceMesh becomes its ProcessGroup here, once, so ops (and compiled code) read a
        # ProcessGroup from the block.
        group = backend_named("sp_group", "torch").resolve_group("sp_group", group)
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
