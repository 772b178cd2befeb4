"""The suite's distributed checks on GPUs: torch ranks on NCCL (rank r on GPU r) and a JAX GPU
mesh, over every GPU there is (at least 2). Data movement bitwise equal to numpy, gradients
equal to the single-GPU gradient, Ulysses close to full attention on one GPU.

Marked ``gpu`` (``make gpu-check`` runs ``pytest -m gpu``). Where a framework sees fewer than 2
GPUs its tests are skipped with the reason (``pytest -ra`` lists it), so on the CPU machine of
``make test`` they cost a skip each.
"""

from __future__ import annotations

import os

# Before JAX starts its GPU backend (at the first test, not at collection): JAX would otherwise
# take 75% of every GPU's memory, which the NCCL ranks on the same GPUs need.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sp_common as sp
from sp_common.testing import RankPool, cuda_device_count
from sp_common.testing import data as ref
from sp_common.testing.mesh import mesh_of, sharded

from . import gpu_tasks
from .test_cross_backend import DIMS, DTYPES, check_against_reference, jax_results, scenarios
from .test_gradients import finite_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

# NCCL's own timeout (a rank left alone in a collective raises) and the deadline of one call.
COLLECTIVE_TIMEOUT_S = 60
CALL_TIMEOUT_S = 300.0
SEQ_LENS = (8, 10, 3)  # divisible or padded at any N; at N > 3 some ranks hold only padding
B, D = 2, 16
# Where the checks run. The tests name the GPU; only a dry run of this file on a machine without
# one (gloo ranks, CPU devices, fixtures bypassed) sets these to "cpu".
TORCH_DEVICE = "cuda"
JAX_PLATFORM = "gpu"


def movement_cases() -> list[tuple[np.ndarray, int, Any]]:
    """Every dtype of the cross-backend suite on every dim it checks, lengths 8, 5 and 3."""
    return [case for dtype in DTYPES for dim in DIMS for case in scenarios(dtype, dim)]


def gradient_cases(n: int) -> list[tuple[tuple[int, ...], int, bool]]:
    """``(shape, dim, padded)``: tests/test_gradients.py's cases with lengths that fit N ranks."""
    return [
        ((2, 2 * n, 3), 1, False),
        ((4 * n, 3), 0, False),
        ((2, 2 * n + 1, 3), 1, True),
        ((3, 2, 3), -1, True),
    ]


def qkvw(seq_len: int, heads: int) -> tuple[np.ndarray, ...]:
    """Seeded finite q, k, v and loss weights of shape ``[B, seq_len, heads, D]``."""
    shape = (B, seq_len, heads, D)
    return tuple(ref.make_data(shape, "float32", 200 + i, specials=False) for i in range(4))


