"""Raw JAX collectives along a dimension over a mesh axis, with no custom gradient.

Valid inside ``jax.shard_map`` where ``axis`` is bound. ``axis`` is a mesh axis name or a tuple
of names (then the ranks are the axes' linearized index, as in ``lax.axis_index``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sp_common.shapes import shard_bounds

AxisName = str | tuple[str, ...]


def _axes(axis: AxisName) -> frozenset[str]:
    return frozenset((axis,) if isinstance(axis, str) else axis)


def _varying_axes(x: Any) -> frozenset[str]:
    """The mesh axes ``x`` is typed as varying over (``aval.mat.varying``; ``aval.vma`` in JAX
    releases before the manual-axis-type rework)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vma_tracked(axis: AxisName) -> bool:
    """Whether shard_map tracks varying-ness here (``check_vma=True``): ``axis_index`` is always
    varying over ``axis`` when it does, and carries no axes when it does not."""
    return _axes(axis) <= _varying_axes(lax.axis_index(axis))


def varies_over(x: Any, axis: AxisName) -> bool:
    """Whether ``x`` is typed as varying over every axis of ``axis``."""
    return _axes(axis) <= _varying_axes(x)


def _empty(shape: list[int], dtype: Any, axis: AxisName, invariant: bool) -> jax.Array:
    """The (empty) result of a collective over an empty array, typed like the collective's.
    XLA rejects collectives over zero-size dimensions, and there is nothing to move."""
    empty = jnp.zeros(shape, dtype)
    return empty if invariant or not vma_tracked(axis) else lax.pcast(empty, axis, to="varying")


def local_chunk(x: jax.Array, dim: int, axis: AxisName) -> jax.Array:
    """This device's chunk along ``dim``: ``[.., S, ..] -> [.., S/N, ..]`` (a dynamic_slice)."""
    _, length = shard_bounds(x.shape[dim], lax.axis_size(axis), 0)
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * length, length, axis=dim)


def all_gather_along(x: jax.Array, dim: int, axis: AxisName, *, invariant: bool) -> jax.Array:
    """Concatenate every device's ``x`` along ``dim``: ``[.., s, ..] -> [.., N*s, ..]``.

    ``invariant=True`` types the result device-invariant (returnable with ``out_specs=P()``).
    An empty ``x`` moves nothing (XLA rejects an all-gather over a zero-size dimension)."""
    if x.size == 0:
        shape = list(x.shape)
        shape[dim] *= lax.axis_size(axis)
        return _empty(shape, x.dtype, axis, invariant)
    return lax.all_gather(x, axis, axis=dim, tiled=True, to="invarying" if invariant else "varying")


def reduce_scatter_along(x: jax.Array, dim: int, axis: AxisName) -> jax.Array:
    """Sum ``x`` over devices, keep this device's chunk: ``[.., N*s, ..] -> [.., s, ..]``."""
    if x.size == 0:
        return local_chunk(x, dim, axis)
    return lax.psum_scatter(x, axis, scatter_dimension=dim, tiled=True)


def all_to_all_along(x: jax.Array, scatter_dim: int, gather_dim: int, axis: AxisName) -> jax.Array:
    """Send chunk j of ``scatter_dim`` to device j; concatenate what arrives along
    ``gather_dim``: ``[.., N*c, .., g, ..] -> [.., c, .., N*g, ..]``. JAX transposes it to the
    same all-to-all with the dims swapped."""
    if x.size == 0:
        shape = list(x.shape)
        shape[scatter_dim] //= lax.axis_size(axis)
        shape[gather_dim] *= lax.axis_size(axis)
        return _empty(shape, x.dtype, axis, invariant=False)
    return lax.all_to_all(x, axis, scatter_dim, gather_dim, tiled=True)


@jax.tree_util.register_pytree_node_class
class Moving:
    """Arrays sent on by ``ring_shift``; ``wait()`` gives them (XLA orders the transfer)."""

    def __init__(self, arrays: tuple[Any, ...]) -> None:
        self.arrays = arrays

    def wait(self) -> tuple[Any, ...]:
        return self.arrays

    def tree_flatten(self) -> tuple[tuple[Any, ...], None]:
        return self.arrays, None

    @classmethod
    def tree_unflatten(cls, _: None, arrays: tuple[Any, ...]) -> Moving:
        return cls(tuple(arrays))


def ring_shift(tensors: tuple[Any, ...], group: AxisName) -> Moving:
    """Each tensor sent to index ``i + 1`` of axis ``group`` (the last to 0): one ``ppermute`` each,
    which XLA runs asynchronously beside the independent compute. An input typed invariant
    over ``group`` is made varying first (every index then sends its own copy)."""
    n = lax.axis_size(group)
    ring = [(i, (i + 1) % n) for i in range(n)]
    moved = []
    for x in tensors:
        if vma_tracked(group) and not varies_over(x, group):
            x = lax.pcast(x, group, to="varying")
        moved.append(lax.ppermute(x, group, ring))
    return Moving(tuple(moved))
