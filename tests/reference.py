"""The numpy reference of the semantics, seeded inputs, and bitwise comparison helpers."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "bool": np.dtype(np.bool_),
}


def make_input(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Seeded data; float inputs carry NaN, -0.0 and inf so that "bitwise" means bitwise."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("int"):
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    x = rng.standard_normal(shape).astype(np.float32).astype(dt)
    flat = x.reshape(-1)
    for i, special in enumerate((np.nan, -0.0, np.inf)):
        if i < flat.size:
            flat[(i * 7919) % flat.size] = special
    return x


def pad_size(size: int, n: int) -> int:
    return -size % n


def shards(x: np.ndarray, dim: int, n: int) -> list[np.ndarray]:
    """Chunk r of n equal chunks along dim (the size must divide)."""
    assert x.shape[dim] % n == 0
    return np.split(x, n, axis=dim)


def padded_shards(x: np.ndarray, dim: int, n: int, pad_value: Any) -> tuple[list[np.ndarray], int]:
    p = pad_size(x.shape[dim], n)
    widths = [(0, 0)] * x.ndim
    widths[dim] = (0, p)
    padded = np.pad(x, widths, constant_values=np.array(pad_value).astype(x.dtype))
    return shards(padded, dim, n), p


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of ``a`` (so NaN payloads and -0.0 compare exactly)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(-1)


def assert_bitwise(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(bits(actual), bits(expected)), f"{what}: bits differ"


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
