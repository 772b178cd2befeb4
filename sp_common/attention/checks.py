"""The argument checks every attention strategy shares (local to this rank)."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

from ..backend import Backend, backend_for
from ..plan import active_run
from .masks import check_key_mask, check_seq_len

STRATEGIES = ("ulysses", "allgather_kv", "ring", "usp", "auto")


class AttentionShapes(NamedTuple):
    """What the checks found: ``[B, s, Hq, D]`` queries, ``Hkv`` key/value heads of value
    size ``Dv``; ``padded`` = N * s keys in all, ``real`` of them before the padding; the
    softmax ``scale``."""

    batch: int
    local: int
    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    padded: int
    real: int
    scale: float


def check_attention(
    func: str,
    backend: Backend[Any],
    n: int,
    q: Any,
    k: Any,
    v: Any,
    *,
    strategy: object,
    causal: object,
    seq_len: object,
    key_mask: object,
    scale: object,
) -> AttentionShapes:
    """Check the arguments of ``func`` (``sp_attention`` and its fixed-strategy forms); return
    the shapes. Raises TypeError / ValueError naming ``func``, the argument and the value."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"{func}: strategy={strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}; "
            "pass one of them."
        )
    if not isinstance(causal, bool):
        raise TypeError(
            f"{func}: causal must be a bool, got {causal!r} of type {type(causal).__name__}; "
            "pass True or False."
        )
    for arg, t in (("k", k), ("v", v)):
        if backend_for(func, t) is not backend:
            raise TypeError(
                f"{func}: {arg} is a {type(t).__name__} but q is a {backend.framework} tensor; "
                "pass q, k and v of one framework."
            )
    sq, sk, sv = backend.shape(q), backend.shape(k), backend.shape(v)
    # Compared, not hashed into a set: a set of symbolic sizes under torch.compile would
    # specialize every length (a recompile per length).
    if (
        len(sq) != 4
        or len(sk) != 4
        or len(sv) != 4
        or sk[:3] != sv[:3]
        or sq[:2] != sk[:2]
        or sq[3] != sk[3]
    ):
        raise ValueError(
            f"{func}: q must be [B, s, Hq, D], k [B, s, Hkv, D] and v [B, s, Hkv, Dv] (this "
            f"rank's s tokens); got q {sq}, k {sk}, v {sv}."
        )
    if sq[2] == 0 or sk[2] == 0 or sq[3] == 0:
        raise ValueError(
            f"{func}: q has {sq[2]} heads of size {sq[3]} and k, v {sk[2]} heads; attention "
            "needs at least one head of size at least 1 on each (got q "
            f"{sq}, k {sk})."
        )
    if sq[2] % sk[2]:
        raise ValueError(
            f"{func}: q has {sq[2]} heads and k, v {sk[2]}; grouped-query attention needs the "
            f"query head count to be a multiple of the key/value head count (e.g. {sk[2]}, "
            f"{2 * sk[2]} or {4 * sk[2]} query heads)."
        )
    dtypes = [backend.dtype_info(t) for t in (q, k, v)]
    if dtypes[0].kind != "float" or len({d.name for d in dtypes}) != 1:
        raise TypeError(
            f"{func}: q, k, v must share one floating dtype, got "
            f"{', '.join(d.name for d in dtypes)}; cast them, e.g. to float32 or bfloat16."
        )
    if scale is None:
        scale_value = 1.0 / math.sqrt(sq[3])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{func}: scale={scale!r} is not a real number; pass a float or None.")
    elif not math.isfinite(float(scale)):
        raise ValueError(f"{func}: scale={scale!r} is not finite; pass a finite float or None.")
    else:
        scale_value = float(scale)
    padded = sq[1] * n
    if seq_len is None:
        run = active_run()
        padded_names = [] if run is None else sorted(k for k, p in run.pads.items() if p)
        if padded_names:
            raise ValueError(
                f"{func}: seq_len is None inside a planned forward pass that padded the "
                f"sequence(s) {padded_names}, so None (no padding) would let padded keys take "
                "part; pass seq_len explicitly, e.g. seq_len=planned_seq_len("
                f"{padded_names[0]!r})."
            )
        real = padded
    else:
        real = check_seq_len(func, seq_len, padded)
    if key_mask is not None:
        check_key_mask(func, backend, key_mask, sq[0], sq[1])
    return AttentionShapes(sq[0], sq[1], sq[2], sk[2], sq[3], sv[3], padded, real, scale_value)
