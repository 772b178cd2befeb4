"""ShardingValidator: pairing by name, dims, padding, nesting, and per-context state."""

from __future__ import annotations

import asyncio
import threading

import jax
import numpy as np
import pytest
import torch

import sp_common as sp
from sp_common.testing.mesh import run_sharded

pytestmark = pytest.mark.timeout(60)


def test_validate_lists_every_name_sharded_but_not_gathered() -> None:
    v = sp.ShardingValidator()
    x = torch.ones(2, 4)
    with v.track():
        for name in ("b", "a", "c"):
            v.shard(x, name, dim=1)
        v.gather(x, "c", dim=1)
    with pytest.raises(ValueError, match=r"2 tensor\(s\) sharded but never gathered: 'a', 'b'"):
        v.validate()


def test_validate_passes_when_every_shard_is_gathered_and_reference_attributes_read_state() -> None:
    v = sp.ShardingValidator()
    x = torch.ones(2, 4)
    assert not v._enabled
    with v.track():
        assert v._enabled
        v.gather(v.shard(x, "h", dim=1), "h", dim=1)
        assert v._sharded == {"h"} and v._gathered == {"h"}
    v.validate()
    v.reset()
    assert v._sharded == set()


def test_gathering_a_name_on_another_dim_is_an_error() -> None:
    v = sp.ShardingValidator()
    x = torch.ones(2, 4)
    with (
        v.track(),
        pytest.raises(ValueError, match=r"'h' was sharded on dim 1 .* gathered on dim 0"),
    ):
        v.gather(v.shard(x, "h", dim=-1), "h", dim=0)


def test_negative_and_positive_dims_pair() -> None:
    v = sp.ShardingValidator()
    with v.track():
        v.gather(v.shard(torch.ones(2, 4), "h", dim=-1), "h", dim=1)
    v.validate()


def test_nested_track_keeps_the_outer_record() -> None:
    v = sp.ShardingValidator()
    x = torch.ones(2, 4)
    with v.track():
        v.shard(x, "outer", dim=1)
        with v.track():
            v.gather(v.shard(x, "inner", dim=1), "inner", dim=1)
            v.validate()
        with pytest.raises(ValueError, match="'outer'"):
            v.validate()
        v.gather(x, "outer", dim=1)
    v.validate()


def test_padding_outside_track_is_refused_rather_than_lost() -> None:
    v = sp.ShardingValidator()

    def body(a):
        v.shard(a, "h", dim=1, validate_divisible=False)
        return a

    with pytest.raises(ValueError, match=r"needed 1 elements of padding .* no track\(\) block"):
        run_sharded(body, 4, (np.ones((2, 7), np.float32),), jax.P())


def test_jax_validator_pads_at_trace_time_and_gather_restores_the_length() -> None:
    v = sp.ShardingValidator()
    x = np.arange(14, dtype=np.float32).reshape(2, 7)

    def body(a):
        with v.track():
            s = v.shard(a, "h", dim=1, validate_divisible=False)
            assert s.shape == (2, 2)
            out = v.gather(s * 2, "h", dim=1)
        v.validate()
        return out

    np.testing.assert_array_equal(np.asarray(run_sharded(body, 4, (x,), jax.P())), x * 2)


def test_threads_each_track_their_own_names() -> None:
    v = sp.get_sharding_validator()
    assert v is sp.get_sharding_validator()
    barrier = threading.Barrier(8)
    errors: list[str] = []

    def request(i: int) -> None:
        x = torch.ones(2, 4)
        with v.track():
            v.shard(x, "shared", dim=1)
            v.shard(x, f"own{i}", dim=1)
            barrier.wait()  # every thread is inside its block at once
            v.gather(x, "shared", dim=1)
            if i % 2 == 0:
                v.gather(x, f"own{i}", dim=1)
            barrier.wait()
        try:
            v.validate()
            errors.append("" if i % 2 == 0 else f"thread {i}: no error")
        except ValueError as e:
            ok = i % 2 == 1 and f"'own{i}'" in str(e) and str(e).count("'own") == 1
            errors.append("" if ok else f"thread {i}: {e}")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(errors) == 8 and not any(errors), errors


def test_asyncio_tasks_each_track_their_own_names() -> None:
    v = sp.ShardingValidator()

    async def request(i: int) -> str:
        x = torch.ones(2, 4)
        with v.track():
            v.shard(x, f"t{i}", dim=1)
            await asyncio.sleep(0.01)  # the other tasks run their blocks meanwhile
            if i != 3:
                v.gather(x, f"t{i}", dim=1)
        try:
            v.validate()
            return "ok"
        except ValueError as e:
            return str(e)

    async def main() -> list[str]:
        return await asyncio.gather(*(request(i) for i in range(6)))

    results = asyncio.run(main())
    assert results[:3] == ["ok"] * 3 and results[4:] == ["ok"] * 2
    assert "'t3'" in results[3] and results[3].count("'t") == 1


def test_validators_add_no_context_variables_however_many_are_made() -> None:
    """Each validator used to create two ContextVars, which a context keeps forever."""
    import contextvars

    x = torch.ones(2, 4)
    sp.ShardingValidator().gather(x, "warm-up", 1)
    before = len(contextvars.copy_context())
    for _ in range(100):
        v = sp.ShardingValidator()
        with v.track():
            v.gather(v.shard(x, "h", 1), "h", 1)
        v.validate()
    assert len(contextvars.copy_context()) == before


def test_validator_takes_a_group_and_names_itself_in_errors() -> None:
    v = sp.ShardingValidator()
    with pytest.raises(TypeError, match=r"ShardingValidator.shard: group must be"):
        v.shard(torch.ones(2, 4), "h", 1, group=42)
    with pytest.raises(ValueError, match=r"ShardingValidator.gather: dim=5 is out of range"):
        v.gather(torch.ones(2, 4), "h", 5)
