"""SP plans: the example DiT sharded only by applying a plan matches its unsharded run (forward
and gradients) on 4 gloo ranks and 4 JAX devices, torch and JAX agree, and every mismatch
between plan and model is an error naming the path, argument and shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backend_jax.plan import apply_plan as jax_apply_plan
from backend_torch.plan import apply_plan as torch_apply_plan
from examples.dit import JAX_PLAN, PATCH, init_params, jax_forward
from sp_common import sp_gather
from sp_common.plan import GatherOutput, PlanError, ShardInput, SPPlan
from sp_common.testing import data as ref
from sp_common.testing.mesh import mesh_of

from . import plan_tasks

pytestmark = pytest.mark.timeout(300)
RTOL, ATOL = 1e-4, 1e-5


def inputs(seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    x = ref.make_data((2, seq_len, PATCH), "float32", seed=seq_len, specials=False)
    return x, ref.make_data((2, seq_len, PATCH), "float32", seed=seq_len + 1, specials=False)


def assert_runs_close(got, expected, where: str) -> None:
    (out, dx, grads), (e_out, e_dx, e_grads) = got, expected
    np.testing.assert_allclose(out, e_out, rtol=RTOL, atol=ATOL, err_msg=f"{where} output")
    np.testing.assert_allclose(dx, e_dx, rtol=RTOL, atol=ATOL, err_msg=f"{where} input grad")
    for name in e_grads:
        np.testing.assert_allclose(
            grads[name], e_grads[name], rtol=RTOL, atol=ATOL, err_msg=f"{where} grad {name}"
        )


@functools.cache
def jax_runs(seq_len: int, n: int):
    """The example DiT on ``n`` devices by its plan, and unsharded: (output, (parameter and input
    gradients of ``sum(out * w)``)) of each, each from one jitted call; cached (the torch tests
    compare with the unsharded output)."""
    x, w = inputs(seq_len)
    params = jax.tree_util.tree_map(jnp.asarray, init_params())

    def run(fn):
        def loss(p, x):
            out = fn(p, x)
            return (out * w).sum(), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        return out, grads

    planned = jax_apply_plan(jax_forward, JAX_PLAN, mesh_of(n))
    with jax.set_mesh(mesh_of(n)):
        got = run(planned)
    return got, run(jax_forward)


@pytest.mark.parametrize("seq_len", [8, 10])
def test_jax_dit_sharded_by_a_plan_matches_its_unsharded_run(seq_len) -> None:
    (got, (gp, gx)), (expected, (ep, ex)) = jax_runs(seq_len, 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(ex), rtol=RTOL, atol=ATOL)
    for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(ep), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("whole_model", [False, True], ids=["submodule-plan", "model-plan"])
@pytest.mark.parametrize("seq_len", [8, 10])
def test_torch_dit_sharded_by_a_plan_matches_its_unsharded_run_and_jax(
    seq_len, whole_model, torch_ranks
) -> None:
    x, w = inputs(seq_len)
    jax_out = np.asarray(jax_runs(seq_len, 4)[1][0])
    for rank, r in enumerate(
        torch_ranks(4).run(plan_tasks.dit_with_plan, x, w, whole_model, False)
    ):
        assert_runs_close(r["got"], r["expected"], f"torch rank {rank}")
        np.testing.assert_allclose(r["got"][0], jax_out, rtol=RTOL, atol=ATOL)
        assert r["after_removal_equal"]
        assert r["hooks"] == (0, 0)


def test_torch_plan_works_under_compile_fullgraph(torch_ranks) -> None:
    x, w = inputs(10)
    for rank, r in enumerate(torch_ranks(2).run(plan_tasks.dit_with_plan, x, w, False, True)):
        assert r["frames"] == 1
        assert_runs_close(r["got"], r["expected"], f"compiled rank {rank}")


# ------------------------------------------------------------------- strictness (world size 1)
class TwoOutputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        for block in self.blocks:
            x = block(x)
        return x, None


def test_a_plan_whose_names_do_not_pair_is_rejected_when_built() -> None:
    with pytest.raises(PlanError, match=r"sharded but never gathered: \['h'\]"):
        SPPlan({"": ShardInput("x", dim=1, name="h")})


def test_specs_must_be_plan_types() -> None:
    with pytest.raises(TypeError, match="SPPlan: entry 'a' holds"):
        SPPlan({"a": "shard"})


def test_wildcard_tuple_outputs_kwargs_and_removal() -> None:
    model = TwoOutputs()
    plan = SPPlan(
        {
            "": (ShardInput("x", dim=1, ndim=3), GatherOutput(dim=1, index=0, ndim=3)),
            "blocks.*": (ShardInput("input", dim=1, name="b"), GatherOutput(dim=1, name="b")),
        }
    )
    x = torch.randn(2, 4, 3)
    expected = model(x)[0]
    with torch_apply_plan(model, plan):
        out, none = model(x=x)
    assert none is None and torch.equal(out, expected)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("plan", "call", "message"),
    [
        (
            SPPlan({"": (ShardInput("x", dim=1, ndim=4), GatherOutput(dim=1, index=0))}),
            lambda m: m(torch.zeros(2, 4, 3)),
            r"<model> input 'x': the plan expects a 4-d tensor, got shape \(2, 4, 3\)",
        ),
        (
            SPPlan({"": (ShardInput("mask", dim=1), GatherOutput(dim=1, index=0))}),
            lambda m: m(torch.zeros(2, 4, 3)),
            "<model> input 'mask': the plan shards it, but the call did not pass it",
        ),
        (
            SPPlan({"": (ShardInput("mask", dim=1), GatherOutput(dim=1, index=0))}),
            lambda m: m(torch.zeros(2, 4, 3), mask=None),
            "<model> input 'mask': the plan shards or gathers it, but it is None",
        ),
        (
            SPPlan({"": (ShardInput("x", dim=1), GatherOutput(dim=1, index=1))}),
            lambda m: m(torch.zeros(2, 4, 3)),
            r"<model> output\[1\]: the plan shards or gathers it, but it is None",
        ),
        (
            SPPlan({"": (ShardInput("x", dim=1), GatherOutput(dim=1, index=5))}),
            lambda m: m(torch.zeros(2, 4, 3)),
            r"output\[5\]: the output is tuple of length 2",
        ),
        (
            SPPlan({"": ShardInput("x", dim=1), "blocks.0": GatherOutput(dim=1, index=0)}),
            lambda m: m(torch.zeros(2, 4, 3)),
            r"output is Tensor; fix GatherOutput.index",
        ),
    ],
)
def test_mismatches_at_call_time_name_the_path_argument_and_shape(plan, call, message) -> None:
    model = TwoOutputs()
    with torch_apply_plan(model, plan), pytest.raises(PlanError, match=message):
        call(model)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"decoder": (ShardInput("x", 1), GatherOutput(1))}, "no submodule 'decoder'"),
        ({"blocks.0.*": (ShardInput("x", 1), GatherOutput(1))}, "blocks.0 has no children"),
        ({"blocks.*": (ShardInput("hidden", 1), GatherOutput(1))}, "has no argument 'hidden'"),
    ],
)
def test_registration_errors_leave_no_hook_behind(entries, message) -> None:
    model = TwoOutputs()
    with pytest.raises(PlanError, match=message):
        torch_apply_plan(model, SPPlan(entries))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_shard_whose_gather_never_runs_is_an_error_at_the_end_of_the_forward() -> None:
    class SkipsHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)  # the planned gather on `head` never runs

    plan = SPPlan({"body": ShardInput("input", dim=1), "head": GatherOutput(dim=1)})
    model = SkipsHead()
    with (
        torch_apply_plan(model, plan),
        pytest.raises(PlanError, match=r"never gathered.*'sequence'"),
    ):
        model(torch.zeros(2, 4, 3))


def test_jax_plan_paths_other_than_the_function_itself_are_rejected() -> None:
    with pytest.raises(PlanError, match="JAX functions have no submodule hooks"):
        jax_apply_plan(
            jax_forward, SPPlan({"blocks.*": (ShardInput("x", 1), GatherOutput(1))}), mesh_of(2)
        )


def test_jax_plan_checks_ndim_and_argument_names() -> None:
    with pytest.raises(PlanError, match="has no argument 'tokens'"):
        jax_apply_plan(
            jax_forward, SPPlan({"": (ShardInput("tokens", 1), GatherOutput(1))}), mesh_of(2)
        )
    planned = jax_apply_plan(
        lambda x: sp_gather(x, 1),
        SPPlan({"": (ShardInput("x", 1, ndim=3), GatherOutput(1))}),
        mesh_of(2),
    )
    with pytest.raises(PlanError, match=r"expects a 3-d tensor, got shape \(4, 2\)"):
        planned(jnp.zeros((4, 2)))


def test_sp_common_apply_plan_dispatches_on_the_target() -> None:
    import sp_common

    model = TwoOutputs()
    plan = SPPlan({"": (ShardInput("x", dim=1), GatherOutput(dim=1, index=0))})
    handle = sp_common.apply_plan(model, plan)
    assert model._forward_hooks
    handle.remove()
    planned = sp_common.apply_plan(
        lambda x: x * 2, SPPlan({"": (ShardInput("x", 0), GatherOutput(0))}), mesh=mesh_of(2)
    )
    np.testing.assert_array_equal(np.asarray(planned(jnp.arange(4.0))), np.arange(4.0) * 2)
    with pytest.raises(TypeError, match="apply_plan: target is int"):
        sp_common.apply_plan(3, plan)
