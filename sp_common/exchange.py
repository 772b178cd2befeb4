"""Collectives between shard and gather: all-to-all and reduce-scatter, written once over the
backend primitives."""

from __future__ import annotations

from typing import Any, TypeVar

from .api import LOCAL_ERRORS, resolve
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
        ValueError: the size of ``scatter_dim`` is not divisible by N, or a dim is out of range;
            in debug mode (torch), ranks that disagree on the shape, dtype or either dim.
    """
    func = "sp_all_to_all"
    backend, g, n = resolve(func, tensor, group)
    try:
        shape = backend.shape(tensor)
        s = normalize_dim(func, scatter_dim, shape)
        d = normalize_dim(func, gather_dim, shape)
        check_divisible(
            func,
            shape,
            s,
            n,
            hint="pad that dim to a multiple of the world size first (sp_shard_with_padding pads "
            "sequences; head counts must divide)",
        )
    except LOCAL_ERRORS as e:
        if n > 1:
            passed = {"scatter_dim": scatter_dim, "gather_dim": gather_dim}
            backend.check_consistent(func, g, {"tensor": tensor}, passed, e)
        raise
    if n == 1:
        return tensor
    agreed = {"scatter_dim": s, "gather_dim": d}
    backend.check_consistent(func, g, {"tensor": tensor}, agreed)
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
    func = "sp_reduce_scatter"
    backend, g, n = resolve(func, tensor, group)
    try:
        shape = backend.shape(tensor)
        d = normalize_dim(func, dim, shape)
        if backend.dtype_info(tensor).kind == "bool":
            raise TypeError(
                f"{func}: tensor has dtype bool, whose sum over ranks is not a bool; cast it to "
                "an integer dtype first."
            )
        check_divisible(func, shape, d, n, hint="pad that dim to a multiple of the world size")
    except LOCAL_ERRORS as e:
        if n > 1:
            backend.check_consistent(func, g, {"tensor": tensor}, {"dim": dim}, e)
        raise
    if n == 1:
        return tensor
    backend.check_consistent(func, g, {"tensor": tensor}, {"dim": d})
    return backend.reduce_scatter(tensor, d, g)
