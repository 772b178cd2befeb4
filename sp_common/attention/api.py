"""``sp_attention``: attention over a sequence sharded across the SP ranks, one entry point for
every strategy."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from ..api import LOCAL_ERRORS, resolve
from ..layouts import Layout, check_layout
from ..plan import active_run
from .allgather_kv import allgather_kv
from .checks import check_attention
from .masks import valid_keys
from .ring import ring
from .select import choose_strategy
from .ulysses import ulysses
from .usp import usp

T = TypeVar("T")

Strategy = Literal["ulysses", "allgather_kv", "ring", "usp", "auto"]
_STRATEGY = {"ulysses": ulysses, "allgather_kv": allgather_kv, "ring": ring, "usp": usp}


def sp_attention(
    q: T,
    k: T,
    v: T,
    *,
    strategy: Strategy = "ulysses",
    causal: bool = False,
    seq_len: int | None = None,
    key_mask: Any = None,
    scale: float | None = None,
    group: Any = None,
    layout: Layout = "contiguous",
) -> T:
    """Softmax attention over a sequence sharded across the SP ranks: what full attention over
    the unsharded sequence returns at this rank's positions, forward and gradients.

    Shapes (this rank's ``s`` tokens of a sequence sharded with ``sp_shard`` or
    ``sp_shard_with_padding`` in ``layout``, padding at the end of the sequence)::

        q [B, s, Hq, D]   k [B, s, Hkv, D]   v [B, s, Hkv, Dv]   ->   out [B, s, Hq, Dv]

    Args:
        q, k, v: torch tensors or JAX arrays of one floating dtype (float16, bfloat16, float32,
            float64). ``Hq`` must be a multiple of ``Hkv`` (grouped-query and multi-query
            attention: query head h reads key/value head ``h // (Hq / Hkv)``); any head count
            works, whether or not N divides it.
        strategy: ``"ulysses"``: two all-to-alls swap the sharding from the sequence to the
            heads and back (heads the world size does not divide are padded, key/value heads
            repeated as little as needed, see ``sp_common.attention.heads``).
            ``"allgather_kv"``: K and V gathered on every rank (backward: reduce-scatter), the
            local queries attend all keys; any head count, no head padding, K/V memory O(S).
            ``"ring"``: the K/V shards travel around the ranks, N steps, partial results
            merged by log-sum-exp, an explicit backward that sends them around again (see
            ``sp_common.attention.ring``); any head count, memory O(S/N) per rank;
            differentiable once (torch: a second derivative raises; JAX differentiates the
            explicit backward). Causal attention under ``layout="zigzag"`` gives every rank
            the same work. ``"auto"``: picked from the shapes by the rule in
            ``sp_common.attention.select`` (the same on every rank).
        causal: query at global position i attends the keys at positions <= i.
        seq_len: the real sequence length S before padding (None: ``N * s``, nothing padded);
            keys at positions >= S never take part. Never guessed: inside a planned forward
            pass that padded, None raises (pass ``seq_len=planned_seq_len(name)``).
        key_mask: this rank's bool mask of its keys, ``[B, s]`` or ``[s]``, True = attend
            (gathered inside). With it, joint sequences (two streams each sharded and padded,
            concatenated per rank) are exact.
        scale: the softmax scale, default ``1 / sqrt(D)``.
        group: the SP group (see ``sp_shard``).
        layout: the layout q, k, v (and ``key_mask``) were sharded in, ``"contiguous"`` or
            ``"zigzag"`` (see ``sp_common.layouts``); ``causal`` and ``seq_len`` refer to
            sequence positions either way.

    Returns:
        ``out [B, s, Hq, Dv]`` in q's dtype. A query that may attend no key at all (every key
        masked) gets zeros, and zero gradients. Outputs at padded positions are defined but
        meaningless (drop them with ``sp_gather(..., pad_size=...)``). World size 1 is plain
        attention with the same semantics.

    Raises:
        ValueError: shapes that do not fit (above), ``seq_len`` outside ``[1, N * s]``, an
            unknown ``strategy``, a ``key_mask`` of the wrong shape.
        TypeError: k, v or key_mask of another framework, mixed or non-floating dtypes, a
            non-bool ``key_mask`` or ``causal``, a ``scale`` that is not a real number.

    In debug mode (``sp_debug()``, torch) the ranks first agree on the shapes and dtypes of q,
    k, v and key_mask, and on ``strategy``, ``causal``, ``seq_len`` and ``scale``.
    """
    return attention_call(
        "sp_attention", q, k, v, strategy, causal, seq_len, key_mask, scale, group, layout
    )


def attention_call(
    func: str,
    q: Any,
    k: Any,
    v: Any,
    strategy: object,
    causal: object,
    seq_len: object,
    key_mask: object,
    scale: object,
    group: Any,
    layout: object,
) -> Any:
    """``sp_attention`` as called by ``func`` (errors name it)."""
    backend, g, n = resolve(func, q, group)
    tensors = {"q": q, "k": k, "v": v}
    if key_mask is not None:
        tensors["key_mask"] = key_mask
    options = {
        "strategy": strategy,
        "causal": causal,
        "seq_len": seq_len,
        "scale": scale,
        "layout": layout,
    }
    try:
        shapes = check_attention(
            func,
            backend,
            n,
            q,
            k,
            v,
            strategy=strategy,
            causal=causal,
            seq_len=seq_len,
            key_mask=key_mask,
            scale=scale,
        )
        lay = check_layout(func, layout)
        check_planned_layout(func, lay)
        if lay == "zigzag" and n > 1 and shapes.local % 2:
            raise ValueError(
                f"{func}: layout='zigzag' shards hold 2 equal chunks, but q holds {shapes.local} "
                "tokens (odd); shard q, k, v with sp_shard_with_padding(..., layout='zigzag')."
            )
    except LOCAL_ERRORS as e:
        if n > 1:
            backend.check_consistent(func, g, tensors, options, e)
        raise
    if n > 1:
        agreed = {**options, "seq_len": shapes.real, "scale": shapes.scale}
        backend.check_consistent(func, g, tensors, agreed)
    assert isinstance(causal, bool) and isinstance(strategy, str)  # checked above
    if n == 1:  # every strategy is plain attention on one rank
        mask = valid_keys(backend, g, n, q, key_mask, shapes.padded, shapes.real)
        return backend.attention(q, k, v, scale=shapes.scale, causal=causal, key_mask=mask)
    if strategy == "auto":
        strategy = choose_strategy(shapes, n, backend.dtype_info(q).name)
    return _STRATEGY[strategy](backend, g, n, q, k, v, shapes, causal, key_mask, lay)


def check_planned_layout(func: str, layout: str) -> None:
    """ValueError when the planned forward pass running now sharded its sequences in a
    layout other than ``layout`` (attention would read the positions wrong)."""
    run = active_run()
    used = sorted(set(run.layouts.values())) if run is not None else []
    if used and layout not in used:
        raise ValueError(
            f"{func}: layout={layout!r}, but the planned forward pass running now sharded its "
            f"sequences with layout {used[0]!r} (ShardInput(..., layout=...)); pass "
            f"layout={used[0]!r}."
        )


def sp_ulysses_attention(
    q: T,
    k: T,
    v: T,
    *,
    causal: bool = False,
    seq_len: int | None = None,
    key_mask: Any = None,
    scale: float | None = None,
    group: Any = None,
    layout: Layout = "contiguous",
) -> T:
    """:func:`sp_attention` with ``strategy="ulysses"`` (DeepSpeed-Ulysses): two all-to-alls.

    Shapes, with N ranks and the padded length ``S_pad = N * s``::

        q [B, s, Hq, D], k [B, s, Hkv, D], v [B, s, Hkv, Dv]   sequence-sharded
        -> all-to-all (scatter heads, gather sequence)
        [B, S_pad, Hq/N | Hkv/N, D]                               head-sharded, whole sequence
        -> attention (causal, padded and masked keys never attended)
        -> all-to-all (scatter sequence, gather heads)
        out [B, s, Hq, Dv]                                        sequence-sharded again

    Arguments, results and errors as :func:`sp_attention`.
    """
    return attention_call(
        "sp_ulysses_attention", q, k, v, "ulysses", causal, seq_len, key_mask, scale, group, layout
    )
