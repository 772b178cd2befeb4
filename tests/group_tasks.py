"""Rank tasks for the group tests (see torch_ranks.py): DeviceMesh groups, groups a rank is not
a member of, compiled functions called with a mesh, and strict mode with a process group.

Every task expects 4 ranks. Arguments and results are numpy arrays and plain values; expected
errors are caught on the rank and returned as ``"ExceptionType: message"`` strings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from backend_torch.plan import apply_plan
from sp_common import (
    GatherOutput,
    ShardingValidator,
    ShardInput,
    SPPlan,
    sp_all_to_all,
    sp_gather,
    sp_group,
    sp_rank,
    sp_reduce_scatter,
    sp_shard,
    sp_shard_with_padding,
    sp_strict,
    sp_world_size,
)
from sp_common.testing.data import to_numpy, to_torch


def _dp_sp_mesh() -> DeviceMesh:
    """The 2 x 2 ("dp", "sp") mesh over 4 ranks: rows {0, 1} and {2, 3} are the SP groups."""
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))


def _error(fn: Callable[[], Any]) -> str:
    """``"Type: message"`` of what ``fn()`` raises, or ``"no error"``."""
    try:
        fn()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


class _Doubler(torch.nn.Module):
    """Doubles its input and remembers the shape it saw (the shard, under a plan)."""

    seen: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = tuple(x.shape)
        return x * 2


def device_mesh_groups(x: np.ndarray) -> dict[str, Any]:
    """Every op, the queries, the validator and a plan with ``mesh["sp"]`` (and ``mesh["dp"]``)
    as the group, by argument and by ``sp_group`` block. ``x`` is ``[2, 8, 3]``."""
    mesh = _dp_sp_mesh()
    sp, dp = mesh["sp"], mesh["dp"]
    t = to_torch(x)
    out: dict[str, Any] = {
        "shard_sp": sp_shard(t, 1, group=sp),
        "shard_dp": sp_shard(t, 1, group=dp),
        "size": sp_world_size(t, group=sp),
        "rank": sp_rank(t, group=sp),
        "dp_rank": sp_rank("torch", group=dp),
    }
    padded, pad = sp_shard_with_padding(t[:, :7], 1, group=sp)
    out["pad"] = pad
    out["gather_unpad"] = sp_gather(padded, 1, pad_size=pad, group=sp)
    # Rank r's own tensor t * (r + 1): all-to-all and reduce-scatter over the SP pair.
    mine = t * (dist.get_rank() + 1)
    out["all_to_all"] = sp_all_to_all(mine, 1, 2, group=sp)
    out["reduce_scatter"] = sp_reduce_scatter(mine, 1, group=sp)
    with sp_group(sp):
        out["block_shard"] = sp_shard(t, 1)
        out["block_gather"] = sp_gather(out["block_shard"] * 3, 1)
        out["block_size"] = sp_world_size("torch")
        v = ShardingValidator()
        with v.track():
            out["validator"] = v.gather(v.shard(t[:, :7], "h", 1, False), "h", 1)
        v.validate()
        model = _Doubler()
        with apply_plan(model, SPPlan({"": (ShardInput("x", dim=1), GatherOutput(dim=1))})):
            out["plan"] = model(t)
        out["plan_seen"] = model.seen
    return {k: to_numpy(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def device_mesh_errors(x: np.ndarray) -> dict[str, str]:
    """A 2-D DeviceMesh (one group of its 4 ranks, row-major: by argument, by block), a 3-D
    one (an error), and groups this rank is not a member of: a ``new_group`` of rank 0 only,
    and a DeviceMesh of ranks 0 and 1."""
    mesh = _dp_sp_mesh()
    t = to_torch(x)
    only_rank_0 = dist.new_group([0])
    first_two = DeviceMesh("cpu", [0, 1])

    def in_block(group: Any) -> Callable[[], Any]:
        def enter() -> None:
            with sp_group(group):
                sp_shard(t, 0)

        return enter

    cube = DeviceMesh("cpu", [[[0, 1], [2, 3]]], mesh_dim_names=("a", "b", "c"))

    def shard_in_block() -> list[float]:
        with sp_group(mesh):
            return sp_shard(t, 0).tolist()  # type: ignore[no-any-return]

    return {
        "2d_gather": str(sp_gather(sp_shard(t, 0, group=mesh), 0, group=mesh).tolist()),
        "2d_block": str(shard_in_block()),
        "3d_arg": _error(lambda: sp_gather(t, 0, group=cube)),
        "3d_block": _error(in_block(cube)),
        "not_member_arg": _error(lambda: sp_shard(t, 0, group=only_rank_0)),
        "not_member_block": _error(in_block(only_rank_0)),
        "not_member_size": _error(lambda: sp_world_size("torch", group=only_rank_0)),
        "mesh_not_member_arg": _error(lambda: sp_rank(t, group=first_two)),
        "mesh_not_member_block": _error(in_block(first_two)),
    }


def compiled_device_mesh(x: np.ndarray) -> dict[str, Any]:
    """One ``torch.compile(fullgraph=True)`` function called with ``mesh["sp"]``, then
    ``mesh["dp"]``; another under ``sp_group(mesh["sp"])`` and ``sp_group(mesh["dp"])``. Each call
    must shard over the group it names (recompiling as needed). ``x`` is ``[8]``."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    mesh = _dp_sp_mesh()
    t = to_torch(x)
    counter = CompileCounter()

    def shard_and_gather(t: torch.Tensor, g: DeviceMesh) -> tuple[torch.Tensor, torch.Tensor]:
        s = sp_shard(t, 0, group=g)
        return s, sp_gather(s * 2, 0, group=g)

    by_arg = torch.compile(shard_and_gather, backend=counter, fullgraph=True)
    by_block = torch.compile(lambda t: sp_shard(t, 0), backend=counter, fullgraph=True)
    out: dict[str, torch.Tensor] = {}
    for name in ("sp", "dp", "sp_again"):
        out[f"arg_{name}"], out[f"gather_{name}"] = by_arg(t, mesh[name.split("_")[0]])
    with sp_group(mesh["sp"]):
        out["block_sp"] = by_block(t)
    with sp_group(mesh["dp"]):
        out["block_dp"] = by_block(t)
    return {"frames": counter.frame_count, **{k: to_numpy(v) for k, v in out.items()}}


def strict_with_a_process_group(x: np.ndarray) -> dict[str, Any]:
    """Strict mode changes nothing where a process group exists (even a group of one rank)."""
    t = to_torch(x)
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    with sp_strict():
        with sp_group(singles[dist.get_rank()]):
            single = sp_world_size(t), sp_shard(t, 0) is t
        return {
            "size": sp_world_size(t),
            "rank": sp_rank("torch"),
            "shard": to_numpy(sp_shard(t, 0)),
            "single_size": single[0],
            "single_identity": single[1],
        }
