"""A pool of torch gloo ranks started once per test session and reused by every test.

``pool.run(task, *args)`` runs ``task`` (a module-level function, found by module and name) on
every rank and returns the per-rank results in rank order. Nothing hangs: each call has a deadline;
a rank that raises fails the call with its traceback, and when the other ranks do not come back
shortly after (they are stuck in a collective), or a rank dies, the pool is killed and restarted
so later tests get healthy ranks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

# gloo's own timeout: a rank left alone in a collective raises after this many seconds.
COLLECTIVE_TIMEOUT_S = 30
# How long the other ranks get to report after one rank failed before the pool is restarted.
GRACE_AFTER_FAILURE_S = 5.0


class RankFailure(AssertionError):
    """A task raised on some rank, a rank died, or the call ran past its deadline."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import importlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results.put((rank, "ready", None))
    while True:
        job = tasks.get()
        if job is None:
            break
        call_id, module, name, args, kwargs = job
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, call_id, ("ok", fn(*args, **kwargs))))
        except BaseException:  # report everything; the parent decides
            results.put((rank, call_id, ("error", traceback.format_exc())))
    dist.destroy_process_group()


class TorchRanks:
    """``world_size`` spawned processes, each rank of one gloo process group."""

    def __init__(self, world_size: int, start_timeout_s: float = 120.0) -> None:
        self.world_size = world_size
        self._start_timeout_s = start_timeout_s
        self._calls = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        ready = self._collect("ready", self._start_timeout_s)
        if len(ready) != self.world_size:
            self.close()
            raise RankFailure(f"only {len(ready)}/{self.world_size} torch ranks started")

    def _collect(self, call_id: Any, timeout_s: float) -> dict[int, Any]:
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0 or any(not p.is_alive() for p in self._procs):
                break
            try:
                rank, cid, payload = self._results.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if cid != call_id:  # a stale answer from an abandoned call
                continue
            got[rank] = payload
            if call_id != "ready" and payload[0] == "error":
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)
        return got

    def run(
        self, task: Callable[..., Any], *args: Any, timeout_s: float = 90, **kwargs: Any
    ) -> list[Any]:
        """Run ``task(*args, **kwargs)`` on every rank; return the results in rank order."""
        self._calls += 1
        call_id = self._calls
        for q in self._tasks:
            q.put((call_id, task.__module__, task.__name__, args, kwargs))
        got = self._collect(call_id, timeout_s)
        errors = {r: p[1] for r, p in got.items() if p[0] == "error"}
        dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
        if len(got) < self.world_size or dead:
            missing = sorted(set(range(self.world_size)) - set(got))
            self.close()
            self._start()
            detail = "".join(f"\n--- rank {r} raised:\n{tb}" for r, tb in errors.items())
            raise RankFailure(
                f"{task.__name__} on {self.world_size} ranks: ranks {missing} did not answer "
                f"within the deadline (dead: {dead}); pool restarted.{detail}"
            )
        if errors:
            detail = "".join(f"\n--- rank {r} raised:\n{tb}" for r, tb in errors.items())
            raise RankFailure(f"{task.__name__} failed on ranks {sorted(errors)}:{detail}")
        return [got[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
