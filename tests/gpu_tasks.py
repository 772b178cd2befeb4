"""Rank tasks for tests/test_gpu.py: the suite's data-movement, gradient and Ulysses checks with
the tensors on ``device``.

Run them on a ``RankPool(n, "cuda")`` (NCCL, rank r on GPU r, so ``"cuda"`` is this rank's own
GPU); ``"cpu"`` on a gloo pool runs the same checks where no GPU is. Arguments and results are
numpy arrays and plain Python values, as in tests/torch_tasks.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sp_common import (
    sp_gather,
    sp_shard,
    sp_shard_with_padding,
    sp_ulysses_attention,
    sp_unpad,
    sp_world_size,
)
from sp_common.testing.data import to_numpy, to_torch


def data_movement(cases: list[tuple[np.ndarray, int, Any]], device: str) -> list[dict[str, Any]]:
    """Shard, gather, padded shard, gather with ``pad_size`` and ``sp_unpad`` of each case, in
    the layout of ``torch_tasks.data_movement``; ``"devices"``: the device types of the results."""
    out = []
    for x, dim, pad_value in cases:
        t = to_torch(x, device)
        results: dict[str, torch.Tensor] = {}
        if x.shape[dim] % sp_world_size(t) == 0:
            results["shard"] = sp_shard(t, dim)
            results["gather"] = sp_gather(results["shard"], dim)
        padded, pad = sp_shard_with_padding(t, dim, pad_value)
        results["padded_shard"] = padded
        results["gather_unpad"] = sp_gather(padded, dim, pad_size=pad)
        results["unpad"] = sp_unpad(sp_gather(padded, dim), dim, pad)
        r: dict[str, Any] = {k: to_numpy(v) for k, v in results.items()}
        r["pad"], r["devices"] = pad, {v.device.type for v in results.values()}
        out.append(r)
    return out


def gradients(
    x: np.ndarray, dim: int, w: np.ndarray, padded: bool, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """The gradient of a replicated loss through shard and gather, and the single-device
    gradient of the same loss on this rank's device."""
    t = to_torch(x, device).requires_grad_()
    if padded:
        s, p = sp_shard_with_padding(t, dim)
    else:
        s, p = sp_shard(t, dim), 0
    weights = to_torch(w, device)
    (sp_gather(s * 3, dim, pad_size=p) * weights).sum().backward()
    single = to_torch(x, device).requires_grad_()
    (single * 3 * weights).sum().backward()
    assert t.grad is not None and single.grad is not None
    return to_numpy(t.grad), to_numpy(single.grad)


def _full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` softmax attention over the whole sequence on one device."""
    layout = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return F.scaled_dot_product_attention(*layout).transpose(1, 2)


def ulysses(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, w: np.ndarray, device: str
) -> dict[str, Any]:
    """Ulysses attention on the sequence-sharded (padded when N does not divide S) q, k, v
    against full attention on this rank's device: outputs and the gradients of q, k, v."""
    seq_len = q.shape[1]
    sharded = [to_torch(a, device).requires_grad_() for a in (q, k, v)]
    shards = [sp_shard_with_padding(t, 1) for t in sharded]
    out = sp_ulysses_attention(*(s for s, _ in shards), seq_len=seq_len)
    out = sp_gather(out, 1, pad_size=shards[0][1])
    (out * to_torch(w, device)).sum().backward()
    single = [to_torch(a, device).requires_grad_() for a in (q, k, v)]
    expected = _full_attention(*single)
    (expected * to_torch(w, device)).sum().backward()
    return {
        "out": to_numpy(out),
        "expected": to_numpy(expected),
        "grads": [to_numpy(t.grad) for t in sharded if t.grad is not None],
        "expected_grads": [to_numpy(t.grad) for t in single if t.grad is not None],
        "device": out.device.type,
    }
