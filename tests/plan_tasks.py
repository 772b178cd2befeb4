"""Rank tasks for the plan tests: the example DiT on every rank of a TorchRanks pool."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from backend_torch.plan import all_reduce_grads, apply_plan
from examples.dit import JAX_PLAN, TORCH_PLAN, init_params, torch_model
from sp_common import sp_group
from sp_common.testing.data import to_numpy, to_torch


def _single_rank_group() -> dist.ProcessGroup:
    """A group holding only this rank (every rank creates every singleton group)."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    return groups[dist.get_rank()]


def _forward_backward(
    model: torch.nn.Module, x: np.ndarray, w: np.ndarray, fn: Any = None, planned: bool = True
):
    xt = to_torch(x).requires_grad_()
    model.zero_grad()
    out = (model if fn is None else fn)(xt)
    (out * to_torch(w)).sum().backward()
    if planned:
        all_reduce_grads(model)
    grads = {n: to_numpy(p.grad) for n, p in model.named_parameters()}
    return to_numpy(out), to_numpy(xt.grad), grads


def dit_with_plan(x: np.ndarray, w: np.ndarray, whole_model: bool, compile: bool) -> dict:
    """Unsharded run (a one-rank SP group) vs the same model sharded by applying a plan."""
    model = torch_model(init_params())
    with sp_group(_single_rank_group()):
        expected = _forward_backward(model, x, w, planned=False)
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    applied = apply_plan(model, JAX_PLAN if whole_model else TORCH_PLAN)
    frames = None
    if compile:
        import torch._dynamo
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        # AOT autograd traces the hooks' forward and backward into the graph; inductor's code
        # for them is compiled in test_compile_dynamic.py and test_attention.py.
        counter = CompileCounterWithBackend("aot_eager")
        got = _forward_backward(
            model, x, w, torch.compile(lambda t: model(t), backend=counter, fullgraph=True)
        )
        frames = counter.frame_count
    else:
        got = _forward_backward(model, x, w)
    applied.remove()
    hooks_after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with sp_group(_single_rank_group()):
        after_removal = _forward_backward(model, x, w, planned=False)
    return {
        "expected": expected,
        "got": got,
        "after_removal_equal": all(
            np.array_equal(a, b) for a, b in zip(after_removal[:2], expected[:2], strict=True)
        ),
        "hooks": (hooks_before, hooks_after),
        "frames": frames,
    }
