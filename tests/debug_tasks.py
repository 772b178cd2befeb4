"""Rank tasks for debug mode (see test_debug_mode.py): each rank makes its own call.

A call is a key of ``bad_input_tasks.CALLS`` with per-rank arguments, whose :class:`Tensor`
placeholders become torch zeros on the rank. Tasks return plain values: the outcome as
``(exception type name, message)`` (``("no error", "")`` when the call returned).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

import sp_common as sp

from .bad_input_tasks import CALLS, materialize, outcome


def call_in_debug_mode(
    call: str,
    args_by_rank: list[tuple[Any, ...]],
    kwargs_by_rank: list[dict[str, Any]],
    debug: bool = True,
) -> tuple[str, str]:
    """``CALLS[call](*args_by_rank[rank], **kwargs_by_rank[rank])`` inside ``sp_debug(debug)``."""
    rank = dist.get_rank()
    args = tuple(materialize(a, "torch") for a in args_by_rank[rank])
    kwargs = {k: materialize(v, "torch") for k, v in kwargs_by_rank[rank].items()}
    with sp.sp_debug(debug):
        return outcome(lambda: CALLS[call](*args, **kwargs))


_COLLECTIVES = (
    "all_gather_single",
    "all_gather",
    "all_gather_object",
    "all_to_all_single",
    "reduce_scatter_single",
    "all_reduce",
)


def collectives_per_call(call: str, args: tuple[Any, ...], debug: bool) -> dict[str, int]:
    """How many times each torch.distributed gather/all-to-all runs during one
    ``CALLS[call](*args)`` inside ``sp_debug(debug)`` (the same arguments on every rank)."""
    counts = dict.fromkeys(_COLLECTIVES, 0)
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def counting(name: str) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            counts[name] += 1
            return originals[name](*a, **k)

        return wrapper

    try:
        for name in _COLLECTIVES:
            setattr(dist, name, counting(name))
        a = tuple(materialize(v, "torch") for v in args)
        with sp.sp_debug(debug):
            CALLS[call](*a)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return counts


def plan_check_fails_on_one_rank() -> tuple[str, str]:
    """Rank 1's input has the wrong ndim for the plan (a PlanError there, before the shard);
    in debug mode the other ranks, already in the shard's check, must raise too."""
    import torch

    from sp_common import GatherOutput, ShardInput, SPPlan

    model = torch.nn.Identity()
    plan = SPPlan({"": (ShardInput("input", dim=1, ndim=3), GatherOutput(dim=1))})
    x = torch.zeros((2, 4, 3) if dist.get_rank() == 0 else (2, 4))
    with sp.apply_plan(model, plan), sp.sp_debug():
        return outcome(lambda: model(x))
