"""Apply an SPPlan to a JAX function: a transform that wraps it in ``shard_map``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from sp_common.groups import active_group
from sp_common.plan import (
    GatherOutput,
    PlanError,
    ShardInput,
    SPPlan,
    active_run,
    begin_run,
    end_run,
)
from sp_common.plan_args import gather_output, locate_inputs, shard_inputs

from .core import DEFAULT_AXIS


def _is_array_tree(value: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(value)
    return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)


def _check_mesh_has_sp_axis(mesh: Any) -> None:
    """PlanError unless ``mesh`` has the plan's SP axis (the active ``sp_group`` axis, else
    ``"sp"``): shard_map over it would leave the axis unbound."""
    axes = getattr(mesh, "axis_names", None)
    if axes is None:
        raise TypeError(
            f"apply_plan: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; pass e.g. "
            "jax.make_mesh((n,), ('sp',))."
        )
    group = active_group("jax") or DEFAULT_AXIS
    missing = [a for a in ((group,) if isinstance(group, str) else group) if a not in axes]
    if missing:
        raise PlanError(
            f"apply_plan: the plan shards over the SP axis {group!r}, but mesh has axes "
            f"{tuple(axes)}; give the mesh that axis (jax.make_mesh(..., axis_names=(..., "
            f"{missing[0]!r}))) or name one of its axes with sp_group(...) around apply_plan."
        )


def apply_plan(
    fn: Callable[..., Any], plan: SPPlan, mesh: jax.sharding.Mesh, *, check_vma: bool = True
) -> Callable[..., Any]:
    """``fn`` wrapped in ``jax.shard_map`` over ``mesh``, sharding and gathering what ``plan``
    names on ``fn``'s own arguments and outputs (plan path ``""``).

    Every argument that is an array (or a pytree of arrays, such as parameters) enters
    replicated (``P()``); other arguments are static. The ShardInput arguments are sharded on
    the SP axis (``"sp"``, or the active ``sp_group``), ``fn`` runs per device, and the
    GatherOutput outputs are gathered; the result is replicated (``out_specs=P()``), so every
    output must be gathered or device-invariant. Works under ``jit`` and ``grad`` (enter
    ``jax.set_mesh(mesh)`` to differentiate on jax 0.10's Explicit meshes). A Flax NNX module
    can be passed as ``fn`` through a pure function of its state.
    """
    if not isinstance(plan, SPPlan):
        raise TypeError(f"apply_plan: plan must be an SPPlan, got {type(plan).__name__}.")
    _check_mesh_has_sp_axis(mesh)
    specs = plan.specs()
    others = sorted(p for p in specs if p != "")
    if others:
        raise PlanError(
            f"apply_plan: plan paths {others}: a JAX plan shards the function's own arguments and "
            "gathers its own outputs (path ''); JAX functions have no submodule hooks."
        )
    shards = [s for s in specs.get("", ()) if isinstance(s, ShardInput)]
    gathers = [s for s in specs.get("", ()) if isinstance(s, GatherOutput)]
    slots = locate_inputs(getattr(fn, "__name__", "<function>"), fn, shards)

    @functools.wraps(fn)
    def planned(*args: Any, **kwargs: Any) -> Any:
        def present(spec: ShardInput, value: Any) -> Any:
            if value is None:
                raise PlanError(
                    f"<model> input {spec.arg!r}: the plan shards it, but the call passed None."
                )
            return value

        shard_inputs("<model>", slots, args, kwargs, present)
        # Arrays (and pytrees of arrays) enter shard_map replicated; the rest stays static.
        arrays: dict[tuple[str, Any], Any] = {
            ("args", i): v for i, v in enumerate(args) if _is_array_tree(v)
        }
        arrays |= {("kwargs", k): v for k, v in kwargs.items() if _is_array_tree(v)}

        def body(arrays: dict[tuple[str, Any], Any]) -> Any:
            outer = begin_run()
            try:
                run = active_run()
                assert run is not None  # begin_run just set it
                passed = [arrays.get(("args", i), v) for i, v in enumerate(args)]
                named = {k: arrays.get(("kwargs", k), v) for k, v in kwargs.items()}

                def shard(spec: ShardInput, value: Any) -> Any:
                    return run.shard("", spec, value)

                call_args, call_kwargs = shard_inputs("<model>", slots, passed, named, shard)
                out = fn(*call_args, **call_kwargs)
                for spec in gathers:

                    def gather(value: Any, spec: GatherOutput = spec) -> Any:
                        return run.gather("", spec, value)

                    out = gather_output("<model>", spec, out, gather)
            except BaseException:
                end_run(outer, check=False)
                raise
            end_run(outer)
            return out

        mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(),), out_specs=P(), check_vma=check_vma)
        return mapped(arrays)

    return planned
