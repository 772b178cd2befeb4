"""The local attention kernel of the torch backend: ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_mask: torch.Tensor | None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """See ``sp_common.backend.Backend.attention``. One SDPA call on ``[B, H, S, D]`` views:
    grouped heads through ``enable_gqa``; causal alone through ``is_causal`` (the fused kernels
    take it), with a key mask as one bool ``[B | 1, 1, Sq, Sk]`` mask. SDPA gives fully masked
    queries zeros and zero gradients (checked by the tests). Half types on the CPU run in
    float32 (one rounding of the output and of each gradient)."""
    if q.device.type == "cpu" and q.dtype in _HALF:
        # torch's fused CPU kernels round the half-precision backward too early (dK 0.13 off in
        # bfloat16 where float32 math is 2e-3 off): compute in float32, round once at the end.
        out = attention(
            q.float(),
            k.float(),
            v.float(),
            scale=scale,
            causal=causal,
            key_mask=key_mask,
            q_positions=q_positions,
            k_positions=k_positions,
        )
        return out.to(q.dtype)
    sq, sk = q.shape[1], k.shape[1]
    aligned = q_positions is None and k_positions is None and sq == sk
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]
        if causal:
            mask = mask & _causal(sq, sk, q_positions, k_positions, q.device)
    elif causal and not aligned:
        mask = _causal(sq, sk, q_positions, k_positions, q.device)
    # A Python bool, never a SymBool: SDPA takes no symbolic enable_gqa under dynamic shapes.
    grouped = False
    if q.shape[2] != k.shape[2]:
        grouped = True
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=grouped,
    )
    return out.transpose(1, 2)


def _causal(
    sq: int,
    sk: int,
    q_positions: torch.Tensor | None,
    k_positions: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """``[Sq, Sk]``: a query attends the keys at positions up to its own (default positions:
    ``0 .. Sq-1`` and ``0 .. Sk-1``)."""
    q_pos = torch.arange(sq, device=device) if q_positions is None else q_positions
    k_pos = torch.arange(sk, device=device) if k_positions is None else k_positions
    return k_pos[None, :] <= q_pos[:, None]
