"""Ring attention's gradient on torch: an autograd function whose backward is the explicit
ring of ``sp_common.attention.ring`` (no autograd graph through the steps, so nothing of the
forward's blocks is kept)."""

from __future__ import annotations

from typing import Any

import torch

from sp_common.attention import blocks
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


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_NEG_INF = float("-inf")


def _fused(q5: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's fused CPU flash kernel takes the block: float32/float64 on the CPU with
    equal query and value head sizes (else the generic tiles of ``blocks``)."""
    return (
        q5.device.type == "cpu"
        and q5.dtype in (torch.float32, torch.float64)
        and q5.shape[-1] == v.shape[-1]
    )


def _heads_first(
    q5: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel's layouts: q ``[B, Hq, sq, D]``, k and v ``[B, Hq, sk, D]`` (KV heads
    repeated per group), the mask additive ``[B | 1, 1, sq | 1, sk]`` in q's dtype."""
    batch, sq, hkv, groups, d = q5.shape
    q = q5.reshape(batch, sq, hkv * groups, d).transpose(1, 2)
    if groups > 1:
        k, v = (t.repeat_interleave(groups, 2) for t in (k, v))
    mask = None
    if allowed is not None:
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~allowed, _NEG_INF)[:, None]
    return q, k.transpose(1, 2), v.transpose(1, 2), mask


def block_forward(
    backend: Any,
    q5: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sp_common.attention.blocks.block_forward`` on torch's fused CPU flash kernel (the
    kernel SDPA runs, which returns the log-sum-exp), where it applies; ``causal`` (queries and
    keys at the same positions) without a mask is the kernel's own ``is_causal``."""
    if not _fused(q5, v):
        allowed = blocks.with_causal(backend, q5, k, allowed, causal)
        return blocks.block_forward(backend, q5, k, v, allowed, scale)
    is_causal = causal and allowed is None
    if not is_causal:
        allowed = blocks.with_causal(backend, q5, k, allowed, causal)
    q, kh, vh, mask = _heads_first(q5, k, v, allowed)
    out, lse = _FLASH(q, kh, vh, 0.0, is_causal, attn_mask=mask, scale=scale)
    if allowed is not None:  # the kernel gives a query with no key lse 0: it must not count
        dead = ~allowed.any(-1)[:, None]  # [B | 1, 1, sq | 1]
        lse = lse.masked_fill(dead, _NEG_INF)
        out = out.masked_fill(dead[..., None], 0.0)
    batch, sq, hkv, groups, _ = q5.shape
    o5 = out.transpose(1, 2).reshape(batch, sq, hkv, groups, -1)
    return o5, lse.transpose(1, 2).reshape(batch, sq, hkv, groups)


def block_grads(
    backend: Any,
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
    """``sp_common.attention.blocks.block_grads`` on the fused kernel's backward, given the
    final output ``o5`` and ``lse`` of these queries (it computes ``delta`` from them);
    ``causal`` as :func:`block_forward`'s."""
    is_causal = causal and allowed is None and o5 is not None and _fused(q5, v)
    if not is_causal:
        allowed = blocks.with_causal(backend, q5, k, allowed, causal)
    if o5 is None or not _fused(q5, v):
        return blocks.block_grads(backend, q5, k, v, allowed, scale, lse, do5, delta)
    batch, sq, hkv, groups, d = q5.shape
    q, kh, vh, mask = _heads_first(q5, k, v, allowed)

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, sq, hkv * groups, -1).transpose(1, 2)

    base = torch.where(lse == _NEG_INF, 0.0, lse).reshape(batch, sq, -1).transpose(1, 2)
    dq, dk, dv = _FLASH_BACKWARD(
        heads_first(do5),
        q,
        kh,
        vh,
        heads_first(o5),
        base,
        0.0,
        is_causal,
        attn_mask=mask,
        scale=scale,
    )
    sk = k.shape[1]

    def per_kv_head(t: torch.Tensor) -> torch.Tensor:  # [B, Hq, sk, *] -> [B, sk, Hkv, *]
        t = t.transpose(1, 2)
        return t.reshape(batch, sk, hkv, groups, -1).sum(3) if groups > 1 else t

    dq5 = dq.transpose(1, 2).reshape(batch, sq, hkv, groups, d)
    return dq5, per_kv_head(dk), per_kv_head(dv)
