"""What ``sp-compare`` runs: the ops, their seeded inputs, numpy references and result checks.

Framework-free (numpy only). The torch ranks and the JAX runner both rebuild a case's inputs here
from its seed, so no large array crosses a process boundary, and both check their results here.
Each op is written once over ``sp_common`` (:func:`op_function`), so both backends run the same
code.

Layouts: an input or output with layout ``d`` (an int) is split in N equal blocks along dim ``d``,
block r on rank r; layout ``None`` is the full array on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

OPS = ("shard", "gather", "padded", "all-to-all", "ulysses")
OP_DESCRIPTIONS = {
    "shard": "sp_shard(x, dim)",
    "gather": "sp_gather(shard, dim)",
    "padded": "sp_shard_with_padding(x, dim) + sp_gather(shard, dim, pad_size=...)",
    "all-to-all": "sp_all_to_all(shard, scatter_dim=last other dim, gather_dim=dim)",
    "ulysses": "sp_ulysses_attention(q, k, v) on [B, S/N, heads, D] shards",
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPES = (*FLOAT_DTYPES, "int32", "int64", "int8", "bool")
# Ulysses outputs are checked against float64 numpy attention: |out - ref| <= tol + tol * |ref|.
ULYSSES_TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
# Why JAX's attention (jax.nn.dot_product_attention, under sp_ulysses_attention) fails that check
# in these float dtypes; sp-compare refuses them for ulysses on JAX. torch passes in every one.
ULYSSES_JAX_FAILS = {
    "float16": "JAX attention raises for float16 on the CPU (no float16 dot with float32 sums)",
    "float64": "JAX attention takes the softmax in float32: about 1e-7 off, tolerance 1e-10",
}
ULYSSES_JAX_DTYPES = tuple(d for d in FLOAT_DTYPES if d not in ULYSSES_JAX_FAILS)

# numpy has no bfloat16 without ml_dtypes: bfloat16 data lives here as its uint16 bit patterns.
_STORAGE = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "float64": np.float64,
    "int32": np.int32,
    "int64": np.int64,
    "int8": np.int8,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class Case:
    """One op on one global shape, as every backend runs it.

    ``shape`` is the full (unsharded) shape: ``[B, S, H]``-like for most ops, ``[B, S, heads, D]``
    for ``"ulysses"``, and S - 1 tokens for ``"padded"`` when N divides S (so it always pads).
    ``seq_len`` is the sweep value S this case belongs to.
    """

    op: str
    shape: tuple[int, ...]
    dim: int
    dtype: str
    world_size: int
    seq_len: int
    warmup: int
    repeats: int
    seed: int = 0

    @property
    def scatter_dim(self) -> int:
        return scatter_dim_for(len(self.shape), self.dim)

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


def scatter_dim_for(ndim: int, dim: int) -> int:
    """The all-to-all's scatter dim: the last dim other than the sequence dim ``dim``."""
    return ndim - 1 if dim != ndim - 1 else ndim - 2


def storage_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype that holds ``dtype``'s bits (uint16 for bfloat16)."""
    return np.dtype(_STORAGE[dtype])


def to_float64(a: np.ndarray, dtype: str) -> np.ndarray:
    """Values of ``a`` (stored as by :func:`storage_dtype`) as float64."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def _from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # truncate to the top 16 bits (specials keep their class)
        return (np.ascontiguousarray(values).view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(storage_dtype(dtype))


def make_data(shape: Sequence[int], dtype: str, seed: int, specials: bool = True) -> np.ndarray:
    """Seeded data of ``shape``; floats carry NaN, -0.0 and inf when ``specials`` (so a bitwise
    check is one)."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(tuple(shape)) < 0.5
    if dtype not in FLOAT_DTYPES:
        info = np.iinfo(storage_dtype(dtype))
        return rng.integers(info.min, info.max, size=tuple(shape), dtype=storage_dtype(dtype))
    values = rng.standard_normal(tuple(shape), dtype=np.float32)
    if specials:
        flat = values.reshape(-1)
        for i, special in enumerate((np.nan, -0.0, np.inf)):
            if i < flat.size:
                flat[(i * 7919) % flat.size] = special
    return _from_float32(values, dtype)


def input_layouts(case: Case) -> list[int | None]:
    """Layout of each input of the op (see the module docstring)."""
    if case.op in ("shard", "padded"):
        return [None]
    if case.op == "ulysses":
        return [1, 1, 1]
    return [case.dim]


def output_layouts(case: Case) -> list[int | None]:
    """Layout of each output of the op."""
    layouts: dict[str, list[int | None]] = {
        "shard": [case.dim],
        "gather": [None],
        "padded": [case.dim, None],
        "all-to-all": [case.scatter_dim],
        "ulysses": [1],
    }
    return layouts[case.op]


def global_inputs(case: Case) -> list[np.ndarray]:
    """The full inputs: ``[x]``, or ``[q, k, v]`` for Ulysses (finite values)."""
    if case.op == "ulysses":
        return [make_data(case.shape, case.dtype, case.seed + i, specials=False) for i in range(3)]
    return [make_data(case.shape, case.dtype, case.seed)]


