"""Collectives between shard and gather: all-to-all and reduce-scatter, written once over the
backend primitives."""

from __future__ import annotations

from typing import Any, TypeVar

from .api import prepare
from .shapes import check_divisible, normalize_dim

T = TypeVar("T")


def sp_all_to_all(tensor: T, scatter_dim: int, gather_dim: int, *, group: Any = None) -> T:
    """Split ``scatter_dim`` into N chunks, send chunk j to rank j, and concatenate the chunks
    received along ``gather_dim`` in rank order.

    Shapes: ``[.., N*c (scatter_dim), .., g (gather_dim), ..] -> [.., c, .., N*g, ..]``. The
    Ulysses step ``[B, S/N, H, D] -> [B, S, H/N, D]`` is ``sp_all_to_all(x, 2, 1)``, and its
    inverse ``sp_all_to_all(y, 1, 2)``. Every rank passes the same shape (different data).

    torch: one ``all_to_all_single``, with relayout copies only where the memory layout needs
    them. JAX: ``lax.all_to_all(tiled=True)``. Backward (both): the all-to-all with the two dims
    swapped. World size 1 returns ``tensor``.

    Raises:
        ValueError: the size of ``scatter_dim`` is not divisible by N, or a dim is out of range.
    """
    backend, shape, s, g, n = prepare("sp_all_to_all", tensor, scatter_dim, group)
    d = normalize_dim("sp_all_to_all", gather_dim, shape)
    check_divisible(
        "sp_all_to_all",
        shape,
        s,
        n,
        hint="pad that dim to a multiple of the world size first (sp_shard_with_padding pads "
        "sequences; head counts must divide)",
    )
    if n == 1:
        return tensor
    backend.check_consistent("sp_all_to_all", tensor, s, g)
    return backend.all_to_all(tensor, s, d, g)


def sp_reduce_scatter(tensor: T, dim: int, *, group: Any = None) -> T:
    """Sum ``tensor`` over the SP ranks and keep this rank's chunk of ``dim``.

    Shapes: ``[.., N*s, ..] -> [.., s, ..]``. Rank r gets elements ``[r*s, (r+1)*s)`` of the sum.
    Backward: gather of the gradient (the conjugate of :func:`sp_gather`'s ``"reduce_scatter"``
    rule). World size 1 returns ``tensor``.

    Raises:
        ValueError: the size of ``dim`` is not divisible by N, or ``dim`` is out of range.
        TypeError: a bool tensor (a sum of bools is not a bool; cast to an integer dtype).
    """
    backend, shape, d, g, n = prepare("sp_reduce_scatter", tensor, dim, group)
    if backend.dtype_info(tensor).kind == "bool":
        raise TypeError(
            "sp_reduce_scatter: tensor has dtype bool, whose sum over ranks is not a bool; cast "
            "it to an integer dtype first."
        )
    check_divisible(
        "sp_reduce_scatter", shape, d, n, hint="pad that dim to a multiple of the world size"
    )
    if n == 1:
        return tensor
    backend.check_consistent("sp_reduce_scatter", tensor, d, g)
    return backend.reduce_scatter(tensor, d, g)
