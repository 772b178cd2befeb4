"""JAX meshes for tests, benchmarks and tools: the first n devices, and ``jit(shard_map(...))``
over them. Imports JAX when called."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["mesh_of", "run_sharded", "sharded", "spec_on"]


def mesh_of(
    n: int,
    axis: str | tuple[str, ...] = "sp",
    devices: list[Any] | None = None,
    shape: tuple[int, ...] | None = None,
) -> Any:
    """A ``jax.sharding.Mesh`` over the first ``n`` of ``devices`` (default: ``jax.devices()``):
    1-D named ``axis``, or of ``shape`` (row-major, product ``n``) with the axes named by the
    tuple ``axis``. ValueError when there are fewer than ``n`` devices."""
    import jax
    import numpy as np

    found = list(jax.devices() if devices is None else devices)
    if len(found) < n:
        raise ValueError(
            f"mesh_of: n={n} devices asked for, {len(found)} present; on the CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts."
        )
    names = (axis,) if isinstance(axis, str) else axis
    return jax.sharding.Mesh(np.array(found[:n]).reshape(shape or (n,)), names)


def spec_on(dim: int | None, axis: str = "sp") -> Any:
    """The PartitionSpec that splits ``dim`` over ``axis`` (``None``: replicated)."""
    from jax.sharding import PartitionSpec as P

    return P() if dim is None else P(*([None] * dim), axis)


def sharded(
    fn: Callable[..., Any], n: int, in_specs: Any, out_specs: Any, check_vma: bool = True
) -> Callable[..., Any]:
    """``jit(shard_map(fn))`` over an n-device mesh with axis ``"sp"`` (no mesh context)."""
    import jax

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
    import jax
    from jax.sharding import PartitionSpec as P

    in_specs = tuple(P() for _ in args) if in_specs is None else in_specs
    with jax.set_mesh(mesh_of(n)):
        return sharded(fn, n, in_specs, out_specs, check_vma)(*args)
