"""Rank tasks for ``tests/test_plan_args.py``: plans on modules whose ``forward(*args, **kwargs)``
hides its parameters (a pass-through wrapper, ``DistributedDataParallel``), by position and by
keyword, against the unsharded model."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from backend_torch.plan import apply_plan
from examples.dit import JAX_PLAN, init_params, torch_model
from sp_common import sp_group
from sp_common.plan import GatherOutput, ShardInput, SPPlan

from .plan_tasks import _forward_backward, _single_rank_group


class PassThrough(torch.nn.Module):
    """A wrapper whose forward hides the wrapped module's parameters."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def by(arg: str | int) -> SPPlan:
    """The DiT's whole-model plan (path ``""``), naming its input ``arg``."""
    return SPPlan({"": (ShardInput(arg, dim=1, ndim=3, pad=True), GatherOutput(dim=1, ndim=3))})


def wrapped_dit(x: np.ndarray, w: np.ndarray, arg: str | int) -> dict[str, Any]:
    """The DiT inside :class:`PassThrough`, planned at ``""`` by position 0 (called
    ``wrapper(x)``) or by the keyword ``"x"`` (called ``wrapper(x=x)``), against the same wrapper
    unsharded (a one-rank SP group)."""
    wrapper = PassThrough(torch_model(init_params()))
    with sp_group(_single_rank_group()):
        expected = _forward_backward(wrapper, x, w, planned=False)
    call = wrapper if isinstance(arg, int) else (lambda t: wrapper(**{arg: t}))
    with apply_plan(wrapper, by(arg)):
        got = _forward_backward(wrapper, x, w, call)
    return {"expected": expected, "got": got}


def ddp_dit(x: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    """The DiT in ``DistributedDataParallel`` over the SP group itself (the default group),
    planned at ``""`` by position 0 (DDP's ``forward(*inputs, **kwargs)``), against the same DiT
    planned without DDP (by name), and unsharded. DDP's gradients are read as DDP leaves them
    after ``backward()`` (``"ddp_only"``) and after ``all_reduce_grads`` (``"ddp"``)."""
    model = torch_model(init_params())
    with sp_group(_single_rank_group()):
        unsharded = _forward_backward(model, x, w, planned=False)
    with apply_plan(model, JAX_PLAN):
        planned = _forward_backward(model, x, w)
    ddp = DistributedDataParallel(model)
    with apply_plan(ddp, by(0)):
        ddp_only = _forward_backward(ddp, x, w, planned=False)
        got = _forward_backward(ddp, x, w)

    def bare_names(run: tuple) -> tuple:
        out, dx, grads = run
        return out, dx, {k.removeprefix("module."): v for k, v in grads.items()}

    return {
        "unsharded": unsharded,
        "planned": planned,
        "ddp_only": bare_names(ddp_only),
        "ddp": bare_names(got),
    }
