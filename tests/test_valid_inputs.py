"""Valid inputs that are unusual in memory or in value must move bitwise, on every path.

- torch strides: a ``[B, s, 1]`` tensor such as ``x.reshape(B, 1, s).transpose(1, 2)`` is
  contiguous for torch but keeps the stride ``s`` on its size-1 last dim; gathers, the
  all-to-all, the reduce-scatter and sp_shard's backward take it (the uint8 bit-cast used to
  refuse it).
- torch lazy views: ``x.conj()`` of a complex tensor and ``x.conj().imag`` carry a conjugate or
  negative bit over the unconjugated memory; the collectives move their values (the conjugate),
  bitwise.
- Pad values: a NaN pads the same bits in torch and JAX whatever its sign, and a finite value
  rounds the same way in both (through float32 for narrower float dtypes, as torch does), for
  every float dtype including the float8 ones.

torch runs on the session's gloo pool (2 and 4 ranks), JAX on 2 virtual CPU devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import sp_common as sp
from backend_torch.collectives import _as_bytes, _movable
from sp_common.testing import data as ref
from sp_common.testing.mesh import mesh_of, sharded, spec_on

from . import valid_input_tasks as tasks

pytestmark = pytest.mark.timeout(180)

WORLDS = (2, 4)
FLOATS = ("float32", "bfloat16", "float16")


def small_values(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Small integers (every sum over ranks is exact in every dtype) with NaN, -0.0 and inf
    placed in float inputs, so that "bitwise" means bitwise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-8, 8, size=shape).astype(np.float32)
    flat = x.reshape(-1)
    if dtype != "int32":
        flat[[1, 5, 7]] = (np.nan, -0.0, np.inf)
    return x.astype(ref.numpy_dtype(dtype))


def small_complex(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """complex64 with small integer parts, and NaN, -0.0 and inf in some imaginary parts (whose
    sign bit a conjugation flips)."""
    rng = np.random.default_rng(seed)
    parts = rng.integers(-8, 8, size=(*shape, 2)).astype(np.float32)
    imag = parts[..., 1].reshape(-1)  # a view
    for i, special in enumerate((np.nan, -0.0, np.inf)):
        imag[(3 * i) % imag.size] = special
    return parts.view(np.complex64)[..., 0]  # (arithmetic would turn 1j * inf into nan + infj)


# torch: tensors torch calls contiguous, with an odd stride on a size-1 last dim


def test_the_bit_cast_of_an_odd_stride_tensor_is_a_view_of_its_memory() -> None:
    t = torch.arange(8.0).reshape(2, 1, 4).transpose(1, 2)  # [2, 4, 1], strides (4, 1, 4)
    assert t.is_contiguous() and t.contiguous().stride() == (4, 1, 4)
    assert _movable(t) is t  # no copy on the way into a gather
    as_bytes = _as_bytes(t)
    assert as_bytes.data_ptr() == t.data_ptr() and as_bytes.shape == (2, 4, 4)
    assert torch.equal(as_bytes.view(torch.float32), t)
    empty = torch.zeros(0, 1, 4).transpose(1, 2)  # [0, 4, 1], strides (4, 1, 4)
    assert _as_bytes(empty).shape == (0, 4, 4)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("dtype", [*FLOATS, "int32", "complex64"])
def test_odd_stride_tensors_gather_exchange_and_reduce_bitwise(dtype, n, torch_ranks) -> None:
    shape = (n, n, 3, 1)  # rank r holds chunks[r]: [B=n, s=3, 1]
    if dtype == "complex64":
        chunks = small_complex(shape, seed=n)
    else:
        chunks = small_values(shape, dtype, seed=n)
    results = torch_ranks(n).run(tasks.move_odd_strides, chunks)
    a2a = ref.all_to_all(chunks, 0, 1)
    rs = ref.reduce_scatter(chunks, 0)
    for rank, r in enumerate(results):
        for d in range(3):
            expected = np.concatenate(list(chunks), axis=d)
            ref.assert_bitwise(r[f"gather{d}"], expected, f"rank {rank} gather along dim {d}")
        ref.assert_bitwise(r["all_to_all"], a2a[rank], f"rank {rank} all-to-all")
        # a sum, not data movement: equal values (NaN where numpy has NaN)
        np.testing.assert_array_equal(r["reduce_scatter"], rs[rank])


@pytest.mark.parametrize("n", WORLDS)
def test_sp_shard_backward_gathers_a_gradient_that_model_code_transposed(n, torch_ranks) -> None:
    x = small_values((2, 3 * n, 1), "float32", seed=3)
    w = small_values((2, 1, 3 * n), "float32", seed=4)
    for rank, r in enumerate(torch_ranks(n).run(tasks.shard_backward_after_transpose, x, w)):
        ref.assert_bitwise(r["grad"], r["single_device"], f"rank {rank} shard gradient")


# torch: lazy conjugate and negative views


@pytest.mark.parametrize("n", WORLDS)
def test_lazy_conjugates_move_as_their_conjugate_bitwise(n, torch_ranks) -> None:
    chunks = small_complex((n, 2, 3, 2 * n), seed=n)  # rank r: [B=2, s=3, H=2n]
    tiny = small_complex((n, 1, 1, 1), seed=n + 1)
    conj, neg = np.conj(chunks), np.conj(tiny).imag
    assert np.signbit(conj.imag).sum() != np.signbit(chunks.imag).sum()  # the sign bits moved
    results = torch_ranks(n).run(tasks.move_lazy_conjugates, chunks, tiny)
    a2a = ref.all_to_all(conj, 2, 1)
    rs = ref.reduce_scatter(conj, 2)
    for rank, r in enumerate(results):
        for d in (0, 1):
            expected = np.concatenate(list(conj), axis=d)
            ref.assert_bitwise(r[f"gather{d}"], expected, f"rank {rank} gather along dim {d}")
        ref.assert_bitwise(r["all_to_all"], a2a[rank], f"rank {rank} all-to-all")
        np.testing.assert_array_equal(r["reduce_scatter"], rs[rank])
        ref.assert_bitwise(r["neg_gather"], np.concatenate(list(neg), axis=1), "negative view")
        assert r["inputs_unchanged"]


@pytest.mark.parametrize("n", WORLDS)
def test_sp_shard_backward_gathers_a_gradient_that_model_code_conjugated(n, torch_ranks) -> None:
    x = small_complex((2, 2 * n, 3), seed=5)
    w = small_complex((2, 2 * n, 3), seed=6)
    for rank, r in enumerate(torch_ranks(n).run(tasks.shard_backward_through_conj, x, w)):
        ref.assert_bitwise(r["grad"], r["single_device"], f"rank {rank} shard gradient")


# Pad values: the same bits in torch and JAX


def jax_pad_element_bytes(cases: list[tuple[str, object]]) -> list[bytes]:
    """The bytes of the pad element when a 1-element array of each case's dtype is padded on 2
    JAX devices with the case's pad value (device 1 holds only the pad element)."""

    def body(*arrays: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(
            sp.sp_shard_with_padding(a, 0, value)[0]
            for a, (_, value) in zip(arrays, cases, strict=True)
        )

    arrays = [jnp.ones(1, dtype=getattr(jnp, dtype)) for dtype, _ in cases]
    fn = sharded(body, 2, tuple(jax.P() for _ in cases), tuple(spec_on(0) for _ in cases))
    with jax.set_mesh(mesh_of(2)):
        padded = fn(*arrays)
    return [np.asarray(p)[1:].tobytes() for p in padded]


def torch_pad_element_bytes(cases: list[tuple[str, object]], torch_ranks) -> list[bytes]:
    """The bytes of the pad element in torch on 2 ranks (rank 1 holds only the pad element)."""
    return torch_ranks(2).run(tasks.pad_element_bytes, cases)[1]


FLOAT8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
# The NaN both frameworks make from a positive NaN (float8_e5m2: 0x7f in torch and XLA).
NAN_BYTES = {
    "float16": "007e",
    "bfloat16": "c07f",
    "float32": "0000c07f",
    "float64": "000000000000f87f",
}


def test_nan_pad_values_pad_the_same_nan_bits_on_both_backends_whatever_their_sign(
    torch_ranks, jax_x64
) -> None:
    nans = (math.nan, float("-nan"), -math.nan)
    cases: list[tuple[str, object]] = [(d, v) for d in (*NAN_BYTES, *FLOAT8) for v in nans]
    complex_nans = {  # the real and imaginary parts as float32 (little-endian) bytes
        complex(float("-nan"), float("-nan")): "0000c07f0000c07f",
        complex(1.0, float("-nan")): "0000803f0000c07f",
    }
    cases += [("complex64", value) for value in complex_nans]
    in_torch = torch_pad_element_bytes(cases, torch_ranks)
    in_jax = jax_pad_element_bytes(cases)
    for (dtype, value), t, j in zip(cases, in_torch, in_jax, strict=True):
        signed = isinstance(value, float) and math.copysign(1.0, value) < 0
        shown = f"{value!r}{' (sign bit set)' if signed else ''}"  # repr(float('-nan')) is 'nan'
        assert t == j, f"{dtype} pad_value={shown}: torch {t.hex()} != JAX {j.hex()}"
        expected = complex_nans[value] if dtype == "complex64" else NAN_BYTES.get(dtype)
        assert expected in (None, t.hex()), f"{dtype} pad_value={shown}: {t.hex()}"


# Values halfway between two neighbours of a narrow float dtype, nudged by 2**-40: rounded
# directly from float64 they go up, rounded through float32 (torch's rule) they tie to even.
NEAR_TIES = {
    "bfloat16": 1 + 2**-8 + 2**-40,
    "float16": 1 + 2**-11 + 2**-40,
    "float8_e4m3fn": 1 + 2**-4 + 2**-40,
    "float8_e5m2": 1 + 2**-3 + 2**-40,
    "float8_e4m3fnuz": 1 + 2**-4 + 2**-40,
    "float8_e5m2fnuz": 1 + 2**-3 + 2**-40,
}
# Values each float8 dtype holds exactly, at its edges.
EDGES = {
    "float8_e4m3fn": (448.0, -448.0, 2**-9, -0.0),
    "float8_e5m2": (57344.0, -(2**-16), math.inf, -math.inf),
    "float8_e4m3fnuz": (240.0, -0.0, 2**-10),
    "float8_e5m2fnuz": (-57344.0, 2**-17),
    "float8_e8m0fnu": (1.0, 2.0**-127, 2.0**127, 3.0, 0.75),
}


def test_finite_pad_values_round_through_float32_the_same_way_on_both_backends(
    torch_ranks,
) -> None:
    cases = [(dtype, v) for dtype, v in NEAR_TIES.items()]
    cases += [(dtype, v) for dtype, values in EDGES.items() for v in values]
    cases += [("float16", -1e-50), ("bfloat16", 3.0e38), ("float32", 1 + 2**-24 + 2**-60)]
    in_torch = torch_pad_element_bytes(cases, torch_ranks)
    in_jax = jax_pad_element_bytes(cases)
    for (dtype, value), t, j in zip(cases, in_torch, in_jax, strict=True):
        numpy_dtype = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
        expected = np.array([value], np.float32).astype(numpy_dtype).tobytes()
        assert t == expected, f"{dtype} pad_value={value}: torch {t.hex()} != {expected.hex()}"
        assert j == expected, f"{dtype} pad_value={value}: JAX {j.hex()} != {expected.hex()}"


def test_compiled_padding_with_a_signed_nan_traces_to_one_graph_with_eager_bits(
    torch_ranks,
) -> None:
    x = small_values((2, 3, 4), "bfloat16", seed=8)  # S=3 on 2 ranks: one pad column
    for r in torch_ranks(2).run(tasks.compiled_nan_padding, x):
        assert r["frames"] == 1
        for got, eager in zip(r["compiled"], r["eager"], strict=True):
            ref.assert_bitwise(got, eager, "compiled against eager")
        padded = np.concatenate([x, np.full((2, 1, 4), np.nan, x.dtype)], axis=1)
        ref.assert_bitwise(r["eager"][1], padded, "gathered padding")
        assert r["eager"][1][:, 3].view(np.uint16).tolist() == [[0x7FC0] * 4] * 2