def block(a: np.ndarray, layout: int | None, n: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s part of the global array ``a`` under ``layout``."""
    return a if layout is None else np.split(a, n, axis=layout)[rank]


def rank_inputs(case: Case, full: list[np.ndarray], rank: int) -> list[np.ndarray]:
    """What rank ``rank`` passes to the op."""
    layouts = input_layouts(case)
    return [block(a, d, case.world_size, rank) for a, d in zip(full, layouts, strict=True)]


def _padded(x: np.ndarray, dim: int, n: int) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[dim] = (0, -x.shape[dim] % n)
    return np.pad(x, widths)


def attention_rows(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, stop: int
) -> np.ndarray:
    """float64 softmax attention of query positions ``[start, stop)`` over every key.

    Shapes: q, k, v ``[B, S, H, D]`` -> ``[B, stop - start, H, D]``; scale ``1/sqrt(D)``. Query
    rows go in blocks, so the scores never take more than about 256 MiB.
    """
    batch, seq, heads, _ = k.shape
    rows = max(1, (1 << 25) // (batch * heads * seq))
    out = []
    for lo in range(start, stop, rows):
        block_q = q[:, lo : min(lo + rows, stop)]
        scores = np.einsum("bqhd,bkhd->bhqk", block_q, k) / math.sqrt(q.shape[-1])
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out.append(np.einsum("bhqk,bkhd->bqhd", scores, v))
    return np.concatenate(out, axis=1)


def expected_outputs(case: Case, full: list[np.ndarray], rank: int) -> list[np.ndarray]:
    """Rank ``rank``'s expected results (float64 values for Ulysses, exact bits otherwise)."""
    n = case.world_size
    if case.op == "ulysses":
        q, k, v = (to_float64(a, case.dtype) for a in full)
        s = case.shape[1] // n
        return [attention_rows(q, k, v, rank * s, (rank + 1) * s)]
    x = full[0]
    if case.op == "padded":
        return [block(_padded(x, case.dim, n), case.dim, n, rank), x]
    return [block(x, d, n, rank) for d in output_layouts(case)]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(
            np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
        )
    )


def check(case: Case, actual: list[np.ndarray], expected: list[np.ndarray]) -> tuple[bool, str]:
    """(ok, what differs) for one rank's results: bitwise, or allclose for Ulysses."""
    if len(actual) != len(expected):
        return False, f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.shape != e.shape:
            return False, f"output {i}: shape {a.shape}, expected {e.shape}"
        if case.op == "ulysses":
            tol = ULYSSES_TOL[case.dtype]
            values = to_float64(a, case.dtype)
            if not np.all(np.abs(values - e) <= tol + tol * np.abs(e)):
                err = float(np.max(np.abs(values - e)))
                return False, f"output {i}: max |diff| {err:.3g} > tol {tol:g}"
        elif not _same_bits(a, e):
            return False, f"output {i}: bits differ"
    return True, ""


def check_description(case: Case) -> str:
    if case.op == "ulysses":
        tol = ULYSSES_TOL[case.dtype]
        return f"allclose to float64 numpy attention (atol=rtol={tol:g})"
    return "bitwise equal to numpy"


def op_function(case: Case) -> Callable[..., tuple[Any, ...]]:
    """The op as a function of this rank's inputs returning its outputs, written once over
    ``sp_common`` (the backend follows the tensors)."""
    from . import (
        sp_all_to_all,
        sp_gather,
        sp_shard,
        sp_shard_with_padding,
        sp_ulysses_attention,
    )

    dim, scatter = case.dim, case.scatter_dim

    def shard(x: Any) -> tuple[Any, ...]:
        return (sp_shard(x, dim),)

    def gather(s: Any) -> tuple[Any, ...]:
        return (sp_gather(s, dim),)

    def padded(x: Any) -> tuple[Any, ...]:
        s, pad = sp_shard_with_padding(x, dim)
        return s, sp_gather(s, dim, pad_size=pad)

    def all_to_all(s: Any) -> tuple[Any, ...]:
        return (sp_all_to_all(s, scatter, dim),)

    def ulysses(q: Any, k: Any, v: Any) -> tuple[Any, ...]:
        return (sp_ulysses_attention(q, k, v),)

    fns: dict[str, Callable[..., tuple[Any, ...]]] = {
        "shard": shard,
        "gather": gather,
        "padded": padded,
        "all-to-all": all_to_all,
        "ulysses": ulysses,
    }
    return fns[case.op]


def result_bytes(case: Case) -> int:
    """Bytes of one rank's results (the numerator of the table's GB/s)."""
    itemsize = storage_dtype(case.dtype).itemsize
    n, total = case.world_size, math.prod(case.shape)
    if case.op == "padded":  # the padded shard, and the gathered tensor (pad removed)
        size = case.shape[case.dim]
        shard = total // size * (size + -size % n) // n
        return (shard + total) * itemsize
    per_rank = {"gather": total}.get(case.op, total // n)
    return per_rank * itemsize


def raised(e: BaseException) -> str:
    """One line naming an exception an op raised (its message's first line)."""
    lines = str(e).strip().splitlines()
    return f"raised {type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
