"""Ring attention's gradient on torch: an autograd function whose backward is the explicit
ring of ``sp_common.attention.ring`` (no autograd graph through the steps, so nothing of the
forward's blocks is kept)."""

from __future__ import annotations

from typing import Any

import torch

from sp_common.attention.ring import RingSpec, ring_backward, ring_forward


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(
        backend: Any,
        spec: RingSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ring_forward(backend, spec, q, k, v, key_mask)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        backend, spec, q, k, v, key_mask = inputs
        _, o5, lse = output
        ctx.backend, ctx.spec = backend, spec
        ctx.save_for_backward(q, k, v, key_mask, o5, lse)
        ctx.mark_non_differentiable(o5, lse)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, *args: Any) -> Any:
        raise RuntimeError(
            "sp_attention(strategy='ring'): torch.func.vmap over ring attention is not "
            "supported; use strategy='ulysses' or strategy='allgather_kv' under vmap, or fold "
            "the vmapped dim into the batch dim B."
        )

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        q, k, v, key_mask, o5, lse = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = ring_backward(ctx.backend, ctx.spec, q, k, v, key_mask, o5, lse, dout)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must not be constants
            dq, dk, dv = _Once.apply(q, k, v, dq, dk, dv)
        return None, None, dq, dk, dv, None


class _Once(torch.autograd.Function):
    """The identity on ring attention's gradients built with grad mode on (``create_graph=True``,
    ``torch.func.grad``), whose own
    backward raises: the ring's backward is not differentiable, and without this its
    gradients would enter a second derivative as constants (torch's ``once_differentiable``
    checks only the incoming gradient, which a loss's ``backward`` does not make require
    grad, so it would let that wrong second derivative through)."""

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *grads: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        # q, k and v (whichever a second derivative differentiates) make the outputs part of
        # its graph, at whatever level of torch.func transforms the backward runs.
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *_: Any) -> tuple[torch.Tensor, ...]:
        raise RuntimeError(
            "sp_attention(strategy='ring'): differentiable once; a second derivative "
            "(create_graph=True, grad of grad, Hessian-vector products) needs "
            "strategy='ulysses' or strategy='allgather_kv'."
        )


def ring_attention(
    backend: Any,
    spec: RingSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """See ``sp_common.backend.Backend.ring_attention``."""
    out, _, _ = _Ring.apply(backend, spec, q, k, v, key_mask)
    return out  # type: ignore[no-any-return]
