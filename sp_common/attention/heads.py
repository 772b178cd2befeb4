"""How Ulysses splits attention heads over N ranks when the counts do not divide.

Ulysses gives each rank whole heads. With ``Hq`` query heads and ``Hkv`` key/value heads (grouped
query attention: query head h reads key/value head ``h // (Hq / Hkv)``) the split must keep every
query head next to its key/value head. :func:`head_layout` picks the least replication that
does: none when N divides both counts; each key/value head repeated ``repeat`` times when N
divides ``Hq`` but not ``Hkv`` (multi-query attention on 4 ranks repeats the one head 4 times);
and when N does not divide ``Hq``, zero query heads padded to a multiple of N, with the
key/value heads repeated to one per query head (the padded heads are dropped after the return
all-to-all). Plain integer arithmetic, the same for both backends.
"""

from __future__ import annotations

from typing import NamedTuple


class HeadLayout(NamedTuple):
    """``repeat``: each key/value head repeated this many times (1: none). ``pad``: zero
    heads appended to q, k and v after the repeat (0: none). After both, q has ``Hq + pad``
    heads and k, v ``Hkv * repeat + pad``, and N divides both."""

    repeat: int
    pad: int


def head_layout(q_heads: int, kv_heads: int, world_size: int) -> HeadLayout:
    """The least replication of key/value heads (and the query-head padding) that splits
    ``q_heads`` and ``kv_heads`` over ``world_size`` ranks with every query head on the rank
    of its key/value head. ``q_heads`` must be a multiple of ``kv_heads``."""
    group = q_heads // kv_heads
    if q_heads % world_size:
        return HeadLayout(group, -q_heads % world_size)
    # The smallest divisor r of the group size with N | kv_heads * r; r = group always works.
    repeat = next(
        r for r in range(1, group + 1) if group % r == 0 and kv_heads * r % world_size == 0
    )
    return HeadLayout(repeat, 0)
