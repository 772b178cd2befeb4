"""torch rank tasks of test_layouts.py."""

from __future__ import annotations

from typing import Any

import numpy as np

import sp_common as sp
from sp_common.testing import to_numpy, to_torch


def zigzag_round_trip(x: np.ndarray, dim: int) -> dict[str, Any]:
    """This rank's zigzag shard (padded when 2N does not divide) and the gather of it."""
    t = to_torch(x)
    shard, pad = sp.sp_shard_with_padding(t, dim, layout="zigzag")
    whole = sp.sp_gather(shard, dim, pad_size=pad, layout="zigzag")
    plain = None
    if x.shape[dim] % (2 * sp.sp_world_size(t)) == 0:
        plain = to_numpy(sp.sp_shard(t, dim, layout="zigzag"))
    return {"shard": to_numpy(shard), "pad": pad, "whole": to_numpy(whole), "plain": plain}


def zigzag_gradient(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The gradient of ``sum(gather(shard(x) ** 3) * w)`` through zigzag shards (padded)."""
    t = to_torch(x).requires_grad_()
    shard, pad = sp.sp_shard_with_padding(t, 1, layout="zigzag")
    out = sp.sp_gather(shard**3, 1, pad_size=pad, layout="zigzag")
    (out * to_torch(w)).sum().backward()
    return to_numpy(t.grad)


def planned_zigzag(x: np.ndarray, attention_layout: str) -> dict[str, Any]:
    """A torch module planned with ShardInput(layout='zigzag', pad=True): its causal attention
    (called with ``attention_layout``) gathered back."""
    import torch

    class Block(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq_len = sp.planned_seq_len(default=x.shape[1])
            return sp.sp_attention(x, x, x, causal=True, seq_len=seq_len, layout=attention_layout)

    plan = sp.SPPlan({"": (sp.ShardInput("x", 1, pad=True, layout="zigzag"), sp.GatherOutput(1))})
    model = Block()
    with sp.apply_plan(model, plan):
        try:
            return {"got": to_numpy(model(to_torch(x)))}
        except ValueError as e:
            return {"error": str(e)}
