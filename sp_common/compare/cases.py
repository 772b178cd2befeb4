"""What ``sp-compare`` runs: the ops, the cases, their tolerances, each op written once.

Imports neither a framework nor numpy (``sp-compare --help`` works without the ``compare``
extra); the inputs and their checks are in :mod:`.checks`. Each op is written once over
``sp_common`` (:func:`op_function`), so both backends run the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionOp:
    """An attention op: ``sp_common.<function>(q, k, v)``, with ``strategy=`` when one is named.

    Every attention op takes ``[B, S/N, heads, D]`` shards of q, k, v and is checked against the
    same float64 numpy attention (:data:`ATTENTION_TOL`).
    """

    function: str
    strategy: str | None = None

    @property
    def call(self) -> str:
        strategy = "" if self.strategy is None else f', strategy="{self.strategy}"'
        return f"{self.function}(q, k, v{strategy})"


# "usp" needs a two-axis group (sp-compare runs one axis of N); "auto" runs one of these three.
ATTENTION_OPS = {
    "ulysses": AttentionOp("sp_ulysses_attention"),
    "allgather_kv": AttentionOp("sp_attention", "allgather_kv"),
    "ring": AttentionOp("sp_attention", "ring"),
}
OP_DESCRIPTIONS = {
    "shard": "sp_shard(x, dim)",
    "gather": "sp_gather(shard, dim)",
    "padded": "sp_shard_with_padding(x, dim) + sp_gather(shard, dim, pad_size=...)",
    "all-to-all": "sp_all_to_all(shard, scatter_dim=last other dim, gather_dim=dim)",
    **{name: f"{op.call} on [B, S/N, heads, D] shards" for name, op in ATTENTION_OPS.items()},
}
OPS = tuple(OP_DESCRIPTIONS)
# allgather_kv and ring are left out of the default run: with them `make demo`'s sweep (4 CPU
# ranks, S up to 2048) took 114 s instead of 55 s on the 2-core machine; name them with --ops.
DEFAULT_OPS = ("shard", "gather", "padded", "all-to-all", "ulysses")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPES = (*FLOAT_DTYPES, "int32", "int64", "int8", "bool")
# Attention outputs are checked against float64 numpy attention: |out - ref| <= tol + tol * |ref|.
ATTENTION_TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}

ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int32": 4,
    "int64": 8,
    "int8": 1,
    "bool": 1,
}


@dataclass(frozen=True)
class Case:
    """One op on one global shape, as every backend runs it.

    ``shape`` is the full (unsharded) shape: ``[B, S, H]``-like for most ops, ``[B, S, heads, D]``
    for the attention ops (:data:`ATTENTION_OPS`), and S - 1 tokens for ``"padded"`` when N
    divides S (so it always pads).
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


def check_description(case: Case) -> str:
    if case.op in ATTENTION_OPS:
        tol = ATTENTION_TOL[case.dtype]
        return f"allclose to float64 numpy attention (atol=rtol={tol:g})"
    return "bitwise equal to numpy"


def op_function(case: Case) -> Callable[..., tuple[Any, ...]]:
    """The op as a function of this rank's inputs returning its outputs, written once over
    ``sp_common`` (the backend follows the tensors)."""
    import sp_common

    if case.op in ATTENTION_OPS:
        op = ATTENTION_OPS[case.op]
        function = getattr(sp_common, op.function)
        kwargs = {} if op.strategy is None else {"strategy": op.strategy}

        def attention(q: Any, k: Any, v: Any) -> tuple[Any, ...]:
            return (function(q, k, v, **kwargs),)

        return attention

    dim, scatter = case.dim, case.scatter_dim

    def shard(x: Any) -> tuple[Any, ...]:
        return (sp_common.sp_shard(x, dim),)

    def gather(s: Any) -> tuple[Any, ...]:
        return (sp_common.sp_gather(s, dim),)

    def padded(x: Any) -> tuple[Any, ...]:
        s, pad = sp_common.sp_shard_with_padding(x, dim)
        return s, sp_common.sp_gather(s, dim, pad_size=pad)

    def all_to_all(s: Any) -> tuple[Any, ...]:
        return (sp_common.sp_all_to_all(s, scatter, dim),)

    fns: dict[str, Callable[..., tuple[Any, ...]]] = {
        "shard": shard,
        "gather": gather,
        "padded": padded,
        "all-to-all": all_to_all,
    }
    return fns[case.op]


def result_bytes(case: Case) -> int:
    """Bytes of one rank's results (the numerator of the table's GB/s)."""
    itemsize = ITEMSIZE[case.dtype]
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
