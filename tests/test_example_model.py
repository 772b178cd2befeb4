"""The example block (examples/model.py): its math stays inside the array API standard (it runs on
array_api_strict arrays and equals a float64 numpy reference), it gives the same result on torch
and JAX, and sharded over 4 JAX devices or 4 torch ranks it matches its unsharded run."""

from __future__ import annotations

import math
from typing import Any

import array_api_strict
import numpy as np
import pytest
from array_api_compat import array_namespace

from examples import demo
from examples.model import init_params, sp_transformer_block, transformer_block
from sp_common.testing import make_data, run_sharded, to_jax, to_numpy, to_torch

pytestmark = pytest.mark.timeout(300)
HIDDEN, HEADS = 16, 2
# float32 results against the float64 reference, and torch against JAX (float32, ~1e-6 apart).
RTOL, ATOL = 1e-5, 1e-5


def inputs(seq_len: int, dtype: str = "float32") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x = make_data((2, seq_len, HIDDEN), "float32", seed=seq_len, specials=False)
    params = init_params(HIDDEN, seed=1)
    return x.astype(dtype), {k: v.astype(dtype) for k, v in params.items()}


def reference_block(x: np.ndarray, p: dict[str, np.ndarray], heads: int) -> np.ndarray:
    """The block in float64 numpy, written independently of examples/model.py."""
    x, p = x.astype(np.float64), {k: v.astype(np.float64) for k, v in p.items()}

    def norm(h: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * g + b

    b, s, width = x.shape
    q, k, v = np.split(norm(x, p["ln1_g"], p["ln1_b"]) @ p["w_qkv"] + p["b_qkv"], 3, axis=-1)
    q, k, v = (t.reshape(b, s, heads, width // heads) for t in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, width)
    x = x + attn @ p["w_o"] + p["b_o"]
    h = norm(x, p["ln2_g"], p["ln2_b"]) @ p["w_1"] + p["b_1"]
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return x + h @ p["w_2"] + p["b_2"]


def strict(a: np.ndarray) -> Any:
    return array_api_strict.asarray(a)


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-12), ("float32", 1e-5)])
def test_the_block_on_array_api_strict_arrays_equals_the_float64_reference(dtype, tol) -> None:
    x, params = inputs(10, dtype)
    out = transformer_block({k: strict(v) for k, v in params.items()}, strict(x), HEADS)
    assert array_namespace(out) is array_api_strict
    assert out.dtype == getattr(array_api_strict, dtype)
    np.testing.assert_allclose(np.asarray(out), reference_block(x, params, HEADS), tol, tol)


def test_the_block_on_token_shards_with_a_kv_gather_equals_the_whole_sequence() -> None:
    """N simulated ranks on array_api_strict arrays: the gather is the only cross-token step."""
    x, params = inputs(12, "float64")
    sparams, n = {k: strict(v) for k, v in params.items()}, 3
    pieces = [strict(s) for s in np.split(x, n, axis=1)]
    kv_of: list[list[Any]] = [[] for _ in range(n)]  # rank r's K, then its V

    def record(r: int) -> Any:
        return lambda kv: kv_of[r].append(kv) or kv

    def gather() -> Any:
        call = iter(range(2))  # K first, then V

        def gather_kv(kv: Any) -> Any:
            i = next(call)
            return array_api_strict.concat([kv_of[j][i] for j in range(n)], axis=1)

        return gather_kv

    for r in range(n):
        transformer_block(sparams, pieces[r], HEADS, record(r))
    outs = [transformer_block(sparams, pieces[r], HEADS, gather()) for r in range(n)]
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)
    np.testing.assert_allclose(got, reference_block(x, params, HEADS), 1e-12, 1e-12)


@pytest.mark.parametrize("seq_len", [8, 10])
def test_torch_and_jax_at_world_size_1_agree_with_each_other_and_the_reference(seq_len) -> None:
    import jax
    import torch

    x, params = inputs(seq_len)
    with torch.no_grad():
        t = sp_transformer_block({k: to_torch(v) for k, v in params.items()}, to_torch(x), HEADS)
    j = jax.jit(sp_transformer_block, static_argnums=2)(
        {k: to_jax(v) for k, v in params.items()}, to_jax(x), HEADS
    )
    t, j = to_numpy(t), to_numpy(j)
    expected = reference_block(x, params, HEADS)
    np.testing.assert_allclose(t, expected, RTOL, ATOL, err_msg="torch vs float64 reference")
    np.testing.assert_allclose(j, expected, RTOL, ATOL, err_msg="jax vs float64 reference")
    np.testing.assert_allclose(t, j, RTOL, ATOL, err_msg="torch vs jax")


@pytest.mark.parametrize("seq_len", [8, 10])
def test_jax_block_sharded_over_4_devices_matches_its_unsharded_run_and_gradients(seq_len) -> None:
    import jax
    from jax.sharding import PartitionSpec as P

    x, params = inputs(seq_len)
    w = to_jax(make_data(x.shape, "float32", seed=99, specials=False))
    jparams, jx = {k: to_jax(v) for k, v in params.items()}, to_jax(x)

    def loss(p: dict[str, Any], x: Any) -> Any:
        return (sp_transformer_block(p, x, HEADS) * w).sum()

    def step(p: dict[str, Any], x: Any) -> Any:
        return sp_transformer_block(p, x, HEADS), jax.grad(loss, argnums=(0, 1))(p, x)

    got = run_sharded(step, 4, (jparams, jx), out_specs=P())
    expected = jax.jit(step)(jparams, jx)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), RTOL, ATOL)


def test_the_demo_torch_task_on_4_ranks_matches_its_unsharded_run(torch_ranks) -> None:
    x, params = inputs(10)
    unsharded = demo.torch_step(x, params)[0]
    outs = [r[0] for r in torch_ranks(4).run(demo.torch_step, x, params)]
    for rank, out in enumerate(outs):
        np.testing.assert_allclose(out, unsharded, RTOL, ATOL, err_msg=f"rank {rank}")
        assert np.array_equal(out, outs[0]), f"rank {rank}'s copy differs from rank 0's"
