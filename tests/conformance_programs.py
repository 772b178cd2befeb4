"""The programs of the gradient conformance table, each written once over ``sp_common`` and the
operators torch tensors and JAX arrays share (``*``, ``**``, ``.sum()``), so the same code runs
on torch ranks, on a JAX mesh and, at world size 1, as the single-device program.

``program(x, w) -> loss``: ``x`` is replicated (the same on every rank), ``w`` a fixed weight of
``x``'s shape (of the output's shape, for ``ulysses`` and ``attention``). A *replicated*
program's loss is the same on every rank; a *per-rank* program returns this rank's term of the
loss (the loss is the sum of the terms). Cubes make the second derivative non-trivial
(``d2/dx2 x**3 = 6x``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

from sp_common import (
    sp_all_to_all,
    sp_attention,
    sp_gather,
    sp_reduce_scatter,
    sp_shard,
    sp_shard_with_padding,
    sp_ulysses_attention,
    sp_unpad,
    sp_world_size,
)


def shard_gather(x: Any, w: Any) -> Any:
    return (sp_gather(sp_shard(x, 1) ** 3, 1) * w).sum()


def padded(x: Any, w: Any) -> Any:
    s, p = sp_shard_with_padding(x, 1)
    return (sp_gather(s**3, 1, pad_size=p) * w).sum()


def unpad(x: Any, w: Any) -> Any:
    s, p = sp_shard_with_padding(x, 1)
    return (sp_unpad(sp_gather(s**3, 1), 1, p) * w).sum()


def all_to_all(x: Any, w: Any) -> Any:
    heads = sp_all_to_all(sp_shard(x, 1), 2, 1)  # [B, S/N, H, D] -> [B, S, H/N, D]
    return (sp_gather(sp_all_to_all(heads**3, 1, 2), 1) * w).sum()


def reduce_scatter(x: Any, w: Any) -> Any:
    # Each rank holds the whole cube under the reduce-scatter rule; the reduce-scatter sums the N
    # equal copies, so divide by N (a power of two: exact).
    full = sp_gather(sp_shard(x, 1) ** 3, 1, grad_rule="reduce_scatter")
    return (sp_gather(sp_reduce_scatter(full, 1) / sp_world_size(x), 1) * w).sum()


def per_rank_terms(x: Any, w: Any) -> Any:
    # The program of the exactness issue: after a reduce-scatter-rule gather each rank computes
    # its own term; sharding that per-rank tensor needs the "local" rule.
    full = sp_gather(sp_shard(x, 1) ** 3, 1, grad_rule="reduce_scatter")
    return (sp_shard(full, 1, grad_rule="local") * sp_shard(w, 1)).sum()


def ulysses(x: Any, w: Any) -> Any:
    s, p = sp_shard_with_padding(x, 1)
    with _math_attention(x):
        out = sp_ulysses_attention(s, s * 0.5, s**2, seq_len=x.shape[1])
    return (sp_gather(out, 1, pad_size=p) * w).sum()


def zigzag(x: Any, w: Any) -> Any:
    s, p = sp_shard_with_padding(x, 1, layout="zigzag")
    return (sp_gather(s**3, 1, pad_size=p, layout="zigzag") * w).sum()


def attention(x: Any, w: Any, strategy: str = "ulysses") -> Any:
    # Causal, grouped KV heads (6 query heads, 3 key/value heads: padded heads on 4 ranks
    # under Ulysses), a padded sequence.
    s, p = sp_shard_with_padding(x, 1)
    kv = s[:, :, :3]
    with _math_attention(x):
        out = sp_attention(s, kv * 0.5, kv**2, strategy=strategy, causal=True, seq_len=x.shape[1])
    return (sp_gather(out, 1, pad_size=p) * w).sum()


def allgather_kv(x: Any, w: Any) -> Any:
    return attention(x, w, "allgather_kv")


def ring(x: Any, w: Any) -> Any:
    return attention(x, w, "ring")


def _math_attention(x: Any) -> Any:
    """torch: SDPA's math kernel, the one with a double backward (the fused CPU kernels have
    none: grad of grad through them raises "derivative ... is not implemented")."""
    if type(x).__module__.startswith("torch"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Row:
    """One program: the public functions it exercises, and how it must match single-device."""

    program: Callable[[Any, Any], Any]
    covers: tuple[str, ...]
    shape: tuple[int, ...]
    per_rank: bool = False
    bitwise: bool = True  # first order; pure data movement around one elementwise cube
    # torch: the second derivative exists (else it must raise, never come out wrong)
    torch_second_order: bool = True


ROWS: dict[str, Row] = {
    "shard_gather": Row(shard_gather, ("sp_shard", "sp_gather"), (2, 8, 3)),
    "padded": Row(padded, ("sp_shard_with_padding", "sp_gather"), (2, 10, 3)),
    "unpad": Row(unpad, ("sp_unpad",), (2, 10, 3)),
    "zigzag": Row(zigzag, ("sp_shard_with_padding", "sp_gather"), (2, 10, 3)),
    "all_to_all": Row(all_to_all, ("sp_all_to_all",), (2, 8, 4, 3)),
    "reduce_scatter": Row(reduce_scatter, ("sp_reduce_scatter", "sp_gather"), (2, 8, 3)),
    "per_rank_terms": Row(per_rank_terms, ("sp_shard", "sp_gather"), (2, 8, 3), per_rank=True),
    "ulysses": Row(ulysses, ("sp_ulysses_attention",), (1, 10, 4, 3), bitwise=False),
    "attention": Row(attention, ("sp_attention",), (1, 10, 6, 3), bitwise=False),
    "allgather_kv": Row(allgather_kv, ("sp_attention",), (1, 10, 6, 3), bitwise=False),
    "ring": Row(ring, ("sp_attention",), (1, 10, 6, 3), bitwise=False, torch_second_order=False),
}
