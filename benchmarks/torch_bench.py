"""torch benchmarks: tasks that run on every rank of a ``RankPool`` (gloo on the CPU), found
by module name, ``benchmarks.torch_bench``; ``python -m benchmarks.run`` runs them.

Each timing task times its candidates with ``sp_common.testing.interleaved`` (the order rotates
every repeat, so drift hits all of them alike; ``torch_fences``: each call starts right after a
barrier) and returns this rank's seconds per call; ``run.py`` takes the slowest rank of each
repeat and the median over repeats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

import sp_common.api
from backend_torch import autograd, collectives
from backend_torch.attention import attention as local_attention
from benchmarks.peers import vllm_omni_sp_sharding, yunchang_ulysses
from sp_common import (
    sp_all_to_all,
    sp_attention,
    sp_debug,
    sp_gather,
    sp_shard,
    sp_shard_with_padding,
)
from sp_common.testing import Timings, interleaved, make_data, to_torch, torch_fences

# Every timed call starts right after a barrier of all ranks.
_BARRIER = torch_fences()


def _label(shape: Any) -> str:
    return "x".join(map(str, shape))


def _seeded(shape: Any, seed: int) -> torch.Tensor:
    """Seeded finite float32 data of ``shape`` (``make_data``)."""
    return to_torch(make_data(shape, "float32", seed, specials=False))


def _rank_shard(shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """This rank's block along ``dim`` of a ``shape`` tensor: seeded, different on every rank."""
    local = list(shape)
    local[dim] //= dist.get_world_size()
    return _seeded(local, dist.get_rank())


def _all_gather_flat(s: torch.Tensor) -> torch.Tensor:
    """The raw collective: one ``all_gather_single`` of ``s``'s elements into a new 1-D tensor."""
    out = s.new_empty((dist.get_world_size() * s.numel(),))
    dist.all_gather_single(out, s.view(-1))
    return out


def gather_flat(shape: tuple[int, ...], repeats: int) -> Timings:
    """``sp_gather`` of a ``[1, S, H]`` tensor on dim 1 vs the raw ``all_gather_single`` of the
    same bytes into an output allocated per call (as ``sp_gather`` does)."""
    s = _rank_shard(shape, 1)
    fns = {"sp_gather": partial(sp_gather, s, 1), "all_gather_single": partial(_all_gather_flat, s)}
    return interleaved(fns, repeats, fences=_BARRIER)


def gather_batched(shape: tuple[int, ...], repeats: int) -> Timings:
    """``sp_gather`` of a ``[B > 1, S, H]`` tensor on dim 1 vs the straightforward peer (list
    ``all_gather`` + ``torch.cat``), the raw dim-0 ``all_gather_single`` of the same bytes (no
    relayout: its result is ``[N*B, S/N, H]``). ``sp_gather`` itself gathers into strided views
    of its output here (it used to gather into ``[N, *shape]`` and relayout, which page-faulted
    a second full-size buffer per call: 1.23-1.33x the peer at 64 MiB)."""
    s = _rank_shard(shape, 1)
    n = dist.get_world_size()

    def peer() -> torch.Tensor:
        parts = [torch.empty_like(s) for _ in range(n)]
        dist.all_gather(parts, s)
        return torch.cat(parts, dim=1)

    def raw_dim0() -> torch.Tensor:
        out = s.new_empty((n * s.shape[0], *s.shape[1:]))
        dist.all_gather_single(out, s)
        return out

    assert torch.equal(peer(), sp_gather(s, 1))
    fns = {"sp_gather": lambda: sp_gather(s, 1), "all_gather+cat": peer, "raw dim 0": raw_dim0}
    return interleaved(fns, repeats, fences=_BARRIER)


def shard_copy(shape: tuple[int, ...], repeats: int) -> Timings:
    """``sp_shard`` on dim 1 vs ``narrow(...).contiguous()`` (a view when the dims before are 1)
    and ``narrow(...).clone()`` (always a copy, as ``sp_shard``)."""
    x = _seeded(shape, 0)
    n, r = dist.get_world_size(), dist.get_rank()
    length = shape[1] // n
    fns = {
        "sp_shard": lambda: sp_shard(x, 1),
        "narrow.contiguous": lambda: x.narrow(1, r * length, length).contiguous(),
        "narrow.clone": lambda: x.narrow(1, r * length, length).clone(),
    }
    return interleaved(fns, repeats, fences=_BARRIER)


