"""torch <-> JAX through DLPack (sp_common.interop): zero-copy and bitwise for every dtype both
frameworks have, 64-bit types refused without x64, and the traps (grad, strided and lazy views,
aliasing, multi-device arrays, tracers, dtypes only one side has) handled as documented."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sp_common.interop import jax_to_torch, torch_to_jax
from sp_common.testing.data import bits
from sp_common.testing.mesh import mesh_of

pytestmark = pytest.mark.timeout(120)

SHARED_DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "uint8",
    "uint16",
    "uint32",
    "float16",
    "bfloat16",
    "float32",
    "complex64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
]
WIDE_DTYPES = ["int64", "uint64", "float64", "complex128"]


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Every bit pattern of ``dtype`` (NaN payloads included; 0/1 for bool), in memory torch
    allocated (64-byte aligned, as XLA needs for zero-copy; numpy's buffers often are not)."""
    rng = np.random.default_rng(seed)
    dt = getattr(torch, dtype)
    out = torch.empty(shape, dtype=dt)
    if dtype == "bool":
        out.copy_(torch.from_numpy(rng.random(shape) < 0.5))
    else:
        raw = rng.integers(0, 256, size=out.numel() * dt.itemsize, dtype=np.uint8)
        out.view(-1).view(torch.uint8).copy_(torch.from_numpy(raw))
    return out


def torch_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def assert_round_trip_is_zero_copy_and_bitwise(t: torch.Tensor) -> None:
    a = torch_to_jax(t)
    assert str(a.dtype) == str(t.dtype).removeprefix("torch.")
    assert a.shape == tuple(t.shape)
    assert a.unsafe_buffer_pointer() == t.data_ptr(), "torch_to_jax copied"
    np.testing.assert_array_equal(bits(np.asarray(a)), torch_bits(t))
    back = jax_to_torch(a)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert back.data_ptr() == t.data_ptr(), "jax_to_torch copied"
    np.testing.assert_array_equal(torch_bits(back), torch_bits(t))


@pytest.mark.parametrize("dtype", SHARED_DTYPES)
def test_every_shared_dtype_round_trips_zero_copy_and_bitwise(dtype) -> None:
    assert_round_trip_is_zero_copy_and_bitwise(random_tensor(dtype, (3, 5), seed=len(dtype)))


@pytest.mark.parametrize("dtype", WIDE_DTYPES)
def test_64_bit_dtypes_round_trip_zero_copy_with_jax_x64(dtype, jax_x64) -> None:
    assert_round_trip_is_zero_copy_and_bitwise(random_tensor(dtype, (4, 3), seed=len(dtype)))


@pytest.mark.parametrize("dtype", WIDE_DTYPES)
def test_64_bit_dtypes_without_x64_are_a_type_error_not_a_silent_downcast(dtype) -> None:
    assert not jax.config.jax_enable_x64
    with pytest.raises(TypeError, match=rf"torch_to_jax: .*torch\.{dtype}.*jax_enable_x64"):
        torch_to_jax(torch.zeros(3, dtype=getattr(torch, dtype)))


def test_the_x64_context_manager_is_honoured() -> None:
    t = torch.arange(3, dtype=torch.int64)
    with jax.enable_x64(True):
        a = torch_to_jax(t)
    assert a.dtype == jnp.int64 and a.unsafe_buffer_pointer() == t.data_ptr()


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3)])
def test_zero_d_and_empty_tensors_convert(shape) -> None:
    t = torch.ones(shape)
    a = torch_to_jax(t)
    assert a.shape == shape and np.array_equal(np.asarray(a), t.numpy())
    assert tuple(jax_to_torch(a).shape) == shape


def test_an_unaligned_tensor_is_copied_by_jax_and_still_right() -> None:
    base = torch.arange(17.0)
    view = base[1:]  # contiguous, but 4 bytes past a 64-byte boundary
    a = torch_to_jax(view)
    assert a.unsafe_buffer_pointer() != view.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), np.arange(1.0, 17.0, dtype=np.float32))


