"""layout="zigzag": rank r holds chunks r and 2N-1-r of 2N; shards bitwise against numpy,
shard -> gather round trips bitwise (padded or not), gradients bitwise against one device, on
torch 2 and 4 gloo ranks and JAX 2, 4 and 8 devices; errors for lengths that do not fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import sp_common as sp
from sp_common.layouts import positions, sequence_positions, zigzag_order
from sp_common.testing import assert_bitwise, make_data, reference_attention
from sp_common.testing.mesh import mesh_of

from . import layout_tasks as tasks

pytestmark = pytest.mark.timeout(300)

DTYPES = ("float32", "bfloat16", "int32", "bool")


def zigzag_reference(x: np.ndarray, dim: int, n: int) -> tuple[list[np.ndarray], int]:
    """Each rank's zigzag shard of ``x`` padded with zeros to a multiple of 2N, and the pad."""
    pad = -x.shape[dim] % (2 * n)
    widths = [(0, 0)] * x.ndim
    widths[dim] = (0, pad)
    chunks = np.split(np.pad(x, widths), 2 * n, axis=dim)
    shards = [np.concatenate([chunks[r], chunks[2 * n - 1 - r]], axis=dim) for r in range(n)]
    return shards, pad


def test_the_zigzag_order_and_positions_are_the_documented_ones() -> None:
    assert zigzag_order(4) == (0, 7, 1, 6, 2, 5, 3, 4)
    # N = 4, 8 chunks of 3: rank 1 holds chunks 1 and 6, positions 3-5 and 18-20.
    index = np.arange(6)
    assert positions("zigzag", index, 6, 4, 1).tolist() == [3, 4, 5, 18, 19, 20]
    assert positions("contiguous", index, 6, 4, 1).tolist() == list(range(6, 12))
    order = sequence_positions("zigzag", np.arange(24), 6, 4)
    assert sorted(order.tolist()) == list(range(24))
    assert order[:6].tolist() == [0, 1, 2, 21, 22, 23]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_zigzag_shards_match_numpy_and_gather_back_bitwise(n, dtype, torch_ranks) -> None:
    for length in (4 * n, 4 * n + 3, n - 1 if n > 2 else 1):
        x = make_data((2, length, 3), dtype, seed=length)
        want, pad = zigzag_reference(x, 1, n)
        for rank, r in enumerate(torch_ranks(n).run(tasks.zigzag_round_trip, x, 1)):
            assert r["pad"] == pad
            assert_bitwise(r["shard"], want[rank], f"rank {rank} shard, S={length}")
            assert_bitwise(r["whole"], x, f"rank {rank} gather, S={length}")
            if r["plain"] is not None:
                assert_bitwise(r["plain"], want[rank], f"rank {rank} sp_shard, S={length}")


def jax_round_trip(x: np.ndarray, dim: int, n: int) -> tuple[np.ndarray, int, np.ndarray]:
    pads: list[int] = []

    def body(a):
        shard, pad = sp.sp_shard_with_padding(a, dim, layout="zigzag")
        pads.append(pad)
        return shard, sp.sp_gather(shard, dim, pad_size=pad, layout="zigzag")[None]

    spec = P(*([None] * dim), "sp")
    f = jax.jit(jax.shard_map(body, mesh=mesh_of(n), in_specs=P(), out_specs=(spec, P("sp"))))
    shards, wholes = f(jnp.asarray(x))
    return np.asarray(shards), pads[0], np.asarray(wholes)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_zigzag_shards_match_numpy_and_gather_back_bitwise(n, dtype) -> None:
    for length in (4 * n, 4 * n + 3, n - 1):
        x = make_data((2, length, 3), dtype, seed=length)
        want, pad = zigzag_reference(x, 1, n)
        shards, got_pad, wholes = jax_round_trip(x, 1, n)
        assert got_pad == pad
        assert_bitwise(shards, np.concatenate(want, axis=1), f"shards, S={length}")
        for rank in range(n):
            assert_bitwise(wholes[rank], x, f"device {rank} gather, S={length}")


