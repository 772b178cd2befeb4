"""The JAX side of ``sp-compare``: each case as ``jit(shard_map(op))`` over an N-device mesh.

Inputs are placed on the mesh with the shardings ``shard_map`` expects before timing, so a timed
call moves no input. Outputs that every device holds in full are returned with a leading axis of
1 under ``P("sp")``, so each device's own copy comes back and is checked. Importing this module
imports no framework.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..testing.data import to_numpy
from ..testing.timing import interleaved, jax_fences
from .cases import Case, op_function, raised
from .checks import check, expected_outputs, global_inputs, input_layouts, output_layouts

AXIS = "sp"


def devices(platform: str) -> list[Any]:
    """The devices of ``platform`` (``"cpu"`` or ``"gpu"``); empty when it has none."""
    import jax

    try:
        return list(jax.devices(platform))
    except RuntimeError:  # no backend for that platform
        return []


def _spec(layout: int | None) -> Any:
    from jax.sharding import PartitionSpec as P

    return P() if layout is None else P(*([None] * layout), AXIS)


def compiled_case(
    case: Case, full: list[np.ndarray], mesh: Any
) -> tuple[Callable[..., Any], list[Any]]:
    """``(jit(shard_map(op)), the global inputs ``full`` placed on the mesh)`` for ``case``."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    fn = op_function(case)
    in_layouts, out_layouts = input_layouts(case), output_layouts(case)

    def body(*xs: Any) -> tuple[Any, ...]:
        outs = fn(*xs)
        return tuple(
            o if d is not None else o[None] for o, d in zip(outs, out_layouts, strict=True)
        )

    out_specs = tuple(_spec(d) if d is not None else P(AXIS) for d in out_layouts)
    in_specs = tuple(_spec(d) for d in in_layouts)
    mapped = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs))
    inputs = [
        jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(full, in_specs, strict=True)
    ]
    return mapped, inputs


def per_device(outputs: tuple[Any, ...], case: Case, mesh_devices: list[Any]) -> list[list[Any]]:
    """``result[r]``: device r's outputs as numpy, in the op's output order."""
    order = {d: r for r, d in enumerate(mesh_devices)}
    result: list[list[Any]] = [[None] * len(outputs) for _ in mesh_devices]
    for i, (out, layout) in enumerate(zip(outputs, output_layouts(case), strict=True)):
        for shard in out.addressable_shards:
            data = to_numpy(shard.data)
            result[order[shard.device]][i] = data if layout is not None else data[0]
    return result


def run_case(case: Case, mesh_devices: list[Any]) -> tuple[bool, str, list[float]]:
    """Check the first call on every device, warm up, then time ``case.repeats`` calls, each
    blocked on its result. Returns ``(correct, what differs, seconds per repeat)``."""
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(mesh_devices), (AXIS,))
    with jax.set_mesh(mesh):
        full = global_inputs(case)
        fn, inputs = compiled_case(case, full, mesh)
        try:
            outputs = jax.block_until_ready(fn(*inputs))
        except Exception as e:
            return False, raised(e), []
        details = []
        for r, actual in enumerate(per_device(outputs, case, mesh_devices)):
            ok, detail = check(case, actual, expected_outputs(case, full, r))
            if not ok:
                details.append(f"device {r}: {detail}")
        del outputs, full
        times = interleaved({"op": lambda: fn(*inputs)}, case.repeats, case.warmup, jax_fences())
    return not details, "; ".join(details), times["op"]


def run_cases(
    cases: list[Case], mesh_devices: list[Any], on_done: Callable[[Case], None]
) -> Iterator[tuple[Case, bool, str, list[float]]]:
    """Run every case on ``mesh_devices``; yield ``(case, correct, detail, times)``."""
    if any(c.dtype in ("int64", "float64") for c in cases):
        import jax

        jax.config.update("jax_enable_x64", True)  # else JAX narrows 64-bit arrays to 32 bits
    for case in cases:
        ok, detail, times = run_case(case, mesh_devices)
        on_done(case)
        yield case, ok, detail, times
