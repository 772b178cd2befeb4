"""Padding-aware masks and a portable Ulysses attention, written once over the primitives."""

from __future__ import annotations

import numbers
from typing import Any, TypeVar

from ..api import LOCAL_ERRORS, check_flag, resolve, sp_shard
from ..backend import Backend, backend_for
from ..plan import active_run
from ..shapes import pad_size_for

T = TypeVar("T")


def _check_seq_len(func: str, seq_len: object, upper: int | None) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral):
        raise TypeError(
            f"{func}: seq_len must be an int, got {seq_len!r} of type {type(seq_len).__name__}; "
            "pass the sequence length before padding."
        )
    length = int(seq_len)
    if length < 1 or (upper is not None and length > upper):
        bound = "at least 1" if upper is None else f"in [1, {upper}] (the padded length)"
        raise ValueError(
            f"{func}: seq_len={length} must be {bound}; pass the sequence length before padding."
        )
    return length


def sp_padding_mask(like: Any, seq_len: int, *, local: bool = True, group: Any = None) -> Any:
    """Which positions of a sequence padded by :func:`sp_shard_with_padding` are real.

    Shapes: ``local=True`` (default): ``[ceil(S / N)]``, this rank's chunk (all False on ranks
    that hold only padding); ``local=False``: ``[ceil(S / N) * N]``, the whole padded sequence.
    True marks a real position, False padding. ``like`` is any tensor of the framework (the mask
    is created on its device); ``seq_len`` is S, the length before padding.
    """
    backend, g, n = resolve("sp_padding_mask", like, group)
    seq_len = _check_seq_len("sp_padding_mask", seq_len, None)
    check_flag("sp_padding_mask", "local", local)
    mask = backend.valid_mask(like, seq_len + pad_size_for(seq_len, n), seq_len)
    # No cross-rank check: the mask is this rank's own (no collective), so a debug check here
    # would only make the peers of a rank whose seq_len check failed wait for it.
    return sp_shard(mask, 0, validate=False, group=g) if local else mask


def _checked_lengths(
    func: str, backend: Backend, n: int, q: Any, k: Any, v: Any, seq_len: object, scale: object
) -> tuple[int, int]:
    """The argument checks of :func:`sp_ulysses_attention` (local to this rank); returns
    ``(padded, real)``: the padded sequence length ``N * s`` and the real one (``seq_len``)."""
    shape = backend.shape(q)
    for arg, t in (("k", k), ("v", v)):
        if backend_for(func, t) is not backend:
            raise TypeError(
                f"{func}: {arg} is a {type(t).__name__} but q is a {backend.framework} tensor; "
                "pass q, k and v of one framework."
            )
    shapes = [shape, backend.shape(k), backend.shape(v)]
    if (
        any(len(s) != 4 for s in shapes)
        # Compared, not hashed into a set: a set of symbolic sizes under torch.compile would
        # specialize every length (a recompile per length).
        or any(s[:3] != shapes[0][:3] for s in shapes[1:])
        or shapes[0][3] != shapes[1][3]
    ):
        raise ValueError(
            f"{func}: q, k, v must be [B, S/N, H, D] with equal B, S/N and H, and q and k the "
            f"same head size D; got shapes {', '.join(map(str, shapes))}."
        )
    dtypes = [backend.dtype_info(t) for t in (q, k, v)]
    if dtypes[0].kind != "float" or len({d.name for d in dtypes}) != 1:
        raise TypeError(
            f"{func}: q, k, v must share one floating dtype, got "
            f"{', '.join(d.name for d in dtypes)}; cast them, e.g. to float32 or bfloat16."
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{func}: scale={scale!r} is not a real number; pass a float or None.")
    heads, padded = shape[2], shape[1] * n
    if heads % n:
        raise ValueError(
            f"{func}: the head count {heads} is not divisible by the sequence-parallel world size "
            f"{n}; Ulysses gives each rank H/N whole heads, so use a world size that divides "
            f"{heads} (or ring attention)."
        )
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
        real = _check_seq_len(func, seq_len, padded)
    return padded, real


def sp_ulysses_attention(
    q: T,
    k: T,
    v: T,
    *,
    seq_len: int | None = None,
    scale: float | None = None,
    group: Any = None,
) -> T:
    """Full softmax attention over a sequence sharded across the SP ranks (DeepSpeed-Ulysses).

    Shapes, with N ranks, H heads and the padded length ``S_pad = N * s``::

        q, k, v  [B, s, H, D]        sequence-sharded (each rank holds s tokens)
        -> all-to-all (scatter heads, gather sequence)
        q, k, v  [B, S_pad, H/N, D]  head-sharded, whole sequence
        -> attention, keys at positions >= seq_len masked out
        out      [B, S_pad, H/N, D]
        -> all-to-all (scatter sequence, gather heads)
        out      [B, s, H, D]        sequence-sharded again

    ``seq_len`` is the length before :func:`sp_shard_with_padding`; None means ``S_pad`` (no
    padding). It is never guessed: inside the forward pass of a planned model that padded a
    sequence, None raises (pass ``seq_len=planned_seq_len(name)``). Padded keys never take part, so
    the outputs at real positions equal unsharded attention over the original ``seq_len`` tokens;
    outputs at padded positions are defined but meaningless (drop them with ``sp_gather(...,
    pad_size=...)``). ``scale``
    defaults to ``1/sqrt(D)``. Differentiable in both backends (the all-to-all backward is the
    swapped all-to-all). World size 1 is plain attention.

    Raises:
        ValueError: H is not divisible by N, q/k/v are not 4-d with equal ``[B, s, H]`` (and q, k
            equal D), or ``seq_len`` is outside ``[1, S_pad]``.
        TypeError: k or v is not a tensor of q's framework, q/k/v do not share one floating
            dtype, or ``scale`` is not a real number.

    In debug mode (torch, ``sp_debug()``) the ranks first agree on the shapes and dtypes of q, k
    and v, ``seq_len`` and ``scale``; a disagreement, or a check above that fails on some ranks
    only, raises ValueError on every rank.
    """
    func = "sp_ulysses_attention"
    backend, g, n = resolve(func, q, group)
    tensors = {"q": q, "k": k, "v": v}
    try:
        padded, real = _checked_lengths(func, backend, n, q, k, v, seq_len, scale)
    except LOCAL_ERRORS as e:
        if n > 1:
            backend.check_consistent(func, g, tensors, {"seq_len": seq_len, "scale": scale}, e)
        raise
    if n > 1:
        agreed = {"seq_len": real, "scale": None if scale is None else float(scale)}
        backend.check_consistent(func, g, tensors, agreed)
        q, k, v = (backend.all_to_all(t, 2, 1, g) for t in (q, k, v))
    key_mask = backend.valid_mask(q, padded, real) if real < padded else None
    out = backend.attention(q, k, v, key_mask, scale)
    return backend.all_to_all(out, 1, 2, g) if n > 1 else out
