"""One block of ring attention, forward and backward, written once over the backend's array
operations: the flash-attention formulas on a ``[queries, keys]`` tile, with the log-sum-exp
that lets partial results over different keys be merged exactly.

Layouts (``Hq = Hkv * G``; every tensor here is in the accumulation dtype, float32 or
float64)::

    q5  [B, sq, Hkv, G, D]     k [B, sk, Hkv, D]     v [B, sk, Hkv, Dv]
    o5  [B, sq, Hkv, G, Dv]    lse [B, sq, Hkv, G]   allowed [B | 1, sq, sk] bool or None

``lse`` is ``-inf`` for a query that attends no key of the block (its ``o5`` row is zeros).
The keys of a block are walked in tiles of at most ``KEY_BLOCK``.
"""

from __future__ import annotations

from typing import Any

from ..backend import Backend

NEG_INF = float("-inf")
# The most keys of one tile of logits: a tile is [B, sq, Hkv, G, KEY_BLOCK] (the JAX kernel's
# block size), so a block's temporaries grow linearly with the shard, not with its square.
KEY_BLOCK = 512


def finite(backend: Backend[Any], lse: Any) -> Any:
    """``lse`` with ``-inf`` (no key attended) read as 0, so that ``exp(x - finite(lse))`` is 0
    where ``x`` is ``-inf`` instead of NaN."""
    return backend.where(lse == NEG_INF, 0.0, lse)


def logits(backend: Backend[Any], q5: Any, k: Any, allowed: Any, scale: float) -> Any:
    """``[B, sq, Hkv, G, sk]``: ``scale * q . k``, ``-inf`` where ``allowed`` is False."""
    s = backend.einsum("bqhgd,bkhd->bqhgk", q5, k) * scale
    if allowed is None:
        return s
    return backend.where(allowed[:, :, None, None, :], s, NEG_INF)


def with_causal(backend: Backend[Any], q5: Any, k: Any, allowed: Any, causal: bool) -> Any:
    """``allowed`` and, with ``causal``, the causal mask of queries and keys at the same
    positions (query i attends keys j <= i: a rank's own block, whose positions increase)."""
    if not causal:
        return allowed
    rows, cols = backend.arange(q5, backend.shape(q5)[1]), backend.arange(q5, backend.shape(k)[1])
    tril = (cols[None, :] <= rows[:, None])[None]
    return tril if allowed is None else backend.logical_and(allowed, tril)


def _key_slices(sk: int) -> list[slice]:
    """The key ranges of the tiles: at most ``KEY_BLOCK`` keys each."""
    return [slice(start, min(start + KEY_BLOCK, sk)) for start in range(0, sk, KEY_BLOCK)]


def _tile_mask(allowed: Any, keys: slice) -> Any:
    return None if allowed is None else allowed[:, :, keys]


def tile_forward(
    backend: Backend[Any], q5: Any, k: Any, v: Any, allowed: Any, scale: float
) -> tuple[Any, Any]:
    """``(o5, lse)`` of the queries over one tile of keys (all of them at once)."""
    s = logits(backend, q5, k, allowed, scale)
    lse = backend.logsumexp(s, -1)
    p = backend.exp(s - finite(backend, lse)[..., None])
    return backend.einsum("bqhgk,bkhe->bqhge", p, v), lse


def block_forward(
    backend: Backend[Any], q5: Any, k: Any, v: Any, allowed: Any, scale: float
) -> tuple[Any, Any]:
    """``(o5, lse)`` of the queries over a block's keys: ``o5`` normalized over the block,
    ``lse`` the log of its softmax denominator; the keys walked in tiles of at most
    ``KEY_BLOCK``, merged as they come (a Python loop: what an eager backend runs; the JAX
    backend scans the same tiles)."""
    acc = None
    for keys in _key_slices(backend.shape(k)[1]):
        new = tile_forward(backend, q5, k[:, keys], v[:, keys], _tile_mask(allowed, keys), scale)
        acc = new if acc is None else merge(backend, acc, new)
    assert acc is not None  # a block has at least one key
    return acc


def merge(backend: Backend[Any], acc: tuple[Any, Any], new: tuple[Any, Any]) -> tuple[Any, Any]:
    """Two partial results ``(o5, lse)`` over disjoint keys merged into the result over both:
    ``lse = log(e^lse_a + e^lse_b)``, ``o5 = o5_a e^(lse_a - lse) + o5_b e^(lse_b - lse)``."""
    (o_a, lse_a), (o_b, lse_b) = acc, new
    lse = backend.logaddexp(lse_a, lse_b)
    base = finite(backend, lse)
    w_a, w_b = backend.exp(lse_a - base), backend.exp(lse_b - base)
    return o_a * w_a[..., None] + o_b * w_b[..., None], lse


def tile_grads(
    backend: Backend[Any],
    q5: Any,
    k: Any,
    v: Any,
    allowed: Any,
    scale: float,
    lse: Any,
    do5: Any,
    delta: Any,
) -> tuple[Any, Any, Any]:
    """``(dq5, dk, dv)``: one tile's terms of the gradients, from the final ``lse`` over all
    keys, the output gradient ``do5 [B, sq, Hkv, G, Dv]`` and ``delta = sum(do5 * o5, -1)``
    ``[B, sq, Hkv, G]`` (the softmax's backward: ``ds = p * (do . v - delta)``)."""
    p = backend.exp(logits(backend, q5, k, allowed, scale) - finite(backend, lse)[..., None])
    dv = backend.einsum("bqhgk,bqhge->bkhe", p, do5)
    ds = p * (backend.einsum("bqhge,bkhe->bqhgk", do5, v) - delta[..., None])
    dq5 = backend.einsum("bqhgk,bkhd->bqhgd", ds, k) * scale
    dk = backend.einsum("bqhgk,bqhgd->bkhd", ds, q5) * scale
    return dq5, dk, dv


def block_grads(
    backend: Backend[Any],
    q5: Any,
    k: Any,
    v: Any,
    allowed: Any,
    scale: float,
    lse: Any,
    do5: Any,
    delta: Any,
) -> tuple[Any, Any, Any]:
    """``(dq5, dk, dv)``: a block's terms of the gradients (:func:`tile_grads` over its tiles
    of at most ``KEY_BLOCK`` keys, a Python loop)."""
    dq5, dks, dvs = None, [], []
    for keys in _key_slices(backend.shape(k)[1]):
        dq, dk, dv = tile_grads(
            backend, q5, k[:, keys], v[:, keys], _tile_mask(allowed, keys), scale, lse, do5, delta
        )
        dq5 = dq if dq5 is None else dq5 + dq
        dks.append(dk)
        dvs.append(dv)
    return dq5, backend.concat(dks, 1), backend.concat(dvs, 1)
