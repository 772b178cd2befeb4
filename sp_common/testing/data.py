"""Seeded inputs, numpy references of the semantics, bitwise comparison and conversions.

Everything here is numpy (bfloat16 and the float8 types through ml_dtypes); the converters import
torch or JAX only when called. Tests, benchmarks, examples and ``sp-compare`` all use these, so
"the same input" and "bitwise equal" mean one thing across the tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "all_to_all",
    "assert_bitwise",
    "bits",
    "make_data",
    "numpy_dtype",
    "pad_size",
    "padded_shards",
    "reduce_scatter",
    "same_bits",
    "shards",
    "to_jax",
    "to_numpy",
    "to_torch",
]

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPES = (*FLOAT_DTYPES, "int32", "int64", "int8", "bool")

_SPECIALS = (np.nan, -0.0, np.inf)


def numpy_dtype(dtype: str | np.dtype[Any]) -> np.dtype[Any]:
    """The numpy dtype named ``dtype`` ("bfloat16" and "float8_*" come from ml_dtypes)."""
    if isinstance(dtype, np.dtype):
        return dtype
    found = getattr(ml_dtypes, dtype, None)
    return np.dtype(found if found is not None else dtype)


def make_data(
    shape: Sequence[int], dtype: str | np.dtype[Any], seed: int, *, specials: bool = True
) -> np.ndarray:
    """Seeded data of ``shape`` and ``dtype``: standard normal floats (with one NaN, one -0.0
    and one inf when ``specials``, so that "bitwise" means bitwise; without, finite values for
    arithmetic), integers over the dtype's whole range, or random bools."""
    rng = np.random.default_rng(seed)
    dt, shape = numpy_dtype(dtype), tuple(shape)
    if dt == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    x = rng.standard_normal(shape).astype(dt)
    if specials:
        flat = x.reshape(-1)
        for i, special in enumerate(_SPECIALS):
            if i < flat.size:
                flat[(i * 7919) % flat.size] = special
    return x


# ------------------------------------------------------------------------------ references


def pad_size(size: int, n: int) -> int:
    """Elements appended so that ``n`` divides ``size``."""
    return -size % n


def shards(x: np.ndarray, dim: int, n: int) -> list[np.ndarray]:
    """Chunk r of ``n`` equal chunks along ``dim`` (``n`` must divide the size)."""
    if x.shape[dim] % n:
        raise ValueError(f"shards: size {x.shape[dim]} of dim {dim} is not divisible by {n}.")
    return np.split(x, n, axis=dim)


def padded_shards(
    x: np.ndarray, dim: int, n: int, pad_value: Any = 0
) -> tuple[list[np.ndarray], int]:
    """``x`` padded at the end of ``dim`` with ``pad_value`` to a multiple of ``n``, in ``n``
    chunks; and the pad size."""
    p = pad_size(x.shape[dim], n)
    widths = [(0, 0)] * x.ndim
    widths[dim] = (0, p)
    padded = np.pad(x, widths, constant_values=np.array(pad_value).astype(x.dtype))
    return shards(padded, dim, n), p


def all_to_all(stacked: np.ndarray, scatter_dim: int, gather_dim: int) -> list[np.ndarray]:
    """Rank r's all-to-all result when rank j holds ``stacked[j]``."""
    n = stacked.shape[0]
    chunks = [np.split(stacked[j], n, axis=scatter_dim) for j in range(n)]
    return [np.concatenate([chunks[j][r] for j in range(n)], axis=gather_dim) for r in range(n)]


def reduce_scatter(stacked: np.ndarray, dim: int) -> list[np.ndarray]:
    """Rank r's chunk of the sum over ranks (summed in rank order)."""
    total = stacked[0].copy()
    for j in range(1, stacked.shape[0]):
        total = total + stacked[j]
    return np.split(total, stacked.shape[0], axis=dim)


# ------------------------------------------------------------------------------- comparison


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of ``a`` (so NaN payloads and -0.0 compare exactly)."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, same shape, same bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def assert_bitwise(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """AssertionError naming ``what`` unless ``actual`` and ``expected`` are bitwise equal."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(bits(actual), bits(expected)), f"{what}: bits differ"


# ------------------------------------------------------------------------------ conversions


def to_torch(a: np.ndarray, device: Any = None) -> Any:
    """``a`` as a torch tensor (on ``device``), bit for bit; ml_dtypes dtypes become torch's."""
    import torch

    a = np.ascontiguousarray(a)
    name = a.dtype.name
    if a.dtype.type.__module__.startswith("ml_dtypes"):
        raw = torch.from_numpy(a.view(np.dtype(f"int{8 * a.dtype.itemsize}")))
        t = raw.view(getattr(torch, name))
    else:
        t = torch.from_numpy(a)
    return t if device is None else t.to(device)


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor or a JAX array (one device's data) as numpy, bit for bit (bfloat16 and
    float8 as ml_dtypes)."""
    if type(t).__module__.startswith("torch"):
        import torch

        t = t.detach().cpu().contiguous()
        found = getattr(ml_dtypes, str(t.dtype).removeprefix("torch."), None)
        if found is not None:
            raw = t.view(getattr(torch, f"int{8 * t.element_size()}"))
            return raw.numpy().view(np.dtype(found))
        return np.asarray(t.numpy())
    return np.asarray(t)


def to_jax(a: np.ndarray) -> Any:
    """``a`` as a JAX array on the default device, bit for bit."""
    import jax.numpy as jnp

    return jnp.asarray(a)
