"""The torch side of ``sp-compare``: N spawned ranks (gloo on CPU, NCCL on CUDA) that run cases.

``RankPool(n, device)`` starts the ranks once; ``pool.run(task, *args)`` runs a module-level
function on every rank and returns the per-rank results in rank order. Nothing hangs: gloo/NCCL
get a collective timeout, every wait has a deadline, a rank that raises fails the call with its
traceback, and on any failure the ranks are killed. The benchmarks reuse the pool.

Importing this module imports no framework; torch is imported on the ranks (and by
:func:`cuda_device_count`).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np

from .compare_cases import (
    Case,
    check,
    expected_outputs,
    global_inputs,
    op_function,
    raised,
    rank_inputs,
)

COLLECTIVE_TIMEOUT_S = 120
START_TIMEOUT_S = 180.0
# How long the other ranks get to report after one rank failed (they may be stuck in a collective).
GRACE_AFTER_FAILURE_S = 5.0


class RankFailure(RuntimeError):
    """A task raised on a rank, a rank died, or a call ran past its deadline."""


def cuda_device_count() -> int:
    """CUDA devices visible to torch (0 on a CPU-only build)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a rendezvous)."""
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
    """``world_size`` spawned processes, the ranks of one process group on ``device``
    (``"cpu"``: gloo; ``"cuda"``: NCCL, rank r on GPU r). A rank left alone in a collective
    raises after ``collective_timeout_s``."""

    def __init__(
        self,
        world_size: int,
        device: str = "cpu",
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> None:
        self.world_size, self.device = world_size, device
        self.collective_timeout_s = collective_timeout_s
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
        self._expect("ready", START_TIMEOUT_S, "start")

    def _submit(self, task: Callable[..., Any], args: tuple, kwargs: dict) -> int:
        self._calls += 1
        for q in self._tasks:
            q.put((self._calls, task.__module__, task.__name__, args, kwargs))
        return self._calls

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _expect(self, call_id: Any, timeout_s: float, what: str) -> list[Any]:
        got = self._collect(call_id, timeout_s)
        errors = {r: p[1] for r, p in got.items() if p[0] == "error"}
        missing = sorted(set(range(self.world_size)) - set(got))
        if errors or missing:
            self.close()
            detail = "".join(f"\n--- torch rank {r}:\n{tb}" for r, tb in sorted(errors.items()))
            first = next(iter(errors.values()), "").strip().splitlines()
            reason = (
                first[-1] if first else f"ranks {missing} did not answer within {timeout_s:g} s"
            )
            raise RankFailure(f"{what} failed on torch rank(s): {reason}{detail}")
        return [got[r][1] for r in range(self.world_size)]

    def run(
        self, task: Callable[..., Any], *args: Any, timeout_s: float = 1800.0, **kwargs: Any
    ) -> list[Any]:
        """``task(*args, **kwargs)`` on every rank (a module-level function); results in rank
        order. Any failure stops the ranks and raises :class:`RankFailure`."""
        call_id = self._submit(task, args, kwargs)
        return self._expect(call_id, timeout_s, task.__name__)

    def close(self) -> None:
        """Stop the ranks (killing any that do not stop within 2 s)."""
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


# ------------------------------------------------------------------------------ on every rank


def to_torch(a: np.ndarray, dtype: str, device: str) -> Any:
    """A numpy array (bfloat16 as uint16 bits) as a torch tensor on ``device``, bit for bit."""
    import torch

    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(a).to(device)


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as a numpy array (bfloat16 as uint16 bits), bit for bit."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def synchronize(device: str) -> None:
    """Wait for queued device work (CUDA); a no-op on CPU, where collectives are synchronous."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed_on_rank(fn: Callable[[], Any], repeats: int, device: str) -> list[float]:
    """Seconds per call of ``fn``, each call started right after a barrier and ended when its
    device work is done. The caller takes the slowest rank of each repeat."""
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def run_case(case: Case, device: str) -> tuple[bool, str, list[float]]:
    """Run ``case`` on this rank: check the first call, warm up, then time ``case.repeats`` calls.

    Returns ``(correct, what differs, seconds per repeat)``; no times when the op raised (every
    rank raises alike for a shape or dtype a backend rejects).
    """
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    full = global_inputs(case)
    inputs = [to_torch(a, case.dtype, device) for a in rank_inputs(case, full, rank)]
    fn = op_function(case)
    with torch.no_grad():
        try:
            outputs = [to_numpy(t) for t in fn(*inputs)]
        except Exception as e:
            return False, f"rank {rank}: {raised(e)}", []
        ok, detail = check(case, outputs, expected_outputs(case, full, rank))
        del outputs, full
        for _ in range(case.warmup):
            fn(*inputs)
        times = timed_on_rank(lambda: fn(*inputs), case.repeats, device)
    return ok, f"rank {rank}: {detail}" if detail else "", times


def run_cases(
    cases: list[Case], world_size: int, device: str, on_done: Callable[[Case], None]
) -> Iterator[tuple[Case, bool, str, list[float]]]:
    """Run every case on ``world_size`` ranks; yield ``(case, correct, detail, times)`` where
    ``times[i]`` is the slowest rank's time of repeat i."""
    with RankPool(world_size, device) as pool:
        for case in cases:
            per_rank = pool.run(run_case, case, device)
            on_done(case)
            ok = all(r[0] for r in per_rank)
            detail = "; ".join(r[1] for r in per_rank if r[1])
            times = [max(ts) for ts in zip(*(r[2] for r in per_rank), strict=True)]
            yield case, ok, detail, times
