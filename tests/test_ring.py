"""Ring attention beyond its values (those are in ``test_attention.py``'s all-pairs sample): it
never holds a tensor of the whole sequence and moves only shards, the zigzag layout balances
causal work, and a torch second derivative raises instead of coming out wrong (JAX
differentiates the explicit backward: ``test_gradient_conformance.py``'s ring row)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sp_common as sp
from sp_common.testing import make_data
from sp_common.testing.mesh import mesh_of, spec_on

from . import ring_tasks
from .attention_tasks import AttnCase
from .test_attention import assert_matches, jax_attention

pytestmark = pytest.mark.timeout(300)

N, LOCAL, HEADS, D = 4, 10, 2, 4
SEQ = N * LOCAL
# One shard of q, k or v: [1, LOCAL, HEADS, D]. Every tensor the ring creates is at most
# that big (a causal tile of logits is [1, LOCAL/2, HEADS, 1, LOCAL/2], 50 elements); a
# gathered key or value (Ulysses) has N / HEADS times more per head.
SHARD = LOCAL * HEADS * D


def _numel(shape) -> int:
    return int(np.prod(shape))


def test_torch_ring_creates_no_tensor_of_the_whole_sequence_and_sends_only_shards(
    torch_ranks,
) -> None:
    for r in torch_ranks(N).run(ring_tasks.created_shapes, "ring", SEQ, HEADS, D):
        assert r["created"] and max(map(_numel, r["created"])) <= SHARD, r["created"]
        assert r["sent"] == [(1, LOCAL), (1, LOCAL, HEADS, D)], r["sent"]
    # The check sees full-length tensors where they exist: Ulysses gathers the sequence.
    for r in torch_ranks(N).run(ring_tasks.created_shapes, "ulysses", SEQ, HEADS * N, D):
        assert (1, SEQ, HEADS, D) in r["created"]


def _avals(jaxpr) -> list:
    """Every output aval of every equation, sub-jaxprs (loops, conds, custom rules) included."""
    found = []
    for eqn in jaxpr.eqns:
        found += [v.aval for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _avals(inner)
    return found


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_jax_ring_holds_no_array_of_the_whole_sequence_and_only_permutes(strategy) -> None:
    """The jaxpr of the forward and backward pass on already-sharded inputs: under the ring
    no floating array is larger than one shard and the only collective is ppermute;
    Ulysses (the control) does hold full-length arrays."""
    heads = HEADS if strategy == "ring" else HEADS * N
    args = [make_data((1, SEQ, heads, D), "float32", i, specials=False) for i in range(3)]
    mask = jnp.arange(SEQ) % 3 != 1

    def loss(q, k, v, m):
        out = sp.sp_attention(q, k, v, strategy=strategy, causal=True, key_mask=m)
        return jax.lax.psum(jnp.sum(out**2), "sp")

    body = jax.grad(loss, argnums=(0, 1, 2))
    f = jax.shard_map(
        body, mesh=mesh_of(N), in_specs=(spec_on(1),) * 3 + (spec_on(0),), out_specs=spec_on(1)
    )
    jaxpr = jax.make_jaxpr(f)(*args, mask).jaxpr
    inner = next(e.params["jaxpr"] for e in jaxpr.eqns if e.primitive.name == "shard_map")
    floating = [a for a in _avals(inner) if jnp.issubdtype(a.dtype, jnp.floating) and a.ndim]
    largest = max(_numel(a.shape) for a in floating)
    collectives = {p for p in _primitives(inner) if p in ("ppermute", "all_gather", "all_to_all")}
    if strategy == "ring":
        assert largest <= SHARD and collectives == {"ppermute"}, (largest, collectives)
    else:
        assert (1, SEQ, HEADS, D) in {a.shape for a in floating} and "all_to_all" in collectives


def test_causal_zigzag_ring_gives_every_rank_the_same_work(torch_ranks) -> None:
    """Tiles of (half shard x half shard) each rank attends: zigzag 3 on its own block and 2 on
    each other, 2N + 1 on every rank; contiguous 4r + 3 on rank r (the last rank does nearly
    twice the balanced work). One kernel call per block attended: the own block under its
    causal mask, another block's tiles as one rectangle."""
    zigzag = torch_ranks(N).run(ring_tasks.pair_counts, "zigzag", 32)
    contiguous = torch_ranks(N).run(ring_tasks.pair_counts, "contiguous", 32)
    assert [r["tiles"] for r in zigzag] == [2 * N + 1] * N
    assert [r["tiles"] for r in contiguous] == [4 * r + 3 for r in range(N)]
    assert [r["calls"] for r in zigzag] == [N] * N
    assert [r["calls"] for r in contiguous] == [r + 1 for r in range(N)]


