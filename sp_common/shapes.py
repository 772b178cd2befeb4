"""Shape, padding and dtype arithmetic shared by every backend.

Pure Python: no framework is imported here. Every check raises an error that names the public
function, the argument and the value, and says what to do instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

DtypeKind = Literal["bool", "int", "float", "complex"]


def normalize_dim(func: str, dim: object, shape: Sequence[int]) -> int:
    """Return ``dim`` as a non-negative index into ``shape``.

    Raises TypeError for a non-integer dim, ValueError for a 0-d tensor or a dim out of range.
    """
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(
            f"{func}: dim must be an int, got {dim!r} of type {type(dim).__name__}; "
            "pass the sequence dimension as an int (negative counts from the end)."
        )
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(
            f"{func}: tensor is 0-d (shape ()), so there is no dim {int(dim)} to shard along; "
            "pass a tensor with a sequence dimension."
        )
    d = int(dim)
    if not -ndim <= d < ndim:
        raise ValueError(
            f"{func}: dim={d} is out of range for a tensor of shape {tuple(shape)} "
            f"(ndim {ndim}); use a dim in [{-ndim}, {ndim - 1}]."
        )
    return d % ndim


def pad_size_for(size: int, world_size: int) -> int:
    """Number of elements to append so that ``size`` becomes a multiple of ``world_size``.

    ``pad_size_for(10, 4) == 2``; ``pad_size_for(8, 4) == 0``; ``pad_size_for(0, 4) == 0``.
    """
    return -size % world_size


def shard_bounds(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, length)`` of rank ``rank``'s chunk when ``size`` (a multiple of ``world_size``)
    is cut into ``world_size`` equal chunks."""
    length = size // world_size
    return rank * length, length


def check_divisible(
    func: str, shape: Sequence[int], dim: int, world_size: int, hint: str | None = None
) -> None:
    """Raise ValueError unless ``shape[dim]`` splits into ``world_size`` equal chunks.

    ``hint`` says what to do instead; the default points to padding the sequence."""
    size = shape[dim]
    if size % world_size:
        if hint is None:
            hint = (
                f"use sp_shard_with_padding(tensor, dim={dim}) to pad it by "
                f"{pad_size_for(size, world_size)} and remove the padding after sp_gather with "
                "pad_size=..."
            )
        raise ValueError(
            f"{func}: size {size} of dim {dim} (shape {tuple(shape)}) is not divisible by the "
            f"sequence-parallel world size {world_size}; {hint}"
        )


def check_pad_size(func: str, pad_size: object, shape: Sequence[int], dim: int) -> int:
    """Return ``pad_size`` as an int after checking ``0 <= pad_size <= shape[dim]``."""
    if isinstance(pad_size, bool) or not isinstance(pad_size, numbers.Integral):
        raise TypeError(
            f"{func}: pad_size must be an int, got {pad_size!r} of type "
            f"{type(pad_size).__name__}; pass the pad_size returned by sp_shard_with_padding."
        )
    p = int(pad_size)
    if not 0 <= p <= shape[dim]:
        raise ValueError(
            f"{func}: pad_size={p} is outside [0, {shape[dim]}] for dim {dim} of shape "
            f"{tuple(shape)}; pass the pad_size returned by sp_shard_with_padding for this tensor."
        )
    return p


def check_pad_value(
    func: str, value: object, kind: DtypeKind, lo: float, hi: float, dtype_name: str
) -> None:
    """Raise unless ``value`` converts to the tensor dtype without changing.

    ``kind``/``lo``/``hi`` describe the dtype (the backend reports them): integers must be
    integral and within ``[lo, hi]``; bools must be 0 or 1; a finite float must not overflow
    to infinity (NaN and infinities are accepted for float dtypes).
    """
    if not isinstance(value, numbers.Number):
        raise TypeError(
            f"{func}: pad_value must be a Python number, got {value!r} of type "
            f"{type(value).__name__}; pass a scalar such as 0.0."
        )
    cant = f"{func}: pad_value={value!r} cannot be held by dtype {dtype_name}"
    if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        if kind != "complex":
            raise ValueError(f"{cant}; pass a real pad_value for a {kind} tensor.")
        parts: tuple[float, ...] = (value.real, value.imag)
    else:
        parts = (float(value),)  # type: ignore[arg-type]
    if kind == "bool":
        if parts[0] not in (0.0, 1.0):
            raise ValueError(f"{cant}; pass False/True (0 or 1) for a bool tensor.")
    elif kind == "int":
        v = parts[0]
        if not math.isfinite(v) or not v.is_integer() or not lo <= value <= hi:  # type: ignore[operator]
            raise ValueError(f"{cant}; pass an integer in [{int(lo)}, {int(hi)}].")
    else:
        for v in parts:
            if math.isfinite(v) and abs(v) > hi:
                raise ValueError(
                    f"{cant} (it would overflow to infinity); pass a value with magnitude at "
                    f"most {hi}, or float('inf') if infinity is what you want."
                )


def is_axis_name(group: object) -> bool:
    """True for a JAX mesh axis name: a ``str`` or a non-empty tuple of ``str``."""
    if isinstance(group, str):
        return True
    return isinstance(group, tuple) and len(group) > 0 and all(isinstance(a, str) for a in group)