def test_a_tensor_that_requires_grad_is_detached_without_a_copy() -> None:
    t = torch.arange(6.0).requires_grad_()
    a = torch_to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), np.arange(6.0, dtype=np.float32))
    assert t.requires_grad  # the caller's tensor is untouched


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x.t(),
        lambda x: x[:, 1:],
        lambda x: x[::2],
        lambda x: x[:1].expand(4, 6),
    ],
    ids=["transpose", "column slice", "step", "expand"],
)
def test_strided_views_are_copied_to_contiguous_memory(view) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    v = view(base)
    expected = v.numpy().copy()
    a = torch_to_jax(v)
    np.testing.assert_array_equal(np.asarray(a), expected)
    base.add_(100)  # a copy does not see later writes to the base
    np.testing.assert_array_equal(np.asarray(a), expected)


def test_lazy_conjugate_and_negative_views_are_resolved_not_exported_raw() -> None:
    x = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    conj = x.conj()  # a lazy view: DLPack would refuse it
    neg = conj.imag  # a lazy negation: DLPack would export the unnegated values
    assert conj.is_conj() and neg.is_neg()
    np.testing.assert_array_equal(np.asarray(torch_to_jax(conj)), np.array([1 - 2j, 3 + 4j]))
    np.testing.assert_array_equal(np.asarray(torch_to_jax(neg)), np.array([-2.0, 4.0]))


def test_torch_in_place_writes_show_through_both_conversions() -> None:
    t = torch.zeros(4)
    a = torch_to_jax(t)
    t.add_(1)  # the documented trap: the JAX array changes under JAX's feet
    np.testing.assert_array_equal(np.asarray(a), np.ones(4, np.float32))
    b = jnp.zeros(4)
    jax_to_torch(b)[0] = 7.0
    np.testing.assert_array_equal(np.asarray(b), np.array([7.0, 0, 0, 0], np.float32))


def test_jax_copies_instead_of_donating_a_buffer_torch_still_holds() -> None:
    a = jnp.arange(4.0)
    t = jax_to_torch(a)
    doubled = jax.jit(lambda x: x * 2, donate_argnums=0)(a)
    np.testing.assert_array_equal(np.asarray(doubled), np.arange(4.0) * 2)
    np.testing.assert_array_equal(t.numpy(), np.arange(4.0, dtype=np.float32))


@pytest.mark.parametrize("spec", [jax.P("sp"), jax.P()], ids=["sharded", "replicated"])
def test_an_array_on_several_devices_is_a_value_error_saying_what_to_do(spec) -> None:
    a = jax.device_put(jnp.arange(8.0), jax.sharding.NamedSharding(mesh_of(2), spec))
    with pytest.raises(ValueError, match=r"jax_to_torch: .* spans 2 devices .*addressable_data"):
        jax_to_torch(a)
    one = jax_to_torch(a.addressable_data(0))  # the documented way out
    assert one.shape == ((4,) if spec == jax.P("sp") else (8,))


def test_a_deleted_array_is_a_value_error() -> None:
    a = jnp.ones(3)
    a.delete()
    with pytest.raises(ValueError, match=r"jax_to_torch: array of shape .* was deleted"):
        jax_to_torch(a)


def test_a_traced_array_is_a_type_error() -> None:
    @jax.jit
    def f(x: jax.Array) -> jax.Array:
        jax_to_torch(x)
        return x

    with pytest.raises(TypeError, match="jax_to_torch: array is a traced value"):
        f(jnp.ones(2))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(2, dtype=torch.complex32),
        lambda: torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
        lambda: torch.zeros(2, dtype=torch.uint8).view(torch.bits8),
    ],
    ids=["complex32", "float4_e2m1fn_x2", "bits8"],
)
def test_torch_dtypes_jax_lacks_are_type_errors_naming_the_dtype(make) -> None:
    t = make()
    with pytest.raises(TypeError, match=rf"torch_to_jax: .*dtype {t.dtype}"):
        torch_to_jax(t)


@pytest.mark.parametrize("dtype", ["int4", "uint4", "float4_e2m1fn", "float8_e3m4"])
def test_jax_dtypes_torch_lacks_are_type_errors_naming_the_dtype(dtype) -> None:
    with pytest.raises(TypeError, match=rf"jax_to_torch: .*dtype {dtype}"):
        jax_to_torch(jnp.zeros(2, dtype=getattr(jnp, dtype)))


def test_a_sparse_tensor_is_a_type_error() -> None:
    s = torch.zeros(3).to_sparse()
    with pytest.raises(TypeError, match=r"torch_to_jax: tensor has layout torch.sparse_coo"):
        torch_to_jax(s)


def test_importing_interop_imports_neither_framework() -> None:
    code = "import sys, sp_common.interop; print([m for m in ('torch', 'jax') if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
