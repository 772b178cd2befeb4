"""Ulysses attention (DeepSpeed-Ulysses), written once over the backend primitives."""

from __future__ import annotations

from typing import Any

from ..backend import Backend
from ..layouts import Layout, sequence_positions
from .checks import AttentionShapes
from .heads import head_layout
from .masks import valid_keys


def ulysses(
    backend: Backend[Any],
    group: Any,
    n: int,
    q: Any,
    k: Any,
    v: Any,
    shapes: AttentionShapes,
    causal: bool,
    key_mask: Any,
    layout: Layout,
) -> Any:
    """Attention of this rank's queries over the whole sequence, by two all-to-alls.

    Shapes, with N ranks and ``S_pad = N * s``; ``Hq'``, ``Hkv'`` the head counts after
    :func:`~sp_common.attention.heads.head_layout` (N divides both)::

        q [B, s, Hq, D]   k [B, s, Hkv, D]   v [B, s, Hkv, Dv]      sequence-sharded
        -> repeat k/v heads, pad heads (only where N does not divide the counts)
        -> all-to-all (scatter heads, gather sequence)
        q [B, S_pad, Hq'/N, D]  k, v [B, S_pad, Hkv'/N, D | Dv]     head-sharded
        -> local attention: causal, padded and masked keys never attended
        out [B, S_pad, Hq'/N, Dv]
        -> all-to-all (scatter sequence, gather heads), drop padded heads
        out [B, s, Hq, Dv]                                           sequence-sharded again

    The all-to-all concatenates the shards in rank order; under ``layout="zigzag"`` that is
    not sequence order, so the kernel gets the sequence position of every query and key.
    """
    order = None
    if layout == "zigzag":
        index = backend.arange(q, shapes.padded)
        order = sequence_positions(layout, index, shapes.local, n)
    mask = valid_keys(backend, group, n, q, key_mask, shapes.padded, shapes.real, order)
    heads = head_layout(shapes.q_heads, shapes.kv_heads, n)
    if heads.repeat > 1:
        k, v = (backend.repeat_interleave(t, 2, heads.repeat) for t in (k, v))
    if heads.pad:
        q, k, v = (backend.pad_end(t, 2, heads.pad, 0) for t in (q, k, v))
    q, k, v = (backend.all_to_all(t, 2, 1, group) for t in (q, k, v))
    out = backend.attention(
        q,
        k,
        v,
        scale=shapes.scale,
        causal=causal,
        key_mask=mask,
        q_positions=order,
        k_positions=order,
    )
    out = backend.all_to_all(out, 1, 2, group)
    return backend.truncate(out, 2, shapes.q_heads) if heads.pad else out
