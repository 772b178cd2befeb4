"""The torch backend: tensor facts, group resolution and the primitive set for sp_common."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sp_common.backend import Backend
from sp_common.debug import debug_enabled
from sp_common.grad_rules import GatherGradRule, ShardGradRule
from sp_common.groups import active_group, active_group_traceable, guard_identity
from sp_common.shapes import DtypeInfo

from . import autograd, collectives


def default_group() -> dist.ProcessGroup | None:
    """The default process group when one is initialized, else None (world size 1)."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


class TorchBackend(Backend):
    framework = "torch"

    def is_tensor(self, x: object) -> bool:
        return isinstance(x, torch.Tensor)

    def shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape)

    def dtype_info(self, x: torch.Tensor) -> DtypeInfo:
        dt, name = x.dtype, str(x.dtype)
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

    def resolve_group(self, func: str, group: Any) -> dist.ProcessGroup | None:
        compiling = torch.compiler.is_compiling()
        if group is None:
            group = active_group_traceable("torch") if compiling else active_group("torch")
            if group is None:
                return default_group()
        elif compiling:
            group = guard_identity(group)
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"{func}: group must be a torch.distributed.ProcessGroup for a torch tensor, got "
                f"{group!r} of type {type(group).__name__}; pass dist.new_group(...) or leave it "
                "out to use the default process group."
            )
        return group

    def world_size(self, group: dist.ProcessGroup | None) -> int:
        return 1 if group is None else dist.get_world_size(group)

    def rank(self, group: dist.ProcessGroup | None) -> int:
        return 0 if group is None else dist.get_rank(group)

    def shard(
        self, x: torch.Tensor, dim: int, group: Any, grad_rule: ShardGradRule
    ) -> torch.Tensor:
        return autograd.shard(x, dim, group, grad_rule)

    def check_shard_rule(
        self, func: str, x: torch.Tensor, group: Any, grad_rule: ShardGradRule
    ) -> None:
        autograd.check_shard_rule(func, x, group, grad_rule)

    def gather(
        self, x: torch.Tensor, dim: int, group: Any, grad_rule: GatherGradRule
    ) -> torch.Tensor:
        return autograd.gather(x, dim, group, grad_rule)

    def reduce_scatter(self, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        return autograd.reduce_scatter(x, dim, group)

    def all_to_all(
        self, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any
    ) -> torch.Tensor:
        return autograd.all_to_all(x, scatter_dim, gather_dim, group)

    def valid_mask(self, like: torch.Tensor, total: int, valid: int) -> torch.Tensor:
        return torch.arange(total, device=like.device) < valid

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
        scale: float | None,
    ) -> torch.Tensor:
        mask = None if key_mask is None else key_mask.view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
        )
        return out.transpose(1, 2)

    def pad_end(self, x: torch.Tensor, dim: int, pad: int, value: Any) -> torch.Tensor:
        fill_shape = list(x.shape)
        fill_shape[dim] = pad
        return torch.cat([x, x.new_full(fill_shape, value)], dim=dim)

    def prefix(self, x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        return x.narrow(dim, 0, length).contiguous()

    def check_consistent(self, func: str, x: torch.Tensor, dim: int, group: Any) -> None:
        # Skipped while compiling: the check reads its verdict back to Python.
        if not torch.compiler.is_compiling() and debug_enabled():
            collectives.check_consistent(func, x, dim, group)
