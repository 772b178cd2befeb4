"""JAX benchmarks on an N-device mesh (``sp_common.testing.mesh_of``; ``python -m
benchmarks.run`` sets ``XLA_FLAGS`` before it imports this module, and so JAX).

Every candidate is jitted, its inputs are placed with the sharding it expects, and each timed
call is blocked on its result (``jax_fences``); candidates run interleaved
(``sp_common.testing.interleaved``), the order rotating every repeat.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sp_common import sp_all_to_all, sp_gather
from sp_common.testing import Timings, interleaved, jax_fences, make_data


def hlo_ops(fn: Any, *args: Any) -> dict[str, int]:
    """How many collectives, copies and fusions the compiled (optimized) HLO of ``fn`` holds,
    fused computations included."""
    text = fn.lower(*args).compile().as_text()
    ops = ("all-gather", "all-to-all", "copy", "transpose", "dynamic-slice", "fusion")
    return {op: len(re.findall(rf" {op}(?:-start)?\(", text)) for op in ops}


def gather_vs_reshard(mesh: Mesh, shape: tuple[int, ...], repeats: int) -> tuple[Timings, Any]:
    """``sp_gather`` inside ``jit(shard_map)`` vs XLA's own resharding of the same array (sharded
    on dim 1) to replicated: ``jit(lambda x: x, out_shardings=replicated)``."""
    spec = P(None, "sp")
    x = jax.device_put(make_data(shape, "float32", 0, specials=False), NamedSharding(mesh, spec))
    ours = jax.jit(
        jax.shard_map(lambda s: sp_gather(s, 1), mesh=mesh, in_specs=spec, out_specs=P())
    )
    reshard = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        assert np.array_equal(np.asarray(ours(x)), np.asarray(reshard(x)), equal_nan=True)
        hlo = {"sp_gather": hlo_ops(ours, x), "reshard": hlo_ops(reshard, x)}
        fns = {"sp_gather": lambda: ours(x), "reshard": lambda: reshard(x)}
        times = interleaved(fns, repeats, fences=jax_fences())
    return times, hlo


def all_to_all_vs_raw(mesh: Mesh, shape: tuple[int, ...], repeats: int) -> tuple[Timings, Any]:
    """``sp_all_to_all(x, 2, 1)`` vs ``lax.all_to_all(x, "sp", 2, 1, tiled=True)`` inside
    ``jit(shard_map)`` on the global ``[B, S, H, D]`` array sharded on dim 1."""
    spec_in, spec_out = P(None, "sp"), P(None, None, "sp")
    x = jax.device_put(make_data(shape, "float32", 0, specials=False), NamedSharding(mesh, spec_in))

    def mapped(body: Callable[[Any], Any]) -> Any:
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec_in, out_specs=spec_out))

    ours = mapped(lambda s: sp_all_to_all(s, 2, 1))
    raw = mapped(lambda s: lax.all_to_all(s, "sp", 2, 1, tiled=True))
    with jax.set_mesh(mesh):
        assert np.array_equal(np.asarray(ours(x)), np.asarray(raw(x)))
        hlo = {"sp_all_to_all": hlo_ops(ours, x), "lax.all_to_all": hlo_ops(raw, x)}
        fns = {"sp_all_to_all": lambda: ours(x), "lax.all_to_all": lambda: raw(x)}
        times = interleaved(fns, repeats, fences=jax_fences())
    return times, hlo