def test_torch_and_jax_zigzag_gradients_are_the_single_device_gradient(torch_ranks) -> None:
    x, w = (make_data((2, 11, 3), "float32", s, specials=False) for s in (1, 2))
    expected = 3 * x**2 * w  # d/dx sum(x**3 * w), the same float32 arithmetic
    for n in (2, 4):
        for rank, g in enumerate(torch_ranks(n).run(tasks.zigzag_gradient, x, w)):
            assert_bitwise(g, to_torch_grad(x, w), f"torch n={n} rank {rank}")

        def loss(a, n=n):
            def body(a, w):
                shard, pad = sp.sp_shard_with_padding(a, 1, layout="zigzag")
                return (sp.sp_gather(shard**3, 1, pad_size=pad, layout="zigzag") * w).sum()

            f = jax.shard_map(body, mesh=mesh_of(n), in_specs=(P(), P()), out_specs=P())
            return f(a, jnp.asarray(w))

        g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
        np.testing.assert_allclose(g, expected, rtol=1e-6)
        assert_bitwise(g, np.asarray(jax.grad(lambda a: (a**3 * w).sum())(jnp.asarray(x))), "jax")


def to_torch_grad(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x).requires_grad_()
    (t**3 * torch.from_numpy(w)).sum().backward()
    return t.grad.numpy()


def test_zigzag_at_world_size_one_is_the_identity() -> None:
    x = torch.arange(5.0)
    assert sp.sp_shard(x, 0, layout="zigzag") is x
    assert sp.sp_shard_with_padding(x, 0, layout="zigzag") == (x, 0)
    assert sp.sp_gather(x, 0, layout="zigzag") is x


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: sp.sp_shard(a, 1, layout="zigzag"), r"size 6 of dim 1 .* not divisible by 2 x"),
        (lambda a: sp.sp_shard(a, 1, layout="ring"), r"layout='ring' is not one of"),
        (lambda a: sp.sp_gather(a[:, :3], 1, layout="zigzag"), r"zigzag shard holds 2 equal"),
    ],
    ids=["length", "unknown layout", "odd shard"],
)
def test_zigzag_errors_say_what_to_do(call, message) -> None:
    def body(a):
        return call(a)

    with pytest.raises(ValueError, match=message):
        jax.jit(jax.shard_map(body, mesh=mesh_of(4), in_specs=P(), out_specs=P()))(
            jnp.zeros((1, 6, 2))
        )


@pytest.mark.parametrize("n", [2, 4])
def test_a_plan_shards_zigzag_and_its_gather_and_attention_follow(n, torch_ranks) -> None:
    x = make_data((1, 4 * n + 1, 2, 4), "float32", 3, specials=False)
    want = reference_attention(x, x, x, causal=True)
    for rank, r in enumerate(torch_ranks(n).run(tasks.planned_zigzag, x, "zigzag")):
        np.testing.assert_allclose(r["got"], want, rtol=1e-5, atol=1e-6, err_msg=str(rank))
    for r in torch_ranks(n).run(tasks.planned_zigzag, x, "contiguous"):
        assert "layout='contiguous', but the planned forward pass" in r["error"]
        assert "pass layout='zigzag'" in r["error"]


def test_a_jax_plan_shards_zigzag_and_gathers_back() -> None:
    x = make_data((1, 11, 2, 4), "float32", 4, specials=False)

    def f(x):
        return sp.sp_attention(x, x, x, causal=True, seq_len=sp.planned_seq_len(), layout="zigzag")

    plan = sp.SPPlan({"": (sp.ShardInput("x", 1, pad=True, layout="zigzag"), sp.GatherOutput(1))})
    got = sp.apply_plan(f, plan, mesh=mesh_of(4))(jnp.asarray(x))
    want = reference_attention(x, x, x, causal=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_shard_input_rejects_an_unknown_layout() -> None:
    with pytest.raises(ValueError, match=r"ShardInput: layout='ring' is not one of"):
        sp.ShardInput("x", 1, layout="ring")
