"""The float64 numpy reference of attention (``sp_common.sp_attention``'s semantics), forward
and gradients, written out by hand so that it shares nothing with the code it checks."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = ["AttentionGrads", "reference_attention", "reference_attention_grads"]


def _allowed(
    sq: int, sk: int, causal: bool, key_mask: np.ndarray | None, q_start: int
) -> np.ndarray:
    """``[B | 1, 1, 1, Sq, Sk]``: query ``q_start + i`` may attend key j."""
    allowed = np.ones((1, sk), bool) if key_mask is None else np.asarray(key_mask, bool)
    allowed = allowed.reshape(-1, 1, 1, 1, sk)
    if causal:
        allowed = allowed & (np.arange(sk)[None, :] <= np.arange(q_start, q_start + sq)[:, None])
    return allowed


def _grouped(q: np.ndarray, hkv: int) -> np.ndarray:
    """``[B, S, Hq, D] -> [B, S, Hkv, G, D]``: query head h = kv * G + g."""
    b, s, hq, d = q.shape
    return q.reshape(b, s, hkv, hq // hkv, d)


def _probabilities(
    q: np.ndarray,
    k: np.ndarray,
    causal: bool,
    key_mask: np.ndarray | None,
    scale: float | None,
    q_start: int = 0,
) -> np.ndarray:
    """``[B, Hkv, G, Sq, Sk]`` softmax weights (rows with no allowed key: zeros)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qg = _grouped(q.astype(np.float64), k.shape[2])
    scores = np.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(np.float64)) * scale
    allowed = _allowed(q.shape[1], k.shape[1], causal, key_mask, q_start)
    scores = np.where(allowed, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(axis=-1, keepdims=True)
    return np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)


def _ungrouped(x: np.ndarray) -> np.ndarray:
    """``[B, Hkv, G, Sq, Dv] -> [B, Sq, Hq, Dv]``."""
    b, hkv, g, sq, dv = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, sq, hkv * g, dv)


def reference_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    key_mask: Any = None,
    scale: float | None = None,
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """float64 softmax attention, the semantics of ``sp_attention`` on the unsharded sequence.

    Shapes: q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]``, ``key_mask``
    bool ``[B | 1, Sk]`` or ``[Sk]`` (True = attend) -> ``[B, Sq, Hq, Dv]``; query head h reads
    key/value head ``h // (Hq / Hkv)``; ``causal``: query i attends keys j <= i; a query with no
    key to attend gives zeros; ``scale`` defaults to ``1/sqrt(D)``. ``rows=(start, stop)``:
    only those query positions (in blocks, so the logits never take more than about 256 MiB).
    """
    start, stop = (0, q.shape[1]) if rows is None else rows
    mask = None if key_mask is None else np.asarray(key_mask, bool).reshape(-1, k.shape[1])
    batch, sk = k.shape[:2]
    step = max(1, (1 << 25) // (batch * q.shape[2] * sk))
    v64 = np.asarray(v, np.float64)
    out = []
    for lo in range(start, stop, step):
        hi = min(lo + step, stop)
        p = _probabilities(np.asarray(q)[:, lo:hi], np.asarray(k), causal, mask, scale, lo)
        out.append(_ungrouped(np.einsum("bhgqk,bkhd->bhgqd", p, v64)))
    return np.concatenate(out, axis=1)


class AttentionGrads(NamedTuple):
    """Gradients of ``sum(out * grad_out)`` with respect to q, k and v (float64)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray


def reference_attention_grads(
    q: Any,
    k: Any,
    v: Any,
    grad_out: Any,
    *,
    causal: bool = False,
    key_mask: Any = None,
    scale: float | None = None,
) -> AttentionGrads:
    """The gradients of :func:`reference_attention` for the output gradient ``grad_out``
    ``[B, Sq, Hq, Dv]``, by the softmax's own derivative (dS = P * (dP - rowsum(dP * P))).
    Shapes as the inputs."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = None if key_mask is None else np.asarray(key_mask, bool).reshape(-1, k.shape[1])
    hkv = k.shape[2]
    q64, k64, v64 = (np.asarray(t, np.float64) for t in (q, k, v))
    p = _probabilities(q64, k64, causal, mask, scale)
    go = _grouped(np.asarray(grad_out, np.float64), hkv)  # [B, Sq, Hkv, G, Dv]
    dv = np.einsum("bhgqk,bqhgd->bkhd", p, go)
    dp = np.einsum("bqhgd,bkhd->bhgqk", go, v64)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = np.einsum("bhgqk,bkhd->bqhgd", ds, k64) * scale
    dk = np.einsum("bhgqk,bqhgd->bkhd", ds, _grouped(q64, hkv)) * scale
    return AttentionGrads(dq.reshape(q.shape), dk, dv)
