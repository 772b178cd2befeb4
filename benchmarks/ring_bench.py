"""Ring attention (``sp_attention(strategy="ring")``) benchmarks: ``python -m benchmarks.run``
calls :func:`torch_ring` with its rank pool and :func:`jax_memory` in its own process, and
prints :func:`report`.

- torch ring forward vs yunchang 0.6.4's ring on the same ``[B, S/N, H, D]`` q, k, v and the
  same process group, each output's max |diff| from the float64 reference; yunchang's backward
  is tried once, on one-rank groups (it raises on the CPU). Two yunchang rows:
  ``ring_flash_attn_func`` with ``attn_type=TORCH_MATH`` (what
  ``LongContextAttention(ring_impl_type="basic")`` calls with ring degree N, Ulysses degree 1),
  whose math kernel returns a log-sum-exp of zeros, so its blocks are merged with equal weights;
  and ``ring_pytorch_attn_func`` (``"basic_pytorch"``), which calls
  ``aten::_scaled_dot_product_flash_attention`` (no CPU kernel), run here with that one op
  swapped for its CPU twin ``_scaled_dot_product_flash_attention_for_cpu`` during the call.
  PyTorch's native context parallel is not a row: see :data:`TORCH_CP_ON_CPU`.
- causal ring, ``layout="zigzag"`` vs ``"contiguous"``: the slowest rank of each repeat.
- the ring's overlap: the ring forward vs its local block computations alone (the same
  ``block_forward`` / ``merge`` calls on the same blocks, received beforehand; bitwise the same
  output) and vs its communication alone (N - 1 ``ring_shift`` of the K/V blocks).
- JAX: XLA's compiled memory analysis (``temp_size_in_bytes``, per device) of the
  ``shard_map``'ed forward + backward of ring and Ulysses at growing S on N devices.

Every timed ratio is two candidates of one interleaved loop (``sp_common.testing.interleaved``)
on N gloo ranks, the slowest rank per repeat (``slowest_rank``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from sp_common.testing import (
    RankPool,
    Timings,
    format_table,
    interleaved,
    make_data,
    reference_attention,
    slowest_rank,
    to_numpy,
    to_torch,
    torch_fences,
)

# Global [B, S, H, D] q, k, v (S/N tokens a rank): 40-530 ms a call on a loaded 2-core machine.
SHAPE = (1, 2048, 8, 32)
PEER_REPEATS = 20
LAYOUT_REPEATS = 20
OVERLAP_REPEATS = 20
MEMORY_LENGTHS = (1024, 2048, 4096, 8192)
MEMORY_HEADS = (8, 32)  # [B=1, S, H, D] for the memory rows

TORCH_CP_ON_CPU = (
    "not a row: torch 2.13's context_parallel registers its ring only for the CUDA SDPA ops "
    "(flash / efficient / cuDNN); on the CPU, SDPA on its DTensor shards is "
    "aten._scaled_dot_product_flash_attention_for_cpu, which non-causal falls back to an "
    "all-gather of K/V (gloo:all_gather, no ring) and causal raises NotImplementedError "
    "('... does not have a sharding strategy registered')"
)

# ---------------------------------------------------------------- torch tasks (every rank)


class PeerRun(NamedTuple):
    """One rank's result of :func:`ring_vs_yunchang`."""

    times: Timings
    # max |out - float64 reference| of each candidate, and of ours - each peer
    diffs: dict[str, float]
    # the error each peer's backward raised (absent: it ran)
    backward_errors: dict[str, str]


