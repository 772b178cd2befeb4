"""Ulysses attention through ``sp_ulysses_attention``: equal to full attention on the original
length (forward and gradients of q, k, v) on torch gloo ranks, divisible or padded; the padding
mask; clear errors; world size 1. The sharded JAX runs, torch-JAX agreement and torch.compile
of a padded block in one graph are in test_attention.py (``strategy="ulysses"``, which
``sp_ulysses_attention`` is, as that file checks) and test_compile_dynamic.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sp_common as sp
from sp_common.testing import data as ref
from sp_common.testing import reference_attention
from sp_common.testing.mesh import sharded, spec_on

from . import torch_tasks

pytestmark = pytest.mark.timeout(300)
B, H, D = 2, 8, 4


def qkvw(seq_len: int, heads: int = H) -> tuple[np.ndarray, ...]:
    """Seeded finite q, k, v and loss weights of shape ``[B, seq_len, heads, D]``."""
    return tuple(
        ref.make_data((B, seq_len, heads, D), "float32", 100 + i, specials=False) for i in range(4)
    )


@pytest.mark.parametrize("seq_len", [8, 10, 3])
def test_torch_ulysses_equals_full_attention_and_each_rank_masks_its_padding(
    seq_len, torch_ranks
) -> None:
    """``sp_ulysses_attention`` with ``seq_len`` on 2 and 4 gloo ranks (divisible, padded,
    shorter than 4): forward and q, k, v gradients equal torch's unsharded SDPA and the float64
    reference, and ``sp_padding_mask`` on each rank marks exactly its real tokens. The JAX side
    (2, 4 and 8 devices, these length kinds) and torch-JAX agreement are in test_attention.py."""
    q, k, v, w = qkvw(seq_len)
    expected = reference_attention(q, k, v)
    for n in (2, 4):
        for rank, r in enumerate(torch_ranks(n).run(torch_tasks.ulysses, q, k, v, w)):
            where = f"torch n={n} rank={rank}"
            np.testing.assert_allclose(r["out"], r["expected"], rtol=1e-5, atol=1e-6, err_msg=where)
            for g, e in zip(r["grads"], r["expected_grads"], strict=True):
                np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=where)
            np.testing.assert_allclose(r["out"], expected, rtol=1e-5, atol=1e-5, err_msg=where)
            padded = -(-seq_len // n)
            expected_mask = np.arange(padded * n)[rank * padded : (rank + 1) * padded] < seq_len
            np.testing.assert_array_equal(r["local_mask"], expected_mask)


def test_padding_mask_local_and_global_in_jax() -> None:
    def body(a):
        return sp.sp_padding_mask(a, 10), sp.sp_padding_mask(a, 10, local=False)

    local, full = sharded(body, 4, (jax.P(),), (spec_on(0), jax.P()))(jnp.zeros(3))
    expected = np.arange(12) < 10
    np.testing.assert_array_equal(np.asarray(local), expected)
    np.testing.assert_array_equal(np.asarray(full), expected)


def test_padding_mask_at_world_size_one_is_all_true() -> None:
    assert sp.sp_padding_mask(torch.zeros(1), 5).tolist() == [True] * 5


def test_a_head_count_the_world_size_does_not_divide_works() -> None:
    """It used to be a ValueError; heads are padded now (see test_attention.py for the rest)."""
    q, k, v, _ = qkvw(8, heads=6)

    def body(q, k, v):
        shards = [sp.sp_shard(t, 1) for t in (q, k, v)]
        return sp.sp_gather(sp.sp_ulysses_attention(*shards), 1)

    out = sharded(body, 4, (jax.P(),) * 3, jax.P())(q, k, v)
    expected = reference_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [torch.zeros, jnp.zeros], ids=["torch", "jax"])
@pytest.mark.parametrize(
    ("shapes", "kwargs", "message"),
    [
        ([(1, 4, 2, 3), (1, 4, 2), (1, 4, 2, 3)], {}, "q must be \\[B, s, Hq, D\\]"),
        ([(1, 4, 2, 3)] * 3, {"seq_len": 5}, "seq_len=5 must be in \\[1, 4\\]"),
        ([(1, 4, 2, 3)] * 3, {"seq_len": 0}, "seq_len=0 must be"),
    ],
)
def test_ulysses_rejects_bad_shapes_and_lengths(make, shapes, kwargs, message) -> None:
    q, k, v = (make(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        sp.sp_ulysses_attention(q, k, v, **kwargs)


def test_world_size_one_ulysses_is_masked_full_attention() -> None:
    q, k, v, _ = qkvw(6)
    out = sp.sp_ulysses_attention(*(jnp.asarray(t) for t in (q, k, v)), seq_len=4)
    expected = reference_attention(q[:, :4], k[:, :4], v[:, :4])
    np.testing.assert_allclose(np.asarray(out)[:, :4], expected, rtol=1e-6, atol=1e-6)
