"""The SP group a call uses, and when a group must exist (DESIGN.md, "The SP group").

JAX: a mesh axis named explicitly (``group=``, ``sp_group``) must be bound where the op runs; only
the axis ``"sp"`` with no axis bound at all (outside ``shard_map``) is world size 1.
``apply_plan`` checks its mesh for the SP axis. torch: a 1-D ``DeviceMesh`` is a group, a 2-D
one a TypeError, a group this rank is not a member of a ValueError. Strict mode makes the world
size 1 of "nothing is bound" an error on both backends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sp_common as sp
from backend_jax.plan import apply_plan as jax_apply_plan
from sp_common.testing import data as ref
from sp_common.testing.mesh import mesh_of

from . import group_tasks

pytestmark = pytest.mark.timeout(300)

# Every public op and query, called on a [4, 8, 4] array with keyword arguments ``kw``
# (``group=`` or nothing).
OPS: dict[str, Callable[..., Any]] = {
    "sp_shard": lambda a, **kw: sp.sp_shard(a, 1, **kw),
    "sp_gather": lambda a, **kw: sp.sp_gather(a, 1, **kw),
    "sp_shard_with_padding": lambda a, **kw: sp.sp_shard_with_padding(a, 1, **kw),
    "sp_all_to_all": lambda a, **kw: sp.sp_all_to_all(a, 1, 2, **kw),
    "sp_reduce_scatter": lambda a, **kw: sp.sp_reduce_scatter(a, 1, **kw),
    "sp_padding_mask": lambda a, **kw: sp.sp_padding_mask(a, 5, **kw),
    "sp_ulysses_attention": lambda a, **kw: sp.sp_ulysses_attention(*[a[None]] * 3, **kw),
    "sp_world_size": lambda a, **kw: sp.sp_world_size(a, **kw),
    "sp_rank": lambda a, **kw: sp.sp_rank(a, **kw),
}
X = np.arange(4 * 8 * 4, dtype=np.float32).reshape(4, 8, 4)


def trace_on_mesh(body: Callable[[jax.Array], Any], mesh: jax.sharding.Mesh) -> Any:
    """Trace and run ``jit(shard_map(body))`` over ``mesh`` with ``X`` replicated; return what
    ``body`` returned at trace time (errors are caught inside ``body``, at trace time)."""
    seen: list[Any] = []

    def mapped(a: jax.Array) -> jax.Array:
        seen.append(body(a))
        return jnp.zeros(())

    with jax.set_mesh(mesh):
        jax.jit(jax.shard_map(mapped, mesh=mesh, in_specs=jax.P(), out_specs=jax.P()))(X)
    return seen[0]


def error_of(fn: Callable[[], Any]) -> str:
    """``"Type: message"`` of what ``fn()`` raises, or ``"no error"``."""
    try:
        fn()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


# ------------------------------------------------------------------------------- JAX axes
@pytest.mark.parametrize("op", list(OPS))
def test_an_unbound_jax_axis_named_by_argument_or_block_is_a_value_error_naming_the_bound_axes(
    op: str,
) -> None:
    def body(a: jax.Array) -> tuple[str, str]:
        with sp.sp_group("sequence"):
            by_block = error_of(lambda: OPS[op](a))
        return error_of(lambda: OPS[op](a, group="sequence")), by_block

    by_arg, by_block = trace_on_mesh(body, mesh_of(4))
    for message, source in ((by_arg, "group= argument"), (by_block, "sp_group(...) block")):
        assert message.startswith(f"ValueError: {op}: mesh axis 'sequence'"), message
        assert source in message and "the bound axes are ['sp']" in message, message


def test_a_typo_next_to_a_correct_gather_no_longer_returns_n_times_the_length() -> None:
    def body(a: jax.Array) -> str:
        # Before: the typo made the shard an identity, so the gather returned [4, 32, 4].
        return error_of(lambda: sp.sp_gather(sp.sp_shard(a, 1, group="sequence"), 1))

    assert trace_on_mesh(body, mesh_of(4)).startswith("ValueError: sp_shard: mesh axis 'sequence'")


@pytest.mark.parametrize("op", list(OPS))
def test_an_explicit_jax_axis_outside_shard_map_is_a_value_error(op: str) -> None:
    a = jnp.asarray(X)
    for message in (error_of(lambda: OPS[op](a, group="seq")), error_of(_in_block("seq", op, a))):
        assert message.startswith(f"ValueError: {op}: mesh axis 'seq'"), message
        assert "no mesh axis is bound (outside jax.shard_map)" in message, message


def _in_block(group: Any, op: str, a: Any) -> Callable[[], Any]:
    def call() -> Any:
        with sp.sp_group(group):
            return OPS[op](a)

    return call


def test_the_default_axis_is_world_size_one_only_where_no_axis_is_bound() -> None:
    a = jnp.asarray(X)
    assert sp.sp_world_size(a) == 1 and sp.sp_rank("jax") == 0
    assert sp.sp_shard(a, 1) is a and sp.sp_world_size(a, group="sp") == 1

    def body(a: jax.Array) -> tuple[str, int]:
        return error_of(lambda: sp.sp_gather(a, 1)), sp.sp_world_size(a, group="seq")

    message, size = trace_on_mesh(body, mesh_of(4, axis="seq"))
    assert size == 4
    assert message.startswith("ValueError: sp_gather: the default SP axis 'sp' is not bound")
    assert "the bound axes are ['seq']" in message and "group='seq'" in message, message


def test_every_axis_of_a_tuple_group_must_be_bound() -> None:
    def body(a: jax.Array) -> str:
        return error_of(lambda: sp.sp_shard(a, 1, group=("dp", "sp")))

    message = trace_on_mesh(body, mesh_of(4))
    assert message.startswith("ValueError: sp_shard: mesh axis ('dp', 'sp') (axes ['dp'])"), message
    assert "the bound axes are ['sp']" in message, message


def test_only_the_manual_axes_of_a_partial_shard_map_are_bound() -> None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "sp"))
    sizes: list[Any] = []

    def body(a: jax.Array) -> jax.Array:
        sizes.append(sp.sp_world_size(a))
        sizes.append(error_of(lambda: sp.sp_world_size(a, group="dp")))
        return sp.sp_gather(sp.sp_shard(a, 1), 1)

    with jax.set_mesh(mesh):
        fn = jax.shard_map(body, mesh=mesh, in_specs=jax.P(), out_specs=jax.P(), axis_names={"sp"})
        out = jax.jit(fn)(X)
    np.testing.assert_array_equal(np.asarray(out), X)
    assert sizes[0] == 4 and "mesh axis 'dp'" in sizes[1] and "['sp']" in sizes[1], sizes


# ------------------------------------------------------------------------------ apply_plan
PLAN = sp.SPPlan({"": (sp.ShardInput("x", 1), sp.GatherOutput(1))})


def test_jax_apply_plan_rejects_a_mesh_without_the_sp_axis_naming_its_axes() -> None:
    with pytest.raises(sp.PlanError, match=r"SP axis 'sp', but mesh has axes \('seq',\)"):
        jax_apply_plan(lambda x: x * 2, PLAN, mesh_of(4, axis="seq"))
    with sp.sp_group("sequence"), pytest.raises(sp.PlanError, match=r"SP axis 'sequence'"):
        jax_apply_plan(lambda x: x * 2, PLAN, mesh_of(4, axis="seq"))
    with pytest.raises(TypeError, match=r"apply_plan: mesh must be a jax\.sharding\.Mesh, got str"):
        jax_apply_plan(lambda x: x * 2, PLAN, "sp")


def test_jax_apply_plan_shards_over_the_sp_group_axis_of_its_mesh() -> None:
    seen: list[tuple[int, ...]] = []

    def fn(x: jax.Array) -> jax.Array:
        seen.append(x.shape)
        return x * 2

    mesh = mesh_of(4, axis="seq")
    with sp.sp_group("seq"), jax.set_mesh(mesh):
        out = jax.jit(jax_apply_plan(fn, PLAN, mesh))(X)
    np.testing.assert_array_equal(np.asarray(out), X * 2)
    assert seen == [(4, 2, 4)]


# ----------------------------------------------------------------------------- strict mode
@pytest.mark.parametrize(
    ("framework", "missing"),
    [
        ("torch", "no torch.distributed process group is initialized"),
        ("jax", "no mesh axis is bound (outside jax.shard_map)"),
    ],
)
def test_strict_mode_turns_world_size_one_of_nothing_bound_into_a_value_error(
    framework: str, missing: str
) -> None:
    tensor = torch.from_numpy(X) if framework == "torch" else jnp.asarray(X)
    with sp.sp_strict():
        messages = {op: error_of(lambda op=op: OPS[op](tensor)) for op in OPS}
        messages["by name"] = error_of(lambda: sp.sp_rank(framework))
        with sp.sp_strict(False):
            assert sp.sp_world_size(tensor) == 1 and sp.sp_shard(tensor, 1) is tensor
    for op, message in messages.items():
        name = "sp_rank" if op == "by name" else op
        assert message.startswith(f"ValueError: {name}: strict mode is on"), message
        assert missing in message and "sp_strict(False)" in message, message
    assert sp.sp_world_size(tensor) == 1  # off again after the block


def test_strict_mode_leaves_bound_axes_alone() -> None:
    def body(a: jax.Array) -> tuple[int, jax.Array]:
        with sp.sp_strict():
            return sp.sp_world_size(a), sp.sp_gather(sp.sp_shard(a, 1), 1)

    mesh = mesh_of(4)
    out: list[Any] = []

    def mapped(a: jax.Array) -> jax.Array:
        size, gathered = body(a)
        out.append(size)
        return gathered

    with jax.set_mesh(mesh):
        y = jax.jit(jax.shard_map(mapped, mesh=mesh, in_specs=jax.P(), out_specs=jax.P()))(X)
    np.testing.assert_array_equal(np.asarray(y), X)
    assert out == [4]


def test_strict_mode_reaches_torch_compile_and_recompiles_when_toggled() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: sp.sp_shard(t, 0) * 2, backend="eager")
    t = torch.arange(4.0)
    assert torch.equal(compiled(t), t * 2)
    with sp.sp_strict(), pytest.raises(ValueError, match="sp_shard: strict mode is on"):
        compiled(t)
    assert torch.equal(compiled(t), t * 2)


def test_sp_strict_takes_a_bool() -> None:
    with pytest.raises(TypeError, match="sp_strict: enabled must be a bool, got 'on'"):
        with sp.sp_strict("on"):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize(
    ("value", "then", "expected"),
    [
        ("1", "", "ValueError: sp_world_size: strict mode is on"),
        ("yes", "with sp.sp_strict(False): ", "1"),
        ("0", "", "1"),
    ],
)
def test_the_environment_variable_turns_strict_mode_on_at_import(value, then, expected) -> None:
    code = (
        "import sp_common as sp, jax.numpy as jnp\n"
        "try:\n"
        f"    {then}print(sp.sp_world_size(jnp.ones(2)))\n"
        "except ValueError as e:\n"
        "    print(f'ValueError: {e}')\n"
    )
    env = {**os.environ, "SP_SHARDING_STRICT": value}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(expected), out.stdout


# --------------------------------------------------------------------- torch groups (ranks)
def test_a_1d_device_mesh_is_a_group_for_every_op_by_argument_and_by_block(torch_ranks) -> None:
    x = ref.make_data((2, 8, 3), "float32", seed=11, specials=False)
    for rank, r in enumerate(torch_ranks(4).run(group_tasks.device_mesh_groups, x)):
        pair, me = divmod(rank, 2)  # the ("dp", "sp") mesh: SP groups {0, 1} and {2, 3}
        chunk = np.split(x, 2, axis=1)[me]
        ref.assert_bitwise(r["shard_sp"], chunk, f"rank {rank} shard_sp")
        ref.assert_bitwise(r["shard_dp"], np.split(x, 2, axis=1)[pair], f"rank {rank} shard_dp")
        assert (r["size"], r["rank"], r["dp_rank"]) == (2, me, pair)
        assert r["pad"] == 1
        ref.assert_bitwise(r["gather_unpad"], x[:, :7], f"rank {rank} gather_unpad")
        members = (2 * pair + 1, 2 * pair + 2)  # rank g holds x * (g + 1)
        wanted = np.concatenate([chunk * m for m in members], axis=2)
        ref.assert_bitwise(r["all_to_all"], wanted, f"rank {rank} all_to_all")
        summed = chunk * np.float32(members[0]) + chunk * np.float32(members[1])
        ref.assert_bitwise(r["reduce_scatter"], summed, f"rank {rank} reduce_scatter")
        ref.assert_bitwise(r["block_shard"], chunk, f"rank {rank} block_shard")
        ref.assert_bitwise(r["block_gather"], x * 3, f"rank {rank} block_gather")
        assert r["block_size"] == 2
        ref.assert_bitwise(r["validator"], x[:, :7], f"rank {rank} validator")
        ref.assert_bitwise(r["plan"], x * 2, f"rank {rank} plan")
        assert r["plan_seen"] == (2, 4, 3)


def test_device_mesh_errors_and_a_2d_mesh_as_one_group(torch_ranks) -> None:
    x = np.arange(8, dtype=np.float32)
    for rank, r in enumerate(torch_ranks(4).run(group_tasks.device_mesh_errors, x)):
        # A 2-D mesh (USP's group) is one group of its 4 ranks in row-major order.
        assert r["2d_gather"] == str(x.tolist()), r["2d_gather"]
        assert r["2d_block"] == str(x[2 * rank : 2 * rank + 2].tolist()), r["2d_block"]
        for key, func in (("3d_arg", "sp_gather"), ("3d_block", "sp_group")):
            assert r[key].startswith(f"TypeError: {func}: group is a 3-D DeviceMesh"), r[key]
            assert "shape (1, 2, 2) with dims ('a', 'b', 'c')" in r[key], r[key]
            assert "or two (ring, ulysses) for USP" in r[key] and "mesh['c']" in r[key], r[key]
        for key, func in (
            ("not_member_arg", "sp_shard"),
            ("not_member_block", "sp_group"),
            ("not_member_size", "sp_world_size"),
        ):
            if rank == 0:  # the one member: a group of one rank is world size 1
                assert r[key] == "no error", r[key]
            else:
                assert r[key].startswith(f"ValueError: {func}: group is GroupMember."), r[key]
                assert f"this rank (global rank {rank} of 4) is not a member" in r[key], r[key]
        for key, func in (
            ("mesh_not_member_arg", "sp_rank"),
            ("mesh_not_member_block", "sp_group"),
        ):
            if rank < 2:
                assert r[key] == "no error", r[key]
            else:
                assert r[key].startswith(f"ValueError: {func}: this rank (global rank {rank})")
                assert "a 1-D DeviceMesh of ranks [0, 1]" in r[key], r[key]


def test_a_compiled_function_follows_the_device_mesh_it_is_called_with(torch_ranks) -> None:
    x = ref.make_data((8,), "float32", seed=12, specials=False)
    results = torch_ranks(4).run(group_tasks.compiled_device_mesh, x, timeout_s=280)
    for rank, r in enumerate(results):
        pair, me = divmod(rank, 2)
        for name, chunk in (("sp", me), ("dp", pair), ("sp_again", me)):
            ref.assert_bitwise(r[f"arg_{name}"], np.split(x, 2)[chunk], f"rank {rank} {name}")
            ref.assert_bitwise(r[f"gather_{name}"], x * 2, f"rank {rank} gather {name}")
        ref.assert_bitwise(r["block_sp"], np.split(x, 2)[me], f"rank {rank} block_sp")
        ref.assert_bitwise(r["block_dp"], np.split(x, 2)[pair], f"rank {rank} block_dp")
        # One graph per function and group: sp and dp, by argument and by block. "sp_again" is
        # a fresh (equal) mesh["sp"] object: it reuses the first graph.
        assert r["frames"] == 4, r["frames"]


def test_strict_mode_changes_nothing_where_a_process_group_exists(torch_ranks) -> None:
    x = np.arange(8, dtype=np.float32)
    for rank, r in enumerate(torch_ranks(4).run(group_tasks.strict_with_a_process_group, x)):
        assert (r["size"], r["rank"]) == (4, rank)
        ref.assert_bitwise(r["shard"], np.split(x, 4)[rank], f"rank {rank} shard")
        assert r["single_size"] == 1 and r["single_identity"]
