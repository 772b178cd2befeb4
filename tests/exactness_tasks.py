"""Rank tasks for test_exactness.py: planned torch models whose parameters sit before, inside and
after the shard points, with consumed (never gathered) inputs, activation checkpointing, and
attention over two planned sequences; plus the torch sides of the validator and gradient-rule
cases. Each task returns numpy arrays or error strings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import sp_common as sp
from sp_common import GatherOutput, ShardInput, SPPlan
from sp_common.testing.data import to_numpy, to_torch

WIDTH, HEADS = 8, 4


class Body(nn.Module):
    """The sharded part: attention over the planned sequence, an MLP, and ``temb`` (replicated,
    computed before the shard) added to every token."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, s, 3, HEADS, WIDTH // HEADS).unbind(2)
        attn = sp.sp_ulysses_attention(q, k, v, seq_len=sp.planned_seq_len(default=None))
        return h + torch.tanh(self.out(attn.reshape(b, s, WIDTH))) + temb


class Net(nn.Module):
    """Parameters on every side of the plan's shard point: ``pre`` and ``temb`` run on the full
    sequence before it (tokens made inside the model, as diffusers' ``pos_embed`` does),
    ``body`` between shard and gather, ``post`` after the gather; ``temb``'s output is used both
    inside the sharded body and after the gather."""

    def __init__(self, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.pre, self.temb = nn.Linear(4, WIDTH), nn.Linear(3, WIDTH)
        self.body, self.post = Body(), nn.Linear(WIDTH, 4)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(t)  # [B, 1, W]
        h = self.pre(x)
        if self.use_checkpoint:
            h = checkpoint(self.body, h, temb, use_reentrant=False)
        else:
            h = self.body(h, temb)
        return self.post(h * temb)


PLAN = SPPlan({"body": (ShardInput("h", dim=1, pad=True), GatherOutput(dim=1))})


def _seeded_net(use_checkpoint: bool) -> Net:
    torch.manual_seed(0)
    return Net(use_checkpoint)


def _run(model: nn.Module, x: np.ndarray, t: np.ndarray, w: np.ndarray) -> dict:
    xt, tt = to_torch(x).requires_grad_(), to_torch(t).requires_grad_()
    out = model(xt, tt)
    (out * to_torch(w)).sum().backward()
    return {
        "out": to_numpy(out),
        "x_grad": to_numpy(xt.grad),
        "t_grad": to_numpy(tt.grad),
        "grads": {n: to_numpy(p.grad) for n, p in model.named_parameters()},
    }


def _single_rank_group() -> dist.ProcessGroup:
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    return groups[dist.get_rank()]


def plan_on_both_sides(
    x: np.ndarray, t: np.ndarray, w: np.ndarray, use_checkpoint: bool
) -> dict[str, Any]:
    """The unsharded run (a one-rank group) and the planned run + ``sp.all_reduce_grads``."""
    model = _seeded_net(use_checkpoint)
    with sp.sp_group(_single_rank_group()):
        expected = _run(model, x, t, w)
    model.zero_grad()
    with sp.apply_plan(model, PLAN):
        got = _run(model, x, t, w)
        sp.all_reduce_grads(model)
        got["grads"] = {n: to_numpy(p.grad) for n, p in model.named_parameters()}
    return {"expected": expected, "got": got}


class PosNet(nn.Module):
    """Token positions sharded by the plan (consumed, never gathered) and added to the tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.pos = nn.Linear(4, WIDTH), nn.Embedding(64, WIDTH)
        self.proj = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos(pos)
        b, s, _ = h.shape
        q = k = v = h.reshape(b, s, HEADS, WIDTH // HEADS)
        attn = sp.sp_ulysses_attention(q, k, v, seq_len=sp.planned_seq_len(default=None))
        return self.proj(attn.reshape(b, s, WIDTH))


POS_PLAN = SPPlan(
    {
        "": (
            ShardInput("x", dim=1, pad=True),
            ShardInput("pos", dim=1, pad=True, gather=False, name="positions"),
            GatherOutput(dim=1),
        )
    }
)


def consumed_positions(x: np.ndarray, pos: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    model = PosNet()
    with sp.sp_group(_single_rank_group()):
        expected = _run_pos(model, x, pos, w)
    model.zero_grad()
    with sp.apply_plan(model, POS_PLAN):
        got = _run_pos(model, x, pos, w)
        sp.all_reduce_grads(model)
        got["grads"] = {n: to_numpy(p.grad) for n, p in model.named_parameters()}
    return {"expected": expected, "got": got}


def _run_pos(model: nn.Module, x: np.ndarray, pos: np.ndarray, w: np.ndarray) -> dict:
    xt = to_torch(x).requires_grad_()
    out = model(xt, torch.from_numpy(pos))
    (out * to_torch(w)).sum().backward()
    grads = {n: to_numpy(p.grad) for n, p in model.named_parameters()}
    return {"out": to_numpy(out), "x_grad": to_numpy(xt.grad), "grads": grads}


def errors(x: np.ndarray) -> dict[str, str]:
    """The mistakes each raise, on every rank, instead of guessing."""
    found: dict[str, str] = {}

    def record(key: str, fn: Any) -> None:
        try:
            fn()
            found[key] = "no error"
        except Exception as e:
            found[key] = f"{type(e).__name__}: {e}"

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Identity(), nn.Identity()

        def forward(self, u: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(u))

    twice = SPPlan({"a": ShardInput("input", 1), "b": (ShardInput("input", 1), GatherOutput(1))})
    model = Two()
    with sp.apply_plan(model, twice):
        record("sharded twice", lambda: model(to_torch(x)))
    record("plan applied twice", lambda: (sp.apply_plan(model, twice), sp.apply_plan(model, twice)))
    record("all_reduce_grads without a plan", lambda: sp.all_reduce_grads(nn.Linear(2, 2)))

    # Two planned lengths that pad to the same length: None would guess.
    class Cross(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return sp.sp_ulysses_attention(a, b, b)

    cross = SPPlan(
        {
            "": (
                ShardInput("a", dim=1, pad=True, name="a"),
                ShardInput("b", dim=1, pad=True, name="b", gather=False),
                GatherOutput(dim=1, name="a"),
            )
        }
    )
    a = torch.ones(1, 10, 4, 2)
    b = torch.ones(1, 11, 4, 2)
    crossed = Cross()
    with sp.apply_plan(crossed, cross):
        record("seq_len None with padded sequences", lambda: crossed(a, b))

    # torch can see a reduce-scatter-rule gather feeding sp_shard's default rule.
    y = sp.sp_gather(sp.sp_shard(to_torch(x).requires_grad_(), 1), 1, grad_rule="reduce_scatter")
    record("default rule on a per-rank tensor", lambda: sp.sp_shard(y, 1))
    return found


def cross_attention(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Queries from ``a`` (length 10), keys and values from ``b`` (length 11), both padded to the
    same length by one plan; the key length comes from the plan by name."""

    class Cross(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return sp.sp_ulysses_attention(a, b, b, seq_len=sp.planned_seq_len("b"))

    plan = SPPlan(
        {
            "": (
                ShardInput("a", dim=1, pad=True, name="a"),
                ShardInput("b", dim=1, pad=True, name="b", gather=False),
                GatherOutput(dim=1, name="a"),
            )
        }
    )
    model = Cross()
    with sp.apply_plan(model, plan):
        return to_numpy(model(to_torch(a), to_torch(b)))


def validator_padding(x: np.ndarray) -> dict[str, tuple[int, ...]]:
    """Shapes a padded shard comes back with when gathered in a nested block and after its
    block ended (the length must be the original, never the padded one)."""
    v = sp.ShardingValidator()
    t = to_torch(x)
    with v.track():
        h = v.shard(t, "h", 1, validate_divisible=False)
        with v.track():
            nested = v.gather(h, "h", 1)
        late = v.shard(t, "late", 1, validate_divisible=False)
    after = v.gather(late, "late", 1)
    return {"nested": tuple(nested.shape), "after": tuple(after.shape)}


def accumulation_and_double_backward(x: np.ndarray, t: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    """Gradient accumulation over two steps (one all_reduce_grads at the end; a second call is a
    no-op; a call after each step raises) and a second backward through the planned model's
    input gradient, against the unsharded runs."""
    model = _seeded_net(False)

    def two_steps(planned: bool) -> dict[str, np.ndarray]:
        model.zero_grad()
        for scale in (1.0, 0.5):
            out = model(to_torch(x), to_torch(t))
            (out * to_torch(w) * scale).sum().backward()
        if planned:
            sp.all_reduce_grads(model)
            sp.all_reduce_grads(model)  # unchanged since: a no-op
        return {n: to_numpy(p.grad) for n, p in model.named_parameters()}

    def second_order(planned: bool) -> dict[str, np.ndarray]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        model.zero_grad()
        xt = to_torch(x).requires_grad_()
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no double backward
            loss = (model(xt, to_torch(t)) * to_torch(w)).sum()
            (gx,) = torch.autograd.grad(loss, xt, create_graph=True)
            (gx**2).sum().backward()
        if planned:
            sp.all_reduce_grads(model)
        grads = {n: to_numpy(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        return {"gx": to_numpy(gx), **grads}

    with sp.sp_group(_single_rank_group()):
        expected = {"two steps": two_steps(False), "second order": second_order(False)}
    with sp.apply_plan(model, PLAN):
        got = {"two steps": two_steps(True), "second order": second_order(True)}
        model.zero_grad()
        for _ in range(2):
            (model(to_torch(x), to_torch(t)) * to_torch(w)).sum().backward()
            try:
                sp.all_reduce_grads(model)
                error = "no error"
            except sp.PlanError as e:
                error = str(e)
    return {"expected": expected, "got": got, "sync after each step": error}


def containers(x: np.ndarray) -> dict[str, Any]:
    """Outputs and inputs the plan can and cannot see into."""
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Out:
        sample: torch.Tensor

    Pair = collections.namedtuple("Pair", ["main", "aux"])

    class Inner(nn.Module):
        def forward(self, h: torch.Tensor) -> Any:
            return Pair(h * 2, h.sum())

    class Net2(nn.Module):
        def __init__(self, wrap: bool) -> None:
            super().__init__()
            self.lin, self.inner, self.wrap = nn.Linear(4, 4), Inner(), wrap

        def forward(self, h: torch.Tensor, extra: Any = None) -> Any:
            y = self.inner(self.lin(h)).main
            return Out(y) if self.wrap else y

    plan = SPPlan({"inner": (ShardInput("h", dim=1, pad=True), GatherOutput(dim=1, index=0))})
    found: dict[str, Any] = {}
    for key, wrap, extra in (("namedtuple", False, None), ("dataclass output", True, None)):
        model = Net2(wrap)
        with sp.apply_plan(model, plan):
            try:
                out = model(to_torch(x).requires_grad_(), extra)
                found[key] = to_numpy(out if isinstance(out, torch.Tensor) else out.sample)
            except sp.PlanError as e:
                found[key] = str(e)

    @dataclasses.dataclass
    class In:
        c: torch.Tensor

    model = Net2(False)
    with sp.apply_plan(model, plan):
        try:
            model(to_torch(x), In(torch.ones(2, requires_grad=True)))
            found["dataclass input"] = "no error"
        except sp.PlanError as e:
            found["dataclass input"] = str(e)
    return found
