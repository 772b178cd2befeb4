"""All-gather-KV attention: every rank gathers the keys and values, its queries stay local."""

from __future__ import annotations

from typing import Any

from ..backend import Backend
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
) -> Any:
    """This rank's queries over the whole sequence's keys and values, by one gather of each.

    Shapes, with N ranks and ``S_pad = N * s``::

        q [B, s, Hq, D]   k [B, s, Hkv, D]   v [B, s, Hkv, Dv]      sequence-sharded
        -> gather k and v along the sequence
        k [B, S_pad, Hkv, D]   v [B, S_pad, Hkv, Dv]                  every rank
        -> local attention of this rank's queries (at positions r * s ...), causal, padded and
           masked keys never attended
        out [B, s, Hq, Dv]                                            sequence-sharded

    Any head count (heads are never split). Every rank's queries read every key, so the
    gradient of a gathered key sums the terms of all ranks: the gathers' backward is the
    reduce-scatter. Memory: the whole K and V on every rank (O(S)).
    """
    mask = valid_keys(backend, group, n, q, key_mask, shapes.padded, shapes.real)
    if n == 1:
        return backend.attention(q, k, v, scale=shapes.scale, causal=causal, key_mask=mask)
    k, v = (backend.gather(t, 1, group, "reduce_scatter") for t in (k, v))
    offset = backend.rank(group) * shapes.local
    return backend.attention(
        q, k, v, scale=shapes.scale, causal=causal, key_mask=mask, q_offset=offset
    )
