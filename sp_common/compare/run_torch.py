"""The torch side of ``sp-compare``: the cases on N ranks of one :class:`RankPool` (gloo on the
CPU, NCCL on CUDA). Importing this module imports no framework; torch is imported on the ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..testing.data import to_numpy, to_torch
from ..testing.ranks import RankPool
from ..testing.timing import interleaved, slowest_rank, torch_fences
from .cases import Case, op_function, raised
from .checks import check, expected_outputs, global_inputs, rank_inputs


def run_case(case: Case, device: str) -> tuple[bool, str, list[float]]:
    """Run ``case`` on this rank: check the first call, warm up, then time ``case.repeats`` calls.

    Returns ``(correct, what differs, seconds per repeat)``; no times when the op raised (every
    rank raises alike for a shape or dtype a backend rejects).
    """
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    full = global_inputs(case)
    inputs = [to_torch(a, device) for a in rank_inputs(case, full, rank)]
    fn = op_function(case)
    with torch.no_grad():
        try:
            outputs = [to_numpy(t) for t in fn(*inputs)]
        except Exception as e:
            return False, f"rank {rank}: {raised(e)}", []
        ok, detail = check(case, outputs, expected_outputs(case, full, rank))
        del outputs, full
        times = interleaved(
            {"op": lambda: fn(*inputs)}, case.repeats, case.warmup, torch_fences(device)
        )
    return ok, f"rank {rank}: {detail}" if detail else "", times["op"]


def run_cases(
    cases: list[Case], world_size: int, device: str, on_done: Callable[[Case], None]
) -> Iterator[tuple[Case, bool, str, list[float]]]:
    """Run every case on ``world_size`` ranks; yield ``(case, correct, detail, times)`` where
    ``times[i]`` is the slowest rank's time of repeat i."""
    with RankPool(world_size, device) as pool:
        for case in cases:
            per_rank: list[Any] = pool.run(run_case, case, device)
            on_done(case)
            ok = all(r[0] for r in per_rank)
            detail = "; ".join(r[1] for r in per_rank if r[1])
            times = slowest_rank([{"op": r[2]} for r in per_rank])["op"]
            yield case, ok, detail, times
