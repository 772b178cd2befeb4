"""Autograd pairs: each forward calls a collective helper, each backward its conjugate *Function*
(not the raw helper), so the backward is itself differentiable: ``autograd.grad(...,
create_graph=True)`` records it, and second-order gradients through a collective are exact.

Every Function uses ``setup_context`` (so ``torch.func.grad`` / ``jacrev`` work) and has a
``vmap`` rule that moves the vmapped dim to the front and shifts ``dim`` past it (each rank vmaps
the same batch, so the collective moves every batch element at once).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sp_common.grad_rules import GatherGradRule, ShardGradRule
from sp_common.shapes import padded_chunk

from .collectives import (
    ProcessGroup,
    all_gather_along,
    all_to_all_along,
    local_chunk,
    reduce_scatter_along,
)


def _front(x: torch.Tensor, bdim: int | None, *dims: int) -> tuple[torch.Tensor, list[int]]:
    """For a vmap rule: ``x`` with its batch dim first (a new size-1 one when ``bdim`` is
    None: then every batch element holds the same tensor) and ``dims`` shifted past it."""
    x = x.unsqueeze(0) if bdim is None else x.movedim(bdim, 0)
    return x, [d + 1 for d in dims]


class _Shard(torch.autograd.Function):
    """Forward: this rank's chunk. Backward: gather of the gradient chunks (``"gather"``: the
    input is replicated and every rank computes the same loss)."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
        return local_chunk(x, dim, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.dim, ctx.group = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _GatherSliceGrad.apply(grad, ctx.dim, ctx.group), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, dim: int, group: Any) -> tuple:
        x, (d,) = _front(x, in_dims[0], dim)
        return _Shard.apply(x, d, group), 0


class _ShardLocalGrad(torch.autograd.Function):
    """Forward: this rank's chunk. Backward: the gradient chunk in place, zeros elsewhere
    (``"local"``: each rank's gradient is its own term; their sum is the gather)."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
        return local_chunk(x, dim, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        import torch.distributed as dist

        x, dim, group = inputs
        ctx.dim, ctx.group = dim, group
        chunk = x.shape[dim] // dist.get_world_size(group)
        ctx.before = dist.get_rank(group) * chunk
        ctx.after = x.shape[dim] - ctx.before - chunk

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # F.pad pads the last dims first: ``dim`` is padded by pair number ``ndim - 1 - dim``.
        pairs = [0, 0] * (grad.dim() - ctx.dim)
        pairs[-2:] = [ctx.before, ctx.after]
        return F.pad(grad, pairs), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, dim: int, group: Any) -> tuple:
        x, (d,) = _front(x, in_dims[0], dim)
        return _ShardLocalGrad.apply(x, d, group), 0


def _padded_chunk(x: torch.Tensor, dim: int, group: Any, pad: int, value: Any) -> torch.Tensor:
    """This rank's chunk of ``x`` padded by ``pad`` along ``dim``, built alone (its real rows
    copied next to its padding): one chunk-size copy, never the whole padded tensor."""
    import torch.distributed as dist

    n, rank = dist.get_world_size(group), dist.get_rank(group)
    start, real, fill = padded_chunk(x.shape[dim], n, rank)
    piece = x.narrow(dim, start, real)
    if not fill:
        return piece.clone(memory_format=torch.contiguous_format)
    fill_shape = list(x.shape)
    fill_shape[dim] = fill
    return torch.cat([piece, x.new_full(fill_shape, value)], dim=dim)


class _ShardPadded(torch.autograd.Function):
    """Forward: this rank's padded chunk. Backward: gather of the gradient chunks, padding
    dropped (``"gather"``). The ``"local"`` rule needs no Function: the narrow and cat of
    :func:`_padded_chunk` differentiate to this rank's chunk in place, zeros elsewhere."""

    @staticmethod
    def forward(
        x: torch.Tensor, dim: int, group: ProcessGroup | None, pad: int, value: Any
    ) -> torch.Tensor:
        return _padded_chunk(x, dim, group, pad, value)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.dim, ctx.group, ctx.size = inputs[1], inputs[2], inputs[0].shape[inputs[1]]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        full = _GatherSliceGrad.apply(grad, ctx.dim, ctx.group)
        return full.narrow(ctx.dim, 0, ctx.size), None, None, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, x: torch.Tensor, dim: int, group: Any, pad: int, value: Any
    ) -> tuple:
        x, (d,) = _front(x, in_dims[0], dim)
        return _ShardPadded.apply(x, d, group, pad, value), 0


