"""One timing loop: candidates timed interleaved, each call fenced, the slowest rank per repeat.

Interleaving (candidate order rotates every repeat) spreads a noisy machine's slow moments over
every candidate alike, so the ratio of two medians measured in one loop means something even on
a shared CPU. Framework-free: the fences come from :func:`torch_fences` or :func:`jax_fences`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = ["Fences", "Timings", "interleaved", "jax_fences", "slowest_rank", "torch_fences"]

Timings = dict[str, list[float]]


class Fences(NamedTuple):
    """``before()`` runs before each timed call (ranks start together); ``wait(result)`` ends
    it once its device work is done."""

    before: Callable[[], None]
    wait: Callable[[Any], None]


def _nothing(*_: Any) -> None:
    return None


NO_FENCES = Fences(_nothing, _nothing)


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 3,
    fences: Fences = NO_FENCES,
) -> Timings:
    """Seconds per call of each of ``fns``: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds, the candidates in a rotated order each round.

    Returns ``{name: [seconds of call i for i in range(repeats)]}``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fences.before()
            fences.wait(fns[name]())
    times: Timings = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fences.before()
            start = time.perf_counter()
            fences.wait(fns[name]())
            times[name].append(time.perf_counter() - start)
    return times


def slowest_rank(per_rank: Sequence[Timings]) -> Timings:
    """Per candidate and repeat, the slowest rank's time (what a step of N ranks costs)."""
    return {
        name: [max(ts) for ts in zip(*(r[name] for r in per_rank), strict=True)]
        for name in per_rank[0]
    }


def torch_fences(device: str = "cpu") -> Fences:
    """A barrier of the default process group before each call (after the device's queued
    work); CUDA work waited for after it. Imports torch."""
    import torch
    import torch.distributed as dist

    def sync(*_: Any) -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def before() -> None:
        sync()
        if dist.is_initialized():
            dist.barrier()

    return Fences(before, sync)


def jax_fences() -> Fences:
    """Each call waited for with ``jax.block_until_ready``. Imports JAX."""
    import jax

    def wait(result: Any) -> None:
        jax.block_until_ready(result)

    return Fences(_nothing, wait)
