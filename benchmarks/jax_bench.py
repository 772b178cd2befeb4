"""JAX benchmarks on an N-device mesh (``sp_common.testing.mesh_of``; ``python -m
benchmarks.run`` sets ``XLA_FLAGS`` before it imports this module, and so JAX).

Every candidate is jitted, its inputs are placed with the sharding it expects, and each timed
call is blocked on its result (``jax_fences``); candidates run interleaved
(``sp_common.testing.interleaved``), the order rotating every repeat.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from backend_jax.attention import attention as local_attention
from sp_common import sp_all_to_all, sp_attention, sp_gather
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


def attention_vs_floor(
    mesh: Mesh, shape: tuple[int, ...], causal: bool, backward: bool, repeats: int
) -> tuple[Timings, Any]:
    """``sp_attention`` (Ulysses) inside ``jit(shard_map)`` on the global ``[B, S, H, D]`` q, k,
    v sharded on the sequence vs the floor in one ``jit(shard_map)``: ``lax.all_to_all`` of q,
    k, v to ``[B, S, H/N, D]``, the local kernel alone (``backend_jax.attention.attention``),
    ``lax.all_to_all`` of the output back. ``backward``: the output and the q, k, v gradients
    (``jax.vjp`` inside the shard_map; the output's gradient sharded as the output). Checks
    first that the two agree bitwise (the same kernel on the same arrays); returns the timings
    and both candidates' HLO op counts."""
    spec = P(None, "sp")
    sharding = NamedSharding(mesh, spec)
    q, k, v, grad = (
        jax.device_put(make_data(shape, "float32", seed, specials=False), sharding)
        for seed in range(4)
    )
    scale = 1.0 / math.sqrt(shape[3])

    def floor(qs: jax.Array, ks: jax.Array, vs: jax.Array) -> jax.Array:
        qh, kh, vh = (lax.all_to_all(t, "sp", 2, 1, tiled=True) for t in (qs, ks, vs))
        out = local_attention(qh, kh, vh, scale=scale, causal=causal, key_mask=None)
        return lax.all_to_all(out, "sp", 1, 2, tiled=True)

    def ours(qs: jax.Array, ks: jax.Array, vs: jax.Array) -> jax.Array:
        return sp_attention(qs, ks, vs, strategy="ulysses", causal=causal)

    def mapped(body: Callable[..., Any]) -> Any:
        if not backward:
            return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))

        def step(qs: jax.Array, ks: jax.Array, vs: jax.Array, g: jax.Array) -> Any:
            out, pull = jax.vjp(body, qs, ks, vs)
            return (out, *pull(g))

        return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4))

    args = (q, k, v, grad) if backward else (q, k, v)
    candidates = {"sp_attention": mapped(ours), "floor": mapped(floor)}
    with jax.set_mesh(mesh):
        got = {name: jax.tree.leaves(fn(*args)) for name, fn in candidates.items()}
        for a, b in zip(got["sp_attention"], got["floor"], strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        hlo = {name: hlo_ops(fn, *args) for name, fn in candidates.items()}
        fns = {name: partial(fn, *args) for name, fn in candidates.items()}
        times = interleaved(fns, repeats, fences=jax_fences())
    return times, hlo