def jax_ulysses(n: int, q: Any, k: Any, v: Any, w: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """sp_ulysses_attention on an n-device mesh of the default backend: shard with padding,
    attend, gather; the output and the q, k, v gradients of ``sum(out * w)``."""
    seq_len = q.shape[1]

    def body(q, k, v, w):
        shards = [sp.sp_shard_with_padding(t, 1) for t in (q, k, v)]
        out = sp.sp_ulysses_attention(*(s for s, _ in shards), seq_len=seq_len)
        out = sp.sp_gather(out, 1, pad_size=shards[0][1])
        return out, (out * w).sum()

    fn = sharded(body, n, (jax.P(),) * 4, (jax.P(), jax.P()))
    with jax.set_mesh(mesh_of(n)):
        out, _ = fn(q, k, v, w)
        grads = jax.grad(lambda q, k, v: fn(q, k, v, w)[1], argnums=(0, 1, 2))(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.fixture(scope="module")
def cuda_ranks() -> Iterator[RankPool]:
    """NCCL ranks, one per CUDA device; a skip with the reason where there are fewer than 2."""
    import torch

    n = cuda_device_count()
    if n < 2:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        pytest.skip(
            f"NCCL ranks need 2 or more CUDA devices; torch {torch.__version__} ({build}) sees {n}"
        )
    with RankPool(n, TORCH_DEVICE, collective_timeout_s=COLLECTIVE_TIMEOUT_S) as pool:
        yield pool


@pytest.fixture(scope="module")
def jax_gpus() -> int:
    """The number of JAX GPU devices (the mesh of ``jax_mesh.mesh_of``); a skip with the
    reason where there are fewer than 2 or JAX's default backend is not the GPU."""
    try:
        gpus = len(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend in this jaxlib
        gpus = 0
    if gpus < 2 or jax.default_backend() != "gpu":
        pytest.skip(
            f"a JAX GPU mesh needs 2 or more GPU devices on the default backend; JAX "
            f"{jax.__version__} sees {gpus}, default backend {jax.default_backend()}"
        )
    assert {d.platform for d in mesh_of(gpus).devices.flat} == {JAX_PLATFORM}
    return gpus


def test_shard_gather_and_padding_on_nccl_ranks_are_bitwise_equal_to_numpy(cuda_ranks) -> None:
    cases, n = movement_cases(), cuda_ranks.world_size
    results = cuda_ranks.run(gpu_tasks.data_movement, cases, TORCH_DEVICE, timeout_s=CALL_TIMEOUT_S)
    check_against_reference(results, cases, n, f"torch {TORCH_DEVICE}")
    assert all(r["devices"] == {TORCH_DEVICE} for per_rank in results for r in per_rank)


def test_gradients_on_nccl_ranks_equal_the_single_gpu_gradient_bitwise(cuda_ranks) -> None:
    for shape, dim, padded in gradient_cases(cuda_ranks.world_size):
        x, w = finite_inputs(shape)
        per_rank = cuda_ranks.run(
            gpu_tasks.gradients, x, dim, w, padded, TORCH_DEVICE, timeout_s=CALL_TIMEOUT_S
        )
        for rank, (grad, expected) in enumerate(per_rank):
            where = f"torch {TORCH_DEVICE} rank={rank} shape={shape} dim={dim} padded={padded}"
            ref.assert_bitwise(grad, expected, f"{where} grad")


def test_ulysses_on_nccl_ranks_is_close_to_full_attention_on_one_gpu(cuda_ranks) -> None:
    for seq_len in SEQ_LENS:
        q, k, v, w = qkvw(seq_len, heads=2 * cuda_ranks.world_size)
        per_rank = cuda_ranks.run(
            gpu_tasks.ulysses, q, k, v, w, TORCH_DEVICE, timeout_s=CALL_TIMEOUT_S
        )
        for rank, r in enumerate(per_rank):
            where = f"torch {TORCH_DEVICE} rank={rank} seq_len={seq_len}"
            assert r["device"] == TORCH_DEVICE, where
            np.testing.assert_allclose(r["out"], r["expected"], rtol=1e-5, atol=1e-6, err_msg=where)
            assert len(r["grads"]) == len(r["expected_grads"]) == 3, where
            for g, e in zip(r["grads"], r["expected_grads"], strict=True):
                np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=where)


def test_shard_gather_and_padding_on_a_jax_gpu_mesh_are_bitwise_equal_to_numpy(
    jax_gpus, jax_x64
) -> None:
    cases = movement_cases()
    check_against_reference(jax_results(cases, jax_gpus), cases, jax_gpus, f"jax {JAX_PLATFORM}")


def test_gradients_on_a_jax_gpu_mesh_equal_the_single_gpu_gradient_bitwise(jax_gpus) -> None:
    for shape, dim, padded in gradient_cases(jax_gpus):
        x, w = finite_inputs(shape)

        def body(a: jax.Array, w: jax.Array, dim: int = dim, padded: bool = padded) -> jax.Array:
            if padded:
                s, p = sp.sp_shard_with_padding(a, dim)
            else:
                s, p = sp.sp_shard(a, dim), 0
            return (sp.sp_gather(s * 3, dim, pad_size=p) * w).sum()

        loss = sharded(body, jax_gpus, (jax.P(), jax.P()), jax.P())
        with jax.set_mesh(mesh_of(jax_gpus)):
            grad = jax.grad(loss)(jnp.asarray(x), jnp.asarray(w))
        expected = jax.grad(lambda a, w: (a * 3 * w).sum())(jnp.asarray(x), jnp.asarray(w))
        where = f"jax {JAX_PLATFORM} n={jax_gpus} shape={shape} dim={dim} padded={padded}"
        assert {d.platform for d in grad.devices()} == {JAX_PLATFORM}, where
        ref.assert_bitwise(np.asarray(grad), np.asarray(expected), f"{where} grad")


def test_ulysses_on_a_jax_gpu_mesh_is_close_to_full_attention_on_one_gpu(jax_gpus) -> None:
    full = jax.nn.dot_product_attention
    for seq_len in SEQ_LENS:
        q, k, v, w = qkvw(seq_len, heads=2 * jax_gpus)
        # float32 products in float32 on both sides (the GPU default may use TF32).
        with jax.default_matmul_precision("highest"):
            out, grads = jax_ulysses(jax_gpus, q, k, v, w)
            expected = full(q, k, v)
            expected_grads = jax.grad(lambda *a, w=w: (full(*a) * w).sum(), argnums=(0, 1, 2))(
                q, k, v
            )
        where = f"jax {JAX_PLATFORM} n={jax_gpus} seq_len={seq_len}"
        np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-5, atol=1e-6, err_msg=where)
        for g, e in zip(grads, expected_grads, strict=True):
            np.testing.assert_allclose(g, np.asarray(e), rtol=1e-4, atol=1e-5, err_msg=where)
