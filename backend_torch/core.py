"""The torch backend: tensor facts, group resolution and the primitive set for sp_common."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from sp_common.backend import Backend
from sp_common.debug import call_record, debug_enabled
from sp_common.groups import active_group, active_group_traceable, guard_identity
from sp_common.shapes import DtypeInfo
from sp_common.strict import strict_enabled, strict_enabled_traceable, strict_error

from . import autograd, collectives, ring
from .attention import attention as local_attention


def default_group() -> dist.ProcessGroup | None:
    """The default process group when one is initialized, else None (world size 1)."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def process_group(func: str, group: Any) -> dist.ProcessGroup:
    """The ``ProcessGroup`` an op of ``func`` runs on for an explicitly named ``group``: a
    ``ProcessGroup`` itself, or the group of a 1-D ``DeviceMesh`` (such as ``mesh["sp"]``).

    Raises:
        TypeError: a DeviceMesh with more than one dim, or not a group at all.
        ValueError: a group this rank is not a member of.
    """
    if isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, DeviceMesh):
        return _mesh_group(func, group)
    if type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER:
        where = f"global rank {dist.get_rank()} of {dist.get_world_size()}"
        raise ValueError(
            f"{func}: group is GroupMember.NON_GROUP_MEMBER ({group}), which "
            "dist.new_group(ranks) returns on every rank outside `ranks`: this rank "
            f"({where if dist.is_initialized() else 'no process group'}) is not a member of "
            "that group, so its ranks are not known here. "
            "Pass the group that contains this rank (every rank creates every group and keeps "
            "its own, e.g. groups[rank // sp_size]) or a 1-D DeviceMesh such as mesh['sp']."
        )
    raise TypeError(
        f"{func}: group must be a torch.distributed.ProcessGroup or a 1-D DeviceMesh for a torch "
        f"tensor, got {group!r} of type {type(group).__name__}; pass dist.new_group(...) or "
        "mesh['sp'], or leave it out to use the default process group."
    )


