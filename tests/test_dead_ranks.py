"""Dead ranks: when one rank exits or raises before a collective, every other rank raises a
RuntimeError (gloo's DistBackendError is one) within the process group's timeout instead of
waiting forever.

Each scenario spawns its own gloo ranks with a short timeout (not the shared pool: its ranks
are killed). The parent never hangs: it waits for the survivors' reports only until the timeout
plus a margin, then kills every rank it started.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any

import pytest

from sp_common.testing import free_port

from . import dead_rank_tasks

pytestmark = pytest.mark.timeout(120)

PG_TIMEOUT_S = 5.0  # the process group's timeout, as a user sets it (see README)
MARGIN_S = 20.0  # scheduling slack on a loaded 2-core machine; a hang exceeds it by far
START_TIMEOUT_S = 90.0  # spawning and importing torch, before the timed part starts


def collect(results: Any, kind: str, expected: int, timeout_s: float) -> dict[int, Any]:
    """The first ``expected`` messages of ``kind`` from ``results``, or fewer at the deadline."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < expected and (left := deadline - time.monotonic()) > 0:
        try:
            rank, k, payload = results.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if k == kind:
            got[rank] = payload
    return got


def run_scenario(world_size: int, victim: int, failure: str, op: str) -> dict[int, Any]:
    """Spawn ``world_size`` ranks; return each survivor's outcome that arrived in time."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=dead_rank_tasks.rank_main,
            args=(r, world_size, port, PG_TIMEOUT_S, victim, failure, op, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        ready = collect(results, "ready", world_size, START_TIMEOUT_S)
        assert len(ready) == world_size, f"only ranks {sorted(ready)} started"
        return collect(results, "outcome", world_size - 1, PG_TIMEOUT_S + MARGIN_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        results.close()
        results.cancel_join_thread()


SCENARIOS = [
    pytest.param(2, 1, "exit", "sp_gather", id="rank 1 of 2 exits before sp_gather"),
    pytest.param(3, 0, "raise", "sp_all_to_all", id="rank 0 of 3 (the store host) raises and dies"),
    pytest.param(
        2,
        1,
        "raise_and_stay",
        "sp_reduce_scatter",
        id="rank 1 of 2 raises and stays alive before sp_reduce_scatter",
    ),
    pytest.param(
        3,
        2,
        "exit",
        "sp_shard_with_padding under sp_debug",
        id="rank 2 of 3 exits before the debug-mode shape check",
    ),
]


@pytest.mark.parametrize(("world_size", "victim", "failure", "op"), SCENARIOS)
def test_every_survivor_raises_within_the_process_group_timeout(
    world_size: int, victim: int, failure: str, op: str
) -> None:
    outcomes = run_scenario(world_size, victim, failure, op)
    survivors = [r for r in range(world_size) if r != victim]
    missing = [r for r in survivors if r not in outcomes]
    assert not missing, (
        f"ranks {missing} did not return from {op} within the {PG_TIMEOUT_S} s timeout + "
        f"{MARGIN_S} s margin after rank {victim} failed ({failure}): they hang"
    )
    for rank in survivors:
        outcome = outcomes[rank]
        assert outcome["error"] is not None, f"rank {rank}: {op} returned without the dead rank"
        assert outcome["is_runtime_error"], f"rank {rank}: {outcome['traceback']}"
        if failure == "raise_and_stay":  # nothing closed a connection: only the timeout fired
            assert f"{int(PG_TIMEOUT_S * 1000)}ms" in outcome["message"], outcome["message"]
