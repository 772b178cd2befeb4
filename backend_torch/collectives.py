"""Raw torch.distributed data movement along a dimension, with no autograd.

Every gather moves bytes: the tensors are bit-cast to uint8 (a free view), so any dtype moves
bitwise over any backend, including dtypes gloo cannot reduce (int16, float8, complex). Inputs
go through :func:`_movable` first, because the bytes must be the values: a lazy conjugate or
negative view (``x.conj()``) is resolved, a copy just as for a strided input.
Dynamo rewrites these c10d calls into functional collectives, so they also trace under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from sp_common.debug import CallRecord, disagreement
from sp_common.shapes import shard_bounds

ProcessGroup = dist.ProcessGroup


def _movable(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous memory whose bytes are its values: a lazy conjugate or negative view
    (``x.conj()``, ``x.conj().imag``), whose memory holds the values before the conjugation, is
    resolved. At most one copy: ``contiguous()`` copies a strided view and resolves it too."""
    return x.contiguous().resolve_conj().resolve_neg()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor whose last stride is 1, as ``view(torch.uint8)`` needs: ``t`` itself,
    or ``t`` viewed with the strides ``torch.empty`` gives its shape (the same memory, no copy).

    torch calls a tensor contiguous whatever the strides of its size-1 dims (and of an empty
    tensor): ``x.reshape(2, 1, 4).transpose(1, 2)`` has strides (4, 1, 4), and ``contiguous()``
    and ``view(-1)`` (of one element) keep such strides.
    """
    if t.stride(-1) == 1:
        return t
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= max(size, 1)
    return t.as_strided(t.shape, strides[::-1])


def _as_flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor seen as a 1-D uint8 buffer (a view, no copy)."""
    flat = _dense(t).view(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor seen as uint8 with its shape kept but the last dim scaled by the item
    size (a view, no copy): chunks along any dim stay the same elements."""
    return t if t.dtype == torch.uint8 else _dense(t).view(torch.uint8)


def local_chunk(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim``: ``[.., S, ..] -> [.., S/N, ..]``, a contiguous
    copy that does not keep ``x`` alive."""
    n = dist.get_world_size(group)
    start, length = shard_bounds(x.shape[dim], n, dist.get_rank(group))
    return x.narrow(dim, start, length).clone(memory_format=torch.contiguous_format)


def all_gather_along(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order: ``[.., s, ..] -> [.., N*s, ..]``.

    One collective, and no full-size temporary of its own (the process group may use a receive
    buffer): when every dim before ``dim`` has size 1,
    rank-major order is already the output's memory order, so one ``all_gather_single`` (torch
    2.13's name for ``all_gather_into_tensor``) writes straight into the output; otherwise a list
    ``all_gather`` writes each rank's block into its (strided) view of the output. While
    torch.compile traces, the second case gathers into ``[N, *x.shape]`` and makes one relayout
    copy (the functional collective needs a contiguous output).
    """
    n = dist.get_world_size(group)
    x = _movable(x)
    out_shape = list(x.shape)
    out_shape[dim] *= n
    if math.prod(x.shape[:dim]) == 1:
        out = x.new_empty(out_shape)
        dist.all_gather_single(_as_flat_bytes(out), _as_flat_bytes(x), group=group)
        return out
    if not torch.compiler.is_compiling():
        # A fresh [N, *shape] temporary plus a relayout page-faults a second full-size buffer on
        # every call; gathering into views of the output does not (see benchmarks/).
        out = x.new_empty(out_shape)
        dist.all_gather(list(_as_bytes(out).chunk(n, dim)), _as_bytes(x), group=group)
        return out
    stacked = x.new_empty((n, *x.shape))
    dist.all_gather_single(_as_flat_bytes(stacked), _as_flat_bytes(x), group=group)
    return stacked.movedim(0, dim).reshape(out_shape)


def reduce_scatter_along(
    x: torch.Tensor, dim: int, group: ProcessGroup | None, func: str = "sp_reduce_scatter"
) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``:
    ``[.., N*s, ..] -> [.., s, ..]``. One ``reduce_scatter_single`` in ``x``'s own dtype; a dtype
    a gloo group cannot sum raises TypeError naming ``func`` first."""
    check_summable(func, x, group)
    n = dist.get_world_size(group)
    shape = list(x.shape)
    chunk = shape[dim] // n
    # Rank-major input: [N, ..., s, ...]; a view (no copy) when the dims before `dim` are 1.
    # Movable: a sum over the memory of x.conj() would add the unconjugated values.
    rank_major = _movable(x.reshape([*shape[:dim], n, chunk, *shape[dim + 1 :]]).movedim(dim, 0))
    out_shape = [*shape[:dim], chunk, *shape[dim + 1 :]]
    out = x.new_empty(out_shape)
    dist.reduce_scatter_single(out.view(-1), rank_major.view(-1), group=group)
    return out


# The dtypes gloo's reduce kernels can sum (complex through a real view). Bit-moving collectives
# take any dtype; a gloo reduce of another one (float8, int16, uint16/32/64) fails inside C++.
GLOO_SUM_DTYPES = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
    }
)


