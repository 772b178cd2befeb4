"""Plans on modules whose ``forward(*args, **kwargs)`` hides its parameters: ``ShardInput`` takes
a position (of the call's positional arguments, past the named ones into ``*args``) or a keyword
that ``**kwargs`` receives; a ``functools.wraps``'d forward is planned by the wrapped signature;
``DistributedDataParallel`` is planned at path ``""`` and, with ``all_reduce_grads``, gives the
gradients of the unwrapped planned model."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch

from backend_torch.plan import apply_plan
from sp_common.plan import GatherOutput, PlanError, ShardInput, SPPlan

from . import plan_args_tasks
from .plan_args_tasks import PassThrough
from .test_plans import assert_runs_close, inputs

pytestmark = pytest.mark.timeout(300)


class TwoInputs(torch.nn.Module):
    """``forward(x, mask=None)``: ``x`` is 2-d, ``mask`` 3-d, so a plan with ``ndim=3`` that
    picks the wrong input fails loudly (world size 1 shards nothing, but checks the ndim)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x.sum() + (0 if mask is None else mask)


def plan_for(arg: str | int) -> SPPlan:
    return SPPlan({"": (ShardInput(arg, dim=1, ndim=3), GatherOutput(dim=1, ndim=3))})


X2, M3 = torch.zeros(2, 4), torch.ones(2, 4, 3)


@pytest.mark.parametrize(
    ("arg", "call"),
    [
        (1, lambda m: m(X2, M3)),  # position 1 of the call, past nothing named: *args
        ("mask", lambda m: m(X2, mask=M3)),  # a keyword that **kwargs receives
    ],
)
def test_a_pass_through_forward_takes_positions_and_keywords(arg, call) -> None:
    wrapper = PassThrough(TwoInputs())
    with apply_plan(wrapper, plan_for(arg)):
        assert torch.equal(call(wrapper), call(TwoInputs()))


def test_a_keyword_the_call_does_not_pass_is_the_plan_error_naming_what_it_got() -> None:
    wrapper = PassThrough(TwoInputs())
    with (
        apply_plan(wrapper, plan_for("mask")),
        pytest.raises(
            PlanError,
            match=r"<model> input 'mask': the plan shards it, but the call did not pass it "
            r"\(2 positional, keywords \[\]\)",
        ),
    ):
        wrapper(X2, M3)  # by position: **kwargs never sees a name


def test_a_functools_wraps_forward_is_planned_by_the_wrapped_signature() -> None:
    def logged(forward: Any) -> Any:
        @functools.wraps(forward)
        def wrapper(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return forward(self, *args, **kwargs)

        return wrapper

    class Logged(TwoInputs):
        forward = logged(TwoInputs.forward)

    for arg in ("mask", 1):
        model = Logged()
        with apply_plan(model, plan_for(arg)):
            assert torch.equal(model(X2, M3), TwoInputs()(X2, M3))
            assert torch.equal(model(X2, mask=M3), TwoInputs()(X2, M3))


class OnlyArgs(torch.nn.Module):
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return args[0]


class XAndRest(torch.nn.Module):
    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize(
    ("module", "arg", "message"),
    [
        (
            OnlyArgs(),
            "x",
            r"forward\(\*args\) has no argument 'x'; name one of its parameters \[\]",
        ),
        (OnlyArgs(), -1, r"has no argument -1; .* a position counted from 0\."),
        (TwoInputs(), 2, r"forward\(x, mask\) has no argument 2; .* counted from 0 below 2\."),
        (TwoInputs(), "args", r"forward\(x, mask\) has no argument 'args'"),
        (XAndRest(), "rest", r"forward\(x, \*rest\) has no argument 'rest'"),  # not a keyword
        (PassThrough(TwoInputs()), -1, r"forward\(\*args, \*\*kwargs\) has no argument -1"),
    ],
)
def test_arguments_a_forward_cannot_receive_are_rejected_when_the_plan_is_applied(
    module, arg, message
) -> None:
    with pytest.raises(PlanError, match=message):
        apply_plan(module, plan_for(arg))
    assert not module._forward_pre_hooks and not module._forward_hooks


@pytest.mark.parametrize("arg", [0, "x"])
def test_a_planned_pass_through_wrapper_equals_the_unsharded_model(torch_ranks, arg) -> None:
    x, w = inputs(9)  # 9 does not divide by 2: the plan pads
    for rank, r in enumerate(torch_ranks(2).run(plan_args_tasks.wrapped_dit, x, w, arg)):
        assert_runs_close(r["got"], r["expected"], f"rank {rank} ShardInput({arg!r})")


def test_ddp_over_the_sp_group_planned_at_its_root_equals_the_unwrapped_planned_model(
    torch_ranks,
) -> None:
    # DDP averages each parameter's gradient over its group. Over the SP group that is the mean
    # of the plan's per-rank terms: the total / N on every rank. all_reduce_grads then sums the N
    # equal copies back to the total, so the user calls it after backward() with DDP as without.
    # (Over a separate data-parallel group the same two linear steps give DDP's usual average
    # over the replicas of each replica's total; that layout is not run here.)
    x, w = inputs(9)
    n = 2
    for rank, r in enumerate(torch_ranks(n).run(plan_args_tasks.ddp_dit, x, w)):
        assert_runs_close(r["planned"], r["unsharded"], f"rank {rank} planned")
        assert_runs_close(r["ddp"], r["planned"], f"rank {rank} DDP + all_reduce_grads")
        np.testing.assert_array_equal(r["ddp"][0], r["planned"][0], f"rank {rank} output")
        for name, total in r["planned"][2].items():
            np.testing.assert_allclose(
                r["ddp_only"][2][name], total / n, rtol=1e-5, atol=1e-7, err_msg=name
            )
