"""The gradient rules of shard and gather in JAX.

Under ``shard_map(check_vma=True)`` custom VJPs state the rules explicitly (JAX types a replicated
value as invariant and would otherwise psum its chunk gradients itself). Under
``check_vma=False`` JAX has one convention of its own: the cotangent of a replicated output
(``out_specs=P()``) is divided by N on each device and the per-device cotangents of a replicated
input are summed; JAX's own transposes (pad for the slice, ``psum_scatter`` for the all-gather)
compose exactly with it, first and second order, so there the plain collectives are used and
both rules of each op coincide (a custom VJP would give whole gradients that JAX then sums
again, off by N in the second order)."""

from __future__ import annotations

from functools import partial

import jax
from jax import lax

from sp_common.grad_rules import GatherGradRule, ShardGradRule

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


def shard(x: jax.Array, dim: int, group: AxisName, grad_rule: ShardGradRule) -> jax.Array:
    """``"gather"``: the backward is the gather of the gradient (a replicated ``x``, one loss).
    ``"local"``: JAX's own transpose of the slice, this device's gradient chunk in place with
    zeros elsewhere (a per-device ``x`` or per-device loss terms; with ``check_vma=True`` the
    transpose of an ``x`` typed varying)."""
    if grad_rule == "local" or not vma_tracked(group):
        return local_chunk(x, dim, group)
    return _shard_replicated(x, dim, group)


def check_shard_rule(func: str, x: jax.Array, group: AxisName, grad_rule: ShardGradRule) -> None:
    """Under ``check_vma=True`` JAX knows whether ``x`` varies over ``group``: refuse the rule
    that does not match (``"gather"`` of a varying ``x`` would sum its per-device gradients
    twice; ``"local"`` of an invariant one cannot return a per-device gradient)."""
    if not vma_tracked(group):
        return
    varying = varies_over(x, group)
    if grad_rule == "gather" and varying:
        raise ValueError(
            f"{func}: the tensor varies over mesh axis {group!r} (its values, or its gradient, "
            "differ per device, e.g. the output of sp_gather(..., grad_rule='reduce_scatter')), "
            "so its gradient is per-device; pass grad_rule='local'."
        )
    if grad_rule == "local" and not varying:
        raise ValueError(
            f"{func}: grad_rule='local' needs a tensor that varies over mesh axis {group!r}, but "
            "this one is device-invariant (replicated), so its gradient is the whole gradient; "
            "leave grad_rule out (the default 'gather')."
        )


def gather(x: jax.Array, dim: int, group: AxisName, grad_rule: GatherGradRule) -> jax.Array:
    """Backward: this device's slice (``"slice"``) or the reduce-scatter sum (the same under
    ``check_vma=False``: JAX's own ``psum_scatter`` of the cotangents it divided by N)."""
    if not vma_tracked(group):
        return all_gather_along(x, dim, group, invariant=False)
    if not varies_over(x, group):
        # An invariant input: cast it to varying first; JAX transposes that cast to a psum, which
        # sums the gradients of the N identical chunks.
        x = lax.pcast(x, group, to="varying")
    fn = _gather_slice_grad if grad_rule == "slice" else _gather_reduce_scatter_grad
    return fn(x, dim, group)


def reduce_scatter(x: jax.Array, dim: int, group: AxisName) -> jax.Array:
    """Backward: gather of the gradient (JAX's own transpose of ``psum_scatter``)."""
    return reduce_scatter_along(x, dim, group)


def all_to_all(x: jax.Array, scatter_dim: int, gather_dim: int, group: AxisName) -> jax.Array:
    """Backward: the all-to-all with the dims swapped (JAX's own transpose)."""
    return all_to_all_along(x, scatter_dim, gather_dim, group)
