"""The inputs of ``sp-compare``'s cases and the checks of their results (numpy).

The torch ranks and the JAX runner both rebuild a case's inputs here from its seed, so no large
array crosses a process boundary, and both check their results here against the numpy
references of :mod:`sp_common.testing.data`.

Layouts: an input or output with layout ``d`` (an int) is split in N equal blocks along dim ``d``,
block r on rank r; layout ``None`` is the full array on every rank.
"""

from __future__ import annotations

import numpy as np

from ..testing.attention import reference_attention
from ..testing.data import make_data, padded_shards, same_bits
from .cases import ATTENTION_OPS, ATTENTION_TOL, Case


def input_layouts(case: Case) -> list[int | None]:
    """Layout of each input of the op (see the module docstring)."""
    if case.op in ("shard", "padded"):
        return [None]
    if case.op in ATTENTION_OPS:
        return [1, 1, 1]
    return [case.dim]


def output_layouts(case: Case) -> list[int | None]:
    """Layout of each output of the op."""
    if case.op in ATTENTION_OPS:
        return [1]
    layouts: dict[str, list[int | None]] = {
        "shard": [case.dim],
        "gather": [None],
        "padded": [case.dim, None],
        "all-to-all": [case.scatter_dim],
    }
    return layouts[case.op]


def global_inputs(case: Case) -> list[np.ndarray]:
    """The full inputs: ``[x]``, or ``[q, k, v]`` for an attention op (finite values)."""
    if case.op in ATTENTION_OPS:
        return [make_data(case.shape, case.dtype, case.seed + i, specials=False) for i in range(3)]
    return [make_data(case.shape, case.dtype, case.seed)]


def block(a: np.ndarray, layout: int | None, n: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s part of the global array ``a`` under ``layout``."""
    return a if layout is None else np.split(a, n, axis=layout)[rank]


def rank_inputs(case: Case, full: list[np.ndarray], rank: int) -> list[np.ndarray]:
    """What rank ``rank`` passes to the op."""
    layouts = input_layouts(case)
    return [block(a, d, case.world_size, rank) for a, d in zip(full, layouts, strict=True)]


def expected_outputs(case: Case, full: list[np.ndarray], rank: int) -> list[np.ndarray]:
    """Rank ``rank``'s expected results (float64 values for attention, exact bits otherwise)."""
    n = case.world_size
    if case.op in ATTENTION_OPS:
        q, k, v = (a.astype(np.float64) for a in full)
        s = case.shape[1] // n
        return [reference_attention(q, k, v, rows=(rank * s, (rank + 1) * s))]
    x = full[0]
    if case.op == "padded":
        return [padded_shards(x, case.dim, n)[0][rank], x]
    return [block(x, d, n, rank) for d in output_layouts(case)]


def check(case: Case, actual: list[np.ndarray], expected: list[np.ndarray]) -> tuple[bool, str]:
    """(ok, what differs) for one rank's results: bitwise, or allclose for attention."""
    if len(actual) != len(expected):
        return False, f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.shape != e.shape:
            return False, f"output {i}: shape {a.shape}, expected {e.shape}"
        if case.op in ATTENTION_OPS:
            tol = ATTENTION_TOL[case.dtype]
            values = a.astype(np.float64)
            if not np.all(np.abs(values - e) <= tol + tol * np.abs(e)):
                err = float(np.max(np.abs(values - e)))
                return False, f"output {i}: max |diff| {err:.3g} > tol {tol:g}"
        elif not same_bits(a, e):
            return False, f"output {i}: bits differ"
    return True, ""