def check_summable(func: str, x: torch.Tensor, group: ProcessGroup | None) -> None:
    """Raise TypeError, before any communication, when ``group`` sums ``x``'s device through gloo
    and gloo cannot sum ``x``'s dtype. Every rank passes the same dtype, so every rank raises.
    Other backends (NCCL) are left to sum what they support."""
    if x.dtype in GLOO_SUM_DTYPES:
        return
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo" or "cpu:gloo,cuda:nccl"
    per_device = {dev: name for dev, _, name in (item.partition(":") for item in config.split(","))}
    if per_device.get(x.device.type) == "gloo":
        raise TypeError(
            f"{func}: the gloo process group cannot sum dtype {x.dtype} (it sums float16, "
            "bfloat16, float32, float64, complex64, complex128, int8, uint8, int32 and int64); "
            "cast the tensor first, e.g. tensor.to(torch.float32) or tensor.to(torch.bfloat16), "
            "and cast the result back."
        )


def check_consistent(
    func: str, record: CallRecord, device: torch.device, group: ProcessGroup | None
) -> None:
    """Raise ValueError on every rank unless every rank of ``group`` announces the same
    ``record`` of its call to ``func`` (see ``sp_common.debug``).

    One all-gather of a 128-bit digest of the record per rank (two int64 on ``device``); only when
    the digests differ, a second one (``all_gather_object``) of the records, for the message.
    Every rank sees the same digests, so every rank raises, or none does.
    """
    digest = hashlib.blake2b(repr(record).encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i : i + 8], "little", signed=True) for i in (0, 8)]
    mine = torch.tensor(words, dtype=torch.int64, device=device)
    n = dist.get_world_size(group)
    everyone = mine.new_empty(n * mine.numel())
    dist.all_gather_single(everyone, mine, group=group)
    rows = everyone.view(n, -1).tolist()
    if all(row == rows[0] for row in rows):
        return
    records: list[Any] = [None] * n
    dist.all_gather_object(records, record, group=group)
    raise disagreement(func, records)


def all_to_all_along(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup | None
) -> torch.Tensor:
    """Send chunk j of ``scatter_dim`` to rank j; concatenate what arrives along ``gather_dim``
    in rank order: ``[.., N*c (scatter), .., g (gather), ..] -> [.., c, .., N*g, ..]``.

    One ``all_to_all_single`` over bytes. Relayout copies only where the layout requires them:
    none on the way in when the dims before ``scatter_dim`` are all 1, none on the way out when
    the dims before ``gather_dim`` are all 1.
    """
    n = dist.get_world_size(group)
    shape = list(x.shape)
    chunk = shape[scatter_dim] // n
    # Rank-major send buffer [N, ..., c, ...]: chunk j is contiguous block j.
    send = x.reshape([*shape[:scatter_dim], n, chunk, *shape[scatter_dim + 1 :]])
    send = _movable(send.movedim(scatter_dim, 0))
    recv = torch.empty_like(send)
    dist.all_to_all_single(_as_flat_bytes(recv), _as_flat_bytes(send), group=group)
    # recv[j] is rank j's chunk (shape with `chunk` at scatter_dim); lay them along gather_dim.
    out_shape = list(send.shape[1:])
    out_shape[gather_dim] *= n
    return recv.movedim(0, gather_dim).reshape(out_shape)


class Moving:
    """Tensors on their way from rank ``r - 1``: ``wait()`` gives them once they arrived."""

    def __init__(self, received: tuple[torch.Tensor, ...], works: list[Any]) -> None:
        self.received, self.works = received, works

    def wait(self) -> tuple[torch.Tensor, ...]:
        for work in self.works:
            work.wait()
        self.works = []
        return self.received


def ring_shift(tensors: tuple[torch.Tensor, ...], group: ProcessGroup | None) -> Moving:
    """Start sending each tensor to rank ``r + 1`` of ``group`` and receiving rank ``r - 1``'s
    (same shapes and dtypes, bitwise: bytes move, so bool and half tensors travel too).

    Eager: one ``batch_isend_irecv`` of all the tensors, so the transfer runs while the caller
    computes. While torch.compile traces: ``permute_tensor`` (a functional all-to-all with one
    non-empty split), which the compiler schedules.
    """
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    sends = [_movable(t) for t in tensors]
    if torch.compiler.is_compiling():
        ring = [(i + 1) % n for i in range(n)]
        over = group if group is not None else dist.group.WORLD
        assert over is not None  # initialized: the caller has a world size above 1
        moved = [
            funcol.permute_tensor(_as_flat_bytes(t), ring, over).view(t.dtype).view(t.shape)
            for t in sends
        ]
        return Moving(tuple(moved), [])
    to = dist.get_global_rank(group, (rank + 1) % n) if group is not None else (rank + 1) % n
    source = dist.get_global_rank(group, (rank - 1) % n) if group is not None else (rank - 1) % n
    received = tuple(torch.empty_like(t) for t in sends)
    ops = [dist.P2POp(dist.isend, _as_flat_bytes(t), to, group) for t in sends]
    ops += [dist.P2POp(dist.irecv, _as_flat_bytes(t), source, group) for t in received]
    return Moving(received, dist.batch_isend_irecv(ops))
