"""One rank of a dead-rank scenario (test_dead_ranks.py), run in its own spawned process.

Every rank joins a gloo group with a short timeout and meets the others at a barrier; then the
victim fails before a collective that the survivors enter, and each survivor reports what the
collective raised. The victim fails in one of three ways:

- ``"exit"``: the process ends abruptly (``os._exit``), as when it is killed or crashes.
- ``"raise"``: it hits a local error (bad input raises ValueError before any communication) and
  the exception ends the process, as an uncaught exception under torchrun does.
- ``"raise_and_stay"``: it hits the same error, catches it and stays alive without entering
  the collective (a server that logs the error and waits), so only the timeout can help.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

FAILURES = ("exit", "raise", "raise_and_stay")


def _ops() -> dict[str, Callable[[Any, int], Any]]:
    """Each op called as ``op(x, dim)``: a valid dim reaches the collective, an out-of-range
    dim raises ValueError before it."""
    import sp_common as sp

    def debug_padded_shard(x: Any, dim: int) -> Any:
        with sp.sp_debug():  # the cross-rank shape check is the first collective
            return sp.sp_shard_with_padding(x, dim)

    return {
        "sp_gather": sp.sp_gather,
        "sp_all_to_all": lambda x, dim: sp.sp_all_to_all(x, dim, 0),
        "sp_reduce_scatter": sp.sp_reduce_scatter,
        "sp_shard_with_padding under sp_debug": debug_padded_shard,
    }


def _flush(results: Any) -> None:
    """Make sure what was put on ``results`` leaves this process before it ends."""
    results.close()
    results.join_thread()


def rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    victim: int,
    failure: str,
    op: str,
    results: Any,
) -> None:
    """Join the group, pass the barrier, then fail (the victim) or run ``op`` and report
    ``(rank, "outcome", {...})`` on ``results`` (a survivor)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    dist.barrier()
    results.put((rank, "ready", None))
    call = _ops()[op]
    x = torch.ones(2, 4 * world_size)
    if rank == victim:
        _flush(results)
        if failure == "exit":
            os._exit(1)
        try:
            call(x, 5)  # ValueError: dim 5 is out of range, raised before any communication
        except ValueError:
            if failure == "raise":
                raise
        time.sleep(600)  # "raise_and_stay": alive, never in the collective; the test kills it
        os._exit(0)
    start = time.monotonic()
    try:
        call(x, 1)
        outcome: dict[str, Any] = {"error": None}
    except Exception as e:
        outcome = {
            "error": type(e).__name__,
            "is_runtime_error": isinstance(e, RuntimeError),
            "message": str(e)[:500],
            "traceback": traceback.format_exc()[-2000:],
        }
    outcome["seconds"] = time.monotonic() - start
    results.put((rank, "outcome", outcome))
    _flush(results)
    os._exit(0)  # never tear down a broken group: that can block on the dead peer