def padded_shard(shape: tuple[int, ...], peer: bool, repeats: int) -> Timings:
    """``sp_shard_with_padding`` on dim 1 (a length N does not divide) vs the least work there is
    (this rank's real rows copied next to its padding, one chunk-size tensor), or with ``peer``
    vs vLLM-Omni's ``sp_shard_with_padding`` (pads the whole tensor, returns a view of it; empty
    Timings when it is not installed). Two separate runs: the peer's full-size allocations
    would otherwise disturb the small candidates they are interleaved with."""
    x = _seeded(shape, 0)
    n, r = dist.get_world_size(), dist.get_rank()
    chunk = -(-shape[1] // n)
    start, real = r * chunk, max(0, min(chunk, shape[1] - r * chunk))
    fill = list(shape)
    fill[1] = chunk - real

    def least() -> torch.Tensor:
        return torch.cat([x.narrow(1, min(start, shape[1]), real), x.new_zeros(fill)], dim=1)

    fns: dict[str, Callable[[], Any]] = {
        "sp_shard_with_padding": lambda: sp_shard_with_padding(x, 1)
    }
    if not peer:
        fns["one chunk"] = least
        return interleaved(fns, repeats, fences=_BARRIER)
    module = vllm_omni_sp_sharding()
    if module is None:
        return {}
    fns["vllm-omni"] = lambda: module.sp_shard_with_padding(x, 1)
    return interleaved(fns, repeats, fences=_BARRIER)


def _repeat(fn: Callable[[], Any], calls: int) -> None:
    for _ in range(calls):
        fn()


def fixed_cost(calls: int, blocks: int) -> Timings:
    """Seconds per call on a tiny ``[1, 4, 1]`` tensor, rank 0 alone (the others wait in a
    barrier), of ``sp_shard`` and of its layers, to attribute the fixed cost:

    - ``sp_shard``: the public call (dispatch, group, checks, then ``backend.shard``)
    - ``resolve``: dispatch + group resolution + world size
    - ``backend.shard``: the backend's shard of a tensor that needs no grad (a grad check, then
      ``local_chunk``: no autograd Function)
    - ``backend.shard (grad)``: the same on a tensor that requires grad (the autograd Function
      around ``local_chunk``)
    - ``local_chunk``: ``get_world_size``/``get_rank`` + narrow + clone
    - ``narrow.clone``: the copy alone
    """
    x = torch.arange(4.0).reshape(1, 4, 1)
    needs_grad = x.clone().requires_grad_()
    g = dist.group.WORLD
    fns: dict[str, Callable[[], Any]] = {
        "sp_shard": lambda: sp_shard(x, 1),
        "resolve": lambda: sp_common.api.resolve("sp_shard", x, None),
        "backend.shard": lambda: autograd.shard(x, 1, g, "gather"),
        "backend.shard (grad)": lambda: autograd.shard(needs_grad, 1, g, "gather"),
        "local_chunk": lambda: collectives.local_chunk(x, 1, g),
        "narrow.clone": lambda: x.narrow(1, 0, 1).clone(),
    }
    times: Timings = {name: [] for name in fns}
    if dist.get_rank() == 0:  # blocks of ``calls`` calls; one untimed block warms up
        block = {name: partial(_repeat, fn, calls) for name, fn in fns.items()}
        for name, ts in interleaved(block, blocks, warmup=1).items():
            times[name] = [t / calls for t in ts]
    dist.barrier()
    return times


def all_to_all(shape: tuple[int, ...], scatter_dim: int, gather_dim: int, repeats: int) -> Timings:
    """``sp_all_to_all`` vs the raw ``all_to_all_single`` plus exactly the relayout copies the
    layout requires (written out by hand, in the tensor's own dtype)."""
    x = _rank_shard(shape, gather_dim)
    n = dist.get_world_size()

    def raw() -> torch.Tensor:
        dims = list(x.shape)
        chunk = dims[scatter_dim] // n
        send = x.reshape([*dims[:scatter_dim], n, chunk, *dims[scatter_dim + 1 :]])
        send = send.movedim(scatter_dim, 0).contiguous()  # a copy unless the dims before are 1
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        out = list(send.shape[1:])
        out[gather_dim] *= n
        return recv.movedim(0, gather_dim).reshape(out)  # a copy unless the dims before are 1

    fns = {"sp_all_to_all": lambda: sp_all_to_all(x, scatter_dim, gather_dim), "raw": raw}
    return interleaved(fns, repeats, fences=_BARRIER)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as they lie in memory, a 1-D view (``t`` dense, its dims in any order:
    SDPA returns ``[B, S, H, D]`` views of ``[B, H, S, D]`` memory); never a copy."""
    strides = t.stride()
    order = sorted(range(t.dim()), key=lambda i: -strides[i])
    return t.permute(order).view(-1)


def _raw_all_to_all(t: torch.Tensor) -> torch.Tensor:
    """One ``all_to_all_single`` of ``t``'s bytes as they lie into a new buffer: the
    collective alone, no relayout."""
    send = _memory_order(t)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv


def attention_vs_floor(
    shape: tuple[int, ...], causal: bool, backward: bool, repeats: int
) -> Timings:
    """``sp_attention`` (Ulysses) on this rank's ``[B, S/N, H, D]`` q, k, v vs the floor, the
    least work Ulysses must do: the same local SDPA call (``backend_torch.attention``) on
    ``[B, S, H/N, D]`` q, k, v laid out beforehand, plus one raw ``all_to_all_single`` of the
    same bytes per tensor Ulysses exchanges (q, k, v in, the output back: 4; with ``backward``
    also the output's gradient in and dq, dk, dv back: 8). ``backward``: each call is the
    forward pass plus ``torch.autograd.grad`` of q, k, v (ours) or of the local inputs (floor).
    ``shape`` is the global ``[B, S, H, D]``."""
    b, length, heads, d = shape
    n, r = dist.get_world_size(), dist.get_rank()
    q, k, v, grad = (_seeded((b, length // n, heads, d), 4 * r + i) for i in range(4))
    # The floor's inputs: what the all-to-all hands the kernel (copied, so that they are leaves).
    qh, kh, vh, grad_h = (sp_all_to_all(t, 2, 1).clone() for t in (q, k, v, grad))
    scale = 1.0 / math.sqrt(d)
    with torch.no_grad():  # the floor's kernel does the work ours does, bit for bit
        local = local_attention(qh, kh, vh, scale=scale, causal=causal, key_mask=None)
        ours_out = sp_attention(q, k, v, strategy="ulysses", causal=causal)
        if not torch.equal(sp_all_to_all(local, 1, 2), ours_out):
            raise AssertionError(f"attention_vs_floor: outputs differ on rank {r} ({shape})")
    for t in (q, k, v, qh, kh, vh):
        t.requires_grad_(backward)

    def ours() -> Any:
        out = sp_attention(q, k, v, strategy="ulysses", causal=causal)
        return torch.autograd.grad(out, (q, k, v), grad) if backward else out

    def floor() -> Any:
        for t in (q, k, v):
            _raw_all_to_all(t.detach())
        out = local_attention(qh, kh, vh, scale=scale, causal=causal, key_mask=None)
        _raw_all_to_all(out.detach())
        if not backward:
            return out
        _raw_all_to_all(grad)
        grads = torch.autograd.grad(out, (qh, kh, vh), grad_h)
        for g in grads:
            _raw_all_to_all(g)
        return grads

    fns = {"sp_attention": ours, "floor": floor}
    return interleaved(fns, repeats, fences=_BARRIER)


def attention_vs_yunchang(shape: tuple[int, ...], causal: bool, repeats: int) -> Timings:
    """The forward pass of ``sp_attention`` vs yunchang's ``LongContextAttention`` (Ulysses
    over all ranks, ring degree 1; see ``benchmarks.peers.yunchang_ulysses``) on the same
    ``[B, S/N, H, D]`` q, k, v, the same process group and the same local kernel (SDPA's math
    backend, the one yunchang's only working CPU path calls; ours runs under
    ``sdpa_kernel(MATH)``). Checks first that the two outputs are bitwise equal; empty Timings
    when yunchang is not installed."""
    peer = yunchang_ulysses()
    if peer is None:
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, length, heads, d = shape
    n, r = dist.get_world_size(), dist.get_rank()
    q, k, v = (_seeded((b, length // n, heads, d), 4 * r + i) for i in range(3))

    def ours() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return sp_attention(q, k, v, strategy="ulysses", causal=causal, group=peer.group)

    def theirs() -> torch.Tensor:
        return peer.forward(q, k, v, causal)

    if not torch.equal(ours(), theirs()):
        raise AssertionError(f"attention_vs_yunchang: outputs differ on rank {r} ({shape})")
    fns = {"sp_attention": ours, "yunchang": theirs}
    return interleaved(fns, repeats, fences=_BARRIER)


def debug_cost(shape: tuple[int, ...], repeats: int) -> Timings:
    """``sp_gather`` on ``[1, S, H]`` with debug mode (a cross-rank shape check first) vs off."""
    s = _rank_shard(shape, 1)

    def debug_on() -> torch.Tensor:
        with sp_debug():
            return sp_gather(s, 1)

    def debug_off() -> torch.Tensor:
        with sp_debug(False):
            return sp_gather(s, 1)

    fns = {"debug on": debug_on, "debug off": debug_off}
    return interleaved(fns, repeats, fences=_BARRIER)


def _full_size_allocations(fn: Callable[[], Any], full_bytes: int) -> list[str]:
    """Every allocation of at least ``full_bytes`` during one call of ``fn`` (torch profiler,
    ``profile_memory=True``), as ``"op (thread)"``; the gloo worker thread's are marked."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    gloo_threads = {e.thread for e in prof.events() if e.name.startswith("gloo:")}
    found = []
    for e in prof.events():
        if e.self_cpu_memory_usage >= full_bytes:
            parent = e.cpu_parent.name if e.cpu_parent is not None else "-"
            where = "gloo worker" if e.thread in gloo_threads else "caller"
            found.append(f"{e.name} in {parent} ({where}, {e.self_cpu_memory_usage >> 20} MiB)")
    return found


def full_size_allocations(
    shape_flat: tuple[int, ...], shape_batched: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Full-size allocations of one call of each op and of its raw collective (full size: the
    gathered tensor for gathers, this rank's tensor for all-to-alls).

    Each entry: ``what``, ``baseline``, ``full_bytes``, ``ours`` and ``raw`` (the allocations).
    """
    n = dist.get_world_size()
    found = []
    for shape in (shape_flat, shape_batched):
        s = _rank_shard(shape, 1)
        full = s.numel() * s.element_size() * n
        found.append(
            {
                "what": f"sp_gather {_label(shape)} dim 1",
                "baseline": "all_gather_single",
                "full_bytes": full,
                "ours": _full_size_allocations(partial(sp_gather, s, 1), full),
                "raw": _full_size_allocations(partial(_all_gather_flat, s), full),
            }
        )
    heads = 16
    seq_sharded = _rank_shard((1, shape_flat[1], heads, shape_flat[2] // heads), 1)
    head_sharded = sp_all_to_all(seq_sharded, 2, 1)
    per_rank = seq_sharded.numel() * seq_sharded.element_size()
    send = seq_sharded.reshape(1, seq_sharded.shape[1], n, heads // n, -1).movedim(2, 0)
    send = send.contiguous()

    def raw_all_to_all() -> torch.Tensor:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return recv

    raw_allocs = _full_size_allocations(raw_all_to_all, per_rank)
    for x, scatter, gather in ((seq_sharded, 2, 1), (head_sharded, 1, 2)):
        found.append(
            {
                "what": f"sp_all_to_all {_label(x.shape)} {scatter} -> {gather}",
                "baseline": "all_to_all_single, send buffer laid out",
                "full_bytes": per_rank,
                "ours": _full_size_allocations(
                    partial(sp_all_to_all, x, scatter, gather), per_rank
                ),
                "raw": raw_allocs,
            }
        )
    return found
