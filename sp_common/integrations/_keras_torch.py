"""The torch side of ``sp_common.integrations.keras`` (imported only under ``KERAS_BACKEND=torch``):
the cotangent scaling of ``SPShard`` / ``SPGather``, the check that every rank was given the same
input, and ``sync_gradients``' averaging at the end of each backward pass."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from ..api import resolve
from ..plan import PlanError

# The latest backward passes (graph task ids) that ran a scale node of SPShard/SPGather; not
# thread-local: the autograd engine may run a node on a device thread of its own.
_THROUGH: deque[int] = deque(maxlen=64)


class _ScaleGrad(torch.autograd.Function):
    """Forward: ``x``. Backward: the cotangent times ``multiply / divide``, and a note that this
    backward pass went through an SP layer (what :func:`sync_gradients` checks)."""

    @staticmethod
    def forward(x: torch.Tensor, multiply: int, divide: int) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.multiply, ctx.divide = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:
        _THROUGH.append(torch._C._current_graph_task_id())
        if ctx.multiply != 1:
            grad = grad * ctx.multiply
        if ctx.divide != 1:
            grad = grad / ctx.divide
        return grad, None, None


def scale_grad(x: torch.Tensor, multiply: int, divide: int) -> torch.Tensor:
    """``x`` itself, whose cotangent is multiplied by ``multiply / divide`` (``x`` unchanged
    where nothing differentiates it)."""
    if not x.requires_grad or not torch.is_grad_enabled():
        return x
    return _ScaleGrad.apply(x, multiply, divide)  # type: ignore[no-any-return]


def check_replicated(layer: str, x: torch.Tensor, group: Any) -> None:
    """Raise ValueError on every rank unless every rank of ``group`` passed the same ``x``: its
    float64 sum over the last dim, then the plain and the position-weighted sums of those
    (batches in another order differ), compared by one all-reduce of two numbers. Memory: one
    float64 per row of ``x``, not a copy of it; NaN and infinite rows compare as equal."""
    if torch.compiler.is_compiling():
        return
    resolved = resolve(layer, x, group)
    if resolved.world_size == 1:
        return
    rows = x.detach().reshape(-1, x.shape[-1]).sum(-1, dtype=torch.float64)
    rows = torch.nan_to_num(rows, nan=0.5, posinf=1.5, neginf=-1.5)
    weights = torch.linspace(1.0, 2.0, rows.numel(), dtype=torch.float64, device=rows.device)
    sums = torch.stack([rows.sum(), (rows * weights).sum()])
    sums = torch.nan_to_num(sums, nan=0.5)  # inf - inf from rows of opposite overflow
    both = torch.cat([sums, -sums])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=resolved.group)
    if not torch.equal(both[:2], -both[2:]):
        raise ValueError(
            f"{layer} (sp_common.integrations.keras): the SP ranks were given different inputs "
            f"of shape {tuple(x.shape)}; every rank of a sequence-parallel group must see the "
            "same batch (model.fit(..., shuffle=False), or keras.utils.set_random_seed with the "
            "same seed on every rank; a data-parallel sampler must give all SP ranks of a "
            "group the same samples). check_replicated=False skips this check."
        )


class GradientSync:
    """What :func:`sync_gradients` put on a model's trainable weights; ``remove()`` takes it off."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def sync_gradients(model: Any, group: Any) -> GradientSync:
    """See ``sp_common.integrations.keras.sync_gradients``."""
    weights = [v.value for v in model.trainable_variables]
    if not weights:
        raise ValueError(
            f"sync_gradients: {type(model).__name__} has no trainable weights yet; build the "
            "model (call it once, or keras.Model(inputs, outputs)) before syncing."
        )
    pending: dict[int, list[torch.Tensor]] = {}  # backward pass -> weights it gave a gradient

    def finish(task: int) -> None:
        done = pending.pop(task)
        if task not in _THROUGH:
            raise PlanError(
                "sync_gradients: this backward pass went through no SPShard or SPGather layer, "
                "so its gradients do not follow the rule that averaging over the SP ranks makes "
                "whole; shard the sequence with sp_common.integrations.keras.SPShard and gather "
                "it with SPGather, or sum the gradient terms yourself."
            )
        resolved = resolve("sync_gradients", done[0], group)
        if resolved.world_size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for weight in done:
            if weight.grad is not None:
                by_dtype.setdefault(weight.grad.dtype, []).append(weight.grad)
        for grads in by_dtype.values():  # one all-reduce per gradient dtype
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=resolved.group)
            flat.div_(resolved.world_size)
            for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                grad.copy_(mean.view_as(grad))

    def hook(weight: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task not in pending:
            pending[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(lambda: finish(task))
        pending[task].append(weight)

    return GradientSync([w.register_post_accumulate_grad_hook(hook) for w in weights])
