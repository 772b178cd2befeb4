"""``strategy="auto"``: which strategy ``sp_attention`` runs, from the shapes alone.

The rule, in order (N ranks; per rank ``s`` tokens, ``Hq`` query and ``Hkv`` key/value heads of
sizes D and Dv; ``Hq'``, ``Hkv'`` the head counts Ulysses moves after
:func:`~sp_common.attention.heads.head_layout` pads and repeats them):

1. N = 1: ``"ulysses"`` (plain attention; every strategy is).
2. Each rank receives, per local token, ``(N-1)/N * (Hq' (D + Dv) + Hkv' (D + Dv))`` elements
   under Ulysses (q, k, v and the output, each through one all-to-all) and
   ``(N-1) * Hkv (D + Dv)`` under ring or all-gather-KV (the other ranks' keys and values).
   Ulysses when it moves no more.
3. Otherwise ``"allgather_kv"`` when the whole sequence's keys and values,
   ``B * N * s * Hkv * (D + Dv)`` elements in the input dtype, fit in
   :data:`ALLGATHER_KV_BYTES` (one collective, no per-step overhead); else ``"ring"``
   (K/V memory O(S/N)).

Every rank sees the same shapes, so every rank picks the same strategy (debug mode checks the
shapes agree). The forward and the backward use the one picked.
"""

from __future__ import annotations

from .checks import AttentionShapes
from .heads import head_layout

# The most bytes of gathered keys and values all-gather-KV may hold per rank under "auto".
ALLGATHER_KV_BYTES = 256 * 2**20


def choose_strategy(shapes: AttentionShapes, n: int, dtype: str) -> str:
    """The strategy ``strategy="auto"`` runs for ``shapes`` on ``n`` ranks with inputs of
    ``dtype`` (its name, e.g. ``"torch.bfloat16"``): the rule in the module docstring."""
    if n == 1:
        return "ulysses"
    heads = head_layout(shapes.q_heads, shapes.kv_heads, n)
    q_heads = shapes.q_heads + heads.pad
    kv_heads = shapes.kv_heads * heads.repeat + heads.pad
    width = shapes.head_dim + shapes.value_dim
    ulysses = (n - 1) * (q_heads + kv_heads) * width / n
    kv = (n - 1) * shapes.kv_heads * width
    if ulysses <= kv:
        return "ulysses"
    itemsize = 8 if dtype.endswith("float64") else 4 if dtype.endswith("float32") else 2
    gathered = shapes.batch * shapes.padded * shapes.kv_heads * width * itemsize
    return "allgather_kv" if gathered <= ALLGATHER_KV_BYTES else "ring"
