"""Behaviour that needs no second rank: import hygiene, dispatch, world size 1, errors, groups."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sp_common as sp
from sp_common.testing.mesh import mesh_of, run_sharded, spec_on

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import sp_common", ("torch", "jax")),
        ("import sp_common, torch; sp_common.sp_shard(torch.ones(4), 0)", ("jax",)),
        ("import sp_common, jax.numpy as j; sp_common.sp_shard(j.ones(4), 0)", ("torch",)),
    ],
)
def test_a_framework_the_user_did_not_import_is_never_imported(statement, absent) -> None:
    code = f"{statement}; import sys; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("bad", [[1.0, 2.0], np.ones(4), 3.0, None])
def test_unsupported_types_get_a_type_error_naming_the_supported_types(bad) -> None:
    with pytest.raises(TypeError, match=r"sp_shard: tensor must be a torch.Tensor or jax.Array"):
        sp.sp_shard(bad, 0)


@pytest.mark.parametrize("make", [torch.arange, jnp.arange], ids=["torch", "jax"])
def test_world_size_one_makes_every_op_an_identity(make) -> None:
    x = make(10).reshape(2, 5)
    assert sp.sp_world_size(x) == 1 and sp.sp_rank(x) == 0
    assert sp.sp_shard(x, 1) is x
    assert sp.sp_gather(x, -1) is x
    shard, pad = sp.sp_shard_with_padding(x, 1)
    assert shard is x and pad == 0 and type(pad) is int
    assert sp.sp_world_size("torch" if isinstance(x, torch.Tensor) else "jax") == 1


@pytest.mark.parametrize("make", [torch.zeros, jnp.zeros], ids=["torch", "jax"])
@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda x: sp.sp_shard(x, 2), ValueError, r"sp_shard: dim=2 is out of range .* \(2, 3\)"),
        (lambda x: sp.sp_shard(x, 1.0), TypeError, r"sp_shard: dim must be an int, got 1.0"),
        (lambda x: sp.sp_shard(x.sum(), 0), ValueError, r"sp_shard: tensor is 0-d"),
        (lambda x: sp.sp_unpad(x, 1, 4), ValueError, r"sp_unpad: pad_size=4 is outside \[0, 3\]"),
        (lambda x: sp.sp_unpad(x, 1, True), TypeError, r"sp_unpad: pad_size must be an int"),
        (lambda x: sp.sp_gather(x, 0, grad_rule="sum"), ValueError, r"grad_rule='sum'"),
        (lambda x: sp.sp_shard_with_padding(x, 0, "0"), TypeError, r"pad_value must be a"),
        (lambda x: sp.sp_shard_with_padding(x, 0, 1e6), ValueError, r"overflow"),
        (lambda x: sp.sp_world_size("tf"), ValueError, r"unknown framework 'tf'"),
    ],
)
def test_bad_arguments_name_the_function_argument_and_value(make, call, error, message) -> None:
    x = make((2, 3), dtype=torch.float16 if make is torch.zeros else jnp.float16)
    with pytest.raises(error, match=message):
        call(x)


@pytest.mark.parametrize("make", [torch.zeros, jnp.zeros], ids=["torch", "jax"])
def test_a_group_of_the_other_framework_is_a_type_error(make) -> None:
    x = make((2, 4))
    other = "sp" if make is torch.zeros else object()
    with pytest.raises(TypeError, match="sp_gather: group must be"):
        sp.sp_gather(x, 1, group=other)


def test_sp_group_none_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="sp_group: group is None"), sp.sp_group(None):
        pass


@pytest.mark.parametrize(
    ("dtype", "value", "ok"),
    [
        (torch.int32, 1.5, False),
        (torch.int32, float("nan"), False),
        (torch.int32, -(2**31), True),
        (torch.int32, 2**31, False),
        (torch.uint8, 300, False),
        (torch.uint8, -1, False),
        (torch.uint8, 255.0, True),
        (torch.bool, 2, False),
        (torch.bool, True, True),
        (torch.float16, 65504.0, True),
        (torch.float16, 1e5, False),
        (torch.float16, float("-inf"), True),
        (torch.bfloat16, 1e38, True),
        (torch.float32, float("nan"), True),
        (torch.complex64, 1 + 2j, True),
        (torch.float32, 1 + 2j, False),
    ],
)
def test_pad_value_must_be_representable_in_the_dtype(dtype, value, ok) -> None:
    x = torch.zeros(3, dtype=dtype)
    if ok:
        assert sp.sp_shard_with_padding(x, 0, value)[1] == 0
    else:
        with pytest.raises(
            ValueError, match=re.escape(f"pad_value={value!r} cannot be held by dtype")
        ):
            sp.sp_shard_with_padding(x, 0, value)


def test_jax_axis_named_per_call_and_per_block() -> None:
    x = np.arange(24, dtype=np.float32).reshape(8, 3)

    def body(a):
        by_arg = sp.sp_shard(a, 0, group="seq")
        with sp.sp_group("seq"):
            by_block = sp.sp_shard(a, 0)
            size = sp.sp_world_size(a)
        assert size == 4
        with pytest.raises(ValueError, match="the default SP axis 'sp' is not bound"):
            sp.sp_world_size(a)  # this mesh has no "sp" axis: name the axis, as above
        return by_arg, by_block

    mesh = mesh_of(4, "seq")
    with jax.set_mesh(mesh):
        fn = jax.shard_map(body, mesh=mesh, in_specs=jax.P(), out_specs=jax.P("seq"))
        by_arg, by_block = jax.jit(fn)(x)
    np.testing.assert_array_equal(np.asarray(by_arg), x)
    np.testing.assert_array_equal(np.asarray(by_block), x)


def test_jax_tuple_of_axes_is_one_sp_group_of_their_product() -> None:
    x = np.arange(16, dtype=np.float32).reshape(8, 2)

    def body(a):
        s = sp.sp_shard(a, 0, group=("dp", "sp"))
        return s, sp.sp_gather(s, 0, group=("dp", "sp"))

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "sp"))
    with jax.set_mesh(mesh):
        fn = jax.shard_map(
            body, mesh=mesh, in_specs=jax.P(), out_specs=(jax.P(("dp", "sp")), jax.P())
        )
        shards, gathered = jax.jit(fn)(x)
    np.testing.assert_array_equal(np.asarray(shards), x)
    np.testing.assert_array_equal(np.asarray(gathered), x)


def test_jax_gather_result_is_accepted_as_replicated_under_check_vma() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = run_sharded(lambda a: sp.sp_gather(a, 1), 4, (x,), jax.P(), in_specs=(spec_on(1),))
    np.testing.assert_array_equal(np.asarray(out), x)
