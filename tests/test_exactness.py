"""Nothing silently wrong: plans give the single-device gradient for every parameter wherever
their shard and gather points sit (before, inside, after; under activation checkpointing);
inputs consumed and never gathered; attention takes the real length explicitly and raises
where it would have to guess; the validator never returns padding; the gradient rules of the
same program agree across backends or raise. Torch on 2 and 4 gloo ranks, JAX on 2 and 4
devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sp_common as sp
from sp_common import GatherOutput, ShardInput, SPPlan
from sp_common.testing.data import make_data
from sp_common.testing.mesh import mesh_of

from . import exactness_tasks as tasks

pytestmark = pytest.mark.timeout(300)
RTOL, ATOL = 1e-5, 1e-6


def rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded finite float32 data."""
    return make_data(shape, "float32", seed, specials=False)


def assert_close(got, expected, what: str) -> None:
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def assert_runs_equal(r: dict, where: str) -> None:
    got, expected = r["got"], r["expected"]
    for key in ("out", "x_grad", "t_grad"):
        if key in expected:
            assert_close(got[key], expected[key], f"{where} {key}")
    assert set(got["grads"]) == set(expected["grads"])
    for name, grad in expected["grads"].items():
        assert_close(got["grads"][name], grad, f"{where} grad of {name}")


@pytest.mark.parametrize("use_checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("n", [2, 4])
def test_every_parameter_gets_the_single_device_gradient_wherever_it_sits(
    n, use_checkpoint, torch_ranks
) -> None:
    """Before the fix ``pre`` and ``temb`` came out N times too large, and checkpointing the
    planned body raised in backward."""
    x, t, w = rand((2, 10, 4), 1), rand((2, 1, 3), 2), rand((2, 10, 4), 3)
    results = torch_ranks(n).run(tasks.plan_on_both_sides, x, t, w, use_checkpoint)
    for rank, r in enumerate(results):
        assert_runs_equal(r, f"n={n} rank {rank}")


@pytest.mark.parametrize("n", [2, 4])
def test_an_input_consumed_and_never_gathered_is_sharded_with_its_own_name(n, torch_ranks) -> None:
    x, w = rand((2, 10, 4), 4), rand((2, 10, 4), 5)
    pos = np.tile(np.arange(10, dtype=np.int64), (2, 1))
    for rank, r in enumerate(torch_ranks(n).run(tasks.consumed_positions, x, pos, w)):
        assert_runs_equal(r, f"n={n} rank {rank}")


def test_plan_mistakes_raise_on_every_rank_instead_of_guessing(torch_ranks) -> None:
    results = torch_ranks(4).run(tasks.errors, rand((1, 8), 6))
    assert all(r == results[0] for r in results), results
    found = results[0]
    assert "PlanError" in found["sharded twice"] and "already sharded" in found["sharded twice"]
    assert "already has an applied SPPlan" in found["plan applied twice"]
    assert "no module of Linear has an applied SPPlan" in found["all_reduce_grads without a plan"]
    guess = found["seq_len None with padded sequences"]
    assert guess.startswith("ValueError") and "['a', 'b']" in guess and "planned_seq_len" in guess
    rule = found["default rule on a per-rank tensor"]
    assert rule.startswith("ValueError") and "grad_rule='local'" in rule


def full_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64 softmax attention, ``[B, S, H, D]``."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize(("n", "len_a", "len_b"), [(4, 10, 11), (2, 9, 10)])
def test_two_planned_lengths_that_pad_alike_take_the_length_named(
    n, len_a, len_b, torch_ranks
) -> None:
    """Lengths 10 and 11 both pad to 12 at N=4: the guessing code let padded keys take part."""
    a, b = rand((1, len_a, 4, 2), 7), rand((1, len_b, 4, 2), 8)
    expected = full_attention(a, b, b)
    for rank, got in enumerate(torch_ranks(n).run(tasks.cross_attention, a, b)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}")

    plan = SPPlan(
        {
            "": (
                ShardInput("a", dim=1, pad=True, name="a"),
                ShardInput("b", dim=1, pad=True, name="b", gather=False),
                GatherOutput(dim=1, name="a"),
            )
        }
    )

    def named(a, b):
        return sp.sp_ulysses_attention(a, b, b, seq_len=sp.planned_seq_len("b"))

    def guessing(a, b):
        return sp.sp_ulysses_attention(a, b, b)

    with jax.set_mesh(mesh_of(n)):  # jitted: one compile, not one per op
        got = jax.jit(sp.apply_plan(named, plan, mesh=mesh_of(n)))(a, b)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match=r"padded the sequence\(s\) \['a'"):
            jax.jit(sp.apply_plan(guessing, plan, mesh=mesh_of(n)))(a, b)


