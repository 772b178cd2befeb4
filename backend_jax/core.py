"""The JAX backend: array facts, mesh-axis resolution and the primitive set for sp_common."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sp_common.backend import Backend
from sp_common.grad_rules import GatherGradRule, ShardGradRule
from sp_common.groups import active_group
from sp_common.shapes import DtypeInfo, is_axis_name

from . import autograd
from .collectives import AxisName

DEFAULT_AXIS = "sp"


class JaxBackend(Backend):
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
        if group is None:
            group = active_group("jax")
            if group is None:
                return DEFAULT_AXIS
        if not is_axis_name(group):
            raise TypeError(
                f"{func}: group must be a mesh axis name (a str or a tuple of str) for a JAX "
                f"array, got {group!r} of type {type(group).__name__}; pass e.g. group='sp'."
            )
        return group  # type: ignore[no-any-return]

    def world_size(self, group: AxisName) -> int:
        try:
            return int(lax.axis_size(group))
        except NameError:  # the axis is not bound: outside shard_map
            return 1

    def rank(self, group: AxisName) -> Any:
        try:
            return lax.axis_index(group)
        except NameError:
            return 0

    def shard(self, x: jax.Array, dim: int, group: AxisName, grad_rule: ShardGradRule) -> jax.Array:
        return autograd.shard(x, dim, group, grad_rule)

    def check_shard_rule(
        self, func: str, x: jax.Array, group: AxisName, grad_rule: ShardGradRule
    ) -> None:
        autograd.check_shard_rule(func, x, group, grad_rule)

    def gather(
        self, x: jax.Array, dim: int, group: AxisName, grad_rule: GatherGradRule
    ) -> jax.Array:
        return autograd.gather(x, dim, group, grad_rule)

    def reduce_scatter(self, x: jax.Array, dim: int, group: AxisName) -> jax.Array:
        return autograd.reduce_scatter(x, dim, group)

    def all_to_all(
        self, x: jax.Array, scatter_dim: int, gather_dim: int, group: AxisName
    ) -> jax.Array:
        return autograd.all_to_all(x, scatter_dim, gather_dim, group)

    def valid_mask(self, like: jax.Array, total: int, valid: int) -> jax.Array:
        return jnp.arange(total) < valid

    def attention(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        key_mask: jax.Array | None,
        scale: float | None,
    ) -> jax.Array:
        mask = None if key_mask is None else key_mask.reshape(1, 1, 1, -1)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)

    def pad_end(self, x: jax.Array, dim: int, pad: int, value: Any) -> jax.Array:
        config = [(0, 0, 0)] * x.ndim
        config[dim] = (0, pad, 0)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
            # torch casts a Python float to a narrower float dtype through float32; so do we, or
            # some values (1 + 2**-8 + 2**-40 into bfloat16) round the other way than in torch.
            value = np.float32(value)
        return lax.pad(x, jnp.asarray(value, dtype=x.dtype), config)

    def prefix(self, x: jax.Array, dim: int, length: int) -> jax.Array:
        return lax.slice_in_dim(x, 0, length, axis=dim)
