"""Ring attention's gradient on torch: an autograd function whose backward is the explicit
ring of ``sp_common.attention.ring`` (no autograd graph through the steps, so nothing of the
forward's blocks is kept)."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

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
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        q, k, v, key_mask, o5, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.backend, ctx.spec, q, k, v, key_mask, o5, lse, dout)
        return None, None, dq, dk, dv, None


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
