"""Which keys a query may attend: the padding mask, the user's key mask, written once."""

from __future__ import annotations

import numbers
from typing import Any

from ..api import check_flag, resolve, sp_shard
from ..backend import Backend
from ..shapes import pad_size_for


def check_seq_len(func: str, seq_len: object, upper: int | None) -> int:
    """``seq_len`` as an int in ``[1, upper]``; TypeError / ValueError naming ``func``."""
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
    seq_len = check_seq_len("sp_padding_mask", seq_len, None)
    check_flag("sp_padding_mask", "local", local)
    mask = backend.valid_mask(like, seq_len + pad_size_for(seq_len, n), seq_len)
    # No cross-rank check: the mask is this rank's own (no collective), so a debug check here
    # would only make the peers of a rank whose seq_len check failed wait for it.
    return sp_shard(mask, 0, validate=False, group=g) if local else mask


def check_key_mask(func: str, backend: Backend[Any], key_mask: Any, batch: int, local: int) -> None:
    """TypeError / ValueError unless ``key_mask`` is a bool tensor of ``backend``'s framework
    shaped ``[B, s]`` or ``[s]`` (this rank's chunk of the keys)."""
    if not backend.is_tensor(key_mask):
        raise TypeError(
            f"{func}: key_mask must be a {backend.framework} bool tensor, got "
            f"{type(key_mask).__name__}; pass this rank's [B, s] or [s] mask (True = attend)."
        )
    shape, info = backend.shape(key_mask), backend.dtype_info(key_mask)
    if info.kind != "bool":
        raise TypeError(
            f"{func}: key_mask must be bool (True = attend), got {info.name}; pass mask > 0 "
            "(torch: mask.bool(), JAX: mask.astype(bool))."
        )
    if shape not in ((batch, local), (local,)):
        raise ValueError(
            f"{func}: key_mask has shape {shape}; it must be this rank's chunk of the keys, "
            f"[B, s] = ({batch}, {local}) or [s] = ({local},)."
        )


def valid_keys(
    backend: Backend[Any],
    group: Any,
    n: int,
    like: Any,
    key_mask: Any,
    padded: int,
    real: int,
    key_positions: Any = None,
) -> Any:
    """The keys every query may attend, over the whole padded sequence in rank order:
    ``[B | 1, S_pad]`` bool (the gathered ``key_mask`` and the keys at sequence positions
    below ``real``; ``key_positions``: those positions, None for ``0 .. S_pad-1``), or None
    when all are."""
    mask = None
    if key_mask is not None:
        if len(backend.shape(key_mask)) == 1:
            key_mask = backend.reshape(key_mask, (1, -1))
        mask = backend.gather(key_mask, 1, group, "slice") if n > 1 else key_mask
    if real < padded:
        real_keys = (
            backend.valid_mask(like, padded, real)
            if key_positions is None
            else key_positions < real
        )
        real_keys = backend.reshape(real_keys, (1, -1))
        mask = real_keys if mask is None else backend.logical_and(mask, real_keys)
    return mask
