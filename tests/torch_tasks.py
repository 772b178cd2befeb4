"""Functions that run on every rank of a TorchRanks pool (see torch_ranks.py).

Arguments and results are numpy arrays and plain Python values. Expected errors are caught here
and returned as strings, so a test can assert on every rank's message.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sp_common import (
    ShardingValidator,
    sp_debug,
    sp_gather,
    sp_group,
    sp_rank,
    sp_shard,
    sp_shard_with_padding,
    sp_unpad,
    sp_world_size,
)
from sp_common.testing.data import to_numpy, to_torch


def data_movement(cases: list[tuple[np.ndarray, int, Any]]) -> list[dict[str, Any]]:
    """Shard, gather, padded shard, gather with unpadding and sp_unpad, for each case."""
    out = []
    for x, dim, pad_value in cases:
        t = to_torch(x)
        r: dict[str, Any] = {}
        if x.shape[dim] % sp_world_size(t) == 0:
            s = sp_shard(t, dim)
            r["shard"] = to_numpy(s)
            r["shard_owns_memory"] = (
                s.is_contiguous() and s.untyped_storage().nbytes() == s.numel() * s.element_size()
            )
            r["gather"] = to_numpy(sp_gather(s, dim))
        ps, p = sp_shard_with_padding(t, dim, pad_value)
        r["padded_shard"], r["pad"] = to_numpy(ps), p
        r["gather_unpad"] = to_numpy(sp_gather(ps, dim, pad_size=p))
        r["unpad"] = to_numpy(sp_unpad(sp_gather(ps, dim), dim, p))
        out.append(r)
    return out


def gradients(
    x: np.ndarray, dim: int, w: np.ndarray, padded: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of a replicated loss through shard and gather, and the single-device gradient."""
    t = to_torch(x).requires_grad_()
    if padded:
        s, p = sp_shard_with_padding(t, dim)
    else:
        s, p = sp_shard(t, dim), 0
    y = sp_gather(s * 3, dim, pad_size=p)
    (y * to_torch(w)).sum().backward()
    ref = to_torch(x).requires_grad_()
    (ref * 3 * to_torch(w)).sum().backward()
    return to_numpy(t.grad), to_numpy(ref.grad)


def reduce_scatter_gradient(x: np.ndarray, dim: int, ws: np.ndarray) -> np.ndarray:
    """Rank r's loss term is sum(gather(shard) * ws[r]); returns this rank's shard gradient."""
    s = sp_shard(to_torch(x), dim).requires_grad_()
    y = sp_gather(s, dim, grad_rule="reduce_scatter")
    (y * to_torch(ws[sp_rank(s)])).sum().backward()
    return to_numpy(s.grad)


def compiled_graph_breaks(x: np.ndarray) -> dict[str, Any]:
    """torch.compile(fullgraph=True) over shard, padding and gather (forward and backward).

    fullgraph=True raises on any graph break; the counting backend (around AOT autograd, which
    traces the backward too; inductor compiles these ops in test_compile_dynamic.py) also
    proves the step compiled to exactly one graph."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()

    def step(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ps, p = sp_shard_with_padding(t, 1)
        y = sp_gather(ps * 2, 1, pad_size=p)
        z = sp_gather(sp_shard(t[:, :4], 1) * 3, 1)
        return y, z

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    t = to_torch(x)
    tc = t.clone().requires_grad_()
    yc, zc = compiled(tc)
    (yc.sum() + zc.sum()).backward()
    te = t.clone().requires_grad_()
    ye, ze = step(te)
    (ye.sum() + ze.sum()).backward()
    return {
        "frames": counter.frame_count,
        "forward_equal": torch.equal(yc, ye) and torch.equal(zc, ze),
        "grad_equal": torch.equal(tc.grad, te.grad),
    }


def subgroups(x: np.ndarray) -> dict[str, Any]:
    """Ranks {0,1} and {2,3} form two SP groups; shard/gather over each, by argument and block."""
    n = dist.get_world_size()
    halves = [dist.new_group(list(range(0, n // 2))), dist.new_group(list(range(n // 2, n)))]
    mine = halves[dist.get_rank() // (n // 2)]
    t = to_torch(x)
    by_arg = sp_shard(t, 0, group=mine)
    with sp_group(mine):
        by_block = sp_shard(t, 0)
        gathered = sp_gather(by_block, 0)
        size, rank = sp_world_size(t), sp_rank(t)
    return {
        "by_arg": to_numpy(by_arg),
        "by_block": to_numpy(by_block),
        "gathered": to_numpy(gathered),
        "size": size,
        "rank": rank,
        "default_size": sp_world_size("torch"),
    }


def debug_mismatch(length_by_rank: list[int]) -> str:
    """Each rank gathers a different length under sp_debug(): every rank must raise."""
    t = torch.zeros(2, length_by_rank[dist.get_rank()], 3)
    try:
        with sp_debug():
            sp_gather(t, 1)
    except ValueError as e:
        return str(e)
    return "no error"


def validator_roundtrip(x: np.ndarray) -> dict[str, Any]:
    """A tracked forward with a padded name and a forgotten gather."""
    v = ShardingValidator()
    t = to_torch(x)
    with v.track():
        s = v.shard(t, "hidden", dim=1, validate_divisible=False)
        out = v.gather(s, "hidden", dim=1)
        v.shard(t, "forgotten", dim=1, validate_divisible=False)
    try:
        v.validate()
        message = "no error"
    except ValueError as e:
        message = str(e)
    return {"out": to_numpy(out), "shard_len": s.shape[1], "message": message}


def expect_error(fn_name: str, *args: Any, **kwargs: Any) -> str:
    """Call an sp_common function with a torch tensor built from numpy args; return the error."""
    import sp_common

    args = tuple(to_torch(a) if isinstance(a, np.ndarray) else a for a in args)
    try:
        getattr(sp_common, fn_name)(*args, **kwargs)
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def exchange(stacked: np.ndarray, scatter_dim: int, gather_dim: int, w: np.ndarray) -> dict:
    """Rank r holds stacked[r]: all-to-all, its gradient under loss sum(out * w[r]), and the
    reduce-scatter of stacked[r] along scatter_dim."""
    from sp_common import sp_all_to_all, sp_reduce_scatter

    r = dist.get_rank()
    x = to_torch(stacked[r]).requires_grad_(stacked.dtype.kind == "f")
    out = sp_all_to_all(x, scatter_dim, gather_dim)
    result = {"a2a": to_numpy(out)}
    if x.requires_grad:
        (out * to_torch(w[r])).sum().backward()
        result["a2a_grad"] = to_numpy(x.grad)
    if stacked.dtype != np.bool_:
        result["rs"] = to_numpy(sp_reduce_scatter(to_torch(stacked[r]), scatter_dim))
    return result


def reduce_scatter_gradient_is_gather(stacked: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gradient of sum(reduce_scatter(x_r) * w[r]) summed over ranks, w.r.t. x_r."""
    from sp_common import sp_reduce_scatter

    x = to_torch(stacked[dist.get_rank()]).requires_grad_()
    (sp_reduce_scatter(x, 1) * to_torch(w[dist.get_rank()])).sum().backward()
    return to_numpy(x.grad)


