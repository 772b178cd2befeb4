"""Autograd pairs: each forward calls a collective helper, each backward its conjugate."""

from __future__ import annotations

from typing import Any

import torch

from .collectives import (
    ProcessGroup,
    all_gather_along,
    all_to_all_along,
    local_chunk,
    reduce_scatter_along,
)


class _Shard(torch.autograd.Function):
    """Forward: this rank's chunk. Backward: gather of the gradient chunks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return local_chunk(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return all_gather_along(grad, ctx.dim, ctx.group), None, None


class _GatherSliceGrad(torch.autograd.Function):
    """Forward: all-gather. Backward: this rank's slice (the computation after is replicated)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return all_gather_along(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return local_chunk(grad, ctx.dim, ctx.group), None, None


class _GatherReduceScatterGrad(torch.autograd.Function):
    """Forward: all-gather. Backward: reduce-scatter (ranks computed different loss terms)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return all_gather_along(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        func = "sp_gather(grad_rule='reduce_scatter') backward"
        return reduce_scatter_along(grad, ctx.dim, ctx.group, func), None, None


class _ReduceScatter(torch.autograd.Function):
    """Forward: sum over ranks, keep this rank's chunk. Backward: gather of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return reduce_scatter_along(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return all_gather_along(grad, ctx.dim, ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all (scatter_dim -> gather_dim). Backward: the same with dims swapped."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup | None
    ) -> torch.Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all_along(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        scatter_dim, gather_dim = ctx.dims
        return all_to_all_along(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def shard(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    if not (x.requires_grad and torch.is_grad_enabled()):
        return local_chunk(x, dim, group)  # no graph to record: skip the Function's ~4 us
    return _Shard.apply(x, dim, group)


def gather(x: torch.Tensor, dim: int, group: ProcessGroup | None, grad_rule: str) -> torch.Tensor:
    fn = _GatherSliceGrad if grad_rule == "slice" else _GatherReduceScatterGrad
    return fn.apply(x, dim, group)


def reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    return _ReduceScatter.apply(x, dim, group)


def all_to_all(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup | None
) -> torch.Tensor:
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)