def _global_qkv(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Seeded float32 global q, k, v (the same on every rank)."""
    return [make_data(shape, "float32", seed, specials=False) for seed in range(3)]


def _contiguous_shards(shape: tuple[int, ...]) -> tuple[list[np.ndarray], list[Any]]:
    """The global q, k, v (numpy) and this rank's contiguous shards of them (torch)."""
    import torch.distributed as dist

    full = _global_qkv(shape)
    s = shape[1] // dist.get_world_size()
    start = dist.get_rank() * s
    return full, [to_torch(x[:, start : start + s]) for x in full]


@contextmanager
def _cpu_flash_twin() -> Iterator[None]:
    """yunchang's flash op (no CPU kernel) swapped for its CPU twin while inside."""
    import torch

    kernels: Any = importlib.import_module("yunchang.kernels.attention")
    flash = kernels._scaled_dot_product_flash_attention
    kernels._scaled_dot_product_flash_attention = (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    )
    try:
        yield
    finally:
        kernels._scaled_dot_product_flash_attention = flash


def _yunchang_rings(causal: bool, group: Any) -> dict[str, Callable[[Any, Any, Any], Any]]:
    """yunchang's two CPU ring paths over ``group`` (see the module docstring),
    ``f(q, k, v) -> out`` on ``[B, S/N, H, D]``; empty without yunchang."""
    if importlib.util.find_spec("yunchang") is None:
        return {}
    # Imported by name: yunchang ships no type information.
    ring = importlib.import_module("yunchang.ring")
    math_kernel = importlib.import_module("yunchang.kernels").AttnType.TORCH_MATH

    def basic_math(q: Any, k: Any, v: Any) -> Any:
        return ring.ring_flash_attn_func(q, k, v, causal=causal, group=group, attn_type=math_kernel)

    def pytorch_cpu_flash(q: Any, k: Any, v: Any) -> Any:
        with _cpu_flash_twin():
            return ring.ring_pytorch_attn_func(q, k, v, causal=causal, group=group)

    return {"yunchang basic (math)": basic_math, "yunchang basic_pytorch": pytorch_cpu_flash}


def _backward_error(fn: Callable[[Any, Any, Any], Any], q: Any, k: Any, v: Any) -> str | None:
    """The error ``fn``'s backward raises, or None."""
    import torch

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    try:
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    except Exception as e:  # the peer's own error, reported as is
        return f"{type(e).__name__}: {e}"
    return None


_ALONE: list[Any] = []  # this rank's one-rank group, made once (groups are collective)


def ring_vs_yunchang(shape: tuple[int, ...], causal: bool, repeats: int) -> PeerRun:
    """``sp_attention(strategy="ring")``'s forward vs yunchang's rings on the same contiguous
    shards of the global ``shape`` q, k, v; empty Timings without yunchang."""
    import torch
    import torch.distributed as dist

    from sp_common import sp_attention

    full, (q, k, v) = _contiguous_shards(shape)
    s, r, n = q.shape[1], dist.get_rank(), dist.get_world_size()
    peers = _yunchang_rings(causal, dist.group.WORLD)
    if not peers:
        return PeerRun({}, {}, {})
    # Their backward is tried on one-rank groups: on N ranks it raises after posting step 0's
    # K/V sends, which then never complete and hang the next collective (the timing barrier).
    if not _ALONE:
        _ALONE.append([dist.new_group([i]) for i in range(n)][r])

    def ours(q: Any, k: Any, v: Any) -> Any:
        return sp_attention(q, k, v, strategy="ring", causal=causal)

    candidates = {"ring": ours, **peers}
    expected = reference_attention(*full, causal=causal, rows=(r * s, (r + 1) * s))
    with torch.no_grad():
        outs = {name: fn(q, k, v) for name, fn in candidates.items()}
    diffs = {
        f"{name} - reference": float(np.abs(to_numpy(out) - expected).max())
        for name, out in outs.items()
    }
    for name in peers:
        diffs[f"ring - {name}"] = float((outs["ring"] - outs[name]).abs().max())
    errors = {}
    for name, fn in _yunchang_rings(causal, _ALONE[0]).items():
        error = _backward_error(fn, q, k, v)
        if error is not None:
            errors[name] = error

    def timed(fn: Callable[[Any, Any, Any], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return fn(q, k, v)

        return call

    fns = {name: timed(fn) for name, fn in candidates.items()}
    return PeerRun(interleaved(fns, repeats, fences=torch_fences()), diffs, errors)


def ring_layouts(shape: tuple[int, ...], backward: bool, repeats: int) -> Timings:
    """Causal ``sp_attention(strategy="ring")`` on this rank's ``[B, S/N, H, D]`` shards in
    ``layout="contiguous"`` and ``"zigzag"`` (the same seeded tensors: the layout only decides
    which positions they hold, and so which tiles the rank computes). ``backward``: forward
    plus ``torch.autograd.grad`` of q, k, v."""
    import torch
    import torch.distributed as dist

    from sp_common import sp_attention

    b, length, heads, d = shape
    local = (b, length // dist.get_world_size(), heads, d)
    q, k, v, grad = (
        to_torch(make_data(local, "float32", 4 * dist.get_rank() + i, specials=False))
        for i in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_(backward)

    def run(layout: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.set_grad_enabled(backward):
                out = sp_attention(q, k, v, strategy="ring", causal=True, layout=layout)
                return torch.autograd.grad(out, (q, k, v), grad) if backward else out

        return call

    fns = {"zigzag": run("zigzag"), "contiguous": run("contiguous")}
    return interleaved(fns, repeats, fences=torch_fences())


def ring_overlap(shape: tuple[int, ...], repeats: int) -> Timings:
    """Non-causal ring forward vs its parts on the same blocks: ``compute`` (the ring's
    ``block_forward`` of the rank's own block, then ``merge`` with each block it receives, in
    ring order, on blocks received beforehand: bitwise the ring's output) and ``comm`` (the
    N - 1 ``ring_shift`` of the K/V blocks, each waited for before the next)."""
    import torch
    import torch.distributed as dist

    from backend_torch.collectives import ring_shift
    from sp_common import sp_attention
    from sp_common.attention.blocks import merge
    from sp_common.backend import backend_for

    _, (q, k, v) = _contiguous_shards(shape)
    n, group = dist.get_world_size(), dist.group.WORLD
    backend = backend_for("ring_overlap", q)
    scale = 1.0 / math.sqrt(shape[3])
    # blocks[t]: rank r - t's, as the ring holds them at step t
    blocks: list[tuple[Any, ...]] = [(k, v)]
    for _ in range(n - 1):
        blocks.append(ring_shift(blocks[-1], group).wait())
    batch, s, hq, d = q.shape
    hkv = k.shape[2]
    q5 = q.reshape(batch, s, hkv, hq // hkv, d)

    def ring() -> Any:
        return sp_attention(q, k, v, strategy="ring")

    def compute() -> Any:
        acc = None
        for kt, vt in blocks:
            new = backend.block_forward(q5, kt, vt, None, scale)  # the ring's own kernel
            acc = new if acc is None else merge(backend, acc, new)
        assert acc is not None
        return acc[0].reshape(batch, s, hq, v.shape[3])

    def comm() -> Any:
        held: tuple[Any, ...] = (k, v)
        for _ in range(n - 1):
            held = ring_shift(held, group).wait()
        return held

    with torch.no_grad():
        if not torch.equal(ring(), compute()):
            raise AssertionError(
                f"ring_overlap: the block computations alone differ from the ring's output "
                f"on rank {dist.get_rank()} ({shape}); they no longer measure the ring's compute"
            )
        fns = {"ring": ring, "compute": compute, "comm": comm}
        return interleaved(fns, repeats, fences=torch_fences())


# ---------------------------------------------------------------- JAX memory (main process)


class MemoryRow(NamedTuple):
    """XLA's ``temp_size_in_bytes`` per device of one compiled forward + backward."""

    strategy: str
    shape: tuple[int, ...]
    temp_bytes: int


def jax_memory(
    world: int, lengths: Sequence[int] = MEMORY_LENGTHS, causal: bool = False
) -> list[MemoryRow]:
    """Compile (never run) ``jit(shard_map(vjp of sp_attention))`` on ``world`` devices for
    ring and Ulysses at each global ``[1, S, H, D]``; XLA's temporaries per device."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from sp_common import sp_attention
    from sp_common.testing import mesh_of, spec_on

    mesh = mesh_of(world)
    spec = spec_on(1)
    rows = []
    for strategy in ("ring", "ulysses"):
        for length in lengths:
            shape = (1, length, *MEMORY_HEADS)

            def step(q: Any, k: Any, v: Any, g: Any, strategy: Any = strategy) -> Any:
                def attend(q: Any, k: Any, v: Any) -> Any:
                    return sp_attention(q, k, v, strategy=strategy, causal=causal)

                out, pull = jax.vjp(attend, q, k, v)
                return (out, *pull(g))

            mapped = jax.shard_map(step, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4)
            arg = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))
            with jax.set_mesh(mesh):
                compiled = jax.jit(mapped).lower(arg, arg, arg, arg).compile()
            analysis = compiled.memory_analysis()
            if analysis is None:
                raise RuntimeError(f"jax_memory: XLA gave no memory analysis for {strategy}")
            rows.append(MemoryRow(strategy, shape, int(analysis.temp_size_in_bytes)))
    return rows


# ---------------------------------------------------------------- orchestration (main process)


@dataclass(frozen=True)
class Ratio:
    """``ours`` / ``baseline`` of one interleaved loop (slowest rank per repeat)."""

    what: str
    ours: str
    baseline: str
    times: Timings
    target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.times[self.ours]) / statistics.median(
            self.times[self.baseline]
        )

    def row(self) -> list[str]:
        per_repeat = np.array(self.times[self.ours]) / np.array(self.times[self.baseline])
        p25, p50, p75 = np.percentile(per_repeat, [25, 50, 75])
        verdict = "-" if self.target is None else ("met" if self.ratio <= self.target else "MISSED")
        return [
            self.what,
            f"{self.ours} {_ms(self.times[self.ours])}",
            f"{self.baseline} {_ms(self.times[self.baseline])}",
            f"{self.ratio:.3f}",
            f"{p50:.3f} [{p25:.2f}, {p75:.2f}]",
            "-" if self.target is None else f"<= {self.target:g}",
            verdict,
            self.note,
        ]


@dataclass(frozen=True)
class TorchRing:
    """What :func:`torch_ring` measured."""

    ratios: list[Ratio]
    overlap: Timings
    per_rank: dict[str, list[float]]  # "<layout> <pass>": each rank's median seconds
    notes: list[str]


def _ms(times: Sequence[float]) -> str:
    return f"{statistics.median(times) * 1e3:.2f} ms"


def _label(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def zigzag_ideal(n: int, cores: int) -> float:
    """Causal zigzag / contiguous time if time were tiles of work (a rank's pairs of half
    shards; each step as slow as its busiest rank, or as its total work over ``cores``).
    Step 0: every rank 3 tiles (its own block); step t > 0: zigzag 2 tiles on every rank,
    contiguous 4 on ranks r >= t, none on the others. ``cores >= n``: (2N+1) / (4(N-1)+3)."""

    def step(tiles: list[int]) -> float:
        return max(max(tiles), sum(tiles) / cores)

    first = step([3] * n)
    zigzag = first + sum(step([2] * n) for _ in range(1, n))
    contiguous = first + sum(step([4 if r >= t else 0 for r in range(n)]) for t in range(1, n))
    return zigzag / contiguous


def torch_ring(pool: RankPool, shape: tuple[int, ...] = SHAPE) -> TorchRing:
    """The torch ring figures on ``pool``'s ranks (see the module docstring)."""
    ratios, notes = [], []
    n = pool.world_size
    label = _label(shape)
    for causal in (False, True):
        runs = pool.run(ring_vs_yunchang, shape, causal, PEER_REPEATS)
        what = f"torch ring fwd{' causal' if causal else ''} {label}"
        if not runs[0].times:
            notes.append(f"{what}: yunchang not installed (pip install --no-deps yunchang==0.6.4)")
            continue
        times = slowest_rank([r.times for r in runs])
        diffs = {key: max(r.diffs[key] for r in runs) for key in runs[0].diffs}
        for peer in (name for name in times if name != "ring"):
            note = (
                f"max|ring - peer| {diffs[f'ring - {peer}']:.1e}; vs float64: ring "
                f"{diffs['ring - reference']:.1e}, peer {diffs[f'{peer} - reference']:.1e}"
            )
            ratios.append(Ratio(what, "ring", peer, times, 1.0, note))
        errors = {e for r in runs for e in r.backward_errors.values()}
        for peer in runs[0].backward_errors:
            notes.append(f"{what}: {peer}'s backward raises ({'; '.join(sorted(errors))})")
    notes.append(f"torch native context parallel: {TORCH_CP_ON_CPU}")

    per_rank = {}
    for backward in (False, True):
        pass_ = "fwd+bwd" if backward else "fwd"
        runs = pool.run(ring_layouts, shape, backward, LAYOUT_REPEATS)
        what = f"torch ring {pass_} causal {label}, N={n}"
        note = (
            f"ideal {zigzag_ideal(n, n):.2f} with a core per rank, "
            f"{zigzag_ideal(n, os.cpu_count() or 1):.2f} on this machine's {os.cpu_count()} cores"
        )
        ratios.append(Ratio(what, "zigzag", "contiguous", slowest_rank(runs), None, note))
        for layout in ("zigzag", "contiguous"):
            per_rank[f"{layout} {pass_}"] = [statistics.median(r[layout]) for r in runs]

    overlap = slowest_rank(pool.run(ring_overlap, shape, OVERLAP_REPEATS))
    return TorchRing(ratios, overlap, per_rank, notes)


def report(torch_figures: TorchRing | None, memory: Sequence[MemoryRow]) -> str:
    """The ring tables as text."""
    lines = []
    if torch_figures is not None:
        headers = ["ring benchmark", "ours", "baseline", "ratio", "paired [p25, p75]", "target"]
        rows = [r.row() for r in torch_figures.ratios]
        lines += [format_table([*headers, "", "outputs / note"], rows), ""]
        lines += [f"  {note}" for note in torch_figures.notes]
        lines += ["", "causal ring, median seconds of each rank (ms):"]
        per_rank = [
            [name, *(f"{t * 1e3:.2f}" for t in ts)] for name, ts in torch_figures.per_rank.items()
        ]
        ranks = len(next(iter(torch_figures.per_rank.values())))
        lines.append(format_table(["layout", *(f"rank {r}" for r in range(ranks))], per_rank))
        t = {name: statistics.median(ts) for name, ts in torch_figures.overlap.items()}
        ring, compute, comm = t["ring"], t["compute"], t["comm"]
        overlap = [[name, f"{seconds * 1e3:.2f}"] for name, seconds in t.items()]
        overlap.append(["ring / (compute + comm)", f"{ring / (compute + comm):.3f}"])
        overlap.append(["ring / max(compute, comm)", f"{ring / max(compute, comm):.3f}"])
        lines += ["", f"ring overlap, fwd non-causal {_label(SHAPE)} (slowest rank, ms):"]
        lines.append(format_table(["candidate", "ms"], overlap))
    if memory:
        lines += ["", "JAX fwd+bwd temp_size_in_bytes per device (compiled memory analysis):"]
        rows = []
        for strategy in dict.fromkeys(m.strategy for m in memory):
            found = [m for m in memory if m.strategy == strategy]
            for previous, m in zip([None, *found], found, strict=False):
                growth = "-" if previous is None else f"{m.temp_bytes / previous.temp_bytes:.2f}x"
                mib = f"{m.temp_bytes / 2**20:.1f}"
                rows.append([strategy, _label(m.shape), str(m.temp_bytes), mib, growth])
        headers = ["strategy", "global shape", "bytes", "MiB", "per doubling of S"]
        lines.append(format_table(headers, rows))
    return "\n".join(lines)