def ulysses(q: np.ndarray, k: np.ndarray, v: np.ndarray, w: np.ndarray) -> dict:
    """Sharded Ulysses attention (padded when S is not divisible) against full attention,
    forward and gradients, on every rank."""
    import torch.nn.functional as F

    from sp_common import sp_ulysses_attention

    def full(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    seq_len = q.shape[1]
    tq, tk, tv = (to_torch(a).requires_grad_() for a in (q, k, v))
    shards = [sp_shard_with_padding(t, 1) for t in (tq, tk, tv)]
    pad = shards[0][1]
    out = sp_ulysses_attention(*(s for s, _ in shards), seq_len=seq_len)
    out = sp_gather(out, 1, pad_size=pad)
    (out * to_torch(w)).sum().backward()
    rq, rk, rv = (to_torch(a).requires_grad_() for a in (q, k, v))
    expected = full(rq, rk, rv)
    (expected * to_torch(w)).sum().backward()
    return {
        "out": to_numpy(out),
        "expected": to_numpy(expected),
        "grads": [to_numpy(t.grad) for t in (tq, tk, tv)],
        "expected_grads": [to_numpy(t.grad) for t in (rq, rk, rv)],
        "local_mask": to_numpy(__import__("sp_common").sp_padding_mask(tq, seq_len)),
    }


def ulysses_compiled(q: np.ndarray) -> dict:
    """torch.compile(fullgraph=True) over a padded Ulysses block, forward and backward."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from sp_common import sp_ulysses_attention

    torch._dynamo.reset()

    def block(t: torch.Tensor) -> torch.Tensor:
        s, p = sp_shard_with_padding(t, 1)
        return sp_gather(sp_ulysses_attention(s, s * 2, s, seq_len=t.shape[1]), 1, pad_size=p)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    tc = to_torch(q).requires_grad_()
    compiled(tc).sum().backward()
    te = to_torch(q).requires_grad_()
    ye = block(te)
    ye.sum().backward()
    return {
        "frames": counter.frame_count,
        "max_out_diff": float((compiled(to_torch(q)) - ye).abs().max()),
        "max_grad_diff": float((tc.grad - te.grad).abs().max()),
    }


def compiled_group_switch(x: np.ndarray) -> dict:
    """One compiled function called with the half-group and the world, by argument and by
    sp_group block: each call must shard over the group it names (recompiling as needed)."""
    n = dist.get_world_size()
    halves = [dist.new_group(list(range(0, n // 2))), dist.new_group(list(range(n // 2, n)))]
    mine = halves[dist.get_rank() // (n // 2)]
    t = to_torch(x)
    # aot_eager: what is tested is which group each traced call shards over (Dynamo's guards),
    # not inductor's code (inductor compiles sp_shard in test_compile_dynamic.py).
    by_arg = torch.compile(
        lambda t, g: sp_shard(t, 0, group=g), fullgraph=True, backend="aot_eager"
    )
    by_block = torch.compile(lambda t: sp_shard(t, 0), fullgraph=True, backend="aot_eager")
    out = {"arg_half": by_arg(t, mine), "arg_world": by_arg(t, dist.group.WORLD)}
    with sp_group(mine):
        out["block_half"] = by_block(t)
    with sp_group(dist.group.WORLD):
        out["block_world"] = by_block(t)
    out["no_block"] = by_block(t)
    return {k: to_numpy(v) for k, v in out.items()}
