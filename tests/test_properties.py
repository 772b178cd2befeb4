"""Property-based tests (hypothesis) of the shape arithmetic and of round trips on both
backends, against the numpy reference."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sp_common as sp
from sp_common.shapes import (
    DtypeInfo,
    check_pad_value,
    normalize_dim,
    pad_size_for,
    shard_bounds,
)
from sp_common.testing import data as ref
from sp_common.testing.mesh import run_sharded, spec_on

from . import torch_tasks

pytestmark = pytest.mark.timeout(300)
FAST = settings(max_examples=200, deadline=None)
DISTRIBUTED = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FAST
@given(size=st.integers(0, 10_000), n=st.integers(1, 64))
def test_pad_size_makes_the_length_divisible_with_less_than_one_chunk(size: int, n: int) -> None:
    p = pad_size_for(size, n)
    assert (size + p) % n == 0 and 0 <= p < n


@FAST
@given(chunk=st.integers(0, 100), n=st.integers(1, 64))
def test_shard_bounds_tile_the_sequence_in_rank_order(chunk: int, n: int) -> None:
    bounds = [shard_bounds(chunk * n, n, r) for r in range(n)]
    assert [s for s, _ in bounds] == [r * chunk for r in range(n)]
    assert all(length == chunk for _, length in bounds)


@FAST
@given(ndim=st.integers(1, 6), dim=st.integers(-8, 8))
def test_normalize_dim_agrees_with_python_indexing(ndim: int, dim: int) -> None:
    shape = (2,) * ndim
    if -ndim <= dim < ndim:
        assert normalize_dim("f", dim, shape) == range(ndim)[dim]
    else:
        with pytest.raises(ValueError, match=f"f: dim={dim} is out of range"):
            normalize_dim("f", dim, shape)


@FAST
@given(
    dtype=st.sampled_from([np.int8, np.uint8, np.int32, np.int64, np.uint16]),
    value=st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True)),
)
def test_integer_pad_values_are_accepted_exactly_when_the_cast_is_exact(dtype, value) -> None:
    info = np.iinfo(dtype)
    exact = math.isfinite(value) and float(value).is_integer() and info.min <= value <= info.max
    try:
        dtype_info = DtypeInfo("int", info.min, info.max, np.dtype(dtype).name, False, False)
        check_pad_value("f", value, dtype_info)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == exact


shapes_and_dims = st.integers(1, 3).flatmap(
    lambda ndim: st.tuples(
        st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim).map(tuple),
        st.integers(-ndim, ndim - 1),
    )
)


def pad_values(dtype: str) -> st.SearchStrategy[object]:
    """Pad values every dtype can hold exactly (its limits, signed zeros, inf and NaN for
    floats), so that padding must reproduce them bit for bit."""
    if dtype == "bool":
        return st.sampled_from([False, True, 0, 1])
    if dtype.startswith("int"):
        info = np.iinfo(ref.numpy_dtype(dtype))
        return st.integers(int(info.min), int(info.max))
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.5, -2.0]
    return st.sampled_from(specials)


cases = st.tuples(
    shapes_and_dims, st.sampled_from(["float32", "bfloat16", "float16", "int32", "bool"])
).flatmap(lambda c: st.tuples(st.just(c[0]), st.just(c[1]), pad_values(c[1])))


@DISTRIBUTED
@given(case=cases, n=st.sampled_from([2, 4, 8]))
def test_jax_padded_round_trip_matches_the_reference(case, n) -> None:
    (shape, dim), dtype, pad_value = case
    x = ref.make_data(shape, dtype, seed=sum(shape) + n)
    pads: list[int] = []

    def body(a):
        s, p = sp.sp_shard_with_padding(a, dim, pad_value)
        pads.append(p)
        return s, sp.sp_gather(s, dim, pad_size=p)

    shards, back = run_sharded(body, n, (x,), (spec_on(dim % len(shape)), jax.P()))
    expected, p = ref.padded_shards(x, dim % len(shape), n, pad_value)
    assert pads[0] == p
    ref.assert_bitwise(np.asarray(shards), np.concatenate(expected, axis=dim), "jax shards")
    ref.assert_bitwise(np.asarray(back), x, "jax round trip")


@DISTRIBUTED
@given(case=cases, n=st.sampled_from([2, 4]))
def test_torch_padded_round_trip_matches_the_reference(case, n, torch_ranks) -> None:
    (shape, dim), dtype, pad_value = case
    x = ref.make_data(shape, dtype, seed=sum(shape))
    results = torch_ranks(n).run(torch_tasks.data_movement, [(x, dim, pad_value)])
    expected, p = ref.padded_shards(x, dim % len(shape), n, pad_value)
    for rank, (r,) in enumerate(results):
        assert r["pad"] == p
        ref.assert_bitwise(r["padded_shard"], expected[rank], f"torch rank {rank} shard")
        ref.assert_bitwise(r["gather_unpad"], x, f"torch rank {rank} round trip")
        if "shard" in r:
            ref.assert_bitwise(r["gather"], x, f"torch rank {rank} plain round trip")