class _GatherSliceGrad(torch.autograd.Function):
    """Forward: all-gather. Backward: this rank's slice (the computation after is replicated)."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
        return all_gather_along(x, dim, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.dim, ctx.group = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _Shard.apply(grad, ctx.dim, ctx.group), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, dim: int, group: Any) -> tuple:
        x, (d,) = _front(x, in_dims[0], dim)
        return _GatherSliceGrad.apply(x, d, group), 0


class _GatherReduceScatterGrad(torch.autograd.Function):
    """Forward: all-gather. Backward: reduce-scatter (ranks computed different loss terms)."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
        return all_gather_along(x, dim, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.dim, ctx.group = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        func = "sp_gather(grad_rule='reduce_scatter') backward"
        return _ReduceScatter.apply(grad, ctx.dim, ctx.group, func), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, dim: int, group: Any) -> tuple:
        x, (d,) = _front(x, in_dims[0], dim)
        return _GatherReduceScatterGrad.apply(x, d, group), 0


class _ReduceScatter(torch.autograd.Function):
    """Forward: sum over ranks, keep this rank's chunk. Backward: gather of the gradient (whose
    own backward is the reduce-scatter again: the inputs are per-rank terms)."""

    @staticmethod
    def forward(
        x: torch.Tensor, dim: int, group: ProcessGroup | None, func: str = "sp_reduce_scatter"
    ) -> torch.Tensor:
        return reduce_scatter_along(x, dim, group, func)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.dim, ctx.group = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _GatherReduceScatterGrad.apply(grad, ctx.dim, ctx.group), None, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, x: torch.Tensor, dim: int, group: Any, func: str = ""
    ) -> tuple:
        x, (d,) = _front(x, in_dims[0], dim)
        return _ReduceScatter.apply(x, d, group, func or "sp_reduce_scatter"), 0


class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all (scatter_dim -> gather_dim). Backward: the same with dims swapped."""

    @staticmethod
    def forward(
        x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup | None
    ) -> torch.Tensor:
        return all_to_all_along(x, scatter_dim, gather_dim, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.dims, ctx.group = (inputs[1], inputs[2]), inputs[3]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        scatter_dim, gather_dim = ctx.dims
        return _AllToAll.apply(grad, gather_dim, scatter_dim, ctx.group), None, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any
    ) -> tuple:
        x, (s, g) = _front(x, in_dims[0], scatter_dim, gather_dim)
        return _AllToAll.apply(x, s, g, group), 0


def shard(
    x: torch.Tensor, dim: int, group: ProcessGroup | None, grad_rule: ShardGradRule
) -> torch.Tensor:
    if not (x.requires_grad and torch.is_grad_enabled()) and not _is_functorch_wrapped(x):
        return local_chunk(x, dim, group)  # no graph to record: skip the Function's ~4 us
    fn = _Shard if grad_rule == "gather" else _ShardLocalGrad
    return fn.apply(x, dim, group)


def shard_padded(
    x: torch.Tensor,
    dim: int,
    group: ProcessGroup | None,
    pad: int,
    value: Any,
    grad_rule: ShardGradRule,
) -> torch.Tensor:
    if grad_rule == "local" or not (
        (x.requires_grad and torch.is_grad_enabled()) or _is_functorch_wrapped(x)
    ):
        return _padded_chunk(x, dim, group, pad, value)
    return _ShardPadded.apply(x, dim, group, pad, value)


def check_shard_rule(
    func: str, x: torch.Tensor, group: ProcessGroup | None, grad_rule: ShardGradRule
) -> None:
    """torch cannot type a tensor as per-rank, but it can see the direct output of a
    reduce-scatter-rule gather (the program of ``sp_gather(..., grad_rule="reduce_scatter")``
    followed by ``sp_shard``): its gradient is per rank, and ``"gather"`` would sum it twice."""
    if grad_rule != "gather" or torch.compiler.is_compiling():
        return
    if getattr(x.grad_fn, "_forward_cls", None) is _GatherReduceScatterGrad:
        raise ValueError(
            f"{func}: the tensor comes straight from sp_gather(..., grad_rule='reduce_scatter'), "
            "so each rank computes its own term of the loss from it and its gradient is per "
            "rank; pass grad_rule='local' (the 'gather' rule would sum the terms twice)."
        )


def gather(
    x: torch.Tensor, dim: int, group: ProcessGroup | None, grad_rule: GatherGradRule
) -> torch.Tensor:
    fn = _GatherSliceGrad if grad_rule == "slice" else _GatherReduceScatterGrad
    return fn.apply(x, dim, group)


def reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    return _ReduceScatter.apply(x, dim, group)


def all_to_all(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup | None
) -> torch.Tensor:
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def _is_functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper (grad or vmap level), which must go through the
    Function so that its rules apply (never while torch.compile traces, which sees through
    the wrappers)."""
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