def test_torch_second_derivatives_through_the_ring_raise_and_first_order_func_grad_works(
    torch_ranks,
) -> None:
    for r in torch_ranks(2).run(ring_tasks.second_derivatives, 8):
        assert "differentiable once" in r["create_graph"], r
        assert "differentiable once" in r["func_grad_of_grad"], r
        assert r["func_grad_equal"] == "True"


def test_a_two_axis_torch_group_shards_in_row_major_mesh_order(torch_ranks) -> None:
    """sp_shard over a 2-D DeviceMesh (USP's group): one group of R x U ranks, shard
    ``ring_index * U + ulysses_index``. A mesh whose ranks are not in increasing row-major
    order raises: process groups number ranks in global order, so its flattened group would
    shard in another order than its dims' groups attend in (found by this test: rank 1 of
    [[0, 2], [1, 3]] got shard 1 instead of 2)."""
    for r in torch_ranks(4).run(ring_tasks.two_axis_shards, 8):
        ring, ulysses = r["coordinate"]
        index = ring * 2 + ulysses
        assert r["shard"] == [2 * index, 2 * index + 1], r
        assert r["gathered"] == list(range(8))
        assert "not in increasing row-major order" in r["unordered"], r


TILED = [  # ring blocks of 5 and 10 keys in tiles of 4: a padded last tile, causal cuts
    AttnCase(2, 19, 6, 2, True, "batch", "float64", strategy="ring", layout="zigzag"),
    AttnCase(2, 20, 4, 4, False, "shared", "float64", strategy="ring"),
]


def test_torch_ring_walks_each_block_in_key_tiles_exactly(torch_ranks) -> None:
    for rank, results in enumerate(torch_ranks(2).run(ring_tasks.tiled, TILED, 4)):
        for case, r in zip(TILED, results, strict=True):
            assert_matches(case, r["out"], r["grads"], f"torch rank {rank}")


@pytest.mark.usefixtures("jax_x64")
def test_jax_ring_scans_each_block_in_key_tiles_exactly(monkeypatch) -> None:
    import sp_common.attention.blocks as blocks

    monkeypatch.setattr(blocks, "KEY_BLOCK", 4)
    for case in TILED:
        assert_matches(case, *jax_attention.__wrapped__(case), "jax")


def test_jax_ring_temporaries_grow_linearly_with_the_sequence(monkeypatch) -> None:
    """XLA's accounting of the compiled forward and backward on 4 devices: with key tiles of
    64, 4x the sequence is 4x the temporaries (the [s, s] logits of a block would be 16x)."""
    import sp_common.attention.blocks as blocks

    monkeypatch.setattr(blocks, "KEY_BLOCK", 64)

    def temp_bytes(seq: int) -> int:
        def loss(q):
            out = sp.sp_attention(q, q, q, strategy="ring", causal=True)
            return jax.lax.psum(jnp.sum(out**2), "sp")

        f = jax.shard_map(
            jax.grad(loss), mesh=mesh_of(4), in_specs=spec_on(1), out_specs=spec_on(1)
        )
        q = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
        return int(jax.jit(f).lower(q).compile().memory_analysis().temp_size_in_bytes)

    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large <= 5 * small, (small, large)


def test_torch_usp_over_a_group_of_one_axis_raises_naming_the_fix(torch_ranks) -> None:
    for message in torch_ranks(4).run(ring_tasks.usp_over_one_axis):
        assert message.startswith("sp_attention: strategy='usp' needs a group of two axes")
        assert "init_device_mesh" in message, message
