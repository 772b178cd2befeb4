"""One seeded scenario through the numpy reference, torch on 2 and 4 gloo ranks, and JAX on 2, 4
and 8 CPU devices: every byte of every shard and gather must agree."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

import sp_common as sp
from sp_common.testing import data as ref
from sp_common.testing.mesh import run_sharded, spec_on

from . import torch_tasks

pytestmark = pytest.mark.timeout(240)

# The sharded dim has length 8 (divides 2, 4, 8), 5 and 3 (padding; at 4 and 8 ranks some
# ranks hold only padding).
LENGTHS = (8, 5, 3)
DIMS = (0, 1, 2, -2)
PAD_VALUES = {"bool": True, "int32": -7, "int64": 2**40}
# The dtypes the suite moves (float64 and int8 of the testing package's DTYPES are left out).
DTYPES = ("float32", "bfloat16", "float16", "int32", "int64", "bool")


def shape_with(dim: int, length: int) -> tuple[int, ...]:
    shape = [3, 2, 4]
    shape[dim] = length
    return tuple(shape)


def scenarios(dtype: str, dim: int) -> list[tuple[np.ndarray, int, Any]]:
    pad_value = PAD_VALUES.get(dtype, -1.5)
    return [
        (ref.make_data(shape_with(dim, length), dtype, seed=length * 31 + dim), dim, pad_value)
        for length in LENGTHS
    ]


def check_against_reference(results: list[dict[str, Any]], cases: list, n: int, who: str) -> None:
    """``results[rank][case]`` from one backend against the numpy reference."""
    for c, (x, dim, pad_value) in enumerate(cases):
        expected_padded, expected_pad = ref.padded_shards(x, dim, n, pad_value)
        for rank in range(n):
            got = results[rank][c]
            where = f"{who} n={n} rank={rank} shape={x.shape} dim={dim}"
            if x.shape[dim] % n == 0:
                ref.assert_bitwise(got["shard"], ref.shards(x, dim, n)[rank], f"{where} shard")
                ref.assert_bitwise(got["gather"], x, f"{where} gather")
            assert got["pad"] == expected_pad and isinstance(got["pad"], int), where
            ref.assert_bitwise(got["padded_shard"], expected_padded[rank], f"{where} padded")
            ref.assert_bitwise(got["gather_unpad"], x, f"{where} gather(pad_size)")
            ref.assert_bitwise(got["unpad"], x, f"{where} sp_unpad")


def jax_results(cases: list, n: int) -> list[list[dict[str, Any]]]:
    """Per-rank results in the same layout as the torch task's."""
    per_rank: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for x, dim, pad_value in cases:
        divisible = x.shape[dim] % n == 0
        pads: list[int] = []

        def fn(a, dim=dim, pad_value=pad_value, divisible=divisible, pads=pads):
            out = {}
            if divisible:
                s = sp.sp_shard(a, dim)
                out["shard"], out["gather"] = s, sp.sp_gather(s, dim)
            ps, p = sp.sp_shard_with_padding(a, dim, pad_value)
            pads.append(p)
            out["padded_shard"] = ps
            out["gather_unpad"] = sp.sp_gather(ps, dim, pad_size=p)
            out["unpad"] = sp.sp_unpad(sp.sp_gather(ps, dim), dim, p)
            return out

        specs = {"padded_shard": spec_on(dim % x.ndim), "gather_unpad": jax.P(), "unpad": jax.P()}
        if divisible:
            specs |= {"shard": spec_on(dim % x.ndim), "gather": jax.P()}
        out = {k: np.asarray(v) for k, v in run_sharded(fn, n, (x,), specs).items()}
        for rank in range(n):
            r = {k: v for k, v in out.items() if k not in ("shard", "padded_shard")}
            r["pad"] = pads[0]
            for key in ("shard", "padded_shard"):
                if key in out:
                    r[key] = np.split(out[key], n, axis=dim)[rank]
            per_rank[rank].append(r)
    return per_rank


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shard_gather_padding_are_bitwise_equal_across_numpy_torch_and_jax(
    dtype: str, dim: int, torch_ranks, request
) -> None:
    if dtype == "int64":
        request.getfixturevalue("jax_x64")
    cases = scenarios(dtype, dim)
    for n in (2, 4):
        results = torch_ranks(n).run(torch_tasks.data_movement, cases)
        check_against_reference(results, cases, n, "torch")
        assert all(r["shard_owns_memory"] for per in results for r in per if "shard" in r)
    for n in (2, 4, 8):
        check_against_reference(jax_results(cases, n), cases, n, "jax")
