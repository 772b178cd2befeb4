"""Custom VJPs that state the gradient rules explicitly, so they hold under both
``shard_map(check_vma=True)`` and ``check_vma=False`` (where JAX's own transposes of a replicated
input differ)."""

from __future__ import annotations

from functools import partial

import jax
from jax import lax

from .collectives import (
    AxisName,
    all_gather_along,
    all_to_all_along,
    local_chunk,
    reduce_scatter_along,
    varies_over,
    vma_tracked,
)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _shard_replicated(x: jax.Array, dim: int, axis: AxisName) -> jax.Array:
    return local_chunk(x, dim, axis)


def _shard_fwd(x: jax.Array, dim: int, axis: AxisName) -> tuple[jax.Array, None]:
    return local_chunk(x, dim, axis), None


def _shard_bwd(dim: int, axis: AxisName, _: None, grad: jax.Array) -> tuple[jax.Array]:
    return (all_gather_along(grad, dim, axis, invariant=True),)


_shard_replicated.defvjp(_shard_fwd, _shard_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_slice_grad(x: jax.Array, dim: int, axis: AxisName) -> jax.Array:
    return all_gather_along(x, dim, axis, invariant=True)


def _gather_slice_fwd(x: jax.Array, dim: int, axis: AxisName) -> tuple[jax.Array, None]:
    return all_gather_along(x, dim, axis, invariant=True), None


def _gather_slice_bwd(dim: int, axis: AxisName, _: None, grad: jax.Array) -> tuple[jax.Array]:
    return (local_chunk(grad, dim, axis),)


_gather_slice_grad.defvjp(_gather_slice_fwd, _gather_slice_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_reduce_scatter_grad(x: jax.Array, dim: int, axis: AxisName) -> jax.Array:
    return all_gather_along(x, dim, axis, invariant=False)


def _gather_rs_fwd(x: jax.Array, dim: int, axis: AxisName) -> tuple[jax.Array, None]:
    return all_gather_along(x, dim, axis, invariant=False), None


def _gather_rs_bwd(dim: int, axis: AxisName, _: None, grad: jax.Array) -> tuple[jax.Array]:
    return (reduce_scatter_along(grad, dim, axis),)


_gather_reduce_scatter_grad.defvjp(_gather_rs_fwd, _gather_rs_bwd)


def shard(x: jax.Array, dim: int, axis: AxisName) -> jax.Array:
    """Backward: gather of the gradient for a replicated ``x`` (the contract). An ``x`` typed as
    varying over ``axis`` holds different data per device; JAX's own transpose of the slice is
    then the exact gradient."""
    if vma_tracked(axis) and varies_over(x, axis):
        return local_chunk(x, dim, axis)
    return _shard_replicated(x, dim, axis)


def gather(x: jax.Array, dim: int, axis: AxisName, grad_rule: str) -> jax.Array:
    """Backward: this device's slice (``"slice"``) or the reduce-scatter sum."""
    if vma_tracked(axis) and not varies_over(x, axis):
        # An invariant input: cast it to varying first; JAX transposes that cast to a psum, which
        # sums the gradients of the N identical chunks.
        x = lax.pcast(x, axis, to="varying")
    fn = _gather_slice_grad if grad_rule == "slice" else _gather_reduce_scatter_grad
    return fn(x, dim, axis)


def reduce_scatter(x: jax.Array, dim: int, axis: AxisName) -> jax.Array:
    """Backward: gather of the gradient (JAX's own transpose of ``psum_scatter``)."""
    return reduce_scatter_along(x, dim, axis)


def all_to_all(x: jax.Array, scatter_dim: int, gather_dim: int, axis: AxisName) -> jax.Array:
    """Backward: the all-to-all with the dims swapped (JAX's own transpose)."""
    return all_to_all_along(x, scatter_dim, gather_dim, axis)
