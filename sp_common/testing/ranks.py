"""One pool of torch ranks for tests, benchmarks, examples and ``sp-compare``.

``RankPool(n)`` spawns n processes that join one process group (gloo on the CPU, NCCL with
``device="cuda"``, rank r on GPU r) and stay up; ``pool.run(task, *args)`` runs a module-level
function on every rank and returns the per-rank results in rank order. Nothing hangs: the process
group gets a collective timeout, every call has a deadline, and one crashing rank fails the call.

On failure: a task that raised on some ranks while every rank answered raises
:class:`RankFailure` with their tracebacks and keeps the pool (the ranks are healthy); ranks that
did not answer (stuck in a collective) or died are killed, the call raises, and the next call
starts fresh ranks. Importing this module imports no framework: torch is imported on the ranks.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["RankFailure", "RankPool", "cuda_device_count", "free_port"]

COLLECTIVE_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 1800.0
# How long the other ranks get to report after one rank failed (they may be stuck in a collective).
GRACE_AFTER_FAILURE_S = 5.0


class RankFailure(RuntimeError):
    """A task raised on a rank, a rank died, or a call ran past its deadline."""


def cuda_device_count() -> int:
    """CUDA devices visible to torch (0 on a CPU-only build). Imports torch."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    device: str,
    collective_timeout_s: float,
    tasks: Any,
    results: Any,
) -> None:
    """Body of one rank: join the process group, then run tasks until told to stop."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share the cores
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
    except BaseException:
        results.put((rank, "ready", ("error", traceback.format_exc())))
        return
    results.put((rank, "ready", ("ok", None)))
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


class RankPool:
    """``world_size`` spawned ranks of one process group on ``device`` (``"cpu"``: gloo;
    ``"cuda"``: NCCL). A rank left alone in a collective raises after ``collective_timeout_s``;
    a call that gets no answer within its ``timeout_s`` kills the ranks. Use as a context
    manager, or call :meth:`close`."""

    def __init__(
        self,
        world_size: int,
        device: str = "cpu",
        *,
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"RankPool: world_size must be at least 1, got {world_size}.")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"RankPool: device must be 'cpu' or 'cuda', got {device!r}.")
        self.world_size, self.device = world_size, device
        self.collective_timeout_s, self.call_timeout_s = collective_timeout_s, call_timeout_s
        self._calls = 0
        self._procs: list[Any] = []
        self._start()

    @property
    def running(self) -> bool:
        """Whether the ranks are up (after a hang they are gone until the next call)."""
        return bool(self._procs)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    self.world_size,
                    port,
                    self.device,
                    self.collective_timeout_s,
                    self._tasks[r],
                    self._results,
                ),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._wait("ready", START_TIMEOUT_S, "starting the ranks")

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self, task: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> list[Any]:
        """``task(*args, **kwargs)`` on every rank (a module-level function, found by module
        and name on the ranks); its results in rank order. Raises :class:`RankFailure` (see the
        module docstring) when a rank raises, dies, or does not answer within ``timeout_s``
        (default: the pool's ``call_timeout_s``)."""
        if not self._procs:
            self._start()
        self._calls += 1
        for q in self._tasks:
            q.put((self._calls, task.__module__, task.__name__, args, kwargs))
        return self._wait(self._calls, timeout_s or self.call_timeout_s, task.__name__)

    def _collect(self, call_id: Any, timeout_s: float) -> dict[int, Any]:
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, cid, payload = self._results.get(timeout=min(left, 0.5))
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs):
                    break
                continue
            if cid != call_id:  # a stale answer from an abandoned call
                continue
            got[rank] = payload
            if payload[0] == "error":
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)
        return got

    def _wait(self, call_id: Any, timeout_s: float, what: str) -> list[Any]:
        got = self._collect(call_id, timeout_s)
        errors = {r: p[1] for r, p in got.items() if p[0] == "error"}
        detail = "".join(f"\n--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items()))
        missing = sorted(set(range(self.world_size)) - set(got))
        dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
        if missing or dead or (call_id == "ready" and errors):
            self.close()
            raise RankFailure(
                f"{what} on {self.world_size} torch ranks: ranks {missing} did not answer within "
                f"{timeout_s:g} s (dead: {dead}); the ranks were stopped and the next call starts "
                f"new ones.{detail}"
            )
        if errors:
            raise RankFailure(f"{what} failed on torch ranks {sorted(errors)}:{detail}")
        return [got[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks (killing any that do not stop within 2 s)."""
        for q in self._tasks if self._procs else ():
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        self._procs = []
