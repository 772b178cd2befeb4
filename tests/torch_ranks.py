"""A pool of torch gloo ranks started once per test session and reused by every test.

It is the library's own :class:`sp_common.compare_torch.RankPool` (spawn, rendezvous, deadlines,
kill) with a test-suite policy on failure: a task that raises on some ranks fails the call with
their tracebacks but keeps the healthy pool; when ranks do not come back (stuck in a collective)
or die, the pool is killed and restarted so later tests get healthy ranks. Nothing hangs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sp_common.compare_torch import RankFailure, RankPool, free_port

__all__ = ["COLLECTIVE_TIMEOUT_S", "RankFailure", "TorchRanks", "free_port"]

# gloo's own timeout: a rank left alone in a collective raises after this many seconds.
COLLECTIVE_TIMEOUT_S = 30


class TorchRanks(RankPool):
    """``world_size`` gloo ranks on the CPU."""

    def __init__(self, world_size: int) -> None:
        super().__init__(world_size, "cpu", collective_timeout_s=COLLECTIVE_TIMEOUT_S)

    def run(
        self, task: Callable[..., Any], *args: Any, timeout_s: float = 90, **kwargs: Any
    ) -> list[Any]:
        """Run ``task(*args, **kwargs)`` on every rank; return the results in rank order."""
        call_id = self._submit(task, args, kwargs)
        got = self._collect(call_id, timeout_s)
        errors = {r: p[1] for r, p in got.items() if p[0] == "error"}
        detail = "".join(f"\n--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items()))
        dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
        if len(got) < self.world_size or dead:
            missing = sorted(set(range(self.world_size)) - set(got))
            self.close()
            self._start()
            raise RankFailure(
                f"{task.__name__} on {self.world_size} ranks: ranks {missing} did not answer "
                f"within the deadline (dead: {dead}); pool restarted.{detail}"
            )
        if errors:
            raise RankFailure(f"{task.__name__} failed on ranks {sorted(errors)}:{detail}")
        return [got[r][1] for r in range(self.world_size)]
