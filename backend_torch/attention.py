"""The local attention kernel of the torch backend: ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_mask: torch.Tensor | None,
    q_offset: int = 0,
) -> torch.Tensor:
    """See ``sp_common.backend.Backend.attention``. One SDPA call on ``[B, H, S, D]`` views:
    grouped heads through ``enable_gqa``; causal alone through ``is_causal`` (the fused kernels
    take it), with a key mask as one bool ``[B | 1, 1, Sq, Sk]`` mask. SDPA gives fully masked
    queries zeros and zero gradients (checked by the tests)."""
    sq, sk = q.shape[1], k.shape[1]
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]
        if causal:
            mask = mask & _causal(sq, sk, q_offset, q.device)
    elif causal and (sq != sk or q_offset != 0):
        mask = _causal(sq, sk, q_offset, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _causal(sq: int, sk: int, q_offset: int, device: torch.device) -> torch.Tensor:
    """``[Sq, Sk]``: query i (at position ``q_offset + i``) attends key j <= that position."""
    positions = torch.arange(sq, device=device) + q_offset
    return torch.arange(sk, device=device)[None, :] <= positions[:, None]
