"""USP (Unified Sequence Parallelism): Ulysses inside one mesh axis, ring across the other.
Written once over the backend primitives, from ``ulysses`` and ``ring``."""

from __future__ import annotations

from typing import Any

from ..backend import Backend
from ..layouts import Layout
from .checks import AttentionShapes
from .heads import head_layout
from .ring import RingSpec


def usp(
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
    """Attention over a group of two axes, ``R`` ring ranks by ``U`` Ulysses ranks (rank
    ``ring_index * U + ulysses_index`` of the ``N = R * U`` shards, as ``sp_shard`` numbers
    them over the same group).

    Shapes, with ``Hq'``, ``Hkv'`` the head counts after
    :func:`~sp_common.attention.heads.head_layout` for U ranks::

        q [B, s, Hq, D]   k [B, s, Hkv, D]   v [B, s, Hkv, Dv]       sequence-sharded over N
        -> all-to-all over the Ulysses axis (scatter heads, gather its U shards)
        q [B, U*s, Hq'/U, D]   k, v [B, U*s, Hkv'/U, D | Dv]          one block per ring rank
        -> ring attention over the ring axis (R steps of the K/V blocks)
        -> all-to-all back over the Ulysses axis
        out [B, s, Hq, Dv]

    Memory per rank O(S/R) for the keys and values; Ulysses' all-to-alls move ``1/U`` of the
    heads. Causal attention skips fully masked blocks in the contiguous layout; under zigzag
    every block is attended with its mask (correct, not balanced).
    """
    ring_group, ulysses_group = backend.two_axes("sp_attention", group)
    u = backend.world_size(ulysses_group)
    if key_mask is not None:
        if len(backend.shape(key_mask)) == 1:
            key_mask = backend.reshape(key_mask, (1, -1))
        if u > 1:
            key_mask = backend.gather(key_mask, 1, ulysses_group, "slice")
    heads = head_layout(shapes.q_heads, shapes.kv_heads, u)
    if heads.repeat > 1:
        k, v = (backend.repeat_interleave(t, 2, heads.repeat) for t in (k, v))
    if heads.pad:
        q, k, v = (backend.pad_end(t, 2, heads.pad, 0) for t in (q, k, v))
    if u > 1:
        q, k, v = (backend.all_to_all(t, 2, 1, ulysses_group) for t in (q, k, v))
    spec = RingSpec(
        ring_group,
        backend.world_size(ring_group),
        u * shapes.local,
        shapes.real,
        shapes.scale,
        causal,
        layout,
        inner=u,
    )
    out = backend.ring_attention(spec, q, k, v, key_mask)
    if u > 1:
        out = backend.all_to_all(out, 1, 2, ulysses_group)
    return backend.truncate(out, 2, shapes.q_heads) if heads.pad else out
