"""Sequence layouts: which positions of the sequence each rank holds, written once.

``"contiguous"`` (the default): rank r holds chunk r of N. ``"zigzag"`` (load-balanced causal
attention): the sequence is cut into 2N equal chunks and rank r holds chunks r and 2N-1-r, so
under a causal mask every rank has the same amount of work. With N = 4 and chunks 0..7::

    rank 0: [0 | 7]   rank 1: [1 | 6]   rank 2: [2 | 5]   rank 3: [3 | 4]

A zigzag shard is the contiguous shard of the sequence with its chunks reordered to
``0, 2N-1, 1, 2N-2, ...``, and a zigzag gather the contiguous gather put back in order, so the
gradient rules are those of the contiguous ops.
"""

from __future__ import annotations

from typing import Any, Literal

from .backend import Backend

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")


def check_layout(func: str, layout: object) -> Layout:
    """``layout`` as a :data:`Layout`; ValueError naming ``func`` for anything else."""
    if layout == "contiguous" or layout == "zigzag":
        return layout  # type: ignore[return-value]
    raise ValueError(
        f"{func}: layout={layout!r} is not one of 'contiguous', 'zigzag'; pass one of them."
    )


def parts(layout: Layout) -> int:
    """Chunks per rank: the sequence length must be a multiple of ``N * parts(layout)``."""
    return 2 if layout == "zigzag" else 1


def zigzag_order(n: int) -> tuple[int, ...]:
    """The 2N chunks in the order the ranks hold them: ``0, 2N-1, 1, 2N-2, ...``."""
    return tuple(c for r in range(n) for c in (r, 2 * n - 1 - r))


def _reorder(backend: Backend[Any], x: Any, dim: int, order: tuple[int, ...]) -> Any:
    shape = backend.shape(x)
    size = shape[dim] // len(order)
    chunked = backend.reshape(x, (*shape[:dim], len(order), size, *shape[dim + 1 :]))
    return backend.reshape(backend.take(chunked, dim, order), shape)


def to_zigzag(backend: Backend[Any], x: Any, dim: int, n: int) -> Any:
    """``x`` (size divisible by 2N along ``dim``) with its 2N chunks in zigzag order, so that
    contiguous chunk r of the result is zigzag shard r. Shapes unchanged."""
    return _reorder(backend, x, dim, zigzag_order(n))


def from_zigzag(backend: Backend[Any], x: Any, dim: int, n: int) -> Any:
    """The inverse of :func:`to_zigzag`: the rank-order concatenation of zigzag shards put
    back in sequence order. Shapes unchanged."""
    order = zigzag_order(n)
    return _reorder(backend, x, dim, tuple(order.index(c) for c in range(2 * n)))


def positions(layout: Layout, index: Any, local: int, n: int, rank: Any) -> Any:
    """The global sequence positions of the elements at ``index`` (an int vector, or int) of
    rank ``rank``'s shard of ``local`` elements; written with arithmetic only, so it works on
    torch tensors, JAX arrays (``rank`` may be a traced ``axis_index``) and ints."""
    if layout == "contiguous":
        return rank * local + index
    half = local // 2
    second = index // half  # 0: chunk r, 1: chunk 2N-1-r
    return (rank + second * (2 * n - 1 - 2 * rank)) * half + index % half


def sequence_positions(layout: Layout, index: Any, local: int, n: int) -> Any:
    """The global positions of ``index`` into the rank-order concatenation of all N shards
    (what a gather or an all-to-all over the sequence produces)."""
    return positions(layout, index % local, local, n, index // local)