# The (ring, ulysses) groups of each group a 2-D DeviceMesh resolved to. A process group that a
# 2-D mesh flattened to carries that mesh's axes from then on (when the mesh spans every rank
# that may be the default group: strategy="usp" over the default group then uses them).
_TWO_AXES: dict[dist.ProcessGroup, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


@torch.compiler.assume_constant_result
def _row_major(mesh: DeviceMesh) -> bool:
    """Whether the mesh lists its ranks in increasing row-major order (a constant of the mesh;
    torch.compile reads it once, at trace time)."""
    ranks = mesh.mesh.flatten().tolist()
    return bool(ranks == sorted(ranks))


def _mesh_group(func: str, mesh: DeviceMesh) -> dist.ProcessGroup:
    """The ProcessGroup of a 1-D ``mesh`` that holds this rank; for a 2-D mesh (ring dim
    first, for USP) the group of all its ranks in row-major order (rank = ring_index * U +
    ulysses_index), its two dims' groups recorded for ``two_axes``."""
    if mesh.ndim not in (1, 2):
        names = mesh.mesh_dim_names
        one = repr(names[-1]) if names else "name"
        raise TypeError(
            f"{func}: group is a {mesh.ndim}-D DeviceMesh of shape {tuple(mesh.shape)} with dims "
            f"{names}; an SP group is one mesh dim, or two (ring, ulysses) for USP: pass a 1-D "
            f"mesh such as mesh[{one}] or a 2-D one."
        )
    if mesh.get_coordinate() is None:
        raise ValueError(
            f"{func}: this rank (global rank {dist.get_rank()}) is not a member of group "
            f"{mesh!r}, a {mesh.ndim}-D DeviceMesh of ranks {mesh.mesh.tolist()}; pass the mesh "
            "that contains this rank (init_device_mesh(...)[dim] gives each rank its own)."
        )
    if mesh.ndim == 1:
        return mesh.get_group()
    if not _row_major(mesh):
        # A process group numbers its ranks in global order: only then are the flattened
        # group's ranks ring_index * U + ulysses_index, with each dim's group ranked alike.
        raise ValueError(
            f"{func}: group is a 2-D DeviceMesh whose ranks {mesh.mesh.tolist()} are not in "
            "increasing row-major order; its flattened group would number them otherwise than "
            "ring_index * U + ulysses_index. Build it with init_device_mesh(device, (R, U), "
            "mesh_dim_names=('ring', 'ulysses')) or list the ranks in increasing order."
        )
    flat = mesh._flatten().get_group()
    if flat not in _TWO_AXES:
        _TWO_AXES[flat] = (mesh.get_group(0), mesh.get_group(1))
    return flat


_DTYPE_INFO: dict[torch.dtype, DtypeInfo] = {}


def _dtype_info(dt: torch.dtype) -> DtypeInfo:
    name = str(dt)
    if dt == torch.bool:
        return DtypeInfo("bool", 0, 1, name, has_inf=False, has_nan=False)
    if dt.is_complex or dt.is_floating_point:
        finfo = torch.finfo(dt)  # of each part for complex dtypes (complex32: float16)
        # finfo does not say whether infinities exist; the float8 names do: in e<E>m<M><flags>
        # the flag "f" means finite (no inf), as in e4m3fn, e4m3fnuz, e5m2fnuz, e8m0fnu.
        # Every torch float dtype has a NaN. (Read from the name: Dynamo can trace it.)
        flags = name.partition("_e")[2].lstrip("0123456789m")
        return DtypeInfo(
            "complex" if dt.is_complex else "float",
            finfo.min,
            finfo.max,
            name,
            has_inf="f" not in flags,
            has_nan=True,
        )
    iinfo = torch.iinfo(dt)
    return DtypeInfo("int", iinfo.min, iinfo.max, name, has_inf=False, has_nan=False)


class TorchBackend(Backend["dist.ProcessGroup | None"]):
    framework = "torch"

    def is_tensor(self, x: object) -> bool:
        return isinstance(x, torch.Tensor)

    def shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape)

    def dtype_info(self, x: torch.Tensor) -> DtypeInfo:
        if torch.compiler.is_compiling():  # Dynamo traces the computation, not the cache
            return _dtype_info(x.dtype)
        info = _DTYPE_INFO.get(x.dtype)
        if info is None:
            info = _DTYPE_INFO[x.dtype] = _dtype_info(x.dtype)
        return info

    def resolve_group(self, func: str, group: Any) -> dist.ProcessGroup | None:
        compiling = torch.compiler.is_compiling()
        if group is not None:
            # Dynamo guards a DeviceMesh by value (a fresh, equal mesh["sp"] reuses the graph)
            # but not a ProcessGroup, which needs the id() guard.
            if compiling and not isinstance(group, DeviceMesh):
                group = guard_identity(group)
            return process_group(func, group)
        group = active_group_traceable("torch") if compiling else active_group("torch")
        if group is not None:
            return group  # sp_group turned it into a checked ProcessGroup on entry
        default = default_group()
        if default is None and (strict_enabled_traceable() if compiling else strict_enabled()):
            raise strict_error(
                func,
                "no torch.distributed process group is initialized",
                "call dist.init_process_group(...) first or pass group=",
            )
        return default

    def world_size(self, group: dist.ProcessGroup | None) -> int:
        return 1 if group is None else dist.get_world_size(group)

    def rank(self, group: dist.ProcessGroup | None) -> int:
        return 0 if group is None else dist.get_rank(group)

    # The differentiable primitives are the autograd functions themselves.
    shard = staticmethod(autograd.shard)
    check_shard_rule = staticmethod(autograd.check_shard_rule)
    gather = staticmethod(autograd.gather)
    reduce_scatter = staticmethod(autograd.reduce_scatter)
    all_to_all = staticmethod(autograd.all_to_all)
    shard_padded = staticmethod(autograd.shard_padded)

    def valid_mask(self, like: torch.Tensor, total: int, valid: int) -> torch.Tensor:
        return torch.arange(total, device=like.device) < valid

    attention = staticmethod(local_attention)

    def ring_attention(
        self,
        spec: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        return ring.ring_attention(self, spec, q, k, v, key_mask)

    def two_axes(
        self, func: str, group: dist.ProcessGroup | None
    ) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        axes = _TWO_AXES.get(group) if group is not None else None
        if axes is None:
            raise ValueError(
                f"{func}: strategy='usp' needs a group of two axes, a 2-D DeviceMesh with the "
                f"ring dim first, got a group of one axis ({self.world_size(group)} ranks); "
                "pass e.g. group="
                "init_device_mesh('cuda', (R, U), mesh_dim_names=('ring', 'ulysses')) (to "
                "sp_shard and sp_gather too, or in sp_group(...))."
            )
        return axes

    ring_shift = staticmethod(collectives.ring_shift)

    def block_forward(
        self,
        q5: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        allowed: torch.Tensor | None,
        scale: float,
        causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ring.block_forward(self, q5, k, v, allowed, scale, causal)

    def block_grads(
        self,
        q5: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        allowed: torch.Tensor | None,
        scale: float,
        lse: torch.Tensor,
        do5: torch.Tensor,
        delta: torch.Tensor,
        o5: torch.Tensor | None = None,
        causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ring.block_grads(self, q5, k, v, allowed, scale, lse, do5, delta, o5, causal)

    def einsum(self, spec: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum(spec, a, b)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)

    def logsumexp(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.logsumexp(x, dim)

    def logaddexp(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(a, b)

    def where(self, cond: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        return torch.where(cond, a, b)

    def concat(self, xs: list[torch.Tensor], dim: int) -> torch.Tensor:
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim)

    def zeros_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def repeat_interleave(self, x: torch.Tensor, dim: int, repeats: int) -> torch.Tensor:
        return x.repeat_interleave(repeats, dim)

    def take(self, x: torch.Tensor, dim: int, indices: tuple[int, ...]) -> torch.Tensor:
        return x.index_select(dim, torch.tensor(indices, device=x.device))

    def arange(self, like: torch.Tensor, length: int) -> torch.Tensor:
        return torch.arange(length, device=like.device)

    def to_float32(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def cast_like(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype)

    def reshape(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(shape)

    def logical_and(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a & b

    def pad_end(self, x: torch.Tensor, dim: int, pad: int, value: Any) -> torch.Tensor:
        fill_shape = list(x.shape)
        fill_shape[dim] = pad
        return torch.cat([x, x.new_full(fill_shape, value)], dim=dim)

    def truncate(self, x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        return x.narrow(dim, 0, length).contiguous()

    def is_plan_target(self, target: object, mesh: object) -> bool:
        return isinstance(target, torch.nn.Module)

    def apply_plan(self, target: Any, plan: Any, mesh: Any, options: Mapping[str, Any]) -> Any:
        if mesh is not None or options:
            raise TypeError(
                "apply_plan: a torch module takes no mesh or options; the SP group comes "
                "from sp_group(...) or the default process group."
            )
        from .plan import apply_plan

        return apply_plan(target, plan)

    def all_reduce_grads(self, model: Any, group: Any) -> None:
        from .plan import all_reduce_grads

        all_reduce_grads(model, group)

    def check_consistent(
        self,
        func: str,
        group: Any,
        tensors: Mapping[str, object],
        values: Mapping[str, object],
        failure: Exception | None = None,
    ) -> None:
        # Skipped while compiling: the check reads its verdict back to Python (and Dynamo
        # cannot trace the ContextVar read of debug_enabled, so it must come second).
        if torch.compiler.is_compiling() or not debug_enabled():
            return
        device = next(t.device for t in tensors.values() if isinstance(t, torch.Tensor))
        record = call_record(self, tensors, values, failure)
        collectives.check_consistent(func, record, device, group)