def test_a_name_with_gather_false_cannot_also_be_gathered() -> None:
    with pytest.raises(sp.PlanError, match="gather=False"):
        SPPlan({"": (ShardInput("p", 1, gather=False), GatherOutput(1))})


def test_planned_seq_len_names_what_was_sharded_and_has_a_default_outside_plans() -> None:
    assert sp.planned_seq_len(default=None) is None
    plan = SPPlan(
        {"": (ShardInput("x", dim=1, pad=True, name="tokens"), GatherOutput(1, name="tokens"))}
    )

    def fn(x):
        assert sp.planned_seq_len("tokens") == 10
        with pytest.raises(sp.PlanError, match=r"no input named 'sequence'.*\['tokens'\]"):
            sp.planned_seq_len()
        return x

    with jax.set_mesh(mesh_of(4)):
        out = sp.apply_plan(fn, plan, mesh=mesh_of(4))(jnp.ones((2, 10)))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("n", [2, 4])
def test_the_validator_removes_padding_in_nested_blocks_and_after_its_block(n, torch_ranks) -> None:
    """It used to return ``[1, 12, 1]`` for a length-10 input."""
    x = np.arange(10, dtype=np.float32).reshape(1, 10, 1)
    for r in torch_ranks(n).run(tasks.validator_padding, x):
        assert r == {"nested": (1, 10, 1), "after": (1, 10, 1)}

    def body(a):
        v = sp.ShardingValidator()
        with v.track():
            h = v.shard(a, "h", 1, validate_divisible=False)
            with v.track():
                nested = v.gather(h, "h", 1)
            late = v.shard(a, "late", 1, validate_divisible=False)
        return nested, v.gather(late, "late", 1)

    mapped = jax.shard_map(body, mesh=mesh_of(n), in_specs=P(), out_specs=(P(), P()))
    nested, after = mapped(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(nested), x)
    np.testing.assert_array_equal(np.asarray(after), x)


def test_a_jax_plan_position_past_the_named_parameters_is_that_positional_argument() -> None:
    """Position 0 of ``def f(*args)`` once meant the whole ``args`` tuple; it is ``args[0]``,
    as in the torch plan (one binder, ``sp_common.plan_args``, serves both)."""
    seen: list[tuple[int, ...]] = []

    def f(*args):
        seen.append(tuple(args[0].shape))
        return args[0] + args[1]

    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    y = np.ones((2, 1, 3), np.float32)
    plan = SPPlan({"": (ShardInput(0, dim=1), GatherOutput(dim=1))})
    out = sp.apply_plan(f, plan, mesh=mesh_of(2))(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_array_equal(np.asarray(out), x + y)
    assert seen == [(2, 2, 3)]


@pytest.mark.parametrize("n", [2, 4])
def test_gradient_accumulation_and_a_second_backward_through_a_plan_are_exact(
    n, torch_ranks
) -> None:
    """Found by review: a sync after each accumulation step gave 2*g1 + g2, and a second
    backward through the input gradient gave 2x (Nx) parameter gradients."""
    x, t, w = rand((2, 10, 4), 11), rand((2, 1, 3), 12), rand((2, 10, 4), 13)
    for rank, r in enumerate(torch_ranks(n).run(tasks.accumulation_and_double_backward, x, t, w)):
        for part, expected in r["expected"].items():
            assert set(r["got"][part]) == set(expected), part
            for name, value in expected.items():
                got = r["got"][part][name]
                assert_close(got, value, f"n={n} rank {rank} {part} {name}")
        assert "were summed by an earlier all_reduce_grads" in r["sync after each step"]


def test_containers_the_plan_cannot_see_into_raise_and_namedtuples_work(torch_ranks) -> None:
    """Found by review: a dataclass output or input silently got N-times gradients."""
    x = rand((2, 5, 4), 14)
    for r in torch_ranks(2).run(tasks.containers, x):
        assert r["namedtuple"].shape == (2, 5, 4)
        assert "cannot see into" in r["dataclass output"] and "Out" in r["dataclass output"]
        assert "an input of the planned model" in r["dataclass input"]
