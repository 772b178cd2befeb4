"""The JAX backend: array facts, mesh-axis resolution and the primitive set for sp_common."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jax_core

from sp_common.attention import blocks
from sp_common.backend import Backend
from sp_common.groups import active_group
from sp_common.shapes import DtypeInfo, is_axis_name
from sp_common.strict import strict_enabled, strict_error

from . import autograd, collectives, ring
from .attention import attention as local_attention
from .collectives import AxisName

DEFAULT_AXIS = "sp"
DEFAULT_SOURCE = "the default SP axis"  # where resolve_group found an axis, for messages


def bound_axes() -> tuple[Any, ...]:
    """The axis names bound where this runs, in binding order: inside ``shard_map`` its mesh's
    manual axes (and any ``axis_name`` of an enclosing ``vmap``/``pmap``); ``()`` outside. These
    are the names ``lax.axis_size`` and the collectives look up (jax's trace-context axis env;
    jax has no public query for it)."""
    return tuple(jax_core.unsafe_get_axis_names())


def _unbound(group: AxisName, bound: tuple[Any, ...]) -> list[str]:
    """The names of ``group`` (an axis or a tuple of axes) that are not in ``bound``."""
    return [a for a in ((group,) if isinstance(group, str) else group) if a not in bound]


def check_axis(func: str, group: AxisName, source: str) -> None:
    """Raise ValueError unless every axis of ``group`` is bound here. Only the axis ``"sp"``
    with no axis bound at all (outside ``shard_map``) passes unbound, as world size 1, and not in
    strict mode. ``source`` says where ``group`` came from, for the message."""
    bound = bound_axes()
    missing = _unbound(group, bound)
    if not missing:
        return
    if group == DEFAULT_AXIS and not bound:
        if strict_enabled():
            raise strict_error(
                func,
                "no mesh axis is bound (outside jax.shard_map)",
                f"call it inside jax.shard_map over a mesh with axis {DEFAULT_AXIS!r} (or name "
                "the axis that shard_map binds)",
            )
        return
    axis = repr(group) if isinstance(group, str) else f"{group!r} (axes {missing})"
    if not bound:
        raise ValueError(
            f"{func}: mesh axis {axis}, {source}, is not bound here: no mesh axis is bound "
            "(outside jax.shard_map). Call it inside jax.shard_map over a mesh with that axis; "
            f"only the axis {DEFAULT_AXIS!r} means world size 1 outside shard_map."
        )
    if source == DEFAULT_SOURCE:
        raise ValueError(
            f"{func}: the default SP axis {DEFAULT_AXIS!r} is not bound here; the bound axes are "
            f"{list(bound)}. Name the SP axis (group={bound[-1]!r} or sp_group({bound[-1]!r})), "
            f"or give the mesh an {DEFAULT_AXIS!r} axis (of size 1 for no sequence parallelism)."
        )
    raise ValueError(
        f"{func}: mesh axis {axis}, {source}, is not bound here; the bound axes are "
        f"{list(bound)}. Name one of those, or run it inside jax.shard_map over a mesh with "
        "that axis."
    )


class JaxBackend(Backend[AxisName]):
    framework = "jax"

    def is_tensor(self, x: object) -> bool:
        return isinstance(x, jax.Array)

    def shape(self, x: jax.Array) -> tuple[int, ...]:
        return tuple(x.shape)

    def dtype_info(self, x: jax.Array) -> DtypeInfo:
        dt, name = x.dtype, str(x.dtype)
        if dt == jnp.bool_:
            return DtypeInfo("bool", 0, 1, name, has_inf=False, has_nan=False)
        if jnp.issubdtype(dt, jnp.inexact):
            finfo = jnp.finfo(dt)  # of each part for complex dtypes
            # finfo does not say whether infinities and NaN exist; the cast does (float8_e4m3fn
            # turns inf into NaN, float4_e2m1fn turns inf into 6 and NaN into -0).
            with np.errstate(all="ignore"):
                inf, nan = np.array([np.inf, np.nan], np.float32).astype(finfo.dtype)
            return DtypeInfo(
                "complex" if jnp.issubdtype(dt, jnp.complexfloating) else "float",
                float(finfo.min),
                float(finfo.max),
                name,
                has_inf=bool(np.isinf(inf)),
                has_nan=bool(np.isnan(nan)),
            )
        iinfo = jnp.iinfo(dt)
        return DtypeInfo("int", int(iinfo.min), int(iinfo.max), name, has_inf=False, has_nan=False)

    def resolve_group(self, func: str, group: Any) -> AxisName:
        source = "named by the group= argument"
        if group is None:
            group, source = active_group("jax"), "named by the enclosing sp_group(...) block"
            if group is None:
                group, source = DEFAULT_AXIS, DEFAULT_SOURCE
        if not is_axis_name(group):
            raise TypeError(
                f"{func}: group must be a mesh axis name (a str or a tuple of str) for a JAX "
                f"array, got {group!r} of type {type(group).__name__}; pass e.g. group='sp'."
            )
        check_axis(func, group, source)
        return group  # type: ignore[no-any-return]

    def world_size(self, group: AxisName) -> int:
        # After resolve_group an axis is unbound only as "sp" outside shard_map: world size 1.
        return 1 if _unbound(group, bound_axes()) else int(lax.axis_size(group))

    def rank(self, group: AxisName) -> Any:
        return 0 if _unbound(group, bound_axes()) else lax.axis_index(group)

    # The differentiable primitives are the autograd functions themselves.
    shard = staticmethod(autograd.shard)
    check_shard_rule = staticmethod(autograd.check_shard_rule)
    gather = staticmethod(autograd.gather)
    reduce_scatter = staticmethod(autograd.reduce_scatter)
    all_to_all = staticmethod(autograd.all_to_all)

    def valid_mask(self, like: jax.Array, total: int, valid: int) -> jax.Array:
        return jnp.arange(total) < valid

    attention = staticmethod(local_attention)

    def ring_attention(
        self, spec: Any, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None
    ) -> jax.Array:
        return ring.ring_attention(self, spec, q, k, v, key_mask)

    def two_axes(self, func: str, group: AxisName) -> tuple[str, str]:
        if isinstance(group, tuple) and len(group) == 2:
            return group[0], group[1]
        raise ValueError(
            f"{func}: strategy='usp' needs a group of two mesh axes, (ring_axis, ulysses_axis), "
            f"got group={group!r}; pass e.g. group=('ring', 'ulysses') inside a shard_map over "
            "both axes (sp_shard and sp_gather take the same tuple)."
        )

    ring_shift = staticmethod(collectives.ring_shift)

    def loop(self, start: int, stop: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
        if stop - start < 2:
            return super().loop(start, stop, body, carry)
        return lax.fori_loop(start, stop, body, carry)

    def branch(
        self, pred: Any, if_true: Callable[[Any], Any], if_false: Callable[[Any], Any], x: Any
    ) -> Any:
        if isinstance(pred, (bool, np.bool_)):
            return if_true(x) if pred else if_false(x)
        return lax.cond(pred, if_true, if_false, x)

    def block_forward(
        self,
        q5: jax.Array,
        k: jax.Array,
        v: jax.Array,
        allowed: Any,
        scale: float,
        causal: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        allowed = blocks.with_causal(self, q5, k, allowed, causal)
        return ring.block_forward(self, q5, k, v, allowed, scale)

    def block_grads(
        self,
        q5: jax.Array,
        k: jax.Array,
        v: jax.Array,
        allowed: Any,
        scale: float,
        lse: jax.Array,
        do5: jax.Array,
        delta: jax.Array,
        o5: Any = None,
        causal: bool = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        allowed = blocks.with_causal(self, q5, k, allowed, causal)
        return ring.block_grads(self, q5, k, v, allowed, scale, lse, do5, delta)

    def einsum(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum(spec, a, b)

    def exp(self, x: jax.Array) -> jax.Array:
        return jnp.exp(x)

    def logsumexp(self, x: jax.Array, dim: int) -> jax.Array:
        return jax.nn.logsumexp(x, axis=dim)

    def logaddexp(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.logaddexp(a, b)

    def where(self, cond: jax.Array, a: Any, b: Any) -> jax.Array:
        return jnp.where(cond, a, b)

    def concat(self, xs: list[jax.Array], dim: int) -> jax.Array:
        return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=dim)

    def zeros_like(self, x: jax.Array) -> jax.Array:
        return jnp.zeros_like(x)

    def repeat_interleave(self, x: jax.Array, dim: int, repeats: int) -> jax.Array:
        return jnp.repeat(x, repeats, axis=dim)

    def take(self, x: jax.Array, dim: int, indices: tuple[int, ...]) -> jax.Array:
        return jnp.take(x, np.asarray(indices), axis=dim)

    def arange(self, like: jax.Array, length: int) -> jax.Array:
        return jnp.arange(length)

    def to_float32(self, x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32)

    def cast_like(self, x: jax.Array, like: jax.Array) -> jax.Array:
        return x.astype(like.dtype)

    def reshape(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return x.reshape(shape)

    def logical_and(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return a & b

    def pad_end(self, x: jax.Array, dim: int, pad: int, value: Any) -> jax.Array:
        config = [(0, 0, 0)] * x.ndim
        config[dim] = (0, pad, 0)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
            # torch casts a Python float to a narrower float dtype through float32; so do we, or
            # some values (1 + 2**-8 + 2**-40 into bfloat16) round the other way than in torch.
            value = np.float32(value)
        return lax.pad(x, jnp.asarray(value, dtype=x.dtype), config)

    def is_plan_target(self, target: object, mesh: object) -> bool:
        return mesh is not None and callable(target)

    def apply_plan(self, target: Any, plan: Any, mesh: Any, options: Mapping[str, Any]) -> Any:
        from .plan import apply_plan

        return apply_plan(target, plan, mesh, **options)

    def truncate(self, x: jax.Array, dim: int, length: int) -> jax.Array:
        return lax.slice_in_dim(x, 0, length, axis=dim)
