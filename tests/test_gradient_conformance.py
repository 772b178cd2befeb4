"""Gradient conformance: every public differentiable op, on both backends, against the
single-device gradient of the same program (the program at world size 1): first order bitwise
where only data moves, second order (grad of grad, ``create_graph=True`` in torch), both
gradient rules, per-rank loss terms, both ``check_vma`` modes, ``torch.func.grad`` and
``torch.vmap``. Plans are covered with parameters upstream and downstream of their shard points
in ``test_exactness.py``. A public op without a row fails ``test_every_public_op_has_a_row``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import sp_common as sp
from sp_common.testing import data as ref
from sp_common.testing.mesh import mesh_of

from . import conformance_tasks
from .conformance_programs import ROWS, Row

pytestmark = pytest.mark.timeout(240)
RTOL, ATOL = 2e-5, 1e-5
# Public names that are not differentiable ops on tensors (queries, flags, plan data, interop),
# and those whose gradients other test modules pin down (named there).
NOT_DIFFERENTIABLE = {
    "GatherOutput",
    "PlanError",
    "SPPlan",
    "ShardInput",
    "ShardingValidator",
    "all_reduce_grads",
    "get_sharding_validator",
    "jax_to_torch",
    "torch_to_jax",
    "planned_seq_len",
    "sp_debug",
    "sp_group",
    "sp_padding_mask",
    "sp_rank",
    "sp_strict",
    "sp_world_size",
}
ELSEWHERE = {"apply_plan": "test_exactness.py, test_plans.py"}


def data(row: Row, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded finite float32 input, loss weights and tangent of ``row.shape``."""
    x, w, v = (ref.make_data(row.shape, "float32", 3 * seed + i, specials=False) for i in range(3))
    return x, w, v


def torch_single_device(row: Row, x, w, v) -> dict[str, np.ndarray]:
    """The program in this process, where no process group exists: world size 1."""
    t = torch.from_numpy(x).requires_grad_()
    (g,) = torch.autograd.grad(row.program(t, torch.from_numpy(w)), t, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.from_numpy(v)).sum(), t)
    return {"grad": g.detach().numpy(), "hvp": hv.numpy()}


def assert_first_order(got: np.ndarray, expected: np.ndarray, row: Row, what: str) -> None:
    if row.bitwise:
        ref.assert_bitwise(got, expected, what)
    else:
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def test_every_public_op_has_a_row() -> None:
    covered = {name for row in ROWS.values() for name in row.covers}
    missing = set(sp.__all__) - covered - NOT_DIFFERENTIABLE - set(ELSEWHERE)
    assert not missing, f"public ops with no gradient conformance row: {sorted(missing)}"
    assert not (covered | set(ELSEWHERE)) & NOT_DIFFERENTIABLE


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_torch_first_and_second_order_gradients_equal_single_device(name, n, torch_ranks) -> None:
    row = ROWS[name]
    x, w, v = data(row)
    expected = torch_single_device(row, x, w, v)
    for rank, got in enumerate(torch_ranks(n).run(conformance_tasks.gradients, name, x, w, v)):
        where = f"torch {name} n={n} rank {rank}"
        assert_first_order(got["grad"], expected["grad"], row, f"{where} grad")
        assert_first_order(got["func_grad"], expected["grad"], row, f"{where} torch.func.grad")
        if not row.torch_second_order:
            assert "differentiable once" in got.get("hvp_error", ""), f"{where}: {got.keys()}"
            continue
        np.testing.assert_allclose(
            got["hvp"], expected["hvp"], rtol=RTOL, atol=ATOL, err_msg=f"{where} grad of grad"
        )


def jax_gradients(row: Row, n: int, x, w, v, check_vma: bool) -> tuple[np.ndarray, np.ndarray]:
    mesh = mesh_of(n)
    if row.per_rank:
        mapped = jax.shard_map(
            lambda a, b: row.program(a, b)[None],
            mesh=mesh,
            in_specs=(P(), P()),
            out_specs=P("sp"),
            check_vma=check_vma,
        )

        def loss(a):
            return mapped(a, w).sum()
    else:
        loss = jax.shard_map(
            lambda a: row.program(a, jnp.asarray(w)),
            mesh=mesh,
            in_specs=P(),
            out_specs=P(),
            check_vma=check_vma,
        )
    with jax.set_mesh(mesh):
        return grad_and_hvp(loss, x, v)


