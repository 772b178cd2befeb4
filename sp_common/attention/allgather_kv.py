"""All-gather-KV attention: every rank gathers the keys and values, its queries stay local."""

from __future__ import annotations

from typing import Any

from ..backend import Backend
from ..layouts import Layout, positions, sequence_positions
from .checks import AttentionShapes
from .masks import valid_keys


def allgather_kv(
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
    """This rank's queries over the whole sequence's keys and values, by one gather of each.

    Shapes, with N ranks and ``S_pad = N * s``::

        q [B, s, Hq, D]   k [B, s, Hkv, D]   v [B, s, Hkv, Dv]      sequence-sharded
        -> gather k and v along the sequence
        k [B, S_pad, Hkv, D]   v [B, S_pad, Hkv, Dv]                  every rank
        -> local attention of this rank's queries at their sequence positions (r * s ... in
           the contiguous layout), causal, padded and masked keys never attended
        out [B, s, Hq, Dv]                                            sequence-sharded

    Any head count (heads are never split). Every rank's queries read every key, so the
    gradient of a gathered key sums the terms of all ranks: the gathers' backward is the
    reduce-scatter. Memory: the whole K and V on every rank (O(S)). Half types gather and
    attend in float32 (their partial K/V gradients would round before the sum).
    """
    keys = sequence_positions(layout, backend.arange(q, shapes.padded), shapes.local, n)
    mask = valid_keys(backend, group, n, q, key_mask, shapes.padded, shapes.real, keys)
    local = backend.arange(q, shapes.local)
    queries = positions(layout, local, shapes.local, n, backend.rank(group))
    like = q
    if backend.dtype_info(q).name.rsplit(".", 1)[-1] not in ("float32", "float64"):
        # Half types: each rank's K/V gradient is a partial sum the reduce-scatter adds up; in
        # the half type both would round (dV 0.12 off in bfloat16 on 2 ranks, 0.006 on one), so
        # gather and attend in float32 (twice the K/V traffic) and round the output once.
        q, k, v = (backend.to_float32(t) for t in (q, k, v))
    k, v = (backend.gather(t, 1, group, "reduce_scatter") for t in (k, v))
    out = backend.attention(
        q,
        k,
        v,
        scale=shapes.scale,
        causal=causal,
        key_mask=mask,
        q_positions=queries,
        k_positions=keys,
    )
    return backend.cast_like(out, like)
