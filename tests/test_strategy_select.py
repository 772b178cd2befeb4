"""``strategy="auto"``: the documented rule picks by head counts, world size and sequence
length, and auto is exactly the strategy it picks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import sp_common as sp
from sp_common.attention.checks import AttentionShapes
from sp_common.attention.select import ALLGATHER_KV_BYTES, choose_strategy
from sp_common.testing import assert_bitwise, make_data
from sp_common.testing.mesh import mesh_of, spec_on


def shapes(hq: int, hkv: int, n: int, seq: int, d: int = 64, batch: int = 1) -> AttentionShapes:
    local = -(-seq // n)
    return AttentionShapes(batch, local, hq, hkv, d, d, local * n, seq, d**-0.5)


@pytest.mark.parametrize(
    ("hq", "hkv", "n", "seq", "want"),
    [
        (8, 8, 1, 4096, "ulysses"),  # one rank: plain attention
        (8, 8, 4, 4096, "ulysses"),  # MHA: Ulysses moves 1.5 (D+Dv) per head, KV 3 (D+Dv)
        (32, 8, 8, 4096, "ulysses"),  # GQA 4:1 on 8: 35 vs 56 (D+Dv) per token
        (8, 1, 4, 4096, "allgather_kv"),  # MQA: Ulysses repeats the head 4x, 9 vs 3
        (6, 2, 4, 4096, "allgather_kv"),  # 4 does not divide 6: padded heads, 12 vs 6
        (8, 1, 4, 2**21, "ring"),  # the gathered K/V would be 512 MiB in bfloat16
    ],
)
def test_auto_picks_by_the_documented_rule(hq, hkv, n, seq, want) -> None:
    assert choose_strategy(shapes(hq, hkv, n, seq), n, "torch.bfloat16") == want


def test_auto_switches_from_allgather_kv_to_ring_at_the_documented_size() -> None:
    width = 2 * 64 * 2  # K and V of one head, bfloat16 bytes per token
    fits = ALLGATHER_KV_BYTES // width
    assert choose_strategy(shapes(8, 1, 4, fits), 4, "jax.bfloat16") == "allgather_kv"
    assert choose_strategy(shapes(8, 1, 4, fits + 4), 4, "jax.bfloat16") == "ring"
    assert choose_strategy(shapes(8, 1, 4, fits), 4, "float32") == "ring"  # twice the bytes


@pytest.mark.parametrize(("hq", "hkv", "picked"), [(4, 4, "ulysses"), (4, 1, "allgather_kv")])
def test_auto_is_bitwise_the_strategy_it_picks(hq, hkv, picked) -> None:
    n, seq = 4, 12
    q = jnp.asarray(make_data((1, seq, hq, 8), "float32", 0, specials=False))
    kv = jnp.asarray(make_data((1, seq, hkv, 8), "float32", 1, specials=False))
    assert choose_strategy(shapes(hq, hkv, n, seq, d=8), n, "float32") == picked

    def run(strategy):
        f = jax.shard_map(
            lambda a, b: sp.sp_attention(a, b, b, strategy=strategy, causal=True),
            mesh=mesh_of(n),
            in_specs=(spec_on(1),) * 2,
            out_specs=spec_on(1),
        )
        return jax.jit(f)(q, kv)

    assert_bitwise(run("auto"), run(picked), f"auto vs {picked}")
