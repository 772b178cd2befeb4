"""Run a function under ``jax.shard_map`` on the first n virtual CPU devices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P


def mesh_of(n: int, axis: str = "sp") -> jax.sharding.Mesh:
    devices = np.array(jax.devices()[:n])
    assert devices.size == n, f"need {n} JAX devices, have {len(jax.devices())}"
    return jax.sharding.Mesh(devices, (axis,))


def spec_on(dim: int, axis: str = "sp") -> P:
    """A PartitionSpec that concatenates per-device blocks along ``dim``."""
    return P(*([None] * dim), axis)


def sharded(
    fn: Callable[..., Any],
    n: int,
    in_specs: Any,
    out_specs: Any,
    check_vma: bool = True,
) -> Callable[..., Any]:
    """``jit(shard_map(fn))`` over an n-device mesh with axis ``"sp"`` (no mesh context)."""
    mapped = jax.shard_map(
        fn, mesh=mesh_of(n), in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
    )
    return jax.jit(mapped)


def run_sharded(
    fn: Callable[..., Any],
    n: int,
    args: tuple[Any, ...],
    out_specs: Any,
    check_vma: bool = True,
    in_specs: Any = None,
) -> Any:
    """Call ``sharded(fn, ...)`` on ``args`` (replicated unless ``in_specs`` says otherwise)."""
    in_specs = tuple(P() for _ in args) if in_specs is None else in_specs
    with jax.set_mesh(mesh_of(n)):
        return sharded(fn, n, in_specs, out_specs, check_vma)(*args)