def grad_and_hvp(loss, x, v) -> tuple[np.ndarray, np.ndarray]:
    """``grad(loss)(x)`` and the Hessian of ``loss`` times ``v``, from one jitted call."""
    grad = jax.grad(loss)
    g, hv = jax.jit(lambda a: (grad(a), jax.grad(lambda b: (grad(b) * v).sum())(a)))(x)
    return np.asarray(g), np.asarray(hv)


@functools.cache
def jax_single_device(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The row's program at world size 1 (no mesh): gradient and Hessian-vector product;
    cached (the same for every n and check_vma)."""
    row = ROWS[name]
    x, w, v = data(row)
    return grad_and_hvp(lambda a: row.program(a, jnp.asarray(w)), x, v)


# The ring's second order compiles for ~20 s per case (grad of grad through its loop of
# conds): one case of it, on 4 devices (its fori_loop) with varying-ness checked; the
# all-pairs attention tests cover its first order on 2, 4 and 8 devices.
JAX_CASES = [
    pytest.param(name, n, vma, id=f"{name}-{n}-{'check_vma' if vma else 'no_check_vma'}")
    for name in sorted(ROWS)
    for n in (2, 4)
    for vma in (True, False)
    if name != "ring" or (n, vma) == (4, True)
]


@pytest.mark.parametrize(("name", "n", "check_vma"), JAX_CASES)
def test_jax_first_and_second_order_gradients_equal_single_device(name, n, check_vma) -> None:
    row = ROWS[name]
    x, w, v = data(row)
    expected_g, expected_hv = jax_single_device(name)
    g, hv = jax_gradients(row, n, x, w, v, check_vma)
    where = f"jax {name} n={n} check_vma={check_vma}"
    if check_vma:
        assert_first_order(g, expected_g, row, f"{where} grad")
    else:  # shard_map's own transposes scale by N and psum: equal to rounding
        np.testing.assert_allclose(g, expected_g, rtol=RTOL, atol=ATOL, err_msg=where)
    np.testing.assert_allclose(hv, expected_hv, rtol=RTOL, atol=ATOL, err_msg=f"{where} hvp")


@pytest.mark.parametrize("n", [2, 4])
def test_torch_vmap_runs_each_collective_on_the_whole_batch(n, torch_ranks) -> None:
    x = ref.make_data((3, 2, 8, 4), "float32", seed=3, specials=False)  # [V, B, S, H]
    for rank, got in enumerate(torch_ranks(n).run(conformance_tasks.vmapped_ops, x)):
        chunks = np.split(x, n, axis=2)
        ref.assert_bitwise(got["shard"], chunks[rank], f"rank {rank} vmap shard")
        ref.assert_bitwise(got["gather"], x, f"rank {rank} vmap gather")
        heads = np.split(x, n, axis=3)[rank]
        ref.assert_bitwise(got["all_to_all"], heads, f"rank {rank} vmap all-to-all")
        ref.assert_bitwise(got["reduce_scatter"], n * chunks[rank], f"rank {rank} vmap RS")
        ref.assert_bitwise(got["vmap_of_grad"], 2 * x, f"rank {rank} vmap of grad")


@pytest.mark.parametrize("check_vma", [True, False], ids=["check_vma", "no_check_vma"])
def test_jax_default_rule_refuses_a_per_device_tensor_and_local_an_invariant_one(check_vma) -> None:
    x = np.ones((2, 8), np.float32)

    def default_rule_on_varying(a):
        full = sp.sp_gather(sp.sp_shard(a, 1), 1, grad_rule="reduce_scatter")
        return sp.sp_shard(full, 1).sum()[None]

    def local_rule_on_invariant(a):
        return sp.sp_shard(a, 1, grad_rule="local").sum()[None]

    for fn, says in (
        (default_rule_on_varying, "pass grad_rule='local'"),
        (local_rule_on_invariant, "device-invariant"),
    ):
        mapped = jax.shard_map(
            fn, mesh=mesh_of(2), in_specs=P(), out_specs=P("sp"), check_vma=check_vma
        )
        if check_vma:
            with pytest.raises(ValueError, match=says):
                mapped(x)
        else:  # without types JAX cannot tell: the rule is taken as given
            assert np.asarray(mapped(x)).shape == (2,)
