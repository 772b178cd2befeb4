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


def run_sharded(
    fn: Callable[..., Any],
    n: int,
    args: tuple[Any, ...],
    out_specs: Any,
    check_vma: bool = True,
    in_specs: Any = None,
) -> Any:
    mesh = mesh_of(n)
    in_specs = tuple(P() for _ in args) if in_specs is None else in_specs
    with jax.set_mesh(mesh):
        mapped = jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
        )
        return jax.jit(mapped)(*args)
