"""Shape, padding and dtype arithmetic shared by every backend.

Pure Python: no framework is imported here. Every check raises an error that names the public
function, the argument and the value, and says what to do instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

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


class PaddedChunk(NamedTuple):
    """Rank ``rank``'s chunk of a ``size``-long dim padded at its end to ``chunk * world_size``:
    ``real`` elements of the input from ``start``, then ``fill`` elements of padding."""

    start: int
    real: int
    fill: int


def padded_chunk(size: int, world_size: int, rank: int) -> PaddedChunk:
    """``padded_chunk(10, 4, 3) == PaddedChunk(9, 1, 2)``: rank 3 of 4 holds element 9 and two
    pads; ranks past the data hold only padding (``real == 0``, ``start == size``)."""
    chunk = -(-size // world_size)
    start = min(rank * chunk, size)
    real = min(chunk, size - start)
    return PaddedChunk(start, real, chunk - real)


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


class DtypeInfo(NamedTuple):
    """What the argument checks need to know about a tensor's dtype; each backend's
    ``dtype_info`` reports it. For a complex dtype, everything but ``kind`` and ``name`` describes
    each of its two (real) parts."""

    kind: DtypeKind
    lo: float  # the lowest finite value; float8_e8m0fnu: 2**-127 (it has no zero, no negatives)
    hi: float  # the highest finite value
    name: str  # as the framework prints the dtype, e.g. "torch.float8_e4m3fn"
    has_inf: bool  # floats: +-inf exist (float8_e4m3fn, the *fnuz types, e8m0 have none)
    has_nan: bool  # floats: NaN exists (float4_e2m1fn and the float6 types have none)


def check_pad_value(func: str, value: object, info: DtypeInfo) -> int | float | complex:
    """Return the number to pad a tensor of dtype ``info`` with, after checking that the dtype
    holds ``value``; raise TypeError for a non-number and ValueError naming ``func``, the value
    and the dtype otherwise.

    Integer dtypes take an integral value in ``[lo, hi]``, bool 0 or 1 (``value`` comes back as
    given). Float dtypes, and each part for complex ones, take a finite value in ``[lo, hi]`` (the
    cast then rounds it to the dtype), an infinity if the dtype has one, and NaN if it has one.
    Any NaN comes back as ``math.nan`` (positive, no payload), so torch and JAX pad the same
    bits, the NaN both make of it (float16 0x7e00, bfloat16 0x7fc0, float32 0x7fc00000, float64
    0x7ff8000000000000); from ``float('-nan')`` they differ (bfloat16, float8_e5m2).
    """
    if not isinstance(value, numbers.Number):
        raise TypeError(
            f"{func}: pad_value must be a Python number, got {value!r} of type "
            f"{type(value).__name__}; pass a scalar such as 0.0."
        )
    # Under torch.compile(dynamic=True) a pad value (even the default) is a symbolic float that
    # Dynamo cannot put into an f-string as it is, but the result of an operation on it, it can:
    # it specializes it to its value (a guard; another value recompiles), so the message shows
    # the value and the graph pads with a constant. On a plain int or float, + is a no-op.
    shown = +value if isinstance(value, (int, float)) and type(value) in (int, float) else value
    cant = f"{func}: pad_value={shown!r} cannot be held by dtype {info.name}"
    if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        if info.kind != "complex":
            raise ValueError(f"{cant}; pass a real pad_value for a {info.kind} tensor.")
        return complex(_float_part(cant, value.real, info), _float_part(cant, value.imag, info))
    if info.kind == "bool":
        if value not in (0, 1):
            raise ValueError(f"{cant}; pass False/True (0 or 1) for a bool tensor.")
        return value  # type: ignore[return-value]
    if info.kind == "int":
        if not _is_integer_in(value, info.lo, info.hi):
            raise ValueError(f"{cant}; pass an integer in [{int(info.lo)}, {int(info.hi)}].")
        return value  # type: ignore[return-value]
    return _float_part(cant, value, info)


def _is_integer_in(value: Any, lo: float, hi: float) -> bool:
    """True when ``value`` is an integer in ``[lo, hi]`` (compared exactly, never through a
    float: ``2**1024`` does not fit one)."""
    if not isinstance(value, numbers.Integral):
        try:
            v = float(value)
        except OverflowError:
            return False
        if not v.is_integer():  # NaN and infinities are not integers either
            return False
    return bool(lo <= value <= hi)


def _float_part(cant: str, part: Any, info: DtypeInfo) -> float:
    """``part`` as the float to pad a float dtype (or one part of a complex dtype) with."""
    instead = f"pass a finite value in [{info.lo!r}, {info.hi!r}]"
    try:
        v = float(part)
    except OverflowError:  # an int too large for any float
        raise ValueError(f"{cant} (it would overflow); {instead}.") from None
    # Comparisons, not math.isnan/isinf: they also work on a symbolic float under torch.compile
    # (as guards on its value), which the math functions reject.
    if v != v:  # NaN
        if info.has_nan:
            return math.nan
        raise ValueError(f"{cant}: the dtype has no NaN; {instead}.")
    if abs(v) == math.inf:
        if info.has_inf:
            return v
        raise ValueError(
            f"{cant}: the dtype has no infinity; {instead} ({info.hi!r} is the largest)."
        )
    if info.lo <= v <= info.hi:
        return v
    if 0 < info.lo and v < info.lo:
        raise ValueError(
            f"{cant}: the dtype has no zero and no negative values; {instead}, e.g. 1.0."
        )
    sign = "-" if v < 0 else ""
    inf = f", or float('{sign}inf') if infinity is what you want" if info.has_inf else ""
    raise ValueError(f"{cant} (it would overflow); {instead}{inf}.")


def is_axis_name(group: object) -> bool:
    """True for a JAX mesh axis name: a ``str`` or a non-empty tuple of ``str``."""
    if isinstance(group, str):
        return True
    return isinstance(group, tuple) and len(group) > 0 and all(isinstance(a, str) for a in group)
