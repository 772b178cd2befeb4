"""Gradients through shard and gather equal the single-device gradient of the same framework:
bitwise where only data moves, allclose where the reduce-scatter rule sums over ranks.

The losses are linear in the input on purpose: with products like ``a * a`` the compiler may
contract the gradient into an FMA for one shard shape and not another (seen with XLA on 8
devices: 1-ulp differences), which is arithmetic, not data movement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sp_common as sp
from sp_common.testing import data as ref
from sp_common.testing.mesh import mesh_of, sharded, spec_on

from . import torch_tasks

pytestmark = pytest.mark.timeout(240)


def finite_inputs(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Seeded input and loss weights (finite: an inf weight would make the gradient NaN)."""
    x = ref.make_data(shape, "float32", seed=1, specials=False)
    return x, ref.make_data(shape, "float32", seed=2, specials=False)


CASES = [((2, 8, 3), 1, False), ((8, 3), 0, False), ((2, 10, 3), 1, True), ((3, 2, 3), -1, True)]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize(("shape", "dim", "padded"), CASES)
def test_torch_gradient_through_shard_and_gather_equals_single_device_bitwise(
    shape, dim, padded, n, torch_ranks
) -> None:
    x, w = finite_inputs(shape)
    for rank, (grad, expected) in enumerate(
        torch_ranks(n).run(torch_tasks.gradients, x, dim, w, padded)
    ):
        ref.assert_bitwise(grad, expected, f"torch n={n} rank={rank} grad")


@pytest.mark.parametrize("n", [2, 4])
def test_torch_reduce_scatter_rule_sums_every_ranks_loss_term(n, torch_ranks) -> None:
    x = ref.make_data((2, 8), "float32", seed=3)
    ws = np.stack([ref.make_data((2, 8), "float32", 10 + r, specials=False) for r in range(n)])
    expected = np.split(ws.sum(axis=0), n, axis=1)
    for rank, grad in enumerate(torch_ranks(n).run(torch_tasks.reduce_scatter_gradient, x, 1, ws)):
        np.testing.assert_allclose(grad, expected[rank], rtol=1e-6, atol=1e-6)


def _jax_loss(n: int, dim: int, padded: bool, check_vma: bool):
    def body(a, w):
        if padded:
            s, p = sp.sp_shard_with_padding(a, dim)
        else:
            s, p = sp.sp_shard(a, dim), 0
        y = sp.sp_gather(s * 3, dim, pad_size=p)
        return (y * w).sum()

    return sharded(body, n, (jax.P(), jax.P()), jax.P(), check_vma=check_vma)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize(("shape", "dim", "padded"), CASES)
def test_jax_gradient_through_shard_and_gather_equals_single_device_bitwise(
    shape, dim, padded, n, check_vma
) -> None:
    x, w = finite_inputs(shape)
    loss = _jax_loss(n, dim, padded, check_vma)
    with jax.set_mesh(mesh_of(n)):
        grad = jax.grad(loss)(jnp.asarray(x), jnp.asarray(w))
    expected = jax.grad(lambda a, w: (a * 3 * w).sum())(jnp.asarray(x), jnp.asarray(w))
    if check_vma:
        ref.assert_bitwise(np.asarray(grad), np.asarray(expected), f"jax n={n} grad")
    else:
        # Without vma tracking JAX's own shard_map transpose divides the output cotangent by N
        # and psums the cotangent of a replicated input: N addends round (and -0.0 becomes
        # +0.0), so equal to float32 rounding, not bitwise.
        np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("n", [2, 4])
def test_jax_reduce_scatter_rule_sums_every_devices_loss_term(n, check_vma) -> None:
    x = ref.make_data((2, 8), "float32", seed=3)
    ws = np.stack([ref.make_data((2, 8), "float32", 10 + r, specials=False) for r in range(n)])

    def body(s, ws):
        y = sp.sp_gather(s, 1, grad_rule="reduce_scatter")
        term = (y * ws[sp.sp_rank(s)]).sum()
        return jax.lax.psum(term, "sp")

    loss = sharded(body, n, (spec_on(1), jax.P()), jax.P(), check_vma=check_vma)

    with jax.set_mesh(mesh_of(n)):
        grad = jax.grad(loss)(jnp.asarray(x), jnp.asarray(ws))
    np.testing.assert_allclose(np.asarray(grad), ws.sum(axis=0), rtol=1e-6, atol=1e-6)


def test_jax_gathered_result_of_a_replicated_input_gets_the_summed_gradient() -> None:
    """Gathering an array that is invariant over the axis: y = [x, x, ..., x]; dL/dx sums the
    N chunk gradients (the cast to varying transposes to a psum)."""
    x = jnp.arange(6.0).reshape(2, 3)

    def body(a):
        return (sp.sp_gather(a, 1) * jnp.arange(24.0).reshape(2, 12)).sum()

    loss = sharded(body, 4, (jax.P(),), jax.P())

    with jax.set_mesh(mesh_of(4)):
        grad = jax.grad(loss)(x)
    expected = np.arange(24.0).reshape(2, 4, 3).sum(axis=1)
    np.testing.assert_array_equal(np.asarray(grad), expected)
