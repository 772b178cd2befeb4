"""sp_all_to_all and sp_reduce_scatter: bitwise against the numpy reference on torch gloo ranks
and JAX devices, and their gradients (the swapped all-to-all; the gather)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import sp_common as sp
from sp_common.testing import data as ref
from sp_common.testing.mesh import mesh_of, sharded

from . import torch_tasks

pytestmark = pytest.mark.timeout(240)

# (scatter_dim, gather_dim) pairs over [B=2, S, H, D=3] blocks; the Ulysses pair is (2, 1).
DIM_PAIRS = [(2, 1), (1, 2), (0, 1), (1, 1), (-2, -3), (3, 0)]
DTYPES = ["float32", "bfloat16", "int32", "bool"]


def stacked_input(n: int, dtype: str, seed: int) -> np.ndarray:
    """Rank j's input is stacked[j]: [2, 8, 8, 8], divisible by 2, 4 and 8 on every dim but 0."""
    return np.stack([ref.make_data((8, 8, 8, 8), dtype, seed=seed + j) for j in range(n)])


def weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Finite float32 loss weights (an inf weight would make the gradient NaN)."""
    return ref.make_data(shape, "float32", seed=seed, specials=False)


def assert_sum_close(got: np.ndarray, stacked: np.ndarray, dim: int, rank: int, what: str):
    """A float reduce-scatter within the summation error bound N * eps * sum_j |x_j| of the exact
    (float64) sum: the backends may add in any order and accumulate in higher precision."""
    n = stacked.shape[0]
    wide = stacked.astype(np.float64)
    exact = np.split(wide.sum(axis=0), n, axis=dim)[rank]
    bound = (
        n
        * float(ml_dtypes.finfo(stacked.dtype).eps)
        * np.split(np.abs(wide).sum(axis=0), n, axis=dim)[rank]
    )
    finite = np.isfinite(exact)
    assert np.array_equal(np.isfinite(got.astype(np.float64)), finite), f"{what}: non-finite differ"
    err = np.abs(got.astype(np.float64)[finite] - exact[finite])
    assert np.all(err <= bound[finite]), f"{what}: max error {err.max()} beyond the bound"


def jax_exchange(stacked: np.ndarray, s: int, g: int) -> tuple[np.ndarray, np.ndarray | None]:
    n = stacked.shape[0]

    def body(x):
        out = {"a2a": sp.sp_all_to_all(x[0], s, g)[None]}
        if x.dtype != jnp.bool_:
            out["rs"] = sp.sp_reduce_scatter(x[0], s)[None]
        return out

    with jax.set_mesh(mesh_of(n)):
        out = sharded(body, n, (jax.P("sp"),), jax.P("sp"))(stacked)
    return np.asarray(out["a2a"]), (np.asarray(out["rs"]) if "rs" in out else None)


@pytest.mark.parametrize(("scatter_dim", "gather_dim"), DIM_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_to_all_and_reduce_scatter_match_the_reference_on_both_backends(
    dtype, scatter_dim, gather_dim, torch_ranks
) -> None:
    for n in (2, 4, 8):
        stacked = stacked_input(n, dtype, seed=n)
        expected = ref.all_to_all(stacked, scatter_dim, gather_dim)
        expected_rs = ref.reduce_scatter(stacked, scatter_dim) if dtype != "bool" else None
        a2a, rs = jax_exchange(stacked, scatter_dim, gather_dim)
        for r in range(n):
            ref.assert_bitwise(a2a[r], expected[r], f"jax n={n} rank {r} all-to-all")
            if dtype == "int32":  # integer sums are exact in any order
                ref.assert_bitwise(rs[r], expected_rs[r], f"jax n={n} rank {r} reduce-scatter")
            elif rs is not None:
                assert_sum_close(rs[r], stacked, scatter_dim, r, f"jax n={n} rank {r} rs")
        if n == 8:
            continue
        w = np.stack([weights(expected[0].shape, 50 + j) for j in range(n)])
        results = torch_ranks(n).run(torch_tasks.exchange, stacked, scatter_dim, gather_dim, w)
        grads = ref.all_to_all(w, gather_dim, scatter_dim)  # the transpose of a permutation
        for r, got in enumerate(results):
            ref.assert_bitwise(got["a2a"], expected[r], f"torch n={n} rank {r} all-to-all")
            if dtype == "float32":
                ref.assert_bitwise(got["a2a_grad"], grads[r], f"torch n={n} rank {r} a2a grad")
            if dtype == "int32":
                ref.assert_bitwise(got["rs"], expected_rs[r], f"torch n={n} rank {r} rs")
            elif "rs" in got:
                assert_sum_close(got["rs"], stacked, scatter_dim, r, f"torch n={n} rank {r} rs")


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize(("scatter_dim", "gather_dim"), DIM_PAIRS[:3])
def test_jax_all_to_all_gradient_is_the_swapped_all_to_all(scatter_dim, gather_dim, check_vma):
    n = 4
    stacked = np.stack(
        [ref.make_data((8, 8, 8, 8), "float32", 3 + j, specials=False) for j in range(n)]
    )
    out_shape = ref.all_to_all(stacked, scatter_dim, gather_dim)[0].shape
    w = np.stack([weights(out_shape, 70 + j) for j in range(n)])

    def body(x, w):
        return jax.lax.psum((sp.sp_all_to_all(x[0], scatter_dim, gather_dim) * w[0]).sum(), "sp")

    loss = sharded(body, n, (jax.P("sp"), jax.P("sp")), jax.P(), check_vma=check_vma)
    with jax.set_mesh(mesh_of(n)):
        grad = np.asarray(jax.grad(loss)(stacked, w))
    expected = ref.all_to_all(w, gather_dim, scatter_dim)
    for r in range(n):
        ref.assert_bitwise(grad[r], expected[r], f"jax rank {r} a2a grad")


def test_reduce_scatter_gradient_is_the_gather_on_both_backends(torch_ranks) -> None:
    n = 4
    stacked = np.stack([weights((2, 8), j) for j in range(n)])
    w = np.stack([weights((2, 2), 90 + j) for j in range(n)])
    expected = np.concatenate(list(w), axis=1)  # every rank's x gets all ranks' weights
    for grad in torch_ranks(n).run(torch_tasks.reduce_scatter_gradient_is_gather, stacked, w):
        ref.assert_bitwise(grad, expected, "torch reduce-scatter grad")

    def body(x, w):
        return jax.lax.psum((sp.sp_reduce_scatter(x[0], 1) * w[0]).sum(), "sp")

    loss = sharded(body, n, (jax.P("sp"), jax.P("sp")), jax.P())
    with jax.set_mesh(mesh_of(n)):
        grad = np.asarray(jax.grad(loss)(stacked, w))
    for r in range(n):
        ref.assert_bitwise(grad[r], expected, f"jax rank {r} reduce-scatter grad")


@pytest.mark.parametrize("make", [np.zeros, jnp.zeros], ids=["torch", "jax"])
def test_exchange_errors_name_the_dim_size_and_world_size(make) -> None:
    import torch

    x = torch.zeros((2, 6, 3)) if make is np.zeros else jnp.zeros((2, 6, 3))

    def body(a):
        for call, message in [
            (lambda: sp.sp_all_to_all(a, 2, 1), "sp_all_to_all: size 3 of dim 2"),
            (lambda: sp.sp_reduce_scatter(a, 2), "sp_reduce_scatter: size 3 of dim 2"),
            (lambda: sp.sp_reduce_scatter(a > 0, 1), "sp_reduce_scatter: tensor has dtype bool"),
            (lambda: sp.sp_all_to_all(a, 1, 3), "sp_all_to_all: dim=3 is out of range"),
        ]:
            with pytest.raises((ValueError, TypeError), match=message):
                call()
        return a

    if isinstance(x, torch.Tensor):
        # World size 1 divides everything: check the dims and dtype errors there.
        with pytest.raises(TypeError, match="dtype bool"):
            sp.sp_reduce_scatter(x > 0, 1)
        with pytest.raises(ValueError, match="dim=3 is out of range"):
            sp.sp_all_to_all(x, 1, 3)
    else:
        sharded(body, 2, (jax.P(),), jax.P())(x)
