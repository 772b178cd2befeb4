"""torch rank tasks for ``test_ring.py``: what the ring creates, moves and computes."""

from __future__ import annotations

from typing import Any

from sp_common.testing import make_data, to_torch


def _inputs(seq: int, heads: int, d: int) -> tuple[Any, Any, Any]:
    """This rank's shards of seeded q, k, v ``[1, seq, heads, d]`` (requires grad)."""
    import sp_common as sp

    full = [make_data((1, seq, heads, d), "float32", i, specials=False) for i in range(3)]
    return tuple(sp.sp_shard(to_torch(t), 1).detach().requires_grad_() for t in full)


def created_shapes(strategy: str, seq: int, heads: int, d: int) -> dict[str, Any]:
    """Every floating tensor an op creates during sp_attention's forward and backward on this
    rank's shards (causal, key-masked), recorded with a dispatch mode; and the shapes of the
    tensors the ring sends."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import backend_torch.collectives as collectives
    import sp_common as sp
    from backend_torch.core import TorchBackend

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: set[tuple[int, ...]] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.dim() >= 2:
                    self.shapes.add(tuple(t.shape))
            return out

    sent: list[tuple[int, ...]] = []

    def recording_shift(tensors: Any, group: Any) -> Any:
        sent.extend(tuple(t.shape) for t in tensors)
        return collectives.ring_shift(tensors, group)

    q, k, v = _inputs(seq, heads, d)
    mask = torch.arange(q.shape[1]) % 3 != 1
    TorchBackend.ring_shift = staticmethod(recording_shift)  # type: ignore[method-assign]
    try:
        with Record() as record:
            out = sp.sp_attention(q, k, v, strategy=strategy, causal=True, key_mask=mask)
            out.square().sum().backward()
    finally:
        TorchBackend.ring_shift = staticmethod(collectives.ring_shift)  # type: ignore[method-assign]
    return {"created": sorted(record.shapes), "sent": sorted(set(sent))}


def pair_counts(layout: str, seq: int) -> dict[str, int]:
    """In causal ring attention's forward pass over a sequence of ``seq`` tokens in ``layout``:
    how many (query half, key half) tiles this rank attends (a call over the own block under
    its causal mask covers the lower triangle of its tiles), and in how many kernel calls."""
    import sp_common as sp
    from backend_torch.core import TorchBackend

    calls = {"tiles": 0, "calls": 0}
    block_forward = TorchBackend.block_forward
    half = seq // sp.sp_world_size("torch") // 2

    def counting(self: Any, q5: Any, k: Any, *args: Any, causal: bool = False) -> Any:
        rows, cols = q5.shape[1] // half, k.shape[1] // half
        calls["tiles"] += rows * (rows + 1) // 2 if causal else rows * cols
        calls["calls"] += 1
        return block_forward(self, q5, k, *args, causal=causal)

    full = [to_torch(make_data((1, seq, 2, 4), "float32", i, specials=False)) for i in range(3)]
    q, k, v = (sp.sp_shard_with_padding(t, 1, layout=layout)[0] for t in full)
    TorchBackend.block_forward = counting  # type: ignore[method-assign]
    try:
        sp.sp_attention(q, k, v, strategy="ring", causal=True, layout=layout)
    finally:
        TorchBackend.block_forward = block_forward  # type: ignore[method-assign]
    return calls


def second_derivatives(seq: int) -> dict[str, str]:
    """What a second derivative through ring attention does: by ``create_graph=True`` and by
    ``torch.func.grad`` of ``torch.func.grad``; first-order ``torch.func.grad`` works."""
    import torch

    import sp_common as sp

    q, k, v = _inputs(seq, 2, 4)

    def loss(a: torch.Tensor) -> torch.Tensor:
        return sp.sp_attention(a, k, v, strategy="ring", causal=True).square().sum()

    results = {}
    (g,) = torch.autograd.grad(loss(q), q, create_graph=True)
    try:
        torch.autograd.grad(g.sum(), q)
        results["create_graph"] = "no error"
    except RuntimeError as e:
        results["create_graph"] = str(e)
    first = torch.func.grad(loss)(q.detach())
    results["func_grad_equal"] = str(bool(torch.equal(first, g.detach())))
    try:
        torch.func.grad(lambda a: torch.func.grad(loss)(a).sum())(q.detach())
        results["func_grad_of_grad"] = "no error"
    except RuntimeError as e:
        results["func_grad_of_grad"] = str(e)
    return results


def two_axis_shards(seq: int) -> dict[str, Any]:
    """This rank's sp_shard of ``arange(seq)`` over a 2 x 2 DeviceMesh, its mesh coordinate
    and the gather back; and the error for a mesh whose rows are not in global rank order."""
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    import sp_common as sp

    mesh = DeviceMesh("cpu", [[0, 1], [2, 3]], mesh_dim_names=("ring", "ulysses"))
    x = torch.arange(seq)
    shard = sp.sp_shard(x, 0, group=mesh)
    out = {
        "shard": shard.tolist(),
        "coordinate": mesh.get_coordinate(),
        "gathered": sp.sp_gather(shard, 0, group=mesh).tolist(),
    }
    try:
        sp.sp_shard(x, 0, group=DeviceMesh("cpu", [[0, 2], [1, 3]]))
        out["unordered"] = "no error"
    except ValueError as e:
        out["unordered"] = str(e)
    return out


def tiled(cases: list[Any], key_block: int) -> list[dict[str, Any]]:
    """``attention_tasks.torch_attention`` with the ring's key tiles of ``key_block`` keys."""
    import sp_common.attention.blocks as blocks

    from .attention_tasks import torch_attention

    before, blocks.KEY_BLOCK = blocks.KEY_BLOCK, key_block
    try:
        return torch_attention(cases)
    finally:
        blocks.KEY_BLOCK = before


def usp_over_one_axis() -> str:
    """The error of strategy='usp' over a 1-D subgroup of 2 of the 4 ranks (no 2-D mesh ever
    flattened to it)."""
    import torch.distributed as dist

    import sp_common as sp

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = pairs[dist.get_rank() // 2]
    q = sp.sp_shard(to_torch(make_data((1, 8, 2, 4), "float32", 0, specials=False)), 1, group=group)
    try:
        sp.sp_attention(q, q, q, strategy="usp", group=group)
    except ValueError as e:
        return str(e)
    return "no error"
